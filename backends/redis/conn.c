/*
 * The Redis driver's connections: the messages for a failed connection or
 * an error reply, one command bounded as a whole by a deadline, opening a
 * connection (AUTH, SELECT, and ROLE under sentinels, pipelined), the
 * nodes and their pools, and one use of a pooled connection for an
 * operation (idem__redis_op_run(): NOSCRIPT answered with EVAL, WAIT after
 * a write, a connection the server closed reported stale so that the pool
 * tries a new one). Relies on redis.c for the scripts' sources and on the
 * core's idem_pool.
 *
 * timeout_ms bounds an operation's command and its whole reply: hiredis
 * bounds each read by the socket's timeout, so the driver runs the reads
 * itself and shortens that timeout to the time left
 * (idem__redis_conn_reply()). The core's deadline for the call, when
 * sooner, bounds it instead (idem_call_timeout_ms()).
 *
 * A hiredis context is not thread-safe, so each node keeps a pool of them.
 * A context that saw an I/O error, a timeout or EOF is freed, never pooled
 * again, and the idle ones are dropped with it (they talk to the same
 * server, which most likely went away).
 */
#include "redis_int.h"

/* ---- messages ---- */

static bool errstr_is(const redisContext *c, int errnum)
{
    return strcmp(c->errstr, strerror(errnum)) == 0;
}

/* The connection died (closed or reset) rather than timed out: a fresh
 * connection may work at once. */
bool idem__redis_peer_went_away(const redisContext *c)
{
    return c->err == REDIS_ERR_EOF ||
           (c->err == REDIS_ERR_IO && (errstr_is(c, ECONNRESET) || errstr_is(c, EPIPE)));
}

/* Describe a failed context: IDEM_EBACKEND with a message. timed_out and
 * partial: the command ran out of time, after part of its reply came. */
int idem__redis_context_error_at(const store *s, const char *where, const redisContext *c,
                                 bool timed_out, bool partial, const char *what)
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

int idem__redis_conn_error(const store *s, const char *where, const conn *c, const char *what)
{
    return idem__redis_context_error_at(s, where, c->ctx, c->timed_out, c->partial, what);
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
int idem__redis_reply_error(const char *where, const redisReply *r, const char *what)
{
    const char *msg = r->str ? r->str : "";
    int n = (int)strlen(msg);
    if (n > 0 && msg[n - 1] == '.') /* "NOAUTH Authentication required." */
        n--;
    return idem_driver_error(IDEM_EBACKEND, where, what, "the server answered: %.*s%s", n, msg,
                             reply_hint(msg));
}

/* ---- one command, bounded as a whole ---- */

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

redisReply *idem__redis_conn_reply(conn *c, uint64_t deadline)
{
    return conn_flush(c, deadline) ? conn_read_reply(c, deadline) : NULL;
}

redisReply *idem__redis_conn_command(conn *c, uint64_t deadline, int argc, const char **argv,
                                     const size_t *lens)
{
    if (redisAppendCommandArgv(c->ctx, argc, argv, lens) != REDIS_OK)
        return NULL;
    return idem__redis_conn_reply(c, deadline);
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
int idem__redis_auth_refused(const char *where, const redisReply *r, const char *what)
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
            return idem__redis_context_error_at(s, where, ctx, false, false, "authenticating");
        sent[n++] = AUTH;
    }
    if (s->db) {
        if (redisAppendCommand(ctx, "SELECT %lu", s->db) != REDIS_OK)
            return idem__redis_context_error_at(s, where, ctx, false, false, "selecting the database");
        sent[n++] = SELECT;
    }
    if (s->topo == TOPO_SENTINEL) {
        if (redisAppendCommand(ctx, "ROLE") != REDIS_OK)
            return idem__redis_context_error_at(s, where, ctx, false, false, "checking the role");
        sent[n++] = ROLE;
    }
    int ret = IDEM_OK;
    uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    for (int i = 0; i < n; i++) {
        const char *what = sent[i] == AUTH ? "authenticating"
                         : sent[i] == SELECT ? "selecting the database" : "checking the role";
        redisReply *r = idem__redis_conn_reply(c, deadline);
        if (!r)
            return idem__redis_conn_error(s, where, c, what);
        if (ret == IDEM_OK && r->type == REDIS_REPLY_ERROR)
            ret = sent[i] == AUTH ? idem__redis_auth_refused(where, r, what)
                : sent[i] == SELECT
                    ? idem_driver_error(IDEM_EBACKEND, where, what, "SELECT %lu failed (%s); the "
                                        "URL's database number must be below the server's "
                                        "`databases` setting", s->db, r->str ? r->str : "")
                    : idem__redis_reply_error(where, r, what);
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
        rc = idem__redis_context_error_at(s, n->where, c->ctx, false, false, "connecting");
        conn_free(c);
        return rc;
    }
    if (redisSetTimeout(c->ctx, tv_ms(s->command_ms)) != REDIS_OK) {
        rc = idem__redis_context_error_at(s, n->where, c->ctx, false, false,
                                          "setting the command timeout");
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

void idem__redis_node_free(node *n)
{
    if (n->pool)
        idem_pool_free(n->pool);
    free(n->host);
    free(n->where);
    free(n);
}

/* The node for host:port (host NULL: the store's unix socket), made on
 * first use. NULL with a message when out of memory. */
node *idem__redis_node_get(store *s, const char *host, int port)
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
            idem__redis_node_free(n);
        idem_error_set(IDEM_ENOMEM, "redis %s:%d: out of memory", host ? host : "", port);
        return NULL;
    }
    n->next = s->nodes;
    s->nodes = n;
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ---- one operation ---- */

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

int idem__redis_op_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    op *o = arg;
    store *s = o->s;
    const char *what = o->id >= 0 ? idem__redis_script_what[o->id] : "removing a key";
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
        o->argv[1] = idem__redis_script_src[o->id];
        o->lens[1] = strlen(idem__redis_script_src[o->id]);
        r = op_send(o, c);
        o->argv[0] = argv0, o->argv[1] = argv1;
        o->lens[0] = len0, o->lens[1] = len1;
    }
    if (!r) {
        *state = !c->timed_out && idem__redis_peer_went_away(c->ctx) ? IDEM_CONN_STALE : IDEM_CONN_BROKEN;
        int rc = idem__redis_conn_error(s, o->n->where, c, what);
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
        redisReply *w = idem__redis_conn_command(c, deadline, 3, argv, lens);
        if (!w) {
            freeReplyObject(r);
            freeReplyObject(o->reply2);
            o->reply2 = NULL;
            *state = IDEM_CONN_BROKEN;
            o->maybe_ran = true;
            return idem__redis_conn_error(s, o->n->where, c, "waiting for replicas (WAIT)");
        }
        o->acked = w->type == REDIS_REPLY_INTEGER ? w->integer : -1;
        freeReplyObject(w);
    }
    o->reply = r;
    return IDEM_OK;
}
