/*
 * Conformance, operators' part: idem_layer_show(), idem_layer_delete() and
 * idem_layer_list() (docs/operating.md, "The `idem` command") on every
 * driver, through the driver table's read, remove, release and list members.
 * Linked into the conformance program, whose
 * main() starts the store and sets IDEM_TEST_URL.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

#include <openssl/evp.h>

#include "internal.h"

static idem_store *store;
static idem_layer *layer;
static char prefix[64];

static void setup(void)
{
    const char *url = getenv("IDEM_TEST_URL");
    cr_assert(url, "IDEM_TEST_URL is not set; run this through meson test");
    cr_assert_eq(idem_store_open(&store, url), IDEM_OK, "%s", idem_last_error());
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "i%ld-%08x:", (long)getpid(), r);
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = 30000;
    o.ttl_s = 3600;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK, "%s", idem_last_error());
}

static void teardown(void)
{
    idem_layer_free(layer);
    idem_store_close(store);
}

TestSuite(inspect, .init = setup, .fini = teardown, .timeout = 60);

static int store_hello(void *arg, idem_response *resp)
{
    (void)arg;
    return idem_response_set(resp, 201, "hello", 5) == IDEM_OK ? 0 : 1;
}

static idem_request req_fp(const char *key)
{
    return (idem_request){.key = key, .key_len = strlen(key), .fingerprint = "payload",
                          .fingerprint_len = 7};
}

static void show_ok(const char *key, idem_key_info *k)
{
    int rc = idem_layer_show(layer, NULL, 0, key, strlen(key), k);
    cr_assert_eq(rc, IDEM_OK, "idem_layer_show: %s (%s)", idem_error_name(rc), idem_last_error());
}

Test(inspect, an_absent_key_is_absent_with_its_store_key)
{
    idem_key_info k = {0};
    show_ok("nobody", &k);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
    cr_assert_null(k.value);
    size_t plen = strlen(prefix);
    cr_assert_eq(k.store_key_len, plen + 6);
    cr_assert_arr_eq(k.store_key, prefix, plen);
    idem_key_info_clear(&k);
}

Test(inspect, a_started_claim_shows_its_lease_token_and_digest_and_delete_frees_it_fenced)
{
    idem_request req = req_fp("running");
    idem_claim *c;
    idem_reply reply = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &reply), IDEM_OK);
    cr_assert_not_null(c);

    idem_key_info k = {0};
    show_ok("running", &k);
    cr_assert_eq(k.state, IDEM_KEY_STARTED);
    cr_assert(k.remaining_ms > 20000 && k.remaining_ms <= 30000, "lease left %u ms", k.remaining_ms);
    cr_assert(k.deadline_ms > idem_now_ms());
    cr_assert(k.has_fingerprint);
    uint8_t digest[32];
    unsigned int n = 0;
    cr_assert(EVP_Digest("payload", 7, digest, &n, EVP_sha256(), NULL) && n == sizeof digest);
    cr_assert_arr_eq(k.fingerprint_digest, digest, sizeof digest);
    idem_key_info_clear(&k);

    idem_key_info gone = {0};
    cr_assert_eq(idem_layer_delete(layer, NULL, 0, "running", 7, false, &gone), IDEM_OK, "%s",
                 idem_last_error());
    cr_assert_eq(gone.state, IDEM_KEY_STARTED);
    idem_key_info_clear(&gone);
    show_ok("running", &k);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_ELOST, "the deleted claim's holder is fenced out");
    idem_reply_clear(&reply);
}

Test(inspect, a_completed_record_shows_status_body_and_time_left_and_is_kept_unless_forced)
{
    idem_request req = req_fp("done");
    idem_reply reply = {0};
    cr_assert_eq(idem_run(layer, &req, store_hello, NULL, &reply), IDEM_OK);
    idem_reply_clear(&reply);

    idem_key_info k = {0};
    show_ok("done", &k);
    cr_assert_eq(k.state, IDEM_KEY_COMPLETED);
    cr_assert_eq(k.status, 201);
    cr_assert_eq(k.body_len, 5);
    cr_assert_arr_eq(k.body, "hello", 5);
    cr_assert(k.remaining_ms == UINT32_MAX || (k.remaining_ms > 3500000 && k.remaining_ms <= 3600000),
              "ttl left %u ms", k.remaining_ms);
    idem_key_info_clear(&k);

    idem_key_info kept = {0};
    cr_assert_eq(idem_layer_delete(layer, NULL, 0, "done", 4, false, &kept), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "run the handler again"), "%s", idem_last_error());
    cr_assert_eq(kept.state, IDEM_KEY_COMPLETED, "the refusal says what is there");
    idem_key_info_clear(&kept);
    show_ok("done", &k);
    cr_assert_eq(k.state, IDEM_KEY_COMPLETED, "nothing was deleted");
    idem_key_info_clear(&k);

    cr_assert_eq(idem_layer_delete(layer, NULL, 0, "done", 4, true, NULL), IDEM_OK, "%s", idem_last_error());
    show_ok("done", &k);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
}

Test(inspect, a_scoped_key_is_found_only_with_its_scope)
{
    idem_request req = req_fp("order");
    idem_reply reply = {0};
    cr_assert_eq(idem_run_scoped(layer, "acct_1", 6, &req, store_hello, NULL, &reply), IDEM_OK);
    idem_reply_clear(&reply);
    idem_key_info k = {0};
    cr_assert_eq(idem_layer_show(layer, "acct_1", 6, "order", 5, &k), IDEM_OK);
    cr_assert_eq(k.state, IDEM_KEY_COMPLETED);
    idem_key_info_clear(&k);
    cr_assert_eq(idem_layer_show(layer, "acct_2", 6, "order", 5, &k), IDEM_OK);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
    idem_key_info_clear(&k);
    show_ok("order", &k);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
}

Test(inspect, a_foreign_value_is_shown_as_foreign_with_its_bytes_and_deleted_only_by_force)
{
    char full[128];
    int n = snprintf(full, sizeof full, "%sforeign", prefix);
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining;
    cr_assert_eq(idem__store_claim(store, full, (size_t)n, "{\"x\":1}", 7, 60000, &existing,
                                   &existing_len, &remaining), IDEM_OK);
    idem_key_info k = {0};
    show_ok("foreign", &k);
    cr_assert_eq(k.state, IDEM_KEY_FOREIGN);
    cr_assert_eq(k.value_len, 7);
    cr_assert_arr_eq(k.value, "{\"x\":1}", 7);
    idem_key_info_clear(&k);
    cr_assert_eq(idem_layer_delete(layer, NULL, 0, "foreign", 7, false, NULL), IDEM_EINVAL);
    cr_assert_eq(idem_layer_delete(layer, NULL, 0, "foreign", 7, true, NULL), IDEM_OK, "%s",
                 idem_last_error());
    show_ok("foreign", &k);
    cr_assert_eq(k.state, IDEM_KEY_ABSENT);
}

Test(inspect, bad_arguments_are_refused_with_a_message)
{
    idem_key_info k = {0};
    cr_assert_eq(idem_layer_show(NULL, NULL, 0, "k", 1, &k), IDEM_EINVAL);
    cr_assert_eq(idem_layer_show(layer, NULL, 0, "k", 1, NULL), IDEM_EINVAL);
    cr_assert_eq(idem_layer_show(layer, NULL, 0, "", 0, &k), IDEM_EINVAL);
    cr_assert_eq(idem_layer_show(layer, NULL, 3, "k", 1, &k), IDEM_EINVAL);
    cr_assert_eq(idem_layer_show(layer, "", 0, "k", 1, &k), IDEM_EINVAL);
    static char big[1025];
    cr_assert_eq(idem_layer_show(layer, NULL, 0, big, sizeof big, &k), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "1024"), "%s", idem_last_error());
    cr_assert_eq(idem_layer_delete(layer, NULL, 0, NULL, 1, false, NULL), IDEM_EINVAL);
}

Test(inspect, a_driver_without_read_remove_or_check_answers_unsupported)
{
    idem_backend bare = *idem_backend_find(idem_store_backend(store));
    bare.read = NULL;
    bare.remove = NULL;
    bare.check = NULL;
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &bare, getenv("IDEM_TEST_URL")), IDEM_OK, "%s",
                 idem_last_error());
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK);
    idem_key_info k = {0};
    cr_assert_eq(idem_layer_show(l, NULL, 0, "k", 1, &k), IDEM_EUNSUPPORTED);
    cr_assert(strstr(idem_last_error(), "read"), "%s", idem_last_error());
    cr_assert_eq(idem_layer_delete(l, NULL, 0, "k", 1, true, NULL), IDEM_EUNSUPPORTED);
    idem_findings *f = (idem_findings *)&k;
    cr_assert_eq(idem_store_check(s, &f), IDEM_EUNSUPPORTED);
    cr_assert_null(f);
    idem_layer_free(l);
    idem_store_close(s);
}

/* The keys idem_layer_list() gave, each once (a Redis SCAN may repeat one). */
typedef struct seen {
    size_t         calls, n;
    uint8_t        key[8][128];
    size_t         key_len[8];
    idem_key_state state[8];
    uint32_t       remaining_ms[8];
    size_t         stop_after; /* 0: never stop */
} seen;

