/*
 * Redis driver over hiredis:
 *   redis://[[user]:password@]host[:port][/db][?connect_timeout_ms=N&timeout_ms=N&max_record_bytes=N]
 *   redis+unix:///path/to/redis.sock[?db=N&password=...&connect_timeout_ms=N&timeout_ms=N]
 *
 * One string per key, expiring by the server's clock (PX). Every operation
 * is one round trip: a Lua script, loaded once per server with SCRIPT LOAD
 * and called with EVALSHA. The claim script sets the key with NX and, when
 * that loses, returns the record already there with its PTTL. The commit,
 * release and extend scripts act only on a record that carries the claim's
 * token (fencing), by comparing bytes at the fixed offsets of the record
 * header. Scripts are constants; keys and records travel as KEYS and ARGV
 * with explicit lengths, so any byte is safe in them.
 *
 * timeout_ms bounds an operation's command and its whole reply: hiredis
 * bounds each read by the socket's timeout, so the driver runs the reads
 * itself and shortens that timeout to the time left (conn_reply()).
 *
 * A hiredis context is not thread-safe, so the store keeps a pool of them
 * behind a mutex. A context that saw an I/O error, a timeout or EOF is
 * freed, never pooled again, and the idle ones are dropped with it (they
 * talk to the same server, which most likely went away).
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include <idempotency/backend.h>

#define DEFAULT_PORT               6379
#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_TIMEOUT_MS         2000
#define MAX_TIMEOUT_MS             3600000
#define MAX_DB                     1000000
/* Redis refuses strings longer than proto-max-bulk-len, 512 MiB by default. */
#define MAX_RECORD_LEN             ((size_t)512 << 20)
/* The default for max_record_bytes: far above the layer's default response
 * limit (1 MiB), far below what would hurt to read by mistake. */
#define DEFAULT_MAX_RECORD_LEN     ((size_t)64 << 20)
/* A socket timeout within this of the time left is left alone. */
#define TIMEOUT_SLACK_MS           5

/* ---- the scripts ---- */

#define XSTR_(x) #x
#define XSTR(x)  XSTR_(x)

/* Lua expressions on the record v (Lua strings are 1-based). */
#define LUA_TOKEN                                                                       \
    "string.sub(v, " XSTR(IDEM_RECORD_TOKEN_OFFSET) " + 1, "                            \
    XSTR(IDEM_RECORD_TOKEN_OFFSET) " + " XSTR(IDEM_TOKEN_LEN) ")"
#define LUA_STATE                                                                       \
    "string.sub(v, " XSTR(IDEM_RECORD_STATE_OFFSET) " + 1, "                            \
    XSTR(IDEM_RECORD_STATE_OFFSET) " + 1)"
#define LUA_STARTED   XSTR(IDEM_STATE_STARTED)    /* 'S' */
#define LUA_COMPLETED XSTR(IDEM_STATE_COMPLETED)  /* 'C' */

/* The header of the record under KEYS[1] if it carries the token ARGV[1],
 * else return 0. Only the header is read (GETRANGE), however long the value.
 * pcall: a key of another type (a hash, a list) is not ours either. */
#define LUA_FENCE                                                                       \
    "local v = redis.pcall('GETRANGE', KEYS[1], 0, "                                    \
    XSTR(IDEM_RECORD_TOKEN_OFFSET) " + " XSTR(IDEM_TOKEN_LEN) " - 1)\n"                  \
    "if type(v) ~= 'string' or " LUA_TOKEN " ~= ARGV[1] then return 0 end\n"             \
    "local s = " LUA_STATE "\n"

enum script_id { SC_CLAIM, SC_COMMIT, SC_RELEASE, SC_EXTEND, SC_COUNT };

