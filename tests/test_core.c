/*
 * The core against an in-memory fake driver that fails on command.
 *
 * The fake keeps every rule of <idempotency/backend.h> (atomic claim, fencing
 * by token and state, expiry by its own clock, a mutex for threads) and can be
 * told, per operation, to fail the next N calls without applying them, or to
 * apply the next N calls and then report a failure (a lost reply). It counts
 * every call, and checks every record the core writes.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "internal.h"
#include "support/testutil.h"

/* ======================================================================== */
/* The fake driver                                                          */
/* ======================================================================== */

enum fake_op { FAKE_CLAIM, FAKE_COMMIT, FAKE_RELEASE, FAKE_EXTEND, FAKE_NOPS };
static const char *const fake_op_name[FAKE_NOPS] = {"claim", "commit", "release", "extend"};

/* A failure count that never runs out. */
#define FAKE_ALWAYS UINT_MAX

typedef struct fake_entry {
    struct fake_entry *next;
    uint8_t           *key;
    size_t             key_len;
    uint8_t           *rec;
    size_t             rec_len;
    uint64_t           expires_at; /* fake clock, ms */
} fake_entry;

typedef struct fake {
    pthread_mutex_t mu;
    fake_entry     *entries;
    int64_t         skew_ms;           /* the fake clock runs this far ahead of the wall clock */
    unsigned        calls[FAKE_NOPS];
    unsigned        fail[FAKE_NOPS];       /* fail the next N calls without applying them */
    int             fail_rc[FAKE_NOPS];    /* ...with this code (0: IDEM_EBACKEND) */
    uint64_t        deadline[FAKE_NOPS];   /* idem_call_deadline_ms() at the last call */
    unsigned        lose_reply[FAKE_NOPS]; /* apply the next N calls, then report a failure */
    unsigned        late_ms[FAKE_NOPS];    /* apply each call, then answer this much later */
    bool            remaining_unknown; /* claim answers UINT32_MAX: "cannot tell" */
    size_t          max_record_len;    /* 0: no limit */
    unsigned        oversized;         /* records over max_record_len the core sent */
    unsigned        malformed;         /* records the core sent that do not decode as expected */
} fake;

static atomic_int fake_opens;

static uint64_t fake_now(const fake *f)
{
    return (uint64_t)((int64_t)idem_now_ms() + f->skew_ms);
}

/* The entry under key, expired or not. */
static fake_entry *fake_slot(fake *f, const void *key, size_t key_len)
{
    for (fake_entry *e = f->entries; e; e = e->next)
        if (e->key_len == key_len && memcmp(e->key, key, key_len) == 0)
            return e;
    return NULL;
}

/* The unexpired entry under key, or NULL: an expired one counts as none. */
static fake_entry *fake_live(fake *f, const void *key, size_t key_len)
{
    fake_entry *e = fake_slot(f, key, key_len);
    return e && e->expires_at > fake_now(f) ? e : NULL;
}

static int fake_put_locked(fake *f, const void *key, size_t key_len, const void *rec, size_t rec_len,
                           uint64_t expires_at)
{
    uint8_t *copy = malloc(rec_len ? rec_len : 1);
    if (!copy)
        return idem_error_set(IDEM_ENOMEM, "fake: out of memory");
    memcpy(copy, rec, rec_len);
    fake_entry *e = fake_slot(f, key, key_len);
    if (!e) {
        e = calloc(1, sizeof *e);
        uint8_t *k = malloc(key_len ? key_len : 1);
        if (!e || !k) {
            free(e);
            free(k);
            free(copy);
            return idem_error_set(IDEM_ENOMEM, "fake: out of memory");
        }
        memcpy(k, key, key_len);
        e->key = k;
        e->key_len = key_len;
        e->next = f->entries;
        f->entries = e;
    }
    free(e->rec);
    e->rec = copy;
    e->rec_len = rec_len;
    e->expires_at = expires_at;
    return IDEM_OK;
}

static void fake_delete_locked(fake *f, fake_entry *gone)
{
    for (fake_entry **p = &f->entries; *p; p = &(*p)->next)
        if (*p == gone) {
            *p = gone->next;
            free(gone->key);
            free(gone->rec);
            free(gone);
            return;
        }
}

/* Count the call; fail it without applying it when told to. */
static int fake_enter(fake *f, enum fake_op op)
{
    f->calls[op]++;
    f->deadline[op] = idem_call_deadline_ms();
    if (f->fail[op]) {
        if (f->fail[op] != FAKE_ALWAYS)
            f->fail[op]--;
        return idem_error_set(f->fail_rc[op] ? f->fail_rc[op] : IDEM_EBACKEND,
                              "fake: %s failed (injected); retry later", fake_op_name[op]);
    }
    return IDEM_OK;
}

/* After the lock is dropped: answer late when told to (a slow store). */
static void fake_answer_late(fake *f, enum fake_op op)
{
    pthread_mutex_lock(&f->mu);
    unsigned ms = f->late_ms[op];
    pthread_mutex_unlock(&f->mu);
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (ms && nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* After the operation was applied: lose its reply when told to. */
static int fake_leave(fake *f, enum fake_op op, int rc)
{
    if (f->lose_reply[op]) {
        if (f->lose_reply[op] != FAKE_ALWAYS)
            f->lose_reply[op]--;
        return idem_error_set(IDEM_EBACKEND, "fake: %s applied but its reply was lost (injected)",
                              fake_op_name[op]);
    }
    return rc;
}

/* Check a record the core sends: within the limit, decodable, in the state
 * the operation calls for, carrying the claim's token. */
static int fake_check_record(fake *f, const void *rec, size_t len, int state, const uint8_t *token)
{
    if (f->max_record_len && len > f->max_record_len) {
        f->oversized++;
        return idem_error_set(IDEM_EBACKEND, "fake: a %zu-byte record is over the %zu-byte limit", len,
                              f->max_record_len);
    }
    idem_record r;
    if (idem__record_decode(rec, len, &r) != IDEM_OK || r.state != state ||
        (token && memcmp(r.token, token, IDEM_TOKEN_LEN) != 0)) {
        f->malformed++;
        return idem_error_set(IDEM_EBACKEND, "fake: the core sent a malformed record");
    }
    return IDEM_OK;
}

static bool holds_token(const fake_entry *e, const uint8_t *token)
{
    return e->rec_len >= IDEM_RECORD_HEADER_LEN &&
           memcmp(e->rec + IDEM_RECORD_TOKEN_OFFSET, token, IDEM_TOKEN_LEN) == 0;
}

static int fake_state(const fake_entry *e)
{
    return e->rec_len > IDEM_RECORD_STATE_OFFSET ? e->rec[IDEM_RECORD_STATE_OFFSET] : 0;
}

static int fake_open(void **state, const idem_url *url)
{
    uint64_t limit = 0, fail_open = 0;
    if (idem_url_param_uint(url, "max_record_len", 1, SIZE_MAX, &limit) ||
        idem_url_param_uint(url, "fail_open", 0, 1, &fail_open))
        return IDEM_EINVAL;
    if (fail_open)
        return idem_error_set(IDEM_EBACKEND, "fake: cannot reach the store (injected)");
    fake *f = calloc(1, sizeof *f);
    if (!f)
        return idem_error_set(IDEM_ENOMEM, "fake: out of memory");
    pthread_mutex_init(&f->mu, NULL);
    f->max_record_len = (size_t)limit;
    atomic_fetch_add(&fake_opens, 1);
    *state = f;
    return IDEM_OK;
}

static void fake_close(void *state)
{
    fake *f = state;
    while (f->entries)
        fake_delete_locked(f, f->entries);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

static int fake_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                      uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    fake *f = state;
    pthread_mutex_lock(&f->mu);
    int rc = fake_enter(f, FAKE_CLAIM);
    if (rc == IDEM_OK)
        rc = fake_check_record(f, record, record_len, IDEM_STATE_STARTED, NULL);
    if (rc == IDEM_OK) {
        fake_entry *e = fake_live(f, key, key_len);
        if (e) {
            void *copy = malloc(e->rec_len ? e->rec_len : 1);
            if (!copy) {
                rc = idem_error_set(IDEM_ENOMEM, "fake: out of memory");
            } else {
                memcpy(copy, e->rec, e->rec_len);
                uint64_t left = e->expires_at - fake_now(f);
                *existing = copy;
                *existing_len = e->rec_len;
                *remaining_ms = f->remaining_unknown ? UINT32_MAX
                              : left >= UINT32_MAX   ? UINT32_MAX - 1
                                                     : (uint32_t)left;
            }
        } else {
            rc = fake_put_locked(f, key, key_len, record, record_len, fake_now(f) + lease_ms);
        }
        if (rc == IDEM_OK && (rc = fake_leave(f, FAKE_CLAIM, rc)) != IDEM_OK && *existing) {
            free(*existing);
            *existing = NULL;
            *existing_len = 0;
        }
    }
    pthread_mutex_unlock(&f->mu);
    fake_answer_late(f, FAKE_CLAIM);
    return rc;
}

static int fake_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint64_t ttl_ms)
{
    fake *f = state;
    pthread_mutex_lock(&f->mu);
    int rc = fake_enter(f, FAKE_COMMIT);
    if (rc == IDEM_OK)
        rc = fake_check_record(f, record, record_len, IDEM_STATE_COMPLETED, token);
    if (rc == IDEM_OK) {
        fake_entry *e = fake_live(f, key, key_len);
        if (!e || !holds_token(e, token))
            rc = IDEM_ELOST;
        else if (fake_state(e) == IDEM_STATE_COMPLETED)
            rc = IDEM_OK; /* this commit already happened; its reply was lost */
        else if (fake_state(e) == IDEM_STATE_STARTED)
            rc = fake_put_locked(f, key, key_len, record, record_len, fake_now(f) + ttl_ms);
        else
            rc = IDEM_ELOST;
        rc = fake_leave(f, FAKE_COMMIT, rc);
    }
    pthread_mutex_unlock(&f->mu);
    fake_answer_late(f, FAKE_COMMIT);
    return rc;
}

static int fake_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    fake *f = state;
    pthread_mutex_lock(&f->mu);
    int rc = fake_enter(f, FAKE_RELEASE);
    if (rc == IDEM_OK) {
        fake_entry *e = fake_live(f, key, key_len);
        if (e && fake_state(e) == IDEM_STATE_STARTED && holds_token(e, token))
            fake_delete_locked(f, e);
        else
            rc = IDEM_ELOST;
        rc = fake_leave(f, FAKE_RELEASE, rc);
    }
    pthread_mutex_unlock(&f->mu);
    fake_answer_late(f, FAKE_RELEASE);
    return rc;
}

static int fake_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint32_t lease_ms)
{
    fake *f = state;
    pthread_mutex_lock(&f->mu);
    int rc = fake_enter(f, FAKE_EXTEND);
    if (rc == IDEM_OK)
        rc = fake_check_record(f, record, record_len, IDEM_STATE_STARTED, token);
    if (rc == IDEM_OK) {
        fake_entry *e = fake_live(f, key, key_len);
        if (e && fake_state(e) == IDEM_STATE_STARTED && holds_token(e, token))
            rc = fake_put_locked(f, key, key_len, record, record_len, fake_now(f) + lease_ms);
        else
            rc = IDEM_ELOST;
        rc = fake_leave(f, FAKE_EXTEND, rc);
    }
    pthread_mutex_unlock(&f->mu);
    fake_answer_late(f, FAKE_EXTEND);
    return rc;
}

static size_t fake_max_record_len(void *state)
{
    fake *f = state;
    return f->max_record_len ? f->max_record_len : SIZE_MAX;
}

static const idem_backend fake_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "fake",
    .open = fake_open,
    .close = fake_close,
    .claim = fake_claim,
    .commit = fake_commit,
    .release = fake_release,
    .extend = fake_extend,
    .max_record_len = fake_max_record_len,
};

/* ======================================================================== */
/* Fixtures                                                                 */
/* ======================================================================== */

static idem_store *store;
static fake       *fk;
static idem_layer *layer;

static void start_url(const char *url, uint32_t lease_ms)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, url), IDEM_OK, "%s", idem_last_error());
    fk = idem__store_state(store);
    idem_options o;
    idem_options_init(&o);
    if (lease_ms)
        o.lease_ms = lease_ms;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK, "%s", idem_last_error());
}

static void start(uint32_t lease_ms)
{
    start_url("fake://", lease_ms);
}

static void stop(void)
{
    if (fk) {
        cr_expect_eq(fk->oversized, 0, "the core sent a record over the store's limit");
        cr_expect_eq(fk->malformed, 0, "the core sent a malformed record");
    }
    idem_layer_free(layer);
    idem_store_close(store);
    layer = NULL;
    store = NULL;
    fk = NULL;
}

TestSuite(core, .fini = stop, .timeout = 30);

