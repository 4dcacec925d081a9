/*
 * The operator's command, `idem` (docs/operating.md, "The `idem` command"),
 * run as a program against every driver with a server or a file (IDEM_TEST_BACKEND), and
 * against Redis servers set up to break a promise or to keep them all.
 * IDEM_TOOL names the program under test.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include <idempotency/idempotency.h>

#include "harness.h"

static const char *url;
static const char *kind;
static char prefix[64];
static char *tmp;

/* ---- running the program ---- */

typedef struct run {
    int   status;    /* exit status */
    char *out, *err; /* what it wrote, NUL-terminated */
    size_t out_len;
} run;

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot read %s", path);
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 + 1 > cap)
            cr_assert((buf = realloc(buf, cap = cap * 2 + 8192)));
        size_t got = fread(buf + n, 1, 4096, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    buf[n] = '\0';
    if (len)
        *len = n;
    return buf;
}

/* Run idem with the arguments given (NULL-terminated), stdin from /dev/null. */
static run tool(const char *arg, ...)
{
    const char *bin = getenv("IDEM_TOOL");
    cr_assert(bin, "IDEM_TOOL is not set; run this through meson test");
    const char *argv[16] = {bin};
    int n = 1;
    va_list ap;
    va_start(ap, arg);
    for (const char *a = arg; a; a = va_arg(ap, const char *)) {
        cr_assert(n < 15);
        argv[n++] = a;
    }
    va_end(ap);
    argv[n] = NULL;
    char out[512], err[512];
    snprintf(out, sizeof out, "%s/out", tmp);
    snprintf(err, sizeof err, "%s/err", tmp);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        int in = open("/dev/null", O_RDONLY);
        int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int e = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(in, 0);
        dup2(o, 1);
        dup2(e, 2);
        execv(bin, (char *const *)argv);
        _exit(127);
    }
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st), "idem died of signal %d", WTERMSIG(st));
    run r = {.status = WEXITSTATUS(st)};
    r.out = slurp(out, &r.out_len);
    r.err = slurp(err, NULL);
    return r;
}

static void run_free(run *r)
{
    free(r->out);
    free(r->err);
}

#define assert_has(r, text)                                                                         \
    cr_assert(strstr((r).out, text) || strstr((r).err, text), "no \"%s\" in the output:\n%s\n%s",  \
              text, (r).out, (r).err)

/* ---- fixtures ---- */

static idem_store *store;
static idem_layer *layer;

static void setup(void)
{
    url = getenv("IDEM_TEST_URL");
    kind = getenv("IDEM_TEST_BACKEND");
    cr_assert(url && kind, "IDEM_TEST_URL is not set; run this through meson test");
    tmp = idem_test_tmpdir("tool");
    cr_assert(tmp);
    uint32_t r;
    cr_assert_eq(getrandom(&r, sizeof r, 0), (ssize_t)sizeof r);
    snprintf(prefix, sizeof prefix, "tool%ld-%08x:", (long)getpid(), r);
    cr_assert_eq(idem_store_open(&store, url), IDEM_OK, "%s", idem_last_error());
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    o.lease_ms = 60000;
    cr_assert_eq(idem_layer_new(&layer, store, &o), IDEM_OK, "%s", idem_last_error());
}

static void teardown(void)
{
    idem_layer_free(layer);
    idem_store_close(store);
    layer = NULL;
    store = NULL;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    (void)!system(cmd);
    free(tmp);
}

TestSuite(tool, .init = setup, .fini = teardown, .timeout = 60);

typedef struct job {
    int         calls;
    int         status;
    const char *body;
} job;

static int job_handler(void *arg, idem_response *resp)
{
    job *j = arg;
    j->calls++;
    return idem_response_set(resp, j->status, j->body, strlen(j->body)) == IDEM_OK ? 0 : 1;
}

static idem_outcome run_key(const void *key, size_t key_len, job *j)
{
    idem_request req = {.key = key, .key_len = key_len, .fingerprint = "fp", .fingerprint_len = 2};
    idem_reply reply = {0};
    int rc = idem_run(layer, &req, job_handler, j, &reply);
    cr_assert_eq(rc, IDEM_OK, "idem_run: %s", idem_last_error());
    idem_outcome o = reply.outcome;
    idem_reply_clear(&reply);
    return o;
}

