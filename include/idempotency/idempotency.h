/*
 * libidempotency: run a request handler once per idempotency key, across
 * threads, processes and machines that share one store.
 *
 * Conventions used throughout this header:
 *   - Every function returns IDEM_OK (0) or a negative IDEM_E* code unless its
 *     comment says otherwise. On failure, idem_last_error() returns a sentence
 *     that says what failed and what to do next, for the calling thread.
 *   - A function that makes an object takes its out-parameter first
 *     (idem_store_open(&store, url), idem_layer_new(&layer, ...)); one that
 *     acts on an object takes that object first and its results last
 *     (idem_begin(layer, req, &claim, &reply), idem_layer_show(..., &info)).
 *     What an out-parameter points to afterwards is owned by the caller and
 *     released with the matching *_free / *_clear / *_close.
 *   - "Thread-safe" means the object may be used by many threads at once
 *     without locking of your own.
 *
 * Driver authors: see <idempotency/backend.h>.
 */
#ifndef IDEMPOTENCY_IDEMPOTENCY_H
#define IDEMPOTENCY_IDEMPOTENCY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define IDEM_API
#else
#  define IDEM_API __attribute__((visibility("default")))
#endif

#define IDEM_VERSION_MAJOR 0
#define IDEM_VERSION_MINOR 3
#define IDEM_VERSION_PATCH 0

/* The version of the library the program runs with ("0.3.0"), which may be
 * newer than the IDEM_VERSION_* it was compiled with. Static string, never
 * NULL. Thread-safe. (Since 0.3.) */
IDEM_API const char *idem_version(void);

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */
/* ------------------------------------------------------------------------ */

/*
 * The one table of error codes: name, value, message. Codes are only ever
 * appended; none is removed or renumbered.
 */
#define IDEM_ERROR_MAP(X)                                                        \
    X(OK,           0, "success")                                               \
    X(EINVAL,      -1, "invalid argument")                                      \
    X(ENOMEM,      -2, "out of memory")                                         \
    X(EBACKEND,    -3, "store unreachable or failing")                          \
    X(ELOST,       -4, "claim lost: its lease ended and another request took the key") \
    X(ECORRUPT,    -5, "record in the store was not written by this library")   \
    X(ETOOBIG,     -6, "response larger than the configured or store limit")    \
    X(EUNSUPPORTED,-7, "not supported by this build or this store")            \
    X(EKEY,        -8, "the client's idempotency key is missing or invalid")

typedef enum idem_error {
#define IDEM_ERROR_ENUM_(name, value, msg) IDEM_##name = (value),
    IDEM_ERROR_MAP(IDEM_ERROR_ENUM_)
#undef IDEM_ERROR_ENUM_
} idem_error;

/* The fixed message of a code ("unknown error" for a code not in the table).
 * Never NULL; the string is static. Thread-safe. */
IDEM_API const char *idem_strerror(int err);

/* The code's name as written in C ("IDEM_ELOST"); "IDEM_UNKNOWN" otherwise. */
IDEM_API const char *idem_error_name(int err);

/* The detail of the calling thread's last failure: what failed, on which
 * store, and what to do next. Never NULL ("" when nothing failed yet). The
 * string stays valid until this thread's next call into the library.
 * Passwords from store URLs never appear in it. */
IDEM_API const char *idem_last_error(void);

/* ------------------------------------------------------------------------ */
/* Stores                                                                   */
/* ------------------------------------------------------------------------ */

/*
 * A connection to one store, chosen by URL scheme at run time:
 *
 *   sqlite:///absolute/path.db          embedded, one host (WAL mode)
 *   redis://[[user]:password@]host[:port][/db]
 *   redis+unix:///path/to/redis.sock[?db=N&password=...]
 *   redis+cluster://host:port[,host:port...]
 *   redis+sentinel://host:port[,host:port...]/MASTERNAME
 *   memcached://host:port[,host:port...]
 *   postgresql://[user[:password]@]host[:port][,host...]/dbname
 *                                       (also postgres://)
 *   memory://[name]                     in-process, for tests
 *
 * Each takes ?name=value parameters (timeouts and more); an unknown one is
 * refused with the list of those its driver knows. docs/operating.md lists
 * them. A scheme whose driver this build lacks is IDEM_EUNSUPPORTED.
 *
 * Thread-safe: a store keeps its own pool of connections, so one store
 * serves every thread of a process. A store belongs to the process that
 * opened it: after fork(), open another in the child. Requests on an
 * inherited store return IDEM_EINVAL, and closing it there frees only the
 * handle: the parent's connections and the driver's memory are left alone.
 */
typedef struct idem_store idem_store;

/* Open a store. On success *out is a new store to close with
 * idem_store_close(); on failure *out is NULL.
 * Errors: IDEM_EINVAL (NULL argument, malformed URL, unknown scheme),
 * IDEM_EUNSUPPORTED (the driver for the scheme is not built in),
 * IDEM_EBACKEND (the store could not be reached or set up), IDEM_ENOMEM. */
IDEM_API int idem_store_open(idem_store **out, const char *url);

