/*
 * A layer's keeper: the background work that keeps leases honest.
 *
 *   - Deferred frees. A claim whose reply was lost (a timeout: it may have
 *     landed), or a key that could not be given up (the store failed the
 *     release), stays in the store until its lease ends with nothing
 *     running. The keeper remembers its token and frees it, fenced by that
 *     token, as soon as the store answers again: retried with a backoff,
 *     at once when a request of the layer finds the store answering, and
 *     given up when the lease ends anyway.
 *   - Renewals. With auto_extend, the lease of a handler run by idem_run()
 *     is renewed every third of the lease while the handler runs.
 *
 * One thread per layer, started when first needed (at idem_layer_new()
 * with auto_extend), joined by idem_layer_free().
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define BACKOFF_FIRST_MS   50
#define BACKOFF_MAX_MS     1000
#define LOST_RECHECK_MS    500   /* a lost claim's first "nothing there" is checked once more */
#define MAX_PENDING        4096  /* keys waiting to be freed, per layer */

typedef struct pending {
    struct pending *next;
    uint64_t        until;       /* monotonic ms: the lease has ended by then */
    uint64_t        not_before;  /* monotonic ms */
    bool            unsure;      /* the claim may not have landed (yet) */
    unsigned        absent;      /* "nothing to free" answers so far */
    uint8_t         token[IDEM_TOKEN_LEN];
    size_t          key_len;
    uint8_t         key[];
} pending;

struct idem_keeper {
    idem_store      *store;
    _Atomic uint64_t *freed;     /* the layer's claims_freed counter */
    pthread_mutex_t  mu;
    pthread_cond_t   cond;       /* wakes the thread; also signals a renewal done */
    pthread_t        thread;
    bool             started, stop;
    unsigned         generation; /* idem__fork_generation() when the thread started */
    pending         *pending;
    atomic_size_t    npending;
    uint64_t         next_round; /* monotonic ms of the next try at the pending frees */
    uint64_t         backoff;
    idem_renewal    *renewals;
};

int idem__keeper_new(idem_keeper **out, idem_store *store, _Atomic uint64_t *freed)
{
    idem_keeper *k = calloc(1, sizeof *k);
    if (!k)
        return IDEM_ENOMEM;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (pthread_mutex_init(&k->mu, NULL) != 0 || pthread_cond_init(&k->cond, &ca) != 0) {
        pthread_condattr_destroy(&ca);
        free(k);
        return IDEM_ENOMEM;
    }
    pthread_condattr_destroy(&ca);
    k->store = store;
    k->freed = freed;
    k->backoff = BACKOFF_FIRST_MS;
    *out = k;
    return IDEM_OK;
}

static void wait_until(idem_keeper *k, uint64_t when)
{
    struct timespec ts = {.tv_sec = (time_t)(when / 1000), .tv_nsec = (long)(when % 1000) * 1000000L};
    (void)pthread_cond_timedwait(&k->cond, &k->mu, &ts);
}

/* One try at the pending frees, with k->mu held (dropped around each store
 * call). A store error ends the round: the store is down, and the others
 * would only wait out the same timeout. Returns when to try next. */
/* Is a renewal due now? Under k->mu. */
static bool renewal_due(const idem_keeper *k, uint64_t now)
{
    for (const idem_renewal *r = k->renewals; r; r = r->next)
        if (!r->busy && r->due <= now)
            return true;
    return false;
}

