/*
 * Bad inputs: docs/contract.md section 8, case by case. Each case really runs against a
 * store of the kind given (--backend or IDEM_TEST_BACKEND; default sqlite)
 * and must return the code in the table; the message (idem_last_error())
 * must not be empty. With --table the cases are printed as the markdown
 * table of docs/bad-inputs.md.
 *
 *   bad_inputs [--backend KIND] [--table]
 *
 * Exit status 0 when every case got its expected code.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/http.h>
#include <idempotency/idempotency.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif

#include "harness.h"
#include "internal.h"
#include "support/testutil.h"

static idem_test_server srv;
static const char *kind = "sqlite";
static idem_store *store;
static idem_layer *layer;
static idem_reply reply;
static char last[2048];       /* the message of the case just run */
static const char *outcome;   /* the outcome when a case returned IDEM_OK */

static int ok_handler(void *arg, idem_response *resp)
{
    (void)arg;
    return idem_response_set(resp, 200, "ok", 2) == IDEM_OK ? 0 : 1;
}

static const char *outcome_name(idem_outcome o)
{
    switch (o) {
    case IDEM_EXECUTED: return "IDEM_EXECUTED";
    case IDEM_REPLAYED: return "IDEM_REPLAYED";
    case IDEM_IN_PROGRESS: return "IDEM_IN_PROGRESS";
    case IDEM_MISMATCH: return "IDEM_MISMATCH";
    case IDEM_FAILED: return "IDEM_FAILED";
    }
    return "?";
}

/* Run a request with key bytes; note the outcome. */
static int run_key(const void *key, size_t len)
{
    idem_request req = {.key = key, .key_len = len};
    int rc = idem_run(layer, &req, ok_handler, NULL, &reply);
    if (rc == IDEM_OK)
        outcome = outcome_name(reply.outcome);
    return rc;
}

static int open_url(const char *url)
{
    idem_store *s = NULL;
    int rc = idem_store_open(&s, url);
    idem_store_close(s);
    return rc;
}

/* ---- the cases ---- */

static int c_open_null_out(void) { return idem_store_open(NULL, "sqlite:///tmp/x.db"); }
static int c_open_null_url(void) { idem_store *s; return idem_store_open(&s, NULL); }
static int c_layer_null_store(void) { idem_layer *l; return idem_layer_new(&l, NULL, NULL); }
static int c_run_null_layer(void)
{
    idem_request req = {.key = "k", .key_len = 1};
    return idem_run(NULL, &req, ok_handler, NULL, &reply);
}
static int c_run_null_req(void) { return idem_run(layer, NULL, ok_handler, NULL, &reply); }
static int c_run_null_fn(void)
{
    idem_request req = {.key = "k", .key_len = 1};
    return idem_run(layer, &req, NULL, NULL, &reply);
}
static int c_run_null_reply(void)
{
    idem_request req = {.key = "k", .key_len = 1};
    return idem_run(layer, &req, ok_handler, NULL, NULL);
}
static int c_null_key(void) { return run_key(NULL, 3); }
static int c_null_fingerprint(void)
{
    idem_request req = {.key = "k", .key_len = 1, .fingerprint = NULL, .fingerprint_len = 8};
    return idem_run(layer, &req, ok_handler, NULL, &reply);
}
static int c_begin_null_claim(void)
{
    idem_request req = {.key = "k", .key_len = 1};
    return idem_begin(layer, &req, NULL, &reply);
}
static int c_commit_null(void) { return idem_commit(NULL, 200, "x", 1); }
static int c_abort_null(void) { return idem_abort(NULL); }
static int c_extend_null(void) { return idem_extend(NULL, 1000); }
static int c_response_null(void) { return idem_response_set(NULL, 200, "x", 1); }
static int c_empty_key(void) { return run_key("", 0); }
static int c_key_over(void)
{
    char k[256];
    memset(k, 'k', sizeof k);
    return run_key(k, 256);
}
static int c_key_at(void)
{
    char k[255];
    memset(k, 'k', sizeof k);
    return run_key(k, 255);
}
static int c_key_nul(void) { return run_key("a\0b", 3); }
static int c_key_crlf(void) { return run_key("a\r\nb", 4); }
static int c_key_space(void) { return run_key("a b ", 4); }
static int c_key_binary(void) { return run_key("\xff\x00\x80\x7f", 4); }

