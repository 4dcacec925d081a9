/*
 * Redis driver over hiredis:
 *   redis://[[user]:password@]host[:port][/db][?PARAMS]
 *   redis+unix:///path/to/redis.sock[?db=N&password=...&PARAMS]
 *   redis+cluster://[[user]:password@]host:port[,host:port...][?PARAMS]
 *   redis+sentinel://[[user]:password@]host:port[,...]/MASTERNAME[?db=N&sentinel_password=...&PARAMS]
 * PARAMS: connect_timeout_ms, timeout_ms, max_record_bytes, wait_replicas,
 * wait_timeout_ms (backends/redis/README.md).
 *
 * Every server is a node with its own connection pool (idem_pool). One
 * server: all operations go to it. Cluster: to the master of the key's
 * slot, from CLUSTER SLOTS, following MOVED/ASK/TRYAGAIN/CLUSTERDOWN
 * (op_exec()). Sentinel: to the master the sentinels name, checked with
 * ROLE and resolved again after a failure or READONLY.
 *
 * One string per key, expiring by the server's clock (PX). Every operation
 * is one round trip. The claim, the operation every request makes, is two
 * plain commands pipelined, SET key record NX PX lease GET and PTTL key: the
 * key is set, or the record already there comes back with the time left on
 * it, for a fraction of what a script costs the server (rd_claim()). The
 * commit, release and extend act only on a record that carries the claim's
 * token (fencing), which takes a Lua script, loaded once per server with
 * SCRIPT LOAD and called with EVALSHA: it compares bytes at the fixed
 * offsets of the record header. Scripts are constants; keys and records
 * travel as KEYS and ARGV with explicit lengths, so any byte is safe in
 * them. A server older than 7.0, which refuses NX with GET, gets the claim
 * as a script too.
 *
 * timeout_ms bounds an operation's command and its whole reply: hiredis
 * bounds each read by the socket's timeout, so the driver runs the reads
 * itself and shortens that timeout to the time left (conn_reply()). The
 * core's deadline for the call, when sooner, bounds it instead
 * (idem_call_timeout_ms()).
 *
 * A hiredis context is not thread-safe, so each node keeps a pool of them.
 * A context that saw an I/O error, a timeout or EOF is freed, never pooled
 * again, and the idle ones are dropped with it (they talk to the same
 * server, which most likely went away).
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include <idempotency/backend.h>

#define DEFAULT_PORT               6379
#define DEFAULT_SENTINEL_PORT      26379
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
#define DEFAULT_WAIT_TIMEOUT_MS    100
/* Redirects (MOVED, ASK) and retries (TRYAGAIN, CLUSTERDOWN, a failed
 * server) one operation follows at most, all within its timeout_ms. */
#define MAX_HOPS                   8
/* The topology is asked again at most this often. */
#define LEARN_INTERVAL_MS          100
#define MAX_WAIT_REPLICAS          64

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

enum script_id { SC_CLAIM, SC_COMMIT, SC_RELEASE, SC_EXTEND, SC_READ, SC_COUNT };

static const char *const script_src[SC_COUNT] = {
    /* The claim for a server before 7.0, which refuses SET with both NX
     * and GET (rd_claim() sends those two commands to later ones).
     * KEYS[1] key, ARGV[1] record, ARGV[2] lease ms, ARGV[3] the longest
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
        "local v = redis.call('GET', KEYS[1])\n"
        "if v then return {v, redis.call('PTTL', KEYS[1])} end\n"
        "local e = redis.pcall('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])\n"
        "if type(e) == 'table' and e.err then return e end\n"
        "return 0\n",
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
    /* KEYS[1] key, ARGV[1] the longest record. 0: nothing there. Else the
     * claim's answers for a key that is taken; nothing is written. */
    [SC_READ] =
        "local n = redis.pcall('STRLEN', KEYS[1])\n"
        "if type(n) ~= 'number' then\n"
        "  return {'', redis.call('PTTL', KEYS[1]), redis.call('TYPE', KEYS[1])['ok']}\n"
        "end\n"
        "if n > tonumber(ARGV[1]) then return {n, redis.call('PTTL', KEYS[1])} end\n"
        "local v = redis.call('GET', KEYS[1])\n"
        "if v == false then return 0 end\n"
        "return {v, redis.call('PTTL', KEYS[1])}\n",
};

static const char *const script_what[SC_COUNT] = {
    [SC_CLAIM] = "claiming a key",
    [SC_COMMIT] = "storing a response",
    [SC_RELEASE] = "freeing a key",
    [SC_EXTEND] = "extending a lease",
    [SC_READ] = "reading a record",
};

/* ---- the store ---- */

typedef struct store store;

/* A connection, pooled by its node (idem_pool). */
typedef struct conn {
    redisContext *ctx;
    unsigned      socket_ms;  /* the socket's timeout now (SO_RCVTIMEO, SO_SNDTIMEO) */
    bool          timed_out;  /* the last command ran out of time */
    bool          partial;    /* ... after part of its reply had come */
} conn;

/* One server the store talks to, with its pool. Nodes live until the store
 * is closed, so a pointer to one stays valid however the topology moves. */
typedef struct node {
    store       *s;
    char        *host;        /* NULL for a unix socket */
    int          port;
    char        *where;       /* "redis 127.0.0.1:6379", for messages */
    idem_pool   *pool;
    struct node *next;
} node;

enum topology {
    TOPO_SINGLE,    /* redis://, redis+unix:// */
    TOPO_CLUSTER,   /* redis+cluster://: keys spread over the masters by slot */
    TOPO_SENTINEL,  /* redis+sentinel://: the master the sentinels name */
};

#define CLUSTER_SLOTS 16384

struct store {
    enum topology   topo;
    char           *socket_path; /* redis+unix: the socket; NULL for TCP */
    char           *user;        /* ACL user name, or NULL */
    char           *password;    /* never printed */
    unsigned long   db;
    unsigned        connect_ms, command_ms;
    size_t          max_record;  /* the longest value read back as a record */
    unsigned        wait_replicas, wait_timeout_ms;
    atomic_ullong   commits_unacked; /* commits fewer than wait_replicas acknowledged */
    char            sha[SC_COUNT][41]; /* SHA1 hex of each script, fixed at open */
    pthread_mutex_t mu;          /* guards nodes */
    node           *nodes;       /* every node used so far */
    node *_Atomic   master;      /* single, sentinel: where every operation goes */
    /* cluster: the master of each slot (NULL: unknown), refreshed from
     * CLUSTER SLOTS at open, after MOVED and after a connection failure */
    node *_Atomic  *slots;
    /* sentinel */
    char           *master_name;
    char           *sentinel_password;
    idem_url_host  *sentinels;   /* in the order to ask them; one that answers moves first */
    size_t          nsentinels;
    /* cluster and sentinel: one thread at a time learns the topology */
    pthread_mutex_t learn_mu;
    uint64_t        learned_ms;  /* when it last did */
    atomic_bool     unsure;      /* a failure left no time to learn: do it first */
    atomic_bool     claim_script; /* a server refused SET NX GET (before 7.0) */
    atomic_ulong    moved, asked, retried, learned; /* counts, for the curious */
};

/* ---- messages ---- */

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
static int context_error_at(const store *s, const char *where, const redisContext *c, bool timed_out,
                            bool partial, const char *what)
{
    if (!c)
        return idem_driver_error(IDEM_ENOMEM, where, what, "out of memory");
    bool eagain = c->err == REDIS_ERR_IO && (errstr_is(c, EAGAIN) || errstr_is(c, EWOULDBLOCK));
    /* The core's deadline for this call, sooner than timeout_ms, ran out. */
    uint64_t call_deadline = idem_call_deadline_ms();
    if ((timed_out || eagain) && call_deadline && idem_mono_ms() >= call_deadline)
        return idem_driver_error(IDEM_EBACKEND, where, what, "no %sreply within the time the library "
                                 "left this call (what remained of commit_timeout_ms or of the "
                                 "lease), before timeout_ms (%u ms)", partial ? "whole " : "",
                                 s->command_ms);
    if ((timed_out || eagain) && partial)
        return idem_driver_error(IDEM_EBACKEND, where, what, "the reply was still incomplete "
                                 "after %u ms (timeout_ms in the store URL bounds the whole "
                                 "reply); is the network or the server overloaded?",
                                 s->command_ms);
    if (timed_out || eagain)
        return idem_driver_error(IDEM_EBACKEND, where, what, "no reply within %u ms (timeout_ms "
                                 "in the store URL)", s->command_ms);
    if (c->err == REDIS_ERR_EOF)
        return idem_driver_error(IDEM_EBACKEND, where, what, "the server closed the connection "
                                 "(restarting, or maxclients or timeout in its config?)");
    if (c->err == REDIS_ERR_IO && (errstr_is(c, ETIMEDOUT) || errstr_is(c, EINPROGRESS)))
        return idem_driver_error(IDEM_EBACKEND, where, what, "connecting timed out after %u ms "
                                 "(connect_timeout_ms in the store URL); is the host reachable?",
                                 s->connect_ms);
    if (c->err == REDIS_ERR_IO && errstr_is(c, ENOENT))
        return idem_driver_error(IDEM_EBACKEND, where, what, "no such socket; is redis-server "
                                 "running? start one with: redis-server --port 0 --unixsocket %s",
                                 s->socket_path ? s->socket_path : "PATH");
    if (c->err == REDIS_ERR_IO && errstr_is(c, ECONNREFUSED)) {
        const char *colon = strrchr(where, ':');
        return idem_driver_error(IDEM_EBACKEND, where, what, "connection refused; is "
                                 "redis-server running? start one with: redis-server --port %s",
                                 colon ? colon + 1 : "PORT");
    }
    if (c->err == REDIS_ERR_IO && errstr_is(c, ECONNRESET))
        return idem_driver_error(IDEM_EBACKEND, where, what, "connection reset by the server");
    if (c->err == REDIS_ERR_OTHER && !s->socket_path && strcmp(what, "connecting") == 0)
        return idem_driver_error(IDEM_EBACKEND, where, what, "%s; check the host name in the "
                                 "store URL", c->errstr);
    return idem_driver_error(IDEM_EBACKEND, where, what, "%s",
                             c->errstr[0] ? c->errstr : "unknown hiredis error");
}

static int conn_error(const store *s, const char *where, const conn *c, const char *what)
{
    return context_error_at(s, where, c->ctx, c->timed_out, c->partial, what);
}

