/* The Redis driver on a moving cluster and under Sentinel: slots resharded
 * while requests run, a master SIGKILLed. Each test starts its own
 * topology (tests/support/redis_cluster.c, redis_sentinel.c) and counts,
 * per key, how often its handler ran. What a failover may cost is stated in
 * backends/redis/README.md ("What a failover costs"); these tests hold the
 * driver to it. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <hiredis/hiredis.h>

#include <idempotency/idempotency.h>

#include "harness.h"
#include "support/testutil.h"

TestSuite(redis_topology, .timeout = 150);

#define THREADS 8
#define KEYS    4000 /* per thread, more than any run gets through */

/* Service resumes within this after a master is SIGKILLed: the cluster's
 * cluster-node-timeout (2 s in the harness) or the sentinels'
 * down-after-milliseconds (1 s) plus the election, with room for a busy
 * machine. */
#define RESUME_BOUND_MS 20000
/* With wait_replicas=1 the old master is started again (as a replica) this
 * long after the kill, once the failover is surely done. */
#define RESTART_AFTER_MS 5000

int idem_test_cluster_restart(idem_test_server *srv);

/* CRC16 of the cluster specification, written again here so that the
 * driver's routing is checked against an independent copy and the server. */
static unsigned slot_of(const char *k)
{
    size_t n = strlen(k);
    const char *o = strchr(k, '{'), *c = o ? strchr(o + 1, '}') : NULL;
    if (o && c && c > o + 1) {
        k = o + 1;
        n = (size_t)(c - o - 1);
    }
    unsigned crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (unsigned)(unsigned char)k[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
    return crc & 16383;
}

static redisContext *node(uint16_t port)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    cr_assert(c && !c->err, "connection to 127.0.0.1:%u", port);
    return c;
}

static long long info_count(uint16_t port, const char *section, const char *field)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return 0;
    }
    redisReply *r = redisCommand(c, "INFO %s", section);
    long long n = 0;
    const char *p = r && r->str ? strstr(r->str, field) : NULL;
    if (p)
        n = atoll(p + strlen(field));
    if (r)
        freeReplyObject(r);
    redisFree(c);
    return n;
}

/* ---- a workload: THREADS threads, each its own keys, each retried until
 * it succeeds, every handler run counted ---- */

typedef struct work {
    idem_layer *l;
    atomic_int  runs[THREADS][KEYS];
    atomic_int  done[THREADS];        /* keys finished */
    atomic_int  stop;
    atomic_int  failures;             /* calls that did not return IDEM_OK */
    atomic_int  gave_up;              /* keys never finished */
    _Atomic uint64_t last_ok[THREADS];
    _Atomic uint64_t longest_gap;     /* ms between two successes of one thread */
    bool        slots_0_to_299;       /* keys hashed into the slots being resharded */
} work;

typedef struct worker_arg {
    work *w;
    int   id;
} worker_arg;

typedef struct run_arg {
    atomic_int *runs;
} run_arg;

static int count_handler(void *arg, idem_response *resp)
{
    atomic_fetch_add(((run_arg *)arg)->runs, 1);
    usleep(2000);
    return idem_response_set(resp, 201, "done", 4);
}

static void key_name(const work *w, int t, int i, char *buf, size_t len)
{
    if (w->slots_0_to_299) {
        /* A hash tag whose slot is below 300: found by trying. */
        int want = (t * KEYS + i) % 300;
        for (unsigned tag = 0;; tag++) {
            char probe[32];
            snprintf(probe, sizeof probe, "%u", tag);
            if ((int)slot_of(probe) == want) {
                snprintf(buf, len, "{%s}-%d-%d", probe, t, i);
                return;
            }
        }
    }
    snprintf(buf, len, "key-%d-%d", t, i);
}

