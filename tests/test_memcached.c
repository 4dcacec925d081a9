/*
 * The memcached driver's own tests: what the conformance suite cannot see
 * from outside the driver. Key encoding against memcached's key rules, the
 * item size limit, servers that die and come back, records that vanish, and
 * expiries beyond memcached's 30-day relative limit. Each test starts its
 * own servers; a missing memcached fails the tests, nothing is skipped.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <openssl/evp.h>

#include <idempotency/idempotency.h>

#include "harness.h"
#include "internal.h"
#include "memcached_server.h"
#include "support/testutil.h"

#define ITEM_OVERHEAD_OF_DRIVER 320   /* what the driver reserves beside a value */
#define ENVELOPE                8     /* the driver's deadline before each record */
#define COMPLETED_OVERHEAD      72    /* a COMPLETED record's header */

static idem_test_server srv;

static void stop_servers(void)
{
    idem_test_server_stop(&srv);
}

TestSuite(memcached, .fini = stop_servers, .timeout = 120);

static void start(int nservers)
{
    cr_assert_eq(idem_test_server_start(&srv, nservers == 1 ? "memcached" : "memcached2"), 0,
                 "cannot start memcached (apt-get install memcached)");
}

static idem_store *open_store(const char *url)
{
    idem_store *s = NULL;
    int rc = idem_store_open(&s, url);
    cr_assert_eq(rc, IDEM_OK, "idem_store_open(%s): %s", url, idem_last_error());
    return s;
}

static idem_layer *new_layer(idem_store *s, uint32_t lease_ms, uint32_t ttl_s)
{
    idem_options o;
    idem_options_init(&o);
    o.lease_ms = lease_ms;
    o.ttl_s = ttl_s;
    o.max_key_len = 1024;
    idem_layer *l = NULL;
    cr_assert_eq(idem_layer_new(&l, s, &o), IDEM_OK, "%s", idem_last_error());
    return l;
}

/* ---- a raw text-protocol client, to look behind the library's back ---- */

static bool finished(const char *buf, size_t len)
{
    static const char *const last[] = {"END\r\n", "STORED\r\n", "NOT_STORED\r\n", "DELETED\r\n",
                                       "NOT_FOUND\r\n", "EXISTS\r\n", "OK\r\n"};
    for (size_t i = 0; i < sizeof last / sizeof last[0]; i++) {
        size_t n = strlen(last[i]);
        if (len >= n && memcmp(buf + len - n, last[i], n) == 0 && (len == n || buf[len - n - 1] == '\n'))
            return true;
    }
    /* an error line: ERROR, CLIENT_ERROR ..., SERVER_ERROR ... */
    if (len >= 2 && buf[len - 2] == '\r' && buf[len - 1] == '\n') {
        const char *line = buf + len - 2;
        while (line > buf && line[-1] != '\n')
            line--;
        return strncmp(line, "ERROR", 5) == 0 || strncmp(line, "CLIENT_ERROR", 12) == 0 ||
               strncmp(line, "SERVER_ERROR", 12) == 0;
    }
    return false;
}

/* Send cmd to the server on port; its whole answer in a malloc'd string. */
static char *raw(uint16_t port, const void *cmd, size_t cmd_len)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "raw connect to %u: %s", port,
                 strerror(errno));
    for (size_t off = 0; off < cmd_len;) {
        ssize_t n = write(fd, (const char *)cmd + off, cmd_len - off);
        cr_assert_gt(n, 0, "raw write: %s", strerror(errno));
        off += (size_t)n;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (!finished(buf, len)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        cr_assert_gt(poll(&p, 1, 5000), 0, "raw: no answer from memcached on %u", port);
        if (cap - len < 2048)
            buf = realloc(buf, cap *= 2);
        ssize_t n = read(fd, buf + len, cap - len - 1);
        cr_assert_gt(n, 0, "raw read: %s", n < 0 ? strerror(errno) : "closed");
        len += (size_t)n;
    }
    buf[len] = '\0';
    close(fd);
    return buf;
}

static char *raw_str(uint16_t port, const char *cmd)
{
    return raw(port, cmd, strlen(cmd));
}

static int hexval(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c - 'a' + 10;
}

/* The keys on a server, as stored (memcached's metadump escapes them). */
typedef struct dump {
    char   *keys[512];
    long    exp[512];
    size_t  n;
} dump;

static void metadump_once(uint16_t port, dump *d)
{
    memset(d, 0, sizeof *d);
    /* The crawler answers BUSY while it runs a crawl of its own: ask again. */
    char *all = raw_str(port, "lru_crawler metadump all\r\n");
    for (int tries = 0; strncmp(all, "BUSY", 4) == 0 && tries < 200; tries++) {
        free(all);
        usleep(10000);
        all = raw_str(port, "lru_crawler metadump all\r\n");
    }
    cr_assert(strncmp(all, "BUSY", 4) != 0, "memcached's LRU crawler stayed busy for 2 s");
    for (char *line = all; (line = strstr(line, "key=")) != NULL; line++) {
        cr_assert_lt(d->n, 512u);
        char *end = strchr(line, ' ');
        cr_assert(end);
        char *k = malloc((size_t)(end - line));
        size_t n = 0;
        for (char *p = line + 4; p < end; p++) {
            if (*p == '%' && p + 2 < end) {
                k[n++] = (char)(hexval(p[1]) << 4 | hexval(p[2]));
                p += 2;
            } else {
                k[n++] = *p;
            }
        }
        k[n] = '\0';
        char *e = strstr(end, "exp=");
        d->exp[d->n] = e ? strtol(e + 4, NULL, 10) : 0;
        d->keys[d->n++] = k;
    }
    free(all);
}

