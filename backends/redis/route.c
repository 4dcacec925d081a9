/*
 * Where the Redis driver sends an operation: the master of the key's slot
 * in a Redis Cluster (CRC16 slots, the map from CLUSTER SLOTS, MOVED, ASK,
 * TRYAGAIN, CLUSTERDOWN), the master the sentinels name (SENTINEL
 * get-master-addr-by-name, checked with ROLE, asked again after READONLY),
 * or the one server of redis:// (idem__redis_op_exec()). Relies on conn.c
 * for the nodes, their pools and one use of a connection
 * (idem__redis_op_run()).
 */
#include "redis_int.h"

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
    return idem__redis_node_get(s, hlen ? host : said->host, port);
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
    redisReply *r = idem__redis_conn_command(c, ((ask_arg *)arg)->deadline, 2, argv, lens);
    if (!r) {
        *state = IDEM_CONN_BROKEN;
        return idem__redis_conn_error(s, n->where, c, what);
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
            node *m = idem__redis_node_get(s, ip->len && strcmp(ip->str, "?") != 0 ? ip->str : n->host,
                                           port);
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
        rc = idem__redis_context_error_at(s, where, c.ctx, false, false, "connecting");
        goto done;
    }
    c.socket_ms = 0;
    if (s->sentinel_password) {
        const char *argv[2] = {"AUTH", s->sentinel_password};
        size_t lens[2] = {4, strlen(s->sentinel_password)};
        redisReply *a = idem__redis_conn_command(&c, deadline, 2, argv, lens);
        if (!a) {
            rc = idem__redis_conn_error(s, where, &c, "authenticating");
            goto done;
        }
        if (a->type == REDIS_REPLY_ERROR)
            rc = idem__redis_auth_refused(where, a, "authenticating");
        freeReplyObject(a);
        if (rc)
            goto done;
    }
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", s->master_name};
    size_t lens[3] = {8, 23, strlen(s->master_name)};
    redisReply *r = idem__redis_conn_command(&c, deadline, 3, argv, lens);
    if (!r) {
        rc = idem__redis_conn_error(s, where, &c, what);
        goto done;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING) {
        *out = idem__redis_node_get(s, r->element[0]->str, atoi(r->element[1]->str));
        if (!*out)
            rc = IDEM_ENOMEM;
    } else if (r->type == REDIS_REPLY_ERROR) {
        rc = idem__redis_reply_error(where, r, what);
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
    redisReply *r = idem__redis_conn_command(c, ((ask_arg *)arg)->deadline, 1, argv, lens);
    if (!r) {
        *state = IDEM_CONN_BROKEN;
        return idem__redis_conn_error(n->s, n->where, c, "checking the role");
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
int idem__redis_learn(store *s, bool force, uint64_t deadline)
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
int idem__redis_op_exec(store *s, op *o, const void *key, size_t key_len)
{
    if (!o->deadline) /* else the deadline of the operation this one continues */
        o->deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    o->acked = -1;
    unsigned slot = s->topo == TOPO_CLUSTER ? key_slot(key, key_len) : 0;
    const char *what = o->id >= 0 ? idem__redis_script_what[o->id] : "removing a key";
    node *ask = NULL;
    if (s->topo != TOPO_SINGLE && atomic_load(&s->unsure))
        (void)idem__redis_learn(s, false, o->deadline);
    for (int hop = 0;; hop++) {
        bool last = hop + 1 >= MAX_HOPS || idem_mono_ms() >= o->deadline;
        node *n = ask ? ask : route(s, slot);
        if (!n && s->topo != TOPO_SINGLE && idem__redis_learn(s, false, o->deadline) == IDEM_OK)
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
        int rc = idem_pool_run(n->pool, idem__redis_op_run, o);
        if (rc) {
            /* The server is gone or stuck: in a cluster or under sentinels
             * another may have taken over. */
            if (rc != IDEM_EBACKEND || s->topo == TOPO_SINGLE)
                return rc;
            if (last || idem_mono_ms() >= o->deadline) {
                atomic_store(&s->unsure, true);
                return rc;
            }
            char *msg = strdup(idem_last_error()); /* idem__redis_learn() may say something else */
            bool follow = idem__redis_learn(s, false, o->deadline) == IDEM_OK && route(s, slot) != n;
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
                    (void)idem__redis_learn(s, false, o->deadline);
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
                (void)idem__redis_learn(s, false, o->deadline);
            backoff(o->deadline, 10u << (hop < 5 ? hop : 5));
            continue;
        }
        if (o->plain && o->id == SC_CLAIM)
            return IDEM_OK; /* rd_claim() reads what the server refused */
        rc = idem__redis_reply_error(n->where, r, what);
        freeReplyObject(r);
        o->reply = NULL;
        return rc;
    }
}
