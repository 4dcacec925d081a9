/* The state machine of one key: claim, then commit or abort (or extend). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define MAX_KEY_LEN_LIMIT 1024     /* the largest max_key_len a layer accepts */
#define MIN_STATUS 100
#define MAX_STATUS 999
#define COMMIT_BACKOFF_FIRST_MS 5
#define COMMIT_BACKOFF_MAX_MS   1000

typedef _Atomic uint64_t counter;

struct idem_layer {
    idem_store  *store;
    idem_options opts;
    char        *prefix;
    size_t       prefix_len;
    size_t       max_body;      /* min(max_response_len, what the store holds) */
    bool         store_limits;  /* the store's limit is the smaller one */
    counter executed, replayed, in_progress, mismatched, failed, lost, backend_errors;
    counter unstored, extended, claims_freed;
    idem_keeper   *keeper;      /* deferred frees and auto_extend renewals */
    idem_durations durations;   /* of recent handlers, for retry_after_ms */
    idem_cache *cache;          /* COMPLETED records kept here (cache.c); NULL: none */
    counter     cache_hits;
};

struct idem_response {
    const idem_layer *layer;
    int               status;
    unsigned char    *body;     /* NUL-terminated; len + 1 bytes */
    size_t            len;
    idem_header      *headers;  /* one block, as idem_reply.headers */
    size_t            nheaders;
    size_t            fields_len; /* what the headers take in a record */
    idem_claim       *claim;    /* the handler's claim, for its lease */
};

struct idem_claim {
    idem_layer *layer;
    idem_record rec;            /* the STARTED record we wrote */
    uint64_t    lease_end;      /* monotonic ms, counted from when the claim or renewal was sent */
    bool        lost;           /* extend found the key taken over */
    bool        commit_tried;   /* a commit failed on a store error: it may have landed */
    uint64_t    started;        /* monotonic ms when the claim was sent */
    pthread_mutex_t mu;         /* lease_end, lost and rec against the auto_extend thread */
    idem_renewal renewal;
    size_t      key_len;
    uint8_t     key[];          /* prefix + user key */
};

