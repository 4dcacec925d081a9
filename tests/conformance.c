/*
 * The conformance suite: docs/contract.md, run unchanged against every
 * driver, through idem_run() and the step API and on the driver's table
 * directly. It uses only the public headers, so it runs as well on a driver
 * the library does not build in.
 *
 * Which store: --url URL (or IDEM_TEST_URL) tests the store at URL as it is;
 * else --backend KIND (or IDEM_TEST_BACKEND: sqlite, redis, memcached,
 * memcached2, memory; default sqlite) starts a store of that kind through
 * tests/support/harness. Which driver: the built-in one the URL's scheme
 * names, or with --outside (IDEM_TEST_OUTSIDE=1) the driver that
 * conformance_outside_driver() returns (tests/conformance.h), opened with
 * idem_store_open_backend(). Each test uses a key prefix of its own, so
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

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "conformance.h"
#include "harness.h"
#include "support/testutil.h"

/* ---- the store and driver under test ----
 * Criterion runs each test in a process of its own, started afresh: main()
 * hands the choice over in IDEM_TEST_URL and IDEM_TEST_OUTSIDE, and each
 * test's setup reads them back with choose(). */

static const char         *test_url;
static const idem_backend *driver;      /* the table the stores are opened on */
static bool                outside;     /* driver is not built in: opened with idem_store_open_backend */
static bool                one_process; /* the store lives in this process (memory://) */

/* The built-in driver a URL's scheme names: "redis+unix" names "redis". */
static const idem_backend *builtin_for(const char *url)
{
    char name[32];
    size_t n = strcspn(url, "+:");
    if (n >= sizeof name)
        return NULL;
    memcpy(name, url, n);
    name[n] = '\0';
    return idem_backend_find(name);
}

/* Read the choice of store and driver from the environment. false when
 * there is no driver for it. */
static bool choose(void)
{
    const char *env = getenv("IDEM_TEST_OUTSIDE");
    test_url = getenv("IDEM_TEST_URL");
    outside = env && *env && strcmp(env, "0") != 0;
    if (!test_url)
        return false;
    const idem_backend *builtin = builtin_for(test_url);
    driver = outside ? conformance_outside_driver(builtin) : builtin;
    one_process = builtin && strcmp(builtin->name, "memory") == 0;
    return driver != NULL;
}

/* Open a store on the driver under test. */
static int store_open(idem_store **out)
{
    return outside ? idem_store_open_backend(out, driver, test_url) : idem_store_open(out, test_url);
}

/* Open the driver under test without the core, to call its table. */
static int table_open(const idem_backend *t, void **state)
{
    idem_url *u;
    int rc = idem_url_parse(&u, test_url);
    if (rc)
        return rc;
    rc = t->version >= 2 && t->open_ex ? t->open_ex(state, u, t) : t->open(state, u);
    idem_url_free(u);
    return rc;
}

/* Cases that need two processes sharing one store say so on memory://. */
#define SKIP_UNLESS_SHARED_ACROSS_PROCESSES()                                                      \
    do {                                                                                           \
        if (one_process)                                                                           \
            cr_skip_test("not applicable: %s lives inside one process, so processes cannot race "  \
                         "on it (docs/contract.md, section 7)", test_url);                          \
    } while (0)

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

static void *tstate;   /* the driver under test, opened on its own for the table tests */

static void setup(void)
{
    cr_assert(choose(), "no store to test (IDEM_TEST_URL %s); run this through meson test or give --url",
              test_url ? test_url : "unset");
    int rc = store_open(&store);
    cr_assert_eq(rc, IDEM_OK, "opening %s: %s", test_url, idem_last_error());
    rc = table_open(driver, &tstate);
    cr_assert_eq(rc, IDEM_OK, "opening %s on the %s table: %s", test_url, driver->name, idem_last_error());
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
    if (tstate)
        driver->close(tstate);
    layer = NULL;
    store = NULL;
    tstate = NULL;
}

TestSuite(conformance, .init = setup, .fini = teardown, .timeout = 60);
TestSuite(table, .init = setup, .fini = teardown, .timeout = 60);

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