/* Close a store and its connections. Every layer made on it must have been
 * freed first. NULL is a no-op. */
IDEM_API void idem_store_close(idem_store *store);

/* The driver's name: "sqlite", "redis", "memcached", "postgresql",
 * "memory", or a custom driver's.
 * Static string; NULL for a NULL store. */
IDEM_API const char *idem_store_backend(const idem_store *store);

/* ------------------------------------------------------------------------ */
/* Policy                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct idem_options {
    uint32_t    lease_ms;          /* how long a claim blocks its key if its holder dies; default 60000 */
    uint32_t    ttl_s;             /* how long a completed response is replayed; default 86400 */
    const char *key_prefix;        /* prepended to every key in the store; copied; NULL or the
                                      default is "idem:". 2..255 bytes: any bytes but ':', then
                                      one ':' ("orders:", "shop-{eu}:"), so that two prefixes
                                      never make the same store key; not ending in '#' and 32
                                      lower-case hex digits before the ':', the store key of a
                                      scope (docs/contract.md, section 2) */
    size_t      max_key_len;       /* longest accepted key, in bytes, prefix excluded; default 255 */
    size_t      max_response_len;  /* largest accepted response body; default 1 MiB (0: only
                                      empty bodies) */
    /* ---- since 0.2 ---- */
    size_t      cache_bytes;       /* memory for a local cache of COMPLETED responses, replayed
                                      with no round trip; default 0: no cache. Entries leave no
                                      later than the store's record (the commit's ttl_s, or the
                                      TTL the store reported), least recently used first; a
                                      different fingerprint is still IDEM_MISMATCH; STARTED
                                      records are never cached. A record deleted by another
                                      process (idem delete) is replayed from here until then */
    bool        auto_extend;       /* renew the lease of a handler run by idem_run() while it
                                      runs, every third of lease_ms, from a thread of the layer;
                                      default false. A process that dies or stops stops renewing,
                                      so its key still frees itself one lease later */
    uint32_t    commit_timeout_ms; /* how long idem_run() and idem_commit() retry a failed
                                      commit; default 0: until the lease nearly ends. Set it
                                      below the HTTP timeout in front of the service. Each
                                      attempt gets only the time left, so the call returns
                                      within about 50 ms of it, and 50 ms before the lease
                                      ends (docs/contract.md, section 4) */
    /* ---- since 0.3 ---- */
    const char *subkey_secret;     /* mixed into idem_claim_subkey(); copied; default NULL (none).
                                      Give every machine the same one, and never change it while
                                      keys live: a changed secret gives a step a new subkey */
    /* Later versions take new fields from this space, so the struct keeps
     * its size; idem_options_init() fills them all, so always call it before
     * setting fields of your own. */
    uint64_t    reserved_[5];
} idem_options;

/* Fill *opts with the defaults above. NULL is a no-op. */
IDEM_API void idem_options_init(idem_options *opts);

/* ------------------------------------------------------------------------ */
/* Layers                                                                   */
/* ------------------------------------------------------------------------ */

/* A policy bound to a store. Thread-safe. Two layers with different key
 * prefixes on one store never see each other's records. */
typedef struct idem_layer idem_layer;

/* Make a layer. opts NULL means the defaults; opts is copied. The store must
 * outlive the layer.
 * Errors: IDEM_EINVAL (NULL out or store; lease_ms or ttl_s 0; max_key_len
 * 0 or over 1024; a key_prefix that is not a name and one ':' at its end,
 * one whose name ends in '#' and 32 lower-case hex digits, or one longer
 * than 255 bytes), IDEM_ENOMEM (also when libcrypto cannot be set up,
 * or, with auto_extend, the layer's thread cannot be started). */
IDEM_API int idem_layer_new(idem_layer **out, idem_store *store, const idem_options *opts);

/* Free a layer. Every claim made through it must have been committed or
 * aborted first. Stops the layer's thread, if it has one; keys it was still
 * waiting to free are left to free themselves when their leases end. NULL is
 * a no-op. */
IDEM_API void idem_layer_free(idem_layer *layer);

/* ------------------------------------------------------------------------ */
/* One request                                                              */
/* ------------------------------------------------------------------------ */

typedef struct idem_request {
    const void *key;          /* the idempotency key: any bytes, 1..max_key_len */
    size_t      key_len;
    const void *fingerprint;  /* the request's payload or its hash; NULL: not checked */
    size_t      fingerprint_len;
} idem_request;

/*
 * The one table of outcomes: name, value, meaning. Outcomes are only ever
 * appended; none is removed or renumbered.
 *   EXECUTED     the handler ran now; its response is stored (unless the call
 *                returned an error: see idem_reply_ran())
 *   REPLAYED     an earlier request completed; its response, byte for byte
 *   IN_PROGRESS  another request holds the key; retry after retry_after_ms
 *                (HTTP 409)
 *   MISMATCH     the key was used with a different fingerprint; nothing ran
 *                (HTTP 422)
 *   FAILED       the handler ran and failed; nothing stored, key freed for a
 *                retry (unless reply.abort_error says it could not be)
 */
