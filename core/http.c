/* The Idempotency-Key header, request fingerprints and answers for HTTP
 * servers (<idempotency/http.h>). */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <idempotency/http.h>

#include "internal.h"

/* ---- Idempotency-Key ---- */

/* The calling thread's last refusal, for idem_http_answer_make(); written
 * only here, so no other message (naming a host, say) can take its place. */
static _Thread_local char key_reason[192];

static int refuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int refuse(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(key_reason, sizeof key_reason, fmt, ap);
    va_end(ap);
    return idem_error_set(IDEM_EKEY, "%s", key_reason);
}

static bool is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static bool is_lcalpha(unsigned char c) { return c >= 'a' && c <= 'z'; }

/* The parser's cursor over one field value. */
typedef struct cursor {
    const unsigned char *p, *end, *start;
} cursor;

static size_t pos(const cursor *c) { return (size_t)(c->p - c->start) + 1; }

/* sf-string (RFC 8941, 3.3.3); out NULL: only check it. */
static int parse_string(cursor *c, char *out, size_t room, size_t *len)
{
    size_t n = 0;
    c->p++; /* the opening DQUOTE */
    for (;;) {
        if (c->p == c->end)
            return refuse("the Idempotency-Key string has no closing double quote");
        unsigned char ch = *c->p++;
        if (ch == '"')
            break;
        if (ch == '\\') {
            if (c->p == c->end || (*c->p != '"' && *c->p != '\\'))
                return refuse("the Idempotency-Key string has a backslash at character %zu that "
                              "escapes neither '\"' nor '\\'", pos(c) - 1);
            ch = *c->p++;
        } else if (ch < 0x20 || ch > 0x7e) {
            return refuse("the Idempotency-Key string holds a character that is not printable ASCII "
                          "at character %zu", pos(c) - 1);
        }
        if (out) {
            if (n + 1 >= room)
                return refuse("the Idempotency-Key is longer than the %zu characters this server "
                              "accepts", room - 1);
            out[n] = (char)ch;
        }
        n++;
    }
    if (len)
        *len = n;
    return IDEM_OK;
}

/* A bare item of a parameter (RFC 8941, 4.2.3.1), only checked. */
static int parse_bare_item(cursor *c)
{
    const char *what = "value";
    if (c->p < c->end) {
        unsigned char ch = *c->p;
        if (ch == '"')
            return parse_string(c, NULL, 0, NULL);
        if (ch == '-' || is_digit(ch)) {
            if (ch == '-')
                c->p++;
            size_t digits = 0, frac = 0;
            while (c->p < c->end && is_digit(*c->p))
                c->p++, digits++;
            if (c->p < c->end && *c->p == '.') {
                c->p++;
                while (c->p < c->end && is_digit(*c->p))
                    c->p++, frac++;
                if (digits >= 1 && digits <= 12 && frac >= 1 && frac <= 3)
                    return IDEM_OK;
            } else if (digits >= 1 && digits <= 15) {
                return IDEM_OK;
            }
            what = "number";
        } else if (is_alpha(ch) || ch == '*') {
            while (c->p < c->end && (idem__is_tchar(*c->p) || *c->p == ':' || *c->p == '/'))
                c->p++;
            return IDEM_OK;
        } else if (ch == ':') {
            c->p++;
            while (c->p < c->end && (is_alpha(*c->p) || is_digit(*c->p) || *c->p == '+' ||
                                     *c->p == '/' || *c->p == '='))
                c->p++;
            if (c->p < c->end && *c->p == ':') {
                c->p++;
                return IDEM_OK;
            }
            what = "byte sequence";
        } else if (ch == '?') {
            if (c->end - c->p >= 2 && (c->p[1] == '0' || c->p[1] == '1')) {
                c->p += 2;
                return IDEM_OK;
            }
            what = "boolean";
        }
    }
    return refuse("the Idempotency-Key has a parameter with a malformed %s at character %zu", what,
                  pos(c));
}

