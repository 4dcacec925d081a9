/*
 * once_kill --url URL [--keys N] [--workers N] [--seed N] [--long]
 *
 * Exactly once for the work itself, under SIGKILL (docs/contract.md,
 * "Exactly once"): workers in processes of their own race on each key and
 * are killed at random instants, inside the work's transaction, right after
 * a commit, or between the steps of a handler; then every key is settled by
 * one more request. A ledger of business rows, kept in the store's own
 * database, and a simulated card processor that deduplicates by subkey are
 * checked afterwards:
 *
 *   run_tx     idem_run_tx() inserts a charge row (PostgreSQL, SQLite)
 *   commit_tx  idem_begin(), a transaction of the worker's own connection,
 *              idem_commit_tx() (PostgreSQL, SQLite)
 *   steps      three steps: a local row with its checkpoint
 *              (idem_checkpoint_tx(); a plain checkpoint on stores without
 *              transactions), a call to the processor with the step's
 *              subkey and a checkpoint of its answer, and the commit
 *              (every store)
 *
 * Every key ends with exactly one row and one processor charge, and its
 * stored response names them. --plain adds the window these close, as a
 * check of the checker: idem_run() with a handler that commits its row on
 * its own connection, which a kill between the two commits doubles (it is
 * expected to fail). Exit 0 when every check held, 1 otherwise;
 * the last line says how many checks passed and failed. CI runs the default
 * (12 keys, 3 workers); --long runs 200 keys with 4 workers.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/idempotency.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
#include <libpq-fe.h>
#endif

#include "support/testutil.h"

#define LEASE_MS       400
#define SETTLE_MS      15000
#define MAX_WORKERS    64

static const char *url;
static char        prefix[64];
static char        procdir[256]; /* the processor's charges, one file per subkey */
static int         passed, failed;

/* Count a check; say what failed (fmt takes two strings). */
#define check(ok, fmt, a, b)                                                                       \
    do {                                                                                           \
        if (ok) {                                                                                  \
            passed++;                                                                              \
        } else {                                                                                   \
            failed++;                                                                              \
            fprintf(stderr, "once_kill: FAILED: " fmt "\n", a, b);                                 \
        }                                                                                          \
    } while (0)

/* ---- the store's own database: the ledger ---- */

static const char *backend; /* "sqlite", "postgresql", or another store's name */

static bool has_tx(void)
{
    return strcmp(backend, "sqlite") == 0 || strcmp(backend, "postgresql") == 0;
}

static void *db_open(void)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (strcmp(backend, "sqlite") == 0) {
        sqlite3 *db;
        if (sqlite3_open(url + strlen("sqlite://"), &db) != SQLITE_OK)
            return NULL;
        sqlite3_busy_timeout(db, 10000);
        return db;
    }
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(backend, "postgresql") == 0) {
        PGconn *pg = PQconnectdb(url);
        if (PQstatus(pg) != CONNECTION_OK) {
            PQfinish(pg);
            return NULL;
        }
        return pg;
    }
#endif
    return NULL;
}

static void db_close(void *db)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (strcmp(backend, "sqlite") == 0)
        sqlite3_close(db);
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(backend, "postgresql") == 0)
        PQfinish(db);
#endif
}

static bool db_exec(void *db, const char *sql)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (strcmp(backend, "sqlite") == 0)
        return sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK;
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(backend, "postgresql") == 0) {
        PGresult *r = PQexec(db, sql);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
        PQclear(r);
        return ok;
    }
#endif
    (void)db;
    (void)sql;
    return false;
}

/* The rows for key: how many, and the `who` of the first in who. */
static long db_rows(void *db, const char *key, char *who, size_t size)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT who FROM ledger WHERE k = '%s%s'", prefix, key);
    long n = -1;
    who[0] = '\0';
#ifdef IDEM_TEST_HAVE_SQLITE
    if (strcmp(backend, "sqlite") == 0) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(db, q, -1, &st, NULL) == SQLITE_OK) {
            for (n = 0; sqlite3_step(st) == SQLITE_ROW; n++)
                if (n == 0)
                    snprintf(who, size, "%s", (const char *)sqlite3_column_text(st, 0));
            sqlite3_finalize(st);
        }
    }
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(backend, "postgresql") == 0) {
        PGresult *r = PQexec(db, q);
        if (PQresultStatus(r) == PGRES_TUPLES_OK) {
            n = PQntuples(r);
            if (n > 0)
                snprintf(who, size, "%s", PQgetvalue(r, 0, 0));
        }
        PQclear(r);
    }
#endif
    (void)db;
    (void)size;
    return n;
}