/* Move the store's clock forward, so leases and ttls run out at once. */
static void fake_advance(int64_t ms)
{
    pthread_mutex_lock(&fk->mu);
    fk->skew_ms += ms;
    pthread_mutex_unlock(&fk->mu);
}

static void fake_set(unsigned *counter, unsigned n)
{
    pthread_mutex_lock(&fk->mu);
    *counter = n;
    pthread_mutex_unlock(&fk->mu);
}

static unsigned fake_calls(enum fake_op op)
{
    pthread_mutex_lock(&fk->mu);
    unsigned n = fk->calls[op];
    pthread_mutex_unlock(&fk->mu);
    return n;
}

/* The store key of a user key under the default prefix. */
static size_t store_key(const char *key, uint8_t *out)
{
    size_t n = strlen(key);
    memcpy(out, "idem:", 5);
    memcpy(out + 5, key, n);
    return 5 + n;
}

/* A copy of the unexpired record under key (NULL when none); *len its size. */
static uint8_t *fake_get(const char *key, size_t *len)
{
    uint8_t k[512];
    size_t kl = store_key(key, k);
    pthread_mutex_lock(&fk->mu);
    fake_entry *e = fake_live(fk, k, kl);
    uint8_t *copy = NULL;
    if (e) {
        copy = malloc(e->rec_len + 1);
        cr_assert_not_null(copy);
        memcpy(copy, e->rec, e->rec_len);
        *len = e->rec_len;
    }
    pthread_mutex_unlock(&fk->mu);
    return copy;
}

/* The state of the unexpired record under key, or 0 when there is none. */
static int fake_key_state(const char *key)
{
    size_t len;
    uint8_t *rec = fake_get(key, &len);
    int state = rec ? rec[IDEM_RECORD_STATE_OFFSET] : 0;
    free(rec);
    return state;
}

static void fake_put(const char *key, const void *rec, size_t len, uint64_t ttl_ms)
{
    uint8_t k[512];
    size_t kl = store_key(key, k);
    pthread_mutex_lock(&fk->mu);
    int rc = fake_put_locked(fk, k, kl, rec, len, fake_now(fk) + ttl_ms);
    pthread_mutex_unlock(&fk->mu);
    cr_assert_eq(rc, IDEM_OK);
}

/* A handler that counts its runs and does what it is told. */
typedef struct job {
    atomic_int  calls;
    int         ret;       /* what it returns */
    bool        respond;   /* whether it calls idem_response_set */
    int         status;
    const void *body;
    size_t      len;
    int         set_rc;    /* what idem_response_set returned */
    unsigned    sleep_ms;
} job;

static int handler(void *arg, idem_response *resp)
{
    job *j = arg;
    atomic_fetch_add(&j->calls, 1);
    if (j->sleep_ms)
        sleep_ms(j->sleep_ms);
    if (j->respond)
        j->set_rc = idem_response_set(resp, j->status, j->body, j->len);
    return j->ret;
}

static job job_ok(int status, const void *body, size_t len)
{
    return (job){.respond = true, .status = status, .body = body, .len = len};
}

static void assert_stats(uint64_t executed, uint64_t replayed, uint64_t in_progress, uint64_t mismatched,
                         uint64_t failed, uint64_t lost, uint64_t backend_errors)
{
    idem_stats s;
    idem_layer_stats(layer, &s);
    cr_assert_eq(s.executed, executed, "executed %llu, expected %llu", (unsigned long long)s.executed,
                 (unsigned long long)executed);
    cr_assert_eq(s.replayed, replayed, "replayed %llu", (unsigned long long)s.replayed);
    cr_assert_eq(s.in_progress, in_progress, "in_progress %llu", (unsigned long long)s.in_progress);
    cr_assert_eq(s.mismatched, mismatched, "mismatched %llu", (unsigned long long)s.mismatched);
    cr_assert_eq(s.failed, failed, "failed %llu", (unsigned long long)s.failed);
    cr_assert_eq(s.lost, lost, "lost %llu", (unsigned long long)s.lost);
    cr_assert_eq(s.backend_errors, backend_errors, "backend_errors %llu, expected %llu",
                 (unsigned long long)s.backend_errors, (unsigned long long)backend_errors);
}

/* A duplicate of key gets the stored response back, byte for byte. */
static void assert_replays(const char *key, int status, const void *body, size_t len)
{
    idem_request req = req_str(key);
    job dup = job_ok(299, "other", 5);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.status, status);
    cr_assert_eq(r.body_len, len);
    cr_assert(len == 0 || memcmp(r.body, body, len) == 0, "the replayed body differs");
    cr_assert_eq(r.body[len], '\0', "a replayed body is NUL-terminated");
    cr_assert_eq(dup.calls, 0, "a duplicate ran the handler");
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* The ordinary paths                                                       */
/* ======================================================================== */

Test(core, first_request_executes_and_duplicates_replay_byte_for_byte)
{
    start(0);
    static const unsigned char body[] = {0, 1, 2, 0xff, 0, 'x', '\r', '\n'};
    idem_request req = req_str("k1");
    job j = job_ok(201, body, sizeof body);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, sizeof body);
    cr_assert_arr_eq(r.body, body, sizeof body);
    cr_assert_eq(j.calls, 1);
    /* the same reply reused without clearing: its old body is released */
    job dup = job_ok(500, "no", 2);
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, sizeof body);
    cr_assert_arr_eq(r.body, body, sizeof body);
    cr_assert_eq(dup.calls, 0);
    idem_reply_clear(&r);
    cr_assert_null(r.body);
    cr_assert_eq(fake_calls(FAKE_CLAIM), 2, "one round trip per request");
    cr_assert_eq(fake_calls(FAKE_COMMIT), 1);
    assert_stats(1, 1, 0, 0, 0, 0, 0);
}

Test(core, handler_returning_zero_without_a_response_stores_200_and_an_empty_body)
{
    start(0);
    idem_request req = req_str("silent");
    job j = {0};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(r.body_len, 0);
    cr_assert_not_null(r.body);
    cr_assert_eq(r.body[0], '\0');
    idem_reply_clear(&r);
    assert_replays("silent", 200, "", 0);
}


/* Sets a good response, then tries bad ones; each must be refused and leave
 * the good one in place. */
typedef struct bad_sets {
    int  rc[4];
    bool msg[4];
} bad_sets;

static int bad_set_handler(void *arg, idem_response *resp)
{
    bad_sets *b = arg;
    cr_assert_eq(idem_response_set(resp, 202, "kept", 4), IDEM_OK);
    b->rc[0] = idem_response_set(resp, 99, "x", 1);
    b->msg[0] = idem_last_error()[0] != '\0';
    b->rc[1] = idem_response_set(resp, 1000, "x", 1);
    b->msg[1] = idem_last_error()[0] != '\0';
    b->rc[2] = idem_response_set(resp, 200, NULL, 5);
    b->msg[2] = idem_last_error()[0] != '\0';
    b->rc[3] = idem_response_set(NULL, 200, "x", 1);
    b->msg[3] = idem_last_error()[0] != '\0';
    return 0;
}

Test(core, response_set_refuses_bad_status_and_null_body_and_keeps_the_earlier_response)
{
    start(0);
    idem_request req = req_str("bad-set");
    bad_sets b = {0};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, bad_set_handler, &b, &r), IDEM_OK, "%s", idem_last_error());
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(b.rc[i], IDEM_EINVAL, "bad call %d returned %d", i, b.rc[i]);
        cr_assert(b.msg[i], "bad call %d left no message", i);
    }
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 202);
    cr_assert_eq(r.body_len, 4);
    cr_assert_str_eq((const char *)r.body, "kept");
    idem_reply_clear(&r);
    assert_replays("bad-set", 202, "kept", 4);
}

