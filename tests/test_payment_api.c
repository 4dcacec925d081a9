/*
 * examples/payment_api over real HTTP: two processes sharing one store
 * (IDEM_TEST_BACKEND: redis, postgresql, or sqlite on one file), driven with
 * libcurl.
 * Each outcome of docs/http.md, concurrent duplicates across both
 * processes, and (Redis) a store killed mid-run and restarted.
 *
 * PAYMENT_API names the program. Timings are generous: a charge that must
 * still be running when its duplicates arrive takes seconds, not
 * milliseconds.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <curl/curl.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
#include <libpq-fe.h>
#endif

#include "harness.h"

/* ---- two servers on one store ---- */

static idem_test_server srv;
static pid_t            api_pid[2];
static uint16_t         api_port[2];
static const char      *api_name[2] = {"alpha", "beta"};

static void api_start(int i)
{
    const char *prog = getenv("PAYMENT_API");
    cr_assert(prog, "PAYMENT_API names the program under test");
    api_port[i] = idem_test_free_port();
    char port[16], log[4200];
    snprintf(port, sizeof port, "%u", api_port[i]);
    snprintf(log, sizeof log, "%s/%s.log", srv.dir, api_name[i]);
    char *argv[] = {(char *)prog, "--url", srv.url, "--port", port, "--name", (char *)api_name[i],
                    "--lease-ms", "20000", NULL};
    api_pid[i] = idem_test_spawn(argv, log);
    cr_assert(api_pid[i] > 0);
    cr_assert(idem_test_wait_port(api_port[i], 10000), "payment_api %s did not start (see %s)",
              api_name[i], log);
}

static void setup_store(void)
{
    const char *kind = getenv("IDEM_TEST_BACKEND");
    cr_assert(kind, "IDEM_TEST_BACKEND is redis or sqlite");
    cr_assert_eq(idem_test_server_start(&srv, kind), 0);
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void setup(void)
{
    setup_store();
    api_start(0);
    api_start(1);
}

static bool alive(int i)
{
    return waitpid(api_pid[i], NULL, WNOHANG) == 0;
}

static void teardown(void)
{
    for (int i = 0; i < 2; i++) {
        if (api_pid[i] > 0) {
            cr_expect(alive(i), "payment_api %s exited during the test", api_name[i]);
            idem_test_stop_pid(api_pid[i], 5000);
        }
        api_pid[i] = 0;
    }
    idem_test_server_stop(&srv);
    curl_global_cleanup();
}

/* ---- HTTP ---- */

typedef struct answer {
    long   status;
    char   headers[8192];   /* "Name: value\r\n" lines as received */
    size_t hlen;
    char  *body;
    size_t blen;
} answer;

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    answer *a = arg;
    size_t len = size * n;
    a->body = realloc(a->body, a->blen + len + 1);
    memcpy(a->body + a->blen, p, len);
    a->blen += len;
    a->body[a->blen] = '\0';
    return len;
}

static size_t on_header(char *p, size_t size, size_t n, void *arg)
{
    answer *a = arg;
    size_t len = size * n;
    if (strncmp(p, "HTTP/", 5) == 0)
        a->hlen = 0; /* a new response (after 100 Continue) */
    if (a->hlen + len < sizeof a->headers) {
        memcpy(a->headers + a->hlen, p, len);
        a->hlen += len;
        a->headers[a->hlen] = '\0';
    }
    return len;
}

/* The value of field name, in a static buffer per call site; NULL if absent. */
static const char *field(const answer *a, const char *name, char *out, size_t room)
{
    size_t nl = strlen(name);
    for (const char *l = a->headers; l && *l; l = strstr(l, "\r\n") ? strstr(l, "\r\n") + 2 : NULL) {
        if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
            const char *v = l + nl + 1;
            while (*v == ' ')
                v++;
            size_t vl = strcspn(v, "\r\n");
            snprintf(out, room, "%.*s", (int)vl, v);
            return out;
        }
    }
    return NULL;
}

/* POST to target ("/payments?x=1") on server i; extra is a NULL-terminated
 * list of header lines ("Idempotency-Key: \"k\""). */
