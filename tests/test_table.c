/*
 * The driver table grows compatibly (include/idempotency/backend.h, "The
 * driver table"): a table built as 0.1.0 defined it keeps working, versions
 * outside 1..IDEM_BACKEND_VERSION are refused with a message, open_ex gets
 * its own table, and read/remove are gated on the version and the pointer.
 *
 * The version-1 table here is a struct laid out as 0.1.0's idem_backend,
 * without any version-2 member, placed at the very end of a page whose next
 * page is inaccessible: if the core read one member past the old table, the
 * test would crash instead of passing by luck.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "internal.h"

/* ---- a small store, one mutex, kept by the rules of backend.h ---- */

#define MEM_SLOTS 64

typedef struct mem_entry {
    uint8_t  key[IDEM_MAX_STORE_KEY_LEN];
    size_t   key_len;
    uint8_t *rec;
    size_t   rec_len;
    uint64_t expires_at;
} mem_entry;

typedef struct mem {
    pthread_mutex_t mu;
    mem_entry       e[MEM_SLOTS];
    const void     *app_data;   /* what open_ex found in its table */
} mem;

static mem_entry *mem_find(mem *m, const void *key, size_t key_len, bool live)
{
    for (int i = 0; i < MEM_SLOTS; i++)
        if (m->e[i].rec && m->e[i].key_len == key_len && memcmp(m->e[i].key, key, key_len) == 0)
            return !live || m->e[i].expires_at > idem_now_ms() ? &m->e[i] : NULL;
    return NULL;
}

static bool mem_holds(const mem_entry *e, const uint8_t *token, int state)
{
    idem_record_info info;
    return e && idem_record_peek(e->rec, e->rec_len, &info) == IDEM_OK && info.state == state &&
           memcmp(info.token, token, IDEM_TOKEN_LEN) == 0;
}

static int mem_set(mem *m, mem_entry *e, const void *key, size_t key_len, const void *rec, size_t len,
                   uint64_t ttl_ms)
{
    for (int i = 0; !e && i < MEM_SLOTS; i++)
        if (!m->e[i].rec || m->e[i].expires_at <= idem_now_ms())
            e = &m->e[i];
    if (!e)
        return idem_error_set(IDEM_EBACKEND, "mem: full");
    void *copy = malloc(len);
    if (!copy)
        return IDEM_ENOMEM;
    memcpy(copy, rec, len);
    free(e->rec);
    memcpy(e->key, key, key_len);
    e->key_len = key_len;
    e->rec = copy;
    e->rec_len = len;
    e->expires_at = idem_now_ms() + ttl_ms;
    return IDEM_OK;
}

static int mem_open(void **state, const idem_url *url)
{
    (void)url;
    mem *m = calloc(1, sizeof *m);
    if (!m)
        return IDEM_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    *state = m;
    return IDEM_OK;
}

static void mem_close(void *state)
{
    mem *m = state;
    for (int i = 0; i < MEM_SLOTS; i++)
        free(m->e[i].rec);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static int mem_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                     uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, true);
    int rc;
    if (e) {
        *remaining_ms = (uint32_t)(e->expires_at - idem_now_ms());
        rc = idem_record_dup("mem", e->rec, e->rec_len, existing, existing_len);
    } else {
        rc = mem_set(m, mem_find(m, key, key_len, false), key, key_len, record, record_len, lease_ms);
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static int mem_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint64_t ttl_ms)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, true);
    int rc = mem_holds(e, token, IDEM_STATE_STARTED)
                 ? mem_set(m, e, key, key_len, record, record_len, ttl_ms)
                 : mem_holds(e, token, IDEM_STATE_COMPLETED) ? IDEM_OK : IDEM_ELOST;
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static int mem_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, true);
    int rc = IDEM_ELOST;
    if (mem_holds(e, token, IDEM_STATE_STARTED)) {
        free(e->rec);
        e->rec = NULL;
        rc = IDEM_OK;
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static int mem_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint32_t lease_ms)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, true);
    int rc = mem_holds(e, token, IDEM_STATE_STARTED)
                 ? mem_set(m, e, key, key_len, record, record_len, lease_ms) : IDEM_ELOST;
    pthread_mutex_unlock(&m->mu);
    return rc;
}

