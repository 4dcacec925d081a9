/*
 * PostgreSQL driver over libpq:
 *   postgresql://[user[:password]@][host[:port][,host[:port]...]]/[dbname][?param=value&...]
 *   postgresql:///dbname?host=/run/postgresql          (a unix socket directory, as libpq has it)
 *   postgres://...                                     (the same driver)
 *
 * One table (default idempotency_keys), one row per key, created at open if
 * missing and marked with a comment that carries the schema version; a table
 * of that name without the mark is refused. Times are the server's
 * (clock_timestamp()), never the client's.
 *
 * Every operation is one prepared statement, one round trip:
 *   claim    a data-modifying CTE. It reads the live row in the statement's
 *            snapshot; only when there is none does it INSERT .. ON CONFLICT
 *            (key) DO UPDATE. The DO UPDATE always fires, so the conflicting
 *            row (the newest version, locked, even one committed after the
 *            snapshot) always comes back through RETURNING, but it takes
 *            the row over only when that version has expired; a live row is
 *            written back unchanged. A replay or an in-progress answer thus
 *            writes nothing, and two claimants can never both win: the
 *            unique index picks one, and the loser locks and returns the
 *            winner's row.
 *   commit   an UPDATE fenced by token, state and expiry, which also counts
 *            a COMPLETED row of the same token (a commit retried after its
 *            reply was lost).
 *   release  a fenced DELETE. extend: a fenced UPDATE.
 * Expired rows are deleted in batches of CLEANUP_BATCH, at most once a
 * second per store, after a claim that wrote a row.
 *
 * A libpq connection is not thread-safe: the store keeps a pool of them
 * (idem_pool), each with its statements prepared once.
 */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include <idempotency/backend.h>

#define DRIVER                       "postgresql"
#define DEFAULT_TABLE                "idempotency_keys"
#define DEFAULT_CONNECT_TIMEOUT_MS   2000
#define DEFAULT_STATEMENT_TIMEOUT_MS 2000
#define MAX_TIMEOUT_MS               3600000
/* How much longer than statement_timeout the client waits for a reply
 * before it gives the connection up (a frozen server or a dead network
 * never sends the cancel). */
#define REPLY_GRACE_MS               1000
/* The core's deadline for a call, when sooner, cuts that wait short
 * (idem_call_timeout_ms()): the connection is then closed, as after a reply
 * timeout, and the server ends the statement by its statement_timeout. */
#define CLEANUP_INTERVAL_MS          1000
#define CLEANUP_BATCH                "500"
#define LIST_BATCH                   500  /* rows a statement of a list gives */
#define STR_(x)                      #x
#define STR(x)                       STR_(x)
/* A claim that meets a concurrent claimant under REPEATABLE READ or
 * SERIALIZABLE fails with a serialization error and changed nothing: it is
 * run again, with a new snapshot that sees the other claim. */
#define SERIALIZATION_ATTEMPTS       5
/* A bytea value holds at most 1 GB; leave room for the key and the rest of
 * the protocol message. */
#define MAX_RECORD_LEN               (((size_t)1 << 30) - ((size_t)1 << 20))
#define MAX_IDENT_LEN                63
#define SCHEMA_VERSION               1
#define SCHEMA_MARK_PREFIX           "libidempotency records, schema version "
#define SCHEMA_MARK                  SCHEMA_MARK_PREFIX "1"

/* PostgreSQL type OIDs of the parameters. */
#define OID_BYTEA 17
#define OID_INT8  20
#define OID_TEXT  25

/* ---- the statements (@T is the quoted table name) ---- */

enum stmt_id {
    ST_CLAIM, ST_COMMIT, ST_RELEASE, ST_EXTEND, ST_READ, ST_REMOVE, ST_CLEANUP, ST_CHECK, ST_LIST, ST_COUNT
};

static const char *const stmt_name[ST_COUNT] = {
    [ST_CLAIM] = "idem_claim",     [ST_COMMIT] = "idem_commit", [ST_RELEASE] = "idem_release",
    [ST_EXTEND] = "idem_extend",   [ST_READ] = "idem_read",     [ST_REMOVE] = "idem_remove",
    [ST_CLEANUP] = "idem_cleanup",   [ST_CHECK] = "idem_check",   [ST_LIST] = "idem_list",
};

static const char *const stmt_what[ST_COUNT] = {
    [ST_CLAIM] = "claiming a key",        [ST_COMMIT] = "storing a response",
    [ST_RELEASE] = "freeing a key",       [ST_EXTEND] = "extending a lease",
    [ST_READ] = "reading a record",       [ST_REMOVE] = "deleting a record",
    [ST_CLEANUP] = "deleting expired records",
    [ST_CHECK] = "reading the server's settings",
    [ST_LIST] = "listing keys",
};

#define NOW_CTE "WITH now AS MATERIALIZED (SELECT clock_timestamp() AS t)"
#define MS(x)   "(" x " * interval '1 millisecond')"
#define LEFT_MS(e) "greatest(0, floor(extract(epoch FROM " e " - now.t) * 1000))::bigint"
#define TAKE(col) "CASE WHEN d.e THEN excluded." col " ELSE r." col " END"

static const char *const stmt_sql[ST_COUNT] = {
    /* $1 key, $2 token, $3 state, $4 record, $5 lease ms.
     * -> ours (the row under the key now holds exactly $4), the record when
     *    it is not ours, and the ms left on the row. */
    [ST_CLAIM] =
        "(bytea, bytea, text, bytea, bigint) AS " NOW_CTE ", "
        "live AS (SELECT r.value, r.expires_at FROM @T r, now "
        "         WHERE r.key = $1 AND r.expires_at > now.t), "
        "ins AS (INSERT INTO @T AS r (key, token, state, value, expires_at) "
        "        SELECT $1, $2, $3, $4, now.t + " MS("$5") " FROM now WHERE NOT EXISTS (SELECT FROM live) "
        "        ON CONFLICT (key) DO UPDATE SET (token, state, value, expires_at) = "
        "          (SELECT " TAKE("token") ", " TAKE("state") ", " TAKE("value") ", " TAKE("expires_at")
        "           FROM (SELECT r.expires_at <= (SELECT t FROM now)) AS d(e)) "
        "        RETURNING r.value, r.expires_at) "
        "SELECT x.value = $4, CASE WHEN x.value = $4 THEN NULL ELSE x.value END, "
        LEFT_MS("x.expires_at") " "
        "FROM (SELECT * FROM live UNION ALL SELECT * FROM ins) AS x, now",
    /* $1 key, $2 token, $3 record, $4 ttl ms -> 1: stored or stored before
     * by this token; 0: lost. */
    [ST_COMMIT] =
        "(bytea, bytea, bytea, bigint) AS " NOW_CTE ", "
        "upd AS (UPDATE @T AS r SET state = 'C', value = $3, expires_at = now.t + " MS("$4") " FROM now "
        "        WHERE r.key = $1 AND r.token = $2 AND r.state = 'S' AND r.expires_at > now.t "
        "        RETURNING 1) "
        "SELECT (SELECT count(*) FROM upd) + "
        "       (SELECT count(*) FROM @T AS r, now WHERE r.key = $1 AND r.token = $2 "
        "        AND r.state = 'C' AND r.expires_at > now.t)",
    /* $1 key, $2 token; rows deleted. */
    [ST_RELEASE] =
        "(bytea, bytea) AS DELETE FROM @T "
        "WHERE key = $1 AND token = $2 AND state = 'S' AND expires_at > clock_timestamp()",
    /* $1 key, $2 token, $3 record, $4 lease ms; rows updated. The token
     * comes from the record: a takeover writes another one. */
    [ST_EXTEND] =
        "(bytea, bytea, bytea, bigint) AS UPDATE @T SET token = substring($3 FROM 9 FOR 16), value = $3, "
        "expires_at = clock_timestamp() + " MS("$4") " "
        "WHERE key = $1 AND token = $2 AND state = 'S' AND expires_at > clock_timestamp()",
    /* $1 key -> the live record and the ms left on it, or no row. */
    [ST_READ] =
        "(bytea) AS " NOW_CTE " SELECT r.value, " LEFT_MS("r.expires_at") " "
        "FROM @T AS r, now WHERE r.key = $1 AND r.expires_at > now.t",
    /* $1 key -> how many live records were deleted (0 or 1). */
    [ST_REMOVE] =
        "(bytea) AS " NOW_CTE ", d AS (DELETE FROM @T WHERE key = $1 RETURNING expires_at) "
        "SELECT count(*) FROM d, now WHERE d.expires_at > now.t",
    /* A batch of expired rows, skipping rows a claim is taking over. */
    [ST_CLEANUP] =
        "AS DELETE FROM @T WHERE key IN (SELECT key FROM @T WHERE expires_at <= clock_timestamp() "
        "LIMIT " CLEANUP_BATCH " FOR UPDATE SKIP LOCKED) AND expires_at <= clock_timestamp()",
    /* -> synchronous_commit, fsync, and whether the server is a standby. */
    [ST_CHECK] =
        "AS SELECT current_setting('synchronous_commit'), current_setting('fsync'), "
        "pg_is_in_recovery()::text",
    /* $1 prefix, $2 its length, $3 the last key of the batch before ('' for
     * the first) -> the next batch of live records: key, record, ms left. */
    [ST_LIST] =
        "(bytea, integer, bytea) AS " NOW_CTE " SELECT r.key, r.value, " LEFT_MS("r.expires_at") " "
        "FROM @T AS r, now WHERE r.key >= $1 AND r.key > $3 AND substring(r.key FROM 1 FOR $2) = $1 "
        "AND r.expires_at > now.t ORDER BY r.key LIMIT " STR(LIST_BATCH),
};

