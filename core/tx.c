/*
 * Work in the store's own database: the response, or a checkpoint, is
 * written in the caller's transaction, fenced by the claim's token, and
 * commits with the work or not at all (docs/contract.md, "Exactly once").
 */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

/* Write rec (encoded here) in the transaction on conn and commit it. */
static int write_in_tx(idem_claim *c, void *conn, const idem_record *rec, uint64_t expiry_ms, int *outcome)
{
    uint8_t *enc;
    size_t len;
    *outcome = IDEM_TX_ROLLED_BACK;
    if (idem__record_encode(rec, &enc, &len) != IDEM_OK)
        return idem_error_set(IDEM_ENOMEM, "out of memory encoding a %zu-byte record; nothing was "
                              "written, and the transaction is still open", idem__record_len(rec));
    idem_layer *l = c->layer;
    int rc = idem__store_tx_write(l->store, conn, c->key, c->key_len, c->rec.token, enc, len, expiry_ms,
                                  outcome);
    free(enc);
    if (rc == IDEM_ELOST) {
        c->lost = true;
        idem__count(&l->lost);
        idem_error_set(rc, LOST_WHY "; the transaction was rolled back: nothing of its work remains");
    } else if (rc == IDEM_EBACKEND) {
        idem__count(&l->backend_errors);
        idem__error_append(rc, *outcome == IDEM_TX_UNKNOWN
                                   ? "whether the transaction committed could not be told: the key stays "
                                     "claimed until its lease ends, and the request after it replays the "
                                     "response if it did, or runs the work if it did not"
                                   : "the transaction was rolled back");
    }
    return rc;
}

int idem__claim_commit_tx(idem_claim *c, void *conn, int status, const idem_header *headers,
                          size_t nheaders, const void *body, size_t len, int *outcome)
{
    idem_layer *l = c->layer;
    *outcome = IDEM_TX_ROLLED_BACK;
    if (c->lost)
        return idem_error_set(IDEM_ELOST, LOST_WHY "; nothing was written (roll the transaction back)");
    int rc = idem__check_completion(l, status, headers, nheaders, body, len);
    if (rc)
        return rc;
    idem_record done = c->rec;
    done.state = IDEM_STATE_COMPLETED;
    done.deadline_ms = 0;
    done.cp_name_len = 0;
    done.headers = headers;
    done.nheaders = nheaders;
    done.status = status;
    done.body = body;
    done.body_len = len;
    uint64_t ttl = (uint64_t)l->opts.ttl_s * 1000u, sent = idem__mono_ms();
    idem__durations_add(&l->durations, sent - c->started);
    rc = write_in_tx(c, conn, &done, ttl, outcome);
    if (rc == IDEM_OK)
        idem__count(&l->executed);
    return rc;
}

/* Check a claim and a connection; IDEM_OK when both may be used. */
static int check_tx(const idem_claim *c, const void *conn, const char *fn)
{
    if (!c || !conn)
        return idem_error_set(IDEM_EINVAL, "%s: claim and conn must not be NULL", fn);
    return idem__store_tx_supported(c->layer->store);
}

int idem_commit_tx(idem_claim *c, void *conn, int status, const void *body, size_t len)
{
    idem__error_clear();
    int rc = check_tx(c, conn, "idem_commit_tx"), outcome;
    if (rc == IDEM_OK)
        rc = idem__claim_commit_tx(c, conn, status, NULL, 0, body ? body : "", len, &outcome);
    if (rc == IDEM_OK || rc == IDEM_ELOST)
        idem__claim_free(c);
    return rc;
}

int idem_checkpoint_tx(idem_claim *c, void *conn, const char *name, const void *data, size_t len)
{
    idem__error_clear();
    size_t name_len = 0;
    int rc = check_tx(c, conn, "idem_checkpoint_tx"), outcome;
    if (rc == IDEM_OK)
        rc = idem__checkpoint_check(c, name, data, len, &name_len);
    if (rc == IDEM_OK && c->lost)
        rc = idem_error_set(IDEM_ELOST, LOST_WHY "; nothing was written (roll the transaction back)");
    if (rc)
        return rc;
    uint8_t *cp = idem__checkpoint_copy(name, name_len, data, len);
    if (!cp)
        return idem_error_set(IDEM_ENOMEM, "out of memory keeping a %zu-byte checkpoint", len);
    idem_layer *l = c->layer;
    uint32_t lease = l->opts.lease_ms;
    idem_record next = c->rec;
    next.cp_name = (const char *)cp;
    next.cp_name_len = name_len;
    next.cp_data = cp + name_len + 1;
    next.cp_len = len;
    next.deadline_ms = idem_now_ms() + lease;
    next.kept_ms = idem__kept_ms(l, lease);
    uint64_t lease_end = idem__mono_ms() + lease;
    if ((rc = write_in_tx(c, conn, &next, (uint64_t)lease + next.kept_ms, &outcome))) {
        free(cp);
        return rc;
    }
    c->rec = next;
    c->lease_end = lease_end;
    idem__checkpoint_adopt(c, cp);
    return IDEM_OK;
}
