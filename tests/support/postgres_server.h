/* Test support: a throwaway PostgreSQL server (see postgres_server.c). */
#ifndef IDEM_TEST_POSTGRES_SERVER_H
#define IDEM_TEST_POSTGRES_SERVER_H

#include "harness.h"

typedef struct idem_test_pg_options {
    /* NULL: trust for every client. Else the superuser "postgres" has this
     * password, and TCP clients must give it (scram-sha-256); the URL
     * carries it. */
    const char *password;
    /* Lines appended to postgresql.conf, e.g. "default_transaction_read_only = on\n". */
    const char *conf;
    /* The URL names the unix socket in the server's directory instead of
     * 127.0.0.1: postgresql://postgres@/postgres?host=DIR&port=N. */
    bool unix_socket;
} idem_test_pg_options;

/* Start a server as idem_test_start_postgres() does, with options. */
int idem_test_start_postgres_with(idem_test_server *srv, const idem_test_pg_options *opts);

/* Send sig to the postmaster and every backend (SIGSTOP: a frozen server). */
void idem_test_postgres_signal(const idem_test_server *srv, int sig);

/* Run SQL on the server through psql as the superuser (over the unix
 * socket). 0, or -1 with psql's output on stderr. */
int idem_test_postgres_sql(const idem_test_server *srv, const char *sql);

#endif