static bool insert_row(void *db, const char *key, const char *who)
{
    char q[256];
    snprintf(q, sizeof q, "INSERT INTO ledger VALUES ('%s%s', '%s')", prefix, key, who);
    return db_exec(db, q);
}

/* ---- the card processor: deduplicates by subkey ---- */

/* Charge once per subkey: the answer (a charge id) of the first call, made
 * and published atomically (written aside, then linked into place). */
static bool processor_charge(const char *subkey, const char *id, char *out, size_t size)
{
    char tmp[512], path[512];
    snprintf(path, sizeof path, "%s/%s", procdir, subkey);
    snprintf(tmp, sizeof tmp, "%s/.tmp-%ld", procdir, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, id, strlen(id)) != (ssize_t)strlen(id) || close(fd) != 0)
        return false;
    bool made = link(tmp, path) == 0;
    unlink(tmp);
    if (!made && errno != EEXIST)
        return false;
    fd = open(path, O_RDONLY);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, out, size - 1);
    close(fd);
    if (n <= 0)
        return false;
    out[n] = '\0';
    return true;
}

/* ---- the workers ---- */

typedef enum mode { M_RUN_TX, M_COMMIT_TX, M_STEPS, M_PLAIN } mode;
static const char *const mode_name[] = {"run_tx", "commit_tx", "steps", "plain"};

typedef struct work {
    const char *key;
    char        who[64];
    long        pause_ms; /* inside the transaction, after the work */
} work;

static int run_tx_handler(void *arg, void *conn, idem_response *resp)
{
    work *w = arg;
    if (!insert_row(conn, w->key, w->who))
        return 1;
    if (w->pause_ms)
        sleep_ms(w->pause_ms);
    return idem_response_set(resp, 201, w->who, strlen(w->who)) ? 1 : 0;
}

/* The work committed on its own, then idem_run()'s commit. */
static int plain_handler(void *arg, idem_response *resp)
{
    work *w = arg;
    void *db = db_open();
    bool ok = db && insert_row(db, w->key, w->who);
    if (db)
        db_close(db);
    if (ok && w->pause_ms)
        sleep_ms(w->pause_ms);
    return ok && idem_response_set(resp, 201, w->who, strlen(w->who)) == IDEM_OK ? 0 : 1;
}

/* The three steps on a claim, resumed from its checkpoint; the answer,
 * which names the charge, in charge. */
static int steps(idem_claim *c, void *db, work *w, char charge[64])
{
    const char *name;
    const void *data;
    size_t len;
    idem_claim_checkpoint(c, &name, &data, &len);
    if (name[0] == '\0') { /* step 1: a local row, with its checkpoint */
        if (db) {
            if (!db_exec(db, "BEGIN") || !insert_row(db, w->key, w->who))
                return 1;
            if (w->pause_ms)
                sleep_ms(w->pause_ms);
            if (idem_checkpoint_tx(c, db, "reserved", w->who, strlen(w->who)) != IDEM_OK) {
                db_exec(db, "ROLLBACK");
                return 1;
            }
        } else if (idem_checkpoint(c, "reserved", w->who, strlen(w->who)) != IDEM_OK) {
            return 1;
        }
        idem_claim_checkpoint(c, &name, &data, &len);
    }
    if (strcmp(name, "reserved") == 0) { /* step 2: the processor, by subkey */
        char subkey[IDEM_SUBKEY_SIZE], id[80];
        snprintf(id, sizeof id, "ch-%s-%s", w->key, w->who);
        if (idem_claim_subkey(c, "charge", subkey, sizeof subkey) != IDEM_OK ||
            !processor_charge(subkey, id, charge, 64))
            return 1;
        if (w->pause_ms)
            sleep_ms(w->pause_ms);
        if (idem_checkpoint(c, "charged", charge, strlen(charge)) != IDEM_OK)
            return 1;
        idem_claim_checkpoint(c, &name, &data, &len);
    }
    if (strcmp(name, "charged") != 0 || len >= 64)
        return 1;
    memcpy(charge, data, len); /* step 3: the answer names the charge */
    charge[len] = '\0';
    return idem_commit(c, 201, charge, len) == IDEM_OK ? 0 : 1;
}

/* One request for the key, as a client's retry: until it is answered with
 * a response (executed or replayed), or until until_ms. 0: answered. */
