/*
 * payment_api: an HTTP payment API whose retries never charge twice.
 *
 *   payment_api [--backend NAME | --url URL] [--port N] [--name NAME] [--lease-ms N]
 *
 *   POST /payments    body {"amount": N}, header Idempotency-Key: "..."
 *                     201, Location: /payments/<id>, {"id":..,"amount":N,"charged_by":NAME}
 *   GET  /stats       {"name":NAME,"charges":N,"running":M}: charges this process
 *                     made, and charges under way
 *
 * Demo switches, as request headers: X-Demo-Delay-Ms: N (the charge takes N
 * ms), X-Demo-Fail: 1 (the card processor fails: nothing charged, 503).
 * Several processes on one store answer as one: a retry sent to any of them
 * replays the first answer. On PostgreSQL and SQLite each payment is also a
 * row of a payments table in the store's own database, written with
 * idem_run_tx(): the row and the stored answer commit together, so a
 * process killed at any instant leaves both or neither. Listens on
 * 127.0.0.1 only; over libmicrohttpd, one thread per connection.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>

#include <idempotency/http.h>
#include <idempotency/idempotency.h>

#ifdef IDEM_DEMO_HAVE_SQLITE
#include <sqlite3.h>
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
#include <libpq-fe.h>
#endif

#define MAX_BODY      65536
#define MAX_DELAY_MS  600000
#define REOPEN_MS     500

static const char *name = "payment_api";
static bool        layer_off;            /* --no-idempotency: the benchmark's baseline */
static atomic_long charges;               /* payments this process made */
static atomic_long running;               /* charges under way right now */

/* The store, opened again in the background of requests while it is down
 * at start: the server never exits on a store failure. */
static const char     *store_url;
static idem_options    opts;
static pthread_mutex_t open_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic(idem_layer *) layer;
static idem_store     *store;
static uint64_t        last_try_ms;
static const char     *db_kind;           /* "sqlite" or "postgresql": payments are rows; else NULL */

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the payments table, in the store's own database ---- */

#define PAYMENTS_SCHEMA "CREATE TABLE IF NOT EXISTS payments (id TEXT PRIMARY KEY, amount BIGINT NOT NULL, " \
                        "charged_by TEXT NOT NULL)"

/* Run sql with up to three text parameters on conn (a sqlite3 * or a
 * PGconn * of the store's database); true when it worked. */
static bool db_exec(void *conn, const char *sql, int n, const char *const *params)
{
#ifdef IDEM_DEMO_HAVE_SQLITE
    if (strcmp(db_kind, "sqlite") == 0) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(conn, sql, -1, &st, NULL) != SQLITE_OK)
            return false;
        for (int i = 0; i < n; i++)
            sqlite3_bind_text(st, i + 1, params[i], -1, SQLITE_STATIC);
        bool ok = sqlite3_step(st) == SQLITE_DONE;
        sqlite3_finalize(st);
        return ok;
    }
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
    if (strcmp(db_kind, "postgresql") == 0) {
        PGresult *r = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        return ok;
    }
#endif
    (void)conn, (void)sql, (void)n, (void)params;
    return false;
}

/* Make the payments table, once, on a connection of our own; two processes
 * starting together may race on PostgreSQL's catalog, so one more try. */
static bool payments_table(void)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        bool ok = false;
#ifdef IDEM_DEMO_HAVE_SQLITE
        if (strcmp(db_kind, "sqlite") == 0) {
            sqlite3 *db;
            if (sqlite3_open(store_url + strlen("sqlite://"), &db) == SQLITE_OK) {
                sqlite3_busy_timeout(db, 5000);
                ok = db_exec(db, PAYMENTS_SCHEMA, 0, NULL);
            }
            sqlite3_close(db);
        }
#endif
#ifdef IDEM_DEMO_HAVE_POSTGRESQL
        if (strcmp(db_kind, "postgresql") == 0) {
            PGconn *pg = PQconnectdb(store_url);
            ok = PQstatus(pg) == CONNECTION_OK && db_exec(pg, PAYMENTS_SCHEMA, 0, NULL);
            PQfinish(pg);
        }
#endif
        if (ok)
            return true;
    }
    fprintf(stderr, "%s: cannot make the payments table in the %s database\n", name, db_kind);
    return false;
}

