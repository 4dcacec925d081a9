/*
 * memcached driver: memcached://host:port[,host:port...][?timeout_ms=N]
 *
 * Keys are spread over the servers by consistent hashing (ketama), so adding
 * a server moves few keys. Servers are placed by their address, resolved
 * once at open, not by how the URL spells them: every client that lists the
 * same servers, in any order and spelling, sends a key to the same one. A server that is down is never replaced by
 * another for its keys: those keys fail with IDEM_EBACKEND until it is back,
 * because moving them would let a duplicate run on the other server.
 *
 * Each stored item is an 8-byte envelope, the lease or ttl deadline in
 * milliseconds since the Unix epoch (big-endian), followed by the record the
 * core wrote; the item flags mark our items. memcached expires items on a
 * one-second clock, so the item's own expiry is only garbage collection (it
 * is set a second or two late) and the envelope decides whether a record
 * still counts. The deadline is written by one client's wall clock and
 * judged by another's: hosts sharing the servers need synchronised clocks
 * (NTP), and a lease can be taken over early by as much as their skew.
 *
 * claim:   add; when the key is taken, gets it; a record past its deadline is
 *          taken over with cas.
 * commit, extend, release: gets, check the token, then cas, so nothing
 *          happens to a record another claim took over. memcached's text
 *          protocol has no delete-if-cas, so release is a cas that replaces
 *          the record by an empty item whose expiry is an absolute time in
 *          the past (1970): the server stores it as already expired, and it
 *          is gone for every later get and add.
 *
 * Connections: clones of one configured memcached_st in the shared pool
 * (idem_pool), one per thread in flight. A clone that saw a connection
 * error is thrown away with the idle ones, never pooled (libmemcached would
 * otherwise refuse the server for a while after a failure), and an
 * operation that failed on a pooled connection (a server that restarted
 * since) is tried once more on a fresh one; a timeout is not retried. Every
 * operation is safe to repeat: a repeated claim, commit or extend
 * recognises its own token in the store, and a repeated release that finds
 * the key gone knows its first try freed it.
 *
 * Time: one call is bounded by timeout_ms as a whole between its steps
 * (add, gets, cas, and the retry): each step may wait only for what is left.
 * libmemcached bounds each wait for the socket, not a whole reply, so a
 * reply that trickles in within one step can take longer: up to
 * timeout_ms per wait.
 */
#include <inttypes.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libmemcached/memcached.h>
#include <openssl/evp.h>

#include <idempotency/backend.h>

#define DEFAULT_PORT        11211
#define DEFAULT_TIMEOUT_MS  1000
#define MAX_TIMEOUT_MS      600000
#define MAX_KEY             250      /* memcached's key limit, in bytes */
#define HASHED_PREFIX       "%%sha256:"
#define ENVELOPE_LEN        8
#define ITEM_FLAGS          0x69646d31u  /* "idm1": an item this driver wrote */
/* What an item costs beside its value, measured on memcached 1.6 (64-bit):
 * 48 bytes of item header, 8 of CAS, 4 of flags, the key and its NUL, and
 * the value's CRLF; 313 bytes with a 250-byte key. Rounded up a little. */
#define ITEM_OVERHEAD       320
#define MAX_RELATIVE_EXPIRY 2592000  /* 30 days; larger expiries are absolute times */
#define EXPIRED_ABSOLUTE    2592001  /* an absolute time in 1970: "expired already" */
#define MAX_ROUNDS          16       /* gets/cas rounds before giving up under contention */

/* One server of the URL: the address it resolved to, which is what the
 * consistent hashing sees, and the host as the user wrote it, for messages. */
typedef struct mc_server {
    char        addr[NI_MAXHOST];
    uint16_t    port;
    const char *written;     /* points into the URL during open; NULL after */
    char       *label;       /* "localhost:11211 (127.0.0.1)" or "127.0.0.1:11211" */
} mc_server;

typedef struct store {
    memcached_st   *master;  /* configured, never used for requests */
    idem_pool      *pool;    /* of clones of master */
    uint32_t        timeout_ms;
    size_t          max_record;
    mc_server      *servers;
    size_t          nservers;
} store;

/* ---- keys ---- */

static bool plain_byte(uint8_t b)
{
    return b > 0x20 && b < 0x7f && b != '%';
}

/*
 * memcached keys are at most 250 bytes without spaces or control
 * characters. Printable ASCII passes through except '%', which, like every
 * other byte, becomes %XX. A key whose encoding would be longer than 250
 * bytes becomes "%%sha256:" and the hex SHA-256 of the raw key: "%%" never
 * occurs in a direct encoding (its '%' is always followed by a hex digit),
 * so the two forms cannot collide. out has room for MAX_KEY + 1 bytes.
 */
static int encode_key(const void *key, size_t len, char *out, size_t *out_len)
{
    static const char hex[] = "0123456789ABCDEF";
    const uint8_t *k = key;
    size_t n = 0;
    for (size_t i = 0; i < len && n <= MAX_KEY; i++) {
        if (plain_byte(k[i])) {
            if (n + 1 > MAX_KEY) {
                n = MAX_KEY + 1;
                break;
            }
            out[n++] = (char)k[i];
        } else {
            if (n + 3 > MAX_KEY) {
                n = MAX_KEY + 1;
                break;
            }
            out[n++] = '%';
            out[n++] = hex[k[i] >> 4];
            out[n++] = hex[k[i] & 15];
        }
    }
    if (n <= MAX_KEY) {
        out[n] = '\0';
        *out_len = n;
        return IDEM_OK;
    }
    uint8_t digest[32];
    unsigned int dlen = 0;
    if (!EVP_Digest(key, len, digest, &dlen, EVP_sha256(), NULL) || dlen != sizeof digest)
        return idem_error_set(IDEM_ENOMEM, "memcached: computing the SHA-256 of a long key failed in libcrypto");
    n = strlen(HASHED_PREFIX);
    memcpy(out, HASHED_PREFIX, n);
    for (size_t i = 0; i < sizeof digest; i++) {
        out[n++] = "0123456789abcdef"[digest[i] >> 4];
        out[n++] = "0123456789abcdef"[digest[i] & 15];
    }
    out[n] = '\0';
    *out_len = n;
    return IDEM_OK;
}