static int request(idem_layer *l, mode m, const char *key, long pause_ms, long until_ms, char *body,
                   size_t size)
{
    void *db = (m == M_COMMIT_TX || m == M_STEPS) && has_tx() ? db_open() : NULL;
    int attempt = 0;
    for (;;) {
        work w = {.key = key, .pause_ms = pause_ms};
        snprintf(w.who, sizeof w.who, "%ld-%d", (long)getpid(), attempt++);
        idem_request req = {.key = key, .key_len = strlen(key)};
        idem_reply reply = {0};
        int rc;
        if (m == M_RUN_TX) {
            rc = idem_run_tx(l, &req, run_tx_handler, &w, &reply);
        } else if (m == M_PLAIN) {
            rc = idem_run(l, &req, plain_handler, &w, &reply);
        } else {
            idem_claim *c = NULL;
            rc = idem_begin(l, &req, &c, &reply);
            if (rc == IDEM_OK && c) {
                char answer[64];
                snprintf(answer, sizeof answer, "%s", w.who);
                if (m == M_COMMIT_TX) {
                    bool ok = db_exec(db, "BEGIN") && insert_row(db, key, w.who);
                    if (ok && pause_ms)
                        sleep_ms(pause_ms);
                    rc = ok ? idem_commit_tx(c, db, 201, w.who, strlen(w.who)) : IDEM_EBACKEND;
                    if (!ok)
                        db_exec(db, "ROLLBACK");
                    if (rc != IDEM_OK && rc != IDEM_ELOST)
                        idem_abort(c);
                } else if (steps(c, db, &w, answer) != 0) {
                    idem_abort(c); /* keeps the checkpoint for the next holder */
                    rc = IDEM_EBACKEND;
                }
                if (rc == IDEM_OK) {
                    reply.outcome = IDEM_EXECUTED;
                    snprintf(body, size, "%s", answer);
                }
            }
        }
        if (rc == IDEM_OK && (reply.outcome == IDEM_EXECUTED || reply.outcome == IDEM_REPLAYED)) {
            if (reply.body)
                snprintf(body, size, "%s", (const char *)reply.body);
            idem_reply_clear(&reply);
            if (db)
                db_close(db);
            return 0;
        }
        long wait = rc == IDEM_OK && reply.outcome == IDEM_IN_PROGRESS ? (long)reply.retry_after_ms : 50;
        idem_reply_clear(&reply);
        if (mono_ms() + wait > until_ms) {
            if (db)
                db_close(db);
            return 1;
        }
        sleep_ms(wait > 200 ? 200 : wait);
    }
}

static idem_layer *open_layer(idem_store **s)
{
    idem_layer *l = NULL;
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = LEASE_MS;
    if (idem_store_open(s, url) != IDEM_OK || idem_layer_new(&l, *s, &o) != IDEM_OK) {
        fprintf(stderr, "once_kill: %s\n", idem_last_error());
        exit(2);
    }
    return l;
}

static void worker(mode m, const char *key, unsigned seed)
{
    srand(seed);
    idem_store *s;
    idem_layer *l = open_layer(&s);
    char body[128];
    (void)request(l, m, key, rand() % 30, mono_ms() + 3000, body, sizeof body);
    _exit(0);
}

/* The processor charged once per key, and each key's stored response
 * names its charge: the files' contents are the responses, one to one. */
static void check_processor(char bodies[][128], int nkeys)
{
    DIR *d = opendir(procdir);
    struct dirent *e;
    int files = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[600], charge[128] = "";
        snprintf(path, sizeof path, "%s/%s", procdir, e->d_name);
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, charge, sizeof charge - 1) : -1;
        if (fd >= 0)
            close(fd);
        charge[n > 0 ? n : 0] = '\0';
        int named = 0;
        for (int k = 0; k < nkeys; k++)
            named += strcmp(bodies[k], charge) == 0;
        check(named == 1, "the processor's charge %s is named by %s stored responses, not 1", charge,
              named == 0 ? "no" : "several");
        files++;
    }
    if (d)
        closedir(d);
    char want[32], got[32];
    snprintf(want, sizeof want, "%d", nkeys);
    snprintf(got, sizeof got, "%d", files);
    check(files == nkeys, "the processor charged %s times for %s keys", got, want);
}

/* ---- one mode ---- */

