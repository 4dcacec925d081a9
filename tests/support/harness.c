/* Test support: temporary stores and the server processes behind them. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

uint16_t idem_test_free_port(void)
{
    /* The kernel may hand out a port again as soon as it is closed: the
     * last ports given here are not given again, so that the ports of one
     * topology, picked before any of its servers binds one, all differ. */
    static uint16_t given[64];
    static unsigned ngiven;
    for (int tries = 0; tries < 16; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return 0;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        uint16_t port = 0;
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
            port = ntohs(a.sin_port);
        close(fd);
        bool seen = false;
        for (unsigned i = 0; i < sizeof given / sizeof given[0]; i++)
            seen |= port && given[i] == port;
        if (!seen) {
            given[ngiven++ % (sizeof given / sizeof given[0])] = port;
            return port;
        }
    }
    return 0;
}

pid_t idem_test_spawn(char *const argv[], const char *logfile)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    int fd = open(logfile ? logfile : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
    }
    setpgid(0, 0); /* out of the test's process group: a ^C reaches us, not it */
    execvp(argv[0], argv);
    fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

bool idem_test_wait_port(uint16_t port, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (ok)
            return true;
        usleep(10000);
    }
    return false;
}

void idem_test_stop_pid(pid_t pid, int timeout_ms)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

char *idem_test_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *path;
    if (asprintf(&path, "%s/idem-%s-XXXXXX", base && *base ? base : "/tmp", tag) < 0)
        return NULL;
    if (!mkdtemp(path)) {
        free(path);
        return NULL;
    }
    return path;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int idem_test_server_start(idem_test_server *srv, const char *kind)
{
    memset(srv, 0, sizeof *srv);
    srv->kind = strdup(kind);
    srv->dir = idem_test_tmpdir(kind);
    if (!srv->kind || !srv->dir) {
        fprintf(stderr, "cannot make a temporary directory for the %s tests\n", kind);
        return -1;
    }
    if (strcmp(kind, "sqlite") == 0) {
        if (asprintf(&srv->url, "sqlite://%s/idem.db", srv->dir) < 0)
            return -1;
        return 0;
    }
    if (strcmp(kind, "memory") == 0) {
        /* No server: a name of its own, shared by every open in this process. */
        static unsigned seq;
        if (asprintf(&srv->url, "memory://test-%ld-%u", (long)getpid(), seq++) < 0)
            return -1;
        return 0;
    }
#ifdef IDEM_TEST_HAVE_REDIS
    if (strcmp(kind, "redis") == 0)
        return idem_test_start_redis(srv);
    if (strcmp(kind, "redis-cluster") == 0)
        return idem_test_start_redis_cluster(srv);
    if (strcmp(kind, "redis-sentinel") == 0)
        return idem_test_start_redis_sentinel(srv);
#endif
#ifdef IDEM_TEST_HAVE_MEMCACHED
    if (strcmp(kind, "memcached") == 0)
        return idem_test_start_memcached(srv, 1);
    if (strcmp(kind, "memcached2") == 0)
        return idem_test_start_memcached(srv, 2);
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(kind, "postgresql") == 0)
        return idem_test_start_postgres(srv);
#endif
    fprintf(stderr, "no test store of kind '%s' in this build\n", kind);
    return -1;
}

/* Gone: no such process, or a zombie (its descriptors, and so its
 * listening socket, are closed). */
static bool pid_gone(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return kill(pid, 0) != 0 && errno == ESRCH;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *end = strrchr(buf, ')');   /* "pid (comm) S ..." */
    return end && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X');
}

void idem_test_server_kill(idem_test_server *srv, int i)
{
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (srv->kind && strcmp(srv->kind, "postgresql") == 0) {
        idem_test_kill_postgres(srv, i);
        return;
    }
#endif
    pid_t pid = srv->pids[i];
    if (pid > 0) {
        kill(pid, SIGKILL);
        /* A test process that is not the server's parent (a Criterion test
         * reads the PID from a file) cannot wait for it: poll until it is
         * gone, so a restart on its port does not race its listening socket. */
        if (waitpid(pid, NULL, 0) != pid)
            for (int waited = 0; waited < 5000 && !pid_gone(pid); waited += 5)
                usleep(5000);
        srv->pids[i] = 0;
    }
}

int idem_test_server_restart(idem_test_server *srv, int i)
{
#ifdef IDEM_TEST_HAVE_REDIS
    if (strcmp(srv->kind, "redis") == 0)
        return idem_test_restart_redis(srv, i);
#endif
#ifdef IDEM_TEST_HAVE_MEMCACHED
    if (strncmp(srv->kind, "memcached", 9) == 0)
        return idem_test_restart_memcached(srv, i);
#endif
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (strcmp(srv->kind, "postgresql") == 0)
        return idem_test_restart_postgres(srv, i);
#endif
    (void)srv, (void)i;
    return -1;
}

void idem_test_server_stop(idem_test_server *srv)
{
#ifdef IDEM_TEST_HAVE_POSTGRESQL
    if (srv->kind && strcmp(srv->kind, "postgresql") == 0)
        idem_test_stop_postgres(srv);
#endif
    for (int i = 0; i < 2; i++)
        idem_test_stop_pid(srv->pids[i], 3000);
    for (int i = 0; i < srv->nmore; i++)
        idem_test_stop_pid(srv->more_pids[i], 3000);
    if (srv->dir)
        nftw(srv->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(srv->kind);
    free(srv->url);
    free(srv->dir);
    free(srv->bin);
    memset(srv, 0, sizeof *srv);
}