/* The hint for an error reply the server gives, or "". */
static const char *reply_hint(const char *msg)
{
    if (strncmp(msg, "MOVED ", 6) == 0 || strncmp(msg, "ASK ", 4) == 0)
        return "; this is a Redis Cluster node: use a redis+cluster:// URL, which follows "
               "redirects";
    if (strncmp(msg, "READONLY", 8) == 0)
        return "; the store URL points at a replica: point it at the master, or use a "
               "redis+sentinel:// URL, which finds the master";
    if (strncmp(msg, "NOAUTH", 6) == 0)
        return "; the server wants a password: redis://:PASSWORD@host:port";
    if (strncmp(msg, "WRONGPASS", 9) == 0 || strstr(msg, "invalid password") ||
        strstr(msg, "without any password"))
        return "; check the user name and password in the store URL";
    if (strncmp(msg, "OOM", 3) == 0)
        return "; the server reached maxmemory: raise it (keep maxmemory-policy noeviction: every "
               "record has a TTL, so a volatile-* or allkeys-* policy may evict one and let a "
               "duplicate run)";
    if (strncmp(msg, "LOADING", 7) == 0)
        return "; the server is loading its data set after a restart: retry shortly";
    if (strncmp(msg, "CLUSTERDOWN", 11) == 0 || strncmp(msg, "TRYAGAIN", 8) == 0)
        return "; the cluster is failing over or resharding: retry shortly";
    if (strncmp(msg, "NOREPLICAS", 10) == 0)
        return "; the master has fewer replicas than its min-replicas-to-write: bring them back";
    if (strncmp(msg, "MASTERDOWN", 10) == 0)
        return "; the replica lost its master: retry shortly";
    return "";
}

/* Describe an error reply from the server, with a hint for the known ones. */
static int reply_error(const char *where, const redisReply *r, const char *what)
{
    const char *msg = r->str ? r->str : "";
    int n = (int)strlen(msg);
    if (n > 0 && msg[n - 1] == '.') /* "NOAUTH Authentication required." */
        n--;
    return idem_driver_error(IDEM_EBACKEND, where, what, "the server answered: %.*s%s", n, msg,
                             reply_hint(msg));
}

static bool reply_is(const redisReply *r, const char *prefix)
{
    return r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, prefix, strlen(prefix)) == 0;
}

/* ---- one command, bounded as a whole ---- */

