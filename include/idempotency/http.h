/*
 * libidempotency: the Idempotency-Key header end to end, for HTTP servers.
 *
 * Independent of any HTTP server library: give it strings, get strings back.
 * A server needs three calls around idem_run():
 *
 *   char key[256];                                  // max_key_len + 1
 *   size_t key_len;
 *   uint8_t fp[IDEM_HTTP_FINGERPRINT_LEN];
 *   idem_reply reply = {0};
 *   int rc = idem_http_key_parse(key, sizeof key, &key_len, lines, nlines);
 *   if (rc == IDEM_OK)
 *       rc = idem_http_fingerprint(fp, method, path, body, body_len, NULL, 0);
 *   if (rc == IDEM_OK) {
 *       idem_request req = {key, key_len, fp, sizeof fp};
 *       rc = idem_run(layer, &req, handler, arg, &reply);
 *   }
 *   idem_http_answer ans;
 *   idem_http_answer_make(&ans, rc, &reply);         // status, headers, body to send
 *   ...send ans.status, ans.headers[0..nheaders), ans.body...
 *   idem_http_answer_clear(&ans);
 *   idem_reply_clear(&reply);
 *
 * Client errors and server errors. A client's missing or malformed key is
 * IDEM_EKEY, which only idem_http_key_parse() returns, and which
 * idem_http_answer_make() answers with 400. idem_run() keeps answering
 * IDEM_EINVAL for an empty or over-long key, as it has since 0.1.0; a
 * server that parses keys here with key_size = max_key_len + 1 never passes
 * idem_run() a key it refuses, so idem_http_answer_make() takes IDEM_EINVAL
 * for what it then is, the server's own mistake (a NULL argument, a store
 * used after fork()): 500. Decide by code, never by message text.
 *
 * Messages for clients. The reason idem_http_key_parse() gives with
 * IDEM_EKEY, and every body idem_http_answer_make() writes, are fit to show
 * a client: they name no host, path, password or store, and quote nothing
 * from the request. The detail of a store failure stays in
 * idem_last_error(), for the server's log.
 *
 * All functions are thread-safe and keep no state across calls but the
 * calling thread's last key refusal (see idem_http_key_parse()).
 */
#ifndef IDEMPOTENCY_HTTP_H
#define IDEMPOTENCY_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include <idempotency/idempotency.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Read a request's Idempotency-Key: lines are the values of every
 * Idempotency-Key field line of the request, in order (nlines 0 when it had
 * none; lines may then be NULL).
 *
 * The value is an RFC 8941 Item whose bare item is a String, as
 * draft-ietf-httpapi-idempotency-key-header asks: "8e03978e-40d5". The key
 * is the string's characters with its escapes (\" and \\) resolved. As
 * clients of Stripe-style APIs send keys unquoted, a bare value of token
 * characters (RFC 9110 tchar, and ':' and '/' after the first) is taken as
 * is: "abc" and abc are the same key. Parameters (;name=value) must be
 * well-formed and are ignored. Spaces and tabs around the value are ignored.
 *
 * On IDEM_OK the key is at key (NUL-terminated), its length in *key_len
 * (1..key_size - 1). Refused, with IDEM_EKEY: no field line, two or more
 * field lines (a list of keys is no key), an empty value or empty string,
 * a key longer than key_size - 1 bytes, and every malformed value (an
 * unterminated string, a bad escape, a character outside printable ASCII,
 * a value that is neither string nor token, a malformed parameter, trailing
 * characters). idem_last_error() is then a sentence that says what is wrong
 * and is fit to show the client; idem_http_answer_make(.., IDEM_EKEY, ..)
 * on the same thread puts it in its 400 answer.
 *
 * IDEM_EINVAL: key, key_len or (with nlines > 0) lines or one of them is
 * NULL, or key_size is below 2. Give key_size = the layer's max_key_len + 1
 * (256 by default).
 */
IDEM_API int idem_http_key_parse(char *key, size_t key_size, size_t *key_len,
                                 const char *const *lines, size_t nlines);

#define IDEM_HTTP_FINGERPRINT_LEN 32