static const char schema_sql[] =
    "CREATE TABLE IF NOT EXISTS @T ("
    " key bytea PRIMARY KEY,"
    " token bytea,"                    /* NULL for a value this library did not write */
    " state text,"                     /* 'S' (STARTED) or 'C' (COMPLETED) */
    " value bytea NOT NULL,"           /* the record, as the core encoded it */
    " expires_at timestamptz NOT NULL" /* by the server's clock */
    ")";

static const char schema_finish_sql[] =
    "CREATE INDEX ON @T (expires_at); COMMENT ON TABLE @T IS '" SCHEMA_MARK "'; COMMIT";

/* How the table under the name looks: ours, missing, or not ours.  to_regclass
 * looks the name up in the catalog cache, which can already see a table that
 * another store's transaction has just committed while this statement's
 * snapshot cannot yet see its comment; so whether the table exists is read from
 * pg_class in the same snapshot as the comment, and a table made just now counts
 * as missing (the creating path then finds it under the lock). */
static const char schema_check_sql[] =
    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', "
    "c.oid IS NOT NULL, obj_description(c.oid, 'pg_class') "
    "FROM (SELECT (SELECT oid FROM pg_class WHERE oid = to_regclass($1)) AS oid) AS c";

/* ---- the store ---- */

#define MAX_KEYWORDS 24

/* Ours, then from FIRST_LIBPQ_PARAM on libpq's, handed over as they are
 * (host is handled with the URL's hosts). */
#define FIRST_LIBPQ_PARAM 3
static const char *const known_params[] = {
    "table", "connect_timeout_ms", "statement_timeout_ms",
    "host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "target_session_attrs",
    "application_name", "options", "passfile", "channel_binding", "gssencmode",
    NULL,
};

typedef struct store {
    char            *where;        /* "127.0.0.1:5432/app", for messages */
    char            *password;     /* never printed; kept to scrub messages */
    char            *table;        /* quoted: "idempotency_keys" or "app"."keys" */
    char            *setup_sql;    /* SET and PREPARE, sent on every new connection */
    char            *tx_sql;       /* tx_write's UPDATE, for any connection (none prepared) */
    const char      *keywords[MAX_KEYWORDS + 1];
    char            *values[MAX_KEYWORDS + 1];
    int              nkeywords;
    unsigned         connect_ms, statement_ms;
    idem_pool       *pool;
    _Atomic uint64_t next_cleanup_ms;
} store;

/* ---- messages ---- */

/* libpq's text on one line, without a trailing newline, and without the
 * password should any message ever repeat it. malloc'd; NULL when out of
 * memory. */
static char *one_line(const store *s, const char *msg)
{
    if (!msg)
        msg = "";
    size_t n = strlen(msg);
    char *out = malloc(2 * n + 1), *q = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (msg[i] == '\n' || msg[i] == '\r' || msg[i] == '\t') {
            size_t j = i;
            while (j < n && (msg[j] == '\n' || msg[j] == '\r' || msg[j] == '\t' || msg[j] == ' '))
                j++;
            if (j < n && q > out)
                *q++ = ';', *q++ = ' ';
            i = j - 1;
            continue;
        }
        *q++ = msg[i];
    }
    *q = '\0';
    size_t pl = s->password ? strlen(s->password) : 0;
    if (pl >= 4) {
        char *hit;
        while ((hit = strstr(out, s->password))) {
            memcpy(hit, "***", 3);
            memmove(hit + 3, hit + pl, strlen(hit + pl) + 1);
        }
    }
    return out;
}

/* What to do next, from the text of a connection failure. */
static const char *connect_hint(const char *msg)
{
    if (strstr(msg, "password authentication failed") || strstr(msg, "SCRAM"))
        return "; check the user name and password in the store URL (or the ~/.pgpass or "
               "PGPASSFILE entry)";
    if (strstr(msg, "no password supplied") || strstr(msg, "fe_sendauth"))
        return "; the server wants a password: postgresql://user:PASSWORD@host/dbname, or an "
               "entry in ~/.pgpass or PGPASSFILE";
    if ((strstr(msg, "Connection refused") || strstr(msg, "No such file or directory")) &&
        !strstr(msg, "Is the server running")) /* libpq says so itself */
        return "; is the PostgreSQL server running and listening there?";
    if (strstr(msg, "does not exist") && strstr(msg, "role"))
        return "; name an existing user in the URL (postgresql://USER@host/dbname), or create this "
               "one on the server (createuser NAME, or CREATE ROLE NAME LOGIN)";
    if (strstr(msg, "does not exist") && strstr(msg, "database"))
        return "; create the database (createdb NAME) or name another one in the URL path";
    if (strstr(msg, "too many clients") || strstr(msg, "remaining connection slots"))
        return "; raise max_connections on the server, or use fewer threads per store";
    if (strstr(msg, "no pg_hba.conf entry"))
        return "; allow this client in the server's pg_hba.conf";
    if (strstr(msg, "starting up") || strstr(msg, "shutting down") || strstr(msg, "recovery mode"))
        return "; the server is restarting: retry shortly";
    return "";
}

/* The connection failed: IDEM_EBACKEND with libpq's reason. */
static int conn_error(const store *s, PGconn *pg, const char *what)
{
    if (!pg)
        return idem_driver_error(IDEM_ENOMEM, s->where, what, "out of memory");
    char *msg = one_line(s, PQerrorMessage(pg));
    if (!msg)
        return idem_driver_error(IDEM_ENOMEM, s->where, what, "out of memory");
    int rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "%s%s",
                               msg[0] ? msg : "the connection failed", connect_hint(msg));
    free(msg);
    return rc;
}

static bool sqlstate_is(const char *code, const char *want)
{
    return code && strcmp(code, want) == 0;
}

/* The server refused a statement: IDEM_EBACKEND with its reason and what
 * to do; *state says whether the connection is still of use. */