#define IDEM_OUTCOME_MAP(X)                                                      \
    X(EXECUTED,    1)                                                           \
    X(REPLAYED,    2)                                                           \
    X(IN_PROGRESS, 3)                                                           \
    X(MISMATCH,    4)                                                           \
    X(FAILED,      5)

typedef enum idem_outcome {
#define IDEM_OUTCOME_ENUM_(name, value) IDEM_##name = (value),
    IDEM_OUTCOME_MAP(IDEM_OUTCOME_ENUM_)
#undef IDEM_OUTCOME_ENUM_
} idem_outcome;

/* The outcome's name without its IDEM_ prefix ("EXECUTED"), for logs; "NONE"
 * for 0 (a reply that holds no outcome), "UNKNOWN" for any other value.
 * Static string, never NULL. Thread-safe. (Since 0.3.) */
IDEM_API const char *idem_outcome_name(int outcome);

/*
 * One header field of a stored response (since 0.2), e.g. {"Location",
 * "/payments/pay_1"}. A name is an RFC 9110 token: 1..255 letters, digits
 * and !#$%&'*+-.^_`|~. A value is any bytes but NUL, CR and LF (so a stored
 * field can never split a response), and may be empty. Fields are stored in
 * the order given and replayed byte for byte: names keep their case. Store
 * end-to-end fields (Content-Type, Location, ETag); the server sets the ones
 * of each transfer (Content-Length, Transfer-Encoding, Date) itself.
 */
typedef struct idem_header {
    const char *name;
    const char *value;
} idem_header;

/* The most header fields one response may carry, and the most bytes their
 * names and values may take together. More is IDEM_ETOOBIG. */
#define IDEM_MAX_HEADERS     64
#define IDEM_MAX_HEADERS_LEN 16384

/*
 * What idem_run(), idem_begin() and their variants answer.
 *
 * A reply given to the library must be zeroed (idem_reply r = {0}, or
 * idem_reply_clear()) or hold an earlier reply of the library: its body and
 * headers are freed before it is filled, so a reply of uninitialised memory
 * makes the library free garbage pointers and crash.
 *
 * Read the outcome even when the call returned an error. A handler that ran
 * and succeeded leaves IDEM_EXECUTED and its response in the reply whatever
 * became of storing it: idem_run() may return IDEM_EBACKEND (the response
 * could not be stored) or IDEM_ELOST (the key was taken over) with the work
 * done. Such an error does not mean "nothing ran": answer with the reply,
 * do not run the work again. idem_reply_ran() says it in one call.
 */
typedef struct idem_reply {
    idem_outcome   outcome;         /* 0 when the call failed before any outcome */
    int            status;          /* handler's or stored status; 409 for IN_PROGRESS; 422 for
                                       MISMATCH; for FAILED what the handler set, else 500 */
    unsigned char *body;            /* owned by the reply; NUL-terminated; NULL when there is none.
                                       FAILED: what the handler set (never stored) */
    size_t         body_len;
    uint32_t       retry_after_ms;  /* IN_PROGRESS only: when to retry. An estimate: the 95th
                                       percentile of the durations of this layer's recent
                                       handlers, less the time the holder has already run;
                                       before a layer has seen 4 handlers finish, the time left
                                       on the holder's lease. Never 0, never more than the time
                                       left on the holder's lease */
    int            handler_error;   /* FAILED only: the handler's return value */
    /* ---- since 0.2 ---- */
    int            abort_error;     /* FAILED only: IDEM_OK when the key was freed for a retry.
                                       Otherwise what freeing it returned: IDEM_EBACKEND or
                                       IDEM_ENOMEM (the key stays claimed until the layer frees
                                       it, once the store answers again, or its lease ends),
                                       IDEM_ELOST (the lease had ended already) */
    uint32_t       reserved32_;     /* zero */
    idem_header   *headers;         /* EXECUTED, REPLAYED, FAILED: the response's header fields,
                                       in order; owned by the reply (one block, strings
                                       included); NULL when there are none */
    size_t         nheaders;
    uint64_t       reserved_[1];    /* room for fields of later versions; zero */
} idem_reply;

/* Release a reply's body and headers and zero it, ready for reuse. NULL is a no-op.
 * A reply passed to idem_run() or idem_begin() may hold an earlier body: it
 * is released first. A zero-initialised reply is always valid. */
IDEM_API void idem_reply_clear(idem_reply *reply);

/* Did the handler run in the call that filled reply? true for IDEM_EXECUTED
 * and IDEM_FAILED, whatever the call returned; false for every other
 * outcome, for a reply with none (the call failed before the handler could
 * run) and for NULL. When true after an error, the work is done: answer with
 * reply (status, headers, body), log idem_last_error(), and never run the
 * work again for this request. Reads nothing but *reply. (Since 0.3.) */
IDEM_API bool idem_reply_ran(const idem_reply *reply);

/* ------------------------------------------------------------------------ */
/* The decorator                                                            */
/* ------------------------------------------------------------------------ */

/* The response a handler is building. Only valid inside the handler. */
typedef struct idem_response idem_response;