static uint64_t free_round(idem_keeper *k, uint64_t now)
{
    if (now < k->next_round)
        return k->next_round;
    uint64_t next = UINT64_MAX;
    pending *todo = NULL;
    for (pending **pp = &k->pending; *pp;) {
        pending *p = *pp;
        if (p->until <= now) {              /* the lease has ended: nothing left to free */
            *pp = p->next;
            free(p);
            atomic_fetch_sub(&k->npending, 1);
        } else if (p->not_before > now) {
            next = p->not_before < next ? p->not_before : next;
            pp = &p->next;
        } else {
            *pp = p->next;                  /* ours while the lock is dropped */
            p->next = todo;
            todo = p;
        }
    }
    while (todo) {
        pending *p = todo;
        todo = p->next;
        pthread_mutex_unlock(&k->mu);
        int rc = idem__store_release(k->store, p->key, p->key_len, p->token);
        pthread_mutex_lock(&k->mu);
        now = idem__mono_ms();
        bool done = true;
        if (rc == IDEM_OK) {
            atomic_fetch_add(k->freed, 1);
        } else if (rc == IDEM_ELOST) {
            /* Nothing of ours there. A claim sent on a connection that timed
             * out may still be queued in the server behind this release:
             * look once more before forgetting it. */
            if (p->unsure && ++p->absent < 2) {
                p->not_before = now + LOST_RECHECK_MS;
                next = p->not_before < next ? p->not_before : next;
                done = false;
            }
        } else {
            done = false;
        }
        if (done) {
            free(p);
            atomic_fetch_sub(&k->npending, 1);
        } else {
            p->next = k->pending;
            k->pending = p;
        }
        if (rc != IDEM_OK && rc != IDEM_ELOST) {
            while (todo) {                  /* the rest waits for the next round */
                pending *q = todo;
                todo = q->next;
                q->next = k->pending;
                k->pending = q;
            }
            k->next_round = now + k->backoff;
            k->backoff = k->backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : k->backoff * 2;
            return k->next_round;
        }
        k->backoff = BACKOFF_FIRST_MS;
        if (todo && renewal_due(k, now)) {
            /* a lease that ends costs more than a key freed late: renew
             * first, the rest of this round comes right after */
            while (todo) {
                pending *q = todo;
                todo = q->next;
                q->next = k->pending;
                k->pending = q;
            }
            return now;
        }
    }
    return next;
}

static void *keeper_main(void *arg)
{
    idem_keeper *k = arg;
    pthread_mutex_lock(&k->mu);
    while (!k->stop) {
        uint64_t now = idem__mono_ms(), next = now + 60000;
        /* renewals first: a lease that ends costs more than a key freed late */
        bool ran = false;
        for (idem_renewal *r = k->renewals; r && !k->stop; r = r->next) {
            if (r->busy || r->due > now) {
                if (!r->busy && r->due < next)
                    next = r->due;
                continue;
            }
            r->busy = true;
            pthread_mutex_unlock(&k->mu);
            uint64_t due = 0;
            bool keep = r->renew(r->arg, &due);
            pthread_mutex_lock(&k->mu);
            r->busy = false;
            r->due = keep ? due : UINT64_MAX;
            pthread_cond_broadcast(&k->cond);
            ran = true;
            break;                          /* the list may have changed: scan again */
        }
        if (ran)
            continue;
        if (k->pending) {
            uint64_t n = free_round(k, now);
            if (n < next)
                next = n;
        }
        if (k->stop)
            break;
        now = idem__mono_ms();
        if (next > now)
            wait_until(k, next);
    }
    pthread_mutex_unlock(&k->mu);
    return NULL;
}

/* With k->mu held. */
static int start_locked(idem_keeper *k)
{
    if (k->started)
        return IDEM_OK;
    if (pthread_create(&k->thread, NULL, keeper_main, k) != 0)
        return IDEM_ENOMEM;
    k->started = true;
    k->generation = idem__fork_generation();
    return IDEM_OK;
}

int idem__keeper_start(idem_keeper *k)
{
    pthread_mutex_lock(&k->mu);
    int rc = start_locked(k);
    pthread_mutex_unlock(&k->mu);
    return rc;
}

void idem__keeper_free(idem_keeper *k)
{
    if (!k)
        return;
    if (k->started && k->generation != idem__fork_generation()) {
        /* A child of the process whose thread this was: the thread is not
         * here, and the lock may have been held by it at fork(). Only our
         * copy of the memory is freed. */
        while (k->pending) {
            pending *p = k->pending;
            k->pending = p->next;
            free(p);
        }
        free(k);
        return;
    }
    pthread_mutex_lock(&k->mu);
    k->stop = true;
    pthread_cond_broadcast(&k->cond);
    bool started = k->started;
    pthread_mutex_unlock(&k->mu);
    if (started)
        pthread_join(k->thread, NULL);
    while (k->pending) {
        pending *p = k->pending;
        k->pending = p->next;
        free(p);
    }
    pthread_cond_destroy(&k->cond);
    pthread_mutex_destroy(&k->mu);
    free(k);
}

