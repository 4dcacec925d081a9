/* Store URLs: what idem_url_parse() accepts, what it refuses, and how
 * idem_store_open() picks a driver by scheme. */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "internal.h"

static idem_url *url;

static void cleanup(void)
{
    idem_url_free(url);
    url = NULL;
}

TestSuite(url, .fini = cleanup, .timeout = 10);

static void parse_ok(const char *s)
{
    idem_url_free(url);
    url = NULL;
    cr_assert_eq(idem_url_parse(&url, s), IDEM_OK, "%s: %s", s, idem_last_error());
    cr_assert_not_null(url);
}

/* Parse s, expecting IDEM_EINVAL with a message and no URL. */
static void parse_bad(const char *s, const char *why)
{
    idem_url *u = (idem_url *)&u; /* must come back NULL */
    int rc = idem_url_parse(&u, s);
    cr_assert_eq(rc, IDEM_EINVAL, "accepted %s (%s): rc %d", s, why, rc);
    cr_assert_null(u, "%s: a refused URL left *out set", why);
    cr_assert(idem_last_error()[0] != '\0', "%s: no message", why);
}

/* ---- accepted ---- */

Test(url, sqlite_absolute_path_has_no_hosts_and_the_path)
{
    parse_ok("sqlite:///abs/path.db");
    cr_assert_str_eq(url->scheme, "sqlite");
    cr_assert_eq(url->nhosts, 0);
    cr_assert_null(url->hosts);
    cr_assert_str_eq(url->path, "/abs/path.db");
    cr_assert_null(url->user);
    cr_assert_null(url->password);
    cr_assert_eq(url->nparams, 0);
}

Test(url, redis_with_password_host_port_and_db)
{
    parse_ok("redis://:secret@127.0.0.1:6379/2");
    cr_assert_str_eq(url->scheme, "redis");
    cr_assert_null(url->user, "an empty user name is no user");
    cr_assert_str_eq(url->password, "secret");
    cr_assert_eq(url->nhosts, 1);
    cr_assert_str_eq(url->hosts[0].host, "127.0.0.1");
    cr_assert_eq(url->hosts[0].port, 6379);
    cr_assert_str_eq(url->path, "/2");
}

Test(url, redis_with_user_and_password_and_no_port)
{
    parse_ok("redis://user:pw@host");
    cr_assert_str_eq(url->user, "user");
    cr_assert_str_eq(url->password, "pw");
    cr_assert_eq(url->nhosts, 1);
    cr_assert_str_eq(url->hosts[0].host, "host");
    cr_assert_eq(url->hosts[0].port, 0, "no port is 0");
    cr_assert_null(url->path);

    parse_ok("redis://user@host:1");
    cr_assert_str_eq(url->user, "user");
    cr_assert_null(url->password);
}

Test(url, redis_unix_socket_path_and_query)
{
    parse_ok("redis+unix:///tmp/r.sock?db=3");
    cr_assert_str_eq(url->scheme, "redis+unix");
    cr_assert_eq(url->nhosts, 0);
    cr_assert_str_eq(url->path, "/tmp/r.sock");
    cr_assert_eq(url->nparams, 1);
    cr_assert_str_eq(url->params[0].name, "db");
    cr_assert_str_eq(url->params[0].value, "3");
    cr_assert_str_eq(idem_url_param_get(url, "db"), "3");
}

Test(url, memcached_host_list_with_an_ipv6_address)
{
    parse_ok("memcached://a:1,b:2,[::1]:3");
    cr_assert_eq(url->nhosts, 3);
    cr_assert_str_eq(url->hosts[0].host, "a");
    cr_assert_eq(url->hosts[0].port, 1);
    cr_assert_str_eq(url->hosts[1].host, "b");
    cr_assert_eq(url->hosts[1].port, 2);
    cr_assert_str_eq(url->hosts[2].host, "::1", "the brackets are removed");
    cr_assert_eq(url->hosts[2].port, 3);

    parse_ok("memcached://[fe80::1]");
    cr_assert_eq(url->nhosts, 1);
    cr_assert_str_eq(url->hosts[0].host, "fe80::1");
    cr_assert_eq(url->hosts[0].port, 0);

    parse_ok("memcached://h:65535,h:1");
    cr_assert_eq(url->hosts[0].port, 65535);
    cr_assert_eq(url->hosts[1].port, 1);
}

