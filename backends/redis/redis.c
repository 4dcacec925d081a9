/*
 * Redis driver over hiredis:
 *   redis://[[user]:password@]host[:port][/db][?PARAMS]
 *   redis+unix:///path/to/redis.sock[?db=N&password=...&PARAMS]
 *   redis+cluster://[[user]:password@]host:port[,host:port...][?PARAMS]
 *   redis+sentinel://[[user]:password@]host:port[,...]/MASTERNAME[?db=N&sentinel_password=...&PARAMS]
 * PARAMS: connect_timeout_ms, timeout_ms, max_record_bytes, wait_replicas,
 * wait_timeout_ms (backends/redis/README.md).
 *
 * This file holds the scripts, the operations (claim, commit, release,
 * extend, read, remove) and the driver's table, idem__redis_backend. The
 * rest of the driver, a layer a file, shares redis_int.h with it:
 *   conn.c   connections, commands bounded by a deadline, nodes and pools
 *   route.c  where an operation goes: cluster slots, sentinels, redirects
 *   open.c   the URL, opening and closing a store
 *   check.c  the settings check
 *
 * Every server is a node with its own connection pool (idem_pool). One
 * server: all operations go to it. Cluster: to the master of the key's
 * slot, from CLUSTER SLOTS, following MOVED/ASK/TRYAGAIN/CLUSTERDOWN
 * (idem__redis_op_exec()). Sentinel: to the master the sentinels name,
 * checked with ROLE and resolved again after a failure or READONLY.
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
 */
#include "redis_int.h"

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

const char *const idem__redis_script_src[SC_COUNT] = {
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

const char *const idem__redis_script_what[SC_COUNT] = {
    [SC_CLAIM] = "claiming a key",
    [SC_COMMIT] = "storing a response",
    [SC_RELEASE] = "freeing a key",
    [SC_EXTEND] = "extending a lease",
    [SC_READ] = "reading a record",
};

/* ---- one script, sent where its key lives ---- */

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
    int rc = idem__redis_op_exec(s, &o, key, key_len);
    res->where = o.n ? o.n->where : "redis";
    res->maybe_ran = o.maybe_ran;
    res->acked = o.acked;
    if (rc == IDEM_OK)
        *out = o.reply;
    return rc;
}

static int unexpected(const char *where, enum script_id id, const redisReply *r)
{
    return idem_driver_error(IDEM_EBACKEND, where, idem__redis_script_what[id], "unexpected reply "
                             "of type %d from the script; is this a Redis server (or a proxy "
                             "that rewrites replies)?", r->type);
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
        return foreign_type(where, idem__redis_script_what[id], r->element[2]->str);
    if (r->element[0]->type == REDIS_REPLY_INTEGER)
        return foreign_length(s, where, idem__redis_script_what[id], r->element[0]->integer);
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
    int rc = idem__redis_op_exec(s, o, key, key_len);
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
    const char *where = o->n->where, *what = idem__redis_script_what[SC_CLAIM];
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
        return idem__redis_reply_error(where, r, what);
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
        rc = idem__redis_reply_error(where, t2, what);
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
            rc = idem__redis_reply_error(res->where, r, idem__redis_script_what[SC_CLAIM]);
        } else {
            const char *gargv[2] = {"GET", key};
            size_t glens[2] = {3, key_len};
            op g;
            rc = plain_op(s, &g, key, key_len, 2, gargv, glens, true, o.deadline);
            if (rc == IDEM_OK && g.reply && g.reply->type == REDIS_REPLY_NIL)
                rc = idem__redis_reply_error(res->where, r, idem__redis_script_what[SC_CLAIM]);
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
    int rc = idem__redis_op_exec(s, &o, key, key_len);
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
            return idem__redis_conn_error(a->s, a->n->where, c, what);
    }
    int rc = IDEM_OK;
    for (size_t i = 0; i < keys->elements; i++) {
        redisReply *v = idem__redis_conn_reply(c, deadline);
        redisReply *t = v ? idem__redis_conn_reply(c, deadline) : NULL;
        if (!t) {
            freeReplyObject(v);
            return idem__redis_conn_error(a->s, a->n->where, c, what);
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
        redisReply *r = idem__redis_conn_command(c, deadline, 6, argv, lens);
        if (!r) {
            *state = IDEM_CONN_BROKEN;
            return idem__redis_conn_error(a->s, a->n->where, c, "listing keys");
        }
        if (r->type == REDIS_REPLY_ERROR) {
            int rc = idem__redis_reply_error(a->n->where, r, "listing keys");
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
            int rc = idem__redis_learn(s, true, idem_mono_ms() + s->command_ms);
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

const idem_backend idem__redis_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "redis",
    .open = idem__redis_open,
    .close = idem__redis_close,
    .claim = rd_claim,
    .commit = rd_commit,
    .release = rd_release,
    .extend = rd_extend,
    .max_record_len = rd_max_record_len,
    .read = rd_read,
    .remove = rd_remove,
    .check = idem__redis_check,
    .list = rd_list,
};
