/* Test support: memcached servers on free loopback ports. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "memcached_server.h"

#define START_TIMEOUT_MS 5000
#define START_TRIES      5

/* Start one memcached on port (a free one when 0); its PID, or -1. */
static pid_t spawn_memcached(idem_test_server *srv, int i, uint16_t port, const char *const *extra)
{
    char port_s[16], log[4096];
    snprintf(port_s, sizeof port_s, "%u", port);
    snprintf(log, sizeof log, "%s/memcached-%d.log", srv->dir, i);
    const char *argv[32] = {srv->bin, "-p", port_s, "-l", "127.0.0.1", "-U", "0", "-m", "64"};
    int n = 9;
    if (geteuid() == 0) { /* memcached refuses to run as root unless told which user to be */
        argv[n++] = "-u";
        argv[n++] = "root";
    }
    for (; extra && *extra && n < 31; extra++)
        argv[n++] = *extra;
    argv[n] = NULL;
    pid_t pid = idem_test_spawn((char *const *)argv, log);
    if (pid < 0)
        return -1;
    if (!idem_test_wait_port(port, START_TIMEOUT_MS)) {
        idem_test_stop_pid(pid, 1000);
        return -1;
    }
    return pid;
}

/* Start server i on a free port, retrying when another process takes it first. */
static int start_one(idem_test_server *srv, int i, const char *const *extra)
{
    for (int t = 0; t < START_TRIES; t++) {
        uint16_t port = idem_test_free_port();
        if (!port)
            continue;
        pid_t pid = spawn_memcached(srv, i, port, extra);
        if (pid > 0) {
            srv->pids[i] = pid;
            srv->ports[i] = port;
            return 0;
        }
    }
    fprintf(stderr, "cannot start memcached (is it installed? apt-get install memcached); "
                    "see %s/memcached-%d.log\n", srv->dir, i);
    return -1;
}

int idem_test_start_memcached_with(idem_test_server *srv, int nservers, const char *const *extra)
{
    if (nservers < 1 || nservers > 2)
        return -1;
    free(srv->bin);
    if (!(srv->bin = strdup("memcached")))
        return -1;
    for (int i = 0; i < nservers; i++)
        if (start_one(srv, i, extra) != 0)
            return -1;
    free(srv->url);
    int n = nservers == 1
                ? asprintf(&srv->url, "memcached://127.0.0.1:%u", srv->ports[0])
                : asprintf(&srv->url, "memcached://127.0.0.1:%u,127.0.0.1:%u", srv->ports[0], srv->ports[1]);
    return n < 0 ? -1 : 0;
}

int idem_test_start_memcached(idem_test_server *srv, int nservers)
{
    return idem_test_start_memcached_with(srv, nservers, NULL);
}

int idem_test_restart_memcached(idem_test_server *srv, int i)
{
    if (i < 0 || i > 1 || !srv->ports[i])
        return -1;
    idem_test_server_kill(srv, i);
    /* The port was ours a moment ago; memcached binds with SO_REUSEADDR. */
    for (int t = 0; t < START_TRIES; t++) {
        pid_t pid = spawn_memcached(srv, i, srv->ports[i], NULL);
        if (pid > 0) {
            srv->pids[i] = pid;
            return 0;
        }
        usleep(100000);
    }
    fprintf(stderr, "cannot restart memcached on port %u; see %s/memcached-%d.log\n", srv->ports[i],
            srv->dir, i);
    return -1;
}