/* ---- items ---- */

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* An item read with gets. */
typedef struct item {
    bool     found;
    bool     ours;          /* written by this driver (flags and length) */
    uint64_t cas;
    uint64_t deadline_ms;   /* from the envelope */
    uint8_t *value;         /* malloc'd; the whole value */
    size_t   len;
} item;

static void item_clear(item *it)
{
    free(it->value);
    memset(it, 0, sizeof *it);
}

static const uint8_t *item_record(const item *it)
{
    return it->value + ENVELOPE_LEN;
}

static size_t item_record_len(const item *it)
{
    return it->len - ENVELOPE_LEN;
}

/* Does the item hold an unexpired record? Foreign values never expire. */
static bool item_live(const item *it, uint64_t now)
{
    return it->found && (!it->ours || it->deadline_ms > now);
}

/* Does the live item hold a record written under token? *state gets its state. */
static bool item_has_token(const item *it, const uint8_t *token, int *state)
{
    idem_record_info info;
    if (!it->ours || idem_record_peek(item_record(it), item_record_len(it), &info) != IDEM_OK)
        return false;
    *state = info.state;
    return memcmp(info.token, token, IDEM_TOKEN_LEN) == 0;
}

/* The expiry to send for an item that counts until deadline_ms: seconds
 * from now, rounded up, plus one for memcached's one-second clock; an
 * absolute Unix time beyond 30 days, as memcached requires; 0 (no expiry,
 * only eviction) beyond what memcached can represent (2038). */
static time_t server_expiry(uint64_t deadline_ms, uint64_t now)
{
    uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
    uint64_t secs = (left + 999) / 1000 + 1;
    if (secs <= MAX_RELATIVE_EXPIRY)
        return (time_t)secs;
    uint64_t abs_time = (uint64_t)(now / 1000) + secs;
    return abs_time > INT32_MAX ? 0 : (time_t)abs_time;
}

/* ---- errors ---- */

/* Did the answer come from the server, leaving the connection usable? */
static bool answered(memcached_return_t rc)
{
    switch (rc) {
    case MEMCACHED_SUCCESS:
    case MEMCACHED_STORED:
    case MEMCACHED_NOTSTORED:
    case MEMCACHED_NOTFOUND:
    case MEMCACHED_DATA_EXISTS:
    case MEMCACHED_END:
    case MEMCACHED_E2BIG:
    case MEMCACHED_SERVER_MEMORY_ALLOCATION_FAILURE:
        return true;
    default:
        return false;
    }
}

/* The server as the user named it: "localhost:11211 (127.0.0.1)" when the
 * URL spelled it otherwise than its address, else "127.0.0.1:11211". */
static const char *server_label(const store *s, const char *addr, unsigned port, char *buf, size_t len)
{
    for (size_t i = 0; i < s->nservers; i++)
        if (s->servers[i].port == port && strcmp(s->servers[i].addr, addr) == 0 && s->servers[i].label)
            return s->servers[i].label;
    snprintf(buf, len, "%s:%u", addr, port);
    return buf;
}

static int fail(const store *s, memcached_st *mc, const char *ekey, size_t eklen, memcached_return_t rc,
                const char *what, bool too_big_is_final)
{
    memcached_return_t lookup;
    const memcached_instance_st *srv = memcached_server_by_key(mc, ekey, eklen, &lookup);
    const char *host = srv ? memcached_server_name(srv) : "?";
    unsigned port = srv ? memcached_server_port(srv) : 0;
    char labelbuf[NI_MAXHOST + 16], where[NI_MAXHOST * 2 + 48];
    snprintf(where, sizeof where, "memcached %s", server_label(s, host, port, labelbuf, sizeof labelbuf));
    if (rc == MEMCACHED_FAILURE || rc == MEMCACHED_SOME_ERRORS) {
        memcached_return_t last = memcached_last_error(mc);
        if (memcached_failed(last))
            rc = last;
    }
    int err = memcached_last_error_errno(mc);
    const char *reason = memcached_strerror(mc, rc);
    const char *eo = err ? " (" : "", *es = err ? strerror(err) : "", *ec = err ? ")" : "";
    /* A commit that the server refuses for its size fails the same way
     * every time: IDEM_ETOOBIG, which the core does not retry. */
    if (too_big_is_final && rc == MEMCACHED_E2BIG)
        return idem_driver_error(IDEM_ETOOBIG, where, what, "the record is larger than the server's "
                                 "item_size_max; raise memcached's -I on every server, or lower "
                                 "max_response_len");
    if (too_big_is_final && rc == MEMCACHED_SERVER_MEMORY_ALLOCATION_FAILURE)
        return idem_driver_error(IDEM_ETOOBIG, where, what, "the server has no memory for an item this "
                                 "large (%s%s%s%s); give it more with -m, or lower max_response_len",
                                 reason, eo, es, ec);
    switch (rc) {
    case MEMCACHED_TIMEOUT:
        if (idem_call_deadline_ms() && idem_mono_ms() >= idem_call_deadline_ms())
            return idem_driver_error(IDEM_EBACKEND, where, what, "no answer within the time the "
                                     "library left this call (what remained of commit_timeout_ms or "
                                     "of the lease), before timeout_ms (%" PRIu32 " ms)", s->timeout_ms);
        return idem_driver_error(IDEM_EBACKEND, where, what, "no answer within %" PRIu32 " ms; is the "
                                 "server overloaded or unreachable? (the limit is ?timeout_ms= in the "
                                 "store URL)", s->timeout_ms);
    case MEMCACHED_E2BIG:
        return idem_driver_error(IDEM_EBACKEND, where, what, "the item is larger than the server's "
                                 "item_size_max; raise memcached's -I");
    case MEMCACHED_SERVER_MEMORY_ALLOCATION_FAILURE:
    case MEMCACHED_SERVER_ERROR:
        return idem_driver_error(IDEM_EBACKEND, where, what, "%s%s%s%s; the server may be out of memory: "
                                 "give it more with -m", reason, eo, es, ec);
    case MEMCACHED_MEMORY_ALLOCATION_FAILURE:
        return idem_driver_error(IDEM_ENOMEM, where, what, "out of memory");
    default:
        break;
    }
    if (answered(rc) || rc == MEMCACHED_CLIENT_ERROR || rc == MEMCACHED_PROTOCOL_ERROR ||
        rc == MEMCACHED_ERROR)
        return idem_driver_error(IDEM_EBACKEND, where, what, "%s%s%s%s; is this a memcached server?",
                                 reason, eo, es, ec);
    return idem_driver_error(IDEM_EBACKEND, where, what, "%s%s%s%s; is memcached running? start one "
                             "with: memcached -p %u -l %s -u nobody", reason, eo, es, ec, port, host);
}