static void run_mode(mode m, int nkeys, int nworkers, unsigned seed)
{
    long t0 = mono_ms();
    int kills = 0, n = 0;
    pid_t pids[MAX_WORKERS * 256];
    char keys[256][32];
    srand(seed);
    for (int k = 0; k < nkeys; k++) {
        snprintf(keys[k], sizeof keys[k], "%s-%d", mode_name[m], k);
        for (int w = 0; w < nworkers; w++) {
            pid_t pid = fork();
            if (pid == 0)
                worker(m, keys[k], seed * 7919u + (unsigned)(k * 31 + w));
            if (pid > 0)
                pids[n++] = pid;
        }
    }
    /* SIGKILL most workers at random instants of their first 60 ms. */
    long start = mono_ms();
    int order[MAX_WORKERS * 256];
    long when[MAX_WORKERS * 256];
    for (int i = 0; i < n; i++) {
        order[i] = i;
        when[i] = rand() % 4 == 0 ? -1 : rand() % 60;
    }
    for (long now = 0; now <= 60; now = mono_ms() - start) {
        for (int i = 0; i < n; i++)
            if (when[order[i]] >= 0 && when[order[i]] <= now) {
                kill(pids[order[i]], SIGKILL);
                when[order[i]] = -1;
                kills++;
            }
        sleep_ms(2);
    }
    for (int i = 0; i < n; i++)
        waitpid(pids[i], NULL, 0);

    /* Settle every key, then check the ledger and the processor. */
    idem_store *s;
    idem_layer *l = open_layer(&s);
    void *db = has_tx() ? db_open() : NULL;
    char bodies[256][128];
    for (int k = 0; k < nkeys; k++) {
        char *body = bodies[k], who[128];
        body[0] = '\0';
        int rc = request(l, m, keys[k], 0, mono_ms() + SETTLE_MS, body, sizeof bodies[k]);
        check(rc == 0, "%s %s: never answered", mode_name[m], keys[k]);
        if (db) {
            long rows = db_rows(db, keys[k], who, sizeof who);
            char n_rows[32];
            snprintf(n_rows, sizeof n_rows, "%ld", rows);
            check(rows == 1, "%s: %s rows, not 1", keys[k], n_rows);
            if (m != M_STEPS)
                check(strcmp(body, who) == 0, "the stored response %s does not name the row %s", body, who);
        }
    }
    if (m == M_STEPS)
        check_processor(bodies, nkeys);
    if (db)
        db_close(db);
    idem_layer_free(l);
    idem_store_close(s);
    printf("once_kill: %s on %s: %d keys, %d workers, %d killed, %ld ms\n", mode_name[m], backend, nkeys,
           n, kills, mono_ms() - t0);
}

int main(int argc, char **argv)
{
    int nkeys = 12, nworkers = 3;
    bool plain = false;
    unsigned seed = (unsigned)time(NULL);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--url") == 0 && i + 1 < argc)
            url = argv[++i];
        else if (strcmp(argv[i], "--keys") == 0 && i + 1 < argc)
            nkeys = atoi(argv[++i]);
        else if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc)
            nworkers = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            seed = (unsigned)strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--plain") == 0)
            plain = true;
        else if (strcmp(argv[i], "--long") == 0)
            nkeys = 200, nworkers = 4;
        else {
            fprintf(stderr, "usage: once_kill --url URL [--keys N] [--workers N] [--seed N] [--long] "
                            "[--plain]\n");
            return 2;
        }
    }
    if (!url || nkeys < 1 || nkeys > 256 || nworkers < 1 || nworkers > MAX_WORKERS) {
        fprintf(stderr, "once_kill: give --url, 1..256 keys and 1..%d workers\n", MAX_WORKERS);
        return 2;
    }
    idem_store *s;
    if (idem_store_open(&s, url) != IDEM_OK) {
        fprintf(stderr, "once_kill: %s\n", idem_last_error());
        return 2;
    }
    backend = idem_store_backend(s);
    if (strcmp(backend, "memory") == 0) {
        fprintf(stderr, "once_kill: memory:// lives in one process; workers in others cannot share it\n");
        return 2;
    }
    idem_store_close(s);
    snprintf(prefix, sizeof prefix, "K%ld-%u:", (long)getpid(), seed);
    snprintf(procdir, sizeof procdir, "%s/once-kill-%ld", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
             (long)getpid());
    if (mkdir(procdir, 0700) != 0) {
        perror(procdir);
        return 2;
    }
    printf("once_kill: seed %u (--seed %u repeats it)\n", seed, seed);
    if (has_tx()) {
        void *db = db_open();
        if (!db || !db_exec(db, "CREATE TABLE IF NOT EXISTS ledger (k TEXT, who TEXT)")) {
            fprintf(stderr, "once_kill: cannot reach the %s database for the ledger\n", backend);
            return 2;
        }
        db_close(db);
        run_mode(M_RUN_TX, nkeys, nworkers, seed);
        run_mode(M_COMMIT_TX, nkeys, nworkers, seed + 1);
        if (plain)
            run_mode(M_PLAIN, nkeys, nworkers, seed + 3);
    }
    run_mode(M_STEPS, nkeys, nworkers, seed + 2);
    DIR *d = opendir(procdir);
    for (struct dirent *e; d && (e = readdir(d));) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s", procdir, e->d_name);
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            unlink(path);
    }
    if (d)
        closedir(d);
    rmdir(procdir);
    printf("once_kill: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
