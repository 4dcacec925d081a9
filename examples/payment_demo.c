/*
 * payment_demo: a client's retries never charge a customer twice.
 *
 *   payment_demo [--backend sqlite|redis|memcached|postgresql] [--url URL]
 *
 * SQLite is the default and needs no server. On SQLite and PostgreSQL the
 * demo also kills a worker right after it charged, before it could answer:
 * with idem_run_tx() the charge and the stored response commit together,
 * so the client's retry charges once. Exit status: 0 when every scenario
 * behaved, 1 when one did not, 2 when the store cannot be used.
 */
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/idempotency.h>

#ifdef IDEM_DEMO_HAVE_SQLITE
#include <sqlite3.h>
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
#include <libpq-fe.h>
#endif

static atomic_int charges;       /* payments actually made */
static atomic_int next_ref;      /* payment references handed out */
static int        failures;      /* scenarios that did not behave */

typedef struct payment {
    int  amount;
    bool processor_down;
    long takes_ms;
} payment;

/* The handler: charge the card once and describe the result. */
static int charge(void *arg, idem_response *resp)
{
    const payment *p = arg;
    printf("    --- processing payment of $%d ---\n", p->amount);
    if (p->takes_ms) {
        struct timespec ts = {p->takes_ms / 1000, (p->takes_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (p->processor_down) {
        printf("    --- card processor unreachable: nothing charged ---\n");
        return 1;
    }
    /* Set the response before the side effect: a response that cannot be
     * set fails the handler while nothing has been charged yet. */
    char body[128];
    int n = snprintf(body, sizeof body, "{\"status\":\"success\",\"amount\":%d,\"ref\":\"PAY-%d\"}",
                     p->amount, atomic_fetch_add(&next_ref, 1) + 1);
    if (idem_response_set(resp, 200, body, (size_t)n) != IDEM_OK)
        return 1;
    atomic_fetch_add(&charges, 1); /* the charge itself */
    return 0;
}

static const char *outcome_name(idem_outcome o)
{
    switch (o) {
    case IDEM_EXECUTED: return "executed";
    case IDEM_REPLAYED: return "replayed from the store, no charge";
    case IDEM_IN_PROGRESS: return "in progress elsewhere";
    case IDEM_MISMATCH: return "same key, different request";
    case IDEM_FAILED: return "handler failed, key freed";
    }
    return "?";
}

/* Send one payment request and print the answer a web service would give. */
static idem_outcome send(idem_layer *layer, const char *label, const char *key, payment *p)
{
    char fp[32];
    snprintf(fp, sizeof fp, "amount=%d", p->amount);
    idem_request req = {.key = key, .key_len = strlen(key), .fingerprint = fp,
                        .fingerprint_len = strlen(fp)};
    idem_reply reply = {0};
    int rc = idem_run(layer, &req, charge, p, &reply);
    if (rc != IDEM_OK) {
        printf("%s: %s: %s\n", label, idem_error_name(rc), idem_last_error());
        idem_reply_clear(&reply);
        failures++;
        return 0;
    }
    switch (reply.outcome) {
    case IDEM_IN_PROGRESS:
        printf("%s: 409 Conflict, Retry-After %u ms [%s]\n", label, reply.retry_after_ms,
               outcome_name(reply.outcome));
        break;
    case IDEM_MISMATCH:
        printf("%s: 422 Unprocessable: key %s was used for another payment [%s]\n", label, key,
               outcome_name(reply.outcome));
        break;
    case IDEM_FAILED:
        printf("%s: 503 Service Unavailable, try again [%s]\n", label, outcome_name(reply.outcome));
        break;
    default:
        printf("%s: %d %s [%s]\n", label, reply.status, (char *)reply.body, outcome_name(reply.outcome));
    }
    idem_outcome o = reply.outcome;
    idem_reply_clear(&reply);
    return o;
}

static void expect(const char *what, bool ok)
{
    if (!ok) {
        printf("    !! unexpected: %s\n", what);
        failures++;
    }
}

typedef struct racer {
    idem_layer  *layer;
    int          id;
    idem_outcome outcome;
} racer;

static void *race(void *arg)
{
    racer *r = arg;
    payment p = {.amount = 300, .takes_ms = 500};
    char label[32];
    snprintf(label, sizeof label, "    thread %d", r->id);
    r->outcome = send(r->layer, label, "req-789", &p);
    return NULL;
}

static void *slow_race(void *arg)
{
    racer *r = arg;
    payment p = {.amount = 75, .takes_ms = 1500};
    r->outcome = send(r->layer, "    Slow charge", "req-slow", &p);
    return NULL;
}

/* ---- a worker killed right after it charged ---- */

/* The charges table lives in the store's own database: a row per charge. */
static const char *db_kind; /* "sqlite" or "postgresql" */

/* Run sql on conn, a sqlite3 * or a PGconn *; -1 on failure, else the
 * number the statement returns in its first column (0 when none). */
static long db_run(void *conn, const char *sql)
{
    long n = 0;
#ifdef IDEM_DEMO_HAVE_SQLITE
    if (strcmp(db_kind, "sqlite") == 0) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(conn, sql, -1, &st, NULL) != SQLITE_OK)
            return -1;
        int rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
            n = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return rc == SQLITE_ROW || rc == SQLITE_DONE ? n : -1;
    }
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
    if (strcmp(db_kind, "postgresql") == 0) {
        PGresult *r = PQexec(conn, sql);
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_TUPLES_OK && PQntuples(r) > 0)
            n = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
        return st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK ? n : -1;
    }
#endif
    (void)conn;
    (void)sql;
    return -1;
}

