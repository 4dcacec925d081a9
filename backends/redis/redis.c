/*
 * Redis driver over hiredis:
 *   redis://[[user]:password@]host[:port][/db][?connect_timeout_ms=N&timeout_ms=N]
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

#include <hiredis/hiredis.h>

#include <idempotency/backend.h>

#define DEFAULT_PORT               6379
#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_TIMEOUT_MS         2000
#define MAX_TIMEOUT_MS             3600000
#define MAX_DB                     1000000
/* Redis refuses strings longer than proto-max-bulk-len, 512 MiB by default. */
#define MAX_RECORD_LEN             ((size_t)512 << 20)

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

/* The record under KEYS[1] if it carries the token ARGV[1], else return 0.
 * pcall: a key of another type (a hash, a list) is not ours either. */
#define LUA_FENCE                                                                       \
    "local v = redis.pcall('GET', KEYS[1])\n"                                           \
    "if type(v) ~= 'string' or " LUA_TOKEN " ~= ARGV[1] then return 0 end\n"             \
    "local s = " LUA_STATE "\n"

enum script_id { SC_CLAIM, SC_COMMIT, SC_RELEASE, SC_EXTEND, SC_COUNT };

static const char *const script_src[SC_COUNT] = {
    /* KEYS[1] key, ARGV[1] record, ARGV[2] lease ms.
     * 0: claimed. {record, pttl}: the key was taken; record is "" for a
     * value that is not a string. */
    [SC_CLAIM] =
        "local v = redis.pcall('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')\n"
        "if v == false then return 0 end\n"
        "if type(v) ~= 'string' then v = '' end\n"
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
    struct timeval  connect_tv, command_tv;
    unsigned        command_ms;
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

/* Describe a failed context: IDEM_EBACKEND with a message. */
static int context_error(const store *s, const redisContext *c, const char *what)
{
    char hint[PATH_MAX + 128] = "";
    if (!c)
        return idem_error_set(IDEM_ENOMEM, "redis %s: %s: out of memory", s->where, what);
    if (c->err == REDIS_ERR_EOF)
        return backend_error(s, what, "the server closed the connection (restarting, or "
                                      "maxclients or timeout in its config?)");
    if (c->err == REDIS_ERR_IO && (errstr_is(c, EAGAIN) || errstr_is(c, EWOULDBLOCK)))
        return backend_error(s, what, "no reply within %u ms (timeout_ms in the store URL)",
                             s->command_ms);
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

/* Send AUTH and SELECT as needed, pipelined: one round trip. */
static int conn_setup(store *s, redisContext *ctx)
{
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
    for (int i = 0; i < n; i++) {
        bool auth = s->password && i == 0;
        const char *what = auth ? "authenticating" : "selecting the database";
        void *reply = NULL;
        if (redisGetReply(ctx, &reply) != REDIS_OK || !reply)
            return context_error(s, ctx, what);
        redisReply *r = reply;
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
    if (redisSetTimeout(c->ctx, s->command_tv) != REDIS_OK) {
        rc = context_error(s, c->ctx, "setting the command timeout");
        conn_free(c);
        return rc;
    }
    if (!s->socket_path)
        (void)redisEnableKeepAlive(c->ctx); /* only helps to notice a dead peer sooner */
    if ((rc = conn_setup(s, c->ctx))) {
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
 * the server again: after a restart or SCRIPT FLUSH). NULL when the
 * connection failed. */
static redisReply *eval(const store *s, redisContext *ctx, enum script_id id, size_t nargs,
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
    redisReply *r = redisCommandArgv(ctx, argc, argv, argvlen);
    if (r && r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, "NOSCRIPT", 8) == 0) {
        freeReplyObject(r);
        argv[0] = "EVAL";
        argvlen[0] = 4;
        argv[1] = script_src[id];
        argvlen[1] = strlen(script_src[id]);
        r = redisCommandArgv(ctx, argc, argv, argvlen);
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
        redisReply *r = eval(s, c->ctx, id, nargs, args, lens);
        if (!r) {
            bool retry = !fresh && attempt == 0 && peer_went_away(c->ctx);
            if (!retry)
                rc = context_error(s, c->ctx, what);
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

static struct timeval tv_ms(uint64_t ms)
{
    return (struct timeval){.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
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
    const char *known = unix_socket ? "db, password, connect_timeout_ms, timeout_ms"
                                    : "connect_timeout_ms, timeout_ms";
    for (size_t i = 0; i < url->nparams; i++) {
        const char *n = url->params[i].name;
        bool ok = strcmp(n, "connect_timeout_ms") == 0 || strcmp(n, "timeout_ms") == 0 ||
                  (unix_socket && (strcmp(n, "db") == 0 || strcmp(n, "password") == 0));
        if (!ok)
            return idem_error_set(IDEM_EINVAL, "redis URL parameter '%s' is unknown; the known "
                                  "ones are %s", n, known);
    }
    uint64_t connect_ms = DEFAULT_CONNECT_TIMEOUT_MS, command_ms = DEFAULT_TIMEOUT_MS;
    int rc = idem_url_param_uint(url, "connect_timeout_ms", 1, MAX_TIMEOUT_MS, &connect_ms);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "timeout_ms", 1, MAX_TIMEOUT_MS, &command_ms);
    if (rc)
        return rc;
    s->connect_tv = tv_ms(connect_ms);
    s->command_tv = tv_ms(command_ms);
    s->command_ms = (unsigned)command_ms;

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
static int load_scripts(store *s, redisContext *ctx)
{
    for (int i = 0; i < SC_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", script_src[i]};
        size_t argvlen[3] = {6, 4, strlen(script_src[i])};
        if (redisAppendCommandArgv(ctx, 3, argv, argvlen) != REDIS_OK)
            return context_error(s, ctx, "loading the scripts");
    }
    int ret = IDEM_OK;
    for (int i = 0; i < SC_COUNT; i++) {
        void *reply = NULL;
        if (redisGetReply(ctx, &reply) != REDIS_OK || !reply)
            return context_error(s, ctx, "loading the scripts");
        redisReply *r = reply;
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
    if (rc == IDEM_OK && (rc = load_scripts(s, c->ctx)) != IDEM_OK)
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
    char lease[24];
    size_t lease_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    const char *args[3] = {key, record, lease};
    size_t lens[3] = {key_len, record_len, lease_len};
    *existing = NULL;
    *existing_len = 0;
    redisReply *r;
    int rc = run_script(s, SC_CLAIM, 3, args, lens, &r, NULL);
    if (rc)
        return rc;
    if (r->type == REDIS_REPLY_INTEGER && r->integer == 0) {
        freeReplyObject(r);
        return IDEM_OK;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        r->element[0]->type != REDIS_REPLY_STRING || r->element[1]->type != REDIS_REPLY_INTEGER) {
        rc = unexpected(s, SC_CLAIM, r);
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
    (void)state;
    return MAX_RECORD_LEN;
}

static int rd_check(void *state, idem_findings *out); /* at the end of the file */

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
    .check = rd_check,
};

/* ---- check (an operator's look at the server's settings) ---- */

/* A field "name:value" of an INFO reply, into buf ("" when absent). */
static void rd_info_field(const redisReply *r, const char *name, char *buf, size_t len)
{
    buf[0] = '\0';
    if (!r || r->type != REDIS_REPLY_STRING || !r->str)
        return;
    size_t n = strlen(name);
    for (const char *p = r->str; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == ':') {
            size_t i = 0;
            for (p += n + 1; *p && *p != '\r' && *p != '\n' && i + 1 < len; p++)
                buf[i++] = *p;
            buf[i] = '\0';
            return;
        }
    }
}

/* CONFIG GET name into buf. false, with the server's error in buf, when the
 * server does not say (CONFIG renamed or forbidden on a managed Redis). */
static bool rd_config_get(redisContext *ctx, const char *name, char *buf, size_t len, bool *io_error)
{
    redisReply *r = redisCommand(ctx, "CONFIG GET %s", name);
    bool ok = false;
    buf[0] = '\0';
    if (!r) {
        *io_error = true;
    } else if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[1]->str) {
        snprintf(buf, len, "%s", r->element[1]->str);
        ok = true;
    } else if (r->type == REDIS_REPLY_ERROR && r->str) {
        snprintf(buf, len, "%s", r->str);
    } else {
        snprintf(buf, len, "no such setting");
    }
    freeReplyObject(r);
    return ok;
}

static int rd_check(void *state, idem_findings *out)
{
    store *s = state;
    conn *c;
    bool fresh, io = false;
    int rc = acquire(s, &c, &fresh);
    if (rc)
        return rc;
    char policy[64], maxmem[32], aof[16], fsync[16], save[128], role[32], master[96], port[16], nrep[16];
    bool have_policy = rd_config_get(c->ctx, "maxmemory-policy", policy, sizeof policy, &io);
    bool have_maxmem = !io && rd_config_get(c->ctx, "maxmemory", maxmem, sizeof maxmem, &io);
    bool have_aof = !io && rd_config_get(c->ctx, "appendonly", aof, sizeof aof, &io);
    bool have_fsync = !io && rd_config_get(c->ctx, "appendfsync", fsync, sizeof fsync, &io);
    bool have_save = !io && rd_config_get(c->ctx, "save", save, sizeof save, &io);
    redisReply *info = io ? NULL : redisCommand(c->ctx, "INFO replication");
    if (io || !info) {
        rc = context_error(s, c->ctx, "reading the server's settings");
        drop(s, c);
        return rc;
    }
    rd_info_field(info, "role", role, sizeof role);
    rd_info_field(info, "master_host", master, sizeof master);
    rd_info_field(info, "master_port", port, sizeof port);
    rd_info_field(info, "connected_slaves", nrep, sizeof nrep);
    freeReplyObject(info);
    put_back(s, c);

    rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "redis %s: each claim, commit, abort and extend "
                           "is one atomic script on the server, fenced by the claim's token; leases "
                           "and TTLs run on the server's clock", s->where);
    if (rc == IDEM_OK && !have_policy)
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "cannot read maxmemory-policy (CONFIG GET: %s): "
                               "make sure it is noeviction in the provider's settings", policy);
    else if (rc == IDEM_OK && strcmp(policy, "noeviction") == 0)
        rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "maxmemory-policy noeviction: records are "
                               "never evicted (a full server refuses new claims: IDEM_EBACKEND, "
                               "nothing runs)");
    else if (rc == IDEM_OK)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "maxmemory-policy %s (maxmemory %s): when "
                               "memory runs short Redis evicts records (every record has a TTL, so "
                               "volatile-* policies evict them too), and a retry of an evicted key runs "
                               "its handler again; set maxmemory-policy noeviction (CONFIG SET "
                               "maxmemory-policy noeviction, and in redis.conf)",
                               policy, have_maxmem ? (strcmp(maxmem, "0") == 0 ? "0: no limit yet" : maxmem)
                                                   : "unknown");
    bool aof_on = have_aof && strcmp(aof, "yes") == 0;
    bool rdb_on = have_save && save[0] != '\0';
    if (rc == IDEM_OK && (!have_aof || !have_save))
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "cannot read the persistence settings (CONFIG GET "
                               "appendonly/save: %s): make sure appendonly is yes",
                               !have_aof ? aof : save);
    else if (rc == IDEM_OK && aof_on)
        rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "appendonly yes (appendfsync %s): claims and "
                               "responses survive a restart of the server%s", have_fsync ? fsync : "?",
                               have_fsync && strcmp(fsync, "always") == 0
                                   ? ""
                                   : ", except the last second or so of writes when the machine "
                                     "itself crashes");
    else if (rc == IDEM_OK && rdb_on)
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "appendonly no, RDB snapshots only (save \"%s\"): "
                               "a restart loses what was written since the last snapshot, and retries "
                               "of those keys run again; appendonly yes keeps every write", save);
    else if (rc == IDEM_OK)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "no persistence (appendonly no, save \"\"): a "
                               "restart of the server forgets every claim and response, and every retry "
                               "then runs its handler again; set appendonly yes");
    if (rc == IDEM_OK && strcmp(role, "slave") == 0)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "this server is a replica (of %s:%s): claims "
                               "fail with READONLY, or, on a writable replica, never reach the master "
                               "and its other clients; point the URL at the master", master, port);
    else if (rc == IDEM_OK && role[0])
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "role %s with %s replica%s: replication is "
                               "asynchronous, so a failover can lose the last claims and responses",
                               role, nrep[0] ? nrep : "0", strcmp(nrep, "1") == 0 ? "" : "s");
    return rc;
}