Test(core, response_status_bounds_100_and_999_are_accepted)
{
    start(0);
    idem_request req = req_str("lo");
    job j = job_ok(100, "", 0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(j.set_rc, IDEM_OK);
    cr_assert_eq(r.status, 100);
    req = req_str("hi");
    j = job_ok(999, "", 0);
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(j.set_rc, IDEM_OK);
    cr_assert_eq(r.status, 999);
    idem_reply_clear(&r);
    assert_replays("hi", 999, "", 0);
}

Test(core, handler_failure_frees_the_key_at_once_so_a_retry_runs)
{
    start(0);
    idem_request req = req_str("flaky");
    job j = job_ok(200, "partial", 7);
    j.ret = -42;
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.handler_error, -42);
    cr_assert_eq(fake_key_state("flaky"), 0, "the failed claim was not released");
    cr_assert_eq(fake_calls(FAKE_RELEASE), 1);
    cr_assert_eq(fake_calls(FAKE_COMMIT), 0, "a failed handler's response was stored");
    job again = job_ok(200, "done", 4);
    cr_assert_eq(idem_run(layer, &req, handler, &again, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(again.calls, 1);
    idem_reply_clear(&r);
    assert_replays("flaky", 200, "done", 4);
    assert_stats(1, 1, 0, 0, 1, 0, 0);
}

Test(core, duplicate_while_running_is_in_progress_with_time_left_on_the_lease)
{
    start(10000);
    idem_request req = req_str("busy");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    fake_advance(4000);
    job dup = job_ok(200, "", 0);
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert_eq(r.status, 409);
    cr_assert(r.retry_after_ms > 5000 && r.retry_after_ms <= 6000, "retry_after_ms %u",
              r.retry_after_ms);
    cr_assert_eq(dup.calls, 0);
    cr_assert_eq(idem_commit(c, 200, "x", 1), IDEM_OK);
    idem_reply_clear(&r);
    assert_stats(1, 0, 1, 0, 0, 0, 0);
}

Test(core, retry_after_comes_from_the_record_deadline_when_the_store_cannot_tell)
{
    start(60000);
    fk->remaining_unknown = true;
    idem_request req = req_str("busy");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_begin(layer, &req, &(idem_claim *){NULL}, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms > 55000 && r.retry_after_ms <= 60000, "retry_after_ms %u",
              r.retry_after_ms);
    cr_assert_eq(idem_abort(c), IDEM_OK);
}

/* A holder whose clock runs an hour ahead wrote its deadline an hour out; a
 * store that cannot tell the time left leaves only that deadline to go by.
 * The hint never asks for more than a lease. */
Test(core, retry_after_from_a_holders_clock_far_ahead_is_at_most_a_lease)
{
    start(300);
    fk->remaining_unknown = true;
    static const uint8_t token[IDEM_TOKEN_LEN] = {7};
    void *rec;
    size_t len;
    cr_assert_eq(idem_record_build(&rec, &len, IDEM_STATE_STARTED, token, idem_now_ms() + 3600000, 0,
                                   NULL, 0), IDEM_OK, "%s", idem_last_error());
    fake_put("ahead", rec, len, 3600000);
    free(rec);
    idem_request req = req_str("ahead");
    idem_claim *c = NULL;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_null(c);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms <= 300, "retry_after_ms %u with a 300 ms lease",
              r.retry_after_ms);
    idem_reply_clear(&r);
}

Test(core, same_key_with_another_fingerprint_is_a_mismatch_and_runs_nothing)
{
    start(0);
    idem_request req = {.key = "pay", .key_len = 3, .fingerprint = "amount=10", .fingerprint_len = 9};
    job j = job_ok(200, "paid", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_request other = req;
    other.fingerprint = "amount=99";
    job dup = job_ok(200, "", 0);
    cr_assert_eq(idem_run(layer, &other, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_MISMATCH);
    cr_assert_eq(r.status, 422);
    cr_assert_eq(dup.calls, 0);
    /* the same fingerprint, and no fingerprint at all, replay */
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    idem_request unchecked = req_str("pay");
    cr_assert_eq(idem_run(layer, &unchecked, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(dup.calls, 0);
    idem_reply_clear(&r);
    assert_stats(1, 2, 0, 1, 0, 0, 0);
}

Test(core, completed_record_expires_after_ttl_and_the_key_runs_again)
{
    start(0);
    idem_request req = req_str("old");
    job j = job_ok(200, "v1", 2);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    fake_advance(86400LL * 1000 - 1000);
    assert_replays("old", 200, "v1", 2);
    fake_advance(2000);
    job j2 = job_ok(200, "v2", 2);
    cr_assert_eq(idem_run(layer, &req, handler, &j2, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(j2.calls, 1);
    idem_reply_clear(&r);
}

/* ---- many threads, one key ---- */

typedef struct racer {
    job         *work;
    idem_reply   reply;
    int          rc;
    pthread_barrier_t *go;
} racer;

static void *race(void *arg)
{
    racer *me = arg;
    idem_request req = req_str("contended");
    pthread_barrier_wait(me->go);
    me->rc = idem_run(layer, &req, handler, me->work, &me->reply);
    return NULL;
}

Test(core, many_threads_on_one_key_run_the_handler_once)
{
    start(0);
    enum { N = 8 };
    job j = job_ok(200, "once", 4);
    j.sleep_ms = 50;
    racer r[N];
    pthread_t t[N];
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, N);
    for (int i = 0; i < N; i++) {
        r[i] = (racer){.work = &j, .go = &go};
        cr_assert_eq(pthread_create(&t[i], NULL, race, &r[i]), 0);
    }
    int executed = 0, busy = 0, replayed = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(r[i].rc, IDEM_OK);
        executed += r[i].reply.outcome == IDEM_EXECUTED;
        busy += r[i].reply.outcome == IDEM_IN_PROGRESS;
        replayed += r[i].reply.outcome == IDEM_REPLAYED;
        idem_reply_clear(&r[i].reply);
    }
    pthread_barrier_destroy(&go);
    cr_assert_eq(j.calls, 1);
    cr_assert_eq(executed, 1);
    cr_assert_eq(executed + busy + replayed, N);
    assert_replays("contended", 200, "once", 4);
}

/* ======================================================================== */
/* The store failing at each step                                           */
/* ======================================================================== */

Test(core, claim_failure_returns_ebackend_with_a_message_and_runs_nothing)
{
    start(0);
    fk->fail[FAKE_CLAIM] = 1;
    idem_request req = req_str("k");
    job j = job_ok(200, "body", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "claim") != NULL, "message: '%s'", idem_last_error());
    cr_assert_eq(j.calls, 0, "the handler ran although the claim failed");
    cr_assert_eq(fake_key_state("k"), 0, "a failed claim left a record");
    assert_stats(0, 0, 0, 0, 0, 0, 1);
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(j.calls, 1);
    idem_reply_clear(&r);
    assert_stats(1, 0, 0, 0, 0, 0, 1);
}

/* Wait until the layer has freed n keys in the background; false after ms. */
static bool wait_claims_freed(uint64_t n, unsigned ms)
{
    for (unsigned waited = 0;; waited += 10) {
        idem_stats st;
        idem_layer_stats(layer, &st);
        if (st.claims_freed >= n)
            return true;
        if (waited >= ms)
            return false;
        sleep_ms(10);
    }
}

Test(core, claim_whose_reply_was_lost_is_freed_by_the_layer_once_the_store_answers)
{
    start(60000);
    fk->lose_reply[FAKE_CLAIM] = 1;
    fk->fail[FAKE_RELEASE] = 3; /* the store keeps failing a while after the lost reply */
    idem_request req = req_str("k");
    job j = job_ok(200, "body", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "frees the key"), "message: %s", idem_last_error());
    cr_assert_eq(j.calls, 0);
    /* the claim was applied: the layer frees it, fenced by its token, as
     * soon as the store takes the release; not after the 60 s lease */
    cr_assert(wait_claims_freed(1, 10000), "the lost claim was not freed");
    cr_assert_geq(fake_calls(FAKE_RELEASE), 4, "the release was retried after store errors");
    cr_assert_eq(fake_key_state("k"), 0);
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(j.calls, 1);
    idem_reply_clear(&r);
}

Test(core, freeing_a_lost_claim_later_never_touches_a_new_holders_record)
{
    start(60000);
    fk->lose_reply[FAKE_CLAIM] = 1;
    fk->fail[FAKE_RELEASE] = FAKE_ALWAYS;
    idem_request req = req_str("k");
    job j = job_ok(200, "mine", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    /* the lease ends by the store's clock and another request takes the key */
    fake_advance(60000);
    idem_claim *c;
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);
    fake_set(&fk->fail[FAKE_RELEASE], 0);
    sleep_ms(1500); /* the layer's retries run against the new record */
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "the deferred free removed a new holder's claim");
    cr_assert_eq(idem_commit(c, 200, "new", 3), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "new", 3);
}

Test(core, claim_answered_after_half_its_lease_never_runs_the_handler_and_gives_the_key_up)
{
    start(1000);
    fk->late_ms[FAKE_CLAIM] = 700;
    idem_request req = req_str("k");
    job j = job_ok(200, "late", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "more than half"), "message: %s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "given up"), "message: %s", idem_last_error());
    cr_assert_eq(j.calls, 0, "a handler ran on a claim answered with too little lease left");
    cr_assert_eq(fake_key_state("k"), 0, "the late claim was not given up");
    cr_assert_eq(fake_calls(FAKE_RELEASE), 1);

    idem_claim *c;
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_EBACKEND, "the step API gives it up too");
    cr_assert_null(c);
    cr_assert_eq(fake_key_state("k"), 0);

    fk->late_ms[FAKE_CLAIM] = 20; /* well within half the lease, even under valgrind */
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(j.calls, 1);
    idem_reply_clear(&r);
}

Test(core, late_claim_whose_release_fails_is_freed_later_and_says_so)
{
    start(1000);
    fk->late_ms[FAKE_CLAIM] = 700;
    fk->fail[FAKE_RELEASE] = 1;
    idem_request req = req_str("k");
    job j = job_ok(200, "late", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    cr_assert(strstr(idem_last_error(), "as soon as the store answers"), "message: %s", idem_last_error());
    cr_assert_eq(j.calls, 0);
    cr_assert(wait_claims_freed(1, 5000));
    cr_assert_eq(fake_key_state("k"), 0);
}

Test(core, commit_failing_twice_then_succeeding_executes_once_and_replays)
{
    start(0);
    fk->fail[FAKE_COMMIT] = 2;
    static const unsigned char body[] = {'o', 0, 'k', 0x80};
    idem_request req = req_str("k");
    job j = job_ok(201, body, sizeof body);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(j.calls, 1);
    cr_assert_eq(fake_calls(FAKE_COMMIT), 3);
    idem_reply_clear(&r);
    assert_replays("k", 201, body, sizeof body);
    assert_stats(1, 1, 0, 0, 0, 0, 2);
}

Test(core, commit_whose_reply_was_lost_is_recognised_when_retried)
{
    start(0);
    fk->lose_reply[FAKE_COMMIT] = 1;
    idem_request req = req_str("k");
    job j = job_ok(200, "stored once", 11);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(j.calls, 1);
    cr_assert_eq(fake_calls(FAKE_COMMIT), 2, "the commit was not retried");
    idem_reply_clear(&r);
    assert_replays("k", 200, "stored once", 11);
    assert_stats(1, 1, 0, 0, 0, 0, 1);
}

Test(core, commit_failing_until_the_lease_is_nearly_over_keeps_the_key_claimed)
{
    const uint32_t lease = 300;
    start(lease);
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    idem_request req = req_str("k");
    job j = job_ok(201, "made", 4);
    idem_reply r = {0};
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    uint64_t took = mono_ms() - t0;
    cr_assert(took < lease, "gave up after %llu ms, past the %u ms lease", (unsigned long long)took, lease);
    cr_assert(strstr(idem_last_error(), "stays claimed") != NULL, "message: '%s'", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply does not say the handler ran");
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.body_len, 4);
    cr_assert_str_eq((const char *)r.body, "made");
    cr_assert_eq(j.calls, 1);
    unsigned commits = fake_calls(FAKE_COMMIT);
    cr_assert(commits >= 2, "the commit was tried %u times", commits);
    cr_assert_eq(fake_calls(FAKE_RELEASE), 0, "the key was freed after a successful handler");
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED);
    assert_stats(0, 0, 0, 0, 0, 0, commits);
    fake_set(&fk->fail[FAKE_COMMIT], 0);

    /* still claimed: a duplicate does not run */
    job dup = job_ok(200, "", 0);
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert_eq(dup.calls, 0);

    /* the documented limit: once the lease is over, a retry runs again */
    fake_advance(lease);
    cr_assert_eq(idem_run(layer, &req, handler, &dup, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(dup.calls, 1);
    idem_reply_clear(&r);
}

Test(core, step_commit_on_store_error_keeps_the_claim_for_another_commit)
{
    start(300);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_not_null(c);
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_EBACKEND);
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED);
    fake_set(&fk->fail[FAKE_COMMIT], 0);
    /* the store is back: the same claim commits (ASan would see a freed claim) */
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "late", 4);
}

Test(core, step_commit_on_store_error_keeps_the_claim_for_an_abort)
{
    start(300);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_EBACKEND);
    cr_assert_eq(idem_abort(c), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(fake_key_state("k"), 0);
    fk->fail[FAKE_COMMIT] = 0;
    job j = job_ok(200, "fresh", 5);
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
}

Test(core, release_failure_after_handler_failure_says_the_key_was_not_freed_and_frees_it_later)
{
    start(60000);
    fk->fail[FAKE_RELEASE] = FAKE_ALWAYS;
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    j.ret = 7;
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.handler_error, 7);
    cr_assert_eq(r.abort_error, IDEM_EBACKEND, "the reply must not claim the key was freed");
    cr_assert(strstr(idem_last_error(), "freeing its key failed"), "message: %s", idem_last_error());
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED);
    assert_stats(0, 0, 0, 0, 1, 0, 1);

    job retry = job_ok(200, "ok", 2);
    cr_assert_eq(idem_run(layer, &req, handler, &retry, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert_eq(retry.calls, 0);
    /* the store takes releases again: the layer frees the key, long before
     * the 60 s lease would have */
    fake_set(&fk->fail[FAKE_RELEASE], 0);
    cr_assert(wait_claims_freed(1, 10000), "the key was not freed later");
    cr_assert_eq(idem_run(layer, &req, handler, &retry, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(retry.calls, 1);
    idem_reply_clear(&r);
}

Test(core, handler_failure_with_a_working_store_says_the_key_was_freed)
{
    start(0);
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    j.ret = 3;
    idem_reply r = {0};
    r.abort_error = 12345; /* overwritten */
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.abort_error, IDEM_OK);
    cr_assert_eq(fake_key_state("k"), 0);
    idem_reply_clear(&r);
}

Test(core, abort_on_store_error_reports_it_and_still_frees_the_claim)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    fk->fail[FAKE_RELEASE] = FAKE_ALWAYS;
    cr_assert_eq(idem_abort(c), IDEM_EBACKEND); /* LeakSanitizer checks the claim was freed */
    cr_assert(strstr(idem_last_error(), "lease") != NULL, "message: '%s'", idem_last_error());
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED);
}

Test(core, extend_failure_returns_ebackend_and_the_old_lease_stands)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    size_t len0, len1;
    uint8_t *before = fake_get("k", &len0);
    fk->fail[FAKE_EXTEND] = 1;
    cr_assert_eq(idem_extend(c, 60000), IDEM_EBACKEND);
    cr_assert(idem_last_error()[0] != '\0');
    uint8_t *after = fake_get("k", &len1);
    cr_assert_eq(len0, len1);
    cr_assert_arr_eq(before, after, len0, "a failed extend changed the record");
    free(before);
    free(after);
    /* the old lease: a second past it, the key is free */
    fake_advance(1000);
    cr_assert_eq(fake_key_state("k"), 0, "a failed extend lengthened the lease");
    assert_stats(0, 0, 0, 0, 0, 0, 1);
    cr_assert_eq(idem_abort(c), IDEM_ELOST);
}

Test(core, extend_renews_the_lease_and_the_claim_still_commits)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    fake_advance(900);
    cr_assert_eq(idem_extend(c, 1000), IDEM_OK, "%s", idem_last_error());
    fake_advance(900);
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "extend did not renew the lease");
    size_t len;
    uint8_t *rec = fake_get("k", &len);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(rec, len, &info), IDEM_OK);
    uint64_t now = idem_now_ms();
    cr_assert(info.deadline_ms > now && info.deadline_ms <= now + 1000, "deadline not renewed");
    free(rec);
    cr_assert_eq(idem_commit(c, 200, "slow", 4), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "slow", 4);
}

Test(core, extend_after_a_takeover_is_lost_and_commit_frees_without_touching_the_new_holder)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &old, &r), IDEM_OK);
    fake_advance(1000);
    cr_assert_eq(idem_begin(layer, &req, &fresh, &r), IDEM_OK);
    cr_assert_not_null(fresh, "the expired claim was not taken over");
    size_t len0, len1;
    uint8_t *before = fake_get("k", &len0);

    cr_assert_eq(idem_extend(old, 60000), IDEM_ELOST);
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(idem_extend(old, 60000), IDEM_ELOST, "a lost claim is lost for good");
    unsigned commits = fake_calls(FAKE_COMMIT);
    cr_assert_eq(idem_commit(old, 200, "stale", 5), IDEM_ELOST); /* frees old */
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(fake_calls(FAKE_COMMIT), commits, "a lost claim still wrote to the store");

    uint8_t *after = fake_get("k", &len1);
    cr_assert_eq(len0, len1);
    cr_assert_arr_eq(before, after, len0, "the new holder's record changed");
    free(before);
    free(after);
    cr_assert_eq(idem_commit(fresh, 200, "fresh", 5), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "fresh", 5);
    idem_stats s;
    idem_layer_stats(layer, &s);
    cr_assert_eq(s.lost, 1, "one lost claim counted %llu times", (unsigned long long)s.lost);
}

