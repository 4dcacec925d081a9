/* The versioned record encoding (layout in <idempotency/backend.h>). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/provider.h>
#include <openssl/evp.h>

#include "internal.h"

#define RECORD_VERSION       1
#define FLAG_FINGERPRINT     0x01u
#define OFF_FLAGS            6
#define OFF_ZERO             7
#define OFF_DIGEST           32
#define OFF_STATUS           IDEM_RECORD_HEADER_LEN
#define OFF_BODY_LEN         (IDEM_RECORD_HEADER_LEN + 4)
#define MIN_STATUS           100
#define MAX_STATUS           999

static const uint8_t magic[4] = {'I', 'D', 'E', 'M'};

static void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

uint64_t idem_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

size_t idem__record_len(const idem_record *rec)
{
    return rec->state == IDEM_STATE_COMPLETED ? IDEM_RECORD_COMPLETED_OVERHEAD + rec->body_len
                                              : IDEM_RECORD_HEADER_LEN;
}

void idem__record_write(const idem_record *rec, uint8_t *p)
{
    bool completed = rec->state == IDEM_STATE_COMPLETED;
    memcpy(p, magic, sizeof magic);
    p[4] = RECORD_VERSION;
    p[IDEM_RECORD_STATE_OFFSET] = (uint8_t)rec->state;
    p[OFF_FLAGS] = rec->has_fingerprint ? FLAG_FINGERPRINT : 0;
    p[OFF_ZERO] = 0;
    memcpy(p + IDEM_RECORD_TOKEN_OFFSET, rec->token, IDEM_TOKEN_LEN);
    put_be64(p + IDEM_RECORD_DEADLINE_OFFSET, completed ? 0 : rec->deadline_ms);
    if (rec->has_fingerprint)
        memcpy(p + OFF_DIGEST, rec->digest, IDEM_DIGEST_LEN);
    else
        memset(p + OFF_DIGEST, 0, IDEM_DIGEST_LEN);
    if (completed) {
        put_be32(p + OFF_STATUS, (uint32_t)rec->status);
        put_be32(p + OFF_BODY_LEN, (uint32_t)rec->body_len);
        if (rec->body_len)
            memcpy(p + IDEM_RECORD_COMPLETED_OVERHEAD, rec->body, rec->body_len);
    }
}

int idem__record_encode(const idem_record *rec, uint8_t **out, size_t *out_len)
{
    size_t len = idem__record_len(rec);
    uint8_t *p = malloc(len);
    if (!p)
        return IDEM_ENOMEM;
    idem__record_write(rec, p);
    *out = p;
    *out_len = len;
    return IDEM_OK;
}

int idem_record_build(void **out, size_t *out_len, int state, const uint8_t *token,
                      uint64_t deadline_ms, int status, const void *body, size_t body_len)
{
    if (!out || !out_len || !token)
        return idem_error_set(IDEM_EINVAL, "idem_record_build: out, out_len and token must not be NULL");
    idem_record rec = {.state = state, .deadline_ms = deadline_ms};
    memcpy(rec.token, token, IDEM_TOKEN_LEN);
    if (state == IDEM_STATE_STARTED) {
        if (deadline_ms == 0)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: a STARTED record needs a lease deadline");
    } else if (state == IDEM_STATE_COMPLETED) {
        if (status < MIN_STATUS || status > MAX_STATUS)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: status %d is out of range; use %d..%d",
                                  status, MIN_STATUS, MAX_STATUS);
        if ((!body && body_len) || body_len > UINT32_MAX)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: a body of %zu bytes at %p cannot be "
                                  "stored", body_len, body);
        rec.status = status;
        rec.body = body;
        rec.body_len = body_len;
    } else {
        return idem_error_set(IDEM_EINVAL, "idem_record_build: state must be IDEM_STATE_STARTED or "
                              "IDEM_STATE_COMPLETED, not %d", state);
    }
    uint8_t *p;
    if (idem__record_encode(&rec, &p, out_len) != IDEM_OK)
        return idem_error_set(IDEM_ENOMEM, "idem_record_build: out of memory encoding a %zu-byte body",
                              body_len);
    *out = p;
    return IDEM_OK;
}

int idem_record_peek(const void *buf, size_t len, idem_record_info *out)
{
    const uint8_t *p = buf;
    if (!p || !out || len < IDEM_RECORD_HEADER_LEN || memcmp(p, magic, sizeof magic) != 0 ||
        p[4] != RECORD_VERSION)
        return IDEM_ECORRUPT;
    int state = p[IDEM_RECORD_STATE_OFFSET];
    if (state == IDEM_STATE_STARTED ? len != IDEM_RECORD_HEADER_LEN
        : state == IDEM_STATE_COMPLETED ? len < IDEM_RECORD_COMPLETED_OVERHEAD
        : true)
        return IDEM_ECORRUPT;
    out->state = state;
    out->token = p + IDEM_RECORD_TOKEN_OFFSET;
    out->deadline_ms = get_be64(p + IDEM_RECORD_DEADLINE_OFFSET);
    return IDEM_OK;
}

int idem__record_decode(const void *buf, size_t len, idem_record *rec)
{
    const uint8_t *p = buf;
    idem_record_info info;
    if (idem_record_peek(buf, len, &info) != IDEM_OK)
        return IDEM_ECORRUPT;
    if ((p[OFF_FLAGS] & ~FLAG_FINGERPRINT) != 0 || p[OFF_ZERO] != 0)
        return IDEM_ECORRUPT;
    memset(rec, 0, sizeof *rec);
    rec->state = info.state;
    memcpy(rec->token, info.token, IDEM_TOKEN_LEN);
    rec->deadline_ms = info.deadline_ms;
    rec->has_fingerprint = (p[OFF_FLAGS] & FLAG_FINGERPRINT) != 0;
    memcpy(rec->digest, p + OFF_DIGEST, IDEM_DIGEST_LEN);
    if (!rec->has_fingerprint)
        for (int i = 0; i < IDEM_DIGEST_LEN; i++)
            if (rec->digest[i])
                return IDEM_ECORRUPT;
    if (info.state == IDEM_STATE_STARTED)
        return info.deadline_ms != 0 ? IDEM_OK : IDEM_ECORRUPT;
    if (info.deadline_ms != 0)
        return IDEM_ECORRUPT;
    uint32_t status = get_be32(p + OFF_STATUS);
    uint32_t body_len = get_be32(p + OFF_BODY_LEN);
    if (status < MIN_STATUS || status > MAX_STATUS || body_len != len - IDEM_RECORD_COMPLETED_OVERHEAD)
        return IDEM_ECORRUPT;
    rec->status = (int)status;
    rec->body = p + IDEM_RECORD_COMPLETED_OVERHEAD;
    rec->body_len = body_len;
    return IDEM_OK;
}

/* OpenSSL 3 looks the algorithm up on every EVP_sha256() use and allocates
 * a context in every EVP_Digest(): fetch it once, and keep one context per
 * thread (freed when the thread exits).
 *
 * The digest comes from a library context of our own, not OpenSSL's
 * default one: OpenSSL 3.0 sets its default context up on first use and
 * crashes when an allocation fails in the middle of that, and it remembers
 * some failures for the life of the process. A context of our own fails
 * cleanly, and a failed fetch is not remembered: the context is dropped and
 * the next use (the next idem_layer_new() or fingerprint) starts again. */
