/* Test support for the memcached driver's own tests. */
#ifndef IDEM_TEST_MEMCACHED_SERVER_H
#define IDEM_TEST_MEMCACHED_SERVER_H

#include "harness.h"

/* As idem_test_start_memcached(), with extra memcached arguments (a
 * NULL-terminated list, e.g. {"-I", "64k", NULL}) for every server. A
 * restart starts the server again without them. srv->dir must exist (made
 * by idem_test_server_start, or idem_test_tmpdir). 0 or -1. */
int idem_test_start_memcached_with(idem_test_server *srv, int nservers, const char *const *extra);

#endif