Test(core, abort_after_an_extend_found_a_takeover_is_lost_and_frees_the_claim)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &old, &r), IDEM_OK);
    fake_advance(1000);
    cr_assert_eq(idem_begin(layer, &req, &fresh, &r), IDEM_OK);
    cr_assert_eq(idem_extend(old, 1000), IDEM_ELOST);
    unsigned releases = fake_calls(FAKE_RELEASE);
    cr_assert_eq(idem_abort(old), IDEM_ELOST);
    cr_assert_eq(fake_calls(FAKE_RELEASE), releases);
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "the new holder's claim was freed");
    cr_assert_eq(idem_abort(fresh), IDEM_OK);
}

Test(core, commit_after_a_takeover_is_lost_and_the_new_holders_record_is_unchanged)
{
    start(1000);
    idem_request req = req_str("k");
    idem_claim *old, *fresh;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &old, &r), IDEM_OK);
    fake_advance(1000);
    cr_assert_eq(idem_begin(layer, &req, &fresh, &r), IDEM_OK);
    cr_assert_eq(idem_commit(fresh, 200, "new", 3), IDEM_OK);
    size_t len0, len1;
    uint8_t *before = fake_get("k", &len0);
    cr_assert_eq(idem_commit(old, 200, "stale", 5), IDEM_ELOST);
    cr_assert(strstr(idem_last_error(), "lease") != NULL, "message: '%s'", idem_last_error());
    uint8_t *after = fake_get("k", &len1);
    cr_assert_eq(len0, len1);
    cr_assert_arr_eq(before, after, len0);
    free(before);
    free(after);
    assert_replays("k", 200, "new", 3);
    assert_stats(1, 1, 0, 0, 0, 1, 0);
}

/* A handler that outlives its lease: meanwhile another request takes the key. */
typedef struct slowpoke {
    atomic_int  calls;
    idem_claim *taker;
    idem_reply  taker_reply;
} slowpoke;

static int outlive_lease(void *arg, idem_response *resp)
{
    slowpoke *s = arg;
    atomic_fetch_add(&s->calls, 1);
    fake_advance(1000);
    idem_request req = req_str("k");
    cr_assert_eq(idem_begin(layer, &req, &s->taker, &s->taker_reply), IDEM_OK);
    cr_assert_not_null(s->taker, "the expired claim was not taken over");
    return idem_response_set(resp, 200, "too late", 8);
}

Test(core, run_whose_handler_outlived_its_lease_returns_elost_with_the_response)
{
    start(1000);
    idem_request req = req_str("k");
    slowpoke s = {0};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, outlive_lease, &s, &r), IDEM_ELOST);
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(s.calls, 1);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(r.body_len, 8);
    cr_assert_str_eq((const char *)r.body, "too late", "the reply lacks the unstored response");
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "the taker's claim was disturbed");
    cr_assert_eq(idem_commit(s.taker, 201, "winner", 6), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 201, "winner", 6);
    idem_reply_clear(&r);
    idem_reply_clear(&s.taker_reply);
    assert_stats(1, 1, 0, 0, 0, 1, 0);
}

/* ======================================================================== */
/* Driver tables                                                            */
/* ======================================================================== */

static const char *const mandatory[] = {"open", "close", "claim", "commit", "release", "extend"};

static void drop_member(idem_backend *t, size_t i)
{
    switch (i) {
    case 0: t->open = NULL; break;
    case 1: t->close = NULL; break;
    case 2: t->claim = NULL; break;
    case 3: t->commit = NULL; break;
    case 4: t->release = NULL; break;
    case 5: t->extend = NULL; break;
    default: cr_assert_fail("no member %zu", i);
    }
}

Test(core, driver_table_with_a_wrong_version_is_refused_naming_both_versions)
{
    idem_backend t = fake_backend;
    t.version = IDEM_BACKEND_VERSION + 1;
    idem_store *s = (idem_store *)&t; /* must be reset to NULL */
    int opens = atomic_load(&fake_opens);
    cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_EINVAL);
    cr_assert_null(s);
    cr_assert(strstr(idem_last_error(), "version") != NULL, "message: '%s'", idem_last_error());
    t.version = 0;
    cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_EINVAL);
    cr_assert_eq(atomic_load(&fake_opens), opens, "a refused table was opened");
}

Test(core, driver_table_without_a_name_is_refused)
{
    idem_backend t = fake_backend;
    idem_store *s;
    t.name = NULL;
    cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_EINVAL);
    cr_assert_null(s);
    cr_assert(strstr(idem_last_error(), "name") != NULL, "message: '%s'", idem_last_error());
    t.name = "";
    cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "name") != NULL, "message: '%s'", idem_last_error());
}

Test(core, driver_table_missing_a_mandatory_function_is_refused_naming_it)
{
    int opens = atomic_load(&fake_opens);
    for (size_t i = 0; i < sizeof mandatory / sizeof mandatory[0]; i++) {
        idem_backend t = fake_backend;
        drop_member(&t, i);
        idem_store *s;
        cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_EINVAL, "without %s",
                     mandatory[i]);
        cr_assert_null(s);
        char want[64];
        snprintf(want, sizeof want, "function %s", mandatory[i]);
        cr_assert(strstr(idem_last_error(), want) != NULL, "without %s the message is '%s'",
                  mandatory[i], idem_last_error());
    }
    cr_assert_eq(atomic_load(&fake_opens), opens, "a refused table was opened");
}

Test(core, driver_table_without_the_optional_max_record_len_opens_with_no_limit)
{
    idem_backend t = fake_backend;
    t.max_record_len = NULL;
    idem_store *s;
    cr_assert_eq(idem_store_open_backend(&s, &t, "fake://"), IDEM_OK, "%s", idem_last_error());
    cr_assert_str_eq(idem_store_backend(s), "fake");
    cr_assert_eq(idem__store_max_record_len(s), SIZE_MAX);
    idem_store_close(s);
}

Test(core, driver_open_failure_is_ebackend_with_the_drivers_message)
{
    idem_store *s = (idem_store *)&s;
    cr_assert_eq(idem_store_open_backend(&s, &fake_backend, "fake://?fail_open=1"), IDEM_EBACKEND);
    cr_assert_null(s);
    cr_assert(strstr(idem_last_error(), "fake") != NULL, "message: '%s'", idem_last_error());
    cr_assert_eq(idem_store_open_backend(&s, &fake_backend, "not a url"), IDEM_EINVAL);
    cr_assert_null(s);
}

/* ======================================================================== */
/* Limits                                                                   */
/* ======================================================================== */

typedef struct oversize {
    int    rc_small, rc_big;
    char   msg[512];
    size_t big;
} oversize;

static int set_small_then_too_big(void *arg, idem_response *resp)
{
    oversize *o = arg;
    static unsigned char buf[4096];
    o->rc_small = idem_response_set(resp, 200, "small", 5);
    o->rc_big = idem_response_set(resp, 500, buf, o->big);
    snprintf(o->msg, sizeof o->msg, "%s", idem_last_error());
    return 0;
}

Test(core, store_max_record_len_refuses_a_bigger_response_when_set_and_keeps_the_earlier_one)
{
    start_url("fake://?max_record_len=200", 0);
    size_t limit = 200 - IDEM_RECORD_COMPLETED_OVERHEAD;
    idem_request req = req_str("big");
    oversize o = {.big = limit + 1};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, set_small_then_too_big, &o, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(o.rc_small, IDEM_OK);
    cr_assert_eq(o.rc_big, IDEM_ETOOBIG);
    char want[32];
    snprintf(want, sizeof want, "%zu", limit);
    cr_assert(strstr(o.msg, want) != NULL && strstr(o.msg, "store") != NULL,
              "the message does not give the store's limit: '%s'", o.msg);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq((const char *)r.body, "small");
    idem_reply_clear(&r);
    assert_replays("big", 200, "small", 5);

    /* exactly the limit fits */
    req = req_str("edge");
    o = (oversize){.big = limit};
    cr_assert_eq(idem_run(layer, &req, set_small_then_too_big, &o, &r), IDEM_OK);
    cr_assert_eq(o.rc_big, IDEM_OK);
    cr_assert_eq(r.body_len, limit);
    idem_reply_clear(&r);
}

Test(core, step_commit_over_the_limit_keeps_the_claim_for_a_smaller_response)
{
    start_url("fake://?max_record_len=100", 0);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    static const char big[200];
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    cr_assert_eq(idem_commit(c, 200, big, 100 - IDEM_RECORD_COMPLETED_OVERHEAD + 1), IDEM_ETOOBIG);
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(fake_calls(FAKE_COMMIT), 0, "an oversized response reached the store");
    cr_assert_eq(idem_commit(c, 1000, "x", 1), IDEM_EINVAL, "a bad status is refused");
    cr_assert_eq(idem_commit(c, 200, NULL, 1), IDEM_EINVAL, "a NULL body is refused");
    cr_assert_eq(idem_commit(c, 200, "fits", 4), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "fits", 4);
}

Test(core, layer_max_response_len_refuses_a_bigger_response_naming_the_option)
{
    idem_options o;
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    fk = idem__store_state(store);
    idem_options_init(&o);
    o.max_response_len = 10;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK);
    idem_request req = req_str("k");
    oversize ov = {.big = 11};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, set_small_then_too_big, &ov, &r), IDEM_OK);
    cr_assert_eq(ov.rc_big, IDEM_ETOOBIG);
    cr_assert(strstr(ov.msg, "max_response_len") != NULL, "message: '%s'", ov.msg);
    cr_assert_str_eq((const char *)r.body, "small");
    idem_reply_clear(&r);
}

Test(core, keys_of_one_byte_to_max_key_len_with_any_bytes_are_accepted_and_one_more_is_not)
{
    start(0);
    unsigned char key[256];
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (unsigned char)i; /* NUL, CR, LF, space and the rest */
    idem_reply r = {0};
    job j = job_ok(200, "k", 1);
    idem_request req = {.key = key, .key_len = 255};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    req.key_len = 1;
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "a key that is a prefix of another collided with it");
    req.key_len = 256;
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "255") != NULL, "message: '%s'", idem_last_error());
    req.key_len = 0;
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EINVAL);
    cr_assert(idem_last_error()[0] != '\0');
    cr_assert_eq(j.calls, 2);
    cr_assert_eq(fake_calls(FAKE_CLAIM), 2, "an invalid key reached the store");
    idem_reply_clear(&r);
}

