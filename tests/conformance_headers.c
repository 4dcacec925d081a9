/*
 * Conformance: stored header fields (record format 2, docs/http.md) through
 * every driver. The driver sees format 2 records only as bytes and fences
 * them by their first 64 bytes, as it does format 1; these tests pin that a
 * response with fields comes back whole from each store, and that a store
 * holding both formats replays both.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

static idem_store *hstore;
static idem_layer *hlayer;

static void headers_setup(void)
{
    const char *url = getenv("IDEM_TEST_URL");
    cr_assert(url, "IDEM_TEST_URL is not set; run this through meson test");
    cr_assert_eq(idem_store_open(&hstore, url), IDEM_OK, "%s", idem_last_error());
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "h%ld-%08x:", (long)getpid(), r);
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = 10000;
    cr_assert_eq(idem_layer_new(&hlayer, hstore, &o), IDEM_OK, "%s", idem_last_error());
}

static void headers_teardown(void)
{
    idem_layer_free(hlayer);
    idem_store_close(hstore);
}

TestSuite(conformance_headers, .init = headers_setup, .fini = headers_teardown, .timeout = 60);

static const idem_header fields[] = {
    {"Content-Type", "application/json"},
    {"Location", "/payments/pay_1"},
    {"ETag", "W/\"1\""},
    {"X-Bytes", "\x01\x7f\x80\xff tab\there"},
    {"Empty", ""},
};
#define NFIELDS (sizeof fields / sizeof fields[0])

static int with_fields(void *arg, idem_response *resp)
{
    (void)arg;
    for (size_t i = 0; i < NFIELDS; i++)
        if (idem_response_add_header(resp, fields[i].name, fields[i].value) != IDEM_OK)
            return 1;
    return idem_response_set(resp, 201, "{\"id\":1}\0binary", 15);
}

static void assert_fields(const idem_reply *r)
{
    cr_assert_eq(r->nheaders, NFIELDS);
    for (size_t i = 0; i < NFIELDS; i++) {
        cr_assert_str_eq(r->headers[i].name, fields[i].name);
        cr_assert_str_eq(r->headers[i].value, fields[i].value);
    }
    cr_assert_eq(r->status, 201);
    cr_assert_eq(r->body_len, 15);
    cr_assert_eq(memcmp(r->body, "{\"id\":1}\0binary", 15), 0);
}

Test(conformance_headers, a_response_with_header_fields_replays_whole)
{
    idem_request req = {.key = "with-fields", .key_len = 11, .fingerprint = "f", .fingerprint_len = 1};
    idem_reply r = {0};
    cr_assert_eq(idem_run(hlayer, &req, with_fields, NULL, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    assert_fields(&r);
    cr_assert_eq(idem_run(hlayer, &req, with_fields, NULL, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    assert_fields(&r);
    idem_request other = {.key = "with-fields", .key_len = 11, .fingerprint = "g", .fingerprint_len = 1};
    cr_assert_eq(idem_run(hlayer, &other, with_fields, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_MISMATCH, "the fingerprint is read from a format 2 record");
    idem_reply_clear(&r);
}

Test(conformance_headers, both_formats_share_a_store_and_fields_fill_the_limit)
{
    idem_request plain = {.key = "plain", .key_len = 5};
    idem_request full = {.key = "full", .key_len = 4};
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(hlayer, &plain, &c, &r), IDEM_OK);
    cr_assert_eq(idem_commit(c, 200, "v1", 2), IDEM_OK, "%s", idem_last_error());

    /* IDEM_MAX_HEADERS_LEN bytes of names and values, over 64 fields */
    static char values[IDEM_MAX_HEADERS][300];
    idem_header many[IDEM_MAX_HEADERS];
    size_t per = IDEM_MAX_HEADERS_LEN / IDEM_MAX_HEADERS - 2; /* names "Xn"/"Xnn" take 2-3 bytes */
    static char names[IDEM_MAX_HEADERS][8];
    for (int i = 0; i < IDEM_MAX_HEADERS; i++) {
        snprintf(names[i], sizeof names[i], "X%d", i);
        memset(values[i], 'a' + i % 26, per);
        values[i][per - (i >= 10)] = '\0';
        many[i] = (idem_header){names[i], values[i]};
    }
    cr_assert_eq(idem_begin(hlayer, &full, &c, &r), IDEM_OK);
    cr_assert_eq(idem_commit_headers(c, 200, many, IDEM_MAX_HEADERS, "v2", 2), IDEM_OK, "%s",
                 idem_last_error());

    cr_assert_eq(idem_begin(hlayer, &plain, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.nheaders, 0);
    cr_assert_str_eq((char *)r.body, "v1");
    cr_assert_eq(idem_begin(hlayer, &full, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.nheaders, IDEM_MAX_HEADERS);
    for (int i = 0; i < IDEM_MAX_HEADERS; i++) {
        cr_assert_str_eq(r.headers[i].name, names[i]);
        cr_assert_str_eq(r.headers[i].value, values[i]);
    }
    cr_assert_str_eq((char *)r.body, "v2");
    idem_reply_clear(&r);
}
