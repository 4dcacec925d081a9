/*
 * idem: the operator's command. Look at one idempotency key, free it, list
 * a prefix's keys, or check how a store is set up. Built on the public API only
 * (<idempotency/idempotency.h>), so it works on every driver whose table has
 * the read, remove, list and check members.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <idempotency/idempotency.h>

/* Exit statuses. */
#define EXIT_DONE       0   /* shown, deleted, or a check that found nothing broken */
#define EXIT_REFUSED    1   /* a check found a broken promise; a delete refused or not confirmed */
#define EXIT_STORE      2   /* the store cannot be reached or failed; the driver cannot do it */
#define EXIT_USAGE      64  /* bad command line (as sysexits.h's EX_USAGE) */

#define SHOW_BODY_MAX   512  /* bytes of a body shown escaped without --body */

static const char usage_text[] =
"NAME\n"
"    idem - look at, list and free idempotency keys, check a store's settings\n"
"\n"
"SYNOPSIS\n"
"    idem show URL KEY [--prefix P] [--scope S] [--body]\n"
"    idem delete URL KEY [--prefix P] [--scope S] [--yes] [--force]\n"
"    idem list URL [--prefix P] [--state started|completed] [--limit N]\n"
"    idem check URL\n"
"    idem --help | --version\n"
"\n"
"DESCRIPTION\n"
"    The operator's view of the records libidempotency keeps in a store: what a\n"
"    key holds, freeing a key that a dead worker left claimed, and whether the\n"
"    store is set up to keep the promises of docs/contract.md, section 7.\n"
"\n"
"    URL is a store URL, as given to idem_store_open(): sqlite:///path.db,\n"
"    redis://host:port[/db], redis+unix:///path.sock, memcached://host:port[,...],\n"
"    and the other schemes the library is built with. KEY is the idempotency key\n"
"    as clients send it (the Idempotency-Key header), without the prefix.\n"
"\n"
"COMMANDS\n"
"    show URL KEY\n"
"        Print the key's state and changes nothing:\n"
"          ABSENT     no record (never claimed, freed, or expired);\n"
"          STARTED    claimed: a handler runs, or its worker died and the key\n"
"                     stays blocked until the lease ends. Shows the lease left,\n"
"                     its deadline and the first bytes of the claim's token;\n"
"          COMPLETED  a stored response, replayed to every retry: its status,\n"
"                     stored headers, body length and the time until it expires;\n"
"          FOREIGN    a value libidempotency did not write (another program's,\n"
"                     or a damaged record): requests on the key fail with\n"
"                     IDEM_ECORRUPT and nothing runs. Shown as raw bytes only.\n"
"        Also the fingerprint digest (SHA-256 of the request fingerprint the\n"
"        claim carried), and the full key in the store. The body is shown\n"
"        escaped and cut at " "512" " bytes; with --body, only the stored body is\n"
"        written to standard output, byte for byte. An ABSENT key looked up with\n"
"        the default prefix gets a hint: the service may set another key_prefix.\n"
"\n"
"    delete URL KEY\n"
"        Free the key so that the next request for it runs its handler, and print\n"
"        what was deleted. On a terminal it shows the record and asks first,\n"
"        unless --yes. A STARTED claim is deleted only while it is the claim that\n"
"        was read: if its handler commits meanwhile, the response stays and\n"
"        nothing is deleted. A COMPLETED response (or a FOREIGN value) is\n"
"        refused unless --force: deleting a response means that a retry of the\n"
"        request runs the handler again (a second charge, a second email).\n"
"        A worker still running the handler of a deleted claim gets IDEM_ELOST\n"
"        when it commits, and its response is not stored.\n"
"\n"
"    list URL\n"
"        Print the keys under the prefix, scoped ones included, one a line:\n"
"        the state, the lease left (STARTED) or the time until it expires\n"
"        (COMPLETED), and the key as KEY takes it (a scoped key after the\n"
"        scope's tag, which holds a digest of the scope, not the scope).\n"
"        Finds the keys dead workers left STARTED. Walks the store in\n"
"        batches; keys that change meanwhile may be missed, and a Redis store\n"
"        may print one twice. memcached cannot list its keys: exit 2.\n"
"\n"
"    check URL\n"
"        Connect and report what this store promises as it is set up, and warn\n"
"        about every setting that breaks a promise:\n"
"          redis      maxmemory-policy other than noeviction (records can be\n"
"                     evicted); no persistence (appendonly no and no RDB save);\n"
"                     a replica (writes fail, or records read are behind);\n"
"          memcached  servers down; eviction (on by default: records may be\n"
"                     evicted under memory pressure); CAS disabled (-C);\n"
"          sqlite     synchronous below full (a power loss can lose commits);\n"
"                     the file on a network file system (locks unreliable).\n"
"        docs/operating.md, \"The idem command\", says what to do about each warning.\n"
"\n"
"OPTIONS\n"
"    --prefix P   the layer's key_prefix (default \"idem:\")\n"
"    --scope S    the request scope (idem_run_scoped(): a tenant, an account)\n"
"    --body       show: write only the stored body, as is, to standard output\n"
"    --yes        delete: do not ask for confirmation\n"
"    --force      delete: also delete a COMPLETED response or a FOREIGN value\n"
"    --state S    list: only the keys in state S, started or completed\n"
"    --limit N    list: at most N keys\n"
"    --help       this text;  --version  the library's version\n"
"    Options may come before or after the arguments; \"--\" ends them.\n"
"\n"
"KEYS\n"
"    KEY, P and S are bytes: \\xNN (two hex digits) stands for any byte, NUL\n"
"    included, and \\\\ for a backslash; every other byte stands for itself.\n"
"    Example: idem show sqlite:///var/lib/app/idem.db 'order\\x00 42'\n"
"\n"
"EXIT STATUS\n"
"    0   show: described (whatever the state); delete: deleted, or nothing was\n"
"        there; check: nothing breaks a promise\n"
"    1   check: a setting breaks a promise; delete: refused (COMPLETED or\n"
"        FOREIGN without --force), not confirmed, or the record changed meanwhile;\n"
"        show --body: the key holds no COMPLETED response\n"
"    2   the store cannot be reached or failed, or its driver cannot do this\n"
"        (memcached: a server of the URL that does not answer refuses the open;\n"
"        list, which memcached cannot do)\n"
"    64  bad command line (a malformed URL or --prefix included)\n"
"\n"
"SECURITY\n"
"    Nothing idem prints contains the password of a URL. A password on the\n"
"    command line is visible to other users in ps(1): prefer a redis+unix://\n"
"    socket with file permissions, or an ACL user of its own with only GET,\n"
"    PTTL, DEL, SCAN, INFO and CONFIG GET for idem.\n";

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "idem: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nusage: idem show URL KEY [--prefix P] [--scope S] [--body]\n"
                    "       idem delete URL KEY [--prefix P] [--scope S] [--yes] [--force]\n"
                    "       idem list URL [--prefix P] [--state started|completed] [--limit N]\n"
                    "       idem check URL\n"
                    "       idem --help\n");
    exit(EXIT_USAGE);
}

