/* Opening a store: pick the driver by URL scheme, check its table, connect. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#include "idem_drivers.h"

/* A store is its driver's table and the driver's own state. Only this file
 * looks inside: the rest of the core goes through the wrappers at its end,
 * which check the table's version and member, answer for a member the
 * table lacks, and hold drivers to the return codes backend.h allows. */
struct idem_store {
    const idem_backend *ops;
    void               *state;
    size_t              max_record_len;  /* SIZE_MAX: no limit */
    unsigned            fork_generation; /* idem__fork_generation() at open */
};

#define IDEM_DECLARE_DRIVER(name) extern const idem_backend idem__##name##_backend;
IDEM_BUILTIN_DRIVERS(IDEM_DECLARE_DRIVER)

const idem_backend *const idem__builtin_backends[] = {
#define IDEM_DRIVER_ENTRY(name) &idem__##name##_backend,
    IDEM_BUILTIN_DRIVERS(IDEM_DRIVER_ENTRY)
    NULL,
};

/* Every scheme of every driver the project ships, built in or not. */
static const struct {
    const char *scheme, *driver, *package;
} known_schemes[] = {
#define IDEM_SCHEME_ENTRY(scheme, driver, package) {scheme, driver, package},
    IDEM_KNOWN_SCHEMES(IDEM_SCHEME_ENTRY)
};

/* Does the URL scheme select the driver called name? ("redis", "redis+unix") */
static bool scheme_selects(const char *scheme, const char *name)
{
    size_t n = strlen(name);
    return strncmp(scheme, name, n) == 0 && (scheme[n] == '\0' || scheme[n] == '+');
}

static int check_table(const idem_backend *b)
{
    if (!b)
        return idem_error_set(IDEM_EINVAL, "driver table is NULL");
    if (b->version < 1 || b->version > IDEM_BACKEND_VERSION)
        return idem_error_set(IDEM_EINVAL,
                              "driver table has version %u but this library speaks versions 1 to %u; "
                              "rebuild the driver against this <idempotency/backend.h>",
                              b->version, IDEM_BACKEND_VERSION);
    if (!b->name || !b->name[0])
        return idem_error_set(IDEM_EINVAL, "driver table has no name");
    const char *missing = !b->open && !IDEM_HAS(b, 2, open_ex) ? "open" : !b->close ? "close" : !b->claim ? "claim"
                        : !b->commit ? "commit" : !b->release ? "release" : !b->extend ? "extend"
                        : NULL;
    if (missing)
        return idem_error_set(IDEM_EINVAL, "driver %s lacks the mandatory function %s", b->name,
                              missing);
    int ntx = IDEM_HAS(b, 3, tx_begin) + IDEM_HAS(b, 3, tx_write) + IDEM_HAS(b, 3, tx_end);
    if (ntx != 0 && ntx != 3)
        return idem_error_set(IDEM_EINVAL, "driver %s sets some of tx_begin, tx_write and tx_end but not "
                              "all three", b->name);
    return IDEM_OK;
}

static int open_with(idem_store **out, const idem_backend *b, const idem_url *url)
{
    idem_store *s = calloc(1, sizeof *s);
    if (!s)
        return idem_error_set(IDEM_ENOMEM, "out of memory opening a %s store", b->name);
    s->ops = b;
    s->fork_generation = idem__fork_generation();
    int rc = IDEM_HAS(b, 2, open_ex) ? b->open_ex(&s->state, url, b) : b->open(&s->state, url);
    if (rc) {
        free(s);
        if (rc > 0 || idem_last_error()[0] == '\0')
            idem_error_set(rc > 0 ? IDEM_EBACKEND : rc, "%s driver failed to open the store", b->name);
        return rc > 0 ? IDEM_EBACKEND : rc;
    }
    s->max_record_len = b->max_record_len ? b->max_record_len(s->state) : SIZE_MAX;
    *out = s;
    return IDEM_OK;
}

int idem_store_open_backend(idem_store **out, const idem_backend *backend, const char *url)
{
    idem__error_clear();
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_store_open_backend: out is NULL");
    *out = NULL;
    int rc = check_table(backend);
    if (rc)
        return rc;
    idem_url *u;
    if ((rc = idem_url_parse(&u, url)))
        return rc;
    rc = open_with(out, backend, u);
    idem_url_free(u);
    return rc;
}

const idem_backend *idem_backend_find(const char *name)
{
    for (size_t i = 0; name && idem__builtin_backends[i]; i++)
        if (strcmp(idem__builtin_backends[i]->name, name) == 0)
            return idem__builtin_backends[i];
    return NULL;
}

/* The entry of known_schemes that scheme selects: its own name, or the
 * name of a driver followed by '+' ("redis+unix"); NULL for none. */
