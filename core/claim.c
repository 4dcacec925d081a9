/* The state machine of one key: claim, then commit or abort (or extend). */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

#define COMMIT_BACKOFF_FIRST_MS 5
#define COMMIT_BACKOFF_MAX_MS   1000
/* How long a driver call may outlast the deadline it was given (socket
 * timeouts count in the kernel's ticks, 10 ms at HZ=100, rounded up): a
 * commit's attempts end this long before its lease, so that the call
 * returns while the lease holds, and the call returns within about this
 * long after commit_timeout_ms. */
#define COMMIT_SLACK_MS         50
#define TAKEOVER_ROUNDS         3     /* takeovers lost to other claimants before answering 409 */

static int check_request(const idem_layer *l, const idem_request *req)
{
    if (!req->key && req->key_len)
        return idem_error_set(IDEM_EINVAL, "idempotency key is NULL but its length is %zu", req->key_len);
    if (req->key_len == 0)
        return idem_error_set(IDEM_EINVAL, "idempotency key is empty; send a key of 1 to %zu bytes",
                              l->opts.max_key_len);
    if (req->key_len > l->opts.max_key_len)
        return idem_error_set(IDEM_EINVAL, "idempotency key is %zu bytes; the limit is %zu (max_key_len)",
                              req->key_len, l->opts.max_key_len);
    if (!req->fingerprint && req->fingerprint_len)
        return idem_error_set(IDEM_EINVAL, "fingerprint is NULL but its length is %zu",
                              req->fingerprint_len);
    return IDEM_OK;
}

static int check_scope(const void *scope, size_t scope_len)
{
    if (!scope && scope_len)
        return idem_error_set(IDEM_EINVAL, "scope is NULL but its length is %zu", scope_len);
    if (scope && scope_len == 0)
        return idem_error_set(IDEM_EINVAL, "scope is empty; give 1 to %d bytes, or NULL for none",
                              IDEM_MAX_SCOPE_LEN);
    if (scope_len > IDEM_MAX_SCOPE_LEN)
        return idem_error_set(IDEM_EINVAL, "scope is %zu bytes; the limit is %d", scope_len,
                              IDEM_MAX_SCOPE_LEN);
    return IDEM_OK;
}


/* Add what follows to the driver's message: "redis ...: timeout; the key ..." */
int idem__error_append(int rc, const char *more)
{
    return idem_error_set(rc, "%s; %s", idem_last_error(), more);
}

static int backend_failed(idem_layer *l, int rc)
{
    if (rc == IDEM_EBACKEND)
        idem__count(&l->backend_errors);
    return rc;
}

/* When a duplicate should come back, the holder having left ms on its
 * lease: the 95th percentile of recent handler durations, less what the
 * holder has run already (judged by this layer's lease), or half that
 * percentile when the holder runs long; the time left when too few runs were
 * seen. Never 0, never past the holder's lease. */
static uint32_t retry_hint(idem_layer *l, uint32_t left)
{
    uint32_t p95, hint = left;
    if (idem__durations_p95(&l->durations, &p95)) {
        uint32_t ran = l->opts.lease_ms > left ? l->opts.lease_ms - left : 0;
        hint = p95 > ran ? p95 - ran : p95 / 2;
        if (hint > left)
            hint = left;
    }
    return hint ? hint : 1;
}

/* The time left on the lease of a STARTED record the store says expires in
 * remaining_ms (UINT32_MAX: it cannot tell, and the record's own deadline
 * is read by this host's clock). A record with a checkpoint is kept
 * kept_ms past its lease. */
static uint32_t lease_left(const idem_layer *l, const idem_record *old, uint32_t remaining_ms)
{
    uint64_t left;
    if (remaining_ms != UINT32_MAX) {
        left = remaining_ms > old->kept_ms ? remaining_ms - old->kept_ms : 0;
    } else {
        /* The holder's deadline, by the holder's clock, which may run
         * ahead: never counted as more than a lease. */
        uint64_t now = idem_now_ms();
        left = old->deadline_ms > now ? old->deadline_ms - now : 0;
        if (left > l->opts.lease_ms)
            left = l->opts.lease_ms;
    }
    return left > UINT32_MAX - 1 ? UINT32_MAX - 1 : (uint32_t)left;
}

