/*
 * libidempotency: the interface for store drivers.
 *
 * A driver is one `const idem_backend` table of functions. The built-in
 * drivers (sqlite, redis, memcached, postgresql, memory) are chosen by URL
 * scheme in idem_store_open(); a driver of your own is used through
 * idem_store_open_backend(). Every store carries its own driver: nothing here
 * is process-wide.
 *
 * The core owns the state machine; a driver owns the atomic operations on
 * one key (claim, commit, release, extend, and the optional members after
 * them). Records are opaque bytes to a driver, except for the fixed header
 * below, which a driver reads to fence its operations by the claim token.
 */
#ifndef IDEMPOTENCY_BACKEND_H
#define IDEMPOTENCY_BACKEND_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <idempotency/idempotency.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Records                                                                  */
/* ------------------------------------------------------------------------ */

/*
 * Every record the core writes starts with this 64-byte header:
 *
 *   offset size
 *        0    4  magic "IDEM"
 *        4    1  format version: 1, or 2 for a COMPLETED record with header
 *                fields (since 0.2; 0.1.0 refuses it as IDEM_ECORRUPT), or 3
 *                for a STARTED record with a checkpoint (since 0.3)
 *        5    1  state: 'S' (STARTED) or 'C' (COMPLETED)
 *        6    1  flags (core-private)
 *        7    1  zero
 *        8   16  token of the claim that wrote the record
 *       24    8  lease deadline, milliseconds since the Unix epoch, big-endian
 *                (STARTED; 0 in a COMPLETED record)
 *       32   32  SHA-256 digest of the request fingerprint
 *
 * A STARTED record is the header, and a checkpoint when it has one; a
 * COMPLETED record continues with the response. A COMPLETED record keeps the
 * token of the claim that committed it, so a commit retried after a lost
 * reply is recognised. Integers after the header are big-endian.
 *
 * A STARTED record with a checkpoint (format 3, since 0.3; 0.2 refuses it
 * as IDEM_ECORRUPT) continues after the header:
 *
 *   64  4  kept: milliseconds the store keeps the record after its lease
 *          ends, so that the next holder finds the checkpoint
 *   68  2  name length N (1..IDEM_CHECKPOINT_NAME_MAX)
 *   70  2  zero
 *   72  4  data length D (0..IDEM_CHECKPOINT_MAX)
 *   76  N  name, then D bytes of data
 *
 * A COMPLETED record continues with the response:
 *
 *   format 1                         format 2
 *   64  4  status (100..999)         64  4  status
 *   68  4  body length B             68  4  body length B
 *   72  B  body                      72  2  number of fields N (1..IDEM_MAX_HEADERS)
 *                                    74  2  zero
 *                                    76  4  length F of the fields
 *                                    80  F  N fields, each: name length (2),
 *                                           value length (2), name, value
 *                                  80+F  B  body
 *
 * Drivers need none of this: the first 64 bytes, and idem_record_peek(),
 * are the same in every format.
 */
#define IDEM_RECORD_HEADER_LEN   64
#define IDEM_RECORD_STATE_OFFSET 5
#define IDEM_RECORD_TOKEN_OFFSET 8
#define IDEM_RECORD_DEADLINE_OFFSET 24
#define IDEM_TOKEN_LEN           16
#define IDEM_STATE_STARTED       'S'
#define IDEM_STATE_COMPLETED     'C'

typedef struct idem_record_info {
    int            state;        /* IDEM_STATE_STARTED or IDEM_STATE_COMPLETED */
    const uint8_t *token;        /* IDEM_TOKEN_LEN bytes inside the record */
    uint64_t       deadline_ms;  /* lease deadline (STARTED), Unix epoch ms */
} idem_record_info;

/* Read the header of a record. IDEM_OK, or IDEM_ECORRUPT for bytes this
 * library did not write (wrong magic or version, impossible length).
 * Thread-safe; allocates nothing; out points into rec. */
IDEM_API int idem_record_peek(const void *rec, size_t len, idem_record_info *out);