static int result_error(const store *s, PGconn *pg, const PGresult *res, const char *what,
                        idem_conn_state *state)
{
    if (PQstatus(pg) != CONNECTION_OK) {
        *state = IDEM_CONN_BROKEN;
        return conn_error(s, pg, what);
    }
    const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *text = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!text)
        text = res ? PQresultErrorMessage(res) : PQerrorMessage(pg);
    const char *hint = "";
    char buf[256];
    if (sqlstate_is(code, "57014")) {
        snprintf(buf, sizeof buf, "; the statement ran past statement_timeout_ms (%u ms, a "
                 "parameter of the store URL): is the server overloaded?", s->statement_ms);
        hint = buf;
    } else if (sqlstate_is(code, "25006")) {
        *state = IDEM_CONN_BROKEN; /* a new connection may reach the new primary */
        hint = "; the server is read-only (a hot standby, or default_transaction_read_only is on): "
               "point the store URL at the primary, or list every host with "
               "target_session_attrs=read-write";
    } else if (sqlstate_is(code, "42P01") || sqlstate_is(code, "26000")) {
        *state = IDEM_CONN_BROKEN;
        hint = "; the table or the driver's prepared statements are gone (the table was dropped, "
               "or a pooler in transaction mode sits in between: use session pooling); reopen the "
               "store";
    } else if (code && strncmp(code, "57P", 3) == 0) {
        *state = IDEM_CONN_BROKEN;
        hint = "; the server is shutting down or restarting: retry shortly";
    } else if (sqlstate_is(code, "40001") || sqlstate_is(code, "40P01")) {
        hint = "; the key was contended past every retry: retry the request";
    } else if (code && strncmp(code, "53", 2) == 0) {
        hint = "; the server is out of a resource (disk, memory or connections)";
    }
    char *msg = one_line(s, text);
    if (!msg)
        return idem_driver_error(IDEM_ENOMEM, s->where, what, "out of memory");
    int rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "the server answered: %s%s%s%s", msg,
                               code ? " (SQLSTATE " : "", code ? code : "", code ? ")" : "");
    if (hint[0])
        rc = idem_error_set(IDEM_EBACKEND, "%s%s", idem_last_error(), hint);
    free(msg);
    return rc;
}

/* ---- talking to the server, within a deadline ---- */

/* Send what is queued and read until a whole result is in. IDEM_OK, or
 * IDEM_EBACKEND and the connection is of no further use. */
static int await_result(const store *s, PGconn *pg, uint64_t deadline, unsigned timeout_ms,
                        const char *what)
{
    for (;;) {
        int flushed = PQflush(pg); /* 0: all sent, 1: more to send, -1: failed */
        if (flushed < 0)
            return conn_error(s, pg, what);
        if (flushed == 0 && !PQisBusy(pg))
            return IDEM_OK;
        uint64_t now = idem_mono_ms(), call_deadline = idem_call_deadline_ms();
        if (now >= deadline && call_deadline && now >= call_deadline)
            return idem_driver_error(IDEM_EBACKEND, s->where, what,
                                     "no reply within the %u ms the library left this call (what "
                                     "remained of commit_timeout_ms or of the lease); the statement "
                                     "may be waiting for a lock, or the server may be frozen", timeout_ms);
        if (now >= deadline)
            return idem_driver_error(IDEM_EBACKEND, s->where, what,
                                     "no reply within %u ms; the server may be frozen or unreachable "
                                     "(connect_timeout_ms and statement_timeout_ms in the store URL)",
                                     timeout_ms);
        struct pollfd p = {.fd = PQsocket(pg), .events = (short)(POLLIN | (flushed ? POLLOUT : 0))};
        if (p.fd < 0)
            return conn_error(s, pg, what);
        int n = poll(&p, 1, (int)(deadline - now));
        if (n < 0 && errno != EINTR)
            return idem_driver_error(IDEM_EBACKEND, s->where, what, "poll: %s", strerror(errno));
        if (n > 0 && (p.revents & (POLLIN | POLLERR | POLLHUP)) && !PQconsumeInput(pg))
            return conn_error(s, pg, what);
    }
}

/* The next result of what was sent (NULL after the last). */
static int next_result(const store *s, PGconn *pg, uint64_t deadline, unsigned timeout_ms,
                       const char *what, PGresult **out)
{
    *out = NULL;
    int rc = await_result(s, pg, deadline, timeout_ms, what);
    if (rc == IDEM_OK)
        *out = PQgetResult(pg);
    return rc;
}

/* Read every result of what was sent; keep the first (or the first
 * failure) in *out. */
static int collect(const store *s, PGconn *pg, uint64_t deadline, unsigned timeout_ms, const char *what,
                   PGresult **out)
{
    *out = NULL;
    for (;;) {
        PGresult *r;
        int rc = next_result(s, pg, deadline, timeout_ms, what, &r);
        if (rc) {
            PQclear(*out);
            *out = NULL;
            return rc;
        }
        if (!r)
            return IDEM_OK;
        ExecStatusType st = PQresultStatus(r);
        bool failed = st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK && st != PGRES_EMPTY_QUERY;
        if (!*out || (failed && PQresultStatus(*out) != PGRES_FATAL_ERROR)) {
            PQclear(*out);
            *out = r;
        } else {
            PQclear(r);
        }
    }
}

/* After collect(): IDEM_OK for a result without error, else an error and
 * *state. */
static int check_result(const store *s, PGconn *pg, const PGresult *res, const char *what,
                        idem_conn_state *state)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY)
        return IDEM_OK;
    return result_error(s, pg, res, what, state);
}

/* Run sql (one or more statements, the simple protocol) and check it. */
static int run_simple(const store *s, PGconn *pg, const char *sql, uint64_t deadline,
                      unsigned timeout_ms, const char *what)
{
    idem_conn_state state = IDEM_CONN_OK;
    if (!PQsendQuery(pg, sql))
        return conn_error(s, pg, what);
    PGresult *res;
    int rc = collect(s, pg, deadline, timeout_ms, what, &res);
    if (rc == IDEM_OK)
        rc = check_result(s, pg, res, what, &state);
    PQclear(res);
    return rc;
}

/* ---- connections ---- */

/* Connect, within connect_timeout_ms. */
static int connect_raw(store *s, PGconn **out, uint64_t deadline)
{
    const char *what = "connecting";
    PGconn *pg = PQconnectStartParams(s->keywords, (const char *const *)s->values, 0);
    if (!pg)
        return idem_driver_error(IDEM_ENOMEM, s->where, what, "out of memory");
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    if (PQstatus(pg) == CONNECTION_BAD)
        st = PGRES_POLLING_FAILED;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED) {
            int rc = conn_error(s, pg, what);
            PQfinish(pg);
            return rc;
        }
        uint64_t now = idem_mono_ms();
        if (now >= deadline) {
            PQfinish(pg);
            return idem_driver_error(IDEM_EBACKEND, s->where, what,
                                     "no answer within %u ms (connect_timeout_ms in the store URL); "
                                     "is the host reachable and the server running?", s->connect_ms);
        }
        struct pollfd p = {.fd = PQsocket(pg), .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        int n = p.fd < 0 ? 1 : poll(&p, 1, (int)(deadline - now));
        if (n < 0 && errno != EINTR) {
            PQfinish(pg);
            return idem_driver_error(IDEM_EBACKEND, s->where, what, "poll: %s", strerror(errno));
        }
        if (n != 0)
            st = PQconnectPoll(pg);
    }
    if (PQsetnonblocking(pg, 1) != 0) {
        int rc = conn_error(s, pg, what);
        PQfinish(pg);
        return rc;
    }
    *out = pg;
    return IDEM_OK;
}

/* The pool's connect: a connection with the statements prepared. */
static int pool_connect(void *ctx, void **conn)
{
    store *s = ctx;
    uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->connect_ms);
    PGconn *pg;
    int rc = connect_raw(s, &pg, deadline);
    if (rc)
        return rc;
    if ((rc = run_simple(s, pg, s->setup_sql, deadline, s->connect_ms, "preparing the statements"))) {
        PQfinish(pg);
        return rc;
    }
    *conn = pg;
    return IDEM_OK;
}

static void pool_disconnect(void *ctx, void *conn)
{
    (void)ctx;
    PQfinish(conn);
}

/* Did the server close this idle connection (it restarted, or shut down)?
 * Looked at before anything is sent, so the call can run again on a new
 * connection without having touched the store. */
static bool closed_while_idle(PGconn *pg)
{
    struct pollfd p = {.fd = PQsocket(pg), .events = POLLIN};
    if (p.fd < 0)
        return true;
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLERR | POLLHUP)))
        if (!PQconsumeInput(pg))
            return true;
    return PQstatus(pg) != CONNECTION_OK || PQtransactionStatus(pg) != PQTRANS_IDLE;
}