static int collect_key(void *arg, const idem_key_info *info)
{
    seen *w = arg;
    w->calls++;
    size_t i = 0;
    while (i < w->n && !(w->key_len[i] == info->store_key_len &&
                         memcmp(w->key[i], info->store_key, info->store_key_len) == 0))
        i++;
    if (i == w->n && w->n < 8 && info->store_key_len <= sizeof w->key[0]) {
        memcpy(w->key[i], info->store_key, info->store_key_len);
        w->key_len[i] = info->store_key_len;
        w->state[i] = info->state;
        w->remaining_ms[i] = info->remaining_ms;
        w->n++;
    }
    return w->stop_after && w->calls >= w->stop_after;
}

/* The index in w of the key prefix + tail, or -1. */
static int seen_at(const seen *w, const char *tail)
{
    char want[128];
    int n = snprintf(want, sizeof want, "%s%s", prefix, tail);
    for (size_t i = 0; i < w->n; i++)
        if (w->key_len[i] == (size_t)n && memcmp(w->key[i], want, (size_t)n) == 0)
            return (int)i;
    return -1;
}

Test(inspect, list_gives_each_key_of_the_layer_with_its_state_and_no_key_of_another_prefix)
{
    seen w = {0};
    if (strcmp(idem_store_backend(store), "memcached") == 0) {
        cr_assert_eq(idem_layer_list(layer, IDEM_KEY_ABSENT, 0, collect_key, &w), IDEM_EUNSUPPORTED);
        cr_assert(strstr(idem_last_error(), "cannot enumerate"), "%s", idem_last_error());
        cr_assert_eq(w.calls, 0);
        return;
    }
    idem_reply r = {0};
    idem_request done1 = req_fp("done-1"), done2 = req_fp("done-2"), run1 = req_fp("run-1");
    cr_assert_eq(idem_run(layer, &done1, store_hello, NULL, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_run(layer, &done2, store_hello, NULL, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_run_scoped(layer, "acct", 4, &done1, store_hello, NULL, &r), IDEM_OK);
    idem_claim *c;
    cr_assert_eq(idem_begin(layer, &run1, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);
    /* a layer whose prefix starts like this one's, and one of another name */
    idem_layer *other;
    idem_options o;
    idem_options_init(&o);
    char other_prefix[80];
    snprintf(other_prefix, sizeof other_prefix, "%.*sx:", (int)strlen(prefix) - 1, prefix);
    o.key_prefix = other_prefix;
    cr_assert_eq(idem_layer_new(&other, store, &o), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_run(other, &done1, store_hello, NULL, &r), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(other);

    int rc = idem_layer_list(layer, IDEM_KEY_ABSENT, 0, collect_key, &w);
    cr_assert_eq(rc, IDEM_OK, "%s (%s)", idem_error_name(rc), idem_last_error());
    cr_assert_eq(w.n, 4, "listed %zu keys, want done-1, done-2, run-1 and the scoped one", w.n);
    int d1 = seen_at(&w, "done-1"), d2 = seen_at(&w, "done-2"), r1 = seen_at(&w, "run-1");
    cr_assert(d1 >= 0 && d2 >= 0 && r1 >= 0, "a key of the layer is missing");
    cr_assert_eq(w.state[d1], IDEM_KEY_COMPLETED);
    cr_assert_eq(w.state[d2], IDEM_KEY_COMPLETED);
    cr_assert_eq(w.state[r1], IDEM_KEY_STARTED);
    cr_assert(w.remaining_ms[r1] > 0 && w.remaining_ms[r1] <= 30000, "lease left %u ms",
              w.remaining_ms[r1]);
    cr_assert(w.remaining_ms[d1] > 3000000 && w.remaining_ms[d1] <= 3600000, "ttl left %u ms",
              w.remaining_ms[d1]);

    seen started = {0};
    cr_assert_eq(idem_layer_list(layer, IDEM_KEY_STARTED, 0, collect_key, &started), IDEM_OK);
    cr_assert_eq(started.n, 1);
    cr_assert_eq(seen_at(&started, "run-1"), 0);
    seen completed = {0};
    cr_assert_eq(idem_layer_list(layer, IDEM_KEY_COMPLETED, 0, collect_key, &completed), IDEM_OK);
    cr_assert_eq(completed.n, 3);
    cr_assert_lt(seen_at(&completed, "run-1"), 0);

    seen limited = {0};
    cr_assert_eq(idem_layer_list(layer, IDEM_KEY_ABSENT, 2, collect_key, &limited), IDEM_OK);
    cr_assert_eq(limited.calls, 2, "limit 2 gave %zu keys", limited.calls);
    seen stopped = {.stop_after = 1};
    cr_assert_eq(idem_layer_list(layer, IDEM_KEY_ABSENT, 0, collect_key, &stopped), IDEM_OK);
    cr_assert_eq(stopped.calls, 1, "the visitor asked to stop, and was called %zu times", stopped.calls);

    cr_assert_eq(idem_layer_list(layer, (idem_key_state)9, 0, collect_key, &w), IDEM_EINVAL);
    cr_assert_eq(idem_layer_list(layer, IDEM_KEY_ABSENT, 0, NULL, NULL), IDEM_EINVAL);
    cr_assert_eq(idem_layer_list(NULL, IDEM_KEY_ABSENT, 0, collect_key, &w), IDEM_EINVAL);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
    idem_reply_clear(&r);
}

Test(inspect, the_public_struct_keeps_its_size)
{
    /* Fields of later versions come out of reserved_ (x86-64 and other LP64). */
    cr_assert_eq(sizeof(idem_key_info), 1472);
    cr_assert_eq(offsetof(idem_key_info, store_key_len), 1432, "a field of 0.2 moved");
    cr_assert_eq(offsetof(idem_key_info, checkpoint_name), 1440, "0.3's fields come out of reserved_");
    cr_assert_eq(sizeof(((idem_key_info *)0)->reserved_), 8);
}
