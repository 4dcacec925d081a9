/* Declarations shared inside the library; not installed. */
#ifndef IDEM_CORE_INTERNAL_H
#define IDEM_CORE_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

/* The longest key prefix a layer accepts. */
#define IDEM_MAX_PREFIX_LEN 255

/* Does driver table b have member m, which version v of the table added? */
#define IDEM_HAS(b, v, m) ((b)->version >= (v) && (b)->m != NULL)

/* ---- platform.c: clocks, sleep, random bytes, fork() ---- */
/* Milliseconds of CLOCK_MONOTONIC: the clock of leases, deadlines and the
 * local cache's expiry (idem_mono_ms() is the same for drivers). */
uint64_t idem__mono_ms(void);
/* Sleep ms milliseconds, through signals. */
void idem__sleep_ms(uint64_t ms);
/* Random bytes from getrandom(), buffered per thread and never repeated
 * across fork(). IDEM_OK or IDEM_EBACKEND. */
int idem__random_bytes(uint8_t *buf, size_t len);
/* How many fork()s this process descends from since the library was first
 * used; a store opened in an earlier generation belongs to an ancestor. */
unsigned idem__fork_generation(void);

/* ---- error.c ---- */
void idem__error_clear(void);

/* ---- kit.c: pieces drivers share ---- */
/* Give the driver calls this thread makes the deadline deadline
 * (idem__mono_ms(); 0: none), which drivers read with
 * idem_call_timeout_ms(). Returns the deadline it replaces, to be put back
 * after the call. */
uint64_t idem__call_deadline_set(uint64_t deadline);

/* ---- store.c ---- */
/* The drivers compiled in, NULL-terminated. */
extern const idem_backend *const idem__builtin_backends[];
/* Why the driver named by scheme is missing from this build, or NULL when
 * the scheme is not one the project knows. */
const char *idem__missing_backend_hint(const char *scheme);
/* Every call from the core to a store's driver goes through these. They
 * take the arguments and give the results of the table's members
 * (backend.h), with out-parameters set on every return; a member the table
 * lacks is IDEM_EUNSUPPORTED with a message, and a code the member may not
 * return is IDEM_EBACKEND. */
const char *idem__store_name(const idem_store *s);
unsigned    idem__store_version(const idem_store *s);
size_t      idem__store_max_record_len(const idem_store *s);  /* SIZE_MAX: no limit */
/* The driver's own state, for the core's tests of a fake driver. */
void       *idem__store_state(const idem_store *s);
/* IDEM_OK, or IDEM_EINVAL with a message for a store opened before fork(). */
int idem__store_check_process(const idem_store *s);
int idem__store_claim(idem_store *s, const void *key, size_t key_len, const void *record,
                      size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                      uint32_t *remaining_ms);
int idem__store_commit(idem_store *s, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint64_t ttl_ms);
int idem__store_release(idem_store *s, const void *key, size_t key_len, const uint8_t *token);
int idem__store_extend(idem_store *s, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint32_t lease_ms);
int idem__store_read(idem_store *s, const void *key, size_t key_len, void **record, size_t *record_len,
                     uint32_t *remaining_ms);
int idem__store_remove(idem_store *s, const void *key, size_t key_len, bool *deleted);
int idem__store_check(idem_store *s, idem_findings *list);
int idem__store_list(idem_store *s, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg);
/* Version 3's transactions: IDEM_OK when the driver has them, else
 * IDEM_EUNSUPPORTED with a message naming the stores that do. */
int  idem__store_tx_supported(const idem_store *s);
int  idem__store_tx_begin(idem_store *s, void **tx, void **conn);
int  idem__store_tx_write(idem_store *s, void *conn, const void *key, size_t key_len, const uint8_t *token,
                          const void *record, size_t record_len, uint64_t expiry_ms, int *outcome);
void idem__store_tx_end(idem_store *s, void *tx);

/* ---- layer.c ---- */
#define IDEM_MAX_SCOPE_LEN 255
#define IDEM_V1_MAX_STORE_KEY_LEN 1279 /* what a version-1 driver table was promised */
#define IDEM_SCOPE_TAG_LEN 33      /* '#', 32 hex digits, ':' in place of the prefix's ':' */
/* The store key of (scope, key) in layer l, into out (IDEM_MAX_STORE_KEY_LEN
 * bytes); scope NULL for none. Arguments already checked. IDEM_OK, or
 * IDEM_ENOMEM when the digest failed. */
int idem__store_key(const idem_layer *l, const void *scope, size_t scope_len, const void *key,
                    size_t key_len, uint8_t *out, size_t *out_len);
