/*
 * Conformance, exactly once for the work itself (docs/contract.md, "Exactly
 * once"; include/idempotency/idempotency.h, section "Exactly once"):
 *
 *   - on every store: a checkpoint outlives its holder (an abort, a lease
 *     that ended) and the next holder starts from it; it is fenced by the
 *     token; a running holder with a checkpoint still answers 409; names and
 *     sizes are checked; subkeys are the same for every holder and differ
 *     per key, step, prefix and scope; a handler of idem_run() does the same
 *     through its response;
 *   - on PostgreSQL and SQLite: idem_run_tx() and idem_commit_tx() commit
 *     the work with its response, roll it back on a failure or a takeover,
 *     answer a duplicate at once while the work runs, and commit a step with
 *     its checkpoint (idem_checkpoint_tx()); every other store answers
 *     IDEM_EUNSUPPORTED and runs nothing.
 *
 * The work is a row in a table of charges in the store's own database,
 * counted after each test: the ledger the promise is about.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
#include <libpq-fe.h>
#endif

#include "support/testutil.h"

/* ---- fixtures ---- */

static const char *url;
static const char *db_url; /* the database of the ledger: url, or a private SQLite file */
static char prefix[64];
static idem_store *store;
static idem_layer *layer;

static bool is(const char *backend) { return strcmp(idem_store_backend(store), backend) == 0; }
static bool has_tx(void) { return is("sqlite") || is("postgresql"); }

static idem_options options(uint32_t lease_ms)
{
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = lease_ms;
    return o;
}

static idem_layer *open_layer(const idem_options *o)
{
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, store, o), IDEM_OK, "idem_layer_new: %s", idem_last_error());
    return l;
}

static void setup(void)
{
    db_url = url = getenv("IDEM_TEST_URL");
    cr_assert(url, "IDEM_TEST_URL is not set; run this through meson test");
    cr_assert_eq(idem_store_open(&store, url), IDEM_OK, "idem_store_open(%s): %s", url, idem_last_error());
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "O%ld-%08x:", (long)getpid(), r);
    idem_options o = options(10000);
    layer = open_layer(&o);
}

static void teardown(void)
{
    idem_layer_free(layer);
    idem_store_close(store);
}

TestSuite(once, .init = setup, .fini = teardown, .timeout = 60);

static idem_claim *begin_won(idem_layer *l, const char *key)
{
    idem_request req = req_str(key);
    idem_claim *c = NULL;
    idem_reply reply = {0};
    int rc = idem_begin(l, &req, &c, &reply);
    cr_assert_eq(rc, IDEM_OK, "idem_begin: %s", idem_last_error());
    cr_assert_not_null(c, "the claim of %s was not won (outcome %d)", key, reply.outcome);
    return c;
}

static idem_outcome begin_lost(idem_layer *l, const char *key)
{
    idem_request req = req_str(key);
    idem_claim *c = NULL;
    idem_reply reply = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &reply), IDEM_OK, "idem_begin: %s", idem_last_error());
    cr_assert_null(c, "the claim of %s was won, but another holds it", key);
    idem_outcome o = reply.outcome;
    idem_reply_clear(&reply);
    return o;
}

static void expect_checkpoint(const idem_claim *c, const char *name, const char *data)
{
    const char *n;
    const void *d;
    size_t len;
    cr_assert_eq(idem_claim_checkpoint(c, &n, &d, &len), IDEM_OK);
    cr_assert_str_eq(n, name);
    cr_assert_eq(len, strlen(data));
    if (len)
        cr_assert_arr_eq(d, data, len);
}

/* ---- checkpoints, on every store ---- */

Test(once, a_new_claim_has_no_checkpoint)
{
    idem_claim *c = begin_won(layer, "fresh");
    expect_checkpoint(c, "", "");
    cr_assert_eq(idem_abort(c), IDEM_OK);
}

