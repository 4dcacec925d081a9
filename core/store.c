/* Opening a store: pick the driver by URL scheme, check its table, connect. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#ifdef IDEM_HAVE_SQLITE
extern const idem_backend idem__sqlite_backend;
#endif
#ifdef IDEM_HAVE_REDIS
extern const idem_backend idem__redis_backend;
#endif
#ifdef IDEM_HAVE_MEMCACHED
extern const idem_backend idem__memcached_backend;
#endif
#ifdef IDEM_HAVE_MEMORY
extern const idem_backend idem__memory_backend;
#endif

const idem_backend *const idem__builtin_backends[] = {
#ifdef IDEM_HAVE_SQLITE
    &idem__sqlite_backend,
#endif
#ifdef IDEM_HAVE_REDIS
    &idem__redis_backend,
#endif
#ifdef IDEM_HAVE_MEMCACHED
    &idem__memcached_backend,
#endif
#ifdef IDEM_HAVE_MEMORY
    &idem__memory_backend,
#endif
    NULL,
};

/* The drivers this project ships, with the Debian package each needs. */
static const struct {
    const char *name, *package;
} known_backends[] = {
    {"sqlite", "libsqlite3-dev"},
    {"redis", "libhiredis-dev"},
    {"memcached", "libmemcached-dev"},
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

const char *idem__missing_backend_hint(const char *scheme)
{
    for (size_t i = 0; i < sizeof known_backends / sizeof known_backends[0]; i++)
        if (scheme_selects(scheme, known_backends[i].name))
            return known_backends[i].package;
    return NULL;
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
    const idem_backend *b = NULL;
    for (size_t i = 0; idem__builtin_backends[i]; i++)
        if (scheme_selects(u->scheme, idem__builtin_backends[i]->name))
            b = idem__builtin_backends[i];
    if (!b) {
        const char *pkg = idem__missing_backend_hint(u->scheme);
        if (pkg)
            rc = idem_error_set(IDEM_EUNSUPPORTED,
                                "the %s driver is not built into this libidempotency; install %s "
                                "and rebuild (meson setup --reconfigure build)",
                                u->scheme, pkg);
        else
            rc = idem_error_set(IDEM_EINVAL,
                                "unknown store URL scheme '%s'; use sqlite://, redis://, "
                                "redis+unix://, memcached:// or memory://",
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