static struct timeval tv_ms(uint64_t ms)
{
    return (struct timeval){.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
}

/* Before one read or write: fit the socket's timeout to the time left
 * until deadline, so that no read or write, and so no reply however it
 * trickles in, outlasts it. false when the time is up. */
static bool conn_budget(conn *c, uint64_t deadline)
{
    uint64_t now = idem_mono_ms();
    if (now >= deadline) {
        c->timed_out = true;
        return false;
    }
    uint64_t left = deadline - now;
    if (left + TIMEOUT_SLACK_MS < c->socket_ms || left > c->socket_ms + TIMEOUT_SLACK_MS) {
        if (redisSetTimeout(c->ctx, tv_ms(left)) != REDIS_OK)
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
static bool conn_flush(conn *c, uint64_t deadline)
{
    c->timed_out = c->partial = false;
    int done = 0;
    while (!done)
        if (!conn_budget(c, deadline) || redisBufferWrite(c->ctx, &done) != REDIS_OK)
            return false;
    return true;
}

/* Read the next reply, by deadline (after conn_flush()). */
static redisReply *conn_read_reply(conn *c, uint64_t deadline)
{
    redisContext *ctx = c->ctx;
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

static redisReply *conn_reply(conn *c, uint64_t deadline)
{
    return conn_flush(c, deadline) ? conn_read_reply(c, deadline) : NULL;
}

static redisReply *conn_command(conn *c, uint64_t deadline, int argc, const char **argv,
                                const size_t *lens)
{
    if (redisAppendCommandArgv(c->ctx, argc, argv, lens) != REDIS_OK)
        return NULL;
    return conn_reply(c, deadline);
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

/* The password refused, said plainly. */
static int auth_refused(const char *where, const redisReply *r, const char *what)
{
    int n = r->str ? (int)r->len : 0;
    if (n && r->str[n - 1] == '.')
        n--;
    return idem_driver_error(IDEM_EBACKEND, where, what, "the server refused the password (%.*s); "
                             "check the user name and password in the store URL", n,
                             r->str ? r->str : "");
}

/* Send AUTH, SELECT and (sentinel: is it still the master?) ROLE as
 * needed, pipelined: one round trip. */
static int conn_setup(store *s, const char *where, conn *c)
{
    redisContext *ctx = c->ctx;
    enum { AUTH, SELECT, ROLE } sent[3];
    int n = 0;
    if (s->password) {
        int rc = s->user ? redisAppendCommand(ctx, "AUTH %s %s", s->user, s->password)
                         : redisAppendCommand(ctx, "AUTH %s", s->password);
        if (rc != REDIS_OK)
            return context_error_at(s, where, ctx, false, false, "authenticating");
        sent[n++] = AUTH;
    }
    if (s->db) {
        if (redisAppendCommand(ctx, "SELECT %lu", s->db) != REDIS_OK)
            return context_error_at(s, where, ctx, false, false, "selecting the database");
        sent[n++] = SELECT;
    }
    if (s->topo == TOPO_SENTINEL) {
        if (redisAppendCommand(ctx, "ROLE") != REDIS_OK)
            return context_error_at(s, where, ctx, false, false, "checking the role");
        sent[n++] = ROLE;
    }
    int ret = IDEM_OK;
    uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    for (int i = 0; i < n; i++) {
        const char *what = sent[i] == AUTH ? "authenticating"
                         : sent[i] == SELECT ? "selecting the database" : "checking the role";
        redisReply *r = conn_reply(c, deadline);
        if (!r)
            return conn_error(s, where, c, what);
        if (ret == IDEM_OK && r->type == REDIS_REPLY_ERROR)
            ret = sent[i] == AUTH ? auth_refused(where, r, what)
                : sent[i] == SELECT
                    ? idem_driver_error(IDEM_EBACKEND, where, what, "SELECT %lu failed (%s); the "
                                        "URL's database number must be below the server's "
                                        "`databases` setting", s->db, r->str ? r->str : "")
                    : reply_error(where, r, what);
        else if (ret == IDEM_OK && sent[i] == ROLE &&
                 !(r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                   r->element[0]->type == REDIS_REPLY_STRING &&
                   strcmp(r->element[0]->str, "master") == 0))
            ret = idem_driver_error(IDEM_EBACKEND, where, what, "the server the sentinels named "
                                    "as master of %s is not a master (ROLE says %s); a failover "
                                    "is under way: retry shortly", s->master_name,
                                    r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                                    r->element[0]->type == REDIS_REPLY_STRING
                                        ? r->element[0]->str : "something else");
        freeReplyObject(r);
    }
    return ret;
}

/* Connect to n and prepare the connection. */
static int conn_open(store *s, const node *n, conn **out)
{
    conn *c = calloc(1, sizeof *c);
    if (!c)
        return idem_driver_error(IDEM_ENOMEM, n->where, "connecting", "out of memory");
    struct timeval tv = tv_ms(idem_call_timeout_ms(s->connect_ms));
    c->ctx = n->host ? redisConnectWithTimeout(n->host, n->port, tv)
                     : redisConnectUnixWithTimeout(s->socket_path, tv);
    int rc;
    if (!c->ctx || c->ctx->err) {
        rc = context_error_at(s, n->where, c->ctx, false, false, "connecting");
        conn_free(c);
        return rc;
    }
    if (redisSetTimeout(c->ctx, tv_ms(s->command_ms)) != REDIS_OK) {
        rc = context_error_at(s, n->where, c->ctx, false, false, "setting the command timeout");
        conn_free(c);
        return rc;
    }
    c->socket_ms = s->command_ms;
    if (n->host)
        (void)redisEnableKeepAlive(c->ctx); /* only helps to notice a dead peer sooner */
    if ((rc = conn_setup(s, n->where, c))) {
        conn_free(c);
        return rc;
    }
    *out = c;
    return IDEM_OK;
}

static int pool_connect(void *ctx, void **out)
{
    node *n = ctx;
    conn *c = NULL;
    int rc = conn_open(n->s, n, &c);
    if (rc == IDEM_OK)
        *out = c;
    return rc;
}

static void pool_disconnect(void *ctx, void *c)
{
    (void)ctx;
    conn_free(c);
}

static void node_free(node *n)
{
    if (n->pool)
        idem_pool_free(n->pool);
    free(n->host);
    free(n->where);
    free(n);
}

/* The node for host:port (host NULL: the store's unix socket), made on
 * first use. NULL with a message when out of memory. */
static node *node_get(store *s, const char *host, int port)
{
    pthread_mutex_lock(&s->mu);
    node *n = s->nodes;
    while (n && !(host ? n->host && n->port == port && strcmp(n->host, host) == 0 : !n->host))
        n = n->next;
    if (n) {
        pthread_mutex_unlock(&s->mu);
        return n;
    }
    n = calloc(1, sizeof *n);
    int ok = n != NULL;
    if (ok) {
        n->s = s;
        n->port = port;
        if (host)
            ok = (n->host = strdup(host)) &&
                 asprintf(&n->where, strchr(host, ':') ? "redis [%s]:%d" : "redis %s:%d", host,
                          port) >= 0;
        else
            ok = asprintf(&n->where, "redis %s", s->socket_path) >= 0;
        if (!ok)
            n->where = NULL;
    }
    idem_pool_config cfg = {.ctx = n, .connect = pool_connect, .disconnect = pool_disconnect};
    if (ok && idem_pool_new(&n->pool, &cfg) != IDEM_OK)
        ok = 0;
    if (!ok) {
        pthread_mutex_unlock(&s->mu);
        if (n)
            node_free(n);
        idem_error_set(IDEM_ENOMEM, "redis %s:%d: out of memory", host ? host : "", port);
        return NULL;
    }
    n->next = s->nodes;
    s->nodes = n;
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ---- one operation ---- */

/* What one operation sends, and what came of it. */
typedef struct op {
    store          *s;
    node           *n;          /* where it is being sent */
    int             id;         /* enum script_id: what it does; -1: removing a key */
    bool            plain;      /* argv is a plain command, not EVALSHA of script id */
    int             argc;
    const char    **argv;       /* EVALSHA sha 1 key args..., or the plain command */
    size_t         *lens;
    const char    **argv2;      /* a second plain command pipelined after it, or NULL */
    size_t         *lens2;
    int             argc2;
    size_t          cap;        /* > 0: a string reply to the first command longer than
                                 * this is not read (too_long), the connection is dropped */
    long long       too_long;   /* the length of that string */
    redisReply     *reply2;     /* the second command's answer */
    uint64_t        deadline;
    bool            wait;       /* follow a write with WAIT (wait_replicas) */
    bool            asking;     /* send ASKING first (cluster: ASK redirect) */
    bool            maybe_ran;  /* an earlier try may have run on the server */
    long long       acked;      /* replicas that acknowledged the write (WAIT), or -1 */
    redisReply     *reply;      /* the answer, never an error reply of the connection's */
} op;

/* Did the script's answer write something worth a WAIT? */
static bool op_wrote(const op *o, const redisReply *r)
{
    if (o->plain)
        return r->type == REDIS_REPLY_NIL; /* SET NX set the key (only the claim waits) */
    if (r->type != REDIS_REPLY_INTEGER)
        return false;
    return (o->id == SC_CLAIM && r->integer == 0) || (o->id == SC_COMMIT && r->integer >= 1);
}

/* One use of a pooled connection: send the command (EVAL after NOSCRIPT),
 * then WAIT when asked. Every script is safe to run twice (see the
 * operations), so a pooled connection the server closed is reported STALE
 * and idem_pool_run() tries once more on a new one. */
/* The length of the string reply that comes next on c, without reading it:
 * -1 when the next reply is not a string, -2 when the connection failed.
 * Reads until the reply's first line has come ("$1234\r\n"), and no
 * further; hiredis has not parsed any of it yet. */
static long long conn_peek_string(conn *c, uint64_t deadline)
{
    redisReader *rd = c->ctx->reader;
    for (;;) {
        const char *p = rd->buf + rd->pos;
        size_t avail = rd->len - rd->pos;
        if (avail && p[0] != '$')
            return -1;
        if (avail && memchr(p, '\n', avail))
            return strtoll(p + 1, NULL, 10);
        if (avail > 32)
            return -1;
        if (!conn_budget(c, deadline) || redisBufferRead(c->ctx) != REDIS_OK)
            return -2;
        c->partial = rd->len > rd->pos;
    }
}

/* Send the command, and the second one when there is one, each after
 * ASKING when asked, and read their replies: the first one's, NULL when the
 * connection failed, the time ran out or the first reply was too long
 * (o->too_long). */
static redisReply *op_send(op *o, conn *c)
{
    int n = o->argv2 ? 2 : 1;
    for (int i = 0; i < n; i++)
        if ((o->asking && redisAppendCommand(c->ctx, "ASKING") != REDIS_OK) ||
            redisAppendCommandArgv(c->ctx, i ? o->argc2 : o->argc, i ? o->argv2 : o->argv,
                                   i ? o->lens2 : o->lens) != REDIS_OK)
            return NULL;
    if (!conn_flush(c, o->deadline))
        return NULL;
    redisReply *first = NULL;
    for (int i = 0; i < n; i++) {
        redisReply *a = o->asking ? conn_read_reply(c, o->deadline) : NULL; /* ASKING's +OK */
        if (o->asking && !a)
            break;
        freeReplyObject(a);
        long long len = i == 0 && o->cap ? conn_peek_string(c, o->deadline) : -1;
        if (len == -2)
            break;
        if (len > (long long)o->cap) {
            o->too_long = len;
            break;
        }
        redisReply *r = conn_read_reply(c, o->deadline);
        if (!r)
            break;
        if (i == 0)
            first = r;
        else
            o->reply2 = r;
    }
    if (first && (n == 1 || o->reply2))
        return first;
    freeReplyObject(first);
    return NULL;
}

static int op_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    op *o = arg;
    store *s = o->s;
    const char *what = o->id >= 0 ? script_what[o->id] : "removing a key";
    redisReply *r = op_send(o, c);
    if (!r && o->too_long > 0) {
        /* Its bytes are still coming: this connection's socket cannot be
         * used again, but the server is well. Swap in a new one, so the
         * pool keeps the other idle connections. */
        conn *fresh;
        if (conn_open(s, o->n, &fresh) == IDEM_OK) {
            redisContext *old = c->ctx;
            *c = *fresh;
            fresh->ctx = old;
            conn_free(fresh);
        } else {
            *state = IDEM_CONN_BROKEN;
        }
        return IDEM_OK;
    }
    if (r && !o->plain && reply_is(r, "NOSCRIPT")) {
        /* The server lost its script cache (restart, failover, SCRIPT
         * FLUSH), or never had it (another cluster node): EVAL runs the
         * script and caches it. */
        freeReplyObject(r);
        const char *argv0 = o->argv[0], *argv1 = o->argv[1];
        size_t len0 = o->lens[0], len1 = o->lens[1];
        o->argv[0] = "EVAL";
        o->lens[0] = 4;
        o->argv[1] = script_src[o->id];
        o->lens[1] = strlen(script_src[o->id]);
        r = op_send(o, c);
        o->argv[0] = argv0, o->argv[1] = argv1;
        o->lens[0] = len0, o->lens[1] = len1;
    }
    if (!r) {
        *state = !c->timed_out && peer_went_away(c->ctx) ? IDEM_CONN_STALE : IDEM_CONN_BROKEN;
        int rc = conn_error(s, o->n->where, c, what);
        o->maybe_ran = true;
        return rc;
    }
    if (o->wait && op_wrote(o, r)) {
        char n[16], t[16];
        snprintf(n, sizeof n, "%u", s->wait_replicas);
        snprintf(t, sizeof t, "%u", s->wait_timeout_ms);
        const char *argv[3] = {"WAIT", n, t};
        size_t lens[3] = {4, strlen(n), strlen(t)};
        uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->wait_timeout_ms + s->command_ms);
        redisReply *w = conn_command(c, deadline, 3, argv, lens);
        if (!w) {
            freeReplyObject(r);
            freeReplyObject(o->reply2);
            o->reply2 = NULL;
            *state = IDEM_CONN_BROKEN;
            o->maybe_ran = true;
            return conn_error(s, o->n->where, c, "waiting for replicas (WAIT)");
        }
        o->acked = w->type == REDIS_REPLY_INTEGER ? w->integer : -1;
        freeReplyObject(w);
    }
    o->reply = r;
    return IDEM_OK;
}

/* ---- the topology: cluster slots, the sentinels' master ---- */

/* CRC16 (XMODEM: polynomial 0x1021, no reflection), as the cluster
 * specification defines the key hash. */
static uint16_t crc16(const unsigned char *p, size_t n)
{
    uint16_t crc = 0;
    while (n--) {
        crc ^= (uint16_t)(*p++ << 8);
        for (int i = 0; i < 8; i++)
            crc = crc & 0x8000 ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* The slot of a key: only what is between the first '{' and the next '}'
 * counts, when that is not empty. */
static unsigned key_slot(const void *key, size_t len)
{
    const unsigned char *k = key;
    size_t open = 0;
    while (open < len && k[open] != '{')
        open++;
    if (open < len) {
        size_t close = open + 1;
        while (close < len && k[close] != '}')
            close++;
        if (close < len && close > open + 1)
            return crc16(k + open + 1, close - open - 1) & (CLUSTER_SLOTS - 1);
    }
    return crc16(k, len) & (CLUSTER_SLOTS - 1);
}

/* host:port from "host:port" (IPv6: the last colon splits); an empty host
 * is the server that said it. */
static node *node_at(store *s, const char *text, size_t len, const node *said)
{
    const char *colon = NULL;
    for (size_t i = 0; i < len; i++)
        if (text[i] == ':')
            colon = text + i;
    if (!colon)
        return NULL;
    char host[256];
    size_t hlen = (size_t)(colon - text);
    if (hlen >= sizeof host)
        return NULL;
    memcpy(host, text, hlen);
    host[hlen] = '\0';
    int port = atoi(colon + 1);
    if (port <= 0 || port > 65535)
        return NULL;
    return node_get(s, hlen ? host : said->host, port);
}

/* A node to ask about the topology, and by when. */
typedef struct ask_arg {
    node    *n;
    uint64_t deadline;
} ask_arg;

/* CLUSTER SLOTS on one node, into the slot table. */
static int slots_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    node *n = ((ask_arg *)arg)->n;
    store *s = n->s;
    const char *what = "reading the cluster's slot map (CLUSTER SLOTS)";
    const char *argv[2] = {"CLUSTER", "SLOTS"};
    size_t lens[2] = {7, 5};
    redisReply *r = conn_command(c, ((ask_arg *)arg)->deadline, 2, argv, lens);
    if (!r) {
        *state = IDEM_CONN_BROKEN;
        return conn_error(s, n->where, c, what);
    }
    int rc = IDEM_OK;
    if (r->type == REDIS_REPLY_ERROR) {
        rc = idem_driver_error(IDEM_EBACKEND, n->where, what, "the server answered: %s%s", r->str,
                               strstr(r->str, "cluster support disabled")
                                   ? "; this server is not in cluster mode: use redis://"
                                   : "");
    } else if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        rc = idem_driver_error(IDEM_EBACKEND, n->where, what, "no slot is served; is the cluster "
                               "created (redis-cli --cluster create) and cluster_state:ok?");
    } else {
        for (size_t i = 0; i < r->elements && rc == IDEM_OK; i++) {
            redisReply *e = r->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
                e->element[0]->type != REDIS_REPLY_INTEGER ||
                e->element[1]->type != REDIS_REPLY_INTEGER ||
                e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2 ||
                e->element[2]->element[0]->type != REDIS_REPLY_STRING ||
                e->element[2]->element[1]->type != REDIS_REPLY_INTEGER) {
                rc = idem_driver_error(IDEM_EBACKEND, n->where, what, "unexpected entry %zu", i);
                break;
            }
            long long lo = e->element[0]->integer, hi = e->element[1]->integer;
            const redisReply *ip = e->element[2]->element[0];
            int port = (int)e->element[2]->element[1]->integer;
            node *m = node_get(s, ip->len && strcmp(ip->str, "?") != 0 ? ip->str : n->host, port);
            if (!m) {
                rc = IDEM_ENOMEM;
                break;
            }
            for (long long k = lo; k <= hi && k >= 0 && k < CLUSTER_SLOTS; k++)
                atomic_store(&s->slots[k], m);
        }
    }
    freeReplyObject(r);
    return rc;
}

/* Ask the sentinels in turn for the master's address, connect to it and
 * check ROLE (on the pool's connection: conn_setup()). */
static int sentinel_ask(store *s, const idem_url_host *h, uint64_t deadline, node **out)
{
    char where[300];
    snprintf(where, sizeof where, strchr(h->host, ':') ? "redis sentinel [%s]:%u"
                                                       : "redis sentinel %s:%u", h->host, h->port);
    const char *what = "asking for the master";
    conn c = {0};
    c.ctx = redisConnectWithTimeout(h->host, h->port ? h->port : DEFAULT_SENTINEL_PORT,
                                    tv_ms(s->connect_ms));
    int rc = IDEM_OK;
    if (!c.ctx || c.ctx->err) {
        rc = context_error_at(s, where, c.ctx, false, false, "connecting");
        goto done;
    }
    c.socket_ms = 0;
    if (s->sentinel_password) {
        const char *argv[2] = {"AUTH", s->sentinel_password};
        size_t lens[2] = {4, strlen(s->sentinel_password)};
        redisReply *a = conn_command(&c, deadline, 2, argv, lens);
        if (!a) {
            rc = conn_error(s, where, &c, "authenticating");
            goto done;
        }
        if (a->type == REDIS_REPLY_ERROR)
            rc = auth_refused(where, a, "authenticating");
        freeReplyObject(a);
        if (rc)
            goto done;
    }
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", s->master_name};
    size_t lens[3] = {8, 23, strlen(s->master_name)};
    redisReply *r = conn_command(&c, deadline, 3, argv, lens);
    if (!r) {
        rc = conn_error(s, where, &c, what);
        goto done;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING) {
        *out = node_get(s, r->element[0]->str, atoi(r->element[1]->str));
        if (!*out)
            rc = IDEM_ENOMEM;
    } else if (r->type == REDIS_REPLY_ERROR) {
        rc = reply_error(where, r, what);
    } else {
        rc = idem_driver_error(IDEM_EBACKEND, where, what, "this sentinel knows no master called "
                               "'%s'; check the name in the store URL "
                               "(redis+sentinel://host:port/MASTERNAME)", s->master_name);
    }
    freeReplyObject(r);
done:
    if (c.ctx)
        redisFree(c.ctx);
    return rc;
}

static int check_run(void *connp, void *arg, idem_conn_state *state)
{
    /* A new connection has passed conn_setup()'s ROLE check; a pooled one
     * is asked again. */
    conn *c = connp;
    node *n = ((ask_arg *)arg)->n;
    const char *argv[1] = {"ROLE"};
    size_t lens[1] = {4};
    redisReply *r = conn_command(c, ((ask_arg *)arg)->deadline, 1, argv, lens);
    if (!r) {
        *state = IDEM_CONN_BROKEN;
        return conn_error(n->s, n->where, c, "checking the role");
    }
    bool master = r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
                  r->element[0]->type == REDIS_REPLY_STRING && strcmp(r->element[0]->str, "master") == 0;
    freeReplyObject(r);
    if (!master) {
        *state = IDEM_CONN_BROKEN; /* and every idle one: they talk to a replica now */
        return idem_driver_error(IDEM_EBACKEND, n->where, "checking the role", "the server the "
                                 "sentinels named as master of %s is not a master; a failover is "
                                 "under way: retry shortly", n->s->master_name);
    }
    return IDEM_OK;
}

static int resolve_master(store *s, uint64_t deadline)
{
    int rc = IDEM_EBACKEND;
    for (size_t i = 0; i < s->nsentinels && (i == 0 || idem_mono_ms() < deadline); i++) {
        node *m = NULL;
        rc = sentinel_ask(s, &s->sentinels[i], deadline, &m);
        ask_arg a = {.n = m, .deadline = deadline};
        if (rc == IDEM_OK)
            rc = idem_pool_run(m->pool, check_run, &a);
        if (rc == IDEM_OK) {
            atomic_store(&s->master, m);
            if (i) { /* the sentinel that answered is asked first next time */
                idem_url_host h = s->sentinels[i];
                memmove(s->sentinels + 1, s->sentinels, i * sizeof *s->sentinels);
                s->sentinels[0] = h;
            }
            return IDEM_OK;
        }
        if (rc == IDEM_ENOMEM)
            return rc;
    }
    return rc;
}

static int refresh_slots(store *s, uint64_t deadline)
{
    /* Ask the nodes known, newest first (the masters found last), until one
     * answers. The list only grows, so the snapshot stays valid. */
    pthread_mutex_lock(&s->mu);
    node *first = s->nodes;
    pthread_mutex_unlock(&s->mu);
    int rc = IDEM_EBACKEND;
    for (node *n = first; n && (n == first || idem_mono_ms() < deadline); n = n->next) {
        ask_arg a = {.n = n, .deadline = deadline};
        rc = idem_pool_run(n->pool, slots_run, &a);
        if (rc == IDEM_OK || rc == IDEM_ENOMEM)
            break;
    }
    return rc;
}

/* Learn the topology again (cluster: the slot map; sentinel: the master),
 * by deadline, unless another thread did so in the last
 * LEARN_INTERVAL_MS; force at open. */
static int learn(store *s, bool force, uint64_t deadline)
{
    pthread_mutex_lock(&s->learn_mu);
    uint64_t now = idem_mono_ms();
    int rc = IDEM_OK;
    if (force || now - s->learned_ms >= LEARN_INTERVAL_MS) {
        rc = s->topo == TOPO_CLUSTER ? refresh_slots(s, deadline) : resolve_master(s, deadline);
        s->learned_ms = idem_mono_ms();
        atomic_store(&s->unsure, rc != IDEM_OK);
        atomic_fetch_add(&s->learned, 1);
    }
    pthread_mutex_unlock(&s->learn_mu);
    return rc;
}

/* Where the key lives now. */
static node *route(store *s, unsigned slot)
{
    return s->topo == TOPO_CLUSTER ? atomic_load(&s->slots[slot]) : atomic_load(&s->master);
}

/* Sleep ms, but not past deadline. */
static void backoff(uint64_t deadline, unsigned ms)
{
    uint64_t now = idem_mono_ms();
    if (now + ms > deadline)
        ms = now < deadline ? (unsigned)(deadline - now) : 0;
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/*
 * Send o to where its key lives and return the answer in o->reply; an
 * error reply is IDEM_EBACKEND with the server's words and a hint.
 *
 * Cluster: MOVED updates the slot, asks for the whole map again and
 * follows; ASK sends ASKING and the command to the node named, once,
 * leaving the map alone; TRYAGAIN and CLUSTERDOWN are retried after a
 * growing pause; a server that cannot be reached makes the map be asked
 * again and the operation follow a slot that moved (a failover).
 * Sentinel: a connection failure or READONLY (the master was demoted)
 * makes the master be resolved again, and the operation follow it.
 * At most MAX_HOPS of these, all within timeout_ms. Following is safe
 * because every script is safe to run twice (see the operations).
 */
static int op_exec(store *s, op *o, const void *key, size_t key_len)
{
    if (!o->deadline) /* else the deadline of the operation this one continues */
        o->deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    o->acked = -1;
    unsigned slot = s->topo == TOPO_CLUSTER ? key_slot(key, key_len) : 0;
    const char *what = o->id >= 0 ? script_what[o->id] : "removing a key";
    node *ask = NULL;
    if (s->topo != TOPO_SINGLE && atomic_load(&s->unsure))
        (void)learn(s, false, o->deadline);
    for (int hop = 0;; hop++) {
        bool last = hop + 1 >= MAX_HOPS || idem_mono_ms() >= o->deadline;
        node *n = ask ? ask : route(s, slot);
        if (!n && s->topo != TOPO_SINGLE && learn(s, false, o->deadline) == IDEM_OK)
            n = route(s, slot);
        if (!n)
            return idem_driver_error(IDEM_EBACKEND, "redis cluster", what, "no master serves slot "
                                     "%u of this key; is every slot assigned (cluster_state:ok)?",
                                     slot);
        o->n = n;
        o->asking = ask != NULL;
        ask = NULL;
        o->reply = NULL;
        freeReplyObject(o->reply2);
        o->reply2 = NULL;
        o->too_long = 0;
        int rc = idem_pool_run(n->pool, op_run, o);
        if (rc) {
            /* The server is gone or stuck: in a cluster or under sentinels
             * another may have taken over. */
            if (rc != IDEM_EBACKEND || s->topo == TOPO_SINGLE)
                return rc;
            if (last || idem_mono_ms() >= o->deadline) {
                atomic_store(&s->unsure, true);
                return rc;
            }
            char *msg = strdup(idem_last_error()); /* learn() may say something else */
            bool follow = learn(s, false, o->deadline) == IDEM_OK && route(s, slot) != n;
            if (!follow)
                idem_error_set(rc, "%s", msg ? msg : "redis: out of memory");
            free(msg);
            if (!follow)
                return rc;
            atomic_fetch_add(&s->retried, 1);
            continue;
        }
        redisReply *r = o->reply;
        if (!r || r->type != REDIS_REPLY_ERROR)
            return IDEM_OK; /* NULL: a string too long to read (o->too_long) */
        bool moved = s->topo == TOPO_CLUSTER && reply_is(r, "MOVED ");
        bool asked = s->topo == TOPO_CLUSTER && reply_is(r, "ASK ");
        bool again = s->topo == TOPO_CLUSTER && (reply_is(r, "TRYAGAIN") || reply_is(r, "CLUSTERDOWN"));
        bool demoted = s->topo == TOPO_SENTINEL && reply_is(r, "READONLY");
        if (!last && (moved || asked)) {
            /* "MOVED 3999 127.0.0.1:6381" */
            const char *sp = strchr(r->str + (moved ? 6 : 4), ' ');
            node *to = sp ? node_at(s, sp + 1, strlen(sp + 1), n) : NULL;
            if (to) {
                freeReplyObject(r);
                o->reply = NULL;
                if (moved) {
                    atomic_fetch_add(&s->moved, 1);
                    atomic_store(&s->slots[slot], to);
                    (void)learn(s, false, o->deadline);
                    atomic_store(&s->slots[slot], to);
                } else {
                    atomic_fetch_add(&s->asked, 1);
                    ask = to;
                }
                continue;
            }
        }
        if (!last && (again || demoted)) {
            bool down = reply_is(r, "CLUSTERDOWN");
            freeReplyObject(r);
            o->reply = NULL;
            atomic_fetch_add(&s->retried, 1);
            if (demoted || down)
                (void)learn(s, false, o->deadline);
            backoff(o->deadline, 10u << (hop < 5 ? hop : 5));
            continue;
        }
        if (o->plain && o->id == SC_CLAIM)
            return IDEM_OK; /* rd_claim() reads what the server refused */
        rc = reply_error(n->where, r, what);
        freeReplyObject(r);
        o->reply = NULL;
        return rc;
    }
}

/* What came of one script besides its reply. */
typedef struct op_result {
    const char *where;      /* the server that answered, for messages */
    bool        maybe_ran;  /* an earlier try may have run the script */
    long long   acked;      /* replicas that acknowledged its write (WAIT); -1: no WAIT */
} op_result;

/* Run script id with KEYS[1] = key and ARGV = args: *out is the reply. */
static int run_script(store *s, enum script_id id, const void *key, size_t key_len, size_t nargs,
                      const char *const *args, const size_t *lens, redisReply **out, op_result *res)
{
    *out = NULL; /* defined on every return */
    const char *argv[8];
    size_t argvlen[8];
    argv[0] = "EVALSHA";
    argvlen[0] = 7;
    argv[1] = s->sha[id];
    argvlen[1] = 40;
    argv[2] = "1";
    argvlen[2] = 1;
    argv[3] = key;
    argvlen[3] = key_len;
    for (size_t i = 0; i < nargs; i++) {
        argv[4 + i] = args[i];
        argvlen[4 + i] = lens[i];
    }
    op o = {.s = s, .id = (int)id, .argc = (int)(4 + nargs), .argv = argv, .lens = argvlen,
            .wait = s->wait_replicas > 0};
    int rc = op_exec(s, &o, key, key_len);
    res->where = o.n ? o.n->where : "redis";
    res->maybe_ran = o.maybe_ran;
    res->acked = o.acked;
    if (rc == IDEM_OK)
        *out = o.reply;
    return rc;
}

static int unexpected(const char *where, enum script_id id, const redisReply *r)
{
    return idem_driver_error(IDEM_EBACKEND, where, script_what[id], "unexpected reply of type "
                             "%d from the script; is this a Redis server (or a proxy that "
                             "rewrites replies)?", r->type);
}

/* Run a fenced script whose reply is the integer 0 (lost) or one of ok.
 * 3 is "no such key": lost, unless an earlier try on a connection that
 * closed before its reply may have run the script and freed the key. */
static int run_fenced(store *s, enum script_id id, const void *key, size_t key_len, size_t nargs,
                      const char *const *args, const size_t *lens, long long max_ok)
{
    redisReply *r;
    op_result res;
    int rc = run_script(s, id, key, key_len, nargs, args, lens, &r, &res);
    if (rc)
        return rc;
    bool absent = id == SC_RELEASE && r->type == REDIS_REPLY_INTEGER && r->integer == 3;
    if (absent)
        rc = res.maybe_ran ? IDEM_OK : IDEM_ELOST;
    else if (r->type != REDIS_REPLY_INTEGER || r->integer < 0 || r->integer > max_ok)
        rc = unexpected(res.where, id, r);
    else
        rc = r->integer == 0 ? IDEM_ELOST : IDEM_OK;
    if (rc == IDEM_OK && id == SC_COMMIT && s->wait_replicas && res.acked < (long long)s->wait_replicas)
        atomic_fetch_add_explicit(&s->commits_unacked, 1, memory_order_relaxed);
    freeReplyObject(r);
    return rc;
}

/* ---- opening ---- */

static void store_free(store *s)
{
    if (!s)
        return;
    while (s->nodes) {
        node *n = s->nodes;
        s->nodes = n->next;
        node_free(n);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->learn_mu);
    free((void *)s->slots);
    for (size_t i = 0; i < s->nsentinels; i++)
        free(s->sentinels[i].host);
    free(s->sentinels);
    free(s->master_name);
    if (s->sentinel_password) {
        memset(s->sentinel_password, 0, strlen(s->sentinel_password));
        free(s->sentinel_password);
    }
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
        free(s->password);
    }
    free(s->user);
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

static const char *const tcp_params[] = {"connect_timeout_ms", "timeout_ms", "max_record_bytes",
                                         "wait_replicas", "wait_timeout_ms", NULL};
static const char *const unix_params[] = {"db", "password", "connect_timeout_ms", "timeout_ms",
                                          "max_record_bytes", "wait_replicas", "wait_timeout_ms",
                                          NULL};

/* The settings every URL form shares. */
static int parse_settings(store *s, const idem_url *url)
{
    uint64_t connect_ms = DEFAULT_CONNECT_TIMEOUT_MS, command_ms = DEFAULT_TIMEOUT_MS;
    uint64_t max_record = DEFAULT_MAX_RECORD_LEN, replicas = 0, wait_ms = DEFAULT_WAIT_TIMEOUT_MS;
    int rc = idem_url_param_uint(url, "connect_timeout_ms", 1, MAX_TIMEOUT_MS, &connect_ms);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "timeout_ms", 1, MAX_TIMEOUT_MS, &command_ms);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "max_record_bytes", IDEM_RECORD_HEADER_LEN + 8,
                                 MAX_RECORD_LEN, &max_record);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "wait_replicas", 0, MAX_WAIT_REPLICAS, &replicas);
    if (rc == IDEM_OK)
        rc = idem_url_param_uint(url, "wait_timeout_ms", 1, MAX_TIMEOUT_MS, &wait_ms);
    if (rc)
        return rc;
    s->connect_ms = (unsigned)connect_ms;
    s->command_ms = (unsigned)command_ms;
    s->max_record = (size_t)max_record;
    s->wait_replicas = (unsigned)replicas;
    s->wait_timeout_ms = (unsigned)wait_ms;
    return IDEM_OK;
}

/* Fill s from the URL; IDEM_EINVAL with a message for what does not fit.
 * *first is the server to connect to first. */
static const char *const sentinel_params[] = {"db", "sentinel_password", "connect_timeout_ms",
                                              "timeout_ms", "max_record_bytes", "wait_replicas",
                                              "wait_timeout_ms", NULL};

/* redis+cluster://seed[,seed...] and redis+sentinel://s[,s...]/MASTERNAME */
static int parse_topology(store *s, const idem_url *url, node **first)
{
    bool cluster = s->topo == TOPO_CLUSTER;
    int rc = idem_url_check_params(url, url->scheme, cluster ? tcp_params : sentinel_params);
    if (rc == IDEM_OK)
        rc = parse_settings(s, url);
    if (rc)
        return rc;
    if (!url->nhosts)
        return idem_error_set(IDEM_EINVAL, cluster ? "redis+cluster URLs name one or more nodes "
                              "of the cluster: redis+cluster://host:port[,host:port...]"
                              : "redis+sentinel URLs name one or more sentinels and the master: "
                              "redis+sentinel://host:port[,host:port...]/MASTERNAME");
    if (cluster && url->path && strcmp(url->path, "/") != 0)
        return idem_error_set(IDEM_EINVAL, "redis+cluster URLs have no path: a cluster has only "
                              "database 0; give a key_prefix of its own to each application");
    if (!cluster && (!url->path || !url->path[1] || strchr(url->path + 1, '/')))
        return idem_error_set(IDEM_EINVAL, "redis+sentinel URLs end with the name the sentinels "
                              "know the master by: redis+sentinel://host:26379/mymaster");
    if (url->user && !url->password)
        return idem_error_set(IDEM_EINVAL, "redis URL gives a user name but no password: "
                              "%s://user:PASSWORD@host:port", url->scheme);
    if (url->password && !(s->password = strdup(url->password)))
        return IDEM_ENOMEM;
    if (url->user && !(s->user = strdup(url->user)))
        return IDEM_ENOMEM;
    if (cluster) {
        if (!(s->slots = calloc(CLUSTER_SLOTS, sizeof *s->slots)))
            return IDEM_ENOMEM;
        /* Made last-first, so the list (newest first) asks them in the
         * URL's order. */
        for (size_t i = url->nhosts; i-- > 0;) {
            const idem_url_host *h = &url->hosts[i];
            if (!(*first = node_get(s, h->host, h->port ? h->port : DEFAULT_PORT)))
                return IDEM_ENOMEM;
        }
        return IDEM_OK;
    }
    const char *db = idem_url_param_get(url, "db");
    if (db && (rc = parse_db(db, "the db parameter", &s->db)))
        return rc;
    const char *sp = idem_url_param_get(url, "sentinel_password");
    if (sp && !(s->sentinel_password = strdup(sp)))
        return IDEM_ENOMEM;
    if (!(s->master_name = strdup(url->path + 1)) ||
        !(s->sentinels = calloc(url->nhosts, sizeof *s->sentinels)))
        return IDEM_ENOMEM;
    for (size_t i = 0; i < url->nhosts; i++) {
        s->sentinels[i].port = url->hosts[i].port ? url->hosts[i].port : DEFAULT_SENTINEL_PORT;
        if (!(s->sentinels[i].host = strdup(url->hosts[i].host)))
            return IDEM_ENOMEM;
        s->nsentinels++;
    }
    *first = NULL;
    return IDEM_OK;
}

static int parse_url(store *s, const idem_url *url, node **first)
{
    if (strcmp(url->scheme, "redis+cluster") == 0 || strcmp(url->scheme, "redis+sentinel") == 0) {
        s->topo = url->scheme[6] == 'c' ? TOPO_CLUSTER : TOPO_SENTINEL;
        return parse_topology(s, url, first);
    }
    bool unix_socket = strcmp(url->scheme, "redis+unix") == 0;
    if (!unix_socket && strcmp(url->scheme, "redis") != 0)
        return idem_error_set(IDEM_EINVAL, "unknown redis URL scheme '%s'; use redis://, "
                              "redis+unix://, redis+cluster:// or redis+sentinel://", url->scheme);
    int rc = idem_url_check_params(url, url->scheme, unix_socket ? unix_params : tcp_params);
    if (rc == IDEM_OK)
        rc = parse_settings(s, url);
    if (rc)
        return rc;

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
        if (!(s->socket_path = strdup(url->path)))
            return IDEM_ENOMEM;
    } else {
        if (url->nhosts != 1)
            return idem_error_set(IDEM_EINVAL, "redis URLs name exactly one server: "
                                  "redis://host:port[/db]; for several, use "
                                  "redis+cluster://host:port,host:port or "
                                  "redis+sentinel://host:port,host:port/MASTERNAME");
        if (url->path && strcmp(url->path, "/") != 0 &&
            (rc = parse_db(url->path + 1, "the URL path", &s->db)))
            return rc;
    }
    if (url->user && !password)
        return idem_error_set(IDEM_EINVAL, "redis URL gives a user name but no password: "
                              "redis://user:PASSWORD@host:port");
    if (password && !(s->password = strdup(password)))
        return IDEM_ENOMEM;
    if (url->user && !(s->user = strdup(url->user)))
        return IDEM_ENOMEM;
    const idem_url_host *h = unix_socket ? NULL : &url->hosts[0];
    *first = node_get(s, h ? h->host : NULL, h ? (h->port ? h->port : DEFAULT_PORT) : 0);
    return *first ? IDEM_OK : IDEM_ENOMEM;
}

