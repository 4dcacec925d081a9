/*
 * The built-in drivers against the rules of include/idempotency/backend.h
 * that an operation sent again must keep ("sent again" in the table's
 * rules), and against the faults each driver must survive: a pooled SQLite
 * connection that went bad, the threads of one process queueing for
 * SQLite's write lock, SQLite out of memory, a read-only file system, and
 * memcached replies that are lost or slow (through a proxy in this file).
 *
 * IDEM_TEST_BACKEND names the kind of store (sqlite, memcached, redis); the
 * tests that concern one driver only say so in their names and check the
 * kind first.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#ifdef IDEM_TEST_HAVE_SQLITE
#include <sqlite3.h>
#endif

#include "harness.h"
#include "internal.h"
#include "support/testutil.h"

static const char *kind;   /* IDEM_TEST_BACKEND */
static const char *url;    /* the store under test */

static bool is(const char *k)
{
    return strncmp(kind, k, strlen(k)) == 0;
}

/* ---- records and keys ---- */

static atomic_uint key_seq;

/* A key no other test uses. */
static size_t fresh_key(char *out, size_t cap)
{
    return (size_t)snprintf(out, cap, "drv:%d:%u", (int)getpid(), atomic_fetch_add(&key_seq, 1));
}

static void started(uint8_t rec[IDEM_RECORD_HEADER_LEN], uint8_t token_byte, uint32_t lease_ms)
{
    idem_record r = {.state = IDEM_STATE_STARTED, .deadline_ms = idem_now_ms() + lease_ms};
    memset(r.token, token_byte, IDEM_TOKEN_LEN);
    idem__record_write(&r, rec);
}

static uint8_t *completed(uint8_t token_byte, const char *body, size_t *len)
{
    idem_record r = {.state = IDEM_STATE_COMPLETED, .status = 201, .body = (const uint8_t *)body,
                     .body_len = strlen(body)};
    memset(r.token, token_byte, IDEM_TOKEN_LEN);
    uint8_t *enc;
    cr_assert_eq(idem__record_encode(&r, &enc, len), IDEM_OK);
    return enc;
}

/* Claim a fresh key with a STARTED record of token token_byte. */
static size_t claim_new(idem_store *s, char key[64], uint8_t rec[IDEM_RECORD_HEADER_LEN], uint8_t token_byte,
                        uint32_t lease_ms)
{
    size_t kl = fresh_key(key, 64);
    started(rec, token_byte, lease_ms);
    void *ex = NULL;
    size_t exl;
    uint32_t left;
    cr_assert_eq(idem__store_claim(s, key, kl, rec, IDEM_RECORD_HEADER_LEN, lease_ms, &ex, &exl, &left),
                 IDEM_OK, "%s", idem_last_error());
    cr_assert_null(ex, "a fresh key was taken");
    return kl;
}

static idem_store *open_store(const char *u)
{
    idem_store *s = NULL;
    cr_assert_eq(idem_store_open(&s, u), IDEM_OK, "%s: %s", u, idem_last_error());
    return s;
}

/* The state of the record under key by the driver's read(), 0 for none. */
static int state_of(idem_store *s, const char *key, size_t key_len, uint8_t *token_byte)
{
    void *rec = NULL;
    size_t len = 0;
    uint32_t left;
    cr_assert_eq(idem__store_read(s, key, key_len, &rec, &len, &left), IDEM_OK, "%s", idem_last_error());
    if (!rec)
        return 0;
    idem_record_info info;
    cr_assert_eq(idem_record_peek(rec, len, &info), IDEM_OK);
    if (token_byte)
        *token_byte = info.token[0];
    free(rec);
    return info.state;
}

/* Each test runs in a process of its own, which finds the store in the
 * environment that main() set. */
static void find_store(void)
{
    kind = getenv("IDEM_TEST_BACKEND");
    url = getenv("IDEM_TEST_URL");
    if (!kind)
        kind = "sqlite";
    cr_assert_not_null(url, "IDEM_TEST_URL is not set");
}

TestSuite(drivers, .init = find_store, .timeout = 120);