Test(url, percent_escapes_are_decoded_in_password_path_and_query)
{
    parse_ok("redis://us%65r:p%40ss%3Aw%2fd@h:1/d%20ir%2Fx?na%6De=v%26a%3Dl%25&k=%E2%82%AC");
    cr_assert_str_eq(url->user, "user");
    cr_assert_str_eq(url->password, "p@ss:w/d");
    cr_assert_str_eq(url->path, "/d ir/x");
    cr_assert_eq(url->nparams, 2);
    cr_assert_str_eq(url->params[0].name, "name");
    cr_assert_str_eq(url->params[0].value, "v&a=l%");
    cr_assert_str_eq(idem_url_param_get(url, "k"), "\xE2\x82\xAC");
}

Test(url, query_flags_without_a_value_are_empty_strings)
{
    parse_ok("redis://h:1?tls&db=4&verbose");
    cr_assert_eq(url->nparams, 3);
    cr_assert_str_eq(idem_url_param_get(url, "tls"), "");
    cr_assert_str_eq(idem_url_param_get(url, "verbose"), "");
    cr_assert_str_eq(idem_url_param_get(url, "db"), "4");
    cr_assert_null(idem_url_param_get(url, "absent"));
    parse_ok("redis://h:1?empty=");
    cr_assert_str_eq(idem_url_param_get(url, "empty"), "");
}

Test(url, scheme_is_lowercased_and_may_hold_digits_plus_minus_and_dots)
{
    parse_ok("ReDiS://h:1");
    cr_assert_str_eq(url->scheme, "redis");
    parse_ok("REDIS+UNIX:///s");
    cr_assert_str_eq(url->scheme, "redis+unix");
    parse_ok("x1.y-z+w://h");
    cr_assert_str_eq(url->scheme, "x1.y-z+w");
}

Test(url, the_last_at_sign_ends_the_credentials)
{
    parse_ok("redis://:a@b@h:1");
    cr_assert_str_eq(url->password, "a@b");
    cr_assert_str_eq(url->hosts[0].host, "h");
}

Test(url, a_url_of_exactly_4096_bytes_is_accepted)
{
    char s[4097];
    const char *head = "sqlite:///";
    size_t n = strlen(head);
    memcpy(s, head, n);
    memset(s + n, 'a', 4096 - n);
    s[4096] = '\0';
    parse_ok(s);
    cr_assert_eq(strlen(url->path), 4096 - strlen("sqlite://"));
}

/* ---- refused ---- */

Test(url, a_scheme_without_its_slashes_is_told_the_url_it_most_likely_meant)
{
    parse_bad("sqlite:/tmp/x.db", "sqlite with one slash");
    cr_assert(strstr(idem_last_error(), "sqlite:///tmp/x.db"), "%s", idem_last_error());
    parse_bad("SQLite:x.db", "sqlite with a relative path");
    cr_assert(strstr(idem_last_error(), "sqlite:///absolute/path/x.db"), "%s", idem_last_error());
    parse_bad("redis:h", "redis without slashes");
    cr_assert(strstr(idem_last_error(), "redis://host:port"), "%s", idem_last_error());
    parse_bad("localhost:6379", "a host and a port");
    cr_assert(strstr(idem_last_error(), "no scheme://"), "%s", idem_last_error());
    parse_bad("redis:user:s3cret@h", "a password without slashes");
    cr_assert_null(strstr(idem_last_error(), "s3cret"), "the password was repeated: %s", idem_last_error());
}

Test(url, null_and_empty_are_refused)
{
    parse_bad(NULL, "NULL");
    parse_bad("", "empty");
}

Test(url, a_missing_or_malformed_scheme_is_refused)
{
    parse_bad("localhost:6379", "no scheme");
    parse_bad("/tmp/x.db", "a bare path");
    parse_bad("://x", "an empty scheme");
    parse_bad("redis:/h:1", "one slash");
    parse_bad("re_dis://h:1", "underscore in the scheme");
    parse_bad("1redis://h:1", "a scheme starting with a digit");
    parse_bad("+redis://h:1", "a scheme starting with '+'");
    parse_bad("re*dis://h:1", "a star in the scheme");
    parse_bad("r\xc3\xa9" "dis://h:1", "a non-ASCII scheme");
}