static int c_lease_zero(void)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = 0;
    idem_layer *l;
    return idem_layer_new(&l, store, &o);
}
static int c_prefix_long(void)
{
    char p[300];
    memset(p, 'p', sizeof p - 1);
    p[sizeof p - 1] = '\0';
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = p;
    idem_layer *l;
    return idem_layer_new(&l, store, &o);
}

static int c_scheme_unknown(void) { return open_url("ftp://127.0.0.1/idem"); }
static int c_url_empty(void) { return open_url(""); }
static int c_url_no_scheme(void) { return open_url("127.0.0.1:6379"); }
static int c_url_bad_port(void) { return open_url("redis://127.0.0.1:99999"); }
static int c_url_ipv6(void) { return open_url("redis://[::1:6379"); }
static int c_url_escape(void) { return open_url("sqlite:///tmp/a%zz.db"); }
static int c_url_nul_escape(void) { return open_url("sqlite:///tmp/a%00b.db"); }
static int c_url_relative(void) { return open_url("sqlite://relative.db"); }
static int c_url_param(void) { return open_url("sqlite:///tmp/x.db?busy_timeout_ms=soon"); }
static int c_url_unknown_param(void) { return open_url("sqlite:///tmp/x.db?nosuch=1"); }
static int c_url_control(void) { return open_url("sqlite:///tmp/a\nb.db"); }
static int c_url_long(void)
{
    char *u = malloc(5000);
    memcpy(u, "sqlite:///", 10);
    memset(u + 10, 'a', 4989);
    u[4999] = '\0';
    int rc = open_url(u);
    free(u);
    return rc;
}
static int c_unreachable_redis(void)
{
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", idem_test_free_port());
    return open_url(url);
}
static int c_unreachable_memcached(void)
{
    char url[64];
    snprintf(url, sizeof url, "memcached://127.0.0.1:%u", idem_test_free_port());
    int rc = open_url(url);
    if (rc == IDEM_OK) {
        /* a client that connects lazily opens fine: the first request fails */
        idem_store *s;
        idem_store_open(&s, url);
        idem_layer *l;
        idem_layer_new(&l, s, NULL);
        idem_request req = {.key = "k", .key_len = 1};
        rc = idem_run(l, &req, ok_handler, NULL, &reply);
        idem_layer_free(l);
        idem_store_close(s);
    }
    return rc;
}
static int c_unreachable_host(void) { return open_url("redis://host.invalid:6379"); }
static int c_sqlite_no_dir(void) { return open_url("sqlite:///nonexistent-dir/idem.db"); }

/* Store raw bytes under a key, as another program might. */
static void plant(const char *key, const void *value, size_t len)
{
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining;
    char full[128];
    int n = snprintf(full, sizeof full, "bad:%s", key);
    if (idem__store_claim(store, full, (size_t)n, value, len, 60000, &existing, &existing_len,
                          &remaining) != IDEM_OK)
        fprintf(stderr, "bad_inputs: cannot plant %s: %s\n", key, idem_last_error());
    free(existing);
}
static int c_foreign_record(void)
{
    plant("foreign", "{\"status\":\"done\"}", 17);
    return run_key("foreign", 7);
}
static int c_truncated_record(void)
{
    idem_record rec = {.state = IDEM_STATE_COMPLETED, .status = 200, .body = (const uint8_t *)"hello",
                       .body_len = 5};
    uint8_t *enc;
    size_t len;
    if (idem__record_encode(&rec, &enc, &len) != IDEM_OK)
        return IDEM_ENOMEM;
    plant("truncated", enc, len - 1);
    free(enc);
    return run_key("truncated", 9);
}
static int c_future_version(void)
{
    idem_record rec = {.state = IDEM_STATE_COMPLETED, .status = 200, .body = (const uint8_t *)"hi",
                       .body_len = 2};
    uint8_t *enc;
    size_t len;
    if (idem__record_encode(&rec, &enc, &len) != IDEM_OK)
        return IDEM_ENOMEM;
    enc[4] = 3;
    plant("version3", enc, len);
    free(enc);
    return run_key("version3", 8);
}