/* ======================================================================== */
/* The rules for an operation sent again, on every driver                   */
/* ======================================================================== */

Test(drivers, claim_sent_again_finds_its_own_started_record_and_has_claimed)
{
    idem_store *s = open_store(url);
    char key[64];
    size_t kl = fresh_key(key, sizeof key);
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    started(rec, 0xA1, 30000);
    void *ex = NULL;
    size_t exl = 0;
    uint32_t left = 0;
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 30000, &ex, &exl, &left), IDEM_OK,
                 "%s", idem_last_error());
    cr_assert_null(ex);
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 30000, &ex, &exl, &left), IDEM_OK,
                 "%s", idem_last_error());
    cr_assert_null(ex, "the same claim sent again must find itself claimed, not in progress");
    /* another token still sees it taken */
    uint8_t other[IDEM_RECORD_HEADER_LEN];
    started(other, 0xB2, 30000);
    cr_assert_eq(idem__store_claim(s, key, kl, other, sizeof other, 30000, &ex, &exl, &left), IDEM_OK);
    cr_assert_not_null(ex, "a claim of another token must get the record back");
    idem_record_info info;
    cr_assert_eq(idem_record_peek(ex, exl, &info), IDEM_OK);
    cr_assert_eq(info.token[0], 0xA1);
    cr_assert_leq(left, 30000);
    free(ex);
    idem_store_close(s);
}

Test(drivers, commit_sent_again_after_it_happened_is_ok_and_changes_nothing)
{
    idem_store *s = open_store(url);
    char key[64];
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    size_t kl = claim_new(s, key, rec, 0xC3, 30000);
    uint32_t left;
    size_t dl;
    uint8_t *done = completed(0xC3, "first", &dl);
    cr_assert_eq(idem__store_commit(s, key, kl, done + IDEM_RECORD_TOKEN_OFFSET, done, dl, 60000),
                 IDEM_OK, "%s", idem_last_error());
    size_t dl2;
    uint8_t *again = completed(0xC3, "second", &dl2);
    cr_assert_eq(idem__store_commit(s, key, kl, again + IDEM_RECORD_TOKEN_OFFSET, again, dl2, 60000),
                 IDEM_OK, "a commit sent again finds its own COMPLETED record: IDEM_OK");
    void *back = NULL;
    size_t bl = 0;
    cr_assert_eq(idem__store_read(s, key, kl, &back, &bl, &left), IDEM_OK);
    cr_assert_eq(bl, dl, "the second commit changed the record");
    cr_assert_eq(memcmp(back, done, dl), 0);
    free(back);
    /* another token's commit is lost and changes nothing */
    size_t dl3;
    uint8_t *foreign = completed(0xD4, "third", &dl3);
    cr_assert_eq(idem__store_commit(s, key, kl, foreign + IDEM_RECORD_TOKEN_OFFSET, foreign, dl3, 60000),
                 IDEM_ELOST);
    free(done);
    free(again);
    free(foreign);
    idem_store_close(s);
}

