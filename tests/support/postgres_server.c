/*
 * Test support: a throwaway PostgreSQL server.
 *
 * initdb and postgres come from $IDEM_TEST_PG_BINDIR, else the newest
 * /usr/lib/postgresql/N/bin (Debian keeps them off PATH), else PATH. The
 * cluster lives in the server's temporary directory, which also holds the
 * unix socket; the server listens on a free 127.0.0.1 port too. PostgreSQL
 * refuses to run as root, so a root test run starts it (and initdb) as the
 * user "nobody", owner of the directory.
 *
 * Settings for speed, not for safety: fsync=off and full_page_writes=off.
 * That loses data only when the machine itself goes down; a SIGKILLed
 * server keeps every commit (the WAL is in the page cache), and
 * synchronous_commit stays on, so killing the server in the tests means
 * what it means in production.
 *
 * $IDEM_TEST_PG_CONF, when set, is appended to postgresql.conf (the
 * benchmark loads pg_stat_statements with it).
 *
 * Killing the server kills the postmaster and every backend, as a crash of
 * the database host would (see idem_test_kill_postgres()).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "postgres_server.h"

#define START_TIMEOUT_MS 30000
#define START_TRIES      5

static void msleep(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Where initdb and postgres are; malloc'd. */
static char *find_bindir(void)
{
    const char *env = getenv("IDEM_TEST_PG_BINDIR");
    if (env && *env)
        return strdup(env);
    glob_t g;
    char *dir = NULL;
    if (glob("/usr/lib/postgresql/*/bin/postgres", 0, NULL, &g) == 0 && g.gl_pathc > 0) {
        /* glob sorts: the last is the newest of equal-length versions */
        const char *best = g.gl_pathv[g.gl_pathc - 1];
        for (size_t i = 0; i < g.gl_pathc; i++)
            if (strlen(g.gl_pathv[i]) > strlen(best) ||
                (strlen(g.gl_pathv[i]) == strlen(best) && strcmp(g.gl_pathv[i], best) > 0))
                best = g.gl_pathv[i];
        dir = strndup(best, strlen(best) - strlen("/postgres"));
    }
    if (g.gl_pathc)
        globfree(&g);
    return dir ? dir : strdup(""); /* "": from PATH */
}

/* The user the server runs as: ourselves, or nobody when we are root. */
static void server_user(uid_t *uid, gid_t *gid)
{
    *uid = geteuid();
    *gid = getegid();
    if (*uid != 0)
        return;
    struct passwd *pw = getpwnam("nobody");
    if (pw) {
        *uid = pw->pw_uid;
        *gid = pw->pw_gid;
    }
}

static char *tool(const idem_test_server *srv, const char *name)
{
    char *p;
    if (asprintf(&p, "%s%s%s", srv->bin ? srv->bin : "", srv->bin && srv->bin[0] ? "/" : "", name) < 0)
        return NULL;
    return p;
}

/* fork and exec argv as the server's user, output to logfile, in a process
 * group of its own. The child's PID or -1. */
static pid_t spawn_as_server_user(char *const argv[], const char *logfile)
{
    uid_t uid;
    gid_t gid;
    server_user(&uid, &gid);
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    int fd = open(logfile, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
    }
    setpgid(0, 0);
    if (geteuid() == 0 && uid != 0 && (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0)) {
        fprintf(stderr, "cannot switch to uid %ld: %s\n", (long)uid, strerror(errno));
        _exit(126);
    }
    if (strchr(argv[0], '/'))
        execv(argv[0], argv);
    else
        execvp(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s (is postgresql-15 installed? apt-get install postgresql-15, "
                    "or set IDEM_TEST_PG_BINDIR)\n", argv[0], strerror(errno));
    _exit(127);
}

static char *path_in(const idem_test_server *srv, const char *name)
{
    char *p;
    if (asprintf(&p, "%s/%s", srv->dir, name) < 0)
        return NULL;
    return p;
}

/* The postmaster says "ready" in line 8 of postmaster.pid once it accepts
 * connections. */
static bool is_ready(const idem_test_server *srv)
{
    char *pidfile = path_in(srv, "data/postmaster.pid");
    FILE *f = pidfile ? fopen(pidfile, "r") : NULL;
    free(pidfile);
    if (!f)
        return false;
    char line[256];
    int n = 0;
    bool ready = false;
    while (fgets(line, sizeof line, f))
        if (++n == 8)
            ready = strncmp(line, "ready", 5) == 0;
    fclose(f);
    return ready;
}

/* Start the postmaster on srv->ports[0]. 0, or -1 (it exited or never got
 * ready; see the log). */
static int spawn_postgres(idem_test_server *srv)
{
    char *postgres = tool(srv, "postgres"), *data = path_in(srv, "data"), *log = path_in(srv, "postgres.log");
    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)srv->ports[0]);
    int ret = -1;
    if (!postgres || !data || !log)
        goto out;
    /* A SIGKILLed server leaves its lock file behind; we killed it, so it
     * is stale (postgres itself would wait until the old PID is reaped). */
    char *pidfile = path_in(srv, "data/postmaster.pid");
    if (pidfile)
        unlink(pidfile);
    free(pidfile);
    char *argv[] = {postgres, "-D", data, "-p", port, "-k", srv->dir, NULL};
    pid_t pid = spawn_as_server_user(argv, log);
    if (pid < 0)
        goto out;
    for (int waited = 0; waited < START_TIMEOUT_MS; waited += 20) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            goto out; /* it gave up: port taken, old backends still attached, ... */
        if (is_ready(srv)) {
            srv->pids[0] = pid;
            ret = 0;
            goto out;
        }
        msleep(20);
    }
    kill(-pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fprintf(stderr, "postgres did not get ready within %d ms; see %s\n", START_TIMEOUT_MS, log);
out:
    free(postgres);
    free(data);
    free(log);
    return ret;
}