/* Turn the record that beat our claim into a reply. */
static int reply_existing(idem_layer *l, const idem_record *mine, const void *buf, size_t len,
                          uint32_t remaining_ms, idem_reply *reply)
{
    idem_record old;
    if (idem__record_decode(buf, len, &old) != IDEM_OK)
        return idem_error_set(IDEM_ECORRUPT,
                              "%s store holds a %zu-byte value under this key that libidempotency did "
                              "not write; delete it, or give this layer a key_prefix of its own",
                              idem__store_name(l->store), len);
    if (mine->has_fingerprint && old.has_fingerprint &&
        memcmp(mine->digest, old.digest, IDEM_DIGEST_LEN) != 0) {
        idem__count(&l->mismatched);
        reply->outcome = IDEM_MISMATCH;
        reply->status = 422;
        return IDEM_OK;
    }
    if (old.state == IDEM_STATE_STARTED) {
        remaining_ms = lease_left(l, &old, remaining_ms);
        idem__count(&l->in_progress);
        reply->outcome = IDEM_IN_PROGRESS;
        reply->status = 409;
        reply->retry_after_ms = retry_hint(l, remaining_ms);
        return IDEM_OK;
    }
    int rc = idem__reply_body(reply, old.body, old.body_len);
    if (rc == IDEM_OK)
        rc = idem__headers_from_record(&old, &reply->headers);
    if (rc) {
        idem_reply_clear(reply);
        return rc;
    }
    reply->nheaders = old.nheaders;
    idem__count(&l->replayed);
    reply->outcome = IDEM_REPLAYED;
    reply->status = old.status;
    return IDEM_OK;
}

/* A cached COMPLETED record answers as the store's would: no round trip. */
static int reply_cached(idem_layer *l, const idem_record *mine, const idem_cache_entry *hit,
                        idem_reply *reply)
{
    size_t len;
    const uint8_t *rec = idem__cache_entry_record(hit, &len);
    int rc = reply_existing(l, mine, rec, len, UINT32_MAX, reply);
    idem__cache_release(hit);
    if (rc == IDEM_OK && reply->outcome == IDEM_REPLAYED)
        idem__count(&l->cache_hits);
    return rc;
}

/* How long the store keeps a STARTED record with a checkpoint after a lease
 * of lease_ms: the layer's ttl_s, within what a driver's expiry can say. */
uint32_t idem__kept_ms(const idem_layer *l, uint32_t lease_ms)
{
    uint64_t kept = (uint64_t)l->opts.ttl_s * 1000u, room = UINT32_MAX - (uint64_t)lease_ms;
    return (uint32_t)(kept < room ? kept : room);
}

/* Write rec, a STARTED record of token's claim (its own, or one taking the
 * key over from token), with its lease ending lease_ms from now: the
 * store's extend, fenced by token. A record with a checkpoint is kept past
 * the lease, for the next holder. rec's deadline and kept time are set. */
static int put_started(idem_layer *l, const uint8_t *key, size_t key_len, const uint8_t *token,
                       idem_record *rec, uint32_t lease_ms)
{
    rec->deadline_ms = idem_now_ms() + lease_ms;
    rec->kept_ms = rec->cp_name_len ? idem__kept_ms(l, lease_ms) : 0;
    uint8_t small[IDEM_RECORD_HEADER_LEN], *enc = small;
    size_t len = idem__record_len(rec);
    if (len > sizeof small && !(enc = malloc(len)))
        return idem_error_set(IDEM_ENOMEM, "out of memory encoding a %zu-byte checkpoint", len);
    idem__record_write(rec, enc);
    int rc = idem__store_extend(l->store, key, key_len, token, enc, len, lease_ms + rec->kept_ms);
    if (enc != small)
        free(enc);
    return rc;
}

/* Give up a claim we hold: free it now, or later if the store cannot be
 * told. A claim with a checkpoint is not freed but ended: its lease ends
 * now and the record stays, for the next holder to resume from. Returns
 * what the store returned, and says in *later whether the key was queued
 * to be freed later. */
