/*
 * idem_bench: libidempotency beside a raw client of the same store.
 *
 * For each store built in (sqlite, redis, memcached) and each path (new key,
 * replay, in-progress, mix of 80% replays and 20% new keys), at 1 and 4
 * threads (and, for SQLite, 2 processes on one file), it runs rounds of the
 * library and rounds of a raw client in turn, on the same server, and
 * reports operations per second, latency percentiles, store round trips per
 * operation, and the ratio library/raw. Then it measures the bytes each
 * store keeps per record. See bench/README.md.
 *
 * What "raw" is: a minimal hand-written client of the store, using the same
 * client library (sqlite3, hiredis, libmemcached) and one connection per
 * thread, that does what an idempotency layer must do at the least: one
 * algorithm for every path (it cannot know whether a key exists), the same
 * key lengths, the same record bytes (64-byte header, 8-byte status and
 * length, 100-byte body), the same lease and TTL. It skips all the work of
 * the library itself: checking arguments, hashing the fingerprint (the raw
 * client compares a digest computed once), drawing a random token from the
 * kernel (it uses a xorshift generator), allocating and encoding records
 * (it patches a template), error messages and counters. So library/raw is
 * what the library costs on top of the store, including any round trip its
 * driver sends that the minimal client does not. Per store:
 *
 *   sqlite     claim: SELECT the live record; when there is none, one
 *              autocommit INSERT .. ON CONFLICT DO UPDATE .. WHERE expired
 *              (SELECT again when it changed nothing). commit: one fenced
 *              UPDATE. Same file, same table, same pragmas as the driver
 *              (WAL, synchronous=FULL, busy timeout 5 s).
 *   redis      claim: SET key rec NX PX lease GET (one command returns the
 *              existing record, Redis >= 7.0). commit: EVALSHA of a script
 *              that replaces the record only while it is STARTED with our
 *              token.
 *   memcached  claim: get; on a miss, add (get again when add loses).
 *              commit: gets (token check, CAS id) then cas. libmemcached has
 *              no claim-and-return-the-record and no fenced write in one
 *              command, so the raw floor is replay 1, new key 4 round trips.
 *   postgresql claim: the driver's own prepared statement (a CTE that reads the
 *              live row and otherwise INSERTs .. ON CONFLICT DO UPDATE ..
 *              RETURNING). commit: its fenced UPDATE. The same statement
 *              texts, binary parameters and results, through PQexecPrepared
 *              on one blocking connection per thread.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "harness.h"
#include "internal.h"

#ifdef IDEM_BENCH_HAVE_SQLITE3
#include <sqlite3.h>
#endif
#ifdef IDEM_BENCH_HAVE_HIREDIS
#include <hiredis/hiredis.h>
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
#include <libmemcached/memcached.h>
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
#include <libpq-fe.h>
#endif

#define BODY_LEN      100
#define KEYSET        256          /* keys prepared for the replay and in-progress paths */
#define LEASE_MS      600000u      /* long enough that prepared claims outlive a run */
#define TTL_S         3600u
#define REC_MAX       (IDEM_RECORD_COMPLETED_OVERHEAD + BODY_LEN)
#define MAX_THREADS   16 /* 16t runs only when --conc names it */
#define MAX_PROCS     2
#define PROC_LAT_CAP  (1u << 20)   /* latency samples one child process keeps per round */
#define KEY_LEN       26           /* every key of every path and side */

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

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
    fputs("idem_bench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Latency samples in nanoseconds. */
typedef struct samples {
    uint32_t *v;
    size_t    n, cap;
} samples;

static void samples_add(samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v)
            die("out of memory for latency samples");
    }
    s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static void samples_append(samples *dst, const uint32_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        samples_add(dst, v[i]);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* The q-quantile in microseconds (nearest rank). */
static double quantile_us(samples *s, double q)
{
    if (!s->n)
        return 0;
    size_t i = (size_t)ceil(q * (double)s->n);
    i = i ? i - 1 : 0;
    if (i >= s->n)
        i = s->n - 1;
    return s->v[i] / 1000.0;
}

/* ------------------------------------------------------------------------ */
/* Round trips                                                              */
/* ------------------------------------------------------------------------ */

/*
 * How round trips are counted, per store (the same way for library and raw
 * rounds, which never overlap):
 *   sqlite     every statement started: an auto-extension installs a
 *              SQLITE_TRACE_STMT callback on every connection the process
 *              opens (the driver's and the raw client's alike), and a commit
 *              hook counts write transactions. An embedded store has no
 *              network round trip; a statement is the unit of work and a
 *              write transaction the unit of locking and fsync.
 *   redis      INFO stats total_writes_processed: one per reply the server
 *              wrote, so one per request/response exchange (commands run
 *              inside a Lua script are not extra exchanges; commandstats
 *              would count them). Less the reply to our own previous INFO.
 *   memcached  stats: cmd_get + cmd_set (set, add, cas, replace, append) +
 *              cmd_touch + delete_hits + delete_misses + incr/decr hits and
 *              misses; `stats` itself counts in none of them.
 *   postgresql calls of pg_stat_statements (the server the harness starts for
 *              the benchmark loads it; track_utility off, so PREPARE and
 *              SET at connect do not count), less the reading queries.
 *              Every statement is one round trip for both sides.
 * Connections are opened before a round starts and its counters are read,
 * so neither connecting nor preparing counts. The SQLite counters belong to
 * each process: a child process reports the part it counted itself.
 */
typedef struct counters {
    _Atomic uint64_t stmts;
    _Atomic uint64_t write_tx;
} counters;

static counters g_count_mem;
static counters *g_count = &g_count_mem;

#ifdef IDEM_BENCH_HAVE_SQLITE3
static int trace_stmt(unsigned type, void *ctx, void *p, void *x)
{
    (void)ctx, (void)p, (void)x;
    if (type == SQLITE_TRACE_STMT)
        atomic_fetch_add_explicit(&g_count->stmts, 1, memory_order_relaxed);
    return 0;
}

static int count_commit(void *ctx)
{
    (void)ctx;
    atomic_fetch_add_explicit(&g_count->write_tx, 1, memory_order_relaxed);
    return 0;
}

static int count_on_open(sqlite3 *db, char **err, const void *api)
{
    (void)err, (void)api;
    sqlite3_trace_v2(db, SQLITE_TRACE_STMT, trace_stmt, NULL);
    sqlite3_commit_hook(db, count_commit, NULL);
    return SQLITE_OK;
}
#endif

/* ------------------------------------------------------------------------ */
/* Records the raw clients write                                            */
/* ------------------------------------------------------------------------ */

static const char fingerprint[] = "POST /v1/charges amount=1000&currency=eur&customer=cus_4f2a9c&n=1";
static uint8_t body[BODY_LEN];
static uint8_t tpl_started[IDEM_RECORD_HEADER_LEN];
static uint8_t tpl_completed[REC_MAX];
static uint8_t fp_digest[IDEM_DIGEST_LEN];

/* Build the two templates with the library's own encoder, so the raw client
 * writes byte for byte the records the library writes. */
static void make_templates(void)
{
    for (size_t i = 0; i < BODY_LEN; i++)
        body[i] = (uint8_t)('a' + i % 26);
    idem_record r = {.state = IDEM_STATE_STARTED, .has_fingerprint = true};
    if (idem__digest(fingerprint, sizeof fingerprint - 1, r.digest))
        die("cannot hash the fingerprint");
    memcpy(fp_digest, r.digest, sizeof fp_digest);
    uint8_t *enc;
    size_t len;
    if (idem__record_encode(&r, &enc, &len) || len != sizeof tpl_started)
        die("cannot encode a record template");
    memcpy(tpl_started, enc, len);
    free(enc);
    r.state = IDEM_STATE_COMPLETED;
    r.status = 200;
    r.body = body;
    r.body_len = BODY_LEN;
    if (idem__record_encode(&r, &enc, &len) || len != sizeof tpl_completed)
        die("cannot encode a record template");
    memcpy(tpl_completed, enc, len);
    free(enc);
}

/* What a raw client does with a record that beat its claim: check it is
 * ours to read, compare the digest, copy the body. 'S', 'C', or -1. */
static int raw_inspect(const uint8_t *rec, size_t len, uint8_t *out_body)
{
    if (len < IDEM_RECORD_HEADER_LEN || memcmp(rec, "IDEM", 4) != 0)
        return -1;
    if (memcmp(rec + 32, fp_digest, IDEM_DIGEST_LEN) != 0)
        return -1;
    int state = rec[IDEM_RECORD_STATE_OFFSET];
    if (state == IDEM_STATE_COMPLETED) {
        if (len != REC_MAX)
            return -1;
        memcpy(out_body, rec + IDEM_RECORD_COMPLETED_OVERHEAD, len - IDEM_RECORD_COMPLETED_OVERHEAD);
    }
    return state;
}

/* ------------------------------------------------------------------------ */
/* Raw clients                                                              */
/* ------------------------------------------------------------------------ */

typedef struct raw_client {
    const char *name;
    /* One connection; NULL on failure (message on stderr). */
    void *(*connect)(const char *url);
    void (*disconnect)(void *conn);
    /* 0: claimed; 1: *rec holds the existing record (malloc'd, freed by caller); -1 error. */
    int (*claim)(void *conn, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                 uint8_t **existing, size_t *existing_len);
    /* 0 committed, -1 otherwise. */
    int (*commit)(void *conn, const char *key, size_t key_len, const uint8_t *token, const uint8_t *rec,
                  size_t rec_len);
} raw_client;

#ifdef IDEM_BENCH_HAVE_SQLITE3
typedef struct raw_sqlite {
    sqlite3      *db;
    sqlite3_stmt *lookup, *insert, *commit;
} raw_sqlite;

static void raw_sqlite_disconnect(void *p)
{
    raw_sqlite *c = p;
    if (!c)
        return;
    sqlite3_finalize(c->lookup);
    sqlite3_finalize(c->insert);
    sqlite3_finalize(c->commit);
    sqlite3_close(c->db);
    free(c);
}

static void *raw_sqlite_connect(const char *url)
{
    const char *path = url + strlen("sqlite://");
    raw_sqlite *c = calloc(1, sizeof *c);
    if (!c || sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK)
        goto fail;
    sqlite3_busy_timeout(c->db, 5000);
    if (sqlite3_exec(c->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", NULL, NULL, NULL) ||
        sqlite3_prepare_v3(c->db,
                           "SELECT value FROM idem_records WHERE key = ?1 AND expires_at > ?2", -1,
                           SQLITE_PREPARE_PERSISTENT, &c->lookup, NULL) ||
        sqlite3_prepare_v3(c->db,
                           "INSERT INTO idem_records (key, token, state, value, expires_at) "
                           "VALUES (?1, ?2, 'S', ?3, ?4) "
                           "ON CONFLICT (key) DO UPDATE SET token = excluded.token, state = 'S', "
                           "value = excluded.value, expires_at = excluded.expires_at "
                           "WHERE idem_records.expires_at <= ?5",
                           -1, SQLITE_PREPARE_PERSISTENT, &c->insert, NULL) ||
        sqlite3_prepare_v3(c->db,
                           "UPDATE idem_records SET state = 'C', value = ?1, expires_at = ?2 "
                           "WHERE key = ?3 AND token = ?4 AND state = 'S' AND expires_at > ?5",
                           -1, SQLITE_PREPARE_PERSISTENT, &c->commit, NULL))
        goto fail;
    return c;
fail:
    fprintf(stderr, "raw sqlite %s: %s\n", path, c && c->db ? sqlite3_errmsg(c->db) : "out of memory");
    raw_sqlite_disconnect(c);
    return NULL;
}

/* 1 and the record, 0 when there is none, -1 on error. */
static int raw_sqlite_lookup(raw_sqlite *c, const char *key, size_t key_len, uint64_t now,
                             uint8_t **out, size_t *out_len)
{
    sqlite3_bind_blob(c->lookup, 1, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_int64(c->lookup, 2, (sqlite3_int64)now);
    int rc = sqlite3_step(c->lookup), ret = 0;
    if (rc == SQLITE_ROW) {
        int n = sqlite3_column_bytes(c->lookup, 0);
        *out = malloc((size_t)n + 1);
        memcpy(*out, sqlite3_column_blob(c->lookup, 0), (size_t)n);
        *out_len = (size_t)n;
        ret = 1;
    } else if (rc != SQLITE_DONE) {
        ret = -1;
    }
    sqlite3_reset(c->lookup);
    return ret;
}

static int raw_sqlite_claim(void *p, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                            uint8_t **existing, size_t *existing_len)
{
    raw_sqlite *c = p;
    for (int attempt = 0; attempt < 3; attempt++) {
        uint64_t now = idem_now_ms();
        int rc = raw_sqlite_lookup(c, key, key_len, now, existing, existing_len);
        if (rc)
            return rc;
        sqlite3_bind_blob(c->insert, 1, key, (int)key_len, SQLITE_STATIC);
        sqlite3_bind_blob(c->insert, 2, rec + IDEM_RECORD_TOKEN_OFFSET, IDEM_TOKEN_LEN, SQLITE_STATIC);
        sqlite3_bind_blob(c->insert, 3, rec, (int)rec_len, SQLITE_STATIC);
        sqlite3_bind_int64(c->insert, 4, (sqlite3_int64)(now + LEASE_MS));
        sqlite3_bind_int64(c->insert, 5, (sqlite3_int64)now);
        rc = sqlite3_step(c->insert);
        sqlite3_reset(c->insert);
        if (rc != SQLITE_DONE)
            return -1;
        if (sqlite3_changes(c->db) == 1)
            return 0;
        /* taken between our read and our write: read it */
    }
    return -1;
}

static int raw_sqlite_commit(void *p, const char *key, size_t key_len, const uint8_t *token,
                             const uint8_t *rec, size_t rec_len)
{
    raw_sqlite *c = p;
    uint64_t now = idem_now_ms();
    sqlite3_bind_blob(c->commit, 1, rec, (int)rec_len, SQLITE_STATIC);
    sqlite3_bind_int64(c->commit, 2, (sqlite3_int64)(now + TTL_S * 1000ull));
    sqlite3_bind_blob(c->commit, 3, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_blob(c->commit, 4, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(c->commit, 5, (sqlite3_int64)now);
    int rc = sqlite3_step(c->commit);
    sqlite3_reset(c->commit);
    return rc == SQLITE_DONE && sqlite3_changes(c->db) == 1 ? 0 : -1;
}

static const raw_client raw_sqlite_client = {
    .name = "sqlite",
    .connect = raw_sqlite_connect,
    .disconnect = raw_sqlite_disconnect,
    .claim = raw_sqlite_claim,
    .commit = raw_sqlite_commit,
};
#endif

/* host and port of the first host of a store URL; false when it has none */
static bool url_host(const char *url, char *host, size_t host_len, uint16_t *port)
{
    idem_url *u;
    if (idem_url_parse(&u, url) != IDEM_OK)
        return false;
    bool ok = u->nhosts > 0;
    if (ok) {
        snprintf(host, host_len, "%s", u->hosts[0].host);
        *port = u->hosts[0].port;
    }
    idem_url_free(u);
    return ok;
}

/* Redis Cluster: every key of the benchmark in the slot of this tag (see
 * cluster_owner()). */
#define CLUSTER_TAG    "{b}"
#define CLUSTER_PREFIX "idem" CLUSTER_TAG ":"

#ifdef IDEM_BENCH_HAVE_HIREDIS
/* KEYS[1] key; ARGV[1] token; ARGV[2] record; ARGV[3] ttl ms. Offsets: the
 * state byte is 6th, the token bytes 9..24 (Lua counts from 1). */
static const char redis_commit_lua[] =
    "local v = redis.call('GET', KEYS[1]) "
    "if v and string.sub(v, 6, 6) == 'S' and string.sub(v, 9, 24) == ARGV[1] then "
    "redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end "
    "return 0";
static char redis_commit_sha[41];

static void raw_redis_disconnect(void *p)
{
    if (p)
        redisFree(p);
}

static void *raw_redis_connect(const char *url)
{
    char host[256];
    uint16_t port;
    if (!url_host(url, host, sizeof host, &port)) {
        fprintf(stderr, "raw redis: cannot read host and port from %s\n", url);
        return NULL;
    }
    redisContext *c = redisConnect(host, port ? port : 6379);
    if (!c || c->err) {
        fprintf(stderr, "raw redis %s:%u: %s\n", host, port, c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    redisReply *r = redisCommand(c, "SCRIPT LOAD %s", redis_commit_lua);
    if (!r || r->type != REDIS_REPLY_STRING || r->len != 40) {
        fprintf(stderr, "raw redis: SCRIPT LOAD failed\n");
        if (r)
            freeReplyObject(r);
        redisFree(c);
        return NULL;
    }
    memcpy(redis_commit_sha, r->str, 40);
    freeReplyObject(r);
    return c;
}

static int raw_redis_claim(void *p, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                           uint8_t **existing, size_t *existing_len)
{
    char lease[24];
    int ll = snprintf(lease, sizeof lease, "%u", LEASE_MS);
    const char *argv[] = {"SET", key, (const char *)rec, "NX", "PX", lease, "GET"};
    size_t lens[] = {3, key_len, rec_len, 2, 2, (size_t)ll, 3};
    redisReply *r = redisCommandArgv(p, 7, argv, lens);
    if (!r)
        return -1;
    int ret = -1;
    if (r->type == REDIS_REPLY_NIL) {
        ret = 0;
    } else if (r->type == REDIS_REPLY_STRING) {
        *existing = malloc(r->len);
        memcpy(*existing, r->str, r->len);
        *existing_len = r->len;
        ret = 1;
    }
    freeReplyObject(r);
    return ret;
}

static int raw_redis_commit(void *p, const char *key, size_t key_len, const uint8_t *token,
                            const uint8_t *rec, size_t rec_len)
{
    char ttl[24];
    int tl = snprintf(ttl, sizeof ttl, "%llu", TTL_S * 1000ull);
    const char *argv[] = {"EVALSHA", redis_commit_sha, "1", key, (const char *)token, (const char *)rec, ttl};
    size_t lens[] = {7, 40, 1, key_len, IDEM_TOKEN_LEN, rec_len, (size_t)tl};
    redisReply *r = redisCommandArgv(p, 7, argv, lens);
    int ret = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1 ? 0 : -1;
    if (r)
        freeReplyObject(r);
    return ret;
}

/*
 * Redis Cluster: the library's layer uses the key prefix CLUSTER_PREFIX, whose
 * hash tag puts every key in one slot; the raw client sends the same tag
 * before its keys, straight to the master that owns that slot (found with
 * CLUSTER SLOTS), the least a cluster-aware client can do. Round trips are
 * counted on that master.
 */

static redisContext *cluster_owner(const char *url)
{
    char host[256];
    uint16_t port;
    if (!url_host(url, host, sizeof host, &port))
        return NULL;
    redisContext *c = redisConnect(host, port);
    if (!c || c->err) {
        if (c)
            redisFree(c);
        return NULL;
    }
    redisReply *ks = redisCommand(c, "CLUSTER KEYSLOT %s", CLUSTER_TAG);
    redisReply *sl = redisCommand(c, "CLUSTER SLOTS");
    redisContext *owner = NULL;
    for (size_t i = 0; ks && sl && sl->type == REDIS_REPLY_ARRAY && i < sl->elements && !owner; i++) {
        redisReply *e = sl->element[i];
        if (e->element[0]->integer <= ks->integer && ks->integer <= e->element[1]->integer)
            owner = redisConnect(e->element[2]->element[0]->str, (int)e->element[2]->element[1]->integer);
    }
    if (ks)
        freeReplyObject(ks);
    if (sl)
        freeReplyObject(sl);
    redisFree(c);
    if (owner && owner->err) {
        redisFree(owner);
        owner = NULL;
    }
    return owner;
}

static void *raw_cluster_connect(const char *url)
{
    redisContext *c = cluster_owner(url);
    if (!c) {
        fprintf(stderr, "raw redis cluster: cannot find the master of slot %s from %s\n", CLUSTER_TAG, url);
        return NULL;
    }
    redisReply *r = redisCommand(c, "SCRIPT LOAD %s", redis_commit_lua);
    if (!r || r->type != REDIS_REPLY_STRING || r->len != 40) {
        if (r)
            freeReplyObject(r);
        redisFree(c);
        return NULL;
    }
    memcpy(redis_commit_sha, r->str, 40);
    freeReplyObject(r);
    return c;
}

static int raw_cluster_claim(void *p, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                             uint8_t **existing, size_t *existing_len)
{
    char k[128];
    memcpy(k, CLUSTER_TAG, 3);
    memcpy(k + 3, key, key_len);
    return raw_redis_claim(p, k, key_len + 3, rec, rec_len, existing, existing_len);
}

static int raw_cluster_commit(void *p, const char *key, size_t key_len, const uint8_t *token,
                              const uint8_t *rec, size_t rec_len)
{
    char k[128];
    memcpy(k, CLUSTER_TAG, 3);
    memcpy(k + 3, key, key_len);
    return raw_redis_commit(p, k, key_len + 3, token, rec, rec_len);
}

static const raw_client raw_cluster_client = {
    .name = "redis-cluster",
    .connect = raw_cluster_connect,
    .disconnect = raw_redis_disconnect,
    .claim = raw_cluster_claim,
    .commit = raw_cluster_commit,
};

static const raw_client raw_redis_client = {
    .name = "redis",
    .connect = raw_redis_connect,
    .disconnect = raw_redis_disconnect,
    .claim = raw_redis_claim,
    .commit = raw_redis_commit,
};
#endif

#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
static void raw_mc_disconnect(void *p)
{
    if (p)
        memcached_free(p);
}

static void *raw_mc_connect(const char *url)
{
    char host[256];
    uint16_t port;
    if (!url_host(url, host, sizeof host, &port)) {
        fprintf(stderr, "raw memcached: cannot read host and port from %s\n", url);
        return NULL;
    }
    memcached_st *m = memcached_create(NULL);
    if (!m)
        return NULL;
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_SUPPORT_CAS, 1);
    memcached_behavior_set(m, MEMCACHED_BEHAVIOR_TCP_NODELAY, 1);
    if (memcached_server_add(m, host, port ? port : 11211) != MEMCACHED_SUCCESS) {
        fprintf(stderr, "raw memcached %s:%u: cannot add the server\n", host, port);
        memcached_free(m);
        return NULL;
    }
    return m;
}

static int raw_mc_claim(void *p, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                        uint8_t **existing, size_t *existing_len)
{
    memcached_st *m = p;
    for (int attempt = 0; attempt < 3; attempt++) {
        size_t len;
        uint32_t flags;
        memcached_return_t rc;
        char *v = memcached_get(m, key, key_len, &len, &flags, &rc);
        if (v) {
            *existing = (uint8_t *)v;
            *existing_len = len;
            return 1;
        }
        if (rc != MEMCACHED_NOTFOUND)
            return -1;
        rc = memcached_add(m, key, key_len, (const char *)rec, rec_len, LEASE_MS / 1000, 0);
        if (rc == MEMCACHED_SUCCESS)
            return 0;
        if (rc != MEMCACHED_NOTSTORED && rc != MEMCACHED_DATA_EXISTS)
            return -1;
    }
    return -1;
}

static int raw_mc_commit(void *p, const char *key, size_t key_len, const uint8_t *token,
                         const uint8_t *rec, size_t rec_len)
{
    memcached_st *m = p;
    const char *keys[] = {key};
    size_t lens[] = {key_len};
    if (memcached_mget(m, keys, lens, 1) != MEMCACHED_SUCCESS)
        return -1;
    memcached_return_t rc;
    memcached_result_st *res = memcached_fetch_result(m, NULL, &rc);
    if (!res)
        return -1;
    const char *v = memcached_result_value(res);
    size_t vlen = memcached_result_length(res);
    uint64_t cas = memcached_result_cas(res);
    bool ours = vlen >= IDEM_RECORD_HEADER_LEN && v[IDEM_RECORD_STATE_OFFSET] == IDEM_STATE_STARTED &&
                memcmp(v + IDEM_RECORD_TOKEN_OFFSET, token, IDEM_TOKEN_LEN) == 0;
    memcached_result_free(res);
    while (memcached_fetch_result(m, NULL, &rc)) /* drain the END */
        ;
    if (!ours)
        return -1;
    rc = memcached_cas(m, key, key_len, (const char *)rec, rec_len, TTL_S, 0, cas);
    return rc == MEMCACHED_SUCCESS ? 0 : -1;
}

static const raw_client raw_mc_client = {
    .name = "memcached",
    .connect = raw_mc_connect,
    .disconnect = raw_mc_disconnect,
    .claim = raw_mc_claim,
    .commit = raw_mc_commit,
};
#endif

#ifdef IDEM_BENCH_HAVE_LIBPQ
/* The driver's claim and commit (backends/postgresql/postgresql.c), on the
 * driver's own table. */
static const char pg_claim_sql[] =
    "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t), "
    "live AS (SELECT r.value, r.expires_at FROM idempotency_keys r, now "
    "         WHERE r.key = $1 AND r.expires_at > now.t), "
    "ins AS (INSERT INTO idempotency_keys AS r (key, token, state, value, expires_at) "
    "        SELECT $1, $2, $3, $4, now.t + ($5 * interval '1 millisecond') FROM now "
    "        WHERE NOT EXISTS (SELECT FROM live) "
    "        ON CONFLICT (key) DO UPDATE SET (token, state, value, expires_at) = "
    "          (SELECT CASE WHEN d.e THEN excluded.token ELSE r.token END, "
    "                  CASE WHEN d.e THEN excluded.state ELSE r.state END, "
    "                  CASE WHEN d.e THEN excluded.value ELSE r.value END, "
    "                  CASE WHEN d.e THEN excluded.expires_at ELSE r.expires_at END "
    "           FROM (SELECT r.expires_at <= (SELECT t FROM now)) AS d(e)) "
    "        RETURNING r.value, r.expires_at) "
    "SELECT x.value = $4, CASE WHEN x.value = $4 THEN NULL ELSE x.value END, "
    "greatest(0, floor(extract(epoch FROM x.expires_at - now.t) * 1000))::bigint "
    "FROM (SELECT * FROM live UNION ALL SELECT * FROM ins) AS x, now";
static const char pg_commit_sql[] =
    "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t), "
    "upd AS (UPDATE idempotency_keys AS r SET state = 'C', value = $3, "
    "        expires_at = now.t + ($4 * interval '1 millisecond') FROM now "
    "        WHERE r.key = $1 AND r.token = $2 AND r.state = 'S' AND r.expires_at > now.t RETURNING 1) "
    "SELECT (SELECT count(*) FROM upd) + (SELECT count(*) FROM idempotency_keys AS r, now "
    "WHERE r.key = $1 AND r.token = $2 AND r.state = 'C' AND r.expires_at > now.t)";

static void raw_pg_disconnect(void *p)
{
    if (p)
        PQfinish(p);
}

static void *raw_pg_connect(const char *url)
{
    PGconn *c = PQconnectdb(url);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "raw postgresql: %s\n", c ? PQerrorMessage(c) : "out of memory");
        raw_pg_disconnect(c);
        return NULL;
    }
    static const Oid claim_types[] = {17, 17, 25, 17, 20}, commit_types[] = {17, 17, 17, 20};
    PGresult *a = PQprepare(c, "raw_claim", pg_claim_sql, 5, claim_types);
    PGresult *b = PQprepare(c, "raw_commit", pg_commit_sql, 4, commit_types);
    bool ok = PQresultStatus(a) == PGRES_COMMAND_OK && PQresultStatus(b) == PGRES_COMMAND_OK;
    PQclear(a);
    PQclear(b);
    if (!ok) {
        fprintf(stderr, "raw postgresql: PREPARE: %s\n", PQerrorMessage(c));
        raw_pg_disconnect(c);
        return NULL;
    }
    return c;
}

static int raw_pg_claim(void *p, const char *key, size_t key_len, const uint8_t *rec, size_t rec_len,
                        uint8_t **existing, size_t *existing_len)
{
    char lease[24];
    snprintf(lease, sizeof lease, "%u", LEASE_MS);
    const char *v[] = {key, (const char *)rec + IDEM_RECORD_TOKEN_OFFSET, "S", (const char *)rec, lease};
    int l[] = {(int)key_len, IDEM_TOKEN_LEN, 0, (int)rec_len, 0}, f[] = {1, 1, 0, 1, 0};
    PGresult *r = PQexecPrepared(p, "raw_claim", 5, v, l, f, 1);
    int ret = -1;
    if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
        if (PQgetvalue(r, 0, 0)[0] == 1) {
            ret = 0;
        } else if (!PQgetisnull(r, 0, 1)) {
            *existing_len = (size_t)PQgetlength(r, 0, 1);
            *existing = malloc(*existing_len);
            memcpy(*existing, PQgetvalue(r, 0, 1), *existing_len);
            ret = 1;
        }
    }
    PQclear(r);
    return ret;
}

static int raw_pg_commit(void *p, const char *key, size_t key_len, const uint8_t *token, const uint8_t *rec,
                         size_t rec_len)
{
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%llu", TTL_S * 1000ull);
    const char *v[] = {key, (const char *)token, (const char *)rec, ttl};
    int l[] = {(int)key_len, IDEM_TOKEN_LEN, (int)rec_len, 0}, f[] = {1, 1, 1, 0};
    PGresult *r = PQexecPrepared(p, "raw_commit", 4, v, l, f, 1);
    int ret = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetlength(r, 0, 0) == 8 &&
                      PQgetvalue(r, 0, 0)[7] == 1
                  ? 0
                  : -1;
    PQclear(r);
    return ret;
}

static const raw_client raw_pg_client = {
    .name = "postgresql",
    .connect = raw_pg_connect,
    .disconnect = raw_pg_disconnect,
    .claim = raw_pg_claim,
    .commit = raw_pg_commit,
};

/* A bigint the admin connection reads. */
static uint64_t pg_u64(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    uint64_t v = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 ? strtoull(PQgetvalue(r, 0, 0), NULL, 10) : 0;
    PQclear(r);
    return v;
}
#endif

/* ------------------------------------------------------------------------ */
/* Stores under test                                                        */
/* ------------------------------------------------------------------------ */

typedef struct backend {
    const char       *name;
    bool              lib_built;   /* the library's driver is compiled in */
    const raw_client *raw;         /* NULL: no raw client in this build */
    bool              procs;       /* also run 2 processes on one store */
    char             *url;         /* given with --url, else from the harness */
    idem_test_server  srv;
    bool              started;
    void             *admin;       /* a connection to read counters */
} backend;

static backend backends[] = {
    {.name = "sqlite",
#ifdef IDEM_HAVE_SQLITE
     .lib_built = true,
#endif
#ifdef IDEM_BENCH_HAVE_SQLITE3
     .raw = &raw_sqlite_client,
#endif
     .procs = true},
    {.name = "redis",
#ifdef IDEM_HAVE_REDIS
     .lib_built = true,
#endif
#ifdef IDEM_BENCH_HAVE_HIREDIS
     .raw = &raw_redis_client,
#endif
    },
    {.name = "redis-cluster",
#ifdef IDEM_HAVE_REDIS
     .lib_built = true,
#endif
#ifdef IDEM_BENCH_HAVE_HIREDIS
     .raw = &raw_cluster_client,
#endif
    },
    {.name = "memcached",
#ifdef IDEM_HAVE_MEMCACHED
     .lib_built = true,
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
     .raw = &raw_mc_client,
#endif
    },
    {.name = "postgresql",
#ifdef IDEM_HAVE_POSTGRESQL
     .lib_built = true,
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
     .raw = &raw_pg_client,
#endif
    },
};
#define NBACKENDS (sizeof backends / sizeof backends[0])

#ifdef IDEM_BENCH_HAVE_HIREDIS
static uint64_t redis_info_u64(redisContext *c, const char *section, const char *field)
{
    redisReply *r = redisCommand(c, "INFO %s", section);
    uint64_t v = 0;
    if (r && r->type == REDIS_REPLY_STRING) {
        const char *p = strstr(r->str, field);
        if (p && p[strlen(field)] == ':')
            v = strtoull(p + strlen(field) + 1, NULL, 10);
    }
    if (r)
        freeReplyObject(r);
    return v;
}
#endif

#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
static uint64_t mc_stat_sum(memcached_st *m, const char *const *names)
{
    memcached_return_t rc;
    memcached_stat_st *st = memcached_stat(m, NULL, &rc);
    uint64_t sum = 0;
    if (!st)
        return 0;
    for (const char *const *n = names; *n; n++) {
        char *v = memcached_stat_get_value(m, st, *n, &rc);
        if (v) {
            sum += strtoull(v, NULL, 10);
            free(v);
        }
    }
    memcached_stat_free(m, st);
    return sum;
}
#endif

/* The backend's round-trip counter now (see "Round trips" above). */
static uint64_t rt_read(backend *b, uint64_t *write_tx)
{
    *write_tx = 0;
    if (strcmp(b->name, "sqlite") == 0) {
        *write_tx = atomic_load(&g_count->write_tx);
        return atomic_load(&g_count->stmts);
    }
#ifdef IDEM_BENCH_HAVE_HIREDIS
    if (strncmp(b->name, "redis", 5) == 0)
        return redis_info_u64(b->admin, "stats", "total_writes_processed");
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
    if (strcmp(b->name, "memcached") == 0) {
        static const char *const names[] = {"cmd_get", "cmd_set", "cmd_touch", "delete_hits",
                                            "delete_misses", "incr_hits", "incr_misses", "decr_hits",
                                            "decr_misses", NULL};
        return mc_stat_sum(b->admin, names);
    }
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
    if (strcmp(b->name, "postgresql") == 0)
        return pg_u64(b->admin, "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
                                "WHERE query NOT LIKE '%pg_stat_statements%'");
#endif
    return 0;
}

/* The store server's CPU time so far, in seconds: Redis (one server) only,
 * from INFO cpu, its main thread where the server reports it (every command
 * and script runs there), else the whole process. -1 for other stores. */
static double srv_cpu_read(backend *b)
{
#ifdef IDEM_BENCH_HAVE_HIREDIS
    if (strcmp(b->name, "redis") == 0) {
        redisReply *r = redisCommand(b->admin, "INFO cpu");
        double v = -1;
        if (r && r->type == REDIS_REPLY_STRING) {
            const char *u = strstr(r->str, "used_cpu_user_main_thread:");
            const char *y = strstr(r->str, "used_cpu_sys_main_thread:");
            if (!u || !y) {
                u = strstr(r->str, "used_cpu_user:");
                y = strstr(r->str, "used_cpu_sys:");
            }
            if (u && y)
                v = strtod(strchr(u, ':') + 1, NULL) + strtod(strchr(y, ':') + 1, NULL);
        }
        if (r)
            freeReplyObject(r);
        return v;
    }
#endif
    (void)b;
    return -1;
}

/* What reading the counter itself adds to the next reading. */
static uint64_t rt_self(const backend *b)
{
    return strncmp(b->name, "redis", 5) == 0 ? 1 : 0;
}

/* ------------------------------------------------------------------------ */
/* Paths and rounds                                                         */
/* ------------------------------------------------------------------------ */

/* P_CACHED: replays on a layer with a local cache (cache_bytes), beside the
 * raw client's replay from the store: the ratio is what the cache saves. */
enum path { P_NEW, P_REPLAY, P_INPROG, P_MIX, P_CACHED, P_COUNT };
static const char *const path_names[P_COUNT] = {"new", "replay", "in-progress", "mix", "cached-replay"};
#define CACHE_BYTES ((size_t)64 << 20)

typedef struct config {
    backend   *b;
    enum path  path;
    int        threads;     /* per process */
    int        procs;       /* 1, or 2 processes on one store */
    unsigned   id;          /* distinguishes keys of configurations */
} config;

typedef struct side {
    bool          raw;
    idem_layer   *layer;   /* library side (this process) */
    void         *conns[MAX_THREADS]; /* raw side: one connection per thread, kept across rounds */
    uint64_t      ops, errors;
    double        seconds;
    uint64_t      rt, write_tx;
    double        srv_s;   /* the server's CPU seconds over the rounds, or < 0: not known */
    samples       lat;
} side;

typedef struct worker {
    const config *cfg;
    const side   *sd;
    idem_layer   *layer;
    void         *conn;      /* raw connection */
    unsigned      tid;
    unsigned      round;
    double        seconds;
    uint64_t      ops, errors;
    double        elapsed;
    uint64_t      rng;
    samples       lat;
} worker;

static uint32_t g_nonce;
static char g_first_error[512];
static pthread_mutex_t g_err_mu = PTHREAD_MUTEX_INITIALIZER;

static void note_error(const char *what, const char *detail)
{
    pthread_mutex_lock(&g_err_mu);
    if (!g_first_error[0])
        snprintf(g_first_error, sizeof g_first_error, "%s: %s", what, detail);
    pthread_mutex_unlock(&g_err_mu);
}

/* Write v as exactly width decimal digits (the low ones). */
static void put_dec(char *p, unsigned long long v, int width)
{
    for (int i = width - 1; i >= 0; i--, v /= 10)
        p[i] = (char)('0' + v % 10);
}

/* The key of prepared record i ('p' replay, 'i' in-progress) or of a new
 * key ('n'); KEY_LEN bytes whatever the path, the side or the counter.
 * Formatted by hand: snprintf would cost as much as a replay's own work
 * in the library and blur the ratio. */
static size_t make_key(char *out, char kind, const config *cfg, unsigned tid, char side_c,
                       unsigned long long n)
{
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    *p++ = kind;
    for (int i = 7; i >= 0; i--)
        *p++ = hex[(g_nonce >> (4 * i)) & 15];
    put_dec(p, cfg->id % 1000, 3);
    p += 3;
    put_dec(p, tid % 100, 2);
    p += 2;
    *p++ = side_c;
    put_dec(p, n, 11);
    p += 11;
    *p = '\0';
    return (size_t)(p - out);
}

static int bench_handler(void *arg, idem_response *resp)
{
    (void)arg;
    return idem_response_set(resp, 200, body, BODY_LEN);
}

/* One operation of the library; true when it had the expected outcome. */
static bool lib_op(worker *w, const char *key, size_t key_len, idem_outcome want)
{
    idem_request req = {.key = key, .key_len = key_len, .fingerprint = fingerprint,
                        .fingerprint_len = sizeof fingerprint - 1};
    idem_reply reply = {0};
    int rc = idem_run(w->layer, &req, bench_handler, NULL, &reply);
    bool ok = rc == IDEM_OK && reply.outcome == want &&
              (want != IDEM_REPLAYED || (reply.body_len == BODY_LEN && reply.status == 200));
    if (!ok)
        note_error("library", rc ? idem_last_error() : "unexpected outcome");
    idem_reply_clear(&reply);
    return ok;
}

/* One operation of the raw client. */
static bool raw_op(worker *w, const raw_client *rc, const char *key, size_t key_len, int want_state)
{
    uint8_t rec[REC_MAX];
    uint8_t token[IDEM_TOKEN_LEN];
    uint64_t t1 = xorshift(&w->rng), t2 = xorshift(&w->rng);
    memcpy(token, &t1, 8);
    memcpy(token + 8, &t2, 8);
    memcpy(rec, tpl_started, sizeof tpl_started);
    memcpy(rec + IDEM_RECORD_TOKEN_OFFSET, token, IDEM_TOKEN_LEN);
    put_be64(rec + IDEM_RECORD_DEADLINE_OFFSET, idem_now_ms() + LEASE_MS);
    uint8_t *existing = NULL;
    size_t existing_len = 0;
    int c = rc->claim(w->conn, key, key_len, rec, sizeof tpl_started, &existing, &existing_len);
    if (c == 0) {
        if (want_state != 0) {
            note_error("raw", "claimed a key that should exist");
            return false;
        }
        memcpy(rec, tpl_completed, sizeof tpl_completed);
        memcpy(rec + IDEM_RECORD_TOKEN_OFFSET, token, IDEM_TOKEN_LEN);
        if (rc->commit(w->conn, key, key_len, token, rec, sizeof tpl_completed) != 0) {
            note_error("raw", "commit failed");
            return false;
        }
        return true;
    }
    if (c < 0) {
        note_error("raw", "claim failed");
        return false;
    }
    uint8_t out[BODY_LEN];
    int state = raw_inspect(existing, existing_len, out);
    free(existing);
    if (state != want_state)
        note_error("raw", "existing record in an unexpected state");
    return state == want_state;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    const config *cfg = w->cfg;
    const raw_client *rc = cfg->b->raw;
    char side_c = w->sd->raw ? 'r' : 'l';
    char key[32];
    double start = now_s(), end = start + w->seconds;
    unsigned long long i = 0;
    for (;; i++) {
        if ((i & 7) == 0 && now_s() >= end)
            break;
        enum path p = cfg->path;
        bool fresh = p == P_NEW || (p == P_MIX && i % 5 == 4);
        size_t key_len;
        if (fresh)
            key_len = make_key(key, 'n', cfg, w->tid, side_c, (unsigned long long)w->round * 10000000000ull + i);
        else
            key_len = make_key(key, p == P_INPROG ? 'i' : 'p', cfg, 0, side_c,
                               (i * 7 + w->tid * 31) % KEYSET);
        uint64_t t0 = now_ns();
        bool ok;
        if (w->sd->raw)
            ok = raw_op(w, rc, key, key_len, fresh ? 0 : p == P_INPROG ? IDEM_STATE_STARTED : IDEM_STATE_COMPLETED);
        else
            ok = lib_op(w, key, key_len, fresh ? IDEM_EXECUTED : p == P_INPROG ? IDEM_IN_PROGRESS : IDEM_REPLAYED);
        samples_add(&w->lat, now_ns() - t0);
        w->ops++;
        if (!ok)
            w->errors++;
    }
    w->elapsed = now_s() - start;
    return NULL;
}

/* The key prefix the library's layer uses on this store (NULL: the default). */
static const char *layer_prefix(const backend *b)
{
    return strcmp(b->name, "redis-cluster") == 0 ? CLUSTER_PREFIX : NULL;
}

static idem_layer *open_layer_cached(const char *url, idem_store **store, const char *prefix,
                                     size_t cache_bytes)
{
    if (!*store && idem_store_open(store, url) != IDEM_OK)
        die("cannot open %s: %s", url, idem_last_error());
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = LEASE_MS;
    o.ttl_s = TTL_S;
    if (prefix)
        o.key_prefix = prefix;
    o.cache_bytes = cache_bytes;
    idem_layer *l;
    if (idem_layer_new(&l, *store, &o) != IDEM_OK)
        die("cannot make a layer: %s", idem_last_error());
    return l;
}

static idem_layer *open_layer(const char *url, idem_store **store, const char *prefix)
{
    *store = NULL;
    return open_layer_cached(url, store, prefix, 0);
}

/* Shared memory a child process reports into. */
typedef struct proc_report {
    uint64_t ops, errors;
    uint64_t stmts, write_tx;   /* counted by this process while it ran */
    double   elapsed;
    size_t   nlat;
    uint32_t lat[PROC_LAT_CAP];
} proc_report;

static proc_report *g_reports; /* MAP_SHARED, MAX_PROCS of them */
static _Atomic int *g_ready;    /* MAP_SHARED: child processes ready to start */

/* Run w in this process, in threads. */
static void run_threads(worker *ws, int n)
{
    pthread_t th[MAX_THREADS];
    for (int t = 0; t < n; t++)
        if (pthread_create(&th[t], NULL, worker_main, &ws[t]))
            die("cannot start a thread");
    for (int t = 0; t < n; t++)
        pthread_join(th[t], NULL);
}

/* One round of one side. Wall time is the longest a worker ran, from its
 * first operation to its last; connecting is outside it. */
static void run_round(const config *cfg, side *sd, unsigned round, double seconds)
{
    backend *b = cfg->b;
    uint64_t tx0, tx1, rt0, rt1;
    double wall = 0;
    if (cfg->procs > 1) {
        pid_t pids[MAX_PROCS];
        atomic_store(g_ready, 0);
        for (int p = 0; p < cfg->procs; p++) {
            fflush(NULL);
            pids[p] = fork();
            if (pids[p] < 0)
                die("fork: %s", strerror(errno));
            if (pids[p] == 0) {
                /* Child: its own store and connections, never the parent's. */
                worker w = {.cfg = cfg, .sd = sd, .tid = 10u + (unsigned)p, .round = round,
                            .seconds = seconds, .rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid()};
                idem_store *st = NULL;
                if (sd->raw) {
                    if (!(w.conn = b->raw->connect(b->url)))
                        _exit(2);
                } else {
                    w.layer = cfg->path == P_CACHED ? open_layer_cached(b->url, &st, layer_prefix(b), CACHE_BYTES)
                                                    : open_layer(b->url, &st, layer_prefix(b));
                }
                atomic_fetch_add(g_ready, 1);
                while (atomic_load(g_ready) < cfg->procs)
                    ;
                uint64_t s0 = atomic_load(&g_count->stmts), x0 = atomic_load(&g_count->write_tx);
                worker_main(&w);
                proc_report *r = &g_reports[p];
                r->stmts = atomic_load(&g_count->stmts) - s0;
                r->write_tx = atomic_load(&g_count->write_tx) - x0;
                r->ops = w.ops;
                r->errors = w.errors;
                r->elapsed = w.elapsed;
                r->nlat = w.lat.n < PROC_LAT_CAP ? w.lat.n : PROC_LAT_CAP;
                memcpy(r->lat, w.lat.v, r->nlat * sizeof *r->lat);
                if (g_first_error[0])
                    fprintf(stderr, "idem_bench: child: %s\n", g_first_error);
                _exit(0);
            }
        }
        rt0 = tx0 = 0;
        rt1 = tx1 = 0;
        sd->srv_s = -1; /* not measured across processes */
        for (int p = 0; p < cfg->procs; p++) {
            int status;
            waitpid(pids[p], &status, 0);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                die("a benchmark process failed");
            proc_report *r = &g_reports[p];
            sd->ops += r->ops;
            sd->errors += r->errors;
            rt1 += r->stmts;
            tx1 += r->write_tx;
            wall = r->elapsed > wall ? r->elapsed : wall;
            samples_append(&sd->lat, r->lat, r->nlat);
        }
    } else {
        worker ws[MAX_THREADS];
        for (int t = 0; t < cfg->threads; t++) {
            if (sd->raw && !sd->conns[t] && !(sd->conns[t] = b->raw->connect(b->url)))
                die("raw %s client cannot connect", b->name);
            ws[t] = (worker){.cfg = cfg, .sd = sd, .layer = sd->layer, .conn = sd->conns[t], .tid = (unsigned)t,
                             .round = round, .seconds = seconds,
                             .rng = 0x9E3779B97F4A7C15ull * (uint64_t)(t + 1) ^ round};
        }
        double cpu0 = srv_cpu_read(b);
        rt0 = rt_read(b, &tx0);
        run_threads(ws, cfg->threads);
        rt1 = rt_read(b, &tx1) - rt_self(b);
        double cpu1 = srv_cpu_read(b);
        sd->srv_s = cpu0 < 0 || cpu1 < 0 || sd->srv_s < 0 ? -1 : sd->srv_s + (cpu1 - cpu0);
        for (int t = 0; t < cfg->threads; t++) {
            sd->ops += ws[t].ops;
            sd->errors += ws[t].errors;
            wall = ws[t].elapsed > wall ? ws[t].elapsed : wall;
            samples_append(&sd->lat, ws[t].lat.v, ws[t].lat.n);
            free(ws[t].lat.v);
        }
    }
    sd->seconds += wall;
    sd->rt += rt1 - rt0;
    sd->write_tx += tx1 - tx0;
}

/* Prepare the records the replay and in-progress paths read, for both
 * sides: the library's through the library, the raw client's through the
 * raw client (a driver may encode keys its own way). */
static void prepare_keys(const config *cfg, idem_layer *layer, enum path p)
{
    char key[32];
    char kind = p == P_INPROG ? 'i' : 'p';
    backend *b = cfg->b;
    void *conn = b->raw ? b->raw->connect(b->url) : NULL;
    worker w = {.cfg = cfg, .conn = conn, .rng = 12345};
    for (unsigned i = 0; i < KEYSET; i++) {
        if (layer) {
            size_t n = make_key(key, kind, cfg, 0, 'l', i);
            idem_request req = {.key = key, .key_len = n, .fingerprint = fingerprint,
                                .fingerprint_len = sizeof fingerprint - 1};
            idem_reply reply = {0};
            idem_claim *c = NULL;
            int rc = p == P_INPROG ? idem_begin(layer, &req, &c, &reply)
                                   : idem_run(layer, &req, bench_handler, NULL, &reply);
            if (rc != IDEM_OK || (p == P_INPROG && !c))
                die("preparing %s keys: %s", b->name, rc ? idem_last_error() : "key already taken");
            idem_reply_clear(&reply);
            free(c); /* left claimed in the store on purpose; no API to drop a claim without telling the store */
        }
        if (conn) {
            size_t n = make_key(key, kind, cfg, 0, 'r', i);
            uint8_t rec[REC_MAX];
            uint64_t t1 = xorshift(&w.rng), t2 = xorshift(&w.rng);
            memcpy(rec, tpl_started, sizeof tpl_started);
            memcpy(rec + IDEM_RECORD_TOKEN_OFFSET, &t1, 8);
            memcpy(rec + IDEM_RECORD_TOKEN_OFFSET + 8, &t2, 8);
            uint8_t *ex = NULL;
            size_t exl;
            if (b->raw->claim(conn, key, n, rec, sizeof tpl_started, &ex, &exl) != 0)
                die("preparing raw %s keys: claim failed", b->name);
            if (p != P_INPROG) {
                uint8_t token[IDEM_TOKEN_LEN];
                memcpy(token, rec + IDEM_RECORD_TOKEN_OFFSET, sizeof token);
                memcpy(rec, tpl_completed, sizeof tpl_completed);
                memcpy(rec + IDEM_RECORD_TOKEN_OFFSET, token, sizeof token);
                if (b->raw->commit(conn, key, n, token, rec, sizeof tpl_completed) != 0)
                    die("preparing raw %s keys: commit failed", b->name);
            }
        }
    }
    if (conn)
        b->raw->disconnect(conn);
}

/* ------------------------------------------------------------------------ */
/* Results                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct result {
    char   backend[16];
    char   path[16];
    char   conc[16];
    bool   has_lib, has_raw;
    double ops_s[2];          /* [0] library, [1] raw */
    double p50[2], p99[2], p999[2];
    double rt_op[2], tx_op[2];
    double srv_us[2];         /* the server's CPU µs per operation, or < 0: not known */
    uint64_t ops[2], errors[2];
} result;

static result results[64];
static size_t nresults;

typedef struct memrow {
    char   backend[16];
    double bytes_per_record;
    const char *method;
} memrow;
static memrow memrows[NBACKENDS];
static size_t nmemrows;

static void finish_side(const config *cfg, side *sd, result *r, int i)
{
    for (int t = 0; t < MAX_THREADS; t++)
        if (sd->conns[t])
            cfg->b->raw->disconnect(sd->conns[t]);
    qsort(sd->lat.v, sd->lat.n, sizeof *sd->lat.v, cmp_u32);
    r->ops[i] = sd->ops;
    r->errors[i] = sd->errors;
    r->ops_s[i] = sd->seconds > 0 ? (double)sd->ops / sd->seconds : 0;
    r->p50[i] = quantile_us(&sd->lat, 0.50);
    r->p99[i] = quantile_us(&sd->lat, 0.99);
    r->p999[i] = quantile_us(&sd->lat, 0.999);
    r->rt_op[i] = sd->ops ? (double)sd->rt / (double)sd->ops : 0;
    r->tx_op[i] = sd->ops ? (double)sd->write_tx / (double)sd->ops : 0;
    r->srv_us[i] = sd->srv_s >= 0 && sd->ops ? sd->srv_s * 1e6 / (double)sd->ops : -1;
    free(sd->lat.v);
    sd->lat = (samples){0};
}

static unsigned g_config_id;
static idem_layer *g_cached_layer; /* the layer of the cached-replay path */
static const char *g_only_paths, *g_only_conc; /* --paths, --conc: NULL is all */

/* Is name one of the comma-separated list (NULL: everything is)? */
static bool listed(const char *list, const char *name)
{
    if (!list)
        return true;
    size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0)
            return true;
        p += len + (comma != NULL);
    }
    return false;
}

