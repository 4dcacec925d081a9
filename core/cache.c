/*
 * A layer's local cache of COMPLETED records (idem_options.cache_bytes).
 *
 * A COMPLETED record never changes until it expires (docs: the contract),
 * so a copy may answer replays with no round trip, as long as it is dropped
 * no later than the store would drop the record. Only COMPLETED records
 * enter (the layer puts what it committed, or what a claim found
 * COMPLETED); the whole encoded record is kept, so a hit goes through the
 * same decoding and fingerprint comparison as a record from the store, and
 * a different fingerprint is still a mismatch.
 *
 * Entries are spread over shards by a hash of the store key; each shard has
 * its own mutex, hash table, least-recently-used list and share of the byte
 * budget, so threads replaying different keys rarely meet on a lock. A hit
 * takes a reference under the shard's lock and reads the record after
 * letting go of it; an entry evicted meanwhile is freed by its last reader.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_SHARDS      16
#define MIN_SHARD_BYTES (64u << 10)  /* fewer shards for small caches, so entries still fit */
#define FIRST_BUCKETS   64

struct idem_cache_entry {
    struct idem_cache_entry *chain;        /* next in the hash bucket */
    struct idem_cache_entry *newer, *older; /* the shard's LRU list */
    atomic_uint              refs;         /* the shard's (while linked) and each reader's */
    uint64_t                 hash;
    uint64_t                 expires_ms;   /* CLOCK_MONOTONIC */
    size_t                   cost;         /* bytes counted against the budget */
    size_t                   key_len, rec_len;
    uint8_t                  data[];       /* key, then record */
};

typedef struct shard {
    pthread_mutex_t    mu;
    idem_cache_entry **buckets;
    size_t             nbuckets, count;
    idem_cache_entry  *newest, *oldest;
    size_t             bytes, budget;
} shard;

struct idem_cache {
    unsigned nshards;   /* a power of two */
    shard    shards[];
};

/* FNV-1a, 64 bits: store keys are short and not chosen against us by a
 * party who sees the shard layout; a collision costs only a longer chain. */
