/* Options and layers: what a layer is made of, its counters, and the store
 * key it gives each request. */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

#define MAX_KEY_LEN_LIMIT 1024     /* the largest max_key_len a layer accepts */

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

/* Does prefix (plen bytes, its one ':' at the end) end the way a scoped
 * store key's prefix does: '#', IDEM_SCOPE_TAG_LEN - 1 lower-case hex
 * digits, ':'? Such a prefix would name the records of a scope of another
 * layer (see idem__store_key()). */
static bool prefix_is_scoped(const char *prefix, size_t plen)
{
    if (plen < IDEM_SCOPE_TAG_LEN + 1)
        return false;
    const char *tag = prefix + plen - IDEM_SCOPE_TAG_LEN - 1;
    if (tag[0] != '#')
        return false;
    for (int i = 1; i < IDEM_SCOPE_TAG_LEN; i++)
        if (!((tag[i] >= '0' && tag[i] <= '9') || (tag[i] >= 'a' && tag[i] <= 'f')))
            return false;
    return true;
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
    /* A scoped request's store key is its layer's prefix with a scope tag:
     * a prefix that ends in such a tag would meet those records. Only that
     * form is refused, so a prefix of 0.2 with another '#' keeps its
     * records. */
    if (prefix_is_scoped(o.key_prefix, plen))
        return idem_error_set(IDEM_EINVAL, "idem_options.key_prefix ends in '#' and %d hex digits, "
                              "the form of a scope's tag (\"name#<digits>:\" is \"name:\" with a scope): "
                              "it would reach another layer's scoped records; use another prefix, or "
                              "the prefix \"name:\" with idem_run_scoped()", IDEM_SCOPE_TAG_LEN - 1);
    int rc = idem__crypto_init();
    if (rc)
        return rc;
    idem_layer *l = calloc(1, sizeof *l);
    if (!l || !(l->prefix = strdup(o.key_prefix)) ||
        (o.subkey_secret && !(l->secret = strdup(o.subkey_secret)))) {
        idem_layer_free(l);
        return idem_error_set(IDEM_ENOMEM, "out of memory making a layer");
    }
    if ((rc = layer_keeper_new(l, store, o.auto_extend))) {
        idem_layer_free(l);
        return rc;
    }
    l->store = store;
    l->opts = o;
    l->opts.key_prefix = l->prefix;
    l->opts.subkey_secret = l->secret;
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
        idem_layer_free(l);
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
    free(layer->secret);
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

/* prefix + key, or, with a scope, the prefix's name + '#' + 32 hex digits of
 * SHA-256(scope) + ':' + key. A prefix holds one ':', at its end, so a
 * scoped store key could only meet the store keys of a layer whose prefix is
 * literally "name#<those digits>:", which idem_layer_new() refuses, and
 * never a client's key. */
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

const char *idem__layer_prefix(const idem_layer *l, size_t *len)
{
    *len = l->prefix_len;
    return l->prefix;
}

idem_cache *idem__layer_cache(const idem_layer *l)
{
    return l->cache;
}