/* SCRIPT LOAD every script, pipelined, and keep the digests the server
 * returns. They are the SHA1 of each script, the same on every server; a
 * server whose cache lacks one answers NOSCRIPT and gets EVAL (op_run()). */
static int load_scripts_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    node *n = arg;
    store *s = n->s;
    const char *what = "loading the scripts";
    for (int i = 0; i < SC_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", script_src[i]};
        size_t argvlen[3] = {6, 4, strlen(script_src[i])};
        if (redisAppendCommandArgv(c->ctx, 3, argv, argvlen) != REDIS_OK) {
            *state = IDEM_CONN_BROKEN;
            return conn_error(s, n->where, c, what);
        }
    }
    int ret = IDEM_OK;
    uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    for (int i = 0; i < SC_COUNT; i++) {
        redisReply *r = conn_reply(c, deadline);
        if (!r) {
            *state = IDEM_CONN_BROKEN;
            return conn_error(s, n->where, c, what);
        }
        if (ret == IDEM_OK) {
            if (r->type == REDIS_REPLY_ERROR)
                ret = reply_error(n->where, r, what);
            else if (r->type != REDIS_REPLY_STRING || r->len != 40)
                ret = idem_driver_error(IDEM_EBACKEND, n->where, what, "SCRIPT LOAD gave an "
                                        "unexpected reply of type %d; is this a Redis server, "
                                        "version 2.6.12 or later?", r->type);
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
    pthread_mutex_init(&s->learn_mu, NULL);
    node *first = NULL;
    int rc = parse_url(s, url, &first);
    if (rc == IDEM_ENOMEM)
        idem_error_set(rc, "redis: out of memory");
    /* Connect now, so a wrong address or password fails here and not at
     * the first request; the connection stays in the pool. */
    if (rc == IDEM_OK && s->topo != TOPO_SINGLE)
        rc = learn(s, true, idem_mono_ms() + s->command_ms);
    if (rc == IDEM_OK && s->topo == TOPO_CLUSTER) {
        first = NULL;
        for (unsigned k = 0; k < CLUSTER_SLOTS && !first; k++)
            first = atomic_load(&s->slots[k]);
    }
    if (rc == IDEM_OK && s->topo == TOPO_SENTINEL)
        first = atomic_load(&s->master);
    if (rc == IDEM_OK) {
        atomic_store(&s->master, first);
        rc = idem_pool_run(first->pool, load_scripts_run, first);
    }
    if (rc) {
        store_free(s);
        return rc;
    }
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

/* A key that is taken by the string v: IDEM_OK, the record in *existing
 * and the time left on it in *remaining_ms. pttl is the key's PTTL: -1 for
 * no expiry (or no answer), -2 for a key gone since v was read. lease_ms is
 * the lease of the claim that found it, 0 for a read.
 *
 * The time left is the server's, whose clock is the one that frees the key.
 * A key with no expiry is not one this library wrote (its claims always
 * expire); there only the deadline in the record is left, written by the
 * holder's clock, which may run an hour fast: for a claim, that is never
 * counted for more than lease_ms, so that a duplicate is never told to wait
 * past a lease. */
static int taken_by(const redisReply *v, long long pttl, uint32_t lease_ms, void **existing,
                    size_t *existing_len, uint32_t *remaining_ms)
{
    int rc = idem_record_dup("redis", v->str, v->len, existing, existing_len);
    if (rc)
        return rc;
    idem_record_info info;
    if (pttl >= 0) {
        *remaining_ms = pttl >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)pttl;
    } else if (pttl == -2) {
        *remaining_ms = 0; /* freed meanwhile: nothing is left of it */
    } else if (lease_ms && idem_record_peek(v->str, v->len, &info) == IDEM_OK &&
               info.state == IDEM_STATE_STARTED) {
        uint64_t now = idem_now_ms(), cap = lease_ms < UINT32_MAX ? lease_ms : UINT32_MAX - 1;
        uint64_t left = info.deadline_ms > now ? info.deadline_ms - now : 0;
        *remaining_ms = (uint32_t)(left < cap ? left : cap);
    } else {
        *remaining_ms = UINT32_MAX; /* a read, or a COMPLETED record: the core reads the record */
    }
    return IDEM_OK;
}

static int foreign_type(const char *where, const char *what, const char *type)
{
    return idem_driver_error(IDEM_ECORRUPT, where, what, "the key holds a Redis %s, which "
                             "libidempotency did not write (its records are strings); delete it, "
                             "or give this layer a key_prefix of its own", type);
}

static int foreign_length(const store *s, const char *where, const char *what, long long len)
{
    return idem_driver_error(IDEM_ECORRUPT, where, what, "the key holds a %lld-byte string, "
                             "longer than any record of this store (max_record_bytes=%zu in the "
                             "store URL), so libidempotency did not write it and did not read it; "
                             "delete it, or give this layer a key_prefix of its own", len,
                             s->max_record);
}

/* A key that is taken, from the answer of the claim or read script:
 * IDEM_OK and the record in *existing, or IDEM_ECORRUPT for a value that
 * cannot be a record (another type, too long to read). */
static int taken(store *s, const char *where, enum script_id id, redisReply *r, uint32_t lease_ms,
                 void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 || r->elements > 3 ||
        (r->element[0]->type != REDIS_REPLY_STRING && r->element[0]->type != REDIS_REPLY_INTEGER) ||
        r->element[1]->type != REDIS_REPLY_INTEGER ||
        (r->elements == 3 && r->element[2]->type != REDIS_REPLY_STATUS &&
         r->element[2]->type != REDIS_REPLY_STRING))
        return unexpected(where, id, r);
    if (r->elements == 3)
        return foreign_type(where, script_what[id], r->element[2]->str);
    if (r->element[0]->type == REDIS_REPLY_INTEGER)
        return foreign_length(s, where, script_what[id], r->element[0]->integer);
    return taken_by(r->element[0], r->element[1]->integer, lease_ms, existing, existing_len,
                    remaining_ms);
}