static void dump_free(dump *d);

/* A crawl can miss items that the LRU maintainer is moving at that moment:
 * crawl again until at least `at_least` items are seen (2 s at most). */
static void metadump(uint16_t port, dump *d, size_t at_least)
{
    metadump_once(port, d);
    for (int tries = 0; d->n < at_least && tries < 100; tries++) {
        dump_free(d);
        usleep(20000);
        metadump_once(port, d);
    }
}

static void dump_free(dump *d)
{
    for (size_t i = 0; i < d->n; i++)
        free(d->keys[i]);
}

/* ---- handlers ---- */

typedef struct job {
    atomic_int calls;
    char       body[64];
    size_t     big;          /* set a body of this many bytes instead */
    int        set_rc;       /* what idem_response_set returned */
    void     (*during)(void *arg);
    void      *during_arg;
} job;

static int job_handler(void *arg, idem_response *resp)
{
    job *j = arg;
    atomic_fetch_add(&j->calls, 1);
    if (j->during)
        j->during(j->during_arg);
    if (j->big) {
        char *b = malloc(j->big);
        memset(b, 'b', j->big);
        j->set_rc = idem_response_set(resp, 200, b, j->big);
        free(b);
    } else {
        j->set_rc = idem_response_set(resp, 200, j->body, strlen(j->body));
    }
    return j->set_rc == IDEM_OK ? 0 : 1;
}

static int run(idem_layer *l, const void *key, size_t len, job *j, idem_reply *r)
{
    idem_request req = {.key = key, .key_len = len};
    idem_reply_clear(r);
    return idem_run(l, &req, job_handler, j, r);
}

/* ---- keys ---- */

#define NKEYS 24

Test(memcached, binary_and_long_keys_encode_to_at_most_250_allowed_bytes_and_never_collide)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);

    /* "idem:" (5 bytes) is the layer's prefix: 245 plain bytes fill 250. */
    static char keys[NKEYS][1025];
    size_t lens[NKEYS];
    int n = 0;
#define KEY(lit) (memcpy(keys[n], lit, sizeof lit - 1), lens[n++] = sizeof lit - 1)
    KEY("a b");
    KEY("a%20b");
    KEY("a_b");
    KEY("a\0b");
    KEY("a\r\nb");
    KEY("a\nb");
    KEY("a\rb");
    KEY("%");
    KEY("%25");
    KEY("\xff");
    KEY("%FF");
    KEY("\x7f");
    KEY(" ");
    KEY("\0");