/* ---- running a statement ---- */

typedef struct op {
    store       *s;
    enum stmt_id id;
    int          nparams;
    const char  *values[5];
    int          lengths[5];
    int          formats[5];
    PGresult    *res;       /* the result, for the caller to read and PQclear() */
} op;

static void op_bytes(op *o, const void *p, size_t len)
{
    o->values[o->nparams] = len ? p : "";
    o->lengths[o->nparams] = (int)len;
    o->formats[o->nparams] = 1;
    o->nparams++;
}

static void op_text(op *o, const char *text)
{
    o->values[o->nparams] = text;
    o->lengths[o->nparams] = 0;
    o->formats[o->nparams] = 0;
    o->nparams++;
}

static int exec_stmt(store *s, PGconn *pg, enum stmt_id id, int nparams, const char *const *values,
                     const int *lengths, const int *formats, PGresult **out, idem_conn_state *state)
{
    const char *what = stmt_what[id];
    unsigned timeout = idem_call_timeout_ms(s->statement_ms + REPLY_GRACE_MS);
    *out = NULL;
    if (!PQsendQueryPrepared(pg, stmt_name[id], nparams, values, lengths, formats, 1)) {
        *state = IDEM_CONN_BROKEN;
        return conn_error(s, pg, what);
    }
    PGresult *res;
    int rc = collect(s, pg, idem_mono_ms() + timeout, timeout, what, &res);
    if (rc) {
        *state = IDEM_CONN_BROKEN;
        return rc;
    }
    if ((rc = check_result(s, pg, res, what, state))) {
        PQclear(res);
        return rc;
    }
    *out = res;
    return IDEM_OK;
}

static bool is_serialization_failure(const PGresult *res)
{
    const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return sqlstate_is(code, "40001") || sqlstate_is(code, "40P01");
}

/* Delete a batch of expired rows, at most once a second per store. A
 * failure is left for the next time, unless the connection broke. */
static void maybe_cleanup(store *s, PGconn *pg, idem_conn_state *state)
{
    uint64_t now = idem_mono_ms();
    uint64_t due = atomic_load_explicit(&s->next_cleanup_ms, memory_order_relaxed);
    if (now < due ||
        !atomic_compare_exchange_strong(&s->next_cleanup_ms, &due, now + CLEANUP_INTERVAL_MS))
        return;
    PGresult *res;
    char *saved = strdup(idem_last_error());
    if (exec_stmt(s, pg, ST_CLEANUP, 0, NULL, NULL, NULL, &res, state) == IDEM_OK)
        PQclear(res);
    idem_error_set(IDEM_OK, "%s", saved ? saved : "");
    free(saved);
}

static bool claimed_by_us(const PGresult *res)
{
    return PQntuples(res) == 1 && PQnfields(res) == 3 && PQgetlength(res, 0, 0) == 1 &&
           PQgetvalue(res, 0, 0)[0] == 1;
}

/* One use of a pooled connection (idem_pool_fn). */
static int op_fn(void *conn, void *arg, idem_conn_state *state)
{
    op *o = arg;
    store *s = o->s;
    PGconn *pg = conn;
    *state = IDEM_CONN_OK;
    if (closed_while_idle(pg)) {
        *state = IDEM_CONN_STALE;
        return conn_error(s, pg, stmt_what[o->id]);
    }
    for (int attempt = 1;; attempt++) {
        PGresult *res = NULL;
        idem_conn_state st = IDEM_CONN_OK;
        /* check_result() only reads the result; keep it for the retry test. */
        if (!PQsendQueryPrepared(pg, stmt_name[o->id], o->nparams, o->values, o->lengths, o->formats,
                                 1)) {
            *state = IDEM_CONN_BROKEN;
            return conn_error(s, pg, stmt_what[o->id]);
        }
        unsigned timeout = idem_call_timeout_ms(s->statement_ms + REPLY_GRACE_MS);
        int rc = collect(s, pg, idem_mono_ms() + timeout, timeout, stmt_what[o->id], &res);
        if (rc) {
            *state = IDEM_CONN_BROKEN;
            return rc;
        }
        if (attempt < SERIALIZATION_ATTEMPTS && PQresultStatus(res) == PGRES_FATAL_ERROR &&
            is_serialization_failure(res) && PQstatus(pg) == CONNECTION_OK) {
            PQclear(res);
            continue;
        }
        if ((rc = check_result(s, pg, res, stmt_what[o->id], &st))) {
            *state = st;
            PQclear(res);
            return rc;
        }
        if (o->id == ST_CLAIM && claimed_by_us(res))
            maybe_cleanup(s, pg, state);
        o->res = res;
        return IDEM_OK;
    }
}

static int run_op(op *o)
{
    o->res = NULL;
    return idem_pool_run(o->s->pool, op_fn, o);
}

static int unexpected(const store *s, enum stmt_id id, PGresult *res)
{
    int rc = idem_driver_error(IDEM_EBACKEND, s->where, stmt_what[id],
                               "unexpected result (%d rows of %d columns); is the table %s the "
                               "driver's own?", PQntuples(res), PQnfields(res), s->table);
    PQclear(res);
    return rc;
}

static uint64_t be64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | (uint8_t)p[i];
    return v;
}

/* Column c of row 0 as a bigint (binary result). */
static bool get_int8(const PGresult *res, int c, int64_t *out)
{
    if (PQgetisnull(res, 0, c) || PQgetlength(res, 0, c) != 8)
        return false;
    *out = (int64_t)be64(PQgetvalue(res, 0, c));
    return true;
}

static uint32_t clamp_ms(int64_t ms)
{
    return ms < 0 ? 0 : ms >= (int64_t)UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)ms;
}

/* ---- the operations ---- */

static int pg_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                    uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    store *s = state;
    *existing = NULL;
    *existing_len = 0;
    idem_record_info info;
    bool ours = idem_record_peek(record, record_len, &info) == IDEM_OK;
    char lease[24], st[2] = {0};
    snprintf(lease, sizeof lease, "%u", lease_ms);
    op o = {.s = s, .id = ST_CLAIM};
    op_bytes(&o, key, key_len);
    if (ours) {
        op_bytes(&o, info.token, IDEM_TOKEN_LEN);
        st[0] = (char)info.state;
        op_text(&o, st);
    } else { /* a value this library did not write: no token, no state */
        op_text(&o, NULL);
        op_text(&o, NULL);
    }
    op_bytes(&o, record, record_len);
    op_text(&o, lease);
    int rc = run_op(&o);
    if (rc)
        return rc;
    PGresult *res = o.res;
    int64_t left;
    if (PQntuples(res) != 1 || PQnfields(res) != 3 || PQgetlength(res, 0, 0) != 1 || !get_int8(res, 2, &left))
        return unexpected(s, ST_CLAIM, res);
    /* Ours: a new row, an expired one taken over, or (a claim sent again
     * after its reply was lost) our own live STARTED row. */
    if (PQgetvalue(res, 0, 0)[0] == 1) {
        PQclear(res);
        return IDEM_OK;
    }
    if (PQgetisnull(res, 0, 1))
        return unexpected(s, ST_CLAIM, res);
    rc = idem_record_dup(DRIVER, PQgetvalue(res, 0, 1), (size_t)PQgetlength(res, 0, 1), existing,
                         existing_len);
    *remaining_ms = clamp_ms(left);
    PQclear(res);
    return rc;
}

/* Run a fenced statement whose answer is a count (a bigint row, or the
 * rows the command changed): IDEM_OK for 1, IDEM_ELOST for 0. */
static int run_fenced(op *o)
{
    int rc = run_op(o);
    if (rc)
        return rc;
    PGresult *res = o->res;
    int64_t n;
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        if (PQntuples(res) != 1 || !get_int8(res, 0, &n))
            return unexpected(o->s, o->id, res);
    } else {
        n = atoll(PQcmdTuples(res));
    }
    PQclear(res);
    return n > 0 ? IDEM_OK : IDEM_ELOST;
}