/* A word of the command line that looks like a store URL, which may hold
 * a password: the messages about a misplaced word never repeat it. */
static bool may_be_url(const char *word)
{
    return strstr(word, "://") != NULL;
}

/* ---- bytes on the command line and on the terminal ---- */

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode \xNN and \\ in arg into a new buffer; exits on a bad escape. */
static unsigned char *unescape(const char *arg, size_t *len, const char *what)
{
    size_t n = strlen(arg);
    unsigned char *out = malloc(n + 1);
    if (!out) {
        fprintf(stderr, "idem: out of memory\n");
        exit(EXIT_STORE);
    }
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (arg[i] != '\\') {
            out[j++] = (unsigned char)arg[i];
        } else if (arg[i + 1] == '\\') {
            out[j++] = '\\';
            i++;
        } else if (arg[i + 1] == 'x' && hexval(arg[i + 2]) >= 0 && hexval(arg[i + 3]) >= 0) {
            out[j++] = (unsigned char)(hexval(arg[i + 2]) << 4 | hexval(arg[i + 3]));
            i += 3;
        } else {
            usage_error("%s has a backslash that is not \\xNN (two hex digits) or \\\\", what);
        }
    }
    out[j] = '\0';
    *len = j;
    return out;
}

/* Print bytes between quotes, with \xNN for every byte that is not
 * printable ASCII, and at most max of them. */
