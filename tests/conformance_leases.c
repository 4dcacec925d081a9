/*
 * Conformance, leases: what a slow or frozen store, a slow handler or a
 * stopped process may cost, on every driver (docs/operating.md, "Leases:
 * what a slow store can and cannot cost" and "Choosing the lease, the
 * commit deadline and the HTTP timeouts"; include/idempotency/idempotency.h
 * for idem_run, auto_extend, commit_timeout_ms and retry_after_ms).
 *
 *   - a claim whose reply comes back late (held, or trickled byte by byte
 *     under the per-read timeout) or, on SQLite, after another connection
 *     held the write lock, never runs its handler;
 *   - 64 threads on hot keys with zero-time handlers never start one after
 *     its lease, nor run one twice (but after a commit that waited on the
 *     store past its lease, which then says IDEM_ELOST);
 *   - auto_extend keeps a slow handler's key from a retry in another
 *     process; SIGKILL still frees the key after one lease; SIGSTOP past the
 *     lease still ends in IDEM_ELOST;
 *   - commit_timeout_ms bounds the commit against a frozen store;
 *   - a claim that timed out against a frozen store, and a key whose abort
 *     failed, are freed by the layer once the store answers again;
 *   - retry_after_ms follows the handlers' durations.
 *
 * Tests that freeze a store start a store of their own of the same kind
 * (IDEM_TEST_BACKEND), so the others running in parallel are not frozen:
 * a server is frozen with SIGSTOP, an SQLite file by a connection of the
 * test that holds its write lock.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif

#include "harness.h"
#include "proxy.h"
#include "support/testutil.h"

/* ---- fixtures ---- */

static const char *kind;
static char prefix[64];

static bool is_sqlite(void) { return strcmp(kind, "sqlite") == 0; }
static bool is_memcached(void) { return strncmp(kind, "memcached", 9) == 0; }
/* memory://: the store lives inside one process, with no wire and no
 * server to stop. */
static bool is_memory(void) { return strcmp(kind, "memory") == 0; }
static bool is_postgresql(void) { return strcmp(kind, "postgresql") == 0; }

/* The URL parameter that bounds a wait for the store's reply. */
static const char *reply_timeout_param(void)
{
    return is_postgresql() ? "statement_timeout_ms" : "timeout_ms";
}

#define NOT_APPLICABLE_IF(cond, why)                                                               \
    do {                                                                                           \
        if (cond)                                                                                  \
            cr_skip_test("not applicable to %s: %s", kind, why);                                   \
    } while (0)
#define NEEDS_A_WIRE() NOT_APPLICABLE_IF(is_sqlite() || is_memory(), "an embedded store has no reply " \
                                         "on a wire to slow down (SQLite's late claim is its held "  \
                                         "write lock, tested on its own)")
#define NEEDS_PROCESSES() NOT_APPLICABLE_IF(is_memory(), "it lives inside one process, so another " \
                                            "process cannot share it")
#define NEEDS_A_FREEZE() NOT_APPLICABLE_IF(is_memory(), "an in-process store cannot be frozen apart " \
                                           "from the process")

/* memcached counts item expiry in whole seconds. */
static long expiry_slack_ms(void) { return is_memcached() ? 2100 : 500; }

static void setup(void)
{
    /* the kind of store from the URL under test (whichever way the runner
     * was told to pick it) */
    const char *url = getenv("IDEM_TEST_URL");
    cr_assert(url, "IDEM_TEST_URL is not set; run this through meson test");
    static const char *const kinds[] = {"sqlite", "redis", "memcached", "memory", "postgresql"};
    kind = NULL;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (strncmp(url, kinds[i], strlen(kinds[i])) == 0 && strchr(":+", url[strlen(kinds[i])]))
            kind = kinds[i];
    cr_assert(kind, "the lease tests do not know the store at %s", url);
    if (strcmp(kind, "memcached") == 0 && strchr(url, ','))
        kind = "memcached2";
    if (strncmp(url, "postgres://", 11) == 0)
        kind = "postgresql";
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "L%ld-%08x:", (long)getpid(), r);
#ifndef IDEM_TEST_HAVE_SQLITE
    /* SQLite's store is frozen by holding its write lock with sqlite3 */
    if (is_sqlite())
        cr_fail("conformance was built without SQLite (IDEM_TEST_HAVE_SQLITE): the lease tests cannot "
                "freeze an SQLite store");
#endif
}

TestSuite(leases, .init = setup, .timeout = 120);

static idem_options options(uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = lease_ms;
    return o;
}

static idem_store *open_store(const char *url)
{
    idem_store *s;
    cr_assert_eq(idem_store_open(&s, url), IDEM_OK, "idem_store_open(%s): %s", url, idem_last_error());
    return s;
}

static idem_layer *open_layer(idem_store *s, const idem_options *o)
{
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, o), IDEM_OK, "idem_layer_new: %s", idem_last_error());
    return l;
}