/* Set the response: status (100..999) and a body that is copied. Calling it
 * again replaces the earlier one. len 0 with body NULL is an empty body.
 * Errors: IDEM_EINVAL (NULL resp, status out of range, NULL body with len >
 * 0), IDEM_ETOOBIG (len above the layer's max_response_len or what the store
 * can hold; the earlier response, if any, stays), IDEM_ENOMEM.
 * A handler that returns 0 without setting a response stores status 200 and
 * an empty body. */
IDEM_API int idem_response_set(idem_response *resp, int status, const void *body, size_t len);

/* Renew the lease of the running handler's claim to lease_ms from now, as
 * idem_extend() does for a claim of idem_begin(); lease_ms 0 means the
 * layer's lease_ms. Call it from the handler (its thread) only.
 * IDEM_ELOST: the key was found taken over (by this call or by an earlier
 * renewal, auto_extend's included): stop before any side effect, the
 * response will not be stored. IDEM_EBACKEND, IDEM_ENOMEM: the old lease
 * stands. IDEM_EINVAL: NULL resp. */
IDEM_API int idem_response_extend(idem_response *resp, uint32_t lease_ms);

/* Milliseconds left on the running handler's lease, counted from when its
 * claim (or its last renewal) was sent: what a handler checks before a side
 * effect that must not outlive its claim. 0 when the lease has ended or a
 * renewal found the key taken over (or resp is NULL). Reads no store.
 * Call it from the handler only. */
IDEM_API uint32_t idem_response_lease_left_ms(const idem_response *resp);

/* Add a header field to the response (since 0.2): name and value are copied
 * and stored with status and body, and every replay returns the fields in
 * the order they were added, byte for byte (idem_reply.headers).
 * idem_response_set() leaves the fields alone.
 * Errors: IDEM_EINVAL (NULL argument, a name that is not a token, a value
 * with NUL, CR or LF), IDEM_ETOOBIG (more than IDEM_MAX_HEADERS fields, more
 * than IDEM_MAX_HEADERS_LEN bytes of names and values, or a response the
 * store cannot hold); the fields added before stay. IDEM_ENOMEM. */
IDEM_API int idem_response_add_header(idem_response *resp, const char *name, const char *value);

/* A handler: 0 means success and its response is stored; any other value is
 * a failure, and the key is freed so that a retry runs the handler again. */
typedef int (*idem_handler)(void *arg, idem_response *resp);

/*
 * Run fn at most once per key.
 *
 * Returns IDEM_OK with reply->outcome set to one of idem_outcome, or an
 * error. Some errors come in two kinds, told apart by idem_reply_ran(reply):
 * false, nothing ran; true, the handler ran and reply holds its response.
 *   IDEM_EINVAL    NULL layer, req, fn or reply; key empty or longer than
 *                  max_key_len; NULL key or fingerprint pointer with a length
 *   IDEM_EBACKEND  the store failed. idem_reply_ran() false: before the
 *                  handler ran, and nothing ran. A
 *                  claim that timed out may still reach the store; the layer
 *                  remembers its token and frees it (fenced) once the store
 *                  answers again, so retries get IDEM_IN_PROGRESS only until
 *                  then (at most until its lease ends). Also when the claim
 *                  was won but its reply came back with less than half of
 *                  the lease left (counted from when it was sent): the
 *                  handler does not run, and the key is given up at once.
 *                  idem_reply_ran() true: the handler succeeded and its
 *                  response could not be stored within the lease or
 *                  commit_timeout_ms: reply holds IDEM_EXECUTED and the
 *                  response (answer with it: the work is done), and the key
 *                  stays claimed until the lease ends
 *   IDEM_ECORRUPT  the store holds, under this key, a record this library did
 *                  not write; nothing ran
 *   IDEM_ELOST     the handler ran longer than the lease, another request took
 *                  the key, and this response was not stored (reply holds it,
 *                  with IDEM_EXECUTED: idem_reply_ran() is true)
 *   IDEM_ENOMEM    idem_reply_ran() false: nothing ran. true: memory ran out
 *                  for good after the handler succeeded (it is retried as a
 *                  store error is), and the rest is as for IDEM_EBACKEND
 * Thread-safe. fn is called on the calling thread, at most once.
 */
IDEM_API int idem_run(idem_layer *layer, const idem_request *req, idem_handler fn, void *arg,
                      idem_reply *reply);

/* ------------------------------------------------------------------------ */
/* The same in steps                                                        */
/* ------------------------------------------------------------------------ */

/* A held key. Not thread-safe: one thread at a time may use a claim. */
typedef struct idem_claim idem_claim;

/*
 * Claim the key of req.
 *   IDEM_OK, *claim != NULL: the caller holds the key and must call
 *       idem_commit() or idem_abort(), which free the claim (the pointer is
 *       dangling afterwards); reply is left zeroed.
 *   IDEM_OK, *claim == NULL: reply holds IDEM_REPLAYED, IDEM_IN_PROGRESS or
 *       IDEM_MISMATCH.
 * Errors are those of idem_run() before the handler runs; *claim is NULL. A
 * claim won too late (less than half its lease left) is given up and is
 * IDEM_EBACKEND. IDEM_ENOMEM after the claim was won: the key was given up,
 * or, when the message says so, it stays claimed until the layer can free
 * it or its lease ends.
 */