/* ---- the table as 0.1.0 defined it ---- */

typedef struct backend_v1 {
    unsigned int version;
    const char  *name;
    int    (*open)(void **state, const idem_url *url);
    void   (*close)(void *state);
    int    (*claim)(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                    uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms);
    int    (*commit)(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms);
    int    (*release)(void *state, const void *key, size_t key_len, const uint8_t *token);
    int    (*extend)(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms);
    size_t (*max_record_len)(void *state);
} backend_v1;

/* The version-1 members keep their places in the grown table. */
_Static_assert(offsetof(idem_backend, max_record_len) == offsetof(backend_v1, max_record_len),
               "version-1 members moved");
_Static_assert(offsetof(idem_backend, app_data) == sizeof(backend_v1),
               "version-2 members must come after every version-1 member");

/* The table as 0.2 defined it: version 2's members, none of version 3's. */
typedef struct backend_v2 {
    backend_v1 v1;
    void  *app_data;
    int    (*open_ex)(void **state, const idem_url *url, const idem_backend *self);
    int    (*read)(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                   uint32_t *remaining_ms);
    int    (*remove)(void *state, const void *key, size_t key_len, bool *deleted);
    int    (*check)(void *state, idem_findings *out);
} backend_v2;

_Static_assert(offsetof(idem_backend, check) == offsetof(backend_v2, check), "version-2 members moved");
_Static_assert(offsetof(idem_backend, tx_begin) == sizeof(backend_v2),
               "version-3 members must come after every version-2 member");

static void *guard_pages;
static long  page;