/* ---- connections ---- */

static int configure(memcached_st *mc, uint32_t timeout_ms)
{
    static const struct {
        memcached_behavior_t what;
        uint64_t             value;
    } settings[] = {
        {MEMCACHED_BEHAVIOR_KETAMA, 1},                /* consistent hashing */
        {MEMCACHED_BEHAVIOR_REMOVE_FAILED_SERVERS, 0}, /* never remap a down server's keys */
        {MEMCACHED_BEHAVIOR_SUPPORT_CAS, 1},
        {MEMCACHED_BEHAVIOR_TCP_NODELAY, 1},
        {MEMCACHED_BEHAVIOR_VERIFY_KEY, 1},
        {MEMCACHED_BEHAVIOR_RETRY_TIMEOUT, 0},
    };
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        if (memcached_failed(memcached_behavior_set(mc, settings[i].what, settings[i].value)))
            return idem_error_set(IDEM_EBACKEND, "memcached: this libmemcached refuses a setting (%s)",
                                  memcached_last_error_message(mc));
    if (memcached_failed(memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, timeout_ms)) ||
        memcached_failed(memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, timeout_ms)))
        return idem_error_set(IDEM_EBACKEND, "memcached: this libmemcached refuses timeout_ms=%" PRIu32,
                              timeout_ms);
    return IDEM_OK;
}

static int pool_connect(void *ctx, void **conn)
{
    store *s = ctx;
    memcached_st *mc = memcached_clone(NULL, s->master);
    if (!mc)
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory making a connection");
    *conn = mc;
    return IDEM_OK;
}

static void pool_disconnect(void *ctx, void *conn)
{
    (void)ctx;
    memcached_free(conn);
}

/* gets: IDEM_OK with it->found false when there is no item. */
static memcached_return_t mc_gets(memcached_st *mc, const char *ekey, size_t eklen, item *it)
{
    memset(it, 0, sizeof *it);
    const char *keys[1] = {ekey};
    size_t lens[1] = {eklen};
    memcached_return_t rc = memcached_mget(mc, keys, lens, 1);
    if (memcached_failed(rc))
        return rc;
    memcached_result_st res;
    if (!memcached_result_create(mc, &res))
        return MEMCACHED_MEMORY_ALLOCATION_FAILURE;
    memcached_return_t ret = MEMCACHED_SUCCESS;
    while (memcached_fetch_result(mc, &res, &rc)) {
        if (it->found)
            continue; /* one key asked for: drain anything else */
        size_t len = memcached_result_length(&res);
        it->value = malloc(len ? len : 1);
        if (!it->value) {
            ret = MEMCACHED_MEMORY_ALLOCATION_FAILURE;
            continue;
        }
        if (len)
            memcpy(it->value, memcached_result_value(&res), len);
        it->len = len;
        it->found = true;
        it->cas = memcached_result_cas(&res);
        it->ours = memcached_result_flags(&res) == ITEM_FLAGS && len >= ENVELOPE_LEN;
        if (it->ours)
            it->deadline_ms = get_be64(it->value);
    }
    memcached_result_free(&res);
    if (rc != MEMCACHED_END && rc != MEMCACHED_NOTFOUND && rc != MEMCACHED_SUCCESS)
        ret = rc;
    if (ret != MEMCACHED_SUCCESS)
        item_clear(it);
    return ret;
}

/* ---- operations, each run by with_conn() ---- */

typedef struct op {
    const char    *what;         /* for messages: "claiming a key" */
    const char    *ekey;
    size_t         eklen;
    const uint8_t *token;        /* claim: the token of record */
    const void    *record;
    size_t         record_len;
    uint64_t       deadline_ms;  /* until when the new record counts */
    bool           maybe_applied;/* an earlier try's write may have reached the server */
    bool           too_big_is_final; /* commit: a record refused for its size is IDEM_ETOOBIG */
    uint64_t       until_mono;   /* the whole call ends by then (monotonic ms); set by with_conn() */
    /* claim's results */
    void          *existing;
    size_t         existing_len;
    uint32_t       remaining_ms;
} op;

/* The value to store: envelope + record. NULL when out of memory. */
static uint8_t *envelope(const op *o, size_t *len)
{
    uint8_t *v = malloc(ENVELOPE_LEN + o->record_len);
    if (!v)
        return NULL;
    put_be64(v, o->deadline_ms);
    memcpy(v + ENVELOPE_LEN, o->record, o->record_len);
    *len = ENVELOPE_LEN + o->record_len;
    return v;
}