IDEM_API int idem_begin(idem_layer *layer, const idem_request *req, idem_claim **claim,
                        idem_reply *reply);

/*
 * Scopes. A scope (a tenant, an account, an API client: any bytes, 1 to 255)
 * keeps keys apart: the same key in two scopes names two records, and a key
 * without a scope never meets a scoped one. The scope does not count against
 * max_key_len: the store key holds 128 bits of its SHA-256, not the scope.
 * These behave as idem_run() and idem_begin(); scope NULL with scope_len 0
 * is no scope. IDEM_EINVAL also for an empty or over-long scope.
 */
IDEM_API int idem_run_scoped(idem_layer *layer, const void *scope, size_t scope_len,
                             const idem_request *req, idem_handler fn, void *arg, idem_reply *reply);
IDEM_API int idem_begin_scoped(idem_layer *layer, const void *scope, size_t scope_len,
                               const idem_request *req, idem_claim **claim, idem_reply *reply);

/*
 * Store the response and free the claim. A store error, and a lack of
 * memory, are retried within the lease (and within commit_timeout_ms when
 * set) before they are returned.
 *   IDEM_OK      stored; the claim is freed
 *   IDEM_ELOST   the lease had ended and another request took the key;
 *                nothing changed; the claim is freed
 *   IDEM_ETOOBIG the response is over the limit; the claim stays (commit a
 *                smaller one or abort)
 *   IDEM_EBACKEND the store kept failing until the lease was nearly over
 *                or commit_timeout_ms passed;
 *                the claim stays and the key stays claimed (commit again,
 *                or abort)
 *   IDEM_EINVAL  NULL claim, status out of range, NULL body with len > 0
 *                (the claim, if any, stays)
 *   IDEM_ENOMEM  memory ran short until the lease was nearly over or
 *                commit_timeout_ms passed; the claim stays
 */
IDEM_API int idem_commit(idem_claim *claim, int status, const void *body, size_t len);

/* idem_commit() with header fields (since 0.2): nheaders fields at headers
 * (NULL with 0 for none) are stored with status and body, as
 * idem_response_add_header() describes, and the claim is freed as
 * idem_commit() says. A bad field is IDEM_EINVAL and too many or too long
 * fields IDEM_ETOOBIG, both with the claim kept. */
IDEM_API int idem_commit_headers(idem_claim *claim, int status, const idem_header *headers,
                                 size_t nheaders, const void *body, size_t len);

/* Give the key up so a retry runs, and free the claim (always, even on
 * error). IDEM_ELOST: the lease had already ended, and the key may have been
 * taken over. IDEM_EBACKEND or IDEM_ENOMEM: the store could not be told; the
 * layer frees the key (fenced by its token) once the store answers again,
 * else it frees itself when the lease ends. NULL is IDEM_EINVAL. */
IDEM_API int idem_abort(idem_claim *claim);

/* Renew the lease to lease_ms from now, for a handler that runs long.
 * IDEM_ELOST: the lease had ended (the key may have been taken over); the
 * claim must still be committed or aborted, and both then return IDEM_ELOST
 * and free it. IDEM_EBACKEND or IDEM_ENOMEM: the old lease stands.
 * IDEM_EINVAL: NULL claim or lease 0. */
IDEM_API int idem_extend(idem_claim *claim, uint32_t lease_ms);

/* ------------------------------------------------------------------------ */
/* Exactly once for the work itself (since 0.3)                            */
/* ------------------------------------------------------------------------ */

/*
 * idem_run() runs a handler at most once while its record lives; a process
 * killed after its work but before its commit leaves the key STARTED, and
 * the request after the lease runs the work again. Two tools close that
 * window (docs/contract.md, "Exactly once"):
 *
 *   - Work in the store's own database (PostgreSQL, SQLite) commits in the
 *     same transaction as the stored response: idem_run_tx(), or
 *     idem_begin() then idem_commit_tx() on a connection of one's own. A
 *     process killed at any instant leaves both or neither.
 *   - Work elsewhere (a card processor, another service) is done in steps:
 *     each step saves a checkpoint, fenced by the claim's token, and calls
 *     the other service with a subkey it deduplicates on. A claim that
 *     takes a dead holder's key over starts from its last checkpoint.
 */

/* The longest checkpoint name (bytes, NUL excluded) and data. */
#define IDEM_CHECKPOINT_NAME_MAX 255
#define IDEM_CHECKPOINT_MAX      65536
/* Bytes of a subkey, NUL included: 64 lower-case hex digits. */
#define IDEM_SUBKEY_SIZE         65

/*
 * A handler that works in the store's database. conn is a PGconn *
 * (postgresql) or a sqlite3 * (sqlite) on the store's own database, inside
 * a transaction the library opened: run statements there, never end the
 * transaction, never keep conn after returning. 0: success; anything else
 * is a failure, as for idem_handler.
 */
