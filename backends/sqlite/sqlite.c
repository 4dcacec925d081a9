/*
 * SQLite driver: sqlite:///absolute/path.db[?busy_timeout_ms=N&synchronous=full|normal]
 *
 * One table, one row per key. A claim first reads (a replay or an
 * in-progress answer needs no write lock), and only when the key is free
 * writes: one conditional insert that loses to a live record. Commit, release and extend are single statements fenced by
 * token, state and expiry. WAL mode lets readers run beside the writer, and
 * the busy timeout serialises writers across processes.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include <idempotency/backend.h>

#define DEFAULT_BUSY_TIMEOUT_MS 5000
#define CLEANUP_INTERVAL_MS     1000
#define CLEANUP_BATCH           "256"
#define CLAIM_ATTEMPTS          3

enum stmt_id {
    S_LOOKUP, S_INSERT, S_COMMIT, S_STATE, S_RELEASE, S_EXTEND,
    S_CLEANUP, S_COUNT
};

static const char *const stmt_sql[S_COUNT] = {
    [S_LOOKUP] = "SELECT value, expires_at FROM idem_records WHERE key = ?1 AND expires_at > ?2",
    [S_INSERT] = "INSERT INTO idem_records (key, token, state, value, expires_at) "
                 "VALUES (?1, ?2, ?3, ?4, ?5) "
                 "ON CONFLICT (key) DO UPDATE SET token = excluded.token, state = excluded.state, "
                 "value = excluded.value, expires_at = excluded.expires_at "
                 "WHERE idem_records.expires_at <= ?6",
    [S_COMMIT] = "UPDATE idem_records SET state = 'C', value = ?1, expires_at = ?2 "
                 "WHERE key = ?3 AND token = ?4 AND state = 'S' AND expires_at > ?5",
    [S_STATE] = "SELECT state FROM idem_records WHERE key = ?1 AND token = ?2 AND expires_at > ?3",
    [S_RELEASE] = "DELETE FROM idem_records "
                  "WHERE key = ?1 AND token = ?2 AND state = 'S' AND expires_at > ?3",
    [S_EXTEND] = "UPDATE idem_records SET value = ?1, expires_at = ?2 "
                 "WHERE key = ?3 AND token = ?4 AND state = 'S' AND expires_at > ?5",
    [S_CLEANUP] = "DELETE FROM idem_records WHERE key IN "
                  "(SELECT key FROM idem_records WHERE expires_at <= ?1 LIMIT " CLEANUP_BATCH ")",
};

static const char schema[] =
    "CREATE TABLE IF NOT EXISTS idem_records ("
    " key BLOB PRIMARY KEY,"
    " token BLOB,"              /* NULL for a value this library did not write */
    " state TEXT,"              /* 'S' or 'C' */
    " value BLOB NOT NULL,"
    " expires_at INTEGER NOT NULL"  /* Unix epoch ms */
    ") WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS idem_records_expiry ON idem_records (expires_at);";

typedef struct conn {
    sqlite3      *db;
    sqlite3_stmt *stmt[S_COUNT];
    struct conn  *next;
} conn;

typedef struct store {
    char            *path;
    int              busy_ms;
    const char      *synchronous;
    pthread_mutex_t  mu;
    conn            *idle;       /* connections not in use */
    _Atomic uint64_t next_cleanup_ms;
} store;

static int fail(const store *s, sqlite3 *db, const char *what)
{
    int code = db ? sqlite3_extended_errcode(db) : SQLITE_ERROR;
    if ((code & 0xff) == SQLITE_TOOBIG) /* retrying cannot help */
        return idem_error_set(IDEM_ETOOBIG, "sqlite %s: %s: the record is larger than SQLite's "
                              "length limit", s->path, what);
    const char *hint = (code & 0xff) == SQLITE_BUSY
                           ? "; another process held the write lock past busy_timeout_ms, retry or raise it"
                           : "";
    return idem_error_set(IDEM_EBACKEND, "sqlite %s: %s: %s%s", s->path, what,
                          db ? sqlite3_errmsg(db) : sqlite3_errstr(code), hint);
}

static void conn_free(conn *c)
{
    if (!c)
        return;
    for (int i = 0; i < S_COUNT; i++)
        sqlite3_finalize(c->stmt[i]);
    sqlite3_close(c->db);
    free(c);
}

/* Switch the database to WAL once. Changing the journal mode answers BUSY
 * at once, without the busy handler, while another connection is in the
 * middle of the same switch: wait for it, up to busy_timeout_ms. */