/* A connection of the demo's own to the store's database, or NULL. */
static void *db_open(const char *url)
{
#ifdef IDEM_DEMO_HAVE_SQLITE
    if (strcmp(db_kind, "sqlite") == 0) {
        sqlite3 *db;
        if (sqlite3_open(url + strlen("sqlite://"), &db) != SQLITE_OK) {
            sqlite3_close(db);
            return NULL;
        }
        sqlite3_busy_timeout(db, 5000);
        return db;
    }
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
    if (strcmp(db_kind, "postgresql") == 0) {
        PGconn *pg = PQconnectdb(url);
        if (PQstatus(pg) == CONNECTION_OK)
            return pg;
        PQfinish(pg);
    }
#endif
    (void)url;
    return NULL;
}

static void db_close(void *conn)
{
#ifdef IDEM_DEMO_HAVE_SQLITE
    if (strcmp(db_kind, "sqlite") == 0)
        sqlite3_close(conn);
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
    if (strcmp(db_kind, "postgresql") == 0)
        PQfinish(conn);
#endif
}

typedef struct kill_job {
    const char *url;
    const char *key;
    bool        die;        /* be killed right after charging */
} kill_job;

static void insert_charge(void *conn, const char *key)
{
    char sql[256];
    snprintf(sql, sizeof sql, "INSERT INTO demo_charges VALUES ('%s')", key);
    printf("    --- charging for %s ---\n", key);
    if (db_run(conn, sql) < 0)
        printf("    --- the charge failed ---\n");
}

/* The worker the demo kills: it charges, then SIGKILL comes before it can
 * answer, as when a host dies or a deploy kills a pod. */
static void died_after_charging(void)
{
    printf("    --- worker killed (SIGKILL) right after charging, before it answered ---\n");
    fflush(stdout);
    raise(SIGKILL);
}

/* With idem_run_tx(): the charge is a row in the transaction the library
 * commits with the response. */
static int charge_in_tx(void *arg, void *conn, idem_response *resp)
{
    kill_job *j = arg;
    insert_charge(conn, j->key);
    if (j->die)
        died_after_charging(); /* its transaction never commits: no charge, no response */
    return idem_response_set(resp, 201, "{\"status\":\"charged\"}", 20) ? 1 : 0;
}

/* With idem_run(): the charge commits on its own connection, and the
 * response is stored after it, by a second commit. */
static int charge_alone(void *arg, idem_response *resp)
{
    kill_job *j = arg;
    void *conn = db_open(j->url);
    if (!conn)
        return 1;
    insert_charge(conn, j->key);
    db_close(conn);
    if (j->die)
        died_after_charging(); /* the charge is committed, the response never will be */
    return idem_response_set(resp, 201, "{\"status\":\"charged\"}", 20) ? 1 : 0;
}

/* Send key once in a worker process that dies right after charging (inside
 * its handler, or once the library has committed: after_commit), then
 * retry it in this one until it is answered; the charges made for key. */