/* ---- show and delete ---- */

Test(tool, a_key_left_started_by_a_killed_worker_is_shown_with_its_lease_and_checkpoint_and_freed_by_delete)
{
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        /* The worker: its own store (it is another process), claims, then hangs. */
        idem_store *s;
        idem_layer *l;
        idem_options o;
        idem_options_init(&o);
        o.key_prefix = prefix;
        o.lease_ms = 600000;
        if (idem_store_open(&s, url) || idem_layer_new(&l, s, &o))
            _exit(1);
        idem_request req = {.key = "stuck", .key_len = 5};
        idem_claim *c;
        idem_reply reply = {0};
        char ok = idem_begin(l, &req, &c, &reply) == IDEM_OK && c &&
                  idem_checkpoint(c, "charged", "ch_42", 5) == IDEM_OK ? 'y' : 'n';
        (void)!write(ready[1], &ok, 1);
        for (;;)
            pause();
    }
    char ok = 0;
    cr_assert_eq(read(ready[0], &ok, 1), 1);
    cr_assert_eq(ok, 'y', "the worker could not claim the key");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);

    run r = tool("show", url, "stuck", "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "state:        STARTED");
    assert_has(r, "lease left:   9 min"); /* of 10 minutes: the lease runs, nobody can take the key */
    assert_has(r, "token:        ");
    assert_has(r, "checkpoint:   \"charged\""); /* where the next holder resumes */
    assert_has(r, "5 bytes: \"ch_42\"");
    run_free(&r);

    job j = {.status = 200, .body = "retried"};
    cr_assert_eq(run_key("stuck", 5, &j), IDEM_IN_PROGRESS, "before the delete the key is blocked");

    r = tool("delete", url, "stuck", "--prefix", prefix, "--yes", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "deleted:");
    assert_has(r, "STARTED");
    run_free(&r);

    cr_assert_eq(run_key("stuck", 5, &j), IDEM_EXECUTED, "the retry runs once the key is freed");
    cr_assert_eq(j.calls, 1);
}

