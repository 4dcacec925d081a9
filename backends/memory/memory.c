/*
 * In-process driver: memory://[name]
 *
 * The reference implementation of the driver contract in
 * <idempotency/backend.h>: every rule of the table, and nothing else, in a
 * file small enough to read in one sitting. It serves unit tests (no server
 * to start) and programs of one process.
 *
 * Records live in a hash table guarded by one mutex, so every operation is
 * atomic on its key against every other one. Leases and TTLs run on the
 * monotonic clock: a step of the wall clock neither ends a lease early nor
 * keeps one alive, and claim and read report the time left by that clock
 * (the core never needs the wall-clock deadline written in the record).
 *
 * memory://NAME: every open of the same name in one process shares one
 * table (a process-wide registry, counted by reference; the table is freed
 * with the last close). memory:// with no name: a table of this store
 * handle alone. Nothing is shared with another process, and everything is
 * lost when the process ends (a child after fork() opening the same name
 * gets a table of its own, empty).
 *
 * Expired records are treated as absent at once and freed lazily: the
 * operation that meets one frees it, and every operation also sweeps a
 * few buckets of the table, so the work per call stays bounded.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/backend.h>

#define FIRST_BUCKETS  64
#define SWEEP_BUCKETS  4     /* buckets looked at by the collector per call */
#define MAX_NAME_LEN   255

typedef struct entry {
    struct entry *next;      /* in its bucket */
    uint64_t      expires;   /* monotonic ms */
    uint8_t      *rec;
    size_t        rec_len;
    size_t        key_len;
    uint8_t       key[];
} entry;

/* The records of one name (or of one unnamed store). */
typedef struct table {
    pthread_mutex_t mu;
    entry         **buckets;
    size_t          nbuckets;   /* a power of two */
    size_t          count;
    size_t          sweep;      /* the next bucket the collector looks at */
    /* registry fields, under registry_mu */
    char           *name;       /* NULL: private to one store */
    pid_t           pid;        /* the process that made it */
    unsigned        refs;
    struct table   *next;
} table;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static table          *registry;   /* named tables of this process */
static pthread_once_t  atfork_once = PTHREAD_ONCE_INIT;

/* A child of fork() must find the registry unlocked, whatever the parent's
 * other threads were doing. */
static void registry_lock(void) { pthread_mutex_lock(&registry_mu); }
static void registry_unlock(void) { pthread_mutex_unlock(&registry_mu); }
static void registry_atfork(void) { (void)pthread_atfork(registry_lock, registry_unlock, registry_unlock); }

static uint64_t deadline(uint64_t now, uint64_t ms)
{
    return ms > UINT64_MAX - now ? UINT64_MAX : now + ms;
}

static uint32_t remaining(const entry *e, uint64_t now)
{
    uint64_t left = e->expires - now;
    return left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left;
}

/* FNV-1a */
static size_t hash(const void *key, size_t len)
{
    const uint8_t *p = key;
    uint64_t h = 14695981039346656037u;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211u;
    return (size_t)h;
}

static void entry_free(entry *e)
{
    free(e->rec);
    free(e);
}

/* ---- the table (callers hold t->mu) ---- */

static int table_init(table *t)
{
    t->buckets = calloc(FIRST_BUCKETS, sizeof *t->buckets);
    if (!t->buckets)
        return idem_error_set(IDEM_ENOMEM, "memory: out of memory making a store");
    t->nbuckets = FIRST_BUCKETS;
    pthread_mutex_init(&t->mu, NULL);
    return IDEM_OK;
}

static void table_free(table *t)
{
    for (size_t i = 0; i < t->nbuckets; i++)
        for (entry *e = t->buckets[i], *next; e; e = next) {
            next = e->next;
            entry_free(e);
        }
    free(t->buckets);
    pthread_mutex_destroy(&t->mu);
    free(t->name);
    free(t);
}

/* Free the expired entries of bucket b. */
static void sweep_bucket(table *t, size_t b, uint64_t now)
{
    for (entry **pp = &t->buckets[b]; *pp;) {
        entry *e = *pp;
        if (e->expires <= now) {
            *pp = e->next;
            entry_free(e);
            t->count--;
        } else {
            pp = &e->next;
        }
    }
}

/* The collector's share of one call. */
static void sweep(table *t, uint64_t now)
{
    for (int i = 0; i < SWEEP_BUCKETS; i++) {
        sweep_bucket(t, t->sweep, now);
        t->sweep = (t->sweep + 1) & (t->nbuckets - 1);
    }
}

