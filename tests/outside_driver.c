/*
 * A driver built outside the library's sources, as a user would write one:
 * it includes only <idempotency/backend.h>, keeps its functions static, and
 * is opened with idem_store_open_backend(). To stay small it keeps no
 * records of its own: it hands every call to a built-in driver, reached
 * through its table's app_data (how a driver of one's own is configured
 * without globals, and how a wrapper for tracing or fault injection is
 * written). The conformance suite runs on it with --outside.
 */
#include <stdlib.h>

#include <idempotency/backend.h>

#include "conformance.h"

typedef struct outside {
    const idem_backend *inner;
    void               *state;
} outside;

static int out_open(void **state, const idem_url *url, const idem_backend *self)
{
    const idem_backend *inner = self->app_data;
    outside *o = calloc(1, sizeof *o);
    if (!o)
        return idem_error_set(IDEM_ENOMEM, "outside: out of memory");
    o->inner = inner;
    int rc = inner->version >= 2 && inner->open_ex ? inner->open_ex(&o->state, url, inner)
                                                   : inner->open(&o->state, url);
    if (rc) {
        free(o);
        return rc;
    }
    *state = o;
    return IDEM_OK;
}

static void out_close(void *state)
{
    outside *o = state;
    o->inner->close(o->state);
    free(o);
}

static int out_claim(void *state, const void *key, size_t key_len, const void *record,
                     size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                     uint32_t *remaining_ms)
{
    outside *o = state;
    return o->inner->claim(o->state, key, key_len, record, record_len, lease_ms, existing,
                           existing_len, remaining_ms);
}

static int out_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint64_t ttl_ms)
{
    outside *o = state;
    return o->inner->commit(o->state, key, key_len, token, record, record_len, ttl_ms);
}

static int out_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    outside *o = state;
    return o->inner->release(o->state, key, key_len, token);
}

static int out_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint32_t lease_ms)
{
    outside *o = state;
    return o->inner->extend(o->state, key, key_len, token, record, record_len, lease_ms);
}

static size_t out_max_record_len(void *state)
{
    outside *o = state;
    return o->inner->max_record_len ? o->inner->max_record_len(o->state) : SIZE_MAX;
}

static int out_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                    uint32_t *remaining_ms)
{
    outside *o = state;
    return o->inner->read(o->state, key, key_len, record, record_len, remaining_ms);
}

static int out_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    outside *o = state;
    return o->inner->remove(o->state, key, key_len, deleted);
}

static idem_backend outside_table = {
    .version = IDEM_BACKEND_VERSION,
    .name = "outside",
    .close = out_close,
    .claim = out_claim,
    .commit = out_commit,
    .release = out_release,
    .extend = out_extend,
    .max_record_len = out_max_record_len,
    .open_ex = out_open,
};

const idem_backend *conformance_outside_driver(const idem_backend *builtin)
{
    if (!builtin)
        return NULL;
    outside_table.app_data = (void *)builtin;
    /* Optional members only where the wrapped driver has them. */
    outside_table.read = builtin->version >= 2 && builtin->read ? out_read : NULL;
    outside_table.remove = builtin->version >= 2 && builtin->remove ? out_remove : NULL;
    return &outside_table;
}
