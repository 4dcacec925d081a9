/*
 * The conformance suite: SPEC sections 1 and 2, run unchanged against every
 * driver. IDEM_TEST_BACKEND names the kind of store (sqlite, redis,
 * memcached, memcached2); main() starts what it needs and passes its URL to
 * the tests in IDEM_TEST_URL. Each test uses a key prefix of its own, so
 * tests may run in parallel on one store.
 */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

#include "harness.h"
#include "internal.h"

/* ---- fixtures ---- */

static idem_store *store;
static idem_layer *layer;
static char prefix[64];

static void open_layer_with(idem_layer **out, const idem_options *opts)
{
    int rc = idem_layer_new(out, store, opts);
    cr_assert_eq(rc, IDEM_OK, "idem_layer_new: %s", idem_last_error());
}

/* Options for this test: its own key prefix, short lease by default. */
static idem_options test_options(uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = lease_ms;
    return o;
}

static void setup(void)
{
    const char *url = getenv("IDEM_TEST_URL");
    cr_assert(url, "IDEM_TEST_URL is not set; run this through meson test");
    int rc = idem_store_open(&store, url);
    cr_assert_eq(rc, IDEM_OK, "idem_store_open(%s): %s", url, idem_last_error());
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "t%ld-%08x:", (long)getpid(), r);
    idem_options o = test_options(10000);
    open_layer_with(&layer, &o);
}

static void teardown(void)
{
    idem_layer_free(layer);
    idem_store_close(store);
    layer = NULL;
    store = NULL;
}

TestSuite(conformance, .init = setup, .fini = teardown, .timeout = 60);

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- handlers ---- */

typedef struct job {
    atomic_int  calls;
    int         status;
    const void *body;
    size_t      len;
    int         fail;       /* returned instead of 0 when non-zero */
    long        sleep_ms;   /* before answering */
} job;

static int job_handler(void *arg, idem_response *resp)
{
    job *j = arg;
    atomic_fetch_add(&j->calls, 1);
    if (j->sleep_ms)
        sleep_ms(j->sleep_ms);
    if (j->fail)
        return j->fail;
    int rc = idem_response_set(resp, j->status, j->body, j->len);
    return rc == IDEM_OK ? 0 : rc;
}

static idem_request req_of(const void *key, size_t key_len)
{
    return (idem_request){.key = key, .key_len = key_len};
}

static idem_request req_str(const char *key)
{
    return req_of(key, strlen(key));
}

/* Run job under key and check the call returned IDEM_OK. */
static idem_outcome run_ok(idem_layer *l, idem_request req, job *j, idem_reply *reply)
{
    int rc = idem_run(l, &req, job_handler, j, reply);
    cr_assert_eq(rc, IDEM_OK, "idem_run: %s (%s)", idem_error_name(rc), idem_last_error());
    return reply->outcome;
}

/* ---- SPEC section 1, row by row ---- */

Test(conformance, first_request_executes_and_stores_the_response)
{
    job j = {.status = 201, .body = "charged", .len = 7};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req_str("pay-1"), &j, &r), IDEM_EXECUTED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, 7);
    cr_assert_str_eq((char *)r.body, "charged");
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_reply_clear(&r);
}

Test(conformance, duplicate_after_completion_replays_status_and_body_byte_for_byte)
{
    static const unsigned char body[] = {0, 1, 2, 'x', 0, 0xff, '\r', '\n', 0x80};
    job j = {.status = 202, .body = body, .len = sizeof body};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req_str("pay-2"), &j, &r), IDEM_EXECUTED);
    for (int i = 0; i < 3; i++) {
        job other = {.status = 500, .body = "other", .len = 5};
        cr_assert_eq(run_ok(layer, req_str("pay-2"), &other, &r), IDEM_REPLAYED);
        cr_assert_eq(atomic_load(&other.calls), 0, "a replay must not run the handler");
        cr_assert_eq(r.status, 202);
        cr_assert_eq(r.body_len, sizeof body);
        cr_assert_arr_eq(r.body, body, sizeof body);
        cr_assert_eq(r.body[r.body_len], 0, "reply bodies are NUL-terminated");
    }
    idem_reply_clear(&r);
}

