/* Test support: a Redis Cluster of 3 masters and 3 replicas on free
 * loopback ports (redis-server --cluster-enabled yes, then redis-cli
 * --cluster create), without persistence; and a small inline-command
 * client for waiting on servers. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define CLUSTER_NODES      6
#define CLUSTER_START_MS   20000
/* Short, so that a failover in a test takes a second or two, and long
 * enough that a busy CI machine does not fail nodes over by itself. */
#define CLUSTER_NODE_TIMEOUT "2000"

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

int idem_test_redis_query(uint16_t port, const char *command, char *buf, size_t len)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || len < 2)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    char line[512];
    int n = snprintf(line, sizeof line, "%s\r\n", command);
    if (write(fd, line, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    long until = now_ms() + 3000;
    while (got + 1 < len && now_ms() < until) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        /* A line reply or a bulk string is whole when its length says so;
         * anything else when the server pauses. */
        if (poll(&p, 1, got ? 100 : 3000) <= 0)
            break;
        ssize_t r = read(fd, buf + got, len - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
        buf[got] = '\0';
        char *crlf = strstr(buf, "\r\n");
        if (crlf && strchr("+-:", buf[0]))
            break;
        if (crlf && buf[0] == '$' && got >= (size_t)(crlf - buf) + 2 + (size_t)atol(buf + 1) + 2)
            break;
    }
    buf[got] = '\0';
    close(fd);
    return (int)got;
}

bool idem_test_redis_wait_for(uint16_t port, const char *command, const char *want, int timeout_ms)
{
    static char buf[65536];
    for (long t0 = now_ms(); now_ms() - t0 <= timeout_ms; usleep(50000))
        if (idem_test_redis_query(port, command, buf, sizeof buf) > 0 && strstr(buf, want))
            return true;
    return false;
}

bool idem_test_wait_redis(pid_t pid, uint16_t port, int timeout_ms)
{
    char want[40], buf[8192];
    snprintf(want, sizeof want, "process_id:%ld\r\n", (long)pid);
    for (long t0 = now_ms(); now_ms() - t0 <= timeout_ms; usleep(10000)) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return false;   /* it exited: most likely its port was taken */
        if (idem_test_redis_query(port, "INFO server", buf, sizeof buf) > 0 && strstr(buf, want))
            return true;
    }
    return false;
}

static int spawn_node(idem_test_server *srv, int i, const char *bin)
{
    char port[8], bus[8], conf[600], *log = NULL;
    if (!srv->more_bus_ports[i])
        srv->more_bus_ports[i] = idem_test_free_port();
    uint16_t bus_port = srv->more_bus_ports[i];
    snprintf(port, sizeof port, "%u", (unsigned)srv->more_ports[i]);
    snprintf(bus, sizeof bus, "%u", (unsigned)bus_port);
    snprintf(conf, sizeof conf, "%s/nodes-%s.conf", srv->dir, port);
    if (!bus_port || asprintf(&log, "%s/redis-%s.log", srv->dir, port) < 0)
        return -1;
    char *argv[] = {(char *)bin, "--port", port, "--cluster-port", bus, "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", conf,
                    "--cluster-node-timeout", CLUSTER_NODE_TIMEOUT, "--save", "", "--appendonly", "no",
                    "--dir", srv->dir, NULL};
    srv->more_pids[i] = idem_test_spawn(argv, log);
    free(log);
    return srv->more_pids[i] > 0 ? 0 : -1;
}

/* Print the last lines of a log file to stderr, for a CI log. */
static void print_tail(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char buf[2048];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0, SEEK_SET);
    buf[fread(buf, 1, sizeof buf - 1, f)] = '\0';
    fclose(f);
    fprintf(stderr, "--- %s (end) ---\n%s\n---\n", path, buf);
}