int idem__keeper_defer_release(idem_keeper *k, const uint8_t *key, size_t key_len, const uint8_t *token,
                               uint64_t until, bool unsure)
{
    if (atomic_load(&k->npending) >= MAX_PENDING)
        return IDEM_ENOMEM;
    pending *p = malloc(sizeof *p + key_len);
    if (!p)
        return IDEM_ENOMEM;
    *p = (pending){.until = until, .unsure = unsure, .key_len = key_len};
    memcpy(p->token, token, IDEM_TOKEN_LEN);
    memcpy(p->key, key, key_len);
    pthread_mutex_lock(&k->mu);
    int rc = start_locked(k);
    if (rc == IDEM_OK) {
        p->next = k->pending;
        k->pending = p;
        atomic_fetch_add(&k->npending, 1);
        pthread_cond_broadcast(&k->cond);
    }
    pthread_mutex_unlock(&k->mu);
    if (rc)
        free(p);
    return rc;
}

void idem__keeper_poke(idem_keeper *k)
{
    if (atomic_load_explicit(&k->npending, memory_order_relaxed) == 0)
        return;
    pthread_mutex_lock(&k->mu);
    if (k->next_round > idem__mono_ms()) {
        k->next_round = 0;
        k->backoff = BACKOFF_FIRST_MS;
        pthread_cond_broadcast(&k->cond);
    }
    pthread_mutex_unlock(&k->mu);
}

int idem__keeper_watch(idem_keeper *k, idem_renewal *r, uint64_t due)
{
    pthread_mutex_lock(&k->mu);
    int rc = start_locked(k);
    if (rc == IDEM_OK) {
        r->due = due;
        r->busy = false;
        r->next = k->renewals;
        k->renewals = r;
        pthread_cond_broadcast(&k->cond);
    }
    pthread_mutex_unlock(&k->mu);
    return rc;
}

void idem__keeper_unwatch(idem_keeper *k, idem_renewal *r)
{
    pthread_mutex_lock(&k->mu);
    while (r->busy)
        pthread_cond_wait(&k->cond, &k->mu);
    for (idem_renewal **pp = &k->renewals; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    pthread_mutex_unlock(&k->mu);
}

/* ---- how long handlers take ---- */

void idem__durations_add(idem_durations *d, uint64_t ms)
{
    unsigned i = atomic_fetch_add_explicit(&d->next, 1, memory_order_relaxed);
    atomic_store_explicit(&d->ms[i % IDEM_DURATIONS], ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms,
                          memory_order_relaxed);
    atomic_fetch_add_explicit(&d->done, 1, memory_order_release);
}

static int by_value(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Every 409 asks for it, and sorting costs more than the store's answer
 * (about 1.3 µs for 64): the figure is kept with the count of durations
 * written when it was made, and made again once another one is. */
bool idem__durations_p95(idem_durations *d, uint32_t *out)
{
    unsigned done = atomic_load_explicit(&d->done, memory_order_acquire);
    unsigned next = atomic_load_explicit(&d->next, memory_order_relaxed);
    if (next < IDEM_DURATIONS_MIN)
        return false;
    uint64_t at = atomic_load_explicit(&d->p95_at, memory_order_relaxed);
    if (at >> 32 == done && at) {
        *out = (uint32_t)at;
        return true;
    }
    unsigned n = next > IDEM_DURATIONS ? IDEM_DURATIONS : next;
    uint32_t v[IDEM_DURATIONS];
    for (unsigned i = 0; i < n; i++)
        v[i] = atomic_load_explicit(&d->ms[i], memory_order_relaxed);
    qsort(v, n, sizeof v[0], by_value);
    *out = v[(n * 95 + 99) / 100 - 1];
    atomic_store_explicit(&d->p95_at, (uint64_t)done << 32 | *out, memory_order_relaxed);
    return true;
}