Test(conformance, duplicate_while_running_gets_in_progress_with_time_left_on_the_lease)
{
    idem_request req = req_str("pay-3");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);

    job j = {.status = 200};
    cr_assert_eq(run_ok(layer, req, &j, &r), IDEM_IN_PROGRESS);
    cr_assert_eq(atomic_load(&j.calls), 0);
    cr_assert_eq(r.status, 409);
    cr_assert(r.retry_after_ms > 0 && r.retry_after_ms <= 10000, "retry_after_ms %u", r.retry_after_ms);
    cr_assert(r.retry_after_ms > 5000, "a fresh 10 s lease has more than 5 s left, not %u", r.retry_after_ms);

    cr_assert_eq(idem_commit(c, 200, "ok", 2), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(run_ok(layer, req, &j, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "ok");
    idem_reply_clear(&r);
}

Test(conformance, different_fingerprint_is_a_mismatch_against_a_running_request)
{
    idem_request req = {.key = "pay-4", .key_len = 5, .fingerprint = "amount=100", .fingerprint_len = 10};
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);

    idem_request other = req;
    other.fingerprint = "amount=999";
    job j = {.status = 200};
    cr_assert_eq(run_ok(layer, other, &j, &r), IDEM_MISMATCH);
    cr_assert_eq(r.status, 422);
    cr_assert_eq(atomic_load(&j.calls), 0);
    cr_assert_eq(idem_abort(c), IDEM_OK);
    idem_reply_clear(&r);
}

Test(conformance, different_fingerprint_is_a_mismatch_against_a_completed_request)
{
    idem_request req = {.key = "pay-5", .key_len = 5, .fingerprint = "amount=100", .fingerprint_len = 10};
    job j = {.status = 200, .body = "done", .len = 4};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req, &j, &r), IDEM_EXECUTED);

    idem_request other = req;
    other.fingerprint = "amount=101";
    cr_assert_eq(run_ok(layer, other, &j, &r), IDEM_MISMATCH);
    cr_assert_eq(r.status, 422);
    cr_assert_null(r.body);

    cr_assert_eq(run_ok(layer, req, &j, &r), IDEM_REPLAYED, "the same fingerprint still replays");
    cr_assert_eq(atomic_load(&j.calls), 1);

    idem_request unchecked = req;
    unchecked.fingerprint = NULL;
    unchecked.fingerprint_len = 0;
    cr_assert_eq(run_ok(layer, unchecked, &j, &r), IDEM_REPLAYED, "no fingerprint: not checked");
    idem_reply_clear(&r);
}

Test(conformance, failing_handler_stores_nothing_and_frees_the_key_at_once)
{
    job bad = {.fail = 7};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req_str("pay-6"), &bad, &r), IDEM_FAILED);
    cr_assert_eq(r.handler_error, 7);
    cr_assert_eq(atomic_load(&bad.calls), 1);

    job good = {.status = 200, .body = "second try", .len = 10};
    cr_assert_eq(run_ok(layer, req_str("pay-6"), &good, &r), IDEM_EXECUTED, "a retry must run");
    cr_assert_eq(run_ok(layer, req_str("pay-6"), &good, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "second try");
    cr_assert_eq(atomic_load(&good.calls), 1);
    idem_reply_clear(&r);
}