#undef KEY
    memset(keys[n], 'x', 245), lens[n++] = 245;                   /* encodes to exactly 250 */
    memset(keys[n], 'x', 246), lens[n++] = 246;                   /* 251: hashed */
    memset(keys[n], 'x', 247), lens[n++] = 247;                   /* hashed, differs from 246 */
    memset(keys[n], '\n', 81), lens[n++] = 81;                    /* 5 + 243 = 248 */
    memset(keys[n], '\n', 82), lens[n++] = 82;                    /* 5 + 246 = 251: hashed */
    memset(keys[n], 'y', 1024), keys[n][1023] = '1', lens[n++] = 1024;
    memset(keys[n], 'y', 1024), keys[n][1023] = '2', lens[n++] = 1024;
    memset(keys[n], ' ', 1024), lens[n++] = 1024;
    /* A key spelling the hashed form of another key must not meet it. */
    {
        uint8_t full[6 + 246], digest[32];
        unsigned int dl;
        memcpy(full, "idem:", 5);
        memset(full + 5, 'x', 246);
        cr_assert(EVP_Digest(full, 251, digest, &dl, EVP_sha256(), NULL));
        int m = sprintf(keys[n], "%%%%sha256:");
        for (int i = 0; i < 32; i++)
            m += sprintf(keys[n] + m, "%02x", digest[i]);
        lens[n++] = (size_t)m;
        /* and a key whose plain encoding has the same letters without '%' */
        memcpy(keys[n], keys[n - 1] + 2, (size_t)m - 2);
        lens[n] = (size_t)m - 2;
        n++;
    }
    cr_assert_eq(n, NKEYS);

    for (int i = 0; i < NKEYS; i++) {
        job j = {0};
        snprintf(j.body, sizeof j.body, "key %d", i);
        idem_reply r = {0};
        int rc = run(l, keys[i], lens[i], &j, &r);
        cr_assert_eq(rc, IDEM_OK, "key %d: %s", i, idem_last_error());
        cr_assert_eq(r.outcome, IDEM_EXECUTED, "key %d met the record of another key", i);
        idem_reply_clear(&r);
    }
    for (int i = 0; i < NKEYS; i++) {
        job j = {0};
        char want[64];
        snprintf(want, sizeof want, "key %d", i);
        idem_reply r = {0};
        cr_assert_eq(run(l, keys[i], lens[i], &j, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_eq(r.outcome, IDEM_REPLAYED, "key %d", i);
        cr_assert_str_eq((char *)r.body, want, "key %d found another key's record", i);
        idem_reply_clear(&r);
    }

    dump d;
    metadump(srv.ports[0], &d, NKEYS);
    cr_assert_eq(d.n, (size_t)NKEYS, "one item per key, found %zu", d.n);
    for (size_t i = 0; i < d.n; i++) {
        size_t len = strlen(d.keys[i]);
        cr_assert(len >= 1 && len <= 250, "stored key of %zu bytes: %s", len, d.keys[i]);
        for (size_t k = 0; k < len; k++)
            cr_assert((unsigned char)d.keys[i][k] > 0x20 && (unsigned char)d.keys[i][k] < 0x7f,
                      "byte 0x%02x in stored key %s", (unsigned char)d.keys[i][k], d.keys[i]);
        if (strncmp(d.keys[i], "idem:xxxx", 9) == 0)
            cr_assert(len == 250, "the 245-byte key is stored as is, 250 bytes, not %zu", len);
    }
    dump_free(&d);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- item size ---- */

static void fill_key(char *k, size_t len)
{
    memset(k, 'k', len);
}

Test(memcached, response_over_the_servers_item_size_is_refused_when_set_before_anything_is_stored)
{
    /* -I below the default slab chunk needs a smaller chunk too. */
    static const char *const small[] = {"-I", "64k", "-o", "slab_chunk_max=32768", NULL};
    memset(&srv, 0, sizeof srv);
    srv.dir = idem_test_tmpdir("memcached-small");
    cr_assert(srv.dir);
    cr_assert_eq(idem_test_start_memcached_with(&srv, 1, small), 0);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);

    const size_t limit = 65536 - ITEM_OVERHEAD_OF_DRIVER - ENVELOPE - COMPLETED_OVERHEAD;
    char key[246];
    fill_key(key, 245); /* "idem:" + 245 bytes: the longest key that is not hashed */

    job over = {.big = limit + 1};
    idem_reply r = {0};
    cr_assert_eq(run(l, key, 245, &over, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(over.set_rc, IDEM_ETOOBIG, "idem_response_set of %zu bytes gave %d", limit + 1, over.set_rc);
    cr_assert_eq(r.outcome, IDEM_FAILED, "the handler could not set its response, so it failed");
    char get[300];
    snprintf(get, sizeof get, "get idem:%.*s\r\n", 245, key);
    char *ans = raw_str(srv.ports[0], get);
    cr_assert_str_eq(ans, "END\r\n", "nothing is stored under the key");
    free(ans);

    job at = {.big = limit};
    cr_assert_eq(run(l, key, 245, &at, &r), IDEM_OK, "a response at the limit: %s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(run(l, key, 245, &at, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(r.body_len, limit, "the response at the limit is stored whole");
    idem_reply_clear(&r);

    /* Our limit is what the server takes, within a few bytes: 8 more than
     * the driver would ever send under a 250-byte key does not fit. */
    size_t value = limit + COMPLETED_OVERHEAD + ENVELOPE + 8;
    size_t hdr_cap = 400;
    char *cmd = malloc(hdr_cap + value + 2);
    int h = snprintf(cmd, hdr_cap, "set idem:%.*s 1 0 %zu\r\n", 245, key, value);
    memset(cmd + h, 'v', value);
    memcpy(cmd + h + value, "\r\n", 2);
    ans = raw(srv.ports[0], cmd, (size_t)h + value + 2);
    cr_assert(strstr(ans, "SERVER_ERROR"), "a value %zu bytes larger than ours was stored: the driver's "
              "item overhead is too generous (%s)", value - limit - COMPLETED_OVERHEAD - ENVELOPE, ans);
    free(ans);
    free(cmd);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- failing servers ---- */

#define SPREAD 40

static bool message_names(const char *msg, uint16_t port)
{
    char want[64];
    snprintf(want, sizeof want, "memcached 127.0.0.1:%u: ", port);
    return strncmp(msg, want, strlen(want)) == 0;
}

Test(memcached, with_two_servers_a_dead_one_fails_only_its_own_keys_and_they_work_after_restart)
{
    start(2);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);
    char key[32];
    for (int i = 0; i < SPREAD; i++) {
        job j = {.body = "first"};
        idem_reply r = {0};
        int n = snprintf(key, sizeof key, "k%d", i);
        cr_assert_eq(run(l, key, (size_t)n, &j, &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_eq(r.outcome, IDEM_EXECUTED);
        idem_reply_clear(&r);
    }

    idem_test_server_kill(&srv, 1);
    bool on_dead[SPREAD];
    int dead = 0, alive = 0;
    for (int i = 0; i < SPREAD; i++) {
        job j = {.body = "second"};
        idem_reply r = {0};
        int n = snprintf(key, sizeof key, "k%d", i);
        int rc = run(l, key, (size_t)n, &j, &r);
        on_dead[i] = rc != IDEM_OK;
        if (rc == IDEM_OK) {
            alive++;
            cr_assert_eq(r.outcome, IDEM_REPLAYED, "a key on the live server still replays");
            cr_assert_str_eq((char *)r.body, "first");
        } else {
            dead++;
            cr_assert_eq(rc, IDEM_EBACKEND);
            cr_assert(message_names(idem_last_error(), srv.ports[1]), "%s", idem_last_error());
            cr_assert(strstr(idem_last_error(), "is memcached running? start one with: memcached -p"),
                      "%s", idem_last_error());
            cr_assert_eq(atomic_load(&j.calls), 0, "nothing runs when the store is down");
        }
        idem_reply_clear(&r);
    }
    cr_assert(dead > 0 && alive > 0, "ketama spread %d keys on the dead server, %d on the live one", dead,
              alive);
    /* Not remapped: the live server never saw the dead server's keys. */
    for (int i = 0; i < SPREAD; i++) {
        if (!on_dead[i])
            continue;
        char get[64];
        snprintf(get, sizeof get, "get idem:k%d\r\n", i);
        char *ans = raw_str(srv.ports[0], get);
        cr_assert_str_eq(ans, "END\r\n", "key k%d moved to the live server", i);
        free(ans);
    }

    cr_assert_eq(idem_test_server_restart(&srv, 1), 0);
    /* At once, no waiting: the restarted server lost its records (the
     * documented weakness of memcached), so its keys run again. */
    for (int i = 0; i < SPREAD; i++) {
        job j = {.body = "third"};
        idem_reply r = {0};
        int n = snprintf(key, sizeof key, "k%d", i);
        int rc = run(l, key, (size_t)n, &j, &r);
        cr_assert_eq(rc, IDEM_OK, "k%d right after the restart: %s", i, idem_last_error());
        cr_assert_eq(r.outcome, on_dead[i] ? IDEM_EXECUTED : IDEM_REPLAYED, "k%d", i);
        idem_reply_clear(&r);
    }
    idem_layer_free(l);
    idem_store_close(s);
}

/* Claim SPREAD keys through one URL, then try them through others naming
 * the same two servers: every one must meet the first claim. */
Test(memcached, every_spelling_and_order_of_the_same_servers_sends_a_key_to_the_same_server)
{
    start(2);
    char urls[3][160];
    snprintf(urls[0], sizeof urls[0], "memcached://127.0.0.1:%u,127.0.0.1:%u", srv.ports[0], srv.ports[1]);
    snprintf(urls[1], sizeof urls[1], "memcached://localhost:%u,localhost:%u", srv.ports[0], srv.ports[1]);
    snprintf(urls[2], sizeof urls[2], "memcached://localhost:%u,127.0.0.1:%u", srv.ports[1], srv.ports[0]);
    idem_store *s[3];
    idem_layer *l[3];
    for (int u = 0; u < 3; u++) {
        s[u] = open_store(urls[u]);
        l[u] = new_layer(s[u], 10000, 3600);
    }
    idem_claim *held[SPREAD];
    for (int i = 0; i < SPREAD; i++) {
        char key[32];
        int n = snprintf(key, sizeof key, "spell%d", i);
        idem_request req = {.key = key, .key_len = (size_t)n};
        idem_reply r = {0};
        cr_assert_eq(idem_begin(l[0], &req, &held[i], &r), IDEM_OK, "%s", idem_last_error());
        cr_assert_not_null(held[i], "%s is new", key);
        for (int u = 1; u < 3; u++) {
            idem_claim *dup = NULL;
            cr_assert_eq(idem_begin(l[u], &req, &dup, &r), IDEM_OK, "%s", idem_last_error());
            if (dup)
                idem_abort(dup);
            cr_assert_null(dup, "%s claimed twice: through %s and through %s (they name the same "
                           "servers)", key, urls[0], urls[u]);
            cr_assert_eq(r.outcome, IDEM_IN_PROGRESS);
        }
    }
    for (int i = 0; i < SPREAD; i++)
        cr_assert_eq(idem_abort(held[i]), IDEM_OK, "%s", idem_last_error());
    for (int u = 0; u < 3; u++) {
        idem_layer_free(l[u]);
        idem_store_close(s[u]);
    }

    /* One server under two names is one server named twice. */
    char twice[160];
    snprintf(twice, sizeof twice, "memcached://127.0.0.1:%u,localhost:%u", srv.ports[0], srv.ports[0]);
    idem_store *bad = NULL;
    cr_assert_eq(idem_store_open(&bad, twice), IDEM_EINVAL, "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "twice"), "%s", idem_last_error());

    /* Messages name the server as the URL wrote it, and its address. */
    uint16_t nobody = idem_test_free_port();
    char gone[160], want[96];
    snprintf(gone, sizeof gone, "memcached://localhost:%u", nobody);
    cr_assert_eq(idem_store_open(&bad, gone), IDEM_EBACKEND);
    snprintf(want, sizeof want, "memcached localhost:%u (127.0.0.1): ", nobody);
    cr_assert(strncmp(idem_last_error(), want, strlen(want)) == 0, "%s", idem_last_error());
}

static void delete_behind_the_back(void *arg)
{
    char *ans = raw_str(*(uint16_t *)arg, "delete idem:vanish\r\n");
    cr_assert_str_eq(ans, "DELETED\r\n");
    free(ans);
}

Test(memcached, record_deleted_behind_the_librarys_back_while_the_handler_runs_makes_the_commit_lost)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);
    job j = {.body = "done", .during = delete_behind_the_back, .during_arg = &srv.ports[0]};
    idem_reply r = {0};
    /*
     * What this means for a user: the handler ran and its effect happened,
     * but its response could not be stored because the claim vanished (here
     * deleted by hand; in production memcached evicting it under memory
     * pressure, or a restart). idem_run says IDEM_ELOST, and a retry of the
     * same key runs the handler again. memcached cannot promise once-only
     * under eviction; give it memory to spare, or use Redis or SQLite.
     */
    int rc = run(l, "vanish", 6, &j, &r);
    cr_assert_eq(rc, IDEM_ELOST, "got %d: %s", rc, idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "the handler did run");
    cr_assert_eq(atomic_load(&j.calls), 1);
    job again = {.body = "again"};
    cr_assert_eq(run(l, "vanish", 6, &again, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED, "nothing was stored, so the retry runs the handler again");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(memcached, claim_whose_server_restarts_gets_ebackend_at_commit_and_the_next_requests_succeed)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 400, 3600);
    idem_request req = {.key = "held", .key_len = 4};
    idem_claim *c = NULL;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);

    idem_test_server_kill(&srv, 0);
    uint64_t t0 = mono_ms();
    int rc = idem_commit(c, 200, "x", 1);
    cr_assert_eq(rc, IDEM_EBACKEND, "%s", idem_last_error());
    cr_assert(message_names(idem_last_error(), srv.ports[0]), "%s", idem_last_error());
    cr_assert_lt(mono_ms() - t0, 2000u, "commit retries only within the 400 ms lease");
    cr_assert_eq(idem_abort(c), IDEM_EBACKEND, "the store is still down");

    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    job j = {.body = "after"};
    cr_assert_eq(run(l, "next", 4, &j, &r), IDEM_OK, "the first request after the restart: %s",
                 idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

/* Threads running requests while the server goes down and comes back. */
typedef struct hammer {
    idem_layer      *layer;
    int              id;
    _Atomic uint64_t *restarted_at;  /* monotonic ms when the server is back; 0 before */
    atomic_bool     *stop;
    int              ok, backend, other, late_failures;
    char             late_msg[256];
} hammer;

static void *hammer_run(void *arg)
{
    hammer *h = arg;
    for (int i = 0; !atomic_load(h->stop); i++) {
        char key[32];
        int n = snprintf(key, sizeof key, "h%d-%d", h->id, i);
        uint64_t begun = mono_ms();
        uint64_t back = atomic_load(h->restarted_at);
        job j = {.body = "ok"};
        idem_reply r = {0};
        int rc = run(h->layer, key, (size_t)n, &j, &r);
        idem_reply_clear(&r);
        if (rc == IDEM_OK)
            h->ok++;
        else if (rc == IDEM_EBACKEND)
            h->backend++;
        else
            h->other++;
        if (rc != IDEM_OK && back && begun >= back && h->late_failures++ == 0)
            snprintf(h->late_msg, sizeof h->late_msg, "%s", idem_last_error());
        sleep_ms(2);
    }
    return NULL;
}

Test(memcached, server_restart_mid_run_costs_only_the_requests_in_flight)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 300, 3600);
    enum { THREADS = 6 };
    hammer h[THREADS];
    pthread_t t[THREADS];
    _Atomic uint64_t restarted_at = 0;
    atomic_bool stop = false;
    for (int i = 0; i < THREADS; i++) {
        h[i] = (hammer){.layer = l, .id = i, .restarted_at = &restarted_at, .stop = &stop};
        pthread_create(&t[i], NULL, hammer_run, &h[i]);
    }
    sleep_ms(300); /* every thread has pooled connections by now */
    idem_test_server_kill(&srv, 0);
    sleep_ms(400);
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    atomic_store(&restarted_at, mono_ms());
    sleep_ms(500);
    atomic_store(&stop, true);
    int ok = 0, backend = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        ok += h[i].ok;
        backend += h[i].backend;
        cr_assert_eq(h[i].other, 0, "only IDEM_EBACKEND while the server is away");
        cr_assert_eq(h[i].late_failures, 0, "thread %d failed %d requests begun after the restart: %s", i,
                     h[i].late_failures, h[i].late_msg);
    }
    cr_assert_gt(backend, 0, "some requests met the dead server");
    cr_assert_gt(ok, 0);
    idem_layer_free(l);
    idem_store_close(s);
}

typedef struct burst {
    idem_layer *layer;
    int         id, round, rc;
    char        msg[256];
} burst;

static void *burst_run(void *arg)
{
    burst *b = arg;
    char key[32];
    int n = snprintf(key, sizeof key, "b%d-%d", b->id, b->round);
    job j = {.body = "ok"};
    idem_reply r = {0};
    b->rc = run(b->layer, key, (size_t)n, &j, &r);
    if (b->rc)
        snprintf(b->msg, sizeof b->msg, "%s", idem_last_error());
    idem_reply_clear(&r);
    return NULL;
}

/* THREADS requests at once: each takes a connection of its own from the pool. */
static void burst_all(idem_layer *l, int round)
{
    enum { THREADS = 6 };
    burst b[THREADS];
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) {
        b[i] = (burst){.layer = l, .id = i, .round = round};
        pthread_create(&t[i], NULL, burst_run, &b[i]);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(t[i], NULL);
        cr_assert_eq(b[i].rc, IDEM_OK, "round %d, thread %d: %s", round, i, b[i].msg);
    }
}

Test(memcached, restart_while_idle_leaves_no_stale_connection_to_fail_the_next_requests)
{
    start(2);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);
    burst_all(l, 0); /* the pool now holds connections to both servers */
    cr_assert_eq(idem_test_server_restart(&srv, 0), 0);
    cr_assert_eq(idem_test_server_restart(&srv, 1), 0);
    burst_all(l, 1); /* every pooled socket is to a server that died */
    burst_all(l, 2);
    idem_layer_free(l);
    idem_store_close(s);
}

/* Has every thread of pid reached the stopped state ('T' in its stat)? */
static bool all_threads_stopped(pid_t pid, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 5) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
        DIR *d = opendir(path);
        if (!d)
            return false;
        bool all = true;
        int seen = 0;
        for (struct dirent *e; (e = readdir(d)) != NULL;) {
            if (e->d_name[0] == '.')
                continue;
            char stat[384], buf[512];
            snprintf(stat, sizeof stat, "%s/%s/stat", path, e->d_name);
            FILE *f = fopen(stat, "r");
            size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
            if (f)
                fclose(f);
            buf[n] = '\0';
            const char *close_paren = strrchr(buf, ')'); /* the state follows "(comm) " */
            seen++;
            if (!close_paren || close_paren[1] != ' ' || (close_paren[2] != 'T' && close_paren[2] != 't'))
                all = false;
        }
        closedir(d);
        if (all && seen > 0)
            return true;
        sleep_ms(5);
    }
    return false;
}