/* Send a plain command about key, with PTTL key pipelined after it when
 * pttl is set, and a string reply longer than any record left unread
 * (o->too_long). IDEM_OK with the replies in o->reply and o->reply2, for the
 * caller to free; o->reply may be an error reply of the server's. */
static int plain_op(store *s, op *o, const void *key, size_t key_len, int argc, const char **argv,
                    size_t *lens, bool pttl, uint64_t deadline)
{
    const char *argv2[2] = {"PTTL", key};
    size_t lens2[2] = {4, key_len};
    *o = (op){.s = s, .id = SC_CLAIM, .plain = true, .argc = argc, .argv = argv, .lens = lens,
              .argv2 = pttl ? argv2 : NULL, .argc2 = 2, .lens2 = lens2, .cap = s->max_record,
              .wait = argc == 7 && s->wait_replicas > 0, .deadline = deadline};
    int rc = op_exec(s, o, key, key_len);
    o->argv2 = NULL; /* on this stack frame */
    if (rc) {
        freeReplyObject(o->reply2);
        o->reply2 = NULL;
    }
    return rc;
}

/* What the claim, or the read after a refused one, found under the key:
 * claimed (the value is this claim's record: a try whose reply was lost),
 * or the record of another in *existing, or IDEM_ECORRUPT for a value that
 * cannot be a record. r is a string, nil or an error reply. *gone: the
 * record of another was read, but the PTTL after it found the key gone. */