static idem_stats stats_of(const idem_layer *l)
{
    idem_stats st;
    idem_layer_stats(l, &st);
    return st;
}

/* Wait until l has freed n keys in the background; false after ms. */
static bool wait_claims_freed(const idem_layer *l, uint64_t n, long ms)
{
    long t0 = mono_ms();
    while (stats_of(l).claims_freed < n) {
        if (mono_ms() - t0 > ms)
            return false;
        sleep_ms(20);
    }
    return true;
}

/* A handler: counts its runs (in memory shared with children when given),
 * notes when it started and ended, sleeps, answers or fails. */
typedef struct job {
    atomic_int  calls;
    atomic_int *shared_calls;    /* also counted here when set */
    long        sleep_ms;
    int         fail;
    long        started, ended;  /* mono ms */
    int         notify_fd;       /* a byte is written here when the handler starts; -1 */
    void      (*inside)(void);   /* called at the start of the handler */
} job;

static int job_handler(void *arg, idem_response *resp)
{
    job *j = arg;
    j->started = mono_ms();
    atomic_fetch_add(&j->calls, 1);
    if (j->shared_calls)
        atomic_fetch_add(j->shared_calls, 1);
    if (j->notify_fd >= 0)
        (void)!write(j->notify_fd, "s", 1);
    if (j->inside)
        j->inside();
    if (j->sleep_ms)
        sleep_ms(j->sleep_ms);
    j->ended = mono_ms();
    if (j->fail)
        return j->fail;
    return idem_response_set(resp, 200, "done", 4) == IDEM_OK ? 0 : 1;
}

static job job_new(long sleep)
{
    return (job){.sleep_ms = sleep, .notify_fd = -1};
}

/* ---- stores of the test's own, to freeze ---- */

typedef struct own_store {
    idem_test_server srv;
    char            *url;        /* with short timeouts */
#ifdef IDEM_TEST_HAVE_SQLITE
    sqlite3         *locker;     /* holds the write lock while frozen */
#endif
} own_store;

/* A store whose calls wait timeout_ms (its reply or busy timeout). */
static void own_start_with(own_store *o, unsigned timeout_ms)
{
    memset(o, 0, sizeof *o);
    cr_assert_eq(idem_test_server_start(&o->srv, kind), 0, "cannot start a %s store of the test's own", kind);
    cr_assert(asprintf(&o->url, "%s%c%s=%u", o->srv.url, strchr(o->srv.url, '?') ? '&' : '?',
                       is_sqlite() ? "busy_timeout_ms" : reply_timeout_param(), timeout_ms) > 0);
}

static void own_start(own_store *o)
{
    own_start_with(o, 300);
}

static void own_stop(own_store *o)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (o->locker)
        sqlite3_close(o->locker);
#endif
    free(o->url);
    idem_test_server_stop(&o->srv);
}

/* Has every thread of pid stopped ('T' after "(comm) " in its stat)? A
 * multi-threaded server may still answer for a moment after kill() returns. */
static bool stopped(pid_t pid, long timeout_ms)
{
    for (long waited = 0; waited <= timeout_ms; waited += 5) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
        DIR *d = opendir(path);
        if (!d)
            return false;
        int seen = 0, running = 0;
        for (struct dirent *e; (e = readdir(d)) != NULL;) {
            if (e->d_name[0] == '.')
                continue;
            char file[400], buf[512] = "";
            snprintf(file, sizeof file, "%s/%s/stat", path, e->d_name);
            FILE *f = fopen(file, "r");
            if (f) {
                buf[fread(buf, 1, sizeof buf - 1, f)] = '\0';
                fclose(f);
            }
            const char *paren = strrchr(buf, ')');
            seen++;
            running += !paren || (paren[2] != 'T' && paren[2] != 't');
        }
        closedir(d);
        if (seen && !running)
            return true;
        sleep_ms(5);
    }
    return false;
}

/* Send sig to pid and to its children: PostgreSQL serves each connection
 * from a child of its postmaster, in a session of its own. */
static void signal_server(pid_t pid, int sig)
{
    kill(pid, sig);
    DIR *d = opendir("/proc");
    if (!d)
        return;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] < '1' || e->d_name[0] > '9')
            continue;
        char file[300], buf[512] = "";
        snprintf(file, sizeof file, "/proc/%s/stat", e->d_name);
        FILE *f = fopen(file, "r");
        if (!f)
            continue;
        buf[fread(buf, 1, sizeof buf - 1, f)] = '\0';
        fclose(f);
        const char *paren = strrchr(buf, ')');
        int ppid = 0;
        if (paren && sscanf(paren + 2, "%*c %d", &ppid) == 1 && ppid == pid)
            kill((pid_t)atoi(e->d_name), sig);
    }
    closedir(d);
}