static void count(counter *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* ---- options and layers ---- */

void idem_options_init(idem_options *opts)
{
    if (!opts)
        return;
    *opts = (idem_options){
        .lease_ms = 60000,
        .ttl_s = 86400,
        .key_prefix = "idem:",
        .max_key_len = 255,
        .max_response_len = 1u << 20,
    };
}

static int layer_keeper_new(idem_layer *l, idem_store *store, bool start)
{
    if (idem__keeper_new(&l->keeper, store, &l->claims_freed) != IDEM_OK)
        return idem_error_set(IDEM_ENOMEM, "out of memory making a layer");
    /* auto_extend needs the thread for every request: start it now, where
     * a failure is clean. */
    if (start && idem__keeper_start(l->keeper) != IDEM_OK) {
        idem__keeper_free(l->keeper);
        l->keeper = NULL;
        return idem_error_set(IDEM_ENOMEM, "cannot start the layer's lease-renewal thread (auto_extend)");
    }
    return IDEM_OK;
}

int idem_layer_new(idem_layer **out, idem_store *store, const idem_options *opts)
{
    idem__error_clear();
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_layer_new: out is NULL");
    *out = NULL;
    if (!store)
        return idem_error_set(IDEM_EINVAL, "idem_layer_new: store is NULL; open one with idem_store_open()");
    idem_options o;
    idem_options_init(&o);
    if (opts)
        o = *opts;
    if (!o.key_prefix)
        o.key_prefix = "idem:";
    if (o.lease_ms == 0)
        return idem_error_set(IDEM_EINVAL, "idem_options.lease_ms is 0; give the longest a handler may run, e.g. 60000");
    if (o.ttl_s == 0)
        return idem_error_set(IDEM_EINVAL, "idem_options.ttl_s is 0; give how long responses are replayed, e.g. 86400");
    if (o.max_key_len == 0 || o.max_key_len > MAX_KEY_LEN_LIMIT)
        return idem_error_set(IDEM_EINVAL, "idem_options.max_key_len is %zu; it must be from 1 to %d",
                              o.max_key_len, MAX_KEY_LEN_LIMIT);
    size_t plen = strlen(o.key_prefix);
    if (plen > IDEM_MAX_PREFIX_LEN)
        return idem_error_set(IDEM_EINVAL, "idem_options.key_prefix is %zu bytes; the limit is %d",
                              plen, IDEM_MAX_PREFIX_LEN);
    /* One ':', at the end: then no prefix plus key can spell another prefix
     * plus key ("t1:" + "x" against "t1" + ":x"), so layers never meet. */
    const char *colon = strchr(o.key_prefix, ':');
    if (plen < 2 || colon != o.key_prefix + plen - 1)
        return idem_error_set(IDEM_EINVAL, "idem_options.key_prefix must be 2 to 255 bytes: any bytes "
                              "but ':', then one ':' (e.g. \"orders:\" or \"shop-{eu}:\"), so that two "
                              "prefixes never make the same store key");
    int rc = idem__crypto_init();
    if (rc)
        return rc;
    idem_layer *l = calloc(1, sizeof *l);
    if (!l || !(l->prefix = strdup(o.key_prefix))) {
        free(l);
        return idem_error_set(IDEM_ENOMEM, "out of memory making a layer");
    }
    if ((rc = layer_keeper_new(l, store, o.auto_extend))) {
        free(l->prefix);
        free(l);
        return rc;
    }
    l->store = store;
    l->opts = o;
    l->opts.key_prefix = l->prefix;
    l->prefix_len = plen;
    l->max_body = o.max_response_len;
    size_t cap = idem__store_max_record_len(store);
    if (cap != SIZE_MAX) {
        cap = cap > IDEM_RECORD_COMPLETED_OVERHEAD ? cap - IDEM_RECORD_COMPLETED_OVERHEAD : 0;
        if (cap < l->max_body) {
            l->max_body = cap;
            l->store_limits = true;
        }
    }
    if (l->max_body > UINT32_MAX)
        l->max_body = UINT32_MAX;
    if (o.cache_bytes && idem__cache_new(&l->cache, o.cache_bytes) != IDEM_OK) {
        idem__keeper_free(l->keeper);
        free(l->prefix);
        free(l);
        return idem_error_set(IDEM_ENOMEM, "out of memory making a layer's cache");
    }
    *out = l;
    return IDEM_OK;
}

void idem_layer_free(idem_layer *layer)
{
    if (!layer)
        return;
    idem__keeper_free(layer->keeper);
    idem__cache_free(layer->cache);
    free(layer->prefix);
    free(layer);
}

void idem_layer_stats(const idem_layer *l, idem_stats *out)
{
    if (!out)
        return;
    memset(out, 0, sizeof *out);
    if (!l)
        return;
    out->executed = atomic_load(&l->executed);
    out->replayed = atomic_load(&l->replayed);
    out->in_progress = atomic_load(&l->in_progress);
    out->mismatched = atomic_load(&l->mismatched);
    out->failed = atomic_load(&l->failed);
    out->lost = atomic_load(&l->lost);
    out->backend_errors = atomic_load(&l->backend_errors);
    out->unstored = atomic_load(&l->unstored);
    out->extended = atomic_load(&l->extended);
    out->claims_freed = atomic_load(&l->claims_freed);
    out->cache_hits = atomic_load(&l->cache_hits);
}

/* ---- replies and responses ---- */

void idem_reply_clear(idem_reply *reply)
{
    if (!reply)
        return;
    free(reply->body);
    free(reply->headers);
    memset(reply, 0, sizeof *reply);
}

static int reply_body(idem_reply *reply, const void *body, size_t len)
{
    reply->body = malloc(len + 1);
    if (!reply->body)
        return idem_error_set(IDEM_ENOMEM, "out of memory copying a %zu-byte response", len);
    if (len)
        memcpy(reply->body, body, len);
    reply->body[len] = '\0';
    reply->body_len = len;
    return IDEM_OK;
}

/* IDEM_OK if (status, body, len) is a response this layer can store. */
static int check_response(const idem_layer *l, int status, const void *body, size_t len)
{
    if (status < MIN_STATUS || status > MAX_STATUS)
        return idem_error_set(IDEM_EINVAL, "response status %d is out of range; use %d..%d",
                              status, MIN_STATUS, MAX_STATUS);
    if (!body && len)
        return idem_error_set(IDEM_EINVAL, "response body is NULL but its length is %zu", len);
    if (len > l->max_body)
        return idem_error_set(IDEM_ETOOBIG, "response body is %zu bytes; the limit is %zu (%s)", len,
                              l->max_body,
                              l->store_limits ? "the largest item the store accepts"
                                              : "idem_options.max_response_len");
    return IDEM_OK;
}

/* IDEM_OK if a body of len bytes and header fields of fields_len bytes fit
 * in one record of the store. */
static int check_fields_fit(const idem_layer *l, size_t fields_len, size_t len)
{
    size_t cap = idem__store_max_record_len(l->store);
    if (fields_len == 0 || cap == SIZE_MAX || IDEM_RECORD_FIELDS_OVERHEAD + fields_len + len <= cap)
        return IDEM_OK;
    return idem_error_set(IDEM_ETOOBIG, "a %zu-byte body with %zu bytes of header fields is over the "
                          "largest item the store accepts (%zu bytes)", len, fields_len, cap);
}

/* The fields are kept in one block, copied anew for each field added (at
 * most IDEM_MAX_HEADERS), so the reply can take the block as it is. */
int idem_response_add_header(idem_response *resp, const char *name, const char *value)
{
    if (!resp)
        return idem_error_set(IDEM_EINVAL, "idem_response_add_header: resp is NULL");
    size_t n = resp->nheaders, fields_len;
    idem_header list[IDEM_MAX_HEADERS + 1];
    if (n >= IDEM_MAX_HEADERS)
        return idem_error_set(IDEM_ETOOBIG, "the response has %d header fields already; the limit "
                              "is %d (IDEM_MAX_HEADERS)", IDEM_MAX_HEADERS, IDEM_MAX_HEADERS);
    if (n)
        memcpy(list, resp->headers, n * sizeof *list);
    list[n] = (idem_header){.name = name, .value = value};
    idem_header *block;
    int rc = idem__headers_check(list, n + 1, &fields_len);
    if (rc == IDEM_OK)
        rc = check_fields_fit(resp->layer, fields_len, resp->len);
    if (rc == IDEM_OK)
        rc = idem__headers_copy(list, n + 1, &block);
    if (rc)
        return rc;
    free(resp->headers);
    resp->headers = block;
    resp->nheaders = n + 1;
    resp->fields_len = fields_len;
    return IDEM_OK;
}

int idem_response_set(idem_response *resp, int status, const void *body, size_t len)
{
    if (!resp)
        return idem_error_set(IDEM_EINVAL, "idem_response_set: resp is NULL");
    int rc = check_response(resp->layer, status, body, len);
    if (rc == IDEM_OK)
        rc = check_fields_fit(resp->layer, resp->fields_len, len);
    if (rc)
        return rc;
    unsigned char *copy = malloc(len + 1);
    if (!copy)
        return idem_error_set(IDEM_ENOMEM, "out of memory copying a %zu-byte response", len);
    if (len)
        memcpy(copy, body, len);
    copy[len] = '\0';
    free(resp->body);
    resp->status = status;
    resp->body = copy;
    resp->len = len;
    return IDEM_OK;
}

/* ---- claims ---- */




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

/* Why a claim is no longer in the store, as far as the core can tell. */
#define LOST_WHY "the claim is no longer in the store (its lease ended and another request may have " \
                 "taken the key, or the store lost it in a restart or an eviction)"

/* Add what follows to the driver's message: "redis ...: timeout; the key ..." */
static int error_append(int rc, const char *more)
{
    return idem_error_set(rc, "%s; %s", idem_last_error(), more);
}

static int backend_failed(idem_layer *l, int rc)
{
    if (rc == IDEM_EBACKEND)
        count(&l->backend_errors);
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
        count(&l->mismatched);
        reply->outcome = IDEM_MISMATCH;
        reply->status = 422;
        return IDEM_OK;
    }
    if (old.state == IDEM_STATE_STARTED) {
        if (remaining_ms == UINT32_MAX) {
            uint64_t now = idem_now_ms();
            uint64_t left = old.deadline_ms > now ? old.deadline_ms - now : 0;
            remaining_ms = left > UINT32_MAX - 1 ? UINT32_MAX - 1 : (uint32_t)left;
        }
        count(&l->in_progress);
        reply->outcome = IDEM_IN_PROGRESS;
        reply->status = 409;
        reply->retry_after_ms = retry_hint(l, remaining_ms);
        return IDEM_OK;
    }
    int rc = reply_body(reply, old.body, old.body_len);
    if (rc == IDEM_OK)
        rc = idem__headers_from_record(&old, &reply->headers);
    if (rc) {
        idem_reply_clear(reply);
        return rc;
    }
    reply->nheaders = old.nheaders;
    count(&l->replayed);
    reply->outcome = IDEM_REPLAYED;
    reply->status = old.status;
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

/* prefix + key, or, with a scope, the prefix's name + '#' + 32 hex digits of
 * SHA-256(scope) + ':' + key. A prefix holds one ':', at its end, so a
 * scoped store key can only meet the store keys of a layer whose prefix is
 * literally "name#<those digits>:", never a client's key. */
int idem__store_key(const idem_layer *l, const void *scope, size_t scope_len, const void *key,
                    size_t key_len, uint8_t *out, size_t *out_len)
{
    size_t n = 0;
    if (scope) {
        uint8_t digest[IDEM_DIGEST_LEN];
        int rc = idem__digest(scope, scope_len, digest);
        if (rc)
            return rc;
        memcpy(out, l->prefix, l->prefix_len - 1);
        n = l->prefix_len - 1;
        out[n++] = '#';
        for (int i = 0; i < (IDEM_SCOPE_TAG_LEN - 1) / 2; i++) {
            out[n++] = "0123456789abcdef"[digest[i] >> 4];
            out[n++] = "0123456789abcdef"[digest[i] & 15];
        }
        out[n++] = ':';
    } else {
        memcpy(out, l->prefix, l->prefix_len);
        n = l->prefix_len;
    }
    /* A table of version 1 was promised keys of at most 1279 bytes. */
    if (idem__store_version(l->store) < 2 && n + key_len > IDEM_V1_MAX_STORE_KEY_LEN)
        return idem_error_set(IDEM_EINVAL, "the store key of this scoped request is %zu bytes; the %s "
                              "driver (table version 1) takes at most %d: rebuild it against this "
                              "<idempotency/backend.h>, or use a shorter key_prefix", n + key_len,
                              idem__store_name(l->store), IDEM_V1_MAX_STORE_KEY_LEN);
    memcpy(out + n, key, key_len);
    *out_len = n + key_len;
    return IDEM_OK;
}

idem_store *idem__layer_store(const idem_layer *l)
{
    return l->store;
}

idem_cache *idem__layer_cache(const idem_layer *l)
{
    return l->cache;
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
        count(&l->cache_hits);
    return rc;
}

static int claim_won(idem_layer *l, const idem_record *rec, const uint8_t *key, size_t key_len,
                     uint64_t sent, uint64_t lease_end, idem_claim **out);

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

    uint64_t sent = idem__mono_ms();
    uint64_t lease_end = sent + l->opts.lease_ms;
    rec.deadline_ms = idem_now_ms() + l->opts.lease_ms;
    uint8_t enc[IDEM_RECORD_HEADER_LEN];
    idem__record_write(&rec, enc);
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining = UINT32_MAX;
    rc = idem__store_claim(l->store, key, key_len, enc, sizeof enc, l->opts.lease_ms, &existing,
                           &existing_len, &remaining);
    if (rc != IDEM_EBACKEND)
        idem__keeper_poke(l->keeper); /* the store answers: free what waits for it */
    if (rc == IDEM_OK && existing) {
        rc = reply_existing(l, &rec, existing, existing_len, remaining, reply);
        if (rc == IDEM_OK && reply->outcome == IDEM_REPLAYED && remaining != UINT32_MAX)
            idem__cache_put(l->cache, key, key_len, existing, existing_len,
                            lease_end - l->opts.lease_ms + remaining); /* the TTL the store reported */
        free(existing);
    } else if (rc == IDEM_OK) {
        rc = claim_won(l, &rec, key, key_len, sent, lease_end, out);
    } else if (rc == IDEM_EBACKEND) {
        /* The claim may have landed (a timeout, a lost reply): free it,
         * fenced by its token, once the store answers again. */
        if (idem__keeper_defer_release(l->keeper, key, key_len, rec.token, lease_end, true) == IDEM_OK)
            error_append(rc, "nothing ran; if the claim reached the store, this layer frees the key as "
                             "soon as the store answers again");
    }
    return backend_failed(l, rc);
}