/* One try at the whole cluster on fresh ports. 0, or -1 with a message. */
static int try_cluster(idem_test_server *srv, const char *bin)
{
    for (int i = 0; i < CLUSTER_NODES; i++) {
        srv->more_ports[i] = idem_test_free_port();
        srv->more_bus_ports[i] = 0;
        if (!srv->more_ports[i] || spawn_node(srv, i, bin)) {
            fprintf(stderr, "cannot start cluster node %d (%s)\n", i, bin);
            return -1;
        }
    }
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!idem_test_wait_redis(srv->more_pids[i], srv->more_ports[i], 10000)) {
            fprintf(stderr, "cluster node %d (pid %ld) did not serve on port %u; see %s/redis-%u.log "
                    "(is redis-server installed? apt-get install redis-server)\n",
                    i, (long)srv->more_pids[i], srv->more_ports[i], srv->dir, srv->more_ports[i]);
            return -1;
        }
    /* redis-cli --cluster create: the first three become masters, each of
     * the last three a replica of one. */
    char addr[CLUSTER_NODES][32];
    char *argv[16] = {"redis-cli", "--cluster", "create"};
    int argc = 3;
    for (int i = 0; i < CLUSTER_NODES; i++) {
        snprintf(addr[i], sizeof addr[i], "127.0.0.1:%u", srv->more_ports[i]);
        argv[argc++] = addr[i];
    }
    argv[argc++] = "--cluster-replicas";
    argv[argc++] = "1";
    argv[argc++] = "--cluster-yes";
    argv[argc] = NULL;
    char *log;
    if (asprintf(&log, "%s/cluster-create.log", srv->dir) < 0)
        return -1;
    pid_t cli = idem_test_spawn(argv, log);
    int st = 0;
    if (cli < 0 || waitpid(cli, &st, 0) != cli || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "redis-cli --cluster create failed\n");
        print_tail(log);
        free(log);
        return -1;
    }
    free(log);
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!idem_test_redis_wait_for(srv->more_ports[i], "CLUSTER INFO", "cluster_state:ok",
                                      CLUSTER_START_MS)) {
            fprintf(stderr, "cluster node %u never reached cluster_state:ok\n", srv->more_ports[i]);
            return -1;
        }
    /* Every replica has synced with its master. */
    for (int i = 3; i < CLUSTER_NODES; i++)
        if (!idem_test_redis_wait_for(srv->more_ports[i], "INFO replication", "master_link_status:up",
                                      CLUSTER_START_MS)) {
            fprintf(stderr, "cluster replica %u never synced\n", srv->more_ports[i]);
            return -1;
        }
    return 0;
}

int idem_test_start_redis_cluster(idem_test_server *srv)
{
    const char *bin = getenv("IDEM_TEST_REDIS_SERVER");
    bin = bin && *bin ? bin : "redis-server";
    srv->bin = strdup(bin);
    srv->nmore = CLUSTER_NODES;
    /* A port picked free may be taken by a test running beside this one
     * before a node binds it: then the node exits, or another process
     * answers on it. Each try checks that every node is the process it
     * started, and a failed try starts over on other ports. */
    for (int attempt = 1;; attempt++) {
        if (srv->bin && try_cluster(srv, bin) == 0)
            break;
        for (int i = 0; i < CLUSTER_NODES; i++) {
            idem_test_stop_pid(srv->more_pids[i], 3000);
            srv->more_pids[i] = 0;
            char conf[600];
            snprintf(conf, sizeof conf, "%s/nodes-%u.conf", srv->dir, srv->more_ports[i]);
            unlink(conf);
        }
        if (!srv->bin || attempt == 3)
            return -1;
        fprintf(stderr, "starting the cluster again on other ports (try %d of 3)\n", attempt + 1);
    }
    if (asprintf(&srv->url, "redis+cluster://127.0.0.1:%u,127.0.0.1:%u,127.0.0.1:%u",
                 srv->more_ports[0], srv->more_ports[1], srv->more_ports[2]) < 0) {
        srv->url = NULL;
        return -1;
    }
    return 0;
}

static int wait_cluster_ok(idem_test_server *srv)
{
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!idem_test_redis_wait_for(srv->more_ports[i], "CLUSTER INFO", "cluster_state:ok",
                                      CLUSTER_START_MS)) {
            fprintf(stderr, "cluster node %u never reached cluster_state:ok\n", srv->more_ports[i]);
            return -1;
        }
    return 0;
}

int idem_test_cluster_restart(idem_test_server *srv);
int idem_test_cluster_restart(idem_test_server *srv)
{
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!srv->more_pids[i] && spawn_node(srv, i, srv->bin))
            return -1;
    for (int i = 0; i < CLUSTER_NODES; i++)
        if (!idem_test_wait_redis(srv->more_pids[i], srv->more_ports[i], 10000))
            return -1;
    return wait_cluster_ok(srv);
}
