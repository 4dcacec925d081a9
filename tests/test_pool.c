/*
 * The shared connection pool (idem_pool_* in <idempotency/backend.h>) against
 * fake connections that count how they are made, used and closed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include <idempotency/backend.h>

#include "support/testutil.h"

typedef struct fake_conn {
    unsigned   id;
    atomic_int in_use;     /* 1 while a caller holds it */
    atomic_int closed;
} fake_conn;

typedef struct counts {
    atomic_uint connects, disconnects, double_use, use_after_close;
    atomic_int  fail_connect;  /* next connects fail */
} counts;

static counts cnt;

static int fake_connect(void *ctx, void **conn)
{
    counts *c = ctx;
    if (atomic_load(&c->fail_connect) > 0) {
        atomic_fetch_sub(&c->fail_connect, 1);
        return idem_error_set(IDEM_EBACKEND, "fake: connection refused");
    }
    fake_conn *fc = calloc(1, sizeof *fc);
    cr_assert_not_null(fc);
    fc->id = atomic_fetch_add(&c->connects, 1) + 1;
    *conn = fc;
    return IDEM_OK;
}

static void fake_disconnect(void *ctx, void *conn)
{
    counts *c = ctx;
    fake_conn *fc = conn;
    if (atomic_exchange(&fc->closed, 1))
        atomic_fetch_add(&c->use_after_close, 1); /* closed twice */
    atomic_fetch_add(&c->disconnects, 1);
    free(fc);
}

static idem_pool *make_pool(unsigned max_idle, unsigned idle_ms)
{
    memset(&cnt, 0, sizeof cnt);
    idem_pool_config cfg = {
        .ctx = &cnt,
        .connect = fake_connect,
        .disconnect = fake_disconnect,
        .max_idle = max_idle,
        .idle_ms = idle_ms,
    };
    idem_pool *p = NULL;
    cr_assert_eq(idem_pool_new(&p, &cfg), IDEM_OK, "%s", idem_last_error());
    return p;
}

TestSuite(pool, .timeout = 60);

Test(pool, new_refuses_a_configuration_without_connect_or_disconnect)
{
    idem_pool *p = (idem_pool *)1;
    idem_pool_config cfg = {.disconnect = fake_disconnect};
    cr_assert_eq(idem_pool_new(&p, &cfg), IDEM_EINVAL);
    cr_assert_null(p);
    cr_assert_eq(idem_pool_new(&p, NULL), IDEM_EINVAL);
}

Test(pool, get_makes_a_connection_and_put_keeps_it_for_the_next_get)
{
    idem_pool *p = make_pool(0, 0);
    cr_assert_eq(cnt.connects, 0, "no connection is made before the first use");
    void *c1, *c2;
    bool fresh = false;
    cr_assert_eq(idem_pool_get(p, &c1, &fresh), IDEM_OK);
    cr_assert(fresh);
    idem_pool_put(p, c1, IDEM_CONN_OK);
    cr_assert_eq(idem_pool_get(p, &c2, &fresh), IDEM_OK);
    cr_assert_not(fresh, "the idle connection is reused");
    cr_assert_eq(c1, c2);
    cr_assert_eq(cnt.connects, 1);
    idem_pool_put(p, c2, IDEM_CONN_OK);
    idem_pool_free(p);
    cr_assert_eq(cnt.disconnects, 1, "free closes the idle connections");
}

Test(pool, get_hands_the_most_recently_used_connection_first)
{
    idem_pool *p = make_pool(0, 0);
    void *a, *b, *c;
    cr_assert_eq(idem_pool_get(p, &a, NULL), IDEM_OK);
    cr_assert_eq(idem_pool_get(p, &b, NULL), IDEM_OK);
    idem_pool_put(p, a, IDEM_CONN_OK);
    idem_pool_put(p, b, IDEM_CONN_OK);
    cr_assert_eq(idem_pool_get(p, &c, NULL), IDEM_OK);
    cr_assert_eq(c, b);
    idem_pool_put(p, c, IDEM_CONN_OK);
    idem_pool_free(p);
    cr_assert_eq(cnt.disconnects, 2);
}

Test(pool, connect_failure_is_returned_with_its_message)
{
    idem_pool *p = make_pool(0, 0);
    atomic_store(&cnt.fail_connect, 1);
    void *c = NULL;
    cr_assert_eq(idem_pool_get(p, &c, NULL), IDEM_EBACKEND);
    cr_assert_str_eq(idem_last_error(), "fake: connection refused");
    cr_assert_eq(idem_pool_get(p, &c, NULL), IDEM_OK, "the next get tries again");
    idem_pool_put(p, c, IDEM_CONN_OK);
    idem_pool_free(p);
}