static void *worker(void *p)
{
    worker_arg *a = p;
    work *w = a->w;
    atomic_store(&w->last_ok[a->id], mono_ms());
    for (int i = 0; i < KEYS && !atomic_load(&w->stop); i++) {
        char key[64];
        key_name(w, a->id, i, key, sizeof key);
        idem_request req = {.key = key, .key_len = strlen(key)};
        run_arg ra = {.runs = &w->runs[a->id][i]};
        bool ok = false;
        for (int attempt = 0; attempt < 1000 && !ok; attempt++) {
            idem_reply r = {0};
            int rc = idem_run(w->l, &req, count_handler, &ra, &r);
            ok = rc == IDEM_OK && (r.outcome == IDEM_EXECUTED || r.outcome == IDEM_REPLAYED);
            if (!ok) {
                atomic_fetch_add(&w->failures, 1);
                usleep(20000);
            }
            idem_reply_clear(&r);
        }
        if (!ok) {
            atomic_fetch_add(&w->gave_up, 1);
            break;
        }
        uint64_t now = mono_ms(), gap = now - atomic_exchange(&w->last_ok[a->id], now);
        uint64_t seen = atomic_load(&w->longest_gap);
        while (gap > seen && !atomic_compare_exchange_weak(&w->longest_gap, &seen, gap))
            ;
        atomic_fetch_add(&w->done[a->id], 1);
    }
    return NULL;
}

static void work_start(work *w, pthread_t *t, worker_arg *a)
{
    for (int i = 0; i < THREADS; i++) {
        a[i] = (worker_arg){.w = w, .id = i};
        cr_assert_eq(pthread_create(&t[i], NULL, worker, &a[i]), 0);
    }
}

static int work_done(work *w)
{
    int n = 0;
    for (int i = 0; i < THREADS; i++)
        n += atomic_load(&w->done[i]);
    return n;
}

/* Stop, and count the keys whose handler ran more than once. */
static int work_stop(work *w, pthread_t *t)
{
    atomic_store(&w->stop, 1);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    int twice = 0;
    for (int i = 0; i < THREADS; i++)
        for (int k = 0; k < KEYS; k++)
            twice += atomic_load(&w->runs[i][k]) > 1;
    return twice;
}

static idem_layer *layer_on(idem_store *st)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 30000; /* longer than any failover here: a commit retried across one lands */
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, st, &o), IDEM_OK, "%s", idem_last_error());
    return l;
}

/* ---- the cluster ---- */

Test(redis_topology, every_key_lives_on_the_master_of_its_slot)
{
    idem_test_server srv;
    cr_assert_eq(idem_test_server_start(&srv, "redis-cluster"), 0);
    idem_store *st;
    cr_assert_eq(idem_store_open(&st, srv.url), IDEM_OK, "%s", idem_last_error());
    idem_layer *l = layer_on(st);
    static const char *keys[] = {"a", "b", "order-17", "{user1000}.following",
                                 "{user1000}.followers", "foo{}{bar}", "{}x", "x{y"};
    redisContext *c = node(srv.more_ports[0]);
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        atomic_int runs = 0;
        run_arg ra = {.runs = &runs};
        idem_request req = {.key = keys[i], .key_len = strlen(keys[i])};
        idem_reply r = {0};
        cr_assert_eq(idem_run(l, &req, count_handler, &ra, &r), IDEM_OK, "%s: %s", keys[i],
                     idem_last_error());
        idem_reply_clear(&r);
        /* The server's slot is ours, and the record is on its master: a
         * GET there answers without a redirect. */
        char full[64];
        snprintf(full, sizeof full, "idem:%s", keys[i]);
        redisReply *ks = redisCommand(c, "CLUSTER KEYSLOT %s", full);
        cr_assert_eq(ks->integer, (long long)slot_of(full), "slot of %s", full);
        freeReplyObject(ks);
        int found = 0;
        for (int m = 0; m < 3; m++) {
            redisContext *mc = node(srv.more_ports[m]);
            redisReply *e = redisCommand(mc, "EXISTS %s", full);
            found += e->type == REDIS_REPLY_INTEGER && e->integer == 1;
            freeReplyObject(e);
            redisFree(mc);
        }
        cr_assert_eq(found, 1, "%s is on exactly one master", full);
    }
    redisFree(c);
    idem_layer_free(l);
    idem_store_close(st);
    idem_test_server_stop(&srv);
}

static char *node_id(uint16_t port)
{
    redisContext *c = node(port);
    redisReply *r = redisCommand(c, "CLUSTER MYID");
    char *id = strdup(r->str);
    freeReplyObject(r);
    redisFree(c);
    return id;
}

static long long errorstat(const idem_test_server *srv, const char *name)
{
    long long n = 0;
    for (int i = 0; i < srv->nmore; i++)
        n += info_count(srv->more_ports[i], "errorstats", name);
    return n;
}