/* Run job under key and check the call returned IDEM_OK. */
static idem_outcome run_ok(idem_layer *l, idem_request req, job *j, idem_reply *reply)
{
    int rc = idem_run(l, &req, job_handler, j, reply);
    cr_assert_eq(rc, IDEM_OK, "idem_run: %s (%s)", idem_error_name(rc), idem_last_error());
    return reply->outcome;
}

/* ---- docs/contract.md section 1 (outcomes), row by row ---- */

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

/* ---- docs/contract.md sections 2 to 4 (states, fencing, leases), transition by transition ---- */

/* A lease these tests wait out. Long enough that a claim on a loaded
 * machine (an fsync behind other builds) comes back within half of it,
 * which the layer requires before it runs a handler. */
#define LEASE_SHORT_MS 1000

Test(conformance, expired_lease_is_taken_over_and_the_old_holder_gets_lost)
{
    idem_options o = test_options(LEASE_SHORT_MS);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("lease");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    cr_assert_not_null(old);
    sleep_ms(2 * LEASE_SHORT_MS);
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
    idem_options o = test_options(LEASE_SHORT_MS);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("lease-abort");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    sleep_ms(2 * LEASE_SHORT_MS);
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
    idem_options o = test_options(LEASE_SHORT_MS);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("extend");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_extend(c, 5000), IDEM_OK, "%s", idem_last_error());
    sleep_ms(2 * LEASE_SHORT_MS + 200);
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
    idem_options o = test_options(LEASE_SHORT_MS);
    idem_layer *l;
    open_layer_with(&l, &o);
    idem_request req = req_str("extend-lost");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &old, &r), IDEM_OK);
    sleep_ms(2 * LEASE_SHORT_MS);
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
    idem_options o = test_options(LEASE_SHORT_MS);
    o.ttl_s = 60;
    idem_layer *l;
    open_layer_with(&l, &o);
    job j = {.status = 200, .body = "kept", .len = 4};
    idem_reply r = {0};
    cr_assert_eq(run_ok(l, req_str("sep"), &j, &r), IDEM_EXECUTED);
    sleep_ms(2 * LEASE_SHORT_MS); /* well past the lease */
    cr_assert_eq(run_ok(l, req_str("sep"), &j, &r), IDEM_REPLAYED, "a response lives for ttl_s, not lease_ms");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

/* This test's store key for key: its prefix, then key. */
static size_t store_key(const char *key, char *out, size_t size)
{
    int n = snprintf(out, size, "%s%s", prefix, key);
    cr_assert(n > 0 && (size_t)n < size);
    return (size_t)n;
}

/* Store raw bytes under a key through the driver's table, as another
 * program might. */
