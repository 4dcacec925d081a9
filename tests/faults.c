/*
 * Faults: docs/contract.md sections 2 to 4 and 8 when processes die or stall.
 *
 *   - a worker SIGKILLed inside its handler blocks its key (IN_PROGRESS)
 *     until the lease ends, then exactly one retry executes;
 *   - a worker SIGSTOPped past its lease and resumed gets IDEM_ELOST, and
 *     the response of the request that took the key over stands;
 *   - SQLite: a process SIGKILLed while it holds the write lock, or in the
 *     middle of the driver's own transaction, leaves a store that works;
 *   - Redis, memcached: the server SIGKILLed and restarted: calls in flight
 *     fail cleanly with IDEM_EBACKEND, nothing runs twice while its record
 *     lives, and service resumes;
 *   - passwords from store URLs appear in no message.
 *
 * IDEM_TEST_BACKEND names the kind of store, as for the conformance suite.
 * Tests that need a server process are skipped for sqlite, and the SQLite
 * ones for the others, saying so.
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
#include "support/testutil.h"

/* ---- fixtures ---- */

/* Started in main(). Criterion runs each test in a new process that does
 * not inherit main()'s variables, so main() describes the server in the
 * environment (IDEM_FAULTS_SERVER) and setup() reads it back. A test that
 * restarts a server leaves the new PIDs in a file for the next test and for
 * the final stop. */
static idem_test_server srv;
static const char *kind;
static idem_store *store;
static char prefix[64];

static bool is_sqlite(void) { return strcmp(kind, "sqlite") == 0; }
static bool is_memcached(void) { return strncmp(kind, "memcached", 9) == 0; }

/* memcached counts expiry in whole seconds. */
static long expiry_slack_ms(void) { return is_memcached() ? 2100 : 400; }

static void pids_path(char *out, size_t n)
{
    snprintf(out, n, "%s/faults.pids", srv.dir);
}

/* Topologies of many servers (redis-cluster, redis-sentinel): their
 * PIDs follow on the same line. */
static void write_more_pids(FILE *f)
{
    for (int i = 0; i < srv.nmore; i++)
        fprintf(f, "%ld\n", (long)srv.more_pids[i]);
}

static void read_more_pids(FILE *f)
{
    for (int i = 0; i < srv.nmore; i++) {
        long p;
        if (fscanf(f, "%ld", &p) == 1)
            srv.more_pids[i] = (pid_t)p;
    }
}

static void save_pids(void)
{
    char path[512];
    pids_path(path, sizeof path);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "%ld %ld\n", (long)srv.pids[0], (long)srv.pids[1]);
    write_more_pids(f);
    fclose(f);
}

static void load_pids(void)
{
    char path[512];
    pids_path(path, sizeof path);
    FILE *f = fopen(path, "r");
    long a, b;
    if (f && fscanf(f, "%ld %ld", &a, &b) == 2) {
        srv.pids[0] = (pid_t)a;
        srv.pids[1] = (pid_t)b;
        read_more_pids(f);
    }
    if (f)
        fclose(f);
}

static char *dup_field(char **p)
{
    char *field = strsep(p, "\x1f");
    return field && *field ? strdup(field) : NULL;
}

static void describe_server(void)
{
    char *d;
    if (asprintf(&d, "%s\x1f%s\x1f%s\x1f%s\x1f%u\x1f%u", srv.kind, srv.url, srv.dir,
                 srv.bin ? srv.bin : "", srv.ports[0], srv.ports[1]) < 0)
        exit(1);
    for (int i = 0; i < srv.nmore; i++) {
        char *more;
        if (asprintf(&more, "%s\x1f%u\x1f%u", d, srv.more_ports[i], srv.more_bus_ports[i]) < 0)
            exit(1);
        free(d);
        d = more;
    }
    setenv("IDEM_FAULTS_SERVER", d, 1);
    free(d);
}

static void read_server(void)
{
    const char *d = getenv("IDEM_FAULTS_SERVER");
    cr_assert(d, "IDEM_FAULTS_SERVER is not set; run this through meson test");
    char *copy = strdup(d), *p = copy;
    memset(&srv, 0, sizeof srv);
    srv.kind = dup_field(&p);
    srv.url = dup_field(&p);
    srv.dir = dup_field(&p);
    srv.bin = dup_field(&p);
    char *port0 = dup_field(&p), *port1 = dup_field(&p);
    srv.ports[0] = (uint16_t)atoi(port0 ? port0 : "0");
    srv.ports[1] = (uint16_t)atoi(port1 ? port1 : "0");
    free(port0);
    free(port1);
    for (char *mp; (mp = dup_field(&p)) != NULL && srv.nmore < 8;) {
        char *bus = dup_field(&p);
        srv.more_ports[srv.nmore] = (uint16_t)atoi(mp);
        srv.more_bus_ports[srv.nmore++] = (uint16_t)atoi(bus ? bus : "0");
        free(mp);
        free(bus);
    }
    free(copy);
    kind = srv.kind;
    load_pids();
}