Test(url, spaces_and_control_characters_are_refused)
{
    parse_bad("redis://h :1", "a space");
    parse_bad(" redis://h:1", "a leading space");
    parse_bad("redis://h:1\n", "a trailing newline");
    parse_bad("redis://h:1/\r", "CR");
    parse_bad("redis://h\t:1", "a tab");
    parse_bad("redis://h:1/\x7f", "DEL");
    parse_bad("redis://h:1/\x01", "SOH");
}

Test(url, bad_ports_are_refused)
{
    parse_bad("redis://h:0", "port 0");
    parse_bad("redis://h:65536", "port 65536");
    parse_bad("redis://h:99999", "port 99999");
    parse_bad("redis://h:123456", "six digits");
    parse_bad("redis://h:abc", "a port that is no number");
    parse_bad("redis://h:", "an empty port");
    parse_bad("redis://h:-1", "a negative port");
    parse_bad("redis://h:+1", "a signed port");
    parse_bad("redis://h:1:2", "two ports");
    parse_bad("memcached://a:1,b:0", "port 0 in a list");
    parse_bad("memcached://[::1]:", "an empty port after IPv6");
    parse_bad("memcached://[::1]:70000", "a big port after IPv6");
}

Test(url, empty_hosts_in_a_list_are_refused)
{
    parse_bad("memcached://a:1,,b:2", "an empty host between commas");
    parse_bad("memcached://,a:1", "a leading comma");
    parse_bad("memcached://a:1,", "a trailing comma");
    parse_bad("redis://:1", "a port without a host");
    parse_bad("redis://user:pw@:1", "credentials without a host");
    parse_bad("memcached://[]:1", "empty brackets");
}

Test(url, malformed_hosts_are_refused)
{
    parse_bad("memcached://[::1:3", "an unclosed IPv6 address");
    parse_bad("memcached://[::1", "an unclosed IPv6 address without a port");
    parse_bad("memcached://[::1]x", "junk after an IPv6 address");
    parse_bad("memcached://[::g]:1", "a non-hex IPv6 address");
    parse_bad("redis://h%41st:1", "a percent-escape in a host");
    parse_bad("redis://h!:1", "a '!' in a host");
}

Test(url, bad_percent_escapes_and_nul_are_refused)
{
    parse_bad("sqlite:///a%zzb", "%zz");
    parse_bad("sqlite:///a%4", "a cut escape");
    parse_bad("sqlite:///a%", "a lone percent");
    parse_bad("sqlite:///a%g1", "%g1");
    parse_bad("sqlite:///a%00b", "%00 in the path");
    parse_bad("redis://:pw%00@h:1", "%00 in the password");
    parse_bad("redis://:pw%x@h:1", "a bad escape in the password");
    parse_bad("redis://h:1?a=%00", "%00 in the query");
    parse_bad("redis://h:1?a%=1", "a bad escape in a parameter name");
}

Test(url, fragments_and_empty_parameter_names_are_refused)
{
    parse_bad("redis://h:1#frag", "a fragment");
    parse_bad("redis://h:1/0?db=1#frag", "a fragment after the query");
    parse_bad("redis://h:1?=3", "a parameter without a name");
    parse_bad("redis://h:1?a=1&&b=2", "an empty parameter between '&'");
    parse_bad("redis://h:1?a=1&", "a trailing '&'");
}

Test(url, urls_over_4096_bytes_are_refused)
{
    char *s = malloc(8193);
    cr_assert_not_null(s);
    const char *head = "sqlite:///";
    size_t n = strlen(head);
    memcpy(s, head, n);
    memset(s + n, 'a', 4097 - n);
    s[4097] = '\0';
    parse_bad(s, "4097 bytes");
    memset(s + n, 'a', 8192 - n);
    s[8192] = '\0';
    parse_bad(s, "8192 bytes");
    cr_assert(strstr(idem_last_error(), "4096") != NULL, "message: '%s'", idem_last_error());
    free(s);
}

