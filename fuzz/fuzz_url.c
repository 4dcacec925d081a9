/*
 * Fuzz target: the store URL parser (idem_url_parse), which reads whatever
 * a configuration file or an environment variable holds.
 *
 * Besides the sanitizers' checks: a parsed URL is well formed (lower-case
 * scheme, no empty host, ports in range, a path that starts with '/'), a
 * refused one has a message, and a message never holds the password part
 * of the input.
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The raw password of the input, between "://[user]:" and '@', if any. */
static char *raw_password(const char *s)
{
    const char *a = strstr(s, "://");
    if (!a)
        return NULL;
    a += 3;
    const char *end = a + strcspn(a, "/?#");
    const char *at = NULL;
    for (const char *c = a; c < end; c++)
        if (*c == '@')
            at = c;
    if (!at)
        return NULL;
    const char *colon = memchr(a, ':', (size_t)(at - a));
    if (!colon || at - colon - 1 < 6) /* short ones would match by chance */
        return NULL;
    return strndup(colon + 1, (size_t)(at - colon - 1));
}

/* Does pw stand in the message even when the input's password is another
 * string of the same length? Then it is the message's own wording (the
 * usage hint says "[:password@]"), not the input's password. */
static bool in_fixed_text(const char *s, const char *pw)
{
    char *other = strdup(s);
    if (!other)
        return false;
    char *at = strstr(other, pw);
    memset(at, 'x', strlen(pw));
    idem_url *u = NULL;
    bool fixed = idem_url_parse(&u, other) != IDEM_OK && strstr(idem_last_error(), pw) != NULL;
    idem_url_free(u);
    free(other);
    return fixed;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';

    idem_url *u = NULL;
    int rc = idem_url_parse(&u, s);
    if (rc == IDEM_OK) {
        if (!u || !u->scheme || !u->scheme[0])
            abort();
        for (const char *c = u->scheme; *c; c++)
            if (isupper((unsigned char)*c))
                abort();
        if (u->nhosts && !u->hosts)
            abort();
        for (size_t i = 0; i < u->nhosts; i++)
            if (!u->hosts[i].host || !u->hosts[i].host[0])
                abort();
        if (u->path && u->path[0] != '/')
            abort();
        for (size_t i = 0; i < u->nparams; i++) {
            if (!u->params[i].name || !u->params[i].name[0] || !u->params[i].value)
                abort();
            if (idem_url_param_get(u, u->params[i].name) == NULL)
                abort();
            uint64_t v = 7;
            if (idem_url_param_uint(u, u->params[i].name, 1, 1000, &v) == IDEM_OK && (v < 1 || v > 1000) &&
                v != 7)
                abort();
        }
        idem_url_free(u);
    } else {
        if (u != NULL || idem_last_error()[0] == '\0')
            abort();
        char *pw = raw_password(s);
        if (pw && strstr(idem_last_error(), pw) && !in_fixed_text(s, pw))
            abort(); /* the message repeats the password */
        free(pw);
    }
    free(s);
    return 0;
}
