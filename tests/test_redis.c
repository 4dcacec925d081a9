/* The Redis driver against real redis-server processes: faults, URLs,
 * fencing and the number of round trips. The behaviour every driver shares
 * is in conformance.c. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "harness.h"
#include "proxy.h"
#include "support/testutil.h"

extern const idem_backend idem__redis_backend;

static idem_test_server srv;

static void start(void)
{
    cr_assert_eq(idem_test_server_start(&srv, "redis"), 0, "redis-server must start for these tests");
}

static void stop(void)
{
    idem_test_server_stop(&srv);
}

TestSuite(redis, .init = start, .fini = stop, .timeout = 60);

/* ---- helpers ---- */

/* A plain hiredis connection to server i, for looking behind the driver. */
static redisContext *raw(void)
{
    redisContext *c = redisConnect("127.0.0.1", srv.ports[0]);
    cr_assert(c && !c->err, "raw connection to redis: %s", c ? c->errstr : "out of memory");
    return c;
}

static redisReply *raw_cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    cr_assert(r, "raw command failed: %s", c->errstr);
    return r;
}

typedef struct handler_arg {
    atomic_int calls;
    int        sleep_ms;
    const char *body;
} handler_arg;

static int handler(void *arg, idem_response *resp)
{
    handler_arg *a = arg;
    atomic_fetch_add(&a->calls, 1);
    if (a->sleep_ms)
        usleep((useconds_t)a->sleep_ms * 1000);
    const char *body = a->body ? a->body : "charged";
    return idem_response_set(resp, 201, body, strlen(body));
}

static idem_layer *layer_on(idem_store *st, uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    if (lease_ms)
        o.lease_ms = lease_ms;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, st, &o), IDEM_OK, "%s", idem_last_error());
    return l;
}

static idem_store *open_store(const char *url)
{
    idem_store *st;
    cr_assert_eq(idem_store_open(&st, url), IDEM_OK, "open %s: %s", url, idem_last_error());
    cr_assert_str_eq(idem_store_backend(st), "redis");
    return st;
}

static int run_key(idem_layer *l, const char *key, size_t key_len, handler_arg *a, idem_reply *reply)
{
    idem_request req = {.key = key, .key_len = key_len, .fingerprint = "amount=100",
                        .fingerprint_len = 10};
    return idem_run(l, &req, handler, a, reply);
}

/* A record as the core writes it (layout in backend.h). */
static size_t make_record(uint8_t *buf, int state, uint8_t token_byte, const char *body)
{
    memset(buf, 0, IDEM_RECORD_HEADER_LEN);
    memcpy(buf, "IDEM", 4);
    buf[4] = 1;
    buf[IDEM_RECORD_STATE_OFFSET] = (uint8_t)state;
    memset(buf + IDEM_RECORD_TOKEN_OFFSET, token_byte, IDEM_TOKEN_LEN);
    if (state == IDEM_STATE_STARTED)
        return IDEM_RECORD_HEADER_LEN;
    size_t n = strlen(body);
    uint8_t *p = buf + IDEM_RECORD_HEADER_LEN;
    p[0] = 0, p[1] = 0, p[2] = 0, p[3] = 200;
    p[4] = 0, p[5] = 0, p[6] = 0, p[7] = (uint8_t)n;
    memcpy(p + 8, body, n);
    return IDEM_RECORD_HEADER_LEN + 8 + n;
}

/* ---- the happy paths, through the public API ---- */

Test(redis, new_key_runs_once_and_replays_byte_for_byte)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {.body = "{\"ref\":\"PAY-1\"}"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "order-1", 7, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(run_key(l, "order-1", 7, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, strlen(a.body));
    cr_assert_arr_eq(r.body, a.body, r.body_len);
    cr_assert_eq(atomic_load(&a.calls), 1);
    idem_reply_clear(&r);

    /* The record lives under prefix + key, with the result TTL. */
    redisContext *c = raw();
    redisReply *rr = raw_cmd(c, "PTTL %s", "idem:order-1");
    cr_assert_eq(rr->type, REDIS_REPLY_INTEGER);
    cr_assert(rr->integer > 86390000 && rr->integer <= 86400000, "pttl %lld", rr->integer);
    freeReplyObject(rr);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, binary_keys_are_stored_under_their_exact_bytes)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    static const char *keys[] = {"a\0b", "a\0c", "a\r\nb", "a b", "a\tb"};
    static const size_t lens[] = {3, 3, 4, 3, 3};
    handler_arg a = {0};
    idem_reply r = {0};
    for (int round = 0; round < 2; round++)
        for (size_t i = 0; i < 5; i++) {
            cr_assert_eq(run_key(l, keys[i], lens[i], &a, &r), IDEM_OK, "%s", idem_last_error());
            cr_assert_eq(r.outcome, round ? IDEM_REPLAYED : IDEM_EXECUTED, "key %zu round %d", i,
                         round);
        }
    cr_assert_eq(atomic_load(&a.calls), 5, "distinct keys must not collide");
    redisContext *c = raw();
    for (size_t i = 0; i < 5; i++) {
        char full[16] = "idem:";
        memcpy(full + 5, keys[i], lens[i]);
        redisReply *rr = raw_cmd(c, "EXISTS %b", full, 5 + lens[i]);
        cr_assert_eq(rr->integer, 1, "key %zu is not stored under its own bytes", i);
        freeReplyObject(rr);
    }
    redisFree(c);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, retry_after_is_the_servers_remaining_lease)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 60000);
    idem_request req = {.key = "slow", .key_len = 4};
    idem_claim *claim;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &claim, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(claim);
    /* Shorten the lease behind the record's back: the record still says
     * 60 s, so only the server's PTTL can give the answer below. */
    redisContext *c = raw();
    freeReplyObject(raw_cmd(c, "PEXPIRE %s 1500", "idem:slow"));
    idem_claim *dup;
    cr_assert_eq(idem_begin(l, &req, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_null(dup);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert_eq(r.status, 409);
    cr_assert(r.retry_after_ms > 1000 && r.retry_after_ms <= 1500, "retry_after %u",
              r.retry_after_ms);
    cr_assert_eq(idem_abort(claim), IDEM_OK, "%s", idem_last_error());
    redisReply *rr = raw_cmd(c, "EXISTS %s", "idem:slow");
    cr_assert_eq(rr->integer, 0, "abort must delete the claim");
    freeReplyObject(rr);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

typedef struct race {
    idem_layer *l;
    handler_arg *a;
    atomic_int  executed, in_progress;
} race;

static void *race_one(void *p)
{
    race *rc = p;
    idem_reply r = {0};
    if (run_key(rc->l, "contended", 9, rc->a, &r) == IDEM_OK) {
        if (r.outcome == IDEM_EXECUTED)
            atomic_fetch_add(&rc->executed, 1);
        else if (r.outcome == IDEM_IN_PROGRESS)
            atomic_fetch_add(&rc->in_progress, 1);
    }
    idem_reply_clear(&r);
    return NULL;
}

Test(redis, concurrent_duplicates_from_many_threads_run_once)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {.sleep_ms = 300};
    race rc = {.l = l, .a = &a};
    pthread_t t[16];
    for (int i = 0; i < 16; i++)
        pthread_create(&t[i], NULL, race_one, &rc);
    for (int i = 0; i < 16; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&a.calls), 1);
    cr_assert_eq(atomic_load(&rc.executed), 1);
    cr_assert_eq(atomic_load(&rc.in_progress), 15);
    idem_layer_free(l);
    idem_store_close(st);
}

