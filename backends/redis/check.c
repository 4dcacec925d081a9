/*
 * The Redis driver's settings check (the table's check member): what the
 * master a store writes to is set to (maxmemory-policy, persistence, its
 * role and replicas), and how many commits too few replicas acknowledged,
 * said as the findings idem_store_check() lists. Relies on redis_int.h
 * for the store and for a pooled connection's error messages.
 */
#include "redis_int.h"

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

/* What idem__redis_check() asks the master, in one use of a pooled connection. */
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
        *state = !c->timed_out && idem__redis_peer_went_away(c->ctx) ? IDEM_CONN_STALE : IDEM_CONN_BROKEN;
        return idem__redis_conn_error(k->s, k->n->where, c, "reading the server's settings");
    }
    rd_info_field(info, "role", k->role, sizeof k->role);
    rd_info_field(info, "master_host", k->master, sizeof k->master);
    rd_info_field(info, "master_port", k->port, sizeof k->port);
    rd_info_field(info, "connected_slaves", k->nrep, sizeof k->nrep);
    freeReplyObject(info);
    return IDEM_OK;
}

int idem__redis_check(void *state, idem_findings *out)
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