Test(tool, a_completed_key_is_shown_with_status_and_body_and_kept_unless_forced)
{
    job j = {.status = 201, .body = "{\"id\":\"pay_1\"}\n"};
    cr_assert_eq(run_key("done", 4, &j), IDEM_EXECUTED);

    run r = tool("show", url, "done", "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "state:        COMPLETED");
    assert_has(r, "status:       201");
    assert_has(r, "body:         15 bytes: \"{\\\"id\\\":\\\"pay_1\\\"}\\x0a\"");
    assert_has(r, "time left:    23 h 59 min"); /* the default ttl_s of 24 h */
    assert_has(r, "fingerprint:  sha256 5aef96240bca5582e6fd0468879a26863d81d1c1fb602def55926ef33ec8bb1f"); /* SHA-256 of "fp" */
    run_free(&r);

    r = tool("show", url, "done", "--prefix", prefix, "--body", NULL);
    cr_assert_eq(r.status, 0);
    cr_assert_eq(r.out_len, strlen(j.body));
    cr_assert_arr_eq(r.out, j.body, r.out_len, "--body writes the body as is");
    run_free(&r);

    r = tool("delete", url, "done", "--prefix", prefix, "--yes", NULL);
    cr_assert_eq(r.status, 1, "a COMPLETED response is not deleted without --force");
    assert_has(r, "--force");
    assert_has(r, "run the handler again");
    run_free(&r);
    cr_assert_eq(run_key("done", 4, &j), IDEM_REPLAYED, "the refused delete left the response");

    r = tool("delete", url, "done", "--prefix", prefix, "--yes", "--force", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "deleted:");
    assert_has(r, "COMPLETED");
    run_free(&r);
    cr_assert_eq(run_key("done", 4, &j), IDEM_EXECUTED, "after a forced delete the request runs again");
    cr_assert_eq(j.calls, 2);
}

Test(tool, binary_keys_and_scopes_are_given_with_escapes)
{
    static const char key[] = {'k', '\0', '\n', ' ', '\\'};
    idem_request req = {.key = key, .key_len = sizeof key};
    job j = {.status = 202, .body = "bin"};
    idem_reply reply = {0};
    cr_assert_eq(idem_run_scoped(layer, "tenant\x01", 7, &req, job_handler, &j, &reply), IDEM_OK);
    idem_reply_clear(&reply);

    run r = tool("show", url, "k\\x00\\x0A \\\\", "--prefix", prefix, "--scope", "tenant\\x01", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "status:       202");
    run_free(&r);
    r = tool("show", url, "k\\x00\\x0A \\\\", "--prefix", prefix, NULL);
    assert_has(r, "state:        ABSENT"); /* the same key without its scope is another key */
    run_free(&r);
    r = tool("show", url, "k\\x0", "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 64, "a broken escape is a usage error");
    assert_has(r, "\\xNN");
    run_free(&r);
}

Test(tool, an_absent_key_is_shown_as_absent_and_deleting_it_changes_nothing)
{
    run r = tool("show", url, "never", "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "state:        ABSENT");
    run_free(&r);
    r = tool("delete", url, "never", "--prefix", prefix, "--yes", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "nothing to delete");
    run_free(&r);
}

Test(tool, an_absent_key_under_the_default_prefix_gets_a_hint_to_give_the_prefix)
{
    job j = {.status = 201, .body = "made"};
    cr_assert_eq(run_key("under-mine", 10, &j), IDEM_EXECUTED);
    run r = tool("show", url, "under-mine", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "state:        ABSENT");
    assert_has(r, "--prefix P");
    run_free(&r);
    r = tool("show", url, "under-mine", "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "state:        COMPLETED");
    cr_assert_null(strstr(r.err, "hint"), "a hint for a key that was found: %s", r.err);
    run_free(&r);
}

/* The lines of out that contain text. */
static int lines_with(const char *out, const char *text)
{
    int n = 0;
    for (const char *p = out; *p;) {
        const char *end = strchr(p, '\n');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (memmem(p, len, text, strlen(text)))
            n++;
        p += len + (end ? 1 : 0);
    }
    return n;
}

Test(tool, list_prints_each_key_with_its_state_and_lease_or_ttl_and_filters_by_state_and_limit)
{
    if (strncmp(kind, "memcached", 9) == 0) {
        run r = tool("list", url, "--prefix", prefix, NULL);
        cr_assert_eq(r.status, 2, "memcached listed its keys? %s%s", r.out, r.err);
        assert_has(r, "cannot enumerate");
        run_free(&r);
        return;
    }
    job j = {.status = 201, .body = "made"};
    cr_assert_eq(run_key("done-a", 6, &j), IDEM_EXECUTED);
    cr_assert_eq(run_key("done-b", 6, &j), IDEM_EXECUTED);
    idem_request sreq = {.key = "in\nscope", .key_len = 8};
    idem_reply sreply = {0};
    cr_assert_eq(idem_run_scoped(layer, "tenant", 6, &sreq, job_handler, &j, &sreply), IDEM_OK);
    cr_assert_eq(sreply.outcome, IDEM_EXECUTED);
    idem_reply_clear(&sreply);
    idem_request req = {.key = "held", .key_len = 4};
    idem_claim *c;
    idem_reply reply = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &reply), IDEM_OK, "%s", idem_last_error());
    cr_assert_not_null(c);

    run r = tool("list", url, "--prefix", prefix, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    cr_assert_eq(lines_with(r.out, "COMPLETED  ttl "), 3, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "done-a"), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "STARTED    lease "), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "  \"held\""), 1, "%s", r.out);
    /* A scoped key: after its scope's tag, escaped, and not the scope itself. */
    cr_assert_eq(lines_with(r.out, "  scope #"), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "in\\x0ascope"), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "tenant"), 0, "%s", r.out);
    assert_has(r, "4 keys");
    run_free(&r);

    r = tool("list", url, "--prefix", prefix, "--state", "started", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    cr_assert_eq(lines_with(r.out, "STARTED"), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "COMPLETED"), 0, "%s", r.out);
    run_free(&r);
    r = tool("list", url, "--prefix", prefix, "--state=completed", "--limit", "1", NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    cr_assert_eq(lines_with(r.out, "COMPLETED"), 1, "%s", r.out);
    cr_assert_eq(lines_with(r.out, "STARTED"), 0, "%s", r.out);
    run_free(&r);

    const char *bad[][2] = {{"--state", "running"}, {"--limit", "0"}, {"--limit", "-1"}, {"--limit", "2x"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r = tool("list", url, bad[i][0], bad[i][1], NULL);
        cr_assert_eq(r.status, 64, "%s %s: %s%s", bad[i][0], bad[i][1], r.out, r.err);
        run_free(&r);
    }
    r = tool("list", url, "--scope", "s", NULL);
    cr_assert_eq(r.status, 64);
    run_free(&r);
    cr_assert_eq(idem_commit(c, 200, "", 0), IDEM_OK);
}

Test(tool, usage_errors_exit_64_and_help_is_complete)
{
    run r = tool("show", url, NULL);
    cr_assert_eq(r.status, 64);
    run_free(&r);
    r = tool("frobnicate", NULL);
    cr_assert_eq(r.status, 64);
    run_free(&r);
    r = tool("show", url, "k", "--force", NULL);
    cr_assert_eq(r.status, 64, "--force is an option of delete");
    run_free(&r);
    r = tool("--help", NULL);
    cr_assert_eq(r.status, 0);
    const char *sections[] = {"SYNOPSIS", "COMMANDS", "OPTIONS", "KEYS", "EXIT STATUS", "--prefix",
                              "--scope", "--body", "--yes", "--force", "\\xNN", "maxmemory-policy",
                              "list URL", "--state", "--limit"};
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++)
        assert_has(r, sections[i]);
    run_free(&r);
}