/*
 * The fingerprint of a request, for idem_request.fingerprint: the same key
 * sent with another method, path or body (or another value of one of the
 * headers given) is then IDEM_MISMATCH (422).
 *
 * out = SHA-256 of, in this order, each field preceded by its length as 8
 * bytes big-endian: the tag "idem-http-fingerprint-1", method, path (the
 * request target as received: path and query), body, then the number of
 * headers (8 bytes), and for each header its name in lower case and its
 * value; an absent header (value NULL) has the length 2^64 - 1 and no
 * bytes. Length prefixes make every request its own byte string: no two
 * requests meet by concatenation ("ab"+"c" is not "a"+"bc"), and an empty
 * value is not an absent one. Header names are compared case-insensitively,
 * values byte for byte; pass the headers in the same order every time.
 *
 * body may be NULL with body_len 0; headers NULL with nheaders 0.
 * Errors: IDEM_EINVAL (NULL out, method or path, NULL body with a length,
 * a header with a NULL name), IDEM_ENOMEM (libcrypto failed).
 */
IDEM_API int idem_http_fingerprint(uint8_t out[IDEM_HTTP_FINGERPRINT_LEN], const char *method,
                                   const char *path, const void *body, size_t body_len,
                                   const idem_header *headers, size_t nheaders);

/*
 * What to send. headers and body point into the reply given to
 * idem_http_answer_make() and into the answer itself: they stay valid until
 * idem_http_answer_clear(), as long as the reply is not cleared or reused
 * before.
 *
 * The struct keeps the size and the member offsets it had in 0.2 (a
 * program built then allocates it with that size): its fields of later
 * versions come out of reserved_, never from growing it. Everything after
 * body_len is the library's; a program neither reads nor writes it.
 */
typedef struct idem_http_answer {
    int                  status;
    const idem_header   *headers;    /* send every one, in this order */
    size_t               nheaders;
    const unsigned char *body;       /* never NULL; may be empty */
    size_t               body_len;
    /* private: */
    idem_header         *own_headers_;
    char                *own_body_;
    char                 retry_after_[16];  /* a uint32_t in decimal and its NUL */
    uint64_t             reserved_[1];      /* (since 0.3) room for fields of later versions; zero */
} idem_http_answer;

/*
 * Turn the outcome of idem_run(), idem_run_scoped() or idem_begin() (rc and
 * reply), or of idem_http_key_parse() (rc IDEM_EKEY; reply may be NULL),
 * into the answer to send:
 *
 *   EXECUTED   the handler's status, headers and body, whatever rc is
 *              (IDEM_EBACKEND, IDEM_ELOST, IDEM_ENOMEM...: the work is done,
 *              so it is the answer; the server logs idem_last_error())
 *   REPLAYED   the stored status, headers and body, then
 *              Idempotent-Replayed: true
 *   IN_PROGRESS 409, Retry-After: the holder's lease in seconds, rounded up
 *   MISMATCH   422
 *   FAILED     the handler's status, headers and body; a handler that set
 *              no body gets a problem body (below) when its status is 400,
 *              409, 422, 500 or 503
 *   IDEM_EKEY  400, with the reason idem_http_key_parse() gave
 *   IDEM_EBACKEND (nothing ran)  503, Retry-After: 1
 *   any other error  500 (a server's mistake, or a store record this
 *              library did not write; the server logs idem_last_error())
 *
 * The 400, 409, 422, 500 and 503 answers above carry an RFC 9457 problem
 * document, Content-Type: application/problem+json:
 * {"type":"about:blank","title":"Conflict","status":409,"detail":"..."}.
 *
 * Returns IDEM_OK, IDEM_EINVAL (NULL ans; or reply NULL with a code that
 * needs one), or IDEM_ENOMEM; on an error *ans is still a valid 500 answer
 * to send. Never changes idem_last_error().
 */
IDEM_API int idem_http_answer_make(idem_http_answer *ans, int rc, const idem_reply *reply);

/* An answer of the server's own: status (400..599) with an RFC 9457
 * problem document whose detail is detail (NULL: none), JSON-escaped.
 * Errors as idem_http_answer_make(). */
IDEM_API int idem_http_answer_problem(idem_http_answer *ans, int status, const char *detail);

/* Release what the answer owns and zero it. NULL is a no-op. */
IDEM_API void idem_http_answer_clear(idem_http_answer *ans);

#ifdef __cplusplus
}
#endif

#endif /* IDEMPOTENCY_HTTP_H */