static void run_config(backend *b, idem_layer *layer, enum path p, int threads, int procs, double seconds,
                       int rounds)
{
    config cfg = {.b = b, .path = p, .threads = threads, .procs = procs, .id = ++g_config_id};
    char conc[16];
    snprintf(conc, sizeof conc, procs > 1 ? "%dp" : "%dt", procs > 1 ? procs : threads);
    if (!listed(g_only_paths, path_names[p]) || !listed(g_only_conc, conc) ||
        (threads == 16 && !g_only_conc))
        return;
    if (p == P_CACHED)
        layer = g_cached_layer;
    if (p != P_NEW)
        prepare_keys(&cfg, layer, p == P_MIX || p == P_CACHED ? P_REPLAY : p);
    side lib = {.raw = false, .layer = layer}, raw = {.raw = true};
    double per_round = seconds / 2 / rounds;
    for (int r = 0; r < rounds; r++) {
        if (layer)
            run_round(&cfg, &lib, (unsigned)r, per_round);
        if (b->raw)
            run_round(&cfg, &raw, (unsigned)r, per_round);
    }
    result *res = &results[nresults++];
    snprintf(res->backend, sizeof res->backend, "%s", b->name);
    snprintf(res->path, sizeof res->path, "%s", path_names[p]);
    snprintf(res->conc, sizeof res->conc, "%s", conc);
    res->has_lib = layer != NULL;
    res->has_raw = b->raw != NULL;
    finish_side(&cfg, &lib, res, 0);
    finish_side(&cfg, &raw, res, 1);
    fprintf(stderr, "  %-9s %-11s %-3s lib %9.0f op/s  raw %9.0f op/s\n", res->backend, res->path,
            res->conc, res->ops_s[0], res->ops_s[1]);
}