/* Parameters (RFC 8941, 4.2.3.2), only checked. */
static int parse_parameters(cursor *c)
{
    while (c->p < c->end && *c->p == ';') {
        c->p++;
        while (c->p < c->end && *c->p == ' ')
            c->p++;
        if (c->p == c->end || !(is_lcalpha(*c->p) || *c->p == '*'))
            return refuse("the Idempotency-Key has a parameter without a valid name at character %zu "
                          "(a name is lower-case letters, digits and _-.*)", pos(c));
        while (c->p < c->end && (is_lcalpha(*c->p) || is_digit(*c->p) || strchr("_-.*", *c->p)))
            c->p++;
        if (c->p < c->end && *c->p == '=') {
            c->p++;
            int rc = parse_bare_item(c);
            if (rc)
                return rc;
        }
    }
    return IDEM_OK;
}

int idem_http_key_parse(char *key, size_t key_size, size_t *key_len, const char *const *lines,
                        size_t nlines)
{
    idem__error_clear();
    key_reason[0] = '\0';
    if (!key || !key_len || key_size < 2 || (nlines && !lines))
        return idem_error_set(IDEM_EINVAL, "idem_http_key_parse: key, key_len and lines must not be "
                              "NULL and key_size must be 2 or more");
    for (size_t i = 0; i < nlines; i++)
        if (!lines[i])
            return idem_error_set(IDEM_EINVAL, "idem_http_key_parse: field line %zu is NULL", i);
    key[0] = '\0';
    *key_len = 0;
    if (nlines == 0)
        return refuse("the request has no Idempotency-Key header; send one, such as "
                      "Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\", so that it can be "
                      "retried safely");
    if (nlines > 1)
        return refuse("the request has %zu Idempotency-Key header lines; send exactly one key",
                      nlines);

    cursor c = {.p = (const unsigned char *)lines[0]};
    c.start = c.p;
    c.end = c.p + strlen(lines[0]);
    while (c.p < c.end && (*c.p == ' ' || *c.p == '\t'))
        c.p++;
    while (c.end > c.p && (c.end[-1] == ' ' || c.end[-1] == '\t'))
        c.end--;
    if (c.p == c.end)
        return refuse("the Idempotency-Key header is empty; send a key of 1 to %zu characters, in "
                      "double quotes", key_size - 1);

    size_t n = 0;
    int rc;
    if (*c.p == '"') {
        if ((rc = parse_string(&c, key, key_size, &n)))
            return rc;
        if (n == 0)
            return refuse("the Idempotency-Key is an empty string; send a key of 1 to %zu characters",
                          key_size - 1);
    } else if (idem__is_tchar(*c.p)) {
        /* A bare key, as Stripe-style clients send them: tokens, and UUIDs,
         * which are not sf-tokens because they may start with a digit. */
        const unsigned char *from = c.p;
        while (c.p < c.end && (idem__is_tchar(*c.p) || *c.p == ':' || *c.p == '/'))
            c.p++;
        n = (size_t)(c.p - from);
        if (n >= key_size)
            return refuse("the Idempotency-Key is longer than the %zu characters this server accepts",
                          key_size - 1);
        memcpy(key, from, n);
    } else if (*c.p == ':') {
        return refuse("the Idempotency-Key is a byte sequence; send the key as a string, in double "
                      "quotes");
    } else {
        return refuse("the Idempotency-Key starts with a character that begins neither a string (in "
                      "double quotes) nor a token");
    }
    if ((rc = parse_parameters(&c)))
        return rc;
    if (c.p != c.end)
        return refuse("the Idempotency-Key has an unexpected character at character %zu, after its "
                      "value; send one key, in double quotes", pos(&c));
    key[n] = '\0';
    *key_len = n;
    return IDEM_OK;
}

/* ---- fingerprints ---- */

