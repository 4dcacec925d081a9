/* Test support: a TCP proxy on a loopback port that slows, trickles or
 * holds what a server sends back, to test how the library copes with a slow
 * store without touching the store itself.
 *
 * The proxy runs in a thread of the test process. Every connection made to
 * its port is relayed to the target port on 127.0.0.1. Requests (client to
 * server) always pass at once; replies (server to client) are shaped by the
 * current mode, which a test may change at any time (the mode in force
 * when bytes are due to go out is the one that applies):
 *
 *   IDEM_PROXY_PASS     replies pass at once
 *   IDEM_PROXY_DELAY    each reply chunk is held delay_ms after it arrived
 *   IDEM_PROXY_TRICKLE  replies are sent one byte every delay_ms
 *   IDEM_PROXY_HOLD     replies are held until the mode changes (a frozen
 *                       server, seen from the client), then sent
 *
 * Thread-safe: the setters may be called from any thread. */
#ifndef IDEM_TEST_PROXY_H
#define IDEM_TEST_PROXY_H

#include <stdint.h>

typedef enum idem_proxy_mode {
    IDEM_PROXY_PASS = 0,
    IDEM_PROXY_DELAY,
    IDEM_PROXY_TRICKLE,
    IDEM_PROXY_HOLD,
} idem_proxy_mode;

typedef struct idem_proxy idem_proxy;

/* Listen on a free loopback port and relay to 127.0.0.1:target_port.
 * 0 and *out, or -1 with a message on stderr. */
int idem_proxy_start(idem_proxy **out, uint16_t target_port);
/* The port clients should connect to. */
uint16_t idem_proxy_port(const idem_proxy *p);
/* Shape the replies from now on; delay_ms is for DELAY and TRICKLE. */
void idem_proxy_set(idem_proxy *p, idem_proxy_mode mode, uint32_t delay_ms);
/* Bytes of replies relayed to clients so far, over all connections. */
uint64_t idem_proxy_reply_bytes(const idem_proxy *p);
/* Close every connection and the listener, stop the thread, free. NULL is
 * a no-op. */
void idem_proxy_stop(idem_proxy *p);

#endif