static int big_handler(void *arg, idem_response *resp)
{
    size_t n = *(size_t *)arg;
    char *b = calloc(1, n);
    int rc = idem_response_set(resp, 200, b, n);
    free(b);
    snprintf(last, sizeof last, "%s", idem_last_error());
    return rc;
}
static int c_response_over(void)
{
    size_t n = (1u << 20) + 1;
    idem_request req = {.key = "big", .key_len = 3};
    int rc = idem_run(layer, &req, big_handler, &n, &reply);
    /* the handler got IDEM_ETOOBIG from idem_response_set and failed */
    return rc == IDEM_OK && reply.outcome == IDEM_FAILED ? reply.handler_error : rc;
}
static int c_commit_over(void)
{
    idem_request req = {.key = "big-step", .key_len = 8};
    idem_claim *c;
    int rc = idem_begin(layer, &req, &c, &reply);
    if (rc || !c)
        return rc ? rc : IDEM_OK;
    size_t n = (1u << 20) + 1;
    char *b = calloc(1, n);
    rc = idem_commit(c, 200, b, n);
    snprintf(last, sizeof last, "%s", idem_last_error());
    free(b);
    idem_abort(c);
    return rc;
}
static int status_handler(void *arg, idem_response *resp)
{
    int rc = idem_response_set(resp, *(int *)arg, "", 0);
    snprintf(last, sizeof last, "%s", idem_last_error());
    return rc;
}
static int c_status_range(void)
{
    int status = 99;
    idem_request req = {.key = "status-99", .key_len = 9};
    int rc = idem_run(layer, &req, status_handler, &status, &reply);
    return rc == IDEM_OK && reply.outcome == IDEM_FAILED ? reply.handler_error : rc;
}
static int c_commit_status(void)
{
    idem_request req = {.key = "status", .key_len = 6};
    idem_claim *c;
    int rc = idem_begin(layer, &req, &c, &reply);
    if (rc || !c)
        return rc ? rc : IDEM_OK;
    rc = idem_commit(c, 1000, "x", 1);
    snprintf(last, sizeof last, "%s", idem_last_error());
    idem_abort(c);
    return rc;
}

static int crlf_field_handler(void *arg, idem_response *resp)
{
    (void)arg;
    int rc = idem_response_add_header(resp, "X-Note", "a\r\nSet-Cookie: x=1");
    snprintf(last, sizeof last, "%s", idem_last_error());
    return rc;
}
static int c_field_crlf(void)
{
    idem_request req = {.key = "field-crlf", .key_len = 10};
    int rc = idem_run(layer, &req, crlf_field_handler, NULL, &reply);
    return rc == IDEM_OK && reply.outcome == IDEM_FAILED ? reply.handler_error : rc;
}
static int many_fields_handler(void *arg, idem_response *resp)
{
    (void)arg;
    int rc = IDEM_OK;
    for (int i = 0; rc == IDEM_OK && i <= IDEM_MAX_HEADERS; i++)
        rc = idem_response_add_header(resp, "X-N", "1");
    snprintf(last, sizeof last, "%s", idem_last_error());
    return rc;
}
static int c_fields_over(void)
{
    idem_request req = {.key = "fields-over", .key_len = 11};
    int rc = idem_run(layer, &req, many_fields_handler, NULL, &reply);
    return rc == IDEM_OK && reply.outcome == IDEM_FAILED ? reply.handler_error : rc;
}
static int c_commit_field_name(void)
{
    idem_request req = {.key = "field-name", .key_len = 10};
    idem_claim *c;
    int rc = idem_begin(layer, &req, &c, &reply);
    if (rc || !c)
        return rc ? rc : IDEM_OK;
    idem_header h[] = {{"Bad Name", "v"}};
    rc = idem_commit_headers(c, 200, h, 1, "x", 1);
    snprintf(last, sizeof last, "%s", idem_last_error());
    idem_abort(c);
    return rc;
}
static int c_http_key(void)
{
    char key[256];
    size_t len;
    const char *lines[] = {"\"abc"};
    int rc = idem_http_key_parse(key, sizeof key, &len, lines, 1);
    snprintf(last, sizeof last, "%s", idem_last_error());
    return rc;
}