idem_store *idem__layer_store(const idem_layer *l);
const char *idem__layer_prefix(const idem_layer *l, size_t *len);  /* "idem:"; not NUL-terminated */

/* ---- record.c ---- */
#define IDEM_DIGEST_LEN 32

typedef struct idem_record {
    int            state;                    /* IDEM_STATE_* */
    uint8_t        token[IDEM_TOKEN_LEN];
    uint64_t       deadline_ms;
    bool           has_fingerprint;
    uint8_t        digest[IDEM_DIGEST_LEN];
    int            status;                   /* COMPLETED */
    const uint8_t *body;                     /* COMPLETED, points into the encoded bytes */
    size_t         body_len;
    /* COMPLETED with header fields (format 2 when nheaders > 0). Encoding
     * takes the fields from `fields` (an encoded block, as decoding leaves
     * it) when set, else from `headers` (checked with idem__headers_check). */
    size_t             nheaders;
    const idem_header *headers;
    const uint8_t     *fields;               /* points into the encoded bytes */
    size_t             fields_len;
    /* STARTED with a checkpoint (format 3 when cp_name_len > 0): the step's
     * name and data, and how long the store keeps the record after its
     * lease ends, so that the next holder finds the checkpoint. */
    const char        *cp_name;              /* not NUL-terminated */
    size_t             cp_name_len;
    const uint8_t     *cp_data;
    size_t             cp_len;
    uint32_t           kept_ms;
} idem_record;

/* Bytes a COMPLETED record adds to its body: format 1 (no header fields),
 * and format 2 before its encoded fields. */
#define IDEM_RECORD_COMPLETED_OVERHEAD (IDEM_RECORD_HEADER_LEN + 8)
#define IDEM_RECORD_FIELDS_OVERHEAD    (IDEM_RECORD_HEADER_LEN + 16)
/* Bytes a STARTED record with a checkpoint adds before its name and data. */
#define IDEM_RECORD_CHECKPOINT_OVERHEAD (IDEM_RECORD_HEADER_LEN + 12)

/* The encoded length of rec, and its encoding into p (that many bytes). */
size_t idem__record_len(const idem_record *rec);
void   idem__record_write(const idem_record *rec, uint8_t *p);
/* Encode rec into a new malloc'd buffer. IDEM_OK or IDEM_ENOMEM. */
int idem__record_encode(const idem_record *rec, uint8_t **out, size_t *out_len);
/* Decode; rec->body points into buf. IDEM_OK or IDEM_ECORRUPT (no message set). */
int idem__record_decode(const void *buf, size_t len, idem_record *rec);

/* Check n header fields: IDEM_OK and *fields_len, the bytes they take in a
 * record; else IDEM_EINVAL or IDEM_ETOOBIG with a message. */
int idem__headers_check(const idem_header *h, size_t n, size_t *fields_len);
/* Copy n checked fields into one malloc'd block (array, then strings) that
 * free() releases. IDEM_OK (*out NULL when n is 0) or IDEM_ENOMEM. */
int idem__headers_copy(const idem_header *h, size_t n, idem_header **out);
/* The same from the encoded fields of a decoded record. */
int idem__headers_from_record(const idem_record *rec, idem_header **out);
/* Is name an RFC 9110 token of 1..255 bytes? Is value free of NUL, CR, LF? */
bool idem__header_name_ok(const char *name, size_t len);
bool idem__header_value_ok(const char *value, size_t len);

/* tchar of RFC 9110, section 5.6.2. */
bool idem__is_tchar(unsigned char c);

/* ---- digest.c: SHA-256 ---- */
/* One digest in steps, on the calling thread's context: begin, add, end.
 * A failure in add is remembered and reported by end, which is IDEM_OK or
 * IDEM_ENOMEM with a message. One digest at a time per thread. */
typedef struct idem_hash idem_hash;
#define IDEM_HASH_ABSENT UINT64_MAX
idem_hash *idem__hash_begin(void);
void idem__hash_add(idem_hash *h, const void *data, size_t len);
/* A field: len as 8 bytes big-endian, then the bytes (IDEM_HASH_ABSENT:
 * the length alone, for a value that is not there). */
void idem__hash_add_field(idem_hash *h, const void *data, uint64_t len);
int  idem__hash_end(idem_hash *h, uint8_t out[IDEM_DIGEST_LEN]);
/* SHA-256 of data. IDEM_OK or IDEM_ENOMEM. */
int idem__digest(const void *data, size_t len, uint8_t out[IDEM_DIGEST_LEN]);

/* ---- lease.c: a layer's keeper (deferred frees, renewals) ---- */