static const char *const script_src[SC_COUNT] = {
    /* KEYS[1] key, ARGV[1] record, ARGV[2] lease ms, ARGV[3] the longest
     * record this store holds.
     * 0: claimed. {record, pttl}: the key was taken.
     * {n, pttl}: taken by a string of n bytes, too long to be a record: it
     * is not read. {'', pttl, type}: taken by a value that is not a string.
     * pcall on SET: a server that refuses writes (OOM at maxmemory, a
     * read-only replica) can still serve the record that is there, which
     * is how a replay keeps working; with nothing there its error is the
     * answer. */
    [SC_CLAIM] =
        "local n = redis.pcall('STRLEN', KEYS[1])\n"
        "if type(n) ~= 'number' then\n"
        "  return {'', redis.call('PTTL', KEYS[1]), redis.call('TYPE', KEYS[1])['ok']}\n"
        "end\n"
        "if n > tonumber(ARGV[3]) then return {n, redis.call('PTTL', KEYS[1])} end\n"
        "local v = redis.pcall('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')\n"
        "if v == false then return 0 end\n"
        "if type(v) == 'table' then\n"
        "  local e = v\n"
        "  v = redis.call('GET', KEYS[1])\n"
        "  if v == false then return e end\n"
        "end\n"
        "return {v, redis.call('PTTL', KEYS[1])}\n",
    /* KEYS[1] key, ARGV[1] token, ARGV[2] record, ARGV[3] ttl ms.
     * 1: stored. 2: this token had already committed. 0: lost. */
    [SC_COMMIT] =
        LUA_FENCE
        "if s == " LUA_STARTED " then\n"
        "  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])\n"
        "  return 1\n"
        "end\n"
        "if s == " LUA_COMPLETED " then return 2 end\n"
        "return 0\n",
    /* KEYS[1] key, ARGV[1] token. 1: deleted. 0: lost. 3: no such key
     * (lost, or freed by an earlier try of this release). */
    [SC_RELEASE] =
        "if redis.call('EXISTS', KEYS[1]) == 0 then return 3 end\n"
        LUA_FENCE
        "if s ~= " LUA_STARTED " then return 0 end\n"
        "redis.call('DEL', KEYS[1])\n"
        "return 1\n",
    /* KEYS[1] key, ARGV[1] token, ARGV[2] record, ARGV[3] lease ms.
     * 1: extended. 0: lost. */
    [SC_EXTEND] =
        LUA_FENCE
        "if s ~= " LUA_STARTED " then return 0 end\n"
        "redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])\n"
        "return 1\n",
};

static const char *const script_what[SC_COUNT] = {
    [SC_CLAIM] = "claiming a key",
    [SC_COMMIT] = "storing a response",
    [SC_RELEASE] = "freeing a key",
    [SC_EXTEND] = "extending a lease",
};

/* ---- the store ---- */

typedef struct conn {
    redisContext *ctx;
    unsigned      socket_ms;  /* the socket's timeout now (SO_RCVTIMEO, SO_SNDTIMEO) */
    bool          timed_out;  /* the last command ran out of time */
    bool          partial;    /* ... after part of its reply had come */
    struct conn  *next;
} conn;

typedef struct store {
    char           *where;       /* "127.0.0.1:6379", "[::1]:6379" or a socket path, for messages */
    char           *host;        /* NULL for a unix socket */
    char           *socket_path; /* NULL for TCP */
    int             port;
    char           *user;        /* ACL user name, or NULL */
    char           *password;    /* never printed */
    unsigned long   db;
    struct timeval  connect_tv;
    unsigned        command_ms;
    size_t          max_record; /* the longest value read back as a record */
    char            sha[SC_COUNT][41]; /* SHA1 hex of each script, fixed at open */
    pthread_mutex_t mu;
    conn           *idle;        /* connections not in use */
} store;

/* ---- messages ---- */