Test(drivers, release_then_a_separate_release_is_elost_and_extend_sent_again_is_ok)
{
    idem_store *s = open_store(url);
    char key[64];
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    size_t kl = claim_new(s, key, rec, 0xE5, 30000);
    const uint8_t *token = rec + IDEM_RECORD_TOKEN_OFFSET;
    uint8_t ext[IDEM_RECORD_HEADER_LEN];
    started(ext, 0xE5, 40000);
    cr_assert_eq(idem__store_extend(s, key, kl, token, ext, sizeof ext, 40000), IDEM_OK);
    cr_assert_eq(idem__store_extend(s, key, kl, token, ext, sizeof ext, 40000), IDEM_OK,
                 "an extend sent again extends again");
    cr_assert_eq(idem__store_release(s, key, kl, token), IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(state_of(s, key, kl, NULL), 0);
    cr_assert_eq(idem__store_release(s, key, kl, token), IDEM_ELOST,
                 "a second, separate release finds nothing on its first send: IDEM_ELOST");
    cr_assert_eq(idem__store_extend(s, key, kl, token, ext, sizeof ext, 40000), IDEM_ELOST);
    idem_store_close(s);
}

Test(drivers, read_sees_a_record_without_changing_it_and_remove_deletes_whoever_wrote_it)
{
    idem_store *s = open_store(url);
    const idem_backend *b = idem_backend_find(idem_store_backend(s));
    cr_assert(IDEM_HAS(b, 2, read) && IDEM_HAS(b, 2, remove), "the %s driver lacks read or remove", b->name);
    char key[64];
    size_t kl = fresh_key(key, sizeof key);
    bool deleted = true;
    cr_assert_eq(idem__store_remove(s, key, kl, &deleted), IDEM_OK, "%s", idem_last_error());
    cr_assert_not(deleted, "nothing was there");
    cr_assert_eq(state_of(s, key, kl, NULL), 0);
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    started(rec, 0x17, 30000);
    void *ex = NULL;
    size_t exl;
    uint32_t left;
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 30000, &ex, &exl, &left), IDEM_OK);
    void *back = NULL;
    size_t bl = 0;
    left = 0;
    cr_assert_eq(idem__store_read(s, key, kl, &back, &bl, &left), IDEM_OK);
    cr_assert_eq(bl, sizeof rec);
    cr_assert_eq(memcmp(back, rec, bl), 0);
    cr_assert(left > 20000 && left <= 30000, "remaining %u ms of a 30 s lease", left);
    free(back);
    cr_assert_eq(state_of(s, key, kl, NULL), IDEM_STATE_STARTED, "read changed the record");
    cr_assert_eq(idem__store_remove(s, key, kl, &deleted), IDEM_OK);
    cr_assert(deleted);
    cr_assert_eq(state_of(s, key, kl, NULL), 0);
    /* the key is free again */
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 30000, &ex, &exl, &left), IDEM_OK);
    cr_assert_null(ex);
    idem_store_close(s);
}

Test(drivers, read_of_an_expired_claim_is_none)
{
    idem_store *s = open_store(url);
    char key[64];
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    size_t kl = claim_new(s, key, rec, 0x29, 100);
    sleep_ms(300);
    cr_assert_eq(state_of(s, key, kl, NULL), 0, "an expired record reads as none");
    bool deleted = true;
    cr_assert_eq(idem__store_remove(s, key, kl, &deleted), IDEM_OK);
    cr_assert_not(deleted, "an expired record counts as nothing");
    idem_store_close(s);
}

/* ======================================================================== */
/* SQLite                                                                   */
/* ======================================================================== */

#ifdef IDEM_TEST_HAVE_SQLITE
/* Every SQLite connection this process opens, by an auto-extension. */
static pthread_mutex_t conns_mu = PTHREAD_MUTEX_INITIALIZER;
static sqlite3 *conns[256];
static int nconns;

static int record_conn(sqlite3 *db, char **err, const struct sqlite3_api_routines *api)
{
    (void)err;
    (void)api;
    pthread_mutex_lock(&conns_mu);
    if (nconns < 256)
        conns[nconns++] = db;
    pthread_mutex_unlock(&conns_mu);
    return SQLITE_OK;
}

static int handler(void *arg, idem_response *resp)
{
    atomic_int *calls = arg;
    if (calls)
        atomic_fetch_add(calls, 1);
    return idem_response_set(resp, 200, "ok", 2);
}