typedef int (*idem_tx_handler)(void *arg, void *conn, idem_response *resp);

/*
 * idem_run() for work in the store's database. The handler runs inside a
 * transaction on one of the store's connections; on 0 the response is
 * written in that transaction, fenced by the claim's token, and the
 * transaction commits: the handler's writes and the stored response become
 * durable together or not at all.
 *   IDEM_OK, EXECUTED   both committed
 *   IDEM_OK, FAILED     the handler failed: its writes were rolled back and
 *                       the key freed, as idem_run() says
 *   IDEM_ELOST          the key was taken over meanwhile (the lease ended):
 *                       everything the handler wrote was rolled back; reply
 *                       holds no outcome
 *   IDEM_EBACKEND       the transaction could not commit: rolled back and
 *                       the key freed (nothing of the run remains; retry),
 *                       or, when the message says its outcome is unknown,
 *                       the key stays claimed until its lease ends. A
 *                       serialization failure or deadlock (PostgreSQL's
 *                       repeatable read and serializable) runs the handler
 *                       again in a new transaction, up to 3 times within
 *                       the lease, before it is returned
 *   IDEM_EUNSUPPORTED   the store is not PostgreSQL or SQLite (or its
 *                       driver predates version 3 of the table): nothing ran
 * and the other errors of idem_run() before the handler runs.
 */
IDEM_API int idem_run_tx(idem_layer *layer, const idem_request *req, idem_tx_handler fn, void *arg,
                         idem_reply *reply);
IDEM_API int idem_run_tx_scoped(idem_layer *layer, const void *scope, size_t scope_len,
                                const idem_request *req, idem_tx_handler fn, void *arg,
                                idem_reply *reply);

/*
 * Commit the caller's transaction on conn (a PGconn * or sqlite3 * of one's
 * own, on the store's database, with a transaction open) together with the
 * response: the response is written in it, fenced by the claim's token,
 * and the transaction commits.
 *   IDEM_OK      both committed; the claim is freed
 *   IDEM_ELOST   the key was taken over: the transaction was rolled back;
 *                the claim is freed
 *   IDEM_EBACKEND the transaction could not commit and was rolled back
 *                (the claim stays: do the work again in a new transaction,
 *                or idem_abort()). A commit whose outcome is unknown (the
 *                connection broke during it) is settled by reading the
 *                record: committed is IDEM_OK; when even that cannot be
 *                told, IDEM_EBACKEND says so and the claim stays
 *   IDEM_EUNSUPPORTED the store is neither PostgreSQL nor SQLite; nothing
 *                changed, the claim stays
 *   IDEM_EINVAL, IDEM_ETOOBIG, IDEM_ENOMEM: as idem_commit(), nothing
 *                changed
 */
IDEM_API int idem_commit_tx(idem_claim *claim, void *conn, int status, const void *body, size_t len);

/*
 * Save a checkpoint: a step's name (1..IDEM_CHECKPOINT_NAME_MAX bytes, no
 * NUL) and up to IDEM_CHECKPOINT_MAX bytes of data, in the key's STARTED
 * record, fenced by the claim's token, in one round trip; it also renews
 * the lease, as idem_extend() does. Every store. The checkpoint outlives
 * its holder: a claim that takes the key over (the holder died, its lease
 * ended, or it called idem_abort()) gets it from idem_claim_checkpoint().
 *   IDEM_OK; IDEM_ELOST (taken over: nothing saved; commit or abort);
 *   IDEM_EINVAL (bad name, NULL data with a length), IDEM_ETOOBIG (data or
 *   the record over the limit); IDEM_EBACKEND, IDEM_ENOMEM (the earlier
 *   checkpoint stands); IDEM_EUNSUPPORTED (a driver before version 3).
 */
IDEM_API int idem_checkpoint(idem_claim *claim, const char *name, const void *data, size_t len);

/* idem_checkpoint() inside the caller's transaction on conn (PostgreSQL,
 * SQLite), which it then commits: the step's own writes and its checkpoint
 * become durable together. Results as idem_commit_tx(), but the claim is
 * never freed: IDEM_OK (both committed), IDEM_ELOST (rolled back),
 * IDEM_EBACKEND (rolled back; or unknown, as the message says). */
IDEM_API int idem_checkpoint_tx(idem_claim *claim, void *conn, const char *name, const void *data,
                                size_t len);

/* The checkpoint this claim holds: its own last one, else the one it took
 * over. *name is "" and *len 0 when there is none. The pointers stay valid
 * until the next checkpoint, commit or abort of the claim. IDEM_OK, or
 * IDEM_EINVAL for a NULL argument. */
IDEM_API int idem_claim_checkpoint(const idem_claim *claim, const char **name, const void **data,
                                   size_t *len);

/*
 * A key for a call to another idempotent service (a card processor's
 * Idempotency-Key) on behalf of this claim's step: out gets 64 hex digits
 * and a NUL (IDEM_SUBKEY_SIZE bytes). The same for every holder of this key
 * and step, on every machine, across takeovers; different for any other
 * key, scope, prefix or step. It is a SHA-256 digest, so it reveals nothing
 * of the key to whoever cannot guess it; set idem_options.subkey_secret (the
 * same on every machine) so that it reveals nothing even to one who can.
 * IDEM_OK; IDEM_EINVAL (NULL argument, empty step, out_size below
 * IDEM_SUBKEY_SIZE); IDEM_ENOMEM (libcrypto failed).
 */