static answer post_to(int i, const char *target, const char *body, const char *const *extra)
{
    answer a = {0};
    CURL *c = curl_easy_init();
    cr_assert(c);
    char url[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", api_port[i], target);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, "Expect:");
    for (size_t k = 0; extra && extra[k]; k++)
        h = curl_slist_append(h, extra[k]);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &a);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &a);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    CURLcode rc = curl_easy_perform(c);
    cr_assert_eq(rc, CURLE_OK, "POST to %s: %s", api_name[i], curl_easy_strerror(rc));
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &a.status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    if (!a.body)
        a.body = calloc(1, 1);
    return a;
}

/* POST /payments to server i. */
static answer post(int i, const char *body, const char *const *extra)
{
    return post_to(i, "/payments", body, extra);
}

static answer post_key(int i, const char *key_line, const char *body)
{
    const char *extra[] = {key_line, NULL};
    return post(i, body, extra);
}

static long stat(int i, const char *what);

static long charges(int i)
{
    return stat(i, "charges");
}

static long stat(int i, const char *what)
{
    CURL *c = curl_easy_init();
    answer a = {0};
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/stats", api_port[i]);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &a);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    cr_assert_eq(curl_easy_perform(c), CURLE_OK);
    curl_easy_cleanup(c);
    char member[32];
    snprintf(member, sizeof member, "\"%s\":", what);
    const char *n = a.body ? strstr(a.body, member) : NULL;
    cr_assert(n, "stats: %s", a.body ? a.body : "");
    long v = strtol(n + strlen(member), NULL, 10);
    free(a.body);
    return v;
}

static void answer_free(answer *a)
{
    free(a->body);
    a->body = NULL;
}

static void assert_problem(const answer *a, long status)
{
    char v[256];
    cr_assert_eq(a->status, status, "status %ld, not %ld: %s", a->status, status, a->body);
    cr_assert_str_eq(field(a, "Content-Type", v, sizeof v), "application/problem+json");
    char head[96];
    snprintf(head, sizeof head, "\"status\":%ld,\"detail\":\"", status);
    cr_assert(strstr(a->body, "{\"type\":\"about:blank\",\"title\":\"") == a->body && strstr(a->body, head),
              "problem body: %s", a->body);
}

/* ---- the cases ---- */

TestSuite(payment_api, .init = setup, .fini = teardown, .timeout = 120);

Test(payment_api, a_new_key_charges_once_and_answers_201_with_location_and_json)
{
    answer a = post_key(0, "Idempotency-Key: \"order-1\"", "{\"amount\": 1250}");
    char v[256], id[300];
    cr_assert_eq(a.status, 201, "%s", a.body);
    cr_assert_str_eq(field(&a, "Content-Type", v, sizeof v), "application/json");
    cr_assert_not(field(&a, "Idempotent-Replayed", v, sizeof v), "a first answer is no replay");
    cr_assert(field(&a, "Location", v, sizeof v));
    cr_assert_eq(strncmp(v, "/payments/pay_", 14), 0, "Location: %s", v);
    snprintf(id, sizeof id, "\"id\":\"%s\"", v + 10);
    cr_assert(strstr(a.body, id), "the body's id is the Location's: %s / %s", a.body, v);
    cr_assert(strstr(a.body, "\"amount\":1250"), "%s", a.body);
    cr_assert(strstr(a.body, "\"charged_by\":\"alpha\""), "%s", a.body);
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&a);
}

Test(payment_api, a_retry_to_either_process_replays_status_body_and_fields)
{
    answer first = post_key(0, "Idempotency-Key: \"order-2\"", "{\"amount\": 5}");
    cr_assert_eq(first.status, 201);
    char loc[256], type[256], v[256];
    field(&first, "Location", loc, sizeof loc);
    field(&first, "Content-Type", type, sizeof type);
    /* the other process, the same process, and the key as a bare token */
    const struct {
        int         to;
        const char *line;
    } retries[] = {{1, "Idempotency-Key: \"order-2\""}, {0, "Idempotency-Key: \"order-2\""},
                   {1, "Idempotency-Key: order-2"}, {1, "Idempotency-Key: \"order-2\";trace=7"}};
    for (size_t i = 0; i < sizeof retries / sizeof retries[0]; i++) {
        answer r = post_key(retries[i].to, retries[i].line, "{\"amount\": 5}");
        cr_assert_eq(r.status, 201, "retry %zu: %ld %s", i, r.status, r.body);
        cr_assert_eq(r.blen, first.blen);
        cr_assert_eq(memcmp(r.body, first.body, first.blen), 0, "byte for byte: %s", r.body);
        cr_assert_str_eq(field(&r, "Location", v, sizeof v), loc);
        cr_assert_str_eq(field(&r, "Content-Type", v, sizeof v), type);
        cr_assert_str_eq(field(&r, "Idempotent-Replayed", v, sizeof v), "true");
        answer_free(&r);
    }
    cr_assert(strstr(first.body, "\"charged_by\":\"alpha\""));
    cr_assert_eq(charges(0), 1);
    cr_assert_eq(charges(1), 0, "beta replayed, never charged");
    answer_free(&first);
}

