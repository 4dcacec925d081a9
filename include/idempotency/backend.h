/*
 * libidempotency: the interface for store drivers.
 *
 * A driver is one `const idem_backend` table of functions. The built-in
 * drivers (sqlite, redis, memcached) are chosen by URL scheme in
 * idem_store_open(); a driver of your own is used through
 * idem_store_open_backend(). Every store carries its own driver: nothing here
 * is process-wide.
 *
 * The core owns the state machine; a driver owns four atomic operations on
 * one key (claim, commit, release, extend). Records are opaque bytes to a
 * driver, except for the fixed header below, which a driver reads to fence
 * its operations by the claim token.
 */
#ifndef IDEMPOTENCY_BACKEND_H
#define IDEMPOTENCY_BACKEND_H

#include <stdarg.h>
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
 *        4    1  format version (1)
 *        5    1  state: 'S' (STARTED) or 'C' (COMPLETED)
 *        6    1  flags (core-private)
 *        7    1  zero
 *        8   16  token of the claim that wrote the record
 *       24    8  lease deadline, milliseconds since the Unix epoch, big-endian
 *                (STARTED; 0 in a COMPLETED record)
 *       32   32  SHA-256 digest of the request fingerprint
 *
 * A STARTED record is exactly the header; a COMPLETED record continues with
 * the response. A COMPLETED record keeps the token of the claim that
 * committed it, so a commit retried after a lost reply is recognised.
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
IDEM_API int idem_error_setv(int err, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));

/* ------------------------------------------------------------------------ */
/* The driver table                                                         */
/* ------------------------------------------------------------------------ */

#define IDEM_BACKEND_VERSION 1

/*
 * Rules for every operation:
 *   - key/key_len is the full store key (the layer's prefix and the user's
 *     key): any bytes, NUL included, at most 1279 bytes. A driver whose store
 *     restricts keys must encode them so that distinct keys never collide.
 *   - Each operation must be atomic on its key against every other operation
 *     on the same key, from any thread, process or host using the same store.
 *   - A driver must be thread-safe: the core calls one state from many
 *     threads at once.
 *   - A driver returns IDEM_OK, IDEM_ELOST where stated, IDEM_EBACKEND when
 *     the store failed or could not be reached (with idem_error_set()), or
 *     IDEM_ENOMEM. After IDEM_EBACKEND the core may retry the same call.
 *   - A call must not block longer than the driver's configured timeouts.
 *   - "Expired" means: a STARTED record past its lease, or a COMPLETED record
 *     past its ttl. An expired record must be treated exactly as no record.
 */
typedef struct idem_backend {
    /* Must be IDEM_BACKEND_VERSION of the header the driver was built with. */
    unsigned int version;

    /* Short lower-case name, e.g. "redis"; a URL whose scheme is this name,
     * or starts with this name and '+', selects this driver. */
    const char *name;

    /* ---- version 1: all mandatory unless marked optional ---- */

    /* Connect and prepare. On success *state is the driver's own object,
     * passed to every other call. url stays valid only during the call. */
    int (*open)(void **state, const idem_url *url);

    /* Release everything. No other call is in flight. */
    void (*close)(void *state);

    /*
     * Store record under key with an expiry of lease_ms if there is no
     * unexpired record there. Then *existing is left {NULL, 0}.
     * Otherwise leave the store unchanged and return the existing record in
     * *existing (bytes from malloc(), which the core frees with free()), and
     * in *remaining_ms the time left before it expires by the store's
     * clock, or UINT32_MAX when the store cannot tell (the core then uses
     * the deadline in the record). Both in one round trip where the store
     * allows it.
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
     * it; IDEM_OK. Otherwise change nothing; IDEM_ELOST. */
    int (*release)(void *state, const void *key, size_t key_len, const uint8_t *token);

    /* If the unexpired record under key is STARTED and carries token, replace
     * it by record (the same claim with a new deadline) with an expiry of
     * lease_ms; IDEM_OK. Otherwise change nothing; IDEM_ELOST. */
    int (*extend)(void *state, const void *key, size_t key_len, const uint8_t *token,
                  const void *record, size_t record_len, uint32_t lease_ms);

    /* Optional (NULL: no limit). The largest record the store accepts, in
     * bytes; the core refuses larger responses with IDEM_ETOOBIG up front. */
    size_t (*max_record_len)(void *state);
} idem_backend;

/* Open a store on a driver of your own. The table is checked: a wrong
 * version or a missing mandatory function is IDEM_EINVAL. The table must
 * outlive the store. Other errors as idem_store_open(). */
IDEM_API int idem_store_open_backend(idem_store **out, const idem_backend *backend, const char *url);

#ifdef __cplusplus
}
#endif

#endif /* IDEMPOTENCY_BACKEND_H */