Test(conformance, invalid_keys_are_refused_with_a_message)
{
    job j = {.status = 200};
    idem_reply r = {0};
    idem_request empty = req_of("", 0);
    cr_assert_eq(idem_run(layer, &empty, job_handler, &j, &r), IDEM_EINVAL);
    cr_assert(strlen(idem_last_error()) > 0);

    char key[257];
    memset(key, 'k', sizeof key);
    idem_request over = req_of(key, 256);
    cr_assert_eq(idem_run(layer, &over, job_handler, &j, &r), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "255"), "message names the limit: %s", idem_last_error());

    idem_request at = req_of(key, 255);
    cr_assert_eq(run_ok(layer, at, &j, &r), IDEM_EXECUTED);
    cr_assert_eq(run_ok(layer, at, &j, &r), IDEM_REPLAYED);

    idem_request null_key = {.key = NULL, .key_len = 3};
    cr_assert_eq(idem_run(layer, &null_key, job_handler, &j, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run(NULL, &at, job_handler, &j, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run(layer, NULL, job_handler, &j, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run(layer, &at, NULL, &j, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run(layer, &at, job_handler, &j, NULL), IDEM_EINVAL);
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_reply_clear(&r);
}

Test(conformance, binary_keys_with_nul_cr_lf_and_spaces_are_distinct_keys)
{
    static const char *const keys[] = {"a\0b", "a\0c", "a\r\nb", "a b", "a\tb", "a", "ab", "a\0",
                                       "\xff\xfe", "%61", "a_b", "A b"};
    static const size_t lens[] = {3, 3, 4, 3, 3, 1, 2, 2, 2, 3, 3, 3};
    idem_reply r = {0};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char body[16];
        int n = snprintf(body, sizeof body, "resp-%zu", i);
        job j = {.status = 200, .body = body, .len = (size_t)n};
        cr_assert_eq(run_ok(layer, req_of(keys[i], lens[i]), &j, &r), IDEM_EXECUTED,
                     "key %zu collided with an earlier one", i);
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char body[16];
        snprintf(body, sizeof body, "resp-%zu", i);
        job j = {.status = 200};
        cr_assert_eq(run_ok(layer, req_of(keys[i], lens[i]), &j, &r), IDEM_REPLAYED);
        cr_assert_str_eq((char *)r.body, body, "key %zu replayed another key's response", i);
    }
    idem_reply_clear(&r);
}

Test(conformance, keys_that_are_prefixes_of_each_other_are_distinct)
{
    char key[255];
    memset(key, 'p', sizeof key);
    idem_reply r = {0};
    for (size_t n = 1; n <= sizeof key; n += 37) {
        job j = {.status = 200 + (int)(n % 100)};
        cr_assert_eq(run_ok(layer, req_of(key, n), &j, &r), IDEM_EXECUTED, "length %zu", n);
    }
    for (size_t n = 1; n <= sizeof key; n += 37) {
        job j = {.status = 200};
        cr_assert_eq(run_ok(layer, req_of(key, n), &j, &r), IDEM_REPLAYED);
        cr_assert_eq(r.status, 200 + (int)(n % 100));
    }
    idem_reply_clear(&r);
}

Test(conformance, empty_body_is_stored_and_replayed)
{
    job j = {.status = 204};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req_str("empty"), &j, &r), IDEM_EXECUTED);
    cr_assert_eq(r.body_len, 0);
    cr_assert_eq(run_ok(layer, req_str("empty"), &j, &r), IDEM_REPLAYED);
    cr_assert_eq(r.status, 204);
    cr_assert_eq(r.body_len, 0);
    cr_assert_not_null(r.body);
    cr_assert_eq(r.body[0], 0);
    idem_reply_clear(&r);
}

static int set_twice(void *arg, idem_response *resp)
{
    size_t limit = *(size_t *)arg;
    unsigned char *big = malloc(limit + 1);
    cr_assert_not_null(big);
    for (size_t i = 0; i <= limit; i++)
        big[i] = (unsigned char)(i * 7 + 3);
    int over = idem_response_set(resp, 200, big, limit + 1);
    int at = idem_response_set(resp, 200, big, limit);
    free(big);
    return over == IDEM_ETOOBIG && at == IDEM_OK ? 0 : 1;
}