static void print_escaped(FILE *f, const unsigned char *p, size_t len, size_t max)
{
    fputc('"', f);
    for (size_t i = 0; i < len && i < max; i++) {
        unsigned char c = p[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c >= 0x20 && c < 0x7f)
            fputc(c, f);
        else
            fprintf(f, "\\x%02x", c);
    }
    fputc('"', f);
    if (len > max)
        fprintf(f, "... (%zu more bytes; --body for all of it)", len - max);
}

static void print_hex(FILE *f, const uint8_t *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        fprintf(f, "%02x", p[i]);
}

/* "1 h 02 min 03.456 s", "12.345 s" */
static void print_duration(FILE *f, uint32_t ms)
{
    if (ms == UINT32_MAX) {
        fputs("unknown (the store does not say)", f);
        return;
    }
    unsigned long s = ms / 1000, h = s / 3600, m = s / 60 % 60;
    if (h)
        fprintf(f, "%lu h %02lu min %02lu s", h, m, s % 60);
    else if (m)
        fprintf(f, "%lu min %02lu s", m, s % 60);
    else
        fprintf(f, "%lu.%03u s", s, (unsigned)(ms % 1000));
}

static void print_time(FILE *f, uint64_t epoch_ms)
{
    time_t t = (time_t)(epoch_ms / 1000);
    struct tm tm;
    char buf[32];
    if (gmtime_r(&t, &tm) && strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm))
        fprintf(f, "%s.%03uZ", buf, (unsigned)(epoch_ms % 1000));
    else
        fprintf(f, "%llu ms since the epoch", (unsigned long long)epoch_ms);
}

static const char *state_name(idem_key_state s)
{
    switch (s) {
    case IDEM_KEY_ABSENT: return "ABSENT";
    case IDEM_KEY_STARTED: return "STARTED";
    case IDEM_KEY_COMPLETED: return "COMPLETED";
    case IDEM_KEY_FOREIGN: return "FOREIGN";
    }
    return "?";
}

