/* Small pieces every driver shares, declared in <idempotency/backend.h>. */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int idem_driver_error(int err, const char *where, const char *what, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    char *detail = n < 0 ? NULL : malloc((size_t)n + 1);
    if (!detail)
        return idem_error_set(err, "%s: %s: %s", where, what, idem_strerror(err));
    va_start(ap, fmt);
    vsnprintf(detail, (size_t)n + 1, fmt, ap);
    va_end(ap);
    idem_error_set(err, "%s: %s: %s", where, what, detail);
    free(detail);
    return err;
}

/* A parameter that carries a secret: its name ends in "password"
 * (redis+unix's password, redis+sentinel's sentinel_password, libpq's
 * sslpassword). */
static bool secret_param(const char *name)
{
    static const char tail[] = "password";
    size_t n = strlen(name), t = sizeof tail - 1;
    return n >= t && strcmp(name + n - t, tail) == 0;
}

int idem_url_check_params(const idem_url *url, const char *driver, const char *const *known)
{
    const char *secret = NULL; /* the first known secret parameter seen */
    for (size_t i = 0; i < url->nparams; i++) {
        size_t k = 0;
        while (known[k] && strcmp(known[k], url->params[i].name) != 0)
            k++;
        if (known[k]) {
            if (!secret && secret_param(known[k]))
                secret = known[k];
            continue;
        }
        /* The query is split at every '&', so a password holding an
         * unescaped '&' ends there and its rest reads as parameters: any
         * unknown one after a secret may be part of it. Say so without
         * repeating it. */
        if (secret)
            return idem_error_set(IDEM_EINVAL, "malformed %s URL: a parameter after %s is not one "
                                  "this driver knows, and is not repeated here because it may be part "
                                  "of the password; write an '&' in a password as %%26 (and '%%' as "
                                  "%%25, '#' as %%23)", driver, secret);
        /* "a, b and c" */
        size_t len = 1, nknown = 0;
        for (; known[nknown]; nknown++)
            len += strlen(known[nknown]) + 5;
        char *list = malloc(len);
        if (!list)
            return idem_error_set(IDEM_EINVAL, "%s URL parameter '%s' is unknown", driver,
                                  url->params[i].name);
        list[0] = '\0';
        for (size_t j = 0; j < nknown; j++) {
            if (j)
                strcat(list, j + 1 == nknown ? " and " : ", ");
            strcat(list, known[j]);
        }
        int rc = nknown ? idem_error_set(IDEM_EINVAL, "%s URL parameter '%s' is unknown; the known ones "
                                         "are %s", driver, url->params[i].name, list)
                        : idem_error_set(IDEM_EINVAL, "%s URL parameter '%s' is unknown; %s URLs "
                                         "take no parameters", driver, url->params[i].name, driver);
        free(list);
        return rc;
    }
    return IDEM_OK;
}

/* The core's deadline for the driver call this thread is in (0: none). */
static _Thread_local uint64_t call_deadline;

uint64_t idem__call_deadline_set(uint64_t deadline)
{
    uint64_t prev = call_deadline;
    call_deadline = deadline;
    return prev;
}

uint64_t idem_call_deadline_ms(void)
{
    return call_deadline;
}

uint32_t idem_call_timeout_ms(uint32_t timeout_ms)
{
    uint64_t deadline = call_deadline;
    if (!deadline || timeout_ms == 0)
        return timeout_ms;
    uint64_t now = idem__mono_ms();
    uint64_t left = deadline > now ? deadline - now : 0;
    if (left >= timeout_ms)
        return timeout_ms;
    return left ? (uint32_t)left : 1;
}

int idem_record_dup(const char *driver, const void *src, size_t len, void **out, size_t *out_len)
{
    void *p = malloc(len ? len : 1);
    if (!p)
        return idem_error_set(IDEM_ENOMEM, "%s: out of memory reading a %zu-byte record", driver, len);
    if (len)
        memcpy(p, src, len);
    *out = p;
    *out_len = len;
    return IDEM_OK;
}
