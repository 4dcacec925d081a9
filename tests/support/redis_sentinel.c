/* Test support: a Redis master, one replica and three sentinels watching
 * them, on free loopback ports, without persistence. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

#define SENTINEL_START_MS 20000
#define MASTER_NAME       "idem"

static int spawn(idem_test_server *srv, int i, char **argv)
{
    char *log;
    if (asprintf(&log, "%s/node-%d.log", srv->dir, i) < 0)
        return -1;
    srv->more_pids[i] = idem_test_spawn(argv, log);
    free(log);
    if (srv->more_pids[i] <= 0 || !idem_test_wait_redis(srv->more_pids[i], srv->more_ports[i], 10000)) {
        fprintf(stderr, "sentinel set: process %d did not listen on %u; see %s/node-%d.log\n", i,
                srv->more_ports[i], srv->dir, i);
        return -1;
    }
    return 0;
}

/* Start data server i (0 or 1): the master when i is m, else its replica. */
static int spawn_data(idem_test_server *srv, int i, int m)
{
    char port[8], master[8];
    snprintf(port, sizeof port, "%u", (unsigned)srv->more_ports[i]);
    snprintf(master, sizeof master, "%u", (unsigned)srv->more_ports[m]);
    char *argv[] = {srv->bin, "--port", port, "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", srv->dir, i != m ? "--replicaof" : NULL, "127.0.0.1",
                    master, NULL};
    return spawn(srv, i, argv);
}

/* The data server the sentinels name as master now (0 or 1; 0 when none
 * answers): a failover may have moved it to the replica. */
static int named_master(const idem_test_server *srv)
{
    static char buf[8192];
    for (int i = 2; i < 5; i++) {
        const char *a;
        unsigned port;
        if (idem_test_redis_query(srv->more_ports[i], "INFO sentinel", buf, sizeof buf) > 0 &&
            (a = strstr(buf, "address=")) && sscanf(a, "address=%*[^:]:%u", &port) == 1)
            return port == srv->more_ports[1];
    }
    return 0;
}

/* Settled: every sentinel names the same master, sees its replica and
 * the other sentinels, and that master says it is one, with its replica
 * connected. A failover the restart set off (the replica came back first
 * and was promoted) has then ended. */
static bool settled(const idem_test_server *srv)
{
    static char buf[8192];
    char first[32] = "";
    for (int i = 2; i < 5; i++) {
        if (idem_test_redis_query(srv->more_ports[i], "INFO sentinel", buf, sizeof buf) <= 0 ||
            !strstr(buf, "status=ok") || !strstr(buf, "slaves=1,sentinels=3"))
            return false;
        const char *a = strstr(buf, "address=");
        char addr[32];
        if (!a || sscanf(a, "address=%31[^,]", addr) != 1 || (*first && strcmp(first, addr) != 0))
            return false;
        snprintf(first, sizeof first, "%s", addr);
    }
    const char *colon = strrchr(first, ':');
    if (!colon)
        return false;
    uint16_t port = (uint16_t)atoi(colon + 1);
    return idem_test_redis_query(port, "INFO replication", buf, sizeof buf) > 0 &&
           strstr(buf, "role:master") && strstr(buf, "connected_slaves:1");
}

int idem_test_sentinel_restart(idem_test_server *srv);
int idem_test_sentinel_restart(idem_test_server *srv)
{
    /* The data servers come back in the roles the sentinels give them.
     * Started as they first were after a failover had promoted the replica,
     * the server the sentinels name would say role:slave, and they would set
     * that right only at their next failover, up to 2 x failover-timeout on. */
    int m = named_master(srv);
    for (int i = 0; i < 2; i++)
        if (!srv->more_pids[i] && spawn_data(srv, i, m))
            return -1;
    for (int waited = 0; !settled(srv); waited += 100) {
        if (waited >= SENTINEL_START_MS) {
            fprintf(stderr, "sentinel set: no settled master %d ms after a restart\n", SENTINEL_START_MS);
            return -1;
        }
        usleep(100000);
    }
    return 0;
}