typedef struct slow_post {
    int         to;
    const char *key_line;
    answer      a;
} slow_post;

static void *slow(void *arg)
{
    slow_post *s = arg;
    const char *extra[] = {s->key_line, "X-Demo-Delay-Ms: 3000", NULL};
    s->a = post(s->to, "{\"amount\": 7}", extra);
    return NULL;
}

static void wait_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

Test(payment_api, a_duplicate_while_the_first_runs_is_409_with_retry_after)
{
    slow_post s = {.to = 0, .key_line = "Idempotency-Key: \"order-3\""};
    pthread_t t;
    pthread_create(&t, NULL, slow, &s);
    /* the charge takes 3 s: wait until alpha runs it (it holds the key) */
    for (int waited = 0; stat(0, "running") == 0; waited += 20) {
        cr_assert(waited < 20000, "alpha never started the charge");
        wait_ms(20);
    }
    answer d = post_key(1, "Idempotency-Key: \"order-3\"", "{\"amount\": 7}");
    assert_problem(&d, 409);
    char v[64];
    cr_assert(field(&d, "Retry-After", v, sizeof v), "409 carries Retry-After");
    long secs = strtol(v, NULL, 10);
    cr_assert(secs >= 1 && secs <= 20, "Retry-After %s: whole seconds of the 20 s lease", v);
    pthread_join(t, NULL);
    cr_assert_eq(s.a.status, 201);
    answer after = post_key(1, "Idempotency-Key: \"order-3\"", "{\"amount\": 7}");
    cr_assert_eq(after.status, 201, "once done, the duplicate replays");
    cr_assert_str_eq(after.body, s.a.body);
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&d);
    answer_free(&after);
    answer_free(&s.a);
}

Test(payment_api, the_same_key_with_another_body_is_422_and_charges_nothing)
{
    answer a = post_key(0, "Idempotency-Key: \"order-4\"", "{\"amount\": 10}");
    cr_assert_eq(a.status, 201);
    answer b = post_key(1, "Idempotency-Key: \"order-4\"", "{\"amount\": 11}");
    assert_problem(&b, 422);
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&a);
    answer_free(&b);
}

/* The fingerprint covers the request target as received, path and query
 * (http.h): the same key and body sent with another query is another
 * request. */
Test(payment_api, the_same_key_with_another_query_is_422_and_charges_nothing)
{
    const char *extra[] = {"Idempotency-Key: \"order-q\"", NULL};
    answer a = post_to(0, "/payments?currency=eur", "{\"amount\": 10}", extra);
    cr_assert_eq(a.status, 201, "%s", a.body);
    answer b = post_to(1, "/payments?currency=usd", "{\"amount\": 10}", extra);
    assert_problem(&b, 422);
    answer c = post_to(0, "/payments", "{\"amount\": 10}", extra);
    assert_problem(&c, 422);
    answer d = post_to(1, "/payments?currency=eur", "{\"amount\": 10}", extra);
    char v[64];
    cr_assert_eq(d.status, 201, "%s", d.body);
    cr_assert(field(&d, "Idempotent-Replayed", v, sizeof v), "the same target is a replay");
    cr_assert_str_eq(d.body, a.body);
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&a);
    answer_free(&b);
    answer_free(&c);
    answer_free(&d);
}

