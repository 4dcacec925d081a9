/*
 * tx_bench [--seconds S] [--rounds N] [--quick]: what exactly-once costs.
 *
 * 1. idem_run_tx() on SQLite and PostgreSQL, at 1 and 4 threads, new keys,
 *    each handler inserting one order row, beside
 *      raw:   the same claim (the driver's own claim member, called
 *             directly), then BEGIN, the same INSERT, the same fenced
 *             completion UPDATE and COMMIT on a connection of its own;
 *      plain: BEGIN, the INSERT, COMMIT: the work with no idempotency.
 *    Rounds alternate the three; the table gives ops/s, p50 and p99, the
 *    ratio library/raw (the goal is 0.9 or more) and what idem_run_tx adds
 *    per request over the plain INSERT transaction, in microseconds.
 * 2. A checkpoint beside a renewal (idem_extend) on every store: both are
 *    one fenced write of the key's record, one round trip.
 *
 * Servers are started through the test harness on free loopback ports and
 * stopped by PID. --quick (CI) checks only that every row ran without an
 * error; figures are for a person to read (bench/README.md).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <sqlite3.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "harness.h"

#define MAX_THREADS 4
#define LEASE_MS    30000
#define TTL_MS      86400000ull

static double g_seconds = 2.0;
static int    g_rounds = 3;
static bool   g_quick;
static int    g_failures;
static unsigned g_nonce;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "tx_bench: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* ---- the store's own database, for raw and plain ---- */

typedef struct db {
    bool     pg;
    sqlite3 *lite;
    PGconn  *conn;
} db;

static db db_open(const char *url)
{
    db d = {.pg = strncmp(url, "postgresql:", 11) == 0};
    if (d.pg) {
        d.conn = PQconnectdb(url);
        if (PQstatus(d.conn) != CONNECTION_OK)
            die("%s", PQerrorMessage(d.conn));
    } else if (sqlite3_open(url + strlen("sqlite://"), &d.lite) != SQLITE_OK) {
        die("cannot open %s", url);
    } else {
        sqlite3_busy_timeout(d.lite, 10000);
    }
    return d;
}

static void db_close(db *d)
{
    if (d->pg)
        PQfinish(d->conn);
    else
        sqlite3_close(d->lite);
}

/* Run sql with n binary parameters; false on failure. */
static bool db_exec(db *d, const char *sql, int n, const void *const *v, const int *len)
{
    if (d->pg) {
        int fmt[4] = {1, 1, 1, 1};
        PGresult *r = PQexecParams(d->conn, sql, n, NULL, (const char *const *)v, len, fmt, 0);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        return ok;
    }
    sqlite3_stmt *st;
    if (sqlite3_prepare_v3(d->lite, sql, -1, 0, &st, NULL) != SQLITE_OK)
        return false;
    for (int i = 0; i < n; i++)
        sqlite3_bind_blob(st, i + 1, v[i], len[i], SQLITE_STATIC);
    bool ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_finalize(st);
    return ok;
}

static bool insert_order(db *d, const char *key)
{
    const void *v[1] = {key};
    int len[1] = {(int)strlen(key)};
    return db_exec(d, d->pg ? "INSERT INTO bench_orders (k) VALUES ($1)" : "INSERT INTO bench_orders (k) VALUES (?1)",
                   1, v, len);
}

/* ---- the three sides ---- */

enum side { S_LIB, S_RAW, S_PLAIN, S_COUNT };
static const char *const side_name[S_COUNT] = {"idem_run_tx", "raw", "plain INSERT tx"};

typedef struct target {
    const char         *name;
    const char         *url;
    idem_store         *store;
    const idem_backend *driver;   /* the raw side's claim */
    void               *dstate;
} target;

typedef struct worker {
    target   *t;
    enum side side;
    int       tid, nthreads;
    unsigned  round;
    idem_layer *layer;
    uint64_t  ops, errors;
    uint32_t *lat;    /* ns / 1000 */
    size_t    nlat, cap;
} worker;

typedef struct order {
    const char *key;
    bool        pg;
} order;

/* The work: one order row, on the connection of the library's transaction. */
static int order_handler(void *arg, void *conn, idem_response *resp)
{
    const order *o = arg;
    db d = {.pg = o->pg, .lite = o->pg ? NULL : conn, .conn = o->pg ? conn : NULL};
    if (!insert_order(&d, o->key))
        return 1;
    return idem_response_set(resp, 201, "{\"id\":1}", 8) ? 1 : 0;
}