Test(memcached, server_that_stops_answering_costs_timeout_ms_not_a_hang)
{
    start(1);
    char url[256];
    snprintf(url, sizeof url, "%s?timeout_ms=200", srv.url);
    idem_store *s = open_store(url);
    idem_layer *l = new_layer(s, 10000, 3600);
    job j = {.body = "warm"};
    idem_reply r = {0};
    cr_assert_eq(run(l, "warm", 4, &j, &r), IDEM_OK, "%s", idem_last_error());

    kill(srv.pids[0], SIGSTOP); /* connected, but never answers */
    /* kill() returns before the server's threads stop: on a busy machine a
     * worker thread could still answer the claim, and then the commit is
     * retried for the whole lease (10 s), as it must be. Wait until every
     * thread is stopped, so what is timed is one call to a silent server. */
    cr_assert(all_threads_stopped(srv.pids[0], 5000), "memcached did not stop within 5 s");
    int calls = atomic_load(&j.calls);
    uint64_t t0 = mono_ms();
    int rc = run(l, "frozen", 6, &j, &r);
    uint64_t took = mono_ms() - t0;
    kill(srv.pids[0], SIGCONT);
    cr_assert_eq(atomic_load(&j.calls), calls, "the claim reached the stopped server: %s",
                 idem_last_error());
    cr_assert_eq(rc, IDEM_EBACKEND, "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "no answer within 200 ms"), "%s", idem_last_error());
    cr_assert_lt(took, 1000u, "took %llu ms with timeout_ms=200", (unsigned long long)took);

    cr_assert_eq(run(l, "thawed", 6, &j, &r), IDEM_OK, "once it answers again: %s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- expiry ---- */

static long exp_of(uint16_t port, const char *key)
{
    long exp = 0;
    bool found = false;
    for (int tries = 0; !found && tries < 100; tries++) {
        dump d;
        if (tries)
            usleep(20000);
        metadump(port, &d, 1);
        for (size_t i = 0; i < d.n; i++)
            if (strcmp(d.keys[i], key) == 0) {
                exp = d.exp[i];
                found = true;
            }
        dump_free(&d);
    }
    cr_assert(found, "no item %s on the server", key);
    return exp;
}

Test(memcached, ttl_over_thirty_days_is_sent_as_an_absolute_time_and_the_record_stays_readable)
{
    start(1);
    idem_store *s = open_store(srv.url);
    const uint32_t forty_days = 40u * 86400u;
    idem_layer *l = new_layer(s, 10000, forty_days);
    job j = {.body = "long"};
    idem_reply r = {0};
    cr_assert_eq(run(l, "forty", 5, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_EXECUTED);
    cr_assert_eq(run(l, "forty", 5, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED, "a relative expiry over 30 days would have expired it at once");
    cr_assert_str_eq((char *)r.body, "long");
    long exp = exp_of(srv.ports[0], "idem:forty"); /* absolute Unix time */
    long left = exp - (long)time(NULL);
    cr_assert(left > (long)forty_days - 5 && left < (long)forty_days + 5, "expires in %ld s", left);
    idem_layer_free(l);

    /* Beyond what memcached can represent (2038): kept, and expired by us. */
    l = new_layer(s, 10000, UINT32_MAX);
    cr_assert_eq(run(l, "forever", 7, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(run(l, "forever", 7, &j, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(r.outcome, IDEM_REPLAYED);
    cr_assert_eq(exp_of(srv.ports[0], "idem:forever"), -1, "no server expiry");
    idem_reply_clear(&r);
    idem_layer_free(l);
    idem_store_close(s);
}

Test(memcached, abort_empties_the_key_at_once_though_memcached_counts_whole_seconds)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);
    idem_request req = {.key = "gone", .key_len = 4};
    idem_claim *c = NULL;
    idem_reply r = {0};
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(idem_abort(c), IDEM_OK, "%s", idem_last_error());
    char *ans = raw_str(srv.ports[0], "get idem:gone\r\n");
    cr_assert_str_eq(ans, "END\r\n", "the released key is empty");
    free(ans);
    cr_assert_eq(idem_begin(l, &req, &c, &r), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c, "the next claim takes the key at once");
    cr_assert_eq(idem_commit(c, 200, "y", 1), IDEM_OK, "%s", idem_last_error());
    idem_layer_free(l);
    idem_store_close(s);
}

Test(memcached, value_another_program_wrote_is_corrupt_and_never_overwritten)
{
    start(1);
    idem_store *s = open_store(srv.url);
    idem_layer *l = new_layer(s, 10000, 3600);
    char *ans = raw_str(srv.ports[0], "set idem:theirs 0 0 5\r\nhello\r\n");
    cr_assert_str_eq(ans, "STORED\r\n");
    free(ans);
    job j = {.body = "mine"};
    idem_reply r = {0};
    cr_assert_eq(run(l, "theirs", 6, &j, &r), IDEM_ECORRUPT);
    cr_assert_eq(atomic_load(&j.calls), 0);
    ans = raw_str(srv.ports[0], "get idem:theirs\r\n");
    cr_assert(strstr(ans, "hello"), "%s", ans);
    free(ans);
    idem_layer_free(l);
    idem_store_close(s);
}

/* ---- the driver's own claim, called directly ---- */

#define DRIVER_FLAGS 0x69646d31u /* the item flags the driver marks its items with */

static void be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

/* A record as the core writes it: header, and for COMPLETED status 200 and body "ok". */
static size_t record_of(uint8_t *buf, int state, uint8_t token_byte, uint64_t deadline_ms)
{
    memset(buf, 0, COMPLETED_OVERHEAD + 2);
    memcpy(buf, "IDEM", 4);
    buf[4] = 1;
    buf[5] = (uint8_t)state;
    memset(buf + 8, token_byte, 16);
    if (state == 'S') {
        be64(buf + 24, deadline_ms);
        return 64;
    }
    buf[64 + 2] = 200 >> 8, buf[64 + 3] = 200 & 0xff;
    buf[64 + 7] = 2;
    memcpy(buf + COMPLETED_OVERHEAD, "ok", 2);
    return COMPLETED_OVERHEAD + 2;
}

/* Put an item under key as the driver would: envelope deadline, then record. */
static void plant(uint16_t port, const char *key, uint64_t deadline_ms, const uint8_t *rec, size_t len)
{
    char cmd[512];
    int h = snprintf(cmd, sizeof cmd, "set %s %u 60 %zu\r\n", key, DRIVER_FLAGS, ENVELOPE + len);
    be64((uint8_t *)cmd + h, deadline_ms);
    memcpy(cmd + h + ENVELOPE, rec, len);
    memcpy(cmd + h + ENVELOPE + len, "\r\n", 2);
    char *ans = raw(port, cmd, (size_t)h + ENVELOPE + len + 2);
    cr_assert_str_eq(ans, "STORED\r\n");
    free(ans);
}

/* claim through the driver: 1 when it claimed, 0 when it returned a record. */
static int driver_claim(idem_store *s, const char *key, uint8_t token_byte)
{
    uint8_t rec[COMPLETED_OVERHEAD + 2];
    size_t len = record_of(rec, 'S', token_byte, idem_now_ms() + 10000);
    void *existing = NULL;
    size_t existing_len = 0;
    uint32_t remaining = 0;
    int rc = idem__store_claim(s, key, strlen(key), rec, len, 10000, &existing, &existing_len, &remaining);
    cr_assert_eq(rc, IDEM_OK, "%s", idem_last_error());
    free(existing);
    return existing == NULL;
}

Test(memcached, a_claim_meeting_its_own_token_claims_only_a_live_started_record)
{
    start(1);
    idem_store *s = open_store(srv.url);
    uint8_t rec[COMPLETED_OVERHEAD + 2];
    uint64_t now = idem_now_ms();

    /* Our token, but the lease ended: the claim must take the key over for
     * real, or it would hold a key that the next claimant also takes. */
    size_t len = record_of(rec, 'S', 0x11, now - 1000);
    plant(srv.ports[0], "idem:expired", now - 1000, rec, len);
    cr_assert_eq(driver_claim(s, "idem:expired", 0x11), 1, "the key was free");
    cr_assert_eq(driver_claim(s, "idem:expired", 0x22), 0, "a second token claimed a key that the "
                 "first had just claimed: the first claim wrote nothing over its expired record");

    /* Our token, COMPLETED: that is a response to replay, not a claim. */
    len = record_of(rec, 'C', 0x33, 0);
    plant(srv.ports[0], "idem:done", now + 60000, rec, len);
    cr_assert_eq(driver_claim(s, "idem:done", 0x33), 0, "a completed record was taken for a claim: "
                 "its handler would run again");

    /* Our token, STARTED and live: a claim retried after its answer was lost. */
    len = record_of(rec, 'S', 0x44, now + 10000);
    plant(srv.ports[0], "idem:mine", now + 10000, rec, len);
    cr_assert_eq(driver_claim(s, "idem:mine", 0x44), 1, "our own live claim is ours");
    idem_store_close(s);
}

Test(memcached, commit_the_server_refuses_for_its_size_is_etoobig_and_the_claim_stays)
{
    static const char *const small[] = {"-I", "64k", "-o", "slab_chunk_max=32768", NULL};
    memset(&srv, 0, sizeof srv);
    srv.dir = idem_test_tmpdir("memcached-small");
    cr_assert(srv.dir);
    cr_assert_eq(idem_test_start_memcached_with(&srv, 1, small), 0);
    idem_store *s = open_store(srv.url);
    cr_assert_eq(driver_claim(s, "idem:big", 0x55), 1);

    /* Past the limit the driver announced (the core would refuse it up
     * front; a server restarted with a smaller -I would not). */
    size_t body = 100000, len = COMPLETED_OVERHEAD + body;
    uint8_t *rec = malloc(len);
    record_of(rec, 'C', 0x55, 0);
    rec[64 + 4] = (uint8_t)(body >> 24), rec[64 + 5] = (uint8_t)(body >> 16);
    rec[64 + 6] = (uint8_t)(body >> 8), rec[64 + 7] = (uint8_t)body;
    memset(rec + COMPLETED_OVERHEAD, 'z', body);
    uint8_t token[16];
    memset(token, 0x55, sizeof token);
    int rc = idem__store_commit(s, "idem:big", 8, token, rec, len, 3600000);
    free(rec);
    cr_assert_eq(rc, IDEM_ETOOBIG, "got %d: %s", rc, idem_last_error());
    cr_assert(message_names(idem_last_error(), srv.ports[0]), "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "-I") && strstr(idem_last_error(), "max_response_len"), "%s",
              idem_last_error());

    /* The claim is intact: a response that fits is stored. */
    uint8_t ok[COMPLETED_OVERHEAD + 2];
    size_t ok_len = record_of(ok, 'C', 0x55, 0);
    cr_assert_eq(idem__store_commit(s, "idem:big", 8, token, ok, ok_len, 3600000), IDEM_OK, "%s",
                 idem_last_error());
    idem_store_close(s);
}

/* ---- opening ---- */

Test(memcached, open_contacts_every_server_and_says_how_to_start_a_missing_one)
{
    start(1);
    uint16_t nobody = idem_test_free_port();
    char url[128];
    snprintf(url, sizeof url, "memcached://127.0.0.1:%u,127.0.0.1:%u", srv.ports[0], nobody);
    idem_store *s = NULL;
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem_store_open(&s, url), IDEM_EBACKEND);
    cr_assert_null(s);
    cr_assert_lt(mono_ms() - t0, 3000u);
    const char *msg = idem_last_error();
    cr_assert(message_names(msg, nobody), "%s", msg);
    char hint[96];
    snprintf(hint, sizeof hint, "start one with: memcached -p %u -l 127.0.0.1", nobody);
    cr_assert(strstr(msg, hint), "%s", msg);
}

Test(memcached, server_without_cas_is_refused_at_open_with_what_to_do)
{
    static const char *const no_cas[] = {"-C", NULL};
    memset(&srv, 0, sizeof srv);
    srv.dir = idem_test_tmpdir("memcached-nocas");
    cr_assert(srv.dir);
    cr_assert_eq(idem_test_start_memcached_with(&srv, 1, no_cas), 0);
    idem_store *s = NULL;
    int rc = idem_store_open(&s, srv.url);
    if (s)
        idem_store_close(s);
    cr_assert_eq(rc, IDEM_EBACKEND, "a server started with -C was accepted (%d)", rc);
    cr_assert_null(s);
    cr_assert(message_names(idem_last_error(), srv.ports[0]), "%s", idem_last_error());
    cr_assert(strstr(idem_last_error(), "restart memcached without -C"), "%s", idem_last_error());
}

Test(memcached, malformed_urls_are_refused_with_a_message)
{
    static const char *const bad[] = {
        "memcached://127.0.0.1:11211/0",
        "memcached://127.0.0.1:11211?timeout_ms=0",
        "memcached://127.0.0.1:11211?timeout_ms=soon",
        "memcached://127.0.0.1:11211?weight=2",
        "memcached://127.0.0.1:11211,127.0.0.1:11211",
        "memcached+udp://127.0.0.1:11211",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        idem_store *s = NULL;
        int rc = idem_store_open(&s, bad[i]);
        cr_assert_eq(rc, IDEM_EINVAL, "%s gave %d: %s", bad[i], rc, idem_last_error());
        cr_assert_neq(idem_last_error()[0], '\0');
    }
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, "memcached://app:s3cret@127.0.0.1:11211"), IDEM_EINVAL);
    cr_assert_null(strstr(idem_last_error(), "s3cret"), "%s", idem_last_error());
}

/* The limit of the URL reaches every server's connections, not only the
 * first's: with two servers, each in turn stops answering, and a key that
 * lands on it fails after timeout_ms=250, not the default 1000 ms. */
Test(memcached, timeout_ms_in_the_url_bounds_the_calls_to_every_server)
{
    start(2);
    char url[256];
    snprintf(url, sizeof url, "%s?timeout_ms=250", srv.url);
    idem_store *s = open_store(url);
    cr_assert_str_eq(idem_store_backend(s), "memcached");
    idem_layer *l = new_layer(s, 10000, 3600);
    char key[32];
    for (int i = 0; i < SPREAD; i++) { /* connections to both servers */
        job j = {.body = "warm"};
        idem_reply r = {0};
        int n = snprintf(key, sizeof key, "warm%d", i);
        cr_assert_eq(run(l, key, (size_t)n, &j, &r), IDEM_OK, "%s", idem_last_error());
        idem_reply_clear(&r);
    }

    for (int server = 0; server < 2; server++) {
        kill(srv.pids[server], SIGSTOP);
        cr_assert(all_threads_stopped(srv.pids[server], 5000), "memcached did not stop within 5 s");
        bool timed_out = false;
        for (int i = 0; i < SPREAD && !timed_out; i++) {
            job j = {.body = "frozen"};
            idem_reply r = {0};
            int n = snprintf(key, sizeof key, "frozen%d-%d", server, i);
            int64_t t0 = mono_ms();
            int rc = run(l, key, (size_t)n, &j, &r);
            int64_t took = mono_ms() - t0;
            idem_reply_clear(&r);
            if (rc == IDEM_OK)
                continue; /* the key is on the other server */
            timed_out = true;
            kill(srv.pids[server], SIGCONT);
            cr_assert_eq(rc, IDEM_EBACKEND, "%s", idem_last_error());
            cr_assert(message_names(idem_last_error(), srv.ports[server]), "%s", idem_last_error());
            cr_assert(strstr(idem_last_error(), "no answer within 250 ms"), "%s", idem_last_error());
            cr_assert_lt(took, 900, "server %d: took %lld ms with timeout_ms=250", server, (long long)took);
        }
        kill(srv.pids[server], SIGCONT);
        cr_assert(timed_out, "none of %d keys landed on server %d", SPREAD, server);
    }
    idem_layer_free(l);
    idem_store_close(s);
}
