/*
 * Stress: docs/contract.md sections 2 to 4 and 8 under pressure, against one kind of store.
 *
 * Several worker processes, each with several threads, hammer a small set
 * of hot keys through two layers (different prefixes, one with a ttl of a
 * second so records also expire during the run). Handlers sleep for random
 * times, fail at random, sometimes outlive the short lease; step-API callers
 * abort or extend at random. Optionally the store is SIGKILLed and restarted
 * (--kill-store) and worker processes are SIGKILLed mid-run (--kill-workers).
 *
 * Every side effect goes to a ledger file opened with O_APPEND, one write()
 * per entry:
 *   E  a handler ran (layer, key, attempt id, claim times, status, body)
 *   R  how that attempt ended (committed, lost, failed, aborted, unsure)
 *   P  a replay (layer, key, times, status, body as received)
 *   K  the store was killed / restarted (written by the parent)
 * After the run the parent reads the ledger back and checks:
 *   - every replay is byte for byte the response of one committed attempt of
 *     the same layer and key (never of a lost, failed or aborted one, never
 *     of the other layer);
 *   - per layer and key, at most one committed execution while its record
 *     lives: two committed attempts are only allowed when the first one's
 *     record expired (ttl) or died with the store in between;
 *   - fencing: a committed attempt's key was not claimed by anyone else
 *     between its claim and its commit;
 *   - no handler started after its claim's lease had ended (the lease is
 *     counted from before the claim was sent);
 *   - every call returned IDEM_OK, IDEM_EBACKEND (store down, or a claim
 *     that took more than half of its lease and ran nothing) or IDEM_ELOST,
 *     and none took longer than the store's timeouts allow;
 *   - after the run (and after the last store restart) each key answers.
 *
 * The CI setting is bounded in time and requests; --long (or
 * IDEM_STRESS_LONG=1) is the setting for a person, and each bound can be set
 * by its own argument (run with --help).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/idempotency.h>

#include "harness.h"

#define NLAYERS      2
#define MAX_KEYS     64
#define MAX_PROCS    32
#define MAX_THREADS  32
#define MAX_BODY_RND 200
#define MAX_LINE     4096

/* ---- settings ---- */

typedef struct settings {
    const char *kind;
    int         seconds;       /* wall-clock bound of the run */
    int         procs;
    int         threads;       /* per process */
    int         keys;
    int         max_requests;  /* per thread */
    uint32_t    lease_ms;
    bool        kill_store;    /* SIGKILL and restart server 0 during the run */
    bool        kill_workers;  /* SIGKILL worker processes during the run */
    bool        self_check;    /* afterwards, forge violations and see them caught */
    int         max_call_ms;   /* no call may take longer */
} settings;

static settings cfg = {
    .kind = "sqlite", .seconds = 8, .procs = 3, .threads = 3, .keys = 6, .max_requests = 3000,
    .lease_ms = 250, .max_call_ms = 8000,
};

static const char *url;
static char ledger_path[512];
static int ledger_fd = -1;

