/*
 * SQLite driver: sqlite:///absolute/path.db[?busy_timeout_ms=N&synchronous=full|normal]
 *
 * One table, one row per key. A claim first reads (a replay or an
 * in-progress answer needs no write lock), and only when the key is free
 * writes: one conditional insert that loses to a live record. Commit,
 * release and extend are single statements fenced by token, state and
 * expiry. WAL mode lets readers run beside the writer.
 *
 * Writers queue twice: the threads of one store in a first-come first-served
 * queue of their own (so they never spin against each other in SQLite's
 * busy handler, which favours no one), and the one at its head against
 * other processes in SQLite's busy timeout. Both waits together stay within
 * busy_timeout_ms.
 *
 * Connections come from the shared pool (idem_pool); one whose statement
 * failed for any reason but a busy lock, a constraint, a size limit or
 * memory is reported broken, so it and the idle ones are replaced (a file
 * made read-only and writable again, a disk that filled up, a database
 * that was replaced).
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include <idempotency/backend.h>

#define DEFAULT_BUSY_TIMEOUT_MS 5000
#define CLEANUP_INTERVAL_MS     1000
#define CLEANUP_BATCH           "256"
#define CLAIM_ATTEMPTS          3
#define CLAIM_POLL_MS           20   /* how often a claim waiting to write looks for a record */

enum stmt_id {
    S_LOOKUP, S_INSERT, S_COMMIT, S_STATE, S_RELEASE, S_EXTEND,
    S_CLEANUP, S_REMOVE, S_COUNT
};

static const char *const stmt_sql[S_COUNT] = {
    [S_LOOKUP] = "SELECT value, expires_at FROM idem_records WHERE key = ?1 AND expires_at > ?2",
    [S_INSERT] = "INSERT INTO idem_records (key, token, state, value, expires_at) "
                 "VALUES (?1, ?2, ?3, ?4, idem_now_ms() + ?5) "
                 "ON CONFLICT (key) DO UPDATE SET token = excluded.token, state = excluded.state, "
                 "value = excluded.value, expires_at = excluded.expires_at "
                 "WHERE idem_records.expires_at <= idem_now_ms()",
    [S_COMMIT] = "UPDATE idem_records SET state = 'C', value = ?1, expires_at = idem_now_ms() + ?2 "
                 "WHERE key = ?3 AND token = ?4 AND state = 'S' AND expires_at > idem_now_ms()",
    [S_STATE] = "SELECT state FROM idem_records WHERE key = ?1 AND token = ?2 AND expires_at > ?3",
    [S_RELEASE] = "DELETE FROM idem_records "
                  "WHERE key = ?1 AND token = ?2 AND state = 'S' AND expires_at > idem_now_ms()",
    /* The token comes from the record: a takeover writes another one. */
    [S_EXTEND] = "UPDATE idem_records SET token = substr(?1, 9, 16), value = ?1, "
                 "expires_at = idem_now_ms() + ?2 "
                 "WHERE key = ?3 AND token = ?4 AND state = 'S' AND expires_at > idem_now_ms()",
    [S_CLEANUP] = "DELETE FROM idem_records WHERE key IN "
                  "(SELECT key FROM idem_records WHERE expires_at <= ?1 LIMIT " CLEANUP_BATCH ")",
    [S_REMOVE] = "DELETE FROM idem_records WHERE key = ?1 AND expires_at > idem_now_ms()",
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
    int           failed;   /* result code of the last failed step in this use, or SQLITE_OK */
} conn;

/* A thread waiting its turn to write, on its own stack. */
typedef struct waiter {
    pthread_cond_t cv;
    bool           granted;
    struct waiter *next;
} waiter;

/* The write queue of one store: first come, first served. */
typedef struct wqueue {
    pthread_mutex_t mu;
    bool            held;
    waiter         *head, *tail;
    unsigned        waiting;
} wqueue;

typedef struct store {
    char            *path;
    char            *where;      /* "sqlite <path>", for messages */
    int              busy_ms;
    const char      *synchronous;
    idem_pool       *pool;
    size_t           max_len;    /* SQLite's length limit, less the row's other columns */
    wqueue           wq;
    _Atomic uint64_t next_cleanup_ms;
} store;

/* ---- the write queue ---- */