static int pg_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms)
{
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%llu", (unsigned long long)ttl_ms);
    op o = {.s = state, .id = ST_COMMIT};
    op_bytes(&o, key, key_len);
    op_bytes(&o, token, IDEM_TOKEN_LEN);
    op_bytes(&o, record, record_len);
    op_text(&o, ttl);
    return run_fenced(&o);
}

static int pg_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    op o = {.s = state, .id = ST_RELEASE};
    op_bytes(&o, key, key_len);
    op_bytes(&o, token, IDEM_TOKEN_LEN);
    return run_fenced(&o);
}

static int pg_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms)
{
    char lease[24];
    snprintf(lease, sizeof lease, "%u", lease_ms);
    op o = {.s = state, .id = ST_EXTEND};
    op_bytes(&o, key, key_len);
    op_bytes(&o, token, IDEM_TOKEN_LEN);
    op_bytes(&o, record, record_len);
    op_text(&o, lease);
    return run_fenced(&o);
}

static int pg_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                   uint32_t *remaining_ms)
{
    store *s = state;
    *record = NULL;
    *record_len = 0;
    op o = {.s = s, .id = ST_READ};
    op_bytes(&o, key, key_len);
    int rc = run_op(&o);
    if (rc)
        return rc;
    PGresult *res = o.res;
    if (PQntuples(res) == 0) {
        PQclear(res);
        return IDEM_OK;
    }
    int64_t left;
    if (PQntuples(res) != 1 || PQnfields(res) != 2 || PQgetisnull(res, 0, 0) || !get_int8(res, 1, &left))
        return unexpected(s, ST_READ, res);
    rc = idem_record_dup(DRIVER, PQgetvalue(res, 0, 0), (size_t)PQgetlength(res, 0, 0), record,
                         record_len);
    *remaining_ms = clamp_ms(left);
    PQclear(res);
    return rc;
}

/* In batches ordered by key, each one statement: no statement holds the
 * table for the whole walk. */
static int pg_list(void *state, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg)
{
    store *s = state;
    char len[24], *after = NULL;
    size_t after_len = 0;
    snprintf(len, sizeof len, "%zu", prefix_len);
    int rc = IDEM_OK;
    for (bool more = true; more && rc == IDEM_OK;) {
        op o = {.s = s, .id = ST_LIST};
        op_bytes(&o, prefix, prefix_len);
        op_text(&o, len);
        op_bytes(&o, after, after_len);
        if ((rc = run_op(&o)))
            break;
        PGresult *res = o.res;
        int n = PQntuples(res);
        if (PQnfields(res) != 3) {
            rc = unexpected(s, ST_LIST, res);
            break;
        }
        more = n == LIST_BATCH;
        for (int i = 0; i < n && rc == IDEM_OK; i++) {
            if (PQgetisnull(res, i, 0) || PQgetisnull(res, i, 1) || PQgetlength(res, i, 2) != 8) {
                rc = unexpected(s, ST_LIST, res);
                res = NULL;
                break;
            }
            const char *key = PQgetvalue(res, i, 0);
            size_t key_len = (size_t)PQgetlength(res, i, 0);
            if (fn(arg, key, key_len, PQgetvalue(res, i, 1), (size_t)PQgetlength(res, i, 1),
                   clamp_ms((int64_t)be64(PQgetvalue(res, i, 2))))) {
                more = false;
                break;
            }
            if (i == n - 1 && more) {
                char *copy = realloc(after, key_len ? key_len : 1);
                if (!copy) {
                    rc = idem_driver_error(IDEM_ENOMEM, s->where, stmt_what[ST_LIST], "out of memory");
                    break;
                }
                memcpy(copy, key, key_len);
                after = copy;
                after_len = key_len;
            }
        }
        PQclear(res);
    }
    free(after);
    return rc;
}

static int pg_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    store *s = state;
    *deleted = false;
    op o = {.s = s, .id = ST_REMOVE};
    op_bytes(&o, key, key_len);
    int rc = run_op(&o);
    if (rc)
        return rc;
    int64_t n;
    if (PQntuples(o.res) != 1 || !get_int8(o.res, 0, &n))
        return unexpected(s, ST_REMOVE, o.res);
    *deleted = n > 0;
    PQclear(o.res);
    return IDEM_OK;
}

static size_t pg_max_record_len(void *state)
{
    (void)state;
    return MAX_RECORD_LEN;
}

/* Roll back what is open on pg, keeping this thread's message. */
static void tx_rollback(store *s, PGconn *pg)
{
    unsigned timeout = s->statement_ms + REPLY_GRACE_MS;
    char *saved = strdup(idem_last_error());
    if (PQstatus(pg) == CONNECTION_OK && PQtransactionStatus(pg) != PQTRANS_IDLE)
        (void)run_simple(s, pg, "ROLLBACK", idem_mono_ms() + timeout, timeout, "rolling back");
    idem_error_set(IDEM_OK, "%s", saved ? saved : "");
    free(saved);
}

/* ---- transactions: a handler's work in this database ----
 *
 * The handler's transaction never touches the key's row until the end, so
 * a duplicate's claim, which only reads a live row, is answered at once and
 * renewals (auto_extend, on another connection) keep working while it
 * runs. At the end one UPDATE, fenced by the token alone, writes the record
 * and locks the row, and COMMIT follows. Isolation levels: under READ
 * COMMITTED the UPDATE sees the row's newest version; under REPEATABLE READ
 * and SERIALIZABLE a row changed since the transaction's snapshot (a
 * renewal, a takeover) fails it with a serialization failure, which is a
 * failed commit to be run again (IDEM_TX_RETRY), never a lost key.
 */

static const char tx_write_sql[] =
    "UPDATE @T SET state = $1, value = $2, expires_at = clock_timestamp() + " MS("$3") " "
    "WHERE key = $4 AND token = $5 AND state = 'S'";

static int pg_tx_begin(void *state, void **tx, void **conn)
{
    store *s = state;
    void *c;
    bool fresh;
    int rc = idem_pool_get(s->pool, &c, &fresh);
    if (rc)
        return rc;
    PGconn *pg = c;
    unsigned timeout = s->statement_ms + REPLY_GRACE_MS;
    if ((rc = run_simple(s, pg, "BEGIN", idem_mono_ms() + timeout, timeout, "opening a transaction"))) {
        idem_pool_put(s->pool, pg, IDEM_CONN_BROKEN);
        return rc;
    }
    PQsetnonblocking(pg, 0); /* the handler's PQexec() expects a blocking connection */
    *tx = *conn = pg;
    return IDEM_OK;
}

static void pg_tx_end(void *state, void *tx)
{
    store *s = state;
    PGconn *pg = tx;
    tx_rollback(s, pg);
    bool ok = PQsetnonblocking(pg, 1) == 0 && PQstatus(pg) == CONNECTION_OK &&
              PQtransactionStatus(pg) == PQTRANS_IDLE;
    idem_pool_put(s->pool, pg, ok ? IDEM_CONN_OK : IDEM_CONN_BROKEN);
}

/* Send sql with params on pg and read its result, within the statement
 * timeout; *res on IDEM_OK (even a failed statement's). */
static int tx_send(store *s, PGconn *pg, const char *sql, int n, const char *const *values,
                   const int *lengths, const int *formats, const char *what, PGresult **res)
{
    unsigned timeout = s->statement_ms + REPLY_GRACE_MS;
    if (!PQsendQueryParams(pg, sql, n, NULL, values, lengths, formats, 0))
        return conn_error(s, pg, what);
    return collect(s, pg, idem_mono_ms() + timeout, timeout, what, res);
}

/* The connection broke during COMMIT. Make sure its server process can no
 * longer commit (end it, and wait until it is gone), then read the record
 * on a connection of the pool: IDEM_OK when it holds record. */