Test(core, layers_with_different_prefixes_do_not_see_each_others_records)
{
    start(0);
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = "other:";
    idem_layer *l2;
    cr_assert_eq(idem_layer_new(&l2, store, &o), IDEM_OK);
    idem_request req = req_str("k");
    job a = job_ok(200, "a", 1), b = job_ok(200, "b", 1);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &a, &r), IDEM_OK);
    cr_assert_eq(idem_run(l2, &req, handler, &b, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(b.calls, 1);
    idem_reply_clear(&r);
    idem_layer_free(l2);
}

/* ======================================================================== */
/* Records                                                                  */
/* ======================================================================== */

static idem_record sample_record(int state)
{
    idem_record rec = {.state = state, .has_fingerprint = true};
    for (int i = 0; i < IDEM_TOKEN_LEN; i++)
        rec.token[i] = (uint8_t)(0xa0 + i);
    for (int i = 0; i < IDEM_DIGEST_LEN; i++)
        rec.digest[i] = (uint8_t)(i * 7);
    if (state == IDEM_STATE_STARTED)
        rec.deadline_ms = 0x0123456789abULL;
    return rec;
}

static void assert_same_header(const idem_record *a, const idem_record *b)
{
    cr_assert_eq(a->state, b->state);
    cr_assert_arr_eq(a->token, b->token, IDEM_TOKEN_LEN);
    cr_assert_eq(a->deadline_ms, b->deadline_ms);
    cr_assert_eq(a->has_fingerprint, b->has_fingerprint);
    cr_assert_arr_eq(a->digest, b->digest, IDEM_DIGEST_LEN);
}

Test(core, record_started_round_trips_and_is_exactly_the_header)
{
    idem_record rec = sample_record(IDEM_STATE_STARTED), back;
    uint8_t *enc;
    size_t len;
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    cr_assert_eq(len, IDEM_RECORD_HEADER_LEN);
    cr_assert_arr_eq(enc, "IDEM\1", 5);
    cr_assert_eq(enc[IDEM_RECORD_STATE_OFFSET], 'S');
    cr_assert_arr_eq(enc + IDEM_RECORD_TOKEN_OFFSET, rec.token, IDEM_TOKEN_LEN);
    static const uint8_t deadline_be[8] = {0, 0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab};
    cr_assert_arr_eq(enc + IDEM_RECORD_DEADLINE_OFFSET, deadline_be, 8);
    cr_assert_eq(idem__record_decode(enc, len, &back), IDEM_OK);
    assert_same_header(&rec, &back);
    idem_record_info info;
    cr_assert_eq(idem_record_peek(enc, len, &info), IDEM_OK);
    cr_assert_eq(info.state, IDEM_STATE_STARTED);
    cr_assert_eq(info.token, enc + IDEM_RECORD_TOKEN_OFFSET, "peek points into the record");
    cr_assert_eq(info.deadline_ms, rec.deadline_ms);
    free(enc);

    rec.has_fingerprint = false;
    memset(rec.digest, 0, sizeof rec.digest);
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    cr_assert_eq(idem__record_decode(enc, len, &back), IDEM_OK);
    cr_assert_not(back.has_fingerprint);
    free(enc);
}

Test(core, record_completed_round_trips_with_an_empty_and_a_binary_body)
{
    static const uint8_t bin[] = {0, 0xff, 'I', 'D', 'E', 'M', 0, '\n', 0x80};
    const struct {
        const uint8_t *body;
        size_t         len;
        int            status;
    } cases[] = {{NULL, 0, 204}, {bin, sizeof bin, 999}, {bin, 1, 100}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        idem_record rec = sample_record(IDEM_STATE_COMPLETED), back;
        rec.status = cases[i].status;
        rec.body = cases[i].body;
        rec.body_len = cases[i].len;
        uint8_t *enc;
        size_t len;
        cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
        cr_assert_eq(len, IDEM_RECORD_COMPLETED_OVERHEAD + cases[i].len);
        cr_assert_eq(enc[IDEM_RECORD_STATE_OFFSET], 'C');
        cr_assert_eq(idem__record_decode(enc, len, &back), IDEM_OK, "case %zu", i);
        assert_same_header(&rec, &back);
        cr_assert_eq(back.status, cases[i].status);
        cr_assert_eq(back.body_len, cases[i].len);
        cr_assert_eq(back.body, enc + IDEM_RECORD_COMPLETED_OVERHEAD, "the body points into the record");
        cr_assert(cases[i].len == 0 || memcmp(back.body, cases[i].body, cases[i].len) == 0);
        idem_record_info info;
        cr_assert_eq(idem_record_peek(enc, len, &info), IDEM_OK);
        cr_assert_eq(info.state, IDEM_STATE_COMPLETED);
        cr_assert_eq(info.deadline_ms, 0);
        free(enc);
    }
}

/* A valid encoding of state into buf (room for 128 bytes); its length. */
static size_t valid_record(int state, uint8_t *buf)
{
    idem_record rec = sample_record(state);
    rec.status = 200;
    rec.body = (const uint8_t *)"body";
    rec.body_len = 4;
    uint8_t *enc;
    size_t len;
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    cr_assert(len <= 128);
    memcpy(buf, enc, len);
    free(enc);
    return len;
}

static void assert_corrupt(const uint8_t *buf, size_t len, bool peek_too, const char *what)
{
    idem_record rec;
    cr_assert_eq(idem__record_decode(buf, len, &rec), IDEM_ECORRUPT, "decode accepted %s", what);
    if (peek_too) {
        idem_record_info info;
        cr_assert_eq(idem_record_peek(buf, len, &info), IDEM_ECORRUPT, "peek accepted %s", what);
    }
}

Test(core, record_decode_and_peek_reject_what_this_library_did_not_write)
{
    uint8_t s[128], c[128], b[128];
    size_t slen = valid_record(IDEM_STATE_STARTED, s);
    size_t clen = valid_record(IDEM_STATE_COMPLETED, c);

    assert_corrupt(s, 0, true, "an empty buffer");
    assert_corrupt(s, slen - 1, true, "a short STARTED record");
    assert_corrupt(c, IDEM_RECORD_COMPLETED_OVERHEAD - 1, true, "a COMPLETED record cut inside its header");
    assert_corrupt(c, 3, true, "a 3-byte buffer");

    memcpy(b, s, slen); b[0] = 'X';
    assert_corrupt(b, slen, true, "a wrong magic");
    memcpy(b, s, slen); b[4] = 2;
    assert_corrupt(b, slen, true, "a wrong version");
    memcpy(b, s, slen); b[4] = 0;
    assert_corrupt(b, slen, true, "version 0");
    memcpy(b, s, slen); b[IDEM_RECORD_STATE_OFFSET] = 'X';
    assert_corrupt(b, slen, true, "an unknown state");
    memcpy(b, c, clen); b[IDEM_RECORD_STATE_OFFSET] = 's';
    assert_corrupt(b, clen, true, "a lower-case state");
    memcpy(b, s, slen); b[slen] = 0;
    assert_corrupt(b, slen + 1, true, "a STARTED record with a trailing byte");

    memcpy(b, c, clen);
    assert_corrupt(b, clen - 1, false, "a COMPLETED record one byte short of its body_len");
    memcpy(b, c, clen); b[clen] = 'x';
    assert_corrupt(b, clen + 1, false, "a COMPLETED record one byte past its body_len");
    memcpy(b, c, clen); b[IDEM_RECORD_HEADER_LEN + 7] = 3; /* body_len 3, body 4 */
    assert_corrupt(b, clen, false, "a COMPLETED record whose body_len says 3");
    memcpy(b, c, clen); b[IDEM_RECORD_HEADER_LEN + 4] = 0x80; /* body_len huge */
    assert_corrupt(b, clen, false, "a COMPLETED record whose body_len is huge");
    memcpy(b, c, clen);
    b[IDEM_RECORD_HEADER_LEN + 2] = 0x03; b[IDEM_RECORD_HEADER_LEN + 3] = 0xe8; /* 1000 */
    assert_corrupt(b, clen, false, "status 1000");
    memcpy(b, c, clen); b[IDEM_RECORD_HEADER_LEN] = 0x80; /* status 2^31 + 200 */
    assert_corrupt(b, clen, false, "a status that is negative as an int");
    memcpy(b, s, slen); b[7] = 1;
    assert_corrupt(b, slen, false, "a non-zero reserved byte");
    memcpy(b, c, clen); b[7] = 0x80;
    assert_corrupt(b, clen, false, "a non-zero reserved byte in a COMPLETED record");
    memcpy(b, s, slen); b[6] |= 0x02;
    assert_corrupt(b, slen, false, "an unknown flag");
    memcpy(b, c, clen); b[IDEM_RECORD_DEADLINE_OFFSET + 7] = 1;
    assert_corrupt(b, clen, false, "a COMPLETED record with a lease deadline");

    idem_record_info info;
    cr_assert_eq(idem_record_peek(NULL, 64, &info), IDEM_ECORRUPT);
    cr_assert_eq(idem_record_peek(s, slen, NULL), IDEM_ECORRUPT);
    /* and the originals are fine */
    idem_record rec;
    cr_assert_eq(idem__record_decode(s, slen, &rec), IDEM_OK);
    cr_assert_eq(idem__record_decode(c, clen, &rec), IDEM_OK);
}

Test(core, foreign_value_under_the_key_is_ecorrupt_and_runs_nothing)
{
    start(0);
    fake_put("k", "{\"json\": true}", 14, 60000);
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_ECORRUPT);
    cr_assert_eq(j.calls, 0);
    cr_assert(strstr(idem_last_error(), "delete") != NULL && strstr(idem_last_error(), "key_prefix"),
              "the message does not say what to do: '%s'", idem_last_error());
    /* a record one bit off is as foreign */
    uint8_t rec[128];
    size_t len = valid_record(IDEM_STATE_COMPLETED, rec);
    rec[7] = 1;
    fake_put("k2", rec, len, 60000);
    req = req_str("k2");
    idem_claim *c = (idem_claim *)&c;
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_ECORRUPT);
    cr_assert_null(c);
    cr_assert_eq(fake_calls(FAKE_COMMIT) + fake_calls(FAKE_RELEASE), 0, "the foreign value was touched");
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* Bad arguments                                                            */
/* ======================================================================== */

#define ASSERT_EINVAL(call)                                                                  \
    do {                                                                                     \
        int rc_ = (call);                                                                    \
        cr_assert_eq(rc_, IDEM_EINVAL, "%s returned %d", #call, rc_);                        \
        cr_assert(idem_last_error()[0] != '\0', "%s left no message", #call);                \
    } while (0)

Test(core, null_arguments_are_einval_with_a_message_or_a_documented_no_op)
{
    start(0);
    idem_request req = req_str("k");
    idem_reply r = {0};
    job j = job_ok(200, "", 0);
    idem_claim *c = NULL;
    idem_store *s = NULL;
    idem_layer *l = NULL;

    ASSERT_EINVAL(idem_store_open(NULL, "sqlite:///tmp/x.db"));
    ASSERT_EINVAL(idem_store_open(&s, NULL));
    cr_assert_null(s);
    ASSERT_EINVAL(idem_store_open_backend(NULL, &fake_backend, "fake://"));
    ASSERT_EINVAL(idem_store_open_backend(&s, NULL, "fake://"));
    ASSERT_EINVAL(idem_store_open_backend(&s, &fake_backend, NULL));
    cr_assert_null(s);
    idem_store_close(NULL);
    cr_assert_null(idem_store_backend(NULL));
    cr_assert_str_eq(idem_store_backend(store), "fake");

    idem_options_init(NULL);
    ASSERT_EINVAL(idem_layer_new(NULL, store, NULL));
    ASSERT_EINVAL(idem_layer_new(&l, NULL, NULL));
    cr_assert_null(l);
    idem_layer_free(NULL);
    idem_reply_clear(NULL);

    ASSERT_EINVAL(idem_run(NULL, &req, handler, &j, &r));
    ASSERT_EINVAL(idem_run(layer, NULL, handler, &j, &r));
    ASSERT_EINVAL(idem_run(layer, &req, NULL, &j, &r));
    ASSERT_EINVAL(idem_run(layer, &req, handler, &j, NULL));
    idem_request bad = {.key = NULL, .key_len = 3};
    ASSERT_EINVAL(idem_run(layer, &bad, handler, &j, &r));
    bad = (idem_request){.key = NULL, .key_len = 0};
    ASSERT_EINVAL(idem_run(layer, &bad, handler, &j, &r));
    bad = (idem_request){.key = "k", .key_len = 1, .fingerprint = NULL, .fingerprint_len = 4};
    ASSERT_EINVAL(idem_run(layer, &bad, handler, &j, &r));
    cr_assert_eq(j.calls, 0);

    ASSERT_EINVAL(idem_begin(NULL, &req, &c, &r));
    ASSERT_EINVAL(idem_begin(layer, NULL, &c, &r));
    ASSERT_EINVAL(idem_begin(layer, &req, NULL, &r));
    ASSERT_EINVAL(idem_begin(layer, &req, &c, NULL));
    cr_assert_null(c);
    ASSERT_EINVAL(idem_commit(NULL, 200, "", 0));
    ASSERT_EINVAL(idem_abort(NULL));
    ASSERT_EINVAL(idem_extend(NULL, 1000));
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    ASSERT_EINVAL(idem_extend(c, 0));
    ASSERT_EINVAL(idem_commit(c, 200, NULL, 1));
    ASSERT_EINVAL(idem_commit(c, 99, "", 0));
    cr_assert_eq(idem_commit(c, 200, NULL, 0), IDEM_OK, "NULL body with length 0 is an empty body");
    cr_assert_eq(fake_calls(FAKE_CLAIM), 1, "a NULL argument reached the store");

    ASSERT_EINVAL(idem_response_set(NULL, 200, "", 0));

    idem_stats st;
    memset(&st, 0xff, sizeof st);
    idem_layer_stats(NULL, &st);
    cr_assert_eq(st.executed + st.replayed + st.in_progress + st.mismatched + st.failed + st.lost +
                     st.backend_errors, 0, "stats of a NULL layer are not zero");
    idem_layer_stats(layer, NULL);

    idem_url *u = (idem_url *)&u;
    ASSERT_EINVAL(idem_url_parse(NULL, "redis://h:1"));
    ASSERT_EINVAL(idem_url_parse(&u, NULL));
    cr_assert_null(u);
    idem_url_free(NULL);
    cr_assert_eq(idem_url_parse(&u, "redis://h:1?db=2"), IDEM_OK);
    cr_assert_null(idem_url_param_get(NULL, "db"));
    cr_assert_null(idem_url_param_get(u, NULL));
    uint64_t v = 7;
    ASSERT_EINVAL(idem_url_param_uint(u, "db", 0, 15, NULL));
    ASSERT_EINVAL(idem_url_param_uint(u, NULL, 0, 15, &v));
    ASSERT_EINVAL(idem_url_param_uint(NULL, "db", 0, 15, &v));
    cr_assert_eq(v, 7);
    idem_url_free(u);
}

Test(core, options_init_fills_the_documented_defaults)
{
    idem_options o;
    memset(&o, 0xa5, sizeof o);
    idem_options_init(&o);
    cr_assert_eq(o.lease_ms, 60000);
    cr_assert_eq(o.ttl_s, 86400);
    cr_assert_str_eq(o.key_prefix, "idem:");
    cr_assert_eq(o.max_key_len, 255);
    cr_assert_eq(o.max_response_len, 1u << 20);
}

Test(core, layer_new_refuses_zero_lease_zero_ttl_bad_max_key_len_and_a_long_prefix)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    idem_options o;
    char prefix[300];
    const struct {
        const char *field;
        int         which;
    } bad[] = {{"lease_ms", 0}, {"ttl_s", 1}, {"max_key_len", 2}, {"max_key_len", 3}, {"key_prefix", 4}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        idem_options_init(&o);
        switch (bad[i].which) {
        case 0: o.lease_ms = 0; break;
        case 1: o.ttl_s = 0; break;
        case 2: o.max_key_len = 0; break;
        case 3: o.max_key_len = 1025; break;
        case 4:
            memset(prefix, 'p', 256);
            prefix[256] = '\0';
            o.key_prefix = prefix;
            break;
        }
        idem_layer *l = (idem_layer *)&l;
        cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_EINVAL, "case %zu", i);
        cr_assert_null(l);
        cr_assert(strstr(idem_last_error(), bad[i].field) != NULL, "case %zu: '%s'", i,
                  idem_last_error());
    }
    /* the edges that are allowed */
    idem_layer *l;
    idem_options_init(&o);
    o.max_key_len = 1024;
    memset(prefix, 'p', 254);
    prefix[254] = ':';
    prefix[255] = '\0';
    o.key_prefix = prefix;
    cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(l);
    o.key_prefix = NULL; /* the default */
    o.max_key_len = 1;
    cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(l);
    cr_assert_eq(idem_layer_new(&l, store, NULL), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(l);
}

Test(core, layer_copies_its_options_and_prefix)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    fk = idem__store_state(store);
    char prefix[] = "idem:";
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK);
    prefix[0] = 'X';
    o.lease_ms = 1;
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_COMPLETED, "the layer kept the caller's prefix buffer");
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* Errors                                                                   */
/* ======================================================================== */

