/* The PostgreSQL driver against real servers: restarts under load, timeouts,
 * passwords, tables that are not ours, read-only servers, unix sockets,
 * isolation levels, clean-up. The behaviour every driver shares is in
 * conformance.c; the contract is in include/idempotency/backend.h and the
 * driver's README (backends/postgresql/README.md). */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <libpq-fe.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "harness.h"
#include "internal.h"
#include "postgres_server.h"
#include "support/testutil.h"

#define SECRET "Pg-s3cr3t-Q7x"

static idem_test_server srv;

static void start(void)
{
    memset(&srv, 0, sizeof srv);
}

static void stop(void)
{
    idem_test_server_stop(&srv);
}

TestSuite(postgresql, .init = start, .fini = stop, .timeout = 120);

/* ---- helpers ---- */

/* A server of our own for this test, with options. */
static void server(const idem_test_pg_options *opts)
{
    memset(&srv, 0, sizeof srv);
    srv.kind = strdup("postgresql");
    srv.dir = idem_test_tmpdir("pgtest");
    cr_assert(srv.kind && srv.dir);
    cr_assert_eq(idem_test_start_postgres_with(&srv, opts), 0, "postgres must start for these tests");
}

/* A plain libpq connection over the socket, to look behind the driver. */
static PGconn *raw(void)
{
    char port[8];
    snprintf(port, sizeof port, "%u", srv.ports[0]);
    const char *kw[] = {"host", "port", "user", "dbname", NULL};
    const char *val[] = {srv.dir, port, "postgres", "postgres", NULL};
    PGconn *c = PQconnectdbParams(kw, val, 0);
    cr_assert(c && PQstatus(c) == CONNECTION_OK, "raw connection: %s", c ? PQerrorMessage(c) : "no memory");
    return c;
}

static void raw_exec(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    cr_assert(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    PQclear(r);
}

static long raw_long(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    long v = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

static idem_store *open_ok(const char *url)
{
    idem_store *s = NULL;
    int rc = idem_store_open(&s, url);
    cr_assert_eq(rc, IDEM_OK, "idem_store_open(%s): %s (%s)", url, idem_error_name(rc), idem_last_error());
    return s;
}

static idem_layer *layer_of(idem_store *s, uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = lease_ms;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, &o), IDEM_OK, "%s", idem_last_error());
    return l;
}

typedef struct job {
    atomic_int calls;
    int        sleep_ms;
} job;

static int handler(void *arg, idem_response *resp)
{
    job *j = arg;
    atomic_fetch_add(&j->calls, 1);
    if (j->sleep_ms)
        sleep_ms(j->sleep_ms);
    return idem_response_set(resp, 201, "charged", 7) == IDEM_OK ? 0 : 1;
}

static void assert_no_secret(const char *what)
{
    cr_assert_null(strstr(idem_last_error(), SECRET), "%s: the message shows the password: %s", what,
                   idem_last_error());
}

/* ---- URLs and opening ---- */

Test(postgresql, both_schemes_open_the_driver_and_the_table_is_made_once_and_marked)
{
    server(NULL);
    idem_store *a = open_ok(srv.url);
    cr_assert_str_eq(idem_store_backend(a), "postgresql");
    char alias[512];
    snprintf(alias, sizeof alias, "postgres://%s", srv.url + strlen("postgresql://"));
    idem_store *b = open_ok(alias);
    cr_assert_str_eq(idem_store_backend(b), "postgresql");
    PGconn *c = raw();
    cr_assert_eq(raw_long(c, "SELECT count(*) FROM pg_class WHERE relname = 'idempotency_keys'"), 1);
    PGresult *r = PQexec(c, "SELECT obj_description('idempotency_keys'::regclass, 'pg_class')");
    cr_assert_str_eq(PQgetvalue(r, 0, 0), "libidempotency records, schema version 1");
    PQclear(r);
    PQfinish(c);
    idem_store_close(a);
    idem_store_close(b);
}

