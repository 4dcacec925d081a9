/* Test support: a TCP proxy on a free loopback port that passes traffic to
 * one upstream port and, when told, spoils the replies: holds them, lets
 * them trickle in a byte at a time, or swallows one and cuts the
 * connection. For the faults a slow or dying store causes, without
 * touching the server.
 *
 * Requests (client to upstream) always pass at once. The way replies
 * (upstream to client) travel can be changed at any time from any thread;
 * it applies to every connection from the next chunk on. Connections are
 * served by one thread each; the proxy holds up to 64 at once and refuses
 * more (it closes them). */
#ifndef IDEM_TEST_PROXY_H
#define IDEM_TEST_PROXY_H

#include <stdint.h>

typedef struct idem_test_proxy idem_test_proxy;

typedef enum idem_test_proxy_mode {
    IDEM_PROXY_PASS = 0,    /* replies pass as they come */
    IDEM_PROXY_DELAY,       /* each reply chunk is held ms milliseconds, then passed whole */
    IDEM_PROXY_TRICKLE,     /* replies pass one byte every ms milliseconds */
    IDEM_PROXY_HOLD,        /* replies are held until the mode changes */
    IDEM_PROXY_DROP_REPLY,  /* the next request passes, its reply is swallowed and that
                               connection closed (the server acted, the client never
                               hears of it); then back to PASS */
} idem_test_proxy_mode;

/* Start a proxy to 127.0.0.1:upstream. NULL with a message on stderr. */
idem_test_proxy *idem_test_proxy_start(uint16_t upstream);
/* The port the proxy listens on. */
uint16_t idem_test_proxy_port(const idem_test_proxy *p);
/* Change how replies travel. Thread-safe. */
void idem_test_proxy_set(idem_test_proxy *p, idem_test_proxy_mode mode, unsigned ms);
/* True while a DROP_REPLY is armed and no request has come to trigger it. */
int idem_test_proxy_drop_pending(const idem_test_proxy *p);
/* Connections accepted so far. */
unsigned idem_test_proxy_accepted(const idem_test_proxy *p);
/* Close every connection, stop the threads, free the proxy. */
void idem_test_proxy_stop(idem_test_proxy *p);

#endif
