/*
 * The conformance suite as a kit: what a program links beside
 * tests/conformance.c to run the suite on a driver the library does not
 * build in.
 */
#ifndef IDEM_TEST_CONFORMANCE_H
#define IDEM_TEST_CONFORMANCE_H

#include <idempotency/backend.h>

/*
 * The table of the driver under test when the suite runs with --outside
 * (or IDEM_TEST_OUTSIDE=1): every store of the suite is then opened with
 * idem_store_open_backend() on it, and the table's rules are tested on it
 * directly. builtin is the built-in driver the store URL's scheme names
 * (NULL when there is none), for a driver that wraps one; a driver of one's
 * own ignores it. tests/outside_driver.c defines it; link a file of your
 * own in its place to run the suite on your driver.
 */
const idem_backend *conformance_outside_driver(const idem_backend *builtin);

#endif
