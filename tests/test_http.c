/*
 * The HTTP layer (<idempotency/http.h>) and stored header fields: the
 * Idempotency-Key parser on every malformed value, the fingerprint's
 * construction, the answers for every outcome, and header fields through a
 * real store, record format 2 and format 1 records written by 0.1.0.
 * The rules are in docs/http.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <openssl/evp.h>

#include <idempotency/http.h>

#include "harness.h"
#include "internal.h"

/* ======================================================================== */
/* Idempotency-Key                                                          */
/* ======================================================================== */

static int parse1(const char *line, char *key, size_t size, size_t *len)
{
    const char *lines[1] = {line};
    return idem_http_key_parse(key, size, len, lines, 1);
}

static void assert_key(const char *line, const char *want)
{
    char key[256];
    size_t len = 99;
    int rc = parse1(line, key, sizeof key, &len);
    cr_assert_eq(rc, IDEM_OK, "refused [%s]: %s", line, idem_last_error());
    cr_assert_eq(len, strlen(want), "[%s]: length %zu", line, len);
    cr_assert_str_eq(key, want, "[%s]", line);
}

static void assert_refused(const char *line, const char *why)
{
    char key[256];
    size_t len = 99;
    int rc = parse1(line, key, sizeof key, &len);
    cr_assert_eq(rc, IDEM_EKEY, "[%s] (%s) gave %s, not IDEM_EKEY", line, why, idem_error_name(rc));
    cr_assert_eq(len, 0);
    const char *msg = idem_last_error();
    cr_assert(strstr(msg, "Idempotency-Key") != NULL, "[%s]: the reason names the header: %s", line,
              msg);
}

Test(http, key_string_and_bare_token_are_the_same_key)
{
    assert_key("\"abc\"", "abc");
    assert_key("abc", "abc");
    assert_key("  \"abc\"\t ", "abc");
    assert_key("\tabc ", "abc");
    assert_key("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324");
    assert_key("\"8e03978e-40d5-43e8-bc93-6894a57f9324\"", "8e03978e-40d5-43e8-bc93-6894a57f9324");
    assert_key("user:42/upgrade", "user:42/upgrade");
    assert_key("12345", "12345");
    assert_key("*tok", "*tok");
}

Test(http, key_string_escapes_and_printable_characters_are_kept)
{
    assert_key("\"a\\\"b\\\\c\"", "a\"b\\c");
    assert_key("\"with space ~!#\"", "with space ~!#");
    assert_key("\" \"", " ");
    assert_key("\"a;b=c\"", "a;b=c");
}

Test(http, key_parameters_of_every_kind_are_ignored)
{
    assert_key("\"abc\";a=1", "abc");
    assert_key("\"abc\";a", "abc");
    assert_key("\"abc\"; a=1;b", "abc");
    assert_key("\"abc\";int=-123456789012345;dec=123456789012.123;str=\"x\\\"y\";tok=t/k:1;"
               "bin=:aGVsbG8=:;t=?1;f=?0;star*=*", "abc");
    assert_key("abc;x=\"y\"", "abc");
}

