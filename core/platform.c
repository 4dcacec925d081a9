/*
 * What the library takes from the process and the system: the two clocks,
 * sleeping, random bytes, and the count of fork()s that tells a child what
 * it inherited. Every other core file uses these; this one uses none of them.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "internal.h"

static uint64_t clock_ms(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t idem_now_ms(void)
{
    return clock_ms(CLOCK_REALTIME);
}

uint64_t idem__mono_ms(void)
{
    return clock_ms(CLOCK_MONOTONIC);
}

uint64_t idem_mono_ms(void)
{
    return idem__mono_ms();
}

void idem__sleep_ms(uint64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Counts fork()s, so that a child notices what it inherited. */
static atomic_uint fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void after_fork_in_child(void)
{
    atomic_fetch_add(&fork_generation, 1);
}

static void register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, after_fork_in_child);
}

unsigned idem__fork_generation(void)
{
    (void)pthread_once(&atfork_once, register_atfork);
    return atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

/* Claim tokens come from getrandom() through a per-thread buffer, so a
 * request costs no system call. A child process after fork() starts with a
 * copy of its parent's buffer: the fork generation makes it refill, so two
 * processes never hand out the same bytes. */
#define RANDOM_POOL 512

static _Thread_local uint8_t  random_pool[RANDOM_POOL];
static _Thread_local size_t   random_left;
static _Thread_local unsigned random_pool_generation;

int idem__random_bytes(uint8_t *buf, size_t len)
{
    unsigned gen = idem__fork_generation();
    if (random_pool_generation != gen || random_left < len) {
        size_t got = 0;
        while (got < RANDOM_POOL) {
            ssize_t n = getrandom(random_pool + got, RANDOM_POOL - got, 0);
            if (n < 0 && errno != EINTR) {
                random_left = 0;
                return idem_error_set(IDEM_EBACKEND, "getrandom failed: %s", strerror(errno));
            }
            got += n > 0 ? (size_t)n : 0;
        }
        random_left = RANDOM_POOL;
        random_pool_generation = gen;
    }
    uint8_t *take = random_pool + RANDOM_POOL - random_left;
    memcpy(buf, take, len);
    memset(take, 0, len); /* a token is never handed out twice, nor left behind */
    random_left -= len;
    return IDEM_OK;
}