/* Copy t to the last bytes of a page followed by an inaccessible page. */
static const idem_backend *at_page_end(const void *t, size_t len)
{
    page = sysconf(_SC_PAGESIZE);
    guard_pages = mmap(NULL, (size_t)page * 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(guard_pages, MAP_FAILED);
    cr_assert_eq(mprotect((char *)guard_pages + page, (size_t)page, PROT_NONE), 0);
    void *at = (char *)guard_pages + page - len;
    memcpy(at, t, len);
    return at;
}

static void unmap(void)
{
    if (guard_pages)
        munmap(guard_pages, (size_t)page * 2);
    guard_pages = NULL;
}

TestSuite(table, .fini = unmap, .timeout = 30);

static const backend_v1 v1_table = {
    .version = 1,
    .name = "oldmem",
    .open = mem_open,
    .close = mem_close,
    .claim = mem_claim,
    .commit = mem_commit,
    .release = mem_release,
    .extend = mem_extend,
};

static int handler(void *arg, idem_response *resp)
{
    int *calls = arg;
    (*calls)++;
    return idem_response_set(resp, 201, "made", 4);
}

static int failing(void *arg, idem_response *resp)
{
    (void)resp;
    int *calls = arg;
    (*calls)++;
    return 7;
}

Test(table, a_version_1_table_runs_every_operation_and_no_v2_member_is_read)
{
    const idem_backend *b = at_page_end(&v1_table, sizeof v1_table);
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, b, "oldmem://"), IDEM_OK, "%s", idem_last_error());
    cr_assert_str_eq(idem_store_backend(s), "oldmem");
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK, "%s", idem_last_error());

    int calls = 0;
    idem_reply r = {0};
    idem_request req = {.key = "k", .key_len = 1, .fingerprint = "fp", .fingerprint_len = 2};
    cr_assert_eq(idem_run(l, &req, handler, &calls, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    cr_assert_eq(idem_run(l, &req, handler, &calls, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, 4);
    cr_assert_eq(memcmp(r.body, "made", 4), 0);
    idem_reply_clear(&r);
    cr_assert_eq(calls, 1);

    idem_request other = {.key = "k", .key_len = 1, .fingerprint = "xx", .fingerprint_len = 2};
    cr_assert_eq(idem_run(l, &other, handler, &calls, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_MISMATCH);
    idem_reply_clear(&r);

    /* begin / extend / duplicate in progress / commit */
    idem_request req2 = {.key = "k2", .key_len = 2};
    idem_claim *c;
    cr_assert_eq(idem_begin(l, &req2, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);
    cr_assert_eq(idem_extend(c, 30000), IDEM_OK, "%s", idem_last_error());
    idem_reply r2 = {0};
    cr_assert_eq(idem_run(l, &req2, handler, &calls, &r2), IDEM_OK);
    cr_assert_eq(r2.outcome, IDEM_IN_PROGRESS);
    idem_reply_clear(&r2);
    cr_assert_eq(idem_commit(c, 200, "ok", 2), IDEM_OK, "%s", idem_last_error());

    /* a failing handler releases the key */
    idem_request req3 = {.key = "k3", .key_len = 2};
    cr_assert_eq(idem_run(l, &req3, failing, &calls, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_FAILED);
    idem_reply_clear(&r);
    cr_assert_eq(idem_run(l, &req3, handler, &calls, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the released key runs again");
    idem_reply_clear(&r);

    /* read and remove are version-2 members: a version-1 table has none */
    void *rec = (void *)1;
    size_t len = 1;
    uint32_t left = 0;
    cr_assert_eq(idem__store_read(s, "idem:k", 6, &rec, &len, &left), IDEM_EUNSUPPORTED);
    cr_assert_null(rec);
    cr_assert(strstr(idem_last_error(), "oldmem driver cannot read"), "%s", idem_last_error());
    bool deleted = true;
    cr_assert_eq(idem__store_remove(s, "idem:k", 6, &deleted), IDEM_EUNSUPPORTED);
    cr_assert_not(deleted);
    cr_assert(strstr(idem_last_error(), "cannot delete"), "%s", idem_last_error());

    idem_layer_free(l);
    idem_store_close(s);
}

static int tx_handler(void *arg, void *conn, idem_response *resp)
{
    (void)conn;
    return handler(arg, resp);
}

/* docs/contract.md, "Exactly once": what a table before version 3 cannot
 * do is IDEM_EUNSUPPORTED, and the rest goes on working. */
Test(table, a_version_2_table_runs_and_answers_unsupported_for_checkpoints_and_transactions)
{
    backend_v2 v2 = {.v1 = v1_table};
    v2.v1.version = 2;
    const idem_backend *b = at_page_end(&v2, sizeof v2);
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, b, "oldmem://"), IDEM_OK, "%s", idem_last_error());
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK, "%s", idem_last_error());
    int calls = 0;
    idem_reply r = {0};
    idem_request req = {.key = "k", .key_len = 1};
    cr_assert_eq(idem_run_tx(l, &req, tx_handler, &calls, &r), IDEM_EUNSUPPORTED);
    cr_assert_eq(calls, 0, "a handler ran on a store without transactions");
    idem_claim *c;
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c, "the refused idem_run_tx left the key claimed");
    cr_assert_eq(idem_checkpoint(c, "step", "x", 1), IDEM_EUNSUPPORTED);
    cr_assert(strstr(idem_last_error(), "version 3"), "%s", idem_last_error());
    char sub[IDEM_SUBKEY_SIZE];
    cr_assert_eq(idem_claim_subkey(c, "charge", sub, sizeof sub), IDEM_OK, "subkeys need no store");
    cr_assert_eq(idem_commit_tx(c, (void *)1, 200, "", 0), IDEM_EUNSUPPORTED);
    cr_assert_eq(idem_commit(c, 201, "made", 4), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_run(l, &req, handler, &calls, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

static int count_key(void *arg, const idem_key_info *info)
{
    (void)info;
    ++*(int *)arg;
    return 0;
}

Test(table, a_version_2_table_answers_unsupported_for_list_without_reading_past_its_end)
{
    backend_v2 v2 = {.v1 = v1_table};
    v2.v1.version = 2;
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, at_page_end(&v2, sizeof v2), "oldmem://"), IDEM_OK);
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK, "%s", idem_last_error());
    int n = 0;
    cr_assert_eq(idem_layer_list(l, IDEM_KEY_ABSENT, 0, count_key, &n), IDEM_EUNSUPPORTED);
    cr_assert(strstr(idem_last_error(), "list"), "%s", idem_last_error());
    cr_assert_eq(n, 0);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(table, each_table_version_keeps_its_size)
{
    /* A driver built against version N's header has a table this long; the
     * core never reads past it (x86-64 and other LP64). */
#if UINTPTR_MAX == UINT64_MAX
    cr_assert_eq(sizeof(backend_v1), 72, "version 1 (0.1)");
    cr_assert_eq(sizeof(backend_v2), 112, "version 2 (0.2)");
    cr_assert_eq(offsetof(idem_backend, tx_begin), 112, "version 3 starts where version 2 ended");
    cr_assert_eq(offsetof(idem_backend, list), 136, "list follows the tx members");
    cr_assert_eq(sizeof(idem_backend), 144, "version 3 (0.3)");
#endif
    cr_assert_eq(IDEM_BACKEND_VERSION, 3, "a change to the table bumps the version, and this test");
}

static void tx_end_alone(void *state, void *tx)
{
    (void)state;
    (void)tx;
}

Test(table, a_version_3_table_with_some_but_not_all_tx_members_is_refused)
{
    idem_backend t = {
        .version = 3, .name = "halftx",
        .open = mem_open, .close = mem_close, .claim = mem_claim, .commit = mem_commit,
        .release = mem_release, .extend = mem_extend,
        .tx_end = tx_end_alone,
    };
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &t, "halftx://"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "all three"), "%s", idem_last_error());
}

Test(table, version_0_and_a_version_after_this_librarys_are_refused_with_the_versions_it_speaks)
{
    backend_v1 t = v1_table;
    idem_store *s = (idem_store *)1;
    t.version = 0;
    cr_assert_eq(idem_store_open_backend(&s, at_page_end(&t, sizeof t), "oldmem://"), IDEM_EINVAL);
    cr_assert_null(s);
    cr_assert(strstr(idem_last_error(), "version 0") && strstr(idem_last_error(), "versions 1 to 3"),
              "%s", idem_last_error());
    unmap();

    idem_backend t3 = {
        .version = IDEM_BACKEND_VERSION + 1,
        .name = "future",
        .open = mem_open, .close = mem_close, .claim = mem_claim, .commit = mem_commit,
        .release = mem_release, .extend = mem_extend,
    };
    cr_assert_eq(idem_store_open_backend(&s, &t3, "future://"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "version 4") &&
              strstr(idem_last_error(), "rebuild the driver against this <idempotency/backend.h>"),
              "%s", idem_last_error());
}

Test(table, a_version_1_table_without_open_is_refused_even_if_memory_after_it_looks_like_open_ex)
{
    backend_v1 t = v1_table;
    t.open = NULL;
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, at_page_end(&t, sizeof t), "oldmem://"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "lacks the mandatory function open"), "%s", idem_last_error());
}