static uint64_t hash_key(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

int idem__cache_new(idem_cache **out, size_t max_bytes)
{
    unsigned n = 1;
    while (n < MAX_SHARDS && max_bytes / (n * 2) >= MIN_SHARD_BYTES)
        n *= 2;
    idem_cache *c = calloc(1, sizeof *c + n * sizeof c->shards[0]);
    if (!c)
        return IDEM_ENOMEM;
    c->nshards = n;
    for (unsigned i = 0; i < n; i++) {
        shard *s = &c->shards[i];
        s->budget = max_bytes / n;
        s->nbuckets = FIRST_BUCKETS;
        if (!(s->buckets = calloc(s->nbuckets, sizeof *s->buckets))) {
            for (unsigned j = 0; j < i; j++)
                free(c->shards[j].buckets);
            free(c);
            return IDEM_ENOMEM;
        }
        pthread_mutex_init(&s->mu, NULL);
    }
    *out = c;
    return IDEM_OK;
}

static void entry_unref(idem_cache_entry *e)
{
    if (atomic_fetch_sub_explicit(&e->refs, 1, memory_order_acq_rel) == 1)
        free(e);
}

void idem__cache_free(idem_cache *c)
{
    if (!c)
        return;
    for (unsigned i = 0; i < c->nshards; i++) {
        shard *s = &c->shards[i];
        for (idem_cache_entry *e = s->newest, *next; e; e = next) {
            next = e->older;
            entry_unref(e);
        }
        free(s->buckets);
        pthread_mutex_destroy(&s->mu);
    }
    free(c);
}

static shard *shard_of(idem_cache *c, uint64_t h)
{
    return &c->shards[(h >> 56) & (c->nshards - 1)];
}

/* The bucket slot pointing at the entry for key, or at the chain's end. */
static idem_cache_entry **find(shard *s, uint64_t h, const uint8_t *key, size_t key_len)
{
    idem_cache_entry **pp = &s->buckets[h & (s->nbuckets - 1)];
    for (; *pp; pp = &(*pp)->chain)
        if ((*pp)->hash == h && (*pp)->key_len == key_len && memcmp((*pp)->data, key, key_len) == 0)
            break;
    return pp;
}

static void lru_unlink(shard *s, idem_cache_entry *e)
{
    if (e->newer)
        e->newer->older = e->older;
    else
        s->newest = e->older;
    if (e->older)
        e->older->newer = e->newer;
    else
        s->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void lru_push(shard *s, idem_cache_entry *e)
{
    e->newer = NULL;
    e->older = s->newest;
    if (s->newest)
        s->newest->newer = e;
    s->newest = e;
    if (!s->oldest)
        s->oldest = e;
}

/* Take e (found at *pp) out of the shard and drop the shard's reference. */
static void evict(shard *s, idem_cache_entry **pp)
{
    idem_cache_entry *e = *pp;
    *pp = e->chain;
    lru_unlink(s, e);
    s->bytes -= e->cost;
    s->count--;
    entry_unref(e);
}

static void grow(shard *s)
{
    size_t n = s->nbuckets * 2;
    idem_cache_entry **b = calloc(n, sizeof *b);
    if (!b)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < s->nbuckets; i++)
        for (idem_cache_entry *e = s->buckets[i], *next; e; e = next) {
            next = e->chain;
            e->chain = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
        }
    free(s->buckets);
    s->buckets = b;
    s->nbuckets = n;
}

const idem_cache_entry *idem__cache_get(idem_cache *c, const void *key, size_t key_len)
{
    if (!c)
        return NULL;
    uint64_t h = hash_key(key, key_len);
    shard *s = shard_of(c, h);
    uint64_t now = idem__mono_ms();
    pthread_mutex_lock(&s->mu);
    idem_cache_entry **pp = find(s, h, key, key_len), *e = *pp;
    if (e && e->expires_ms <= now) {
        evict(s, pp);
        e = NULL;
    } else if (e) {
        atomic_fetch_add_explicit(&e->refs, 1, memory_order_relaxed);
        if (s->newest != e) {
            lru_unlink(s, e);
            lru_push(s, e);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return e;
}

const uint8_t *idem__cache_entry_record(const idem_cache_entry *e, size_t *len)
{
    *len = e->rec_len;
    return e->data + e->key_len;
}

void idem__cache_release(const idem_cache_entry *e)
{
    if (e)
        entry_unref((idem_cache_entry *)e);
}

void idem__cache_put(idem_cache *c, const void *key, size_t key_len, const void *rec, size_t rec_len,
                     uint64_t expires_ms)
{
    if (!c || expires_ms <= idem__mono_ms())
        return;
    uint64_t h = hash_key(key, key_len);
    shard *s = shard_of(c, h);
    size_t cost = sizeof(idem_cache_entry) + key_len + rec_len + sizeof(void *); /* + its bucket slot */
    if (cost > s->budget)
        return;
    idem_cache_entry *e = malloc(sizeof *e + key_len + rec_len);
    if (!e)
        return; /* a cache may forget: the store still answers */
    *e = (idem_cache_entry){.hash = h, .expires_ms = expires_ms, .cost = cost, .key_len = key_len,
                            .rec_len = rec_len};
    atomic_init(&e->refs, 1);
    memcpy(e->data, key, key_len);
    memcpy(e->data + key_len, rec, rec_len);
    pthread_mutex_lock(&s->mu);
    idem_cache_entry **pp = find(s, h, key, key_len);
    if (*pp)
        evict(s, pp); /* the same record, or one committed after an expiry: the newer wins */
    while (s->oldest && s->bytes + cost > s->budget) {
        idem_cache_entry *old = s->oldest;
        evict(s, find(s, old->hash, old->data, old->key_len));
    }
    if (s->count >= s->nbuckets)
        grow(s);
    pp = &s->buckets[h & (s->nbuckets - 1)];
    e->chain = *pp;
    *pp = e;
    lru_push(s, e);
    s->bytes += cost;
    s->count++;
    pthread_mutex_unlock(&s->mu);
}

void idem__cache_drop(idem_cache *c, const void *key, size_t key_len)
{
    if (!c)
        return;
    uint64_t h = hash_key(key, key_len);
    shard *s = shard_of(c, h);
    pthread_mutex_lock(&s->mu);
    idem_cache_entry **pp = find(s, h, key, key_len);
    if (*pp)
        evict(s, pp);
    pthread_mutex_unlock(&s->mu);
}

size_t idem__cache_bytes(idem_cache *c, size_t *entries)
{
    size_t bytes = 0, n = 0;
    for (unsigned i = 0; c && i < c->nshards; i++) {
        shard *s = &c->shards[i];
        pthread_mutex_lock(&s->mu);
        bytes += s->bytes;
        n += s->count;
        pthread_mutex_unlock(&s->mu);
    }
    if (entries)
        *entries = n;
    return bytes;
}