Test(once, a_checkpoint_outlives_an_abort_and_the_next_holder_resumes_from_it)
{
    idem_claim *c = begin_won(layer, "k1");
    cr_assert_eq(idem_checkpoint(c, "charged", "ch_1", 4), IDEM_OK, "%s", idem_last_error());
    expect_checkpoint(c, "charged", "ch_1");
    cr_assert_eq(idem_checkpoint(c, "receipt", "r-9", 3), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_abort(c), IDEM_OK, "%s", idem_last_error());

    c = begin_won(layer, "k1");
    expect_checkpoint(c, "receipt", "r-9");
    cr_assert_eq(idem_commit(c, 201, "done", 4), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(begin_lost(layer, "k1"), IDEM_REPLAYED);
}

Test(once, a_running_holder_with_a_checkpoint_still_answers_409)
{
    idem_claim *c = begin_won(layer, "k2");
    cr_assert_eq(idem_checkpoint(c, "step1", "", 0), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(begin_lost(layer, "k2"), IDEM_IN_PROGRESS);
    cr_assert_eq(idem_commit(c, 200, "ok", 2), IDEM_OK, "%s", idem_last_error());
}

Test(once, a_checkpoint_outlives_a_holder_whose_lease_ended_and_fences_it_out)
{
    idem_options o = options(1000);
    idem_layer *l = open_layer(&o);
    idem_claim *old = begin_won(l, "k3");
    cr_assert_eq(idem_checkpoint(old, "called-processor", "sub-1", 5), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(begin_lost(l, "k3"), IDEM_IN_PROGRESS);
    sleep_ms(1500);
    idem_claim *c = begin_won(l, "k3");
    expect_checkpoint(c, "called-processor", "sub-1");
    cr_assert_eq(idem_checkpoint(old, "late", "x", 1), IDEM_ELOST, "a holder that was taken over saved a "
                 "checkpoint");
    cr_assert_eq(idem_commit(old, 200, "late", 4), IDEM_ELOST);
    expect_checkpoint(c, "called-processor", "sub-1");
    cr_assert_eq(idem_commit(c, 200, "resumed", 7), IDEM_OK, "%s", idem_last_error());
    idem_reply reply = {0};
    idem_request req = req_str("k3");
    idem_claim *none;
    cr_assert_eq(idem_begin(l, &req, &none, &reply), IDEM_OK);
    cr_assert_eq(reply.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)reply.body, "resumed");
    idem_reply_clear(&reply);
    idem_layer_free(l);
}

Test(once, a_different_request_never_takes_a_checkpointed_key_over)
{
    idem_request a = {.key = "k4", .key_len = 2, .fingerprint = "A", .fingerprint_len = 1};
    idem_request b = {.key = "k4", .key_len = 2, .fingerprint = "B", .fingerprint_len = 1};
    idem_claim *c;
    idem_reply reply = {0};
    cr_assert_eq(idem_begin(layer, &a, &c, &reply), IDEM_OK);
    cr_assert_not_null(c);
    cr_assert_eq(idem_checkpoint(c, "s", "1", 1), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_abort(c), IDEM_OK);
    idem_claim *other;
    cr_assert_eq(idem_begin(layer, &b, &other, &reply), IDEM_OK);
    cr_assert_null(other);
    cr_assert_eq(reply.outcome, IDEM_MISMATCH);
    cr_assert_eq(idem_begin(layer, &a, &c, &reply), IDEM_OK);
    cr_assert_not_null(c);
    expect_checkpoint(c, "s", "1");
    cr_assert_eq(idem_abort(c), IDEM_OK);
}

Test(once, checkpoint_names_and_sizes_are_checked_with_a_message)
{
    idem_claim *c = begin_won(layer, "k5");
    static char big[IDEM_CHECKPOINT_MAX + 1];
    char name[IDEM_CHECKPOINT_NAME_MAX + 2];
    memset(name, 'n', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    cr_assert_eq(idem_checkpoint(c, "", "x", 1), IDEM_EINVAL);
    cr_assert_eq(idem_checkpoint(c, name, "x", 1), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "255"), "%s", idem_last_error());
    cr_assert_eq(idem_checkpoint(c, NULL, "x", 1), IDEM_EINVAL);
    cr_assert_eq(idem_checkpoint(c, "s", NULL, 3), IDEM_EINVAL);
    cr_assert_eq(idem_checkpoint(c, "s", big, sizeof big), IDEM_ETOOBIG);
    cr_assert(strstr(idem_last_error(), "65536"), "%s", idem_last_error());
    name[IDEM_CHECKPOINT_NAME_MAX] = '\0';
    cr_assert_eq(idem_checkpoint(c, name, big, IDEM_CHECKPOINT_MAX), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_abort(c), IDEM_OK);
    c = begin_won(layer, "k5");
    const char *n;
    const void *d;
    size_t len;
    cr_assert_eq(idem_claim_checkpoint(c, &n, &d, &len), IDEM_OK);
    cr_assert_eq(strlen(n), IDEM_CHECKPOINT_NAME_MAX);
    cr_assert_eq(len, IDEM_CHECKPOINT_MAX);
    cr_assert_eq(idem_claim_checkpoint(c, NULL, &d, &len), IDEM_EINVAL);
    cr_assert_eq(idem_abort(c), IDEM_OK);
}

Test(once, a_subkey_is_the_same_for_every_holder_and_differs_per_key_step_prefix_and_scope)
{
    char a[IDEM_SUBKEY_SIZE], b[IDEM_SUBKEY_SIZE], other[IDEM_SUBKEY_SIZE];
    idem_claim *c = begin_won(layer, "order-1234");
    cr_assert_eq(idem_claim_subkey(c, "charge", a, sizeof a), IDEM_OK);
    cr_assert_eq(strlen(a), IDEM_SUBKEY_SIZE - 1);
    cr_assert_eq(strspn(a, "0123456789abcdef"), IDEM_SUBKEY_SIZE - 1);
    /* hex of "order-1234": a subkey that carried the key would carry this;
     * a digest holds it by chance once in 16^20 */
    cr_assert_null(strstr(a, "6f726465722d31323334"), "the subkey %s shows the key", a);
    cr_assert_eq(idem_claim_subkey(c, "refund", other, sizeof other), IDEM_OK);
    cr_assert_str_neq(a, other);
    cr_assert_eq(idem_claim_subkey(c, "charge", other, IDEM_SUBKEY_SIZE - 1), IDEM_EINVAL);
    cr_assert_eq(idem_claim_subkey(c, "", other, sizeof other), IDEM_EINVAL);
    cr_assert_eq(idem_abort(c), IDEM_OK);

    c = begin_won(layer, "order-1234"); /* the next holder */
    cr_assert_eq(idem_claim_subkey(c, "charge", b, sizeof b), IDEM_OK);
    cr_assert_str_eq(a, b);
    cr_assert_eq(idem_abort(c), IDEM_OK);

    c = begin_won(layer, "order-1235");
    cr_assert_eq(idem_claim_subkey(c, "charge", other, sizeof other), IDEM_OK);
    cr_assert_str_neq(a, other);
    cr_assert_eq(idem_abort(c), IDEM_OK);

    idem_request req = req_str("order-1234");
    idem_reply reply = {0};
    cr_assert_eq(idem_begin_scoped(layer, "tenant", 6, &req, &c, &reply), IDEM_OK);
    cr_assert_not_null(c);
    cr_assert_eq(idem_claim_subkey(c, "charge", other, sizeof other), IDEM_OK);
    cr_assert_str_neq(a, other);
    cr_assert_eq(idem_abort(c), IDEM_OK);

    idem_options o = options(10000);
    char p2[70];
    snprintf(p2, sizeof p2, "x%s", prefix);
    o.key_prefix = p2;
    idem_layer *l2 = open_layer(&o);
    c = begin_won(l2, "order-1234");
    cr_assert_eq(idem_claim_subkey(c, "charge", other, sizeof other), IDEM_OK);
    cr_assert_str_neq(a, other);
    cr_assert_eq(idem_abort(c), IDEM_OK);
    idem_layer_free(l2);

    o = options(10000);
    o.subkey_secret = "s3cret";
    l2 = open_layer(&o);
    c = begin_won(l2, "order-1234");
    cr_assert_eq(idem_claim_subkey(c, "charge", other, sizeof other), IDEM_OK);
    cr_assert_str_neq(a, other, "the secret changes nothing");
    cr_assert_eq(idem_abort(c), IDEM_OK);
    idem_layer_free(l2);
}

/* A handler in steps: a step that fails once, then resumes. */
typedef struct steps {
    atomic_int runs, charges;
    bool       fail_after_charge;
    char       subkey[IDEM_SUBKEY_SIZE];
} steps;

static int step_handler(void *arg, idem_response *resp)
{
    steps *st = arg;
    atomic_fetch_add(&st->runs, 1);
    const char *name;
    const void *data;
    size_t len;
    if (idem_response_checkpoint_get(resp, &name, &data, &len) != IDEM_OK)
        return 1;
    if (strcmp(name, "charged") != 0) {
        if (idem_response_subkey(resp, "charge", st->subkey, sizeof st->subkey) != IDEM_OK)
            return 1;
        atomic_fetch_add(&st->charges, 1);
        if (idem_response_checkpoint(resp, "charged", st->subkey, strlen(st->subkey)) != IDEM_OK)
            return 1;
        if (st->fail_after_charge)
            return 2; /* say, the receipt service failed: retry later */
    }
    return idem_response_set(resp, 201, "paid", 4) ? 1 : 0;
}

Test(once, a_handler_of_idem_run_checkpoints_and_resumes_through_its_response)
{
    steps st = {.fail_after_charge = true};
    idem_request req = req_str("k6");
    idem_reply reply = {0};
    cr_assert_eq(idem_run(layer, &req, step_handler, &st, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_FAILED);
    cr_assert_eq(reply.abort_error, IDEM_OK);
    st.fail_after_charge = false;
    cr_assert_eq(idem_run(layer, &req, step_handler, &st, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_EXECUTED);
    cr_assert_eq(atomic_load(&st.runs), 2);
    cr_assert_eq(atomic_load(&st.charges), 1, "the second run charged again");
    cr_assert_eq(idem_run(layer, &req, step_handler, &st, &reply), IDEM_OK);
    cr_assert_eq(reply.outcome, IDEM_REPLAYED);
    idem_reply_clear(&reply);
}

/* ---- work in the store's database ---- */

/* The ledger: one row per charge, in the store's own database. */
#ifdef IDEM_TEST_HAVE_SQLITE
static sqlite3 *sqlite_open(void)
{
    sqlite3 *db;
    cr_assert_eq(sqlite3_open(db_url + strlen("sqlite://"), &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
static PGconn *pg_open(void)
{
    /* the store URL is one libpq takes as it is, but for the driver's own
     * connect_timeout_ms, which conformance.c's main() may put last */
    char plain[1024];
    snprintf(plain, sizeof plain, "%s", db_url);
    char *ours = strstr(plain, "connect_timeout_ms=");
    if (ours && ours > plain)
        ours[-1] = '\0';
    PGconn *pg = PQconnectdb(plain);
    cr_assert_eq(PQstatus(pg), CONNECTION_OK, "%s", PQerrorMessage(pg));
    return pg;
}
#endif

/* Run sql on conn (a sqlite3 * or a PGconn *); true when it worked. */
static bool sql(void *conn, const char *text)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (is("sqlite"))
        return sqlite3_exec(conn, text, NULL, NULL, NULL) == SQLITE_OK;
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (is("postgresql")) {
        PGresult *r = PQexec(conn, text);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
        PQclear(r);
        return ok;
    }
#endif
    (void)conn;
    (void)text;
    return false;
}

/* Is a transaction open on conn? */
static bool in_tx(void *conn)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (is("sqlite"))
        return !sqlite3_get_autocommit(conn);
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (is("postgresql"))
        return PQtransactionStatus(conn) != PQTRANS_IDLE;
#endif
    (void)conn;
    return false;
}

/* A connection of the test's own, and the ledger table made. */
static void *own_conn(void)
{
    void *conn = NULL;
#ifdef IDEM_TEST_HAVE_SQLITE
    if (is("sqlite"))
        conn = sqlite_open();
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (is("postgresql"))
        conn = pg_open();
#endif
    cr_assert_not_null(conn, "this build cannot reach the %s database", idem_store_backend(store));
    cr_assert(sql(conn, "CREATE TABLE IF NOT EXISTS charges (k TEXT, who TEXT)"));
    return conn;
}

static void own_close(void *conn)
{
#ifdef IDEM_TEST_HAVE_SQLITE
    if (is("sqlite"))
        sqlite3_close(conn);
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (is("postgresql"))
        PQfinish(conn);
#endif
}

/* Rows of the ledger for key (of this test's prefix). */
static long charges_of(const char *key)
{
    void *conn = own_conn();
    char q[256];
    snprintf(q, sizeof q, "SELECT count(*) FROM charges WHERE k = '%s%s'", prefix, key);
    long n = -1;
#ifdef IDEM_TEST_HAVE_SQLITE
    if (is("sqlite")) {
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(conn, q, -1, &st, NULL), SQLITE_OK);
        if (sqlite3_step(st) == SQLITE_ROW)
            n = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
    }
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (is("postgresql")) {
        PGresult *r = PQexec(conn, q);
        if (PQresultStatus(r) == PGRES_TUPLES_OK)
            n = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
    }
#endif
    own_close(conn);
    return n;
}

typedef struct charge {
    const char *key;
    int         fail;
    long        sleep_ms;
    atomic_int  calls;
    atomic_int  running;
} charge;

static int charge_handler(void *arg, void *conn, idem_response *resp)
{
    charge *ch = arg;
    atomic_fetch_add(&ch->calls, 1);
    char q[256];
    snprintf(q, sizeof q, "INSERT INTO charges VALUES ('%s%s', 'run_tx')", prefix, ch->key);
    if (!sql(conn, q))
        return 3;
    atomic_store(&ch->running, 1);
    if (ch->sleep_ms)
        sleep_ms(ch->sleep_ms);
    if (ch->fail)
        return ch->fail;
    return idem_response_set(resp, 201, ch->key, strlen(ch->key)) ? 1 : 0;
}

#define NEEDS_TX()                                                                                 \
    do {                                                                                           \
        if (!has_tx())                                                                             \
            cr_skip_test("not applicable to %s: its store is not a database a handler can work "   \
                         "in (tested by run_tx_on_a_store_without_transactions_...)",              \
                         idem_store_backend(store));                                               \
        void *c_ = own_conn();                                                                     \
        own_close(c_);                                                                             \
    } while (0)

Test(once, run_tx_on_a_store_without_transactions_is_unsupported_and_runs_nothing)
{
    if (has_tx())
        cr_skip_test("not applicable to %s: it has transactions (tested by the run_tx tests)",
                     idem_store_backend(store));
    charge ch = {.key = "t0"};
    idem_request req = req_str("t0");
    idem_reply reply = {0};
    cr_assert_eq(idem_run_tx(layer, &req, charge_handler, &ch, &reply), IDEM_EUNSUPPORTED);
    cr_assert(strstr(idem_last_error(), "PostgreSQL or SQLite"), "%s", idem_last_error());
    cr_assert_eq(atomic_load(&ch.calls), 0);
    idem_claim *c = begin_won(layer, "t0"); /* the key was never claimed */
    cr_assert_eq(idem_commit_tx(c, (void *)1, 200, "", 0), IDEM_EUNSUPPORTED);
    cr_assert_eq(idem_checkpoint_tx(c, (void *)1, "s", "", 0), IDEM_EUNSUPPORTED);
    cr_assert_eq(idem_abort(c), IDEM_OK);
}

Test(once, run_tx_commits_the_work_with_its_response_and_replays_without_running)
{
    NEEDS_TX();
    charge ch = {.key = "t1"};
    idem_request req = req_str("t1");
    idem_reply reply = {0};
    cr_assert_eq(idem_run_tx(layer, &req, charge_handler, &ch, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_EXECUTED);
    cr_assert_eq(reply.status, 201);
    cr_assert_eq(idem_run_tx(layer, &req, charge_handler, &ch, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_REPLAYED);
    cr_assert_str_eq((char *)reply.body, "t1");
    idem_reply_clear(&reply);
    cr_assert_eq(atomic_load(&ch.calls), 1);
    cr_assert_eq(charges_of("t1"), 1);
}

Test(once, run_tx_handler_failure_rolls_the_work_back_and_frees_the_key)
{
    NEEDS_TX();
    charge ch = {.key = "t2", .fail = 7};
    idem_request req = req_str("t2");
    idem_reply reply = {0};
    cr_assert_eq(idem_run_tx(layer, &req, charge_handler, &ch, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_FAILED);
    cr_assert_eq(reply.handler_error, 7);
    cr_assert_eq(charges_of("t2"), 0, "the failed handler's row was kept");
    ch.fail = 0;
    cr_assert_eq(idem_run_tx(layer, &req, charge_handler, &ch, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_EXECUTED);
    idem_reply_clear(&reply);
    cr_assert_eq(charges_of("t2"), 1);
}

/* A layer for a test that holds SQLite's write lock for long: on a file of
 * its own, so that the other tests, running at the same time on the
 * suite's file, never wait for it. Elsewhere a layer on the suite's store. */
static idem_store *private_store;
static char private_url[256];

static idem_layer *layer_for_long_work(const idem_options *o)
{
    if (is("sqlite")) {
        snprintf(private_url, sizeof private_url, "%s-%s.db", url, prefix);
        cr_assert_eq(idem_store_open(&private_store, private_url), IDEM_OK, "%s", idem_last_error());
        db_url = private_url;
        own_close(own_conn()); /* the ledger's table, in that file */
    }
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, private_store ? private_store : store, o), IDEM_OK, "%s",
                 idem_last_error());
    return l;
}

static void layer_for_long_work_free(idem_layer *l)
{
    idem_layer_free(l);
    idem_store_close(private_store);
    private_store = NULL;
    if (db_url == private_url)
        unlink(private_url + strlen("sqlite://"));
    db_url = url;
}

typedef struct racer {
    idem_layer  *l;
    const char  *key;
    charge      *ch;
    int          rc;
    idem_reply   reply;
} racer;

static void *run_tx_thread(void *arg)
{
    racer *r = arg;
    idem_request req = req_str(r->key);
    r->rc = idem_run_tx(r->l, &req, charge_handler, r->ch, &r->reply);
    return NULL;
}

Test(once, run_tx_answers_a_duplicate_at_once_while_the_work_runs)
{
    NEEDS_TX();
    idem_options o = options(10000);
    idem_layer *l = layer_for_long_work(&o);
    charge ch = {.key = "t3", .sleep_ms = 1500};
    racer r = {.l = l, .key = "t3", .ch = &ch};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_tx_thread, &r), 0);
    while (!atomic_load(&ch.running))
        sleep_ms(5);
    long t0 = mono_ms();
    cr_assert_eq(begin_lost(l, "t3"), IDEM_IN_PROGRESS);
    long took = mono_ms() - t0;
    cr_assert_lt(took, 500, "a duplicate waited %ld ms for the running work", took);
    pthread_join(t, NULL);
    cr_assert_eq(r.rc, IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.reply.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r.reply);
    cr_assert_eq(charges_of("t3"), 1);
    layer_for_long_work_free(l);
}

Test(once, run_tx_taken_over_meanwhile_rolls_back_and_is_lost)
{
    NEEDS_TX();
    if (is("sqlite"))
        cr_skip_test("not applicable to sqlite: the work's transaction holds SQLite's one write lock, "
                     "so no claim can take its key over while it runs (docs/contract.md)");
    idem_options o = options(1000);
    idem_layer *l = open_layer(&o);
    charge ch = {.key = "t4", .sleep_ms = 1600};
    racer r = {.l = l, .key = "t4", .ch = &ch};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_tx_thread, &r), 0);
    sleep_ms(1200);
    idem_claim *c = begin_won(l, "t4"); /* the lease ended: taken over */
    pthread_join(t, NULL);
    cr_assert_eq(r.rc, IDEM_ELOST, "%s", idem_error_name(r.rc));
    cr_assert_eq(r.reply.outcome, 0);
    cr_assert_eq(charges_of("t4"), 0, "the taken-over holder's work was committed");
    cr_assert_eq(idem_commit(c, 200, "second", 6), IDEM_OK);
    idem_layer_free(l);
}

Test(once, run_tx_with_auto_extend_keeps_its_key_past_the_lease)
{
    NEEDS_TX();
    idem_options o = options(900);
    o.auto_extend = true;
    idem_layer *l = layer_for_long_work(&o);
    charge ch = {.key = "t5", .sleep_ms = 2000};
    racer r = {.l = l, .key = "t5", .ch = &ch};
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, run_tx_thread, &r), 0);
    sleep_ms(1300);
    if (is("postgresql")) /* SQLite: the claim would wait for the write lock; nobody can take it */
        cr_assert_eq(begin_lost(l, "t5"), IDEM_IN_PROGRESS, "the renewed key was taken over");
    pthread_join(t, NULL);
    cr_assert_eq(r.rc, IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.reply.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r.reply);
    idem_stats st;
    idem_layer_stats(l, &st);
    cr_assert_eq(st.lost, 0);
    cr_assert_eq(charges_of("t5"), 1);
    layer_for_long_work_free(l);
}