Test(http, key_every_malformed_value_is_refused_with_a_reason)
{
    const struct {
        const char *line, *why;
    } bad[] = {
        {"", "empty"},
        {"   \t", "only spaces"},
        {"\"\"", "an empty string"},
        {"\"abc", "unterminated string"},
        {"\"", "a lone quote"},
        {"\"a\\nb\"", "an escape other than \\\" and \\\\"},
        {"\"abc\\\"", "an escape eats the closing quote"},
        {"\"a\tb\"", "a tab inside a string"},
        {"\"a\x7f\"", "DEL inside a string"},
        {"\"caf\xc3\xa9\"", "non-ASCII inside a string"},
        {"\"abc\" x", "trailing characters"},
        {"\"abc\"x", "trailing characters without a space"},
        {"\"abc\", \"def\"", "a list of two keys"},
        {"abc, def", "a list of two tokens"},
        {"abc def", "two words"},
        {"\"abc\" ;a=1", "a space before a parameter"},
        {"\"abc\";", "a parameter without a name"},
        {"\"abc\";A=1", "an upper-case parameter name"},
        {"\"abc\";1a=1", "a parameter name starting with a digit"},
        {"\"abc\";a=", "a parameter without a value"},
        {"\"abc\";a=?2", "a bad boolean"},
        {"\"abc\";a=:YWJj", "an unterminated byte sequence"},
        {"\"abc\";a=1234567890123456", "an integer of 16 digits"},
        {"\"abc\";a=1.2345", "a decimal with 4 fraction digits"},
        {"\"abc\";a=1234567890123.1", "a decimal with 13 integer digits"},
        {"\"abc\";a=-", "a lone minus"},
        {"\"abc\";a=\"x", "an unterminated string parameter"},
        {"\"abc\";a=@", "a parameter value of no type"},
        {":YWJj:", "a byte sequence"},
        {"?1", "a boolean"},
        {"(\"a\" \"b\")", "an inner list"},
        {"=abc", "starts with '='"},
        {"abc=", "a token with '='"},
        {"ab\"c\"", "a quote inside a token"},
        {"\xc3\xa9t\xc3\xa9", "non-ASCII token"},
        {"a\x01", "a control character"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_refused(bad[i].line, bad[i].why);
}

Test(http, key_missing_or_on_two_lines_is_refused)
{
    char key[256];
    size_t len;
    cr_assert_eq(idem_http_key_parse(key, sizeof key, &len, NULL, 0), IDEM_EKEY);
    cr_assert(strstr(idem_last_error(), "no Idempotency-Key") != NULL, "%s", idem_last_error());
    const char *two[] = {"\"abc\"", "\"abc\""};
    cr_assert_eq(idem_http_key_parse(key, sizeof key, &len, two, 2), IDEM_EKEY,
                 "two field lines, even with the same key");
    cr_assert(strstr(idem_last_error(), "2 Idempotency-Key") != NULL, "%s", idem_last_error());
}

Test(http, key_longer_than_the_buffer_allows_is_refused)
{
    char key[8];
    size_t len;
    cr_assert_eq(parse1("\"1234567\"", key, sizeof key, &len), IDEM_OK);
    cr_assert_eq(len, 7);
    cr_assert_eq(parse1("\"12345678\"", key, sizeof key, &len), IDEM_EKEY);
    cr_assert(strstr(idem_last_error(), "7 characters") != NULL, "%s", idem_last_error());
    cr_assert_eq(parse1("1234567", key, sizeof key, &len), IDEM_OK);
    cr_assert_eq(parse1("12345678", key, sizeof key, &len), IDEM_EKEY);
    /* the escapes do not count: 7 characters in 9 bytes of string */
    cr_assert_eq(parse1("\"\\\\\\\\34567\"", key, sizeof key, &len), IDEM_OK);
    cr_assert_str_eq(key, "\\\\34567");
    /* 254 characters fit the default 255, quotes or not */
    char line[300], big[256];
    memset(line, 'k', sizeof line);
    line[0] = '"';
    line[255] = '"';
    line[256] = '\0';
    cr_assert_eq(parse1(line, big, sizeof big, &len), IDEM_OK);
    cr_assert_eq(len, 254);
}

Test(http, key_programmer_errors_are_einval_not_ekey)
{
    char key[8];
    size_t len;
    const char *lines[] = {"\"a\""};
    cr_assert_eq(idem_http_key_parse(NULL, 8, &len, lines, 1), IDEM_EINVAL);
    cr_assert_eq(idem_http_key_parse(key, 8, NULL, lines, 1), IDEM_EINVAL);
    cr_assert_eq(idem_http_key_parse(key, 1, &len, lines, 1), IDEM_EINVAL);
    cr_assert_eq(idem_http_key_parse(key, 8, &len, NULL, 1), IDEM_EINVAL);
    const char *null_line[] = {NULL};
    cr_assert_eq(idem_http_key_parse(key, 8, &len, null_line, 1), IDEM_EINVAL);
}

/* ======================================================================== */
/* Fingerprints                                                             */
/* ======================================================================== */

static void fp(uint8_t out[32], const char *m, const char *p, const char *body, const idem_header *h,
               size_t n)
{
    cr_assert_eq(idem_http_fingerprint(out, m, p, body, body ? strlen(body) : 0, h, n), IDEM_OK);
}

static void be_field(EVP_MD_CTX *ctx, const void *p, uint64_t len)
{
    uint8_t be[8];
    for (int i = 7; i >= 0; i--)
        be[i] = (uint8_t)(len >> (8 * (7 - i)));
    EVP_DigestUpdate(ctx, be, 8);
    if (len != UINT64_MAX && len)
        EVP_DigestUpdate(ctx, p, (size_t)len);
}

Test(http, fingerprint_is_the_documented_sha256_of_length_prefixed_fields)
{
    idem_header h[] = {{"X-Tenant", "t1"}, {"Accept", NULL}};
    uint8_t got[32], want[32];
    fp(got, "POST", "/payments?x=1", "{\"amount\":5}", h, 2);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    be_field(ctx, "idem-http-fingerprint-1", 23);
    be_field(ctx, "POST", 4);
    be_field(ctx, "/payments?x=1", 13);
    be_field(ctx, "{\"amount\":5}", 12);
    uint8_t two[8] = {0, 0, 0, 0, 0, 0, 0, 2};
    EVP_DigestUpdate(ctx, two, 8);
    be_field(ctx, "x-tenant", 8);
    be_field(ctx, "t1", 2);
    be_field(ctx, "accept", 6);
    be_field(ctx, NULL, UINT64_MAX);
    unsigned n;
    EVP_DigestFinal_ex(ctx, want, &n);
    EVP_MD_CTX_free(ctx);
    cr_assert_arr_eq(got, want, 32);
}

Test(http, fingerprint_tells_apart_every_part_of_a_request)
{
    uint8_t a[32], b[32];
    fp(a, "POST", "/payments", "{}", NULL, 0);
    fp(b, "POST", "/payments", "{}", NULL, 0);
    cr_assert_arr_eq(a, b, 32, "deterministic");
    fp(b, "PUT", "/payments", "{}", NULL, 0);
    cr_assert_arr_neq(a, b, 32, "method");
    fp(b, "POST", "/payment", "{}", NULL, 0);
    cr_assert_arr_neq(a, b, 32, "path");
    fp(b, "POST", "/payments", "{ }", NULL, 0);
    cr_assert_arr_neq(a, b, 32, "body");
    fp(a, "POST", "/ab", "c", NULL, 0);
    fp(b, "POST", "/a", "bc", NULL, 0);
    cr_assert_arr_neq(a, b, 32, "no collision by concatenation");
    fp(a, "POST", "/p", "", NULL, 0);
    fp(b, "POST", "/p", NULL, NULL, 0);
    cr_assert_arr_eq(a, b, 32, "an empty body is no body");

    idem_header h1[] = {{"X-Tenant", "t1"}}, h2[] = {{"x-tenant", "t1"}}, h3[] = {{"X-Tenant", ""}},
                h4[] = {{"X-Tenant", NULL}}, h5[] = {{"X-Tenant", "t2"}};
    fp(a, "POST", "/p", "b", h1, 1);
    fp(b, "POST", "/p", "b", h2, 1);
    cr_assert_arr_eq(a, b, 32, "header names are case-insensitive");
    fp(b, "POST", "/p", "b", h5, 1);
    cr_assert_arr_neq(a, b, 32, "header values count");
    fp(a, "POST", "/p", "b", h3, 1);
    fp(b, "POST", "/p", "b", h4, 1);
    cr_assert_arr_neq(a, b, 32, "an empty value is not an absent one");
    fp(a, "POST", "/p", "b", NULL, 0);
    cr_assert_arr_neq(a, b, 32, "a header chosen but absent is not no header chosen");
}

Test(http, fingerprint_refuses_null_arguments)
{
    uint8_t out[32];
    idem_header noname[] = {{NULL, "v"}};
    cr_assert_eq(idem_http_fingerprint(NULL, "GET", "/", NULL, 0, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_http_fingerprint(out, NULL, "/", NULL, 0, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_http_fingerprint(out, "GET", NULL, NULL, 0, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_http_fingerprint(out, "GET", "/", NULL, 3, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_http_fingerprint(out, "GET", "/", NULL, 0, NULL, 1), IDEM_EINVAL);
    cr_assert_eq(idem_http_fingerprint(out, "GET", "/", NULL, 0, noname, 1), IDEM_EINVAL);
}

/* ======================================================================== */
/* Answers                                                                  */
/* ======================================================================== */

static const char *field(const idem_http_answer *a, const char *name)
{
    for (size_t i = 0; i < a->nheaders; i++)
        if (strcasecmp(a->headers[i].name, name) == 0)
            return a->headers[i].value;
    return NULL;
}

static const char *body(const idem_http_answer *a)
{
    return (const char *)a->body;
}

/* An RFC 9457 document of status with this title, and a detail. */
static void assert_problem(const idem_http_answer *a, int status, const char *title)
{
    cr_assert_eq(a->status, status);
    cr_assert_str_eq(field(a, "Content-Type"), "application/problem+json");
    char head[160];
    snprintf(head, sizeof head, "{\"type\":\"about:blank\",\"title\":\"%s\",\"status\":%d,\"detail\":\"",
             title, status);
    cr_assert_eq(strncmp(body(a), head, strlen(head)), 0, "problem body: %s", body(a));
    cr_assert_eq(strlen(body(a)), a->body_len);
    cr_assert_eq(body(a)[a->body_len - 1], '}');
    cr_assert_eq(body(a)[a->body_len - 2], '"');
}

static idem_header stored[] = {{"Content-Type", "application/json"}, {"Location", "/payments/p1"}};

static idem_reply reply_of(idem_outcome o, int status, const char *b)
{
    idem_reply r = {.outcome = o, .status = status, .body = (unsigned char *)b,
                    .body_len = b ? strlen(b) : 0, .headers = stored, .nheaders = 2};
    return r;
}

Test(http, answer_executed_and_replayed_send_the_stored_response)
{
    idem_reply r = reply_of(IDEM_EXECUTED, 201, "{\"id\":1}");
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    cr_assert_eq(a.status, 201);
    cr_assert_eq(a.nheaders, 2);
    cr_assert_str_eq(a.headers[0].name, "Content-Type");
    cr_assert_str_eq(a.headers[1].value, "/payments/p1");
    cr_assert_str_eq(body(&a), "{\"id\":1}");
    cr_assert_null(field(&a, "Idempotent-Replayed"));
    idem_http_answer_clear(&a);

    r.outcome = IDEM_REPLAYED;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    cr_assert_eq(a.status, 201);
    cr_assert_eq(a.nheaders, 3);
    cr_assert_str_eq(a.headers[0].name, "Content-Type");
    cr_assert_str_eq(a.headers[1].name, "Location");
    cr_assert_str_eq(a.headers[2].name, "Idempotent-Replayed");
    cr_assert_str_eq(a.headers[2].value, "true");
    cr_assert_eq(a.body_len, 8);
    idem_http_answer_clear(&a);

    /* the work is done even when the store could not take its response */
    r.outcome = IDEM_EXECUTED;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_EBACKEND, &r), IDEM_OK);
    cr_assert_eq(a.status, 201);
    idem_http_answer_clear(&a);
    cr_assert_eq(idem_http_answer_make(&a, IDEM_ELOST, &r), IDEM_OK);
    cr_assert_eq(a.status, 201);
    idem_http_answer_clear(&a);
}

/* Whatever kept the response from the store, the handler ran: every error
 * code that comes with IDEM_EXECUTED is answered with its response, never
 * with "nothing was done". */
Test(http, answer_executed_with_any_error_sends_the_handlers_response)
{
    static const int codes[] = {IDEM_ENOMEM, IDEM_EBACKEND, IDEM_ELOST, IDEM_ETOOBIG, IDEM_ECORRUPT,
                                IDEM_EINVAL, IDEM_EUNSUPPORTED};
    idem_reply r = reply_of(IDEM_EXECUTED, 201, "{\"id\":1}");
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        idem_http_answer a;
        cr_assert_eq(idem_http_answer_make(&a, codes[i], &r), IDEM_OK, "%s", idem_error_name(codes[i]));
        cr_assert_eq(a.status, 201, "%s answered %d", idem_error_name(codes[i]), a.status);
        cr_assert_str_eq(body(&a), "{\"id\":1}", "%s", idem_error_name(codes[i]));
        cr_assert_not_null(field(&a, "Location"), "%s", idem_error_name(codes[i]));
        idem_http_answer_clear(&a);
    }
}

Test(http, answer_in_progress_is_409_with_retry_after_in_whole_seconds_rounded_up)
{
    const struct {
        uint32_t ms;
        const char *s;
    } cases[] = {{1, "1"}, {999, "1"}, {1000, "1"}, {1001, "2"}, {59001, "60"}, {0, "1"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        idem_reply r = {.outcome = IDEM_IN_PROGRESS, .status = 409, .retry_after_ms = cases[i].ms};
        idem_http_answer a;
        cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
        assert_problem(&a, 409, "Conflict");
        cr_assert_str_eq(field(&a, "Retry-After"), cases[i].s, "%u ms", cases[i].ms);
        idem_http_answer_clear(&a);
    }
}

Test(http, answer_mismatch_is_422_and_store_down_is_503_with_retry_after)
{
    idem_reply r = {.outcome = IDEM_MISMATCH, .status = 422};
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    assert_problem(&a, 422, "Unprocessable Content");
    cr_assert_null(field(&a, "Retry-After"));
    idem_http_answer_clear(&a);

    idem_reply none = {0};
    cr_assert_eq(idem_http_answer_make(&a, IDEM_EBACKEND, &none), IDEM_OK);
    assert_problem(&a, 503, "Service Unavailable");
    cr_assert_str_eq(field(&a, "Retry-After"), "1");
    idem_http_answer_clear(&a);
    cr_assert_eq(idem_http_answer_make(&a, IDEM_EBACKEND, NULL), IDEM_OK);
    cr_assert_eq(a.status, 503);
    idem_http_answer_clear(&a);
}

Test(http, answer_client_key_error_is_400_and_programmer_errors_are_500)
{
    char key[16];
    size_t len;
    const char *lines[] = {"\"abc"};
    cr_assert_eq(idem_http_key_parse(key, sizeof key, &len, lines, 1), IDEM_EKEY);
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_EKEY, NULL), IDEM_OK);
    assert_problem(&a, 400, "Bad Request");
    cr_assert(strstr(body(&a), "no closing double quote") != NULL, "the reason is the detail: %s",
              body(&a));
    idem_http_answer_clear(&a);

    /* the store's message (with a path) never reaches the client */
    idem_error_set(IDEM_EINVAL, "sqlite /var/secret/idem.db: this store was opened before fork()");
    idem_reply none = {0};
    const int server_errors[] = {IDEM_EINVAL, IDEM_ENOMEM, IDEM_ECORRUPT, IDEM_EUNSUPPORTED, -99};
    for (size_t i = 0; i < sizeof server_errors / sizeof server_errors[0]; i++) {
        cr_assert_eq(idem_http_answer_make(&a, server_errors[i], &none), IDEM_OK);
        assert_problem(&a, 500, "Internal Server Error");
        cr_assert_null(strstr(body(&a), "/var"), "%s", body(&a));
        idem_http_answer_clear(&a);
    }
    cr_assert(strstr(idem_last_error(), "/var/secret") != NULL, "the answer leaves the message alone");
}

Test(http, answer_failed_handler_keeps_its_response_or_gets_a_problem)
{
    idem_header retry[] = {{"Retry-After", "3"}, {"Content-Type", "text/plain"}};
    idem_reply r = {.outcome = IDEM_FAILED, .status = 503, .body = (unsigned char *)"",
                    .headers = retry, .nheaders = 2};
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    assert_problem(&a, 503, "Service Unavailable");
    cr_assert_str_eq(field(&a, "Retry-After"), "3", "the handler's own field");
    size_t types = 0;
    for (size_t i = 0; i < a.nheaders; i++)
        types += strcasecmp(a.headers[i].name, "Content-Type") == 0;
    cr_assert_eq(types, 1, "one Content-Type: the problem's");
    idem_http_answer_clear(&a);

    r = reply_of(IDEM_FAILED, 402, "{\"error\":\"card declined\"}");
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    cr_assert_eq(a.status, 402);
    cr_assert_str_eq(body(&a), "{\"error\":\"card declined\"}");
    cr_assert_null(field(&a, "Idempotent-Replayed"));
    idem_http_answer_clear(&a);
}

Test(http, answer_problem_escapes_its_detail_as_json)
{
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_problem(&a, 400, "bad \"amount\"\n\\ here"), IDEM_OK);
    assert_problem(&a, 400, "Bad Request");
    cr_assert(strstr(body(&a), "bad \\\"amount\\\"\\u000a\\\\ here\"}") != NULL, "%s", body(&a));
    idem_http_answer_clear(&a);
    cr_assert_eq(idem_http_answer_problem(&a, 404, NULL), IDEM_OK);
    cr_assert_str_eq(body(&a), "{\"type\":\"about:blank\",\"title\":\"Client Error\",\"status\":404}");
    idem_http_answer_clear(&a);
    cr_assert_eq(idem_http_answer_problem(&a, 200, "x"), IDEM_EINVAL);
    cr_assert_eq(a.status, 500, "an error still leaves an answer to send");
    idem_http_answer_clear(&a);
    cr_assert_eq(idem_http_answer_make(NULL, IDEM_OK, NULL), IDEM_EINVAL);
    idem_http_answer_clear(NULL);
}

/* ======================================================================== */
/* Stored header fields                                                     */
/* ======================================================================== */

Test(http, reply_keeps_its_size)
{
    cr_assert_eq(sizeof(idem_reply), 64);
}

static idem_test_server srv;
static idem_store *store;
static idem_layer *layer;

static void open_layer(void)
{
    cr_assert_eq(idem_test_server_start(&srv, "sqlite"), 0);
    cr_assert_eq(idem_store_open(&store, srv.url), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_layer_new(&layer, store, NULL), IDEM_OK);
}

static void close_layer(void)
{
    idem_layer_free(layer);
    idem_store_close(store);
    idem_test_server_stop(&srv);
}

/* Byte values a field value may hold: obs-text, tabs, inner spaces, an
 * empty value, and names in mixed case. */
static const idem_header odd[] = {
    {"Content-Type", "application/json"},
    {"Location", "/payments/pay_1"},
    {"ETag", "\"v1\""},
    {"x-MiXeD", " \t spaced \xff\x80 obs-text "},
    {"Empty", ""},
    {"Link", "</a>; rel=next"},
    {"Link", "</b>; rel=prev"},
};
#define NODD (sizeof odd / sizeof odd[0])

static int add_fields(void *arg, idem_response *resp)
{
    (void)arg;
    for (size_t i = 0; i < NODD; i++)
        cr_assert_eq(idem_response_add_header(resp, odd[i].name, odd[i].value), IDEM_OK, "%s",
                     idem_last_error());
    return idem_response_set(resp, 201, "{\"id\":1}", 8);
}

static void assert_odd_fields(const idem_reply *r)
{
    cr_assert_eq(r->nheaders, NODD);
    for (size_t i = 0; i < NODD; i++) {
        cr_assert_str_eq(r->headers[i].name, odd[i].name, "field %zu", i);
        cr_assert_str_eq(r->headers[i].value, odd[i].value, "field %zu", i);
    }
}

Test(http, header_fields_are_replayed_in_order_byte_for_byte, .init = open_layer, .fini = close_layer)
{
    idem_request req = {.key = "k1", .key_len = 2};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, add_fields, NULL, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    assert_odd_fields(&r);
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(idem_run(layer, &req, add_fields, NULL, &r), IDEM_OK);
        cr_assert_eq(r.outcome, IDEM_REPLAYED);
        cr_assert_eq(r.status, 201);
        cr_assert_str_eq((char *)r.body, "{\"id\":1}");
        assert_odd_fields(&r);
    }
    idem_reply_clear(&r);
    cr_assert_null(r.headers);
    cr_assert_eq(r.nheaders, 0);
}