/* Before each step of an op: let libmemcached wait only for what is left
 * of the call's timeout_ms (it reads the limit at every wait), or say the
 * time is up. */
static memcached_return_t step_budget(memcached_st *mc, const op *o)
{
    uint64_t now = idem_mono_ms();
    if (now >= o->until_mono)
        return MEMCACHED_TIMEOUT;
    if (memcached_failed(memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, o->until_mono - now)))
        return MEMCACHED_TIMEOUT;
    return MEMCACHED_SUCCESS;
}

/* An op, run by with_conn(): it returns an IDEM_* code and leaves in *mrc
 * memcached's last answer, from which with_conn() tells a dead connection
 * from a server's answer and words the message of an IDEM_EBACKEND. */
typedef int (*op_fn)(memcached_st *mc, op *o, memcached_return_t *mrc);

/* An op that ran out of gets/cas rounds while other clients kept changing
 * the key: say so. Any other failure is left for with_conn() to describe. */
static int rounds_exhausted(const op *o, memcached_return_t mrc, int ret)
{
    if (ret == IDEM_EBACKEND && answered(mrc) && mrc != MEMCACHED_E2BIG &&
        mrc != MEMCACHED_SERVER_MEMORY_ALLOCATION_FAILURE)
        ret = idem_error_set(IDEM_EBACKEND, "memcached: %s: the key changed %d times while we looked; "
                             "retry", o->what, MAX_ROUNDS);
    return ret;
}

static int do_claim(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    size_t vlen;
    uint8_t *v = envelope(o, &vlen);
    if (!v)
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory %s", o->what);
    int ret = IDEM_EBACKEND;
    item it = {0};
    for (int round = 0; round < MAX_ROUNDS; round++) {
        uint64_t now = idem_now_ms();
        time_t exp = server_expiry(o->deadline_ms, now);
        if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS)
            break;
        *mrc = memcached_add(mc, o->ekey, o->eklen, (const char *)v, vlen, exp, ITEM_FLAGS);
        if (*mrc == MEMCACHED_SUCCESS) {
            ret = IDEM_OK;
            break;
        }
        if (*mrc != MEMCACHED_NOTSTORED) /* the text protocol's add answers only this when taken */
            break;
        if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS ||
            (*mrc = mc_gets(mc, o->ekey, o->eklen, &it)) != MEMCACHED_SUCCESS)
            break;
        if (!it.found)
            continue; /* gone between add and gets: add again */
        now = idem_now_ms();
        int state = 0;
        if (o->token && item_live(&it, now) && item_has_token(&it, o->token, &state) &&
            state == IDEM_STATE_STARTED) {
            ret = IDEM_OK; /* our own claim, from a try whose answer was lost */
            break;
        }
        if (item_live(&it, now)) {
            uint64_t left = it.ours ? it.deadline_ms - now : UINT32_MAX;
            o->remaining_ms = left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left;
            ret = idem_record_dup("memcached", it.ours ? item_record(&it) : it.value,
                                  it.ours ? item_record_len(&it) : it.len, &o->existing, &o->existing_len);
            break;
        }
        /* Expired by its deadline but not yet by memcached's clock: take over. */
        if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS)
            break;
        *mrc = memcached_cas(mc, o->ekey, o->eklen, (const char *)v, vlen, server_expiry(o->deadline_ms, now),
                             ITEM_FLAGS, it.cas);
        if (*mrc == MEMCACHED_SUCCESS) {
            ret = IDEM_OK;
            break;
        }
        if (*mrc != MEMCACHED_DATA_EXISTS && *mrc != MEMCACHED_NOTFOUND)
            break;
        item_clear(&it); /* changed under us: look again */
    }
    ret = rounds_exhausted(o, *mrc, ret);
    item_clear(&it);
    free(v);
    return ret;
}

enum fenced_kind { F_COMMIT, F_EXTEND, F_RELEASE };

/* gets, check the token, cas: the shared body of commit, extend and release. */
static int do_fenced(memcached_st *mc, op *o, memcached_return_t *mrc, enum fenced_kind kind)
{
    size_t vlen = 0;
    uint8_t *v = NULL;
    if (kind != F_RELEASE && !(v = envelope(o, &vlen)))
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory %s", o->what);
    int ret = IDEM_EBACKEND;
    item it = {0};
    for (int round = 0; round < MAX_ROUNDS; round++) {
        if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS ||
            (*mrc = mc_gets(mc, o->ekey, o->eklen, &it)) != MEMCACHED_SUCCESS)
            break;
        uint64_t now = idem_now_ms();
        int state = 0;
        if (!it.found) {
            /* A release whose earlier try may have emptied the key did its job. */
            ret = kind == F_RELEASE && o->maybe_applied ? IDEM_OK : IDEM_ELOST;
            break;
        }
        if (!item_live(&it, now) || !item_has_token(&it, o->token, &state)) {
            ret = IDEM_ELOST;
            break;
        }
        if (state != IDEM_STATE_STARTED) {
            /* COMPLETED under our token: a commit already done whose answer was lost. */
            ret = kind == F_COMMIT ? IDEM_OK : IDEM_ELOST;
            break;
        }
        if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS)
            break;
        o->maybe_applied = true;
        if (kind == F_RELEASE)
            *mrc = memcached_cas(mc, o->ekey, o->eklen, "", 0, EXPIRED_ABSOLUTE, 0, it.cas);
        else
            *mrc = memcached_cas(mc, o->ekey, o->eklen, (const char *)v, vlen,
                                 server_expiry(o->deadline_ms, now), ITEM_FLAGS, it.cas);
        if (*mrc == MEMCACHED_SUCCESS) {
            ret = IDEM_OK;
            break;
        }
        if (*mrc != MEMCACHED_DATA_EXISTS && *mrc != MEMCACHED_NOTFOUND)
            break;
        item_clear(&it); /* changed under us: look again */
    }
    ret = rounds_exhausted(o, *mrc, ret);
    item_clear(&it);
    free(v);
    return ret;
}