static int tx_settle(store *s, int pid, const void *key, size_t key_len, const void *record,
                     size_t record_len, int *outcome)
{
    static const char what[] = "settling a commit whose connection broke";
    char pidtext[16];
    snprintf(pidtext, sizeof pidtext, "%d", pid);
    const char *values[1] = {pidtext};
    void *c = NULL;
    bool fresh, gone = false;
    int rc = idem_pool_get(s->pool, &c, &fresh);
    uint64_t until = idem_mono_ms() + s->statement_ms;
    for (int round = 0; rc == IDEM_OK && !gone; round++) {
        PGresult *res = NULL;
        rc = tx_send(s, c, round == 0 ? "SELECT pg_terminate_backend($1::int) IS NOT NULL"
                                      : "SELECT 1 FROM pg_stat_activity WHERE pid = $1::int",
                     1, values, NULL, NULL, what, &res);
        ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
        gone = rc == IDEM_OK && round > 0 && st == PGRES_TUPLES_OK && PQntuples(res) == 0;
        if (rc == IDEM_OK && st != PGRES_TUPLES_OK && round > 0)
            rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "pg_stat_activity cannot be read");
        PQclear(res);
        if (!gone && rc == IDEM_OK && idem_mono_ms() >= until)
            rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "the old connection's server process "
                                   "(pid %d) is still there after %u ms", pid, s->statement_ms);
        if (!gone && rc == IDEM_OK && round > 0)
            poll(NULL, 0, 10);
    }
    if (c)
        idem_pool_put(s->pool, c, rc == IDEM_OK ? IDEM_CONN_OK : IDEM_CONN_BROKEN);
    void *now = NULL;
    size_t now_len = 0;
    uint32_t left;
    if (rc == IDEM_OK)
        rc = pg_read(s, key, key_len, &now, &now_len, &left);
    if (rc) {
        *outcome = IDEM_TX_UNKNOWN;
        rc = IDEM_EBACKEND;
    } else if (now && now_len == record_len && memcmp(now, record, record_len) == 0) {
        rc = IDEM_OK;
    } else {
        rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "the connection broke during COMMIT, and "
                               "the transaction did not commit");
    }
    free(now);
    return rc;
}

static int pg_tx_write(void *state, void *conn, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint64_t expiry_ms, int *outcome)
{
    static const char what[] = "committing the work with its record";
    store *s = state;
    PGconn *pg = conn;
    idem_record_info info;
    *outcome = IDEM_TX_ROLLED_BACK;
    if (idem_record_peek(record, record_len, &info) != IDEM_OK)
        return idem_error_set(IDEM_EINVAL, DRIVER ": the record to write is not one of the core's");
    switch (PQtransactionStatus(pg)) {
    case PQTRANS_INTRANS:
        break;
    case PQTRANS_INERROR:
        tx_rollback(s, pg);
        return idem_driver_error(IDEM_EBACKEND, s->where, what, "a statement of the transaction failed "
                                 "before the response could be written; it was rolled back");
    default:
        return idem_driver_error(IDEM_EINVAL, s->where, what, "no transaction is open and idle on this "
                                 "connection: open one (BEGIN), do the work, then commit through the "
                                 "library");
    }
    char ms[24];
    snprintf(ms, sizeof ms, "%llu", (unsigned long long)expiry_ms);
    const char *values[5] = {info.state == IDEM_STATE_STARTED ? "S" : "C", record, ms, key,
                             (const char *)token};
    int lengths[5] = {0, (int)record_len, 0, (int)key_len, IDEM_TOKEN_LEN};
    int formats[5] = {0, 1, 0, 1, 1};
    PGresult *res = NULL;
    int rc = tx_send(s, pg, s->tx_sql, 5, values, lengths, formats, what, &res);
    if (rc == IDEM_OK && PQresultStatus(res) != PGRES_COMMAND_OK) {
        *outcome = is_serialization_failure(res) ? IDEM_TX_RETRY : IDEM_TX_ROLLED_BACK;
        idem_conn_state st;
        rc = result_error(s, pg, res, what, &st);
    } else if (rc == IDEM_OK && strcmp(PQcmdTuples(res), "1") != 0) {
        rc = IDEM_ELOST;
    }
    PQclear(res);
    if (rc) {
        tx_rollback(s, pg);
        return rc;
    }
    int pid = PQbackendPID(pg);
    res = NULL;
    rc = tx_send(s, pg, "COMMIT", 0, NULL, NULL, NULL, what, &res);
    if (rc != IDEM_OK || PQstatus(pg) != CONNECTION_OK) {
        PQclear(res);
        return tx_settle(s, pid, key, key_len, record, record_len, outcome);
    }
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        *outcome = is_serialization_failure(res) ? IDEM_TX_RETRY : IDEM_TX_ROLLED_BACK;
        idem_conn_state st;
        rc = result_error(s, pg, res, what, &st);
    } else if (strcmp(PQcmdStatus(res), "COMMIT") != 0) { /* an aborted transaction answers ROLLBACK */
        rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "the server rolled the transaction back");
    }
    PQclear(res);
    return rc;
}

/* ---- opening ---- */

static void store_free(store *s)
{
    if (!s)
        return;
    if (s->pool)
        idem_pool_free(s->pool);
    for (int i = 0; i < s->nkeywords; i++) {
        if (strcmp(s->keywords[i], "password") == 0)
            memset(s->values[i], 0, strlen(s->values[i]));
        free(s->values[i]);
    }
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
        free(s->password);
    }
    free(s->where);
    free(s->table);
    free(s->setup_sql);
    free(s->tx_sql);
    free(s);
}

static int add_keyword(store *s, const char *keyword, const char *value)
{
    if (s->nkeywords == MAX_KEYWORDS)
        return idem_error_set(IDEM_EINVAL, DRIVER " URL has too many parameters");
    char *v = strdup(value);
    if (!v)
        return IDEM_ENOMEM;
    s->keywords[s->nkeywords] = keyword;
    s->values[s->nkeywords++] = v;
    return IDEM_OK;
}

/* One name of the table: lower-case letters, digits and '_', as PostgreSQL
 * folds an unquoted name, so that quoted and unquoted spellings agree. */
static bool ident_ok(const char *p, size_t n)
{
    if (n == 0 || n > MAX_IDENT_LEN || (p[0] >= '0' && p[0] <= '9'))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9') || p[i] == '_'))
            return false;
    return true;
}

/* table or schema.table, quoted. */
static int parse_table(store *s, const char *name)
{
    const char *dot = strchr(name, '.');
    bool ok = dot ? ident_ok(name, (size_t)(dot - name)) && ident_ok(dot + 1, strlen(dot + 1))
                  : ident_ok(name, strlen(name));
    if (!ok)
        return idem_error_set(IDEM_EINVAL, DRIVER " URL parameter table must be a table name of 1 to "
                              "63 lower-case letters, digits and '_' (not starting with a digit), "
                              "optionally after a schema name and a '.': table=idempotency_keys or "
                              "table=app.idempotency_keys");
    /* pg_temp (an alias of the session's pg_temp_N, with its pg_toast_temp_N)
     * holds tables that exist in one connection only: the one that made the
     * table would see it, every other connection of the pool, and of every
     * other process, would not, and no two of them would share a key. Left
     * to the server, that shows up as a table missing from the next
     * connection, which reads like a table dropped meanwhile. */
    size_t schema_len = dot ? (size_t)(dot - name) : 0;
    if (schema_len >= 7 && (strncmp(name, "pg_temp", 7) == 0 || strncmp(name, "pg_toast_temp", 13) == 0))
        return idem_error_set(IDEM_EINVAL, DRIVER " URL parameter table=%s names a temporary table, "
                              "which exists only in the connection that made it; this store keeps a "
                              "pool of connections (and every process its own), which must all see "
                              "the same table: name one in an ordinary schema, e.g. "
                              "table=idempotency_keys or table=app.idempotency_keys", name);
    /* Names that start with pg_ are reserved for the system's schemas. */
    if ((schema_len >= 3 && strncmp(name, "pg_", 3) == 0) ||
        (schema_len == 18 && strncmp(name, "information_schema", 18) == 0))
        return idem_error_set(IDEM_EINVAL, DRIVER " URL parameter table=%s names a table in the "
                              "system schema %.*s, which belongs to PostgreSQL: name one in a schema "
                              "of your own, e.g. table=app.idempotency_keys (or table=idempotency_keys "
                              "for the first schema of the search_path)", name, (int)schema_len, name);
    int n = dot ? asprintf(&s->table, "\"%.*s\".\"%s\"", (int)(dot - name), name, dot + 1)
                : asprintf(&s->table, "\"%s\"", name);
    if (n < 0) {
        s->table = NULL;
        return IDEM_ENOMEM;
    }
    return IDEM_OK;
}

