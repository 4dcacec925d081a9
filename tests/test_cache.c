/*
 * The local cache of COMPLETED responses (idem_options.cache_bytes), over
 * the memory:// driver wrapped to count the claims that reach the store.
 * The contract (README "Policy"): off by default; a cached replay costs no
 * round trip; a different fingerprint is still a mismatch; STARTED records
 * are never cached; entries expire no later than the store's record; the
 * least recently used go first; thread-safe.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "internal.h"
#include "support/testutil.h"

static atomic_uint claims;
static idem_backend counting;

static int counting_claim(void *state, const void *key, size_t key_len, const void *record,
                          size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                          uint32_t *remaining_ms)
{
    atomic_fetch_add(&claims, 1);
    return idem_backend_find("memory")->claim(state, key, key_len, record, record_len, lease_ms, existing,
                                              existing_len, remaining_ms);
}

static idem_store *store;

static void setup(void)
{
    const idem_backend *mem = idem_backend_find("memory");
    cr_assert_not_null(mem, "the memory driver is not built in");
    counting = *mem;
    counting.claim = counting_claim;
    char url[64];
    static unsigned seq;
    snprintf(url, sizeof url, "memory://cache-%ld-%u", (long)getpid(), seq++);
    cr_assert_eq(idem_store_open_backend(&store, &counting, url), IDEM_OK, "%s", idem_last_error());
    atomic_store(&claims, 0);
}

static void teardown(void)
{
    idem_store_close(store);
}

TestSuite(cache, .init = setup, .fini = teardown, .timeout = 60);

static idem_layer *layer_with(size_t cache_bytes, uint32_t ttl_s)
{
    idem_options o;
    idem_options_init(&o);
    o.cache_bytes = cache_bytes;
    o.ttl_s = ttl_s;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_OK, "%s", idem_last_error());
    return l;
}

static atomic_int runs;

static int handler(void *arg, idem_response *resp)
{
    atomic_fetch_add(&runs, 1);
    const char *body = arg ? arg : "paid";
    cr_assert_eq(idem_response_add_header(resp, "Location", "/payments/1"), IDEM_OK);
    return idem_response_set(resp, 201, body, strlen(body)) == IDEM_OK ? 0 : 1;
}

static idem_outcome run(idem_layer *l, const char *key, const char *fp, idem_reply *reply)
{
    idem_request req = {.key = key, .key_len = strlen(key), .fingerprint = fp,
                        .fingerprint_len = fp ? strlen(fp) : 0};
    idem_reply_clear(reply);
    int rc = idem_run(l, &req, handler, NULL, reply);
    cr_assert_eq(rc, IDEM_OK, "idem_run: %s", idem_last_error());
    return reply->outcome;
}

Test(cache, is_off_by_default_and_every_replay_goes_to_the_store)
{
    idem_layer *l = layer_with(0, 60);
    idem_reply r = {0};
    cr_assert_eq(run(l, "k", "a", &r), IDEM_EXECUTED);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(run(l, "k", "a", &r), IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&claims), 6);
    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_eq(st.cache_hits, 0);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, a_committed_response_is_replayed_byte_for_byte_with_no_round_trip)
{
    idem_layer *l = layer_with(1 << 20, 60);
    idem_reply r = {0};
    cr_assert_eq(run(l, "k", "a", &r), IDEM_EXECUTED);
    unsigned after_commit = atomic_load(&claims);
    for (int i = 0; i < 100; i++) {
        cr_assert_eq(run(l, "k", "a", &r), IDEM_REPLAYED);
        cr_assert_eq(r.status, 201);
        cr_assert_eq(r.body_len, 4);
        cr_assert_str_eq((char *)r.body, "paid");
        cr_assert_eq(r.nheaders, 1);
        cr_assert_str_eq(r.headers[0].value, "/payments/1");
    }
    cr_assert_eq(atomic_load(&claims), after_commit, "no replay reached the store");
    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_eq(st.cache_hits, 100);
    cr_assert_eq(st.replayed, 100, "cached replays are replays too");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, a_different_fingerprint_is_still_a_mismatch_from_a_cached_entry)
{
    idem_layer *l = layer_with(1 << 20, 60);
    idem_reply r = {0};
    cr_assert_eq(run(l, "k", "a", &r), IDEM_EXECUTED);
    unsigned before = atomic_load(&claims);
    cr_assert_eq(run(l, "k", "b", &r), IDEM_MISMATCH);
    cr_assert_eq(r.status, 422);
    cr_assert_null(r.body);
    cr_assert_eq(atomic_load(&claims), before, "answered from the cache");
    cr_assert_eq(atomic_load(&runs) > 0, 1);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, started_records_are_never_cached)
{
    idem_layer *l = layer_with(1 << 20, 60);
    idem_request req = {.key = "busy", .key_len = 4};
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(run(l, "busy", NULL, &r), IDEM_IN_PROGRESS);
    }
    cr_assert_eq(atomic_load(&claims), 4, "every in-progress answer came from the store");
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_OK);
    cr_assert_eq(run(l, "busy", NULL, &r), IDEM_REPLAYED, "the commit, not a stale STARTED, answers");
    cr_assert_str_eq((char *)r.body, "late");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, a_record_found_in_the_store_is_cached_until_the_ttl_the_store_reported)
{
    idem_layer *writer = layer_with(0, 1);   /* the record lives 1 s */
    idem_layer *reader = layer_with(1 << 20, 86400);
    idem_reply r = {0};
    cr_assert_eq(run(writer, "short", NULL, &r), IDEM_EXECUTED);
    cr_assert_eq(run(reader, "short", NULL, &r), IDEM_REPLAYED); /* from the store, then cached */
    unsigned before = atomic_load(&claims);
    cr_assert_eq(run(reader, "short", NULL, &r), IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&claims), before, "the second replay came from the cache");
    sleep_ms(1600); /* the store's record is gone: so must the cached copy be, whatever ttl_s says */
    cr_assert_eq(run(reader, "short", NULL, &r), IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(reader);
    idem_layer_free(writer);
}