static int wq_init(wqueue *q)
{
    memset(q, 0, sizeof *q);
    return pthread_mutex_init(&q->mu, NULL) == 0 ? IDEM_OK : IDEM_ENOMEM;
}

/* Wait, behind the threads that came first, until this thread may write;
 * at most timeout_ms. true when it may, false on timeout (*ahead says how
 * many were waiting when it came). */
static bool wq_lock(wqueue *q, int timeout_ms, unsigned *ahead)
{
    pthread_mutex_lock(&q->mu);
    if (!q->held && !q->head) {
        q->held = true;
        pthread_mutex_unlock(&q->mu);
        return true;
    }
    *ahead = q->waiting + 1;
    waiter w = {.granted = false};
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w.cv, &attr);
    pthread_condattr_destroy(&attr);
    if (q->tail)
        q->tail->next = &w;
    else
        q->head = &w;
    q->tail = &w;
    q->waiting++;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (!w.granted)
        if (pthread_cond_timedwait(&w.cv, &q->mu, &until) == ETIMEDOUT && !w.granted)
            break;
    if (!w.granted) { /* give up our place */
        waiter **pp = &q->head, *prev = NULL;
        while (*pp != &w) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        *pp = w.next;
        if (q->tail == &w)
            q->tail = prev;
    }
    q->waiting--;
    pthread_mutex_unlock(&q->mu);
    pthread_cond_destroy(&w.cv);
    return w.granted;
}

/* Hand the turn to the next thread in line, or free it. */
static void wq_unlock(wqueue *q)
{
    pthread_mutex_lock(&q->mu);
    waiter *next = q->head;
    if (next) {
        q->head = next->next;
        if (!q->head)
            q->tail = NULL;
        next->granted = true; /* q->held stays true: the turn passes */
        pthread_cond_signal(&next->cv);
    } else {
        q->held = false;
    }
    pthread_mutex_unlock(&q->mu);
}

/* ---- errors ---- */

