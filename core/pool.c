/*
 * The connection pool every driver with thread-unsafe connections shares
 * (declared in <idempotency/backend.h>).
 *
 * Idle connections sit on a stack, newest on top: a caller takes the one
 * used last (its socket and caches are warm), and the bottom of the stack is
 * the longest unused, so connections past idle_ms are found there and closed
 * a few at a time by whoever passes by. The lock is held only to push or pop
 * a pointer; connecting and disconnecting happen outside it, except when a
 * broken connection empties the idle list (a rare path).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define DEFAULT_MAX_IDLE 64
#define DEFAULT_IDLE_MS  60000
/* Expired idle connections closed by one get or put, at most. */
#define REAP_BATCH 8

typedef struct idle_slot {
    void    *conn;
    uint64_t used_ms;   /* monotonic time it was put back */
} idle_slot;

struct idem_pool {
    idem_pool_config cfg;
    pthread_mutex_t  mu;
    idle_slot       *idle;     /* cfg.max_idle slots; idle[0] is the oldest */
    unsigned         nidle;
};

static uint64_t pool_now_ms(void)
{
    struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts); /* a few ms of resolution is plenty, and it is cheap */
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int idem_pool_new(idem_pool **out, const idem_pool_config *cfg)
{
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_pool_new: out is NULL");
    *out = NULL;
    if (!cfg || !cfg->connect || !cfg->disconnect)
        return idem_error_set(IDEM_EINVAL, "idem_pool_new: the configuration needs connect and "
                                           "disconnect functions");
    idem_pool *p = calloc(1, sizeof *p);
    if (!p)
        return idem_error_set(IDEM_ENOMEM, "out of memory making a connection pool");
    p->cfg = *cfg;
    if (!p->cfg.max_idle)
        p->cfg.max_idle = DEFAULT_MAX_IDLE;
    if (!p->cfg.idle_ms)
        p->cfg.idle_ms = DEFAULT_IDLE_MS;
    p->idle = calloc(p->cfg.max_idle, sizeof *p->idle);
    if (!p->idle) {
        unsigned n = p->cfg.max_idle;
        free(p);
        return idem_error_set(IDEM_ENOMEM, "out of memory making a connection pool of %u idle "
                              "connections", n);
    }
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        free(p->idle);
        free(p);
        return idem_error_set(IDEM_ENOMEM, "cannot make a mutex for a connection pool");
    }
    *out = p;
    return IDEM_OK;
}

void idem_pool_free(idem_pool *pool)
{
    if (!pool)
        return;
    for (unsigned i = 0; i < pool->nidle; i++)
        pool->cfg.disconnect(pool->cfg.ctx, pool->idle[i].conn);
    pthread_mutex_destroy(&pool->mu);
    free(pool->idle);
    free(pool);
}

/* With the lock held: move up to REAP_BATCH idle connections unused since
 * before now - idle_ms off the bottom of the stack into gone[]. */
static unsigned reap_locked(idem_pool *p, uint64_t now, void **gone)
{
    unsigned n = 0;
    while (n < p->nidle && n < REAP_BATCH && now - p->idle[n].used_ms >= p->cfg.idle_ms) {
        gone[n] = p->idle[n].conn;
        n++;
    }
    if (n) {
        p->nidle -= n;
        memmove(p->idle, p->idle + n, p->nidle * sizeof *p->idle);
    }
    return n;
}

static void close_all(idem_pool *p, void **gone, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        p->cfg.disconnect(p->cfg.ctx, gone[i]);
}

int idem_pool_get(idem_pool *pool, void **conn, bool *fresh)
{
    void *gone[REAP_BATCH], *c = NULL;
    unsigned ngone;
    do {
        /* Never hand out a connection unused for idle_ms: when the newest is
         * that old, all are, and they are closed a batch at a time. The
         * clock is read under the lock, so no slot is newer than now. */
        pthread_mutex_lock(&pool->mu);
        uint64_t now = pool_now_ms();
        ngone = reap_locked(pool, now, gone);
        if (pool->nidle && now - pool->idle[pool->nidle - 1].used_ms < pool->cfg.idle_ms)
            c = pool->idle[--pool->nidle].conn;
        pthread_mutex_unlock(&pool->mu);
        close_all(pool, gone, ngone);
    } while (!c && ngone == REAP_BATCH);
    if (c) {
        *conn = c;
        if (fresh)
            *fresh = false;
        return IDEM_OK;
    }
    int rc = pool->cfg.connect(pool->cfg.ctx, &c);
    if (rc)
        return rc < 0 ? rc : IDEM_EBACKEND;
    *conn = c;
    if (fresh)
        *fresh = true;
    return IDEM_OK;
}

void idem_pool_put(idem_pool *pool, void *conn, idem_conn_state state)
{
    if (!conn)
        return;
    if (state != IDEM_CONN_OK) {
        /* The server most likely went away: every idle connection to it is
         * as dead as this one, and finding that out one request at a time
         * would cost each of them a failure. */
        pthread_mutex_lock(&pool->mu);
        for (unsigned i = 0; i < pool->nidle; i++)
            pool->cfg.disconnect(pool->cfg.ctx, pool->idle[i].conn);
        pool->nidle = 0;
        pthread_mutex_unlock(&pool->mu);
        pool->cfg.disconnect(pool->cfg.ctx, conn);
        return;
    }
    void *gone[REAP_BATCH + 1];
    pthread_mutex_lock(&pool->mu);
    uint64_t now = pool_now_ms();
    unsigned ngone = reap_locked(pool, now, gone);
    if (pool->nidle < pool->cfg.max_idle)
        pool->idle[pool->nidle++] = (idle_slot){.conn = conn, .used_ms = now};
    else
        gone[ngone++] = conn; /* more idle than max_idle: this one goes */
    pthread_mutex_unlock(&pool->mu);
    close_all(pool, gone, ngone);
}

int idem_pool_run(idem_pool *pool, idem_pool_fn fn, void *arg)
{
    void *conn;
    bool fresh = false;
    int rc = idem_pool_get(pool, &conn, &fresh);
    if (rc)
        return rc;
    idem_conn_state state = IDEM_CONN_OK;
    rc = fn(conn, arg, &state);
    idem_pool_put(pool, conn, state);
    if (state != IDEM_CONN_STALE || fresh)
        return rc;
    /* The connection had sat idle and the server closed it: once more, on a
     * connection made now (not another idle one, which another thread may
     * have put back meanwhile and could be as stale). A new connection that
     * is stale at once is a server that is going away: no third try. */
    if ((rc = pool->cfg.connect(pool->cfg.ctx, &conn)))
        return rc < 0 ? rc : IDEM_EBACKEND;
    state = IDEM_CONN_OK;
    rc = fn(conn, arg, &state);
    idem_pool_put(pool, conn, state);
    return rc;
}