int idem_http_fingerprint(uint8_t out[IDEM_HTTP_FINGERPRINT_LEN], const char *method, const char *path,
                          const void *body, size_t body_len, const idem_header *headers,
                          size_t nheaders)
{
    idem__error_clear();
    if (!out || !method || !path || (!body && body_len) || (!headers && nheaders))
        return idem_error_set(IDEM_EINVAL, "idem_http_fingerprint: out, method and path must not be "
                              "NULL, nor body or headers with a length");
    for (size_t i = 0; i < nheaders; i++) {
        if (!headers[i].name)
            return idem_error_set(IDEM_EINVAL, "idem_http_fingerprint: header %zu has no name", i);
        if (strlen(headers[i].name) > 256)
            return idem_error_set(IDEM_EINVAL, "idem_http_fingerprint: header %zu's name is over 256 "
                                  "bytes", i);
    }
    static const char tag[] = "idem-http-fingerprint-1";
    idem_hash *h = idem__hash_begin();
    idem__hash_add_field(h, tag, sizeof tag - 1);
    idem__hash_add_field(h, method, strlen(method));
    idem__hash_add_field(h, path, strlen(path));
    idem__hash_add_field(h, body, body_len);
    uint8_t count[8];
    uint64_t v = nheaders;
    for (int i = 7; i >= 0; i--, v >>= 8)
        count[i] = (uint8_t)v;
    idem__hash_add(h, count, sizeof count);
    for (size_t i = 0; i < nheaders; i++) {
        char lower[256];
        size_t nl = strlen(headers[i].name);
        for (size_t k = 0; k < nl; k++) {
            char ch = headers[i].name[k];
            lower[k] = ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
        }
        const char *val = headers[i].value;
        idem__hash_add_field(h, lower, nl);
        idem__hash_add_field(h, val, val ? strlen(val) : IDEM_HASH_ABSENT);
    }
    if (idem__hash_end(h, out) != IDEM_OK)
        return idem_error_set(IDEM_ENOMEM, "computing a request fingerprint failed in libcrypto");
    return IDEM_OK;
}

/* ---- answers ---- */

static const char *status_title(int status)
{
    switch (status) {
    case 400: return "Bad Request";
    case 409: return "Conflict";
    case 422: return "Unprocessable Content";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    }
    return status >= 500 ? "Server Error" : "Client Error";
}

static const idem_header problem_type = {"Content-Type", "application/problem+json"};

/* The static answer when memory runs out. */
static void answer_fallback(idem_http_answer *ans)
{
    static const char body[] = "{\"type\":\"about:blank\",\"title\":\"Internal Server Error\","
                               "\"status\":500}";
    idem_http_answer_clear(ans);
    ans->status = 500;
    ans->headers = &problem_type;
    ans->nheaders = 1;
    ans->body = (const unsigned char *)body;
    ans->body_len = sizeof body - 1;
}

/* The answer's header list: base (n of them), then extra (m). */
static int answer_headers(idem_http_answer *ans, const idem_header *base, size_t n,
                          const idem_header *extra, size_t m)
{
    if (n + m == 0)
        return IDEM_OK;
    idem_header *h = malloc((n + m) * sizeof *h);
    if (!h)
        return IDEM_ENOMEM;
    if (n)
        memcpy(h, base, n * sizeof *h);
    if (m)
        memcpy(h + n, extra, m * sizeof *h);
    ans->own_headers_ = h;
    ans->headers = h;
    ans->nheaders = n + m;
    return IDEM_OK;
}

/* detail, JSON-escaped, into a new string. */
static char *json_escape(const char *s)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        n += *p == '"' || *p == '\\' ? 2 : *p < 0x20 ? 6 : 1;
    char *out = malloc(n + 1), *o = out;
    if (!out)
        return NULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            *o++ = '\\';
            *o++ = (char)*p;
        } else if (*p < 0x20) {
            o += sprintf(o, "\\u%04x", *p);
        } else {
            *o++ = (char)*p;
        }
    }
    *o = '\0';
    return out;
}

/* A problem document for status into ans, with retry_s > 0 a Retry-After
 * field, and extra fields before both. */
static int answer_problem(idem_http_answer *ans, int status, const char *detail, unsigned retry_s,
                          const idem_header *extra, size_t nextra)
{
    char *esc = detail ? json_escape(detail) : NULL;
    char *body = NULL;
    int n = -1;
    if (!detail || esc)
        n = asprintf(&body, "{\"type\":\"about:blank\",\"title\":\"%s\",\"status\":%d%s%s%s}",
                     status_title(status), status, esc ? ",\"detail\":\"" : "", esc ? esc : "",
                     esc ? "\"" : "");
    free(esc);
    if (n < 0)
        return IDEM_ENOMEM;
    ans->own_body_ = body;
    ans->status = status;
    ans->body = (const unsigned char *)body;
    ans->body_len = (size_t)n;
    idem_header mine[2] = {problem_type};
    size_t m = 1;
    if (retry_s) {
        snprintf(ans->retry_after_, sizeof ans->retry_after_, "%u", retry_s);
        mine[m++] = (idem_header){"Retry-After", ans->retry_after_};
    }
    /* the fields of the reply (a failed handler's) first, then ours */
    idem_header list[IDEM_MAX_HEADERS + 2];
    size_t k = 0;
    for (size_t i = 0; i < nextra && k < IDEM_MAX_HEADERS; i++)
        if (strcasecmp(extra[i].name, "Content-Type") != 0)
            list[k++] = extra[i];
    return answer_headers(ans, list, k, mine, m);
}