static void setup(void)
{
    read_server();
    /* Sentinels may still be ending a failover an earlier test's kill set
     * off (slowly, under valgrind): the driver then says to retry shortly. */
    int rc;
    for (int waited = 0;; waited += 200) {
        rc = idem_store_open(&store, srv.url);
        if (rc != IDEM_EBACKEND || !strstr(idem_last_error(), "retry shortly") || waited >= 30000)
            break;
        usleep(200000);
    }
    cr_assert_eq(rc, IDEM_OK, "idem_store_open(%s): %s", srv.url, idem_last_error());
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "f%ld-%08x:", (long)getpid(), r);
}

static void teardown(void)
{
    idem_store_close(store);
    store = NULL;
    free(srv.kind);
    free(srv.url);
    free(srv.dir);
    free(srv.bin);
    memset(&srv, 0, sizeof srv);
}

/* Tests run one at a time: some of them kill the one server all share. */
TestSuite(faults, .init = setup, .fini = teardown, .timeout = 60);

static idem_layer *new_layer(idem_store *s, uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = lease_ms;
    idem_layer *l;
    int rc = idem_layer_new(&l, s, &o);
    cr_assert_eq(rc, IDEM_OK, "idem_layer_new: %s", idem_last_error());
    return l;
}

/* ---- handlers ---- */

typedef struct job {
    atomic_int  calls;
    const char *body;
    long        sleep_ms;
    int         notify_fd;   /* a byte is written here when the handler starts; -1: none */
} job;

static int job_handler(void *arg, idem_response *resp)
{
    job *j = arg;
    atomic_fetch_add(&j->calls, 1);
    if (j->notify_fd >= 0)
        (void)!write(j->notify_fd, "h", 1);
    if (j->sleep_ms)
        sleep_ms(j->sleep_ms);
    return idem_response_set(resp, 200, j->body, strlen(j->body)) == IDEM_OK ? 0 : 1;
}

/* Service comes back within this after the store is restarted (valgrind
 * and a loaded machine included; it takes well under a second otherwise). */
#define RESUME_MS 30000

/* Read one byte from fd within timeout_ms; false at once when the writer
 * closed its end without writing. */
static bool wait_byte(int fd, long timeout_ms)
{
    long end = mono_ms() + timeout_ms;
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    char c;
    while (mono_ms() < end) {
        ssize_t n = read(fd, &c, 1);
        if (n == 1)
            return true;
        if (n == 0)
            return false;
        sleep_ms(5);
    }
    return false;
}

/* A child process that opens its own store and runs key through a handler
 * that announces itself on notify and then sleeps sleep_ms. It writes the
 * return code of idem_run, then the outcome, to result. */