Test(url, a_refused_url_never_repeats_its_password)
{
    static const char *const urls[] = {
        "redis://:Hunter2pw@h:0",
        "redis://:Hunter2pw@h:abc",
        "redis://:Hunter2pw@h:1#frag",
        "redis://:Hunter2pw@:1",
        "redis://:Hunter2pw@h :1",
        "redis://user:Hunter2pw@h:1/%zz",
        "redis://:Hunter2pw%zz@h:1",
        "redis://:Hunter2pw%00@h:1",
        "memcached://:Hunter2pw@a:1,,b:2",
        "memcached://:Hunter2pw@[::1",
        "redis://:Hunter2pw@h:1?=x",
        "re_dis://:Hunter2pw@h:1",
        "redis://:Hunter2pw@h!:1",
        "redis://:Hunter2pw/x@h:1",
    };
    for (size_t i = 0; i < sizeof urls / sizeof urls[0]; i++) {
        parse_bad(urls[i], urls[i]);
        cr_assert_null(strstr(idem_last_error(), "Hunter2pw"), "%s: the message shows the password: '%s'",
                       urls[i], idem_last_error());
    }
    idem_store *s;
    cr_assert_eq(idem_store_open(&s, "nosuch://:Hunter2pw@h:1"), IDEM_EINVAL);
    cr_assert_null(strstr(idem_last_error(), "Hunter2pw"), "message: '%s'", idem_last_error());
}

/* An '&' in a password written into the query ends the parameter there, so
 * what follows it may be the rest of the password: an unknown parameter
 * after a password parameter is refused without being named. */
Test(url, an_unknown_parameter_after_a_password_parameter_is_refused_without_naming_it)
{
    static const char *const unix_known[] = {"db", "password", "timeout_ms", NULL};
    static const char *const sentinel_known[] = {"db", "sentinel_password", "timeout_ms", NULL};
    static const struct {
        const char *url;
        const char *const *known;
    } cases[] = {
        {"redis+unix:///x.sock?password=Hunter&2secret", unix_known},
        {"redis+unix:///x.sock?password=Hunter&2secret=more", unix_known},
        {"redis+unix:///x.sock?password=Hunter&db=0&2secret", unix_known},
        {"redis+unix:///x.sock?db=0&password=Hunter&timeout_ms=5&2secret", unix_known},
        {"redis+sentinel://h:1/m?sentinel_password=Hunter&2secret", sentinel_known},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        parse_ok(cases[i].url);
        cr_assert_eq(idem_url_check_params(url, "redis", cases[i].known), IDEM_EINVAL, "%s",
                     cases[i].url);
        const char *msg = idem_last_error();
        cr_assert_null(strstr(msg, "2secret"), "%s: the message shows part of the password: '%s'",
                       cases[i].url, msg);
        cr_assert_null(strstr(msg, "Hunter"), "%s: the message shows the password: '%s'", cases[i].url,
                       msg);
        cr_assert_not_null(strstr(msg, "malformed"), "%s: message '%s'", cases[i].url, msg);
        cr_assert_not_null(strstr(msg, "%26"), "%s: the message should say how to write '&': '%s'",
                           cases[i].url, msg);
    }
    /* Before any password, an unknown parameter is named, as everywhere. */
    parse_ok("redis+unix:///x.sock?tiemout_ms=5&password=Hunter");
    cr_assert_eq(idem_url_check_params(url, "redis", unix_known), IDEM_EINVAL);
    cr_assert_not_null(strstr(idem_last_error(), "'tiemout_ms' is unknown"), "message '%s'",
                       idem_last_error());
    cr_assert_null(strstr(idem_last_error(), "Hunter"), "message '%s'", idem_last_error());
    /* Known parameters after it are fine. */
    parse_ok("redis+unix:///x.sock?password=Hunter&db=2&timeout_ms=5");
    cr_assert_eq(idem_url_check_params(url, "redis", unix_known), IDEM_OK, "%s", idem_last_error());
}

/* ---- query parameters as numbers ---- */