static int do_commit(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    return do_fenced(mc, o, mrc, F_COMMIT);
}

static int do_extend(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    return do_fenced(mc, o, mrc, F_EXTEND);
}

static int do_release(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    return do_fenced(mc, o, mrc, F_RELEASE);
}

/* One use of a pooled connection: an op and what runs it. */
typedef struct call {
    store *s;
    op    *o;
    op_fn  fn;
} call;

/*
 * Run the op on a connection, for idem_pool_run(). When memcached failed
 * without answering, the connection is stale if it may be to a server that
 * restarted since it was pooled: idem_pool_run() then tries once more on a
 * new connection, not another pooled one. A timeout is broken, not stale,
 * and never retried, so a call never waits much longer than timeout_ms.
 */
static int run_call(void *conn, void *arg, idem_conn_state *state)
{
    call *k = arg;
    memcached_st *mc = conn;
    memcached_return_t mrc = MEMCACHED_SUCCESS;
    int rc = k->fn(mc, k->o, &mrc);
    bool healthy = answered(mrc);
    if (rc == IDEM_EBACKEND && !healthy) {
        *state = mrc == MEMCACHED_TIMEOUT ? IDEM_CONN_BROKEN : IDEM_CONN_STALE;
        return fail(k->s, mc, k->o->ekey, k->o->eklen, mrc, k->o->what, k->o->too_big_is_final);
    }
    if (rc == IDEM_EBACKEND && !memcached_success(mrc) && mrc != MEMCACHED_NOTSTORED &&
        mrc != MEMCACHED_DATA_EXISTS && mrc != MEMCACHED_NOTFOUND)
        rc = fail(k->s, mc, k->o->ekey, k->o->eklen, mrc, k->o->what, k->o->too_big_is_final);
    *state = healthy ? IDEM_CONN_OK : IDEM_CONN_BROKEN;
    return rc;
}

static int with_conn(store *s, op *o, op_fn fn)
{
    call k = {.s = s, .o = o, .fn = fn};
    /* the retry on a new connection shares it; the core's deadline, when sooner, bounds it */
    o->until_mono = idem_mono_ms() + idem_call_timeout_ms(s->timeout_ms);
    return idem_pool_run(s->pool, run_call, &k);
}

/* ---- driver functions ---- */

typedef struct probe {
    size_t item_size_max;
    bool   cas_disabled;     /* "cas_enabled no": started with -C */
} probe;

static bool stat_is(const char *key, size_t key_len, const char *name)
{
    return key_len == strlen(name) && memcmp(key, name, key_len) == 0;
}

static memcached_return_t stat_setting(const memcached_instance_st *server, const char *key,
                                       size_t key_len, const char *value, size_t value_len, void *ctx)
{
    (void)server;
    probe *p = ctx;
    char buf[32];
    size_t n = value_len < sizeof buf - 1 ? value_len : sizeof buf - 1;
    memcpy(buf, value, n);
    buf[n] = '\0';
    if (stat_is(key, key_len, "item_size_max"))
        p->item_size_max = strtoull(buf, NULL, 10);
    else if (stat_is(key, key_len, "cas_enabled"))
        p->cas_disabled = strcmp(buf, "no") == 0;
    return MEMCACHED_SUCCESS;
}

/* Ask one server for its item_size_max and whether it keeps CAS values
 * ("stats settings"): it must answer, and it must. */
static int probe_server(store *s, const mc_server *sv, size_t *item_size_max)
{
    memcached_st *mc = memcached_create(NULL);
    if (!mc)
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory");
    int rc = configure(mc, s->timeout_ms);
    if (rc == IDEM_OK && memcached_failed(memcached_server_add(mc, sv->addr, sv->port)))
        rc = idem_error_set(IDEM_EINVAL, "memcached %s: cannot use this server address (%s)", sv->label,
                            memcached_last_error_message(mc));
    probe p = {0};
    memcached_return_t mrc = MEMCACHED_SUCCESS;
    if (rc == IDEM_OK && memcached_failed(mrc = memcached_stat_execute(mc, "settings", stat_setting, &p)))
        rc = fail(s, mc, "x", 1, mrc, "connecting", false);
    if (rc == IDEM_OK && p.item_size_max == 0)
        rc = idem_error_set(IDEM_EBACKEND, "memcached %s: 'stats settings' names no item_size_max; "
                            "is this a memcached server (1.4 or later)?", sv->label);
    /* Without CAS every commit would fail until its lease ended, and the
     * key would then free itself: a handler that succeeded would run again. */
    if (rc == IDEM_OK && p.cas_disabled)
        rc = idem_error_set(IDEM_EBACKEND, "memcached %s: the server runs with CAS disabled (-C), and "
                            "this driver needs CAS to store a response only while the claim is its own; "
                            "restart memcached without -C", sv->label);
    memcached_free(mc);
    *item_size_max = p.item_size_max;
    return rc;
}

static void store_free(store *s)
{
    idem_pool_free(s->pool);
    memcached_free(s->master);
    for (size_t i = 0; i < s->nservers; i++)
        free(s->servers[i].label);
    free(s->servers);
    free(s);
}

/*
 * The address a server is known by: the host resolved once, here, to its
 * first IPv4 address (its first address when it has none), written as
 * digits. Consistent hashing places a server by this text, so every
 * spelling of one server (localhost, 127.0.0.1) must come out the same, or
 * two clients would send one key to two servers and both win its claim.
 */