/* The step form, on a connection of the caller's own. */
Test(once, commit_tx_commits_the_callers_work_with_the_response)
{
    NEEDS_TX();
    void *conn = own_conn();
    idem_claim *c = begin_won(layer, "t6");
    char q[256];
    snprintf(q, sizeof q, "INSERT INTO charges VALUES ('%st6', 'commit_tx')", prefix);
    cr_assert(sql(conn, "BEGIN"));
    cr_assert(sql(conn, q));
    cr_assert_eq(begin_lost(layer, "t6"), IDEM_IN_PROGRESS); /* at once, the row lock or not */
    cr_assert_eq(idem_commit_tx(c, conn, 201, "paid", 4), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(charges_of("t6"), 1);
    cr_assert_eq(begin_lost(layer, "t6"), IDEM_REPLAYED);
    cr_assert(!in_tx(conn), "the transaction was still open after idem_commit_tx");
    own_close(conn);
}

Test(once, commit_tx_of_a_taken_over_claim_rolls_the_work_back_and_is_lost)
{
    NEEDS_TX();
    idem_options o = options(600);
    idem_layer *l = open_layer(&o);
    void *conn = own_conn();
    idem_claim *old = begin_won(l, "t7");
    sleep_ms(800);
    idem_claim *c = begin_won(l, "t7");
    char q[256];
    snprintf(q, sizeof q, "INSERT INTO charges VALUES ('%st7', 'stale')", prefix);
    cr_assert(sql(conn, "BEGIN"));
    cr_assert(sql(conn, q));
    cr_assert_eq(idem_commit_tx(old, conn, 201, "stale", 5), IDEM_ELOST, "%s", idem_last_error());
    cr_assert_eq(charges_of("t7"), 0, "the stale holder's row was committed");
    cr_assert_eq(idem_commit(c, 200, "new", 3), IDEM_OK);
    own_close(conn);
    idem_layer_free(l);
}

Test(once, commit_tx_without_an_open_transaction_is_refused_and_the_claim_stays)
{
    NEEDS_TX();
    void *conn = own_conn();
    idem_claim *c = begin_won(layer, "t8");
    cr_assert_eq(idem_commit_tx(c, conn, 200, "x", 1), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "no transaction"), "%s", idem_last_error());
    cr_assert_eq(idem_commit(c, 200, "x", 1), IDEM_OK, "%s", idem_last_error());
    own_close(conn);
}