/* Run argv to its end as the server's user. 0 when it exits with 0. */
static int run_tool(char *const argv[], const char *log)
{
    pid_t pid = spawn_as_server_user(argv, log);
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid)
        return -1;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static int append_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "a");
    if (!f)
        return -1;
    int rc = fputs(text, f) < 0 ? -1 : 0;
    return fclose(f) != 0 ? -1 : rc;
}

int idem_test_start_postgres_with(idem_test_server *srv, const idem_test_pg_options *opts)
{
    idem_test_pg_options none = {0};
    if (!opts)
        opts = &none;
    free(srv->bin);
    srv->bin = find_bindir();
    uid_t uid;
    gid_t gid;
    server_user(&uid, &gid);
    if (!srv->bin || (geteuid() == 0 && chown(srv->dir, uid, gid) != 0)) {
        fprintf(stderr, "cannot give %s to the server's user: %s\n", srv->dir, strerror(errno));
        return -1;
    }
    chmod(srv->dir, 0700);
    char *initdb = tool(srv, "initdb"), *data = path_in(srv, "data"), *log = path_in(srv, "initdb.log");
    char *pwfile = path_in(srv, "pwfile"), *conf = path_in(srv, "data/postgresql.conf");
    int ret = -1;
    if (!initdb || !data || !log || !pwfile || !conf)
        goto out;
    if (opts->password) {
        FILE *f = fopen(pwfile, "w");
        if (!f || fprintf(f, "%s\n", opts->password) < 0 || fclose(f) != 0 ||
            (geteuid() == 0 && chown(pwfile, uid, gid) != 0))
            goto out;
    }
    char pwarg[4200];
    snprintf(pwarg, sizeof pwarg, "--pwfile=%s", pwfile);
    char *argv_trust[] = {initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8",
                          "--no-sync", "--no-instructions", NULL};
    char *argv_pw[] = {initdb, "-D", data, "-U", "postgres", "--auth-local=trust",
                       "--auth-host=scram-sha-256", pwarg, "--no-locale", "-E", "UTF8", "--no-sync",
                       "--no-instructions", NULL};
    if (run_tool(opts->password ? argv_pw : argv_trust, log) != 0) {
        fprintf(stderr, "initdb failed; see %s (is postgresql-15 installed? apt-get install "
                        "postgresql-15%s)\n", log,
                geteuid() == 0 ? "; as root the server runs as nobody, who must be able to reach "
                                 "$TMPDIR (default /tmp)" : "");
        goto out;
    }
    unlink(pwfile);
    char settings[4096];
    snprintf(settings, sizeof settings,
             "\n# idempotency tests: fast, not crash-safe against a host crash\n"
             "listen_addresses = '127.0.0.1'\n"
             "fsync = off\n"
             "full_page_writes = off\n"
             "synchronous_commit = on\n"
             "max_connections = 300\n"
             "shared_buffers = 32MB\n"
             "dynamic_shared_memory_type = mmap\n"
             "logging_collector = off\n"
             "log_min_messages = warning\n"
             "%s%s",
             opts->conf ? opts->conf : "", getenv("IDEM_TEST_PG_CONF") ? getenv("IDEM_TEST_PG_CONF") : "");
    if (append_file(conf, settings) != 0)
        goto out;
    for (int t = 0; t < START_TRIES && ret != 0; t++) {
        srv->ports[0] = idem_test_free_port();
        if (srv->ports[0])
            ret = spawn_postgres(srv);
    }
    if (ret != 0) {
        fprintf(stderr, "cannot start postgres; see %s/postgres.log\n", srv->dir);
        goto out;
    }
    free(srv->url);
    int n = opts->unix_socket
                ? asprintf(&srv->url, "postgresql://postgres@/postgres?host=%s&port=%u", srv->dir, srv->ports[0])
            : opts->password
                ? asprintf(&srv->url, "postgresql://postgres:%s@127.0.0.1:%u/postgres", opts->password,
                           srv->ports[0])
                : asprintf(&srv->url, "postgresql://postgres@127.0.0.1:%u/postgres", srv->ports[0]);
    if (n < 0) {
        srv->url = NULL;
        ret = -1;
    }
out:
    free(initdb);
    free(data);
    free(log);
    free(pwfile);
    free(conf);
    return ret;
}