/* Milliseconds since the Unix epoch by the wall clock (CLOCK_REALTIME), the
 * clock of the deadline above. */
IDEM_API uint64_t idem_now_ms(void);

/* Milliseconds of CLOCK_MONOTONIC (since 0.3): the clock a driver measures
 * its timeouts and budgets by, never a deadline stored in a record. */
IDEM_API uint64_t idem_mono_ms(void);

/* Encode a record as the core writes it, without a request: for a driver's
 * own tests and for tools. state IDEM_STATE_STARTED: the claim of token with
 * lease deadline deadline_ms (Unix epoch ms, not 0); status and body are
 * ignored. IDEM_STATE_COMPLETED: the response (status 100..999, body_len
 * bytes of body) committed by the claim of token; deadline_ms is ignored.
 * The record carries no fingerprint. *out is the caller's, freed with
 * free(). IDEM_OK, IDEM_EINVAL (a NULL out, out_len or token, another
 * state, a status out of range, a STARTED record without a deadline, body
 * NULL with a length) or IDEM_ENOMEM, with a message. Thread-safe. */
IDEM_API int idem_record_build(void **out, size_t *out_len, int state, const uint8_t *token,
                               uint64_t deadline_ms, int status, const void *body, size_t body_len);

/* ------------------------------------------------------------------------ */
/* URLs                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct idem_url_host {
    char    *host;   /* "127.0.0.1", "localhost", "::1" (brackets removed) */
    uint16_t port;   /* 0 when the URL gives none */
} idem_url_host;

typedef struct idem_url_param {
    char *name;      /* percent-decoded */
    char *value;     /* percent-decoded; "" for "?flag" */
} idem_url_param;

/*
 * A parsed store URL: scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]
 * Strings are NUL-terminated and percent-decoded; any that the URL lacks is
 * NULL (path, user, password) or has a count of 0 (hosts, params).
 */
typedef struct idem_url {
    char           *scheme;      /* lower case */
    char           *user;
    char           *password;    /* never print it */
    idem_url_host  *hosts;
    size_t          nhosts;
    char           *path;        /* starts with '/' */
    idem_url_param *params;
    size_t          nparams;
} idem_url;

/* Parse a URL. IDEM_EINVAL with a message for a malformed one (the message
 * never repeats a password). *out is freed with idem_url_free(). */
IDEM_API int  idem_url_parse(idem_url **out, const char *url);
IDEM_API void idem_url_free(idem_url *url);

/* The value of query parameter name, or NULL. */
IDEM_API const char *idem_url_param_get(const idem_url *url, const char *name);

/* Read query parameter name as a whole number in [min, max] into *out; leave
 * *out alone when the parameter is absent. IDEM_EINVAL with a message naming
 * the parameter otherwise. */
IDEM_API int idem_url_param_uint(const idem_url *url, const char *name, uint64_t min, uint64_t max,
                                 uint64_t *out);

/* ------------------------------------------------------------------------ */
/* Errors from drivers                                                      */
/* ------------------------------------------------------------------------ */

/* Set the calling thread's idem_last_error() to a formatted message and
 * return err, so a driver can write `return idem_error_set(IDEM_EBACKEND,
 * "redis %s:%u: %s", ...)`. Start messages with the driver's name and the
 * server, end them with what to do next when there is something to do, and
 * never include a password. An argument may be idem_last_error() itself. */