static int give_up(idem_layer *l, const uint8_t *key, size_t key_len, const idem_record *rec,
                   uint64_t lease_end, bool *later)
{
    *later = false;
    const uint8_t *token = rec->token;
    if (rec->cp_name_len) {
        idem_record ended = *rec;
        return put_started(l, key, key_len, token, &ended, 0);
    }
    int rc = idem__store_release(l->store, key, key_len, token);
    if (rc == IDEM_EBACKEND || rc == IDEM_ENOMEM) {
        if (rc == IDEM_EBACKEND)
            idem__count(&l->backend_errors);
        *later = idem__keeper_defer_release(l->keeper, key, key_len, token, lease_end, false) == IDEM_OK;
    }
    return rc;
}

uint8_t *idem__checkpoint_copy(const char *name, size_t name_len, const void *data, size_t len)
{
    uint8_t *cp = malloc(name_len + len + 1);
    if (cp) {
        memcpy(cp, name, name_len);
        cp[name_len] = '\0';
        if (len)
            memcpy(cp + name_len + 1, data, len);
    }
    return cp;
}

void idem__checkpoint_adopt(idem_claim *c, uint8_t *cp)
{
    free(c->cp);
    c->cp = cp;
    if (cp) {
        c->rec.cp_name = (const char *)cp;
        c->rec.cp_data = cp + c->rec.cp_name_len + 1;
    }
}

/* The claim landed. It is only good for the time left on its lease counted
 * from when it was sent: a reply that took more than half of the lease to
 * come back (a slow or trickling store, a write lock held elsewhere) leaves
 * too little to run a handler safely, and the key may even be taken over
 * already. Such a claim is given up, fenced by its token, and answered as a
 * store error; nothing runs. */
static int claim_won(idem_layer *l, const idem_record *rec, const uint8_t *key, size_t key_len,
                     uint64_t sent, uint64_t lease_end, idem_claim **out)
{
    uint64_t now = idem__mono_ms();
    uint32_t lease = l->opts.lease_ms;
    if (now - sent > lease / 2) {
        bool later;
        int rrc = give_up(l, key, key_len, rec, lease_end, &later);
        return idem_error_set(IDEM_EBACKEND, "%s store took %llu ms to answer a claim, more than half of "
                              "its %u ms lease: nothing ran, and the key %s; retry (if this goes on, the "
                              "store is overloaded, or raise lease_ms)", idem__store_name(l->store),
                              (unsigned long long)(now - sent), lease,
                              rrc == IDEM_OK || rrc == IDEM_ELOST ? "was given up"
                              : later ? "is freed as soon as the store answers again"
                                      : "stays claimed until that lease ends");
    }
    idem_claim *c = malloc(sizeof *c + key_len);
    uint8_t *cp = NULL;
    if (c && rec->cp_name_len && !(cp = idem__checkpoint_copy(rec->cp_name, rec->cp_name_len, rec->cp_data,
                                                        rec->cp_len))) {
        free(c);
        c = NULL;
    }
    if (!c) {
        bool later;
        int rrc = give_up(l, key, key_len, rec, lease_end, &later);
        return idem_error_set(IDEM_ENOMEM, "out of memory holding a claim; nothing ran, and the key %s",
                              rrc == IDEM_OK || rrc == IDEM_ELOST ? "was given up"
                              : later ? "is freed as soon as the store answers again"
                                      : "stays claimed until its lease ends");
    }
    *c = (idem_claim){.layer = l, .rec = *rec, .lease_end = lease_end, .started = sent,
                      .key_len = key_len};
    idem__checkpoint_adopt(c, cp);
    pthread_mutex_init(&c->mu, NULL);
    memcpy(c->key, key, key_len);
    *out = c;
    return IDEM_OK;
}

/* Is the record that beat our claim a STARTED one with a checkpoint, whose
 * lease has ended, for the same request? Then the claim takes it over. */
static bool resumable(const idem_layer *l, const idem_record *mine, const void *buf, size_t len,
                      uint32_t remaining_ms, idem_record *old)
{
    return idem__store_version(l->store) >= 3 && idem__record_decode(buf, len, old) == IDEM_OK &&
           old->state == IDEM_STATE_STARTED && old->cp_name_len > 0 &&
           lease_left(l, old, remaining_ms) == 0 &&
           !(mine->has_fingerprint && old->has_fingerprint &&
             memcmp(mine->digest, old->digest, IDEM_DIGEST_LEN) != 0);
}

/* Take over old, a checkpointed claim whose lease has ended: write our
 * claim (rec, carrying old's checkpoint) in its place, fenced by old's
 * token. IDEM_ELOST: another claimant was first. */