/* The store dies in the middle of a request and comes back. */
static int c_store_dies(void)
{
    if (srv.nmore > 0) {
        /* a topology of many servers (redis-cluster, redis-sentinel):
         * every data server dies */
        idem_test_topology_kill(&srv);
        int rc = run_key("store-dies", 10);
        snprintf(last, sizeof last, "%s", idem_last_error());
        if (idem_test_topology_restart(&srv) != 0)
            return -100;
        return rc;
    }
    if (srv.pids[0] > 0) {
        /* every server of the store: with two, the key may live on either */
        for (int i = 0; i < 2; i++)
            idem_test_server_kill(&srv, i);
        int rc = run_key("store-dies", 10);
        snprintf(last, sizeof last, "%s", idem_last_error());
        for (int i = 0; i < 2; i++)
            if (srv.ports[i] && idem_test_server_restart(&srv, i) != 0)
                return -100;
        return rc;
    }
#ifdef IDEM_TEST_HAVE_SQLITE
    /* SQLite has no server: another process holds the write lock past the
     * busy timeout, then dies. */
    int ready[2];
    if (pipe(ready) != 0)
        return -100;
    pid_t child = fork();
    if (child == 0) {
        sqlite3 *db;
        if (sqlite3_open(srv.url + strlen("sqlite://"), &db) != SQLITE_OK ||
            sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK)
            _exit(1);
        (void)!write(ready[1], "r", 1);
        pause();
        _exit(0);
    }
    char ch;
    if (read(ready[0], &ch, 1) != 1)
        return -100;
    char url[600];
    snprintf(url, sizeof url, "%s?busy_timeout_ms=200", srv.url);
    idem_store *s;
    idem_layer *l;
    if (idem_store_open(&s, url) != IDEM_OK || idem_layer_new(&l, s, NULL) != IDEM_OK)
        return -100;
    idem_request req = {.key = "store-dies", .key_len = 10};
    int rc = idem_run(l, &req, ok_handler, NULL, &reply);
    snprintf(last, sizeof last, "%s", idem_last_error());
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    idem_layer_free(l);
    idem_store_close(s);
    close(ready[0]);
    close(ready[1]);
    return rc;
#else
    return -100;
#endif
}
static int c_store_back(void)
{
    int rc = IDEM_EBACKEND;
    for (int i = 0; i < 50 && rc == IDEM_EBACKEND; i++) {
        rc = run_key("store-dies", 10);
        if (rc == IDEM_EBACKEND)
            sleep_ms(100);
    }
    return rc;
}

/* A prefix that holds a ':' before its end: "p:x:" + "1" would be the same
 * store key as "p:" + "x:1", so such prefixes are refused. */
static int c_prefix_overlap(void)
{
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = "p:x:";
    idem_layer *l = NULL;
    int rc = idem_layer_new(&l, store, &o);
    idem_layer_free(l);
    return rc;
}