static int set_wal(const store *s, sqlite3 *db)
{
    int rc = SQLITE_BUSY;
    for (int waited = 0; rc == SQLITE_BUSY || rc == SQLITE_LOCKED; waited += 10) {
        sqlite3_stmt *st;
        rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL);
        if (rc != SQLITE_OK)
            return rc;
        rc = sqlite3_step(st);
        sqlite3_finalize(st);
        if (rc == SQLITE_ROW || rc == SQLITE_DONE)
            return SQLITE_OK;
        if (waited >= s->busy_ms)
            break;
        sqlite3_sleep(10);
    }
    return rc;
}

static int conn_new(store *s, conn **out)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return idem_error_set(IDEM_ENOMEM, "sqlite %s: out of memory", s->path);
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(s->path, &c->db, flags, NULL) != SQLITE_OK) {
        int rc = fail(s, c->db, "cannot open the database (does its directory exist and is it writable?)");
        conn_free(c);
        return rc;
    }
    sqlite3_busy_timeout(c->db, s->busy_ms);
    char pragma[64];
    snprintf(pragma, sizeof pragma, "PRAGMA synchronous=%s;", s->synchronous);
    if (set_wal(s, c->db) != SQLITE_OK || sqlite3_exec(c->db, pragma, NULL, NULL, NULL) != SQLITE_OK ||
        sqlite3_exec(c->db, schema, NULL, NULL, NULL) != SQLITE_OK) {
        int rc = fail(s, c->db, "cannot set up the database");
        conn_free(c);
        return rc;
    }
    for (int i = 0; i < S_COUNT; i++) {
        if (sqlite3_prepare_v3(c->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &c->stmt[i], NULL) !=
            SQLITE_OK) {
            int rc = fail(s, c->db, "cannot prepare a statement (is this a libidempotency database?)");
            conn_free(c);
            return rc;
        }
    }
    *out = c;
    return IDEM_OK;
}

static int acquire(store *s, conn **out)
{
    pthread_mutex_lock(&s->mu);
    conn *c = s->idle;
    if (c)
        s->idle = c->next;
    pthread_mutex_unlock(&s->mu);
    if (c) {
        *out = c;
        return IDEM_OK;
    }
    return conn_new(s, out);
}

static void release_conn(store *s, conn *c)
{
    pthread_mutex_lock(&s->mu);
    c->next = s->idle;
    s->idle = c;
    pthread_mutex_unlock(&s->mu);
}