static int take_over(idem_layer *l, idem_record *rec, const idem_record *old, const uint8_t *key,
                     size_t key_len, uint64_t sent, idem_claim **out)
{
    rec->cp_name = old->cp_name;
    rec->cp_name_len = old->cp_name_len;
    rec->cp_data = old->cp_data;
    rec->cp_len = old->cp_len;
    int rc = put_started(l, key, key_len, old->token, rec, l->opts.lease_ms);
    if (rc == IDEM_OK)
        return claim_won(l, rec, key, key_len, sent, sent + l->opts.lease_ms, out);
    if (rc == IDEM_EBACKEND)
        idem__error_append(rc, "taking over a key whose holder left a checkpoint failed: nothing ran, "
                           "and the key stays as it was until the lease this try wrote, if it landed, "
                           "ends; retry");
    return rc;
}

int idem_begin(idem_layer *l, const idem_request *req, idem_claim **out, idem_reply *reply)
{
    return idem_begin_scoped(l, NULL, 0, req, out, reply);
}

int idem_begin_scoped(idem_layer *l, const void *scope, size_t scope_len, const idem_request *req,
                      idem_claim **out, idem_reply *reply)
{
    idem__error_clear();
    if (out)
        *out = NULL;
    if (!l || !req || !out || !reply)
        return idem_error_set(IDEM_EINVAL, "layer, request, claim and reply must not be NULL");
    idem_reply_clear(reply);
    int rc = check_request(l, req);
    if (rc == IDEM_OK)
        rc = check_scope(scope, scope_len);
    if (rc == IDEM_OK)
        rc = idem__store_check_process(l->store);
    if (rc)
        return rc;

    /* Key and record are built on the stack: a claim is allocated only
     * when it wins, so a duplicate costs no allocation of ours but its reply. */
    uint8_t key[IDEM_MAX_STORE_KEY_LEN];
    size_t key_len;
    if ((rc = idem__store_key(l, scope, scope_len, req->key, req->key_len, key, &key_len)))
        return rc;
    idem_record rec = {.state = IDEM_STATE_STARTED, .has_fingerprint = req->fingerprint != NULL};
    if (rec.has_fingerprint)
        rc = idem__digest(req->fingerprint, req->fingerprint_len, rec.digest);
    if (rc == IDEM_OK)
        rc = idem__random_bytes(rec.token, IDEM_TOKEN_LEN);
    if (rc)
        return rc;

    const idem_cache_entry *hit = idem__cache_get(l->cache, key, key_len);
    if (hit)
        return reply_cached(l, &rec, hit, reply);

    /* A key whose holder left a checkpoint is taken over in a second round
     * trip; losing that race to another claimant means claiming again. */
    for (int round = 0;; round++) {
        uint64_t sent = idem__mono_ms();
        uint64_t lease_end = sent + l->opts.lease_ms;
        rec.deadline_ms = idem_now_ms() + l->opts.lease_ms;
        uint8_t enc[IDEM_RECORD_HEADER_LEN];
        idem__record_write(&rec, enc);
        void *existing;
        size_t existing_len;
        uint32_t remaining;
        rc = idem__store_claim(l->store, key, key_len, enc, sizeof enc, l->opts.lease_ms, &existing,
                               &existing_len, &remaining);
        if (rc != IDEM_EBACKEND)
            idem__keeper_poke(l->keeper); /* the store answers: free what waits for it */
        if (rc == IDEM_OK && existing) {
            idem_record old;
            if (round < TAKEOVER_ROUNDS && resumable(l, &rec, existing, existing_len, remaining, &old)) {
                rc = take_over(l, &rec, &old, key, key_len, sent, out);
                free(existing);
                if (rc == IDEM_ELOST)
                    continue; /* another claimant took it first: see what it left */
                return backend_failed(l, rc);
            }
            rc = reply_existing(l, &rec, existing, existing_len, remaining, reply);
            if (rc == IDEM_OK && reply->outcome == IDEM_REPLAYED && remaining != UINT32_MAX)
                idem__cache_put(l->cache, key, key_len, existing, existing_len,
                                sent + remaining); /* the TTL the store reported */
            free(existing);
        } else if (rc == IDEM_OK) {
            rc = claim_won(l, &rec, key, key_len, sent, lease_end, out);
        } else if (rc == IDEM_EBACKEND) {
            /* The claim may have landed (a timeout, a lost reply): free it,
             * fenced by its token, once the store answers again. */
            if (idem__keeper_defer_release(l->keeper, key, key_len, rec.token, lease_end, true) == IDEM_OK)
                idem__error_append(rc, "nothing ran; if the claim reached the store, this layer frees "
                                   "the key as soon as the store answers again");
        }
        return backend_failed(l, rc);
    }
}

