/*
 * Opening and closing a Redis store: the URL's four forms (redis://,
 * redis+unix://, redis+cluster://, redis+sentinel://) and their parameters
 * read into the store, the first connection made and the scripts loaded at
 * open, so that a wrong address or password fails there; everything freed
 * at close, the passwords wiped. Relies on conn.c for the nodes, route.c
 * for learning a cluster's or the sentinels' topology, and redis.c for the
 * scripts' sources.
 */
#include "redis_int.h"

static void store_free(store *s)
{
    if (!s)
        return;
    while (s->nodes) {
        node *n = s->nodes;
        s->nodes = n->next;
        idem__redis_node_free(n);
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
            if (!(*first = idem__redis_node_get(s, h->host, h->port ? h->port : DEFAULT_PORT)))
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
    *first = idem__redis_node_get(s, h ? h->host : NULL, h ? (h->port ? h->port : DEFAULT_PORT) : 0);
    return *first ? IDEM_OK : IDEM_ENOMEM;
}

/* SCRIPT LOAD every script, pipelined, and keep the digests the server
 * returns. They are the SHA1 of each script, the same on every server; a
 * server whose cache lacks one answers NOSCRIPT and gets EVAL
 * (idem__redis_op_run()). */
static int load_scripts_run(void *connp, void *arg, idem_conn_state *state)
{
    conn *c = connp;
    node *n = arg;
    store *s = n->s;
    const char *what = "loading the scripts";
    for (int i = 0; i < SC_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", idem__redis_script_src[i]};
        size_t argvlen[3] = {6, 4, strlen(idem__redis_script_src[i])};
        if (redisAppendCommandArgv(c->ctx, 3, argv, argvlen) != REDIS_OK) {
            *state = IDEM_CONN_BROKEN;
            return idem__redis_conn_error(s, n->where, c, what);
        }
    }
    int ret = IDEM_OK;
    uint64_t deadline = idem_mono_ms() + idem_call_timeout_ms(s->command_ms);
    for (int i = 0; i < SC_COUNT; i++) {
        redisReply *r = idem__redis_conn_reply(c, deadline);
        if (!r) {
            *state = IDEM_CONN_BROKEN;
            return idem__redis_conn_error(s, n->where, c, what);
        }
        if (ret == IDEM_OK) {
            if (r->type == REDIS_REPLY_ERROR)
                ret = idem__redis_reply_error(n->where, r, what);
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

int idem__redis_open(void **state, const idem_url *url)
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
        rc = idem__redis_learn(s, true, idem_mono_ms() + s->command_ms);
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

void idem__redis_close(void *state)
{
    store_free(state);
}