static void describe(FILE *f, const idem_key_info *k)
{
    fprintf(f, "store key:    ");
    print_escaped(f, k->store_key, k->store_key_len, SIZE_MAX);
    fprintf(f, "\nstate:        %s", state_name(k->state));
    switch (k->state) {
    case IDEM_KEY_ABSENT:
        fprintf(f, " (no record: never claimed, freed, or expired; the next request runs its handler)\n");
        return;
    case IDEM_KEY_FOREIGN:
        fprintf(f, " (a value libidempotency did not write: requests on this key fail with "
                   "IDEM_ECORRUPT and nothing runs)\nvalue:        %zu bytes: ", k->value_len);
        print_escaped(f, k->value, k->value_len, SHOW_BODY_MAX);
        fputc('\n', f);
        return;
    case IDEM_KEY_STARTED:
        fprintf(f, " (claimed: a handler runs, or its worker died and the key waits for the lease "
                   "to end)\nlease left:   ");
        print_duration(f, k->remaining_ms);
        fprintf(f, "\ndeadline:     ");
        print_time(f, k->deadline_ms);
        fprintf(f, " (as written by the claimant's clock)\n");
        if (k->checkpoint_name) {
            fprintf(f, "checkpoint:   ");
            print_escaped(f, (const unsigned char *)k->checkpoint_name, strlen(k->checkpoint_name),
                          SHOW_BODY_MAX);
            fprintf(f, " (the next holder resumes from this step)\ndata:         %zu bytes: ",
                    k->checkpoint_len);
            print_escaped(f, k->checkpoint, k->checkpoint_len, SHOW_BODY_MAX);
            fputc('\n', f);
        }
        break;
    case IDEM_KEY_COMPLETED:
        fprintf(f, " (a stored response, replayed to every retry)\nstatus:       %d\n", k->status);
        if (k->nheaders) {
            fprintf(f, "headers:      %zu field%s\n", k->nheaders, k->nheaders == 1 ? "" : "s");
            for (size_t i = 0; i < k->nheaders; i++) {
                fprintf(f, "  %s: ", k->headers[i].name);
                print_escaped(f, (const unsigned char *)k->headers[i].value,
                              strlen(k->headers[i].value), SHOW_BODY_MAX);
                fputc('\n', f);
            }
        } else {
            fprintf(f, "headers:      none stored\n");
        }
        fprintf(f, "body:         %zu bytes: ", k->body_len);
        print_escaped(f, k->body, k->body_len, SHOW_BODY_MAX);
        fprintf(f, "\ntime left:    ");
        print_duration(f, k->remaining_ms);
        fputc('\n', f);
        break;
    }
    fprintf(f, "token:        ");
    print_hex(f, k->token, 4);
    fprintf(f, "... (the claim that wrote it)\nfingerprint:  ");
    if (k->has_fingerprint) {
        fprintf(f, "sha256 ");
        print_hex(f, k->fingerprint_digest, sizeof k->fingerprint_digest);
        fputc('\n', f);
    } else {
        fprintf(f, "none (the request carried no fingerprint; any request with this key matches)\n");
    }
}

/* ---- the command line ---- */

typedef struct args {
    const char *cmd;
    const char *pos[3];
    int         npos;
    const char *prefix, *scope, *state, *limit;
    bool        body, yes, force;
} args;

static void parse_args(int argc, char **argv, args *a)
{
    bool options = true;
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (options && strcmp(s, "--") == 0) {
            options = false;
        } else if (options && (strcmp(s, "--help") == 0 || strcmp(s, "-h") == 0)) {
            fputs(usage_text, stdout);
            exit(EXIT_DONE);
        } else if (options && strcmp(s, "--version") == 0) {
            printf("idem (libidempotency %d.%d.%d)\n", IDEM_VERSION_MAJOR, IDEM_VERSION_MINOR,
                   IDEM_VERSION_PATCH);
            exit(EXIT_DONE);
        } else if (options && strncmp(s, "--", 2) == 0) {
            const char *name = s + 2, *eq = strchr(name, '=');
            size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
            const char **valp = nlen == 6 && strncmp(name, "prefix", 6) == 0 ? &a->prefix
                              : nlen == 5 && strncmp(name, "scope", 5) == 0  ? &a->scope
                              : nlen == 5 && strncmp(name, "state", 5) == 0  ? &a->state
                              : nlen == 5 && strncmp(name, "limit", 5) == 0  ? &a->limit
                                                                             : NULL;
            bool *flag = nlen == 4 && strncmp(name, "body", 4) == 0    ? &a->body
                       : nlen == 3 && strncmp(name, "yes", 3) == 0     ? &a->yes
                       : nlen == 5 && strncmp(name, "force", 5) == 0   ? &a->force
                                                                       : NULL;
            if (valp) {
                if (eq)
                    *valp = eq + 1;
                else if (i + 1 < argc)
                    *valp = argv[++i];
                else
                    usage_error("option %s needs a value", s);
            } else if (flag && !eq) {
                *flag = true;
            } else {
                /* Only its name: its value may be a URL with a password. */
                usage_error("unknown option --%.*s", (int)nlen, name);
            }
        } else if (!a->cmd) {
            a->cmd = s;
        } else if (a->npos < 3) {
            a->pos[a->npos++] = s;
        } else {
            if (may_be_url(s))
                usage_error("%s", "too many arguments (the extra one looks like a store URL, so it is "
                                  "not repeated here)");
            usage_error("too many arguments (%s)", s);
        }
    }
    if (!a->cmd)
        usage_error("%s", "no command given");
}