/* A command line typed wrong is refused without repeating a URL or an
 * option's value, either of which may hold a password. */
Test(tool, a_mistyped_command_line_never_repeats_a_password)
{
    static const char secret_url[] = "redis://:Sw0rdf1sh-xyzzy@127.0.0.1:1";
    run r = tool(secret_url, "k", NULL);
    cr_assert_eq(r.status, 64, "the command left out");
    cr_assert_null(strstr(r.err, "Sw0rdf1sh"), "the command left out: %s", r.err);
    assert_has(r, "command");
    run_free(&r);
    r = tool("show", "--url=redis://:Sw0rdf1sh-xyzzy@127.0.0.1:1", "k", NULL);
    cr_assert_eq(r.status, 64, "an unknown option");
    cr_assert_null(strstr(r.err, "Sw0rdf1sh"), "an unknown option: %s", r.err);
    assert_has(r, "--url");
    run_free(&r);
    r = tool("show", url, "k", "x", secret_url, NULL);
    cr_assert_eq(r.status, 64, "too many arguments");
    cr_assert_null(strstr(r.err, "Sw0rdf1sh"), "too many arguments: %s", r.err);
    run_free(&r);
    r = tool("check", "redis+unix:///nonexistent/redis.sock?password=Sw0rd&f1sh-xyzzy", NULL);
    cr_assert(r.status == 64 || r.status == 2, "an '&' in a password: status %d", r.status);
    cr_assert_null(strstr(r.err, "f1sh"), "an '&' in a password: %s", r.err);
    cr_assert_null(strstr(r.out, "f1sh"), "an '&' in a password: %s", r.out);
    run_free(&r);
}

/* ---- check ---- */

Test(tool, check_reports_what_the_store_promises)
{
    run r = tool("check", url, NULL);
    /* The test servers run as CI starts them: Redis without persistence and
     * memcached with eviction break a promise; SQLite in a local temporary
     * directory with synchronous=full keeps them all. */
    int want = strcmp(kind, "sqlite") == 0 ? 0 : 1;
    cr_assert_eq(r.status, want, "%s%s", r.out, r.err);
    assert_has(r, "promise:");
    if (strcmp(kind, "redis") == 0)
        assert_has(r, "no persistence");
    if (strncmp(kind, "memcached", 9) == 0)
        assert_has(r, "evicts");
    run_free(&r);
}