static int plain_found(store *s, const op *o, const void *key, size_t key_len, const void *record,
                       size_t record_len, uint32_t lease_ms, bool *claimed, bool *gone,
                       void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    const char *where = o->n->where, *what = script_what[SC_CLAIM];
    const redisReply *r = o->reply, *t = o->reply2;
    if (!r)
        return foreign_length(s, where, what, o->too_long);
    if (r->type == REDIS_REPLY_STRING) {
        if (r->len == record_len && memcmp(r->str, record, record_len) == 0) {
            *claimed = true;
            return IDEM_OK;
        }
        long long pttl = t && t->type == REDIS_REPLY_INTEGER ? t->integer : -1;
        *gone = pttl == -2;
        return taken_by(r, pttl, lease_ms, existing, existing_len, remaining_ms);
    }
    if (r->type == REDIS_REPLY_ERROR && !reply_is(r, "WRONGTYPE"))
        return reply_error(where, r, what);
    if (r->type != REDIS_REPLY_ERROR)
        return idem_driver_error(IDEM_EBACKEND, where, what, "unexpected reply of type %d to "
                                 "%s; is this a Redis server (or a proxy that rewrites replies)?",
                                 r->type, o->argv[0]);
    /* A hash, a list...: which one, for the message. */
    const char *argv[2] = {"TYPE", key};
    size_t lens[2] = {4, key_len};
    op ty;
    int rc = plain_op(s, &ty, key, key_len, 2, argv, lens, false, o->deadline);
    const redisReply *t2 = ty.reply;
    if (rc == IDEM_OK && t2 && t2->type == REDIS_REPLY_ERROR)
        rc = reply_error(where, t2, what);
    else if (rc == IDEM_OK && t2 && t2->type == REDIS_REPLY_STATUS && strcmp(t2->str, "none") != 0 &&
             strcmp(t2->str, "string") != 0)
        rc = foreign_type(where, what, t2->str);
    else if (rc == IDEM_OK) /* gone or replaced since: nothing ran, a retry claims it */
        rc = idem_driver_error(IDEM_EBACKEND, where, what, "the key changed while it was being "
                               "claimed; nothing ran: retry");
    freeReplyObject(ty.reply);
    return rc;
}