Test(postgresql, stores_opening_at_once_make_the_table_once)
{
    server(NULL);
    enum { ROUNDS = 8, N = 8 };
    for (int round = 0; round < ROUNDS; round++) {
        pid_t pids[N];
        char url[600];
        snprintf(url, sizeof url, "%s?table=made_at_once_%d", srv.url, round);
        for (int i = 0; i < N; i++) {
            pids[i] = fork();
            if (pids[i] == 0) {
                idem_store *s;
                _exit(idem_store_open(&s, url) == IDEM_OK ? 0 : (fprintf(stderr, "%s\n", idem_last_error()), 1));
            }
        }
        int failed = -1;
        for (int i = 0; i < N; i++) {
            int st;
            waitpid(pids[i], &st, 0);
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                failed = i;
        }
        cr_assert_eq(failed, -1, "round %d: opener %d failed", round, failed);
        /* made once: one table, its two indexes (a second CREATE INDEX would add one), marked */
        PGconn *c = raw();
        char sql[256];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_class WHERE relname = 'made_at_once_%d'", round);
        cr_assert_eq(raw_long(c, sql), 1);
        snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_index WHERE indrelid = 'made_at_once_%d'::regclass",
                 round);
        cr_assert_eq(raw_long(c, sql), 2, "the primary key and expires_at, each once");
        snprintf(sql, sizeof sql, "SELECT obj_description('made_at_once_%d'::regclass, 'pg_class')", round);
        PGresult *r = PQexec(c, sql);
        cr_assert_str_eq(PQgetvalue(r, 0, 0), "libidempotency records, schema version 1");
        PQclear(r);
        PQfinish(c);
    }
}

/* A store opens while another is making the table: it waits for the other's
 * advisory lock, and then finds the table made, so a user with no right to
 * create tables opens it too (it is never asked to create one). */
Test(postgresql, a_user_who_may_not_create_tables_opens_one_being_made)
{
    server(NULL);
    PGconn *c = raw();
    raw_exec(c, "CREATE ROLE clerk LOGIN");
    raw_exec(c, "BEGIN");
    raw_exec(c, "SELECT pg_advisory_xact_lock(hashtext('libidempotency'), hashtext('\"being_made\"'))");
    raw_exec(c, "CREATE TABLE being_made (key bytea PRIMARY KEY, token bytea, state text, "
                "value bytea NOT NULL, expires_at timestamptz NOT NULL)");
    raw_exec(c, "CREATE INDEX ON being_made (expires_at)");
    raw_exec(c, "COMMENT ON TABLE being_made IS 'libidempotency records, schema version 1'");
    raw_exec(c, "GRANT SELECT, INSERT, UPDATE, DELETE ON being_made TO clerk");
    char url[600];
    snprintf(url, sizeof url, "postgresql://clerk@127.0.0.1:%u/postgres?table=being_made", srv.ports[0]);
    pid_t pid = fork();
    if (pid == 0) {
        idem_store *st;
        _exit(idem_store_open(&st, url) == IDEM_OK ? 0 : (fprintf(stderr, "%s\n", idem_last_error()), 1));
    }
    /* the opener waits on the lock (pg_locks shows it) before the table is committed */
    uint64_t t0 = mono_ms();
    while (raw_long(c, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 0) {
        cr_assert(mono_ms() - t0 < 10000, "the opener never waited for the lock");
        sleep_ms(20);
    }
    raw_exec(c, "COMMIT");
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the clerk's store did not open");
    PQfinish(c);
}

Test(postgresql, a_table_of_that_name_that_is_not_ours_is_refused)
{
    server(NULL);
    PGconn *c = raw();
    raw_exec(c, "CREATE TABLE orders (id int PRIMARY KEY, amount int)");
    raw_exec(c, "CREATE TABLE future (key bytea PRIMARY KEY); "
                "COMMENT ON TABLE future IS 'libidempotency records, schema version 9'");
    char url[600];
    snprintf(url, sizeof url, "%s?table=orders", srv.url);
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "not one libidempotency made") &&
              strstr(idem_last_error(), "table="), "%s", idem_last_error());
    cr_assert_eq(raw_long(c, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders'"),
                 2, "the foreign table is left alone");
    snprintf(url, sizeof url, "%s?table=future", srv.url);
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "version 9"), "%s", idem_last_error());
    PQfinish(c);
}