/* Give up a claim we hold: free it now, or later if the store cannot be
 * told. Returns what the release returned, and says in *later whether the
 * key was queued to be freed later. */
static int give_up(idem_layer *l, const uint8_t *key, size_t key_len, const uint8_t *token,
                   uint64_t lease_end, bool *later)
{
    *later = false;
    int rc = idem__store_release(l->store, key, key_len, token);
    if (rc == IDEM_EBACKEND || rc == IDEM_ENOMEM) {
        if (rc == IDEM_EBACKEND)
            count(&l->backend_errors);
        *later = idem__keeper_defer_release(l->keeper, key, key_len, token, lease_end, false) == IDEM_OK;
    }
    return rc;
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
        int rrc = give_up(l, key, key_len, rec->token, lease_end, &later);
        return idem_error_set(IDEM_EBACKEND, "%s store took %llu ms to answer a claim, more than half of "
                              "its %u ms lease: nothing ran, and the key %s; retry (if this goes on, the "
                              "store is overloaded, or raise lease_ms)", idem__store_name(l->store),
                              (unsigned long long)(now - sent), lease,
                              rrc == IDEM_OK || rrc == IDEM_ELOST ? "was given up"
                              : later ? "is freed as soon as the store answers again"
                                      : "stays claimed until that lease ends");
    }
    idem_claim *c = malloc(sizeof *c + key_len);
    if (!c) {
        bool later;
        int rrc = give_up(l, key, key_len, rec->token, lease_end, &later);
        return idem_error_set(IDEM_ENOMEM, "out of memory holding a claim; nothing ran, and the key %s",
                              rrc == IDEM_OK || rrc == IDEM_ELOST ? "was given up"
                              : later ? "is freed as soon as the store answers again"
                                      : "stays claimed until its lease ends");
    }
    *c = (idem_claim){.layer = l, .rec = *rec, .lease_end = lease_end, .started = sent,
                      .key_len = key_len};
    pthread_mutex_init(&c->mu, NULL);
    memcpy(c->key, key, key_len);
    *out = c;
    return IDEM_OK;
}