Test(once, checkpoint_tx_commits_a_step_with_its_checkpoint_and_the_next_holder_resumes)
{
    NEEDS_TX();
    void *conn = own_conn();
    idem_claim *c = begin_won(layer, "t9");
    char q[256];
    snprintf(q, sizeof q, "INSERT INTO charges VALUES ('%st9', 'phase1')", prefix);
    cr_assert(sql(conn, "BEGIN"));
    cr_assert(sql(conn, q));
    cr_assert_eq(idem_checkpoint_tx(c, conn, "phase1", "row", 3), IDEM_OK, "%s", idem_last_error());
    expect_checkpoint(c, "phase1", "row");
    cr_assert_eq(charges_of("t9"), 1);
    cr_assert_eq(idem_abort(c), IDEM_OK); /* dies after phase 1 */

    c = begin_won(layer, "t9");
    expect_checkpoint(c, "phase1", "row");
    cr_assert(sql(conn, "BEGIN"));
    cr_assert_eq(idem_commit_tx(c, conn, 200, "phase2", 6), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(charges_of("t9"), 1);
    own_close(conn);
}

/* A handler that ends the transaction itself breaks the contract, but its
 * committed work is still answered as done: the response is stored by a
 * commit of its own, never left for a retry to run again. */
static int committing_handler(void *arg, void *conn, idem_response *resp)
{
    charge *ch = arg;
    int rc = charge_handler(arg, conn, resp);
    atomic_fetch_add(&ch->running, 1);
    return rc == 0 && sql(conn, "COMMIT") ? 0 : 1;
}

Test(once, run_tx_whose_handler_commits_itself_still_stores_the_response)
{
    NEEDS_TX();
    charge ch = {.key = "t10"};
    idem_request req = req_str("t10");
    idem_reply reply = {0};
    cr_assert_eq(idem_run_tx(layer, &req, committing_handler, &ch, &reply), IDEM_OK, "%s",
                 idem_last_error());
    cr_assert_eq(reply.outcome, IDEM_EXECUTED);
    cr_assert_eq(idem_run_tx(layer, &req, committing_handler, &ch, &reply), IDEM_OK);
    cr_assert_eq(reply.outcome, IDEM_REPLAYED);
    idem_reply_clear(&reply);
    cr_assert_eq(atomic_load(&ch.calls), 1);
    cr_assert_eq(charges_of("t10"), 1);
}