/* One try at the whole set on fresh ports. 0, or -1 with a message. */
static int try_sentinel(idem_test_server *srv, const char *bin)
{
    for (int i = 0; i < 5; i++)
        if (!(srv->more_ports[i] = idem_test_free_port()))
            return -1;
    char port[5][8];
    for (int i = 0; i < 5; i++)
        snprintf(port[i], sizeof port[i], "%u", (unsigned)srv->more_ports[i]);
    if (!srv->bin || spawn_data(srv, 0, 0) || spawn_data(srv, 1, 0))
        return -1;
    for (int i = 2; i < 5; i++) {
        char *conf;
        if (asprintf(&conf, "%s/sentinel-%d.conf", srv->dir, i) < 0)
            return -1;
        FILE *f = fopen(conf, "w");
        if (!f)
            return -1;
        /* down after 1 s: a SIGKILLed master is replaced in about 2 s */
        fprintf(f, "port %s\nbind 127.0.0.1\ndir %s\n"
                "sentinel monitor " MASTER_NAME " 127.0.0.1 %s 2\n"
                "sentinel down-after-milliseconds " MASTER_NAME " 1000\n"
                "sentinel failover-timeout " MASTER_NAME " 10000\n"
                "sentinel parallel-syncs " MASTER_NAME " 1\n",
                port[i], srv->dir, port[0]);
        fclose(f);
        char *argv[] = {(char *)bin, conf, "--sentinel", NULL};
        int rc = spawn(srv, i, argv);
        free(conf);
        if (rc)
            return -1;
    }
    if (!idem_test_redis_wait_for(srv->more_ports[1], "INFO replication", "master_link_status:up",
                                  SENTINEL_START_MS)) {
        fprintf(stderr, "sentinel set: the replica never synced\n");
        return -1;
    }
    for (int i = 2; i < 5; i++)
        if (!idem_test_redis_wait_for(srv->more_ports[i], "INFO sentinel", "slaves=1,sentinels=3",
                                      SENTINEL_START_MS)) {
            fprintf(stderr, "sentinel on %u never saw the replica and the other sentinels\n",
                    srv->more_ports[i]);
            return -1;
        }
    return 0;
}

int idem_test_start_redis_sentinel(idem_test_server *srv)
{
    const char *bin = getenv("IDEM_TEST_REDIS_SERVER");
    bin = bin && *bin ? bin : "redis-server";
    srv->bin = strdup(bin);
    srv->nmore = 5;
    /* A port picked free may be taken by a test running beside this one
     * before a process binds it: a failed try starts over on other ports. */
    for (int attempt = 1;; attempt++) {
        if (srv->bin && try_sentinel(srv, bin) == 0)
            break;
        for (int i = 0; i < 5; i++) {
            idem_test_stop_pid(srv->more_pids[i], 3000);
            srv->more_pids[i] = 0;
        }
        if (!srv->bin || attempt == 3)
            return -1;
        fprintf(stderr, "starting the sentinel set again on other ports (try %d of 3)\n", attempt + 1);
    }
    if (asprintf(&srv->url, "redis+sentinel://127.0.0.1:%u,127.0.0.1:%u,127.0.0.1:%u/" MASTER_NAME,
                 srv->more_ports[2], srv->more_ports[3], srv->more_ports[4]) < 0) {
        srv->url = NULL;
        return -1;
    }
    return 0;
}

void idem_test_topology_kill(idem_test_server *srv)
{
    int data = srv->kind && strcmp(srv->kind, "redis-sentinel") == 0 ? 2 : srv->nmore;
    for (int i = 0; i < data; i++)
        if (srv->more_pids[i] > 0) {
            kill(srv->more_pids[i], SIGKILL);
            waitpid(srv->more_pids[i], NULL, 0);
            srv->more_pids[i] = 0;
        }
}

int idem_test_cluster_restart(idem_test_server *srv);

int idem_test_topology_restart(idem_test_server *srv)
{
    if (srv->kind && strcmp(srv->kind, "redis-sentinel") == 0)
        return idem_test_sentinel_restart(srv);
    return idem_test_cluster_restart(srv);
}

void idem_test_server_kill_more(idem_test_server *srv, int i)
{
    if (srv->more_pids[i] > 0) {
        kill(srv->more_pids[i], SIGKILL);
        waitpid(srv->more_pids[i], NULL, 0);
        srv->more_pids[i] = 0;
    }
}

int idem_test_topology_start_again(idem_test_server *srv)
{
    if (!srv->kind || strcmp(srv->kind, "redis-sentinel") != 0)
        return idem_test_cluster_restart(srv);
    for (int i = 2; i < 5; i++) {
        if (srv->more_pids[i])
            continue;
        char *conf;
        if (asprintf(&conf, "%s/sentinel-%d.conf", srv->dir, i) < 0)
            return -1;
        char *argv[] = {srv->bin, conf, "--sentinel", NULL};
        int rc = spawn(srv, i, argv);
        free(conf);
        if (rc)
            return -1;
    }
    return idem_test_sentinel_restart(srv);
}