void idem__claim_free(idem_claim *c)
{
    pthread_mutex_destroy(&c->mu);
    free(c->cp);
    free(c);
}

/* idem_commit() without its advice to the caller, which idem_run() words
 * differently. */
int idem__claim_commit(idem_claim *c, int status, const idem_header *headers, size_t nheaders,
                        const void *body, size_t len)
{
    idem_layer *l = c->layer;
    if (c->lost) {
        idem__claim_free(c);
        return idem_error_set(IDEM_ELOST, LOST_WHY "; this response was not stored");
    }
    int rc = idem__check_completion(l, status, headers, nheaders, body, len);
    if (rc)
        return rc;

    idem_record done = c->rec;
    done.headers = headers;
    done.nheaders = nheaders;
    done.state = IDEM_STATE_COMPLETED;
    done.deadline_ms = 0;
    done.status = status;
    done.body = body;
    done.body_len = len;
    /* A store error, and a lack of memory, are retried until the lease is
     * nearly over (or the commit deadline): the handler has run, and giving
     * the key up would let a retry repeat it. */
    uint64_t start = idem__mono_ms();
    uint64_t stop = c->lease_end > start + COMMIT_SLACK_MS ? c->lease_end - COMMIT_SLACK_MS : start;
    if (l->opts.commit_timeout_ms && start + l->opts.commit_timeout_ms < stop)
        stop = start + l->opts.commit_timeout_ms;
    /* A lease over already leaves one attempt, in the driver's own time (or
     * commit_timeout_ms): a takeover fences it out, and without one it
     * still stores the work. */
    uint64_t deadline = stop > start               ? stop
                      : l->opts.commit_timeout_ms ? start + l->opts.commit_timeout_ms
                                                  : 0;
    idem__durations_add(&l->durations, start - c->started);
    uint64_t backoff = COMMIT_BACKOFF_FIRST_MS;
    uint64_t sent = idem__mono_ms(); /* the record expires ttl_s after the store took it: later than this */
    uint8_t *enc = NULL;
    size_t enc_len = 0;
    for (;;) {
        if (!enc && (rc = idem__record_encode(&done, &enc, &enc_len)) != IDEM_OK) {
            rc = idem_error_set(rc, "out of memory encoding a %zu-byte response", len);
        } else {
            /* Each attempt gets only the time left, whatever the driver's
             * own timeouts. */
            uint64_t outer = idem__call_deadline_set(deadline);
            rc = idem__store_commit(l->store, c->key, c->key_len, c->rec.token, enc, enc_len,
                                    (uint64_t)l->opts.ttl_s * 1000u);
            idem__call_deadline_set(outer);
        }
        if (rc != IDEM_EBACKEND && rc != IDEM_ENOMEM)
            break;
        if (rc == IDEM_EBACKEND)
            idem__count(&l->backend_errors);
        uint64_t now = idem__mono_ms();
        if (now + backoff >= stop)
            break;
        idem__sleep_ms(backoff);
        backoff = backoff * 2 > COMMIT_BACKOFF_MAX_MS ? COMMIT_BACKOFF_MAX_MS : backoff * 2;
    }
    /* After an earlier commit that may have landed, the store may hold that
     * response, not this one: only a first commit is cached. */
    if (rc == IDEM_OK && !c->commit_tried)
        idem__cache_put(l->cache, c->key, c->key_len, enc, enc_len, sent + (uint64_t)l->opts.ttl_s * 1000u);
    if (rc == IDEM_EBACKEND || (rc == IDEM_ENOMEM && enc))
        c->commit_tried = true; /* a commit was sent and failed: it may have landed */
    free(enc);
    if (rc == IDEM_OK) {
        idem__count(&l->executed);
        idem__claim_free(c);
    } else if (rc == IDEM_ELOST) {
        idem__count(&l->lost);
        idem__claim_free(c);
        idem_error_set(rc, LOST_WHY "; this response was not stored (raise lease_ms, set auto_extend, "
                           "or renew the lease from long handlers: idem_response_extend(), "
                           "idem_extend())");
    }
    return rc;
}

