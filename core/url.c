/* Store URLs: scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...] */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "internal.h"

#define MAX_URL_LEN 4096

static int bad(const char *what)
{
    return idem_error_set(IDEM_EINVAL, "malformed store URL: %s; expected "
                          "scheme://[:password@]host:port[/path][?name=value], "
                          "e.g. sqlite:///var/lib/app/idem.db or redis://127.0.0.1:6379", what);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decode s[0..n) into a new string; NULL bytes are refused. */
static int decode(const char *s, size_t n, char **out, const char *part)
{
    char *d = malloc(n + 1), *q = d;
    if (!d)
        return IDEM_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            *q++ = s[i];
            continue;
        }
        if (i + 2 >= n || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0) {
            free(d);
            return idem_error_set(IDEM_EINVAL, "malformed store URL: bad percent-escape in the %s",
                                  part);
        }
        int c = hexval(s[i + 1]) << 4 | hexval(s[i + 2]);
        if (c == 0) {
            free(d);
            return idem_error_set(IDEM_EINVAL, "malformed store URL: %%00 in the %s", part);
        }
        *q++ = (char)c;
        i += 2;
    }
    *q = '\0';
    *out = d;
    return IDEM_OK;
}

void idem_url_free(idem_url *u)
{
    if (!u)
        return;
    free(u->scheme);
    free(u->user);
    free(u->password);
    for (size_t i = 0; i < u->nhosts; i++)
        free(u->hosts[i].host);
    free(u->hosts);
    free(u->path);
    for (size_t i = 0; i < u->nparams; i++) {
        free(u->params[i].name);
        free(u->params[i].value);
    }
    free(u->params);
    free(u);
}

static int parse_port(const char *s, size_t n, uint16_t *out)
{
    unsigned long v = 0;
    if (n == 0 || n > 5)
        return bad("the port must be a number from 1 to 65535");
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return bad("the port must be a number from 1 to 65535");
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v == 0 || v > 65535)
        return bad("the port must be a number from 1 to 65535");
    *out = (uint16_t)v;
    return IDEM_OK;
}

static bool host_char(int c)
{
    return isalnum(c) || c == '-' || c == '.' || c == '_';
}

static int parse_host(idem_url_host *h, const char *s, size_t n)
{
    const char *end = s + n, *port = NULL;
    size_t hn;
    if (n > 0 && s[0] == '[') {
        const char *close = memchr(s, ']', n);
        if (!close)
            return bad("an IPv6 address lacks its closing ']'");
        for (const char *c = s + 1; c < close; c++)
            if (!isxdigit((unsigned char)*c) && *c != ':' && *c != '.')
                return bad("an IPv6 address holds a character that does not belong there");
        hn = (size_t)(close - s - 1);
        s++;
        size_t rest = n - hn - 2;
        if (rest > 0) {
            if (close[1] != ':')
                return bad("unexpected characters after an IPv6 address");
            port = close + 2;
        }
    } else {
        const char *colon = memchr(s, ':', n);
        hn = colon ? (size_t)(colon - s) : n;
        for (size_t i = 0; i < hn; i++)
            if (!host_char((unsigned char)s[i]))
                return bad("a host name holds a character that does not belong there");
        if (colon)
            port = colon + 1;
    }
    if (hn == 0)
        return bad("a host is empty");
    if (port) {
        int rc = parse_port(port, (size_t)(end - port), &h->port);
        if (rc)
            return rc;
    }
    h->host = strndup(s, hn);
    return h->host ? IDEM_OK : IDEM_ENOMEM;
}

static int parse_hosts(idem_url *u, const char *s, size_t n)
{
    if (n == 0)
        return IDEM_OK;
    size_t count = 1;
    for (size_t i = 0; i < n; i++)
        count += s[i] == ',';
    u->hosts = calloc(count, sizeof *u->hosts);
    if (!u->hosts)
        return IDEM_ENOMEM;
    const char *end = s + n;
    while (u->nhosts < count) {
        const char *comma = memchr(s, ',', (size_t)(end - s));
        const char *e = comma ? comma : end;
        int rc = parse_host(&u->hosts[u->nhosts], s, (size_t)(e - s));
        if (rc)
            return rc;
        u->nhosts++;
        s = e + 1;
    }
    return IDEM_OK;
}

static int parse_query(idem_url *u, const char *s, size_t n)
{
    if (n == 0)
        return IDEM_OK;
    size_t count = 1;
    for (size_t i = 0; i < n; i++)
        count += s[i] == '&';
    u->params = calloc(count, sizeof *u->params);
    if (!u->params)
        return IDEM_ENOMEM;
    const char *end = s + n;
    while (u->nparams < count) {
        const char *amp = memchr(s, '&', (size_t)(end - s));
        const char *e = amp ? amp : end;
        const char *eq = memchr(s, '=', (size_t)(e - s));
        const char *ne = eq ? eq : e;
        if (ne == s)
            return bad("a query parameter has no name");
        idem_url_param *p = &u->params[u->nparams];
        int rc = decode(s, (size_t)(ne - s), &p->name, "query");
        if (rc == IDEM_OK)
            rc = eq ? decode(eq + 1, (size_t)(e - eq - 1), &p->value, "query")
                    : decode("", 0, &p->value, "query");
        if (rc) {
            free(p->name);
            p->name = NULL;
            return rc;
        }
        u->nparams++;
        s = e + 1;
    }
    return IDEM_OK;
}

static bool is_scheme(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(isalpha((unsigned char)s[i]) ||
              (i > 0 && (isdigit((unsigned char)s[i]) || s[i] == '+' || s[i] == '-' || s[i] == '.'))))
            return false;
    return n > 0;
}

