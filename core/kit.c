/* Small pieces every driver shares, declared in <idempotency/backend.h>. */
#include <stdarg.h>
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

int idem_url_check_params(const idem_url *url, const char *driver, const char *const *known)
{
    for (size_t i = 0; i < url->nparams; i++) {
        size_t k = 0;
        while (known[k] && strcmp(known[k], url->params[i].name) != 0)
            k++;
        if (known[k])
            continue;
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