static void plant(const char *key, const void *value, size_t len)
{
    char full[128];
    size_t n = store_key(key, full, sizeof full);
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining;
    int rc = driver->claim(tstate, full, n, value, len, 60000, &existing, &existing_len, &remaining);
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
    static const uint8_t token[IDEM_TOKEN_LEN] = {1};
    void *enc;
    size_t len;
    cr_assert_eq(idem_record_build(&enc, &len, IDEM_STATE_COMPLETED, token, 0, 200, "hello", 5), IDEM_OK);
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

/* A scoped request's store key is its prefix's name, '#', 32 hex digits of
 * SHA-256(scope), ':' and the key: a prefix spelled that way would reach
 * another layer's scoped records, and is refused. Any other '#' in a
 * prefix is a prefix like any other (0.2 accepted them). */
Test(conformance, a_prefix_spelling_a_scoped_store_key_is_refused_and_other_hashes_stay_apart)
{
    static const char tenant1_digits[] = "45b3e9dd6490eac7a8566680e1e930fb"; /* SHA-256("tenant1") */
    job a = {.status = 201, .body = "tenant1's", .len = 9};
    idem_reply r = {0};
    idem_request req = req_str("order-1");
    cr_assert_eq(idem_run_scoped(layer, "tenant1", 7, &req, job_handler, &a, &r), IDEM_OK, "%s",
                 idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);

    size_t name_len = strlen(prefix) - 1;
    char spelled[160];
    snprintf(spelled, sizeof spelled, "%.*s#%s:", (int)name_len, prefix, tenant1_digits);
    idem_options o = test_options(10000);
    o.key_prefix = spelled;
    idem_layer *l = NULL;
    cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_EINVAL, "a prefix spelling tenant1's store keys "
                 "was accepted");
    cr_assert_null(l);
    cr_assert(strstr(idem_last_error(), "key_prefix"), "%s", idem_last_error());

    /* One digit short, upper case, or the '#' elsewhere: never a scope's
     * store key, and accepted; none of them sees tenant1's record. */
    char upper[33];
    for (size_t i = 0; i < 32; i++)
        upper[i] = (char)(tenant1_digits[i] >= 'a' ? tenant1_digits[i] - 'a' + 'A' : tenant1_digits[i]);
    upper[32] = '\0';
    char others[3][160];
    snprintf(others[0], sizeof others[0], "%.*s#%.31s:", (int)name_len, prefix, tenant1_digits);
    snprintf(others[1], sizeof others[1], "%.*s#%s:", (int)name_len, prefix, upper);
    snprintf(others[2], sizeof others[2], "%.*s#%s#1:", (int)name_len, prefix, tenant1_digits);
    for (int i = 0; i < 3; i++) {
        o.key_prefix = others[i];
        open_layer_with(&l, &o);
        job b = {.status = 200, .body = "other", .len = 5};
        cr_assert_eq(run_ok(l, req, &b, &r), IDEM_EXECUTED, "prefix %s met tenant1's record", others[i]);
        cr_assert_eq(run_ok(l, req, &b, &r), IDEM_REPLAYED);
        cr_assert_str_eq((char *)r.body, "other");
        idem_reply_clear(&r);
        idem_layer_free(l);
    }

    /* The scope's record is where it was. */
    job c = {.status = 200, .body = "again", .len = 5};
    cr_assert_eq(idem_run_scoped(layer, "tenant1", 7, &req, job_handler, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "tenant1's");
    cr_assert_eq(atomic_load(&c.calls), 0);
    idem_reply_clear(&r);
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

/* ---- docs/contract.md section 6: the driver table's rules, one by one ----
 *
 * These call the table of the driver under test directly, as the core
 * does, with records made by idem_record_build(), and then look at the key
 * through idem_run() where the rule is about what a request sees. */

typedef struct rec {
    void  *p;
    size_t len;
} rec;

static void new_token(uint8_t token[IDEM_TOKEN_LEN])
{
    cr_assert_eq(getrandom(token, IDEM_TOKEN_LEN, 0), (ssize_t)IDEM_TOKEN_LEN);
}

/* The STARTED record of a claim of token with a lease of lease_ms. */
static rec started(const uint8_t *token, uint32_t lease_ms)
{
    rec r;
    int rc = idem_record_build(&r.p, &r.len, IDEM_STATE_STARTED, token, idem_now_ms() + lease_ms, 0, NULL, 0);
    cr_assert_eq(rc, IDEM_OK, "%s", idem_last_error());
    return r;
}

/* The COMPLETED record that token commits. */
static rec completed(const uint8_t *token, int status, const char *body)
{
    rec r;
    int rc = idem_record_build(&r.p, &r.len, IDEM_STATE_COMPLETED, token, 0, status, body, strlen(body));
    cr_assert_eq(rc, IDEM_OK, "%s", idem_last_error());
    return r;
}

/* A key of this test, through the table. */
typedef struct tkey {
    char   k[128];
    size_t n;
} tkey;

static tkey tk(const char *key)
{
    tkey t;
    t.n = store_key(key, t.k, sizeof t.k);
    return t;
}

/* claim, expecting to win. */
static void claim_wins(tkey k, rec r, uint32_t lease_ms)
{
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining = 0;
    int rc = driver->claim(tstate, k.k, k.n, r.p, r.len, lease_ms, &existing, &existing_len, &remaining);
    cr_assert_eq(rc, IDEM_OK, "claim: %s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert_null(existing, "claim on a free key must store the record and return no existing one");
    cr_assert_eq(existing_len, 0);
}

/* claim, expecting to lose to the record want; returns the time left. */
static uint32_t claim_loses_to(tkey k, rec r, uint32_t lease_ms, rec want)
{
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining = 0;
    int rc = driver->claim(tstate, k.k, k.n, r.p, r.len, lease_ms, &existing, &existing_len, &remaining);
    cr_assert_eq(rc, IDEM_OK, "claim: %s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert_not_null(existing, "claim on a live record must return it");
    cr_assert_eq(existing_len, want.len);
    cr_assert_arr_eq(existing, want.p, want.len, "claim returned other bytes than the live record");
    free(existing);
    return remaining;
}

/* What a request sees under key now, through a layer of this test. */
static idem_outcome outcome_of(const char *key, idem_reply *r)
{
    job j = {.status = 299, .body = "ran", .len = 3};
    return run_ok(layer, req_str(key), &j, r);
}

Test(table, claim_on_a_free_key_stores_the_record_and_on_a_live_one_returns_it_with_its_time_left)
{
    uint8_t a[IDEM_TOKEN_LEN], b[IDEM_TOKEN_LEN];
    new_token(a);
    new_token(b);
    tkey k = tk("t-claim");
    rec ra = started(a, 10000), rb = started(b, 10000);
    claim_wins(k, ra, 10000);
    uint32_t left = claim_loses_to(k, rb, 10000, ra);
    cr_assert(left == UINT32_MAX || (left > 5000 && left <= 10000),
              "remaining_ms %u: the time left on a fresh 10 s lease, or UINT32_MAX", left);
    /* The loser changed nothing: the winner still holds the key. */
    cr_assert_eq(driver->extend(tstate, k.k, k.n, b, rb.p, rb.len, 10000), IDEM_ELOST);
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, ra.p, ra.len, 10000), IDEM_OK, "%s", idem_last_error());
    idem_reply r = {0};
    cr_assert_eq(outcome_of("t-claim", &r), IDEM_IN_PROGRESS);
    free(ra.p);
    free(rb.p);
}

Test(table, claim_sent_again_after_a_lost_reply_finds_its_own_started_record_and_has_claimed)
{
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-claim-again");
    rec ra = started(a, 10000);
    claim_wins(k, ra, 10000);
    claim_wins(k, ra, 10000); /* the same claim again: it is the caller's, not another's */
    rec ca = completed(a, 200, "mine");
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_OK, "%s", idem_last_error());
    /* Its own COMPLETED record is no claim of its own: a claim loses to it. */
    claim_loses_to(k, ra, 10000, ca);
    free(ra.p), free(ca.p);
}

Test(table, claim_on_an_expired_record_takes_it_over_and_fences_out_the_old_token)
{
    uint8_t a[IDEM_TOKEN_LEN], b[IDEM_TOKEN_LEN];
    new_token(a);
    new_token(b);
    tkey k = tk("t-expired");
    rec ra = started(a, 300);
    claim_wins(k, ra, 300);
    sleep_ms(700);
    rec rb = started(b, 10000);
    claim_wins(k, rb, 10000); /* an expired record counts as no record */
    rec ca = completed(a, 200, "stale");
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_ELOST);
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, ra.p, ra.len, 10000), IDEM_ELOST);
    cr_assert_eq(driver->release(tstate, k.k, k.n, a), IDEM_ELOST);
    rec cb = completed(b, 201, "fresh");
    cr_assert_eq(driver->commit(tstate, k.k, k.n, b, cb.p, cb.len, 60000), IDEM_OK, "%s", idem_last_error());
    idem_reply r = {0};
    cr_assert_eq(outcome_of("t-expired", &r), IDEM_REPLAYED);
    cr_assert_eq(r.status, 201);
    cr_assert_str_eq((char *)r.body, "fresh");
    idem_reply_clear(&r);
    free(ra.p), free(rb.p), free(ca.p), free(cb.p);
}