/* ---- the driver's own duties, called through its table ---- */

Test(redis, commit_release_and_extend_are_fenced_by_token_and_state)
{
    const idem_backend *b = &idem__redis_backend;
    idem_url *u;
    cr_assert_eq(idem_url_parse(&u, srv.url), IDEM_OK);
    void *s;
    cr_assert_eq(b->open(&s, u), IDEM_OK, "%s", idem_last_error());
    idem_url_free(u);

    uint8_t mine[128], other[128], done[128], done2[128], tok_a[IDEM_TOKEN_LEN], tok_b[IDEM_TOKEN_LEN];
    memset(tok_a, 0xaa, sizeof tok_a);
    memset(tok_b, 0xbb, sizeof tok_b);
    size_t mine_len = make_record(mine, IDEM_STATE_STARTED, 0xaa, NULL);
    size_t other_len = make_record(other, IDEM_STATE_STARTED, 0xbb, NULL);
    size_t done_len = make_record(done, IDEM_STATE_COMPLETED, 0xaa, "first");
    size_t done2_len = make_record(done2, IDEM_STATE_COMPLETED, 0xaa, "second");
    void *ex;
    size_t ex_len;
    uint32_t left;

    cr_assert_eq(b->claim(s, "k", 1, mine, mine_len, 5000, &ex, &ex_len, &left), IDEM_OK);
    cr_assert_null(ex);
    /* The same claim again (its reply was lost): still ours. */
    cr_assert_eq(b->claim(s, "k", 1, mine, mine_len, 5000, &ex, &ex_len, &left), IDEM_OK);
    cr_assert_null(ex);
    /* Another claimant gets our record and the time left. */
    cr_assert_eq(b->claim(s, "k", 1, other, other_len, 5000, &ex, &ex_len, &left), IDEM_OK);
    cr_assert_not_null(ex);
    cr_assert_eq(ex_len, mine_len);
    cr_assert_arr_eq(ex, mine, mine_len);
    cr_assert(left > 4000 && left <= 5000, "remaining %u", left);
    free(ex);

    cr_assert_eq(b->commit(s, "k", 1, tok_b, done, done_len, 60000), IDEM_ELOST);
    cr_assert_eq(b->release(s, "k", 1, tok_b), IDEM_ELOST);
    cr_assert_eq(b->extend(s, "k", 1, tok_b, other, other_len, 9000), IDEM_ELOST);
    cr_assert_eq(b->extend(s, "k", 1, tok_a, mine, mine_len, 9000), IDEM_OK);
    redisContext *c = raw();
    redisReply *rr = raw_cmd(c, "PTTL k");
    cr_assert(rr->integer > 8000 && rr->integer <= 9000, "extend must set the lease: %lld", rr->integer);
    freeReplyObject(rr);

    cr_assert_eq(b->commit(s, "k", 1, tok_a, done, done_len, 60000), IDEM_OK);
    /* A retried commit succeeds and changes nothing. */
    cr_assert_eq(b->commit(s, "k", 1, tok_a, done2, done2_len, 60000), IDEM_OK);
    rr = raw_cmd(c, "GET k");
    cr_assert_eq(rr->len, done_len);
    cr_assert_arr_eq(rr->str, done, done_len, "a retried commit must not change the record");
    freeReplyObject(rr);
    rr = raw_cmd(c, "PTTL k");
    cr_assert(rr->integer > 59000 && rr->integer <= 60000, "commit must set the ttl: %lld", rr->integer);
    freeReplyObject(rr);
    /* Release and extend act on STARTED records only. */
    cr_assert_eq(b->release(s, "k", 1, tok_a), IDEM_ELOST);
    cr_assert_eq(b->extend(s, "k", 1, tok_a, mine, mine_len, 9000), IDEM_ELOST);
    /* Nothing to act on. */
    cr_assert_eq(b->commit(s, "gone", 4, tok_a, done, done_len, 60000), IDEM_ELOST);
    cr_assert_eq(b->release(s, "gone", 4, tok_a), IDEM_ELOST);

    cr_assert_eq(b->claim(s, "r", 1, mine, mine_len, 5000, &ex, &ex_len, &left), IDEM_OK);
    cr_assert_eq(b->release(s, "r", 1, tok_a), IDEM_OK);
    rr = raw_cmd(c, "EXISTS r");
    cr_assert_eq(rr->integer, 0);
    freeReplyObject(rr);
    redisFree(c);
    b->close(s);
}

/* ---- faults ---- */