/* The unexpired entry under key, or NULL (an expired one is freed). */
static entry *find(table *t, const void *key, size_t key_len, uint64_t now)
{
    sweep(t, now);
    size_t b = hash(key, key_len) & (t->nbuckets - 1);
    sweep_bucket(t, b, now);
    for (entry *e = t->buckets[b]; e; e = e->next)
        if (e->key_len == key_len && memcmp(e->key, key, key_len) == 0)
            return e;
    return NULL;
}

/* Double the buckets when the table holds more entries than buckets. An
 * allocation failure here only leaves the chains longer. */
static void grow(table *t)
{
    size_t n = t->nbuckets * 2;
    entry **nb = calloc(n, sizeof *nb);
    if (!nb)
        return;
    for (size_t i = 0; i < t->nbuckets; i++)
        for (entry *e = t->buckets[i], *next; e; e = next) {
            next = e->next;
            size_t b = hash(e->key, e->key_len) & (n - 1);
            e->next = nb[b];
            nb[b] = e;
        }
    free(t->buckets);
    t->buckets = nb;
    t->nbuckets = n;
    t->sweep = 0;
}

static int insert(table *t, const void *key, size_t key_len, const void *rec, size_t rec_len,
                  uint64_t expires)
{
    entry *e = malloc(sizeof *e + key_len);
    uint8_t *copy = malloc(rec_len ? rec_len : 1);
    if (!e || !copy) {
        free(e);
        free(copy);
        return idem_error_set(IDEM_ENOMEM, "memory: out of memory storing a %zu-byte record", rec_len);
    }
    memcpy(copy, rec, rec_len);
    *e = (entry){.expires = expires, .rec = copy, .rec_len = rec_len, .key_len = key_len};
    memcpy(e->key, key, key_len);
    if (t->count >= t->nbuckets)
        grow(t);
    size_t b = hash(key, key_len) & (t->nbuckets - 1);
    e->next = t->buckets[b];
    t->buckets[b] = e;
    t->count++;
    return IDEM_OK;
}

static int replace(entry *e, const void *rec, size_t rec_len, uint64_t expires)
{
    uint8_t *copy = malloc(rec_len ? rec_len : 1);
    if (!copy)
        return idem_error_set(IDEM_ENOMEM, "memory: out of memory storing a %zu-byte record", rec_len);
    memcpy(copy, rec, rec_len);
    free(e->rec);
    e->rec = copy;
    e->rec_len = rec_len;
    e->expires = expires;
    return IDEM_OK;
}

static void unlink_entry(table *t, entry *e)
{
    size_t b = hash(e->key, e->key_len) & (t->nbuckets - 1);
    for (entry **pp = &t->buckets[b]; *pp; pp = &(*pp)->next)
        if (*pp == e) {
            *pp = e->next;
            entry_free(e);
            t->count--;
            return;
        }
}

/* Does e hold a record of ours written under token, in state (0: any)? */
static bool fenced(const entry *e, const uint8_t *token, int state)
{
    idem_record_info info;
    return e && idem_record_peek(e->rec, e->rec_len, &info) == IDEM_OK &&
           memcmp(info.token, token, IDEM_TOKEN_LEN) == 0 && (!state || info.state == state);
}

/* ---- opening and closing ---- */

static int mem_open(void **state, const idem_url *url)
{
    static const char *const no_params[] = {NULL};
    if (url->user || url->password || url->path || url->nhosts > 1 ||
        (url->nhosts == 1 && url->hosts[0].port))
        return idem_error_set(IDEM_EINVAL, "memory URLs are memory:// (a store of its own) or "
                              "memory://NAME (shared by every open of NAME in this process; letters, "
                              "digits, '-', '_' and '.')");
    int rc = idem_url_check_params(url, "memory", no_params);
    if (rc)
        return rc;
    const char *name = url->nhosts ? url->hosts[0].host : NULL;
    if (name && strlen(name) > MAX_NAME_LEN)
        return idem_error_set(IDEM_EINVAL, "memory store name is %zu bytes; the limit is %d",
                              strlen(name), MAX_NAME_LEN);
    (void)pthread_once(&atfork_once, registry_atfork);
    pid_t pid = getpid();
    pthread_mutex_lock(&registry_mu);
    table *t = registry;
    while (name && t && !(t->pid == pid && strcmp(t->name, name) == 0))
        t = t->next;
    if (name && t) {
        t->refs++;
    } else if (!(t = calloc(1, sizeof *t)) || (name && !(t->name = strdup(name)))) {
        free(t);
        t = NULL;
        rc = idem_error_set(IDEM_ENOMEM, "memory: out of memory making a store");
    } else if ((rc = table_init(t)) != IDEM_OK) {
        free(t->name);
        free(t);
        t = NULL;
    } else {
        t->pid = pid;
        t->refs = 1;
        if (name) {
            t->next = registry;
            registry = t;
        }
    }
    pthread_mutex_unlock(&registry_mu);
    *state = t;
    return rc;
}

