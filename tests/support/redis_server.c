/* Test support: a redis-server on a free loopback port, without persistence. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define REDIS_START_TIMEOUT_MS 10000

/* Start server i of srv on srv->ports[i]. 0, or -1 with a message. */
static int spawn_redis(idem_test_server *srv, int i)
{
    char port[8], *log = NULL;
    snprintf(port, sizeof port, "%u", (unsigned)srv->ports[i]);
    if (asprintf(&log, "%s/redis-%d.log", srv->dir, i) < 0)
        return -1;
    char *argv[] = {srv->bin, "--port", port, "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", srv->dir, NULL};
    srv->pids[i] = idem_test_spawn(argv, log);
    if (srv->pids[i] < 0) {
        srv->pids[i] = 0;
        fprintf(stderr, "cannot fork to start %s\n", srv->bin);
        free(log);
        return -1;
    }
    if (!idem_test_wait_redis(srv->pids[i], srv->ports[i], REDIS_START_TIMEOUT_MS)) {
        fprintf(stderr, "%s did not listen on 127.0.0.1:%s within %d ms; see %s "
                "(is redis-server installed? apt-get install redis-server)\n",
                srv->bin, port, REDIS_START_TIMEOUT_MS, log);
        free(log);
        return -1;
    }
    free(log);
    return 0;
}

int idem_test_start_redis(idem_test_server *srv)
{
    const char *bin = getenv("IDEM_TEST_REDIS_SERVER");
    srv->bin = strdup(bin && *bin ? bin : "redis-server");
    /* A port picked free may be taken by a test running beside this one
     * before the server binds it: then try another. */
    for (int attempt = 1;; attempt++) {
        srv->ports[0] = idem_test_free_port();
        if (!srv->bin || !srv->ports[0]) {
            fprintf(stderr, "cannot pick a port for redis-server\n");
            return -1;
        }
        if (spawn_redis(srv, 0) == 0)
            break;
        idem_test_stop_pid(srv->pids[0], 3000);
        srv->pids[0] = 0;
        if (attempt == 3)
            return -1;
    }
    if (asprintf(&srv->url, "redis://127.0.0.1:%u", (unsigned)srv->ports[0]) < 0) {
        srv->url = NULL;
        return -1;
    }
    return 0;
}

int idem_test_restart_redis(idem_test_server *srv, int i)
{
    if (i != 0 || !srv->ports[0])
        return -1;
    idem_test_server_kill(srv, 0);
    return spawn_redis(srv, 0);
}