/* A store operation failed on the server or on the wire: IDEM_EBACKEND. */
static int backend_error(const store *s, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int backend_error(const store *s, const char *what, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return idem_error_set(IDEM_EBACKEND, "redis %s: %s: %s", s->where, what, detail);
}

/* What to tell the user to do when nobody answers at the address. */
static void start_hint(const store *s, char *buf, size_t len)
{
    if (s->socket_path)
        snprintf(buf, len, "; is redis-server running? start one with: "
                            "redis-server --port 0 --unixsocket %s", s->socket_path);
    else
        snprintf(buf, len, "; is redis-server running? start one with: redis-server --port %d",
                 s->port);
}

static bool errstr_is(const redisContext *c, int errnum)
{
    return strcmp(c->errstr, strerror(errnum)) == 0;
}

/* The connection died (closed or reset) rather than timed out: a fresh
 * connection may work at once. */
static bool peer_went_away(const redisContext *c)
{
    return c->err == REDIS_ERR_EOF ||
           (c->err == REDIS_ERR_IO && (errstr_is(c, ECONNRESET) || errstr_is(c, EPIPE)));
}

/* Describe a failed context: IDEM_EBACKEND with a message. timed_out and
 * partial: the command ran out of time, after part of its reply came. */
static int context_error_at(const store *s, const redisContext *c, bool timed_out, bool partial,
                            const char *what)
{
    char hint[PATH_MAX + 128] = "";
    if (!c)
        return idem_error_set(IDEM_ENOMEM, "redis %s: %s: out of memory", s->where, what);
    bool eagain = c->err == REDIS_ERR_IO && (errstr_is(c, EAGAIN) || errstr_is(c, EWOULDBLOCK));
    if ((timed_out || eagain) && partial)
        return backend_error(s, what, "the reply was still incomplete after %u ms (timeout_ms in "
                             "the store URL bounds the whole reply); is the network or the server "
                             "overloaded?", s->command_ms);
    if (timed_out || eagain)
        return backend_error(s, what, "no reply within %u ms (timeout_ms in the store URL)",
                             s->command_ms);
    if (c->err == REDIS_ERR_EOF)
        return backend_error(s, what, "the server closed the connection (restarting, or "
                                      "maxclients or timeout in its config?)");
    if (c->err == REDIS_ERR_IO && (errstr_is(c, ETIMEDOUT) || errstr_is(c, EINPROGRESS)))
        return backend_error(s, what, "connecting timed out after %ld ms (connect_timeout_ms in "
                             "the store URL); is the host reachable?",
                             (long)(s->connect_tv.tv_sec * 1000 + s->connect_tv.tv_usec / 1000));
    if (c->err == REDIS_ERR_IO && (errstr_is(c, ECONNREFUSED) || errstr_is(c, ENOENT))) {
        start_hint(s, hint, sizeof hint);
        return backend_error(s, what, "%s%s",
                             errstr_is(c, ENOENT) ? "no such socket" : "connection refused", hint);
    }
    if (c->err == REDIS_ERR_IO && errstr_is(c, ECONNRESET))
        return backend_error(s, what, "connection reset by the server");
    if (c->err == REDIS_ERR_OTHER && !s->socket_path && strcmp(what, "connecting") == 0)
        return backend_error(s, what, "%s; check the host name in the store URL", c->errstr);
    return backend_error(s, what, "%s", c->errstr[0] ? c->errstr : "unknown hiredis error");
}

static int context_error(const store *s, const redisContext *c, const char *what)
{
    return context_error_at(s, c, false, false, what);
}

static int conn_error(const store *s, const conn *c, const char *what)
{
    return context_error_at(s, c->ctx, c->timed_out, c->partial, what);
}

/* Describe an error reply from the server, with a hint for the known ones. */
static int reply_error(const store *s, const redisReply *r, const char *what)
{
    const char *msg = r->str ? r->str : "";
    const char *hint = "";
    if (strncmp(msg, "MOVED ", 6) == 0 || strncmp(msg, "ASK ", 4) == 0)
        hint = "; this is a Redis Cluster node that does not own the key, and the driver does not "
               "follow redirects: point the store URL at the master that owns the key's slot";
    else if (strncmp(msg, "READONLY", 8) == 0)
        hint = "; the store URL points at a replica: point it at the master";
    else if (strncmp(msg, "NOAUTH", 6) == 0)
        hint = "; the server wants a password: redis://:PASSWORD@host:port";
    else if (strncmp(msg, "WRONGPASS", 9) == 0 || strstr(msg, "invalid password") ||
             strstr(msg, "without any password"))
        hint = "; check the user name and password in the store URL";
    else if (strncmp(msg, "OOM", 3) == 0)
        hint = "; the server reached maxmemory: raise it (keep maxmemory-policy noeviction: every "
               "record has a TTL, so a volatile-* or allkeys-* policy may evict one and let a "
               "duplicate run)";
    else if (strncmp(msg, "LOADING", 7) == 0)
        hint = "; the server is loading its data set after a restart: retry shortly";
    int n = (int)strlen(msg);
    if (n > 0 && msg[n - 1] == '.') /* "NOAUTH Authentication required." */
        n--;
    return backend_error(s, what, "the server answered: %.*s%s", n, msg, hint);
}

/* ---- connections ---- */

static void conn_free(conn *c)
{
    if (!c)
        return;
    if (c->ctx)
        redisFree(c->ctx);
    free(c);
}

/* ---- one command, bounded as a whole ---- */

static struct timeval tv_ms(uint64_t ms)
{
    return (struct timeval){.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A deadline timeout_ms from now, for the commands of one operation. */
static uint64_t deadline_in(const store *s)
{
    return mono_ms() + s->command_ms;
}

/* Before one read or write: fit the socket's timeout to the time left
 * until deadline, so that no read or write, and so no reply however it
 * trickles in, outlasts it. false when the time is up. */
static bool conn_budget(conn *c, uint64_t deadline)
{
    uint64_t now = mono_ms();
    if (now >= deadline) {
        c->timed_out = true;
        return false;
    }
    uint64_t left = deadline - now;
    if (left + TIMEOUT_SLACK_MS < c->socket_ms || left > c->socket_ms + TIMEOUT_SLACK_MS) {
        struct timeval tv = {.tv_sec = (time_t)(left / 1000),
                             .tv_usec = (suseconds_t)(left % 1000) * 1000};
        if (redisSetTimeout(c->ctx, tv) != REDIS_OK)
            return false;
        c->socket_ms = (unsigned)left;
    }
    return true;
}

/* Write what is buffered on c and read replies until one is whole, all by
 * deadline. The reply (freeReplyObject()), or NULL when the connection
 * failed or the time ran out (c->timed_out): the connection is then
 * unusable. hiredis reads with a per-read socket timeout; the loop here is
 * what bounds the whole reply. */
static redisReply *conn_reply(conn *c, uint64_t deadline)
{
    redisContext *ctx = c->ctx;
    c->timed_out = c->partial = false;
    int done = 0;
    while (!done) {
        if (!conn_budget(c, deadline) || redisBufferWrite(ctx, &done) != REDIS_OK)
            return NULL;
    }
    for (;;) {
        void *reply = NULL;
        if (redisGetReplyFromReader(ctx, &reply) != REDIS_OK)
            return NULL;
        if (reply)
            return reply;
        if (!conn_budget(c, deadline) || redisBufferRead(ctx) != REDIS_OK)
            return NULL;
        c->partial = true;
    }
}

static redisReply *conn_command(conn *c, uint64_t deadline, int argc, const char **argv,
                                const size_t *lens)
{
    if (redisAppendCommandArgv(c->ctx, argc, argv, lens) != REDIS_OK)
        return NULL;
    return conn_reply(c, deadline);
}

/* Send AUTH and SELECT as needed, pipelined: one round trip. */
static int conn_setup(store *s, conn *c)
{
    redisContext *ctx = c->ctx;
    int n = 0;
    if (s->password) {
        int rc = s->user ? redisAppendCommand(ctx, "AUTH %s %s", s->user, s->password)
                         : redisAppendCommand(ctx, "AUTH %s", s->password);
        if (rc != REDIS_OK)
            return context_error(s, ctx, "authenticating");
        n++;
    }
    if (s->db) {
        if (redisAppendCommand(ctx, "SELECT %lu", s->db) != REDIS_OK)
            return context_error(s, ctx, "selecting the database");
        n++;
    }
    int ret = IDEM_OK;
    uint64_t deadline = deadline_in(s);
    for (int i = 0; i < n; i++) {
        bool auth = s->password && i == 0;
        const char *what = auth ? "authenticating" : "selecting the database";
        redisReply *r = conn_reply(c, deadline);
        if (!r)
            return conn_error(s, c, what);
        if (ret == IDEM_OK && r->type == REDIS_REPLY_ERROR) {
            if (auth)
                ret = backend_error(s, what, "the server refused the password (%.*s); check the "
                                    "user name and password in the store URL",
                                    r->str && r->len && r->str[r->len - 1] == '.' ? (int)r->len - 1
                                                                                  : (int)r->len,
                                    r->str ? r->str : "");
            else
                ret = backend_error(s, what, "SELECT %lu failed (%s); the URL's database number "
                                    "must be below the server's `databases` setting",
                                    s->db, r->str ? r->str : "");
        }
        freeReplyObject(r);
    }
    return ret;
}

static int conn_new(store *s, conn **out)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return idem_error_set(IDEM_ENOMEM, "redis %s: out of memory", s->where);
    c->ctx = s->socket_path ? redisConnectUnixWithTimeout(s->socket_path, s->connect_tv)
                            : redisConnectWithTimeout(s->host, s->port, s->connect_tv);
    int rc;
    if (!c->ctx || c->ctx->err) {
        rc = context_error(s, c->ctx, "connecting");
        conn_free(c);
        return rc;
    }
    if (redisSetTimeout(c->ctx, tv_ms(s->command_ms)) != REDIS_OK) {
        rc = context_error(s, c->ctx, "setting the command timeout");
        conn_free(c);
        return rc;
    }
    c->socket_ms = s->command_ms;
    if (!s->socket_path)
        (void)redisEnableKeepAlive(c->ctx); /* only helps to notice a dead peer sooner */
    if ((rc = conn_setup(s, c))) {
        conn_free(c);
        return rc;
    }
    *out = c;
    return IDEM_OK;
}

/* A pooled connection, or a new one (*fresh). */
static int acquire(store *s, conn **out, bool *fresh)
{
    pthread_mutex_lock(&s->mu);
    conn *c = s->idle;
    if (c)
        s->idle = c->next;
    pthread_mutex_unlock(&s->mu);
    *fresh = c == NULL;
    if (c) {
        *out = c;
        return IDEM_OK;
    }
    return conn_new(s, out);
}

static void put_back(store *s, conn *c)
{
    pthread_mutex_lock(&s->mu);
    c->next = s->idle;
    s->idle = c;
    pthread_mutex_unlock(&s->mu);
}

/* c broke: free it, and the idle ones too, which talk to the same server. */
static void drop(store *s, conn *c)
{
    pthread_mutex_lock(&s->mu);
    conn *idle = s->idle;
    s->idle = NULL;
    pthread_mutex_unlock(&s->mu);
    conn_free(c);
    while (idle) {
        conn *next = idle->next;
        conn_free(idle);
        idle = next;
    }
}

/* ---- running a script ---- */

/* EVALSHA the script, or EVAL it after NOSCRIPT (which also caches it on
 * the server again: after a restart or SCRIPT FLUSH), both by deadline.
 * NULL when the connection failed. */
static redisReply *eval(const store *s, conn *c, uint64_t deadline, enum script_id id, size_t nargs,
                        const char *const *args, const size_t *lens)
{
    const char *argv[8];
    size_t argvlen[8];
    argv[0] = "EVALSHA";
    argvlen[0] = 7;
    argv[1] = s->sha[id];
    argvlen[1] = 40;
    argv[2] = "1";
    argvlen[2] = 1;
    for (size_t i = 0; i < nargs; i++) {
        argv[3 + i] = args[i];
        argvlen[3 + i] = lens[i];
    }
    int argc = (int)(3 + nargs);
    redisReply *r = conn_command(c, deadline, argc, argv, argvlen);
    if (r && r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, "NOSCRIPT", 8) == 0) {
        freeReplyObject(r);
        argv[0] = "EVAL";
        argvlen[0] = 4;
        argv[1] = script_src[id];
        argvlen[1] = strlen(script_src[id]);
        r = conn_command(c, deadline, argc, argv, argvlen);
    }
    return r;
}

/*
 * Run script id on KEYS[1] = args[0] and ARGV = args[1..]; *out is the
 * reply, which the caller frees with freeReplyObject(). An error reply is
 * IDEM_EBACKEND. A pooled connection that turns out closed by the server
 * (it restarted while the connection sat idle) is retried once on a new
 * one: every script is safe to run twice (see the callers).
 */
static int run_script(store *s, enum script_id id, size_t nargs, const char *const *args,
                      const size_t *lens, redisReply **out, bool *retried)
{
    const char *what = script_what[id];
    for (int attempt = 0;; attempt++) {
        if (retried)
            *retried = attempt > 0;
        conn *c;
        bool fresh;
        int rc = acquire(s, &c, &fresh);
        if (rc)
            return rc;
        redisReply *r = eval(s, c, deadline_in(s), id, nargs, args, lens);
        if (!r) {
            bool retry = !fresh && attempt == 0 && !c->timed_out && peer_went_away(c->ctx);
            if (!retry)
                rc = conn_error(s, c, what);
            drop(s, c);
            if (retry)
                continue;
            return rc;
        }
        put_back(s, c);
        if (r->type == REDIS_REPLY_ERROR) {
            rc = reply_error(s, r, what);
            freeReplyObject(r);
            return rc;
        }
        *out = r;
        return IDEM_OK;
    }
}

static int unexpected(const store *s, enum script_id id, const redisReply *r)
{
    return backend_error(s, script_what[id], "unexpected reply of type %d from the script; is this "
                         "a Redis server (or a proxy that rewrites replies)?", r->type);
}

/* Run a fenced script whose reply is the integer 0 (lost) or one of ok.
 * 3 is "no such key": lost, unless an earlier try on a connection that
 * closed before its reply may have run the script and freed the key. */
static int run_fenced(store *s, enum script_id id, size_t nargs, const char *const *args,
                      const size_t *lens, long long max_ok)
{
    redisReply *r;
    bool retried = false;
    int rc = run_script(s, id, nargs, args, lens, &r, &retried);
    if (rc)
        return rc;
    bool absent = id == SC_RELEASE && r->type == REDIS_REPLY_INTEGER && r->integer == 3;
    if (absent)
        rc = retried ? IDEM_OK : IDEM_ELOST;
    else if (r->type != REDIS_REPLY_INTEGER || r->integer < 0 || r->integer > max_ok)
        rc = unexpected(s, id, r);
    else
        rc = r->integer == 0 ? IDEM_ELOST : IDEM_OK;
    freeReplyObject(r);
    return rc;
}

/* ---- opening ---- */

static void store_free(store *s)
{
    if (!s)
        return;
    while (s->idle) {
        conn *c = s->idle;
        s->idle = c->next;
        conn_free(c);
    }
    pthread_mutex_destroy(&s->mu);
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
        free(s->password);
    }
    free(s->user);
    free(s->where);
    free(s->host);
    free(s->socket_path);
    free(s);
}