/* IDEM_OK and a layer, or the error of opening the store (logged). */
static int layer_get(idem_layer **out)
{
    if ((*out = atomic_load(&layer)) != NULL)
        return IDEM_OK;
    int rc = IDEM_EBACKEND;
    pthread_mutex_lock(&open_mu);
    if ((*out = atomic_load(&layer)) != NULL) {
        rc = IDEM_OK;
    } else if (mono_ms() - last_try_ms >= REOPEN_MS || last_try_ms == 0) {
        last_try_ms = mono_ms();
        idem_layer *l = NULL;
        rc = idem_store_open(&store, store_url);
        if (rc == IDEM_OK) {
            const char *b = idem_store_backend(store);
            db_kind = strcmp(b, "sqlite") == 0 || strcmp(b, "postgresql") == 0 ? b : NULL;
            if (db_kind && !payments_table())
                rc = IDEM_EBACKEND;
        }
        if (rc == IDEM_OK && (rc = idem_layer_new(&l, store, &opts)) != IDEM_OK) {
            idem_store_close(store);
            store = NULL;
        }
        if (rc == IDEM_OK)
            atomic_store(&layer, *out = l);
        else
            fprintf(stderr, "%s: store: %s\n", name, idem_last_error());
    }
    pthread_mutex_unlock(&open_mu);
    return rc;
}

/* ---- one payment ---- */

typedef struct payment {
    long long amount;
    long      delay_ms;
    bool      fail;
} payment;

/* What a charge answers. */
typedef struct receipt {
    char id[32], location[64], body[192];
    int  body_len;
} receipt;

/* The card processor: false when it fails (X-Demo-Fail), and nothing is
 * charged; else the charge is made and described in *r. */