int idem_commit(idem_claim *c, int status, const void *body, size_t len)
{
    return idem_commit_headers(c, status, NULL, 0, body, len);
}

int idem_commit_headers(idem_claim *c, int status, const idem_header *headers, size_t nheaders,
                        const void *body, size_t len)
{
    idem__error_clear();
    if (!c)
        return idem_error_set(IDEM_EINVAL, "idem_commit: claim is NULL");
    int rc = idem__claim_commit(c, status, headers, nheaders, body, len);
    if (rc == IDEM_EBACKEND)
        idem__error_append(rc, "the response may not be stored, and the key stays claimed until its lease "
                         "ends (commit again, or abort)");
    return rc;
}

int idem_abort(idem_claim *c)
{
    idem__error_clear();
    if (!c)
        return idem_error_set(IDEM_EINVAL, "idem_abort: claim is NULL");
    idem_layer *l = c->layer;
    int rc = c->lost ? IDEM_ELOST : idem__store_check_process(l->store);
    bool later = false;
    if (rc == IDEM_OK)
        rc = give_up(l, c->key, c->key_len, &c->rec, c->lease_end, &later);
    if (rc == IDEM_ELOST) {
        if (!c->lost)
            idem__count(&l->lost);
        idem_error_set(rc, LOST_WHY);
    } else if (rc == IDEM_EBACKEND || rc == IDEM_ENOMEM) {
        idem__error_append(rc, later ? "the key is not freed yet: this layer frees it as soon as the store "
                                 "answers again, or it frees itself when its lease ends"
                               : "the key is not freed: it frees itself when its lease ends");
    }
    idem__count(&l->failed);
    idem__claim_free(c);
    return rc;
}

/* Renew c's lease; c->mu held. */
int idem__claim_extend_locked(idem_claim *c, uint32_t lease_ms)
{
    return idem__claim_put_locked(c, NULL, 0, NULL, 0, lease_ms);
}

int idem__claim_put_locked(idem_claim *c, const char *name, size_t name_len, const void *data, size_t len,
                           uint32_t lease_ms)
{
    if (c->lost)
        return idem_error_set(IDEM_ELOST, "the claim was already taken over");
    idem_layer *l = c->layer;
    int rc = idem__store_check_process(l->store);
    if (rc)
        return rc;
    if (atomic_load(&c->settling))
        return IDEM_OK; /* idem_run_tx() is committing: the lease no longer matters */
    idem_record next = c->rec;
    uint8_t *cp = NULL;
    if (name) {
        if (!(cp = idem__checkpoint_copy(name, name_len, data, len)))
            return idem_error_set(IDEM_ENOMEM, "out of memory keeping a %zu-byte checkpoint", len);
        next.cp_name = (const char *)cp;
        next.cp_name_len = name_len;
        next.cp_data = cp + name_len + 1;
        next.cp_len = len;
    }
    uint64_t lease_end = idem__mono_ms() + lease_ms;
    rc = put_started(l, c->key, c->key_len, c->rec.token, &next, lease_ms);
    if (rc == IDEM_OK) {
        c->rec = next;
        c->lease_end = lease_end;
        if (name)
            idem__checkpoint_adopt(c, cp);
        else
            idem__count(&l->extended);
        return IDEM_OK;
    }
    free(cp);
    if (rc == IDEM_ELOST && atomic_load(&c->settling))
        return rc; /* the transaction committed meanwhile: not a loss */
    if (rc == IDEM_ELOST) {
        c->lost = true;
        idem__count(&l->lost);
        idem_error_set(rc, LOST_WHY "; commit or abort it to free it");
    }
    return backend_failed(l, rc);
}

int idem_extend(idem_claim *c, uint32_t lease_ms)
{
    idem__error_clear();
    if (!c)
        return idem_error_set(IDEM_EINVAL, "idem_extend: claim is NULL");
    if (lease_ms == 0)
        return idem_error_set(IDEM_EINVAL, "idem_extend: lease_ms is 0");
    pthread_mutex_lock(&c->mu);
    int rc = idem__claim_extend_locked(c, lease_ms);
    pthread_mutex_unlock(&c->mu);
    return rc;
}