Test(tool, check_exits_2_when_the_store_cannot_be_reached)
{
    uint16_t port = idem_test_free_port();
    char bad[128];
    if (strcmp(kind, "sqlite") == 0)
        snprintf(bad, sizeof bad, "sqlite:///nonexistent-dir-%u/x.db", port);
    else if (strncmp(kind, "memcached", 9) == 0)
        snprintf(bad, sizeof bad, "memcached://127.0.0.1:%u", port);
    else
        snprintf(bad, sizeof bad, "redis://127.0.0.1:%u", port);
    run r = tool("check", bad, NULL);
    cr_assert_eq(r.status, 2, "%s%s", r.out, r.err);
    run_free(&r);
    r = tool("show", bad, "k", NULL);
    cr_assert_eq(r.status, 2, "%s%s", r.out, r.err);
    run_free(&r);
}

/* ---- Redis set up to keep or to break its promises ---- */

typedef struct redis_proc {
    pid_t    pid;
    uint16_t port;
    char     url[128];
} redis_proc;

static redis_proc start_redis(const char *const *extra)
{
    redis_proc p = {.port = idem_test_free_port()};
    char port[8], log[600];
    snprintf(port, sizeof port, "%u", p.port);
    snprintf(log, sizeof log, "%s/redis-%u.log", tmp, p.port);
    const char *argv[24] = {"redis-server", "--port", port, "--bind", "127.0.0.1", "--dir", tmp};
    int n = 7;
    for (; *extra; extra++)
        argv[n++] = *extra;
    argv[n] = NULL;
    p.pid = idem_test_spawn((char *const *)argv, log);
    cr_assert(p.pid > 0);
    cr_assert(idem_test_wait_port(p.port, 10000), "redis-server did not start; see %s", log);
    snprintf(p.url, sizeof p.url, "redis://127.0.0.1:%u", p.port);
    return p;
}

/* Suites tool_<kind> run only against that kind of store (tests/meson.build
 * filters them): these start Redis servers of their own. */
TestSuite(tool_redis, .init = setup, .fini = teardown, .timeout = 60);
TestSuite(tool_memcached2, .init = setup, .fini = teardown, .timeout = 60);
TestSuite(tool_memcached, .init = setup, .fini = teardown, .timeout = 60);
TestSuite(tool_sqlite, .init = setup, .fini = teardown, .timeout = 60);

Test(tool_sqlite, check_warns_on_synchronous_normal)
{
    char u[600];
    snprintf(u, sizeof u, "%s?synchronous=normal", url);
    run r = tool("check", u, NULL);
    cr_assert_eq(r.status, 1, "%s%s", r.out, r.err);
    assert_has(r, "WARNING:  synchronous=normal");
    run_free(&r);
    r = tool("check", url, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "synchronous=full");
    assert_has(r, "local file system");
    run_free(&r);
}

Test(tool_redis, check_warns_on_a_redis_that_evicts_and_passes_on_one_with_noeviction_and_aof)
{
    const char *lru[] = {"--maxmemory-policy", "allkeys-lru", "--appendonly", "yes", NULL};
    redis_proc p = start_redis(lru);
    run r = tool("check", p.url, NULL);
    cr_assert_eq(r.status, 1, "%s%s", r.out, r.err);
    assert_has(r, "WARNING:  maxmemory-policy allkeys-lru");
    assert_has(r, "noeviction");
    run_free(&r);
    idem_test_stop_pid(p.pid, 5000);

    const char *good[] = {"--maxmemory-policy", "noeviction", "--appendonly", "yes", NULL};
    p = start_redis(good);
    r = tool("check", p.url, NULL);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "maxmemory-policy noeviction");
    assert_has(r, "appendonly yes");
    cr_assert_null(strstr(r.out, "WARNING"), "%s", r.out);
    run_free(&r);
    idem_test_stop_pid(p.pid, 5000);
}