Test(payment_api, a_missing_malformed_or_oversized_key_is_400_and_charges_nothing)
{
    char big[300];
    snprintf(big, sizeof big, "Idempotency-Key: \"%0256d\"", 0); /* 256 characters: one too many */
    const char *const cases[][3] = {
        {NULL, NULL, NULL},                                        /* missing */
        {"Idempotency-Key;", NULL, NULL},                          /* empty value */
        {"Idempotency-Key: \"\"", NULL, NULL},                     /* empty string */
        {"Idempotency-Key: \"unterminated", NULL, NULL},
        {"Idempotency-Key: \"bad\\escape\"", NULL, NULL},
        {"Idempotency-Key: \"a\", \"b\"", NULL, NULL},             /* a list */
        {"Idempotency-Key: :Ynl0ZXM=:", NULL, NULL},               /* a byte sequence */
        {"Idempotency-Key: \"a\"", "Idempotency-Key: \"a\"", NULL}, /* two field lines */
        {big, NULL, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        answer a = post((int)(i % 2), "{\"amount\": 1}", cases[i]);
        assert_problem(&a, 400);
        cr_assert(strstr(a.body, "Idempotency-Key"), "case %zu: the detail names the header: %s", i,
                  a.body);
        cr_assert_null(strstr(a.body, srv.dir), "case %zu: no server path: %s", i, a.body);
        answer_free(&a);
    }
    /* 255 characters are fine */
    snprintf(big, sizeof big, "Idempotency-Key: \"%0255d\"", 0);
    answer ok = post_key(0, big, "{\"amount\": 1}");
    cr_assert_eq(ok.status, 201, "%s", ok.body);
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&ok);
}

Test(payment_api, a_failing_card_processor_is_503_frees_the_key_and_charges_nothing)
{
    const char *extra[] = {"Idempotency-Key: \"order-5\"", "X-Demo-Fail: 1", NULL};
    answer a = post(0, "{\"amount\": 3}", extra);
    assert_problem(&a, 503);
    char v[64];
    cr_assert(field(&a, "Retry-After", v, sizeof v));
    cr_assert_eq(charges(0) + charges(1), 0, "nothing charged");
    answer b = post_key(1, "Idempotency-Key: \"order-5\"", "{\"amount\": 3}");
    cr_assert_eq(b.status, 201, "the key was freed: the retry charges (%s)", b.body);
    cr_assert_not(field(&b, "Idempotent-Replayed", v, sizeof v));
    cr_assert(strstr(b.body, "\"charged_by\":\"beta\""));
    cr_assert_eq(charges(0) + charges(1), 1);
    answer_free(&a);
    answer_free(&b);
}

#define RACERS 8

typedef struct racer {
    int                to;
    pthread_barrier_t *start;
    answer             a;
} racer;

static void *race(void *arg)
{
    racer *r = arg;
    pthread_barrier_wait(r->start);
    const char *extra[] = {"Idempotency-Key: \"order-6\"", "X-Demo-Delay-Ms: 3000", NULL};
    r->a = post(r->to, "{\"amount\": 42}", extra);
    return NULL;
}

Test(payment_api, concurrent_duplicates_across_both_processes_charge_exactly_once)
{
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, RACERS);
    racer r[RACERS];
    pthread_t t[RACERS];
    for (int i = 0; i < RACERS; i++) {
        r[i] = (racer){.to = i % 2, .start = &start};
        pthread_create(&t[i], NULL, race, &r[i]);
    }
    int created = 0, conflicts = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(t[i], NULL);
        created += r[i].a.status == 201;
        conflicts += r[i].a.status == 409;
    }
    pthread_barrier_destroy(&start);
    cr_assert_eq(created, 1, "one charge answers 201");
    cr_assert_eq(conflicts, RACERS - 1, "every duplicate arriving during the 3 s charge gets 409");
    cr_assert_eq(charges(0) + charges(1), 1, "exactly one charge over both processes");
    for (int i = 0; i < RACERS; i++)
        answer_free(&r[i].a);
}

/* On PostgreSQL and SQLite each payment is a row of the store's own
 * database, committed with its answer by idem_run_tx(): the rows are the
 * payments answered 201, never a failed or a replayed one. */
static long payment_rows(void)
{
    long n = -1;
#ifdef IDEM_TEST_HAVE_SQLITE
    if (strncmp(srv.url, "sqlite:", 7) == 0) {
        sqlite3 *db;
        sqlite3_stmt *st;
        if (sqlite3_open(srv.url + strlen("sqlite://"), &db) == SQLITE_OK &&
            sqlite3_prepare_v2(db, "SELECT count(*) FROM payments", -1, &st, NULL) == SQLITE_OK) {
            if (sqlite3_step(st) == SQLITE_ROW)
                n = sqlite3_column_int64(st, 0);
            sqlite3_finalize(st);
        }
        sqlite3_close(db);
    }
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strncmp(srv.url, "postgresql:", 11) == 0) {
        PGconn *pg = PQconnectdb(srv.url);
        PGresult *r = PQexec(pg, "SELECT count(*) FROM payments");
        if (PQresultStatus(r) == PGRES_TUPLES_OK)
            n = atol(PQgetvalue(r, 0, 0));
        PQclear(r);
        PQfinish(pg);
    }
