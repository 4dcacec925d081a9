/*
 * Out of memory, in the style of SQLite's malloc tests: a fixed scenario
 * (open a store and a layer; a new key, its replay, a failing handler, a
 * scoped key, begin/extend/commit, begin/abort; close) is run once to count
 * its allocations, then once for every N with the Nth allocation failing.
 * Each run must:
 *   - not crash, and return only documented codes;
 *   - leak nothing: as many allocations are live after the run as before
 *     it (this program counts them, and runs N again when the first run
 *     seems to leak, to tell a leak from a cache filled once; run it under
 *     AddressSanitizer too);
 *   - make no false promise: afterwards, with memory back, a key reported
 *     stored replays its response, a key reported freed (IDEM_FAILED with
 *     abort_error IDEM_OK, an abort that returned IDEM_OK, a claim "given
 *     up") runs again, and a handler that ran is never run again while its
 *     key is claimed;
 *   - store the work done: an allocation that fails after the handler ran
 *     (or in idem_commit) is retried within the lease, as a store error
 *     is, so the response is stored.
 *
 * Before that, the first use of libcrypto in a process (idem_layer_new()
 * sets it up) is failed at its Nth allocation, in a new process each time:
 * it must fail cleanly, and the next layer must work (a failure is not
 * remembered for the life of the process).
 *
 *   oom --url URL [--every K] [--first-every K]
 *     --every K        the scenario for every K-th N only (default 1: all)
 *     --first-every K  the first use of libcrypto for every K-th N only
 *                      (default 1; it needs about 2700 allocations, a
 *                      process each: some 5 s)
 *
 * malloc, calloc, realloc, free, strdup and strndup are replaced in this
 * program, so the library, libcrypto and the store's client library all
 * see the failures. Only allocations of the main thread are counted and
 * failed (a layer's background thread is left alone, so N means the same
 * allocation in every run).
 */
#include <dlfcn.h>
#include <execinfo.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <idempotency/idempotency.h>

/* ---- the allocator ---- */

/* These run before AddressSanitizer has set itself up (it allocates while
 * it starts), so they must not be instrumented. */
#define NO_SANITIZE __attribute__((no_sanitize("address", "undefined")))

static void *(*real_malloc)(size_t);
static void *(*real_calloc)(size_t, size_t);
static void *(*real_realloc)(void *, size_t);
static void (*real_free)(void *);

/* dlsym() may allocate before real_calloc is known. */
static unsigned char bootstrap[4096];
static size_t bootstrap_used;

/* A run is on: allocations of the thread that runs it are counted. Not a
 * thread-local: malloc is called before thread-locals are usable
 * (AddressSanitizer's start-up). */
static atomic_bool counting;
static pthread_t   counting_thread;
static long alloc_count;                  /* allocations of the current run */
static long fail_at;                      /* 0: never */
static long failures;                     /* injected in the current run */
static bool trace_failure;

/* Allocations not freed yet, from every thread: a run that returns with
 * this number changed has leaked (or freed what was not its own). */
static atomic_long nlive;

NO_SANITIZE static void resolve(void)
{
    if (real_malloc)
        return;
    real_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    real_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
}

/* Should this allocation fail? Counts it. */
NO_SANITIZE static bool counted_thread(void)
{
    return atomic_load_explicit(&counting, memory_order_relaxed) && pthread_equal(pthread_self(), counting_thread);
}

NO_SANITIZE static bool inject(void)
{
    if (!counted_thread())
        return false;
    if (++alloc_count == fail_at) {
        failures++;
        if (trace_failure) {
            /* OOM_TRACE=1: where each failure is injected, to chase a report */
            void *bt[16];
            atomic_store(&counting, false);
            int n = backtrace(bt, 16);
            fprintf(stderr, "oom: N=%ld fails here:\n", fail_at);
            backtrace_symbols_fd(bt, n, 2);
            atomic_store(&counting, true);
        }
        return true;
    }
    return false;
}