Test(table, claim_on_an_expired_completed_record_takes_it_over)
{
    uint8_t a[IDEM_TOKEN_LEN], b[IDEM_TOKEN_LEN];
    new_token(a);
    new_token(b);
    tkey k = tk("t-ttl");
    rec ra = started(a, 10000), ca = completed(a, 200, "old"), rb = started(b, 10000);
    claim_wins(k, ra, 10000);
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 1000), IDEM_OK, "%s", idem_last_error());
    claim_loses_to(k, rb, 10000, ca);
    sleep_ms(2600); /* one second, plus a store that counts expiry in whole seconds */
    claim_wins(k, rb, 10000);
    free(ra.p), free(ca.p), free(rb.p);
}

Test(table, commit_retried_after_a_lost_reply_finds_its_own_completed_record_and_is_ok)
{
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-commit");
    rec ra = started(a, 10000), ca = completed(a, 200, "first"), again = completed(a, 500, "second");
    claim_wins(k, ra, 10000);
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_OK,
                 "the same commit again (its first reply was lost) must be IDEM_OK: %s", idem_last_error());
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, again.p, again.len, 60000), IDEM_OK,
                 "a commit by the token that completed the record is IDEM_OK: %s", idem_last_error());
    /* ... and changed nothing: a COMPLETED record never changes. */
    idem_reply r = {0};
    cr_assert_eq(outcome_of("t-commit", &r), IDEM_REPLAYED);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq((char *)r.body, "first");
    idem_reply_clear(&r);
    /* A COMPLETED record is not a claim: extend and release by its token are lost. */
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, ra.p, ra.len, 10000), IDEM_ELOST);
    cr_assert_eq(driver->release(tstate, k.k, k.n, a), IDEM_ELOST);
    cr_assert_eq(outcome_of("t-commit", &r), IDEM_REPLAYED, "release must never delete a response");
    idem_reply_clear(&r);
    free(ra.p), free(ca.p), free(again.p);
}

