/*
 * SHA-256, done one way for the whole library: request fingerprints, scope
 * tags, HTTP fingerprints and subkeys.
 */
#include <pthread.h>
#include <stdatomic.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

#include "internal.h"

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

struct idem_hash {
    EVP_MD_CTX *ctx;
    bool        ok;
};

static _Thread_local idem_hash thread_hash;

idem_hash *idem__hash_begin(void)
{
    idem_hash *h = &thread_hash;
    (void)pthread_once(&ctx_key_once, ctx_key_make);
    EVP_MD *md = sha256_get();
    if (!thread_ctx && (thread_ctx = EVP_MD_CTX_new()) != NULL)
        (void)pthread_setspecific(ctx_key, thread_ctx);
    h->ctx = thread_ctx;
    h->ok = md && thread_ctx && EVP_DigestInit_ex2(thread_ctx, md, NULL);
    return h;
}

void idem__hash_add(idem_hash *h, const void *data, size_t len)
{
    h->ok = h->ok && (len == 0 || EVP_DigestUpdate(h->ctx, data, len));
}

void idem__hash_add_field(idem_hash *h, const void *data, uint64_t len)
{
    uint8_t be[8];
    uint64_t v = len;
    for (int i = 7; i >= 0; i--, v >>= 8)
        be[i] = (uint8_t)v;
    idem__hash_add(h, be, sizeof be);
    if (len != IDEM_HASH_ABSENT)
        idem__hash_add(h, data, (size_t)len);
}

int idem__hash_end(idem_hash *h, uint8_t out[IDEM_DIGEST_LEN])
{
    unsigned int n = 0;
    if (h->ok && EVP_DigestFinal_ex(h->ctx, out, &n) && n == IDEM_DIGEST_LEN)
        return IDEM_OK;
    /* a context that failed half-way is not reused: the next digest starts
     * from a new one */
    ERR_clear_error(); /* our failure is not left in the caller's OpenSSL error queue */
    if (thread_ctx) {
        EVP_MD_CTX_free(thread_ctx);
        thread_ctx = NULL;
        (void)pthread_setspecific(ctx_key, NULL);
    }
    return idem_error_set(IDEM_ENOMEM, "computing a SHA-256 digest failed in libcrypto (out of "
                          "memory?); try again");
}

int idem__digest(const void *data, size_t len, uint8_t out[IDEM_DIGEST_LEN])
{
    idem_hash *h = idem__hash_begin();
    idem__hash_add(h, data, len);
    return idem__hash_end(h, out);
}