/* Run a statement that returns no rows; SQLITE_DONE or an error code. */
static int run(sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

/* ---- driver functions ---- */

static int sq_open(void **state, const idem_url *url)
{
    if (url->nhosts || url->user || url->password || !url->path || url->path[0] != '/' || !url->path[1])
        return idem_error_set(IDEM_EINVAL, "sqlite URLs name an absolute file path and no host: "
                                           "sqlite:///var/lib/app/idem.db (three slashes)");
    uint64_t busy = DEFAULT_BUSY_TIMEOUT_MS;
    int rc = idem_url_param_uint(url, "busy_timeout_ms", 0, 3600000, &busy);
    if (rc)
        return rc;
    const char *sync = idem_url_param_get(url, "synchronous");
    if (sync && strcmp(sync, "full") != 0 && strcmp(sync, "normal") != 0)
        return idem_error_set(IDEM_EINVAL, "sqlite URL parameter synchronous must be full or normal");
    for (size_t i = 0; i < url->nparams; i++)
        if (strcmp(url->params[i].name, "busy_timeout_ms") && strcmp(url->params[i].name, "synchronous"))
            return idem_error_set(IDEM_EINVAL, "sqlite URL parameter '%s' is unknown; the known ones "
                                  "are busy_timeout_ms and synchronous", url->params[i].name);
    store *s = calloc(1, sizeof *s);
    if (!s || !(s->path = strdup(url->path))) {
        free(s);
        return idem_error_set(IDEM_ENOMEM, "sqlite: out of memory");
    }
    s->busy_ms = (int)busy;
    s->synchronous = sync && strcmp(sync, "normal") == 0 ? "NORMAL" : "FULL";
    pthread_mutex_init(&s->mu, NULL);
    conn *c;
    if ((rc = conn_new(s, &c))) { /* fail now, not at the first request */
        pthread_mutex_destroy(&s->mu);
        free(s->path);
        free(s);
        return rc;
    }
    s->idle = c;
    *state = s;
    return IDEM_OK;
}

static void sq_close(void *state)
{
    store *s = state;
    while (s->idle) {
        conn *c = s->idle;
        s->idle = c->next;
        conn_free(c);
    }
    pthread_mutex_destroy(&s->mu);
    free(s->path);
    free(s);
}

/* Copy the value of the current row of st, column 0. */
static int take_value(const store *s, sqlite3_stmt *st, void **out, size_t *out_len)
{
    int n = sqlite3_column_bytes(st, 0);
    const void *v = sqlite3_column_blob(st, 0);
    *out = malloc(n > 0 ? (size_t)n : 1);
    if (!*out)
        return idem_error_set(IDEM_ENOMEM, "sqlite %s: out of memory reading a record", s->path);
    if (n > 0)
        memcpy(*out, v, (size_t)n);
    *out_len = (size_t)n;
    return IDEM_OK;
}

/* Look key up; IDEM_OK with *out NULL when there is no live record. */
static int lookup(store *s, conn *c, const void *key, size_t key_len, uint64_t now, void **out,
                  size_t *out_len, uint32_t *remaining_ms)
{
    sqlite3_stmt *st = c->stmt[S_LOOKUP];
    sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)now);
    int rc = sqlite3_step(st), ret = IDEM_OK;
    if (rc == SQLITE_ROW) {
        uint64_t left = (uint64_t)sqlite3_column_int64(st, 1) - now;
        *remaining_ms = left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left;
        ret = take_value(s, st, out, out_len);
    } else if (rc != SQLITE_DONE) {
        ret = fail(s, c->db, "reading a record");
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

/* Delete a batch of expired rows, at most once a second per store. */
static void maybe_cleanup(store *s, conn *c, uint64_t now)
{
    uint64_t due = atomic_load_explicit(&s->next_cleanup_ms, memory_order_relaxed);
    if (now < due || !atomic_compare_exchange_strong(&s->next_cleanup_ms, &due, now + CLEANUP_INTERVAL_MS))
        return;
    sqlite3_bind_int64(c->stmt[S_CLEANUP], 1, (sqlite3_int64)now);
    (void)run(c->stmt[S_CLEANUP]); /* a failed clean-up is retried next time */
}

static int sq_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                    uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    store *s = state;
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    idem_record_info info;
    bool ours = idem_record_peek(record, record_len, &info) == IDEM_OK;
    *existing = NULL;
    *existing_len = 0;
    /* Read first: a duplicate needs no write lock. The insert is one
     * autocommit statement that loses to a live record; when it loses, the
     * record that beat it is read again (and if that one is already gone,
     * the claim is tried again). */
    for (int attempt = 0; attempt < CLAIM_ATTEMPTS; attempt++) {
        uint64_t now = idem_now_ms();
        rc = lookup(s, c, key, key_len, now, existing, existing_len, remaining_ms);
        if (rc || *existing)
            goto out;
        sqlite3_stmt *st = c->stmt[S_INSERT];
        sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
        if (ours) {
            sqlite3_bind_blob(st, 2, info.token, IDEM_TOKEN_LEN, SQLITE_STATIC);
            sqlite3_bind_text(st, 3, info.state == IDEM_STATE_STARTED ? "S" : "C", 1, SQLITE_STATIC);
        }
        sqlite3_bind_blob(st, 4, record, (int)record_len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)(now + lease_ms));
        sqlite3_bind_int64(st, 6, (sqlite3_int64)now);
        if (run(st) != SQLITE_DONE) {
            rc = fail(s, c->db, "claiming a key");
            goto out;
        }
        if (sqlite3_changes(c->db) == 1) {
            maybe_cleanup(s, c, now);
            goto out;
        }
    }
    rc = idem_error_set(IDEM_EBACKEND, "sqlite %s: the key changed hands %d times while it was being "
                        "claimed; retry", s->path, CLAIM_ATTEMPTS);
out:
    release_conn(s, c);
    return rc;
}

/* After a fenced write changed nothing: is the record ours and COMPLETED? */
static int completed_by(store *s, conn *c, const void *key, size_t key_len, const uint8_t *token,
                        uint64_t now)
{
    sqlite3_stmt *st = c->stmt[S_STATE];
    sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_blob(st, 2, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
    int rc = sqlite3_step(st), ret = IDEM_ELOST;
    if (rc == SQLITE_ROW) {
        const unsigned char *state = sqlite3_column_text(st, 0);
        ret = state && state[0] == 'C' ? IDEM_OK : IDEM_ELOST;
    } else if (rc != SQLITE_DONE) {
        ret = fail(s, c->db, "reading a record");
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

/* The fenced UPDATE shared by commit and extend. */
static int fenced_update(store *s, enum stmt_id id, const void *key, size_t key_len,
                         const uint8_t *token, const void *record, size_t record_len, uint64_t ttl_ms)
{
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    uint64_t now = idem_now_ms();
    sqlite3_stmt *st = c->stmt[id];
    sqlite3_bind_blob(st, 1, record, (int)record_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)(now + ttl_ms));
    sqlite3_bind_blob(st, 3, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_blob(st, 4, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)now);
    if (run(st) != SQLITE_DONE)
        rc = fail(s, c->db, id == S_COMMIT ? "storing a response" : "extending a lease");
    else if (sqlite3_changes(c->db) == 0)
        rc = id == S_COMMIT ? completed_by(s, c, key, key_len, token, now) : IDEM_ELOST;
    release_conn(s, c);
    return rc;
}

static int sq_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms)
{
    return fenced_update(state, S_COMMIT, key, key_len, token, record, record_len, ttl_ms);
}

static int sq_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms)
{
    return fenced_update(state, S_EXTEND, key, key_len, token, record, record_len, lease_ms);
}