static void mem_close(void *state)
{
    table *t = state;
    pthread_mutex_lock(&registry_mu);
    bool last = --t->refs == 0;
    if (last && t->name)
        for (table **pp = &registry; *pp; pp = &(*pp)->next)
            if (*pp == t) {
                *pp = t->next;
                break;
            }
    pthread_mutex_unlock(&registry_mu);
    if (last)
        table_free(t);
}

/* ---- the operations, each under the table's mutex ---- */

static int mem_claim(void *state, const void *key, size_t key_len, const void *record,
                     size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                     uint32_t *remaining_ms)
{
    table *t = state;
    *existing = NULL;
    *existing_len = 0;
    pthread_mutex_lock(&t->mu);
    uint64_t now = idem_mono_ms();
    entry *e = find(t, key, key_len, now);
    idem_record_info mine;
    int rc;
    if (e && idem_record_peek(record, record_len, &mine) == IDEM_OK &&
        fenced(e, mine.token, IDEM_STATE_STARTED)) {
        rc = IDEM_OK; /* this very claim, sent again: it is the caller's */
    } else if (e) {
        rc = idem_record_dup("memory", e->rec, e->rec_len, existing, existing_len);
        *remaining_ms = remaining(e, now);
    } else {
        rc = insert(t, key, key_len, record, record_len, deadline(now, lease_ms));
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static int mem_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint64_t ttl_ms)
{
    table *t = state;
    pthread_mutex_lock(&t->mu);
    uint64_t now = idem_mono_ms();
    entry *e = find(t, key, key_len, now);
    int rc = IDEM_ELOST;
    if (fenced(e, token, IDEM_STATE_STARTED))
        rc = replace(e, record, record_len, deadline(now, ttl_ms));
    else if (fenced(e, token, IDEM_STATE_COMPLETED))
        rc = IDEM_OK; /* this commit happened already; its reply was lost */
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static int mem_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    table *t = state;
    pthread_mutex_lock(&t->mu);
    entry *e = find(t, key, key_len, idem_mono_ms());
    int rc = IDEM_ELOST;
    if (fenced(e, token, IDEM_STATE_STARTED)) {
        unlink_entry(t, e);
        rc = IDEM_OK;
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static int mem_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                      const void *record, size_t record_len, uint32_t lease_ms)
{
    table *t = state;
    pthread_mutex_lock(&t->mu);
    uint64_t now = idem_mono_ms();
    entry *e = find(t, key, key_len, now);
    int rc = IDEM_ELOST;
    if (fenced(e, token, IDEM_STATE_STARTED))
        rc = replace(e, record, record_len, deadline(now, lease_ms));
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static int mem_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                    uint32_t *remaining_ms)
{
    table *t = state;
    *record = NULL;
    *record_len = 0;
    pthread_mutex_lock(&t->mu);
    uint64_t now = idem_mono_ms();
    entry *e = find(t, key, key_len, now);
    int rc = IDEM_OK;
    if (e) {
        rc = idem_record_dup("memory", e->rec, e->rec_len, record, record_len);
        *remaining_ms = remaining(e, now);
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static int mem_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    table *t = state;
    pthread_mutex_lock(&t->mu);
    entry *e = find(t, key, key_len, idem_mono_ms());
    *deleted = e != NULL;
    if (e)
        unlink_entry(t, e);
    pthread_mutex_unlock(&t->mu);
    return IDEM_OK;
}

/* The core's fn never calls back into the driver: it runs under t->mu. */
static int mem_list(void *state, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg)
{
    table *t = state;
    pthread_mutex_lock(&t->mu);
    uint64_t now = idem_mono_ms();
    bool stop = false;
    for (size_t b = 0; b < t->nbuckets && !stop; b++)
        for (entry *e = t->buckets[b]; e && !stop; e = e->next)
            if (e->expires > now && e->key_len >= prefix_len && memcmp(e->key, prefix, prefix_len) == 0)
                stop = fn(arg, e->key, e->key_len, e->rec, e->rec_len, remaining(e, now)) != 0;
    pthread_mutex_unlock(&t->mu);
    return IDEM_OK;
}

const idem_backend idem__memory_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "memory",
    .open = mem_open,
    .close = mem_close,
    .claim = mem_claim,
    .commit = mem_commit,
    .release = mem_release,
    .extend = mem_extend,
    .read = mem_read,
    .remove = mem_remove,
    .list = mem_list,
};