Test(postgresql, table_names_and_parameters_are_checked)
{
    static const char *const bad[] = {
        "?table=Orders", "?table=1abc", "?table=a;drop", "?table=a.b.c", "?table=%22x%22", "?table=",
        "?nosuch=1", "?statement_timeout_ms=0", "?connect_timeout_ms=x",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char url[256];
        snprintf(url, sizeof url, "postgresql://u:" SECRET "@127.0.0.1:1/db%s", bad[i]);
        idem_store *s = NULL;
        cr_assert_eq(idem_store_open(&s, url), IDEM_EINVAL, "%s", bad[i]);
        cr_assert(strlen(idem_last_error()) > 0);
        assert_no_secret(bad[i]);
    }
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, "postgresql://127.0.0.1:1/db?host=/tmp"), IDEM_EINVAL);
    cr_assert_eq(idem_store_open(&s, "postgresql://127.0.0.1:1/a/b"), IDEM_EINVAL);
}

/* A table in pg_temp lives in one connection only, while the store keeps a
 * pool of them (and every process its own): no two requests would share
 * their records. Any other pg_ schema is the system's. Both are refused by
 * name, before anything is sent, and the message says why. */
Test(postgresql, a_temporary_or_system_schema_table_is_refused_with_why)
{
    server(NULL);
    static const char *const temp[] = {"pg_temp.keys", "pg_temp_3.keys", "pg_toast_temp_3.keys"};
    for (size_t i = 0; i < sizeof temp / sizeof temp[0]; i++) {
        char url[600];
        snprintf(url, sizeof url, "%s?table=%s", srv.url, temp[i]);
        idem_store *s = NULL;
        int rc = idem_store_open(&s, url);
        if (rc == IDEM_OK)
            idem_store_close(s);
        cr_assert_eq(rc, IDEM_EINVAL, "table=%s: %s: %s", temp[i], idem_error_name(rc), idem_last_error());
        cr_assert(strstr(idem_last_error(), "temporary") && strstr(idem_last_error(), "connection"),
                  "table=%s: the message does not say why: %s", temp[i], idem_last_error());
    }
    static const char *const system[] = {"pg_catalog.keys", "pg_toast.keys", "information_schema.keys"};
    for (size_t i = 0; i < sizeof system / sizeof system[0]; i++) {
        char url[600];
        snprintf(url, sizeof url, "%s?table=%s", srv.url, system[i]);
        idem_store *s = NULL;
        int rc = idem_store_open(&s, url);
        if (rc == IDEM_OK)
            idem_store_close(s);
        cr_assert_eq(rc, IDEM_EINVAL, "table=%s: %s: %s", system[i], idem_error_name(rc),
                     idem_last_error());
        cr_assert(strstr(idem_last_error(), "system"), "table=%s: the message does not say why: %s",
                  system[i], idem_last_error());
    }
    /* A schema whose name merely contains pg_ is the user's. */
    PGconn *c = raw();
    raw_exec(c, "CREATE SCHEMA app_pg_temp");
    PQfinish(c);
    char url[600];
    snprintf(url, sizeof url, "%s?table=app_pg_temp.keys", srv.url);
    idem_store_close(open_ok(url));
}

Test(postgresql, schema_qualified_table_is_used)
{
    server(NULL);
    PGconn *c = raw();
    raw_exec(c, "CREATE SCHEMA app");
    char url[600];
    snprintf(url, sizeof url, "%s?table=app.keys", srv.url);
    idem_store *s = open_ok(url);
    idem_layer *l = layer_of(s, 5000);
    job j = {0};
    idem_reply r = {0};
    idem_request req = req_str("q1");
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(raw_long(c, "SELECT count(*) FROM app.keys"), 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    PQfinish(c);
}

Test(postgresql, unreachable_port_fails_at_open_with_what_to_do)
{
    char url[128];
    snprintf(url, sizeof url, "postgresql://postgres:" SECRET "@127.0.0.1:%u/postgres", idem_test_free_port());
    idem_store *s = NULL;
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(mono_ms() - t0 < 5000);
    cr_assert(strstr(idem_last_error(), "running"), "%s", idem_last_error());
    assert_no_secret("refused");
}

Test(postgresql, a_role_that_does_not_exist_is_told_how_to_name_or_create_one)
{
    idem_test_pg_options o = {0};
    server(&o);
    char url[128];
    snprintf(url, sizeof url, "postgresql://nobody_here@127.0.0.1:%u/postgres", srv.ports[0]);
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "does not exist"), "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "createuser"), "no hint: %s", idem_last_error());
}