static int sq_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    store *s = state;
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    sqlite3_stmt *st = c->stmt[S_RELEASE];
    sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_blob(st, 2, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)idem_now_ms());
    if (run(st) != SQLITE_DONE)
        rc = fail(s, c->db, "freeing a key");
    else if (sqlite3_changes(c->db) == 0)
        rc = IDEM_ELOST;
    release_conn(s, c);
    return rc;
}

/* SQLite refuses rows over SQLITE_LIMIT_LENGTH (1e9 bytes by default); the
 * record shares its row with the key, token, state and expiry. */
#define ROW_ALLOWANCE 4096

static size_t sq_max_record_len(void *state)
{
    store *s = state;
    pthread_mutex_lock(&s->mu);
    int limit = s->idle ? sqlite3_limit(s->idle->db, SQLITE_LIMIT_LENGTH, -1) : 1000000000;
    pthread_mutex_unlock(&s->mu);
    return limit > ROW_ALLOWANCE ? (size_t)limit - ROW_ALLOWANCE : 0;
}

static int sq_check(void *state, idem_findings *out); /* at the end of the file */

const idem_backend idem__sqlite_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "sqlite",
    .open = sq_open,
    .close = sq_close,
    .claim = sq_claim,
    .commit = sq_commit,
    .release = sq_release,
    .extend = sq_extend,
    .max_record_len = sq_max_record_len,
    .check = sq_check,
};

/* ---- check (an operator's look at the settings) ---- */

#include <errno.h>
#include <sys/vfs.h>

/* Network and cluster file systems, by statfs() magic: their byte-range
 * locks (which SQLite's transactions and WAL rely on) are unreliable. */
static const struct {
    unsigned long magic;
    const char   *name;
} sq_network_fs[] = {
    {0x6969UL, "NFS"},         {0x517BUL, "SMB"},      {0xFE534D42UL, "SMB2"},
    {0xFF534D42UL, "CIFS"},    {0x01021997UL, "9P"},   {0x00C36400UL, "Ceph"},
    {0x5346414FUL, "AFS"},     {0x0BD00BD0UL, "Lustre"}, {0x01161970UL, "GFS2"},
    {0x7461636FUL, "OCFS2"},   {0x65735546UL, "FUSE (sshfs and the like, if networked)"},
};

static int sq_check(void *state, idem_findings *out)
{
    store *s = state;
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(s->path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
        int rc = fail(s, db, "opening the database to check it");
        sqlite3_close(db);
        return rc;
    }
    char mode[16] = "?";
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL) == SQLITE_OK) {
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
            snprintf(mode, sizeof mode, "%s", (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
    }
    sqlite3_close(db);
    int rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "sqlite %s: journal mode %s; every claim "
                               "is one conditional INSERT in one transaction: two claimants never "
                               "both win, on one host", s->path, mode);
    if (rc == IDEM_OK && strcmp(s->synchronous, "FULL") == 0)
        rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "synchronous=full: a stored response and a "
                               "claim survive a crash of the process and a power loss");
    else if (rc == IDEM_OK)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "synchronous=%s: a power loss or an OS crash "
                               "can lose the last claims and responses, and a retry of one of them "
                               "runs again; remove synchronous=normal from the store URL (full is "
                               "the default)", s->synchronous);
    if (rc == IDEM_OK)
        rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "records are never evicted; leases and "
                               "TTLs follow this host's wall clock");
    struct statfs fs;
    if (rc == IDEM_OK && statfs(s->path, &fs) != 0) {
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "cannot tell the file system of %s (statfs: %s)",
                               s->path, strerror(errno));
    } else if (rc == IDEM_OK) {
        const char *net = NULL;
        for (size_t i = 0; i < sizeof sq_network_fs / sizeof sq_network_fs[0]; i++)
            if ((unsigned long)fs.f_type == sq_network_fs[i].magic)
                net = sq_network_fs[i].name;
        if (net)
            rc = idem_findings_add(out, IDEM_FINDING_WARNING, "%s is on a network file system (%s): "
                                   "its file locks are not reliable and WAL needs shared memory on "
                                   "one host, so two claimants may both win; put the database on a "
                                   "local disk, and share Redis or PostgreSQL between hosts instead",
                                   s->path, net);
        else
            rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "the file is on a local file system "
                                   "(statfs type 0x%lx): only processes of this host may share it",
                                   (unsigned long)fs.f_type);
    }
    return rc;
}