Test(tool_redis, no_password_appears_in_any_output)
{
    const char *auth[] = {"--requirepass", "Sw0rdf1sh-xyzzy", "--save", "", "--appendonly", "no", NULL};
    redis_proc p = start_redis(auth);
    char good[160], wrong[160];
    snprintf(good, sizeof good, "redis://:Sw0rdf1sh-xyzzy@127.0.0.1:%u", p.port);
    snprintf(wrong, sizeof wrong, "redis://:Sw0rdf1sh-wrong@127.0.0.1:%u", p.port);
    const char *cmds[][4] = {{"check", good, NULL}, {"show", good, "k", NULL},
                             {"delete", good, "k", "--yes"}, {"check", wrong, NULL},
                             {"show", wrong, "k", NULL}, {"show", good, NULL, NULL}};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        run r = tool(cmds[i][0], cmds[i][1], cmds[i][2], cmds[i][3], NULL);
        cr_assert(strlen(r.out) + strlen(r.err) > 0, "command %zu printed nothing", i);
        cr_assert_null(strstr(r.out, "Sw0rdf1sh"), "command %zu: %s", i, r.out);
        cr_assert_null(strstr(r.err, "Sw0rdf1sh"), "command %zu: %s", i, r.err);
        if (cmds[i][1] == wrong)
            cr_assert_eq(r.status, 2, "a refused password cannot connect: %s", r.err);
        run_free(&r);
    }
    idem_test_stop_pid(p.pid, 5000);
}

Test(tool_redis, check_warns_on_a_redis_replica)
{
    const char *master_args[] = {"--appendonly", "yes", NULL};
    redis_proc m = start_redis(master_args);
    char mport[8];
    snprintf(mport, sizeof mport, "%u", m.port);
    const char *replica_args[] = {"--appendonly", "yes", "--replicaof", "127.0.0.1", mport, NULL};
    redis_proc r = start_redis(replica_args);
    /* A new replica answers LOADING until its first sync with the master. */
    run out = tool("check", r.url, NULL);
    for (int i = 0; i < 200 && out.status == 2 && strstr(out.err, "LOADING"); i++) {
        run_free(&out);
        usleep(50000);
        out = tool("check", r.url, NULL);
    }
    cr_assert_eq(out.status, 1, "%s%s", out.out, out.err);
    assert_has(out, "is a replica");
    run_free(&out);
    idem_test_stop_pid(r.pid, 5000);
    idem_test_stop_pid(m.pid, 5000);
}

Test(tool_memcached2, a_memcached_server_that_does_not_answer_is_named_and_exits_2)
{
    const char *comma = strchr(url, ',');
    cr_assert(comma);
    char second[64];
    snprintf(second, sizeof second, "%s", comma + 1);
    /* A URL with one live server and one nobody listens on. */
    char bad[160];
    uint16_t port = idem_test_free_port();
    snprintf(bad, sizeof bad, "memcached://%s,127.0.0.1:%u", second, port);
    run r = tool("check", bad, NULL);
    cr_assert_eq(r.status, 2, "%s%s", r.out, r.err);
    char where[32];
    snprintf(where, sizeof where, "127.0.0.1:%u", port);
    assert_has(r, where);
    run_free(&r);
}

Test(tool_memcached2, a_server_that_stops_answering_after_open_is_a_warning_of_the_check)
{
    idem_test_server two = {0};
    cr_assert_eq(idem_test_server_start(&two, "memcached2"), 0);
    idem_store *s;
    cr_assert_eq(idem_store_open(&s, two.url), IDEM_OK, "%s", idem_last_error());
    idem_test_server_kill(&two, 1);
    idem_findings *f;
    cr_assert_eq(idem_store_check(s, &f), IDEM_OK, "one server of two answers: %s", idem_last_error());
    char down[32];
    snprintf(down, sizeof down, "127.0.0.1:%u", two.ports[1]);
    bool warned = false;
    for (size_t i = 0; i < idem_findings_count(f); i++) {
        idem_finding_level level;
        const char *text = idem_findings_get(f, i, &level);
        warned |= level == IDEM_FINDING_WARNING && strstr(text, down) && strstr(text, "does not answer");
    }
    cr_assert(warned, "no warning names the server that is down");
    cr_assert_null(idem_findings_get(f, idem_findings_count(f), NULL));
    idem_findings_free(f);
    idem_test_server_kill(&two, 0);
    cr_assert_eq(idem_store_check(s, &f), IDEM_EBACKEND, "no server answers: nothing can be checked");
    cr_assert_null(f);
    idem_store_close(s);
    idem_test_server_stop(&two);
}

#ifdef IDEM_TEST_HAVE_MEMCACHED
#include "memcached_server.h"