Test(pool, broken_connection_is_closed_with_every_idle_one)
{
    idem_pool *p = make_pool(0, 0);
    void *c[4];
    for (int i = 0; i < 4; i++)
        cr_assert_eq(idem_pool_get(p, &c[i], NULL), IDEM_OK);
    for (int i = 0; i < 3; i++)
        idem_pool_put(p, c[i], IDEM_CONN_OK);
    cr_assert_eq(cnt.disconnects, 0);
    idem_pool_put(p, c[3], IDEM_CONN_BROKEN);
    cr_assert_eq(cnt.disconnects, 4, "the broken one and the three idle ones are closed");
    bool fresh = false;
    void *n;
    cr_assert_eq(idem_pool_get(p, &n, &fresh), IDEM_OK);
    cr_assert(fresh, "after a broken connection the next one is new");
    idem_pool_put(p, n, IDEM_CONN_OK);
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, cnt.disconnects);
    cr_assert_eq(cnt.use_after_close, 0);
}

/* fn for idem_pool_run: records which connections it ran on, and reports
 * STALE on the first `stale` calls. */
typedef struct run_arg {
    int   calls, stale;
    void *seen[4];
    bool  broken;
} run_arg;

static int run_fn(void *conn, void *arg, idem_conn_state *state)
{
    run_arg *a = arg;
    fake_conn *fc = conn;
    cr_assert_eq(atomic_load(&fc->closed), 0, "fn runs on a closed connection");
    if (a->calls < 4)
        a->seen[a->calls] = conn;
    a->calls++;
    if (a->calls <= a->stale) {
        *state = IDEM_CONN_STALE;
        return idem_error_set(IDEM_EBACKEND, "fake: connection closed by the server");
    }
    if (a->broken) {
        *state = IDEM_CONN_BROKEN;
        return idem_error_set(IDEM_EBACKEND, "fake: timed out");
    }
    return IDEM_OK;
}

/* Leave n idle connections in p. */
static void fill_idle(idem_pool *p, int n)
{
    void *c[8];
    for (int i = 0; i < n; i++)
        cr_assert_eq(idem_pool_get(p, &c[i], NULL), IDEM_OK);
    for (int i = 0; i < n; i++)
        idem_pool_put(p, c[i], IDEM_CONN_OK);
}

Test(pool, stale_on_a_pooled_connection_runs_once_more_on_a_new_one)
{
    idem_pool *p = make_pool(0, 0);
    fill_idle(p, 2);
    run_arg a = {.stale = 1};
    cr_assert_eq(idem_pool_run(p, run_fn, &a), IDEM_OK);
    cr_assert_eq(a.calls, 2);
    cr_assert_neq(a.seen[0], a.seen[1]);
    cr_assert_eq(cnt.connects, 3, "the retry is on a connection made for it");
    cr_assert_eq(cnt.disconnects, 2, "the stale one and the other idle one are closed");
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, cnt.disconnects);
}

Test(pool, stale_twice_is_not_retried_a_second_time)
{
    idem_pool *p = make_pool(0, 0);
    fill_idle(p, 1);
    run_arg a = {.stale = 100};
    cr_assert_eq(idem_pool_run(p, run_fn, &a), IDEM_EBACKEND);
    cr_assert_eq(a.calls, 2, "one retry, never two");
    cr_assert_str_eq(idem_last_error(), "fake: connection closed by the server");
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, 2);
    cr_assert_eq(cnt.connects, cnt.disconnects, "both stale connections were closed");
}

Test(pool, stale_on_a_fresh_connection_is_not_retried)
{
    idem_pool *p = make_pool(0, 0);
    run_arg a = {.stale = 100};
    cr_assert_eq(idem_pool_run(p, run_fn, &a), IDEM_EBACKEND);
    cr_assert_eq(a.calls, 1);
    cr_assert_eq(cnt.connects, 1);
    cr_assert_eq(cnt.disconnects, 1);
    idem_pool_free(p);
}

Test(pool, broken_in_run_is_not_retried_and_empties_the_idle_list)
{
    idem_pool *p = make_pool(0, 0);
    fill_idle(p, 3);
    run_arg a = {.broken = true};
    cr_assert_eq(idem_pool_run(p, run_fn, &a), IDEM_EBACKEND);
    cr_assert_eq(a.calls, 1, "a broken connection may have changed the store: no retry");
    cr_assert_eq(cnt.disconnects, 3);
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, cnt.disconnects);
}

