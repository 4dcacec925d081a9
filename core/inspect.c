/* Operators: describe and free one key, list keys, and check a store's
 * settings, on top of the driver table's read, remove, list and check
 * members. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* The largest key an operator may name: the largest max_key_len a layer
 * accepts, so every key of every layer can be looked at. */
#define MAX_OPERATOR_KEY_LEN 1024

void idem_key_info_clear(idem_key_info *info)
{
    if (!info)
        return;
    free(info->value);
    free(info->headers);
    free(info->checkpoint_name);
    memset(info, 0, sizeof *info);
}

static int check_args(idem_layer *l, const void *scope, size_t scope_len, const void *key,
                      size_t key_len, const char *fn)
{
    if (!l)
        return idem_error_set(IDEM_EINVAL, "%s: layer is NULL", fn);
    if (!key && key_len)
        return idem_error_set(IDEM_EINVAL, "%s: key is NULL but its length is %zu", fn, key_len);
    if (key_len == 0)
        return idem_error_set(IDEM_EINVAL, "%s: key is empty; give 1 to %d bytes", fn,
                              MAX_OPERATOR_KEY_LEN);
    if (key_len > MAX_OPERATOR_KEY_LEN)
        return idem_error_set(IDEM_EINVAL, "%s: key is %zu bytes; no layer accepts keys over %d", fn,
                              key_len, MAX_OPERATOR_KEY_LEN);
    if (!scope && scope_len)
        return idem_error_set(IDEM_EINVAL, "%s: scope is NULL but its length is %zu", fn, scope_len);
    if (scope && (scope_len == 0 || scope_len > IDEM_MAX_SCOPE_LEN))
        return idem_error_set(IDEM_EINVAL, "%s: scope is %zu bytes; give 1 to %d, or NULL for none", fn,
                              scope_len, IDEM_MAX_SCOPE_LEN);
    return idem__store_check_process(idem__layer_store(l));
}

_Static_assert(sizeof ((idem_key_info *)0)->store_key >= IDEM_MAX_STORE_KEY_LEN,
               "idem_key_info.store_key holds every store key");

/* The key turned out absent: keep only its store key. */
static void forget_value(idem_key_info *info)
{
    uint8_t key[IDEM_MAX_STORE_KEY_LEN];
    size_t len = info->store_key_len;
    memcpy(key, info->store_key, len);
    idem_key_info_clear(info);
    memcpy(info->store_key, key, len);
    info->store_key_len = len;
}

/* Fill info from the bytes under the key; takes value (malloc'd). */
static void describe(idem_key_info *info, void *value, size_t len, uint32_t remaining_ms)
{
    info->value = value;
    info->value_len = len;
    info->remaining_ms = remaining_ms;
    idem_record rec;
    if (idem__record_decode(value, len, &rec) != IDEM_OK) {
        info->state = IDEM_KEY_FOREIGN;
        return;
    }
    memcpy(info->token, rec.token, IDEM_TOKEN_LEN);
    info->has_fingerprint = rec.has_fingerprint;
    if (rec.has_fingerprint)
        memcpy(info->fingerprint_digest, rec.digest, IDEM_DIGEST_LEN);
    if (rec.state == IDEM_STATE_STARTED) {
        info->state = IDEM_KEY_STARTED;
        info->deadline_ms = rec.deadline_ms;
        if (remaining_ms == UINT32_MAX) {
            uint64_t now = idem_now_ms();
            uint64_t left = rec.deadline_ms > now ? rec.deadline_ms - now : 0;
            info->remaining_ms = left > UINT32_MAX - 1 ? UINT32_MAX - 1 : (uint32_t)left;
        } else {
            /* the store keeps a record with a checkpoint past its lease */
            info->remaining_ms = remaining_ms > rec.kept_ms ? remaining_ms - rec.kept_ms : 0;
        }
        if (rec.cp_name_len && (info->checkpoint_name = strndup(rec.cp_name, rec.cp_name_len))) {
            info->checkpoint = rec.cp_data;
            info->checkpoint_len = rec.cp_len;
        }
        return;
    }
    info->state = IDEM_KEY_COMPLETED;
    info->status = rec.status;
    info->body = rec.body;
    info->body_len = rec.body_len;
    if (rec.nheaders && idem__headers_from_record(&rec, &info->headers) == IDEM_OK)
        info->nheaders = rec.nheaders;
    else
        info->headers = NULL;
}