static run check_memcached_with(const char *const *extra, idem_test_server *m)
{
    *m = (idem_test_server){.dir = idem_test_tmpdir("mc-check")};
    cr_assert(m->dir);
    cr_assert_eq(idem_test_start_memcached_with(m, 1, extra), 0);
    return tool("check", m->url, NULL);
}

Test(tool_memcached, check_passes_on_a_memcached_that_never_evicts_and_fails_without_cas)
{
    idem_test_server m;
    const char *no_evict[] = {"-M", NULL};
    run r = check_memcached_with(no_evict, &m);
    cr_assert_eq(r.status, 0, "%s%s", r.out, r.err);
    assert_has(r, "never evicts (-M)");
    run_free(&r);
    idem_test_server_stop(&m);

    const char *no_cas[] = {"-C", NULL};
    r = check_memcached_with(no_cas, &m);
    cr_assert_eq(r.status, 2, "a store without CAS is refused at open: %s%s", r.out, r.err);
    assert_has(r, "CAS");
    run_free(&r);
    idem_test_server_stop(&m);
}
#endif

#include <pty.h>

/* Run idem on a terminal, answering its question with answer. */
static int tool_on_tty(const char *answer, char *out, size_t out_len, const char *arg, ...)
{
    const char *argv[16] = {getenv("IDEM_TOOL")};
    int n = 1;
    va_list ap;
    va_start(ap, arg);
    for (const char *a = arg; a; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    int fd;
    pid_t pid = forkpty(&fd, NULL, NULL, NULL);
    cr_assert(pid >= 0, "forkpty failed");
    if (pid == 0) {
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    size_t got = 0;
    bool answered = false;
    for (;;) {
        ssize_t k = read(fd, out + got, out_len - 1 - got);
        if (k <= 0)
            break;
        got += (size_t)k;
        out[got] = '\0';
        if (!answered && strstr(out, "[y/N]")) {
            (void)!write(fd, answer, strlen(answer));
            answered = true;
        }
    }
    out[got] = '\0';
    close(fd);
    int st;
    waitpid(pid, &st, 0);
    cr_assert(answered, "idem did not ask on a terminal:\n%s", out);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(tool, delete_asks_on_a_terminal_and_keeps_the_key_unless_told_yes)
{
    idem_request req = {.key = "ask", .key_len = 3};
    idem_claim *c;
    idem_reply reply = {0};
    cr_assert_eq(idem_begin(layer, &req, &c, &reply), IDEM_OK);
    cr_assert_not_null(c);
    static char out[8192];
    int st = tool_on_tty("n\n", out, sizeof out, "delete", url, "ask", "--prefix", prefix, NULL);
    cr_assert_eq(st, 1, "%s", out);
    cr_assert(strstr(out, "STARTED") && strstr(out, "nothing was deleted"), "%s", out);
    job j = {.status = 200, .body = "x"};
    cr_assert_eq(run_key("ask", 3, &j), IDEM_IN_PROGRESS, "a no keeps the claim");
    st = tool_on_tty("y\n", out, sizeof out, "delete", url, "ask", "--prefix", prefix, NULL);
    cr_assert_eq(st, 0, "%s", out);
    cr_assert(strstr(out, "deleted:"), "%s", out);
    cr_assert_eq(idem_commit(c, 200, "late", 4), IDEM_ELOST, "the deleted claim is fenced out");
    cr_assert_eq(run_key("ask", 3, &j), IDEM_EXECUTED);
}

/* ---- the runner ---- */

int main(int argc, char *argv[])
{
    const char *k = getenv("IDEM_TEST_BACKEND");
    idem_test_server srv;
    if (!k)
        k = "sqlite";
    if (idem_test_server_start(&srv, k) != 0) {
        fprintf(stderr, "test_tool: cannot start a %s store for the tests\n", k);
        return 1;
    }
    setenv("IDEM_TEST_URL", srv.url, 1);
    setenv("IDEM_TEST_BACKEND", k, 1);
    struct criterion_test_set *tests = criterion_initialize();
    int result = 1;
    if (criterion_handle_args(argc, argv, true))
        result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    idem_test_server_stop(&srv);
    return result;
}