Test(redis_topology, slots_resharded_under_load_are_followed_through_ask_and_moved, .timeout = 240)
{
    idem_test_server srv;
    cr_assert_eq(idem_test_server_start(&srv, "redis-cluster"), 0);
    idem_store *st;
    cr_assert_eq(idem_store_open(&st, srv.url), IDEM_OK, "%s", idem_last_error());
    static work w;
    memset(&w, 0, sizeof w);
    w.l = layer_on(st);
    w.slots_0_to_299 = true;
    long long moved0 = errorstat(&srv, "errorstat_MOVED:count="),
              ask0 = errorstat(&srv, "errorstat_ASK:count=");
    pthread_t t[THREADS];
    worker_arg a[THREADS];
    work_start(&w, t, a);
    usleep(300000);

    /* Move slots 0-299 from the first master to the second, key by key,
     * while the threads create keys in exactly those slots. */
    char *from = node_id(srv.more_ports[0]), *to = node_id(srv.more_ports[1]);
    char seed[32], *log;
    snprintf(seed, sizeof seed, "127.0.0.1:%u", srv.more_ports[0]);
    cr_assert(asprintf(&log, "%s/reshard.log", srv.dir) > 0);
    char *argv[] = {"redis-cli", "--cluster", "reshard", seed, "--cluster-from", from,
                    "--cluster-to", to, "--cluster-slots", "300", "--cluster-yes",
                    "--cluster-pipeline", "1", NULL};
    pid_t cli = idem_test_spawn(argv, log);
    int status = 0;
    cr_assert_eq(waitpid(cli, &status, 0), cli);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "redis-cli --cluster reshard failed; "
              "see %s", log);
    usleep(300000);
    int twice = work_stop(&w, t);
    /* One slot more moved by hand, with a new key claimed while it is
     * half-way (MIGRATING on the source, IMPORTING on the target): the
     * source answers ASK whatever the timing of the run above. */
    {
        char key[64];
        unsigned tag = 0;
        for (;; tag++) {
            char probe[32];
            snprintf(probe, sizeof probe, "%u", tag);
            if (slot_of(probe) == 300)
                break;
        }
        snprintf(key, sizeof key, "{%u}-asked", tag);
        redisContext *src = node(srv.more_ports[0]), *dst = node(srv.more_ports[1]);
        freeReplyObject(redisCommand(dst, "CLUSTER SETSLOT 300 IMPORTING %s", from));
        freeReplyObject(redisCommand(src, "CLUSTER SETSLOT 300 MIGRATING %s", to));
        atomic_int runs = 0;
        run_arg ra = {.runs = &runs};
        idem_request req = {.key = key, .key_len = strlen(key)};
        idem_reply r = {0};
        cr_assert_eq(idem_run(w.l, &req, count_handler, &ra, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_eq(r.outcome, IDEM_EXECUTED);
        idem_reply_clear(&r);
        for (int i = 0; i < 3; i++) {
            redisContext *m = node(srv.more_ports[i]);
            freeReplyObject(redisCommand(m, "CLUSTER SETSLOT 300 NODE %s", to));
            redisFree(m);
        }
        redisFree(src);
        redisFree(dst);
    }
    long long moved = errorstat(&srv, "errorstat_MOVED:count=") - moved0;
    long long asked = errorstat(&srv, "errorstat_ASK:count=") - ask0;
    cr_log_info("reshard of 300 slots under %d threads: %d keys done, %lld MOVED, %lld ASK, "
                "%d failed calls, %d keys ran twice", THREADS, work_done(&w), moved, asked,
                atomic_load(&w.failures), twice);
    cr_assert_gt(moved, 0, "no MOVED was seen: the test did not move the ground");
    cr_assert_gt(asked, 0, "no ASK was seen: no key was created while its slot migrated");
    cr_assert_eq(atomic_load(&w.failures), 0, "a redirect must cost no request");
    cr_assert_eq(twice, 0, "a reshard loses nothing: no handler may run twice");
    free(from);
    free(to);
    free(log);
    idem_layer_free(w.l);
    idem_store_close(st);
    idem_test_server_stop(&srv);
}

/* SIGKILL server victim of a topology under load; the workload goes on
 * until every thread has succeeded again for a while. */
static void failover_under_load(const char *kind, int victim, const char *params, bool strict)
{
    idem_test_server srv;
    cr_assert_eq(idem_test_server_start(&srv, kind), 0);
    char url[512];
    snprintf(url, sizeof url, "%s%s", srv.url, params);
    idem_store *st;
    cr_assert_eq(idem_store_open(&st, url), IDEM_OK, "%s", idem_last_error());
    static work w;
    memset(&w, 0, sizeof w);
    w.l = layer_on(st);
    pthread_t t[THREADS];
    worker_arg a[THREADS];
    work_start(&w, t, a);
    usleep(500000);
    int before = work_done(&w);
    kill(srv.more_pids[victim], SIGKILL);
    waitpid(srv.more_pids[victim], NULL, 0);
    srv.more_pids[victim] = 0;
    uint64_t killed = mono_ms();
    if (strict) {
        /* The promoted replica has no replica of its own, so claims are
         * refused (none acknowledged) until the old master is back as its
         * replica: start it again once the failover is done. */
        usleep(RESTART_AFTER_MS * 1000);
        if (strcmp(kind, "redis-cluster") == 0) {
            cr_assert_eq(idem_test_cluster_restart(&srv), 0, "the old master did not rejoin");
        } else {
            char port[8], master[8], *log;
            snprintf(port, sizeof port, "%u", srv.more_ports[victim]);
            snprintf(master, sizeof master, "%u", srv.more_ports[1]);
            cr_assert(asprintf(&log, "%s/rejoined.log", srv.dir) > 0);
            char *argv[] = {srv.bin, "--port", port, "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", srv.dir, "--replicaof", "127.0.0.1",
                            master, NULL};
            srv.more_pids[victim] = idem_test_spawn(argv, log);
            free(log);
            cr_assert_gt(srv.more_pids[victim], 0);
        }
    }
    /* Resumed: every thread has finished a key since the kill. */
    bool resumed = false;
    uint64_t resumed_at = 0;
    while (!resumed && mono_ms() - killed < RESUME_BOUND_MS + RESTART_AFTER_MS + 1000) {
        usleep(50000);
        resumed = true;
        for (int i = 0; i < THREADS; i++)
            resumed &= atomic_load(&w.last_ok[i]) > killed + 100;
        resumed_at = mono_ms();
    }
    usleep(500000);
    int twice = work_stop(&w, t);
    cr_log_info("%s%s: master SIGKILLed after %d keys; every thread served again after %llu ms; "
                "longest pause of a thread %llu ms; %d failed calls (retried); %d keys ran twice; "
                "%d keys done", kind, params, before, (unsigned long long)(resumed_at - killed),
                (unsigned long long)atomic_load(&w.longest_gap), atomic_load(&w.failures), twice,
                work_done(&w));
    /* With wait_replicas=1 the bound counts from the old master's restart. */
    uint64_t bound = RESUME_BOUND_MS + (strict ? RESTART_AFTER_MS : 0);
    cr_assert(resumed, "service did not resume within %llu ms of the kill",
              (unsigned long long)bound);
    cr_assert_leq(resumed_at - killed, bound, "service resumed after %llu ms",
                  (unsigned long long)(resumed_at - killed));
    cr_assert_eq(atomic_load(&w.gave_up), 0, "every key was done in the end");
    /* README: without wait_replicas a failover may run again at most the
     * requests in flight on the lost master, one per thread; with
     * wait_replicas=1 (one replica per master here) none. */
    if (strict)
        cr_assert_eq(twice, 0, "with wait_replicas=1 no handler runs twice across a failover");
    else
        cr_assert_leq(twice, THREADS, "more keys ran twice than requests were in flight");
    idem_layer_free(w.l);
    idem_store_close(st);
    idem_test_server_stop(&srv);
}

Test(redis_topology, cluster_master_sigkilled_is_replaced_and_service_resumes, .timeout = 120)
{
    failover_under_load("redis-cluster", 0, "", false);
}

Test(redis_topology, cluster_failover_with_wait_replicas_runs_nothing_twice, .timeout = 120)
{
    failover_under_load("redis-cluster", 0, "?wait_replicas=1&wait_timeout_ms=1000", true);
}

Test(redis_topology, sentinel_master_sigkilled_is_replaced_and_service_resumes, .timeout = 120)
{
    failover_under_load("redis-sentinel", 0, "", false);
}

Test(redis_topology, sentinel_failover_with_wait_replicas_runs_nothing_twice, .timeout = 120)
{
    failover_under_load("redis-sentinel", 0, "?wait_replicas=1&wait_timeout_ms=1000", true);
}