static int resolve(mc_server *sv)
{
    char port_s[8];
    snprintf(port_s, sizeof port_s, "%u", sv->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(sv->written, port_s, &hints, &res);
    if (g != 0 || !res) {
        if (res)
            freeaddrinfo(res);
        return idem_error_set(g == EAI_MEMORY ? IDEM_ENOMEM : IDEM_EBACKEND,
                              "memcached %s:%u: cannot resolve the host name (%s); check it, or name "
                              "the server by its address", sv->written, sv->port,
                              g ? gai_strerror(g) : "no address");
    }
    const struct addrinfo *pick = res;
    for (const struct addrinfo *a = res; a; a = a->ai_next)
        if (a->ai_family == AF_INET) {
            pick = a;
            break;
        }
    g = getnameinfo(pick->ai_addr, pick->ai_addrlen, sv->addr, sizeof sv->addr, NULL, 0, NI_NUMERICHOST);
    freeaddrinfo(res);
    if (g != 0)
        return idem_error_set(IDEM_EBACKEND, "memcached %s:%u: cannot write its address as digits (%s)",
                              sv->written, sv->port, gai_strerror(g));
    int n = strcmp(sv->written, sv->addr) == 0
                ? asprintf(&sv->label, "%s:%u", sv->addr, sv->port)
                : asprintf(&sv->label, "%s:%u (%s)", sv->written, sv->port, sv->addr);
    if (n < 0) {
        sv->label = NULL;
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory");
    }
    return IDEM_OK;
}

/* Servers in one order, whatever the URL's: by address, then port. */
static int server_cmp(const void *a, const void *b)
{
    const mc_server *x = a, *y = b;
    int c = strcmp(x->addr, y->addr);
    return c ? c : (int)x->port - (int)y->port;
}

static int mc_open(void **state, const idem_url *url)
{
    if (strcmp(url->scheme, "memcached") != 0)
        return idem_error_set(IDEM_EINVAL, "memcached URLs start with memcached:// (not %s://)",
                              url->scheme);
    if (url->nhosts == 0)
        return idem_error_set(IDEM_EINVAL, "memcached URL names no server; use "
                              "memcached://127.0.0.1:11211[,host:port...]");
    if (url->user || url->password)
        return idem_error_set(IDEM_EINVAL, "memcached URL has a user or password, but this driver "
                              "speaks no SASL; remove them");
    if (url->path && strcmp(url->path, "/") != 0)
        return idem_error_set(IDEM_EINVAL, "memcached URL has a path (%s); memcached has no databases, "
                              "use memcached://host:port[,host:port...]", url->path);
    static const char *const known[] = {"timeout_ms", NULL};
    int rc = idem_url_check_params(url, "memcached", known);
    if (rc)
        return rc;
    uint64_t timeout = DEFAULT_TIMEOUT_MS;
    if ((rc = idem_url_param_uint(url, "timeout_ms", 1, MAX_TIMEOUT_MS, &timeout)))
        return rc;
    for (size_t i = 0; i < url->nhosts; i++)
        for (size_t j = 0; j < i; j++)
            if (strcmp(url->hosts[i].host, url->hosts[j].host) == 0 &&
                (url->hosts[i].port ? url->hosts[i].port : DEFAULT_PORT) ==
                    (url->hosts[j].port ? url->hosts[j].port : DEFAULT_PORT))
                return idem_error_set(IDEM_EINVAL, "memcached URL names server %s:%u twice",
                                      url->hosts[i].host,
                                      url->hosts[i].port ? url->hosts[i].port : DEFAULT_PORT);

    store *s = calloc(1, sizeof *s);
    if (!s)
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory");
    s->timeout_ms = (uint32_t)timeout;
    idem_pool_config pc = {.ctx = s, .connect = pool_connect, .disconnect = pool_disconnect};
    if ((rc = idem_pool_new(&s->pool, &pc))) {
        free(s);
        return rc;
    }
    if (!(s->servers = calloc(url->nhosts, sizeof *s->servers))) {
        store_free(s);
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory");
    }
    for (size_t i = 0; i < url->nhosts; i++, s->nservers++) {
        mc_server *sv = &s->servers[i];
        sv->written = url->hosts[i].host;
        sv->port = url->hosts[i].port ? url->hosts[i].port : DEFAULT_PORT;
        if ((rc = resolve(sv))) {
            s->nservers++;
            store_free(s);
            return rc;
        }
        for (size_t j = 0; j < i; j++)
            if (s->servers[j].port == sv->port && strcmp(s->servers[j].addr, sv->addr) == 0) {
                rc = idem_error_set(IDEM_EINVAL, "memcached URL names server %s:%u twice (as %s and %s)",
                                    sv->addr, sv->port, s->servers[j].written, sv->written);
                s->nservers++;
                store_free(s);
                return rc;
            }
    }
    qsort(s->servers, s->nservers, sizeof *s->servers, server_cmp);
    if (!(s->master = memcached_create(NULL))) {
        store_free(s);
        return idem_error_set(IDEM_ENOMEM, "memcached: out of memory");
    }
    if ((rc = configure(s->master, s->timeout_ms))) {
        store_free(s);
        return rc;
    }
    /* Contact every server now, so a wrong URL fails here and not at the
     * first request, and learn the largest item the smallest one holds. */
    size_t smallest = SIZE_MAX;
    for (size_t i = 0; i < s->nservers; i++) {
        const mc_server *sv = &s->servers[i];
        size_t item_max = 0;
        if ((rc = probe_server(s, sv, &item_max))) {
            store_free(s);
            return rc;
        }
        if (item_max < smallest)
            smallest = item_max;
        if (memcached_failed(memcached_server_add(s->master, sv->addr, sv->port))) {
            rc = idem_error_set(IDEM_EINVAL, "memcached %s: cannot use this server address (%s)", sv->label,
                                memcached_last_error_message(s->master));
            store_free(s);
            return rc;
        }
    }
    for (size_t i = 0; i < s->nservers; i++)
        s->servers[i].written = NULL; /* the URL is the caller's */
    s->max_record = smallest > ITEM_OVERHEAD + ENVELOPE_LEN ? smallest - ITEM_OVERHEAD - ENVELOPE_LEN : 0;
    *state = s;
    return IDEM_OK;
}

static void mc_close(void *state)
{
    store_free(state);
}

static size_t mc_max_record_len(void *state)
{
    return ((store *)state)->max_record;
}

static int mc_claim(void *state, const void *key, size_t key_len, const void *record, size_t record_len,
                    uint32_t lease_ms, void **existing, size_t *existing_len, uint32_t *remaining_ms)
{
    *existing = NULL;
    *existing_len = 0;
    char ekey[MAX_KEY + 1];
    op o = {.what = "claiming a key", .ekey = ekey, .record = record, .record_len = record_len,
            .remaining_ms = UINT32_MAX};
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    if (rc)
        return rc;
    /* The core's records count until the deadline inside them; anything
     * else (a caller planting bytes) for lease_ms. */
    idem_record_info info;
    o.deadline_ms = idem_now_ms() + lease_ms;
    if (idem_record_peek(record, record_len, &info) == IDEM_OK) {
        o.token = info.token;
        if (info.state == IDEM_STATE_STARTED && info.deadline_ms)
            o.deadline_ms = info.deadline_ms;
    }
    rc = with_conn(state, &o, do_claim);
    if (rc == IDEM_OK && o.existing) {
        *existing = o.existing;
        *existing_len = o.existing_len;
        *remaining_ms = o.remaining_ms;
    } else {
        free(o.existing);
    }
    return rc;
}

static int mc_commit(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint64_t ttl_ms)
{
    char ekey[MAX_KEY + 1];
    op o = {.what = "storing a response", .ekey = ekey, .token = token, .record = record,
            .record_len = record_len, .deadline_ms = idem_now_ms() + ttl_ms, .too_big_is_final = true};
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    return rc ? rc : with_conn(state, &o, do_commit);
}

static int mc_extend(void *state, const void *key, size_t key_len, const uint8_t *token,
                     const void *record, size_t record_len, uint32_t lease_ms)
{
    char ekey[MAX_KEY + 1];
    op o = {.what = "extending a lease", .ekey = ekey, .token = token, .record = record,
            .record_len = record_len};
    /* Until the lease's deadline, and no sooner than lease_ms from now:
     * a record with a checkpoint is kept past its lease (backend.h). */
    idem_record_info info;
    uint64_t until = idem_now_ms() + lease_ms;
    o.deadline_ms = idem_record_peek(record, record_len, &info) == IDEM_OK && info.deadline_ms > until
                        ? info.deadline_ms
                        : until;
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    return rc ? rc : with_conn(state, &o, do_extend);
}

static int mc_release(void *state, const void *key, size_t key_len, const uint8_t *token)
{
    char ekey[MAX_KEY + 1];
    op o = {.what = "freeing a key", .ekey = ekey, .token = token};
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    return rc ? rc : with_conn(state, &o, do_release);
}

static int do_read(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    item it = {0};
    if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS ||
        (*mrc = mc_gets(mc, o->ekey, o->eklen, &it)) != MEMCACHED_SUCCESS)
        return IDEM_EBACKEND;
    uint64_t now = idem_now_ms();
    int ret = IDEM_OK;
    if (item_live(&it, now)) {
        uint64_t left = it.ours ? it.deadline_ms - now : UINT32_MAX;
        o->remaining_ms = left >= UINT32_MAX ? UINT32_MAX - 1 : (uint32_t)left;
        ret = idem_record_dup("memcached", it.ours ? item_record(&it) : it.value,
                              it.ours ? item_record_len(&it) : it.len, &o->existing, &o->existing_len);
    }
    item_clear(&it);
    return ret;
}