/* Read the key of (scope, key) into info, which the caller zeroed. */
static int read_key(idem_layer *l, const void *scope, size_t scope_len, const void *key,
                    size_t key_len, idem_key_info *info, const char *fn)
{
    int rc = check_args(l, scope, scope_len, key, key_len, fn);
    if (rc)
        return rc;
    idem_store *s = idem__layer_store(l);
    if ((rc = idem__store_key(l, scope, scope_len, key, key_len, info->store_key, &info->store_key_len)))
        return rc;
    void *value = NULL;
    size_t len = 0;
    uint32_t remaining = UINT32_MAX;
    if ((rc = idem__store_read(s, info->store_key, info->store_key_len, &value, &len, &remaining)))
        return rc;
    if (value)
        describe(info, value, len, remaining);
    return IDEM_OK;
}

int idem_layer_show(idem_layer *l, const void *scope, size_t scope_len, const void *key, size_t key_len,
                    idem_key_info *out)
{
    idem__error_clear();
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_layer_show: out is NULL");
    idem_key_info_clear(out);
    return read_key(l, scope, scope_len, key, key_len, out, "idem_layer_show");
}

int idem_layer_delete(idem_layer *l, const void *scope, size_t scope_len, const void *key,
                      size_t key_len, bool force, idem_key_info *deleted)
{
    idem__error_clear();
    idem_key_info mine;
    idem_key_info *info = deleted ? deleted : &mine;
    if (deleted)
        idem_key_info_clear(deleted);
    memset(&mine, 0, sizeof mine);
    int rc = read_key(l, scope, scope_len, key, key_len, info, "idem_layer_delete");
    if (rc || info->state == IDEM_KEY_ABSENT)
        goto out;
    idem_store *s = idem__layer_store(l);
    if (force) {
        bool gone = false;
        if ((rc = idem__store_remove(s, info->store_key, info->store_key_len, &gone)) == IDEM_OK && !gone)
            forget_value(info); /* it expired between the read and the delete */
    } else if (info->state == IDEM_KEY_STARTED) {
        /* Fenced by the token just read: a handler that commits meanwhile
         * keeps its response. */
        rc = idem__store_release(s, info->store_key, info->store_key_len, info->token);
        if (rc == IDEM_ELOST)
            idem_error_set(rc, "the claim changed while it was being deleted (its handler committed or "
                           "gave it up, or its lease ended and another request took the key); nothing "
                           "was deleted: look at the key again");
    } else {
        rc = idem_error_set(IDEM_EINVAL, "%s", info->state == IDEM_KEY_COMPLETED
                                ? "the key holds a COMPLETED response: deleting it makes the next retry "
                                  "run the handler again; nothing was deleted (force to delete it anyway)"
                                : "the key holds a value libidempotency did not write (another program's, "
                                  "or a damaged record); nothing was deleted (force to delete it anyway)");
    }
out:
    if (rc == IDEM_OK && info->store_key_len) /* this layer's own copy goes too */
        idem__cache_drop(idem__layer_cache(l), info->store_key, info->store_key_len);
    if (!deleted)
        idem_key_info_clear(&mine);
    return rc;
}

/* ---- lists ---- */

typedef struct list_walk {
    idem_key_state   state;   /* IDEM_KEY_ABSENT: every state */
    size_t           limit;   /* 0: none */
    size_t           given;
    idem_key_visitor fn;
    void            *arg;
    bool             stopped; /* by fn, the limit, or a failure */
    int              rc;
} list_walk;

