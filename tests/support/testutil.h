/* Test support: the clock, sleeping and request builders every suite uses.
 *
 * Static inline, so that a suite includes this header ("support/testutil.h")
 * and links nothing more; programs made of several files (conformance) get
 * one private copy per file and no clashing definitions. */
#ifndef IDEM_TEST_TESTUTIL_H
#define IDEM_TEST_TESTUTIL_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <idempotency/idempotency.h>

/* Milliseconds on the monotonic clock. Signed, so that differences of two
 * readings and deadlines minus now can go below zero. */
static inline int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleep ms milliseconds, the whole of them: a signal does not cut it short.
 * Zero or less returns at once. */
static inline void sleep_ms(long ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A request for a NUL-terminated key, with no fingerprint. */
static inline idem_request req_str(const char *key)
{
    return (idem_request){.key = key, .key_len = strlen(key)};
}

#endif