int idem_test_start_postgres(idem_test_server *srv)
{
    return idem_test_start_postgres_with(srv, NULL);
}

int idem_test_restart_postgres(idem_test_server *srv, int i)
{
    if (i != 0 || !srv->ports[0])
        return -1;
    idem_test_server_kill(srv, 0);
    /* The killed backends may take a moment to let go of the shared memory. */
    for (int t = 0; t < 100; t++) {
        if (spawn_postgres(srv) == 0)
            return 0;
        msleep(100);
    }
    fprintf(stderr, "cannot restart postgres on port %u; see %s/postgres.log\n", srv->ports[0], srv->dir);
    return -1;
}

/* Read state and parent of a process from /proc. false when it is gone. */
static bool proc_stat(const char *pid, char *state, long *ppid)
{
    char path[300], buf[512];
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *close = strrchr(buf, ')'); /* pid (comm) state ppid ...; comm may hold ')' */
    return close && sscanf(close + 1, " %c %ld", state, ppid) == 2;
}

/* The children of parent (the backends of a postmaster), at most max. */
static int children_of(pid_t parent, pid_t *out, int max)
{
    DIR *d = opendir("/proc");
    int n = 0;
    struct dirent *e;
    while (d && n < max && (e = readdir(d))) {
        char state;
        long ppid;
        if (e->d_name[0] >= '1' && e->d_name[0] <= '9' && proc_stat(e->d_name, &state, &ppid) &&
            ppid == (long)parent)
            out[n++] = (pid_t)atol(e->d_name);
    }
    if (d)
        closedir(d);
    return n;
}

static bool running(pid_t pid)
{
    char name[24], state;
    long ppid;
    snprintf(name, sizeof name, "%ld", (long)pid);
    return proc_stat(name, &state, &ppid) && state != 'Z' && state != 'X';
}

/* Backends run in sessions of their own (setsid), so the postmaster's
 * process group does not hold them: stop the postmaster (it forks no
 * more), kill its children, then it. */
void idem_test_kill_postgres(idem_test_server *srv, int i)
{
    pid_t pid = srv->pids[i];
    if (pid <= 0)
        return;
    pid_t kids[512];
    kill(pid, SIGSTOP);
    int n = children_of(pid, kids, 512);
    for (int k = 0; k < n; k++)
        kill(kids[k], SIGKILL);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0); /* when it is our child */
    /* A process that lived on a moment could still answer a query. */
    for (int waited = 0; waited < 5000; waited += 5) {
        bool any = running(pid);
        for (int k = 0; k < n && !any; k++)
            any = running(kids[k]);
        if (!any)
            break;
        msleep(5);
    }
    srv->pids[i] = 0;
}

void idem_test_postgres_signal(const idem_test_server *srv, int sig)
{
    pid_t pid = srv->pids[0], kids[512];
    if (pid <= 0)
        return;
    if (sig == SIGCONT)
        kill(pid, sig);
    int n = children_of(pid, kids, 512);
    for (int k = 0; k < n; k++)
        kill(kids[k], sig);
    if (sig != SIGCONT)
        kill(pid, sig);
}

void idem_test_stop_postgres(idem_test_server *srv)
{
    pid_t pid = srv->pids[0];
    if (pid <= 0)
        return;
    kill(pid, SIGINT); /* fast shutdown: sessions still open do not hold it up */
    for (int waited = 0; waited < 5000; waited += 10) {
        if (waitpid(pid, NULL, WNOHANG) == pid || (kill(pid, 0) != 0 && errno == ESRCH)) {
            srv->pids[0] = 0;
            return;
        }
        msleep(10);
    }
    idem_test_kill_postgres(srv, 0);
}

int idem_test_postgres_sql(const idem_test_server *srv, const char *sql)
{
    char *psql = tool(srv, "psql"), *log = path_in(srv, "psql.log");
    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)srv->ports[0]);
    int ret = -1;
    if (psql && log) {
        char *argv[] = {psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", srv->dir, "-p", port, "-U",
                        "postgres", "-d", "postgres", "-c", (char *)sql, NULL};
        ret = run_tool(argv, log);
        if (ret != 0)
            fprintf(stderr, "psql failed on: %s (see %s)\n", sql, log);
    }
    free(psql);
    free(log);
    return ret;
}