static idem_store *open_store(const char *url)
{
    idem_store *store;
    int rc = idem_store_open(&store, url);
    if (rc) {
        fprintf(stderr, "idem: cannot open the store: %s (%s)\n", idem_last_error(), idem_error_name(rc));
        exit(rc == IDEM_EINVAL ? EXIT_USAGE : EXIT_STORE);
    }
    return store;
}

static idem_layer *open_layer(idem_store *store, const args *a)
{
    idem_options o;
    idem_options_init(&o);
    size_t plen = 0;
    unsigned char *prefix = NULL;
    if (a->prefix) {
        prefix = unescape(a->prefix, &plen, "--prefix");
        if (memchr(prefix, '\0', plen))
            usage_error("%s", "--prefix cannot hold a NUL byte");
        o.key_prefix = (const char *)prefix;
    }
    idem_layer *layer;
    int rc = idem_layer_new(&layer, store, &o);
    free(prefix);
    if (rc) {
        fprintf(stderr, "idem: %s\n", idem_last_error());
        idem_store_close(store);
        exit(EXIT_USAGE);
    }
    return layer;
}

/* Ask on the terminal; true for yes. */
static bool confirm(const char *question)
{
    fprintf(stderr, "%s [y/N] ", question);
    fflush(stderr);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return false;
    return line[0] == 'y' || line[0] == 'Y';
}

/* A key looked up with the default prefix and not found may be stored
 * under the prefix the service sets (idem_options.key_prefix). */
static void absent_hint(const args *a, const idem_key_info *k)
{
    if (k->state != IDEM_KEY_ABSENT || a->prefix)
        return;
    fprintf(stderr, "idem: hint: this looked under the default prefix \"idem:\"; if the service sets "
                    "another key_prefix, give it with --prefix P (idem list URL --prefix P prints a "
                    "prefix's keys)%s\n",
            a->scope ? "" : "; a key the service stores with a scope needs --scope S too");
}