Test(drivers, sqlite_a_pooled_connection_gone_read_only_is_replaced_and_service_resumes)
{
    if (!is("sqlite"))
        cr_skip_test("SQLite's own; this run is %s", kind);
    pthread_mutex_lock(&conns_mu);
    nconns = 0;
    pthread_mutex_unlock(&conns_mu);
    cr_assert_eq(sqlite3_auto_extension((void (*)(void))record_conn), SQLITE_OK);
    idem_store *s = open_store(url);
    idem_layer *l;
    cr_assert_eq(idem_layer_new(&l, s, NULL), IDEM_OK);
    char key[64];
    idem_reply r = {0};
    for (int i = 0; i < 3; i++) {
        idem_request req = {.key = key, .key_len = fresh_key(key, sizeof key)};
        cr_assert_eq(idem_run(l, &req, handler, NULL, &r), IDEM_OK, "%s", idem_last_error());
        idem_reply_clear(&r);
    }
    /* The pooled connections turn read-only, as they do when the file was
     * read-only while they were opened. */
    pthread_mutex_lock(&conns_mu);
    int poisoned = nconns;
    for (int i = 0; i < nconns; i++)
        cr_assert_eq(sqlite3_exec(conns[i], "PRAGMA query_only=1", NULL, NULL, NULL), SQLITE_OK);
    nconns = 0;
    pthread_mutex_unlock(&conns_mu);
    cr_assert_gt(poisoned, 0, "the auto-extension saw no connection");
    int failed = 0;
    for (int i = 0; i < 20; i++) {
        idem_request req = {.key = key, .key_len = fresh_key(key, sizeof key)};
        int rc = idem_run(l, &req, handler, NULL, &r);
        if (rc != IDEM_OK) {
            failed++;
            cr_assert_eq(rc, IDEM_EBACKEND, "%s", idem_last_error());
            cr_assert(strstr(idem_last_error(), "readonly") || strstr(idem_last_error(), "read-only"),
                      "%s", idem_last_error());
        }
        idem_reply_clear(&r);
    }
    cr_assert_leq(failed, 1, "%d of 20 requests failed: the read-only connection was kept", failed);
    idem_layer_free(l);
    idem_store_close(s);
    sqlite3_cancel_auto_extension((void (*)(void))record_conn);
}

/* 64 threads of one process on a few hot keys. */
enum { HOT_THREADS = 64, HOT_ROUNDS = 40, HOT_KEYS = 4 };

typedef struct hot {
    idem_layer *layer;
    atomic_int  failures, executed;
    char        why[512];
    int         base;
} hot;

static void *hot_worker(void *arg)
{
    hot *h = arg;
    for (int round = 0; round < HOT_ROUNDS; round++) {
        char key[64];
        unsigned self = (unsigned)(uintptr_t)pthread_self();
        idem_request req = {.key = key,
                            .key_len = (size_t)snprintf(key, sizeof key, "hot:%d:%d:%u", h->base, round,
                                                        self % HOT_KEYS)};
        idem_reply r = {0};
        int rc = idem_run(h->layer, &req, handler, NULL, &r);
        if (rc != IDEM_OK) {
            if (atomic_fetch_add(&h->failures, 1) == 0)
                snprintf(h->why, sizeof h->why, "%s", idem_last_error());
        } else if (r.outcome == IDEM_EXECUTED) {
            atomic_fetch_add(&h->executed, 1);
        }
        idem_reply_clear(&r);
    }
    return NULL;
}

Test(drivers, sqlite_threads_of_one_process_queue_for_the_write_lock_and_none_is_starved)
{
    if (!is("sqlite"))
        cr_skip_test("SQLite's own; this run is %s", kind);
    char *u;
    cr_assert(asprintf(&u, "%s?busy_timeout_ms=3000", url) > 0);
    idem_store *s = open_store(u);
    free(u);
    hot h = {.base = (int)getpid()};
    cr_assert_eq(idem_layer_new(&h.layer, s, NULL), IDEM_OK);
    pthread_t t[HOT_THREADS];
    for (int i = 0; i < HOT_THREADS; i++)
        cr_assert_eq(pthread_create(&t[i], NULL, hot_worker, &h), 0);
    for (int i = 0; i < HOT_THREADS; i++)
        pthread_join(t[i], NULL);
    cr_assert_eq(h.failures, 0, "%d of %d requests failed; the first: %s", h.failures,
                 HOT_THREADS * HOT_ROUNDS, h.why);
    cr_assert_geq(h.executed, HOT_ROUNDS, "each round's keys ran");
    idem_layer_free(h.layer);
    idem_store_close(s);
}

/* Another connection holds the write lock for a while, then lets go. */
static void *hold_then_commit(void *arg)
{
    sqlite3 *db = arg;
    sleep_ms(700);
    sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    return NULL;
}