static int known_scheme(const char *scheme)
{
    size_t n = sizeof known_schemes / sizeof known_schemes[0];
    for (size_t i = 0; i < n; i++)
        if (strcmp(scheme, known_schemes[i].scheme) == 0)
            return (int)i;
    for (size_t i = 0; i < n; i++)
        if (scheme_selects(scheme, known_schemes[i].driver))
            return (int)i;
    return -1;
}

const char *idem__missing_backend_hint(const char *scheme)
{
    int k = known_scheme(scheme);
    return k >= 0 ? known_schemes[k].package : NULL;
}

int idem_store_open(idem_store **out, const char *url)
{
    idem__error_clear();
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_store_open: out is NULL");
    *out = NULL;
    idem_url *u;
    int rc = idem_url_parse(&u, url);
    if (rc)
        return rc;
    /* A scheme the list names picks its driver; another that starts with a
     * built-in driver's name and '+' picks that driver, which may refuse it. */
    int k = known_scheme(u->scheme);
    const idem_backend *b = k >= 0 ? idem_backend_find(known_schemes[k].driver) : NULL;
    for (size_t i = 0; !b && k < 0 && idem__builtin_backends[i]; i++)
        if (scheme_selects(u->scheme, idem__builtin_backends[i]->name))
            b = idem__builtin_backends[i];
    if (!b) {
        if (k >= 0)
            rc = idem_error_set(IDEM_EUNSUPPORTED,
                                "the %s driver is not built into this libidempotency; install %s "
                                "and rebuild (meson setup --reconfigure build)",
                                known_schemes[k].driver, known_schemes[k].package);
        else
            rc = idem_error_set(IDEM_EINVAL, "unknown store URL scheme '%s'; use " IDEM_SCHEME_LIST,
                                u->scheme);
    } else {
        rc = check_table(b);
        if (rc == IDEM_OK)
            rc = open_with(out, b, u);
    }
    idem_url_free(u);
    return rc;
}

void idem_store_close(idem_store *store)
{
    if (!store)
        return;
    /* In a child of the process that opened it, the connections are the
     * parent's: closing them here could harm the parent (SQLite would
     * delete a WAL file it still uses). Only our own memory is freed. */
    if (store->fork_generation == idem__fork_generation())
        store->ops->close(store->state);
    free(store);
}

const char *idem_store_backend(const idem_store *store)
{
    return store ? store->ops->name : NULL;
}

/* ---- the wrappers: every call from the core to a driver ---- */

const char *idem__store_name(const idem_store *s)
{
    return s->ops->name;
}

unsigned idem__store_version(const idem_store *s)
{
    return s->ops->version;
}

void *idem__store_state(const idem_store *s)
{
    return s->state;
}

size_t idem__store_max_record_len(const idem_store *s)
{
    return s->max_record_len;
}

int idem__store_check_process(const idem_store *s)
{
    if (s->fork_generation == idem__fork_generation())
        return IDEM_OK;
    return idem_error_set(IDEM_EINVAL, "this %s store was opened before fork(); its connections belong "
                          "to the parent: open a store in each process after forking", s->ops->name);
}

/* What a driver returned, held to backend.h: IDEM_OK, the codes the member
 * may return (allowed, a list ending in IDEM_OK), IDEM_EBACKEND and
 * IDEM_ENOMEM. Anything else is the driver's bug, answered as a store error
 * with a message that says so. */
static int driver_rc(const idem_store *s, const char *member, int rc, const int *allowed)
{
    if (rc == IDEM_OK)
        return IDEM_OK;
    if (rc == IDEM_EBACKEND || rc == IDEM_ENOMEM) {
        if (idem_last_error()[0] == '\0')
            idem_error_set(rc, "%s driver failed in %s and said nothing more", s->ops->name, member);
        return rc;
    }
    for (; allowed && *allowed != IDEM_OK; allowed++)
        if (rc == *allowed)
            return rc;
    return idem_error_set(IDEM_EBACKEND, "%s driver returned %d from %s, which backend.h does not allow "
                          "there; taken as a store error (%s)", s->ops->name, rc, member,
                          idem_last_error()[0] ? idem_last_error() : "no message");
}

static const int may_lose[] = {IDEM_ELOST, IDEM_OK};
static const int may_lose_or_refuse[] = {IDEM_ELOST, IDEM_ETOOBIG, IDEM_OK};
static const int may_refuse[] = {IDEM_EINVAL, IDEM_ECORRUPT, IDEM_OK};
static const int may_lose_or_be_misused[] = {IDEM_ELOST, IDEM_ETOOBIG, IDEM_EINVAL, IDEM_OK};

