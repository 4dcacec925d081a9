/* Test support: stores to test against, and the servers behind them.
 *
 * Servers are started on free loopback ports, from the binaries on PATH,
 * and stopped by PID. A server that cannot be started fails the test run:
 * nothing here skips. */
#ifndef IDEM_TEST_HARNESS_H
#define IDEM_TEST_HARNESS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct idem_test_server {
    char    *kind;      /* "sqlite", "redis", "memcached", "memcached2", "postgresql", "memory" */
    char    *url;       /* the store URL to open */
    char    *dir;       /* a private temporary directory, removed on stop */
    pid_t    pids[2];   /* server processes, 0 when none */
    uint16_t ports[2];
    char    *bin;       /* the server binary, to restart it */
    /* Topologies of many processes ("redis-cluster": 3 masters then 3
     * replicas; "redis-sentinel": master, replica, 3 sentinels), stopped
     * by PID with the rest. pids[] and ports[] stay 0 for them. */
    int      nmore;
    pid_t    more_pids[8];
    uint16_t more_ports[8];
    uint16_t more_bus_ports[8]; /* redis-cluster: each node's cluster bus */
} idem_test_server;

/* Start what the kind of store needs. 0, or -1 with a message on stderr. */
int  idem_test_server_start(idem_test_server *srv, const char *kind);
/* Stop the servers (by PID) and remove the directory. */
void idem_test_server_stop(idem_test_server *srv);

/* Kill server i with SIGKILL and reap it. */
void idem_test_server_kill(idem_test_server *srv, int i);
/* Start server i again on the same port. 0 or -1. */
int  idem_test_server_restart(idem_test_server *srv, int i);

/* ---- building blocks ---- */

/* A loopback TCP port nobody listens on right now. */
uint16_t idem_test_free_port(void);
/* fork+exec argv with stdout and stderr to logfile; the child's PID or -1. */
pid_t idem_test_spawn(char *const argv[], const char *logfile);
/* Wait until 127.0.0.1:port accepts connections. true, or false at timeout. */
bool idem_test_wait_port(uint16_t port, int timeout_ms);
/* SIGTERM, then SIGKILL after timeout_ms; reaps. */
void idem_test_stop_pid(pid_t pid, int timeout_ms);
/* A new directory under $TMPDIR; malloc'd path. */
char *idem_test_tmpdir(const char *tag);

/* Per-kind launchers, each in its own file. */
int idem_test_start_redis(idem_test_server *srv);
int idem_test_start_memcached(idem_test_server *srv, int nservers);
int idem_test_restart_redis(idem_test_server *srv, int i);
int idem_test_restart_memcached(idem_test_server *srv, int i);
int idem_test_start_redis_cluster(idem_test_server *srv);
int idem_test_start_redis_sentinel(idem_test_server *srv);
/* Topologies: SIGKILL every data server (the sentinels live on), and start
 * them again on the same ports and wait until the topology serves again
 * (empty: there is no persistence). 0 or -1. */
void idem_test_topology_kill(idem_test_server *srv);
int  idem_test_topology_restart(idem_test_server *srv);
/* SIGKILL process i of a topology (sentinels included) and reap it. */
void idem_test_server_kill_more(idem_test_server *srv, int i);
/* Start every process of the topology that is not running (sentinels
 * included) on its port, and wait until it serves. 0 or -1. */
int  idem_test_topology_start_again(idem_test_server *srv);
/* Send an inline command to the Redis (or sentinel) at 127.0.0.1:port and
 * put its reply, raw, in buf (NUL-terminated). Bytes read, or -1. */
int idem_test_redis_query(uint16_t port, const char *command, char *buf, size_t len);
/* Ask 127.0.0.1:port command every 50 ms until its reply contains want,
 * up to timeout_ms. true when it did. */
bool idem_test_redis_wait_for(uint16_t port, const char *command, const char *want, int timeout_ms);
/* Wait until the Redis (or sentinel) at 127.0.0.1:port is process pid,
 * which this process started: false at timeout, or at once when pid has
 * exited (another process took its port). */
bool idem_test_wait_redis(pid_t pid, uint16_t port, int timeout_ms);
int idem_test_start_postgres(idem_test_server *srv);
int idem_test_restart_postgres(idem_test_server *srv, int i);
/* SIGKILL the postmaster and its backends (its process group). */
void idem_test_kill_postgres(idem_test_server *srv, int i);
/* A fast shutdown (SIGINT), then SIGKILL. */
void idem_test_stop_postgres(idem_test_server *srv);

#endif
