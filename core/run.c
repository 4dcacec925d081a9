/* The decorator: claim, run the handler, commit or abort, in one call. */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

/* auto_extend, on the keeper's thread: renew every third of the lease; stop
 * when the key was taken over or the lease ended without a renewal. */
static bool auto_renew(void *arg, uint64_t *next_due)
{
    idem_claim *c = arg;
    uint32_t lease = c->layer->opts.lease_ms;
    uint64_t third = lease / 3 ? lease / 3 : 1;
    pthread_mutex_lock(&c->mu);
    int rc = idem__claim_extend_locked(c, lease);
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

int idem_run(idem_layer *l, const idem_request *req, idem_handler fn, void *arg, idem_reply *reply)
{
    return idem_run_scoped(l, NULL, 0, req, fn, arg, reply);
}

/* Renew c's lease from the keeper's thread while its handler runs, when
 * the layer has auto_extend; true when renewals were started. */
static bool renewals_start(idem_claim *c)
{
    idem_layer *l = c->layer;
    if (!l->opts.auto_extend)
        return false;
    uint32_t third = l->opts.lease_ms / 3 ? l->opts.lease_ms / 3 : 1;
    c->renewal = (idem_renewal){.renew = auto_renew, .arg = c};
    return idem__keeper_watch(l->keeper, &c->renewal, c->started + third) == IDEM_OK;
}

/* The handler failed with herr: free its key and answer IDEM_FAILED with
 * what it set, which is never stored. The handler's own message (from
 * idem_response_set, say) outlives the abort, which adds to it only when
 * the key could not be freed. */
static int handler_failed(idem_claim *c, idem_response *resp, int herr, idem_reply *reply)
{
    idem_layer *l = c->layer;
    idem__durations_add(&l->durations, idem__mono_ms() - c->started);
    char *why = strdup(idem_last_error());
    int arc = idem_abort(c);
    if (arc == IDEM_EBACKEND || arc == IDEM_ENOMEM)
        idem_error_set(IDEM_OK, "%s%shandler failed, but freeing its key failed too: %s", why ? why : "",
                       why && why[0] ? "; " : "", idem_last_error());
    else
        idem_error_set(IDEM_OK, "%s", why ? why : "");
    free(why);
    reply->outcome = IDEM_FAILED;
    reply->headers = resp->headers;
    reply->nheaders = resp->nheaders;
    reply->status = resp->body ? resp->status : 500;
    reply->body = resp->body;
    reply->body_len = resp->len;
    reply->handler_error = herr;
    reply->abort_error = arc;
    return IDEM_OK;
}

/* The handler's response becomes the reply: IDEM_EXECUTED. */
static void reply_executed(idem_reply *reply, idem_response *resp)
{
    reply->outcome = IDEM_EXECUTED;
    reply->status = resp->status;
    reply->headers = resp->headers;
    reply->nheaders = resp->nheaders;
    if (resp->body) {
        reply->body = resp->body;
        reply->body_len = resp->len;
    } else {
        (void)idem__reply_body(reply, "", 0); /* on failure body stays NULL: allowed */
    }
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
    bool renewing = renewals_start(c);
    int herr = fn(arg, &resp);
    if (renewing)
        idem__keeper_unwatch(l->keeper, &c->renewal);
    if (herr != 0)
        return handler_failed(c, &resp, herr, reply);
    rc = idem__claim_commit(c, resp.status, resp.headers, resp.nheaders,
                            resp.body ? resp.body : (const void *)"", resp.len);
    if (rc != IDEM_OK)
        idem__count(&l->unstored);
    if (rc != IDEM_OK && rc != IDEM_ELOST) {
        idem__claim_free(c); /* the key stays claimed in the store until its lease ends */
        idem__error_append(rc, "the handler ran and its response is in the reply, but it may not be "
                           "stored; the key stays claimed until its lease ends");
    }
    reply_executed(reply, &resp);
    return rc;
}

/* ---- work in the store's database ---- */

#define TX_ATTEMPTS 3 /* runs of a handler whose transaction met a conflict */

int idem_run_tx(idem_layer *l, const idem_request *req, idem_tx_handler fn, void *arg, idem_reply *reply)
{
    return idem_run_tx_scoped(l, NULL, 0, req, fn, arg, reply);
}

/* The order at the end matters: the transaction is committed and its
 * connection given back before renewals stop, because a renewal may be
 * waiting for the write lock the transaction holds (SQLite); c->settling
 * tells such a renewal that finds the key COMPLETED that nothing was lost. */
int idem_run_tx_scoped(idem_layer *l, const void *scope, size_t scope_len, const idem_request *req,
                       idem_tx_handler fn, void *arg, idem_reply *reply)
{
    idem__error_clear();
    if (!fn || !l) {
        idem_reply_clear(reply);
        return idem_error_set(IDEM_EINVAL, "idem_run_tx: layer and handler must not be NULL");
    }
    int rc = idem__store_tx_supported(l->store);
    if (rc) {
        idem_reply_clear(reply);
        return rc;
    }
    idem_claim *c;
    if ((rc = idem_begin_scoped(l, scope, scope_len, req, &c, reply)) || !c)
        return rc;

    bool renewing = renewals_start(c);
    for (int attempt = 1;; attempt++) {
        void *tx, *conn;
        if ((rc = idem__store_tx_begin(l->store, &tx, &conn))) {
            if (renewing)
                idem__keeper_unwatch(l->keeper, &c->renewal);
            char *why = strdup(idem_last_error());
            (void)idem_abort(c);
            idem_error_set(rc, "%s; nothing ran, and the key was given up", why ? why : "");
            free(why);
            return rc;
        }
        idem_response resp = {.layer = l, .status = 200, .claim = c, .in_tx = true};
        int herr = fn(arg, conn, &resp);
        if (herr != 0) {
            idem__store_tx_end(l->store, tx); /* rolls the handler's writes back */
            if (renewing)
                idem__keeper_unwatch(l->keeper, &c->renewal);
            return handler_failed(c, &resp, herr, reply);
        }
        atomic_store(&c->settling, true);
        int outcome;
        rc = idem__claim_commit_tx(c, conn, resp.status, resp.headers, resp.nheaders,
                                   resp.body ? resp.body : (const void *)"", resp.len, &outcome);
        idem__store_tx_end(l->store, tx);
        if (rc == IDEM_EBACKEND && outcome == IDEM_TX_RETRY && attempt < TX_ATTEMPTS &&
            idem__mono_ms() < c->lease_end) {
            atomic_store(&c->settling, false);
            free(resp.body);
            free(resp.headers);
            continue;
        }
        if (renewing)
            idem__keeper_unwatch(l->keeper, &c->renewal);
        if (rc == IDEM_EINVAL) {
            /* The handler ended the transaction itself: its work is
             * committed without the response, which is stored now by a
             * commit of its own, as idem_run() stores one. */
            atomic_store(&c->settling, false);
            rc = idem__claim_commit(c, resp.status, resp.headers, resp.nheaders,
                                    resp.body ? resp.body : (const void *)"", resp.len);
            if (rc != IDEM_OK && rc != IDEM_ELOST)
                idem__claim_free(c); /* the key stays claimed until its lease ends */
            reply_executed(reply, &resp);
            return rc;
        }
        if (rc == IDEM_OK) {
            idem__claim_free(c);
            reply_executed(reply, &resp);
            return IDEM_OK;
        }
        free(resp.body);
        free(resp.headers);
        if (rc == IDEM_ELOST || (rc == IDEM_EBACKEND && outcome == IDEM_TX_UNKNOWN)) {
            idem__claim_free(c); /* taken over, or claimed until its lease ends */
            return rc;
        }
        /* Rolled back: nothing of the run remains, so the key is freed. */
        char *why = strdup(idem_last_error());
        int arc = idem_abort(c);
        idem_error_set(rc, "%s; the transaction was rolled back and nothing of the run remains; the key "
                       "%s; retry", why ? why : "", arc == IDEM_OK ? "was freed" : "frees itself when its "
                       "lease ends");
        free(why);
        return rc;
    }
}