typedef struct bad_case {
    const char *input;      /* what is bad */
    const char *call;       /* how it is tried */
    int         expected;   /* the code it must get */
    const char *expected_outcome; /* for IDEM_OK: the outcome it must get; NULL: any */
    int       (*fn)(void);
    const char *note;       /* shown in the table */
    bool        open_issue; /* a known bug: reported, not counted as a failure until fixed */
} bad_case;

#define NEEDS_DRIVER (-1000) /* expected: EBACKEND when built in, else EUNSUPPORTED */

static const bad_case cases[] = {
    {"NULL out-pointer", "idem_store_open(NULL, url)", IDEM_EINVAL, NULL, c_open_null_out, NULL},
    {"NULL URL", "idem_store_open(&s, NULL)", IDEM_EINVAL, NULL, c_open_null_url, NULL},
    {"NULL store", "idem_layer_new(&l, NULL, NULL)", IDEM_EINVAL, NULL, c_layer_null_store, NULL},
    {"NULL layer", "idem_run(NULL, ...)", IDEM_EINVAL, NULL, c_run_null_layer, NULL},
    {"NULL request", "idem_run(l, NULL, ...)", IDEM_EINVAL, NULL, c_run_null_req, NULL},
    {"NULL handler", "idem_run(l, &req, NULL, ...)", IDEM_EINVAL, NULL, c_run_null_fn, NULL},
    {"NULL reply", "idem_run(l, &req, fn, arg, NULL)", IDEM_EINVAL, NULL, c_run_null_reply, NULL},
    {"NULL claim out-pointer", "idem_begin(l, &req, NULL, &r)", IDEM_EINVAL, NULL, c_begin_null_claim, NULL},
    {"NULL claim", "idem_commit(NULL, ...)", IDEM_EINVAL, NULL, c_commit_null, NULL},
    {"NULL claim", "idem_abort(NULL)", IDEM_EINVAL, NULL, c_abort_null, NULL},
    {"NULL claim", "idem_extend(NULL, 1000)", IDEM_EINVAL, NULL, c_extend_null, NULL},
    {"NULL response", "idem_response_set(NULL, ...)", IDEM_EINVAL, NULL, c_response_null, NULL},
    {"NULL key with length 3", "idem_run", IDEM_EINVAL, NULL, c_null_key, NULL},
    {"NULL fingerprint with length 8", "idem_run", IDEM_EINVAL, NULL, c_null_fingerprint, NULL},
    {"empty key", "idem_run", IDEM_EINVAL, NULL, c_empty_key, NULL},
    {"key of 256 bytes (limit 255)", "idem_run", IDEM_EINVAL, NULL, c_key_over, NULL},
    {"key of 255 bytes (at the limit)", "idem_run", IDEM_OK, "IDEM_EXECUTED", c_key_at, "accepted"},
    {"key with a NUL byte `a\\0b`", "idem_run", IDEM_OK, "IDEM_EXECUTED", c_key_nul,
     "keys are bytes: a distinct key"},
    {"key with CR LF `a\\r\\nb`", "idem_run", IDEM_OK, "IDEM_EXECUTED", c_key_crlf,
     "keys are bytes: a distinct key"},
    {"key with spaces `a b `", "idem_run", IDEM_OK, "IDEM_EXECUTED", c_key_space,
     "keys are bytes: a distinct key"},
    {"key `\\xff\\x00\\x80\\x7f`", "idem_run", IDEM_OK, "IDEM_EXECUTED", c_key_binary,
     "keys are bytes: a distinct key"},
    {"lease_ms 0", "idem_layer_new", IDEM_EINVAL, NULL, c_lease_zero, NULL},
    {"key_prefix of 299 bytes", "idem_layer_new", IDEM_EINVAL, NULL, c_prefix_long, NULL},
    {"unknown URL scheme `ftp://`", "idem_store_open", IDEM_EINVAL, NULL, c_scheme_unknown, NULL},
    {"empty URL", "idem_store_open", IDEM_EINVAL, NULL, c_url_empty, NULL},
    {"URL without scheme `127.0.0.1:6379`", "idem_store_open", IDEM_EINVAL, NULL, c_url_no_scheme, NULL},
    {"port 99999", "idem_store_open", IDEM_EINVAL, NULL, c_url_bad_port, NULL},
    {"IPv6 address without `]`", "idem_store_open", IDEM_EINVAL, NULL, c_url_ipv6, NULL},
    {"bad percent-escape `%zz`", "idem_store_open", IDEM_EINVAL, NULL, c_url_escape, NULL},
    {"`%00` in the path", "idem_store_open", IDEM_EINVAL, NULL, c_url_nul_escape, NULL},
    {"newline in the URL", "idem_store_open", IDEM_EINVAL, NULL, c_url_control, NULL},
    {"URL of 4999 bytes", "idem_store_open", IDEM_EINVAL, NULL, c_url_long, NULL},
    {"relative SQLite path `sqlite://relative.db`", "idem_store_open", IDEM_EINVAL, NULL, c_url_relative,
     NULL},
    {"parameter not a number `busy_timeout_ms=soon`", "idem_store_open", IDEM_EINVAL, NULL, c_url_param,
     NULL},
    {"unknown parameter `nosuch=1`", "idem_store_open", IDEM_EINVAL, NULL, c_url_unknown_param, NULL},
    {"unreachable host: redis on a closed port", "idem_store_open", NEEDS_DRIVER, NULL,
     c_unreachable_redis, "IDEM_EUNSUPPORTED when the redis driver is not built in"},
    {"unreachable host: memcached on a closed port", "idem_store_open, then idem_run", NEEDS_DRIVER, NULL,
     c_unreachable_memcached, "IDEM_EUNSUPPORTED when the memcached driver is not built in"},
    {"unresolvable host `host.invalid`", "idem_store_open", NEEDS_DRIVER, NULL, c_unreachable_host,
     "IDEM_EUNSUPPORTED when the redis driver is not built in"},
    {"SQLite file in a missing directory", "idem_store_open", IDEM_EBACKEND, NULL, c_sqlite_no_dir, NULL},
    {"store dies mid-request (server SIGKILLed; SQLite: write lock held past busy_timeout_ms)",
     "idem_run", IDEM_EBACKEND, NULL, c_store_dies, "the handler does not run"},
    {"... and comes back", "idem_run, retried", IDEM_OK, "IDEM_EXECUTED", c_store_back, NULL},
    {"record this library did not write (`{\"status\":\"done\"}`)", "idem_run", IDEM_ECORRUPT, NULL,
     c_foreign_record, "the handler does not run"},
    {"record of ours cut by one byte", "idem_run", IDEM_ECORRUPT, NULL, c_truncated_record,
     "the handler does not run"},
    {"record of a future format version", "idem_run", IDEM_ECORRUPT, NULL, c_future_version,
     "the handler does not run"},
    {"response of 1 MiB + 1 byte", "idem_response_set in a handler", IDEM_ETOOBIG, NULL, c_response_over,
     "the handler fails: nothing stored, the key is freed"},
    {"response of 1 MiB + 1 byte", "idem_commit", IDEM_ETOOBIG, NULL, c_commit_over,
     "the claim stays: commit a smaller one or abort"},
    {"status 99", "idem_response_set in a handler", IDEM_EINVAL, NULL, c_status_range, NULL},
    {"status 1000", "idem_commit", IDEM_EINVAL, NULL, c_commit_status, NULL},
    {"header field value with CR LF", "idem_response_add_header in a handler", IDEM_EINVAL, NULL,
     c_field_crlf, "the handler fails: nothing stored, the key is freed"},
    {"header field name `Bad Name`", "idem_commit_headers", IDEM_EINVAL, NULL, c_commit_field_name,
     "the claim stays"},
    {"65 header fields (limit 64)", "idem_response_add_header in a handler", IDEM_ETOOBIG, NULL,
     c_fields_over, "the first 64 stay"},
    {"client's Idempotency-Key `\"abc` (no closing quote)", "idem_http_key_parse", IDEM_EKEY, NULL,
     c_http_key, "the message is fit to show the client (400)"},
    {"key_prefix `p:x:` (it would meet `p:` with key `x:1`)", "idem_layer_new", IDEM_EINVAL, NULL,
     c_prefix_overlap, NULL},
};