/* Append host[:port] (or a socket directory) to *where. */
static int where_append(char **where, const char *host, unsigned port)
{
    char *w;
    bool v6 = strchr(host, ':') != NULL;
    int n = port ? asprintf(&w, v6 ? "%s%s[%s]:%u" : "%s%s%s:%u", *where ? *where : "",
                            *where ? "," : "", host, port)
                 : asprintf(&w, v6 ? "%s%s[%s]" : "%s%s%s", *where ? *where : "", *where ? "," : "",
                            host);
    if (n < 0)
        return IDEM_ENOMEM;
    free(*where);
    *where = w;
    return IDEM_OK;
}

/* Fill s from the URL: libpq's keywords, the table, the timeouts. */
static int parse_url(store *s, const idem_url *url)
{
    if (strcmp(url->scheme, "postgresql") != 0 && strcmp(url->scheme, "postgres") != 0)
        return idem_error_set(IDEM_EINVAL, "unknown " DRIVER " URL scheme '%s'; use postgresql:// "
                              "or postgres://", url->scheme);
    int rc = idem_url_check_params(url, DRIVER, known_params);
    if (rc)
        return rc;
    uint64_t connect_ms = DEFAULT_CONNECT_TIMEOUT_MS, statement_ms = DEFAULT_STATEMENT_TIMEOUT_MS;
    if ((rc = idem_url_param_uint(url, "connect_timeout_ms", 1, MAX_TIMEOUT_MS, &connect_ms)) ||
        (rc = idem_url_param_uint(url, "statement_timeout_ms", 1, MAX_TIMEOUT_MS, &statement_ms)))
        return rc;
    s->connect_ms = (unsigned)connect_ms;
    s->statement_ms = (unsigned)statement_ms;
    const char *table = idem_url_param_get(url, "table");
    if ((rc = parse_table(s, table ? table : DEFAULT_TABLE)))
        return rc;

    const char *host_param = idem_url_param_get(url, "host");
    const char *port_param = idem_url_param_get(url, "port");
    if (url->nhosts && (host_param || port_param))
        return idem_error_set(IDEM_EINVAL, DRIVER " URL names its hosts twice, in the address and "
                              "in a host or port parameter; keep one: postgresql://host:5432/dbname "
                              "or postgresql:///dbname?host=/run/postgresql");
    if (url->nhosts) {
        size_t hl = 1, pl = 1;
        bool any_port = false;
        for (size_t i = 0; i < url->nhosts; i++) {
            hl += strlen(url->hosts[i].host) + 1;
            pl += 7;
            any_port |= url->hosts[i].port != 0;
        }
        char *hosts = calloc(1, hl), *ports = calloc(1, pl);
        if (!hosts || !ports) {
            free(hosts);
            free(ports);
            return IDEM_ENOMEM;
        }
        for (size_t i = 0; i < url->nhosts; i++) {
            if (i) {
                strcat(hosts, ",");
                strcat(ports, ",");
            }
            strcat(hosts, url->hosts[i].host);
            if (url->hosts[i].port)
                sprintf(ports + strlen(ports), "%u", (unsigned)url->hosts[i].port);
            if (rc == IDEM_OK)
                rc = where_append(&s->where, url->hosts[i].host,
                                  url->hosts[i].port ? url->hosts[i].port : 5432);
        }
        if (rc == IDEM_OK)
            rc = add_keyword(s, "host", hosts);
        if (rc == IDEM_OK && any_port)
            rc = add_keyword(s, "port", ports);
        free(hosts);
        free(ports);
    } else if (host_param) {
        rc = add_keyword(s, "host", host_param);
        if (rc == IDEM_OK)
            rc = where_append(&s->where, host_param, 0);
    } else {
        const char *env = getenv("PGHOST");
        rc = where_append(&s->where, env && *env ? env : "(libpq's default host)", 0);
    }
    if (rc)
        return rc;

    if (url->path && url->path[1]) {
        if (strchr(url->path + 1, '/'))
            return idem_error_set(IDEM_EINVAL, DRIVER " URL path is one database name: "
                                  "postgresql://host:5432/dbname");
        if ((rc = add_keyword(s, "dbname", url->path + 1)))
            return rc;
    }
    char *w;
    if (asprintf(&w, "%s %s/%s", DRIVER, s->where, url->path && url->path[1] ? url->path + 1 : "") < 0)
        return IDEM_ENOMEM;
    free(s->where);
    s->where = w;
    if (url->user && (rc = add_keyword(s, "user", url->user)))
        return rc;
    if (url->password) {
        if ((rc = add_keyword(s, "password", url->password)))
            return rc;
        if (!(s->password = strdup(url->password)))
            return IDEM_ENOMEM;
    }
    /* libpq's own parameters, as given; the keyword from our static list,
     * which outlives the URL. */
    for (size_t i = 0; i < url->nparams; i++)
        for (const char *const *k = known_params + FIRST_LIBPQ_PARAM + 1; *k; k++)
            if (strcmp(*k, url->params[i].name) == 0 && (rc = add_keyword(s, *k, url->params[i].value)))
                return rc;
    if ((rc = add_keyword(s, "fallback_application_name", "libidempotency")))
        return rc;
    s->keywords[s->nkeywords] = NULL;
    s->values[s->nkeywords] = NULL;
    return IDEM_OK;
}

/* sql with every @T replaced by the quoted table name; malloc'd. */
static char *with_table(const store *s, const char *sql)
{
    size_t tl = strlen(s->table), n = 0;
    for (const char *p = sql; (p = strstr(p, "@T")); p += 2)
        n++;
    char *out = malloc(strlen(sql) + n * tl + 1), *q = out;
    if (!out)
        return NULL;
    for (const char *p = sql; *p;) {
        if (p[0] == '@' && p[1] == 'T') {
            memcpy(q, s->table, tl);
            q += tl;
            p += 2;
        } else {
            *q++ = *p++;
        }
    }
    *q = '\0';
    return out;
}

/* SET statement_timeout and PREPARE every statement: one round trip on
 * every new connection. */
static int build_setup(store *s)
{
    size_t len = 64;
    char *prepared[ST_COUNT] = {0};
    int rc = IDEM_OK;
    for (int i = 0; i < ST_COUNT; i++) {
        if (!(prepared[i] = with_table(s, stmt_sql[i])))
            rc = IDEM_ENOMEM;
        else
            len += strlen(prepared[i]) + strlen(stmt_name[i]) + 16;
    }
    if (rc == IDEM_OK && !(s->setup_sql = malloc(len)))
        rc = IDEM_ENOMEM;
    if (rc == IDEM_OK) {
        int n = snprintf(s->setup_sql, len, "SET statement_timeout = %u;", s->statement_ms);
        for (int i = 0; i < ST_COUNT; i++)
            n += snprintf(s->setup_sql + n, len - (size_t)n, " PREPARE %s %s;", stmt_name[i], prepared[i]);
    }
    for (int i = 0; i < ST_COUNT; i++)
        free(prepared[i]);
    return rc;
}