static bool card_charge(const payment *p, receipt *r)
{
    atomic_fetch_add(&running, 1);
    if (p->delay_ms) {
        struct timespec ts = {p->delay_ms / 1000, (p->delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0)
            ;
    }
    uint8_t rnd[8];
    if (p->fail || getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        atomic_fetch_sub(&running, 1);
        return false;
    }
    snprintf(r->id, sizeof r->id, "pay_%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
             rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    snprintf(r->location, sizeof r->location, "/payments/%s", r->id);
    r->body_len = snprintf(r->body, sizeof r->body, "{\"id\":\"%s\",\"amount\":%lld,\"charged_by\":\"%s\"}",
                           r->id, p->amount, name);
    atomic_fetch_add(&charges, 1); /* the charge itself */
    atomic_fetch_sub(&running, 1);
    return true;
}

/* Charge the card and set the response, which is stored with its header
 * fields: every retry, to any process, gets it back. 0, or 1 when nothing
 * was charged. */
static int charge_into(const payment *p, idem_response *resp, receipt *out)
{
    receipt r;
    if (!card_charge(p, &r)) {
        /* nothing charged: 503, and the key is freed for a retry */
        idem_response_set(resp, 503, NULL, 0);
        idem_response_add_header(resp, "Retry-After", "1");
        return 1;
    }
    /* Fixed, valid fields and a body far below the limits: these cannot
     * fail after the charge. */
    idem_response_add_header(resp, "Content-Type", "application/json");
    idem_response_add_header(resp, "Location", r.location);
    idem_response_set(resp, 201, r.body, (size_t)r.body_len);
    *out = r;
    return 0;
}

/* The handler of idem_run(): charge the card once. */
static int charge(void *arg, idem_response *resp)
{
    receipt r;
    return charge_into(arg, resp, &r);
}

/* The same on PostgreSQL and SQLite: the payment is also a row, written in
 * the transaction that stores the answer. */
static int charge_tx(void *arg, void *conn, idem_response *resp)
{
    const payment *p = arg;
    receipt r;
    if (charge_into(p, resp, &r) != 0)
        return 1;
    char amount[24];
    snprintf(amount, sizeof amount, "%lld", p->amount);
    const char *params[3] = {r.id, amount, name};
    bool pg = strcmp(db_kind, "postgresql") == 0;
    if (!db_exec(conn, pg ? "INSERT INTO payments VALUES ($1, $2, $3)" : "INSERT INTO payments VALUES (?, ?, ?)",
                 3, params)) {
        idem_response_set(resp, 500, NULL, 0);
        return 1; /* rolled back, and the key freed */
    }
    return 0;
}

/* {"amount": N} with N a whole number from 1 to 10^12; nothing else. */
static bool parse_amount(const char *s, size_t len, long long *out)
{
    const char *end = s + len;
#define SKIP_WS() while (s < end && strchr(" \t\r\n", *s)) s++
    SKIP_WS();
    if (s == end || *s++ != '{')
        return false;
    SKIP_WS();
    if ((size_t)(end - s) < 8 || memcmp(s, "\"amount\"", 8) != 0)
        return false;
    s += 8;
    SKIP_WS();
    if (s == end || *s++ != ':')
        return false;
    SKIP_WS();
    long long v = 0;
    int digits = 0;
    while (s < end && *s >= '0' && *s <= '9' && digits < 14)
        v = v * 10 + (*s++ - '0'), digits++;
    SKIP_WS();
    if (s == end || *s++ != '}')
        return false;
    SKIP_WS();
#undef SKIP_WS
    *out = v;
    return s == end && digits > 0 && digits < 14 && v >= 1 && v <= 1000000000000LL;
}

/* ---- HTTP ---- */

typedef struct request {
    char  *target;        /* the request target as received: path and query */
    bool   headers_seen;  /* the access handler's first call is done */
    char  *body;
    size_t len;
    bool   too_big;
} request;

typedef struct key_lines {
    const char *v[2];
    size_t      n;    /* how many lines; only the first two are kept */
} key_lines;

static enum MHD_Result collect_key(void *cls, enum MHD_ValueKind kind, const char *key,
                                   const char *value)
{
    (void)kind;
    key_lines *k = cls;
    if (strcasecmp(key, "Idempotency-Key") == 0) {
        if (k->n < 2)
            k->v[k->n] = value ? value : "";
        k->n++;
    }
    return MHD_YES;
}

static enum MHD_Result send_answer(struct MHD_Connection *conn, const idem_http_answer *ans)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(ans->body_len, (void *)ans->body,
                                                             MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    for (size_t i = 0; i < ans->nheaders; i++)
        if (MHD_add_response_header(r, ans->headers[i].name, ans->headers[i].value) != MHD_YES)
            fprintf(stderr, "%s: libmicrohttpd refused header field %s\n", name, ans->headers[i].name);
    enum MHD_Result ok = MHD_queue_response(conn, (unsigned)ans->status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result send_problem(struct MHD_Connection *conn, int status, const char *detail)
{
    idem_http_answer ans;
    idem_http_answer_problem(&ans, status, detail);
    enum MHD_Result ok = send_answer(conn, &ans);
    idem_http_answer_clear(&ans);
    return ok;
}

/* --no-idempotency: the same charge and answer with no layer, for the
 * benchmark's baseline. */
static enum MHD_Result charge_without_layer(struct MHD_Connection *conn, const payment *p)
{
    receipt r;
    if (!card_charge(p, &r))
        return send_problem(conn, 503, "the card processor failed; nothing was charged");
    idem_header h[] = {{"Content-Type", "application/json"}, {"Location", r.location}};
    idem_http_answer ans = {.status = 201, .headers = h, .nheaders = 2,
                            .body = (const unsigned char *)r.body, .body_len = (size_t)r.body_len};
    return send_answer(conn, &ans);
}

static enum MHD_Result post_payment(struct MHD_Connection *conn, const request *rq)
{
    payment p = {0};
    const char *delay = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Demo-Delay-Ms");
    const char *fail = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Demo-Fail");
    if (delay) {
        char *end;
        p.delay_ms = strtol(delay, &end, 10);
        if (*delay < '0' || *delay > '9' || *end || p.delay_ms > MAX_DELAY_MS)
            return send_problem(conn, 400, "X-Demo-Delay-Ms must be a whole number of milliseconds, "
                                "at most 600000");
    }
    p.fail = fail && strcmp(fail, "1") == 0;
    if (rq->too_big)
        return send_problem(conn, 413, "the body is over 65536 bytes");

    /* The key first: a request without a valid one is refused whatever
     * its body. */
    int rc = IDEM_OK;
    char key[256]; /* max_key_len + 1 */
    size_t key_len = 0;
    if (!layer_off) {
        key_lines k = {0};
        MHD_get_connection_values(conn, MHD_HEADER_KIND, collect_key, &k);
        rc = idem_http_key_parse(key, sizeof key, &key_len, k.v, k.n < 2 ? k.n : 2);
    }
    if (rc == IDEM_OK && !parse_amount(rq->body ? rq->body : "", rq->len, &p.amount))
        return send_problem(conn, 400, "the body must be {\"amount\": N}, N a whole number from 1 "
                            "to 1000000000000");
    if (layer_off)
        return charge_without_layer(conn, &p);

    uint8_t fp[IDEM_HTTP_FINGERPRINT_LEN];
    idem_layer *l = NULL;
    idem_reply reply = {0};
    if (rc == IDEM_OK)
        rc = idem_http_fingerprint(fp, "POST", rq->target, rq->body, rq->len, NULL, 0);
    if (rc == IDEM_OK)
        rc = layer_get(&l);
    if (rc == IDEM_OK) {
        idem_request req = {.key = key, .key_len = key_len, .fingerprint = fp,
                            .fingerprint_len = sizeof fp};
        rc = db_kind ? idem_run_tx(l, &req, charge_tx, &p, &reply) : idem_run(l, &req, charge, &p, &reply);
        if (rc != IDEM_OK)
            fprintf(stderr, "%s: %s: %s\n", name, idem_error_name(rc), idem_last_error());
    }
    idem_http_answer ans;
    idem_http_answer_make(&ans, rc, &reply);
    enum MHD_Result ok = send_answer(conn, &ans);
    idem_http_answer_clear(&ans);
    idem_reply_clear(&reply);
    return ok;
}

static enum MHD_Result get_stats(struct MHD_Connection *conn)
{
    char body[160];
    int n = snprintf(body, sizeof body, "{\"name\":\"%s\",\"charges\":%ld,\"running\":%ld}", name,
                     atomic_load(&charges), atomic_load(&running));
    idem_header h[] = {{"Content-Type", "application/json"}};
    idem_http_answer ans = {.status = 200, .headers = h, .nheaders = 1,
                            .body = (const unsigned char *)body, .body_len = (size_t)n};
    return send_answer(conn, &ans);
}

/* A request begins. libmicrohttpd hands the access handler the path only,
 * decoded and without its query, while the fingerprint covers the target
 * as received, path and query (http.h): a payment sent to
 * /payments?currency=usd is not a retry of one sent with currency=eur.
 * This callback alone sees that target; what it returns is the request's
 * *con_cls. NULL (out of memory) ends the connection. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)cls, (void)conn;
    request *rq = calloc(1, sizeof *rq);
    if (rq && !(rq->target = strdup(uri))) {
        free(rq);
        rq = NULL;
    }
    return rq;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)cls, (void)version;
    request *rq = *con_cls;
    if (!rq)
        return MHD_NO;
    if (!rq->headers_seen) {
        rq->headers_seen = true;
        return MHD_YES;
    }
    if (*upload_size) {
        if (rq->len + *upload_size > MAX_BODY) {
            rq->too_big = true;
        } else {
            char *grown = realloc(rq->body, rq->len + *upload_size + 1);
            if (!grown)
                return MHD_NO;
            memcpy(grown + rq->len, upload, *upload_size);
            rq->body = grown;
            rq->len += *upload_size;
            rq->body[rq->len] = '\0';
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (strcmp(url, "/payments") == 0) {
        if (strcmp(method, "POST") == 0)
            return post_payment(conn, rq);
        return send_problem(conn, 405, "use POST /payments");
    }
    if (strcmp(url, "/stats") == 0 && strcmp(method, "GET") == 0)
        return get_stats(conn);
    return send_problem(conn, 404, "no such resource; this server answers POST /payments");
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode why)
{
    (void)cls, (void)conn, (void)why;
    request *rq = *con_cls;
    if (rq) {
        free(rq->target);
        free(rq->body);
        free(rq);
        *con_cls = NULL;
    }
}

/* ---- the program ---- */

static void usage(FILE *f)
{
    fputs("usage: payment_api [--backend NAME | --url URL] [--port N] [--name NAME] [--lease-ms N]\n"
          "\n"
          "An HTTP payment API on 127.0.0.1 whose retries never charge twice, however many\n"
          "processes share its store.\n"
          "\n"
          "  POST /payments  body {\"amount\": N} and an Idempotency-Key header (\"a string\", or\n"
          "                  a bare token): 201, Location: /payments/<id>, and a JSON body with\n"
          "                  the id, the amount and the --name of the process that charged.\n"
          "                  A retry gets the same answer with Idempotent-Replayed: true; 409 +\n"
          "                  Retry-After while the first runs; 422 for the key with another\n"
          "                  body or query; 400 for a missing or malformed key; 503 +\n"
          "                  Retry-After while the store is down.\n"
          "                  Request headers for the demo: X-Demo-Delay-Ms: N (the charge takes\n"
          "                  N ms), X-Demo-Fail: 1 (the card processor fails: nothing charged,\n"
          "                  503, the key is freed for a retry).\n"
          "  GET /stats      {\"name\": NAME, \"charges\": N, \"running\": M}: charges this\n"
          "                  process made, and charges under way\n"
          "\n"
          "  --backend NAME  sqlite (default; $TMPDIR/payment_api.db), redis (redis://127.0.0.1:6379),\n"
          "                  memcached (memcached://127.0.0.1:11211), memory (memory://, this\n"
          "                  process only), postgresql (postgresql://postgres@127.0.0.1:5432/postgres)\n"
          "  --url URL       a store URL of your own, e.g. redis://127.0.0.1:6380/2\n"
          "  --port N        TCP port on 127.0.0.1 (default 8080)\n"
          "  --name NAME     this process's name in the answers (default payment_api)\n"
          "  --lease-ms N    how long a charge may run before its key can be taken over\n"
          "                  (default 60000)\n"
          "  --no-idempotency  a benchmark switch: charge every request, no layer, no store\n"
          "                  (the baseline that bench/README.md compares with)\n"
          "  --help          this text\n",
          f);
}

static const char *default_url(const char *backend, char *buf, size_t len)
{
    if (strcmp(backend, "sqlite") == 0) {
        const char *tmp = getenv("TMPDIR");
        if (!tmp || tmp[0] != '/' || strpbrk(tmp, "?#% \t\r\n"))
            tmp = "/tmp";
        snprintf(buf, len, "sqlite://%s/payment_api.db", tmp);
        return buf;
    }
    if (strcmp(backend, "redis") == 0)
        return "redis://127.0.0.1:6379";
    if (strcmp(backend, "memcached") == 0)
        return "memcached://127.0.0.1:11211";
    if (strcmp(backend, "memory") == 0)
        return "memory://";
    if (strcmp(backend, "postgresql") == 0 || strcmp(backend, "postgres") == 0)
        return "postgresql://postgres@127.0.0.1:5432/postgres";
    return NULL;
}

static bool parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return false;
    unsigned long v = strtoul(s, &end, 10);
    if (*end || v > max)
        return false;
    *out = v;
    return true;
}

int main(int argc, char *argv[])
{
    const char *backend = "sqlite", *url = NULL;
    unsigned long port = 8080, lease_ms = 60000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--no-idempotency") == 0) {
            layer_off = true;
        } else if (v && strcmp(a, "--backend") == 0) {
            backend = v, i++;
        } else if (v && strcmp(a, "--url") == 0) {
            url = v, i++;
        } else if (v && strcmp(a, "--name") == 0 && v[0] && !strpbrk(v, "\"\\") && strlen(v) < 64) {
            name = v, i++;
        } else if (v && strcmp(a, "--port") == 0 && parse_uint(v, 65535, &port)) {
            i++;
        } else if (v && strcmp(a, "--lease-ms") == 0 && parse_uint(v, UINT32_MAX, &lease_ms) &&
                   lease_ms > 0) {
            i++;
        } else {
            fprintf(stderr, "payment_api: unknown, incomplete or invalid argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    char buf[4200];
    if (!url && !(url = default_url(backend, buf, sizeof buf))) {
        fprintf(stderr, "payment_api: unknown backend '%s'; use sqlite, redis, memcached, memory or "
                "postgresql, or --url\n", backend);
        return 2;
    }
    store_url = url;
    idem_options_init(&opts);
    opts.lease_ms = (uint32_t)lease_ms;
    opts.key_prefix = "payments:";

    if (!layer_off) {
        idem_layer *l;
        int rc = layer_get(&l);
        if (rc != IDEM_OK && rc != IDEM_EBACKEND) {
            fprintf(stderr, "payment_api: cannot use the store; see above\n");
            return 2; /* a wrong URL or a driver not built in: no use waiting */
        }
        if (rc == IDEM_EBACKEND)
            fprintf(stderr, "%s: the store is down; answering 503 until it is back\n", name);
    }

    /* Stop on SIGINT or SIGTERM: block them here, so every thread of the
     * server inherits the mask, and wait for one below. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG,
        (uint16_t)port, NULL, NULL, on_request, NULL,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
        MHD_OPTION_URI_LOG_CALLBACK, on_uri, NULL,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
        MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "payment_api: cannot listen on 127.0.0.1:%lu (in use?)\n", port);
        return 2;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    int scheme = (int)strcspn(url, ":"); /* the store by its scheme: a URL may hold a password */
    printf("%s: listening on http://127.0.0.1:%u/payments (%.*s store%s)\n", name,
           info ? info->port : (unsigned)port, scheme, url, layer_off ? " unused: no idempotency" : "");
    fflush(stdout);

    int sig;
    sigwait(&stop, &sig);
    MHD_stop_daemon(d);
    idem_layer_free(atomic_load(&layer));
    idem_store_close(store);
    return 0;
}
