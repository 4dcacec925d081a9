/* Checkpoints and subkeys: how a handler whose work is elsewhere resumes
 * where a dead holder stopped, without doing a step twice. */
#include <string.h>

#include "layer.h"

int idem__checkpoint_check(const idem_claim *c, const char *name, const void *data, size_t len,
                           size_t *name_len)
{
    if (!c || !name)
        return idem_error_set(IDEM_EINVAL, "idem_checkpoint: claim and name must not be NULL");
    *name_len = strlen(name);
    if (*name_len == 0 || *name_len > IDEM_CHECKPOINT_NAME_MAX)
        return idem_error_set(IDEM_EINVAL, "checkpoint name is %zu bytes; give 1 to %d", *name_len,
                              IDEM_CHECKPOINT_NAME_MAX);
    if (!data && len)
        return idem_error_set(IDEM_EINVAL, "checkpoint data is NULL but its length is %zu", len);
    if (len > IDEM_CHECKPOINT_MAX)
        return idem_error_set(IDEM_ETOOBIG, "checkpoint data is %zu bytes; the limit is %d "
                              "(IDEM_CHECKPOINT_MAX): keep the bulk elsewhere and checkpoint its id", len,
                              IDEM_CHECKPOINT_MAX);
    const idem_store *s = c->layer->store;
    if (idem__store_version(s) < 3)
        return idem_error_set(IDEM_EUNSUPPORTED, "the %s driver's table is version %u; checkpoints need "
                              "version 3 (rebuild the driver against this <idempotency/backend.h>)",
                              idem__store_name(s), idem__store_version(s));
    size_t need = IDEM_RECORD_CHECKPOINT_OVERHEAD + *name_len + len;
    if (need > idem__store_max_record_len(s))
        return idem_error_set(IDEM_ETOOBIG, "a checkpoint of %zu bytes is over the largest item the %s "
                              "store accepts (%zu bytes)", need, idem__store_name(s),
                              idem__store_max_record_len(s));
    return IDEM_OK;
}

int idem_checkpoint(idem_claim *c, const char *name, const void *data, size_t len)
{
    idem__error_clear();
    size_t name_len = 0;
    int rc = idem__checkpoint_check(c, name, data, len, &name_len);
    if (rc)
        return rc;
    pthread_mutex_lock(&c->mu);
    rc = idem__claim_put_locked(c, name, name_len, data, len, c->layer->opts.lease_ms);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int idem_claim_checkpoint(const idem_claim *c, const char **name, const void **data, size_t *len)
{
    if (!c || !name || !data || !len)
        return idem_error_set(IDEM_EINVAL, "idem_claim_checkpoint: no argument may be NULL");
    *name = c->cp ? (const char *)c->cp : "";
    *data = c->cp ? c->rec.cp_data : NULL;
    *len = c->cp ? c->rec.cp_len : 0;
    return IDEM_OK;
}

/* SHA-256 over the subkey's tag, the layer's secret, the store key (prefix,
 * scope tag and key) and the step, each length-prefixed so that no two
 * different inputs meet. */
int idem_claim_subkey(const idem_claim *c, const char *step, char *out, size_t out_size)
{
    if (!c || !step || !out)
        return idem_error_set(IDEM_EINVAL, "idem_claim_subkey: claim, step and out must not be NULL");
    if (!step[0])
        return idem_error_set(IDEM_EINVAL, "idem_claim_subkey: step is empty; name the step (\"charge\")");
    if (out_size < IDEM_SUBKEY_SIZE)
        return idem_error_set(IDEM_EINVAL, "idem_claim_subkey: out is %zu bytes; give IDEM_SUBKEY_SIZE (%d)",
                              out_size, IDEM_SUBKEY_SIZE);
    static const char tag[] = "idem-subkey-1";
    const char *secret = c->layer->opts.subkey_secret;
    idem_hash *h = idem__hash_begin();
    idem__hash_add_field(h, tag, sizeof tag - 1);
    idem__hash_add_field(h, secret, secret ? strlen(secret) : IDEM_HASH_ABSENT);
    idem__hash_add_field(h, c->key, c->key_len);
    idem__hash_add_field(h, step, strlen(step));
    uint8_t d[IDEM_DIGEST_LEN];
    int rc = idem__hash_end(h, d);
    if (rc)
        return rc;
    for (int i = 0; i < IDEM_DIGEST_LEN; i++) {
        out[2 * i] = "0123456789abcdef"[d[i] >> 4];
        out[2 * i + 1] = "0123456789abcdef"[d[i] & 15];
    }
    out[2 * IDEM_DIGEST_LEN] = '\0';
    return IDEM_OK;
}

int idem_response_checkpoint(idem_response *resp, const char *name, const void *data, size_t len)
{
    if (!resp || !resp->claim)
        return idem_error_set(IDEM_EINVAL, "idem_response_checkpoint: resp is NULL or not a running "
                              "handler's");
    if (resp->in_tx)
        return idem_error_set(IDEM_EINVAL, "idem_response_checkpoint: the work of idem_run_tx() commits "
                              "with its response in one transaction, so it has no steps to save; for "
                              "steps, use idem_begin() with idem_checkpoint_tx()");
    return idem_checkpoint(resp->claim, name, data, len);
}

int idem_response_checkpoint_get(const idem_response *resp, const char **name, const void **data,
                                 size_t *len)
{
    if (!resp || !resp->claim)
        return idem_error_set(IDEM_EINVAL, "idem_response_checkpoint_get: resp is NULL or not a running "
                              "handler's");
    return idem_claim_checkpoint(resp->claim, name, data, len);
}

int idem_response_subkey(const idem_response *resp, const char *step, char *out, size_t out_size)
{
    if (!resp || !resp->claim)
        return idem_error_set(IDEM_EINVAL, "idem_response_subkey: resp is NULL or not a running handler's");
    return idem_claim_subkey(resp->claim, step, out, out_size);
}