/* ---- small helpers ---- */

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void sleep_us(uint64_t us)
{
    struct timespec ts = {.tv_sec = (time_t)(us / 1000000u), .tv_nsec = (long)(us % 1000000u) * 1000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static unsigned rnd(uint64_t *s, unsigned n)
{
    return (unsigned)(rng_next(s) % n);
}

static uint64_t seed(void)
{
    uint64_t v = 0;
    while (v == 0)
        if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v)
            v = now_us() ^ (uint64_t)getpid() << 32;
    return v;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "stress: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void hex(char *out, const unsigned char *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

static int unhex_digit(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

static size_t unhex(unsigned char *out, const char *s, size_t cap)
{
    size_t n = 0;
    while (s[0] && s[1] && n < cap) {
        int hi = unhex_digit(s[0]), lo = unhex_digit(s[1]);
        if (hi < 0 || lo < 0)
            break;
        out[n++] = (unsigned char)(hi << 4 | lo);
        s += 2;
    }
    return n;
}

/* One ledger entry: one write() on an O_APPEND descriptor, so entries from
 * all processes never interleave. */
static void ledger(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ledger(const char *fmt, ...)
{
    char line[MAX_LINE];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof line)
        die("ledger entry too long");
    if (write(ledger_fd, line, (size_t)n) != n)
        die("writing the ledger: %s", strerror(errno));
}

/* The keys: a few hot ones at a time, replaced by fresh ones every
 * KEY_GENERATION_US so that claims keep racing; key number k of generation
 * g is k + g * MAX_KEYS. Short binary strings with NUL, CR, LF and a space. */
#define KEY_GENERATION_US 400000u
static uint64_t run_start_us;

static int pick_key(uint64_t *rng)
{
    int gen = (int)((now_us() - run_start_us) / KEY_GENERATION_US);
    return gen * MAX_KEYS + (int)rnd(rng, (unsigned)cfg.keys);
}

static size_t key_bytes(int k, unsigned char *out)
{
    static const unsigned char tail[] = {'\0', ' ', '\r', '\n'};
    int n = snprintf((char *)out, 24, "hot%d", k);
    memcpy(out + n, tail, (size_t)(k % 5));
    return (size_t)n + (size_t)(k % 5);
}

/* Layer 0 keeps responses for an hour, layer 1 for one second. The prefixes
 * are not prefixes of each other. */
static const char *const layer_prefix[NLAYERS] = {"stressA:", "stressB:"};
static const uint32_t layer_ttl_s[NLAYERS] = {3600, 1};
/* Layer 1 renews the leases of its running handlers (auto_extend): its
 * handlers that outlive the lease keep their keys instead of losing them. */
static const bool layer_auto_extend[NLAYERS] = {false, true};

/* ---- the workers ---- */

typedef struct worker {
    idem_layer *layers[NLAYERS];
    int         index;         /* thread number */
    uint64_t    rng;
    uint64_t    seq;
    /* the attempt in flight, for the handler */
    uint64_t    attempt;
    int         layer, key;
    uint64_t    call_start;
    int         status;
    unsigned char body[128 + MAX_BODY_RND];
    size_t      body_len;
    bool        handler_ran;
    uint64_t    handler_end;
    int         bad_rc;        /* first unexpected return code, 0 if none */
    char        bad_msg[300];
    long        slowest_ms;
} worker;

static void note_bad(worker *w, const char *what, int rc)
{
    if (w->bad_rc == 0) {
        w->bad_rc = rc ? rc : -100;
        snprintf(w->bad_msg, sizeof w->bad_msg, "%s: %s (%s)", what, idem_error_name(rc),
                 idem_last_error());
    }
}

/* Make the attempt's response: its identity, then random bytes. */
static void make_response(worker *w)
{
    int n = snprintf((char *)w->body, 128, "a=%016" PRIx64 ";l=%d;k=%d;", w->attempt, w->layer, w->key);
    size_t extra = rnd(&w->rng, MAX_BODY_RND);
    for (size_t i = 0; i < extra; i++)
        w->body[(size_t)n + i] = (unsigned char)rng_next(&w->rng);
    w->body_len = (size_t)n + extra;
    w->status = 200 + (int)rnd(&w->rng, 100);
}

/* The side effect: goes to the ledger before the handler answers. */
static void effect(worker *w, uint64_t claim_end)
{
    char bh[2 * sizeof w->body + 1];
    hex(bh, w->body, w->body_len);
    ledger("E %d %d %016" PRIx64 " %" PRIu64 " %" PRIu64 " %d %s\n", w->layer, w->key, w->attempt,
           w->call_start, claim_end, w->status, bh);
}

static void result(worker *w, char what, uint64_t commit_start, uint64_t commit_end)
{
    ledger("R %016" PRIx64 " %c %" PRIu64 " %" PRIu64 "\n", w->attempt, what, commit_start, commit_end);
}

static void replay(worker *w, const idem_reply *r, uint64_t start, uint64_t end)
{
    char bh[2 * (128 + MAX_BODY_RND) + 1];
    if (r->body_len > 128 + MAX_BODY_RND) {
        bh[0] = '!';
        bh[1] = '\0';
    } else {
        hex(bh, r->body, r->body_len);
    }
    ledger("P %d %d %" PRIu64 " %" PRIu64 " %d %s\n", w->layer, w->key, start, end, r->status,
           r->body_len ? bh : "-");
}

/* How long a handler works: mostly a little, sometimes past the lease. */
static uint64_t work_us(worker *w)
{
    unsigned dice = rnd(&w->rng, 100);
    if (dice < 4)
        return (uint64_t)cfg.lease_ms * 1000u + 50000u + rnd(&w->rng, 100000);
    if (dice < 20)
        return 2000 + rnd(&w->rng, 20000);
    return rnd(&w->rng, 2000);
}

static int handler(void *arg, idem_response *resp)
{
    worker *w = arg;
    w->handler_ran = true;
    make_response(w);
    effect(w, now_us());
    sleep_us(work_us(w));
    unsigned dice = rnd(&w->rng, 100);
    int rc = 0;
    if (dice < 10) {
        rc = 1 + (int)rnd(&w->rng, 5); /* the handler fails */
    } else if (idem_response_set(resp, w->status, w->body, w->body_len) != IDEM_OK) {
        note_bad(w, "idem_response_set", -1);
        rc = 99;
    }
    w->handler_end = now_us();
    return rc;
}

static void track(worker *w, uint64_t start)
{
    long ms = (long)((now_us() - start) / 1000u);
    if (ms > w->slowest_ms)
        w->slowest_ms = ms;
}

/* A claim whose reply took more than half of its lease is refused, and
 * nothing runs (docs/contract.md, leases): on a loaded machine that is an
 * IDEM_EBACKEND which is right, and the ledger checks that nothing ran. It
 * is only right when the call did take that long. */
static bool late_claim_refused(const worker *w, int rc, uint64_t end)
{
    return rc == IDEM_EBACKEND && (end - w->call_start) / 1000u >= cfg.lease_ms / 2 &&
           strstr(idem_last_error(), "more than half of its");
}

static void one_run(worker *w, const idem_request *req)
{
    idem_reply r = {0};
    w->handler_ran = false;
    w->call_start = now_us();
    int rc = idem_run(w->layers[w->layer], req, handler, w, &r);
    uint64_t end = now_us();
    track(w, w->call_start);
    if (w->handler_ran) {
        if (rc == IDEM_OK && r.outcome == IDEM_EXECUTED)
            result(w, 'C', w->handler_end, end);
        else if (rc == IDEM_OK && r.outcome == IDEM_FAILED)
            result(w, 'F', w->handler_end, end);
        else if (rc == IDEM_ELOST)
            result(w, 'L', w->handler_end, end);
        else if (rc == IDEM_EBACKEND)
            result(w, 'U', w->handler_end, end); /* unsure: the commit may have landed */
        else {
            result(w, 'X', w->handler_end, end);
            note_bad(w, "idem_run after the handler", rc);
        }
        if (rc == IDEM_EBACKEND && !cfg.kill_store)
            note_bad(w, "idem_run: store error with a healthy store", rc);
    } else if (rc == IDEM_OK && r.outcome == IDEM_REPLAYED) {
        replay(w, &r, w->call_start, end);
    } else if (rc == IDEM_OK && r.outcome == IDEM_IN_PROGRESS) {
        if (r.retry_after_ms == 0 || r.retry_after_ms > cfg.lease_ms + 1000)
            note_bad(w, "IN_PROGRESS with a retry_after_ms beyond the lease", 0);
    } else if (!(rc == IDEM_EBACKEND && cfg.kill_store) && !late_claim_refused(w, rc, end)) {
        note_bad(w, "idem_run", rc);
    }
    idem_reply_clear(&r);
}

static void one_step(worker *w, const idem_request *req)
{
    idem_reply r = {0};
    idem_claim *c = NULL;
    w->call_start = now_us();
    int rc = idem_begin(w->layers[w->layer], req, &c, &r);
    uint64_t claim_end = now_us();
    track(w, w->call_start);
    if (rc != IDEM_OK) {
        if (!(rc == IDEM_EBACKEND && cfg.kill_store) && !late_claim_refused(w, rc, claim_end))
            note_bad(w, "idem_begin", rc);
        idem_reply_clear(&r);
        return;
    }
    if (!c) {
        if (r.outcome == IDEM_REPLAYED)
            replay(w, &r, w->call_start, claim_end);
        idem_reply_clear(&r);
        return;
    }
    make_response(w);
    effect(w, claim_end);
    sleep_us(work_us(w));
    unsigned dice = rnd(&w->rng, 100);
    if (dice < 10) {
        uint64_t t = now_us();
        rc = idem_extend(c, cfg.lease_ms);
        track(w, t);
        if (rc != IDEM_OK && rc != IDEM_ELOST && !(rc == IDEM_EBACKEND && cfg.kill_store))
            note_bad(w, "idem_extend", rc);
        sleep_us(rnd(&w->rng, 3000));
    }
    dice = rnd(&w->rng, 100);
    uint64_t t = now_us();
    if (dice < 12) {
        rc = idem_abort(c); /* always frees the claim */
        result(w, 'A', t, now_us());
        if (rc != IDEM_OK && rc != IDEM_ELOST && !(rc == IDEM_EBACKEND && cfg.kill_store))
            note_bad(w, "idem_abort", rc);
    } else {
        rc = idem_commit(c, w->status, w->body, w->body_len);
        uint64_t e = now_us();
        if (rc == IDEM_OK) {
            result(w, 'C', t, e);
        } else if (rc == IDEM_ELOST) {
            result(w, 'L', t, e);
        } else if (rc == IDEM_EBACKEND && cfg.kill_store) {
            result(w, 'U', t, e);
            (void)idem_abort(c); /* unsure whether it landed; give the claim up */
        } else {
            result(w, 'X', t, e);
            note_bad(w, "idem_commit", rc);
            (void)idem_abort(c);
        }
    }
    track(w, t);
    idem_reply_clear(&r);
}

typedef struct thread_arg {
    worker   w;
    uint64_t deadline_us;
} thread_arg;

static void *worker_thread(void *arg)
{
    thread_arg *ta = arg;
    worker *w = &ta->w;
    for (int i = 0; i < cfg.max_requests && now_us() < ta->deadline_us; i++) {
        w->layer = (int)rnd(&w->rng, NLAYERS);
        w->key = pick_key(&w->rng);
        w->attempt = (uint64_t)getpid() << 32 | (uint64_t)w->index << 24 | ++w->seq;
        unsigned char key[40];
        idem_request req = {.key = key, .key_len = key_bytes(w->key, key)};
        if (rnd(&w->rng, 100) < 70)
            one_run(w, &req);
        else
            one_step(w, &req);
        sleep_us(rnd(&w->rng, 1500));
    }
    return NULL;
}

/* A worker process: its own store and layers, cfg.threads threads. Exit
 * status 0 when every call returned what the contract allows. */
static int worker_main(uint64_t deadline_us)
{
    idem_store *store;
    uint64_t t0 = now_us();
    int rc = idem_store_open(&store, url), tries = 0;
    /* The store may be down right now (--kill-store). An SQLite store may
     * also refuse a new connection with "database is locked" at once, without
     * waiting for busy_timeout_ms, right after a worker was SIGKILLed: that
     * is reported, and retried as an application would retry a 503. */
    for (; rc == IDEM_EBACKEND && tries < 50; tries++) {
        fprintf(stderr, "worker %ld: idem_store_open failed after %.3f s, retrying: %s\n",
                (long)getpid(), (double)(now_us() - t0) / 1e6, idem_last_error());
        sleep_us(100000);
        t0 = now_us();
        rc = idem_store_open(&store, url);
    }
    if (rc != IDEM_OK) {
        fprintf(stderr, "worker %ld: idem_store_open failed after %.3f s: %s\n", (long)getpid(),
                (double)(now_us() - t0) / 1e6, idem_last_error());
        return 1;
    }
    idem_layer *layers[NLAYERS];
    for (int l = 0; l < NLAYERS; l++) {
        idem_options o;
        idem_options_init(&o);
        o.key_prefix = layer_prefix[l];
        o.lease_ms = cfg.lease_ms;
        o.ttl_s = layer_ttl_s[l];
        o.auto_extend = layer_auto_extend[l];
        if (idem_layer_new(&layers[l], store, &o) != IDEM_OK) {
            fprintf(stderr, "worker: idem_layer_new: %s\n", idem_last_error());
            return 1;
        }
    }
    thread_arg *ta = calloc((size_t)cfg.threads, sizeof *ta);
    pthread_t *tids = calloc((size_t)cfg.threads, sizeof *tids);
    if (!ta || !tids)
        return 1;
    for (int i = 0; i < cfg.threads; i++) {
        ta[i].w.index = i;
        ta[i].w.rng = seed();
        memcpy(ta[i].w.layers, layers, sizeof layers);
        ta[i].deadline_us = deadline_us;
        if (pthread_create(&tids[i], NULL, worker_thread, &ta[i]) != 0)
            return 1;
    }
    int bad = 0;
    for (int i = 0; i < cfg.threads; i++) {
        pthread_join(tids[i], NULL);
        if (ta[i].w.bad_rc) {
            fprintf(stderr, "worker %ld thread %d: %s\n", (long)getpid(), i, ta[i].w.bad_msg);
            bad = 1;
        }
        if (ta[i].w.slowest_ms > cfg.max_call_ms) {
            fprintf(stderr, "worker %ld thread %d: a call took %ld ms (limit %d)\n", (long)getpid(), i,
                    ta[i].w.slowest_ms, cfg.max_call_ms);
            bad = 1;
        }
    }
    for (int l = 0; l < NLAYERS; l++)
        idem_layer_free(layers[l]);
    idem_store_close(store);
    free(ta);
    free(tids);
    return bad;
}

/* ---- the checker ---- */

typedef struct attempt {
    uint64_t id;
    int      layer, key, status;
    uint64_t claim_start, claim_end;
    char     result;            /* 'C', 'L', 'F', 'A', 'U', 'X', or 0: none (its process died) */
    uint64_t commit_start, commit_end;
    bool     replayed;
    unsigned char *body;
    size_t   body_len;
} attempt;

typedef struct replay_entry {
    int      layer, key, status;
    uint64_t start, end;
    unsigned char *body;
    size_t   body_len;
} replay_entry;

typedef struct ledger_data {
    attempt      *att;
    size_t        natt, capatt;
    replay_entry *rep;
    size_t        nrep, caprep;
    uint64_t      kills[256], restarts[256];  /* store killed at / restarted at */
    size_t        nkills;
} ledger_data;

static int by_id(const void *a, const void *b)
{
    const attempt *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int by_claim(const void *a, const void *b)
{
    const attempt *const *x = a, *const *y = b;
    return (*x)->claim_end < (*y)->claim_end ? -1 : (*x)->claim_end > (*y)->claim_end;
}

/* By layer, key, then claim time. */
static int by_group(const void *a, const void *b)
{
    const attempt *const *x = a, *const *y = b;
    if ((*x)->layer != (*y)->layer)
        return (*x)->layer - (*y)->layer;
    if ((*x)->key != (*y)->key)
        return (*x)->key - (*y)->key;
    return by_claim(a, b);
}

static attempt *find(ledger_data *d, uint64_t id)
{
    attempt k = {.id = id};
    return bsearch(&k, d->att, d->natt, sizeof *d->att, by_id);
}

static void *grow(void *p, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return p;
    *cap = *cap ? *cap * 2 : 1024;
    p = realloc(p, *cap * size);
    if (!p)
        die("out of memory reading the ledger");
    return p;
}

static unsigned char *body_of(const char *h, size_t *len)
{
    size_t n = strlen(h);
    unsigned char *b = malloc(n / 2 + 1);
    if (!b)
        die("out of memory");
    *len = strcmp(h, "-") == 0 ? 0 : unhex(b, h, n / 2);
    b[*len] = '\0'; /* bodies are parsed with sscanf */
    return b;
}

static void read_ledger(ledger_data *d)
{
    FILE *f = fopen(ledger_path, "r");
    if (!f)
        die("cannot read the ledger %s", ledger_path);
    static char line[MAX_LINE];
    static char bh[MAX_LINE];
    /* first pass: E and P and K; R entries are matched after sorting */
    while (fgets(line, sizeof line, f)) {
        if (line[0] == 'E') {
            d->att = grow(d->att, &d->capatt, d->natt, sizeof *d->att);
            attempt *a = &d->att[d->natt];
            memset(a, 0, sizeof *a);
            if (sscanf(line, "E %d %d %" SCNx64 " %" SCNu64 " %" SCNu64 " %d %4000s", &a->layer, &a->key,
                       &a->id, &a->claim_start, &a->claim_end, &a->status, bh) != 7)
                die("bad ledger line: %s", line);
            a->body = body_of(bh, &a->body_len);
            d->natt++;
        } else if (line[0] == 'P') {
            d->rep = grow(d->rep, &d->caprep, d->nrep, sizeof *d->rep);
            replay_entry *p = &d->rep[d->nrep];
            if (sscanf(line, "P %d %d %" SCNu64 " %" SCNu64 " %d %4000s", &p->layer, &p->key, &p->start,
                       &p->end, &p->status, bh) != 6)
                die("bad ledger line: %s", line);
            p->body = body_of(bh, &p->body_len);
            d->nrep++;
        } else if (line[0] == 'K') {
            if (d->nkills < 256 &&
                sscanf(line, "K %" SCNu64 " %" SCNu64, &d->kills[d->nkills], &d->restarts[d->nkills]) == 2)
                d->nkills++;
        }
    }
    qsort(d->att, d->natt, sizeof *d->att, by_id);
    rewind(f);
    while (fgets(line, sizeof line, f)) {
        if (line[0] != 'R')
            continue;
        uint64_t id, cs, ce;
        char what;
        if (sscanf(line, "R %" SCNx64 " %c %" SCNu64 " %" SCNu64, &id, &what, &cs, &ce) != 4)
            die("bad ledger line: %s", line);
        attempt *a = find(d, id);
        if (!a)
            die("ledger: result for an attempt that never ran: %s", line);
        a->result = what;
        a->commit_start = cs;
        a->commit_end = ce;
    }
    fclose(f);
}

/* Did the store die between t0 and t1 (so a record written before t0 may
 * be gone at t1)? */
static bool store_died_between(const ledger_data *d, uint64_t t0, uint64_t t1)
{
    for (size_t i = 0; i < d->nkills; i++)
        if (d->kills[i] >= t0 && d->kills[i] <= t1)
            return true;
    return false;
}

typedef struct tally {
    size_t attempts, committed, lost, failed, aborted, unsure, died, replays;
} tally;

/* Tolerance for a store that counts expiry in whole seconds. */
static uint64_t ttl_slack_us(void)
{
    return strncmp(cfg.kind, "memcached", 9) == 0 ? 1100000u : 100000u;
}

static int check_ledger(ledger_data *d, tally *t)
{
    int errors = 0;
#define FAIL(...) do { if (errors++ < 20) { fprintf(stderr, "stress: VIOLATION: " __VA_ARGS__); fputc('\n', stderr); } } while (0)

    /* Replays: byte-identical to one committed attempt of that layer and key. */
    for (size_t i = 0; i < d->nrep; i++) {
        replay_entry *p = &d->rep[i];
        uint64_t id;
        int l, k;
        if (p->body_len < 2 || sscanf((const char *)p->body, "a=%16" SCNx64 ";l=%d;k=%d;", &id, &l, &k) != 3) {
            FAIL("layer %d key %d: a replay carries a body no handler wrote (%zu bytes)", p->layer, p->key,
                 p->body_len);
            continue;
        }
        attempt *a = find(d, id);
        if (!a) {
            FAIL("layer %d key %d: replay of attempt %016" PRIx64 " that is not in the ledger", p->layer,
                 p->key, id);
            continue;
        }
        if (a->layer != p->layer || a->key != p->key)
            FAIL("layer %d key %d replayed the response of layer %d key %d", p->layer, p->key, a->layer,
                 a->key);
        if (a->status != p->status || a->body_len != p->body_len || memcmp(a->body, p->body, a->body_len) != 0)
            FAIL("layer %d key %d: replay of attempt %016" PRIx64 " differs from the response it stored "
                 "(status %d/%d, %zu/%zu bytes)", p->layer, p->key, id, p->status, a->status, p->body_len,
                 a->body_len);
        if (a->result == 'L' || a->result == 'F' || a->result == 'A' || a->result == 'X')
            FAIL("layer %d key %d: replay of attempt %016" PRIx64 " whose commit ended as '%c'", p->layer,
                 p->key, id, a->result);
        if (p->end < a->claim_end)
            FAIL("layer %d key %d: replay before the attempt that stored it ran", p->layer, p->key);
        a->replayed = true;
    }

    /* Group the attempts by layer and key, in claim order. */
    attempt **all = malloc((d->natt + 1) * sizeof *all);
    attempt **list = malloc((d->natt + 1) * sizeof *list);
    if (!all || !list)
        die("out of memory");
    for (size_t i = 0; i < d->natt; i++)
        all[i] = &d->att[i];
    qsort(all, d->natt, sizeof *all, by_group);
    for (size_t g = 0, end; g < d->natt; g = end) {
        for (end = g + 1; end < d->natt && all[end]->layer == all[g]->layer && all[end]->key == all[g]->key;)
            end++;
        int l = all[g]->layer, k = all[g]->key;
        if (l < 0 || l >= NLAYERS) {
            FAIL("attempt on layer %d", l);
            continue;
        }
        /* At most one committed execution while its record lives: a's record
         * lives from its commit until commit + ttl, unless the store died;
         * the next committed attempt b must have claimed after that. */
        size_t n = 0;
        for (size_t i = g; i < end; i++)
            if (all[i]->result == 'C' || all[i]->replayed)
                list[n++] = all[i];
        for (size_t i = 1; i < n; i++) {
            attempt *a = list[i - 1], *b = list[i];
            uint64_t a_commit = a->commit_start ? a->commit_start : a->claim_end;
            uint64_t expires = a_commit + (uint64_t)layer_ttl_s[l] * 1000000u;
            bool expired = b->claim_end + ttl_slack_us() >= expires;
            if (!expired && !store_died_between(d, a->claim_start, b->claim_end))
                FAIL("layer %d key %d: two committed executions while the first one's record lived: "
                     "%016" PRIx64 " (claimed %" PRIu64 ", committed %" PRIu64 ") and %016" PRIx64
                     " (claimed %" PRIu64 "..%" PRIu64 ")", l, k, a->id, a->claim_end, a_commit, b->id,
                     b->claim_start, b->claim_end);
        }
        /* Fencing: nobody claimed a committed attempt's key between its
         * claim and its commit. */
        for (size_t i = g; i < end; i++) {
            attempt *a = all[i];
            if (a->result != 'C')
                continue;
            for (size_t j = i + 1; j < end && all[j]->claim_end < a->commit_start; j++) {
                attempt *b = all[j];
                if (b->claim_start > a->claim_end)
                    FAIL("layer %d key %d: attempt %016" PRIx64 " committed although %016" PRIx64
                         " claimed the key after it and before its commit", l, k, a->id, b->id);
            }
        }
    }
    free(all);
    free(list);

    /* A handler starts within its claim's lease, counted from the call. */
    for (size_t i = 0; i < d->natt; i++) {
        attempt *a = &d->att[i];
        if (a->claim_end > a->claim_start + (uint64_t)cfg.lease_ms * 1000u)
            FAIL("layer %d key %d: attempt %016" PRIx64 " started its handler %" PRIu64 " ms after its "
                 "claim was sent, past its %u ms lease", a->layer, a->key, a->id,
                 (a->claim_end - a->claim_start) / 1000u, cfg.lease_ms);
    }

    for (size_t i = 0; i < d->natt; i++) {
        attempt *a = &d->att[i];
        t->attempts++;
        switch (a->result) {
        case 'C': t->committed++; break;
        case 'L': t->lost++; break;
        case 'F': t->failed++; break;
        case 'A': t->aborted++; break;
        case 'U': t->unsure++; break;
        case 0: t->died++; break;
        default: FAIL("attempt %016" PRIx64 " ended as '%c'", a->id, a->result);
        }
    }
    t->replays = d->nrep;
    return errors;
#undef FAIL
}

/* After the run: every key answers, and a replay is the committed response
 * of the ledger (with the one-hour layer, whose records outlive the run). */
static int final_sweep(ledger_data *d)
{
    idem_store *store;
    int rc = IDEM_EBACKEND;
    for (int tries = 0; tries < 50 && rc != IDEM_OK; tries++) {
        rc = idem_store_open(&store, url);
        if (rc)
            sleep_us(100000);
    }
    if (rc != IDEM_OK) {
        fprintf(stderr, "stress: VIOLATION: the store does not come back: %s\n", idem_last_error());
        return 1;
    }
    idem_options o;
    idem_options_init(&o);
    o.key_prefix = layer_prefix[0];
    o.lease_ms = cfg.lease_ms;
    o.ttl_s = layer_ttl_s[0];
    idem_layer *l;
    if (idem_layer_new(&l, store, &o) != IDEM_OK)
        die("idem_layer_new: %s", idem_last_error());
    int errors = 0;
    sleep_us((uint64_t)cfg.lease_ms * 1000u + 100000u); /* leases of killed workers end */
    int last_key = 0;
    for (size_t i = 0; i < d->natt; i++)
        if (d->att[i].key > last_key)
            last_key = d->att[i].key;
    for (int k = 0; k <= last_key; k++) {
        if (k % MAX_KEYS >= cfg.keys)
            continue;
        unsigned char key[40];
        idem_request req = {.key = key, .key_len = key_bytes(k, key)};
        idem_claim *c = NULL;
        idem_reply r = {0};
        rc = IDEM_EBACKEND;
        for (int tries = 0; tries < 30 && rc == IDEM_EBACKEND; tries++) {
            rc = idem_begin(l, &req, &c, &r);
            if (rc == IDEM_EBACKEND)
                sleep_us(100000);
        }
        if (rc != IDEM_OK) {
            fprintf(stderr, "stress: VIOLATION: key %d does not answer after the run: %s (%s)\n", k,
                    idem_error_name(rc), idem_last_error());
            errors++;
            continue;
        }
        size_t committed = 0;
        for (size_t i = 0; i < d->natt; i++)
            committed += d->att[i].layer == 0 && d->att[i].key == k &&
                         (d->att[i].result == 'C' || d->att[i].replayed);
        if (c) {
            /* free: allowed only when nothing committed, or the store forgot it */
            if (committed && d->nkills == 0) {
                fprintf(stderr, "stress: VIOLATION: key %d is free after a committed execution\n", k);
                errors++;
            }
            (void)idem_abort(c);
        } else if (r.outcome == IDEM_REPLAYED) {
            uint64_t id;
            attempt *a = NULL;
            if (sscanf((const char *)r.body, "a=%16" SCNx64, &id) == 1)
                a = find(d, id);
            if (!a || a->layer != 0 || a->key != k || a->body_len != r.body_len ||
                memcmp(a->body, r.body, r.body_len) != 0 || (a->result != 'C' && a->result != 'U' && a->result != 0)) {
                fprintf(stderr, "stress: VIOLATION: key %d replays a response that was not committed\n", k);
                errors++;
            }
        } else if (r.outcome != IDEM_IN_PROGRESS) {
            fprintf(stderr, "stress: VIOLATION: key %d: outcome %d after the run\n", k, r.outcome);
            errors++;
        }
        idem_reply_clear(&r);
    }
    idem_layer_free(l);
    idem_store_close(store);
    return errors;
}

/* Append to the ledger what a broken library would have done, and check
 * that the checker sees each: a second committed execution of a key whose
 * record lives, a replay one byte off, a replay of a lost attempt, and a
 * replay that crossed layers. */
static int self_check(const ledger_data *good)
{
    const attempt *a = NULL, *lost = NULL;
    for (size_t i = 0; i < good->natt; i++) {
        if (!a && good->att[i].layer == 0 && good->att[i].result == 'C' && good->att[i].body_len > 0)
            a = &good->att[i];
        if (!lost && good->att[i].result == 'L')
            lost = &good->att[i];
    }
    if (!a)
        die("self-check: no committed attempt to forge from");
    char bh[2 * (128 + MAX_BODY_RND) + 1];
    uint64_t t = a->commit_end + 1000;
    uint64_t forged = 0xfffffffe00000001ULL;
    /* a second execution of a's key, committed a millisecond after a's */
    hex(bh, a->body, a->body_len);
    ledger("E %d %d %016" PRIx64 " %" PRIu64 " %" PRIu64 " %d %s\n", a->layer, a->key, forged, t, t + 1,
           a->status, bh);
    ledger("R %016" PRIx64 " C %" PRIu64 " %" PRIu64 "\n", forged, t + 2, t + 3);
    /* a handler that started after its claim's lease ended (on a key of its own) */
    uint64_t late = 0xfffffffe00000002ULL, lt = t + 10000000u;
    ledger("E %d %d %016" PRIx64 " %" PRIu64 " %" PRIu64 " %d %s\n", a->layer, 63, late, lt,
           lt + (uint64_t)cfg.lease_ms * 1000u + 1000u, a->status, bh);
    ledger("R %016" PRIx64 " F %" PRIu64 " %" PRIu64 "\n", late, lt + 1, lt + 2);
    /* a replay one byte off */
    unsigned char body[128 + MAX_BODY_RND];
    memcpy(body, a->body, a->body_len);
    body[a->body_len - 1] ^= 1;
    hex(bh, body, a->body_len);
    ledger("P %d %d %" PRIu64 " %" PRIu64 " %d %s\n", a->layer, a->key, t, t + 1, a->status, bh);
    /* the other layer replaying a's response */
    hex(bh, a->body, a->body_len);
    ledger("P %d %d %" PRIu64 " %" PRIu64 " %d %s\n", 1, a->key, t, t + 1, a->status, bh);
    int expected = 4;
    if (lost) {
        hex(bh, lost->body, lost->body_len);
        ledger("P %d %d %" PRIu64 " %" PRIu64 " %d %s\n", lost->layer, lost->key, lost->commit_end,
               lost->commit_end + 1, lost->status, bh);
        expected++;
    }
    ledger_data d = {0};
    read_ledger(&d);
    tally t2 = {0};
    fprintf(stderr, "stress: self-check: %d forged violations follow\n", expected);
    int found = check_ledger(&d, &t2);
    for (size_t i = 0; i < d.natt; i++)
        free(d.att[i].body);
    for (size_t i = 0; i < d.nrep; i++)
        free(d.rep[i].body);
    free(d.att);
    free(d.rep);
    if (found < expected) {
        fprintf(stderr, "stress: self-check FAILED: the checker found %d of %d forged violations\n", found,
                expected);
        return 1;
    }
    printf("stress: self-check: the checker caught all %d forged violations\n", expected);
    return 0;
}

/* ---- the parent ---- */

static pid_t spawn_worker(uint64_t deadline_us)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(worker_main(deadline_us));
    if (pid < 0)
        die("fork: %s", strerror(errno));
    return pid;
}

static void usage(void)
{
    printf("usage: stress [--backend KIND] [--seconds N] [--procs N] [--threads N] [--keys N]\n"
           "              [--requests N (per thread)] [--lease-ms N] [--max-call-ms N]\n"
           "              [--kill-store] [--kill-workers] [--self-check] [--long]\n"
           "KIND: sqlite, redis, memcached, memcached2 (default: $IDEM_TEST_BACKEND or sqlite)\n"
           "--long, or IDEM_STRESS_LONG=1: 120 s, 6 processes x 6 threads, 50000 requests each\n");
}

static int arg_int(int argc, char **argv, int *i, int lo, int hi)
{
    if (*i + 1 >= argc)
        die("%s needs a value", argv[*i]);
    char *end;
    long v = strtol(argv[++*i], &end, 10);
    if (*end || v < lo || v > hi)
        die("%s must be a number from %d to %d", argv[*i - 1], lo, hi);
    return (int)v;
}

static void parse_args(int argc, char **argv)
{
    const char *env = getenv("IDEM_TEST_BACKEND");
    if (env && *env)
        cfg.kind = env;
    env = getenv("IDEM_STRESS_LONG");
    bool longer = env && *env && strcmp(env, "0") != 0;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--long") == 0)
            longer = true;
    if (longer) {
        cfg.seconds = 120;
        cfg.procs = 6;
        cfg.threads = 6;
        cfg.keys = 16;
        cfg.max_requests = 50000;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--backend") == 0 && i + 1 < argc) cfg.kind = argv[++i];
        else if (strcmp(a, "--seconds") == 0) cfg.seconds = arg_int(argc, argv, &i, 1, 86400);
        else if (strcmp(a, "--procs") == 0) cfg.procs = arg_int(argc, argv, &i, 1, MAX_PROCS);
        else if (strcmp(a, "--threads") == 0) cfg.threads = arg_int(argc, argv, &i, 1, MAX_THREADS);
        else if (strcmp(a, "--keys") == 0) cfg.keys = arg_int(argc, argv, &i, 1, MAX_KEYS);
        else if (strcmp(a, "--requests") == 0) cfg.max_requests = arg_int(argc, argv, &i, 1, 100000000);
        else if (strcmp(a, "--lease-ms") == 0) cfg.lease_ms = (uint32_t)arg_int(argc, argv, &i, 20, 600000);
        else if (strcmp(a, "--max-call-ms") == 0) cfg.max_call_ms = arg_int(argc, argv, &i, 1, 600000);
        else if (strcmp(a, "--kill-store") == 0) cfg.kill_store = true;
        else if (strcmp(a, "--kill-workers") == 0) cfg.kill_workers = true;
        else if (strcmp(a, "--self-check") == 0) cfg.self_check = true;
        else if (strcmp(a, "--long") == 0) continue;
        else if (strcmp(a, "--help") == 0) { usage(); exit(0); }
        else { usage(); exit(2); }
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    idem_test_server srv;
    if (idem_test_server_start(&srv, cfg.kind) != 0)
        die("cannot start a %s store", cfg.kind);
    if (cfg.kill_store && strcmp(cfg.kind, "sqlite") == 0)
        die("--kill-store needs a store with a server process (redis, memcached)");
    url = srv.url;
    snprintf(ledger_path, sizeof ledger_path, "%s/ledger", srv.dir);
    ledger_fd = open(ledger_path, O_WRONLY | O_CREAT | O_APPEND | O_TRUNC | O_CLOEXEC, 0644);
    if (ledger_fd < 0)
        die("cannot open the ledger: %s", strerror(errno));
    printf("stress: %s at %s: %d processes x %d threads, %d hot keys x %d layers, lease %u ms, "
           "%d s or %d requests per thread%s%s\n", cfg.kind, url, cfg.procs, cfg.threads, cfg.keys,
           NLAYERS, cfg.lease_ms, cfg.seconds, cfg.max_requests, cfg.kill_store ? ", store SIGKILLed" : "",
           cfg.kill_workers ? ", workers SIGKILLed" : "");
    fflush(stdout);

    uint64_t start = now_us();
    run_start_us = start;
    uint64_t deadline = start + (uint64_t)cfg.seconds * 1000000u;
    pid_t pids[MAX_PROCS];
    for (int i = 0; i < cfg.procs; i++)
        pids[i] = spawn_worker(deadline);

    uint64_t rng = seed();
    uint64_t next_store_kill = start + 1000000u + rnd(&rng, 1000000);
    uint64_t next_worker_kill = start + 500000u + rnd(&rng, 500000);
    int running = cfg.procs, failed_workers = 0, store_kills = 0, worker_kills = 0;
    while (running > 0) {
        int st;
        pid_t done = waitpid(-1, &st, WNOHANG);
        if (done > 0) {
            for (int i = 0; i < cfg.procs; i++) {
                if (pids[i] != done)
                    continue;
                pids[i] = 0;
                running--;
                if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
                    break; /* ours */
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                    fprintf(stderr, "stress: worker %ld failed (status %#x)\n", (long)done, st);
                    failed_workers++;
                }
            }
            continue;
        }
        uint64_t now = now_us();
        if (cfg.kill_store && now >= next_store_kill && now + 1500000u < deadline) {
            uint64_t killed_at = now_us();
            idem_test_server_kill(&srv, 0);
            uint64_t dead = now_us();
            sleep_us(200000 + rnd(&rng, 300000));
            uint64_t back = now_us();
            if (idem_test_server_restart(&srv, 0) != 0)
                die("cannot restart the %s server", cfg.kind);
            ledger("K %" PRIu64 " %" PRIu64 "\n", killed_at, back);
            (void)dead;
            store_kills++;
            next_store_kill = now_us() + 1000000u + rnd(&rng, 1500000);
        }
        if (cfg.kill_workers && now >= next_worker_kill && now + 1000000u < deadline) {
            int i = (int)rnd(&rng, (unsigned)cfg.procs);
            if (pids[i] > 0) {
                kill(pids[i], SIGKILL);
                waitpid(pids[i], NULL, 0);
                worker_kills++;
                pids[i] = spawn_worker(deadline);
            }
            next_worker_kill = now_us() + 300000u + rnd(&rng, 700000);
        }
        if (now > deadline + 60000000u) {
            fprintf(stderr, "stress: VIOLATION: workers still running 60 s after the deadline (a hang)\n");
            for (int i = 0; i < cfg.procs; i++)
                if (pids[i] > 0)
                    kill(pids[i], SIGKILL);
        }
        sleep_us(10000);
    }
    double secs = (double)(now_us() - start) / 1e6;

    ledger_data d = {0};
    read_ledger(&d);
    tally t = {0};
    int errors = check_ledger(&d, &t);
    errors += final_sweep(&d);
    if (errors == 0 && cfg.self_check)
        errors += self_check(&d);
    printf("stress: %.1f s, %zu handler runs (%zu committed, %zu lost, %zu failed, %zu aborted, "
           "%zu unsure after a store error, %zu cut short by SIGKILL), %zu replays checked; "
           "store killed %d times, workers killed %d times\n",
           secs, t.attempts, t.committed, t.lost, t.failed, t.aborted, t.unsure, t.died, t.replays,
           store_kills, worker_kills);
    for (size_t i = 0; i < d.natt; i++)
        free(d.att[i].body);
    for (size_t i = 0; i < d.nrep; i++)
        free(d.rep[i].body);
    free(d.att);
    free(d.rep);
    close(ledger_fd);
    idem_test_server_stop(&srv);
    if (failed_workers)
        fprintf(stderr, "stress: %d worker processes reported unexpected results\n", failed_workers);
    if (t.committed == 0 || t.replays == 0) {
        fprintf(stderr, "stress: the run proved nothing (no commit or no replay)\n");
        errors++;
    }
    if (errors || failed_workers) {
        fprintf(stderr, "stress: FAILED (%d violations)\n", errors);
        return 1;
    }
    printf("stress: OK\n");
    return 0;
}