#endif
    return n;
}

Test(payment_api, on_a_database_store_each_payment_is_one_row_committed_with_its_answer)
{
    if (strncmp(srv.url, "sqlite:", 7) != 0 && strncmp(srv.url, "postgresql:", 11) != 0)
        cr_skip_test("not applicable to %s: payments are rows only in a store that is a database",
                     getenv("IDEM_TEST_BACKEND"));
    long before = payment_rows();
    cr_assert_geq(before, 0, "no payments table in the store's database");
    answer a = post_key(0, "Idempotency-Key: \"row-1\"", "{\"amount\": 11}");
    cr_assert_eq(a.status, 201);
    answer again = post_key(1, "Idempotency-Key: \"row-1\"", "{\"amount\": 11}");
    cr_assert_eq(again.status, 201);
    const char *fail[] = {"Idempotency-Key: \"row-2\"", "X-Demo-Fail: 1", NULL};
    answer failed = post(0, "{\"amount\": 12}", fail);
    cr_assert_eq(failed.status, 503);
    cr_assert_eq(payment_rows(), before + 1, "a replay or a failed charge wrote a row");
    answer_free(&a);
    answer_free(&again);
    answer_free(&failed);
}

/* ---- Redis: the store goes away and comes back ---- */

static answer post_until(int i, const char *key_line, long status, int timeout_ms)
{
    answer a = {0};
    for (int waited = 0; waited <= timeout_ms; waited += 200) {
        a = post_key(i, key_line, "{\"amount\": 9}");
        if (a.status == status)
            return a;
        answer_free(&a);
        wait_ms(200);
    }
    return post_key(i, key_line, "{\"amount\": 9}");
}

TestSuite(payment_api_store_down, .init = setup, .fini = teardown, .timeout = 120);

Test(payment_api_store_down, a_store_killed_mid_run_is_503_then_service_resumes_by_itself)
{
    answer a = post_key(0, "Idempotency-Key: \"before\"", "{\"amount\": 9}");
    cr_assert_eq(a.status, 201);
    answer_free(&a);
    idem_test_server_kill(&srv, 0);
    for (int i = 0; i < 2; i++) {
        answer d = post_key(i, "Idempotency-Key: \"during\"", "{\"amount\": 9}");
        assert_problem(&d, 503);
        char v[64];
        cr_assert(field(&d, "Retry-After", v, sizeof v), "503 carries Retry-After");
        cr_assert_null(strstr(d.body, "127.0.0.1"), "no host in a client's answer: %s", d.body);
        cr_assert(alive(i), "a store failure never ends the server");
        answer_free(&d);
    }
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    for (int i = 0; i < 2; i++) {
        char line[64];
        snprintf(line, sizeof line, "Idempotency-Key: \"after-%d\"", i);
        answer b = post_until(i, line, 201, 15000);
        cr_assert_eq(b.status, 201, "%s recovers once the store is back: %ld %s", api_name[i],
                     b.status, b.body);
        answer_free(&b);
    }
    answer c = post_key(1, "Idempotency-Key: \"during\"", "{\"amount\": 9}");
    cr_assert_eq(c.status, 201, "a key refused with 503 ran nothing: it charges now");
    cr_assert_not(strstr(c.headers, "Idempotent-Replayed"));
    answer_free(&c);
}

/* The servers start while the store is down. */
TestSuite(payment_api_store_down_at_start, .init = setup_store, .fini = teardown, .timeout = 120);

Test(payment_api_store_down_at_start, is_503_until_the_store_comes_up)
{
    idem_test_server_kill(&srv, 0);
    api_start(0);
    api_start(1);
    for (int i = 0; i < 2; i++) {
        answer d = post_key(i, "Idempotency-Key: \"k\"", "{\"amount\": 9}");
        assert_problem(&d, 503);
        answer_free(&d);
    }
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    for (int i = 0; i < 2; i++) {
        answer b = post_until(i, "Idempotency-Key: \"k\"", 201, 15000);
        cr_assert_eq(b.status, 201, "%s: %ld %s", api_name[i], b.status, b.body);
        answer_free(&b);
    }
    cr_assert_eq(charges(0) + charges(1), 1, "one charge, then one replay");
}
