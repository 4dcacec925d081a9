/*
 * The memory:// store's own promises (docs/contract.md, section 7): what the
 * conformance suite cannot see because it holds for this store alone.
 * Names are shared within a process, an unnamed store is private, the
 * records go with the last close, bad URLs are refused, and expired
 * records are freed by later calls.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define IDEM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define IDEM_ASAN 1
#endif
#endif
#ifdef IDEM_ASAN
/* From the sanitizer runtime (sanitizer/allocator_interface.h, which gcc does not ship). */
size_t __sanitizer_get_current_allocated_bytes(void);
#else
#include <malloc.h>
#endif

#include <criterion/criterion.h>

#include <idempotency/backend.h>
#include <idempotency/idempotency.h>

#include "support/testutil.h"

static idem_store *open_ok(const char *url)
{
    idem_store *s;
    int rc = idem_store_open(&s, url);
    cr_assert_eq(rc, IDEM_OK, "idem_store_open(%s): %s", url, idem_last_error());
    return s;
}

static idem_layer *layer_on(idem_store *s)
{
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK, "%s", idem_last_error());
    return l;
}

static int answer(void *arg, idem_response *resp)
{
    atomic_fetch_add((atomic_int *)arg, 1);
    return idem_response_set(resp, 200, "done", 4) == IDEM_OK ? 0 : 1;
}

static idem_outcome run(idem_layer *l, const char *key, atomic_int *calls)
{
    idem_request req = {.key = key, .key_len = strlen(key)};
    idem_reply r = {0};
    int rc = idem_run(l, &req, answer, calls, &r);
    cr_assert_eq(rc, IDEM_OK, "idem_run: %s", idem_last_error());
    idem_outcome outcome = r.outcome;
    idem_reply_clear(&r);
    return outcome;
}

Test(memory, two_opens_of_one_name_share_records_and_other_names_do_not)
{
    idem_store *a = open_ok("memory://shared"), *b = open_ok("memory://shared"), *c = open_ok("memory://other");
    cr_assert_str_eq(idem_store_backend(a), "memory");
    idem_layer *la = layer_on(a), *lb = layer_on(b), *lc = layer_on(c);
    atomic_int calls = 0;
    cr_assert_eq(run(la, "k", &calls), IDEM_EXECUTED);
    cr_assert_eq(run(lb, "k", &calls), IDEM_REPLAYED, "the same name is the same store");
    cr_assert_eq(run(lc, "k", &calls), IDEM_EXECUTED, "another name is another store");
    cr_assert_eq(atomic_load(&calls), 2);
    idem_layer_free(la), idem_layer_free(lb), idem_layer_free(lc);
    idem_store_close(a), idem_store_close(b), idem_store_close(c);
}

Test(memory, an_unnamed_store_is_private_to_its_handle)
{
    idem_store *a = open_ok("memory://"), *b = open_ok("memory://");
    idem_layer *la = layer_on(a), *lb = layer_on(b);
    atomic_int calls = 0;
    cr_assert_eq(run(la, "k", &calls), IDEM_EXECUTED);
    cr_assert_eq(run(la, "k", &calls), IDEM_REPLAYED);
    cr_assert_eq(run(lb, "k", &calls), IDEM_EXECUTED, "two unnamed stores share nothing");
    idem_layer_free(la), idem_layer_free(lb);
    idem_store_close(a), idem_store_close(b);
}

Test(memory, records_outlive_a_close_while_another_open_holds_the_name_and_go_with_the_last)
{
    idem_store *a = open_ok("memory://life"), *b = open_ok("memory://life");
    idem_layer *la = layer_on(a);
    atomic_int calls = 0;
    cr_assert_eq(run(la, "k", &calls), IDEM_EXECUTED);
    idem_layer_free(la);
    idem_store_close(a);
    idem_layer *lb = layer_on(b);
    cr_assert_eq(run(lb, "k", &calls), IDEM_REPLAYED, "b still holds the name");
    idem_layer_free(lb);
    idem_store_close(b);
    idem_store *c = open_ok("memory://life");
    idem_layer *lc = layer_on(c);
    cr_assert_eq(run(lc, "k", &calls), IDEM_EXECUTED, "the last close freed the records");
    idem_layer_free(lc);
    idem_store_close(c);
}