/* The server refused a write but may serve reads: at maxmemory, after a
 * failed save, as a replica, short of replicas (min-replicas-to-write). */
static bool refused_write(const redisReply *r)
{
    return reply_is(r, "OOM") || reply_is(r, "MISCONF") || reply_is(r, "READONLY") ||
           reply_is(r, "NOREPLICAS");
}

/* The claim as plain commands, one round trip: SET key record NX PX lease
 * GET sets the key when it is free (nil) or leaves it and answers the
 * string there, and PTTL key gives the time left on whatever is there.
 * A server that refuses the write (OOM at maxmemory, MISCONF) may still
 * hold the record a replay needs: it is read (GET, PTTL), and the refusal
 * is the answer only when nothing is there. 1: this server does not take
 * NX with GET (before 7.0): claim with the script. The two commands are
 * not atomic: a key whose lease ends (or whose holder frees it) between
 * them has its record read and PTTL -2, *gone. */
static int claim_plain(store *s, const void *key, size_t key_len, const void *record,
                       size_t record_len, uint32_t lease_ms, bool *claimed, bool *gone,
                       void **existing, size_t *existing_len, uint32_t *remaining_ms, op_result *res)
{
    char lease[24];
    size_t lease_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    const char *argv[7] = {"SET", key, record, "NX", "PX", lease, "GET"};
    size_t lens[7] = {3, key_len, record_len, 2, 2, lease_len, 3};
    op o;
    int rc = plain_op(s, &o, key, key_len, 7, argv, lens, true, 0);
    res->where = o.n ? o.n->where : "redis";
    res->maybe_ran = o.maybe_ran;
    res->acked = o.acked;
    if (rc)
        return rc;
    redisReply *r = o.reply;
    if (r && r->type == REDIS_REPLY_NIL) {
        *claimed = true;
    } else if (r && r->type == REDIS_REPLY_ERROR && strcmp(r->str, "ERR syntax error") == 0) {
        atomic_store(&s->claim_script, true);
        rc = 1;
    } else if (r && r->type == REDIS_REPLY_ERROR && !reply_is(r, "WRONGTYPE")) {
        if (!refused_write(r)) {
            rc = reply_error(res->where, r, script_what[SC_CLAIM]);
        } else {
            const char *gargv[2] = {"GET", key};
            size_t glens[2] = {3, key_len};
            op g;
            rc = plain_op(s, &g, key, key_len, 2, gargv, glens, true, o.deadline);
            if (rc == IDEM_OK && g.reply && g.reply->type == REDIS_REPLY_NIL)
                rc = reply_error(res->where, r, script_what[SC_CLAIM]);
            else if (rc == IDEM_OK)
                rc = plain_found(s, &g, key, key_len, record, record_len, lease_ms, claimed, gone,
                                 existing, existing_len, remaining_ms);
            freeReplyObject(g.reply);
            freeReplyObject(g.reply2);
        }
    } else {
        rc = plain_found(s, &o, key, key_len, record, record_len, lease_ms, claimed, gone, existing,
                         existing_len, remaining_ms);
    }
    freeReplyObject(o.reply);
    freeReplyObject(o.reply2);
    return rc;
}

/* The claim as a script (a server before 7.0): the same answers. */
static int claim_script(store *s, const void *key, size_t key_len, const void *record,
                        size_t record_len, uint32_t lease_ms, bool *claimed, void **existing,
                        size_t *existing_len, uint32_t *remaining_ms, op_result *res)
{
    char lease[24], max[24];
    size_t lease_len, max_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    format_ms(max, sizeof max, s->max_record, &max_len);
    const char *args[3] = {record, lease, max};
    size_t lens[3] = {record_len, lease_len, max_len};
    redisReply *r;
    int rc = run_script(s, SC_CLAIM, key, key_len, 3, args, lens, &r, res);
    if (rc)
        return rc;
    *claimed = r->type == REDIS_REPLY_INTEGER && r->integer == 0;
    /* Our own record: a claim retried after its reply was lost. */
    if (!*claimed && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[0]->len == record_len &&
        memcmp(r->element[0]->str, record, record_len) == 0)
        *claimed = true;
    if (!*claimed)
        rc = taken(s, res->where, SC_CLAIM, r, lease_ms, existing, existing_len, remaining_ms);
    freeReplyObject(r);
    return rc;
}

/* How many times a claim is sent while the key it finds is gone by the
 * time its PTTL runs (claim_plain()). */
#define CLAIM_TRIES 3

static int rd_claim(void *state, const void *key, size_t key_len, const void *record,
                    size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                    uint32_t *remaining_ms)
{
    store *s = state;
    bool claimed;
    op_result res;
    int rc;
    for (int tries = 1;; tries++) {
        *existing = NULL;
        *existing_len = 0;
        claimed = false;
        res = (op_result){.where = "redis", .acked = -1};
        bool gone = false;
        rc = 1;
        if (!atomic_load(&s->claim_script))
            rc = claim_plain(s, key, key_len, record, record_len, lease_ms, &claimed, &gone, existing,
                             existing_len, remaining_ms, &res);
        if (rc == 1)
            rc = claim_script(s, key, key_len, record, record_len, lease_ms, &claimed, existing,
                              existing_len, remaining_ms, &res);
        /* The record found was freed before its PTTL ran: by the server's
         * clock, the one that counts, the key is free, so claim it again
         * rather than answer with a time left that only the deadline in
         * that record (the holder's clock) could give. A few times, for a
         * key that keeps changing hands; then the record is answered as
         * having no time left, and the duplicate comes back at once. */
        if (rc == IDEM_OK && gone && tries < CLAIM_TRIES) {
            free(*existing);
            continue;
        }
        break;
    }
    if (rc)
        return rc;
    if (claimed && s->wait_replicas && res.acked < (long long)s->wait_replicas) {
        /* Not on enough replicas: a failover now could lose the claim and
         * let a duplicate run. Give it up; nothing runs. */
        const char *rargs[1] = {(const char *)record + IDEM_RECORD_TOKEN_OFFSET};
        size_t rlens[1] = {IDEM_TOKEN_LEN};
        long long got = res.acked < 0 ? 0 : res.acked;
        int rel = run_fenced(s, SC_RELEASE, key, key_len, 1, rargs, rlens, 1);
        return idem_driver_error(IDEM_EBACKEND, res.where, "claiming a key", "%lld of the %u replicas "
                                 "asked for (wait_replicas) acknowledged the claim within %u ms "
                                 "(wait_timeout_ms); %s and nothing ran; are the replicas up and "
                                 "connected?", got, s->wait_replicas, s->wait_timeout_ms,
                                 rel == IDEM_OK ? "the key was given up"
                                                : "the key could not be given up (it frees itself "
                                                  "when its lease ends)");
    }
    return rc;
}

/* Run twice (a retry after a lost reply), commit finds its own COMPLETED
 * record and answers OK, as backend.h asks. With wait_replicas, a commit
 * that too few replicas acknowledged is still IDEM_OK: the response is
 * stored on the master, and the handler's effect has happened. It is
 * counted, and the settings check reports the count. */
static int rd_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms)
{
    char ttl[24];
    size_t ttl_len;
    format_ms(ttl, sizeof ttl, ttl_ms, &ttl_len);
    const char *args[3] = {(const char *)token, record, ttl};
    size_t lens[3] = {IDEM_TOKEN_LEN, record_len, ttl_len};
    return run_fenced(state, SC_COMMIT, key, key_len, 3, args, lens, 2);
}

/* Run twice (a retry after the server ran it and closed the connection),
 * the second run finds the key gone: IDEM_OK, the key was freed. */
static int rd_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    const char *args[1] = {(const char *)token};
    size_t lens[1] = {IDEM_TOKEN_LEN};
    return run_fenced(state, SC_RELEASE, key, key_len, 1, args, lens, 1);
}

/* Run twice, the record is still our STARTED one: the same result. */
static int rd_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms)
{
    char lease[24];
    size_t lease_len;
    format_ms(lease, sizeof lease, lease_ms, &lease_len);
    const char *args[3] = {(const char *)token, record, lease};
    size_t lens[3] = {IDEM_TOKEN_LEN, record_len, lease_len};
    return run_fenced(state, SC_EXTEND, key, key_len, 3, args, lens, 1);
}

static int rd_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                   uint32_t *remaining_ms)
{
    store *s = state;
    char max[24];
    size_t max_len;
    format_ms(max, sizeof max, s->max_record, &max_len);
    const char *args[1] = {max};
    size_t lens[1] = {max_len};
    *record = NULL;
    *record_len = 0;
    *remaining_ms = UINT32_MAX;
    redisReply *r;
    op_result res;
    int rc = run_script(s, SC_READ, key, key_len, 1, args, lens, &r, &res);
    if (rc)
        return rc;
    if (!(r->type == REDIS_REPLY_INTEGER && r->integer == 0))
        rc = taken(s, res.where, SC_READ, r, 0, record, record_len, remaining_ms);
    freeReplyObject(r);
    return rc;
}

static int rd_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    store *s = state;
    const char *argv[2] = {"DEL", key};
    size_t lens[2] = {3, key_len};
    op o = {.s = s, .id = -1, .plain = true, .argc = 2, .argv = argv, .lens = lens};
    int rc = op_exec(s, &o, key, key_len);
    if (rc)
        return rc;
    if (o.reply->type == REDIS_REPLY_INTEGER)
        *deleted = o.reply->integer > 0;
    else
        rc = idem_driver_error(IDEM_EBACKEND, o.n->where, "removing a key", "DEL gave an "
                               "unexpected reply of type %d", o.reply->type);
    freeReplyObject(o.reply);
    return rc;
}

/* ---- list (an operator's walk over the keys) ---- */

#define LIST_BATCH "500"   /* SCAN's COUNT: keys a server looks at per step */

typedef struct list_arg {
    store        *s;
    node         *n;
    const char   *pattern;  /* the prefix with its glob characters escaped, then '*' */
    size_t        pattern_len;
    idem_list_fn  fn;
    void         *arg;
    bool          stopped;
} list_arg;

/* GET and PTTL of every key of a SCAN batch, pipelined; fn for each one
 * that is still there. */