NO_SANITIZE static bool from_bootstrap(const void *p)
{
    return (const unsigned char *)p >= bootstrap && (const unsigned char *)p < bootstrap + sizeof bootstrap;
}

NO_SANITIZE void *malloc(size_t n)
{
    resolve();
    if (inject()) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = real_malloc(n);
    if (p)
        atomic_fetch_add(&nlive, 1);
    return p;
}

NO_SANITIZE void *calloc(size_t a, size_t b)
{
    if (!real_calloc) {
        /* inside dlsym() */
        size_t n = (a * b + 15) & ~(size_t)15;
        if (bootstrap_used + n > sizeof bootstrap)
            return NULL;
        void *p = bootstrap + bootstrap_used;
        bootstrap_used += n;
        return p;
    }
    if (inject()) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = real_calloc(a, b);
    if (p)
        atomic_fetch_add(&nlive, 1);
    return p;
}

NO_SANITIZE void *realloc(void *old, size_t n)
{
    resolve();
    if (from_bootstrap(old)) {
        void *p = malloc(n);
        if (p)
            memcpy(p, old, n < sizeof bootstrap ? n : sizeof bootstrap);
        return p;
    }
    if (inject()) {
        errno = ENOMEM;
        return NULL;
    }
    void *p = real_realloc(old, n);
    if (!old && p)
        atomic_fetch_add(&nlive, 1);
    else if (old && !p && n == 0)
        atomic_fetch_sub(&nlive, 1);
    return p;
}

NO_SANITIZE void free(void *p)
{
    if (!p || from_bootstrap(p))
        return;
    resolve();
    atomic_fetch_sub(&nlive, 1);
    real_free(p);
}

NO_SANITIZE char *strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p)
        memcpy(p, s, n);
    return p;
}

NO_SANITIZE char *strndup(const char *s, size_t max)
{
    size_t n = strnlen(s, max);
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---- the scenario ---- */

static const char *url;
static int violations;

#define VIOLATION(...) do { fprintf(stderr, "oom: VIOLATION: " __VA_ARGS__); fputc('\n', stderr); \
                            violations++; } while (0)

typedef struct handler_arg {
    int  calls;
    int  fail;
} handler_arg;

static int handler(void *arg, idem_response *resp)
{
    handler_arg *h = arg;
    h->calls++;
    if (h->fail)
        return h->fail;
    return idem_response_set(resp, 201, "charged", 7) == IDEM_OK ? 0 : 1;
}

/* What a run promised, checked afterwards. */
typedef struct promises {
    bool stored[4];      /* keys a, e, c: replay expected */
    bool freed[4];       /* keys b, d, given-up claims: a new run expected */
    bool ran_unstored[4];/* the handler ran and its key must not run again (lease) */
} promises;

enum { KEY_A, KEY_B, KEY_C, KEY_D };
static const char *const key_name[4] = {"a", "b", "c", "d"};

static bool documented(int rc)
{
    return rc == IDEM_OK || rc == IDEM_ENOMEM || rc == IDEM_EBACKEND;
}

static void check_rc(long n, const char *what, int rc)
{
    if (!documented(rc))
        VIOLATION("N=%ld: %s returned %s (%s)", n, what, idem_error_name(rc), idem_last_error());
}

/* The given-up wording of idem_begin()'s ENOMEM after a claim landed. */
static bool says_given_up(void)
{
    return strstr(idem_last_error(), "was given up") != NULL;
}