static int mem_open_ex(void **state, const idem_url *url, const idem_backend *self)
{
    int rc = mem_open(state, url);
    if (rc == IDEM_OK)
        ((mem *)*state)->app_data = self->app_data;
    return rc;
}

static int mem_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                    uint32_t *remaining_ms)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, true);
    int rc = IDEM_OK;
    if (e) {
        *remaining_ms = (uint32_t)(e->expires_at - idem_now_ms());
        rc = idem_record_dup("mem", e->rec, e->rec_len, record, record_len);
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

static int mem_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    mem *m = state;
    pthread_mutex_lock(&m->mu);
    mem_entry *e = mem_find(m, key, key_len, false);
    *deleted = e && e->expires_at > idem_now_ms();
    if (e) {
        free(e->rec);
        e->rec = NULL;
    }
    pthread_mutex_unlock(&m->mu);
    return IDEM_OK;
}

static const char config[] = "the caller's configuration";

Test(table, open_ex_is_called_instead_of_open_with_its_own_table_and_app_data)
{
    const idem_backend t = {
        .version = 2,
        .name = "newmem",
        .app_data = (void *)config,
        .open_ex = mem_open_ex,
        .close = mem_close, .claim = mem_claim, .commit = mem_commit,
        .release = mem_release, .extend = mem_extend,
        .read = mem_read, .remove = mem_remove,
    };
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &t, "newmem://"), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(((mem *)idem__store_state(s))->app_data, config, "open_ex did not get its table's app_data");

    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK);
    int calls = 0;
    idem_reply r = {0};
    idem_request req = {.key = "k", .key_len = 1};
    cr_assert_eq(idem_run(l, &req, handler, &calls, &r), IDEM_OK);
    idem_reply_clear(&r);

    /* read and remove reach the driver when the table has them */
    void *rec;
    size_t len;
    uint32_t left;
    cr_assert_eq(idem__store_read(s, "idem:k", 6, &rec, &len, &left), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(rec);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(rec, len, &info), IDEM_OK);
    cr_assert_eq(info.state, IDEM_STATE_COMPLETED);
    free(rec);
    bool deleted;
    cr_assert_eq(idem__store_remove(s, "idem:k", 6, &deleted), IDEM_OK);
    cr_assert(deleted);
    cr_assert_eq(idem__store_read(s, "idem:k", 6, &rec, &len, &left), IDEM_OK);
    cr_assert_null(rec, "a removed key reads as none");
    cr_assert_eq(idem__store_remove(s, "idem:k", 6, &deleted), IDEM_OK);
    cr_assert_not(deleted);

    idem_layer_free(l);
    idem_store_close(s);
}