Test(core, strerror_and_error_name_cover_every_code_and_an_unknown_one)
{
    const struct {
        int         code;
        const char *name;
    } all[] = {
        {IDEM_OK, "IDEM_OK"},           {IDEM_EINVAL, "IDEM_EINVAL"},
        {IDEM_ENOMEM, "IDEM_ENOMEM"},   {IDEM_EBACKEND, "IDEM_EBACKEND"},
        {IDEM_ELOST, "IDEM_ELOST"},     {IDEM_ECORRUPT, "IDEM_ECORRUPT"},
        {IDEM_ETOOBIG, "IDEM_ETOOBIG"}, {IDEM_EUNSUPPORTED, "IDEM_EUNSUPPORTED"},
        {IDEM_EKEY, "IDEM_EKEY"},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        cr_assert_eq(all[i].code, -(int)i, "codes are 0, -1, -2, ... in order");
        cr_assert_str_eq(idem_error_name(all[i].code), all[i].name);
        const char *m = idem_strerror(all[i].code);
        cr_assert(m && m[0], "no message for %s", all[i].name);
        cr_assert_str_neq(m, "unknown error");
        for (size_t k = 0; k < i; k++)
            cr_assert_str_neq(m, idem_strerror(all[k].code), "two codes share a message");
    }
    const int unknown[] = {1, -(int)(sizeof all / sizeof all[0]), -100, INT_MIN, INT_MAX};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        cr_assert_str_eq(idem_strerror(unknown[i]), "unknown error");
        cr_assert_str_eq(idem_error_name(unknown[i]), "IDEM_UNKNOWN");
    }
}

Test(core, error_set_formats_messages_of_any_length_and_returns_the_code)
{
    cr_assert_eq(idem_error_set(IDEM_EBACKEND, "x %d %s", 42, "y"), IDEM_EBACKEND);
    cr_assert_str_eq(idem_last_error(), "x 42 y");
    char big[5000];
    memset(big, 'm', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    cr_assert_eq(idem_error_set(IDEM_EINVAL, "%s!", big), IDEM_EINVAL);
    cr_assert_eq(strlen(idem_last_error()), sizeof big, "a long message was truncated");
    cr_assert_eq(idem_last_error()[sizeof big - 1], '!');
    cr_assert_eq(idem_error_set(IDEM_EINVAL, "short"), IDEM_EINVAL);
    cr_assert_str_eq(idem_last_error(), "short");
}

typedef struct other_thread {
    char first[64];
    char mine[256];
} other_thread;

static void *fail_elsewhere(void *arg)
{
    other_thread *t = arg;
    snprintf(t->first, sizeof t->first, "%s", idem_last_error());
    idem_url *u;
    (void)idem_url_parse(&u, "no-scheme-here");
    snprintf(t->mine, sizeof t->mine, "%s", idem_last_error());
    return NULL;
}

Test(core, last_error_is_per_thread)
{
    cr_assert_eq(idem_layer_new(&layer, NULL, NULL), IDEM_EINVAL);
    char before[256];
    snprintf(before, sizeof before, "%s", idem_last_error());
    cr_assert(before[0] != '\0');
    other_thread t = {{0}, {0}};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, fail_elsewhere, &t), 0);
    pthread_join(th, NULL);
    cr_assert_str_eq(t.first, "", "a new thread starts with another thread's message");
    cr_assert(strstr(t.mine, "scheme") != NULL, "the other thread's message: '%s'", t.mine);
    cr_assert_str_eq(idem_last_error(), before, "another thread's failure changed this thread's message");
}

Test(core, success_clears_the_last_error)
{
    start(0);
    cr_assert_eq(idem_layer_new(NULL, NULL, NULL), IDEM_EINVAL);
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK);
    cr_assert_str_eq(idem_last_error(), "");
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* Counters                                                                 */
/* ======================================================================== */

Test(core, each_counter_moves_exactly_when_it_should)
{
    start(1000);
    idem_reply r = {0};
    idem_request a = {.key = "a", .key_len = 1, .fingerprint = "f1", .fingerprint_len = 2};
    job ok = job_ok(200, "ok", 2);
    job bad = job_ok(200, "", 0);
    bad.ret = 1;
    assert_stats(0, 0, 0, 0, 0, 0, 0);

    cr_assert_eq(idem_run(layer, &a, handler, &ok, &r), IDEM_OK);       /* executed */
    assert_stats(1, 0, 0, 0, 0, 0, 0);
    cr_assert_eq(idem_run(layer, &a, handler, &ok, &r), IDEM_OK);       /* replayed */
    assert_stats(1, 1, 0, 0, 0, 0, 0);
    idem_request a2 = a;
    a2.fingerprint = "f2";
    cr_assert_eq(idem_run(layer, &a2, handler, &ok, &r), IDEM_OK);      /* mismatched */
    assert_stats(1, 1, 0, 1, 0, 0, 0);

    idem_request b = req_str("b");
    cr_assert_eq(idem_run(layer, &b, handler, &bad, &r), IDEM_OK);      /* failed */
    assert_stats(1, 1, 0, 1, 1, 0, 0);

    idem_claim *c, *c2;
    cr_assert_eq(idem_begin(layer, &b, &c, &r), IDEM_OK);
    assert_stats(1, 1, 0, 1, 1, 0, 0);                                   /* a claim alone moves none */
    cr_assert_eq(idem_run(layer, &b, handler, &ok, &r), IDEM_OK);       /* in progress */
    assert_stats(1, 1, 1, 1, 1, 0, 0);
    fake_advance(1000);
    cr_assert_eq(idem_begin(layer, &b, &c2, &r), IDEM_OK);
    cr_assert_not_null(c2);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_ELOST);                /* lost */
    assert_stats(1, 1, 1, 1, 1, 1, 0);
    cr_assert_eq(idem_commit(c2, 200, "", 0), IDEM_OK);                  /* executed */
    assert_stats(2, 1, 1, 1, 1, 1, 0);

    fk->fail[FAKE_CLAIM] = 1;
    idem_request d = req_str("d");
    cr_assert_eq(idem_run(layer, &d, handler, &ok, &r), IDEM_EBACKEND); /* backend error */
    assert_stats(2, 1, 1, 1, 1, 1, 1);
    cr_assert_eq(idem_run(layer, &d, handler, &ok, &r), IDEM_OK);
    assert_stats(3, 1, 1, 1, 1, 1, 1);

    /* invalid input and foreign records move nothing */
    idem_request empty = {.key = "", .key_len = 0};
    cr_assert_eq(idem_run(layer, &empty, handler, &ok, &r), IDEM_EINVAL);
    fake_put("e", "junk", 4, 60000);
    idem_request e = req_str("e");
    cr_assert_eq(idem_run(layer, &e, handler, &ok, &r), IDEM_ECORRUPT);
    assert_stats(3, 1, 1, 1, 1, 1, 1);

    /* a layer starts at zero; another layer's counters are its own */
    idem_layer *l2;
    cr_assert_eq(idem_layer_new(&l2, store, NULL), IDEM_OK);
    idem_stats s2;
    idem_layer_stats(l2, &s2);
    cr_assert_eq(s2.executed + s2.replayed + s2.in_progress + s2.mismatched + s2.failed + s2.lost +
                     s2.backend_errors, 0);
    idem_layer_free(l2);
    idem_reply_clear(&r);
}

Test(core, error_set_may_quote_the_current_message)
{
    idem_error_set(IDEM_EBACKEND, "store %s: down", "x");
    cr_assert_eq(idem_error_set(IDEM_EBACKEND, "%s; %s", idem_last_error(), "the key frees itself"),
                 IDEM_EBACKEND);
    cr_assert_str_eq(idem_last_error(), "store x: down; the key frees itself");
}

Test(core, tokens_differ_between_a_parent_and_its_forked_child)
{
    uint8_t warm[16], parent[16], child[16];
    cr_assert_eq(idem__random_bytes(warm, sizeof warm), IDEM_OK); /* the buffer now holds more */
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        uint8_t mine[16] = {0};
        int rc = idem__random_bytes(mine, sizeof mine);
        _exit(rc == IDEM_OK && write(fds[1], mine, sizeof mine) == (ssize_t)sizeof mine ? 0 : 1);
    }
    int status;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    cr_assert_eq(read(fds[0], child, sizeof child), (ssize_t)sizeof child);
    cr_assert_eq(idem__random_bytes(parent, sizeof parent), IDEM_OK);
    cr_assert(memcmp(parent, child, sizeof parent) != 0, "the child reused the parent's random bytes");
    cr_assert(memcmp(warm, parent, sizeof parent) != 0);
    close(fds[0]);
    close(fds[1]);
}

Test(core, key_prefixes_that_could_spell_each_others_keys_are_refused)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    static const char *const bad[] = {"", ":", "t1", "a:b:", ":a", "t1:x"};
    idem_options o;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        idem_options_init(&o);
        o.key_prefix = bad[i];
        idem_layer *l = (idem_layer *)&l;
        cr_assert_eq(idem_layer_new(&l, store, &o), IDEM_EINVAL, "prefix '%s'", bad[i]);
        cr_assert_null(l);
        cr_assert(strstr(idem_last_error(), "key_prefix"), "%s", idem_last_error());
    }
    idem_options_init(&o);
    o.key_prefix = "shop-{eu}:";
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK, "%s", idem_last_error());
}

Test(core, record_decode_rejects_what_the_encoder_never_writes)
{
    idem_record rec = {.state = IDEM_STATE_COMPLETED, .status = 200, .body = (const uint8_t *)"b",
                       .body_len = 1};
    idem_record out;
    uint8_t *enc;
    size_t len;
    cr_assert_eq(idem__record_encode(&rec, &enc, &len), IDEM_OK);
    cr_assert_eq(idem__record_decode(enc, len, &out), IDEM_OK);
    enc[IDEM_RECORD_HEADER_LEN + 3] = 99; /* status 99 */
    cr_assert_eq(idem__record_decode(enc, len, &out), IDEM_ECORRUPT, "status below 100");
    enc[IDEM_RECORD_HEADER_LEN + 3] = 200;
    enc[40] = 1; /* a digest byte without the fingerprint flag */
    cr_assert_eq(idem__record_decode(enc, len, &out), IDEM_ECORRUPT, "digest without its flag");
    free(enc);

    idem_record started = {.state = IDEM_STATE_STARTED, .deadline_ms = 0};
    cr_assert_eq(idem__record_encode(&started, &enc, &len), IDEM_OK);
    cr_assert_eq(idem__record_decode(enc, len, &out), IDEM_ECORRUPT, "a lease with no deadline");
    free(enc);
}