Test(cache, an_entry_expires_with_the_ttl_of_its_commit)
{
    idem_layer *l = layer_with(1 << 20, 1);
    idem_reply r = {0};
    cr_assert_eq(run(l, "t", NULL, &r), IDEM_EXECUTED);
    cr_assert_eq(run(l, "t", NULL, &r), IDEM_REPLAYED);
    sleep_ms(1600);
    cr_assert_eq(run(l, "t", NULL, &r), IDEM_EXECUTED, "an expired response is not replayed");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, memory_is_bounded_and_the_least_recently_used_go_first)
{
    idem_layer *l = layer_with(4096, 60);
    idem_reply r = {0};
    char key[16];
    for (int i = 0; i < 100; i++) {
        snprintf(key, sizeof key, "key-%03d", i);
        cr_assert_eq(run(l, key, NULL, &r), IDEM_EXECUTED);
        cr_assert_eq(run(l, "key-000", NULL, &r), IDEM_REPLAYED); /* keeps key-000 the most recent */
    }
    size_t entries;
    size_t bytes = idem__cache_bytes(idem__layer_cache(l), &entries);
    cr_assert(bytes <= 4096, "%zu bytes cached", bytes);
    cr_assert(entries > 2 && entries < 100, "%zu entries", entries);
    unsigned before = atomic_load(&claims);
    cr_assert_eq(run(l, "key-000", NULL, &r), IDEM_REPLAYED);
    cr_assert_eq(run(l, "key-099", NULL, &r), IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&claims), before, "recently used keys stayed");
    cr_assert_eq(run(l, "key-001", NULL, &r), IDEM_REPLAYED);
    cr_assert_eq(atomic_load(&claims), before + 1, "the least recently used went to make room");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, scoped_keys_are_cached_by_their_full_store_key)
{
    idem_layer *l = layer_with(1 << 20, 60);
    idem_request req = {.key = "k", .key_len = 1};
    idem_reply r = {0};
    cr_assert_eq(idem_run_scoped(l, "A", 1, &req, handler, "from A", &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run_scoped(l, "B", 1, &req, handler, "from B", &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "scope B is another key, not A's cached entry");
    cr_assert_eq(idem_run_scoped(l, "A", 1, &req, handler, NULL, &r), IDEM_OK);
    cr_assert_str_eq((char *)r.body, "from A");
    cr_assert_eq(idem_run_scoped(l, "B", 1, &req, handler, NULL, &r), IDEM_OK);
    cr_assert_str_eq((char *)r.body, "from B");
    cr_assert_eq(run(l, "k", NULL, &r), IDEM_EXECUTED, "the key without a scope is a third key");
    idem_reply_clear(&r);
    idem_layer_free(l);
}

Test(cache, an_operator_delete_drops_the_layers_own_entry)
{
    idem_layer *l = layer_with(1 << 20, 60);
    idem_reply r = {0};
    cr_assert_eq(run(l, "d", NULL, &r), IDEM_EXECUTED);
    cr_assert_eq(run(l, "d", NULL, &r), IDEM_REPLAYED);
    cr_assert_eq(idem_layer_delete(l, NULL, 0, "d", 1, true, NULL), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(run(l, "d", NULL, &r), IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
}

#define THREADS 8
#define KEYS    64
#define ROUNDS  3000

static idem_layer *shared;

static void *replayer(void *arg)
{
    long t = (long)arg;
    char key[16];
    idem_reply r = {0};
    for (int i = 0; i < ROUNDS; i++) {
        int k = (int)((i * 7 + t * 13) % KEYS);
        snprintf(key, sizeof key, "hot-%02d", k);
        idem_request req = {.key = key, .key_len = strlen(key)};
        if (idem_run(shared, &req, handler, key, &r) != IDEM_OK || r.outcome != IDEM_REPLAYED ||
            r.body_len != strlen(key) || memcmp(r.body, key, r.body_len) != 0)
            return (void *)1;
    }
    idem_reply_clear(&r);
    return NULL;
}

Test(cache, threads_replaying_many_keys_get_every_byte_right)
{
    shared = layer_with(1 << 20, 60); /* 16 shards */
    char key[16];
    idem_reply r = {0};
    for (int k = 0; k < KEYS; k++) {
        snprintf(key, sizeof key, "hot-%02d", k);
        idem_request req = {.key = key, .key_len = strlen(key)};
        cr_assert_eq(idem_run(shared, &req, handler, key, &r), IDEM_OK);
    }
    idem_reply_clear(&r);
    unsigned before = atomic_load(&claims);
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++)
        cr_assert_eq(pthread_create(&th[t], NULL, replayer, (void *)t), 0);
    for (int t = 0; t < THREADS; t++) {
        void *bad;
        pthread_join(th[t], &bad);
        cr_assert_null(bad, "thread %d saw a wrong replay", t);
    }
    cr_assert_eq(atomic_load(&claims), before, "every replay came from the cache");
    idem_stats st;
    idem_layer_stats(shared, &st);
    cr_assert_eq(st.cache_hits, (uint64_t)THREADS * ROUNDS);
    idem_layer_free(shared);
}

static void *replayer_any(void *arg)
{
    long t = (long)arg;
    char key[16];
    idem_reply r = {0};
    for (int i = 0; i < ROUNDS; i++) {
        int k = (int)((i * 7 + t * 13) % KEYS);
        snprintf(key, sizeof key, "hot-%02d", k);
        idem_request req = {.key = key, .key_len = strlen(key)};
        if (idem_run(shared, &req, handler, key, &r) != IDEM_OK || r.outcome != IDEM_REPLAYED ||
            r.body_len != strlen(key) || memcmp(r.body, key, r.body_len) != 0)
            return (void *)1;
    }
    idem_reply_clear(&r);
    return NULL;
}

Test(cache, entries_evicted_while_threads_read_them_stay_whole)
{
    shared = layer_with(2048, 60); /* a handful of entries: every miss evicts one */
    char key[16];
    idem_reply r = {0};
    for (int k = 0; k < KEYS; k++) {
        snprintf(key, sizeof key, "hot-%02d", k);
        idem_request req = {.key = key, .key_len = strlen(key)};
        cr_assert_eq(idem_run(shared, &req, handler, key, &r), IDEM_OK);
    }
    idem_reply_clear(&r);
    pthread_t th[THREADS];
    for (long t = 0; t < THREADS; t++)
        cr_assert_eq(pthread_create(&th[t], NULL, replayer_any, (void *)t), 0);
    for (int t = 0; t < THREADS; t++) {
        void *bad;
        pthread_join(th[t], &bad);
        cr_assert_null(bad, "thread %d saw a wrong replay", t);
    }
    idem_stats st;
    idem_layer_stats(shared, &st);
    cr_assert_eq(st.replayed, (uint64_t)THREADS * ROUNDS);
    cr_assert(st.cache_hits > 0 && st.cache_hits < st.replayed, "hits %llu of %llu",
              (unsigned long long)st.cache_hits, (unsigned long long)st.replayed);
    size_t bytes = idem__cache_bytes(idem__layer_cache(shared), NULL);
    cr_assert(bytes <= 2048, "%zu bytes cached", bytes);
    idem_layer_free(shared);
}