Test(drivers, sqlite_lease_counts_from_the_write_not_from_before_the_wait_for_the_lock)
{
    if (!is("sqlite"))
        cr_skip_test("SQLite's own; this run is %s", kind);
    char *u;
    cr_assert(asprintf(&u, "%s?busy_timeout_ms=5000", url) > 0);
    idem_store *s = open_store(u);
    free(u);
    sqlite3 *other;
    cr_assert_eq(sqlite3_open(strstr(url, "://") + 3, &other), SQLITE_OK);
    sqlite3_busy_timeout(other, 5000); /* the suite's other tests write to the same file */
    cr_assert_eq(sqlite3_exec(other, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK, "%s", sqlite3_errmsg(other));
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, hold_then_commit, other), 0);
    char key[64];
    size_t kl = fresh_key(key, sizeof key);
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    started(rec, 0x71, 500);
    void *ex = NULL;
    size_t exl;
    uint32_t left;
    uint64_t t0 = mono_ms();
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 500, &ex, &exl, &left), IDEM_OK, "%s",
                 idem_last_error());
    uint64_t waited = mono_ms() - t0;
    pthread_join(t, NULL);
    sqlite3_close(other);
    cr_assert_null(ex);
    cr_assert_geq(waited, 500, "the claim did not wait for the lock (%llu ms): the test tested nothing",
                  (unsigned long long)waited);
    void *back = NULL;
    size_t bl;
    cr_assert_eq(idem__store_read(s, key, kl, &back, &bl, &left), IDEM_OK);
    cr_assert_not_null(back, "the claim's 500 ms lease was spent waiting %llu ms for the write lock",
                       (unsigned long long)waited);
    cr_assert_gt(left, 150, "only %u ms left of a 500 ms lease just written", left);
    free(back);
    idem_store_close(s);
}

Test(drivers, sqlite_out_of_memory_is_enomem_not_a_store_error)
{
    if (!is("sqlite"))
        cr_skip_test("SQLite's own; this run is %s", kind);
    idem_store *s = open_store(url);
    char key[64];
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    size_t kl = claim_new(s, key, rec, 0x33, 30000);
    /* A 4 MiB response while SQLite may use little more than it does now. */
    size_t big = 4u << 20;
    char *body = malloc(big + 1);
    memset(body, 'x', big);
    body[big] = '\0';
    size_t dl;
    uint8_t *done = completed(0x33, body, &dl);
    free(body);
    sqlite3_int64 old = sqlite3_hard_heap_limit64(sqlite3_memory_used() + (1 << 20));
    int rc = idem__store_commit(s, key, kl, done + IDEM_RECORD_TOKEN_OFFSET, done, dl, 60000);
    sqlite3_hard_heap_limit64(old);
    cr_assert_eq(rc, IDEM_ENOMEM, "rc %d: %s", rc, idem_last_error());
    cr_assert(strstr(idem_last_error(), "out of memory"), "%s", idem_last_error());
    /* memory back: the claim still commits */
    cr_assert_eq(idem__store_commit(s, key, kl, done + IDEM_RECORD_TOKEN_OFFSET, done, dl, 60000), IDEM_OK,
                 "%s", idem_last_error());
    free(done);
    idem_store_close(s);
}