/* Delete whatever is there; o->existing_len says whether it was live. */
static int do_remove(memcached_st *mc, op *o, memcached_return_t *mrc)
{
    item it = {0};
    if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS ||
        (*mrc = mc_gets(mc, o->ekey, o->eklen, &it)) != MEMCACHED_SUCCESS)
        return IDEM_EBACKEND;
    bool live = item_live(&it, idem_now_ms());
    bool found = it.found;
    item_clear(&it);
    if (!found)
        return IDEM_OK;
    if ((*mrc = step_budget(mc, o)) != MEMCACHED_SUCCESS)
        return IDEM_EBACKEND;
    *mrc = memcached_delete(mc, o->ekey, o->eklen, 0);
    if (*mrc != MEMCACHED_SUCCESS && *mrc != MEMCACHED_NOTFOUND)
        return IDEM_EBACKEND;
    o->existing_len = live && *mrc == MEMCACHED_SUCCESS;
    return IDEM_OK;
}

static int mc_read(void *state, const void *key, size_t key_len, void **record, size_t *record_len,
                   uint32_t *remaining_ms)
{
    *record = NULL;
    *record_len = 0;
    *remaining_ms = UINT32_MAX;
    char ekey[MAX_KEY + 1];
    op o = {.what = "reading a record", .ekey = ekey, .remaining_ms = UINT32_MAX};
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    if (rc == IDEM_OK)
        rc = with_conn(state, &o, do_read);
    if (rc == IDEM_OK && o.existing) {
        *record = o.existing;
        *record_len = o.existing_len;
        *remaining_ms = o.remaining_ms;
    } else {
        free(o.existing);
    }
    return rc;
}

static int mc_remove(void *state, const void *key, size_t key_len, bool *deleted)
{
    *deleted = false;
    char ekey[MAX_KEY + 1];
    op o = {.what = "deleting a key", .ekey = ekey};
    int rc = encode_key(key, key_len, ekey, &o.eklen);
    if (rc == IDEM_OK)
        rc = with_conn(state, &o, do_remove);
    *deleted = rc == IDEM_OK && o.existing_len;
    return rc;
}
static int mc_check(void *state, idem_findings *out); /* at the end of the file */