Test(table, a_version_2_table_with_neither_open_nor_open_ex_is_refused)
{
    const idem_backend t = {
        .version = 2, .name = "noopen",
        .close = mem_close, .claim = mem_claim, .commit = mem_commit,
        .release = mem_release, .extend = mem_extend,
    };
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &t, "noopen://"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "lacks the mandatory function open"), "%s", idem_last_error());
}

Test(table, a_version_2_table_without_read_or_remove_gives_eunsupported)
{
    const idem_backend t = {
        .version = 2, .name = "noread",
        .open = mem_open, .close = mem_close, .claim = mem_claim, .commit = mem_commit,
        .release = mem_release, .extend = mem_extend,
    };
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &t, "noread://"), IDEM_OK);
    void *rec;
    size_t len;
    uint32_t left;
    cr_assert_eq(idem__store_read(s, "x", 1, &rec, &len, &left), IDEM_EUNSUPPORTED);
    bool deleted;
    cr_assert_eq(idem__store_remove(s, "x", 1, &deleted), IDEM_EUNSUPPORTED);
    idem_store_close(s);
}

/* ---- the one list of drivers (meson.build `drivers`) ---- */

Test(table, every_built_in_driver_is_found_by_name_and_named_for_an_unknown_scheme)
{
    idem_store *s = (idem_store *)1;
    cr_assert_eq(idem_store_open(&s, "nosuch://h:1"), IDEM_EINVAL);
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", idem_last_error());
    cr_assert(idem__builtin_backends[0], "no driver is built in");
    for (size_t i = 0; idem__builtin_backends[i]; i++) {
        const idem_backend *b = idem__builtin_backends[i];
        cr_assert_eq(idem_backend_find(b->name), b);
        char scheme[64];
        snprintf(scheme, sizeof scheme, "%s://", b->name);
        cr_assert(strstr(msg, scheme), "the unknown-scheme message does not name %s: %s", scheme, msg);
        cr_assert(idem__missing_backend_hint(b->name), "no package named for %s", b->name);
    }
    cr_assert_null(idem_backend_find("nosuch"));
}