static void run_key(long n, idem_layer *l, int k, int fail, promises *p)
{
    idem_request req = {.key = key_name[k], .key_len = 1, .fingerprint = "fp", .fingerprint_len = 2};
    handler_arg h = {.fail = fail};
    idem_reply r = {0};
    int rc = idem_run(l, &req, handler, &h, &r);
    check_rc(n, "idem_run", rc);
    if (rc == IDEM_OK && r.outcome == IDEM_EXECUTED)
        p->stored[k] = true;
    else if (rc == IDEM_OK && r.outcome == IDEM_FAILED && r.abort_error == IDEM_OK)
        p->freed[k] = true;
    else if (h.calls && !fail)
        p->ran_unstored[k] = true; /* ran, not stored: its key stays claimed */
    else if (rc == IDEM_ENOMEM && says_given_up())
        p->freed[k] = true;
    if (h.calls > 1)
        VIOLATION("N=%ld: a handler ran %d times in one call", n, h.calls);
    /* One allocation failed; one after the handler ran is retried, as a
     * store error is, so the work it did is stored. */
    if (rc == IDEM_ENOMEM && r.outcome == IDEM_EXECUTED)
        VIOLATION("N=%ld: an allocation failed after the handler ran, and its response was not stored "
                  "(%s)", n, idem_last_error());
    idem_reply_clear(&r);
}

static void scenario(long n, const char *prefix, promises *p)
{
    idem_store *s;
    int rc = idem_store_open(&s, url);
    check_rc(n, "idem_store_open", rc);
    if (rc)
        return;
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    idem_layer *l;
    rc = idem_layer_new(&l, s, &o);
    check_rc(n, "idem_layer_new", rc);
    if (rc == IDEM_OK) {
        run_key(n, l, KEY_A, 0, p);
        run_key(n, l, KEY_A, 0, p);   /* a replay, or runs if the first failed early */
        run_key(n, l, KEY_B, 7, p);   /* a failing handler */

        idem_request c = {.key = "c", .key_len = 1};
        idem_claim *cl = NULL;
        idem_reply r = {0};
        rc = idem_begin(l, &c, &cl, &r);
        check_rc(n, "idem_begin", rc);
        if (rc == IDEM_OK && cl) {
            check_rc(n, "idem_extend", idem_extend(cl, 60000));
            rc = idem_commit(cl, 200, "step", 4);
            check_rc(n, "idem_commit", rc);
            if (rc == IDEM_ENOMEM)
                VIOLATION("N=%ld: an allocation failed in idem_commit, and the response was not stored "
                          "(%s)", n, idem_last_error());
            if (rc == IDEM_OK)
                p->stored[KEY_C] = true;
            else if (idem_abort(cl) == IDEM_OK)
                p->freed[KEY_C] = true;
        } else if (rc == IDEM_ENOMEM && says_given_up()) {
            p->freed[KEY_C] = true;
        }
        idem_reply_clear(&r);

        idem_request d = {.key = "d", .key_len = 1};
        rc = idem_begin(l, &d, &cl, &r);
        check_rc(n, "idem_begin", rc);
        if (rc == IDEM_OK && cl) {
            rc = idem_abort(cl);
            check_rc(n, "idem_abort", rc);
            if (rc == IDEM_OK)
                p->freed[KEY_D] = true;
        } else if (rc == IDEM_ENOMEM && says_given_up()) {
            p->freed[KEY_D] = true;
        }
        idem_reply_clear(&r);

        idem_request e = {.key = "a", .key_len = 1};
        handler_arg h = {0};
        rc = idem_run_scoped(l, "tenant", 6, &e, handler, &h, &r);
        check_rc(n, "idem_run_scoped", rc);
        idem_reply_clear(&r);
        idem_stats st;
        idem_layer_stats(l, &st);
        idem_layer_free(l);
    }
    idem_store_close(s);
}