Test(table, commit_by_another_token_is_lost_and_changes_nothing)
{
    uint8_t a[IDEM_TOKEN_LEN], b[IDEM_TOKEN_LEN];
    new_token(a);
    new_token(b);
    tkey k = tk("t-fence");
    rec ra = started(a, 10000), cb = completed(b, 200, "thief");
    claim_wins(k, ra, 10000);
    cr_assert_eq(driver->commit(tstate, k.k, k.n, b, cb.p, cb.len, 60000), IDEM_ELOST);
    cr_assert_eq(driver->release(tstate, k.k, k.n, b), IDEM_ELOST);
    claim_loses_to(k, cb, 10000, ra);
    tkey free_key = tk("t-fence-none");
    cr_assert_eq(driver->commit(tstate, free_key.k, free_key.n, b, cb.p, cb.len, 60000), IDEM_ELOST,
                 "a commit on no record at all is lost");
    free(ra.p), free(cb.p);
}

Test(table, release_retried_after_a_lost_reply_finds_no_record_and_is_lost)
{
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-release");
    rec ra = started(a, 10000);
    claim_wins(k, ra, 10000);
    cr_assert_eq(driver->release(tstate, k.k, k.n, a), IDEM_OK, "%s", idem_last_error());
    /* The retry cannot tell its own earlier success from a lease that ran
     * out: the record is not there, and the rule says so. */
    cr_assert_eq(driver->release(tstate, k.k, k.n, a), IDEM_ELOST);
    claim_wins(k, ra, 10000); /* the key is free */
    free(ra.p);
}

Test(table, extend_on_a_taken_over_claim_is_lost_and_the_new_holder_keeps_its_lease)
{
    uint8_t a[IDEM_TOKEN_LEN], b[IDEM_TOKEN_LEN];
    new_token(a);
    new_token(b);
    tkey k = tk("t-extend");
    rec ra = started(a, 5000);
    claim_wins(k, ra, 5000);
    /* extend sets the expiry it is given, here a shorter one: only that
     * lets the claim below take over. */
    rec shorter = started(a, 400);
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, shorter.p, shorter.len, 400), IDEM_OK,
                 "the holder extends its live claim: %s", idem_last_error());
    sleep_ms(1200);
    rec rb = started(b, 10000);
    claim_wins(k, rb, 10000);
    rec late = started(a, 10000);
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, late.p, late.len, 10000), IDEM_ELOST);
    uint32_t left = claim_loses_to(k, late, 10000, rb); /* still b's record, unchanged */
    cr_assert(left == UINT32_MAX || left > 5000, "remaining_ms %u", left);
    free(ra.p), free(shorter.p), free(rb.p), free(late.p);
}