Test(url, param_uint_reads_numbers_in_range_and_leaves_absent_ones_alone)
{
    parse_ok("redis://h:1?db=15&zero=0&big=18446744073709551615");
    uint64_t v = 99;
    cr_assert_eq(idem_url_param_uint(url, "db", 0, 15, &v), IDEM_OK);
    cr_assert_eq(v, 15);
    cr_assert_eq(idem_url_param_uint(url, "zero", 0, 15, &v), IDEM_OK);
    cr_assert_eq(v, 0);
    cr_assert_eq(idem_url_param_uint(url, "big", 0, UINT64_MAX, &v), IDEM_OK);
    cr_assert_eq(v, UINT64_MAX);
    v = 42;
    cr_assert_eq(idem_url_param_uint(url, "absent", 0, 15, &v), IDEM_OK);
    cr_assert_eq(v, 42, "an absent parameter changed *out");
}

Test(url, param_uint_refuses_out_of_range_and_non_numbers_naming_the_parameter)
{
    parse_ok("redis://h:1?db=16&low=2&neg=-1&word=abc&mixed=12x&empty&plus=%2B3&huge=18446744073709551616"
             "&hex=0x10&dot=1.5");
    static const char *const names[] = {"db", "low", "neg", "word", "mixed", "empty", "plus", "huge",
                                        "hex", "dot"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        uint64_t v = 7;
        cr_assert_eq(idem_url_param_uint(url, names[i], 3, 15, &v), IDEM_EINVAL, "accepted %s", names[i]);
        cr_assert_eq(v, 7, "%s: a refused value changed *out", names[i]);
        cr_assert(strstr(idem_last_error(), names[i]) != NULL, "%s: message '%s'", names[i],
                  idem_last_error());
    }
}

/* ---- idem_store_open picks the driver by scheme ---- */

Test(url, store_open_with_an_unknown_scheme_is_einval_naming_it)
{
    idem_store *s = (idem_store *)&s;
    cr_assert_eq(idem_store_open(&s, "nosuch://h:1"), IDEM_EINVAL);
    cr_assert_null(s);
    cr_assert(strstr(idem_last_error(), "nosuch") != NULL, "message: '%s'", idem_last_error());
    /* a scheme that merely starts with a driver's name does not select it */
    cr_assert_eq(idem_store_open(&s, "sqlite3:///tmp/x.db"), IDEM_EINVAL);
    cr_assert(strstr(idem_last_error(), "sqlite3") != NULL, "message: '%s'", idem_last_error());
    cr_assert_eq(idem_store_open(&s, "redisx://h:1"), IDEM_EINVAL);
    cr_assert_null(s);
}

static bool built_in(const char *name)
{
    for (size_t i = 0; idem__builtin_backends[i]; i++)
        if (strcmp(idem__builtin_backends[i]->name, name) == 0)
            return true;
    return false;
}

Test(url, store_open_with_a_known_driver_left_out_of_this_build_is_eunsupported)
{
    static const struct {
        const char *name, *url;
    } known[] = {
        {"redis", "redis://127.0.0.1:1"},
        {"redis", "redis+unix:///nonexistent/r.sock"},
        {"memcached", "memcached://127.0.0.1:1"},
        {"sqlite", "sqlite:///nonexistent/x.db"},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        const char *pkg = idem__missing_backend_hint(known[i].name);
        cr_assert(pkg && strstr(pkg, "-dev"), "no package named for %s", known[i].name);
        if (built_in(known[i].name))
            continue; /* only the hint can be checked: opening would reach the driver */
        idem_store *s = (idem_store *)&s;
        cr_assert_eq(idem_store_open(&s, known[i].url), IDEM_EUNSUPPORTED, "%s", known[i].url);
        cr_assert_null(s);
        cr_assert(strstr(idem_last_error(), known[i].name) != NULL &&
                      strstr(idem_last_error(), idem__missing_backend_hint(known[i].name)) != NULL,
                  "the message does not name the driver and its package: '%s'", idem_last_error());
    }
}

Test(url, store_open_with_a_malformed_url_is_einval)
{
    idem_store *s = (idem_store *)&s;
    cr_assert_eq(idem_store_open(&s, "redis://h:0"), IDEM_EINVAL);
    cr_assert_null(s);
    cr_assert(idem_last_error()[0] != '\0');
}