static int key_command(const args *a, bool show)
{
    if (a->npos != 2)
        usage_error("%s needs a store URL and a key", a->cmd);
    if ((show && (a->yes || a->force)) || (!show && a->body))
        usage_error("%s", show ? "--yes and --force are options of delete"
                               : "--body is an option of show");
    if (a->state || a->limit)
        usage_error("%s", "--state and --limit are options of list");
    size_t key_len, scope_len = 0;
    unsigned char *key = unescape(a->pos[1], &key_len, "KEY");
    unsigned char *scope = a->scope ? unescape(a->scope, &scope_len, "--scope") : NULL;
    if (key_len == 0)
        usage_error("%s", "KEY is empty");
    if (scope && scope_len == 0)
        usage_error("%s", "--scope is empty");
    idem_store *store = open_store(a->pos[0]);
    idem_layer *layer = open_layer(store, a);
    idem_key_info k = {0};
    int status = EXIT_DONE;
    int rc = idem_layer_show(layer, scope, scope_len, key, key_len, &k);
    if (rc) {
        fprintf(stderr, "idem: reading the key: %s (%s)\n", idem_last_error(), idem_error_name(rc));
        status = rc == IDEM_EINVAL ? EXIT_USAGE : EXIT_STORE;
    } else if (show && a->body) {
        if (k.state == IDEM_KEY_COMPLETED) {
            if (k.body_len && fwrite(k.body, 1, k.body_len, stdout) != k.body_len)
                status = EXIT_STORE;
        } else {
            describe(stderr, &k);
            fprintf(stderr, "idem: no body: the key holds no COMPLETED response\n");
            status = EXIT_REFUSED;
        }
    } else if (show) {
        printf("store:        %s\n", idem_store_backend(store));
        describe(stdout, &k);
        absent_hint(a, &k);
    } else if (k.state == IDEM_KEY_ABSENT) {
        printf("nothing to delete: ");
        describe(stdout, &k);
        absent_hint(a, &k);
    } else if ((k.state == IDEM_KEY_COMPLETED || k.state == IDEM_KEY_FOREIGN) && !a->force) {
        describe(stderr, &k);
        fprintf(stderr, "idem: refusing to delete %s: %s; nothing was deleted. Add --force to "
                        "delete it anyway.\n",
                k.state == IDEM_KEY_COMPLETED ? "a COMPLETED response" : "a FOREIGN value",
                k.state == IDEM_KEY_COMPLETED
                    ? "the next retry of this request would run the handler again"
                    : "libidempotency did not write it, and it may belong to another program");
        status = EXIT_REFUSED;
    } else {
        bool go = true;
        if (!a->yes && isatty(STDIN_FILENO)) {
            describe(stderr, &k);
            go = confirm(k.state == IDEM_KEY_COMPLETED
                             ? "Delete this COMPLETED response? A retry of the request then runs the "
                               "handler again."
                             : "Delete it?");
        }
        idem_key_info gone = {0};
        if (!go) {
            fprintf(stderr, "idem: not confirmed; nothing was deleted\n");
            status = EXIT_REFUSED;
        } else if ((rc = idem_layer_delete(layer, scope, scope_len, key, key_len, a->force, &gone))) {
            fprintf(stderr, "idem: deleting the key: %s (%s)\n", idem_last_error(), idem_error_name(rc));
            status = rc == IDEM_ELOST || rc == IDEM_EINVAL ? EXIT_REFUSED : EXIT_STORE;
        } else if (gone.state == IDEM_KEY_ABSENT) {
            printf("nothing to delete: the record expired meanwhile\n");
        } else {
            printf("deleted:\n");
            describe(stdout, &gone);
            printf("the next request for this key runs its handler%s\n",
                   gone.state == IDEM_KEY_COMPLETED ? " again (the stored response is gone)"
                   : gone.state == IDEM_KEY_STARTED ? "; a worker still running the deleted claim "
                                                      "gets IDEM_ELOST when it commits"
                                                    : "");
        }
        idem_key_info_clear(&gone);
    }
    idem_key_info_clear(&k);
    idem_layer_free(layer);
    idem_store_close(store);
    free(key);
    free(scope);
    return status;
}

/* ---- list ---- */

typedef struct list_ctx {
    size_t prefix_len;  /* of the layer's prefix, ':' included */
    size_t count;
} list_ctx;

/* One line: state, lease or TTL left, and the key without the prefix. A
 * scoped store key is the prefix's name, '#', 32 hex digits and ':' (the
 * scope's tag) before the key. */
static int list_line(void *arg, const idem_key_info *k)
{
    list_ctx *c = arg;
    c->count++;
    printf("%-9s  ", state_name(k->state));
    if (k->state == IDEM_KEY_STARTED || k->state == IDEM_KEY_COMPLETED) {
        printf("%s ", k->state == IDEM_KEY_STARTED ? "lease" : "ttl");
        print_duration(stdout, k->remaining_ms);
    } else {
        printf("-");
    }
    const unsigned char *key = k->store_key;
    size_t len = k->store_key_len;
    size_t name_len = c->prefix_len - 1, skip;
    if (len >= name_len + 34 && key[name_len] == '#') {
        printf("  scope #%.32s  ", (const char *)key + name_len + 1);
        skip = name_len + 34;
    } else {
        printf("  ");
        skip = c->prefix_len <= len ? c->prefix_len : len;
    }
    print_escaped(stdout, key + skip, len - skip, SIZE_MAX);
    putchar('\n');
    return ferror(stdout) ? 1 : 0;
}