static int parse_db(const char *text, const char *from, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (!text[0] || text[0] < '0' || text[0] > '9' || *end || errno || v > MAX_DB)
        return idem_error_set(IDEM_EINVAL, "redis URL: the database number (%s) must be a whole "
                              "number, e.g. redis://127.0.0.1:6379/2", from);
    *out = v;
    return IDEM_OK;
}

/* Fill s from the URL; IDEM_EINVAL with a message for what does not fit. */
static int parse_url(store *s, const idem_url *url)
{
    bool unix_socket = strcmp(url->scheme, "redis+unix") == 0;
    if (!unix_socket && strcmp(url->scheme, "redis") != 0)
        return idem_error_set(IDEM_EINVAL, "unknown redis URL scheme '%s'; use redis:// or "
                              "redis+unix://", url->scheme);
    const char *known = unix_socket ? "db, password, connect_timeout_ms, timeout_ms, max_record_bytes"
                                    : "connect_timeout_ms, timeout_ms, max_record_bytes";
    for (size_t i = 0; i < url->nparams; i++) {
        const char *n = url->params[i].name;
        bool ok = strcmp(n, "connect_timeout_ms") == 0 || strcmp(n, "timeout_ms") == 0 ||
                  strcmp(n, "max_record_bytes") == 0 ||
                  (unix_socket && (strcmp(n, "db") == 0 || strcmp(n, "password") == 0));
        if (!ok)
            return idem_error_set(IDEM_EINVAL, "redis URL parameter '%s' is unknown; the known "
                                  "ones are %s", n, known);
    }
    uint64_t connect_ms = DEFAULT_CONNECT_TIMEOUT_MS, command_ms = DEFAULT_TIMEOUT_MS;
    uint64_t max_record = DEFAULT_MAX_RECORD_LEN;
    int rc = idem_url_param_uint(url, "connect_timeout_ms", 1, MAX_TIMEOUT_MS, &connect_ms);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "timeout_ms", 1, MAX_TIMEOUT_MS, &command_ms);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "max_record_bytes", IDEM_RECORD_HEADER_LEN + 8,
                                 MAX_RECORD_LEN, &max_record);
    if (rc)
        return rc;
    s->connect_tv = tv_ms(connect_ms);
    s->command_ms = (unsigned)command_ms;
    s->max_record = (size_t)max_record;

    const char *password = url->password;
    if (unix_socket) {
        if (url->nhosts || !url->path || !url->path[1])
            return idem_error_set(IDEM_EINVAL, "redis+unix URLs name the socket's absolute path "
                                  "and no host: redis+unix:///run/redis/redis.sock?db=0");
        const char *db = idem_url_param_get(url, "db");
        if (db && (rc = parse_db(db, "the db parameter", &s->db)))
            return rc;
        const char *q = idem_url_param_get(url, "password");
        if (q && password)
            return idem_error_set(IDEM_EINVAL, "redis+unix URL gives the password twice; keep "
                                  "the password parameter only");
        if (q)
            password = q;
        if (!(s->socket_path = strdup(url->path)) || !(s->where = strdup(url->path)))
            return IDEM_ENOMEM;
    } else {
        if (url->nhosts != 1)
            return idem_error_set(IDEM_EINVAL, "redis URLs name exactly one server: "
                                  "redis://host:port[/db]; for Redis Cluster see the driver's README");
        if (url->path && strcmp(url->path, "/") != 0 &&
            (rc = parse_db(url->path + 1, "the URL path", &s->db)))
            return rc;
        const idem_url_host *h = &url->hosts[0];
        s->port = h->port ? h->port : DEFAULT_PORT;
        bool v6 = strchr(h->host, ':') != NULL;
        if (!(s->host = strdup(h->host)) ||
            asprintf(&s->where, v6 ? "[%s]:%d" : "%s:%d", h->host, s->port) < 0) {
            s->where = NULL;
            return IDEM_ENOMEM;
        }
    }
    if (url->user && !password)
        return idem_error_set(IDEM_EINVAL, "redis URL gives a user name but no password: "
                              "redis://user:PASSWORD@host:port");
    if (password && !(s->password = strdup(password)))
        return IDEM_ENOMEM;
    if (url->user && !(s->user = strdup(url->user)))
        return IDEM_ENOMEM;
    return IDEM_OK;
}

