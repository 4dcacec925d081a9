/*
 * The state machine's own types, shared by the four files that make it:
 * layer.c (options, layers, store keys), response.c (what a handler sets
 * and what a caller gets), claim.c (claim, commit, abort, extend) and
 * run.c (the handler run between them). Not installed; the rest of the
 * core reaches a layer through internal.h.
 */
#ifndef IDEM_CORE_LAYER_H
#define IDEM_CORE_LAYER_H

#include <pthread.h>

#include "internal.h"

#define MIN_STATUS 100
#define MAX_STATUS 999

typedef _Atomic uint64_t counter;

struct idem_layer {
    idem_store  *store;
    idem_options opts;
    char        *prefix;
    char        *secret;        /* opts.subkey_secret's copy, or NULL */
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
    bool              in_tx;    /* the handler of idem_run_tx(): its work commits with this */
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
    uint8_t    *cp;             /* rec's checkpoint: name, NUL, data (malloc'd); NULL: none */
    _Atomic bool settling;      /* run_tx is committing: renewals stand aside */
    size_t      key_len;
    uint8_t     key[];          /* prefix + user key */
};

static inline void idem__count(counter *c)
{
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

/* Why a claim is no longer in the store, as far as the core can tell. */
#define LOST_WHY "the claim is no longer in the store (its lease ended and another request may have " \
                 "taken the key, or the store lost it in a restart or an eviction)"

/* ---- response.c ---- */
/* Copy len bytes of body into reply->body, NUL-terminated. IDEM_OK or IDEM_ENOMEM. */
int idem__reply_body(idem_reply *reply, const void *body, size_t len);
/* IDEM_OK if (status, body, len) is a response layer l can store; else
 * IDEM_EINVAL or IDEM_ETOOBIG with a message. */
int idem__check_response(const idem_layer *l, int status, const void *body, size_t len);
/* IDEM_OK if a body of len bytes and header fields of fields_len bytes fit
 * in one record of the store; else IDEM_ETOOBIG with a message. */
int idem__check_fields_fit(const idem_layer *l, size_t fields_len, size_t len);
/* All of the above for a claim's response with its header fields, and the
 * store's fork check: IDEM_OK or the first error, with its message. */
int idem__check_completion(const idem_layer *l, int status, const idem_header *headers, size_t nheaders,
                           const void *body, size_t len);

/* ---- checkpoint.c ---- */
/* IDEM_OK if claim c's store can keep the checkpoint (name, data), and
 * *name_len; else IDEM_EINVAL, IDEM_ETOOBIG or IDEM_EUNSUPPORTED with a
 * message. */
int idem__checkpoint_check(const idem_claim *c, const char *name, const void *data, size_t len,
                           size_t *name_len);

/* ---- claim.c ---- */
/* Add "; more" to this thread's message, keeping the code rc. */
int idem__error_append(int rc, const char *more);
/* idem_commit_headers() without its advice to the caller, which idem_run()
 * words differently. Frees c on IDEM_OK and IDEM_ELOST. */
int idem__claim_commit(idem_claim *c, int status, const idem_header *headers, size_t nheaders,
                       const void *body, size_t len);
void idem__claim_free(idem_claim *c);
/* Write the response in the transaction open on conn, fenced by c's token,
 * and commit it (tx.c). Never frees c. IDEM_OK: both committed, counted.
 * IDEM_ELOST: rolled back, taken over (c is marked lost). IDEM_EBACKEND:
 * rolled back, or unknown, as *outcome says (IDEM_TX_*). Else: nothing
 * changed, *outcome IDEM_TX_ROLLED_BACK. */
int idem__claim_commit_tx(idem_claim *c, void *conn, int status, const idem_header *headers,
                          size_t nheaders, const void *body, size_t len, int *outcome);
/* Renew c's lease, c->mu held. */
int idem__claim_extend_locked(idem_claim *c, uint32_t lease_ms);
/* The checkpoint's name, a NUL and its data in one new block; NULL without
 * memory. */
uint8_t *idem__checkpoint_copy(const char *name, size_t name_len, const void *data, size_t len);
/* Make cp (from idem__checkpoint_copy() of c->rec's checkpoint, or NULL
 * for none) the claim's own copy, pointed to by c->rec. */
void idem__checkpoint_adopt(idem_claim *c, uint8_t *cp);
/* How long the store keeps a STARTED record with a checkpoint after a lease
 * of lease_ms. */
uint32_t idem__kept_ms(const idem_layer *l, uint32_t lease_ms);
/* Write c's STARTED record anew, fenced by its token, with a lease of
 * lease_ms from now, and the checkpoint (name, data) in place of c's own
 * (name NULL: keep c's); c->mu held. The store's extend: IDEM_OK, IDEM_ELOST
 * (c is marked lost), IDEM_EBACKEND, IDEM_ENOMEM, IDEM_ETOOBIG. */
int idem__claim_put_locked(idem_claim *c, const char *name, size_t name_len, const void *data, size_t len,
                           uint32_t lease_ms);

#endif
