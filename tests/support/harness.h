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
    char    *kind;      /* "sqlite", "redis", "memcached", "memcached2", "memory" */
    char    *url;       /* the store URL to open */
    char    *dir;       /* a private temporary directory, removed on stop */
    pid_t    pids[2];   /* server processes, 0 when none */
    uint16_t ports[2];
    char    *bin;       /* the server binary, to restart it */
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

#endif