Test(redis, value_this_library_did_not_write_is_ecorrupt_and_nothing_runs)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    redisContext *c = raw();
    freeReplyObject(raw_cmd(c, "SET %s %s", "idem:foreign", "hello"));
    freeReplyObject(raw_cmd(c, "HSET %s f v", "idem:hash"));
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "foreign", 7, &a, &r), IDEM_ECORRUPT);
    cr_assert(strstr(idem_last_error(), "did not write"), "%s", idem_last_error());
    cr_assert_eq(run_key(l, "hash", 4, &a, &r), IDEM_ECORRUPT);
    cr_assert(strstr(idem_last_error(), "holds a Redis hash"), "the message must name the type: %s",
              idem_last_error());
    cr_assert_null(strstr(idem_last_error(), "0-byte"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 0, "nothing may run over a foreign value");
    redisReply *rr = raw_cmd(c, "GET %s", "idem:foreign");
    cr_assert_str_eq(rr->str, "hello", "the foreign value must be left alone");
    freeReplyObject(rr);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, script_flush_mid_run_is_transparent)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    redisContext *c = raw();
    idem_request req = {.key = "flush", .key_len = 5};
    idem_claim *claim;
    idem_reply r = {0};
    freeReplyObject(raw_cmd(c, "SCRIPT FLUSH"));
    cr_assert_eq(idem_begin(l, &req, &claim, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(claim);
    freeReplyObject(raw_cmd(c, "SCRIPT FLUSH"));
    cr_assert_eq(idem_commit(claim, 200, "ok", 2), IDEM_OK, "%s", idem_last_error());
    freeReplyObject(raw_cmd(c, "SCRIPT FLUSH"));
    cr_assert_eq(idem_begin(l, &req, &claim, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "ok");
    idem_reply_clear(&r);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

#define KILL_THREADS 8
#define KILL_KEYS    200

typedef struct kill_run {
    idem_layer *l;
    atomic_int  execs[KILL_THREADS / 2][KILL_KEYS]; /* two threads share each key sequence */
    atomic_int  stop;
    atomic_int  ok, backend, other;
} kill_run;

typedef struct kill_thread {
    kill_run *k;
    int       id;
} kill_thread;

static int count_handler(void *arg, idem_response *resp)
{
    atomic_fetch_add((atomic_int *)arg, 1);
    usleep(20000);
    return idem_response_set(resp, 200, "done", 4);
}

static void *kill_worker(void *p)
{
    kill_thread *t = p;
    kill_run *k = t->k;
    for (int i = 0; i < KILL_KEYS && !atomic_load(&k->stop); i++) {
        char key[32];
        int n = snprintf(key, sizeof key, "pre-%d-%d", t->id / 2, i);
        idem_request req = {.key = key, .key_len = (size_t)n};
        idem_reply r = {0};
        int rc = idem_run(k->l, &req, count_handler, &k->execs[t->id / 2][i], &r);
        atomic_fetch_add(rc == IDEM_OK ? &k->ok : rc == IDEM_EBACKEND ? &k->backend : &k->other, 1);
        idem_reply_clear(&r);
    }
    return NULL;
}

typedef struct after_run {
    idem_layer *l;
    atomic_int  execs[20];
    atomic_int  failures;
} after_run;

static void *after_worker(void *p)
{
    after_run *a = p;
    for (int i = 0; i < 20; i++) {
        char key[32];
        int n = snprintf(key, sizeof key, "post-%d", i);
        idem_request req = {.key = key, .key_len = (size_t)n};
        idem_reply r = {0};
        if (idem_run(a->l, &req, count_handler, &a->execs[i], &r) != IDEM_OK)
            atomic_fetch_add(&a->failures, 1);
        idem_reply_clear(&r);
    }
    return NULL;
}

Test(redis, server_killed_and_restarted_mid_run_costs_only_the_requests_in_flight)
{
    idem_store *st = open_store(srv.url);
    /* A lease shorter than the outage: a commit in flight retries until
     * its lease ends and then reports IDEM_EBACKEND. */
    idem_layer *l = layer_on(st, 300);

    /* One claim held across the outage. */
    idem_request held = {.key = "held", .key_len = 4};
    idem_claim *claim;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &held, &claim, &r), IDEM_OK, "%s", idem_last_error());

    static kill_run k;
    memset(&k, 0, sizeof k);
    k.l = l;
    pthread_t t[KILL_THREADS];
    kill_thread kt[KILL_THREADS];
    for (int i = 0; i < KILL_THREADS; i++) {
        kt[i] = (kill_thread){.k = &k, .id = i};
        pthread_create(&t[i], NULL, kill_worker, &kt[i]);
    }
    usleep(150000);
    idem_test_server_kill(&srv, 0);

    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_commit(claim, 200, "x", 1), IDEM_EBACKEND);
    cr_assert(mono_ms() - t0 < 300 + 2500, "a commit must give up when its lease ends");
    cr_assert(strstr(idem_last_error(), "redis 127.0.0.1:"), "%s", idem_last_error());
    cr_assert_eq(idem_abort(claim), IDEM_EBACKEND);

    handler_arg a = {0};
    cr_assert_eq(run_key(l, "while-down", 10, &a, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "connection refused"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 0, "nothing runs while the store is down");

    usleep(500000);
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    atomic_store(&k.stop, 1);
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&k.other), 0, "only IDEM_OK or IDEM_EBACKEND around an outage");
    cr_assert_gt(atomic_load(&k.ok), 0);
    cr_assert_gt(atomic_load(&k.backend), 0);
    for (int i = 0; i < KILL_THREADS / 2; i++)
        for (int j = 0; j < KILL_KEYS; j++)
            cr_assert_leq(atomic_load(&k.execs[i][j]), 1, "key pre-%d-%d ran twice", i, j);

    /* Back: every request succeeds, on connections that replace the dead
     * ones in the pool, and each key runs once. */
    static after_run after;
    memset(&after, 0, sizeof after);
    after.l = l;
    pthread_t u[KILL_THREADS];
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_create(&u[i], NULL, after_worker, &after);
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_join(u[i], NULL);
    cr_assert_eq(atomic_load(&after.failures), 0, "requests after the restart must succeed");
    for (int i = 0; i < 20; i++)
        cr_assert_eq(atomic_load(&after.execs[i]), 1, "key post-%d ran %d times", i,
                     atomic_load(&after.execs[i]));
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, restart_while_the_pool_is_idle_costs_no_request)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    /* Fill the pool with one connection per thread. */
    static after_run before;
    memset(&before, 0, sizeof before);
    before.l = l;
    pthread_t t[KILL_THREADS];
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_create(&t[i], NULL, after_worker, &before);
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&before.failures), 0);

    /* The server goes away and comes back while nobody asks. */
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);

    /* Every pooled connection is dead now; the data set is gone too, so
     * the same keys run again, once each. */
    static after_run after;
    memset(&after, 0, sizeof after);
    after.l = l;
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_create(&t[i], NULL, after_worker, &after);
    for (int i = 0; i < KILL_THREADS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(atomic_load(&after.failures), 0, "a restart the store slept through must cost "
                 "no request; %s", idem_last_error());
    for (int i = 0; i < 20; i++)
        cr_assert_eq(atomic_load(&after.execs[i]), 1, "key post-%d ran %d times", i,
                     atomic_load(&after.execs[i]));
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, server_that_stops_answering_mid_run_times_out_and_recovers)
{
    char url[128];
    snprintf(url, sizeof url, "%s?timeout_ms=200", srv.url);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "before", 6, &a, &r), IDEM_OK, "%s", idem_last_error());

    kill(srv.pids[0], SIGSTOP);
    uint64_t t0 = mono_ms();
    int rc = run_key(l, "frozen", 6, &a, &r);
    uint64_t took = mono_ms() - t0;
    kill(srv.pids[0], SIGCONT);
    cr_assert_eq(rc, IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "no reply within 200 ms"), "%s", idem_last_error());
    cr_assert(took < 1000, "took %llu ms with timeout_ms=200", (unsigned long long)took);
    cr_assert_eq(atomic_load(&a.calls), 1, "nothing runs when the claim timed out");

    /* The timed-out connection is gone: its late reply cannot be taken for
     * the answer to the next command. */
    cr_assert_eq(run_key(l, "before", 6, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(run_key(l, "after", 5, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(atomic_load(&a.calls), 2);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
}

/* A handler that does its work, then freezes the server (SIGSTOP): the
 * commit after it meets a server that never answers. */
typedef struct freezer {
    atomic_int calls;
    uint64_t   done_at;   /* mono_ms() when the handler returned */
} freezer;

static int freeze_after(void *arg, idem_response *resp)
{
    freezer *f = arg;
    atomic_fetch_add(&f->calls, 1);
    cr_assert_eq(kill(srv.pids[0], SIGSTOP), 0);
    f->done_at = mono_ms();
    return idem_response_set(resp, 201, "charged", 7);
}

/* Run key with the server frozen after the handler; thaw it; check the
 * work is answered, and return how long the commit took (after the handler)
 * and, in *whole, the call. leased: the lease is still on, so the key may
 * not run again. */
static uint64_t commit_on_frozen_server(idem_layer *l, const char *key, bool leased, uint64_t *whole)
{
    freezer f = {0};
    idem_reply r = {0};
    idem_request req = {.key = key, .key_len = strlen(key)};
    uint64_t t0 = mono_ms();
    int rc = idem_run(l, &req, freeze_after, &f, &r);
    uint64_t end = mono_ms();
    cr_assert_eq(kill(srv.pids[0], SIGCONT), 0);
    cr_log_info("%s: the call took %llu ms, its commit %llu ms", key, (unsigned long long)(end - t0),
                (unsigned long long)(end - f.done_at));
    cr_assert_eq(rc, IDEM_EBACKEND, "%s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert(strstr(idem_last_error(), "time the library left this call"), "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the work done");
    cr_assert_str_eq((const char *)r.body, "charged");
    idem_reply_clear(&r);
    /* The commit the frozen server took may land when it thaws; either way
     * the handler does not run again while its lease is on. */
    if (leased) {
        cr_assert_eq(idem_run(l, &req, freeze_after, &f, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert(r.outcome == IDEM_REPLAYED || r.outcome == IDEM_IN_PROGRESS, "outcome %d", r.outcome);
        cr_assert_eq(atomic_load(&f.calls), 1);
        idem_reply_clear(&r);
    }
    *whole = end - t0;
    return end - f.done_at;
}

/* A commit blocked on a frozen server gets only the time left of
 * commit_timeout_ms, not the driver's whole timeout_ms (2 s here). */
Test(redis, commit_on_a_frozen_server_returns_by_commit_timeout_ms)
{
    idem_store *st = open_store(srv.url);
    idem_options o;
    idem_options_init(&o);
    o.commit_timeout_ms = 300;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, st, &o), IDEM_OK, "%s", idem_last_error());
    uint64_t whole, took = commit_on_frozen_server(l, "frozen-commit", true, &whole);
    /* 50 ms of slack are documented; twice that here, for a loaded machine */
    cr_assert(took >= 280 && took < 300 + 100, "the commit took %llu ms with commit_timeout_ms 300",
              (unsigned long long)took);
    idem_layer_free(l);
    idem_store_close(st);
}

/* Without commit_timeout_ms the commit ends before the lease does, however
 * long the driver's timeout_ms (2 s here, twice per attempt). */
Test(redis, commit_on_a_frozen_server_returns_before_the_lease_ends)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 3000);
    uint64_t whole;
    (void)commit_on_frozen_server(l, "frozen-lease", false, &whole);
    cr_assert(whole < 3000, "the call took %llu ms with a lease of 3000 ms", (unsigned long long)whole);
    cr_assert(whole >= 2800, "the commit gave up %llu ms into a 3000 ms lease", (unsigned long long)whole);
    idem_layer_free(l);
    idem_store_close(st);
}

/* ---- opening ---- */

/* Start a redis-server of our own with extra arguments, in srv's place. */
static void start_custom(idem_test_server *s, const char *extra1, const char *extra2,
                         const char *extra3, const char *extra4)
{
    memset(s, 0, sizeof *s);
    s->kind = strdup("redis");
    s->dir = idem_test_tmpdir("redis-custom");
    s->ports[0] = idem_test_free_port();
    cr_assert(s->kind && s->dir && s->ports[0]);
    char port[8], *log;
    snprintf(port, sizeof port, "%u", (unsigned)s->ports[0]);
    cr_assert(asprintf(&log, "%s/redis.log", s->dir) > 0);
    char *argv[] = {"redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", s->dir, (char *)extra1, (char *)extra2,
                    (char *)extra3, (char *)extra4, NULL};
    s->pids[0] = idem_test_spawn(argv, log);
    cr_assert_gt(s->pids[0], 0);
    cr_assert(idem_test_wait_port(s->ports[0], 10000), "redis-server did not start; see %s", log);
    free(log);
}

Test(redis, wrong_password_fails_at_open_without_repeating_it)
{
    idem_test_server pw;
    start_custom(&pw, "--requirepass", "right-Secret-42", NULL, NULL);
    char url[128];
    idem_store *st;

    snprintf(url, sizeof url, "redis://:wrong-Guess-17@127.0.0.1:%u", pw.ports[0]);
    cr_assert_eq(idem_store_open(&st, url), IDEM_EBACKEND);
    cr_assert_null(st);
    cr_assert(strstr(idem_last_error(), "password"), "%s", idem_last_error());
    cr_assert_null(strstr(idem_last_error(), "wrong-Guess-17"), "%s", idem_last_error());

    snprintf(url, sizeof url, "redis://127.0.0.1:%u", pw.ports[0]);
    cr_assert_eq(idem_store_open(&st, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "NOAUTH"), "%s", idem_last_error());

    snprintf(url, sizeof url, "redis://:right-Secret-42@127.0.0.1:%u/3", pw.ports[0]);
    st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "k", 1, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);

    /* The key went to database 3. */
    redisContext *c = redisConnect("127.0.0.1", pw.ports[0]);
    freeReplyObject(raw_cmd(c, "AUTH right-Secret-42"));
    freeReplyObject(raw_cmd(c, "SELECT 3"));
    redisReply *rr = raw_cmd(c, "EXISTS idem:k");
    cr_assert_eq(rr->integer, 1);
    freeReplyObject(rr);
    redisFree(c);
    idem_test_server_stop(&pw);
}

Test(redis, unix_socket_with_db_and_password)
{
    idem_test_server us;
    char sock[512];
    snprintf(sock, sizeof sock, "%s/redis.sock", srv.dir);
    start_custom(&us, "--unixsocket", sock, "--requirepass", "p@ss word");
    /* redis-server opens its socket after the TCP port start_custom waits for */
    for (int i = 0; i < 1000 && access(sock, F_OK) != 0; i++)
        usleep(10000);
    char url[700];
    snprintf(url, sizeof url, "redis+unix://%s?db=2&password=p%%40ss%%20word&timeout_ms=500", sock);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "u", 1, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(run_key(l, "u", 1, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);

    redisContext *c = redisConnectUnix(sock);
    freeReplyObject(raw_cmd(c, "AUTH %s", "p@ss word"));
    freeReplyObject(raw_cmd(c, "SELECT 2"));
    redisReply *rr = raw_cmd(c, "EXISTS idem:u");
    cr_assert_eq(rr->integer, 1);
    freeReplyObject(rr);
    redisFree(c);

    snprintf(url, sizeof url, "redis+unix://%s/nothing-here.sock", srv.dir);
    cr_assert_eq(idem_store_open(&st, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "no such socket"), "%s", idem_last_error());
    idem_test_server_stop(&us);
}

Test(redis, unreachable_port_fails_at_open_with_what_to_do)
{
    uint16_t port = idem_test_free_port();
    char url[64], want[96];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", port);
    idem_store *st;
    cr_assert_eq(idem_store_open(&st, url), IDEM_EBACKEND);
    snprintf(want, sizeof want, "redis 127.0.0.1:%u: connecting: connection refused", port);
    cr_assert(strstr(idem_last_error(), want), "%s", idem_last_error());
    snprintf(want, sizeof want, "redis-server --port %u", port);
    cr_assert(strstr(idem_last_error(), want), "%s", idem_last_error());
}

Test(redis, server_that_never_answers_times_out_within_timeout_ms)
{
    /* A socket that listens but never accepts or answers: connect() completes
     * in the kernel's backlog, and the first command waits for a reply. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(fd, 16), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    char url[96];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u?timeout_ms=200&connect_timeout_ms=200",
             ntohs(a.sin_port));
    idem_store *st;
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_store_open(&st, url), IDEM_EBACKEND);
    uint64_t took = mono_ms() - t0;
    cr_assert(took < 1000, "open took %llu ms with timeout_ms=200", (unsigned long long)took);
    cr_assert(strstr(idem_last_error(), "no reply within 200 ms"), "%s", idem_last_error());
    close(fd);
}

Test(redis, malformed_urls_are_einval_and_never_show_the_password)
{
    static const char *const bad[] = {
        "redis://:hunter2-secret@127.0.0.1:6379/notadb",
        "redis://:hunter2-secret@127.0.0.1:6379,127.0.0.1:6380",
        "redis://:hunter2-secret@127.0.0.1:6379?bogus=1",
        "redis://:hunter2-secret@127.0.0.1:6379?timeout_ms=0",
        "redis://user@127.0.0.1:6379",
        "redis+unix://host/tmp/redis.sock",
        "redis+unix:///tmp/redis.sock?db=x&password=hunter2-secret",
        "redis+tls://127.0.0.1:6379",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        idem_store *st;
        cr_assert_eq(idem_store_open(&st, bad[i]), IDEM_EINVAL, "%s", bad[i]);
        cr_assert_null(strstr(idem_last_error(), "hunter2"), "%s", idem_last_error());
    }
}

/* ---- round trips ---- */

static long long info_field(redisContext *c, const char *section, const char *field)
{
    redisReply *r = raw_cmd(c, "INFO %s", section);
    char want[64];
    snprintf(want, sizeof want, "\r\n%s:", field);
    const char *p = strstr(r->str, want);
    long long n = p ? atoll(p + strlen(want)) : -1;
    freeReplyObject(r);
    return n;
}


/*
 * How round trips are counted: INFO stats total_reads_processed counts the
 * reads the server made from its clients' sockets. The driver writes what
 * one round trip carries (a command, or the claim's two pipelined ones)
 * with one write, which a loopback socket delivers to one read; so the
 * reads a step adds, less the one of the INFO that reads the counter, are
 * its round trips. cmdstat_evalsha from INFO commandstats counts scripts:
 * EVALSHA cannot be called from a script, so its calls are top-level
 * commands only.
 */
static long long server_reads(redisContext *ctl)
{
    return info_field(ctl, "stats", "total_reads_processed");
}

static long long evalsha_calls(redisContext *ctl)
{
    redisReply *r = raw_cmd(ctl, "INFO commandstats");
    const char *p = strstr(r->str, "cmdstat_evalsha:calls=");
    long long n = p ? atoll(p + strlen("cmdstat_evalsha:calls=")) : 0;
    freeReplyObject(r);
    return n;
}

/* Round trips and scripts of one step, between two calls. */
typedef struct probe {
    redisContext *ctl;
    long long     reads, scripts;
} probe;

static void probe_mark(probe *p)
{
    p->scripts = evalsha_calls(p->ctl);
    p->reads = server_reads(p->ctl);
}

static void probe_step(probe *p, long long trips, long long scripts, const char *what)
{
    long long reads = server_reads(p->ctl) - p->reads - 1;
    long long sc = evalsha_calls(p->ctl) - p->scripts;
    cr_assert_eq(reads, trips, "%s: %lld round trips, not %lld", what, reads, trips);
    cr_assert_eq(sc, scripts, "%s: %lld scripts, not %lld", what, sc, scripts);
    probe_mark(p);
}

Test(redis, new_key_costs_two_round_trips_and_a_replay_one_without_a_script)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {0};
    idem_reply r = {0};
    /* Warm the pool: the connection from open is reused from here on. */
    cr_assert_eq(run_key(l, "warm", 4, &a, &r), IDEM_OK, "%s", idem_last_error());

    probe p = {.ctl = raw()};
    probe_mark(&p);
    cr_assert_eq(run_key(l, "new", 3, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    probe_step(&p, 2, 1, "a new key: the claim (SET NX GET, PTTL) and the commit (a script)");

    cr_assert_eq(run_key(l, "new", 3, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    probe_step(&p, 1, 0, "a replay: the claim that returns the record");

    idem_request req = {.key = "busy", .key_len = 4};
    idem_claim *c, *dup;
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_begin(l, &req, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms > 0 && r.retry_after_ms <= 60000, "%u", r.retry_after_ms);
    cr_assert_eq(idem_extend(c, 5000), IDEM_OK);
    cr_assert_eq(idem_abort(c), IDEM_OK);
    probe_step(&p, 4, 2, "claim, in-progress claim, extend, abort");

    redisFree(p.ctl);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
}

/* ---- a reply lost after the server acted ---- */

/* A TCP proxy to redis that, when told, passes one request on, swallows
 * the server's reply and closes that connection: the server ran the
 * command, the client never hears of it. */
typedef struct proxy {
    int         lfd;
    uint16_t    port, upstream;
    atomic_bool drop_reply, stop;
    /* Play a server before 7.0, which refuses SET with both NX and GET:
     * the last argument of a SET (after PX's number) becomes GXT, which
     * Redis answers with "ERR syntax error". Counts the SETs so spoilt. */
    atomic_bool  old_set;
    atomic_uint  old_sets;
    /* Race a claim against the end of a lease, at the worst instant: for
     * the next `vanish` claims (SET ... GET with PTTL pipelined), put the
     * holder's record under vanish_key, pass the SET on, wait for its
     * reply (the holder's record), delete the key, and only then pass the
     * PTTL on, which answers -2. Counts the claims so raced. */
    atomic_int   vanish;
    atomic_uint  vanished;
    char         vanish_key[64];
    void        *holder;
    size_t       holder_len;
    pthread_t   thread;
} proxy;

/* buf, read from a client, holds a claim: SET ... GET, then PTTL. Pass it
 * on to up with the key deleted between the two (see vanish above). 1:
 * done; 0: buf is something else, pass it on as usual; -1: a connection
 * failed. */
static int vanish_between(proxy *p, int cli, int up, const char *buf, size_t len)
{
    static const char set[] = "$3\r\nSET\r\n", pttl[] = "*2\r\n$4\r\nPTTL\r\n";
    const char *at = memmem(buf, len, pttl, sizeof pttl - 1);
    if (!at || !memmem(buf, (size_t)(at - buf), set, sizeof set - 1))
        return 0;
    redisContext *side = redisConnect("127.0.0.1", p->upstream);
    if (!side || side->err) {
        redisFree(side);
        return -1;
    }
    freeReplyObject(redisCommand(side, "SET %s %b PX 60000", p->vanish_key, p->holder, p->holder_len));
    size_t head = (size_t)(at - buf), rest = len - head;
    char reply[4096];
    struct pollfd w = {.fd = up, .events = POLLIN};
    ssize_t n = -1;
    if (write(up, buf, head) == (ssize_t)head && poll(&w, 1, 2000) > 0)
        n = read(up, reply, sizeof reply);
    bool ok = n > 0 && write(cli, reply, (size_t)n) == n;
    freeReplyObject(redisCommand(side, "DEL %s", p->vanish_key));
    redisFree(side);
    ok = ok && write(up, at, rest) == (ssize_t)rest;
    atomic_fetch_sub(&p->vanish, 1);
    atomic_fetch_add(&p->vanished, 1);
    return ok ? 1 : -1;
}

static void spoil_set_get(proxy *p, char *buf, size_t len)
{
    /* "...$2\r\nPX\r\n$5\r\n10000\r\n$3\r\nGET\r\n" */
    static const char px[] = "$2\r\nPX\r\n$", get[] = "\r\n$3\r\nGET\r\n";
    char *end = buf + len;
    for (char *at = buf; (at = memmem(at, (size_t)(end - at), px, sizeof px - 1)); at++) {
        char *num = at + sizeof px - 1;
        long n = strtol(num, &num, 10);
        char *g = num + 2 + n;  /* past "\r\n" and the number's digits */
        if (n > 0 && g + sizeof get - 1 <= end && memcmp(g, get, sizeof get - 1) == 0) {
            g[7] = 'X';
            atomic_fetch_add(&p->old_sets, 1);
        }
    }
}

enum { PROXY_PAIRS = 8 };

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

static void *proxy_run(void *arg)
{
    proxy *p = arg;
    int cli[PROXY_PAIRS], up[PROXY_PAIRS];
    for (int i = 0; i < PROXY_PAIRS; i++)
        cli[i] = up[i] = -1;
    char buf[65536];
    while (!atomic_load(&p->stop)) {
        struct pollfd fds[1 + 2 * PROXY_PAIRS];
        int n = 0;
        fds[n++] = (struct pollfd){.fd = p->lfd, .events = POLLIN};
        for (int i = 0; i < PROXY_PAIRS; i++) {
            fds[n++] = (struct pollfd){.fd = cli[i], .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = up[i], .events = POLLIN};
        }
        if (poll(fds, (nfds_t)n, 50) <= 0)
            continue;
        if (fds[0].revents & POLLIN) {
            int c = accept(p->lfd, NULL, NULL);
            int i = 0;
            while (i < PROXY_PAIRS && cli[i] >= 0)
                i++;
            int u = c >= 0 && i < PROXY_PAIRS ? connect_port(p->upstream) : -1;
            if (u < 0) {
                if (c >= 0)
                    close(c);
            } else {
                cli[i] = c;
                up[i] = u;
            }
        }
        for (int i = 0; i < PROXY_PAIRS; i++) {
            struct pollfd *fc = &fds[1 + 2 * i], *fu = &fds[2 + 2 * i];
            bool dead = false;
            if (cli[i] >= 0 && fc->revents) {
                ssize_t got = read(cli[i], buf, sizeof buf);
                if (got > 0 && atomic_load(&p->old_set))
                    spoil_set_get(p, buf, (size_t)got);
                int raced = got > 0 && atomic_load(&p->vanish) > 0
                                ? vanish_between(p, cli[i], up[i], buf, (size_t)got) : 0;
                if (raced) {
                    dead = raced < 0;
                } else if (got <= 0 || write(up[i], buf, (size_t)got) != got) {
                    dead = true;
                } else if (atomic_exchange(&p->drop_reply, false)) {
                    struct pollfd w = {.fd = up[i], .events = POLLIN};
                    if (poll(&w, 1, 2000) > 0)
                        (void)!read(up[i], buf, sizeof buf); /* the reply, swallowed */
                    dead = true;
                }
            }
            if (!dead && up[i] >= 0 && fu->revents) {
                ssize_t got = read(up[i], buf, sizeof buf);
                dead = got <= 0 || write(cli[i], buf, (size_t)got) != got;
            }
            if (dead) {
                close(cli[i]);
                close(up[i]);
                cli[i] = up[i] = -1;
            }
        }
    }
    for (int i = 0; i < PROXY_PAIRS; i++)
        if (cli[i] >= 0) {
            close(cli[i]);
            close(up[i]);
        }
    return NULL;
}

static void proxy_start(proxy *p, uint16_t upstream)
{
    memset(p, 0, sizeof *p);
    p->upstream = upstream;
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    cr_assert_eq(bind(p->lfd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(p->lfd, 16), 0);
    cr_assert_eq(getsockname(p->lfd, (struct sockaddr *)&a, &len), 0);
    p->port = ntohs(a.sin_port);
    cr_assert_eq(pthread_create(&p->thread, NULL, proxy_run, p), 0);
}

static void proxy_stop(proxy *p)
{
    atomic_store(&p->stop, true);
    pthread_join(p->thread, NULL);
    close(p->lfd);
}

Test(redis, server_before_7_that_refuses_set_nx_get_is_claimed_with_the_script)
{
    proxy p;
    proxy_start(&p, srv.ports[0]);
    atomic_store(&p.old_set, true);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", p.port);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 10000);
    handler_arg a = {.body = "once"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "old-server", 10, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(atomic_load(&p.old_sets), 1, "the first claim tried SET NX GET");
    cr_assert_eq(run_key(l, "old-server", 10, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "once");
    idem_request req = {.key = "old-busy", .key_len = 8};
    idem_claim *c, *dup;
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_begin(l, &req, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert_eq(idem_abort(c), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 1);
    cr_assert_eq(atomic_load(&p.old_sets), 1, "later claims go straight to the script");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
    proxy_stop(&p);
}

Test(redis, abort_whose_reply_was_lost_after_the_server_freed_the_key_is_ok)
{
    proxy p;
    proxy_start(&p, srv.ports[0]);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", p.port);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 10000);
    idem_request req = {.key = "lost-reply", .key_len = 10};
    idem_claim *c = NULL;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);

    /* The release runs on the server, its reply is lost with the connection,
     * and the driver tries again on a new one: the key is already free. */
    atomic_store(&p.drop_reply, true);
    int rc = idem_abort(c);
    cr_assert(!atomic_load(&p.drop_reply), "the proxy saw no request");
    cr_assert_eq(rc, IDEM_OK, "the key was freed, yet abort said %d: %s", rc, idem_last_error());
    redisContext *ctl = raw();
    redisReply *e = raw_cmd(ctl, "EXISTS idem:lost-reply");
    cr_assert_eq(e->integer, 0, "the key is free");
    freeReplyObject(e);
    redisFree(ctl);

    /* A first try that finds no key is still lost: nothing of ours was there. */
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);
    ctl = raw();
    freeReplyObject(raw_cmd(ctl, "DEL idem:lost-reply"));
    redisFree(ctl);
    cr_assert_eq(idem_abort(c), IDEM_ELOST, "%s", idem_last_error());

    idem_layer_free(l);
    idem_store_close(st);
    proxy_stop(&p);
}

/* ---- the retry hint never comes from the holder's clock ---- */

/* A holder's STARTED record whose deadline, by the holder's clock, is an
 * hour ahead: a clock that runs fast, or a record written by hand. */
static void holder_record(proxy *p, const char *key)
{
    uint8_t token[IDEM_TOKEN_LEN];
    memset(token, 0x77, sizeof token);
    snprintf(p->vanish_key, sizeof p->vanish_key, "%s", key);
    cr_assert_eq(idem_record_build(&p->holder, &p->holder_len, IDEM_STATE_STARTED, token,
                                   idem_now_ms() + 3600000, 0, NULL, 0), IDEM_OK, "%s", idem_last_error());
}

Test(redis, a_lease_that_ends_between_set_get_and_pttl_is_claimed_again)
{
    proxy p;
    proxy_start(&p, srv.ports[0]);
    holder_record(&p, "idem:gone-between");
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", p.port);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 300);
    /* SET ... GET finds the holder's record; by the PTTL the key is gone:
     * by the server's clock it is free, so the claim is made again. */
    atomic_store(&p.vanish, 1);
    handler_arg a = {.body = "claimed again"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "gone-between", 12, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(atomic_load(&p.vanished), 1, "the proxy raced no claim");
    cr_assert(r.outcome != IDEM_IN_PROGRESS || r.retry_after_ms <= 300,
              "a 409 for a 300 ms lease says to come back in %u ms (the holder's clock)", r.retry_after_ms);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the key was free by the server's clock, yet outcome %d",
                 r.outcome);
    cr_assert_eq(atomic_load(&a.calls), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
    proxy_stop(&p);
    free(p.holder);
}

Test(redis, a_key_that_vanishes_at_every_claim_is_claimed_again_a_few_times_then_answered_409)
{
    proxy p;
    proxy_start(&p, srv.ports[0]);
    holder_record(&p, "idem:always-gone");
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", p.port);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 300);
    atomic_store(&p.vanish, 1000);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "always-gone", 11, &a, &r), IDEM_OK, "%s", idem_last_error());
    unsigned raced = atomic_load(&p.vanished);
    atomic_store(&p.vanish, 0);
    cr_assert(raced >= 2 && raced <= 5, "the claim was sent %u times: it is retried, a bounded number "
              "of times", raced);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms <= 300,
              "a 409 for a 300 ms lease says to come back in %u ms", r.retry_after_ms);
    cr_assert_eq(atomic_load(&a.calls), 0);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
    proxy_stop(&p);
    free(p.holder);
}

/* A key with no expiry has no time left the server can tell (PTTL -1):
 * the hint is the deadline the holder wrote, but never past the lease. The
 * same with the claim script of a server before 7.0. */
Test(redis, a_started_record_without_expiry_gets_a_hint_within_the_lease)
{
    proxy p;
    proxy_start(&p, srv.ports[0]);
    holder_record(&p, "idem:no-expiry");
    redisContext *c = raw();
    freeReplyObject(raw_cmd(c, "SET %s %b", p.vanish_key, p.holder, p.holder_len));
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", p.port);
    for (int script = 0; script < 2; script++) {
        atomic_store(&p.old_set, script == 1);
        idem_store *st = open_store(script ? url : srv.url);
        idem_layer *l = layer_on(st, 300);
        handler_arg a = {0};
        idem_reply r = {0};
        cr_assert_eq(run_key(l, "no-expiry", 9, &a, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
        cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms <= 300, "%s: a 409 for a 300 ms lease says "
                  "to come back in %u ms", script ? "script" : "SET NX GET", r.retry_after_ms);
        cr_assert_eq(atomic_load(&a.calls), 0);
        idem_reply_clear(&r);
        idem_layer_free(l);
        idem_store_close(st);
    }
    cr_assert_geq(atomic_load(&p.old_sets), 1, "the claim script was not used");
    freeReplyObject(raw_cmd(c, "DEL %s", p.vanish_key));
    redisFree(c);
    proxy_stop(&p);
    free(p.holder);
}

/* ---- a server that refuses writes, a reply that trickles, a huge value ---- */

Test(redis, server_at_maxmemory_refuses_new_keys_with_the_oom_hint_and_still_replays)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {.body = "paid"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "done-before", 11, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);

    redisContext *c = raw();
    freeReplyObject(raw_cmd(c, "CONFIG SET maxmemory-policy noeviction"));
    freeReplyObject(raw_cmd(c, "CONFIG SET maxmemory 1"));
    cr_assert_eq(run_key(l, "new-at-limit", 12, &a, &r), IDEM_EBACKEND,
                 "a server that refuses writes is a store error, not a corrupt record: %s",
                 idem_last_error());
    cr_assert(strstr(idem_last_error(), "OOM") && strstr(idem_last_error(), "maxmemory"), "%s",
              idem_last_error());
    cr_assert_null(strstr(idem_last_error(), "delete"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 1, "nothing runs when the claim was refused");
    /* The committed record is still there to read. */
    cr_assert_eq(run_key(l, "done-before", 11, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "paid");

    freeReplyObject(raw_cmd(c, "CONFIG SET maxmemory 0"));
    cr_assert_eq(run_key(l, "new-at-limit", 12, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

Test(redis, read_only_replica_replays_committed_keys_and_refuses_new_ones_with_the_hint)
{
    idem_store *st = open_store(srv.url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {.body = "paid"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "on-master", 9, &a, &r), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(l);
    idem_store_close(st);

    idem_test_server rep;
    start_custom(&rep, NULL, NULL, NULL, NULL);
    redisContext *c = redisConnect("127.0.0.1", rep.ports[0]);
    cr_assert(c && !c->err);
    freeReplyObject(raw_cmd(c, "REPLICAOF 127.0.0.1 %u", (unsigned)srv.ports[0]));
    uint64_t t0 = mono_ms();
    for (;;) {
        redisReply *i = raw_cmd(c, "INFO replication");
        bool up = strstr(i->str, "master_link_status:up") != NULL;
        freeReplyObject(i);
        if (up)
            break;
        cr_assert(mono_ms() - t0 < 15000, "the replica did not sync within 15 s");
        usleep(50000);
    }
    /* The record has reached the replica. */
    for (;;) {
        redisReply *e = raw_cmd(c, "EXISTS idem:on-master");
        long long n = e->integer;
        freeReplyObject(e);
        if (n == 1)
            break;
        cr_assert(mono_ms() - t0 < 15000, "the record did not reach the replica");
        usleep(50000);
    }
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", (unsigned)rep.ports[0]);
    st = open_store(url);
    l = layer_on(st, 0);
    cr_assert_eq(run_key(l, "on-master", 9, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED, "a committed record is readable on the replica");
    cr_assert_str_eq((char *)r.body, "paid");
    cr_assert_eq(run_key(l, "new-on-replica", 14, &a, &r), IDEM_EBACKEND, "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "READONLY") && strstr(idem_last_error(), "replica"), "%s",
              idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
    redisFree(c);
    idem_test_server_stop(&rep);
}

Test(redis, reply_that_trickles_in_is_bounded_as_a_whole_by_timeout_ms)
{
    idem_proxy *p;
    cr_assert_eq(idem_proxy_start(&p, srv.ports[0]), 0);
    char url[96];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u?timeout_ms=200", idem_proxy_port(p));
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {.body = "a body long enough to trickle for a while"};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "trickled", 8, &a, &r), IDEM_OK, "%s", idem_last_error());

    /* One byte every 50 ms: each read is quick, the reply (about 120
     * bytes) would take 6 s; and one byte every 150 ms, under the per-read
     * timeout too. */
    static const unsigned every[] = {50, 150};
    for (int i = 0; i < 2; i++) {
        idem_proxy_set(p, IDEM_PROXY_TRICKLE, every[i]);
        uint64_t t0 = mono_ms();
        int rc = run_key(l, "trickled", 8, &a, &r);
        uint64_t took = mono_ms() - t0;
        idem_proxy_set(p, IDEM_PROXY_PASS, 0);
        cr_assert_eq(rc, IDEM_EBACKEND, "a replay trickling in at 1 byte / %u ms", every[i]);
        cr_assert(took < 600, "took %llu ms with timeout_ms=200 (1 byte / %u ms)",
                  (unsigned long long)took, every[i]);
        cr_assert(strstr(idem_last_error(), "incomplete after 200 ms"), "%s", idem_last_error());
    }
    /* A new key whose claim (":0\r\n") trickles past the timeout: nothing runs. */
    idem_proxy_set(p, IDEM_PROXY_TRICKLE, 100);
    cr_assert_eq(run_key(l, "trickled-new", 12, &a, &r), IDEM_EBACKEND);
    idem_proxy_set(p, IDEM_PROXY_PASS, 0);
    cr_assert_eq(atomic_load(&a.calls), 1);

    /* Passing again: the spoilt connections are gone, the next ones work. */
    cr_assert_eq(run_key(l, "trickled", 8, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, a.body);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(st);
    idem_proxy_stop(p);
}

Test(redis, value_far_over_the_record_limit_is_refused_without_being_read)
{
    char url[128];
    snprintf(url, sizeof url, "%s?max_record_bytes=1048576", srv.url);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    redisContext *c = raw();
    /* 8 MiB made by the server: this process never holds it. */
    freeReplyObject(raw_cmd(c, "SETRANGE %s %d %s", "idem:huge", (8 << 20) - 1, "x"));

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "huge", 4, &a, &r), IDEM_ECORRUPT, "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "8388608-byte string") &&
              strstr(idem_last_error(), "max_record_bytes"), "%s", idem_last_error());
    getrusage(RUSAGE_SELF, &ru1);
    cr_assert(ru1.ru_maxrss - ru0.ru_maxrss < 4096, "the peak RSS grew by %ld KiB: the value was read",
              ru1.ru_maxrss - ru0.ru_maxrss);
    cr_assert_eq(atomic_load(&a.calls), 0, "nothing runs over a foreign value");
    /* The connection it came on was dropped, unread: the next claim works. */
    cr_assert_eq(run_key(l, "small", 5, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(atomic_load(&a.calls), 1);
    a.calls = 0;
    cr_assert_eq(atomic_load(&a.calls), 0);
    /* The layer cannot store what the driver would refuse to read back. */
    idem_claim *claim;
    idem_request req = {.key = "big-response", .key_len = 12};
    idem_options o;
    idem_options_init(&o);
    o.max_response_len = 4u << 20;
    idem_layer *l2;
    cr_assert_eq(idem_layer_new(&l2, st, &o), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_begin(l2, &req, &claim, &r), IDEM_OK, "%s", idem_last_error());
    char *body = calloc(1, 2u << 20);
    cr_assert_eq(idem_commit(claim, 200, body, 2u << 20), IDEM_ETOOBIG);
    free(body);
    cr_assert_eq(idem_abort(claim), IDEM_OK);
    idem_layer_free(l2);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}

/* ---- read and remove (the operator's tools) ---- */

Test(redis, read_returns_the_record_and_its_ttl_and_remove_deletes_whatever_is_there)
{
    const idem_backend *b = &idem__redis_backend;
    idem_url *u;
    cr_assert_eq(idem_url_parse(&u, srv.url), IDEM_OK);
    void *s;
    cr_assert_eq(b->open(&s, u), IDEM_OK, "%s", idem_last_error());
    idem_url_free(u);
    uint8_t rec[128];
    size_t rec_len = make_record(rec, IDEM_STATE_STARTED, 0xaa, NULL);
    void *ex, *got;
    size_t ex_len, got_len;
    uint32_t left;
    cr_assert_eq(b->read(s, "r", 1, &got, &got_len, &left), IDEM_OK);
    cr_assert_null(got, "nothing there yet");
    cr_assert_eq(b->claim(s, "r", 1, rec, rec_len, 5000, &ex, &ex_len, &left), IDEM_OK);
    cr_assert_eq(b->read(s, "r", 1, &got, &got_len, &left), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(got);
    cr_assert_eq(got_len, rec_len);
    cr_assert_arr_eq(got, rec, rec_len);
    cr_assert(left > 4000 && left <= 5000, "remaining %u", left);
    free(got);

    redisContext *c = raw();
    freeReplyObject(raw_cmd(c, "RPUSH r-list x"));
    cr_assert_eq(b->read(s, "r-list", 6, &got, &got_len, &left), IDEM_ECORRUPT);
    cr_assert(strstr(idem_last_error(), "Redis list"), "%s", idem_last_error());

    bool deleted = false;
    cr_assert_eq(b->remove(s, "r", 1, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert(deleted);
    cr_assert_eq(b->remove(s, "r-list", 6, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert(deleted, "remove deletes whatever is there");
    cr_assert_eq(b->remove(s, "r", 1, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert_not(deleted);
    redisReply *e = raw_cmd(c, "EXISTS r r-list");
    cr_assert_eq(e->integer, 0);
    freeReplyObject(e);
    redisFree(c);
    b->close(s);
}

/* ---- wait_replicas ---- */

/* The settings check's warning about unacknowledged commits, or NULL
 * (returned in static storage). */
static const char *unacked_finding(idem_store *st)
{
    static char text[1024];
    idem_findings *f;
    cr_assert_eq(idem_store_check(st, &f), IDEM_OK, "%s", idem_last_error());
    const char *found = NULL;
    for (size_t i = 0; i < idem_findings_count(f); i++) {
        idem_finding_level level;
        const char *t = idem_findings_get(f, i, &level);
        if (strstr(t, "acknowledged by fewer than")) {
            cr_assert_eq(level, IDEM_FINDING_WARNING, "%s", t);
            snprintf(text, sizeof text, "%s", t);
            found = text;
        }
    }
    idem_findings_free(f);
    return found;
}

Test(redis, claim_no_replica_acknowledged_is_given_up_and_an_unacknowledged_commit_is_counted)
{
    char url[128];
    snprintf(url, sizeof url, "%s?wait_replicas=1&wait_timeout_ms=50", srv.url);
    idem_store *st = open_store(url);
    idem_layer *l = layer_on(st, 0);
    handler_arg a = {0};
    idem_reply r = {0};
    cr_assert_eq(run_key(l, "unacked", 7, &a, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "0 of the 1 replicas") &&
              strstr(idem_last_error(), "given up"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&a.calls), 0, "nothing runs on a claim no replica has");
    redisContext *c = raw();
    redisReply *e = raw_cmd(c, "EXISTS idem:unacked");
    cr_assert_eq(e->integer, 0, "the unacknowledged claim was released");
    freeReplyObject(e);

    /* With a replica attached, claims and commits are acknowledged. */
    idem_test_server rep;
    start_custom(&rep, NULL, NULL, NULL, NULL);
    redisContext *rc = redisConnect("127.0.0.1", rep.ports[0]);
    cr_assert(rc && !rc->err);
    freeReplyObject(raw_cmd(rc, "REPLICAOF 127.0.0.1 %u", (unsigned)srv.ports[0]));
    uint64_t t0 = mono_ms();
    while (info_field(c, "replication", "connected_slaves") < 1 ||
           info_field(rc, "replication", "master_sync_in_progress") != 0 ||
           info_field(rc, "replication", "master_last_io_seconds_ago") < 0) {
        cr_assert(mono_ms() - t0 < 15000, "the replica did not sync");
        usleep(50000);
    }
    snprintf(url, sizeof url, "%s?wait_replicas=1&wait_timeout_ms=2000", srv.url);
    idem_store *st2 = open_store(url);
    idem_layer *l2 = layer_on(st2, 0);
    cr_assert_eq(run_key(l2, "acked", 5, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    e = raw_cmd(rc, "EXISTS idem:acked");
    cr_assert_eq(e->integer, 1, "an acknowledged commit is on the replica when the call returns");
    freeReplyObject(e);
    idem_reply_clear(&r);
    cr_assert_null(unacked_finding(st2), "every commit was acknowledged");

    /* A commit the replica cannot acknowledge (it is stopped) is the
     * handler's response all the same, and counted; the check reports it. */
    snprintf(url, sizeof url, "%s?wait_replicas=1&wait_timeout_ms=200", srv.url);
    idem_store *st3 = open_store(url);
    idem_layer *l3 = layer_on(st3, 0);
    idem_claim *gone, *claim;
    idem_request lost = {.key = "lost", .key_len = 4}, req = {.key = "behind", .key_len = 6};
    cr_assert_eq(idem_begin(l3, &lost, &gone, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_begin(l3, &req, &claim, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert(gone && claim);
    freeReplyObject(raw_cmd(c, "DEL idem:lost"));
    cr_assert_eq(kill(rep.pids[0], SIGSTOP), 0);
    int lost_rc = idem_commit(gone, 201, "made", 4);
    int committed = idem_commit(claim, 201, "made", 4);
    cr_assert_eq(kill(rep.pids[0], SIGCONT), 0);
    cr_assert_eq(lost_rc, IDEM_ELOST, "%s", idem_last_error());
    cr_assert_eq(committed, IDEM_OK, "%s", idem_last_error());
    const char *found = unacked_finding(st3);
    cr_assert(found && strstr(found, "1 commit through this store was acknowledged by fewer than 1 replica"),
              "a lost commit is not counted, an unacknowledged one is: %s", found ? found : "no finding");
    idem_layer_free(l3);
    idem_store_close(st3);
    idem_layer_free(l2);
    idem_store_close(st2);
    redisFree(rc);
    idem_test_server_stop(&rep);
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
}