const idem_backend idem__memcached_backend = {
    .version = IDEM_BACKEND_VERSION,
    .name = "memcached",
    .open = mc_open,
    .close = mc_close,
    .claim = mc_claim,
    .commit = mc_commit,
    .release = mc_release,
    .extend = mc_extend,
    .max_record_len = mc_max_record_len,
    .read = mc_read,
    .remove = mc_remove,
    .check = mc_check,
};

/* ---- check (an operator's look at the servers' settings) ---- */

typedef struct mc_check_stats {
    char evictions_setting[32]; /* "on" or "off" (-M) */
    char cas_enabled[32];       /* "yes" or "no" (-C) */
    unsigned long long maxbytes, bytes, evicted;
} mc_check_stats;

static memcached_return_t mc_check_stat(const memcached_instance_st *server, const char *key,
                                        size_t key_len, const char *value, size_t value_len, void *ctx)
{
    (void)server;
    mc_check_stats *st = ctx;
    char buf[32];
    size_t n = value_len < sizeof buf - 1 ? value_len : sizeof buf - 1;
    memcpy(buf, value, n);
    buf[n] = '\0';
    if (stat_is(key, key_len, "evictions") && (strcmp(buf, "on") == 0 || strcmp(buf, "off") == 0))
        snprintf(st->evictions_setting, sizeof st->evictions_setting, "%s", buf);
    else if (stat_is(key, key_len, "evictions"))
        st->evicted = strtoull(buf, NULL, 10);
    else if (stat_is(key, key_len, "cas_enabled"))
        snprintf(st->cas_enabled, sizeof st->cas_enabled, "%s", buf);
    else if (stat_is(key, key_len, "maxbytes") || stat_is(key, key_len, "limit_maxbytes"))
        st->maxbytes = strtoull(buf, NULL, 10);
    else if (stat_is(key, key_len, "bytes"))
        st->bytes = strtoull(buf, NULL, 10);
    return MEMCACHED_SUCCESS;
}

/* "stats settings" and "stats" of one server; false when it does not answer. */
static bool mc_check_server(const store *s, const mc_server *sv, mc_check_stats *st, char *why, size_t len)
{
    memcached_st *mc = memcached_create(NULL);
    if (!mc) {
        snprintf(why, len, "out of memory");
        return false;
    }
    (void)memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_CONNECT_TIMEOUT, s->timeout_ms);
    (void)memcached_behavior_set(mc, MEMCACHED_BEHAVIOR_POLL_TIMEOUT, s->timeout_ms);
    memcached_return_t mrc = memcached_server_add(mc, sv->addr, sv->port);
    if (memcached_success(mrc))
        mrc = memcached_stat_execute(mc, "settings", mc_check_stat, st);
    if (memcached_success(mrc))
        mrc = memcached_stat_execute(mc, NULL, mc_check_stat, st);
    if (memcached_failed(mrc))
        snprintf(why, len, "%s", memcached_last_error_message(mc));
    memcached_free(mc);
    return memcached_success(mrc);
}

static int mc_check(void *state, idem_findings *out)
{
    store *s = state;
    size_t up = 0;
    int rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "memcached, %zu server%s: a claim is one add, "
                               "a commit, abort or extend a gets and a cas fenced by the claim's token; "
                               "each key lives on one server (consistent hashing) and never moves to "
                               "another while its server is down", s->nservers,
                               s->nservers == 1 ? "" : "s");
    for (size_t i = 0; rc == IDEM_OK && i < s->nservers; i++) {
        const mc_server *sv = &s->servers[i];
        mc_check_stats st = {{0}};
        char why[256];
        if (!mc_check_server(s, sv, &st, why, sizeof why)) {
            rc = idem_findings_add(out, IDEM_FINDING_WARNING, "server %s does not answer (%s): requests "
                                   "for its keys fail with IDEM_EBACKEND until it is back, and when it "
                                   "comes back it has forgotten them; start it again", sv->label, why);
            continue;
        }
        up++;
        if (strcmp(st.cas_enabled, "no") == 0)
            rc = idem_findings_add(out, IDEM_FINDING_WARNING, "server %s runs without CAS (-C): no commit "
                                   "can be fenced, so every commit fails and a handler that succeeded "
                                   "runs again once its lease ends; restart memcached without -C", sv->label);
        if (rc == IDEM_OK && strcmp(st.evictions_setting, "off") == 0)
            rc = idem_findings_add(out, IDEM_FINDING_PROMISE, "server %s never evicts (-M): a full server "
                                   "refuses new claims (IDEM_EBACKEND, nothing runs); %llu of %llu MiB used",
                                   sv->label, st.bytes >> 20, st.maxbytes >> 20);
        else if (rc == IDEM_OK)
            rc = idem_findings_add(out, IDEM_FINDING_WARNING, "server %s evicts items when its memory is "
                                   "full (%llu of %llu MiB used, %llu items evicted so far): an evicted "
                                   "claim or response lets a retry run its handler again; start memcached "
                                   "with -M (refuse instead of evicting) and enough -m, or use Redis with "
                                   "noeviction where a duplicate must never happen",
                                   sv->label, st.bytes >> 20, st.maxbytes >> 20, st.evicted);
    }
    if (rc == IDEM_OK && up == 0)
        return idem_error_set(IDEM_EBACKEND, "memcached: none of the %zu servers answers; is memcached "
                              "running?", s->nservers);
    if (rc == IDEM_OK)
        rc = idem_findings_add(out, IDEM_FINDING_NOTE, "memcached keeps nothing across a restart, and "
                               "leases are judged by each client's wall clock: keep the hosts on NTP");
    return rc;
}