/* ---- passwords ---- */

Test(postgresql, wrong_password_fails_at_open_without_repeating_it)
{
    setenv("PGPASSFILE", "/nonexistent", 1);
    idem_test_pg_options o = {.password = "right-" SECRET};
    server(&o);
    idem_store *s = open_ok(srv.url); /* the right one */
    idem_store_close(s);
    char url[600];
    snprintf(url, sizeof url, "postgresql://postgres:%s@127.0.0.1:%u/postgres", SECRET, srv.ports[0]);
    s = NULL;
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "password"), "%s", idem_last_error());
    assert_no_secret("wrong password");
    cr_assert_null(strstr(idem_last_error(), "right-"));
    snprintf(url, sizeof url, "postgresql://postgres@127.0.0.1:%u/postgres", srv.ports[0]);
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "wants a password"), "%s", idem_last_error());
}

Test(postgresql, password_from_pgpassfile_is_honoured)
{
    idem_test_pg_options o = {.password = SECRET};
    server(&o);
    char path[600], url[600];
    snprintf(path, sizeof path, "%s/pgpass", srv.dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "127.0.0.1:%u:postgres:postgres:%s\n", srv.ports[0], SECRET);
    fclose(f);
    chmod(path, 0600);
    setenv("PGPASSFILE", path, 1);
    snprintf(url, sizeof url, "postgresql://postgres@127.0.0.1:%u/postgres", srv.ports[0]);
    idem_store_close(open_ok(url));
}

/* ---- read-only servers ---- */

Test(postgresql, read_only_server_is_a_clear_ebackend_at_open)
{
    idem_test_pg_options o = {.conf = "default_transaction_read_only = on\n"};
    server(&o);
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, srv.url), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "read-only") && strstr(idem_last_error(), "primary"), "%s",
              idem_last_error());
}

Test(postgresql, server_turned_read_only_fails_requests_clearly_and_nothing_runs)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_layer *l = layer_of(s, 5000);
    PGconn *c = raw();
    raw_exec(c, "ALTER SYSTEM SET default_transaction_read_only = on");
    raw_exec(c, "SELECT pg_reload_conf()");
    sleep_ms(300);
    job j = {0};
    idem_reply r = {0};
    idem_request req = req_str("ro");
    int rc = idem_run(l, &req, handler, &j, &r);
    cr_assert_eq(rc, IDEM_EBACKEND, "%s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert(strstr(idem_last_error(), "read-only"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&j.calls), 0);
    raw_exec(c, "ALTER SYSTEM RESET default_transaction_read_only");
    raw_exec(c, "SELECT pg_reload_conf()");
    sleep_ms(300);
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    PQfinish(c);
}

/* ---- timeouts ---- */