static long killed_then_retried(const char *url, idem_options opts, const char *key, bool in_tx,
                                bool after_commit)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        idem_store *s;
        idem_layer *l;
        if (idem_store_open(&s, url) != IDEM_OK || idem_layer_new(&l, s, &opts) != IDEM_OK)
            _exit(2);
        kill_job j = {.url = url, .key = key, .die = !after_commit};
        idem_request req = {.key = key, .key_len = strlen(key)};
        idem_reply reply = {0};
        if (in_tx)
            (void)idem_run_tx(l, &req, charge_in_tx, &j, &reply);
        else
            (void)idem_run(l, &req, charge_alone, &j, &reply);
        died_after_charging(); /* after_commit: charged and stored, never answered */
        _exit(0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFSIGNALED(status)) {
        printf("    !! the worker did not die as planned\n");
        failures++;
        return -1;
    }
    idem_store *s;
    idem_layer *l;
    if (idem_store_open(&s, url) != IDEM_OK || idem_layer_new(&l, s, &opts) != IDEM_OK)
        return -1;
    kill_job j = {.url = url, .key = key};
    idem_request req = {.key = key, .key_len = strlen(key)};
    for (int retry = 1; retry <= 10; retry++) {
        idem_reply reply = {0};
        int rc = in_tx ? idem_run_tx(l, &req, charge_in_tx, &j, &reply)
                       : idem_run(l, &req, charge_alone, &j, &reply);
        idem_outcome o = rc == IDEM_OK ? reply.outcome : 0;
        printf("    retry %d: %s%s\n", retry, o ? outcome_name(o) : idem_last_error(),
               o == IDEM_IN_PROGRESS ? " (409: the dead worker's lease has not ended)" : "");
        uint32_t wait = reply.retry_after_ms;
        idem_reply_clear(&reply);
        if (o == IDEM_EXECUTED || o == IDEM_REPLAYED)
            break;
        struct timespec ts = {wait / 1000, (long)(wait % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    idem_layer_free(l);
    idem_store_close(s);
    void *conn = db_open(url);
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM demo_charges WHERE k = '%s'", key);
    long n = conn ? db_run(conn, sql) : -1;
    if (conn)
        db_close(conn);
    return n;
}

static void killed_worker_scenarios(const char *url, idem_options opts)
{
    void *conn = db_open(url);
    if (!conn || db_run(conn, "CREATE TABLE IF NOT EXISTS demo_charges (k TEXT)") < 0) {
        printf("    !! cannot reach the store's database for the charges table\n");
        failures++;
        if (conn)
            db_close(conn);
        return;
    }
    db_close(conn);
    opts.lease_ms = 500;
    char key[128];
    printf("\nKilled after charging, with idem_run_tx: the charge is a row in the %s database, in the\n"
           "transaction that stores the response. The worker commits both, then dies before it\n"
           "answers the client\n", db_kind);
    snprintf(key, sizeof key, "%sreq-kill", opts.key_prefix);
    long n = killed_then_retried(url, opts, key, true, true);
    printf("Charges for req-kill: %ld (expected 1: the retry replays)\n", n);
    expect("idem_run_tx, killed after its commit: one charge, replayed", n == 1);

    printf("\nThe same worker killed inside its transaction, after the charge's INSERT\n");
    snprintf(key, sizeof key, "%sreq-kill-inside", opts.key_prefix);
    n = killed_then_retried(url, opts, key, true, false);
    printf("Charges for req-kill-inside: %ld (expected 1: the dead worker's charge rolled back with "
           "its transaction)\n", n);
    expect("idem_run_tx, killed inside: one charge", n == 1);

    printf("\nThe same with idem_run, the charge committed on its own before the response (the\n"
           "window idem_run_tx closes)\n");
    snprintf(key, sizeof key, "%sreq-kill-plain", opts.key_prefix);
    n = killed_then_retried(url, opts, key, false, false);
    printf("Charges for req-kill-plain: %ld: %s\n", n,
           n == 2 ? "charged twice, which is why the work belongs in the transaction"
                  : "unexpected");
    expect("idem_run with the charge outside its commit: charged twice", n == 2);
}

static void usage(FILE *f)
{
    fputs("usage: payment_demo [--backend sqlite|redis|memcached|postgresql] [--url URL]\n"
          "\n"
          "Sends payment requests with idempotency keys and shows that retries are\n"
          "answered from the store instead of charging again.\n"
          "\n"
          "  --backend NAME  sqlite (default; a file in $TMPDIR, no server needed),\n"
          "                  redis (redis://127.0.0.1:6379),\n"
          "                  memcached (memcached://127.0.0.1:11211), or\n"
          "                  postgresql (postgresql://postgres@127.0.0.1:5432/postgres)\n"
          "  --url URL       a store URL of your own, e.g. redis://127.0.0.1:6380/2\n"
          "  --help          this text\n",
          f);
}

static const char *default_url(const char *backend, char *buf, size_t len)
{
    if (strcmp(backend, "sqlite") == 0) {
        const char *tmp = getenv("TMPDIR");
        if (!tmp || tmp[0] != '/' || strpbrk(tmp, "?#% \t\r\n"))
            tmp = "/tmp"; /* a path that needs percent-encoding: keep it simple */
        snprintf(buf, len, "sqlite://%s/payment_demo.db", tmp);
        return buf;
    }
    if (strcmp(backend, "redis") == 0)
        return "redis://127.0.0.1:6379";
    if (strcmp(backend, "memcached") == 0)
        return "memcached://127.0.0.1:11211";
    if (strcmp(backend, "postgresql") == 0)
        return "postgresql://postgres@127.0.0.1:5432/postgres";
    return NULL;
}

static const char *install_hint(const char *backend)
{
    if (strcmp(backend, "redis") == 0)
        return "; Debian: apt-get install redis-server";
    if (strcmp(backend, "memcached") == 0)
        return "; Debian: apt-get install memcached";
    if (strcmp(backend, "postgresql") == 0)
        return "; Debian: apt-get install postgresql";
    return "";
}

int main(int argc, char *argv[])
{
    const char *backend = "sqlite", *url = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc) {
            backend = argv[++i];
        } else if (strcmp(argv[i], "--url") == 0 && i + 1 < argc) {
            url = argv[++i];
        } else {
            fprintf(stderr, "payment_demo: unknown or incomplete argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    char buf[4200];
    if (!url && !(url = default_url(backend, buf, sizeof buf))) {
        fprintf(stderr, "payment_demo: unknown backend '%s'; use sqlite, redis, memcached or postgresql\n", backend);
        return 2;
    }

    idem_store *store;
    int rc = idem_store_open(&store, url);
    if (rc != IDEM_OK) {
        fprintf(stderr, "payment_demo: cannot use the store: %s%s\n", idem_last_error(),
                rc == IDEM_EBACKEND ? install_hint(backend) : "");
        return 2;
    }
    /* Every run gets keys of its own, so the demo starts fresh each time. */
    char prefix[64];
    snprintf(prefix, sizeof prefix, "demo-%ld.%ld:", (long)time(NULL), (long)getpid());
    idem_options opts;
    idem_options_init(&opts);
    opts.key_prefix = prefix;
    idem_layer *layer;
    if ((rc = idem_layer_new(&layer, store, &opts)) != IDEM_OK) {
        fprintf(stderr, "payment_demo: %s\n", idem_last_error());
        idem_store_close(store);
        return 2;
    }
    printf("Store: %s (%s)\n", idem_store_backend(store), url);
    if (strcmp(idem_store_backend(store), "sqlite") == 0)
        printf("       a SQLite file, created if missing; it keeps responses for 24 h.\n"
               "       Each run uses its own key prefix (%s), so runs do not replay each other.\n",
               prefix);

    payment p100 = {.amount = 100}, p200 = {.amount = 200}, p999 = {.amount = 999};
    printf("\nRequest 1: key req-123, $100\n");
    expect("the first request runs", send(layer, "Response 1", "req-123", &p100) == IDEM_EXECUTED);
    printf("\nRequest 2: the client retries key req-123\n");
    expect("the retry replays", send(layer, "Response 2", "req-123", &p100) == IDEM_REPLAYED);
    printf("\nRequest 3: a different key, req-456, $200\n");
    expect("a new key runs", send(layer, "Response 3", "req-456", &p200) == IDEM_EXECUTED);
    printf("\nRequest 4: key req-123 again, but for $999\n");
    expect("a changed request is refused", send(layer, "Response 4", "req-123", &p999) == IDEM_MISMATCH);

    printf("\nConcurrent: 3 threads send key req-789 at the same moment ($300, takes 500 ms)\n");
    racer r[3];
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        r[i] = (racer){.layer = layer, .id = i + 1};
        pthread_create(&t[i], NULL, race, &r[i]);
    }
    int ran = 0, conflicts = 0;
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
        ran += r[i].outcome == IDEM_EXECUTED;
        conflicts += r[i].outcome == IDEM_IN_PROGRESS;
    }
    expect("one thread charges, the other two get 409", ran == 1 && conflicts == 2);

    printf("\nFailure: key req-999, $50, while the card processor is down\n");
    payment down = {.amount = 50, .processor_down = true};
    expect("the failure frees the key", send(layer, "Response", "req-999", &down) == IDEM_FAILED);
    printf("Retry once the processor is back:\n");
    down.processor_down = false;
    expect("the retry charges", send(layer, "Response", "req-999", &down) == IDEM_EXECUTED);

    printf("\nCustom key: user 42 clicks \"upgrade plan\" twice; key = user:<id>:<action>\n");
    char key[64];
    snprintf(key, sizeof key, "user:%d:%s", 42, "upgrade-plan");
    payment upgrade = {.amount = 20};
    expect("first click charges", send(layer, "Click 1", key, &upgrade) == IDEM_EXECUTED);
    expect("second click replays", send(layer, "Click 2", key, &upgrade) == IDEM_REPLAYED);

    /* A charge slower than its lease: auto_extend renews the lease while it
     * runs, so a retry that comes after the first lease would have ended
     * still waits instead of charging again. */
    printf("\nSlow charge: key req-slow, lease 600 ms with auto_extend, the charge takes 1500 ms;\n"
           "the client retries after 900 ms\n");
    idem_options slow_opts = opts;
    slow_opts.lease_ms = 600;
    slow_opts.auto_extend = true;
    idem_layer *slow_layer;
    if ((rc = idem_layer_new(&slow_layer, store, &slow_opts)) != IDEM_OK) {
        fprintf(stderr, "payment_demo: %s\n", idem_last_error());
        return 2;
    }
    racer slow = {.layer = slow_layer, .id = 0};
    pthread_t slow_thread;
    pthread_create(&slow_thread, NULL, slow_race, &slow);
    struct timespec wait = {0, 900 * 1000000L};
    nanosleep(&wait, NULL);
    payment slow_retry = {.amount = 75};
    expect("the retry waits for the renewed lease",
           send(slow_layer, "Retry", "req-slow", &slow_retry) == IDEM_IN_PROGRESS);
    pthread_join(slow_thread, NULL);
    expect("the slow charge completes", slow.outcome == IDEM_EXECUTED);

    idem_stats st, ss;
    idem_layer_stats(layer, &st);
    idem_layer_stats(slow_layer, &ss);
    int made = atomic_load(&charges);
    printf("\nCharges made: %d (expected 6). Layer counters: executed %llu, replayed %llu, "
           "in progress %llu, mismatched %llu, failed %llu; ran but not stored %llu, lease renewals "
           "%llu, keys freed later %llu.\n",
           made, (unsigned long long)(st.executed + ss.executed),
           (unsigned long long)(st.replayed + ss.replayed),
           (unsigned long long)(st.in_progress + ss.in_progress),
           (unsigned long long)(st.mismatched + ss.mismatched), (unsigned long long)(st.failed + ss.failed),
           (unsigned long long)(st.unstored + ss.unstored), (unsigned long long)(st.extended + ss.extended),
           (unsigned long long)(st.claims_freed + ss.claims_freed));
    expect("exactly six charges", made == 6);
    expect("the slow charge's lease was renewed", ss.extended >= 1);
    expect("every charge that ran was stored", st.unstored + ss.unstored == 0);

    db_kind = idem_store_backend(store);
    if (strcmp(db_kind, "sqlite") == 0 || strcmp(db_kind, "postgresql") == 0)
        killed_worker_scenarios(url, opts);
    idem_layer_free(slow_layer);
    idem_layer_free(layer);
    idem_store_close(store);
    if (failures)
        printf("%d scenario(s) misbehaved.\n", failures);
    return failures ? 1 : 0;
}