IDEM_API int idem_claim_subkey(const idem_claim *claim, const char *step, char *out, size_t out_size);

/* The same for the handler of idem_run() and idem_run_tx(), through its
 * response: idem_checkpoint(), idem_claim_checkpoint() and
 * idem_claim_subkey() on the handler's claim. */
IDEM_API int idem_response_checkpoint(idem_response *resp, const char *name, const void *data,
                                      size_t len);
IDEM_API int idem_response_checkpoint_get(const idem_response *resp, const char **name,
                                          const void **data, size_t *len);
IDEM_API int idem_response_subkey(const idem_response *resp, const char *step, char *out,
                                  size_t out_size);

/* ------------------------------------------------------------------------ */
/* Counters                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct idem_stats {
    uint64_t executed;       /* responses stored (idem_run or idem_commit returned IDEM_OK) */
    uint64_t replayed, in_progress, mismatched;   /* outcomes of claims that lost */
    uint64_t failed;         /* failed handlers and idem_abort() calls */
    uint64_t lost;           /* claims found taken over (IDEM_ELOST) */
    uint64_t backend_errors; /* store calls that failed, retries included */
    /* ---- since 0.2 ---- */
    uint64_t unstored;       /* handlers run by idem_run() that succeeded but whose response
                                could not be stored (a store error, commit_timeout_ms, or
                                IDEM_ELOST): the work is done and a retry after the lease may
                                do it again. The number an operator must watch */
    uint64_t extended;       /* lease renewals that succeeded (idem_extend(),
                                idem_response_extend() and auto_extend) */
    uint64_t claims_freed;   /* keys freed later by the layer: claims whose reply was lost,
                                and keys the store could not be told to free at the time */
    uint64_t cache_hits;     /* replays answered from the local cache, no round trip */
    uint64_t reserved_[5];   /* room for counters of later versions; zero */
} idem_stats;

/* Counters since idem_layer_new(), read without locking (each is exact; the
 * set is not one atomic snapshot). Zeroes *out for a NULL layer. */
IDEM_API void idem_layer_stats(const idem_layer *layer, idem_stats *out);


/* ------------------------------------------------------------------------ */
/* Operators: look at one key, free it, list keys, check a store's settings */
/* ------------------------------------------------------------------------ */

/*
 * For the people on call (the `idem` command is built on these), never for
 * the request path: each call is a round trip of its own, and idem_layer_delete()
 * can make a retry run a handler again. They need the driver's read member
 * (and remove, for forced deletes; list, for idem_layer_list()): a driver
 * without them answers IDEM_EUNSUPPORTED.
 */

typedef enum idem_key_state {
    IDEM_KEY_ABSENT = 0,  /* no record, or an expired one */
    IDEM_KEY_STARTED,     /* claimed: a handler runs, or its holder died and the lease runs out */
    IDEM_KEY_COMPLETED,   /* a stored response, replayed to every retry */
    IDEM_KEY_FOREIGN      /* a value libidempotency did not write (or a damaged one) */
} idem_key_state;

typedef struct idem_key_info {
    idem_key_state state;
    uint32_t       remaining_ms;     /* STARTED: lease left; COMPLETED: ttl left; UINT32_MAX
                                        when the store cannot tell (and the record has no
                                        deadline to tell it by) */
    uint64_t       deadline_ms;      /* STARTED: the lease deadline in the record, Unix epoch ms */
    uint8_t        token[16];        /* STARTED, COMPLETED: the token of the claim that wrote it */
    bool           has_fingerprint;  /* the claim carried a fingerprint */
    uint8_t        fingerprint_digest[32];  /* its SHA-256, when has_fingerprint */
    int            status;           /* COMPLETED: the stored status */
    idem_header   *headers;          /* COMPLETED: the stored header fields, in order; owned (one
                                        block, strings included); NULL when there are none */
    size_t         nheaders;
    const unsigned char *body;       /* COMPLETED: the stored body; points into value */
    size_t         body_len;
    unsigned char *value;            /* the bytes under the key as the store holds them (all of
                                        a FOREIGN value); owned; NULL when ABSENT */
    size_t         value_len;
    uint8_t        store_key[1312];  /* the full store key: prefix, scope tag, key */
    size_t         store_key_len;
    /* ---- since 0.3 ---- */
    char          *checkpoint_name;  /* STARTED: the last checkpoint's name (owned,
                                        NUL-terminated), NULL when there is none */
    const unsigned char *checkpoint; /* its data; points into value */
    size_t         checkpoint_len;
    uint64_t       reserved_[1];     /* room for fields of later versions; zero */
} idem_key_info;

/* Release what *info owns and zero it. NULL is a no-op; a zeroed info is
 * valid. */
IDEM_API void idem_key_info_clear(idem_key_info *info);