/* SCRIPT LOAD every script, pipelined, and keep the digests the server
 * returns. The script cache is the server's, so once is enough; a flushed
 * cache is refilled by EVAL (see eval()). */
static int load_scripts(store *s, conn *c)
{
    redisContext *ctx = c->ctx;
    for (int i = 0; i < SC_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", script_src[i]};
        size_t argvlen[3] = {6, 4, strlen(script_src[i])};
        if (redisAppendCommandArgv(ctx, 3, argv, argvlen) != REDIS_OK)
            return context_error(s, ctx, "loading the scripts");
    }
    int ret = IDEM_OK;
    uint64_t deadline = deadline_in(s);
    for (int i = 0; i < SC_COUNT; i++) {
        redisReply *r = conn_reply(c, deadline);
        if (!r)
            return conn_error(s, c, "loading the scripts");
        if (ret == IDEM_OK) {
            if (r->type == REDIS_REPLY_ERROR)
                ret = reply_error(s, r, "loading the scripts");
            else if (r->type != REDIS_REPLY_STRING || r->len != 40)
                ret = backend_error(s, "loading the scripts", "SCRIPT LOAD gave an unexpected "
                                    "reply of type %d; is this a Redis server, version 2.6.12 or "
                                    "later?", r->type);
            else
                memcpy(s->sha[i], r->str, 41);
        }
        freeReplyObject(r);
    }
    return ret;
}

