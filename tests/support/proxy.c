/* Test support: a TCP proxy that shapes a server's replies (see proxy.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

#define MAX_CONNS 256
#define TICK_MS   2

/* Reply bytes read from the server, not yet sent to the client. */
typedef struct chunk {
    struct chunk *next;
    uint64_t      arrived_ms;
    size_t        len, off;
    unsigned char data[];
} chunk;

typedef struct conn {
    int      client, server;     /* -1 once closed */
    chunk   *head, *tail;
    uint64_t last_byte_ms;       /* TRICKLE: when the last byte went out */
    bool     server_eof;
} conn;

struct idem_proxy {
    int          listener;
    uint16_t     port, target;
    pthread_t    thread;
    atomic_bool  stop;
    atomic_int   mode;
    atomic_uint  delay_ms;
    _Atomic uint64_t reply_bytes;
    conn         conns[MAX_CONNS];
    int          nconns;
};

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int connect_target(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void conn_close(conn *c)
{
    if (c->client >= 0)
        close(c->client);
    if (c->server >= 0)
        close(c->server);
    c->client = c->server = -1;
    while (c->head) {
        chunk *n = c->head->next;
        free(c->head);
        c->head = n;
    }
    c->tail = NULL;
}

/* Send what the mode lets out now. false when the client is gone. */
static bool flush_replies(idem_proxy *p, conn *c, uint64_t now)
{
    while (c->head) {
        chunk *k = c->head;
        size_t n = k->len - k->off;
        int mode = atomic_load(&p->mode);
        uint32_t delay = atomic_load(&p->delay_ms);
        if (mode == IDEM_PROXY_HOLD)
            return true;
        if (mode == IDEM_PROXY_DELAY && now < k->arrived_ms + delay)
            return true;
        if (mode == IDEM_PROXY_TRICKLE) {
            if (now < c->last_byte_ms + delay)
                return true;
            n = 1;
        }
        ssize_t w = send(c->client, k->data + k->off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK;
        atomic_fetch_add(&p->reply_bytes, (uint64_t)w);
        c->last_byte_ms = now;
        k->off += (size_t)w;
        if (k->off < k->len)
            return true;
        c->head = k->next;
        if (!c->head)
            c->tail = NULL;
        free(k);
        if (mode == IDEM_PROXY_TRICKLE)
            return true;
    }
    return true;
}

/* Relay from one side; false when that side closed or failed. */
static bool relay_request(conn *c)
{
    unsigned char buf[16384];
    ssize_t n = recv(c->client, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
        return false;
    for (ssize_t off = 0; n > 0 && off < n;) {
        ssize_t w = send(c->server, buf + off, (size_t)(n - off), MSG_NOSIGNAL);
        if (w < 0)
            return false;
        off += w;
    }
    return true;
}

static bool read_reply(conn *c, uint64_t now)
{
    unsigned char buf[16384];
    ssize_t n = recv(c->server, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0) {
        c->server_eof = true;
        return true;
    }
    if (n < 0)
        return errno == EAGAIN || errno == EINTR;
    chunk *k = malloc(sizeof *k + (size_t)n);
    if (!k)
        return false;
    *k = (chunk){.arrived_ms = now, .len = (size_t)n};
    memcpy(k->data, buf, (size_t)n);
    if (c->tail)
        c->tail->next = k;
    else
        c->head = k;
    c->tail = k;
    return true;
}

static void accept_one(idem_proxy *p)
{
    int fd = accept4(p->listener, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0)
        return;
    int server = connect_target(p->target);
    if (server < 0 || p->nconns == MAX_CONNS) {
        close(fd);
        if (server >= 0)
            close(server);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    p->conns[p->nconns++] = (conn){.client = fd, .server = server};
}

static void *proxy_main(void *arg)
{
    idem_proxy *p = arg;
    struct pollfd fds[1 + 2 * MAX_CONNS];
    while (!atomic_load(&p->stop)) {
        int n = 0;
        fds[n++] = (struct pollfd){.fd = p->listener, .events = POLLIN};
        for (int i = 0; i < p->nconns; i++) {
            fds[n++] = (struct pollfd){.fd = p->conns[i].client, .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = p->conns[i].server_eof ? -1 : p->conns[i].server,
                                       .events = POLLIN};
        }
        (void)poll(fds, (nfds_t)n, TICK_MS);
        uint64_t now = now_ms();
        if (fds[0].revents & POLLIN)
            accept_one(p);
        for (int i = 0; i < p->nconns; i++) {
            conn *c = &p->conns[i];
            struct pollfd *cl = &fds[1 + 2 * i], *sv = &fds[2 + 2 * i];
            bool ok = true;
            if (i * 2 + 2 < n) {
                if (cl->revents & (POLLIN | POLLHUP | POLLERR))
                    ok = relay_request(c);
                if (ok && (sv->revents & (POLLIN | POLLHUP | POLLERR)))
                    ok = read_reply(c, now);
            }
            if (ok)
                ok = flush_replies(p, c, now);
            if (ok && c->server_eof && !c->head)
                ok = false;
            if (!ok) {
                conn_close(c);
                p->conns[i] = p->conns[--p->nconns];
                /* the moved connection's poll slots are stale: it waits a tick */
                n = 2 * i + 1;
                i--;
            }
        }
    }
    for (int i = 0; i < p->nconns; i++)
        conn_close(&p->conns[i]);
    p->nconns = 0;
    return NULL;
}

int idem_proxy_start(idem_proxy **out, uint16_t target_port)
{
    idem_proxy *p = calloc(1, sizeof *p);
    if (!p)
        return -1;
    p->target = target_port;
    p->listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (p->listener < 0 || bind(p->listener, (struct sockaddr *)&a, sizeof a) != 0 ||
        listen(p->listener, 64) != 0 || getsockname(p->listener, (struct sockaddr *)&a, &len) != 0) {
        fprintf(stderr, "proxy: cannot listen on a loopback port: %s\n", strerror(errno));
        if (p->listener >= 0)
            close(p->listener);
        free(p);
        return -1;
    }
    p->port = ntohs(a.sin_port);
    if (pthread_create(&p->thread, NULL, proxy_main, p) != 0) {
        fprintf(stderr, "proxy: cannot start its thread\n");
        close(p->listener);
        free(p);
        return -1;
    }
    *out = p;
    return 0;
}

uint16_t idem_proxy_port(const idem_proxy *p)
{
    return p->port;
}

void idem_proxy_set(idem_proxy *p, idem_proxy_mode mode, uint32_t delay_ms)
{
    atomic_store(&p->delay_ms, delay_ms);
    atomic_store(&p->mode, (int)mode);
}

uint64_t idem_proxy_reply_bytes(const idem_proxy *p)
{
    return atomic_load(&((idem_proxy *)p)->reply_bytes);
}

void idem_proxy_stop(idem_proxy *p)
{
    if (!p)
        return;
    atomic_store(&p->stop, true);
    pthread_join(p->thread, NULL);
    close(p->listener);
    free(p);
}