/* The table as it is now: exists, and its comment. */
static int schema_look(store *s, PGconn *pg, uint64_t deadline, bool *exists, char **mark)
{
    const char *what = "checking the table";
    idem_conn_state state = IDEM_CONN_OK;
    const char *values[1] = {s->table};
    *exists = false;
    *mark = NULL;
    if (!PQsendQueryParams(pg, schema_check_sql, 1, NULL, values, NULL, NULL, 0))
        return conn_error(s, pg, what);
    PGresult *res;
    int rc = collect(s, pg, deadline, s->connect_ms, what, &res);
    if (rc == IDEM_OK)
        rc = check_result(s, pg, res, what, &state);
    if (rc == IDEM_OK && (PQntuples(res) != 1 || PQnfields(res) != 4))
        rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "unexpected answer; is this a "
                               "PostgreSQL server?");
    if (rc == IDEM_OK && (PQgetvalue(res, 0, 0)[0] == 't' || PQgetvalue(res, 0, 1)[0] == 't'))
        rc = idem_driver_error(IDEM_EBACKEND, s->where, what, "the server is read-only (%s): claims "
                               "need to write; point the store URL at the primary, or list every "
                               "host with target_session_attrs=read-write",
                               PQgetvalue(res, 0, 0)[0] == 't' ? "a hot standby in recovery"
                                                               : "default_transaction_read_only is on");
    if (rc == IDEM_OK) {
        *exists = PQgetvalue(res, 0, 2)[0] == 't';
        if (!PQgetisnull(res, 0, 3) && !(*mark = strdup(PQgetvalue(res, 0, 3))))
            rc = idem_driver_error(IDEM_ENOMEM, s->where, what, "out of memory");
    }
    PQclear(res);
    return rc;
}

/* CREATE TABLE IF NOT EXISTS answers "already exists, skipping" as a notice. */
static void note_exists(void *arg, const PGresult *res)
{
    if (sqlstate_is(PQresultErrorField(res, PG_DIAG_SQLSTATE), "42P07"))
        *(bool *)arg = true;
}

/* Make the table when it is missing, under an advisory lock so that stores
 * opening at once do not race (concurrent CREATE TABLE IF NOT EXISTS can
 * fail), and mark it as ours only when this call created it. Under the lock
 * the table is looked for again: a store that made it meanwhile has
 * committed, and a user who may not create tables is not asked to. */
static int schema_create(store *s, PGconn *pg, uint64_t deadline)
{
    char *create = with_table(s, schema_sql), *finish = with_table(s, schema_finish_sql);
    char *lock = NULL;
    int rc = IDEM_OK;
    if (!create || !finish ||
        asprintf(&lock, "BEGIN; SELECT pg_advisory_xact_lock(hashtext('libidempotency'), hashtext('%s'))",
                 s->table) < 0) {
        lock = NULL;
        rc = idem_driver_error(IDEM_ENOMEM, s->where, "creating the table", "out of memory");
    }
    bool existed = false;
    if (rc == IDEM_OK)
        rc = run_simple(s, pg, lock, deadline, s->connect_ms, "creating the table");
    if (rc == IDEM_OK) {
        char *mark = NULL;
        rc = schema_look(s, pg, deadline, &existed, &mark);
        free(mark);
    }
    if (rc == IDEM_OK && !existed) {
        PQnoticeReceiver old = PQsetNoticeReceiver(pg, note_exists, &existed);
        rc = run_simple(s, pg, create, deadline, s->connect_ms, "creating the table");
        PQsetNoticeReceiver(pg, old, NULL);
    }
    if (rc == IDEM_OK)
        rc = run_simple(s, pg, existed ? "COMMIT" : finish, deadline, s->connect_ms, "creating the table");
    free(create);
    free(finish);
    free(lock);
    return rc;
}

/* The table is ours, at our schema version, or made now; else an error. */
static int schema_ensure(store *s, PGconn *pg, uint64_t deadline)
{
    bool exists;
    char *mark;
    int rc = schema_look(s, pg, deadline, &exists, &mark);
    if (rc == IDEM_OK && !exists) {
        rc = schema_create(s, pg, deadline);
        if (rc == IDEM_OK)
            rc = schema_look(s, pg, deadline, &exists, &mark);
    }
    if (rc == IDEM_OK && mark && strcmp(mark, SCHEMA_MARK) == 0) {
        free(mark);
        return IDEM_OK;
    }
    if (rc == IDEM_OK && mark && strncmp(mark, SCHEMA_MARK_PREFIX, strlen(SCHEMA_MARK_PREFIX)) == 0)
        rc = idem_driver_error(IDEM_EBACKEND, s->where, "checking the table",
                               "the table %s has the libidempotency schema version %s, and this "
                               "library knows version %d; upgrade the library, or give this store a "
                               "table of its own with table=",
                               s->table, mark + strlen(SCHEMA_MARK_PREFIX), SCHEMA_VERSION);
    else if (rc == IDEM_OK)
        rc = idem_driver_error(IDEM_EBACKEND, s->where, "checking the table",
                               "a table %s exists and is not one libidempotency made (its comment is "
                               "not '" SCHEMA_MARK "'); name another table with the table= parameter "
                               "of the store URL, or drop that one if it is an old copy",
                               s->table);
    free(mark);
    return rc;
}

static int pg_open(void **state, const idem_url *url)
{
    store *s = calloc(1, sizeof *s);
    if (!s)
        return idem_error_set(IDEM_ENOMEM, DRIVER ": out of memory");
    int rc = parse_url(s, url);
    if (rc == IDEM_OK)
        rc = build_setup(s);
    if (rc == IDEM_OK && !(s->tx_sql = with_table(s, tx_write_sql)))
        rc = IDEM_ENOMEM;
    if (rc == IDEM_ENOMEM)
        idem_error_set(rc, DRIVER ": out of memory");
    /* Connect now, so that a wrong address, password or table fails here
     * and not at the first request; then keep one prepared connection. */
    PGconn *pg = NULL;
    if (rc == IDEM_OK)
        rc = connect_raw(s, &pg, idem_mono_ms() + s->connect_ms);
    if (rc == IDEM_OK) {
        rc = schema_ensure(s, pg, idem_mono_ms() + s->connect_ms);
        PQfinish(pg);
    }
    if (rc == IDEM_OK) {
        idem_pool_config cfg = {.ctx = s, .connect = pool_connect, .disconnect = pool_disconnect};
        rc = idem_pool_new(&s->pool, &cfg);
    }
    void *conn;
    bool fresh;
    if (rc == IDEM_OK && (rc = idem_pool_get(s->pool, &conn, &fresh)) == IDEM_OK)
        idem_pool_put(s->pool, conn, IDEM_CONN_OK);
    if (rc) {
        store_free(s);
        return rc;
    }
    *state = s;
    return IDEM_OK;
}

static void pg_close(void *state)
{
    store_free(state);
}

/* ---- check (an operator's look at the settings) ---- */

static int pg_check(void *state, idem_findings *out)
{
    store *s = state;
    op o = {.s = s, .id = ST_CHECK};
    int rc = run_op(&o);
    if (rc)
        return rc;
    PGresult *res = o.res;
    if (PQntuples(res) != 1 || PQnfields(res) != 3)
        return unexpected(s, ST_CHECK, res);
    const char *sync = PQgetvalue(res, 0, 0), *fsync = PQgetvalue(res, 0, 1);
    bool standby = strcmp(PQgetvalue(res, 0, 2), "true") == 0;
    rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "claims and responses live in a table of the "
                           "database, by the server's clock; they survive restarts and are never evicted");
    if (rc == IDEM_OK && standby)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "the server is a standby: it refuses every "
                               "claim; point the URL at the primary (target_session_attrs=read-write)");
    if (rc == IDEM_OK && strcmp(fsync, "off") == 0)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "fsync is off: a crash of the server's machine "
                               "can lose or corrupt claims and responses; set fsync = on");
    if (rc == IDEM_OK && strcmp(sync, "off") == 0)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "synchronous_commit is off: a server crash can "
                               "lose the last acknowledged claims and responses, and a retry of one runs "
                               "again; set synchronous_commit = on");
    PQclear(res);
    return rc;
}

const idem_backend idem__postgresql_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = DRIVER,
    .open = pg_open,
    .close = pg_close,
    .claim = pg_claim,
    .commit = pg_commit,
    .release = pg_release,
    .extend = pg_extend,
    .max_record_len = pg_max_record_len,
    .read = pg_read,
    .list = pg_list,
    .remove = pg_remove,
    .check = pg_check,
    .tx_begin = pg_tx_begin,
    .tx_write = pg_tx_write,
    .tx_end = pg_tx_end,
};