static int rd_open(void **state, const idem_url *url)
{
    store *s = calloc(1, sizeof *s);
    if (!s)
        return idem_error_set(IDEM_ENOMEM, "redis: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    int rc = parse_url(s, url);
    if (rc == IDEM_ENOMEM)
        idem_error_set(rc, "redis: out of memory");
    /* Connect now, so a wrong address or password fails here and not at
     * the first request. */
    conn *c = NULL;
    if (rc == IDEM_OK)
        rc = conn_new(s, &c);
    if (rc == IDEM_OK && (rc = load_scripts(s, c)) != IDEM_OK)
        conn_free(c);
    if (rc) {
        store_free(s);
        return rc;
    }
    s->idle = c;
    *state = s;
    return IDEM_OK;
}

static void rd_close(void *state)
{
    store_free(state);
}

/* ---- the operations ---- */

static void format_ms(char *buf, size_t len, uint64_t ms, size_t *out_len)
{
    int n = snprintf(buf, len, "%llu", (unsigned long long)ms);
    *out_len = (size_t)n;
}

static int rd_claim(void *state, const void *key, size_t key_len, const void *record,
                    size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                    uint32_t *remaining_ms)
{
    store *s = state;
    char lease[24], max[24];
    size_t lease_len, max_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    format_ms(max, sizeof max, s->max_record, &max_len);
    const char *args[4] = {key, record, lease, max};
    size_t lens[4] = {key_len, record_len, lease_len, max_len};
    *existing = NULL;
    *existing_len = 0;
    redisReply *r;
    int rc = run_script(s, SC_CLAIM, 4, args, lens, &r, NULL);
    if (rc)
        return rc;
    if (r->type == REDIS_REPLY_INTEGER && r->integer == 0) {
        freeReplyObject(r);
        return IDEM_OK;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->elements > 3 ||
        (r->element[0]->type != REDIS_REPLY_STRING && r->element[0]->type != REDIS_REPLY_INTEGER) ||
        r->element[1]->type != REDIS_REPLY_INTEGER ||
        (r->elements == 3 && r->element[2]->type != REDIS_REPLY_STATUS &&
         r->element[2]->type != REDIS_REPLY_STRING)) {
        rc = unexpected(s, SC_CLAIM, r);
        freeReplyObject(r);
        return rc;
    }
    if (r->elements == 3) {
        rc = idem_error_set(IDEM_ECORRUPT, "redis %s: claiming a key: the key holds a Redis %s, "
                            "which libidempotency did not write (its records are strings); delete "
                            "it, or give this layer a key_prefix of its own", s->where,
                            r->element[2]->str);
        freeReplyObject(r);
        return rc;
    }
    if (r->element[0]->type == REDIS_REPLY_INTEGER) {
        rc = idem_error_set(IDEM_ECORRUPT, "redis %s: claiming a key: the key holds a %lld-byte "
                            "string, longer than any record of this store (max_record_bytes=%zu in "
                            "the store URL), so libidempotency did not write it and did not read "
                            "it; delete it, or give this layer a key_prefix of its own", s->where,
                            r->element[0]->integer, s->max_record);
        freeReplyObject(r);
        return rc;
    }
    const redisReply *v = r->element[0];
    long long pttl = r->element[1]->integer;
    /* Our own record: a claim retried after its reply was lost. */
    if (v->len == record_len && memcmp(v->str, record, record_len) == 0) {
        freeReplyObject(r);
        return IDEM_OK;
    }
    *existing = malloc(v->len ? v->len : 1);
    if (!*existing) {
        freeReplyObject(r);
        return idem_error_set(IDEM_ENOMEM, "redis %s: out of memory reading a record", s->where);
    }
    if (v->len)
        memcpy(*existing, v->str, v->len);
    *existing_len = v->len;
    /* -1: no expiry (not a record of ours), so the core reads the deadline. */
    *remaining_ms = pttl < 0 ? UINT32_MAX : pttl >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)pttl;
    freeReplyObject(r);
    return IDEM_OK;
}