int idem__store_claim(idem_store *s, const void *key, size_t key_len, const void *record,
                      size_t record_len, uint32_t lease_ms, void **existing, size_t *existing_len,
                      uint32_t *remaining_ms)
{
    *existing = NULL;
    *existing_len = 0;
    *remaining_ms = UINT32_MAX;
    int rc = s->ops->claim(s->state, key, key_len, record, record_len, lease_ms, existing, existing_len,
                           remaining_ms);
    if (rc != IDEM_OK) {
        free(*existing);
        *existing = NULL;
    }
    return driver_rc(s, "claim", rc, may_refuse);
}

int idem__store_commit(idem_store *s, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint64_t ttl_ms)
{
    return driver_rc(s, "commit", s->ops->commit(s->state, key, key_len, token, record, record_len, ttl_ms),
                     may_lose_or_refuse);
}

int idem__store_release(idem_store *s, const void *key, size_t key_len, const uint8_t *token)
{
    return driver_rc(s, "release", s->ops->release(s->state, key, key_len, token), may_lose);
}

int idem__store_extend(idem_store *s, const void *key, size_t key_len, const uint8_t *token,
                       const void *record, size_t record_len, uint32_t lease_ms)
{
    return driver_rc(s, "extend", s->ops->extend(s->state, key, key_len, token, record, record_len, lease_ms),
                     may_lose_or_refuse);
}

int idem__store_read(idem_store *s, const void *key, size_t key_len, void **record, size_t *record_len,
                     uint32_t *remaining_ms)
{
    *record = NULL;
    *record_len = 0;
    *remaining_ms = UINT32_MAX;
    if (!IDEM_HAS(s->ops, 2, read))
        return idem_error_set(IDEM_EUNSUPPORTED, "the %s driver cannot read a record without "
                              "claiming it (its table, version %u, has no read function); use the "
                              "store's own tools", s->ops->name, s->ops->version);
    int rc = s->ops->read(s->state, key, key_len, record, record_len, remaining_ms);
    if (rc != IDEM_OK) {
        free(*record);
        *record = NULL;
    }
    return driver_rc(s, "read", rc, may_refuse);
}

int idem__store_remove(idem_store *s, const void *key, size_t key_len, bool *deleted)
{
    *deleted = false;
    if (!IDEM_HAS(s->ops, 2, remove))
        return idem_error_set(IDEM_EUNSUPPORTED, "the %s driver cannot delete a key whoever wrote it "
                              "(its table, version %u, has no remove function); use the store's own "
                              "tools", s->ops->name, s->ops->version);
    return driver_rc(s, "remove", s->ops->remove(s->state, key, key_len, deleted), NULL);
}

int idem__store_check(idem_store *s, idem_findings *list)
{
    if (!IDEM_HAS(s->ops, 2, check))
        return idem_error_set(IDEM_EUNSUPPORTED, "the %s driver offers no check of its store's settings "
                              "(its table, version %u, has no check member)", s->ops->name,
                              s->ops->version);
    return driver_rc(s, "check", s->ops->check(s->state, list), NULL);
}

int idem__store_tx_supported(const idem_store *s)
{
    if (IDEM_HAS(s->ops, 3, tx_begin))
        return IDEM_OK;
    return idem_error_set(IDEM_EUNSUPPORTED, "the %s store is not a database a handler can work in: "
                          "idem_run_tx() and idem_commit_tx() need PostgreSQL or SQLite (postgresql://, "
                          "sqlite://); nothing ran. For work elsewhere use idem_run() with checkpoints "
                          "and subkeys", s->ops->name);
}

int idem__store_tx_begin(idem_store *s, void **tx, void **conn)
{
    *tx = NULL;
    *conn = NULL;
    return driver_rc(s, "tx_begin", s->ops->tx_begin(s->state, tx, conn), NULL);
}

int idem__store_tx_write(idem_store *s, void *conn, const void *key, size_t key_len, const uint8_t *token,
                         const void *record, size_t record_len, uint64_t expiry_ms, int *outcome)
{
    *outcome = IDEM_TX_ROLLED_BACK;
    int rc = s->ops->tx_write(s->state, conn, key, key_len, token, record, record_len, expiry_ms, outcome);
    if (*outcome != IDEM_TX_RETRY && *outcome != IDEM_TX_UNKNOWN)
        *outcome = IDEM_TX_ROLLED_BACK;
    return driver_rc(s, "tx_write", rc, may_lose_or_be_misused);
}

void idem__store_tx_end(idem_store *s, void *tx)
{
    s->ops->tx_end(s->state, tx);
}

int idem__store_list(idem_store *s, const void *prefix, size_t prefix_len, idem_list_fn fn, void *arg)
{
    if (!IDEM_HAS(s->ops, 3, list))
        return idem_error_set(IDEM_EUNSUPPORTED, "the %s store cannot enumerate its keys (its driver's "
                              "table, version %u, has no list member); look at one key with idem show",
                              s->ops->name, s->ops->version);
    return driver_rc(s, "list", s->ops->list(s->state, prefix, prefix_len, fn, arg), NULL);
}