static int answer_reply(idem_http_answer *ans, const idem_reply *r, bool replayed)
{
    static const idem_header replay_mark = {"Idempotent-Replayed", "true"};
    ans->status = r->status;
    ans->body = r->body ? r->body : (const unsigned char *)"";
    ans->body_len = r->body ? r->body_len : 0;
    return answer_headers(ans, r->headers, r->nheaders, &replay_mark, replayed ? 1 : 0);
}

static bool problem_status(int status)
{
    return status == 400 || status == 409 || status == 422 || status == 500 || status == 503;
}

int idem_http_answer_make(idem_http_answer *ans, int rc, const idem_reply *reply)
{
    if (!ans)
        return IDEM_EINVAL;
    memset(ans, 0, sizeof *ans);
    static const idem_reply none = {0};
    int err;
    if (rc == IDEM_EKEY) {
        err = answer_problem(ans, 400, key_reason[0] ? key_reason
                                       : "the request's Idempotency-Key header is missing or invalid",
                             0, NULL, 0);
    } else if (!reply && rc == IDEM_OK) {
        answer_fallback(ans);
        return IDEM_EINVAL;
    } else if ((reply = reply ? reply : &none)->outcome == IDEM_EXECUTED) {
        /* The work is done, whatever kept its response from the store. */
        err = answer_reply(ans, reply, false);
    } else if (rc == IDEM_EBACKEND) {
        err = answer_problem(ans, 503, "the service cannot reach its store of idempotency keys; "
                             "nothing was done: retry with the same Idempotency-Key", 1, NULL, 0);
    } else if (rc != IDEM_OK) {
        err = answer_problem(ans, 500, "the server failed; nothing was done", 0, NULL, 0);
    } else if (reply->outcome == IDEM_REPLAYED) {
        err = answer_reply(ans, reply, true);
    } else if (reply->outcome == IDEM_IN_PROGRESS) {
        uint64_t s = ((uint64_t)reply->retry_after_ms + 999) / 1000;
        char detail[160];
        snprintf(detail, sizeof detail, "a request with this Idempotency-Key is still being "
                 "processed; retry in %llu s", (unsigned long long)(s ? s : 1));
        err = answer_problem(ans, 409, detail, s ? (unsigned)s : 1, NULL, 0);
    } else if (reply->outcome == IDEM_MISMATCH) {
        err = answer_problem(ans, 422, "this Idempotency-Key was already used for a different "
                             "request (another method, path or body); use a new key for a new "
                             "request", 0, NULL, 0);
    } else if (reply->outcome == IDEM_FAILED) {
        if (reply->body_len == 0 && problem_status(reply->status))
            err = answer_problem(ans, reply->status, "the request failed and nothing was stored; it "
                                 "is safe to retry with the same Idempotency-Key", 0,
                                 reply->headers, reply->nheaders);
        else
            err = answer_reply(ans, reply, false);
    } else {
        err = answer_problem(ans, 500, "the server failed; nothing was done", 0, NULL, 0);
    }
    if (err) {
        answer_fallback(ans);
        return err;
    }
    return IDEM_OK;
}

int idem_http_answer_problem(idem_http_answer *ans, int status, const char *detail)
{
    if (!ans)
        return IDEM_EINVAL;
    memset(ans, 0, sizeof *ans);
    if (status < 400 || status > 599) {
        answer_fallback(ans);
        return IDEM_EINVAL;
    }
    if (answer_problem(ans, status, detail, 0, NULL, 0) != IDEM_OK) {
        answer_fallback(ans);
        return IDEM_ENOMEM;
    }
    return IDEM_OK;
}

void idem_http_answer_clear(idem_http_answer *ans)
{
    if (!ans)
        return;
    free(ans->own_headers_);
    free(ans->own_body_);
    memset(ans, 0, sizeof *ans);
}