/* Run twice (a retry after a lost reply), commit finds its own COMPLETED
 * record and answers OK, as backend.h asks. */
static int rd_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms)
{
    char ttl[24];
    size_t ttl_len;
    format_ms(ttl, sizeof ttl, ttl_ms, &ttl_len);
    const char *args[4] = {key, (const char *)token, record, ttl};
    size_t lens[4] = {key_len, IDEM_TOKEN_LEN, record_len, ttl_len};
    return run_fenced(state, SC_COMMIT, 4, args, lens, 2);
}

/* Run twice (a retry after the server ran it and closed the connection),
 * the second run finds the key gone: IDEM_OK, the key was freed. */
static int rd_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    const char *args[2] = {key, (const char *)token};
    size_t lens[2] = {key_len, IDEM_TOKEN_LEN};
    return run_fenced(state, SC_RELEASE, 2, args, lens, 1);
}

/* Run twice, the record is still our STARTED one: the same result. */
static int rd_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms)
{
    char lease[24];
    size_t lease_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    const char *args[4] = {key, (const char *)token, record, lease};
    size_t lens[4] = {key_len, IDEM_TOKEN_LEN, record_len, lease_len};
    return run_fenced(state, SC_EXTEND, 4, args, lens, 1);
}

static size_t rd_max_record_len(void *state)
{
    return ((store *)state)->max_record;
}

const idem_backend idem__redis_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "redis",
    .open = rd_open,
    .close = rd_close,
    .claim = rd_claim,
    .commit = rd_commit,
    .release = rd_release,
    .extend = rd_extend,
    .max_record_len = rd_max_record_len,
};
