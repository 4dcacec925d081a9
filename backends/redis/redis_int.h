/*
 * The Redis driver's private header: its limits, its state (the store, the
 * servers it talks to and their connections), what one operation carries,
 * and the functions its files share. Not installed, and nothing in it is
 * exported: the library is built with hidden visibility, and every name the
 * files share begins with idem__redis_.
 *
 * redis.c  the scripts, the operations and the table (idem__redis_backend)
 * conn.c   connections, commands bounded by a deadline, nodes and pools
 * route.c  where an operation goes: cluster slots, sentinels, redirects
 * open.c   the URL, opening and closing a store
 * check.c  the settings check
 */
#ifndef IDEM_REDIS_INT_H
#define IDEM_REDIS_INT_H

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include <idempotency/backend.h>

#define DEFAULT_PORT               6379
#define DEFAULT_SENTINEL_PORT      26379
#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_TIMEOUT_MS         2000
#define MAX_TIMEOUT_MS             3600000
#define MAX_DB                     1000000
/* Redis refuses strings longer than proto-max-bulk-len, 512 MiB by default. */
#define MAX_RECORD_LEN             ((size_t)512 << 20)
/* The default for max_record_bytes: far above the layer's default response
 * limit (1 MiB), far below what would hurt to read by mistake. */
#define DEFAULT_MAX_RECORD_LEN     ((size_t)64 << 20)
/* A socket timeout within this of the time left is left alone. */
#define TIMEOUT_SLACK_MS           5
#define DEFAULT_WAIT_TIMEOUT_MS    100
/* Redirects (MOVED, ASK) and retries (TRYAGAIN, CLUSTERDOWN, a failed
 * server) one operation follows at most, all within its timeout_ms. */
#define MAX_HOPS                   8
/* The topology is asked again at most this often. */
#define LEARN_INTERVAL_MS          100
#define MAX_WAIT_REPLICAS          64

/* The scripts (redis.c), by what they do. */
enum script_id { SC_CLAIM, SC_COMMIT, SC_RELEASE, SC_EXTEND, SC_READ, SC_COUNT };

/* ---- the store ---- */

typedef struct store store;

/* A connection, pooled by its node (idem_pool). */
typedef struct conn {
    redisContext *ctx;
    unsigned      socket_ms;  /* the socket's timeout now (SO_RCVTIMEO, SO_SNDTIMEO) */
    bool          timed_out;  /* the last command ran out of time */
    bool          partial;    /* ... after part of its reply had come */
} conn;

/* One server the store talks to, with its pool. Nodes live until the store
 * is closed, so a pointer to one stays valid however the topology moves. */
typedef struct node {
    store       *s;
    char        *host;        /* NULL for a unix socket */
    int          port;
    char        *where;       /* "redis 127.0.0.1:6379", for messages */
    idem_pool   *pool;
    struct node *next;
} node;

enum topology {
    TOPO_SINGLE,    /* redis://, redis+unix:// */
    TOPO_CLUSTER,   /* redis+cluster://: keys spread over the masters by slot */
    TOPO_SENTINEL,  /* redis+sentinel://: the master the sentinels name */
};

#define CLUSTER_SLOTS 16384

struct store {
    enum topology   topo;
    char           *socket_path; /* redis+unix: the socket; NULL for TCP */
    char           *user;        /* ACL user name, or NULL */
    char           *password;    /* never printed */
    unsigned long   db;
    unsigned        connect_ms, command_ms;
    size_t          max_record;  /* the longest value read back as a record */
    unsigned        wait_replicas, wait_timeout_ms;
    atomic_ullong   commits_unacked; /* commits fewer than wait_replicas acknowledged */
    char            sha[SC_COUNT][41]; /* SHA1 hex of each script, fixed at open */
    pthread_mutex_t mu;          /* guards nodes */
    node           *nodes;       /* every node used so far */
    node *_Atomic   master;      /* single, sentinel: where every operation goes */
    /* cluster: the master of each slot (NULL: unknown), refreshed from
     * CLUSTER SLOTS at open, after MOVED and after a connection failure */
    node *_Atomic  *slots;
    /* sentinel */
    char           *master_name;
    char           *sentinel_password;
    idem_url_host  *sentinels;   /* in the order to ask them; one that answers moves first */
    size_t          nsentinels;
    /* cluster and sentinel: one thread at a time learns the topology */
    pthread_mutex_t learn_mu;
    uint64_t        learned_ms;  /* when it last did */
    atomic_bool     unsure;      /* a failure left no time to learn: do it first */
    atomic_bool     claim_script; /* a server refused SET NX GET (before 7.0) */
    atomic_ulong    moved, asked, retried, learned; /* counts, for the curious */
};