static bool driver_built(const char *name)
{
    for (size_t i = 0; idem__builtin_backends[i]; i++)
        if (strcmp(idem__builtin_backends[i]->name, name) == 0)
            return true;
    return false;
}

/* Escape | for a markdown table cell. */
static void cell(const char *s)
{
    for (; *s; s++) {
        if (*s == '|')
            fputs("\\|", stdout);
        else if (*s == '\n')
            fputs(" ", stdout);
        else
            fputc(*s, stdout);
    }
}

int main(int argc, char **argv)
{
    bool table = false;
    const char *env = getenv("IDEM_TEST_BACKEND");
    if (env && *env)
        kind = env;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--table") == 0)
            table = true;
        else if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc)
            kind = argv[++i];
        else {
            fprintf(stderr, "usage: bad_inputs [--backend KIND] [--table]\n");
            return 2;
        }
    }
    if (idem_test_server_start(&srv, kind) != 0) {
        fprintf(stderr, "bad_inputs: cannot start a %s store\n", kind);
        return 1;
    }
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = "bad:";
    o.lease_ms = 5000;
    if (idem_store_open(&store, srv.url) != IDEM_OK || idem_layer_new(&layer, store, &o) != IDEM_OK) {
        fprintf(stderr, "bad_inputs: cannot open %s: %s\n", srv.url, idem_last_error());
        idem_test_server_stop(&srv);
        return 1;
    }
    if (table) {
        printf("| bad input | call | code | outcome | idem_last_error() | note |\n");
        printf("|---|---|---|---|---|---|\n");
    }
    int failed = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        last[0] = '\0';
        outcome = NULL;
        idem_reply_clear(&reply);
        int rc = c->fn();
        if (!last[0])
            snprintf(last, sizeof last, "%s", rc == IDEM_OK ? "" : idem_last_error());
        int expected = c->expected;
        if (expected == NEEDS_DRIVER) {
            const char *drv = strstr(c->input, "memcached") ? "memcached" : "redis";
            expected = driver_built(drv) ? IDEM_EBACKEND : IDEM_EUNSUPPORTED;
        }
        bool good = rc == expected && (rc == IDEM_OK ? !c->expected_outcome ||
                                       (outcome && strcmp(outcome, c->expected_outcome) == 0)
                                                     : last[0] != '\0');
        if (!good) {
            failed += !c->open_issue;
            fprintf(stderr, "bad_inputs: %s: %s (%s): expected %s%s%s, got %s%s%s: %s\n",
                    c->open_issue ? "OPEN ISSUE" : "FAIL", c->input, c->call,
                    idem_error_name(expected), c->expected_outcome ? " " : "",
                    c->expected_outcome ? c->expected_outcome : "", idem_error_name(rc), outcome ? " " : "",
                    outcome ? outcome : "", last);
        }
        if (table) {
            printf("| ");
            cell(c->input);
            printf(" | `%s` | `%s` | %s | ", c->call, idem_error_name(rc), outcome ? outcome : "");
            if (last[0]) {
                printf("`");
                cell(last);
                printf("`");
            }
            printf(" | %s%s |\n", good || c->open_issue ? "" : "**UNEXPECTED** ", c->note ? c->note : "");
        }
    }
    idem_reply_clear(&reply);
    idem_layer_free(layer);
    idem_store_close(store);
    idem_test_server_stop(&srv);
    if (!table)
        printf("bad_inputs (%s): %zu cases, %d unexpected\n", kind, sizeof cases / sizeof cases[0], failed);
    return failed ? 1 : 0;
}