/* Set the message "sqlite <path>: <what>: <detail>" and return err. */
static int sq_error(const store *s, int err, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int sq_error(const store *s, int err, const char *what, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *detail = NULL;
    int n = vasprintf(&detail, fmt, ap);
    va_end(ap);
    if (n < 0)
        return idem_driver_error(err, s->where, what, "%s", idem_strerror(err));
    idem_driver_error(err, s->where, what, "%s", detail);
    free(detail);
    return err;
}

/* Is the directory holding path on a read-only file system? */
static bool on_read_only_fs(const char *path)
{
    char *dir = strdup(path);
    if (!dir)
        return false;
    char *slash = strrchr(dir, '/');
    if (slash)
        slash[slash == dir ? 1 : 0] = '\0';
    struct statvfs vfs;
    bool ro = statvfs(dir, &vfs) == 0 && (vfs.f_flag & ST_RDONLY);
    free(dir);
    return ro;
}

/* The error for a failed SQLite call on db (NULL: code alone). */
static int fail_code(const store *s, sqlite3 *db, int code, const char *what)
{
    const char *msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(code);
    switch (code & 0xff) {
    case SQLITE_TOOBIG: /* retrying cannot help */
        return sq_error(s, IDEM_ETOOBIG, what, "the record is larger than SQLite's length limit");
    case SQLITE_NOMEM:
        return sq_error(s, IDEM_ENOMEM, what, "SQLite is out of memory");
    case SQLITE_BUSY:
        return sq_error(s, IDEM_EBACKEND, what, "%s; another connection to this file (another process, "
                        "or another store opened on it) held the write lock past busy_timeout_ms; "
                        "retry, or raise busy_timeout_ms", msg);
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
        if (on_read_only_fs(s->path))
            return sq_error(s, IDEM_EBACKEND, what, "%s; the file system holding it is mounted read-only",
                            msg);
        if ((code & 0xff) != SQLITE_READONLY && access(s->path, F_OK) == 0 && access(s->path, W_OK) != 0)
            return sq_error(s, IDEM_EBACKEND, what, "%s; the file is not writable by this process", msg);
        if ((code & 0xff) == SQLITE_READONLY)
            return sq_error(s, IDEM_EBACKEND, what, "%s; the file, its -wal or -shm file or its "
                            "directory is read-only for this process", msg);
        return sq_error(s, IDEM_EBACKEND, what, "%s; does its directory exist and is it writable?", msg);
    default:
        return sq_error(s, IDEM_EBACKEND, what, "%s", msg);
    }
}

static int fail(const store *s, sqlite3 *db, const char *what)
{
    return fail_code(s, db, db ? sqlite3_extended_errcode(db) : SQLITE_ERROR, what);
}

/* What a statement's failure says about its connection: a busy lock, a
 * constraint, a size limit or memory leave it as good as it was; anything
 * else (read-only, I/O error, full disk, corruption, a schema that changed
 * under it) and it is replaced, with every idle one. */
static idem_conn_state conn_state_after(int failed)
{
    switch (failed & 0xff) {
    case SQLITE_OK:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_CONSTRAINT:
    case SQLITE_TOOBIG:
    case SQLITE_NOMEM:
        return IDEM_CONN_OK;
    default:
        return IDEM_CONN_BROKEN;
    }
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

static void pool_disconnect(void *ctx, void *c)
{
    (void)ctx;
    conn_free(c);
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

/* idem_now_ms() in SQL: the wall clock of the records' deadlines. */
static void sql_now_ms(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
    (void)argc;
    (void)argv;
    sqlite3_result_int64(ctx, (sqlite3_int64)idem_now_ms());
}

static int conn_new(void *ctx, void **out)
{
    store *s = ctx;
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return sq_error(s, IDEM_ENOMEM, "opening a connection", "out of memory");
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    int orc = sqlite3_open_v2(s->path, &c->db, flags, NULL);
    if (orc != SQLITE_OK) {
        int rc = c->db ? fail(s, c->db, "cannot open the database")
                       : fail_code(s, NULL, orc, "cannot open the database");
        conn_free(c);
        return rc;
    }
    sqlite3_extended_result_codes(c->db, 1);
    sqlite3_busy_timeout(c->db, s->busy_ms);
    /* Leases and fences are judged by the clock when the write happens,
     * after any wait for the write lock, not before it. */
    if (sqlite3_create_function(c->db, "idem_now_ms", 0, SQLITE_UTF8 | SQLITE_DIRECTONLY, NULL, sql_now_ms,
                                NULL, NULL) != SQLITE_OK) {
        int rc = fail(s, c->db, "cannot set up the connection");
        conn_free(c);
        return rc;
    }
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
    void *c;
    int rc = idem_pool_get(s->pool, &c, NULL);
    if (rc == IDEM_OK)
        *out = c;
    return rc;
}

/* Back to the pool, as its last statement left it. */
static void release_conn(store *s, conn *c)
{
    idem_conn_state st = conn_state_after(c->failed);
    c->failed = SQLITE_OK;
    idem_pool_put(s->pool, c, st);
}

/* Take this store's write turn and give SQLite what is left of
 * busy_timeout_ms for other processes. false with a message on timeout. */
static int begin_write(store *s, conn *c, const char *what)
{
    if (s->busy_ms == 0)
        return wq_lock(&s->wq, 0, &(unsigned){0}) ? IDEM_OK
               : sq_error(s, IDEM_EBACKEND, what, "another thread of this process is writing and "
                          "busy_timeout_ms is 0; retry, or raise busy_timeout_ms");
    /* busy_timeout_ms, or the core's deadline for this call when sooner */
    int busy_ms = (int)idem_call_timeout_ms((uint32_t)s->busy_ms);
    uint64_t start = idem_mono_ms();
    unsigned ahead = 0;
    if (!wq_lock(&s->wq, busy_ms, &ahead))
        return sq_error(s, IDEM_EBACKEND, what, "%u threads of this process were waiting to write "
                        "before this one, and its turn did not come within %d ms (busy_timeout_ms is "
                        "%d ms); retry, raise busy_timeout_ms, or use fewer threads", ahead, busy_ms,
                        s->busy_ms);
    uint64_t waited = idem_mono_ms() - start;
    sqlite3_busy_timeout(c->db, waited >= (uint64_t)busy_ms ? 1 : busy_ms - (int)waited);
    return IDEM_OK;
}

static void end_write(store *s)
{
    wq_unlock(&s->wq);
}

/* Step st on c, noting a failure for release_conn(). */
static int step(conn *c, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        c->failed = sqlite3_extended_errcode(c->db);
    return rc;
}

/* Run a statement that returns no rows; SQLITE_DONE or an error code. */
static int run(conn *c, sqlite3_stmt *st)
{
    int rc = step(c, st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

/* ---- driver functions ---- */

/* SQLite refuses rows over SQLITE_LIMIT_LENGTH (1e9 bytes by default); the
 * record shares its row with the key, token, state and expiry. */
#define ROW_ALLOWANCE 4096

static void store_free(store *s)
{
    idem_pool_free(s->pool);
    pthread_mutex_destroy(&s->wq.mu);
    free(s->where);
    free(s->path);
    free(s);
}

static int sq_open(void **state, const idem_url *url)
{
    static const char *const known[] = {"busy_timeout_ms", "synchronous", NULL};
    if (url->nhosts || url->user || url->password || !url->path || url->path[0] != '/' || !url->path[1])
        return idem_error_set(IDEM_EINVAL, "sqlite URLs name an absolute file path and no host: "
                                           "sqlite:///var/lib/app/idem.db (three slashes)");
    int rc = idem_url_check_params(url, "sqlite", known);
    if (rc)
        return rc;
    uint64_t busy = DEFAULT_BUSY_TIMEOUT_MS;
    if ((rc = idem_url_param_uint(url, "busy_timeout_ms", 0, 3600000, &busy)))
        return rc;
    const char *sync = idem_url_param_get(url, "synchronous");
    if (sync && strcmp(sync, "full") != 0 && strcmp(sync, "normal") != 0)
        return idem_error_set(IDEM_EINVAL, "sqlite URL parameter synchronous must be full or normal");
    store *s = calloc(1, sizeof *s);
    if (!s || wq_init(&s->wq) != IDEM_OK) {
        free(s);
        return idem_error_set(IDEM_ENOMEM, "sqlite: out of memory");
    }
    if (!(s->path = strdup(url->path)) || asprintf(&s->where, "sqlite %s", url->path) < 0) {
        s->where = NULL;
        store_free(s);
        return idem_error_set(IDEM_ENOMEM, "sqlite: out of memory");
    }
    s->busy_ms = (int)busy;
    s->synchronous = sync && strcmp(sync, "normal") == 0 ? "NORMAL" : "FULL";
    idem_pool_config pc = {.ctx = s, .connect = conn_new, .disconnect = pool_disconnect};
    if ((rc = idem_pool_new(&s->pool, &pc))) {
        store_free(s);
        return rc;
    }
    conn *c;
    if ((rc = acquire(s, &c))) { /* fail now, not at the first request */
        store_free(s);
        return rc;
    }
    int limit = sqlite3_limit(c->db, SQLITE_LIMIT_LENGTH, -1);
    s->max_len = limit > ROW_ALLOWANCE ? (size_t)limit - ROW_ALLOWANCE : 0;
    release_conn(s, c);
    *state = s;
    return IDEM_OK;
}

static void sq_close(void *state)
{
    store_free(state);
}

/* Look key up; IDEM_OK with *out NULL when there is no live record. */
static int lookup(store *s, conn *c, const void *key, size_t key_len, uint64_t now, void **out,
                  size_t *out_len, uint32_t *remaining_ms)
{
    sqlite3_stmt *st = c->stmt[S_LOOKUP];
    sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)now);
    int rc = step(c, st), ret = IDEM_OK;
    if (rc == SQLITE_ROW) {
        uint64_t left = (uint64_t)sqlite3_column_int64(st, 1) - now;
        *remaining_ms = left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left;
        const void *v = sqlite3_column_blob(st, 0);
        int n = sqlite3_column_bytes(st, 0);
        if (!v && sqlite3_errcode(c->db) == SQLITE_NOMEM)
            ret = fail_code(s, NULL, SQLITE_NOMEM, "reading a record");
        else
            ret = idem_record_dup(s->where, v, n > 0 ? (size_t)n : 0, out, out_len);
    } else if (rc != SQLITE_DONE) {
        ret = fail(s, c->db, "reading a record");
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return ret;
}

/* Delete a batch of expired rows, at most once a second per store; with
 * the write turn held. */
static void maybe_cleanup(store *s, conn *c, uint64_t now)
{
    uint64_t due = atomic_load_explicit(&s->next_cleanup_ms, memory_order_relaxed);
    if (now < due || !atomic_compare_exchange_strong(&s->next_cleanup_ms, &due, now + CLEANUP_INTERVAL_MS))
        return;
    sqlite3_bind_int64(c->stmt[S_CLEANUP], 1, (sqlite3_int64)now);
    if (run(c, c->stmt[S_CLEANUP]) != SQLITE_DONE)
        c->failed = SQLITE_OK; /* a failed clean-up is retried next time; it says nothing of the claim */
}

/* Is rec a STARTED record written under token? */
static bool started_by(const void *rec, size_t len, const uint8_t *token)
{
    idem_record_info info;
    return idem_record_peek(rec, len, &info) == IDEM_OK && info.state == IDEM_STATE_STARTED &&
           memcmp(info.token, token, IDEM_TOKEN_LEN) == 0;
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
     * the claim is tried again). While the insert waits for the write lock
     * (another claim, or the transaction of idem_run_tx() that holds it for
     * its whole work), the record is looked for again every CLAIM_POLL_MS:
     * a duplicate of a running request is answered then, never after that
     * request's work. */
    uint64_t until = idem_mono_ms() + (uint64_t)s->busy_ms;
    for (int attempt = 0; attempt < CLAIM_ATTEMPTS;) {
        rc = lookup(s, c, key, key_len, idem_now_ms(), existing, existing_len, remaining_ms);
        if (rc || *existing) {
            /* This very claim, stored already (the caller sent it again):
             * it is ours, as backend.h says. */
            if (rc == IDEM_OK && ours && started_by(*existing, *existing_len, info.token)) {
                free(*existing);
                *existing = NULL;
                *existing_len = 0;
            }
            goto out;
        }
        uint64_t left = until > idem_mono_ms() ? until - idem_mono_ms() : 0;
        unsigned ahead = 0;
        if (!wq_lock(&s->wq, left < CLAIM_POLL_MS ? left : CLAIM_POLL_MS, &ahead)) {
            if (left > CLAIM_POLL_MS)
                continue; /* look again while others write */
            rc = sq_error(s, IDEM_EBACKEND, "claiming a key", "%u threads of this process were waiting "
                          "to write before this one, and its turn did not come within busy_timeout_ms "
                          "(%d ms); retry, raise busy_timeout_ms, or use fewer threads", ahead, s->busy_ms);
            goto out;
        }
        /* Another process's lock: wait a slice, then look again. */
        sqlite3_busy_timeout(c->db, left < CLAIM_POLL_MS ? (int)left + 1 : CLAIM_POLL_MS);
        uint64_t now = idem_now_ms();
        sqlite3_stmt *st = c->stmt[S_INSERT];
        sqlite3_bind_blob(st, 1, key, (int)key_len, SQLITE_STATIC);
        if (ours) {
            sqlite3_bind_blob(st, 2, info.token, IDEM_TOKEN_LEN, SQLITE_STATIC);
            sqlite3_bind_text(st, 3, info.state == IDEM_STATE_STARTED ? "S" : "C", 1, SQLITE_STATIC);
        }
        sqlite3_bind_blob(st, 4, record, (int)record_len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, (sqlite3_int64)lease_ms);
        int step_rc = run(c, st);
        bool done = step_rc == SQLITE_DONE;
        bool won = done && sqlite3_changes(c->db) == 1;
        if (won)
            maybe_cleanup(s, c, now);
        end_write(s);
        if ((step_rc & 0xff) == SQLITE_BUSY && idem_mono_ms() < until) {
            c->failed = SQLITE_OK;
            continue;
        }
        if (!done) {
            rc = fail(s, c->db, "claiming a key");
            goto out;
        }
        if (won)
            goto out;
        attempt++;
    }
    rc = sq_error(s, IDEM_EBACKEND, "claiming a key", "the key changed hands %d times while it was "
                  "being claimed; retry", CLAIM_ATTEMPTS);
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
    int rc = step(c, st), ret = IDEM_ELOST;
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

/* Run statement id of c, its parameters bound, in this store's write turn:
 * IDEM_OK and the rows it changed, or an error. The bindings are cleared. */
static int write_stmt(store *s, conn *c, enum stmt_id id, const char *what, int *changes)
{
    int rc = begin_write(s, c, what);
    if (rc) {
        sqlite3_clear_bindings(c->stmt[id]);
        return rc;
    }
    int src = run(c, c->stmt[id]);
    *changes = sqlite3_changes(c->db);
    end_write(s);
    return src == SQLITE_DONE ? IDEM_OK : fail(s, c->db, what);
}

/* The fenced UPDATE shared by commit and extend. */
static int fenced_update(store *s, enum stmt_id id, const void *key, size_t key_len,
                         const uint8_t *token, const void *record, size_t record_len, uint64_t ttl_ms)
{
    conn *c;
    int rc = acquire(s, &c), changes = 0;
    if (rc)
        return rc;
    sqlite3_stmt *st = c->stmt[id];
    sqlite3_bind_blob(st, 1, record, (int)record_len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)ttl_ms);
    sqlite3_bind_blob(st, 3, key, (int)key_len, SQLITE_STATIC);
    sqlite3_bind_blob(st, 4, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    rc = write_stmt(s, c, id, id == S_COMMIT ? "storing a response" : "extending a lease", &changes);
    if (rc == IDEM_OK && changes == 0) /* a commit that already happened is recognised by its token */
        rc = id == S_COMMIT ? completed_by(s, c, key, key_len, token, idem_now_ms()) : IDEM_ELOST;
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

/* A DELETE of key (and token, for a release): IDEM_OK and *changes, or an
 * error. */
static int delete_row(store *s, enum stmt_id id, const void *key, size_t key_len, const uint8_t *token,
                      const char *what, int *changes)
{
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    sqlite3_bind_blob(c->stmt[id], 1, key, (int)key_len, SQLITE_STATIC);
    if (token)
        sqlite3_bind_blob(c->stmt[id], 2, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
    rc = write_stmt(s, c, id, what, changes);
    release_conn(s, c);
    return rc;
}

/* A statement that fails leaves the table as it was (SQLite is
 * transactional): no release ever needs to recognise an earlier try of its
 * own, so finding no record is always IDEM_ELOST. */
static int sq_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    int changes = 0;
    int rc = delete_row(state, S_RELEASE, key, key_len, token, "freeing a key", &changes);
    return rc ? rc : changes ? IDEM_OK : IDEM_ELOST;
}

static int sq_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                   uint32_t *remaining_ms)
{
    store *s = state;
    *record = NULL;
    *record_len = 0;
    *remaining_ms = UINT32_MAX;
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    rc = lookup(s, c, key, key_len, idem_now_ms(), record, record_len, remaining_ms);
    release_conn(s, c);
    return rc;
}

static int sq_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    int changes = 0;
    *deleted = false;
    int rc = delete_row(state, S_REMOVE, key, key_len, NULL, "deleting a key", &changes);
    *deleted = rc == IDEM_OK && changes > 0;
    return rc;
}

/* One SELECT over the rows that start with prefix; in WAL mode its read
 * snapshot holds up no writer. */
static int sq_list(void *state, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg)
{
    static const char sql[] = "SELECT key, value, expires_at FROM idem_records "
                              "WHERE key >= ?1 AND substr(key, 1, ?2) = ?1 AND expires_at > ?3";
    store *s = state;
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    uint64_t now = idem_now_ms();
    sqlite3_stmt *st = NULL;
    int src = sqlite3_prepare_v2(c->db, sql, -1, &st, NULL);
    if (src == SQLITE_OK) {
        sqlite3_bind_blob(st, 1, prefix, (int)prefix_len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)prefix_len);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)now);
        while ((src = step(c, st)) == SQLITE_ROW) {
            uint64_t left = (uint64_t)sqlite3_column_int64(st, 2) - now;
            const void *key = sqlite3_column_blob(st, 0);
            int key_len = sqlite3_column_bytes(st, 0);
            const void *value = sqlite3_column_blob(st, 1);
            int value_len = sqlite3_column_bytes(st, 1);
            if (!key || (!value && value_len > 0)) {
                src = SQLITE_NOMEM;
                break;
            }
            if (fn(arg, key, (size_t)key_len, value ? value : "", (size_t)value_len,
                   left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left)) {
                src = SQLITE_DONE;
                break;
            }
        }
    }
    if (src == SQLITE_NOMEM)
        rc = fail_code(s, NULL, SQLITE_NOMEM, "listing keys");
    else if (src != SQLITE_DONE)
        rc = fail(s, c->db, "listing keys");
    sqlite3_finalize(st);
    release_conn(s, c);
    return rc;
}