static pid_t spawn_runner(const char *key, uint32_t lease_ms, long handler_sleep_ms, int notify, int result,
                          const char *body)
{
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid)
        return pid;
    idem_store *s;
    int out[2] = {-100, 0};
    if (idem_store_open(&s, srv.url) == IDEM_OK) {
        idem_layer *l = new_layer(s, lease_ms);
        job j = {.body = body, .sleep_ms = handler_sleep_ms, .notify_fd = notify};
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

/* ---- a worker SIGKILLed inside its handler ---- */

#define RETRY_THREADS 8

typedef struct racer {
    idem_layer        *layer;
    job               *job;
    pthread_barrier_t *start;
    int                rc;
    idem_outcome       outcome;
} racer;

static void *race(void *arg)
{
    racer *x = arg;
    idem_request req = req_str("killed-in-handler");
    idem_reply r = {0};
    pthread_barrier_wait(x->start);
    x->rc = idem_run(x->layer, &req, job_handler, x->job, &r);
    x->outcome = r.outcome;
    idem_reply_clear(&r);
    return NULL;
}

Test(faults, worker_killed_in_its_handler_blocks_the_key_until_the_lease_ends_then_one_retry_runs)
{
    const uint32_t lease = 1000;
    int notify[2], result[2];
    cr_assert_eq(pipe(notify), 0);
    cr_assert_eq(pipe(result), 0);
    pid_t child = spawn_runner("killed-in-handler", lease, 30000, notify[1], result[1], "never");
    cr_assert(wait_byte(notify[0], 10000), "the child's handler did not start");
    long killed_at = mono_ms();
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);

    idem_layer *l = new_layer(store, lease);
    job j = {.body = "retried", .sleep_ms = 100, .notify_fd = -1};
    idem_request req = req_str("killed-in-handler");
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS, "the dead worker's key must stay blocked, got %d", r.outcome);
    cr_assert(r.retry_after_ms > 0 && r.retry_after_ms <= lease, "retry_after_ms %u", r.retry_after_ms);
    cr_assert_eq(atomic_load(&j.calls), 0);

    /* Blocked until the lease ends, and no longer than that (plus the
     * store's expiry granularity). */
    long freed_at = 0;
    while (mono_ms() - killed_at < (long)lease + expiry_slack_ms() + 1000) {
        idem_claim *c;
        cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
        if (c) {
            freed_at = mono_ms();
            cr_assert_eq(idem_abort(c), IDEM_OK);
            break;
        }
        cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
        sleep_ms(20);
    }
    cr_assert(freed_at, "the key stayed blocked past its lease");
    cr_assert(freed_at - killed_at >= (long)lease - 150, "the key was freed %ld ms after the kill, before "
              "its %u ms lease could end", freed_at - killed_at, lease);

    /* Now the retries race: exactly one executes. */
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, RETRY_THREADS);
    racer x[RETRY_THREADS];
    pthread_t t[RETRY_THREADS];
    for (int i = 0; i < RETRY_THREADS; i++) {
        x[i] = (racer){.layer = l, .job = &j, .start = &start};
        pthread_create(&t[i], NULL, race, &x[i]);
    }
    int executed = 0;
    for (int i = 0; i < RETRY_THREADS; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(x[i].rc, IDEM_OK);
        executed += x[i].outcome == IDEM_EXECUTED;
    }
    pthread_barrier_destroy(&start);
    cr_assert_eq(executed, 1);
    cr_assert_eq(atomic_load(&j.calls), 1);
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "retried");
    idem_reply_clear(&r);
    idem_layer_free(l);
    close(notify[0]);
    close(notify[1]);
    close(result[0]);
    close(result[1]);
}

/* ---- a worker SIGSTOPped past its lease ---- */

Test(faults, worker_stopped_past_its_lease_gets_lost_and_the_new_holders_response_stands)
{
    const uint32_t lease = 800;
    int notify[2], result[2];
    cr_assert_eq(pipe(notify), 0);
    cr_assert_eq(pipe(result), 0);
    pid_t child = spawn_runner("stopped", lease, 300, notify[1], result[1], "stale");
    cr_assert(wait_byte(notify[0], 10000), "the child's handler did not start");
    kill(child, SIGSTOP);
    sleep_ms((long)lease + expiry_slack_ms());

    idem_layer *l = new_layer(store, 10000);
    job j = {.body = "fresh", .notify_fd = -1};
    idem_request req = req_str("stopped");
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the stopped worker's lease is over: the key is free (%d)",
                 r.outcome);

    kill(child, SIGCONT);
    int out[2] = {0, 0};
    cr_assert_eq(read(result[0], out, sizeof out), (ssize_t)sizeof out);
    waitpid(child, NULL, 0);
    cr_assert_eq(out[0], IDEM_ELOST, "the resumed worker's commit must be IDEM_ELOST, got %d", out[0]);
    cr_assert_eq(out[1], IDEM_EXECUTED, "its reply still holds the response it computed");

    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "fresh", "the new holder's response stands");
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    close(notify[0]);
    close(notify[1]);
    close(result[0]);
    close(result[1]);
}

/* ---- SQLite: a process killed with the write lock or mid-transaction ---- */

#ifdef IDEM_TEST_HAVE_SQLITE
static const char *sqlite_path(void)
{
    return srv.url + strlen("sqlite://");
}
#endif