Test(pool, retry_whose_connect_fails_returns_the_connect_error)
{
    idem_pool *p = make_pool(0, 0);
    fill_idle(p, 1);
    atomic_store(&cnt.fail_connect, 1);
    run_arg a = {.stale = 1};
    cr_assert_eq(idem_pool_run(p, run_fn, &a), IDEM_EBACKEND);
    cr_assert_eq(a.calls, 1);
    cr_assert_str_eq(idem_last_error(), "fake: connection refused");
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, cnt.disconnects);
}

Test(pool, idle_connections_beyond_max_idle_are_closed_after_a_burst)
{
    enum { BURST = 256, MAX_IDLE = 4 };
    idem_pool *p = make_pool(MAX_IDLE, 0);
    void **c = calloc(BURST, sizeof *c);
    for (int i = 0; i < BURST; i++)
        cr_assert_eq(idem_pool_get(p, &c[i], NULL), IDEM_OK);
    for (int i = 0; i < BURST; i++)
        idem_pool_put(p, c[i], IDEM_CONN_OK);
    cr_assert_eq(cnt.connects, BURST);
    cr_assert_eq(cnt.disconnects, BURST - MAX_IDLE, "only max_idle connections stay open");
    free(c);
    idem_pool_free(p);
    cr_assert_eq(cnt.disconnects, BURST);
}

Test(pool, idle_connections_unused_for_idle_ms_are_closed_by_the_next_use)
{
    enum { BURST = 32 };
    idem_pool *p = make_pool(BURST, 50);
    void *c[BURST];
    for (int i = 0; i < BURST; i++)
        cr_assert_eq(idem_pool_get(p, &c[i], NULL), IDEM_OK);
    for (int i = 0; i < BURST; i++)
        idem_pool_put(p, c[i], IDEM_CONN_OK);
    cr_assert_eq(cnt.disconnects, 0);
    sleep_ms(150); /* three times idle_ms */
    /* A quiet program that keeps one request going: each use closes a few of
     * the expired connections, until none is left. */
    for (int i = 0; i < BURST; i++) {
        void *one;
        cr_assert_eq(idem_pool_get(p, &one, NULL), IDEM_OK);
        idem_pool_put(p, one, IDEM_CONN_OK);
    }
    cr_assert_geq(cnt.disconnects, BURST, "every connection unused for idle_ms was closed");
    idem_pool_free(p);
    cr_assert_eq(cnt.connects, cnt.disconnects);
}

/* ---- many threads ---- */

enum { THREADS = 32, ROUNDS = 3000 };

static idem_pool *shared;
static atomic_uint rounds_done;

static int busy_fn(void *conn, void *arg, idem_conn_state *state)
{
    (void)arg;
    fake_conn *fc = conn;
    if (atomic_exchange(&fc->in_use, 1))
        atomic_fetch_add(&cnt.double_use, 1);
    if (atomic_load(&fc->closed))
        atomic_fetch_add(&cnt.use_after_close, 1);
    unsigned n = atomic_fetch_add(&rounds_done, 1);
    if (n % 997 == 0)
        *state = IDEM_CONN_BROKEN;
    else if (n % 991 == 0)
        *state = IDEM_CONN_STALE;
    atomic_store(&fc->in_use, 0);
    return IDEM_OK;
}

static void *hammer(void *arg)
{
    (void)arg;
    for (int i = 0; i < ROUNDS; i++) {
        if (i % 2) {
            cr_assert_eq(idem_pool_run(shared, busy_fn, NULL), IDEM_OK);
        } else {
            void *c;
            cr_assert_eq(idem_pool_get(shared, &c, NULL), IDEM_OK);
            idem_conn_state st = IDEM_CONN_OK;
            busy_fn(c, NULL, &st);
            idem_pool_put(shared, c, st);
        }
    }
    return NULL;
}

Test(pool, many_threads_never_share_a_connection_nor_use_a_closed_one)
{
    shared = make_pool(8, 0);
    atomic_store(&rounds_done, 0);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, hammer, NULL), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(cnt.double_use, 0, "a connection was handed to two threads at once");
    cr_assert_eq(cnt.use_after_close, 0, "a closed connection was used or closed twice");
    cr_assert_leq(cnt.connects - cnt.disconnects, 8, "more than max_idle connections stayed open");
    idem_pool_free(shared);
    cr_assert_eq(cnt.connects, cnt.disconnects, "every connection made was closed");
}