/* Bytes the store keeps per completed record with a 100-byte response. */
static void measure_memory(backend *b, idem_layer *layer, int n)
{
    if (!layer || strcmp(b->name, "redis-cluster") == 0) /* per record as on one Redis */
        return;
    config cfg = {.b = b, .id = ++g_config_id};
    char key[32];
    memrow *m = &memrows[nmemrows];
    snprintf(m->backend, sizeof m->backend, "%s", b->name);
    double before = 0, after = 0;
    uint64_t items_before = 0, items_after = 0;
    (void)items_before, (void)items_after, (void)before, (void)after;
#ifdef IDEM_BENCH_HAVE_SQLITE3
    sqlite3 *db = NULL;
    if (strcmp(b->name, "sqlite") == 0) {
        if (sqlite3_open_v2(b->url + strlen("sqlite://"), &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
            die("cannot open %s", b->url);
    }
#endif
    for (int phase = 0; phase < 2; phase++) {
        double v = 0;
#ifdef IDEM_BENCH_HAVE_SQLITE3
        if (db) {
            sqlite3_stmt *st;
            sqlite3_prepare_v2(db, "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                               -1, &st, NULL);
            if (sqlite3_step(st) == SQLITE_ROW)
                v = (double)sqlite3_column_int64(st, 0);
            sqlite3_finalize(st);
            m->method = "page_count*page_size delta / rows";
        }
#endif
#ifdef IDEM_BENCH_HAVE_HIREDIS
        if (strcmp(b->name, "redis") == 0) {
            v = (double)redis_info_u64(b->admin, "memory", "used_memory");
            m->method = "MEMORY USAGE of the key (used_memory delta / records if unknown)";
        }
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
        if (strcmp(b->name, "memcached") == 0) {
            static const char *const bytes[] = {"bytes", NULL}, *const items[] = {"curr_items", NULL};
            v = (double)mc_stat_sum(b->admin, bytes);
            *(phase ? &items_after : &items_before) = mc_stat_sum(b->admin, items);
            m->method = "stats bytes delta / curr_items delta";
        }
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
        if (strcmp(b->name, "postgresql") == 0) {
            PQclear(PQexec(b->admin, "CHECKPOINT"));
            v = (double)pg_u64(b->admin, "SELECT pg_total_relation_size('idempotency_keys')");
            m->method = "pg_total_relation_size delta / rows (table, index, TOAST)";
        }
#endif
        if (phase == 0) {
            before = v;
            for (int i = 0; i < n; i++) {
                size_t kl = make_key(key, 'm', &cfg, 0, 'l', (unsigned long long)i);
                idem_request req = {.key = key, .key_len = kl, .fingerprint = fingerprint,
                                    .fingerprint_len = sizeof fingerprint - 1};
                idem_reply reply = {0};
                if (idem_run(layer, &req, bench_handler, NULL, &reply) != IDEM_OK)
                    die("memory run on %s: %s", b->name, idem_last_error());
                idem_reply_clear(&reply);
            }
        } else {
            after = v;
        }
    }
#ifdef IDEM_BENCH_HAVE_SQLITE3
    if (db)
        sqlite3_close(db);
#endif
    double per = (after - before) / n;
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
    if (strcmp(b->name, "memcached") == 0 && items_after > items_before)
        per = (after - before) / (double)(items_after - items_before);
#endif
#ifdef IDEM_BENCH_HAVE_HIREDIS
    if (strcmp(b->name, "redis") == 0) {
        /* The driver's key is the layer's prefix and the user's key. */
        double sum = 0;
        int found = 0;
        for (int i = 0; i < 100 && i < n; i++) {
            size_t kl = make_key(key, 'm', &cfg, 0, 'l', (unsigned long long)i);
            char full[64];
            int fl = snprintf(full, sizeof full, "idem:%.*s", (int)kl, key);
            redisReply *r = redisCommand(b->admin, "MEMORY USAGE %b SAMPLES 0", full, (size_t)fl);
            if (r && r->type == REDIS_REPLY_INTEGER) {
                sum += (double)r->integer;
                found++;
            }
            if (r)
                freeReplyObject(r);
        }
        if (found)
            per = sum / found;
        else
            m->method = "used_memory delta / records";
    }
#endif
    m->bytes_per_record = per;
    nmemrows++;
}

/* ------------------------------------------------------------------------ */
/* Setup                                                                    */
/* ------------------------------------------------------------------------ */

static bool start_backend(backend *b)
{
    if (!b->url && strcmp(b->name, "postgresql") == 0) /* round trips are counted by the server */
        setenv("IDEM_TEST_PG_CONF", "shared_preload_libraries = 'pg_stat_statements'\n"
                                    "pg_stat_statements.track_utility = off\n", 1);
    if (!b->url) {
        if (idem_test_server_start(&b->srv, b->name) != 0) {
            idem_test_server_stop(&b->srv);
            return false;
        }
        b->started = true;
        b->url = strdup(b->srv.url);
    }
    char host[256];
    uint16_t port = 0;
    (void)host, (void)port;
#ifdef IDEM_BENCH_HAVE_HIREDIS
    if (strcmp(b->name, "redis") == 0) {
        if (!url_host(b->url, host, sizeof host, &port) || !(b->admin = redisConnect(host, port ? port : 6379)) ||
            ((redisContext *)b->admin)->err)
            die("cannot connect to redis at %s", b->url);
    }
    if (strcmp(b->name, "redis-cluster") == 0 && !(b->admin = cluster_owner(b->url)))
        die("cannot find the master of slot %s in %s", CLUSTER_TAG, b->url);
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
    if (strcmp(b->name, "memcached") == 0) {
        if (!(b->admin = raw_mc_connect(b->url)))
            die("cannot connect to memcached at %s", b->url);
    }
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
    if (strcmp(b->name, "postgresql") == 0) {
        b->admin = PQconnectdb(b->url);
        if (!b->admin || PQstatus(b->admin) != CONNECTION_OK)
            die("cannot connect to postgresql at %s: %s", b->url, PQerrorMessage(b->admin));
        PGresult *r = PQexec(b->admin, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            die("postgresql at %s: round trips are counted with pg_stat_statements, which the server must "
                "load (shared_preload_libraries): %s", b->url, PQerrorMessage(b->admin));
        PQclear(r);
    }
#endif
    return true;
}

static void stop_backend(backend *b)
{
#ifdef IDEM_BENCH_HAVE_HIREDIS
    if (strncmp(b->name, "redis", 5) == 0 && b->admin)
        redisFree(b->admin);
#endif
#ifdef IDEM_BENCH_HAVE_LIBMEMCACHED
    if (strcmp(b->name, "memcached") == 0 && b->admin)
        memcached_free(b->admin);
#endif
#ifdef IDEM_BENCH_HAVE_LIBPQ
    if (strcmp(b->name, "postgresql") == 0 && b->admin)
        PQfinish(b->admin);
#endif
    b->admin = NULL;
    if (b->started)
        idem_test_server_stop(&b->srv);
}

/* Make the table a raw-only SQLite run needs (the driver makes it itself). */
static void sqlite_schema(const char *url)
{
#ifdef IDEM_BENCH_HAVE_SQLITE3
    sqlite3 *db;
    if (sqlite3_open(url + strlen("sqlite://"), &db) != SQLITE_OK ||
        sqlite3_exec(db,
                     "PRAGMA journal_mode=WAL;"
                     "CREATE TABLE IF NOT EXISTS idem_records (key BLOB PRIMARY KEY, token BLOB, state TEXT,"
                     " value BLOB NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID;"
                     "CREATE INDEX IF NOT EXISTS idem_records_expiry ON idem_records (expires_at);",
                     NULL, NULL, NULL) != SQLITE_OK)
        die("cannot make the SQLite table in %s", url);
    sqlite3_close(db);
#else
    (void)url;
#endif
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static void fmt_num(char *out, size_t n, bool has, double v, int decimals)
{
    if (has)
        snprintf(out, n, "%.*f", decimals, v);
    else
        snprintf(out, n, "-");
}

static void print_table(FILE *f)
{
    fprintf(f, "| backend | path | conc | lib op/s | raw op/s | lib/raw | lib p50 µs | lib p99 µs | "
               "lib p99.9 µs | raw p50 µs | raw p99 µs | raw p99.9 µs | lib RT/op | raw RT/op |\n");
    fprintf(f, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for (size_t i = 0; i < nresults; i++) {
        result *r = &results[i];
        char c[12][32];
        fmt_num(c[0], 32, r->has_lib, r->ops_s[0], 0);
        fmt_num(c[1], 32, r->has_raw, r->ops_s[1], 0);
        fmt_num(c[2], 32, r->has_lib && r->has_raw && r->ops_s[1] > 0,
                r->ops_s[1] > 0 ? r->ops_s[0] / r->ops_s[1] : 0, 2);
        fmt_num(c[3], 32, r->has_lib, r->p50[0], 1);
        fmt_num(c[4], 32, r->has_lib, r->p99[0], 1);
        fmt_num(c[5], 32, r->has_lib, r->p999[0], 1);
        fmt_num(c[6], 32, r->has_raw, r->p50[1], 1);
        fmt_num(c[7], 32, r->has_raw, r->p99[1], 1);
        fmt_num(c[8], 32, r->has_raw, r->p999[1], 1);
        fmt_num(c[9], 32, r->has_lib, r->rt_op[0], 2);
        fmt_num(c[10], 32, r->has_raw, r->rt_op[1], 2);
        fprintf(f, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r->backend,
                r->path, r->conc, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10]);
    }
    fprintf(f, "\nRT/op: store round trips per operation (sqlite: statements; see bench/README.md).\n");
    bool any_sqlite = false;
    for (size_t i = 0; i < nresults; i++)
        any_sqlite |= strcmp(results[i].backend, "sqlite") == 0;
    if (any_sqlite) {
        fprintf(f, "SQLite write transactions per operation (lib/raw):");
        for (size_t i = 0; i < nresults; i++)
            if (strcmp(results[i].backend, "sqlite") == 0)
                fprintf(f, " %s %s %.2f/%.2f;", results[i].path, results[i].conc, results[i].tx_op[0],
                        results[i].tx_op[1]);
        fputc('\n', f);
    }
    bool any_srv = false;
    for (size_t i = 0; i < nresults; i++)
        any_srv |= results[i].srv_us[0] >= 0 && results[i].srv_us[1] > 0;
    if (any_srv) {
        fprintf(f, "\n| store | path | conc | lib server µs/op | raw server µs/op | lib/raw |\n"
                   "|---|---|---|--:|--:|--:|\n");
        for (size_t i = 0; i < nresults; i++) {
            const result *r = &results[i];
            if (r->srv_us[0] >= 0 && r->srv_us[1] > 0)
                fprintf(f, "| %s | %s | %s | %.2f | %.2f | %.2f |\n", r->backend, r->path, r->conc,
                        r->srv_us[0], r->srv_us[1], r->srv_us[0] / r->srv_us[1]);
        }
        fprintf(f, "\nServer µs/op: the Redis server's CPU time (INFO cpu, main thread) per "
                   "operation, scripts and I/O included.\n");
    }
    fprintf(f, "\n| store | bytes per record (100-byte response) | method |\n|---|--:|---|\n");
    for (size_t i = 0; i < nmemrows; i++)
        fprintf(f, "| %s | %.0f | %s |\n", memrows[i].backend, memrows[i].bytes_per_record, memrows[i].method);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(f, "\nPeak RSS of the benchmark process: %ld KiB\n", ru.ru_maxrss);
}

static void write_csv(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die("cannot write %s: %s", path, strerror(errno));
    fprintf(f, "backend,path,conc,side,ops_per_s,p50_us,p99_us,p999_us,rt_per_op,write_tx_per_op,ops,errors,"
               "server_us_per_op\n");
    for (size_t i = 0; i < nresults; i++) {
        result *r = &results[i];
        for (int s = 0; s < 2; s++) {
            if (!(s ? r->has_raw : r->has_lib))
                continue;
            char srv[32] = "";
            if (r->srv_us[s] >= 0)
                snprintf(srv, sizeof srv, "%.3f", r->srv_us[s]);
            fprintf(f, "%s,%s,%s,%s,%.1f,%.2f,%.2f,%.2f,%.3f,%.3f,%llu,%llu,%s\n", r->backend, r->path,
                    r->conc, s ? "raw" : "lib", r->ops_s[s], r->p50[s], r->p99[s], r->p999[s], r->rt_op[s],
                    r->tx_op[s], (unsigned long long)r->ops[s], (unsigned long long)r->errors[s], srv);
        }
    }
    for (size_t i = 0; i < nmemrows; i++)
        fprintf(f, "%s,memory,-,lib,%.1f,,,,,,,,\n", memrows[i].backend, memrows[i].bytes_per_record);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    fprintf(f, "all,peak_rss_kib,-,-,%ld,,,,,,,,\n", ru.ru_maxrss);
    fclose(f);
}

/* Sane figures: every configuration ran, without errors, with non-zero
 * rates, latencies and round trips. Nothing about speed. */
static int check_sane(void)
{
    int bad = 0;
    for (size_t i = 0; i < nresults; i++) {
        result *r = &results[i];
        for (int s = 0; s < 2; s++) {
            if (!(s ? r->has_raw : r->has_lib))
                continue;
            if (r->ops[s] == 0 || r->errors[s] != 0 || !(r->ops_s[s] > 0) || !(r->p50[s] > 0) ||
                !(r->p99[s] >= r->p50[s]) ||
                (strcmp(r->path, "cached-replay") == 0 && s == 0 ? !(r->rt_op[s] < 0.05)
                                                                 : !(r->rt_op[s] > 0))) {
                fprintf(stderr, "idem_bench: %s %s %s %s: implausible figures (ops %llu, errors %llu, "
                                "p50 %.1f, RT/op %.2f)\n",
                        r->backend, r->path, r->conc, s ? "raw" : "lib", (unsigned long long)r->ops[s],
                        (unsigned long long)r->errors[s], r->p50[s], r->rt_op[s]);
                bad = 1;
            }
        }
    }
    for (size_t i = 0; i < nmemrows; i++)
        if (!(memrows[i].bytes_per_record > 0)) {
            fprintf(stderr, "idem_bench: %s: no bytes per record measured\n", memrows[i].backend);
            bad = 1;
        }
    if (nresults == 0) {
        fprintf(stderr, "idem_bench: no store was measured\n");
        bad = 1;
    }
    if (g_first_error[0])
        fprintf(stderr, "idem_bench: first error: %s\n", g_first_error);
    return bad;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: idem_bench [--quick] [--seconds N] [--rounds N] [--csv FILE] [--only STORE[,STORE]]\n"
            "                  [--paths LIST] [--conc LIST] [--url STORE=URL]\n"
            "  --seconds N   measuring time per store, path and concurrency, shared by library\n"
            "                and raw rounds (default 1.5; the whole run then takes about a minute)\n"
            "  --rounds N    alternating library/raw rounds per configuration (default 4)\n"
            "  --quick       a smoke run: --seconds 0.08 --rounds 2, fewer records for memory\n"
            "  --csv FILE    also write the figures as CSV (default idem_bench.csv)\n"
            "  --only LIST   measure only these stores (sqlite, redis, memcached, postgresql, redis-cluster)\n"
            "  --paths LIST  only these paths (new, replay, in-progress, mix, cached-replay)\n"
            "  --conc LIST   only these concurrencies (1t, 4t, 2p; 16t only when named)\n"
            "  --url S=URL   use a running server for store S instead of starting one\n");
}

int main(int argc, char **argv)
{
    double seconds = 1.5;
    int rounds = 4, mem_records = 2000;
    const char *csv = "idem_bench.csv", *only = NULL;
    static const struct option opts[] = {
        {"quick", no_argument, NULL, 'q'},   {"seconds", required_argument, NULL, 's'},
        {"rounds", required_argument, NULL, 'r'}, {"csv", required_argument, NULL, 'c'},
        {"only", required_argument, NULL, 'o'},   {"url", required_argument, NULL, 'u'},
        {"paths", required_argument, NULL, 'p'},  {"conc", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},    {0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "qs:r:c:o:u:p:t:h", opts, NULL)) != -1) {
        switch (ch) {
        case 'q':
            seconds = 0.08;
            rounds = 2;
            mem_records = 300;
            break;
        case 's':
            seconds = strtod(optarg, NULL);
            if (!(seconds > 0))
                die("--seconds wants a positive number");
            break;
        case 'r':
            rounds = atoi(optarg);
            if (rounds < 1)
                die("--rounds wants a positive number");
            break;
        case 'c':
            csv = optarg;
            break;
        case 'o':
            only = optarg;
            break;
        case 'p':
            g_only_paths = optarg;
            break;
        case 't':
            g_only_conc = optarg;
            break;
        case 'u': {
            const char *eq = strchr(optarg, '=');
            bool found = false;
            for (size_t i = 0; eq && i < NBACKENDS; i++)
                if (strlen(backends[i].name) == (size_t)(eq - optarg) &&
                    strncmp(backends[i].name, optarg, (size_t)(eq - optarg)) == 0) {
                    backends[i].url = strdup(eq + 1);
                    found = true;
                }
            if (!found)
                die("--url wants STORE=URL with STORE one of sqlite, redis, memcached");
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    g_ready = mmap(NULL, sizeof *g_ready, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    g_reports = mmap(NULL, MAX_PROCS * sizeof *g_reports, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                     -1, 0);
    if (g_ready == MAP_FAILED || g_reports == MAP_FAILED)
        die("mmap: %s", strerror(errno));
#ifdef IDEM_BENCH_HAVE_SQLITE3
    sqlite3_auto_extension((void (*)(void))count_on_open);
#endif
    make_templates();
    uint64_t seed = now_ns() ^ (uint64_t)getpid() << 20;
    g_nonce = (uint32_t)xorshift(&seed);

    for (size_t i = 0; i < NBACKENDS; i++) {
        backend *b = &backends[i];
        if (!listed(only, b->name))
            continue;
        if (!b->lib_built && !b->raw) {
            fprintf(stderr, "idem_bench: %s: neither the driver nor a raw client is built in; skipped\n", b->name);
            continue;
        }
        if (!b->lib_built && !b->url) {
            fprintf(stderr, "idem_bench: %s: the driver is not built in; skipped (give --url %s=URL "
                            "to measure the raw client alone)\n", b->name, b->name);
            continue;
        }
        if (!start_backend(b))
            die("cannot start a %s server for the benchmark", b->name);
        fprintf(stderr, "idem_bench: %s at %s\n", b->name, b->url);
        if (strcmp(b->name, "sqlite") == 0)
            sqlite_schema(b->url);
        idem_store *store = NULL;
        idem_layer *layer = b->lib_built ? open_layer(b->url, &store, layer_prefix(b)) : NULL;
        g_cached_layer = layer ? open_layer_cached(b->url, &store, layer_prefix(b), CACHE_BYTES) : NULL;
        for (int t = 1; t <= MAX_THREADS; t *= 4)
            for (int p = 0; p < P_COUNT; p++)
                run_config(b, layer, (enum path)p, t, 1, seconds, rounds);
        if (b->procs)
            for (int p = 0; p < P_COUNT; p++)
                run_config(b, layer, (enum path)p, 1, MAX_PROCS, seconds, rounds);
        measure_memory(b, layer, mem_records);
        size_t centries, cbytes = idem__cache_bytes(g_cached_layer ? idem__layer_cache(g_cached_layer) : NULL,
                                                    &centries);
        if (centries)
            fprintf(stderr, "idem_bench: %s local cache: %zu entries in %zu bytes, %.0f bytes per cached "
                            "entry (100-byte body)\n",
                    b->name, centries, cbytes, (double)cbytes / (double)centries);
        idem_layer_free(g_cached_layer);
        idem_layer_free(layer);
        idem_store_close(store);
        stop_backend(b);
    }
    print_table(stdout);
    write_csv(csv);
    fprintf(stderr, "idem_bench: figures also in %s\n", csv);
    return check_sane();
}