Test(table, foreign_bytes_are_returned_by_claim_and_fence_out_every_token)
{
    static const char foreign[] = "{\"not\":\"ours\"}";
    plant("t-foreign", foreign, sizeof foreign - 1);
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-foreign");
    rec ra = started(a, 10000), ca = completed(a, 200, "x");
    claim_loses_to(k, ra, 10000, (rec){.p = (void *)foreign, .len = sizeof foreign - 1});
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_ELOST);
    cr_assert_eq(driver->extend(tstate, k.k, k.n, a, ra.p, ra.len, 10000), IDEM_ELOST);
    cr_assert_eq(driver->release(tstate, k.k, k.n, a), IDEM_ELOST);
    job j = {.status = 200};
    idem_reply r = {0};
    idem_request req = req_str("t-foreign");
    cr_assert_eq(idem_run(layer, &req, job_handler, &j, &r), IDEM_ECORRUPT);
    cr_assert_eq(atomic_load(&j.calls), 0);
    free(ra.p), free(ca.p);
}

/* read and remove are optional members of version 2 for a driver of one's
 * own; every built-in driver has them. */
static void need_read_and_remove(void)
{
    bool has = driver->version >= 2 && driver->read && driver->remove;
    if (!has && outside)
        cr_skip_test("the %s driver has no read or remove member (optional in version 2)", driver->name);
    cr_assert(has, "the built-in %s driver lacks read or remove (docs/contract.md, section 6)", driver->name);
}