/*
 * Describe the record under (scope, key) in layer's key space into *out
 * (cleared first; clear it again with idem_key_info_clear()). An absent key
 * is IDEM_OK with state IDEM_KEY_ABSENT; a value this library did not write
 * is IDEM_OK with state IDEM_KEY_FOREIGN and its bytes, never misread.
 * Changes nothing in the store.
 * Errors: IDEM_EINVAL (NULL layer or out, an empty key or one over 1024
 * bytes, a scope refused as by idem_run_scoped()), IDEM_EUNSUPPORTED (the driver cannot read a key),
 * IDEM_EBACKEND, IDEM_ENOMEM. Thread-safe.
 */
IDEM_API int idem_layer_show(idem_layer *layer, const void *scope, size_t scope_len,
                             const void *key, size_t key_len, idem_key_info *out);

/*
 * Free the key (scope, key), and describe in *deleted (cleared first; may be
 * NULL) what was there.
 *   - STARTED: deleted only while it is still the claim that was read (the
 *     driver's fenced release), so a handler that commits meanwhile keeps
 *     its response; the holder then gets IDEM_ELOST when it commits.
 *   - COMPLETED or FOREIGN: refused unless force, with IDEM_EINVAL and
 *     *deleted describing the record left in place: deleting a response
 *     makes the next retry run the handler again.
 *   - force: whatever is under the key is deleted (the driver's remove).
 *   - ABSENT: IDEM_OK, nothing to do, deleted->state IDEM_KEY_ABSENT.
 * Errors: IDEM_EINVAL, IDEM_ELOST (the record changed between the read and
 * the delete; nothing deleted: look again), IDEM_EUNSUPPORTED (the driver has
 * no read, or no remove for force), IDEM_EBACKEND, IDEM_ENOMEM. Thread-safe.
 */
IDEM_API int idem_layer_delete(idem_layer *layer, const void *scope, size_t scope_len,
                               const void *key, size_t key_len, bool force, idem_key_info *deleted);

/* Called by idem_layer_list() once per key: info describes the key as
 * idem_layer_show() would (store_key holds the full store key) and stays
 * valid only during the call. Return 0 to go on, anything else to stop. */
typedef int (*idem_key_visitor)(void *arg, const idem_key_info *info);

/*
 * Walk the keys of layer's key space (its key_prefix, scoped keys included)
 * whose state is state, calling fn for each, at most limit times (0: no
 * limit). state is IDEM_KEY_STARTED, IDEM_KEY_COMPLETED or IDEM_KEY_FOREIGN;
 * IDEM_KEY_ABSENT, which no listed key is, stands for every state. The
 * order is the store's. The walk is not a snapshot: a key claimed, freed or
 * expired meanwhile may be missed or not, and a Redis store may give a key
 * twice. Changes nothing; costs a walk over the store's keys (in batches),
 * so it is for operators (`idem list`), never for the request path.
 * IDEM_OK also when fn stopped the walk or limit was reached. (Since 0.3.)
 * Errors: IDEM_EINVAL (NULL layer or fn, a state outside idem_key_state),
 * IDEM_EUNSUPPORTED (the store cannot enumerate its keys: memcached, or a
 * driver without the list member), IDEM_EBACKEND, IDEM_ENOMEM; fn may have
 * been called before. Thread-safe.
 */
IDEM_API int idem_layer_list(idem_layer *layer, idem_key_state state, size_t limit,
                             idem_key_visitor fn, void *arg);

/* What a check of a store found: what the store promises as it is set up,
 * and the settings that break a promise of the README's table. */
typedef enum idem_finding_level {
    IDEM_FINDING_PROMISE = 1,  /* something the store keeps, as it is configured */
    IDEM_FINDING_NOTE,         /* worth knowing; breaks nothing */
    IDEM_FINDING_WARNING       /* a setting that breaks a promise: what, and what to change */
} idem_finding_level;

typedef struct idem_findings idem_findings;  /* a list of findings */

/*
 * Connect to the store and ask it how it is set up (the driver's check
 * member). On IDEM_OK *out is a list to free with idem_findings_free().
 * Errors: IDEM_EINVAL (NULL argument), IDEM_EUNSUPPORTED (the driver offers
 * no check), IDEM_EBACKEND (the store cannot be reached: no finding can be
 * made), IDEM_ENOMEM. Thread-safe.
 */
IDEM_API int idem_store_check(idem_store *store, idem_findings **out);

/* The number of findings; the text of finding i (0-based) and its level
 * into *level (may be NULL), or NULL past the end. The text is owned by the
 * list and stays valid until idem_findings_free(). A list does not change
 * once idem_store_check() returned it: any thread may read it. */
IDEM_API size_t idem_findings_count(const idem_findings *findings);
IDEM_API const char *idem_findings_get(const idem_findings *findings, size_t i,
                                       idem_finding_level *level);
/* Free the list. NULL is a no-op. */
IDEM_API void idem_findings_free(idem_findings *findings);

#ifdef __cplusplus
}
#endif

#endif /* IDEMPOTENCY_IDEMPOTENCY_H */