static int list_batch(list_arg *a, conn *c, const redisReply *keys, uint64_t deadline)
{
    const char *what = "listing keys";
    for (size_t i = 0; i < keys->elements; i++) {
        const redisReply *k = keys->element[i];
        if (k->type != REDIS_REPLY_STRING ||
            redisAppendCommand(c->ctx, "GET %b", k->str, k->len) != REDIS_OK ||
            redisAppendCommand(c->ctx, "PTTL %b", k->str, k->len) != REDIS_OK)
            return conn_error(a->s, a->n->where, c, what);
    }
    if (!conn_flush(c, deadline))
        return conn_error(a->s, a->n->where, c, what);
    int rc = IDEM_OK;
    for (size_t i = 0; i < keys->elements; i++) {
        redisReply *v = conn_read_reply(c, deadline);
        redisReply *t = v ? conn_read_reply(c, deadline) : NULL;
        if (!t) {
            freeReplyObject(v);
            return conn_error(a->s, a->n->where, c, what);
        }
        /* Gone since the SCAN: not listed. Another type than a string:
         * listed with no bytes (not a record of this library). */
        bool gone = v->type == REDIS_REPLY_NIL || (t->type == REDIS_REPLY_INTEGER && t->integer == -2);
        if (rc == IDEM_OK && !a->stopped && !gone) {
            uint32_t left = t->type != REDIS_REPLY_INTEGER || t->integer < 0 ? UINT32_MAX
                          : t->integer >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)t->integer;
            bool string = v->type == REDIS_REPLY_STRING;
            a->stopped = a->fn(a->arg, keys->element[i]->str, keys->element[i]->len,
                               string ? v->str : "", string ? v->len : 0, left) != 0;
        }
        freeReplyObject(v);
        freeReplyObject(t);
    }
    return rc;
}

/* SCAN one server to its end (idem_pool_fn). A failure is never STALE: fn
 * may have been called, and a retry would start the walk again. */
static int list_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    list_arg *a = arg;
    char cursor[32] = "0";
    do {
        uint64_t deadline = idem_mono_ms() + a->s->command_ms;
        const char *argv[6] = {"SCAN", cursor, "MATCH", a->pattern, "COUNT", LIST_BATCH};
        size_t lens[6] = {4, strlen(cursor), 5, a->pattern_len, 5, strlen(LIST_BATCH)};
        redisReply *r = conn_command(c, deadline, 6, argv, lens);
        if (!r) {
            *state = IDEM_CONN_BROKEN;
            return conn_error(a->s, a->n->where, c, "listing keys");
        }
        if (r->type == REDIS_REPLY_ERROR) {
            int rc = reply_error(a->n->where, r, "listing keys");
            freeReplyObject(r);
            return rc;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
            r->element[0]->len >= sizeof cursor || r->element[1]->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(r);
            *state = IDEM_CONN_BROKEN;
            return idem_driver_error(IDEM_EBACKEND, a->n->where, "listing keys",
                                     "SCAN gave an unexpected reply");
        }
        memcpy(cursor, r->element[0]->str, r->element[0]->len + 1);
        int rc = r->element[1]->elements ? list_batch(a, c, r->element[1], deadline) : IDEM_OK;
        freeReplyObject(r);
        if (rc) {
            *state = IDEM_CONN_BROKEN;
            return rc;
        }
    } while (!a->stopped && strcmp(cursor, "0") != 0);
    return IDEM_OK;
}

/* The servers that hold keys: the master, or every master of a cluster. */
static int list_masters(store *s, node ***out, size_t *count)
{
    *out = NULL;
    *count = 0;
    if (s->topo != TOPO_CLUSTER) {
        if (!(*out = malloc(sizeof **out)))
            return idem_error_set(IDEM_ENOMEM, "redis: out of memory listing keys");
        (*out)[(*count)++] = atomic_load(&s->master); /* set at open, as check relies on */
        return IDEM_OK;
    }
    for (unsigned slot = 0; slot < CLUSTER_SLOTS; slot++)
        if (!atomic_load(&s->slots[slot])) {
            int rc = learn(s, true, idem_mono_ms() + s->command_ms);
            if (rc)
                return rc;
            break;
        }
    node **list = NULL;
    size_t n = 0, cap = 0;
    for (unsigned slot = 0; slot < CLUSTER_SLOTS; slot++) {
        node *m = atomic_load(&s->slots[slot]);
        if (!m) {
            free(list);
            return idem_error_set(IDEM_EBACKEND, "redis cluster: no master serves slot %u; every "
                                  "slot must be served to list keys: retry when the cluster is whole",
                                  slot);
        }
        size_t i = 0;
        while (i < n && list[i] != m)
            i++;
        if (i < n)
            continue;
        if (n == cap) {
            node **grown = realloc(list, (cap = cap ? cap * 2 : 8) * sizeof *list);
            if (!grown) {
                free(list);
                return idem_error_set(IDEM_ENOMEM, "redis: out of memory listing keys");
            }
            list = grown;
        }
        list[n++] = m;
    }
    *out = list;
    *count = n;
    return IDEM_OK;
}

static int rd_list(void *state, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg)
{
    store *s = state;
    /* MATCH takes a glob: the prefix's own *, ?, [, ] and \ are escaped. */
    char *pattern = malloc(prefix_len * 2 + 2);
    if (!pattern)
        return idem_error_set(IDEM_ENOMEM, "redis: out of memory listing keys");
    size_t len = 0;
    for (size_t i = 0; i < prefix_len; i++) {
        char ch = ((const char *)prefix)[i];
        if (strchr("*?[]\\", ch) && ch != '\0')
            pattern[len++] = '\\';
        pattern[len++] = ch;
    }
    pattern[len++] = '*';
    pattern[len] = '\0';
    node **masters;
    size_t count;
    int rc = list_masters(s, &masters, &count);
    list_arg a = {.s = s, .pattern = pattern, .pattern_len = len, .fn = fn, .arg = arg};
    for (size_t i = 0; rc == IDEM_OK && i < count && !a.stopped; i++) {
        a.n = masters[i];
        rc = idem_pool_run(a.n->pool, list_run, &a);
    }
    free(masters);
    free(pattern);
    return rc;
}

static size_t rd_max_record_len(void *state)
{
    return ((store *)state)->max_record;
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
    .read = rd_read,
    .remove = rd_remove,
    .check = rd_check,
    .list = rd_list,
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

/* What rd_check() asks the master, in one use of a pooled connection. */
typedef struct rd_check_ctx {
    store *s;
    node  *n;
    char   policy[64], maxmem[32], aof[16], fsync[16], save[128];
    bool   have_policy, have_maxmem, have_aof, have_fsync, have_save;
    char   role[32], master[96], port[16], nrep[16];
} rd_check_ctx;

static int rd_check_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    rd_check_ctx *k = arg;
    bool io = false;
    *state = IDEM_CONN_OK;
    k->have_policy = rd_config_get(c->ctx, "maxmemory-policy", k->policy, sizeof k->policy, &io);
    k->have_maxmem = !io && rd_config_get(c->ctx, "maxmemory", k->maxmem, sizeof k->maxmem, &io);
    k->have_aof = !io && rd_config_get(c->ctx, "appendonly", k->aof, sizeof k->aof, &io);
    k->have_fsync = !io && rd_config_get(c->ctx, "appendfsync", k->fsync, sizeof k->fsync, &io);
    k->have_save = !io && rd_config_get(c->ctx, "save", k->save, sizeof k->save, &io);
    redisReply *info = io ? NULL : redisCommand(c->ctx, "INFO replication");
    if (!info) {
        *state = !c->timed_out && peer_went_away(c->ctx) ? IDEM_CONN_STALE : IDEM_CONN_BROKEN;
        return conn_error(k->s, k->n->where, c, "reading the server's settings");
    }
    rd_info_field(info, "role", k->role, sizeof k->role);
    rd_info_field(info, "master_host", k->master, sizeof k->master);
    rd_info_field(info, "master_port", k->port, sizeof k->port);
    rd_info_field(info, "connected_slaves", k->nrep, sizeof k->nrep);
    freeReplyObject(info);
    return IDEM_OK;
}

static int rd_check(void *state, idem_findings *out)
{
    store *s = state;
    rd_check_ctx k = {.s = s, .n = atomic_load(&s->master)};
    int rc = idem_pool_run(k.n->pool, rd_check_run, &k);
    if (rc)
        return rc;
    const char *policy = k.policy, *maxmem = k.maxmem, *aof = k.aof, *fsync = k.fsync, *save = k.save;
    const char *role = k.role, *master = k.master, *port = k.port, *nrep = k.nrep;
    bool have_policy = k.have_policy, have_maxmem = k.have_maxmem, have_aof = k.have_aof,
         have_fsync = k.have_fsync, have_save = k.have_save;

    rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "%s: each claim is one atomic SET NX on the "
                           "server, and each commit, abort and extend one atomic script fenced by the "
                           "claim's token; leases and TTLs run on the server's clock", k.n->where);
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
    else if (rc == IDEM_OK && role[0] && s->wait_replicas)
        rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "role %s with %s replica%s; every claim and "
                               "commit waits for %u of them (WAIT, up to %u ms), so a failover to one "
                               "of those keeps it", role, nrep[0] ? nrep : "0",
                               strcmp(nrep, "1") == 0 ? "" : "s", s->wait_replicas, s->wait_timeout_ms);
    else if (rc == IDEM_OK && role[0])
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "role %s with %s replica%s: replication is "
                               "asynchronous, so a failover can lose the last claims and responses",
                               role, nrep[0] ? nrep : "0", strcmp(nrep, "1") == 0 ? "" : "s");
    unsigned long long unacked = atomic_load_explicit(&s->commits_unacked, memory_order_relaxed);
    if (rc == IDEM_OK && unacked)
        rc = idem_findings_add(out, IDEM_FINDING_WARNING, "%llu commit%s through this store %s "
                               "acknowledged by fewer than %u replica%s within wait_timeout_ms (%u ms), "
                               "since it was opened: their responses "
                               "are stored on the master, but a failover before a replica catches up "
                               "loses them, and their retries run again; see that the replicas are "
                               "connected and keeping up (INFO replication), or raise wait_timeout_ms",
                               unacked, unacked == 1 ? "" : "s", unacked == 1 ? "was" : "were",
                               s->wait_replicas,
                               s->wait_replicas == 1 ? "" : "s", s->wait_timeout_ms);
    return rc;
}