static int list_one(void *arg, const void *key, size_t key_len, const void *record, size_t record_len,
                    uint32_t remaining_ms)
{
    list_walk *w = arg;
    idem_key_info info = {0};
    if (key_len > sizeof info.store_key)
        return 0; /* no key of a layer is this long: not ours */
    void *value;
    size_t len;
    if ((w->rc = idem_record_dup("list", record, record_len, &value, &len))) {
        w->stopped = true;
        return 1;
    }
    memcpy(info.store_key, key, key_len);
    info.store_key_len = key_len;
    describe(&info, value, len, remaining_ms);
    if (w->state == IDEM_KEY_ABSENT || info.state == w->state) {
        w->given++;
        if (w->fn(w->arg, &info) != 0 || (w->limit && w->given >= w->limit))
            w->stopped = true;
    }
    idem_key_info_clear(&info);
    return w->stopped;
}

int idem_layer_list(idem_layer *l, idem_key_state state, size_t limit, idem_key_visitor fn, void *arg)
{
    idem__error_clear();
    if (!l || !fn)
        return idem_error_set(IDEM_EINVAL, "idem_layer_list: layer and fn must not be NULL");
    if (state < IDEM_KEY_ABSENT || state > IDEM_KEY_FOREIGN)
        return idem_error_set(IDEM_EINVAL, "idem_layer_list: state %d is not an idem_key_state",
                              (int)state);
    idem_store *s = idem__layer_store(l);
    int rc = idem__store_check_process(s);
    if (rc)
        return rc;
    size_t plen;
    const char *prefix = idem__layer_prefix(l, &plen);
    /* Unscoped keys start with the prefix ("idem:"), scoped ones with the
     * prefix's name and the scope tag's '#' ("idem#"): two walks. */
    char scoped[IDEM_MAX_PREFIX_LEN];
    memcpy(scoped, prefix, plen - 1);
    scoped[plen - 1] = '#';
    list_walk w = {.state = state, .limit = limit, .fn = fn, .arg = arg};
    rc = idem__store_list(s, prefix, plen, list_one, &w);
    if (rc == IDEM_OK && !w.stopped)
        rc = idem__store_list(s, scoped, plen, list_one, &w);
    return rc ? rc : w.rc;
}

/* ---- checks ---- */

typedef struct finding {
    idem_finding_level level;
    char              *text;
} finding;

struct idem_findings {
    finding *items;
    size_t   count, cap;
};

int idem_findings_add(idem_findings *list, idem_finding_level level, const char *fmt, ...)
{
    if (!list || !fmt)
        return idem_error_set(IDEM_EINVAL, "idem_findings_add: list or fmt is NULL");
    if (level < IDEM_FINDING_PROMISE || level > IDEM_FINDING_WARNING)
        return idem_error_set(IDEM_EINVAL, "idem_findings_add: level %d is not an idem_finding_level",
                              (int)level);
    if (list->count == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 8;
        finding *items = realloc(list->items, cap * sizeof *items);
        if (!items)
            return idem_error_set(IDEM_ENOMEM, "out of memory adding a finding");
        list->items = items;
        list->cap = cap;
    }
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    if (n < 0)
        return idem_error_set(IDEM_ENOMEM, "out of memory adding a finding");
    list->items[list->count++] = (finding){.level = level, .text = text};
    return IDEM_OK;
}

void idem_findings_free(idem_findings *list)
{
    if (!list)
        return;
    for (size_t i = 0; i < list->count; i++)
        free(list->items[i].text);
    free(list->items);
    free(list);
}

size_t idem_findings_count(const idem_findings *list)
{
    return list ? list->count : 0;
}

const char *idem_findings_get(const idem_findings *list, size_t i, idem_finding_level *level)
{
    if (!list || i >= list->count)
        return NULL;
    if (level)
        *level = list->items[i].level;
    return list->items[i].text;
}

int idem_store_check(idem_store *s, idem_findings **out)
{
    idem__error_clear();
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_store_check: out is NULL");
    *out = NULL;
    if (!s)
        return idem_error_set(IDEM_EINVAL, "idem_store_check: store is NULL");
    int rc = idem__store_check_process(s);
    if (rc)
        return rc;
    idem_findings *list = calloc(1, sizeof *list);
    if (!list)
        return idem_error_set(IDEM_ENOMEM, "out of memory checking a store");
    if ((rc = idem__store_check(s, list))) {
        idem_findings_free(list);
        return rc;
    }
    *out = list;
    return IDEM_OK;
}