Test(postgresql, statement_timeout_bounds_a_claim_that_waits_on_a_lock)
{
    server(NULL);
    char url[600];
    snprintf(url, sizeof url, "%s?statement_timeout_ms=300", srv.url);
    idem_store *s = open_ok(url);
    idem_layer *l = layer_of(s, 5000);
    PGconn *c = raw();
    raw_exec(c, "BEGIN");
    raw_exec(c, "LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE");
    job j = {0};
    idem_reply r = {0};
    idem_request req = req_str("locked");
    uint64_t t0 = mono_ms();
    int rc = idem_run(l, &req, handler, &j, &r);
    uint64_t took = mono_ms() - t0;
    cr_assert_eq(rc, IDEM_EBACKEND, "%s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert(strstr(idem_last_error(), "statement_timeout_ms"), "%s", idem_last_error());
    cr_assert(took >= 250 && took < 3000, "took %llu ms", (unsigned long long)took);
    cr_assert_eq(atomic_load(&j.calls), 0);
    raw_exec(c, "COMMIT");
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "the connection is still of use: %s",
                 idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    PQfinish(c);
}

Test(postgresql, frozen_server_times_out_within_the_statement_timeout_and_recovers)
{
    server(NULL);
    char url[600];
    snprintf(url, sizeof url, "%s?statement_timeout_ms=300&connect_timeout_ms=500", srv.url);
    idem_store *s = open_ok(url);
    idem_layer *l = layer_of(s, 5000);
    job j = {0};
    idem_reply r = {0};
    idem_request req = req_str("frozen");
    idem_test_postgres_signal(&srv, SIGSTOP); /* the postmaster and every backend */
    uint64_t t0 = mono_ms();
    int rc = idem_run(l, &req, handler, &j, &r);
    uint64_t took = mono_ms() - t0;
    idem_test_postgres_signal(&srv, SIGCONT);
    cr_assert_eq(rc, IDEM_EBACKEND, "%s", idem_error_name(rc));
    cr_assert(strstr(idem_last_error(), "no reply within"), "%s", idem_last_error());
    cr_assert(took >= 1000 && took < 4000, "statement_timeout_ms + 1 s bounds the wait: took %llu ms",
              (unsigned long long)took);
    cr_assert_eq(atomic_load(&j.calls), 0);
    /* The frozen backend may run the claim it had received once it thaws:
     * the key is then taken (IN_PROGRESS), never run twice. */
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert(r.outcome == IDEM_EXECUTED || r.outcome == IDEM_IN_PROGRESS, "outcome %d", r.outcome);
    idem_request other = req_str("after-thaw");
    cr_assert_eq(idem_run(l, &other, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

/* A handler that does its work, then holds every row of the table FOR
 * UPDATE on a connection of its own: the commit after it waits for the
 * lock, as long as statement_timeout_ms (2 s by default) would let it. */
typedef struct locker {
    atomic_int calls;
    PGconn    *holder;
    uint64_t   done_at;   /* mono_ms() when the handler returned */
} locker;

static int lock_after(void *arg, idem_response *resp)
{
    locker *k = arg;
    atomic_fetch_add(&k->calls, 1);
    k->holder = raw();
    raw_exec(k->holder, "BEGIN");
    raw_exec(k->holder, "SELECT 1 FROM idempotency_keys FOR UPDATE");
    k->done_at = mono_ms();
    return idem_response_set(resp, 201, "charged", 7) == IDEM_OK ? 0 : 1;
}

/* Run key with its row locked after the handler, then let go of the lock;
 * returns how long the commit took (after the handler), and in *whole the
 * call. leased: the lease is still on, so the key may not run again. */
static uint64_t commit_on_a_locked_row(idem_layer *l, const char *key, bool leased, uint64_t *whole)
{
    locker k = {0};
    idem_reply r = {0};
    idem_request req = req_str(key);
    uint64_t t0 = mono_ms();
    int rc = idem_run(l, &req, lock_after, &k, &r);
    uint64_t end = mono_ms();
    cr_log_info("%s: the call took %llu ms, its commit %llu ms", key, (unsigned long long)(end - t0),
                (unsigned long long)(end - k.done_at));
    cr_assert_not_null(k.holder);
    raw_exec(k.holder, "COMMIT");
    PQfinish(k.holder);
    cr_assert_eq(rc, IDEM_EBACKEND, "%s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert(strstr(idem_last_error(), "the library left this call"), "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the work done");
    cr_assert_str_eq((const char *)r.body, "charged");
    idem_reply_clear(&r);
    if (leased) {
        /* The statement left waiting for the lock may still land; either
         * way the handler does not run again while its lease is on. */
        job j = {0};
        cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert(r.outcome == IDEM_REPLAYED || r.outcome == IDEM_IN_PROGRESS, "outcome %d", r.outcome);
        cr_assert_eq(atomic_load(&j.calls), 0);
        idem_reply_clear(&r);
    }
    *whole = end - t0;
    return end - k.done_at;
}

Test(postgresql, commit_waiting_on_a_row_lock_returns_by_commit_timeout_ms)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_options o;
    idem_options_init(&o);
    o.commit_timeout_ms = 500;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, &o), IDEM_OK, "%s", idem_last_error());
    uint64_t whole, took = commit_on_a_locked_row(l, "locked-commit", true, &whole);
    /* 50 ms of slack are documented; twice that here, for a loaded machine */
    cr_assert(took >= 480 && took < 500 + 100, "the commit took %llu ms with commit_timeout_ms 500",
              (unsigned long long)took);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(postgresql, commit_waiting_on_a_row_lock_returns_before_the_lease_ends)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_layer *l = layer_of(s, 3000);
    uint64_t whole;
    (void)commit_on_a_locked_row(l, "locked-lease", false, &whole);
    cr_assert(whole < 3000, "the call took %llu ms with a lease of 3000 ms", (unsigned long long)whole);
    cr_assert(whole >= 2800, "the commit gave up %llu ms into a 3000 ms lease", (unsigned long long)whole);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- restarts ---- */

typedef struct loader {
    idem_layer *l;
    atomic_bool *stop;
    atomic_int  *executions;   /* per key */
    int          id;
    int          ok, backend_errors, other;
} loader;

#define LOAD_KEYS 64

static int count_handler(void *arg, idem_response *resp)
{
    atomic_int *calls = arg;
    atomic_fetch_add(calls, 1);
    return idem_response_set(resp, 200, "x", 1) == IDEM_OK ? 0 : 1;
}

static void *load(void *arg)
{
    loader *x = arg;
    unsigned seed = (unsigned)x->id * 7919u + 1;
    while (!atomic_load(x->stop)) {
        int k = (int)(rand_r(&seed) % LOAD_KEYS);
        char key[16];
        snprintf(key, sizeof key, "load-%d", k);
        idem_request req = req_str(key);
        idem_reply r = {0};
        int rc = idem_run(x->l, &req, count_handler, &x->executions[k], &r);
        if (rc == IDEM_OK)
            x->ok++;
        else if (rc == IDEM_EBACKEND)
            x->backend_errors++;
        else
            x->other++;
        idem_reply_clear(&r);
    }
    return NULL;
}

Test(postgresql, server_killed_and_restarted_under_load_never_runs_a_key_twice_and_service_resumes)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_layer *l = layer_of(s, 30000);
    atomic_bool stopflag = false;
    atomic_int executions[LOAD_KEYS] = {0};
    enum { T = 8 };
    loader x[T];
    pthread_t t[T];
    for (int i = 0; i < T; i++) {
        x[i] = (loader){.l = l, .stop = &stopflag, .executions = executions, .id = i};
        pthread_create(&t[i], NULL, load, &x[i]);
    }
    for (int round = 0; round < 3; round++) {
        sleep_ms(400);
        cr_assert_eq(idem_test_server_restart(&srv, 0), 0, "restart %d", round);
    }
    sleep_ms(800);
    atomic_store(&stopflag, true);
    int ok = 0, errors = 0, other = 0;
    for (int i = 0; i < T; i++) {
        pthread_join(t[i], NULL);
        ok += x[i].ok;
        errors += x[i].backend_errors;
        other += x[i].other;
    }
    cr_log_info("under load: %d ok, %d EBACKEND across 3 restarts", ok, errors);
    cr_assert_eq(other, 0, "only IDEM_EBACKEND while the server is down");
    cr_assert(ok > 0);
    for (int k = 0; k < LOAD_KEYS; k++)
        cr_assert_leq(atomic_load(&executions[k]), 1, "key %d ran %d times", k, atomic_load(&executions[k]));
    /* and every request succeeds again */
    idem_request req = req_str("after");
    job j = {0};
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(postgresql, restart_while_the_pool_is_idle_costs_no_request)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_layer *l = layer_of(s, 5000);
    job j = {0};
    idem_reply r = {0};
    idem_request a = req_str("idle-a"), b = req_str("idle-b");
    cr_assert_eq(idem_run(l, &a, handler, &j, &r), IDEM_OK);
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    cr_assert_eq(idem_run(l, &b, handler, &j, &r), IDEM_OK, "a pooled connection the server closed is "
                 "replaced before anything is sent: %s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run(l, &a, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED, "the record survived the SIGKILL");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- concurrency at every isolation level ---- */

typedef struct racer {
    idem_layer        *l;
    job               *j;
    pthread_barrier_t *go;
    int                rc, outcome;
    char               why[512];
} racer;

static void *race(void *arg)
{
    racer *x = arg;
    idem_request req = req_str("race");
    idem_reply r = {0};
    pthread_barrier_wait(x->go);
    x->rc = idem_run(x->l, &req, handler, x->j, &r);
    snprintf(x->why, sizeof x->why, "%s", idem_last_error());
    x->outcome = r.outcome;
    idem_reply_clear(&r);
    return NULL;
}

/* level as libpq's options want it, percent-encoded ("read\\ committed"). */
static void race_at(const char *level, const char *table)
{
    char url[700];
    snprintf(url, sizeof url, "%s?options=-c%%20default_transaction_isolation=%s&table=%s", srv.url,
             level, table);
    for (int round = 0; round < 5; round++) {
        idem_store *s = open_ok(url);
        PGconn *c = raw();
        char sql[128];
        snprintf(sql, sizeof sql, "TRUNCATE %s", table);
        raw_exec(c, sql);
        PQfinish(c);
        idem_layer *l = layer_of(s, 10000);
        if (round >= 3) { /* the takeover path: an expired claim sits on the key */
            idem_layer *shortl = layer_of(s, 1000); /* long enough for a loaded, sanitized run */
            idem_claim *old;
            idem_reply r0 = {0};
            idem_request req = req_str("race");
            cr_assert_eq(idem_begin(shortl, &req, &old, &r0), IDEM_OK, "%s", idem_last_error());
            cr_assert_not_null(old);
            sleep_ms(1200);
            cr_assert_eq(idem_commit(old, 200, "late", 4), IDEM_ELOST);
            idem_layer_free(shortl);
        }
        enum { N = 16 };
        job j = {.sleep_ms = 100};
        pthread_barrier_t go;
        pthread_barrier_init(&go, NULL, N);
        racer x[N];
        pthread_t t[N];
        for (int i = 0; i < N; i++) {
            x[i] = (racer){.l = l, .j = &j, .go = &go};
            pthread_create(&t[i], NULL, race, &x[i]);
        }
        int executed = 0;
        for (int i = 0; i < N; i++) {
            pthread_join(t[i], NULL);
            cr_assert_eq(x[i].rc, IDEM_OK, "%s: %s: %s", level, idem_error_name(x[i].rc), x[i].why);
            executed += x[i].outcome == IDEM_EXECUTED;
        }
        pthread_barrier_destroy(&go);
        cr_assert_eq(executed, 1, "%s round %d%s", level, round, round >= 3 ? " (over an expired claim)" : "");
        cr_assert_eq(atomic_load(&j.calls), 1, "%s round %d", level, round);
        idem_layer_free(l);
        idem_store_close(s);
    }
}

Test(postgresql, sixteen_claimants_at_every_isolation_level_execute_once_on_a_new_or_an_expired_key)
{
    server(NULL);
    race_at("read%5C%20committed", "race_rc");
    race_at("repeatable%5C%20read", "race_rr");
    race_at("serializable", "race_ser");
}

/* ---- the driver's operations, directly ---- */

Test(postgresql, claim_sent_again_finds_its_own_record_and_counts_as_claimed_read_and_remove)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    idem_record rec = {.state = IDEM_STATE_STARTED, .token = {1, 2, 3}, .deadline_ms = idem_now_ms() + 5000};
    uint8_t enc[IDEM_RECORD_HEADER_LEN];
    idem__record_write(&rec, enc);
    void *ex = NULL;
    size_t exlen = 0;
    uint32_t left = 0;
    cr_assert_eq(idem__store_claim(s, "k\0x", 3, enc, sizeof enc, 5000, &ex, &exlen, &left), IDEM_OK);
    cr_assert_null(ex);
    cr_assert_eq(idem__store_claim(s, "k\0x", 3, enc, sizeof enc, 5000, &ex, &exlen, &left), IDEM_OK);
    cr_assert_null(ex, "our own live STARTED record: claimed");
    idem_record other = rec;
    other.token[0] = 9;
    uint8_t enc2[IDEM_RECORD_HEADER_LEN];
    idem__record_write(&other, enc2);
    cr_assert_eq(idem__store_claim(s, "k\0x", 3, enc2, sizeof enc2, 5000, &ex, &exlen, &left), IDEM_OK);
    cr_assert_not_null(ex);
    cr_assert_eq(exlen, sizeof enc);
    cr_assert_arr_eq(ex, enc, sizeof enc);
    cr_assert(left > 3000 && left <= 5000, "remaining %u by the server's clock", left);
    free(ex);

    void *got = NULL;
    size_t glen = 0;
    cr_assert_eq(idem__store_read(s, "k\0x", 3, &got, &glen, &left), IDEM_OK);
    cr_assert_not_null(got);
    cr_assert_arr_eq(got, enc, sizeof enc);
    free(got);
    bool deleted = false;
    cr_assert_eq(idem__store_remove(s, "k\0x", 3, &deleted), IDEM_OK);
    cr_assert(deleted);
    cr_assert_eq(idem__store_remove(s, "k\0x", 3, &deleted), IDEM_OK);
    cr_assert_not(deleted);
    cr_assert_eq(idem__store_read(s, "k\0x", 3, &got, &glen, &left), IDEM_OK);
    cr_assert_null(got);
    cr_assert_eq(idem__store_release(s, "k\0x", 3, rec.token), IDEM_ELOST);
    idem_store_close(s);
}

Test(postgresql, expired_rows_are_deleted_in_bounded_batches_without_a_cron)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    PGconn *c = raw();
    raw_exec(c, "INSERT INTO idempotency_keys (key, value, expires_at) "
                "SELECT int4send(g), '\\x00', clock_timestamp() - interval '1 minute' "
                "FROM generate_series(1, 1200) g");
    idem_layer *l = layer_of(s, 5000);
    job j = {0};
    idem_reply r = {0};
    long before = raw_long(c, "SELECT count(*) FROM idempotency_keys");
    sleep_ms(1100); /* past the once-a-second spacing of the open's first claim */
    idem_request a = req_str("sweep-1");
    cr_assert_eq(idem_run(l, &a, handler, &j, &r), IDEM_OK);
    long after = raw_long(c, "SELECT count(*) FROM idempotency_keys WHERE expires_at < clock_timestamp()");
    cr_assert(before - 1 - after > 0 && before - after <= 500, "one batch of at most 500: %ld -> %ld",
              before, after);
    idem_request b = req_str("sweep-2");
    cr_assert_eq(idem_run(l, &b, handler, &j, &r), IDEM_OK);
    long again = raw_long(c, "SELECT count(*) FROM idempotency_keys WHERE expires_at < clock_timestamp()");
    cr_assert_eq(again, after, "at most one batch a second");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    PQfinish(c);
}

Test(postgresql, large_response_round_trips_and_the_limit_is_a_gigabyte)
{
    server(NULL);
    idem_store *s = open_ok(srv.url);
    cr_assert(idem__store_max_record_len(s) >= ((size_t)1 << 30) - ((size_t)2 << 20) && idem__store_max_record_len(s) < (size_t)1 << 30);
    idem_options o;
    idem_options_init(&o);
    o.max_response_len = 8u << 20;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, &o), IDEM_OK);
    idem_claim *cl;
    idem_reply r = {0};
    idem_request req = req_str("big");
    cr_assert_eq(idem_begin(l, &req, &cl, &r), IDEM_OK);
    size_t n = 8u << 20;
    unsigned char *body = malloc(n);
    for (size_t i = 0; i < n; i++)
        body[i] = (unsigned char)(i * 31 + 7);
    cr_assert_eq(idem_commit(cl, 200, body, n), IDEM_OK, "%s", idem_last_error());
    job j = {0};
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.body_len, n);
    cr_assert_arr_eq(r.body, body, n);
    free(body);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- unix sockets ---- */

Test(postgresql, unix_socket_url_in_libpqs_form)
{
    idem_test_pg_options o = {.unix_socket = true};
    server(&o);
    cr_assert(strncmp(srv.url, "postgresql://postgres@/postgres?host=/", 38) == 0, "%s", srv.url);
    idem_store *s = open_ok(srv.url);
    idem_layer *l = layer_of(s, 5000);
    job j = {0};
    idem_reply r = {0};
    idem_request req = req_str("sock");
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run(l, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
    /* a socket directory with nobody there */
    cr_assert_eq(idem_store_open(&s, "postgresql:///postgres?host=/nonexistent&port=5999"), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "/nonexistent"), "the message names the socket: %s",
              idem_last_error());
}