/* The raw client: the driver's claim, then the work and the same fenced
 * completion in one transaction of its own. */
static bool raw_op(worker *w, db *d, const char *key, uint64_t *rng)
{
    uint8_t token[IDEM_TOKEN_LEN];
    for (int i = 0; i < IDEM_TOKEN_LEN; i++) {
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
        token[i] = (uint8_t)*rng;
    }
    void *started, *completed;
    size_t slen, clen;
    if (idem_record_build(&started, &slen, IDEM_STATE_STARTED, token, idem_now_ms() + LEASE_MS, 0, NULL,
                          0) ||
        idem_record_build(&completed, &clen, IDEM_STATE_COMPLETED, token, 0, 201, "{\"id\":1}", 8))
        return false;
    void *existing = NULL;
    size_t elen = 0;
    uint32_t left;
    size_t klen = strlen(key);
    bool ok = w->t->driver->claim(w->t->dstate, key, klen, started, slen, LEASE_MS, &existing, &elen,
                                  &left) == IDEM_OK && !existing;
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%llu", TTL_MS);
    if (ok) {
        const void *v[4] = {completed, ttl, key, token};
        int len[4] = {(int)clen, (int)strlen(ttl), (int)klen, IDEM_TOKEN_LEN};
        int fmt_pg[4] = {1, 0, 1, 1};
        ok = db_exec(d, d->pg ? "BEGIN" : "BEGIN IMMEDIATE", 0, NULL, NULL) && insert_order(d, key);
        if (ok && d->pg) {
            PGresult *r = PQexecParams(d->conn, "UPDATE idempotency_keys SET state = 'C', value = $1, "
                                       "expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond' "
                                       "WHERE key = $3 AND token = $4 AND state = 'S'",
                                       4, NULL, (const char *const *)v, len, fmt_pg, 0);
            ok = PQresultStatus(r) == PGRES_COMMAND_OK && strcmp(PQcmdTuples(r), "1") == 0;
            PQclear(r);
        } else if (ok) {
            sqlite3_stmt *st;
            ok = sqlite3_prepare_v3(d->lite, "UPDATE idem_records SET state = 'C', value = ?1, expires_at = ?2 "
                                    "WHERE key = ?3 AND token = ?4 AND state = 'S'", -1, 0, &st, NULL) == SQLITE_OK;
            if (ok) {
                sqlite3_bind_blob(st, 1, completed, (int)clen, SQLITE_STATIC);
                sqlite3_bind_int64(st, 2, (sqlite3_int64)(idem_now_ms() + TTL_MS));
                sqlite3_bind_blob(st, 3, key, (int)klen, SQLITE_STATIC);
                sqlite3_bind_blob(st, 4, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
                ok = sqlite3_step(st) == SQLITE_DONE && sqlite3_changes(d->lite) == 1;
                sqlite3_finalize(st);
            }
        }
        ok = ok && db_exec(d, "COMMIT", 0, NULL, NULL);
        if (!ok)
            db_exec(d, "ROLLBACK", 0, NULL, NULL);
    }
    free(existing);
    free(started);
    free(completed);
    return ok;
}

static bool plain_op(db *d, const char *key)
{
    bool ok = db_exec(d, d->pg ? "BEGIN" : "BEGIN IMMEDIATE", 0, NULL, NULL) && insert_order(d, key) &&
              db_exec(d, "COMMIT", 0, NULL, NULL);
    if (!ok)
        db_exec(d, "ROLLBACK", 0, NULL, NULL);
    return ok;
}

static void lat_add(worker *w, uint64_t ns)
{
    if (w->nlat == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 4096;
        w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
        if (!w->lat)
            die("out of memory");
    }
    w->lat[w->nlat++] = (uint32_t)(ns / 1000);
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    bool pg = strcmp(w->t->name, "postgresql") == 0;
    db d = {0};
    if (w->side != S_LIB)
        d = db_open(w->t->url);
    uint64_t rng = now_ns() | 1, end = now_ns() + (uint64_t)(g_seconds * 1e9);
    char key[64];
    for (unsigned long n = 0; now_ns() < end; n++) {
        snprintf(key, sizeof key, "tx%08x-%d-%u-%u-%d-%lu", g_nonce, w->nthreads, w->round, w->side, w->tid, n);
        uint64_t t0 = now_ns();
        bool ok;
        if (w->side == S_LIB) {
            order o = {.key = key, .pg = pg};
            idem_request req = {.key = key, .key_len = strlen(key)};
            idem_reply reply = {0};
            int rc = idem_run_tx(w->layer, &req, order_handler, &o, &reply);
            ok = rc == IDEM_OK && reply.outcome == IDEM_EXECUTED;
            if (!ok && !w->errors)
                fprintf(stderr, "tx_bench: %s: %s (outcome %d, handler %d): %s\n", w->t->name, idem_error_name(rc),
                        reply.outcome, reply.handler_error, idem_last_error());
            idem_reply_clear(&reply);
        } else if (w->side == S_RAW) {
            char full[80];
            snprintf(full, sizeof full, "idem:%s", key);
            ok = raw_op(w, &d, full, &rng);
        } else {
            ok = plain_op(&d, key);
        }
        lat_add(w, now_ns() - t0);
        w->ops += ok;
        w->errors += !ok;
    }
    if (w->side != S_LIB)
        db_close(&d);
    return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct result {
    double ops_s, p50, p99;
    uint64_t errors;
} result;

/* Rounds of every side in turn, at nthreads; one result per side. */
static void measure(target *t, int nthreads, result out[S_COUNT])
{
    uint64_t ops[S_COUNT] = {0}, errors[S_COUNT] = {0};
    double secs[S_COUNT] = {0};
    uint32_t *lat[S_COUNT] = {0};
    size_t nlat[S_COUNT] = {0};
    idem_layer *layer;
    if (idem_layer_new(&layer, t->store, NULL) != IDEM_OK)
        die("%s", idem_last_error());
    for (int r = 0; r < g_rounds; r++) {
        for (int sd = 0; sd < S_COUNT; sd++) {
            worker w[MAX_THREADS];
            pthread_t th[MAX_THREADS];
            uint64_t t0 = now_ns();
            for (int i = 0; i < nthreads; i++) {
                w[i] = (worker){.t = t, .side = (enum side)sd, .tid = i, .nthreads = nthreads,
                              .round = (unsigned)r, .layer = layer};
                pthread_create(&th[i], NULL, worker_main, &w[i]);
            }
            for (int i = 0; i < nthreads; i++) {
                pthread_join(th[i], NULL);
                ops[sd] += w[i].ops;
                errors[sd] += w[i].errors;
                lat[sd] = realloc(lat[sd], (nlat[sd] + w[i].nlat) * sizeof **lat);
                if (!lat[sd])
                    die("out of memory");
                memcpy(lat[sd] + nlat[sd], w[i].lat, w[i].nlat * sizeof **lat);
                nlat[sd] += w[i].nlat;
                free(w[i].lat);
            }
            secs[sd] += (double)(now_ns() - t0) / 1e9;
        }
    }
    idem_layer_free(layer);
    for (int sd = 0; sd < S_COUNT; sd++) {
        qsort(lat[sd], nlat[sd], sizeof **lat, cmp_u32);
        out[sd] = (result){
            .ops_s = (double)ops[sd] / secs[sd],
            .p50 = nlat[sd] ? lat[sd][nlat[sd] / 2] : 0,
            .p99 = nlat[sd] ? lat[sd][nlat[sd] * 99 / 100] : 0,
            .errors = errors[sd],
        };
        free(lat[sd]);
        if (errors[sd] || !ops[sd]) {
            fprintf(stderr, "tx_bench: %s, %s, %d threads: %llu errors, %llu ops\n", t->name,
                    side_name[sd], nthreads, (unsigned long long)errors[sd], (unsigned long long)ops[sd]);
            g_failures++;
        }
    }
}

/* Microseconds per call of idem_checkpoint() and of idem_extend() on one
 * claim of the store at url. */
static void checkpoint_cost(const char *name, const char *url)
{
    idem_store *s;
    idem_layer *l;
    if (idem_store_open(&s, url) != IDEM_OK || idem_layer_new(&l, s, NULL) != IDEM_OK)
        die("%s: %s", name, idem_last_error());
    idem_request req = {.key = "checkpoint-cost", .key_len = 15};
    idem_claim *c;
    idem_reply reply = {0};
    if (idem_begin(l, &req, &c, &reply) != IDEM_OK || !c)
        die("%s: %s", name, idem_last_error());
    int n = g_quick ? 50 : 2000;
    char data[256];
    memset(data, 'd', sizeof data);
    uint64_t t0 = now_ns();
    for (int i = 0; i < n; i++)
        if (idem_checkpoint(c, "step", data, sizeof data) != IDEM_OK)
            g_failures++;
    uint64_t t1 = now_ns();
    for (int i = 0; i < n; i++)
        if (idem_extend(c, LEASE_MS) != IDEM_OK)
            g_failures++;
    uint64_t t2 = now_ns();
    idem_abort(c);
    printf("| %-10s | %8.1f | %8.1f |\n", name, (double)(t1 - t0) / n / 1000, (double)(t2 - t1) / n / 1000);
    idem_layer_free(l);
    idem_store_close(s);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            g_seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            g_rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0)
            g_quick = true, g_seconds = 0.3, g_rounds = 1;
        else
            die("usage: tx_bench [--seconds S] [--rounds N] [--quick]");
    }
    if (g_seconds <= 0 || g_rounds < 1)
        die("give --seconds above 0 and --rounds of 1 or more");
    g_nonce = (unsigned)now_ns();
    static const char *const kinds[] = {"sqlite", "postgresql", "redis", "memcached"};
    idem_test_server srv[4];
    for (int i = 0; i < 4; i++)
        if (idem_test_server_start(&srv[i], kinds[i]) != 0)
            die("cannot start a %s server", kinds[i]);

    printf("idem_run_tx beside a raw client doing the same claim, INSERT and completion in one\n"
           "transaction, and the plain INSERT transaction; new keys, %.1f s x %d rounds per cell\n\n",
           g_seconds, g_rounds);
    printf("| store      | threads | idem_run_tx ops/s (p50/p99 us) | raw ops/s (p50/p99 us) | plain ops/s "
           "(p50/p99 us) | lib/raw | added us/request |\n|---|---|---|---|---|---|---|\n");
    for (int k = 0; k < 2; k++) {
        target t = {.name = kinds[k], .url = srv[k].url};
        if (idem_store_open(&t.store, t.url) != IDEM_OK)
            die("%s", idem_last_error());
        idem_url *u;
        t.driver = idem_backend_find(kinds[k]);
        if (!t.driver || idem_url_parse(&u, t.url) != IDEM_OK || t.driver->open(&t.dstate, u) != IDEM_OK)
            die("%s driver: %s", kinds[k], idem_last_error());
        idem_url_free(u);
        db d = db_open(t.url);
        if (!db_exec(&d, "CREATE TABLE IF NOT EXISTS bench_orders (k TEXT, amount BIGINT DEFAULT 1000)", 0, NULL,
                     NULL))
            die("cannot make the orders table in %s", kinds[k]);
        db_close(&d);
        for (int threads = 1; threads <= MAX_THREADS; threads *= 4) {
            result r[S_COUNT];
            measure(&t, threads, r);
            double added = r[S_LIB].ops_s > 0 && r[S_PLAIN].ops_s > 0
                               ? (1e6 / r[S_LIB].ops_s - 1e6 / r[S_PLAIN].ops_s) * threads
                               : 0;
            printf("| %-10s | %d | %.0f (%.0f/%.0f) | %.0f (%.0f/%.0f) | %.0f (%.0f/%.0f) | %.2f | %.0f |\n",
                   t.name, threads, r[S_LIB].ops_s, r[S_LIB].p50, r[S_LIB].p99, r[S_RAW].ops_s, r[S_RAW].p50,
                   r[S_RAW].p99, r[S_PLAIN].ops_s, r[S_PLAIN].p50, r[S_PLAIN].p99,
                   r[S_RAW].ops_s > 0 ? r[S_LIB].ops_s / r[S_RAW].ops_s : 0, added);
        }
        t.driver->close(t.dstate);
        idem_store_close(t.store);
    }
    printf("\nA checkpoint (256 bytes) beside a renewal: one fenced write each, microseconds per call\n\n"
           "| store      | checkpoint | extend |\n|---|---|---|\n");
    for (int k = 0; k < 4; k++)
        checkpoint_cost(kinds[k], srv[k].url);
    for (int i = 0; i < 4; i++)
        idem_test_server_stop(&srv[i]);
    printf("\ntx_bench: %s\n", g_failures ? "some rows failed (see above)" : "every row ran without an error");
    return g_failures ? 1 : 0;
}