static int list_command(const args *a)
{
    if (a->npos != 1)
        usage_error("%s", "list needs a store URL, and only that");
    if (a->scope || a->body || a->yes || a->force)
        usage_error("%s", "list takes --prefix, --state and --limit only");
    idem_key_state state = IDEM_KEY_ABSENT; /* every state */
    if (a->state && strcmp(a->state, "started") == 0)
        state = IDEM_KEY_STARTED;
    else if (a->state && strcmp(a->state, "completed") == 0)
        state = IDEM_KEY_COMPLETED;
    else if (a->state)
        usage_error("%s", "--state is started or completed");
    unsigned long long limit = 0;
    if (a->limit) {
        char *end;
        errno = 0;
        limit = strtoull(a->limit, &end, 10);
        if (a->limit[0] < '1' || a->limit[0] > '9' || *end || errno || limit > SIZE_MAX)
            usage_error("%s", "--limit is a whole number of keys, 1 or more");
    }
    list_ctx c = {.prefix_len = strlen("idem:")};
    if (a->prefix)
        free(unescape(a->prefix, &c.prefix_len, "--prefix"));
    idem_store *store = open_store(a->pos[0]);
    idem_layer *layer = open_layer(store, a);
    int rc = idem_layer_list(layer, state, (size_t)limit, list_line, &c);
    int status = EXIT_DONE;
    if (fflush(stdout) != 0) {
        fprintf(stderr, "idem: writing the list: %s\n", strerror(errno));
        status = EXIT_STORE;
    } else if (rc) {
        fprintf(stderr, "idem: listing the keys: %s (%s)\n", idem_last_error(), idem_error_name(rc));
        status = rc == IDEM_EINVAL ? EXIT_USAGE : EXIT_STORE;
    } else {
        fprintf(stderr, "idem: %zu key%s%s\n", c.count, c.count == 1 ? "" : "s",
                limit && c.count == limit ? " (--limit reached)" : "");
        if (c.count == 0 && !a->prefix)
            fprintf(stderr, "idem: hint: this looked under the default prefix \"idem:\"; if the "
                            "service sets another key_prefix, give it with --prefix P\n");
    }
    idem_layer_free(layer);
    idem_store_close(store);
    return status;
}

static int check_command(const args *a)
{
    if (a->npos != 1)
        usage_error("%s", "check needs a store URL, and only that");
    if (a->prefix || a->scope || a->body || a->yes || a->force || a->state || a->limit)
        usage_error("%s", "check takes no options");
    idem_store *store = open_store(a->pos[0]);
    idem_findings *f;
    int rc = idem_store_check(store, &f);
    if (rc) {
        fprintf(stderr, "idem: checking the %s store: %s (%s)\n", idem_store_backend(store),
                idem_last_error(), idem_error_name(rc));
        idem_store_close(store);
        return EXIT_STORE;
    }
    printf("%s store:\n", idem_store_backend(store));
    size_t warnings = 0;
    for (size_t i = 0; i < idem_findings_count(f); i++) {
        idem_finding_level level = IDEM_FINDING_NOTE;
        const char *text = idem_findings_get(f, i, &level);
        printf("  %-9s %s\n", level == IDEM_FINDING_PROMISE ? "promise:"
                               : level == IDEM_FINDING_WARNING ? "WARNING:" : "note:",
               text);
        warnings += level == IDEM_FINDING_WARNING;
    }
    if (warnings)
        printf("%zu warning%s: a setting breaks a promise (see docs/operating.md, \"The idem command\")\n",
               warnings, warnings == 1 ? "" : "s");
    else
        printf("no warnings: nothing in the store's settings breaks a promise\n");
    idem_findings_free(f);
    idem_store_close(store);
    return warnings ? EXIT_REFUSED : EXIT_DONE;
}

int main(int argc, char **argv)
{
    args a = {0};
    parse_args(argc, argv, &a);
    if (strcmp(a.cmd, "show") == 0)
        return key_command(&a, true);
    if (strcmp(a.cmd, "delete") == 0)
        return key_command(&a, false);
    if (strcmp(a.cmd, "check") == 0)
        return check_command(&a);
    if (strcmp(a.cmd, "list") == 0)
        return list_command(&a);
    if (strcmp(a.cmd, "help") == 0) {
        fputs(usage_text, stdout);
        return EXIT_DONE;
    }
    if (may_be_url(a.cmd))
        usage_error("%s", "the command comes first, before the store URL (which is not repeated here)");
    usage_error("unknown command '%s'", a.cmd);
    return EXIT_USAGE;
}