/* With memory back: do the keys keep the run's promises? */
static void verify(long n, const char *prefix, const promises *p)
{
    idem_store *s;
    idem_layer *l;
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = prefix;
    if (idem_store_open(&s, url) != IDEM_OK || idem_layer_new(&l, s, &o) != IDEM_OK) {
        VIOLATION("N=%ld: the store cannot be opened afterwards: %s", n, idem_last_error());
        return;
    }
    for (int k = 0; k < 4; k++) {
        idem_request req = {.key = key_name[k], .key_len = 1, .fingerprint = k == KEY_A || k == KEY_B ? "fp" : NULL,
                            .fingerprint_len = k == KEY_A || k == KEY_B ? 2 : 0};
        handler_arg h = {0};
        idem_reply r = {0};
        int rc = idem_run(l, &req, handler, &h, &r);
        if (rc != IDEM_OK)
            VIOLATION("N=%ld key %s: %s afterwards (%s)", n, key_name[k], idem_error_name(rc), idem_last_error());
        else if (p->stored[k] && r.outcome != IDEM_REPLAYED)
            VIOLATION("N=%ld key %s: reported stored, but outcome %d afterwards", n, key_name[k], r.outcome);
        else if (p->freed[k] && !p->stored[k] && r.outcome != IDEM_EXECUTED)
            VIOLATION("N=%ld key %s: reported freed, but outcome %d afterwards", n, key_name[k], r.outcome);
        else if (p->ran_unstored[k] && !p->stored[k] && !p->freed[k] && h.calls)
            VIOLATION("N=%ld key %s: its handler ran, was not stored, and ran again", n, key_name[k]);
        idem_reply_clear(&r);
    }
    idem_layer_free(l);
    idem_store_close(s);
}

/* One run with the Nth allocation failing; returns how many allocations
 * the run counted, and in *leaked how many more are live afterwards. */
static long run_once(long n, long *leaked)
{
    char prefix[32];
    snprintf(prefix, sizeof prefix, "n%ld:", n);
    promises p = {0};
    long before = atomic_load(&nlive);
    /* memory://: a store of its own for each run, kept alive from the run
     * to its check by this handle; its records are freed with it, before
     * the count */
    static const char *given;
    static char own[128];
    static unsigned seq;
    idem_store *holder = NULL;
    if (!given)
        given = url;
    if (strncmp(given, "memory://", 9) == 0) {
        snprintf(own, sizeof own, "memory://oom-%ld-%u", (long)getpid(), seq++);
        url = own;
        if (idem_store_open(&holder, url) != IDEM_OK)
            VIOLATION("N=%ld: cannot open %s: %s", n, url, idem_last_error());
    }
    alloc_count = 0;
    failures = 0;
    fail_at = n;
    counting_thread = pthread_self();
    atomic_store(&counting, true);
    scenario(n, prefix, &p);
    atomic_store(&counting, false);
    long used = alloc_count;
    fail_at = 0;
    if (holder) {
        verify(n, prefix, &p);
        idem_store_close(holder);
        *leaked = atomic_load(&nlive) - before;
    } else {
        *leaked = atomic_load(&nlive) - before;
        verify(n, prefix, &p);
    }
    url = given;
    return used;
}

/* Run N twice: the first run may fill a cache of a library on its path
 * (OpenSSL's per-thread error queue, glibc's cache of thread stacks for a
 * layer's background thread); a leak leaks again in the second run. */
static long run_twice(long n)
{
    long leaked;
    long used = run_once(n, &leaked);
    if (leaked > 0) {
        (void)run_once(n, &leaked);
        if (leaked > 0)
            VIOLATION("N=%ld: %ld allocations of the run were not freed", n, leaked);
    }
    return used;
}

/* The first use of libcrypto in a process, with its Nth allocation failing
 * (in a new child process each time, since a success is kept): the
 * layer's set-up fails cleanly with IDEM_ENOMEM, and the next layer's set-up
 * and a fingerprinted request work. Returns how many allocations the first
 * set-up needs, or -1 after a violation. */