static void freeze(own_store *o)
{
    if (is_sqlite()) {
#ifdef IDEM_TEST_HAVE_SQLITE
        const char *path = o->srv.url + strlen("sqlite://");
        cr_assert_eq(sqlite3_open(path, &o->locker), SQLITE_OK);
        sqlite3_busy_timeout(o->locker, 10000);
        cr_assert_eq(sqlite3_exec(o->locker, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK,
                     "cannot take the write lock: %s", sqlite3_errmsg(o->locker));
#endif
        return;
    }
    for (int i = 0; i < 2; i++)
        if (o->srv.pids[i] > 0) {
            signal_server(o->srv.pids[i], SIGSTOP);
            cr_assert(stopped(o->srv.pids[i], 5000), "the %s server did not stop", kind);
            if (is_postgresql())
                sleep_ms(100);
        }
}

static void thaw(own_store *o)
{
    if (is_sqlite()) {
#ifdef IDEM_TEST_HAVE_SQLITE
        sqlite3_exec(o->locker, "ROLLBACK", NULL, NULL, NULL);
        sqlite3_close(o->locker);
        o->locker = NULL;
#endif
        return;
    }
    for (int i = 0; i < 2; i++)
        if (o->srv.pids[i] > 0)
            signal_server(o->srv.pids[i], SIGCONT);
}

/* The store URL with every host:port replaced by a proxy in front of it. */
static char *proxied_url(const char *url, idem_proxy **proxies, int *nproxies, const char *params)
{
    const char *p = strstr(url, "://");
    cr_assert_not_null(p);
    p += 3;
    char *out;
    size_t cap = strlen(url) + 256;
    out = malloc(cap);
    cr_assert_not_null(out);
    const char *at = strchr(p, '@'), *end = p + strcspn(p, "/?");
    if (at && at < end)
        p = at + 1; /* user[:password]@ stays as it is */
    size_t n = (size_t)(p - url);
    memcpy(out, url, n);
    *nproxies = 0;
    while (*p && *p != '/' && *p != '?') {
        const char *colon = strchr(p, ':');
        cr_assert_not_null(colon);
        unsigned port = (unsigned)strtoul(colon + 1, (char **)&p, 10);
        cr_assert_eq(idem_proxy_start(&proxies[*nproxies], (uint16_t)port), 0);
        n += (size_t)snprintf(out + n, cap - n, "%s127.0.0.1:%u", *nproxies ? "," : "",
                              idem_proxy_port(proxies[*nproxies]));
        (*nproxies)++;
        if (*p == ',')
            p++;
    }
    snprintf(out + n, cap - n, "%s%c%s", p, strchr(p, '?') ? '&' : '?', params);
    return out;
}

/* ---- a late claim never runs its handler ---- */

typedef struct late_run {
    idem_layer *layer;
    const char *key;
    job        *job;
    int         rc;
    idem_outcome outcome;
} late_run;

static void *run_late(void *arg)
{
    late_run *x = arg;
    idem_request req = req_str(x->key);
    idem_reply r = {0};
    x->rc = idem_run(x->layer, &req, job_handler, x->job, &r);
    x->outcome = r.outcome;
    idem_reply_clear(&r);
    return NULL;
}

/* A's claim reply is held (mode, delay_ms) while B claims, runs and commits:
 * A's handler must not run, then or ever. */
static void late_reply_case(idem_proxy_mode mode, uint32_t delay_ms, uint32_t lease_ms, const char *params)
{
    /* memcached spreads keys by server address, and a proxy's port is
     * another address: A (through the proxy) and B (direct) use the first
     * server alone, so that they agree where the key lives */
    char url[512];
    snprintf(url, sizeof url, "%s", getenv("IDEM_TEST_URL"));
    char *comma = strchr(url, ',');
    if (comma)
        *comma = '\0';
    idem_proxy *proxies[2];
    int np;
    char *slow_url = proxied_url(url, proxies, &np, params);
    idem_store *slow = open_store(slow_url);
    idem_store *fast = open_store(url);
    idem_options o = options(lease_ms);
    idem_layer *la = open_layer(slow, &o), *lb = open_layer(fast, &o);
    char key[32];
    snprintf(key, sizeof key, "late-%d", (int)mode);

    /* warm the proxied connection up, so only the claim is slow */
    idem_request warm = req_str("warm");
    job w = job_new(0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(la, &warm, job_handler, &w, &r), IDEM_OK, "%s", idem_last_error());
    for (int i = 0; i < np; i++)
        idem_proxy_set(proxies[i], mode, delay_ms);

    job ja = job_new(0), jb = job_new(0);
    late_run a = {.layer = la, .key = key, .job = &ja};
    pthread_t t;
    long t0 = mono_ms();
    pthread_create(&t, NULL, run_late, &a);
    sleep_ms((long)lease_ms + expiry_slack_ms()); /* A's lease is over by the store's clock */
    idem_request req = req_str(key);
    cr_assert_eq(idem_run(lb, &req, job_handler, &jb, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "B found the key %d, though A's lease ended", r.outcome);
    long b_committed = mono_ms();
    /* now let A's reply through: it comes back after B's commit */
    for (int i = 0; i < np; i++)
        idem_proxy_set(proxies[i], IDEM_PROXY_PASS, 0);
    pthread_join(t, NULL);
    long a_done = mono_ms();
    cr_assert(a_done - t0 > (long)lease_ms, "the proxy did not slow A's claim down (%ld ms)", a_done - t0);
    cr_assert_eq(atomic_load(&ja.calls), 0,
                 "A's handler ran %ld ms after B's commit, on a claim answered after its lease",
                 ja.started - b_committed);
    cr_assert_eq(a.rc, IDEM_EBACKEND, "A: %s", idem_error_name(a.rc));
    /* and the key keeps B's response */
    job again = job_new(0);
    cr_assert_eq(idem_run(la, &req, job_handler, &again, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&again.calls), 0);
    idem_reply_clear(&r);
    idem_layer_free(la);
    idem_layer_free(lb);
    idem_store_close(slow);
    idem_store_close(fast);
    for (int i = 0; i < np; i++)
        idem_proxy_stop(proxies[i]);
    free(slow_url);
}

Test(leases, claim_reply_held_past_the_lease_never_runs_the_handler)
{
    NEEDS_A_WIRE();
    /* lease 300 ms, per-read timeout 8000 ms: the claim's reply is held
     * until another request has claimed, run and committed the key */
    char params[64];
    snprintf(params, sizeof params, "%s=8000", reply_timeout_param());
    late_reply_case(IDEM_PROXY_DELAY, 6000, 300, params);
}

Test(leases, claim_reply_trickled_under_the_read_timeout_never_runs_the_handler)
{
    NEEDS_A_WIRE();
    /* lease 400 ms above timeout_ms=300: one byte every 150 ms never trips
     * a per-read timeout, and the reply takes longer than the lease */
    char params[64];
    snprintf(params, sizeof params, "%s=300", reply_timeout_param());
    late_reply_case(IDEM_PROXY_TRICKLE, 150, 400, params);
}

#ifdef IDEM_TEST_HAVE_SQLITE
static atomic_int lock_held;

static void *hold_write_lock(void *arg)
{
    const char *path = arg;
    sqlite3 *db;
    if (sqlite3_open(path, &db) != SQLITE_OK || sqlite3_busy_timeout(db, 10000) != SQLITE_OK ||
        sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        atomic_store(&lock_held, -1);
        return NULL;
    }
    atomic_store(&lock_held, 1);
    sleep_ms(1000);
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    sqlite3_close(db);
    return NULL;
}
#endif

typedef struct overlap {
    atomic_int running, most;
} overlap;

static overlap ov;

static void count_overlap(void)
{
    int now = atomic_fetch_add(&ov.running, 1) + 1;
    int most = atomic_load(&ov.most);
    while (now > most && !atomic_compare_exchange_weak(&ov.most, &most, now))
        ;
    sleep_ms(200);
    atomic_fetch_sub(&ov.running, 1);
}

Test(leases, sqlite_claim_behind_a_held_write_lock_never_runs_two_handlers_at_once)
{
    NOT_APPLICABLE_IF(!is_sqlite(), "only SQLite has a write lock another connection can hold");
#ifdef IDEM_TEST_HAVE_SQLITE
    /* a file of its own: holding the write lock of the shared one would
     * stall the other tests' renewals */
    own_store own;
    own_start(&own);
    const char *url = own.srv.url;
    idem_store *s = open_store(url);
    idem_options o = options(300);
    idem_layer *l = open_layer(s, &o);
    /* another connection holds the write lock for 1000 ms; two requests for
     * one key wait behind it with a 300 ms lease */
    pthread_t locker;
    pthread_create(&locker, NULL, hold_write_lock, (void *)(url + strlen("sqlite://")));
    while (atomic_load(&lock_held) == 0)
        sleep_ms(5);
    cr_assert_eq(atomic_load(&lock_held), 1, "the test could not take the write lock");
    job j1 = job_new(0), j2 = job_new(0);
    j1.inside = j2.inside = count_overlap;
    late_run a = {.layer = l, .key = "locked", .job = &j1}, b = {.layer = l, .key = "locked", .job = &j2};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, run_late, &a);
    sleep_ms(50);
    pthread_create(&tb, NULL, run_late, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    pthread_join(locker, NULL);
    cr_assert_leq(atomic_load(&ov.most), 1, "two handlers for one key ran at the same moment");
    cr_assert_eq(atomic_load(&j1.calls), 0, "a claim answered after its lease ran its handler");
    cr_assert_eq(atomic_load(&j2.calls), 0, "a claim answered after its lease ran its handler");
    /* each was given up, or (queued behind the other) found its claim */
    cr_assert(a.rc == IDEM_EBACKEND || (a.rc == IDEM_OK && a.outcome == IDEM_IN_PROGRESS), "A: %s %d",
              idem_error_name(a.rc), a.outcome);
    cr_assert(b.rc == IDEM_EBACKEND || (b.rc == IDEM_OK && b.outcome == IDEM_IN_PROGRESS), "B: %s %d",
              idem_error_name(b.rc), b.outcome);
    /* given up: the key runs at once now */
    job j3 = job_new(0);
    idem_request req = req_str("locked");
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j3, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    own_stop(&own);
#endif
}

/* ---- 64 threads, hot keys, zero-time handlers ---- */

#define HOT_THREADS 64
#define HOT_KEYS    200
#define HOT_LEASE   2000

typedef struct hot {
    idem_layer *layer;
    atomic_int *runs;            /* per key: handler runs */
    atomic_int *lost;            /* per key: runs whose commit came back IDEM_ELOST */
    pthread_barrier_t *go;
    int         group;
    int         backend_errors;
    int         other;
    int         late;            /* handlers started more than a lease after their call */
} hot;

typedef struct hot_call {
    atomic_int *runs;
    long        called;
    int        *late;
} hot_call;

static int zero_time(void *arg, idem_response *resp)
{
    hot_call *c = arg;
    if (mono_ms() - c->called > HOT_LEASE)
        (*c->late)++;
    atomic_fetch_add(c->runs, 1);
    return idem_response_set(resp, 200, "z", 1) == IDEM_OK ? 0 : 1;
}

static void *hot_thread(void *arg)
{
    hot *h = arg;
    pthread_barrier_wait(h->go);
    /* eight groups of eight threads, each group on other keys at a time, so
     * that claims also queue for the store's write lock */
    for (int i = 0; i < HOT_KEYS; i++) {
        int k = (i + h->group * (HOT_KEYS / 8)) % HOT_KEYS;
        char key[16];
        snprintf(key, sizeof key, "hot%d", k);
        idem_request req = req_str(key);
        idem_reply r = {0};
        hot_call call = {.runs = &h->runs[k], .called = mono_ms(), .late = &h->late};
        int rc = idem_run(h->layer, &req, zero_time, &call, &r);
        if (rc == IDEM_EBACKEND)
            h->backend_errors++;
        else if (rc == IDEM_ELOST)
            atomic_fetch_add(&h->lost[k], 1);
        else if (rc != IDEM_OK)
            h->other++;
        idem_reply_clear(&r);
    }
    return NULL;
}

/* A zero-time handler never starts after its claim's lease, and never runs
 * twice, but for one limit docs/operating.md states: a run whose commit waited on
 * the store past its lease comes back IDEM_ELOST, and then a retry runs. */
Test(leases, sixty_four_threads_on_hot_keys_run_each_zero_time_handler_once)
{
    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    idem_options o = options(HOT_LEASE);
    idem_layer *l = open_layer(s, &o);
    atomic_int runs[HOT_KEYS] = {0}, lost[HOT_KEYS] = {0};
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, HOT_THREADS);
    hot h[HOT_THREADS];
    pthread_t t[HOT_THREADS];
    for (int i = 0; i < HOT_THREADS; i++) {
        h[i] = (hot){.layer = l, .runs = runs, .lost = lost, .go = &go, .group = i % 8};
        pthread_create(&t[i], NULL, hot_thread, &h[i]);
    }
    int errors = 0, other = 0, late = 0;
    for (int i = 0; i < HOT_THREADS; i++) {
        pthread_join(t[i], NULL);
        errors += h[i].backend_errors;
        other += h[i].other;
        late += h[i].late;
    }
    pthread_barrier_destroy(&go);
    int ran = 0, twice_after_a_slow_commit = 0;
    for (int k = 0; k < HOT_KEYS; k++) {
        int n = atomic_load(&runs[k]), nl = atomic_load(&lost[k]);
        cr_assert_leq(n - nl, 1, "key hot%d: its handler ran %d times, and only %d of the runs came back "
                      "IDEM_ELOST", k, n, nl);
        twice_after_a_slow_commit += n > 1;
        ran += n > 0;
    }
    cr_assert_eq(late, 0, "%d handlers started more than a lease after their call", late);
    cr_assert_eq(other, 0, "calls failed with other errors than a store error or IDEM_ELOST");
    cr_assert_geq(ran, HOT_KEYS / 2, "only %d of %d keys ran (%d store errors): the test proved little",
                  ran, HOT_KEYS, errors);
    cr_log_info("%d keys ran, %d of them twice after a commit that waited past its lease; %d store errors "
                "(claims given up) among %d calls", ran, twice_after_a_slow_commit, errors,
                HOT_THREADS * HOT_KEYS);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- auto_extend across processes, SIGKILL and SIGSTOP ---- */

/* A child process runs key with auto_extend and a handler of handler_ms,
 * counting charges in shared memory; it writes a byte to notify when the
 * handler starts, and its idem_run code and outcome to result. */
static pid_t spawn_charger(const char *key, uint32_t lease_ms, long handler_ms, atomic_int *charges,
                           int notify, int result)
{
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid)
        return pid;
    /* A test that fails while this child is stopped must not leave it
     * stopped forever, holding the runner's output pipe open. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    idem_store *s;
    idem_layer *l;
    idem_options o = options(lease_ms);
    o.auto_extend = true;
    int out[2] = {-100, 0};
    if (idem_store_open(&s, getenv("IDEM_TEST_URL")) == IDEM_OK && idem_layer_new(&l, s, &o) == IDEM_OK) {
        job j = job_new(handler_ms);
        j.shared_calls = charges;
        j.notify_fd = notify;
        idem_request req = req_str(key);
        idem_reply r = {0};
        out[0] = idem_run(l, &req, job_handler, &j, &r);
        out[1] = r.outcome;
        idem_reply_clear(&r);
        idem_layer_free(l);
        idem_store_close(s);
    }
    (void)!write(result, out, sizeof out);
    _exit(0);
}

static bool wait_byte(int fd, long ms)
{
    struct timespec ts = {0, 10000000};
    for (long waited = 0; waited < ms; waited += 10) {
        char c;
        if (read(fd, &c, 1) == 1)
            return true;
        nanosleep(&ts, NULL);
    }
    return false;
}

static atomic_int *shared_counter(void)
{
    atomic_int *c = mmap(NULL, sizeof *c, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(c, MAP_FAILED);
    atomic_init(c, 0);
    return c;
}

static void nonblocking_pipe(int fds[2])
{
    cr_assert_eq(pipe2(fds, O_NONBLOCK), 0);
}

Test(leases, auto_extend_keeps_a_slow_handlers_key_from_a_retry_in_another_process)
{
    NEEDS_PROCESSES();
    /* the steps of a double charge without renewal: lease L, a handler of
     * 3 L, a retry from another process at 1.5 L */
    const uint32_t lease = is_memcached() ? 2000 : 1000;
    atomic_int *charges = shared_counter();
    int notify[2], result[2];
    nonblocking_pipe(notify);
    cr_assert_eq(pipe(result), 0);
    pid_t child = spawn_charger("slow-charge", lease, 3 * lease, charges, notify[1], result[1]);
    cr_assert(wait_byte(notify[0], 10000), "the child's handler did not start");
    long started = mono_ms();

    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    idem_options o = options(lease);
    idem_layer *l = open_layer(s, &o);
    idem_request req = req_str("slow-charge");
    job retry = job_new(0);
    retry.shared_calls = charges;
    idem_reply r = {0};
    for (long at = lease * 3 / 2; mono_ms() - started < 3 * (long)lease - 100; at += lease / 2) {
        sleep_ms(at - (mono_ms() - started) > 0 ? at - (mono_ms() - started) : 0);
        if (mono_ms() - started >= 3 * (long)lease - 100)
            break;
        cr_assert_eq(idem_run(l, &req, job_handler, &retry, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_eq(r.outcome, IDEM_IN_PROGRESS, "a retry at %ld ms of a %u ms lease got outcome %d",
                     mono_ms() - started, lease, r.outcome);
        cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms <= lease, "retry_after_ms %u", r.retry_after_ms);
    }
    int out[2];
    cr_assert_eq(read(result[0], out, sizeof out), (ssize_t)sizeof out);
    waitpid(child, NULL, 0);
    cr_assert_eq(out[0], IDEM_OK, "the slow handler's own run: %s", idem_error_name(out[0]));
    cr_assert_eq(out[1], IDEM_EXECUTED);
    cr_assert_eq(idem_run(l, &req, job_handler, &retry, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(atomic_load(charges), 1, "charged %d times", atomic_load(charges));
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(leases, sigkill_of_an_auto_extending_process_still_frees_the_key_after_one_lease)
{
    NEEDS_PROCESSES();
    const uint32_t lease = is_memcached() ? 2000 : 1000;
    atomic_int *charges = shared_counter();
    int notify[2], result[2];
    nonblocking_pipe(notify);
    cr_assert_eq(pipe(result), 0);
    pid_t child = spawn_charger("killed", lease, 60000, charges, notify[1], result[1]);
    cr_assert(wait_byte(notify[0], 10000), "the child's handler did not start");
    sleep_ms(lease); /* a renewal or two has happened */
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    long killed = mono_ms();

    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    idem_options o = options(lease);
    idem_layer *l = open_layer(s, &o);
    idem_request req = req_str("killed");
    job j = job_new(0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS, "the key was free right after the kill (%d)", r.outcome);
    long freed = 0;
    while (mono_ms() - killed < (long)lease + expiry_slack_ms() + 2000) {
        cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
        if (r.outcome == IDEM_EXECUTED) {
            freed = mono_ms() - killed;
            break;
        }
        sleep_ms(50);
    }
    cr_assert(freed > 0, "the key of a killed process was not freed within a lease (%u ms) and slack", lease);
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(leases, sigstop_past_the_lease_still_ends_in_elost_with_auto_extend)
{
    NEEDS_PROCESSES();
    const uint32_t lease = is_memcached() ? 2000 : 1000;
    atomic_int *charges = shared_counter();
    int notify[2], result[2];
    nonblocking_pipe(notify);
    cr_assert_eq(pipe(result), 0);
    pid_t child = spawn_charger("stopped", lease, 2 * lease, charges, notify[1], result[1]);
    cr_assert(wait_byte(notify[0], 10000), "the child's handler did not start");
    kill(child, SIGSTOP);
    sleep_ms((long)lease + expiry_slack_ms());

    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    idem_options o = options(10000);
    idem_layer *l = open_layer(s, &o);
    idem_request req = req_str("stopped");
    job j = job_new(0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the stopped process still held the key (%d)", r.outcome);
    kill(child, SIGCONT);
    int out[2];
    cr_assert_eq(read(result[0], out, sizeof out), (ssize_t)sizeof out);
    waitpid(child, NULL, 0);
    cr_assert_eq(out[0], IDEM_ELOST, "the resumed process got %s", idem_error_name(out[0]));
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

typedef struct self_renew {
    uint32_t lease_ms;
    int      rcs[4];
    uint32_t left_before, left_after;
} self_renew;

/* Runs 2.5 leases, renewing its own lease every half lease. */
static int renewing_handler(void *arg, idem_response *resp)
{
    self_renew *x = arg;
    x->left_before = idem_response_lease_left_ms(resp);
    for (int i = 0; i < 4; i++) {
        sleep_ms(x->lease_ms / 2);
        x->rcs[i] = idem_response_extend(resp, 0);
    }
    sleep_ms(x->lease_ms / 2);
    x->left_after = idem_response_lease_left_ms(resp);
    return idem_response_set(resp, 201, "renewed", 7) == IDEM_OK ? 0 : 1;
}

Test(leases, a_handler_renews_its_own_lease_and_sees_what_is_left)
{
    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    self_renew x = {.lease_ms = is_memcached() ? 2000 : 1000};
    idem_options o = options(x.lease_ms);
    idem_layer *l = open_layer(s, &o);
    idem_request req = req_str("renew-self");
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, renewing_handler, &x, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(x.rcs[i], IDEM_OK, "renewal %d: %s", i, idem_error_name(x.rcs[i]));
    cr_assert(x.left_before > x.lease_ms / 2 && x.left_before <= x.lease_ms, "left %u", x.left_before);
    cr_assert(x.left_after > 0, "the lease ran out although it was renewed");
    idem_stats st = stats_of(l);
    cr_assert_eq(st.extended, 4);
    cr_assert_eq(st.lost, 0);
    job dup = job_new(0);
    cr_assert_eq(idem_run(l, &req, job_handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "renewed");
    idem_layer_free(l);
    idem_store_close(s);
    idem_reply_clear(&r);
}

/* ---- a frozen store ---- */

static own_store *frozen_inside; /* the handler freezes this store */

static void freeze_inside(void)
{
    freeze(frozen_inside);
}

/* One attempt against a store frozen after the handler gets only what is
 * left of commit_timeout_ms, not the store's own timeout (2 s here): the
 * call returns within the 50 ms docs/contract.md allows. */
Test(leases, a_commit_against_a_frozen_store_gets_only_the_time_left_of_commit_timeout_ms)
{
    NEEDS_A_FREEZE();
    own_store o;
    own_start_with(&o, 2000);
    idem_store *s = open_store(o.url);
    idem_options opt = options(30000);
    opt.commit_timeout_ms = 300;
    idem_layer *l = open_layer(s, &opt);
    idem_request req = req_str("time-left");
    job j = job_new(0);
    frozen_inside = &o;
    j.inside = freeze_inside;
    idem_reply r = {0};
    int rc = idem_run(l, &req, job_handler, &j, &r);
    long took = mono_ms() - j.ended;
    thaw(&o);
    cr_log_info("%s: the commit took %ld ms with commit_timeout_ms 300 and timeout 2000 ms", kind, took);
    cr_assert_eq(rc, IDEM_EBACKEND, "got %s", idem_error_name(rc));
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the handler's response");
    /* twice the documented slack, for a loaded machine */
    cr_assert(took < 300 + 100, "the commit took %ld ms with commit_timeout_ms 300 and a store "
              "timeout of 2000 ms", took);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    own_stop(&o);
}

Test(leases, commit_timeout_ms_bounds_the_commit_against_a_frozen_store)
{
    NEEDS_A_FREEZE();
    own_store o;
    own_start(&o);
    idem_store *s = open_store(o.url);
    idem_options opt = options(30000);
    opt.commit_timeout_ms = 1000;
    idem_layer *l = open_layer(s, &opt);
    idem_request req = req_str("deadline");
    job j = job_new(0);
    frozen_inside = &o;
    j.inside = freeze_inside;
    idem_reply r = {0};
    long t0 = mono_ms();
    int rc = idem_run(l, &req, job_handler, &j, &r);
    long took = mono_ms() - t0;
    thaw(&o);
    cr_assert_eq(rc, IDEM_EBACKEND, "got %s", idem_error_name(rc));
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the handler's response");
    cr_assert_str_eq((char *)r.body, "done");
    cr_assert(took < 5000, "the commit was retried for %ld ms with commit_timeout_ms 1000 (lease 30 s)", took);
    cr_assert_eq(stats_of(l).unstored, 1);
    /* the key stays claimed, never freed: a retry does not run the handler
     * again (a frozen server may still apply a commit it had queued: then
     * the retry replays it) */
    job dup = job_new(0);
    cr_assert_eq(idem_run(l, &req, job_handler, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert(r.outcome == IDEM_IN_PROGRESS || (r.outcome == IDEM_REPLAYED && strcmp((char *)r.body, "done") == 0),
              "outcome %d after a commit that timed out", r.outcome);
    cr_assert_eq(atomic_load(&dup.calls), 0);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    own_stop(&o);
}

Test(leases, a_claim_that_timed_out_on_a_frozen_store_is_freed_once_it_answers)
{
    NEEDS_A_FREEZE();
    own_store o;
    own_start(&o);
    idem_store *s = open_store(o.url);
    idem_options opt = options(30000);
    idem_layer *l = open_layer(s, &opt);
    idem_request req = req_str("frozen-claim");
    job j = job_new(0);
    idem_reply r = {0};
    /* warm a connection up first: the freeze must catch a request, not a connect */
    idem_request warm = req_str("warm");
    cr_assert_eq(idem_run(l, &warm, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    freeze(&o);
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_EBACKEND);
    cr_assert_eq(atomic_load(&j.calls), 1, "only the warm-up ran");
    sleep_ms(300);
    thaw(&o);
    long thawed = mono_ms();
    if (!is_sqlite()) {
        /* the claim reached the server and lands when it resumes; the layer
         * frees it, fenced by its token, long before the 30 s lease */
        cr_assert(wait_claims_freed(l, 1, 15000), "the timed-out claim was not freed");
    }
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the key stayed blocked after the store came back (%d)",
                 r.outcome);
    cr_assert(mono_ms() - thawed < 20000);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    own_stop(&o);
}

Test(leases, failed_handler_whose_key_could_not_be_freed_says_so_and_the_layer_frees_it_later)
{
    NEEDS_A_FREEZE();
    own_store o;
    own_start(&o);
    idem_store *s = open_store(o.url);
    idem_options opt = options(30000);
    idem_layer *l = open_layer(s, &opt);
    idem_request req = req_str("abort-frozen");
    job j = job_new(0);
    j.fail = 5;
    frozen_inside = &o;
    j.inside = freeze_inside;
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.handler_error, 5);
    cr_assert_eq(r.abort_error, IDEM_EBACKEND, "FAILED must not claim the key was freed (abort_error %d)",
                 r.abort_error);
    thaw(&o);
    /* the layer frees it once the store answers (or a frozen server applies
     * the release it had queued): a retry runs long before the 30 s lease */
    job retry = job_new(0);
    long t0 = mono_ms();
    do {
        cr_assert_eq(idem_run(l, &req, job_handler, &retry, &r), IDEM_OK, "%s", idem_last_error());
        if (r.outcome == IDEM_EXECUTED)
            break;
        cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
        sleep_ms(100);
    } while (mono_ms() - t0 < 15000);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the key stayed blocked after the store came back");
    cr_assert_eq(atomic_load(&retry.calls), 1);
    if (is_sqlite())
        cr_assert_eq(stats_of(l).claims_freed, 1, "the layer freed the key");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    own_stop(&o);
}

/* ---- retry hints ---- */

Test(leases, retry_after_follows_recent_handler_durations_and_stays_within_the_lease)
{
    idem_store *s = open_store(getenv("IDEM_TEST_URL"));
    idem_options o = options(60000);
    idem_layer *l = open_layer(s, &o);
    idem_reply r = {0};
    for (int i = 0; i < 6; i++) {
        char key[16];
        snprintf(key, sizeof key, "quick%d", i);
        idem_request q = req_str(key);
        job j = job_new(20);
        cr_assert_eq(idem_run(l, &q, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    }
    idem_request held = req_str("held");
    idem_claim *c;
    cr_assert_eq(idem_begin(l, &held, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    job dup = job_new(0);
    cr_assert_eq(idem_run(l, &held, job_handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms < 10000,
              "20 ms handlers under a 60 s lease, yet retry_after_ms %u", r.retry_after_ms);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}