Test(drivers, sqlite_on_a_read_only_file_system_says_read_only)
{
    if (!is("sqlite"))
        cr_skip_test("SQLite's own; this run is %s", kind);
    char *dir = idem_test_tmpdir("rofs");
    cr_assert_not_null(dir);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        /* A mount namespace of our own, where dir is a read-only tmpfs. */
        uid_t uid = geteuid();
        gid_t gid = getegid();
        if (unshare(uid == 0 ? CLONE_NEWNS : CLONE_NEWUSER | CLONE_NEWNS) != 0) {
            fprintf(stderr, "unshare: %s (the test needs root or user namespaces)\n", strerror(errno));
            _exit(2);
        }
        if (uid != 0) {
            char m[64];
            int fd;
            if ((fd = open("/proc/self/setgroups", O_WRONLY)) >= 0) {
                (void)!write(fd, "deny", 4);
                close(fd);
            }
            snprintf(m, sizeof m, "0 %u 1", (unsigned)uid);
            if ((fd = open("/proc/self/uid_map", O_WRONLY)) >= 0) {
                (void)!write(fd, m, strlen(m));
                close(fd);
            }
            snprintf(m, sizeof m, "0 %u 1", (unsigned)gid);
            if ((fd = open("/proc/self/gid_map", O_WRONLY)) >= 0) {
                (void)!write(fd, m, strlen(m));
                close(fd);
            }
        }
        if (mount("none", "/", "none", MS_REC | MS_PRIVATE, NULL) != 0 ||
            mount("none", dir, "tmpfs", MS_RDONLY, NULL) != 0) {
            fprintf(stderr, "mount: %s\n", strerror(errno));
            _exit(2);
        }
        char *u;
        if (asprintf(&u, "sqlite://%s/idem.db", dir) < 0)
            _exit(2);
        idem_store *s = NULL;
        int rc = idem_store_open(&s, u);
        if (rc != IDEM_EBACKEND || !strstr(idem_last_error(), "read-only")) {
            fprintf(stderr, "open on a read-only mount: rc %d, message '%s'\n", rc, idem_last_error());
            _exit(1);
        }
        _exit(0);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    rmdir(dir);
    free(dir);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 2) /* reported, never counted as passed */
        cr_skip_test("this system lets the test neither unshare a mount namespace nor mount (see its "
                     "stderr); run it as root");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the check in the child failed (status %d)", st);
}
#endif

/* ======================================================================== */
/* memcached, through a proxy that loses or slows replies                   */
/* ======================================================================== */

enum { PROXY_PAIRS = 16 };

typedef struct proxy {
    int         lfd;
    uint16_t    port, up_port;
    pthread_t   thread;
    atomic_int  stop;
    atomic_int  delay_ms;       /* hold each reply chunk this long */
    char        cut_cmd[8];     /* drop the reply to the next command starting so, and the connection */
    atomic_int  cut_armed;
    atomic_int  cuts;           /* replies dropped */
    struct { int c, u; bool cut_pending; } pair[PROXY_PAIRS];
} proxy;

static void pair_close(proxy *p, int i)
{
    close(p->pair[i].c);
    close(p->pair[i].u);
    p->pair[i].c = p->pair[i].u = -1;
    p->pair[i].cut_pending = false;
}

static bool starts_command(const char *buf, ssize_t n, const char *cmd)
{
    size_t cl = strlen(cmd);
    for (ssize_t i = 0; i + (ssize_t)cl <= n; i++)
        if ((i == 0 || buf[i - 1] == '\n') && memcmp(buf + i, cmd, cl) == 0)
            return true;
    return false;
}

static void *proxy_main(void *arg)
{
    proxy *p = arg;
    char buf[65536];
    while (!atomic_load(&p->stop)) {
        struct pollfd fds[1 + 2 * PROXY_PAIRS];
        int n = 0;
        fds[n++] = (struct pollfd){.fd = p->lfd, .events = POLLIN};
        for (int i = 0; i < PROXY_PAIRS; i++) {
            fds[n++] = (struct pollfd){.fd = p->pair[i].c, .events = POLLIN};
            fds[n++] = (struct pollfd){.fd = p->pair[i].u, .events = POLLIN};
        }
        if (poll(fds, (nfds_t)n, 50) <= 0)
            continue;
        if (fds[0].revents & POLLIN) {
            int c = accept(p->lfd, NULL, NULL);
            int u = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(p->up_port),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            int slot = -1;
            for (int i = 0; i < PROXY_PAIRS && slot < 0; i++)
                if (p->pair[i].c < 0)
                    slot = i;
            if (c < 0 || u < 0 || slot < 0 || connect(u, (struct sockaddr *)&a, sizeof a) != 0) {
                if (c >= 0)
                    close(c);
                if (u >= 0)
                    close(u);
            } else {
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                p->pair[slot].c = c;
                p->pair[slot].u = u;
            }
        }
        for (int i = 0; i < PROXY_PAIRS; i++) {
            struct pollfd *fc = &fds[1 + 2 * i], *fu = &fds[2 + 2 * i];
            if (p->pair[i].c < 0)
                continue;
            if (fc->revents & (POLLIN | POLLHUP | POLLERR)) {
                ssize_t got = read(p->pair[i].c, buf, sizeof buf);
                if (got <= 0) {
                    pair_close(p, i);
                    continue;
                }
                if (atomic_load(&p->cut_armed) && starts_command(buf, got, p->cut_cmd) &&
                    atomic_exchange(&p->cut_armed, 0))
                    p->pair[i].cut_pending = true;
                if (send(p->pair[i].u, buf, (size_t)got, MSG_NOSIGNAL) != got) {
                    pair_close(p, i);
                    continue;
                }
            }
            if (fu->revents & (POLLIN | POLLHUP | POLLERR)) {
                ssize_t got = read(p->pair[i].u, buf, sizeof buf);
                if (got <= 0 || p->pair[i].cut_pending) {
                    if (got > 0)
                        atomic_fetch_add(&p->cuts, 1); /* the server did it; the client never hears */
                    pair_close(p, i);
                    continue;
                }
                int d = atomic_load(&p->delay_ms);
                if (d)
                    sleep_ms((unsigned)d);
                if (send(p->pair[i].c, buf, (size_t)got, MSG_NOSIGNAL) != got)
                    pair_close(p, i);
            }
        }
    }
    for (int i = 0; i < PROXY_PAIRS; i++)
        if (p->pair[i].c >= 0)
            pair_close(p, i);
    return NULL;
}