static long first_use(long n)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        idem_store *s;
        if (idem_store_open(&s, url) != IDEM_OK)
            _exit(4);
        idem_layer *l = NULL;
        alloc_count = 0;
        fail_at = n;
        counting_thread = pthread_self();
        atomic_store(&counting, true);
        int rc = idem_layer_new(&l, s, NULL);
        atomic_store(&counting, false);
        fail_at = 0;
        if (alloc_count < n)
            _exit(rc == IDEM_OK ? 3 : 1); /* nothing failed: the end of the set-up */
        if (rc != IDEM_OK && rc != IDEM_ENOMEM)
            _exit(1);
        if (rc == IDEM_OK)
            idem_layer_free(l);
        if (idem_layer_new(&l, s, NULL) != IDEM_OK)
            _exit(2); /* the failure was remembered */
        idem_request req = {.key = "k", .key_len = 1, .fingerprint = "fp", .fingerprint_len = 2};
        handler_arg h = {0};
        idem_reply r = {0};
        if (idem_run(l, &req, handler, &h, &r) != IDEM_OK)
            _exit(2);
        _exit(0);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid)
        return -1;
    if (WIFSIGNALED(st)) {
        VIOLATION("first use of libcrypto, N=%ld: the process died of signal %d", n, WTERMSIG(st));
        return -1;
    }
    switch (WEXITSTATUS(st)) {
    case 0: return n + 1;
    case 3: return n;
    case 2: VIOLATION("first use of libcrypto, N=%ld: a failure was remembered: the next layer or "
                      "fingerprint failed with memory back", n); return -1;
    case 4: VIOLATION("first use of libcrypto, N=%ld: the store could not be opened", n); return -1;
    default: VIOLATION("first use of libcrypto, N=%ld: idem_layer_new returned an undocumented code", n);
             return -1;
    }
}

int main(int argc, char **argv)
{
    long every = 1, first_every = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--url") == 0 && i + 1 < argc)
            url = argv[++i];
        else if (strcmp(argv[i], "--every") == 0 && i + 1 < argc)
            every = atol(argv[++i]);
        else if (strcmp(argv[i], "--first-every") == 0 && i + 1 < argc)
            first_every = atol(argv[++i]);
        else {
            fprintf(stderr, "usage: oom --url URL [--every K] [--first-every K]\n");
            return 2;
        }
    }
    if (!url || every < 1 || first_every < 1) {
        fprintf(stderr, "usage: oom --url URL [--every K] [--first-every K]\n");
        return 2;
    }
    static char sqlite_url[4096];
    if (strncmp(url, "sqlite://", 9) == 0 && !strchr(url, '?')) {
        /* thousands of runs: no fsync per commit */
        snprintf(sqlite_url, sizeof sqlite_url, "%s?synchronous=normal", url);
        url = sqlite_url;
    }
    trace_failure = getenv("OOM_TRACE") != NULL;
    long only = getenv("OOM_N") ? atol(getenv("OOM_N")) : 0;
    /* the first use of libcrypto, before anything set it up */
    struct timespec f0, f1;
    clock_gettime(CLOCK_MONOTONIC, &f0);
    long first_runs = 0, first_total = 0;
    for (long n = 1;; n += first_every, first_runs++) {
        long r = first_use(n);
        if (r < 0 && violations > 20)
            break;
        if (r == n) {
            first_total = n;
            break;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &f1);
    printf("oom: first use of libcrypto: about %ld allocations, %ld processes with one of them "
           "failing (every %ld-th), %.1f s\n", first_total, first_runs, first_every,
           (double)(f1.tv_sec - f0.tv_sec) + (double)(f1.tv_nsec - f0.tv_nsec) / 1e9);
    /* warm up: what a process sets up once (libcrypto, the store's client
     * library) is not part of the scenario */
    promises warm = {0};
    scenario(0, "warm:", &warm);
    if (violations)
        return 1;
    long total = run_twice(0);
    if (violations) {
        fprintf(stderr, "oom: the scenario fails with memory to spare\n");
        return 1;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long runs = 0;
    for (long n = only ? only : 1; n <= (only ? only : total); n += every, runs++) {
        long used = run_twice(n);
        if (used < n)
            break; /* the run needed fewer allocations: nothing failed */
        if (violations > 20)
            break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("oom: %s: %ld allocations in the scenario, %ld runs with one of them failing, %.1f s, "
           "%d violations\n", url, total, runs, secs, violations);
    return violations ? 1 : 0;
}