Test(core, a_store_inherited_through_fork_is_refused_in_the_child)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    cr_assert_eq(idem_layer_new(&layer, store, NULL), IDEM_OK);
    int fds[2];
    cr_assert_eq(pipe(fds), 0);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        idem_request req = req_str("k");
        job j = job_ok(200, "", 0);
        idem_reply r = {0};
        int rc = idem_run(layer, &req, handler, &j, &r);
        int ok = rc == IDEM_EINVAL && strstr(idem_last_error(), "fork") != NULL && atomic_load(&j.calls) == 0;
        idem_layer_free(layer);
        idem_store_close(store); /* frees memory only */
        _exit(write(fds[1], &ok, sizeof ok) == (ssize_t)sizeof ok ? 0 : 1);
    }
    int ok = 0;
    cr_assert_eq(read(fds[0], &ok, sizeof ok), (ssize_t)sizeof ok);
    waitpid(pid, NULL, 0);
    cr_assert(ok, "the child used its parent's store");
    idem_request req = req_str("k");
    job j = job_ok(200, "", 0);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "the parent's store still works");
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    close(fds[0]);
    close(fds[1]);
}

/* Public structs keep their size across versions (new fields take reserved
 * space), so a program built against an older header still works. */
Test(core, public_structs_keep_their_size_and_offsets)
{
    /* The sizes and offsets of 0.2 (x86-64 and other LP64): a program built
     * against 0.2 allocates these structs and reads these fields. Fields of
     * later versions come out of reserved_. .ci/abi-check leaves the structs
     * with reserved space to this test (abi/libidempotency.abignore). */
#if UINTPTR_MAX == UINT64_MAX
    cr_assert_eq(sizeof(idem_options), 96);
    cr_assert_eq(offsetof(idem_options, lease_ms), 0);
    cr_assert_eq(offsetof(idem_options, ttl_s), 4);
    cr_assert_eq(offsetof(idem_options, key_prefix), 8);
    cr_assert_eq(offsetof(idem_options, max_key_len), 16);
    cr_assert_eq(offsetof(idem_options, max_response_len), 24);
    cr_assert_eq(offsetof(idem_options, cache_bytes), 32);
    cr_assert_eq(offsetof(idem_options, auto_extend), 40);
    cr_assert_eq(offsetof(idem_options, commit_timeout_ms), 44);
    cr_assert_eq(offsetof(idem_options, subkey_secret), 48);
    cr_assert_eq(offsetof(idem_options, reserved_), 56);
    cr_assert_eq(sizeof(idem_reply), 64);
    cr_assert_eq(offsetof(idem_reply, outcome), 0);
    cr_assert_eq(offsetof(idem_reply, status), 4);
    cr_assert_eq(offsetof(idem_reply, body), 8);
    cr_assert_eq(offsetof(idem_reply, body_len), 16);
    cr_assert_eq(offsetof(idem_reply, retry_after_ms), 24);
    cr_assert_eq(offsetof(idem_reply, handler_error), 28);
    cr_assert_eq(offsetof(idem_reply, abort_error), 32);
    cr_assert_eq(offsetof(idem_reply, headers), 40);
    cr_assert_eq(offsetof(idem_reply, nheaders), 48);
    cr_assert_eq(offsetof(idem_reply, reserved_), 56);
    cr_assert_eq(sizeof(idem_stats), 128);
    cr_assert_eq(offsetof(idem_stats, backend_errors), 48);
    cr_assert_eq(offsetof(idem_stats, unstored), 56);
    cr_assert_eq(offsetof(idem_stats, cache_hits), 80);
    cr_assert_eq(offsetof(idem_stats, reserved_), 88);
    cr_assert_eq(sizeof(idem_request), 32);
    cr_assert_eq(offsetof(idem_request, key_len), 8);
    cr_assert_eq(offsetof(idem_request, fingerprint), 16);
    cr_assert_eq(offsetof(idem_request, fingerprint_len), 24);
    cr_assert_eq(sizeof(idem_header), 16);
#else
    cr_assert_eq(sizeof(idem_stats), 128);
#endif
}

Test(core, version_is_meson_s_and_matches_the_header_s_macros)
{
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", IDEM_VERSION_MAJOR, IDEM_VERSION_MINOR, IDEM_VERSION_PATCH);
    cr_assert_str_eq(idem_version(), want, "meson.build's version and the header's macros differ");
}

Test(core, outcome_names_come_from_the_table_and_unknown_values_are_named_so)
{
    cr_assert_str_eq(idem_outcome_name(IDEM_EXECUTED), "EXECUTED");
    cr_assert_str_eq(idem_outcome_name(IDEM_REPLAYED), "REPLAYED");
    cr_assert_str_eq(idem_outcome_name(IDEM_IN_PROGRESS), "IN_PROGRESS");
    cr_assert_str_eq(idem_outcome_name(IDEM_MISMATCH), "MISMATCH");
    cr_assert_str_eq(idem_outcome_name(IDEM_FAILED), "FAILED");
    cr_assert_str_eq(idem_outcome_name(0), "NONE");
    cr_assert_str_eq(idem_outcome_name(6), "UNKNOWN");
    cr_assert_str_eq(idem_outcome_name(-1), "UNKNOWN");
    /* the values 0.2 programs were built with */
    cr_assert_eq(IDEM_EXECUTED, 1);
    cr_assert_eq(IDEM_FAILED, 5);
}

Test(core, reply_ran_is_true_for_a_handler_that_ran_even_when_the_commit_failed)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    fk = idem__store_state(store);
    idem_options o;
    idem_options_init(&o);
    o.commit_timeout_ms = 50;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK);
    idem_request req = req_str("ran");
    idem_reply r = {0};
    cr_assert_not(idem_reply_ran(&r), "a zeroed reply says nothing ran");
    cr_assert_not(idem_reply_ran(NULL));

    fk->fail[FAKE_CLAIM] = 1; /* the store fails before the handler: nothing ran */
    job j = job_ok(201, "made", 4);
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    cr_assert_not(idem_reply_ran(&r), "IDEM_EBACKEND before the handler said it ran");
    cr_assert_eq(j.calls, 0);

    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS; /* the handler runs, its response cannot be stored */
    idem_request stuck = req_str("ran-1");
    cr_assert_eq(idem_run(layer, &stuck, handler, &j, &r), IDEM_EBACKEND);
    cr_assert_eq(j.calls, 1);
    cr_assert(idem_reply_ran(&r), "the handler ran but the reply does not say so");
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(r.status, 201);
    fk->fail[FAKE_COMMIT] = 0;
    idem_reply_clear(&r);

    idem_request other = req_str("ran-2");
    cr_assert_eq(idem_run(layer, &other, handler, &j, &r), IDEM_OK);
    cr_assert(idem_reply_ran(&r), "EXECUTED");
    cr_assert_eq(idem_run(layer, &other, handler, &j, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_not(idem_reply_ran(&r), "a replay did not run the handler");
    idem_reply_clear(&r);
}

static int refuse_then_fail(void *arg, idem_response *resp)
{
    (void)arg;
    idem_response_set(resp, 503, "processor down", 14);
    int rc = idem_response_set(resp, 200, NULL, 5); /* refused: its message must survive */
    return rc == IDEM_EINVAL ? 9 : 0;
}

Test(core, failed_reply_carries_the_handlers_response_and_message_but_stores_nothing)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    fk = idem__store_state(store);
    cr_assert_eq(idem_layer_new(&layer, store, NULL), IDEM_OK);
    idem_request req = req_str("k");
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, refuse_then_fail, NULL, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_FAILED);
    cr_assert_eq(r.handler_error, 9);
    cr_assert_eq(r.status, 503);
    cr_assert_eq(r.body_len, 14);
    cr_assert_str_eq((char *)r.body, "processor down");
    cr_assert(strstr(idem_last_error(), "NULL"), "the handler's message was lost: '%s'", idem_last_error());
    cr_assert_eq(fake_key_state("k"), 0, "a failed handler leaves no record");
    idem_reply_clear(&r);
}

Test(core, scopes_keep_the_same_key_apart_and_do_not_count_against_max_key_len)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    idem_options o;
    idem_options_init(&o);
    o.max_key_len = 4;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK);
    idem_request req = {.key = "k123", .key_len = 4};
    idem_reply r = {0};
    job a = job_ok(201, "a", 1), b = job_ok(201, "b", 1), c = job_ok(201, "c", 1);
    cr_assert_eq(idem_run_scoped(layer, "acct_1", 6, &req, handler, &a, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run_scoped(layer, "acct_2", 6, &req, handler, &b, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "another scope met the first one's record");
    cr_assert_eq(idem_run(layer, &req, handler, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "a key without scope met a scoped record");
    cr_assert_eq(idem_run_scoped(layer, "acct_1", 6, &req, handler, &c, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.body[0], 'a');
    idem_reply_clear(&r);
    char big[256];
    memset(big, 's', sizeof big);
    cr_assert_eq(idem_run_scoped(layer, big, 255, &req, handler, &c, &r), IDEM_OK, "255-byte scope");
    cr_assert_eq(idem_run_scoped(layer, big, 256, &req, handler, &c, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run_scoped(layer, "", 0, &req, handler, &c, &r), IDEM_EINVAL);
    cr_assert_eq(idem_run_scoped(layer, NULL, 3, &req, handler, &c, &r), IDEM_EINVAL);
    idem_reply_clear(&r);
}

/* ======================================================================== */
/* Leases that fit the handler: renewal, commit deadline, retry hints       */
/* ======================================================================== */

static void start_with(const idem_options *o)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK, "%s", idem_last_error());
    fk = idem__store_state(store);
    cr_assert_eq(idem_layer_new(&layer, store, o), IDEM_OK, "%s", idem_last_error());
}

Test(core, commit_timeout_ms_bounds_the_commit_retries_and_keeps_the_key_claimed)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 20000;
    o.commit_timeout_ms = 300;
    start_with(&o);
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    idem_request req = req_str("k");
    job j = job_ok(201, "made", 4);
    idem_reply r = {0};
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    uint64_t took = mono_ms() - t0;
    cr_assert(took < 5000, "commit retries took %llu ms with commit_timeout_ms 300 (lease 20 s)",
              (unsigned long long)took);
    cr_assert(fake_calls(FAKE_COMMIT) >= 2, "the commit was retried");
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply holds the handler's response");
    cr_assert_str_eq((const char *)r.body, "made");
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "the key stays claimed");
    cr_assert_eq(fake_calls(FAKE_RELEASE), 0);
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_eq(st.unstored, 1, "a handler that ran but was not stored is counted");
    cr_assert_eq(st.executed, 0);
    idem_reply_clear(&r);
}

Test(core, step_commit_honours_commit_timeout_ms_and_keeps_the_claim)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 20000;
    o.commit_timeout_ms = 200;
    start_with(&o);
    idem_request req = req_str("k");
    idem_claim *c;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &r), IDEM_OK);
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_commit(c, 200, "x", 1), IDEM_EBACKEND);
    cr_assert(mono_ms() - t0 < 5000);
    fake_set(&fk->fail[FAKE_COMMIT], 0);
    cr_assert_eq(idem_commit(c, 200, "x", 1), IDEM_OK, "%s", idem_last_error());
    assert_replays("k", 200, "x", 1);
}

/* A driver out of memory after the handler ran is a transient failure, as a
 * store error is: the commit is retried, and the work is stored once. */
Test(core, commit_out_of_memory_after_the_handler_is_retried_like_a_store_error)
{
    start(20000);
    fk->fail_rc[FAKE_COMMIT] = IDEM_ENOMEM;
    fk->fail[FAKE_COMMIT] = 2;
    idem_request req = req_str("k");
    job j = job_ok(201, "made", 4);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(fake_calls(FAKE_COMMIT), 3, "two failed commits, then one that landed");
    cr_assert_eq(j.calls, 1);
    idem_reply_clear(&r);
    assert_replays("k", 201, "made", 4);
}

Test(core, commit_out_of_memory_for_good_ends_at_commit_timeout_ms_with_the_key_claimed)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 20000;
    o.commit_timeout_ms = 300;
    start_with(&o);
    fk->fail_rc[FAKE_COMMIT] = IDEM_ENOMEM;
    fk->fail[FAKE_COMMIT] = FAKE_ALWAYS;
    idem_request req = req_str("k");
    job j = job_ok(201, "made", 4);
    idem_reply r = {0};
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_ENOMEM);
    uint64_t took = mono_ms() - t0;
    cr_assert(took < 1000, "took %llu ms with commit_timeout_ms 300",
              (unsigned long long)took);
    cr_assert(fake_calls(FAKE_COMMIT) >= 2, "the commit was retried");
    cr_assert(strstr(idem_last_error(), "the handler ran"), "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_str_eq((const char *)r.body, "made");
    cr_assert_eq(fake_key_state("k"), IDEM_STATE_STARTED, "the key stays claimed");
    cr_assert_eq(fake_calls(FAKE_RELEASE), 0);
    idem_reply_clear(&r);
}

/* The core gives each commit attempt the time left as the calling thread's
 * deadline, which drivers read; every other call, and the thread after the
 * commit, have none. */