/* No "://": a scheme with a colon only ("sqlite:/tmp/x.db") gets the URL it
 * most likely meant; the rest of a URL is repeated only for sqlite, whose
 * rest is a path and holds no password. */
static int no_scheme(const char *url)
{
    const char *colon = strchr(url, ':');
    /* "localhost:6379" is a host and a port; "user:password@host" holds a password */
    if (!colon || !is_scheme(url, (size_t)(colon - url)) || isdigit((unsigned char)colon[1]) ||
        strchr(colon, '@'))
        return bad("no scheme:// at the start");
    int n = (int)(colon - url);
    const char *rest = colon + 1;
    if (n == 6 && strncasecmp(url, "sqlite", 6) == 0) {
        while (rest[0] == '/' && rest[1] == '/')
            rest++;
        if (rest[0] == '/')
            return idem_error_set(IDEM_EINVAL, "malformed store URL: '%.*s:' is not followed by '//'; "
                                  "a file is named by its absolute path after sqlite://, so three "
                                  "slashes: sqlite://%s", n, url, rest);
        return idem_error_set(IDEM_EINVAL, "malformed store URL: '%.*s:' is not followed by '//'; a "
                              "file is named by its absolute path after sqlite://, so three slashes: "
                              "sqlite:///absolute/path/%s", n, url, rest[0] ? rest : "idem.db");
    }
    return idem_error_set(IDEM_EINVAL, "malformed store URL: '%.*s:' is not followed by '//'; write "
                          "%.*s://host:port[/path], e.g. redis://127.0.0.1:6379", n, url, n, url);
}

static int parse(idem_url *u, const char *url)
{
    size_t len = strnlen(url, MAX_URL_LEN + 1);
    if (len > MAX_URL_LEN)
        return bad("longer than 4096 bytes");
    for (size_t i = 0; i < len; i++)
        if (!isgraph((unsigned char)url[i]))
            return bad("it holds a space or a control character (percent-encode them)");
    const char *sep = strstr(url, "://");
    if (!sep || sep == url)
        return no_scheme(url);
    for (const char *c = url; c < sep; c++)
        if (!(isalpha((unsigned char)*c) || (c > url && (isdigit((unsigned char)*c) || *c == '+' ||
                                                         *c == '-' || *c == '.'))))
            return bad("the scheme holds a character that does not belong there");
    u->scheme = strndup(url, (size_t)(sep - url));
    if (!u->scheme)
        return IDEM_ENOMEM;
    for (char *c = u->scheme; *c; c++)
        *c = (char)tolower((unsigned char)*c);

    const char *a = sep + 3;
    if (strchr(a, '#'))
        return bad("a '#' fragment has no meaning in a store URL");
    const char *q = strchr(a, '?');
    const char *end = q ? q : url + len;
    const char *slash = memchr(a, '/', (size_t)(end - a));
    const char *aend = slash ? slash : end;
    const char *at = NULL;
    for (const char *c = a; c < aend; c++)
        if (*c == '@')
            at = c;
    int rc;
    if (at) {
        const char *colon = memchr(a, ':', (size_t)(at - a));
        rc = decode(a, (size_t)((colon ? colon : at) - a), &u->user, "user name");
        if (rc == IDEM_OK && colon)
            rc = decode(colon + 1, (size_t)(at - colon - 1), &u->password, "password");
        if (rc)
            return rc;
        if (u->user[0] == '\0') {
            free(u->user);
            u->user = NULL;
        }
        a = at + 1;
    }
    rc = parse_hosts(u, a, (size_t)(aend - a));
    if (rc == IDEM_OK && slash)
        rc = decode(slash, (size_t)(end - slash), &u->path, "path");
    if (rc == IDEM_OK && q)
        rc = parse_query(u, q + 1, (size_t)(url + len - q - 1));
    return rc;
}

int idem_url_parse(idem_url **out, const char *url)
{
    if (!out)
        return idem_error_set(IDEM_EINVAL, "idem_url_parse: out is NULL");
    *out = NULL;
    if (!url)
        return idem_error_set(IDEM_EINVAL, "store URL is NULL; pass e.g. sqlite:///var/lib/app/idem.db");
    idem_url *u = calloc(1, sizeof *u);
    if (!u)
        return idem_error_set(IDEM_ENOMEM, "out of memory parsing a store URL");
    int rc = parse(u, url);
    if (rc) {
        if (rc == IDEM_ENOMEM)
            idem_error_set(rc, "out of memory parsing a store URL");
        idem_url_free(u);
        return rc;
    }
    *out = u;
    return IDEM_OK;
}

const char *idem_url_param_get(const idem_url *url, const char *name)
{
    if (!url || !name)
        return NULL;
    for (size_t i = 0; i < url->nparams; i++)
        if (strcmp(url->params[i].name, name) == 0)
            return url->params[i].value;
    return NULL;
}

int idem_url_param_uint(const idem_url *url, const char *name, uint64_t min, uint64_t max, uint64_t *out)
{
    if (!url || !name || !out)
        return idem_error_set(IDEM_EINVAL, "idem_url_param_uint: url, name and out must not be NULL");
    const char *v = idem_url_param_get(url, name);
    if (!v)
        return IDEM_OK;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (!isdigit((unsigned char)v[0]) || *end || errno || n < min || n > max)
        return idem_error_set(IDEM_EINVAL, "store URL parameter %s must be a whole number from %llu to %llu",
                              name, (unsigned long long)min, (unsigned long long)max);
    *out = n;
    return IDEM_OK;
}
