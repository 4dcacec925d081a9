/* Test support: a TCP proxy that spoils replies on command (see proxy.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proxy.h"

#define MAX_PAIRS 64
#define TICK_MS   10

typedef struct pair {
    struct idem_test_proxy *p;
    int       cli, up;
    pthread_t thread;
    bool      used;   /* the slot holds a thread to join */
    atomic_bool done; /* that thread has finished */
} pair;

struct idem_test_proxy {
    int          lfd;
    uint16_t     port, upstream;
    atomic_int   mode;
    atomic_uint  ms;
    atomic_bool  stop;
    atomic_uint  accepted;
    pthread_t    acceptor;
    pthread_mutex_t mu;
    pair         pairs[MAX_PAIRS];
};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int connect_port(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static bool send_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        buf += n;
        len -= (size_t)n;
    }
    return true;
}

/* Sleep until ms have passed since t0, the proxy stops, or (when
 * while_mode >= 0) the mode is no longer while_mode. */
static void wait_until(idem_test_proxy *p, uint64_t t0, unsigned ms, int while_mode)
{
    while (!atomic_load(&p->stop) && now_ms() - t0 < ms &&
           (while_mode < 0 || atomic_load(&p->mode) == while_mode))
        usleep(TICK_MS * 1000);
}

/* Pass one chunk of a reply to the client as the mode says. */
static bool pass_reply(idem_test_proxy *p, int cli, const char *buf, size_t len)
{
    uint64_t t0 = now_ms();
    while (len && !atomic_load(&p->stop)) {
        int mode = atomic_load(&p->mode);
        unsigned ms = atomic_load(&p->ms);
        if (mode == IDEM_PROXY_HOLD) {
            wait_until(p, t0, UINT32_MAX, IDEM_PROXY_HOLD);
            continue;
        }
        if (mode == IDEM_PROXY_DELAY) {
            wait_until(p, t0, ms, IDEM_PROXY_DELAY);
            if (atomic_load(&p->mode) == IDEM_PROXY_DELAY || now_ms() - t0 >= ms)
                return send_all(cli, buf, len);
            continue;
        }
        if (mode == IDEM_PROXY_TRICKLE) {
            if (!send_all(cli, buf, 1))
                return false;
            buf++, len--;
            if (len)
                wait_until(p, now_ms(), ms, IDEM_PROXY_TRICKLE);
            continue;
        }
        return send_all(cli, buf, len);
    }
    return len == 0;
}

static void *pair_run(void *arg)
{
    pair *pr = arg;
    idem_test_proxy *p = pr->p;
    char *buf = malloc(65536);
    bool dead = buf == NULL;
    while (!dead && !atomic_load(&p->stop)) {
        struct pollfd fds[2] = {{.fd = pr->cli, .events = POLLIN}, {.fd = pr->up, .events = POLLIN}};
        if (poll(fds, 2, 50) <= 0)
            continue;
        if (fds[0].revents) {
            ssize_t got = read(pr->cli, buf, 65536);
            if (got <= 0 || !send_all(pr->up, buf, (size_t)got)) {
                dead = true;
            } else {
                int want = IDEM_PROXY_DROP_REPLY;
                if (atomic_compare_exchange_strong(&p->mode, &want, IDEM_PROXY_PASS)) {
                    struct pollfd w = {.fd = pr->up, .events = POLLIN};
                    if (poll(&w, 1, 2000) > 0)
                        (void)!read(pr->up, buf, 65536); /* the reply, swallowed */
                    dead = true;
                }
            }
        }
        if (!dead && fds[1].revents) {
            ssize_t got = read(pr->up, buf, 65536);
            dead = got <= 0 || !pass_reply(p, pr->cli, buf, (size_t)got);
        }
    }
    shutdown(pr->cli, SHUT_RDWR);
    shutdown(pr->up, SHUT_RDWR);
    free(buf);
    atomic_store(&pr->done, true);
    return NULL;
}

static void *accept_run(void *arg)
{
    idem_test_proxy *p = arg;
    while (!atomic_load(&p->stop)) {
        struct pollfd l = {.fd = p->lfd, .events = POLLIN};
        if (poll(&l, 1, 50) <= 0)
            continue;
        int c = accept(p->lfd, NULL, NULL);
        if (c < 0)
            continue;
        atomic_fetch_add(&p->accepted, 1);
        int u = connect_port(p->upstream);
        pthread_mutex_lock(&p->mu);
        for (int j = 0; j < MAX_PAIRS; j++)
            if (p->pairs[j].used && atomic_load(&p->pairs[j].done)) {
                pthread_join(p->pairs[j].thread, NULL);
                close(p->pairs[j].cli);
                close(p->pairs[j].up);
                p->pairs[j].used = false;
            }
        int i = 0;
        while (i < MAX_PAIRS && p->pairs[i].used)
            i++;
        if (u < 0 || i == MAX_PAIRS) {
            pthread_mutex_unlock(&p->mu);
            close(c);
            if (u >= 0)
                close(u);
            continue;
        }
        p->pairs[i].p = p;
        p->pairs[i].cli = c;
        p->pairs[i].up = u;
        p->pairs[i].used = true;
        atomic_store(&p->pairs[i].done, false);
        if (pthread_create(&p->pairs[i].thread, NULL, pair_run, &p->pairs[i]) != 0) {
            p->pairs[i].used = false;
            close(c);
            close(u);
        }
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

idem_test_proxy *idem_test_proxy_start(uint16_t upstream)
{
    idem_test_proxy *p = calloc(1, sizeof *p);
    if (!p) {
        fprintf(stderr, "proxy: out of memory\n");
        return NULL;
    }
    p->upstream = upstream;
    pthread_mutex_init(&p->mu, NULL);
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (p->lfd < 0 || bind(p->lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(p->lfd, 64) != 0 ||
        getsockname(p->lfd, (struct sockaddr *)&a, &len) != 0 ||
        pthread_create(&p->acceptor, NULL, accept_run, p) != 0) {
        fprintf(stderr, "proxy: cannot listen on a loopback port: %s\n", strerror(errno));
        if (p->lfd >= 0)
            close(p->lfd);
        free(p);
        return NULL;
    }
    p->port = ntohs(a.sin_port);
    return p;
}

uint16_t idem_test_proxy_port(const idem_test_proxy *p)
{
    return p->port;
}

void idem_test_proxy_set(idem_test_proxy *p, idem_test_proxy_mode mode, unsigned ms)
{
    atomic_store(&p->ms, ms);
    atomic_store(&p->mode, (int)mode);
}

int idem_test_proxy_drop_pending(const idem_test_proxy *p)
{
    return atomic_load(&((idem_test_proxy *)p)->mode) == IDEM_PROXY_DROP_REPLY;
}

unsigned idem_test_proxy_accepted(const idem_test_proxy *p)
{
    return atomic_load(&((idem_test_proxy *)p)->accepted);
}

void idem_test_proxy_stop(idem_test_proxy *p)
{
    if (!p)
        return;
    atomic_store(&p->stop, true);
    pthread_join(p->acceptor, NULL);
    for (int i = 0; i < MAX_PAIRS; i++)
        if (p->pairs[i].used) {
            pthread_join(p->pairs[i].thread, NULL);
            close(p->pairs[i].cli);
            close(p->pairs[i].up);
        }
    close(p->lfd);
    pthread_mutex_destroy(&p->mu);
    free(p);
}