typedef struct idem_keeper idem_keeper;

/* A lease renewed by the keeper: renew() runs on the keeper's thread when
 * due; it returns true with *next_due (monotonic ms) to go on, false to
 * stop. Owned by the caller, which must unwatch it before freeing it. */
typedef struct idem_renewal {
    struct idem_renewal *next;
    uint64_t             due;
    bool                 busy;
    bool               (*renew)(void *arg, uint64_t *next_due);
    void                *arg;
} idem_renewal;

/* IDEM_OK or IDEM_ENOMEM. freed is bumped for each deferred free done. */
int  idem__keeper_new(idem_keeper **out, idem_store *store, _Atomic uint64_t *freed);
/* Start the thread now (else it starts when first needed). IDEM_ENOMEM. */
int  idem__keeper_start(idem_keeper *k);
/* Stop and join the thread; forget what is pending (those keys free
 * themselves when their leases end). NULL is a no-op. */
void idem__keeper_free(idem_keeper *k);
/* Free key, fenced by token, once the store answers, until the monotonic
 * time until; unsure: the claim may not have landed yet. IDEM_OK, or
 * IDEM_ENOMEM (nothing queued). Thread-safe. */
int  idem__keeper_defer_release(idem_keeper *k, const uint8_t *key, size_t key_len, const uint8_t *token,
                                uint64_t until, bool unsure);
/* The store just answered a request: try the pending frees now. Cheap
 * when nothing is pending. */
void idem__keeper_poke(idem_keeper *k);
/* Renew r from due on; IDEM_OK or IDEM_ENOMEM (no thread). unwatch waits
 * for a renewal in flight, so afterwards renew() no longer runs. */
int  idem__keeper_watch(idem_keeper *k, idem_renewal *r, uint64_t due);
void idem__keeper_unwatch(idem_keeper *k, idem_renewal *r);

/* Recent handler durations, for retry_after_ms. */
#define IDEM_DURATIONS     64
#define IDEM_DURATIONS_MIN 4
typedef struct idem_durations {
    atomic_uint         next;       /* slots handed out */
    _Atomic uint32_t    ms[IDEM_DURATIONS];
    atomic_uint         done;       /* slots written */
    _Atomic uint64_t    p95_at;     /* done << 32 | the p95 computed then */
} idem_durations;
void idem__durations_add(idem_durations *d, uint64_t ms);
/* The 95th percentile of the recent ones; false until IDEM_DURATIONS_MIN. */
bool idem__durations_p95(idem_durations *d, uint32_t *out);

/* ---- digest.c: libcrypto ---- */
/* Set OpenSSL up and fetch SHA-256 (again, after a failure). IDEM_OK or
 * IDEM_ENOMEM with a message. Thread-safe. */
int idem__crypto_init(void);

/* ---- cache.c: a layer's local cache of COMPLETED records ---- */
/* Thread-safe; sharded, so hits on different keys rarely share a lock. */
typedef struct idem_cache idem_cache;
typedef struct idem_cache_entry idem_cache_entry;
/* A cache of at most max_bytes (entries, keys and records counted).
 * IDEM_OK or IDEM_ENOMEM (no message set). */
int  idem__cache_new(idem_cache **out, size_t max_bytes);
void idem__cache_free(idem_cache *cache);           /* NULL: no-op */
/* The live entry for the store key, with a reference to give back with
 * idem__cache_release(); NULL on a miss, an expired entry, or a NULL cache. */
const idem_cache_entry *idem__cache_get(idem_cache *cache, const void *key, size_t key_len);
/* The encoded COMPLETED record an entry holds. */
const uint8_t *idem__cache_entry_record(const idem_cache_entry *e, size_t *len);
void idem__cache_release(const idem_cache_entry *e);
/* Keep a copy of a COMPLETED record until expires_ms (idem__mono_ms()
 * clock): never later than the store would expire it. Least recently used
 * entries make room; one that cannot fit, or no memory, is simply not
 * cached. NULL cache: no-op. */
void idem__cache_put(idem_cache *cache, const void *key, size_t key_len, const void *rec, size_t rec_len,
                     uint64_t expires_ms);
/* Forget the entry for key (an operator deleted it). NULL cache: no-op. */
void idem__cache_drop(idem_cache *cache, const void *key, size_t key_len);
/* Bytes counted in the cache, and *entries (may be NULL). */
size_t idem__cache_bytes(idem_cache *cache, size_t *entries);
/* The layer's cache, NULL when cache_bytes is 0 (layer.c). */
idem_cache *idem__layer_cache(const idem_layer *l);

#endif