static void proxy_start(proxy *p, uint16_t up_port)
{
    memset(p, 0, sizeof *p);
    for (int i = 0; i < PROXY_PAIRS; i++)
        p->pair[i].c = p->pair[i].u = -1;
    p->up_port = up_port;
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(p->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(p->lfd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t al = sizeof a;
    cr_assert_eq(getsockname(p->lfd, (struct sockaddr *)&a, &al), 0);
    p->port = ntohs(a.sin_port);
    cr_assert_eq(listen(p->lfd, 16), 0);
    cr_assert_eq(pthread_create(&p->thread, NULL, proxy_main, p), 0);
}

static void proxy_stop(proxy *p)
{
    atomic_store(&p->stop, 1);
    pthread_join(p->thread, NULL);
    close(p->lfd);
}

static void proxy_cut_next(proxy *p, const char *cmd)
{
    snprintf(p->cut_cmd, sizeof p->cut_cmd, "%s", cmd);
    atomic_store(&p->cut_armed, 1);
}

/* The memcached server's port, from the URL of the test store. */
static uint16_t memcached_port(void)
{
    const char *colon = strrchr(url, ':');
    cr_assert_not_null(colon);
    return (uint16_t)atoi(colon + 1);
}

static idem_store *open_through(proxy *p, const char *params)
{
    char u[128];
    snprintf(u, sizeof u, "memcached://127.0.0.1:%u%s", p->port, params);
    idem_store *s = open_store(u);
    /* one request first, so the next runs on a pooled connection */
    bool deleted;
    cr_assert_eq(idem__store_remove(s, "warm-up", 7, &deleted), IDEM_OK, "%s", idem_last_error());
    return s;
}

Test(drivers, memcached_release_whose_reply_was_lost_after_it_freed_the_key_is_ok)
{
    if (strcmp(kind, "memcached") != 0)
        cr_skip_test("memcached's own; this run is %s", kind);
    proxy p;
    proxy_start(&p, memcached_port());
    idem_store *s = open_through(&p, "");
    char key[64];
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    size_t kl = claim_new(s, key, rec, 0x41, 30000);
    proxy_cut_next(&p, "cas ");
    cr_assert_eq(idem__store_release(s, key, kl, rec + IDEM_RECORD_TOKEN_OFFSET), IDEM_OK,
                 "a release retried after its reply was lost finds the key gone: %s", idem_last_error());
    cr_assert_eq(atomic_load(&p.cuts), 1, "the proxy dropped no reply: the test tested nothing");
    cr_assert_eq(state_of(s, key, kl, NULL), 0);
    idem_store_close(s);
    proxy_stop(&p);
}

Test(drivers, memcached_commit_and_claim_whose_replies_were_lost_are_recognised)
{
    if (strcmp(kind, "memcached") != 0)
        cr_skip_test("memcached's own; this run is %s", kind);
    proxy p;
    proxy_start(&p, memcached_port());
    idem_store *s = open_through(&p, "");
    char key[64];
    size_t kl = fresh_key(key, sizeof key);
    uint8_t rec[IDEM_RECORD_HEADER_LEN];
    started(rec, 0x52, 30000);
    void *ex = NULL;
    size_t exl;
    uint32_t left;
    proxy_cut_next(&p, "add ");
    cr_assert_eq(idem__store_claim(s, key, kl, rec, sizeof rec, 30000, &ex, &exl, &left), IDEM_OK,
                 "%s", idem_last_error());
    cr_assert_null(ex, "a claim retried after its reply was lost finds its own record: claimed");
    cr_assert_eq(atomic_load(&p.cuts), 1);
    size_t dl;
    uint8_t *done = completed(0x52, "paid", &dl);
    proxy_cut_next(&p, "cas ");
    cr_assert_eq(idem__store_commit(s, key, kl, done + IDEM_RECORD_TOKEN_OFFSET, done, dl, 60000),
                 IDEM_OK, "%s", idem_last_error());
    cr_assert_eq(atomic_load(&p.cuts), 2);
    uint8_t tok = 0;
    cr_assert_eq(state_of(s, key, kl, &tok), IDEM_STATE_COMPLETED);
    cr_assert_eq(tok, 0x52);
    free(done);
    idem_store_close(s);
    proxy_stop(&p);
}

Test(drivers, memcached_call_of_several_slow_steps_is_bounded_by_timeout_ms_as_a_whole)
{
    if (strcmp(kind, "memcached") != 0)
        cr_skip_test("memcached's own; this run is %s", kind);
    proxy p;
    proxy_start(&p, memcached_port());
    idem_store *s = open_through(&p, "?timeout_ms=1000");
    char key[64];
    size_t kl = fresh_key(key, sizeof key);
    uint8_t held[IDEM_RECORD_HEADER_LEN], mine[IDEM_RECORD_HEADER_LEN];
    started(held, 0x63, 30000);
    started(mine, 0x64, 30000);
    void *ex = NULL;
    size_t exl;
    uint32_t left;
    cr_assert_eq(idem__store_claim(s, key, kl, held, sizeof held, 30000, &ex, &exl, &left), IDEM_OK);
    /* Each reply 800 ms late: the add's answer (taken) comes in time, the
     * gets that must follow would take as long again. */
    atomic_store(&p.delay_ms, 800);
    uint64_t t0 = mono_ms();
    int rc = idem__store_claim(s, key, kl, mine, sizeof mine, 30000, &ex, &exl, &left);
    uint64_t took = mono_ms() - t0;
    atomic_store(&p.delay_ms, 0);
    cr_assert_eq(rc, IDEM_EBACKEND, "rc %d", rc);
    cr_assert(strstr(idem_last_error(), "no answer within 1000 ms"), "%s", idem_last_error());
    cr_assert_lt(took, 1500, "the claim took %llu ms with timeout_ms=1000 (two steps of 800 ms each)",
                 (unsigned long long)took);
    free(ex);
    idem_store_close(s);
    proxy_stop(&p);
}

/* ---- the runner ---- */

int main(int argc, char *argv[])
{
    kind = getenv("IDEM_TEST_BACKEND");
    if (!kind)
        kind = "sqlite";
    idem_test_server srv;
    if (idem_test_server_start(&srv, kind) != 0) {
        fprintf(stderr, "test_drivers: cannot start a %s store for the tests\n", kind);
        return 1;
    }
    setenv("IDEM_TEST_URL", srv.url, 1);
    url = srv.url;
    fprintf(stderr, "test_drivers: testing %s at %s\n", kind, url);
    struct criterion_test_set *tests = criterion_initialize();
    int result = 1;
    if (criterion_handle_args(argc, argv, true))
        result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    idem_test_server_stop(&srv);
    return result;
}