/* ---- one operation ---- */

/* What one operation sends, and what came of it. */
typedef struct op {
    store          *s;
    node           *n;          /* where it is being sent */
    int             id;         /* enum script_id: what it does; -1: removing a key */
    bool            plain;      /* argv is a plain command, not EVALSHA of script id */
    int             argc;
    const char    **argv;       /* EVALSHA sha 1 key args..., or the plain command */
    size_t         *lens;
    const char    **argv2;      /* a second plain command pipelined after it, or NULL */
    size_t         *lens2;
    int             argc2;
    size_t          cap;        /* > 0: a string reply to the first command longer than
                                 * this is not read (too_long), the connection is dropped */
    long long       too_long;   /* the length of that string */
    redisReply     *reply2;     /* the second command's answer */
    uint64_t        deadline;
    bool            wait;       /* follow a write with WAIT (wait_replicas) */
    bool            asking;     /* send ASKING first (cluster: ASK redirect) */
    bool            maybe_ran;  /* an earlier try may have run on the server */
    long long       acked;      /* replicas that acknowledged the write (WAIT), or -1 */
    redisReply     *reply;      /* the answer, never an error reply of the connection's */
} op;

/* ---- helpers every file uses ---- */

static inline bool reply_is(const redisReply *r, const char *prefix)
{
    return r->type == REDIS_REPLY_ERROR && r->str && strncmp(r->str, prefix, strlen(prefix)) == 0;
}

static inline struct timeval tv_ms(uint64_t ms)
{
    return (struct timeval){.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
}

/* ---- redis.c: the scripts; open.c, check.c: the table's other members ---- */

/* Each script's source, and what it does, for messages ("claiming a key"). */
extern const char *const idem__redis_script_src[SC_COUNT];
extern const char *const idem__redis_script_what[SC_COUNT];

int  idem__redis_open(void **state, const idem_url *url);
void idem__redis_close(void *state);
int  idem__redis_check(void *state, idem_findings *out);

/* ---- conn.c ---- */

/* The connection died (closed or reset) rather than timed out. */
bool idem__redis_peer_went_away(const redisContext *c);
/* IDEM_EBACKEND (IDEM_ENOMEM for no context) with a message on what failed. */
int idem__redis_context_error_at(const store *s, const char *where, const redisContext *c,
                                 bool timed_out, bool partial, const char *what);
int idem__redis_conn_error(const store *s, const char *where, const conn *c, const char *what);
/* An error reply from the server, with a hint for the known ones. */
int idem__redis_reply_error(const char *where, const redisReply *r, const char *what);
/* The password refused, said plainly. */
int idem__redis_auth_refused(const char *where, const redisReply *r, const char *what);
/* Write the commands appended to c and read the next reply, all by
 * deadline; NULL when the connection failed or the time ran out
 * (c->timed_out): the connection is then unusable. */
redisReply *idem__redis_conn_reply(conn *c, uint64_t deadline);
redisReply *idem__redis_conn_command(conn *c, uint64_t deadline, int argc, const char **argv,
                                     const size_t *lens);
/* The node for host:port (host NULL: the unix socket), made on first use. */
node *idem__redis_node_get(store *s, const char *host, int port);
void  idem__redis_node_free(node *n);
/* One use of a pooled connection for op arg (idem_pool_run()). */
int idem__redis_op_run(void *connp, void *arg, idem_conn_state *state);

/* ---- route.c ---- */

/* Learn the topology again (cluster: the slot map; sentinel: the master). */
int idem__redis_learn(store *s, bool force, uint64_t deadline);
/* Send o to where its key lives, following the topology; answer in o->reply. */
int idem__redis_op_exec(store *s, op *o, const void *key, size_t key_len);

#endif