Test(http, commit_headers_stores_fields_and_commit_stores_none, .init = open_layer,
     .fini = close_layer)
{
    idem_request req = {.key = "k2", .key_len = 2};
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    cr_assert_eq(idem_commit_headers(c, 200, odd, NODD, "ok", 2), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_null(c);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    assert_odd_fields(&r);

    idem_request plain = {.key = "k3", .key_len = 2};
    cr_assert_eq(idem_begin(layer, &plain, &c, &r), IDEM_OK);
    cr_assert_eq(idem_commit(c, 200, "ok", 2), IDEM_OK);
    cr_assert_eq(idem_begin(layer, &plain, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_null(r.headers);
    cr_assert_eq(r.nheaders, 0);
    idem_reply_clear(&r);
}

static int bad_fields(void *arg, idem_response *resp)
{
    (void)arg;
    cr_assert_eq(idem_response_add_header(resp, "Bad Name", "v"), IDEM_EINVAL, "a space in a name");
    cr_assert_eq(idem_response_add_header(resp, "", "v"), IDEM_EINVAL, "an empty name");
    cr_assert_eq(idem_response_add_header(resp, "Na:me", "v"), IDEM_EINVAL, "a colon in a name");
    cr_assert_eq(idem_response_add_header(resp, "X", "a\r\nSet-Cookie: x"), IDEM_EINVAL, "CR LF");
    cr_assert_eq(idem_response_add_header(resp, "X", "a\nb"), IDEM_EINVAL, "LF");
    cr_assert_eq(idem_response_add_header(resp, NULL, "v"), IDEM_EINVAL);
    cr_assert_eq(idem_response_add_header(resp, "X", NULL), IDEM_EINVAL);
    cr_assert_eq(idem_response_add_header(NULL, "X", "v"), IDEM_EINVAL);
    char name[300];
    memset(name, 'n', sizeof name);
    name[256] = '\0';
    cr_assert_eq(idem_response_add_header(resp, name, "v"), IDEM_EINVAL, "a 256-byte name");
    for (int i = 0; i < IDEM_MAX_HEADERS; i++)
        cr_assert_eq(idem_response_add_header(resp, "X-N", "1"), IDEM_OK);
    cr_assert_eq(idem_response_add_header(resp, "X-N", "1"), IDEM_ETOOBIG, "one field too many");
    return 0;
}

Test(http, bad_or_too_many_fields_are_refused_and_the_good_ones_stay, .init = open_layer,
     .fini = close_layer)
{
    idem_request req = {.key = "k4", .key_len = 2};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, bad_fields, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.nheaders, IDEM_MAX_HEADERS);
    cr_assert_eq(idem_run(layer, &req, bad_fields, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.nheaders, IDEM_MAX_HEADERS);
    idem_reply_clear(&r);
}

Test(http, fields_over_the_byte_limit_are_etoobig_and_the_claim_stays, .init = open_layer,
     .fini = close_layer)
{
    char *big = malloc(IDEM_MAX_HEADERS_LEN);
    memset(big, 'v', IDEM_MAX_HEADERS_LEN - 1);
    big[IDEM_MAX_HEADERS_LEN - 1] = '\0';
    idem_header fits[] = {{"X", big}};             /* 1 + 16383 bytes: exactly the limit */
    idem_header over[] = {{"XY", big}};
    idem_header crlf[] = {{"X", "a\rb"}};
    idem_request req = {.key = "k5", .key_len = 2};
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_commit_headers(c, 200, over, 1, "", 0), IDEM_ETOOBIG);
    cr_assert_eq(idem_commit_headers(c, 200, crlf, 1, "", 0), IDEM_EINVAL);
    cr_assert_eq(idem_commit_headers(c, 200, NULL, 1, "", 0), IDEM_EINVAL);
    cr_assert_eq(idem_commit_headers(c, 200, fits, 1, "", 0), IDEM_OK, "the claim stayed: %s",
                 idem_last_error());
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(strlen(r.headers[0].value), IDEM_MAX_HEADERS_LEN - 1);
    idem_reply_clear(&r);
    free(big);
}

static int failing_with_fields(void *arg, idem_response *resp)
{
    (void)arg;
    idem_response_add_header(resp, "Retry-After", "2");
    idem_response_set(resp, 503, NULL, 0);
    return 1;
}

Test(http, a_failed_handler_s_fields_reach_its_reply_and_are_not_stored, .init = open_layer,
     .fini = close_layer)
{
    idem_request req = {.key = "k6", .key_len = 2};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, failing_with_fields, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.status, 503);
    cr_assert_eq(r.nheaders, 1);
    cr_assert_str_eq(r.headers[0].value, "2");
    cr_assert_eq(idem_run(layer, &req, add_fields, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the key was freed");
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* Record formats                                                           */
/* ======================================================================== */

/* A COMPLETED record as 0.1.0 wrote it, byte by byte. */
static size_t record_v1(uint8_t *b)
{
    memset(b, 0, 128);
    memcpy(b, "IDEM", 4);
    b[4] = 1;
    b[5] = 'C';
    memset(b + 8, 0xab, 16);           /* token */
    b[64 + 2] = 0, b[64 + 3] = 200;    /* status */
    b[68 + 3] = 5;                     /* body length */
    memcpy(b + 72, "hello", 5);
    return 77;
}

Test(http, records_written_by_0_1_0_still_decode_and_replay_without_fields)
{
    uint8_t b[128];
    size_t len = record_v1(b);
    idem_record rec;
    cr_assert_eq(idem__record_decode(b, len, &rec), IDEM_OK);
    cr_assert_eq(rec.status, 200);
    cr_assert_eq(rec.body_len, 5);
    cr_assert_eq(rec.nheaders, 0);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(b, len, &info), IDEM_OK);
}

Test(http, records_with_fields_are_format_2_and_keep_the_first_64_bytes)
{
    idem_header h[] = {{"Location", "/p/1"}, {"E", ""}};
    idem_record rec = {.state = IDEM_STATE_COMPLETED, .status = 201, .body = (const uint8_t *)"hi",
                       .body_len = 2, .headers = h, .nheaders = 2};
    memset(rec.token, 0x5a, IDEM_TOKEN_LEN);
    uint8_t *enc;
    size_t len;
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    cr_assert_eq(len, 80 + (4 + 8 + 4) + (4 + 1) + 2);
    cr_assert_eq(enc[4], 2, "the version byte a 0.1.0 reader refuses");
    cr_assert_eq(enc[IDEM_RECORD_STATE_OFFSET], 'C');
    cr_assert_eq(enc[IDEM_RECORD_TOKEN_OFFSET], 0x5a);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(enc, len, &info), IDEM_OK, "drivers' peek takes format 2");
    cr_assert_eq(info.state, IDEM_STATE_COMPLETED);
    cr_assert_eq(info.token, enc + IDEM_RECORD_TOKEN_OFFSET);

    idem_record back;
    cr_assert_eq(idem__record_decode(enc, len, &back), IDEM_OK);
    cr_assert_eq(back.nheaders, 2);
    cr_assert_eq(back.body_len, 2);
    cr_assert_eq(memcmp(back.body, "hi", 2), 0);
    idem_header *copy;
    cr_assert_eq(idem__headers_from_record(&back, &copy), IDEM_OK);
    cr_assert_str_eq(copy[0].name, "Location");
    cr_assert_str_eq(copy[0].value, "/p/1");
    cr_assert_str_eq(copy[1].name, "E");
    cr_assert_str_eq(copy[1].value, "");
    free(copy);

    /* corruptions of the fields */
    uint8_t *b = malloc(len + 1);
    const struct {
        size_t off;
        uint8_t val;
        const char *what;
    } bad[] = {
        {73, 0, "no fields in a format 2 record"},
        {73, 3, "a count above the fields there are"},
        {75, 1, "the zero bytes not zero"},
        {79, 0xff, "a fields length past the record"},
        {80 + 4, ' ', "a space in a name"},
        {80 + 4 + 8, '\n', "LF in a value"},
        {80 + 1, 0xff, "a name length past the fields"},
        {4, 3, "a version from the future"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(b, enc, len);
        b[bad[i].off] = bad[i].val;
        cr_assert_eq(idem__record_decode(b, len, &back), IDEM_ECORRUPT, "%s", bad[i].what);
    }
    memcpy(b, enc, len);
    b[5] = 'S';
    cr_assert_eq(idem_record_peek(b, len, &info), IDEM_ECORRUPT, "a format 2 STARTED record");
    free(b);
    free(enc);
}

Test(http, the_answer_keeps_its_0_2_size_and_offsets)
{
    /* A server built against 0.2 allocates this struct: later fields come
     * out of reserved_, never from growing it (x86-64 and other LP64). */
#if UINTPTR_MAX == UINT64_MAX
    cr_assert_eq(sizeof(idem_http_answer), 80);
    cr_assert_eq(offsetof(idem_http_answer, status), 0);
    cr_assert_eq(offsetof(idem_http_answer, headers), 8);
    cr_assert_eq(offsetof(idem_http_answer, nheaders), 16);
    cr_assert_eq(offsetof(idem_http_answer, body), 24);
    cr_assert_eq(offsetof(idem_http_answer, body_len), 32);
    cr_assert_eq(offsetof(idem_http_answer, reserved_), 72);
#endif
    /* the private buffer still holds the longest Retry-After */
    idem_reply r = {.outcome = IDEM_IN_PROGRESS, .status = 409, .retry_after_ms = UINT32_MAX};
    idem_http_answer a;
    cr_assert_eq(idem_http_answer_make(&a, IDEM_OK, &r), IDEM_OK);
    const char *ra = NULL;
    for (size_t i = 0; i < a.nheaders; i++)
        if (strcmp(a.headers[i].name, "Retry-After") == 0)
            ra = a.headers[i].value;
    cr_assert_str_eq(ra, "4294968");
    idem_http_answer_clear(&a);
}