Test(faults, sqlite_process_killed_while_holding_the_write_lock_leaves_a_working_store)
{
#ifndef IDEM_TEST_HAVE_SQLITE
    cr_skip_test("SQLite is not built in");
#else
    if (!is_sqlite())
        cr_skip_test("SQLite only (this run is %s)", kind);
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    pid_t child = fork();
    cr_assert_neq(child, -1);
    if (child == 0) {
        /* Take the write lock and write half a claim of our own. */
        sqlite3 *db;
        if (sqlite3_open(sqlite_path(), &db) != SQLITE_OK ||
            sqlite3_exec(db, "BEGIN IMMEDIATE; INSERT OR REPLACE INTO idem_records (key, token, state, value,"
                             " expires_at) VALUES (CAST('lk:held' AS BLOB), NULL, 'S', x'00', 9e15);",
                         NULL, NULL, NULL) != SQLITE_OK)
            _exit(1);
        (void)!write(ready[1], "r", 1);
        pause();
        _exit(0);
    }
    cr_assert(wait_byte(ready[0], 10000), "the child could not take the write lock");

    /* While it holds the lock: a clean IDEM_EBACKEND once busy_timeout_ms
     * is over, and nothing runs. */
    char *url;
    cr_assert(asprintf(&url, "%s?busy_timeout_ms=300", srv.url) > 0);
    idem_store *s;
    cr_assert_eq(idem_store_open(&s, url), IDEM_OK, "%s", idem_last_error());
    idem_layer *l = new_layer(s, 5000);
    job j = {.body = "after", .notify_fd = -1};
    idem_request req = req_str("while-locked");
    idem_reply r = {0};
    long t0 = mono_ms();
    int rc = idem_run(l, &req, job_handler, &j, &r);
    long took = mono_ms() - t0;
    cr_assert_eq(rc, IDEM_EBACKEND, "a held write lock must give IDEM_EBACKEND, got %s", idem_error_name(rc));
    cr_assert(strstr(idem_last_error(), "busy_timeout_ms"), "message: %s", idem_last_error());
    cr_assert_eq(atomic_load(&j.calls), 0, "nothing runs when the claim fails");
    cr_assert(took < 3000, "the call waited %ld ms with busy_timeout_ms=300", took);

    kill(child, SIGKILL);
    waitpid(child, NULL, 0);

    /* The kernel dropped its locks: the store works and its half-written
     * transaction is gone. */
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_request held = req_str("held");
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = "lk:";
    idem_layer *bare;
    cr_assert_eq(idem_layer_new(&bare, s, &o), IDEM_OK);
    cr_assert_eq(idem_run(bare, &held, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the killed transaction's row must not exist");
    idem_reply_clear(&r);
    idem_layer_free(bare);
    idem_layer_free(l);
    idem_store_close(s);
    free(url);
    close(ready[0]);
    close(ready[1]);
#endif
}

Test(faults, sqlite_processes_killed_at_random_inside_the_driver_leave_a_consistent_store, .timeout = 90)
{
#ifndef IDEM_TEST_HAVE_SQLITE
    cr_skip_test("SQLite is not built in");
#else
    if (!is_sqlite())
        cr_skip_test("SQLite only (this run is %s)", kind);
    /* Children claim, commit and abort as fast as they can; we SIGKILL them
     * at random moments, so some die inside a claim transaction or a
     * commit. Committed responses must survive, and the store must keep
     * working for everybody else. */
    int *done = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(done, MAP_FAILED);
    const int rounds = 25;
    uint32_t seed;
    cr_assert_eq(getrandom(&seed, sizeof seed, 0), (ssize_t)sizeof seed);
    for (int round = 0; round < rounds; round++) {
        pid_t child = fork();
        cr_assert_neq(child, -1);
        if (child == 0) {
            idem_store *s;
            if (idem_store_open(&s, srv.url) != IDEM_OK)
                _exit(1);
            idem_layer *l = new_layer(s, 500);
            for (int i = 0;; i++) {
                char key[32];
                snprintf(key, sizeof key, "churn-%d-%d", round, i);
                idem_request req = req_str(key);
                idem_claim *c;
                idem_reply r = {0};
                if (idem_begin(l, &req, &c, &r) == IDEM_OK && c) {
                    if (i % 3 == 0)
                        idem_abort(c);
                    else if (idem_commit(c, 200, key, strlen(key)) == IDEM_OK)
                        done[round] = i + 1; /* committed up to here */
                }
                idem_reply_clear(&r);
            }
        }
        /* Once it has committed something (slow under valgrind), kill it at
         * a random moment. */
        for (long waited = 0; done[round] == 0 && waited < 5000; waited += 5)
            sleep_ms(5);
        sleep_ms((long)((seed = seed * 1103515245u + 12345u) >> 16) % 60);
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
    idem_layer *l = new_layer(store, 500);
    job j = {.body = "x", .notify_fd = -1};
    idem_reply r = {0};
    int checked = 0;
    for (int round = 0; round < rounds; round++) {
        for (int i = 1; i < done[round]; i++) {
            if (i % 3 == 0)
                continue;
            char key[32];
            snprintf(key, sizeof key, "churn-%d-%d", round, i);
            idem_request req = req_str(key);
            cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());
            cr_assert_eq(r.outcome, IDEM_REPLAYED, "committed key %s is gone after a crash (%d)", key,
                         r.outcome);
            cr_assert_str_eq((char *)r.body, key);
            checked++;
        }
    }
    cr_assert(checked > 0, "no child committed anything before it was killed");
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(sqlite_path(), &db), SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_str_eq((const char *)sqlite3_column_text(st, 0), "ok");
    sqlite3_finalize(st);
    sqlite3_close(db);
    idem_reply_clear(&r);
    idem_layer_free(l);
    munmap(done, 4096);
    cr_log_info("%d committed responses survived %d kills", checked, rounds);
#endif
}

/* ---- the store's server SIGKILLed and restarted ---- */

static void need_server(void)
{
    if (srv.pids[0] <= 0 && srv.nmore == 0)
        cr_skip_test("needs a store with a server process (this run is %s)", kind);
}

/* Every server of the store: with two, a key may live on either. */
static void kill_store(void)
{
    for (int i = 0; i < 2; i++)
        idem_test_server_kill(&srv, i);
    if (srv.nmore)
        idem_test_topology_kill(&srv);
    save_pids();
}

/* A server restarted from inside a test must not inherit the test
 * process's descriptors: Criterion waits for its pipes to close, and would
 * wait for the server. */
static void close_on_exec_all(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        int fd = atoi(e->d_name);
        if (fd > 2 && fd != dirfd(d))
            fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    }
    closedir(d);
}

/* The processes are recorded before any assertion, so that the tests after
 * a failed restart still find (and stop) what it started. */
static void restart_store(void)
{
    close_on_exec_all();
    int failed = -1;
    for (int i = 0; i < 2; i++)
        if (srv.ports[i] && idem_test_server_restart(&srv, i) != 0)
            failed = i;
    int topology = srv.nmore ? idem_test_topology_restart(&srv) : 0;
    save_pids();
    cr_assert_eq(failed, -1, "cannot restart %s server %d", kind, failed);
    cr_assert_eq(topology, 0, "cannot restart the %s servers", kind);
}

Test(faults, store_down_gives_ebackend_at_once_and_service_resumes_after_restart)
{
    need_server();
    idem_layer *l = new_layer(store, 3000);
    job j = {.body = "x", .notify_fd = -1};
    idem_reply r = {0};
    idem_request warm = req_str("warm");
    cr_assert_eq(idem_run(l, &warm, job_handler, &j, &r), IDEM_OK, "%s", idem_last_error());

    kill_store();
    for (int i = 0; i < 3; i++) {
        idem_request req = req_str("while-down");
        long t0 = mono_ms();
        int rc = idem_run(l, &req, job_handler, &j, &r);
        long took = mono_ms() - t0;
        cr_assert_eq(rc, IDEM_EBACKEND, "store down: %s (%s)", idem_error_name(rc), idem_last_error());
        cr_assert(strlen(idem_last_error()) > 0);
        cr_assert(took < 5000, "a call to a dead store took %ld ms", took);
    }
    cr_assert_eq(atomic_load(&j.calls), 1, "nothing runs while the store is down");
    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_geq(st.backend_errors, 3);

    restart_store();
    idem_request req = req_str("while-down");
    int rc = IDEM_EBACKEND;
    for (long end = mono_ms() + RESUME_MS; rc == IDEM_EBACKEND && mono_ms() < end;) {
        rc = idem_run(l, &req, job_handler, &j, &r);
        if (rc == IDEM_EBACKEND)
            sleep_ms(100);
    }
    cr_assert_eq(rc, IDEM_OK, "service did not resume: %s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

/* Kills the store delay_ms after the handler started (it writes to the
 * pipe whose read end is started_fd), and restarts it down_ms later. */
typedef struct killer {
    long delay_ms, down_ms;
    int  started_fd;
    bool killed;
} killer;

static void *kill_and_restart(void *arg)
{
    killer *k = arg;
    if (!wait_byte(k->started_fd, RESUME_MS))
        return NULL; /* the handler never ran: the test says so */
    sleep_ms(k->delay_ms);
    kill_store();
    sleep_ms(k->down_ms);
    restart_store();
    k->killed = true;
    return NULL;
}

Test(faults, store_killed_while_the_handler_runs_never_doubles_the_execution)
{
    need_server();
    /* The handler runs 300 ms; the store dies 100 ms in and comes back
     * 400 ms later, inside the 5 s lease, while the commit is retried. */
    idem_layer *l = new_layer(store, 5000);
    int started[2];
    cr_assert_eq(pipe(started), 0);
    job j = {.body = "once", .sleep_ms = 300, .notify_fd = started[1]};
    idem_request req = req_str("killed-under-handler");
    idem_reply r = {0};
    killer k = {.delay_ms = 100, .down_ms = 400, .started_fd = started[0]};
    pthread_t t;
    pthread_create(&t, NULL, kill_and_restart, &k);
    int rc = idem_run(l, &req, job_handler, &j, &r);
    close(started[1]); /* if the handler never ran, the killer stops waiting */
    pthread_join(t, NULL);
    close(started[0]);
    cr_assert_eq(atomic_load(&j.calls), 1, "the handler did not run: %s (%s)", idem_error_name(rc),
                 idem_last_error());
    cr_assert(k.killed, "the store was not killed under the handler");
    cr_assert(rc == IDEM_OK || rc == IDEM_ELOST || rc == IDEM_EBACKEND,
              "store died under the handler: %s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the handler's response whatever the commit did");
    cr_assert_str_eq((char *)r.body, "once");
    cr_log_info("%s: commit after the store restarted: %s (%s)", kind, idem_error_name(rc),
                rc ? idem_last_error() : "stored");

    /* A retry: the record landed (replay), or the store lost everything in
     * the restart (the key is free: a new record lifetime), or the key stays
     * claimed until the lease ends. Never a second execution while the
     * record lives. */
    job again = {.body = "again", .notify_fd = -1};
    rc = IDEM_EBACKEND;
    for (long end = mono_ms() + RESUME_MS; rc == IDEM_EBACKEND && mono_ms() < end;) {
        rc = idem_run(l, &req, job_handler, &again, &r);
        if (rc == IDEM_EBACKEND)
            sleep_ms(100);
    }
    cr_assert_eq(rc, IDEM_OK, "service did not resume: %s", idem_last_error());
    if (r.outcome == IDEM_REPLAYED)
        cr_assert_str_eq((char *)r.body, "once");
    else
        cr_assert(r.outcome == IDEM_EXECUTED || r.outcome == IDEM_IN_PROGRESS, "outcome %d", r.outcome);
    cr_log_info("%s: retry after the restart: outcome %d", kind, r.outcome);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(faults, claim_from_before_a_store_restart_cannot_commit_over_a_new_claim)
{
    need_server();
    idem_layer *l = new_layer(store, 10000);
    idem_request req = req_str("restart-fence");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(old);
    kill_store();
    restart_store();
    int rc = IDEM_EBACKEND;
    for (long end = mono_ms() + RESUME_MS; rc == IDEM_EBACKEND && mono_ms() < end;) {
        rc = idem_begin(l, &req, &fresh, &r);
        if (rc == IDEM_EBACKEND)
            sleep_ms(100);
    }
    cr_assert_eq(rc, IDEM_OK, "service did not resume: %s", idem_last_error());
    if (!fresh) {
        /* the store kept its records across the restart */
        cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
        cr_assert_eq(idem_commit(old, 200, "old", 3), IDEM_OK, "%s", idem_last_error());
    } else {
        /* the store forgot the old claim: its holder must not overwrite the new one */
        cr_assert_eq(idem_commit(old, 200, "old", 3), IDEM_ELOST, "%s", idem_last_error());
        cr_assert_eq(idem_commit(fresh, 200, "new", 3), IDEM_OK, "%s", idem_last_error());
    }
    job j = {.body = "x", .notify_fd = -1};
    cr_assert_eq(idem_run(l, &req, job_handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, fresh ? "new" : "old");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

/* ---- passwords never appear in messages ---- */

#define SECRET "Pw-s3cr3t-Z9q"

/* Run fn with stderr sent to a file; fail if the password shows up in
 * idem_last_error() or in anything printed. */
static void check_no_password(const char *what, const char *url)
{
    char path[] = "/tmp/idem-faults-stderr-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(fd, 2);
    idem_store *s = NULL;
    int rc = idem_store_open(&s, url);
    char msg[2048];
    snprintf(msg, sizeof msg, "%s", idem_last_error());
    if (rc == IDEM_OK) {
        /* it opened: a request must fail, and say so without the password */
        idem_layer *l = new_layer(s, 1000);
        idem_request req = req_str("pw");
        idem_claim *c = NULL;
        idem_reply r = {0};
        rc = idem_begin(l, &req, &c, &r);
        snprintf(msg, sizeof msg, "%s", idem_last_error());
        if (c)
            idem_abort(c);
        idem_reply_clear(&r);
        idem_layer_free(l);
        idem_store_close(s);
    }
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    char printed[8192] = {0};
    lseek(fd, 0, SEEK_SET);
    ssize_t n = read(fd, printed, sizeof printed - 1);
    close(fd);
    unlink(path);
    cr_log_info("%s: %s: %s", what, idem_error_name(rc), msg);
    cr_assert_neq(rc, IDEM_OK, "%s: the store was not supposed to work", what);
    cr_assert(msg[0], "%s: no message", what);
    cr_assert_null(strstr(msg, SECRET), "%s: the password is in the message: %s", what, msg);
    cr_assert_null(strstr(msg, "s3cr3t"), "%s: part of the password is in the message: %s", what, msg);
    cr_assert(n <= 0 || !strstr(printed, "s3cr3t"), "%s: the password was printed: %s", what, printed);
}

Test(faults, passwords_from_urls_appear_in_no_message)
{
    uint16_t dead = idem_test_free_port();
    char url[512];
    snprintf(url, sizeof url, "redis://:" SECRET "@127.0.0.1:%u/0", dead);
    check_no_password("redis, nobody listening", url);
    snprintf(url, sizeof url, "redis://user:" SECRET "@127.0.0.1:%u", dead);
    check_no_password("redis with a user, nobody listening", url);
    snprintf(url, sizeof url, "redis+unix:///nonexistent/redis.sock?password=" SECRET);
    check_no_password("redis socket that does not exist", url);
    snprintf(url, sizeof url, "memcached://user:" SECRET "@127.0.0.1:%u", dead);
    check_no_password("memcached with a password, nobody listening", url);
    snprintf(url, sizeof url, "sqlite://user:" SECRET "@/tmp/x.db");
    check_no_password("sqlite with a password", url);
    snprintf(url, sizeof url, "nosuch://:" SECRET "@127.0.0.1:1");
    check_no_password("unknown scheme", url);
    snprintf(url, sizeof url, "redis://:" SECRET "@127.0.0.1:99999");
    check_no_password("port out of range", url);
    snprintf(url, sizeof url, "redis://:" SECRET "%%zz@127.0.0.1:1");
    check_no_password("bad escape in the password", url);
    snprintf(url, sizeof url, "redis://:" SECRET "@[::1:6379");
    check_no_password("unclosed IPv6 bracket", url);
    snprintf(url, sizeof url, "redis://:" SECRET "@127.0.0.1:1/0?timeout_ms=abc");
    check_no_password("bad parameter", url);
    snprintf(url, sizeof url, "redis://:" SECRET " @127.0.0.1:1");
    check_no_password("space in the URL", url);
    /* An unescaped '&' splits the password: what follows may be the rest
     * of it, and is no parameter the driver knows. */
    snprintf(url, sizeof url, "redis+unix:///nonexistent/redis.sock?password=Pw-&s3cr3t-Z9q");
    check_no_password("'&' in a redis+unix password", url);
    snprintf(url, sizeof url, "redis+unix:///nonexistent/redis.sock?db=1&password=Pw-&db=2&s3cr3t=Z9q");
    check_no_password("'&' in a redis+unix password, a known parameter between", url);
    snprintf(url, sizeof url, "redis+sentinel://127.0.0.1:%u/mymaster?sentinel_password=Pw-&s3cr3t-Z9q",
             dead);
    check_no_password("'&' in a sentinel password", url);
}

Test(faults, wrong_redis_password_is_refused_without_printing_it)
{
#ifndef IDEM_TEST_HAVE_REDIS
    cr_skip_test("the redis driver is not built in");
#else
    uint16_t port = idem_test_free_port();
    char portarg[16], *dir = idem_test_tmpdir("redis-auth"), log[512];
    snprintf(portarg, sizeof portarg, "%u", port);
    snprintf(log, sizeof log, "%s/redis.log", dir);
    char *argv[] = {"redis-server", "--port", portarg, "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--requirepass", "the-right-one", "--dir", dir, NULL};
    close_on_exec_all();
    pid_t pid = idem_test_spawn(argv, log);
    cr_assert(pid > 0 && idem_test_wait_port(port, 5000), "cannot start redis-server");
    char url[256];
    snprintf(url, sizeof url, "redis://:" SECRET "@127.0.0.1:%u", port);
    check_no_password("redis, wrong password", url);
    snprintf(url, sizeof url, "redis://default:" SECRET "@127.0.0.1:%u", port);
    check_no_password("redis, user and wrong password", url);
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", port);
    idem_store *s = NULL;
    int rc = idem_store_open(&s, url);
    if (rc == IDEM_OK) {
        idem_layer *l = new_layer(s, 1000);
        idem_request req = req_str("pw");
        idem_claim *c = NULL;
        idem_reply r = {0};
        rc = idem_begin(l, &req, &c, &r);
        idem_layer_free(l);
        idem_store_close(s);
    }
    cr_assert_eq(rc, IDEM_EBACKEND, "no password against a server that needs one: %s", idem_error_name(rc));
    idem_test_stop_pid(pid, 3000);
    free(dir);
#endif
}

/* ---- the runner ---- */

/* The test processes kill and restart the servers; a server that is a child
 * of main() would become a zombie main() does not reap, which Criterion's
 * runner does not expect. So main() hands its servers over: it stops them
 * and starts them again from a short-lived helper process, whose children
 * are adopted by init. */
static int detach_servers(void)
{
    if (srv.pids[0] <= 0 && srv.nmore == 0)
        return 0;
    for (int i = 0; i < 2; i++)
        idem_test_server_kill(&srv, i);
    if (srv.nmore) {
        /* the sentinels too: all of them become the helper's */
        for (int i = 0; i < srv.nmore; i++)
            idem_test_server_kill_more(&srv, i);
    }
    pid_t helper = fork();
    if (helper < 0)
        return -1;
    if (helper == 0) {
        for (int i = 0; i < 2; i++)
            if (srv.ports[i] && idem_test_server_restart(&srv, i) != 0)
                _exit(1);
        if (srv.nmore && idem_test_topology_start_again(&srv) != 0)
            _exit(1);
        char path[512];
        pids_path(path, sizeof path);
        FILE *f = fopen(path, "w");
        if (!f)
            _exit(1);
        fprintf(f, "%ld %ld\n", (long)srv.pids[0], (long)srv.pids[1]);
        write_more_pids(f);
        fclose(f);
        _exit(0);
    }
    int st;
    if (waitpid(helper, &st, 0) != helper || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        return -1;
    load_pids();
    return 0;
}

/* Stop servers that are not our children (see detach_servers()). */
static void stop_detached(void)
{
    load_pids();
    for (int i = 0; i < 2 + srv.nmore; i++) {
        pid_t *pid = i < 2 ? &srv.pids[i] : &srv.more_pids[i - 2];
        if (*pid <= 0)
            continue;
        kill(*pid, SIGKILL);
        for (int waited = 0; waited < 3000 && kill(*pid, 0) == 0; waited += 10)
            sleep_ms(10);
        *pid = 0;
    }
}

int main(int argc, char *argv[])
{
    kind = getenv("IDEM_TEST_BACKEND");
    if (!kind)
        kind = "sqlite";
    if (idem_test_server_start(&srv, kind) != 0) {
        fprintf(stderr, "faults: cannot start a %s store for the tests\n", kind);
        return 1;
    }
    char path[512];
    pids_path(path, sizeof path);
    FILE *pf = fopen(path, "w");
    if (pf) {
        fprintf(pf, "%ld %ld\n", (long)srv.pids[0], (long)srv.pids[1]);
        write_more_pids(pf);
        fclose(pf);
    }
    if (detach_servers() != 0) {
        fprintf(stderr, "faults: cannot restart the %s servers\n", kind);
        idem_test_server_stop(&srv);
        return 1;
    }
    fprintf(stderr, "faults: testing %s at %s\n", kind, srv.url);
    describe_server();
    struct criterion_test_set *tests = criterion_initialize();
    int result = 1;
    /* One test at a time: several of them kill the server all tests share. */
    criterion_options.jobs = 1;
    if (criterion_handle_args(argc, argv, true))
        result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    stop_detached();
    idem_test_server_stop(&srv);
    return result;
}