Test(core, commit_attempts_get_the_time_left_as_their_deadline)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 20000;
    o.commit_timeout_ms = 300;
    start_with(&o);
    fk->fail[FAKE_COMMIT] = 2;
    idem_request req = req_str("k");
    job j = job_ok(201, "made", 4);
    idem_reply r = {0};
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(fake_calls(FAKE_COMMIT), 3);
    uint64_t d = fk->deadline[FAKE_COMMIT];
    cr_assert(d >= t0 + 300 && d <= (uint64_t)mono_ms() + 300, "the commit's deadline is %lld ms from the start",
              (long long)(d - t0));
    cr_assert_eq(fk->deadline[FAKE_CLAIM], 0, "a claim has no deadline of the core's");
    cr_assert_eq(idem_call_deadline_ms(), 0, "the deadline ends with the call");
    idem_reply_clear(&r);

    /* Without commit_timeout_ms: the lease, less the slack a driver may
     * overrun it by. */
    stop();
    o.commit_timeout_ms = 0;
    o.lease_ms = 3000;
    start_with(&o);
    t0 = mono_ms();
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    d = fk->deadline[FAKE_COMMIT];
    cr_assert(d > t0 + 2000 && d < t0 + 3000, "the commit's deadline is %lld ms from the claim",
              (long long)(d - t0));
    idem_reply_clear(&r);
}

Test(core, call_timeout_is_the_drivers_own_or_the_time_left_whichever_is_sooner)
{
    cr_assert_eq(idem_call_timeout_ms(2000), 2000, "no deadline: the driver's own");
    cr_assert_eq(idem_call_timeout_ms(0), 0);
    uint64_t outer = idem__call_deadline_set(mono_ms() + 500);
    cr_assert_eq(outer, 0);
    uint32_t t = idem_call_timeout_ms(2000);
    cr_assert(t > 400 && t <= 500, "%u", t);
    cr_assert_eq(idem_call_timeout_ms(100), 100);
    idem__call_deadline_set(mono_ms() - 10);
    cr_assert_eq(idem_call_timeout_ms(2000), 1, "a deadline passed leaves 1 ms, never 0 (\"for ever\")");
    idem__call_deadline_set(outer);
    cr_assert_eq(idem_call_deadline_ms(), 0);
}

typedef struct slow {
    atomic_int calls;
    unsigned   sleep_ms;
    uint32_t   left_at_end;
    int        extend_rc;
    bool       extend;        /* call idem_response_extend(resp, 0) first */
    bool       wait_for_loss; /* run until the lease is seen lost (at most 10 s) */
} slow;

static int slow_handler(void *arg, idem_response *resp)
{
    slow *s = arg;
    atomic_fetch_add(&s->calls, 1);
    if (s->extend)
        s->extend_rc = idem_response_extend(resp, 0);
    if (s->wait_for_loss) {
        for (int i = 0; i < 1000 && idem_response_lease_left_ms(resp) > 0; i++)
            sleep_ms(10);
    } else {
        sleep_ms(s->sleep_ms);
    }
    s->left_at_end = idem_response_lease_left_ms(resp);
    return idem_response_set(resp, 200, "slow", 4) == IDEM_OK ? 0 : 1;
}

Test(core, auto_extend_renews_a_slow_handlers_lease_so_a_duplicate_never_takes_it)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 1500; /* renewed every 500 ms: a loaded machine may stall the keeper for a while */
    o.auto_extend = true;
    start_with(&o);
    idem_request req = req_str("k");
    slow s = {.sleep_ms = 4500}; /* three leases */
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, slow_handler, &s, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert(s.left_at_end > 0, "the renewed lease was still running when the handler ended");
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_geq(st.extended, 3, "renewed %llu times in three leases", (unsigned long long)st.extended);
    cr_assert_eq(st.lost, 0);
    cr_assert_geq(fake_calls(FAKE_EXTEND), 3);
    assert_replays("k", 200, "slow", 4);
    idem_reply_clear(&r);
}

Test(core, without_auto_extend_a_slow_handler_loses_its_lease)
{
    start(300);
    idem_request req = req_str("k");
    slow s = {.sleep_ms = 700};
    idem_reply r = {0};
    fake_advance(0);
    /* the fake's clock runs with the wall clock: the 300 ms lease ends in the handler */
    int rc = idem_run(layer, &req, slow_handler, &s, &r);
    cr_assert_eq(s.left_at_end, 0, "the handler's own view of its lease says it ended");
    cr_assert_eq(rc, IDEM_ELOST, "the commit after the lease ended: %s (%s)", idem_error_name(rc),
                 idem_last_error());
    cr_assert_eq(fake_calls(FAKE_EXTEND), 0);
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_eq(st.lost, 1, "claims lost: %llu", (unsigned long long)st.lost);
    idem_reply_clear(&r);
}

static uint8_t takeover_rec[IDEM_RECORD_HEADER_LEN];

/* Another holder's record replaces ours 50 ms from now. */
static void *take_over_soon(void *arg)
{
    (void)arg;
    sleep_ms(50);
    fake_put("k", takeover_rec, sizeof takeover_rec, 60000);
    return NULL;
}

Test(core, a_renewal_that_finds_the_key_taken_over_stops_and_the_handler_sees_it)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 300;
    o.auto_extend = true;
    start_with(&o);
    idem_record other = {.state = IDEM_STATE_STARTED, .deadline_ms = idem_now_ms() + 60000};
    memset(other.token, 0xab, IDEM_TOKEN_LEN);
    idem__record_write(&other, takeover_rec);
    idem_request req = req_str("k");
    slow s = {.wait_for_loss = true};
    idem_reply r = {0};
    pthread_t th;
    cr_assert_eq(pthread_create(&th, NULL, take_over_soon, NULL), 0);
    int rc = idem_run(layer, &req, slow_handler, &s, &r);
    pthread_join(th, NULL);
    cr_assert_eq(s.left_at_end, 0, "the handler did not see its key taken over");
    cr_assert_eq(rc, IDEM_ELOST, "got %s", idem_error_name(rc));
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the reply still holds the response");
    size_t len;
    uint8_t *now = fake_get("k", &len);
    cr_assert_not_null(now);
    cr_assert_arr_eq(now, takeover_rec, sizeof takeover_rec, "the new holder's record is unchanged");
    free(now);
    unsigned extends = fake_calls(FAKE_EXTEND);
    sleep_ms(400);
    cr_assert_eq(fake_calls(FAKE_EXTEND), extends, "renewals went on after the takeover");
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_eq(st.unstored, 1);
    idem_reply_clear(&r);
}

Test(core, a_handler_renews_its_own_lease_through_its_response)
{
    start(2000);
    idem_request req = req_str("k");
    slow s = {.extend = true, .sleep_ms = 0};
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, slow_handler, &s, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(s.extend_rc, IDEM_OK);
    cr_assert(s.left_at_end > 1000 && s.left_at_end <= 2000, "lease left %u", s.left_at_end);
    idem_stats st;
    idem_layer_stats(layer, &st);
    cr_assert_eq(st.extended, 1);
    cr_assert_eq(fake_calls(FAKE_EXTEND), 1);
    cr_assert_eq(idem_response_extend(NULL, 10), IDEM_EINVAL);
    cr_assert_eq(idem_response_lease_left_ms(NULL), 0);
    idem_reply_clear(&r);
}

static int quick_handler(void *arg, idem_response *resp)
{
    sleep_ms(*(unsigned *)arg);
    return idem_response_set(resp, 200, "q", 1) == IDEM_OK ? 0 : 1;
}

Test(core, retry_after_is_estimated_from_recent_handler_durations_within_the_lease)
{
    start(60000);
    idem_reply r = {0};
    idem_claim *c;
    idem_request held = req_str("held");
    cr_assert_eq(idem_begin(layer, &held, &c, &r), IDEM_OK);
    job dup = job_ok(200, "", 0);
    /* no history yet: the time left on the lease */
    cr_assert_eq(idem_run(layer, &held, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms > 50000, "retry_after_ms %u without history", r.retry_after_ms);
    unsigned ms = 30;
    for (int i = 0; i < 8; i++) {
        char key[16];
        snprintf(key, sizeof key, "q%d", i);
        idem_request q = req_str(key);
        cr_assert_eq(idem_run(layer, &q, quick_handler, &ms, &r), IDEM_OK);
        cr_assert_eq(r.outcome, IDEM_EXECUTED);
    }
    cr_assert_eq(idem_run(layer, &held, handler, &dup, &r), IDEM_OK);
    cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
    cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms < 5000,
              "30 ms handlers, yet retry_after_ms is %u", r.retry_after_ms);
    cr_assert_eq(dup.calls, 0);
    cr_assert_eq(idem_abort(c), IDEM_OK);

    /* never more than the holder's lease left, never 0 */
    idem_record old = {.state = IDEM_STATE_STARTED, .deadline_ms = idem_now_ms() + 5};
    memset(old.token, 7, IDEM_TOKEN_LEN);
    uint8_t enc[IDEM_RECORD_HEADER_LEN];
    idem__record_write(&old, enc);
    fake_put("ending", enc, sizeof enc, 3);
    idem_request ending = req_str("ending");
    cr_assert_eq(idem_run(layer, &ending, handler, &dup, &r), IDEM_OK);
    if (r.outcome == IDEM_IN_PROGRESS)
        cr_assert(r.retry_after_ms >= 1 && r.retry_after_ms <= 3, "retry_after_ms %u", r.retry_after_ms);
    idem_reply_clear(&r);
}

Test(core, the_retry_estimate_is_kept_until_another_handler_finishes)
{
    idem_durations d = {0};
    uint32_t p95 = 0;
    for (int i = 0; i < IDEM_DURATIONS_MIN - 1; i++)
        idem__durations_add(&d, 10);
    cr_assert_not(idem__durations_p95(&d, &p95), "an estimate from too few handlers");
    idem__durations_add(&d, 10);
    cr_assert(idem__durations_p95(&d, &p95) && p95 == 10, "p95 %u", p95);
    atomic_store(&d.ms[0], 1000); /* behind its back: a figure kept is not sorted again */
    cr_assert(idem__durations_p95(&d, &p95) && p95 == 10, "p95 %u, asked again", p95);
    idem__durations_add(&d, 20);
    cr_assert(idem__durations_p95(&d, &p95) && p95 == 1000, "p95 %u after another handler", p95);
    for (int i = 0; i < IDEM_DURATIONS; i++)
        idem__durations_add(&d, 5);
    cr_assert(idem__durations_p95(&d, &p95) && p95 == 5, "p95 %u after the slow ones left", p95);
}

Test(core, layer_free_with_keys_still_to_free_neither_hangs_nor_leaks)
{
    start(60000);
    fk->lose_reply[FAKE_CLAIM] = FAKE_ALWAYS;
    fk->fail[FAKE_RELEASE] = FAKE_ALWAYS;
    idem_reply r = {0};
    job j = job_ok(200, "", 0);
    for (int i = 0; i < 20; i++) {
        char key[16];
        snprintf(key, sizeof key, "k%d", i);
        idem_request req = req_str(key);
        cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_EBACKEND);
    }
    cr_assert_eq(j.calls, 0);
    uint64_t t0 = mono_ms();
    idem_layer_free(layer);
    layer = NULL;
    cr_assert(mono_ms() - t0 < 2000, "idem_layer_free waited for the store");
}

Test(core, a_layer_with_a_running_renewal_thread_is_freed_in_a_forked_child_without_hanging)
{
    idem_options o;
    idem_options_init(&o);
    o.auto_extend = true; /* the layer's thread runs from idem_layer_new() */
    start_with(&o);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        alarm(10); /* a hang ends as a failure, not a stuck test */
        idem_layer_free(layer);
        _exit(0);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child did not free the layer cleanly (%#x)", st);
    /* the parent's layer still works, thread and all */
    idem_request req = req_str("k");
    job j = job_ok(200, "ok", 2);
    idem_reply r = {0};
    cr_assert_eq(idem_run(layer, &req, handler, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
}

Test(core, a_scoped_store_key_carries_128_bits_of_the_scope_digest)
{
    cr_assert_eq(idem_store_open_backend(&store, &fake_backend, "fake://"), IDEM_OK);
    cr_assert_eq(idem_layer_new(&layer, store, NULL), IDEM_OK);
    uint8_t key[IDEM_MAX_STORE_KEY_LEN];
    size_t len = 0;
    cr_assert_eq(idem__store_key(layer, "acct_1", 6, "k", 1, key, &len), IDEM_OK);
    /* "idem" '#' 32 hex digits ':' "k" */
    cr_assert_eq(len, 4 + 1 + 32 + 1 + 1, "store key is %zu bytes", len);
    cr_assert_eq(key[4], '#');
    cr_assert_eq(key[37], ':');
    for (int i = 5; i < 37; i++)
        cr_assert(strchr("0123456789abcdef", key[i]) != NULL, "byte %d is not a hex digit", i);
}