Test(memory, urls_with_a_port_path_user_second_host_or_parameter_are_refused)
{
    static const char *const bad[] = {"memory://x:1", "memory://x/path", "memory://u:p@x",
                                      "memory://x,y", "memory://x?size=1", "memory:///"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        idem_store *s = (idem_store *)1;
        cr_assert_eq(idem_store_open(&s, bad[i]), IDEM_EINVAL, "%s was accepted", bad[i]);
        cr_assert_null(s);
        cr_assert(strstr(idem_last_error(), "memory"), "%s: the message names the driver: %s", bad[i],
                  idem_last_error());
        cr_assert_null(strstr(idem_last_error(), ":p@"), "no password in %s", idem_last_error());
    }
}

static size_t allocated(void)
{
#ifdef IDEM_ASAN
    return __sanitizer_get_current_allocated_bytes();
#else
    return mallinfo2().uordblks;
#endif
}

Test(memory, expired_records_are_freed_by_later_calls, .timeout = 60)
{
    idem_store *s = open_ok("memory://");
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 10000;
    o.ttl_s = 1;
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, &o), IDEM_OK);
    atomic_int calls = 0;
    /* Warm up the allocator and this thread's buffers. */
    cr_assert_eq(run(l, "warm", &calls), IDEM_EXECUTED);
    size_t before = allocated();
    char key[32];
    enum { N = 20000 };
    for (int i = 0; i < N; i++) {
        snprintf(key, sizeof key, "k%d", i);
        cr_assert_eq(run(l, key, &calls), IDEM_EXECUTED);
    }
    size_t full = allocated();
    cr_assert(full > before + N * 64, "20000 records hold memory (%zu -> %zu)", before, full);
    sleep_ms(1200);
    /* Calls on one key only: each sweeps a few buckets of the table. */
    for (int i = 0; i < N; i++)
        (void)run(l, "warm", &calls);
    size_t after = allocated();
    cr_assert(after < before + (full - before) / 4,
              "expired records were not freed: %zu bytes before, %zu full, %zu after", before, full, after);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(memory, record_build_refuses_what_the_core_would_never_write)
{
    static const uint8_t token[IDEM_TOKEN_LEN] = {7};
    void *p;
    size_t n;
    cr_assert_eq(idem_record_build(&p, &n, IDEM_STATE_STARTED, token, 0, 0, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_record_build(&p, &n, IDEM_STATE_COMPLETED, token, 0, 99, "", 0), IDEM_EINVAL);
    cr_assert_eq(idem_record_build(&p, &n, IDEM_STATE_COMPLETED, token, 0, 200, NULL, 3), IDEM_EINVAL);
    cr_assert_eq(idem_record_build(&p, &n, 'X', token, 1, 200, "", 0), IDEM_EINVAL);
    cr_assert_eq(idem_record_build(NULL, &n, IDEM_STATE_STARTED, token, 1, 0, NULL, 0), IDEM_EINVAL);
    cr_assert_eq(idem_record_build(&p, &n, IDEM_STATE_STARTED, token, 12345, 0, NULL, 0), IDEM_OK);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(p, n, &info), IDEM_OK);
    cr_assert_eq(n, IDEM_RECORD_HEADER_LEN);
    cr_assert_eq(info.state, IDEM_STATE_STARTED);
    cr_assert_eq(info.deadline_ms, 12345);
    cr_assert_arr_eq(info.token, token, IDEM_TOKEN_LEN);
    free(p);
    cr_assert_eq(idem_record_build(&p, &n, IDEM_STATE_COMPLETED, token, 0, 201, "abc", 3), IDEM_OK);
    cr_assert_eq(idem_record_peek(p, n, &info), IDEM_OK);
    cr_assert_eq(info.state, IDEM_STATE_COMPLETED);
    cr_assert_eq(info.deadline_ms, 0);
    free(p);
}