static size_t sq_max_record_len(void *state)
{
    return ((store *)state)->max_len;
}

/* ---- transactions: a handler's work in this database ---- */

/* The write turn and SQLite's write lock are taken when the transaction
 * opens (BEGIN IMMEDIATE): a transaction that read first and wrote later
 * could find its snapshot stale at its first write. Duplicates are still
 * answered at once, as a claim reads before it writes; other writers wait,
 * as for any write transaction on SQLite. */
static int sq_tx_begin(void *state, void **tx, void **db)
{
    store *s = state;
    conn *c;
    int rc = acquire(s, &c);
    if (rc)
        return rc;
    if ((rc = begin_write(s, c, "opening a transaction"))) {
        release_conn(s, c);
        return rc;
    }
    if (sqlite3_exec(c->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        c->failed = sqlite3_extended_errcode(c->db);
        rc = fail(s, c->db, "opening a transaction");
        end_write(s);
        release_conn(s, c);
        return rc;
    }
    *tx = c;
    *db = c->db;
    return IDEM_OK;
}

static void sq_tx_end(void *state, void *tx)
{
    store *s = state;
    conn *c = tx;
    if (!sqlite3_get_autocommit(c->db) && sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
        c->failed = SQLITE_IOERR; /* a connection that cannot roll back is replaced */
    end_write(s);
    release_conn(s, c);
}

/* A conflict that a new transaction may not meet: its snapshot went stale. */
static int tx_outcome(int code)
{
    return code == SQLITE_BUSY_SNAPSHOT ? IDEM_TX_RETRY : IDEM_TX_ROLLED_BACK;
}

/* On any connection to the file: the caller's own, or tx_begin's. The
 * statement is prepared each time (a caller's connection has none of
 * ours) and binds the time, as a caller's connection lacks idem_now_ms(). */
static int sq_tx_write(void *state, void *conn_db, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint64_t expiry_ms, int *outcome)
{
    static const char sql[] = "UPDATE idem_records SET state = ?1, value = ?2, expires_at = ?3 "
                              "WHERE key = ?4 AND token = ?5 AND state = 'S'";
    static const char what[] = "committing the work with its record";
    store *s = state;
    sqlite3 *db = conn_db;
    idem_record_info info;
    *outcome = IDEM_TX_ROLLED_BACK;
    if (idem_record_peek(record, record_len, &info) != IDEM_OK)
        return idem_error_set(IDEM_EINVAL, "sqlite: the record to write is not one of the core's");
    if (sqlite3_get_autocommit(db))
        return sq_error(s, IDEM_EINVAL, what, "no transaction is open on this connection: it was ended "
                        "before the response could be written in it");
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL), ret = IDEM_OK, changes = 0;
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, info.state == IDEM_STATE_STARTED ? "S" : "C", 1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, record, (int)record_len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (sqlite3_int64)(idem_now_ms() + expiry_ms));
        sqlite3_bind_blob(st, 4, key, (int)key_len, SQLITE_STATIC);
        sqlite3_bind_blob(st, 5, token, IDEM_TOKEN_LEN, SQLITE_STATIC);
        rc = sqlite3_step(st);
        changes = sqlite3_changes(db);
    }
    if (rc != SQLITE_DONE) {
        *outcome = tx_outcome(sqlite3_extended_errcode(db));
        ret = fail(s, db, what);
    } else if (changes == 0) {
        ret = IDEM_ELOST;
    } else if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        *outcome = tx_outcome(sqlite3_extended_errcode(db));
        ret = fail(s, db, what);
        if (ret != IDEM_ENOMEM && ret != IDEM_ETOOBIG)
            ret = IDEM_EBACKEND;
    }
    sqlite3_finalize(st);
    if (ret != IDEM_OK && !sqlite3_get_autocommit(db))
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return ret;
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
    .read = sq_read,
    .remove = sq_remove,
    .check = sq_check,
    .tx_begin = sq_tx_begin,
    .tx_write = sq_tx_write,
    .tx_end = sq_tx_end,
    .list = sq_list,
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
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "synchronous=normal: a power loss or an OS "
                               "crash can lose the last claims and responses, and a retry of one of "
                               "them runs again; remove synchronous=normal from the store URL (full "
                               "is the default)");
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