IDEM_API int idem_error_set(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
IDEM_API int idem_error_setv(int err, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

/* ------------------------------------------------------------------------ */
/* Pieces every driver shares (version 2 of this header)                    */
/* ------------------------------------------------------------------------ */

/* Set the calling thread's message to "<where>: <what>: <detail>" and return
 * err, where detail is formatted from fmt. where names the driver and the
 * server ("redis 127.0.0.1:6379", "sqlite /var/lib/app/idem.db"), what the
 * operation ("claiming a key"). Never truncated. */
IDEM_API int idem_driver_error(int err, const char *where, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* IDEM_OK when every query parameter of url is named in known (a
 * NULL-terminated list); else IDEM_EINVAL with a message that names the
 * driver, the unknown parameter and the known ones. A known parameter whose
 * name ends in "password" holds a secret: an unknown parameter after it may
 * be the rest of a password that held an unescaped '&', so the message then
 * says the URL is malformed without naming it. */
IDEM_API int idem_url_check_params(const idem_url *url, const char *driver, const char *const *known);

/*
 * The time the core gives one driver call (since 0.3).
 *
 * The core may give the call it makes on a thread a deadline of its own,
 * sooner than the driver's timeouts: a commit retried after the handler ran
 * must end within the lease, and within commit_timeout_ms. The deadline is
 * the calling thread's, set by the core around one call into the driver and
 * cleared after it; a driver reads it on the thread the core called it on.
 *
 * A driver must bound each wait of a call (a reply, a lock, a busy timeout,
 * a connection made for the call) by idem_call_timeout_ms() of its own
 * timeout, read when the wait starts, so that the call returns within a few
 * milliseconds of the core's deadline. A call that ran out of the core's
 * time must fail as its own timeout does: IDEM_EBACKEND, with the
 * connection treated as its own timeout treats it (a reply that may still
 * come must never be read as the answer to a later call). A driver must not
 * keep the deadline past the call, nor hand it to other threads.
 *
 * A driver built against a header without these functions never calls them
 * and keeps to its own timeouts; the core then cannot shorten its calls,
 * and works as before.
 */

/* The calling thread's deadline for the driver call under way, in
 * idem_mono_ms() milliseconds; 0 when the core set none. */
IDEM_API uint64_t idem_call_deadline_ms(void);

/* timeout_ms, or the milliseconds left until idem_call_deadline_ms() when
 * that is sooner: never more than timeout_ms, never 0 unless timeout_ms is
 * (a deadline already passed gives 1, so that a timeout of 0 never reads as
 * "wait for ever"). */
IDEM_API uint32_t idem_call_timeout_ms(uint32_t timeout_ms);

/* Copy len bytes of src into a new buffer that the core frees: how a driver
 * hands back *existing from claim and *record from read. IDEM_OK, or
 * IDEM_ENOMEM with a message naming driver. len 0 gives a valid 1-byte
 * allocation. */
IDEM_API int idem_record_dup(const char *driver, const void *src, size_t len, void **out,
                             size_t *out_len);

/*
 * A pool of connections to one server, for drivers whose connections are
 * not thread-safe (hiredis contexts, libpq and SQLite connections).
 *
 * The pool keeps idle connections and hands one to each caller; a caller
 * that finds its connection broken says so when it gives it back, and the
 * pool then closes it and every idle one (they talk to the same server,
 * which most likely went away or restarted). Idle connections beyond
 * max_idle, or unused for idle_ms, are closed, so a burst of threads does
 * not keep its connections open for ever. Thread-safe.
 *
 * Exactly:
 *   - No connection is made before the first idem_pool_get(); the pool
 *     never holds more than max_idle idle connections, and has no limit on
 *     how many are out at once (one per calling thread).
 *   - get hands out the idle connection put back last (its socket is the
 *     warmest), never one idle for idle_ms or longer: those are closed.
 *   - Every get and put closes a few of the connections idle for idle_ms
 *     or longer, so the idle list shrinks while the program keeps making
 *     requests; a program that makes none keeps its idle connections until
 *     idem_pool_free().
 *   - put with IDEM_CONN_OK keeps the connection, or closes it when
 *     max_idle are already idle. put with IDEM_CONN_BROKEN or
 *     IDEM_CONN_STALE closes it and every idle one; connections that other
 *     threads hold are theirs to report.
 *   - connect and disconnect are called without the pool's lock held,
 *     except that disconnect of the idle connections after a broken one
 *     runs under it: disconnect must not call back into the pool.
 */
typedef struct idem_pool idem_pool;

typedef struct idem_pool_config {
    void  *ctx;                                /* passed to connect and disconnect */
    /* Make a new connection: IDEM_OK and *conn, or an error with a message. */
    int  (*connect)(void *ctx, void **conn);
    /* Close a connection. Must not fail. */
    void (*disconnect)(void *ctx, void *conn);
    unsigned max_idle;                         /* 0: 64 */
    unsigned idle_ms;                          /* 0: 60000 */
} idem_pool_config;

/* How a connection came out of one use. */
typedef enum idem_conn_state {
    IDEM_CONN_OK = 0,   /* healthy: back to the idle list */
    IDEM_CONN_BROKEN,   /* I/O error, timeout, protocol error: close it and the idle ones */
    IDEM_CONN_STALE     /* closed by the server before this use sent anything that could
                           have changed the store (it restarted while the connection sat
                           idle): close it and the idle ones, and idem_pool_run() retries
                           once on a new connection */
} idem_conn_state;

/* Make a pool; cfg is copied. Errors: IDEM_EINVAL, IDEM_ENOMEM. No
 * connection is made until the first use. */
IDEM_API int  idem_pool_new(idem_pool **out, const idem_pool_config *cfg);
/* Close every idle connection and free the pool. No connection may be out. */
IDEM_API void idem_pool_free(idem_pool *pool);

/* Take a connection: an idle one (*fresh false) or a new one (*fresh true).
 * Errors are those of cfg->connect. */
IDEM_API int  idem_pool_get(idem_pool *pool, void **conn, bool *fresh);
/* Give back a connection taken with idem_pool_get(), saying how it is. */
IDEM_API void idem_pool_put(idem_pool *pool, void *conn, idem_conn_state state);

/* One use of a connection: returns an IDEM_* code and sets *state. */
typedef int (*idem_pool_fn)(void *conn, void *arg, idem_conn_state *state);

/* Take a connection, run fn on it, give it back as fn says. When fn reports
 * IDEM_CONN_STALE on a pooled connection, fn runs once more on a connection
 * made for the retry by cfg->connect (never another idle one): the
 * retry-once policy every built-in driver follows. STALE on a new
 * connection, or on the retry, is not retried, and BROKEN never is (the use
 * may have changed the store). fn may therefore run twice and must be safe
 * to; *state starts as IDEM_CONN_OK. Returns fn's code (or cfg->connect's). */
IDEM_API int  idem_pool_run(idem_pool *pool, idem_pool_fn fn, void *arg);

/* Add a finding (one line of text formatted from fmt, copied) to the list a
 * driver's check member fills. IDEM_OK, IDEM_EINVAL (NULL list or fmt, a
 * level outside idem_finding_level), or IDEM_ENOMEM. Never put a password in
 * the text. Not thread-safe on one list: a check fills its own list on the
 * calling thread. */
IDEM_API int idem_findings_add(idem_findings *list, idem_finding_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ------------------------------------------------------------------------ */
/* The driver table                                                         */
/* ------------------------------------------------------------------------ */

/*
 * The version of the table this header describes. The core accepts every
 * version from 1 to this one: a driver built against an older header keeps
 * working. It calls a member of version N only when the table's version is
 * at least N and the member is not NULL, and falls back as each member says
 * otherwise. The version grows by one with every change to the table.
 */
#define IDEM_BACKEND_VERSION 3

/* The longest store key a driver is given: a prefix (255), a scope tag (33)
 * and a key (1024). */
#define IDEM_MAX_STORE_KEY_LEN 1312

/*
 * Rules for every operation:
 *   - key/key_len is the full store key (the layer's prefix, a scope tag when
 *     the request has a scope, and the user's key): any bytes, NUL included,
 *     at most IDEM_MAX_STORE_KEY_LEN bytes. A driver whose store restricts
 *     keys must encode them so that distinct keys never collide.
 *   - Each operation must be atomic on its key against every other operation
 *     on the same key, from any thread, process or host using the same store.
 *   - A driver must be thread-safe: the core calls one state from many
 *     threads at once.
 *   - A driver returns IDEM_OK, IDEM_ELOST where stated, IDEM_EBACKEND when
 *     the store failed or could not be reached (with idem_error_set()), or
 *     IDEM_ENOMEM. After IDEM_EBACKEND the core may retry the same call.
 *   - A call must not block longer than the driver's configured timeouts,
 *     nor past the core's deadline for it (idem_call_timeout_ms()).
 *   - "Expired" means: a STARTED record past its lease, or a COMPLETED record
 *     past its ttl. An expired record must be treated exactly as no record.
 *   - A driver may send an operation again when the reply to an earlier send
 *     was lost (idem_pool_run()'s retry-once does); the operation must then
 *     come out as if sent once. The rules below that say "sent again" or
 *     "already happened" are what make that so: a claim that finds its own
 *     STARTED record has claimed, a commit that finds its own COMPLETED
 *     record has committed, a release that finds nothing after its own
 *     earlier send has released, an extend that finds its own STARTED
 *     record extends it again.
 */
typedef struct idem_backend idem_backend;

/* What a driver's list member calls for each record (version 3): 0 to go
 * on, anything else to stop. */
typedef int (*idem_list_fn)(void *arg, const void *key, size_t key_len, const void *record,
                            size_t record_len, uint32_t remaining_ms);

struct idem_backend {
    /* IDEM_BACKEND_VERSION of the header the driver was built with (1 or
     * more). */
    unsigned int version;

    /* Short lower-case name, e.g. "redis"; a URL whose scheme is this name,
     * or starts with this name and '+', selects this driver. */
    const char *name;

    /* ---- version 1: all mandatory unless marked optional ---- */

    /* Connect and prepare. On success *state is the driver's own object,
     * passed to every other call. url stays valid only during the call.
     * Mandatory unless open_ex (version 2) is given. */
    int (*open)(void **state, const idem_url *url);

    /* Release everything. No other call is in flight. */
    void (*close)(void *state);

    /*
     * Store record under key with an expiry of lease_ms if there is no
     * unexpired record there. Then *existing is left {NULL, 0}.
     * If the unexpired record there is STARTED and carries the token of
     * record, it is this very claim, stored by an earlier send whose reply
     * was lost: the claim is the caller's, exactly as if it had just been
     * stored (IDEM_OK, *existing {NULL, 0}; its expiry may stay as it was).
     * Otherwise leave the store unchanged and return the existing record in
     * *existing (bytes from idem_record_dup() or malloc(), which the core
     * frees with free()), and in *remaining_ms the time left before it
     * expires by the store's clock, or UINT32_MAX when the store cannot tell
     * (the core then uses the deadline in the record). Both in one round
     * trip where the store allows it.
     * The core counts a won claim's lease from before this call: when the
     * call returns after more than half of lease_ms, the handler does not
     * run and the core releases the claim at once. The store must not
     * expire a claim sooner than lease_ms after this call began (counting
     * from the write, as SQLite does after waiting for its lock, is later
     * and so allowed).
     * After IDEM_EBACKEND the core assumes the claim may have landed, and
     * later releases it, fenced by its token, once the store answers.
     * IDEM_EINVAL (a key or record the store cannot hold) and IDEM_ECORRUPT
     * (a stored value the driver cannot make sense of) pass to the caller
     * as they are, with the driver's message.
     */
    int (*claim)(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                 uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms);

    /*
     * If the unexpired record under key carries token and is STARTED, replace
     * it by record with an expiry of ttl_ms; return IDEM_OK. If it carries
     * token and is COMPLETED (this commit already happened and its reply was
     * lost), change nothing; return IDEM_OK. Otherwise change nothing;
     * return IDEM_ELOST. A store that refuses the record for its size
     * returns IDEM_ETOOBIG, which the core does not retry (set
     * max_record_len so that it never happens).
     */
    int (*commit)(void *state, const void *key, size_t key_len, const uint8_t *token,
                  const void *record, size_t record_len, uint64_t ttl_ms);

    /* If the unexpired record under key is STARTED and carries token, delete
     * it; IDEM_OK. If there is no unexpired record under key and this call
     * already sent the delete once (a retry after the reply was lost, so the
     * first send may have deleted it), IDEM_OK. Otherwise change nothing;
     * IDEM_ELOST: another token's record, a COMPLETED record, or no record
     * on a first send (a second, separate release call after a successful
     * one is IDEM_ELOST). */
    int (*release)(void *state, const void *key, size_t key_len, const uint8_t *token);

    /* If the unexpired record under key is STARTED and carries token, replace
     * it by record (the same claim with a new deadline) with an expiry of
     * lease_ms; IDEM_OK. Otherwise change nothing; IDEM_ELOST. */
    int (*extend)(void *state, const void *key, size_t key_len, const uint8_t *token,
                  const void *record, size_t record_len, uint32_t lease_ms);

    /* Optional (NULL: no limit). The largest record the store accepts, in
     * bytes; the core refuses larger responses with IDEM_ETOOBIG up front. */
    size_t (*max_record_len)(void *state);

    /* ---- version 2: all optional ---- */

    /* The caller's own pointer, for the driver to read in open_ex(): how a
     * driver of one's own is configured without globals, or how a wrapper
     * reaches the table it wraps. The core never looks at it. */
    void *app_data;

    /* Like open, and called instead of it when set, with the table the store
     * is being opened with (so self->app_data is at hand). */
    int (*open_ex)(void **state, const idem_url *url, const idem_backend *self);

    /* Read the record under key without changing anything. An unexpired
     * record: IDEM_OK, *record (as *existing of claim) and *remaining_ms
     * (as in claim). None, or an expired one: IDEM_OK and *record NULL.
     * NULL member: the store cannot be inspected (IDEM_EUNSUPPORTED). */
    int (*read)(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                uint32_t *remaining_ms);

    /* Delete whatever is under key, whoever wrote it (an operator's tool,
     * never the request path). IDEM_OK and *deleted true when there was
     * something, false when there was nothing. NULL member:
     * IDEM_EUNSUPPORTED. */
    int (*remove)(void *state, const void *key, size_t key_len, bool *deleted);

    /* Ask the store how it is set up, for an operator (idem_store_check(),
     * `idem check`), never on the request path: add one finding per line
     * with idem_findings_add() — what the store promises as configured
     * (IDEM_FINDING_PROMISE), and every setting that breaks a promise of the
     * README's table (IDEM_FINDING_WARNING: what is set, what it breaks, what
     * to change). IDEM_OK when the store answered, even with warnings;
     * IDEM_EBACKEND with a message when it cannot be reached at all (a server
     * of several that is down is a warning). Must not change the store.
     * NULL member: IDEM_EUNSUPPORTED. */
    int (*check)(void *state, idem_findings *out);

    /* ---- version 3 ----
     *
     * Duties a version-3 table takes on for the members above:
     *   - extend's record may carry another token than token, and may be
     *     longer than the header (a STARTED record with a checkpoint): the
     *     core takes a key over that way, fenced by the old holder's token,
     *     and saves checkpoints. Store the record as given and fence every
     *     later call by the token inside it. An extend sent again after its
     *     reply was lost then finds the new token and answers IDEM_ELOST,
     *     which the core settles by claiming again.
     *   - claim, read and extend handle STARTED records longer than the
     *     header like any other.
     * The core saves checkpoints and takes keys over only on a table of
     * version 3 or more; on an older one they are IDEM_EUNSUPPORTED.
     *
     * The members below are for stores that are a database the caller can
     * work in (PostgreSQL, SQLite); the others leave them NULL, and
     * idem_run_tx() and idem_commit_tx() then answer IDEM_EUNSUPPORTED.
     * The three come together: all set, or none.
     */

    /* Take one of the store's connections and open a transaction on it.
     * IDEM_OK: *conn is the native handle given to the handler (PGconn *,
     * sqlite3 *), *tx what tx_end() gets back. The transaction must not
     * lock the key's record: a duplicate must still be answered at once
     * while the handler runs. */
    int (*tx_begin)(void *state, void **tx, void **conn);

    /* In the transaction open on conn (tx_begin's, or the caller's own
     * connection to the store's database), if the record under key is
     * STARTED and carries token, replace it by record (a COMPLETED record,
     * or a STARTED one with a checkpoint) with an expiry of expiry_ms, and
     * commit the transaction: IDEM_OK. Fence by the token alone, expired or
     * not: a lease that ended with nobody taking the key over leaves the
     * holder's work valid, and a taker's own write changes the token.
     * Otherwise roll the transaction back: IDEM_ELOST.
     * A write or commit that fails: roll back (as far as the connection
     * allows) and return IDEM_EBACKEND with *outcome IDEM_TX_ROLLED_BACK,
     * or IDEM_TX_RETRY when the database refused it for a conflict with
     * another transaction (a serialization failure, a deadlock: the same
     * work in a new transaction may succeed). A commit whose outcome is
     * unknown (the connection broke during it) must be settled, never
     * guessed: make sure the old transaction can no longer commit, then
     * read the record on another connection. It holds record: IDEM_OK.
     * Anything else: IDEM_EBACKEND, IDEM_TX_ROLLED_BACK. Cannot tell:
     * IDEM_EBACKEND, IDEM_TX_UNKNOWN. No transaction open on conn (the
     * caller ended it): change nothing, IDEM_EINVAL with a message. */
    int (*tx_write)(void *state, void *conn, const void *key, size_t key_len, const uint8_t *token,
                    const void *record, size_t record_len, uint64_t expiry_ms, int *outcome);

    /* Give back the connection of tx_begin(), rolling back whatever is still
     * open on it. Must not fail. */
    void (*tx_end)(void *state, void *tx);

    /* Optional (NULL: the store cannot enumerate its keys, as memcached
     * cannot; idem_layer_list() then answers IDEM_EUNSUPPORTED).
     * Enumerate the unexpired records whose store key starts with the
     * prefix_len bytes at prefix (any bytes, NUL included), for an operator
     * (idem_layer_list(), `idem list`), never on the request path: call fn
     * once per record with its full store key (decoded, as the core gave it
     * to claim), its bytes as read gives them and remaining_ms as read gives
     * it. What fn is given stays valid only during that call.
     *   - As soon as fn returns non-zero, stop and return IDEM_OK.
     *   - Must not change the store, and must not hold up the store's other
     *     clients for long: walk in batches (Redis SCAN), never one command
     *     that blocks the server for the whole key space (KEYS).
     *   - Keys may be claimed, freed or expire during the walk; a record
     *     present from its start to its end must be given at least once. A
     *     store whose walk can repeat keys (Redis SCAN) may give a record
     *     twice; a record that expired or went must not be given.
     *   - Redis Cluster and other stores spread over servers walk every one
     *     that holds keys (every master).
     *   - fn never calls back into the driver, so the driver may call it
     *     with its own locks held. */
    int (*list)(void *state, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg);
};

/* What became of a transaction that tx_write() could not commit. */
#define IDEM_TX_ROLLED_BACK 0
#define IDEM_TX_RETRY       1
#define IDEM_TX_UNKNOWN     2

/* Open a store on a driver of your own. The table is checked: a version
 * outside 1..IDEM_BACKEND_VERSION or a missing mandatory function is
 * IDEM_EINVAL. The table must outlive the store. Other errors as
 * idem_store_open(). */
IDEM_API int idem_store_open_backend(idem_store **out, const idem_backend *backend, const char *url);

/* The built-in driver called name ("sqlite", "redis", ...), or NULL when it
 * is not built in: to wrap it (tracing, fault injection) in a table of one's
 * own instead of copying it. The table is static. */
IDEM_API const idem_backend *idem_backend_find(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* IDEMPOTENCY_BACKEND_H */