Test(conformance, body_at_the_limit_is_stored_and_one_byte_over_is_refused_when_set)
{
    idem_options o = test_options(10000);
    o.max_response_len = 64 * 1024;
    idem_layer *l;
    open_layer_with(&l, &o);
    size_t limit = o.max_response_len;
    idem_request req = req_str("big");
    idem_reply r = {0};
    cr_assert_eq(idem_run(l, &req, set_twice, &limit, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the over-limit set must fail and the one at the limit succeed");
    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_REPLAYED);
    cr_assert_eq(r.body_len, limit);
    for (size_t i = 0; i < limit; i++)
        cr_assert_eq(r.body[i], (unsigned char)(i * 7 + 3), "byte %zu", i);
    idem_reply_clear(&r);

    /* The step API refuses it too, and keeps the claim. */
    idem_claim *c;
    idem_request req2 = req_str("big-2");
    cr_assert_eq(idem_begin(l, &req2, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    unsigned char *over = calloc(1, limit + 1);
    cr_assert_eq(idem_commit(c, 200, over, limit + 1), IDEM_ETOOBIG);
    cr_assert_eq(idem_commit(c, 200, over, 10), IDEM_OK, "the claim survives ETOOBIG");
    free(over);
    idem_layer_free(l);
}

/* ---- SPEC section 2, transition by transition ---- */

Test(conformance, expired_lease_is_taken_over_and_the_old_holder_gets_lost)
{
    idem_options o = test_options(300);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("lease");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    cr_assert_not_null(old);
    sleep_ms(600);
    cr_assert_eq(idem_begin(l, &req, &fresh, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(fresh, "an expired lease counts as absent (outcome %d)", r.outcome);

    cr_assert_eq(idem_commit(old, 200, "stale", 5), IDEM_ELOST);
    cr_assert_eq(idem_commit(fresh, 200, "fresh", 5), IDEM_OK, "the old holder changed nothing");

    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "fresh");

    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_eq(st.lost, 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(conformance, old_holder_abort_after_takeover_changes_nothing)
{
    idem_options o = test_options(300);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("lease-abort");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    sleep_ms(600);
    cr_assert_eq(idem_begin(l, &req, &fresh, &r), IDEM_OK);
    cr_assert_not_null(fresh);
    cr_assert_eq(idem_abort(old), IDEM_ELOST);
    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_IN_PROGRESS, "the new holder still holds the key");
    cr_assert_eq(idem_commit(fresh, 200, "x", 1), IDEM_OK);
    idem_layer_free(l);
}

Test(conformance, abort_frees_the_key_for_the_next_claim)
{
    idem_request req = req_str("abort");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    cr_assert_eq(idem_abort(c), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c, "after abort the key is free");
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
}

Test(conformance, extend_keeps_a_long_handler_in_possession_of_its_key)
{
    idem_options o = test_options(400);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("extend");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_extend(c, 5000), IDEM_OK, "%s", idem_last_error());
    sleep_ms(900);
    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_IN_PROGRESS, "the extended lease still holds");
    cr_assert(r.retry_after_ms > 2000, "retry_after_ms %u follows the extended lease", r.retry_after_ms);
    cr_assert_eq(idem_commit(c, 200, "long", 4), IDEM_OK);
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&j.calls), 0);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(conformance, extend_after_takeover_is_lost_and_commit_then_frees_the_claim)
{
    idem_options o = test_options(300);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("extend-lost");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    sleep_ms(600);
    cr_assert_eq(idem_begin(l, &req, &fresh, &r), IDEM_OK);
    cr_assert_not_null(fresh);
    cr_assert_eq(idem_extend(old, 5000), IDEM_ELOST);
    cr_assert_eq(idem_commit(old, 200, "stale", 5), IDEM_ELOST);
    cr_assert_eq(idem_commit(fresh, 200, "fresh", 5), IDEM_OK);
    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "fresh");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(conformance, completed_record_expires_after_ttl_and_the_key_runs_again)
{
    idem_options o = test_options(10000);
    o.ttl_s = 1;
    idem_layer *l;
    open_layer_with(&l, &o);
    job j = {.status = 200, .body = "v", .len = 1};
    idem_reply r = {0};
    cr_assert_eq(run_ok(l, req_str("ttl"), &j, &r), IDEM_EXECUTED);
    cr_assert_eq(run_ok(l, req_str("ttl"), &j, &r), IDEM_REPLAYED);
    sleep_ms(2600); /* one second, plus a store that counts expiry in whole seconds */
    cr_assert_eq(run_ok(l, req_str("ttl"), &j, &r), IDEM_EXECUTED, "the record outlived its ttl");
    cr_assert_eq(atomic_load(&j.calls), 2);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(conformance, lease_and_ttl_are_separate_settings)
{
    idem_options o = test_options(300);
    o.ttl_s = 60;
    idem_layer *l;
    open_layer_with(&l, &o);
    job j = {.status = 200, .body = "kept", .len = 4};
    idem_reply r = {0};
    cr_assert_eq(run_ok(l, req_str("sep"), &j, &r), IDEM_EXECUTED);
    sleep_ms(700); /* well past the lease */
    cr_assert_eq(run_ok(l, req_str("sep"), &j, &r), IDEM_REPLAYED, "a response lives for ttl_s, not lease_ms");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

/* Store raw bytes under a key through the driver, as another program might. */
static void plant(const char *key, const void *value, size_t len)
{
    char full[128];
    int n = snprintf(full, sizeof full, "%s%s", prefix, key);
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining;
    int rc = store->ops->claim(store->state, full, (size_t)n, value, len, 60000, &existing,
                               &existing_len, &remaining);
    cr_assert_eq(rc, IDEM_OK, "%s", idem_last_error());
    cr_assert_null(existing);
}

Test(conformance, foreign_value_under_a_key_is_corrupt_and_nothing_runs)
{
    plant("foreign", "{\"not\":\"ours\"}", 14);
    job j = {.status = 200};
    idem_reply r = {0};
    idem_request req = req_str("foreign");
    cr_assert_eq(idem_run(layer, &req, job_handler, &j, &r), IDEM_ECORRUPT);
    cr_assert_eq(atomic_load(&j.calls), 0);
    cr_assert(strstr(idem_last_error(), "did not write"), "%s", idem_last_error());
}

Test(conformance, damaged_record_of_ours_is_corrupt_and_nothing_runs)
{
    idem_record rec = {.state = IDEM_STATE_COMPLETED, .status = 200, .body = (const uint8_t *)"hello",
                       .body_len = 5};
    uint8_t *enc;
    size_t len;
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    plant("damaged", enc, len - 1); /* truncated: the length no longer matches */
    free(enc);
    job j = {.status = 200};
    idem_reply r = {0};
    idem_request req = req_str("damaged");
    cr_assert_eq(idem_run(layer, &req, job_handler, &j, &r), IDEM_ECORRUPT);
    cr_assert_eq(atomic_load(&j.calls), 0);
}

Test(conformance, layers_with_different_prefixes_never_see_each_others_records)
{
    char other_prefix[80];
    snprintf(other_prefix, sizeof other_prefix, "o%s", prefix);
    idem_options o = test_options(10000);
    o.key_prefix = other_prefix;
    idem_layer *l;
    open_layer_with(&l, &o);
    job a = {.status = 200, .body = "a", .len = 1}, b = {.status = 200, .body = "b", .len = 1};
    idem_reply r = {0};
    cr_assert_eq(run_ok(layer, req_str("shared"), &a, &r), IDEM_EXECUTED);
    cr_assert_eq(run_ok(l, req_str("shared"), &b, &r), IDEM_EXECUTED);
    cr_assert_eq(run_ok(l, req_str("shared"), &b, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "b");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(conformance, counters_follow_the_outcomes)
{
    idem_reply r = {0};
    job ok = {.status = 200}, bad = {.fail = 1};
    run_ok(layer, req_str("c1"), &ok, &r);
    run_ok(layer, req_str("c1"), &ok, &r);
    run_ok(layer, req_str("c2"), &bad, &r);
    idem_request fp1 = {.key = "c3", .key_len = 2, .fingerprint = "x", .fingerprint_len = 1};
    idem_request fp2 = {.key = "c3", .key_len = 2, .fingerprint = "y", .fingerprint_len = 1};
    run_ok(layer, fp1, &ok, &r);
    run_ok(layer, fp2, &ok, &r);
    idem_claim *c;
    idem_request busy = req_str("c4");
    cr_assert_eq(idem_begin(layer, &busy, &c, &r), IDEM_OK);
    run_ok(layer, busy, &ok, &r);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_eq(st.executed, 3);
    cr_assert_eq(st.replayed, 1);
    cr_assert_eq(st.failed, 1);
    cr_assert_eq(st.mismatched, 1);
    cr_assert_eq(st.in_progress, 1);
    cr_assert_eq(st.lost, 0);
    cr_assert_eq(st.backend_errors, 0);
    idem_reply_clear(&r);
}

/* ---- races ---- */

#define RACE_THREADS 16

typedef struct racer {
    idem_layer *layer;
    job        *job;
    pthread_barrier_t *start;
    idem_outcome outcome;
    int          rc;
    int          status;
} racer;

static void *race(void *arg)
{
    racer *x = arg;
    idem_request req = req_str("race");
    idem_reply r = {0};
    pthread_barrier_wait(x->start);
    x->rc = idem_run(x->layer, &req, job_handler, x->job, &r);
    x->outcome = r.outcome;
    x->status = r.status;
    idem_reply_clear(&r);
    return NULL;
}

Test(conformance, sixteen_threads_racing_on_one_key_execute_it_once)
{
    job j = {.status = 200, .body = "once", .len = 4, .sleep_ms = 200};
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, RACE_THREADS);
    racer x[RACE_THREADS];
    pthread_t t[RACE_THREADS];
    for (int i = 0; i < RACE_THREADS; i++) {
        x[i] = (racer){.layer = layer, .job = &j, .start = &start};
        pthread_create(&t[i], NULL, race, &x[i]);
    }
    int executed = 0, waiting = 0;
    for (int i = 0; i < RACE_THREADS; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(x[i].rc, IDEM_OK);
        executed += x[i].outcome == IDEM_EXECUTED;
        waiting += x[i].outcome == IDEM_IN_PROGRESS && x[i].status == 409;
        cr_assert(x[i].outcome == IDEM_EXECUTED || x[i].outcome == IDEM_IN_PROGRESS ||
                  x[i].outcome == IDEM_REPLAYED, "outcome %d", x[i].outcome);
    }
    pthread_barrier_destroy(&start);
    cr_assert_eq(executed, 1);
    cr_assert_eq(atomic_load(&j.calls), 1);
    cr_assert(waiting >= 1, "the others overlapped the 200 ms handler and got 409");
}

#define RACE_PROCS 4

Test(conformance, four_processes_racing_on_one_key_execute_it_once)
{
    /* Each child opens its own store; the handler counts in shared memory. */
    atomic_int *calls = mmap(NULL, sizeof *calls, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(calls, MAP_FAILED);
    atomic_init(calls, 0);
    int pipes[RACE_PROCS][2];
    pid_t pids[RACE_PROCS];
    int go[2];
    cr_assert_eq(pipe(go), 0);
    for (int i = 0; i < RACE_PROCS; i++) {
        cr_assert_eq(pipe(pipes[i]), 0);
        pids[i] = fork();
        cr_assert_neq(pids[i], -1);
        if (pids[i] == 0) {
            idem_store *s;
            idem_layer *l;
            idem_options o = test_options(10000);
            int outcome = -1;
            if (idem_store_open(&s, getenv("IDEM_TEST_URL")) == IDEM_OK &&
                idem_layer_new(&l, s, &o) == IDEM_OK) {
                char c;
                (void)!read(go[0], &c, 1); /* start together */
                job j = {.status = 200, .body = "proc", .len = 4, .sleep_ms = 300};
                idem_request req = req_str("proc-race");
                idem_reply r = {0};
                if (idem_run(l, &req, job_handler, &j, &r) == IDEM_OK)
                    outcome = r.outcome;
                atomic_fetch_add(calls, atomic_load(&j.calls));
                idem_reply_clear(&r);
                idem_layer_free(l);
                idem_store_close(s);
            }
            (void)!write(pipes[i][1], &outcome, sizeof outcome);
            _exit(0);
        }
        close(pipes[i][1]);
    }
    sleep_ms(300); /* every child has opened its store */
    char gobuf[RACE_PROCS] = {0};
    cr_assert_eq(write(go[1], gobuf, sizeof gobuf), (ssize_t)sizeof gobuf);
    int executed = 0;
    for (int i = 0; i < RACE_PROCS; i++) {
        int outcome = -1;
        cr_assert_eq(read(pipes[i][0], &outcome, sizeof outcome), (ssize_t)sizeof outcome);
        waitpid(pids[i], NULL, 0);
        cr_assert(outcome == IDEM_EXECUTED || outcome == IDEM_IN_PROGRESS || outcome == IDEM_REPLAYED,
                  "child %d: outcome %d", i, outcome);
        executed += outcome == IDEM_EXECUTED;
    }
    cr_assert_eq(executed, 1);
    cr_assert_eq(atomic_load(calls), 1);
    munmap(calls, sizeof *calls);
}

/* ---- the runner ---- */

int main(int argc, char *argv[])
{
    const char *kind = getenv("IDEM_TEST_BACKEND");
    idem_test_server srv;
    if (!kind)
        kind = "sqlite";
    if (idem_test_server_start(&srv, kind) != 0) {
        fprintf(stderr, "conformance: cannot start a %s store for the tests\n", kind);
        return 1;
    }
    setenv("IDEM_TEST_URL", srv.url, 1);
    fprintf(stderr, "conformance: testing %s at %s\n", kind, srv.url);
    struct criterion_test_set *tests = criterion_initialize();
    int result = 1;
    if (criterion_handle_args(argc, argv, true))
        result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    idem_test_server_stop(&srv);
    return result;
}