static void claim_free(idem_claim *c)
{
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* idem_commit() without its advice to the caller, which idem_run() words
 * differently. */
static int commit_claim(idem_claim *c, int status, const idem_header *headers, size_t nheaders,
                        const void *body, size_t len)
{
    idem_layer *l = c->layer;
    if (c->lost) {
        claim_free(c);
        return idem_error_set(IDEM_ELOST, LOST_WHY "; this response was not stored");
    }
    size_t fields_len;
    int rc = idem__headers_check(headers, nheaders, &fields_len);
    if (rc == IDEM_OK)
        rc = check_response(l, status, body, len);
    if (rc == IDEM_OK)
        rc = check_fields_fit(l, fields_len, len);
    if (rc == IDEM_OK)
        rc = idem__store_check_process(l->store);
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
    uint8_t *enc;
    size_t enc_len;
    if ((rc = idem__record_encode(&done, &enc, &enc_len)))
        return idem_error_set(rc, "out of memory encoding a %zu-byte response", len);

    /* A store error is retried until the lease is nearly over (or the
     * commit deadline): giving the key up would let a retry repeat a
     * handler that succeeded. */
    uint64_t start = idem__mono_ms(), stop = c->lease_end;
    if (l->opts.commit_timeout_ms && start + l->opts.commit_timeout_ms < stop)
        stop = start + l->opts.commit_timeout_ms;
    idem__durations_add(&l->durations, start - c->started);
    uint64_t backoff = COMMIT_BACKOFF_FIRST_MS;
    uint64_t sent = idem__mono_ms(); /* the record expires ttl_s after the store took it: later than this */
    for (;;) {
        rc = idem__store_commit(l->store, c->key, c->key_len, c->rec.token, enc, enc_len,
                                (uint64_t)l->opts.ttl_s * 1000u);
        if (rc != IDEM_EBACKEND)
            break;
        count(&l->backend_errors);
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
    if (rc == IDEM_EBACKEND)
        c->commit_tried = true;
    free(enc);
    if (rc == IDEM_OK) {
        count(&l->executed);
        claim_free(c);
    } else if (rc == IDEM_ELOST) {
        count(&l->lost);
        claim_free(c);
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
    int rc = commit_claim(c, status, headers, nheaders, body, len);
    if (rc == IDEM_EBACKEND)
        error_append(rc, "the response may not be stored, and the key stays claimed until its lease "
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
        rc = give_up(l, c->key, c->key_len, c->rec.token, c->lease_end, &later);
    if (rc == IDEM_ELOST) {
        if (!c->lost)
            count(&l->lost);
        idem_error_set(rc, LOST_WHY);
    } else if (rc == IDEM_EBACKEND || rc == IDEM_ENOMEM) {
        error_append(rc, later ? "the key is not freed yet: this layer frees it as soon as the store "
                                 "answers again, or it frees itself when its lease ends"
                               : "the key is not freed: it frees itself when its lease ends");
    }
    count(&l->failed);
    claim_free(c);
    return rc;
}

/* Renew c's lease; c->mu held. */
static int extend_locked(idem_claim *c, uint32_t lease_ms)
{
    if (c->lost)
        return idem_error_set(IDEM_ELOST, "the claim was already taken over");
    idem_layer *l = c->layer;
    int rc = idem__store_check_process(l->store);
    if (rc)
        return rc;
    idem_record next = c->rec;
    uint64_t lease_end = idem__mono_ms() + lease_ms;
    next.deadline_ms = idem_now_ms() + lease_ms;
    uint8_t enc[IDEM_RECORD_HEADER_LEN]; /* a STARTED record is the header alone, as in idem_begin() */
    idem__record_write(&next, enc);
    rc = idem__store_extend(l->store, c->key, c->key_len, c->rec.token, enc, sizeof enc, lease_ms);
    if (rc == IDEM_OK) {
        c->rec.deadline_ms = next.deadline_ms;
        c->lease_end = lease_end;
        count(&l->extended);
    } else if (rc == IDEM_ELOST) {
        c->lost = true;
        count(&l->lost);
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
    int rc = extend_locked(c, lease_ms);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int idem_response_extend(idem_response *resp, uint32_t lease_ms)
{
    idem__error_clear();
    if (!resp || !resp->claim)
        return idem_error_set(IDEM_EINVAL, "idem_response_extend: resp is NULL or not a running handler's");
    idem_claim *c = resp->claim;
    pthread_mutex_lock(&c->mu);
    int rc = extend_locked(c, lease_ms ? lease_ms : c->layer->opts.lease_ms);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

uint32_t idem_response_lease_left_ms(const idem_response *resp)
{
    if (!resp || !resp->claim)
        return 0;
    idem_claim *c = resp->claim;
    pthread_mutex_lock(&c->mu);
    uint64_t now = idem__mono_ms();
    uint64_t left = c->lost || c->lease_end <= now ? 0 : c->lease_end - now;
    pthread_mutex_unlock(&c->mu);
    return left > UINT32_MAX ? UINT32_MAX : (uint32_t)left;
}

/* auto_extend, on the keeper's thread: renew every third of the lease; stop
 * when the key was taken over or the lease ended without a renewal. */
static bool auto_renew(void *arg, uint64_t *next_due)
{
    idem_claim *c = arg;
    uint32_t lease = c->layer->opts.lease_ms;
    uint64_t third = lease / 3 ? lease / 3 : 1;
    pthread_mutex_lock(&c->mu);
    int rc = extend_locked(c, lease);
    uint64_t now = idem__mono_ms(), end = c->lease_end;
    bool lost = c->lost;
    pthread_mutex_unlock(&c->mu);
    if (rc == IDEM_OK) {
        *next_due = now + third;
        return true;
    }
    if (lost || now >= end)
        return false;
    /* a store error: the old lease stands; try again soon, within it */
    uint64_t retry = third / 4 ? third / 4 : 1;
    *next_due = now + retry;
    return true;
}

/* ---- the decorator ---- */

int idem_run(idem_layer *l, const idem_request *req, idem_handler fn, void *arg, idem_reply *reply)
{
    return idem_run_scoped(l, NULL, 0, req, fn, arg, reply);
}

int idem_run_scoped(idem_layer *l, const void *scope, size_t scope_len, const idem_request *req,
                    idem_handler fn, void *arg, idem_reply *reply)
{
    idem_claim *c;
    if (!fn) {
        idem_reply_clear(reply);
        return idem_error_set(IDEM_EINVAL, "idem_run: handler is NULL");
    }
    int rc = idem_begin_scoped(l, scope, scope_len, req, &c, reply);
    if (rc || !c)
        return rc;

    idem_response resp = {.layer = l, .status = 200, .claim = c};
    bool renewing = false;
    if (l->opts.auto_extend) {
        uint32_t third = l->opts.lease_ms / 3 ? l->opts.lease_ms / 3 : 1;
        c->renewal = (idem_renewal){.renew = auto_renew, .arg = c};
        renewing = idem__keeper_watch(l->keeper, &c->renewal, c->started + third) == IDEM_OK;
    }
    int herr = fn(arg, &resp);
    if (renewing)
        idem__keeper_unwatch(l->keeper, &c->renewal);
    if (herr != 0) {
        /* The handler's own message (from idem_response_set, say) outlives
         * the abort, which adds to it only when the key could not be freed. */
        idem__durations_add(&l->durations, idem__mono_ms() - c->started);
        char *why = strdup(idem_last_error());
        int arc = idem_abort(c);
        if (arc == IDEM_EBACKEND || arc == IDEM_ENOMEM)
            idem_error_set(IDEM_OK, "%s%shandler failed, but freeing its key failed too: %s",
                           why ? why : "", why && why[0] ? "; " : "", idem_last_error());
        else
            idem_error_set(IDEM_OK, "%s", why ? why : "");
        free(why);
        reply->outcome = IDEM_FAILED;
        reply->headers = resp.headers; /* the handler's fields, if any; not stored */
        reply->nheaders = resp.nheaders;
        reply->status = resp.body ? resp.status : 500;
        reply->body = resp.body; /* what the handler set, if anything; not stored */
        reply->body_len = resp.len;
        reply->handler_error = herr;
        reply->abort_error = arc;
        return IDEM_OK;
    }
    rc = commit_claim(c, resp.status, resp.headers, resp.nheaders,
                      resp.body ? resp.body : (const void *)"", resp.len);
    if (rc != IDEM_OK)
        count(&l->unstored);
    if (rc != IDEM_OK && rc != IDEM_ELOST) {
        claim_free(c); /* the key stays claimed in the store until its lease ends */
        error_append(rc, "the handler ran and its response is in the reply, but it may not be stored; "
                         "the key stays claimed until its lease ends");
    }
    reply->outcome = IDEM_EXECUTED;
    reply->status = resp.status;
    reply->headers = resp.headers;
    reply->nheaders = resp.nheaders;
    if (resp.body) {
        reply->body = resp.body;
        reply->body_len = resp.len;
    } else {
        (void)reply_body(reply, "", 0); /* on failure body stays NULL: allowed */
    }
    return rc;
}
