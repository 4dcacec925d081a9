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
    rc = idem__claim_commit(c, resp.status, resp.headers, resp.nheaders,
                      resp.body ? resp.body : (const void *)"", resp.len);
    if (rc != IDEM_OK)
        idem__count(&l->unstored);
    if (rc != IDEM_OK && rc != IDEM_ELOST) {
        idem__claim_free(c); /* the key stays claimed in the store until its lease ends */
        idem__error_append(rc, "the handler ran and its response is in the reply, but it may not be stored; "
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
        (void)idem__reply_body(reply, "", 0); /* on failure body stays NULL: allowed */
    }
    return rc;
}