static _Atomic(EVP_MD *) sha256;
static OSSL_LIB_CTX      *crypto_ctx;
static pthread_mutex_t    sha256_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t      ctx_key;
static pthread_once_t     ctx_key_once = PTHREAD_ONCE_INIT;
static _Thread_local EVP_MD_CTX *thread_ctx;

static void ctx_free(void *ctx)
{
    EVP_MD_CTX_free(ctx);
}

static void ctx_key_make(void)
{
    (void)pthread_key_create(&ctx_key, ctx_free);
}

static EVP_MD *sha256_get(void)
{
    EVP_MD *md = atomic_load_explicit(&sha256, memory_order_acquire);
    if (md)
        return md;
    pthread_mutex_lock(&sha256_mu);
    md = atomic_load_explicit(&sha256, memory_order_relaxed);
    if (!md) {
        if (!crypto_ctx)
            crypto_ctx = OSSL_LIB_CTX_new();
        if (crypto_ctx && (md = EVP_MD_fetch(crypto_ctx, "SHA256", NULL)) != NULL) {
            atomic_store_explicit(&sha256, md, memory_order_release);
        } else {
            ERR_clear_error();
            OSSL_LIB_CTX_free(crypto_ctx);
            crypto_ctx = NULL;
        }
    }
    pthread_mutex_unlock(&sha256_mu);
    return md;
}

int idem__crypto_init(void)
{
    if (!sha256_get())
        return idem_error_set(IDEM_ENOMEM, "setting up libcrypto's SHA-256 failed (out of memory?); "
                              "try again");
    return IDEM_OK;
}

int idem__digest(const void *data, size_t len, uint8_t out[IDEM_DIGEST_LEN])
{
    unsigned int n = 0;
    (void)pthread_once(&ctx_key_once, ctx_key_make);
    EVP_MD *md = sha256_get();
    if (!thread_ctx && (thread_ctx = EVP_MD_CTX_new()) != NULL)
        (void)pthread_setspecific(ctx_key, thread_ctx);
    if (!md || !thread_ctx || !EVP_DigestInit_ex2(thread_ctx, md, NULL) ||
        !EVP_DigestUpdate(thread_ctx, data, len) || !EVP_DigestFinal_ex(thread_ctx, out, &n) ||
        n != IDEM_DIGEST_LEN) {
        /* a context that failed half-way is not reused: the next digest
         * starts from a new one */
        ERR_clear_error(); /* our failure is not left in the caller's OpenSSL error queue */
        if (thread_ctx) {
            EVP_MD_CTX_free(thread_ctx);
            thread_ctx = NULL;
            (void)pthread_setspecific(ctx_key, NULL);
        }
        return idem_error_set(IDEM_ENOMEM, "computing the SHA-256 of the fingerprint failed in libcrypto "
                              "(out of memory?); try again");
    }
    return IDEM_OK;
}