Test(table, read_returns_a_live_record_and_its_time_left_and_changes_nothing)
{
    need_read_and_remove();
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-read");
    void *got = (void *)1;
    size_t got_len = 1;
    uint32_t left = 0;
    cr_assert_eq(driver->read(tstate, k.k, k.n, &got, &got_len, &left), IDEM_OK, "%s", idem_last_error());
    cr_assert_null(got, "no record: *record NULL");
    rec ra = started(a, 400);
    claim_wins(k, ra, 400);
    cr_assert_eq(driver->read(tstate, k.k, k.n, &got, &got_len, &left), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(got);
    cr_assert_eq(got_len, ra.len);
    cr_assert_arr_eq(got, ra.p, ra.len);
    cr_assert(left == UINT32_MAX || left <= 400, "remaining_ms %u of a 400 ms lease", left);
    free(got);
    uint8_t b[IDEM_TOKEN_LEN];
    new_token(b);
    rec rb = started(b, 400);
    claim_loses_to(k, rb, 400, ra); /* read claimed nothing and extended nothing */
    free(rb.p);
    sleep_ms(800);
    cr_assert_eq(driver->read(tstate, k.k, k.n, &got, &got_len, &left), IDEM_OK, "%s", idem_last_error());
    cr_assert_null(got, "an expired record reads as none");
    free(ra.p);
}

Test(table, remove_deletes_whatever_is_under_a_key_and_says_whether_there_was_anything)
{
    need_read_and_remove();
    uint8_t a[IDEM_TOKEN_LEN];
    new_token(a);
    tkey k = tk("t-remove");
    bool deleted = true;
    cr_assert_eq(driver->remove(tstate, k.k, k.n, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert(!deleted, "nothing was there");
    rec ra = started(a, 10000), ca = completed(a, 200, "gone");
    claim_wins(k, ra, 10000);
    cr_assert_eq(driver->commit(tstate, k.k, k.n, a, ca.p, ca.len, 60000), IDEM_OK);
    cr_assert_eq(driver->remove(tstate, k.k, k.n, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert(deleted, "a COMPLETED record was there");
    void *got = NULL;
    size_t got_len;
    uint32_t left;
    cr_assert_eq(driver->read(tstate, k.k, k.n, &got, &got_len, &left), IDEM_OK);
    cr_assert_null(got);
    idem_reply r = {0};
    cr_assert_eq(outcome_of("t-remove", &r), IDEM_EXECUTED, "after remove the key runs again");
    idem_reply_clear(&r);
    plant("t-remove-foreign", "junk", 4);
    tkey f = tk("t-remove-foreign");
    cr_assert_eq(driver->remove(tstate, f.k, f.n, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert(deleted, "foreign bytes are removed too");
    free(ra.p), free(ca.p);
}

/* ---- the same rules through idem_run, with replies lost on purpose ----
 *
 * A wrapper of the driver under test that applies an operation and then
 * answers IDEM_EBACKEND, as when the store's reply is lost on the way back,
 * or hides the time left, as a store that cannot tell. */

typedef struct lossy_ctx {
    const idem_backend *inner;
    atomic_int          lose_commits;    /* the next N commits are applied, then "fail" */
    atomic_int          lose_releases;
    atomic_bool         hide_remaining;  /* claim answers UINT32_MAX */
    atomic_int          commits;
} lossy_ctx;

typedef struct lossy {
    lossy_ctx *ctx;
    void      *inner;
} lossy;

static int lossy_open(void **state, const idem_url *url, const idem_backend *self)
{
    lossy *l = calloc(1, sizeof *l);
    if (!l)
        return IDEM_ENOMEM;
    l->ctx = self->app_data;
    const idem_backend *in = l->ctx->inner;
    int rc = in->version >= 2 && in->open_ex ? in->open_ex(&l->inner, url, in) : in->open(&l->inner, url);
    if (rc)
        free(l);
    else
        *state = l;
    return rc;
}

static void lossy_close(void *state)
{
    lossy *l = state;
    l->ctx->inner->close(l->inner);
    free(l);
}

static int lost_reply(atomic_int *counter, int rc, const char *what)
{
    if (rc == IDEM_OK && atomic_fetch_sub(counter, 1) > 0)
        return idem_error_set(IDEM_EBACKEND, "lossy: the reply to %s was lost", what);
    return rc;
}

static int lossy_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                       uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    lossy *l = state;
    int rc = l->ctx->inner->claim(l->inner, key, key_len, record, record_len, lease_ms, existing,
                                  existing_len, remaining_ms);
    if (rc == IDEM_OK && *existing && atomic_load(&l->ctx->hide_remaining))
        *remaining_ms = UINT32_MAX;
    return rc;
}

static int lossy_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                        const void *record, size_t record_len, uint64_t ttl_ms)
{
    lossy *l = state;
    atomic_fetch_add(&l->ctx->commits, 1);
    int rc = l->ctx->inner->commit(l->inner, key, key_len, token, record, record_len, ttl_ms);
    return lost_reply(&l->ctx->lose_commits, rc, "a commit");
}

static int lossy_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    lossy *l = state;
    int rc = l->ctx->inner->release(l->inner, key, key_len, token);
    return lost_reply(&l->ctx->lose_releases, rc, "a release");
}

static int lossy_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                        const void *record, size_t record_len, uint32_t lease_ms)
{
    lossy *l = state;
    return l->ctx->inner->extend(l->inner, key, key_len, token, record, record_len, lease_ms);
}

static lossy_ctx lossy_state;
static const idem_backend lossy_table = {
    .version = IDEM_BACKEND_VERSION,
    .name = "lossy",
    .close = lossy_close,
    .claim = lossy_claim,
    .commit = lossy_commit,
    .release = lossy_release,
    .extend = lossy_extend,
    .app_data = &lossy_state,
    .open_ex = lossy_open,
};

/* A layer of this test's prefix on the lossy wrapper of the driver under test. */
static void open_lossy(idem_store **s, idem_layer **l)
{
    lossy_state.inner = driver;
    cr_assert_eq(idem_store_open_backend(s, &lossy_table, test_url), IDEM_OK, "%s", idem_last_error());
    idem_options o = test_options(10000);
    cr_assert_eq(idem_layer_new(l, *s, &o), IDEM_OK, "%s", idem_last_error());
}

Test(table, commit_whose_reply_was_lost_is_retried_and_the_handler_ran_once)
{
    idem_store *s;
    idem_layer *l;
    open_lossy(&s, &l);
    atomic_store(&lossy_state.lose_commits, 1);
    job j = {.status = 201, .body = "once", .len = 4};
    idem_reply r = {0};
    cr_assert_eq(run_ok(l, req_str("lost-commit"), &j, &r), IDEM_EXECUTED);
    cr_assert_eq(atomic_load(&lossy_state.commits), 2, "the core retried the commit once");
    cr_assert_eq(run_ok(l, req_str("lost-commit"), &j, &r), IDEM_REPLAYED);
    cr_assert_str_eq((char *)r.body, "once");
    cr_assert_eq(atomic_load(&j.calls), 1);
    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_eq(st.backend_errors, 1);
    cr_assert_eq(st.executed, 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(table, release_whose_reply_was_lost_still_frees_the_key_for_the_retry)
{
    idem_store *s;
    idem_layer *l;
    open_lossy(&s, &l);
    atomic_store(&lossy_state.lose_releases, 1);
    idem_request req = req_str("lost-release");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    cr_assert_eq(idem_abort(c), IDEM_EBACKEND, "the abort's reply was lost");
    job j = {.status = 200, .body = "retry", .len = 5};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_EXECUTED, "the release was applied: the retry runs");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(table, store_that_cannot_tell_the_time_left_gets_retry_after_from_the_records_deadline)
{
    idem_store *s;
    idem_layer *l;
    open_lossy(&s, &l);
    atomic_store(&lossy_state.hide_remaining, true);
    idem_request req = req_str("no-pttl");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    job j = {.status = 200};
    cr_assert_eq(run_ok(l, req, &j, &r), IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms > 5000 && r.retry_after_ms <= 10000,
              "retry_after_ms %u from the deadline of a fresh 10 s lease", r.retry_after_ms);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
    idem_layer_free(l);
    idem_store_close(s);
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
    SKIP_UNLESS_SHARED_ACROSS_PROCESSES();
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
            if (store_open(&s) == IDEM_OK &&
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

static void usage(void)
{
    fprintf(stderr, "usage: conformance [--url URL | --backend KIND] [--outside] [criterion options]\n"
                    "  --url URL      test the store at URL (also IDEM_TEST_URL); nothing is started\n"
                    "  --backend KIND start a test store of KIND: sqlite, redis, memcached, memcached2,\n"
                    "                 memory (also IDEM_TEST_BACKEND; default sqlite)\n"
                    "  --outside      open the stores on conformance_outside_driver() (tests/conformance.h)\n"
                    "                 instead of the built-in driver (also IDEM_TEST_OUTSIDE=1)\n");
}

int main(int argc, char *argv[])
{
    const char *kind = getenv("IDEM_TEST_BACKEND"), *env = getenv("IDEM_TEST_OUTSIDE");
    test_url = getenv("IDEM_TEST_URL");
    outside = env && *env && strcmp(env, "0") != 0;
    bool url_given = test_url != NULL;
    /* Our options out of argv; the rest is Criterion's. */
    int n = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--url") == 0 && i + 1 < argc)
            test_url = argv[++i], url_given = true;
        else if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc)
            kind = argv[++i], test_url = NULL, url_given = false;
        else if (strcmp(argv[i], "--outside") == 0)
            outside = true;
        else if (strcmp(argv[i], "--usage") == 0)
            return usage(), 0;
        else
            argv[n++] = argv[i];
    }
    argc = n;
    argv[argc] = NULL;

    idem_test_server srv = {0};
    bool started = false;
    if (!url_given) {
        if (idem_test_server_start(&srv, kind ? kind : "sqlite") != 0) {
            fprintf(stderr, "conformance: cannot start a %s store for the tests\n", kind ? kind : "sqlite");
            idem_test_server_stop(&srv);
            return 1;
        }
        started = true;
        test_url = srv.url;
    }
    /* A PostgreSQL backend can take seconds to start on a machine busy with
     * other suites (initdb among them); the driver's default of 2 s then
     * fails a test that is not about connecting. */
    char *patient = NULL;
    if (started && strncmp(test_url, "postgresql:", 11) == 0 &&
        asprintf(&patient, "%s%sconnect_timeout_ms=10000", test_url, strchr(test_url, '?') ? "&" : "?") > 0)
        test_url = patient;
    setenv("IDEM_TEST_URL", test_url, 1);
    setenv("IDEM_TEST_OUTSIDE", outside ? "1" : "0", 1);
    if (!choose()) {
        fprintf(stderr, "conformance: no driver for %s in this build%s\n", test_url,
                outside ? "" : " (a driver of your own: --outside, see tests/conformance.h)");
        usage();
        if (started)
            idem_test_server_stop(&srv);
        free(patient);
        return 1;
    }
    fprintf(stderr, "conformance: testing %s on the %s driver%s\n", test_url, driver->name,
            outside ? " (not built in)" : "");
    struct criterion_test_set *tests = criterion_initialize();
    int result = 1;
    if (criterion_handle_args(argc, argv, true))
        result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    if (started)
        idem_test_server_stop(&srv);
    free(patient);
    return result;
}
