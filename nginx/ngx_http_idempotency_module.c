/*
 * ngx_http_idempotency_module: the upstream behind a location sees each
 * idempotency key once; retries are answered by nginx from the stored
 * response (see README.md in this folder for the directives and answers).
 *
 * The path of a covered request:
 *   1. precontent phase: parse Idempotency-Key, read the whole body;
 *   2. a thread of nginx's "default" pool computes the fingerprint and claims
 *      the key (idem_begin_scoped); the request waits, blocked, while the
 *      event loop serves everyone else;
 *   3. a claim won goes on to the content handler (proxy_pass, ...), its
 *      lease renewed every third of it while the request runs; any other
 *      outcome (replay, 409, 422, 503) is answered here;
 *   4. the header and body filters copy the response as it streams to the
 *      client; after its last byte a thread commits it. A response that is
 *      not whole frees the key or holds it until its lease ends: see
 *      ngx_http_idem_header_filter() and ngx_http_idem_unfinished_fate().
 *
 * Every store call runs in a thread: a store that hangs costs the requests
 * that wait for it and the threads they hold, never the event loop.
 */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <pthread.h>

#include <idempotency/http.h>
#include <idempotency/idempotency.h>

#if !(NGX_THREADS)
#error "ngx_http_idempotency_module needs an nginx built --with-threads"
#endif

#define NGX_HTTP_IDEM_DEFAULT_STORE                                          \
    "sqlite:///var/lib/nginx/idempotency/idempotency.db"

/* A task that could not be queued (the pool's queue is full) is tried again
 * after this long. */
#define NGX_HTTP_IDEM_REPOST_MS  1000

/* A claim held until its lease ends is given up this long after, so that it
 * is surely over in the store too. */
#define NGX_HTTP_IDEM_HOLD_SLACK_MS  1000


typedef struct {
    ngx_str_t           url;           /* NUL-terminated */
    pthread_mutex_t     mutex;         /* guards store and the layers on it */
    idem_store         *store;         /* per worker, opened on first use */
} ngx_http_idem_store_t;


typedef struct {
    ngx_flag_t                  enable;
    ngx_flag_t                  required;
    ngx_uint_t                  methods;
    ngx_msec_t                  lease;
    time_t                      ttl;
    ngx_str_t                   prefix;       /* NUL-terminated; "": default */
    ngx_str_t                   url;          /* as given; empty: inherited */
    ngx_http_complex_value_t   *scope;
    ngx_http_idem_store_t      *store;
    size_t                      max_body;     /* layer's max_response_len */
    size_t                      max_key;      /* the layer's max_key_len */
    idem_layer                 *layer;        /* per worker, on first use */
} ngx_http_idem_loc_conf_t;


typedef struct {
    ngx_array_t                 stores;       /* ngx_http_idem_store_t * */
    ngx_array_t                 confs;        /* enabled loc confs */
    ngx_array_t                 created;      /* SQLite paths nginx made */
    ngx_thread_pool_t          *pool;
} ngx_http_idem_main_conf_t;


typedef enum {
    NGX_HTTP_IDEM_READING = 0,   /* reading the request body */
    NGX_HTTP_IDEM_CLAIMING,      /* a thread claims the key */
    NGX_HTTP_IDEM_CLAIMED,       /* the key is ours: on to the upstream */
    NGX_HTTP_IDEM_RESPONDING,    /* the upstream's response streams out */
    NGX_HTTP_IDEM_ANSWER,        /* nginx answers itself (replay, 409, ...) */
    NGX_HTTP_IDEM_DONE
} ngx_http_idem_state_e;


/* What happens to a claim once its request is over. */
typedef enum {
    NGX_HTTP_IDEM_COMMIT,        /* store the response */
    NGX_HTTP_IDEM_ABORT,         /* free the key: a retry runs */
    NGX_HTTP_IDEM_HOLD           /* keep the key until its lease ends */
} ngx_http_idem_fate_e;


/* A growing copy of the response body, capped at max_body. */
typedef struct {
    u_char                     *data;
    size_t                      len;
    size_t                      size;
    unsigned                    over:1;       /* over max_body, or in a file */
} ngx_http_idem_body_t;


/* A claim won, from the claim until the store has been told what became of
 * it: it renews the lease while the request runs, then commits, aborts or
 * holds the key. Allocated apart from the request, which may be freed before
 * the store answers; one task of it at a time is in a thread, as a claim
 * may be used by one thread at a time. */
typedef struct {
    ngx_thread_task_t          *task;
    ngx_thread_pool_t          *pool;
    idem_claim                 *claim;
    ngx_msec_t                  lease;
    ngx_msec_t                  lease_end;    /* as far as this worker knows */
    ngx_msec_t                  renew_sent;
    ngx_event_t                 renew;        /* every third of the lease */
    ngx_event_t                 timer;        /* HOLD, or posting again */
    ngx_http_idem_fate_e        fate;
    int                         status;
    idem_header                *headers;
    size_t                      nheaders;
    ngx_http_idem_body_t        body;
    int                         rc;
    char                        error[256];
    unsigned                    busy:1;       /* a task is in a thread */
    unsigned                    ended:1;      /* the request is over */
} ngx_http_idem_holder_t;


/* A request's state; the data of a cleanup of its pool, so that it survives
 * internal redirects and is released with the request. */
typedef struct {
    ngx_http_request_t         *request;
    ngx_http_idem_loc_conf_t   *conf;
    ngx_http_idem_state_e       state;
    ngx_str_t                   scope;
    char                       *key;
    size_t                      key_len;
    ngx_http_idem_holder_t     *holder;       /* the claim, once won */
    idem_reply                  reply;
    idem_http_answer            answer;
    int                         status;
    idem_header                *headers;      /* one ngx_alloc() block */
    size_t                      nheaders;
    ngx_http_idem_body_t        body;
} ngx_http_idem_ctx_t;


/* The claim, run in a thread while the request waits. */
typedef struct {
    ngx_http_idem_ctx_t        *ctx;
    char                       *method;
    char                       *path;
    ngx_chain_t                *in;           /* the request body */
    int                         rc;
    idem_claim                 *claim;
    idem_reply                  reply;
    char                        error[256];
} ngx_http_idem_claim_job_t;


static ngx_int_t ngx_http_idem_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_idem_init_module(ngx_cycle_t *cycle);
static void ngx_http_idem_exit_process(ngx_cycle_t *cycle);
static void *ngx_http_idem_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_idem_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_idem_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_idem_store(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static void ngx_http_idem_cleanup(void *data);
static ngx_http_idem_ctx_t *ngx_http_idem_get_ctx(ngx_http_request_t *r);
static ngx_http_idem_holder_t *ngx_http_idem_holder_new(ngx_http_request_t *r,
    ngx_http_idem_ctx_t *ctx, idem_claim *claim);
static void ngx_http_idem_end_post(ngx_http_idem_holder_t *h);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;

/* Claims this worker holds: layers may only be freed when none is left. */
static ngx_atomic_t  ngx_http_idem_claims_held;


static ngx_conf_bitmask_t  ngx_http_idem_methods_mask[] = {
    { ngx_string("GET"), NGX_HTTP_GET },
    { ngx_string("HEAD"), NGX_HTTP_HEAD },
    { ngx_string("POST"), NGX_HTTP_POST },
    { ngx_string("PUT"), NGX_HTTP_PUT },
    { ngx_string("DELETE"), NGX_HTTP_DELETE },
    { ngx_string("PATCH"), NGX_HTTP_PATCH },
    { ngx_string("OPTIONS"), NGX_HTTP_OPTIONS },
    { ngx_null_string, 0 }
};


static ngx_command_t  ngx_http_idem_commands[] = {

    { ngx_string("idempotency"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, enable),
      NULL },

    { ngx_string("idempotency_store"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_idem_store,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("idempotency_methods"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_conf_set_bitmask_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, methods),
      &ngx_http_idem_methods_mask },

    { ngx_string("idempotency_required"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, required),
      NULL },

    { ngx_string("idempotency_lease"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, lease),
      NULL },

    { ngx_string("idempotency_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, ttl),
      NULL },

    { ngx_string("idempotency_key_prefix"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, prefix),
      NULL },

    { ngx_string("idempotency_scope"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_idem_loc_conf_t, scope),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_idem_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_idem_init,                    /* postconfiguration */

    ngx_http_idem_create_main_conf,        /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_idem_create_loc_conf,         /* create location configuration */
    ngx_http_idem_merge_loc_conf           /* merge location configuration */
};


ngx_module_t  ngx_http_idempotency_module = {
    NGX_MODULE_V1,
    &ngx_http_idem_module_ctx,             /* module context */
    ngx_http_idem_commands,                /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_http_idem_init_module,             /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_idem_exit_process,            /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* ------------------------------------------------------------------------ */
/* Stores and layers, made in the threads that first need them              */
/* ------------------------------------------------------------------------ */

static void
ngx_http_idem_options(idem_options *opts, ngx_http_idem_loc_conf_t *conf)
{
    idem_options_init(opts);
    opts->lease_ms = (uint32_t) ngx_min(conf->lease, (ngx_msec_t) UINT32_MAX);
    opts->ttl_s = (uint32_t) ngx_min(conf->ttl, (time_t) UINT32_MAX);

    if (conf->prefix.len) {
        opts->key_prefix = (const char *) conf->prefix.data;
    }
}


/* The location's layer, opening the store first if this worker has not
 * yet (or could not last time: a store that was down is tried again). Runs
 * in a thread: it may wait for the store as long as the store's timeouts
 * allow. */
static int
ngx_http_idem_layer(ngx_http_idem_loc_conf_t *conf, idem_layer **out)
{
    int                     rc;
    idem_options            opts;
    ngx_http_idem_store_t  *st;

    st = conf->store;
    rc = IDEM_OK;

    pthread_mutex_lock(&st->mutex);

    if (st->store == NULL) {
        rc = idem_store_open(&st->store, (const char *) st->url.data);
    }

    if (rc == IDEM_OK && conf->layer == NULL) {
        ngx_http_idem_options(&opts, conf);
        rc = idem_layer_new(&conf->layer, st->store, &opts);
    }

    *out = conf->layer;

    pthread_mutex_unlock(&st->mutex);

    return rc;
}


/* A NUL-terminated copy, for the library's C strings. */
static char *
ngx_http_idem_cstr(ngx_pool_t *pool, ngx_str_t *s)
{
    u_char  *p;

    p = ngx_pnalloc(pool, s->len + 1);
    if (p == NULL) {
        return NULL;
    }

    *ngx_cpymem(p, s->data, s->len) = '\0';

    return (char *) p;
}


static void
ngx_http_idem_keep_error(char *buf, size_t size)
{
    ngx_cpystrn((u_char *) buf, (u_char *) idem_last_error(), size);
}


/* ------------------------------------------------------------------------ */
/* The claim                                                                */
/* ------------------------------------------------------------------------ */

/* The request body in one block, read in a thread: a body larger than
 * client_body_buffer_size lies in a temporary file. NGX_ERROR: no memory,
 * or the file could not be read. */
static ngx_int_t
ngx_http_idem_body_copy(ngx_chain_t *in, u_char **out, size_t *out_len)
{
    off_t         size;
    u_char       *p;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    size = 0;
    for (cl = in; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    *out = NULL;
    *out_len = 0;

    if (size == 0) {
        return NGX_OK;
    }

    p = malloc((size_t) size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    *out = p;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
            continue;
        }

        if (b->in_file) {
            n = pread(b->file->fd, p, (size_t) (b->file_last - b->file_pos),
                      b->file_pos);
            if (n != b->file_last - b->file_pos) {
                free(*out);
                *out = NULL;
                return NGX_ERROR;
            }

            p += n;
        }
    }

    *out_len = p - *out;

    return NGX_OK;
}


static void
ngx_http_idem_claim_thread(void *data, ngx_log_t *log)
{
    ngx_http_idem_claim_job_t  *job = data;

    int                         rc;
    u_char                     *body;
    size_t                      body_len;
    uint8_t                     fp[IDEM_HTTP_FINGERPRINT_LEN];
    idem_layer                 *layer;
    idem_request                req;
    ngx_http_idem_ctx_t        *ctx;

    ctx = job->ctx;

    if (ngx_http_idem_body_copy(job->in, &body, &body_len) != NGX_OK) {
        /* answered 500, as any mistake of the server's own */
        job->rc = IDEM_EINVAL;
        ngx_cpystrn((u_char *) job->error,
                    (u_char *) "the request body could not be read back",
                    sizeof(job->error));
        return;
    }

    rc = idem_http_fingerprint(fp, job->method, job->path, body, body_len,
                               NULL, 0);
    free(body);

    if (rc == IDEM_OK) {
        rc = ngx_http_idem_layer(ctx->conf, &layer);
    }

    if (rc == IDEM_OK) {
        req.key = ctx->key;
        req.key_len = ctx->key_len;
        req.fingerprint = fp;
        req.fingerprint_len = sizeof(fp);

        rc = idem_begin_scoped(layer, ctx->scope.data, ctx->scope.len, &req,
                               &job->claim, &job->reply);
    }

    if (job->claim) {
        (void) ngx_atomic_fetch_add(&ngx_http_idem_claims_held, 1);
    }

    if (rc != IDEM_OK) {
        ngx_http_idem_keep_error(job->error, sizeof(job->error));
    }

    job->rc = rc;
}


/* Back on the event loop: go on to the upstream with the claim, or answer. */
static void
ngx_http_idem_claim_done(ngx_event_t *ev)
{
    ngx_http_idem_claim_job_t  *job = ev->data;

    ngx_connection_t           *c;
    ngx_http_request_t         *r;
    ngx_http_idem_ctx_t        *ctx;

    ctx = job->ctx;
    r = ctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    r->main->blocked--;

    if (job->claim) {
        ctx->holder = ngx_http_idem_holder_new(r, ctx, job->claim);
        ctx->state = NGX_HTTP_IDEM_CLAIMED;

        if (ctx->holder == NULL) {
            (void) idem_http_answer_make(&ctx->answer, IDEM_ENOMEM, NULL);
            ctx->state = NGX_HTTP_IDEM_ANSWER;
        }

    } else {
        if (job->rc != IDEM_OK) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "idempotency: %s: %s",
                          idem_error_name(job->rc), job->error);
        }

        ctx->reply = job->reply;
        (void) idem_http_answer_make(&ctx->answer, job->rc, &ctx->reply);
        ctx->state = NGX_HTTP_IDEM_ANSWER;
    }

    r->write_event_handler(r);
    ngx_http_run_posted_requests(c);
}


static ngx_int_t
ngx_http_idem_claim_post(ngx_http_request_t *r, ngx_http_idem_ctx_t *ctx)
{
    ngx_thread_task_t          *task;
    ngx_http_idem_main_conf_t  *imcf;
    ngx_http_idem_claim_job_t  *job;

    imcf = ngx_http_get_module_main_conf(r, ngx_http_idempotency_module);

    task = ngx_thread_task_alloc(r->pool, sizeof(ngx_http_idem_claim_job_t));
    if (task == NULL) {
        return NGX_ERROR;
    }

    job = task->ctx;
    job->ctx = ctx;
    job->in = r->request_body ? r->request_body->bufs : NULL;
    job->method = ngx_http_idem_cstr(r->pool, &r->method_name);
    job->path = ngx_http_idem_cstr(r->pool, &r->unparsed_uri);
    if (job->method == NULL || job->path == NULL) {
        return NGX_ERROR;
    }

    task->handler = ngx_http_idem_claim_thread;
    task->event.handler = ngx_http_idem_claim_done;
    task->event.data = job;

    return ngx_thread_task_post(imcf->pool, task);
}


/* ------------------------------------------------------------------------ */
/* The end of a claim: commit, abort or hold                                */
/* ------------------------------------------------------------------------ */

/* What a retry gets when the response cannot be stored (a body over
 * max_response_len, header fields the library refuses): a problem answer,
 * stored in its place, so that the upstream never runs the request again
 * within the TTL. */
static int
ngx_http_idem_commit_unkept(idem_claim *claim)
{
    int               rc;
    idem_http_answer  ans;

    rc = idem_http_answer_problem(&ans, 500,
             "The response to this request was too large to keep: it was "
             "sent once and cannot be replayed.");

    if (rc == IDEM_OK) {
        rc = idem_commit_headers(claim, ans.status, ans.headers, ans.nheaders,
                                 ans.body, ans.body_len);
    }

    idem_http_answer_clear(&ans);

    return rc;
}


static void
ngx_http_idem_end_thread(void *data, ngx_log_t *log)
{
    ngx_http_idem_holder_t  *h = data;

    int                      rc;

    if (h->fate == NGX_HTTP_IDEM_ABORT) {
        rc = idem_abort(h->claim);

    } else if (h->body.over) {
        rc = ngx_http_idem_commit_unkept(h->claim);

    } else {
        rc = idem_commit_headers(h->claim, h->status, h->headers, h->nheaders,
                                 h->body.data, h->body.len);

        if (rc == IDEM_ETOOBIG || rc == IDEM_EINVAL) {
            rc = ngx_http_idem_commit_unkept(h->claim);
        }
    }

    /* An abort always frees the claim; a commit when it is stored or lost */
    if (h->fate == NGX_HTTP_IDEM_ABORT || rc == IDEM_OK || rc == IDEM_ELOST) {
        h->claim = NULL;
        (void) ngx_atomic_fetch_add(&ngx_http_idem_claims_held, -1);
    }

    if (rc != IDEM_OK) {
        ngx_http_idem_keep_error(h->error, sizeof(h->error));
    }

    h->rc = rc;
}


static void
ngx_http_idem_end_free(ngx_http_idem_holder_t *h)
{
    ngx_free(h->headers);
    ngx_free(h->body.data);
    ngx_free(h->task);
}


static void
ngx_http_idem_end_done(ngx_event_t *ev)
{
    ngx_http_idem_holder_t  *h = ev->data;

    ngx_uint_t               level;

    h->busy = 0;

    if (h->rc != IDEM_OK) {
        /* a lease that ended under a slow upstream is worth a warning */
        level = h->rc == IDEM_ELOST ? NGX_LOG_WARN : NGX_LOG_ERR;
        ngx_log_error(level, ngx_cycle->log, 0, "idempotency: %s: %s: %s",
                      h->fate == NGX_HTTP_IDEM_ABORT ? "abort" : "commit",
                      idem_error_name(h->rc), h->error);
    }

    if (h->claim == NULL) {
        ngx_http_idem_end_free(h);
        return;
    }

    /* The store refused the commit until the lease nearly ended: the work
     * is done, so no retry may run it again while the lease lasts. */
    h->fate = NGX_HTTP_IDEM_HOLD;
    ngx_http_idem_end_post(h);
}


/* The hold is over, or a task could not be queued before: try again. */
static void
ngx_http_idem_end_timer(ngx_event_t *ev)
{
    ngx_http_idem_holder_t  *h = ev->data;

    if (h->fate == NGX_HTTP_IDEM_HOLD) {
        h->fate = NGX_HTTP_IDEM_ABORT;
    }

    ngx_http_idem_end_post(h);
}


static void
ngx_http_idem_end_post(ngx_http_idem_holder_t *h)
{
    ngx_msec_int_t  left;

    if (h->fate == NGX_HTTP_IDEM_HOLD) {
        left = (ngx_msec_int_t) (h->lease_end - ngx_current_msec);
        ngx_add_timer(&h->timer, (left > 0 ? (ngx_msec_t) left : 0)
                                 + NGX_HTTP_IDEM_HOLD_SLACK_MS);
        return;
    }

    h->task->handler = ngx_http_idem_end_thread;
    h->task->event.handler = ngx_http_idem_end_done;

    if (ngx_thread_task_post(h->pool, h->task) != NGX_OK) {
        ngx_add_timer(&h->timer, NGX_HTTP_IDEM_REPOST_MS);
        return;
    }

    h->busy = 1;
}


/* Lease renewals, while the request runs: the upstream may take longer than
 * one lease, and a retry must not take the key meanwhile. A worker that dies
 * stops renewing, and its keys free themselves one lease later. */

static void
ngx_http_idem_renew_thread(void *data, ngx_log_t *log)
{
    ngx_http_idem_holder_t  *h = data;

    h->rc = idem_extend(h->claim,
                        (uint32_t) ngx_min(h->lease, (ngx_msec_t) UINT32_MAX));

    if (h->rc != IDEM_OK) {
        ngx_http_idem_keep_error(h->error, sizeof(h->error));
    }
}


static void
ngx_http_idem_renew_done(ngx_event_t *ev)
{
    ngx_http_idem_holder_t  *h = ev->data;

    h->busy = 0;

    if (h->rc == IDEM_OK) {
        h->lease_end = h->renew_sent + h->lease;

    } else {
        /* IDEM_ELOST: the commit will say so too; a store error: the
         * lease stands as it was, and the next renewal tries again */
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "idempotency: renewing a lease: %s: %s",
                      idem_error_name(h->rc), h->error);
    }

    if (h->ended) {
        /* the request ended while the renewal ran */
        ngx_http_idem_end_post(h);
        return;
    }

    if (h->rc != IDEM_ELOST) {
        ngx_add_timer(&h->renew, h->lease / 3);
    }
}


static void
ngx_http_idem_renew(ngx_event_t *ev)
{
    ngx_http_idem_holder_t  *h = ev->data;

    h->task->handler = ngx_http_idem_renew_thread;
    h->task->event.handler = ngx_http_idem_renew_done;
    h->renew_sent = ngx_current_msec;

    if (ngx_thread_task_post(h->pool, h->task) != NGX_OK) {
        ngx_add_timer(&h->renew, NGX_HTTP_IDEM_REPOST_MS);
        return;
    }

    h->busy = 1;
}


/* The holder of a claim just won. NULL: no memory; the claim is then left
 * to end with its lease. */
static ngx_http_idem_holder_t *
ngx_http_idem_holder_new(ngx_http_request_t *r, ngx_http_idem_ctx_t *ctx,
    idem_claim *claim)
{
    ngx_thread_task_t          *task;
    ngx_http_idem_holder_t     *h;
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_http_get_module_main_conf(r, ngx_http_idempotency_module);

    task = ngx_calloc(sizeof(ngx_thread_task_t)
                      + sizeof(ngx_http_idem_holder_t), r->connection->log);
    if (task == NULL) {
        return NULL;
    }

    h = (ngx_http_idem_holder_t *) (task + 1);
    task->ctx = h;
    task->event.data = h;

    h->task = task;
    h->pool = imcf->pool;
    h->claim = claim;
    h->lease = ctx->conf->lease;
    h->lease_end = ngx_current_msec + h->lease;

    /* cancelable: a worker that exits does not wait for these timers; the
     * claims they hold then end with their leases */
    h->renew.handler = ngx_http_idem_renew;
    h->renew.data = h;
    h->renew.log = ngx_cycle->log;
    h->renew.cancelable = 1;

    h->timer.handler = ngx_http_idem_end_timer;
    h->timer.data = h;
    h->timer.log = ngx_cycle->log;
    h->timer.cancelable = 1;

    ngx_add_timer(&h->renew, h->lease / 3);

    return h;
}


/* The request is done with the claim: the holder takes the response
 * captured, and tells the store once no renewal is under way. */
static void
ngx_http_idem_end(ngx_http_idem_ctx_t *ctx, ngx_http_idem_fate_e fate)
{
    ngx_http_idem_holder_t  *h;

    h = ctx->holder;
    ctx->holder = NULL;

    h->fate = fate;
    h->status = ctx->status;
    h->headers = ctx->headers;
    h->nheaders = ctx->nheaders;
    h->body = ctx->body;
    h->ended = 1;

    ctx->headers = NULL;
    ctx->nheaders = 0;
    ngx_memzero(&ctx->body, sizeof(ngx_http_idem_body_t));

    if (h->renew.timer_set) {
        ngx_del_timer(&h->renew);
    }

    if (!h->busy) {
        ngx_http_idem_end_post(h);
    }
}


/* The request is over (its pool is being freed) with the claim still held:
 * its response was not whole. */
static ngx_http_idem_fate_e
ngx_http_idem_unfinished_fate(ngx_http_idem_ctx_t *ctx)
{
    ngx_http_upstream_t  *u;

    if (ctx->state == NGX_HTTP_IDEM_RESPONDING) {
        /* the upstream answered and the answer was cut (the client or the
         * upstream went away): the work may be done */
        return NGX_HTTP_IDEM_HOLD;
    }

    u = ctx->request->upstream;

    if (u && u->request_sent) {
        /* the upstream may be working on it */
        return NGX_HTTP_IDEM_HOLD;
    }

    /* it never reached the upstream */
    return NGX_HTTP_IDEM_ABORT;
}


static void
ngx_http_idem_cleanup(void *data)
{
    ngx_http_idem_ctx_t  *ctx = data;

    if (ctx->holder) {
        ngx_http_idem_end(ctx, ngx_http_idem_unfinished_fate(ctx));
    }

    idem_http_answer_clear(&ctx->answer);
    idem_reply_clear(&ctx->reply);
    ngx_free(ctx->headers);
    ngx_free(ctx->body.data);
}


/* ------------------------------------------------------------------------ */
/* The response, captured as it streams                                     */
/* ------------------------------------------------------------------------ */

/* Fields of one transfer, which nginx writes for each response itself. */
static ngx_str_t  ngx_http_idem_transfer_fields[] = {
    ngx_string("Connection"),
    ngx_string("Content-Length"),
    ngx_string("Date"),
    ngx_string("Keep-Alive"),
    ngx_string("Server"),
    ngx_string("Trailer"),
    ngx_string("Transfer-Encoding"),
    ngx_string("Upgrade"),
    ngx_null_string
};


static ngx_uint_t
ngx_http_idem_is_kept(ngx_table_elt_t *h)
{
    ngx_str_t  *name;

    if (h->hash == 0) {
        return 0;
    }

    for (name = ngx_http_idem_transfer_fields; name->len; name++) {
        if (h->key.len == name->len
            && ngx_strncasecmp(h->key.data, name->data, name->len) == 0)
        {
            return 0;
        }
    }

    return 1;
}


static u_char *
ngx_http_idem_put_field(idem_header *hd, u_char *p, ngx_str_t *name,
    ngx_str_t *value, ngx_str_t *value2)
{
    hd->name = (const char *) p;
    p = ngx_cpymem(p, name->data, name->len);
    *p++ = '\0';

    hd->value = (const char *) p;
    p = ngx_cpymem(p, value->data, value->len);
    if (value2) {
        p = ngx_cpymem(p, value2->data, value2->len);
    }
    *p++ = '\0';

    return p;
}


/* The response's end-to-end header fields as idem_header: what nginx keeps
 * apart from its list (Content-Type) first, then the list, in its order. */
static ngx_int_t
ngx_http_idem_capture_headers(ngx_http_request_t *r, ngx_http_idem_ctx_t *ctx)
{
    u_char           *p;
    size_t            n, size;
    ngx_str_t         charset, ct_name = ngx_string("Content-Type");
    ngx_uint_t        i;
    idem_header      *hd;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    /* nginx appends the charset itself when it was set apart */
    charset.len = 0;
    if (r->headers_out.charset.len
        && r->headers_out.content_type_len == r->headers_out.content_type.len)
    {
        charset.data = ngx_pnalloc(r->pool,
                                   sizeof("; charset=") - 1
                                   + r->headers_out.charset.len);
        if (charset.data == NULL) {
            return NGX_ERROR;
        }

        charset.len = ngx_sprintf(charset.data, "; charset=%V",
                                  &r->headers_out.charset) - charset.data;
    }

    n = 0;
    size = 0;

    if (r->headers_out.content_type.len) {
        n++;
        size += ct_name.len + r->headers_out.content_type.len + charset.len
                + 2;
    }

    for (part = &r->headers_out.headers.part; part; part = part->next) {
        h = part->elts;
        for (i = 0; i < part->nelts; i++) {
            if (ngx_http_idem_is_kept(&h[i])) {
                n++;
                size += h[i].key.len + h[i].value.len + 2;
            }
        }
    }

    if (n == 0) {
        return NGX_OK;
    }

    hd = ngx_alloc(n * sizeof(idem_header) + size, r->connection->log);
    if (hd == NULL) {
        return NGX_ERROR;
    }

    ctx->headers = hd;
    ctx->nheaders = n;
    p = (u_char *) (hd + n);

    if (r->headers_out.content_type.len) {
        p = ngx_http_idem_put_field(hd++, p, &ct_name,
                                    &r->headers_out.content_type, &charset);
    }

    for (part = &r->headers_out.headers.part; part; part = part->next) {
        h = part->elts;
        for (i = 0; i < part->nelts; i++) {
            if (ngx_http_idem_is_kept(&h[i])) {
                p = ngx_http_idem_put_field(hd++, p, &h[i].key, &h[i].value,
                                            NULL);
            }
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_idem_header_filter(ngx_http_request_t *r)
{
    ngx_int_t             rc;
    ngx_http_idem_ctx_t  *ctx;

    ctx = r == r->main ? ngx_http_idem_get_ctx(r) : NULL;

    if (ctx == NULL || ctx->state != NGX_HTTP_IDEM_CLAIMED) {
        return ngx_http_next_header_filter(r);
    }

    ctx->state = NGX_HTTP_IDEM_RESPONDING;
    ctx->status = (int) r->headers_out.status;

    if (ctx->status == NGX_HTTP_GATEWAY_TIME_OUT) {
        /* the upstream did not answer in time: it may still do the work */
        ngx_http_idem_end(ctx, NGX_HTTP_IDEM_HOLD);
        return ngx_http_next_header_filter(r);
    }

    if (ctx->status >= NGX_HTTP_INTERNAL_SERVER_ERROR) {
        /* the upstream failed, or could not be reached: a retry may run */
        ngx_http_idem_end(ctx, NGX_HTTP_IDEM_ABORT);
        return ngx_http_next_header_filter(r);
    }

    if (ngx_http_idem_capture_headers(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    /* the copy filter, which runs before this one, then reads buffers
     * that lie in files into memory */
    r->filter_need_in_memory = 1;

    rc = ngx_http_next_header_filter(r);

    /* 204, 304 and HEAD: no body follows */
    if (r->header_only && ctx->holder) {
        ngx_http_idem_end(ctx, NGX_HTTP_IDEM_COMMIT);
    }

    return rc;
}


static void
ngx_http_idem_body_add(ngx_http_idem_body_t *body, u_char *data, size_t len,
    size_t max)
{
    u_char  *p;
    size_t   size;

    if (len == 0 || body->over) {
        return;
    }

    if (len > max - body->len) {
        body->over = 1;
        ngx_free(body->data);
        body->data = NULL;
        body->len = 0;
        return;
    }

    if (body->len + len > body->size) {
        size = ngx_max(ngx_max(body->size * 2, body->len + len), 4096);
        p = realloc(body->data, ngx_min(size, max));
        if (p == NULL) {
            body->over = 1;
            return;
        }

        body->data = p;
        body->size = ngx_min(size, max);
    }

    ngx_memcpy(body->data + body->len, data, len);
    body->len += len;
}


static ngx_int_t
ngx_http_idem_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t            *b;
    ngx_uint_t            last;
    ngx_chain_t          *cl;
    ngx_http_idem_ctx_t  *ctx;

    ctx = r == r->main ? ngx_http_idem_get_ctx(r) : NULL;

    if (ctx == NULL || ctx->holder == NULL
        || ctx->state != NGX_HTTP_IDEM_RESPONDING)
    {
        return ngx_http_next_body_filter(r, in);
    }

    last = 0;

    /* copied before the next filters run: they consume the buffers */
    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ngx_buf_in_memory(b)) {
            ngx_http_idem_body_add(&ctx->body, b->pos, b->last - b->pos,
                                   ctx->conf->max_body);

        } else if (ngx_buf_size(b)) {
            ctx->body.over = 1;
        }

        last |= b->last_buf;
    }

    if (last) {
        ngx_http_idem_end(ctx, NGX_HTTP_IDEM_COMMIT);
    }

    return ngx_http_next_body_filter(r, in);
}


/* ------------------------------------------------------------------------ */
/* The request: key, body, claim, answer                                    */
/* ------------------------------------------------------------------------ */

static ngx_http_idem_ctx_t *
ngx_http_idem_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t   *cln;
    ngx_http_idem_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_idempotency_module);

    if (ctx || !r->internal) {
        return ctx;
    }

    /* an internal redirect (error_page, ...) cleared the module contexts;
     * the cleanup of the request's pool still holds it */
    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_idem_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_idempotency_module);
            return ctx;
        }
    }

    return NULL;
}


static ngx_http_idem_ctx_t *
ngx_http_idem_ctx_new(ngx_http_request_t *r, ngx_http_idem_loc_conf_t *conf)
{
    ngx_pool_cleanup_t   *cln;
    ngx_http_idem_ctx_t  *ctx;

    cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_idem_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, sizeof(ngx_http_idem_ctx_t));
    ctx->request = r;
    ctx->conf = conf;

    cln->handler = ngx_http_idem_cleanup;
    ngx_http_set_ctx(r, ctx, ngx_http_idempotency_module);

    return ctx;
}


/* The values of the request's Idempotency-Key field lines: up to max of
 * them, which is enough for idem_http_key_parse() to refuse a list. */
static size_t
ngx_http_idem_key_lines(ngx_http_request_t *r, const char **lines, size_t max)
{
    size_t            n;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    n = 0;

    for (part = &r->headers_in.headers.part; part; part = part->next) {
        h = part->elts;
        for (i = 0; i < part->nelts && n < max; i++) {
            if (h[i].key.len == sizeof("Idempotency-Key") - 1
                && ngx_strncasecmp(h[i].key.data, (u_char *) "Idempotency-Key",
                                   sizeof("Idempotency-Key") - 1) == 0)
            {
                /* nginx keeps request field values NUL-terminated */
                lines[n++] = (const char *) h[i].value.data;
            }
        }
    }

    return n;
}


static ngx_int_t
ngx_http_idem_str_set(ngx_pool_t *pool, ngx_str_t *dst, const char *src)
{
    dst->len = ngx_strlen(src);
    dst->data = ngx_pnalloc(pool, dst->len);
    if (dst->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(dst->data, src, dst->len);

    return NGX_OK;
}


/* Send an answer of the library's (a replay, 400, 409, 422, 503) as the
 * response; its fields and body are copied to the request's pool. */
static ngx_int_t
ngx_http_idem_send(ngx_http_request_t *r, const idem_http_answer *ans)
{
    size_t            i;
    ngx_buf_t        *b;
    ngx_int_t         rc;
    ngx_str_t         name, value;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = ans->status;
    r->headers_out.content_length_n = ans->body_len;

    for (i = 0; i < ans->nheaders; i++) {
        if (ngx_http_idem_str_set(r->pool, &name, ans->headers[i].name)
            != NGX_OK
            || ngx_http_idem_str_set(r->pool, &value, ans->headers[i].value)
               != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (name.len == sizeof("Content-Type") - 1
            && ngx_strncasecmp(name.data, (u_char *) "Content-Type",
                               name.len) == 0)
        {
            r->headers_out.content_type = value;
            r->headers_out.content_type_len = value.len;
            continue;
        }

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->lowcase_key = ngx_pnalloc(r->pool, name.len);
        if (h->lowcase_key == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_strlow(h->lowcase_key, name.data, name.len);
        h->hash = 1;
        h->key = name;
        h->value = value;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ans->body_len) {
        b->pos = ngx_pnalloc(r->pool, ans->body_len);
        if (b->pos == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        b->last = ngx_cpymem(b->pos, ans->body, ans->body_len);
        b->memory = 1;
    }

    b->last_buf = 1;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* The phase handler, run again once the body is read or the claim is back. */
static ngx_int_t
ngx_http_idem_resume(ngx_http_request_t *r, ngx_http_idem_ctx_t *ctx)
{
    ngx_int_t  rc;

    switch (ctx->state) {

    case NGX_HTTP_IDEM_READING:
    case NGX_HTTP_IDEM_CLAIMING:
        /* a write event while the request waits */
        return NGX_DONE;

    case NGX_HTTP_IDEM_ANSWER:
        rc = ngx_http_idem_send(r, &ctx->answer);
        idem_http_answer_clear(&ctx->answer);
        idem_reply_clear(&ctx->reply);
        ctx->state = NGX_HTTP_IDEM_DONE;
        ngx_http_finalize_request(r, rc);
        return NGX_DONE;

    default:
        /* claimed: on to the content handler */
        return NGX_DECLINED;
    }
}


/* The body is read: claim the key in a thread. */
static void
ngx_http_idem_body_read(ngx_http_request_t *r)
{
    ngx_http_idem_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_idempotency_module);

    r->write_event_handler = ngx_http_core_run_phases;

    if (ngx_http_idem_claim_post(r, ctx) == NGX_OK) {
        ctx->state = NGX_HTTP_IDEM_CLAIMING;
        r->main->blocked++;
        return;
    }

    /* the thread pool's queue is full: answered as a store that is down */
    (void) idem_http_answer_make(&ctx->answer, IDEM_EBACKEND, &ctx->reply);
    ctx->state = NGX_HTTP_IDEM_ANSWER;
    (void) ngx_http_post_request(r, NULL);
}


static ngx_int_t
ngx_http_idem_handler(ngx_http_request_t *r)
{
    int                        rc;
    size_t                     nlines;
    const char                *lines[2];
    ngx_int_t                  n;
    ngx_http_idem_ctx_t       *ctx;
    ngx_http_idem_loc_conf_t  *conf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_idem_get_ctx(r);
    if (ctx) {
        return ngx_http_idem_resume(r, ctx);
    }

    conf = ngx_http_get_module_loc_conf(r, ngx_http_idempotency_module);

    /* NGX_CONF_BITMASK_SET shares its bit with NGX_HTTP_UNKNOWN */
    if (!conf->enable
        || !(r->method & conf->methods & ~(ngx_uint_t) NGX_CONF_BITMASK_SET))
    {
        return NGX_DECLINED;
    }

    nlines = ngx_http_idem_key_lines(r, lines, 2);

    if (nlines == 0 && !conf->required) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_idem_ctx_new(r, conf);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->key = ngx_pnalloc(r->pool, conf->max_key + 1);
    if (ctx->key == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = idem_http_key_parse(ctx->key, conf->max_key + 1, &ctx->key_len,
                             lines, nlines);
    if (rc != IDEM_OK) {
        (void) idem_http_answer_make(&ctx->answer, rc, NULL);
        ctx->state = NGX_HTTP_IDEM_ANSWER;
        return ngx_http_idem_resume(r, ctx);
    }

    if (conf->scope
        && ngx_http_complex_value(r, conf->scope, &ctx->scope) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* an empty scope is no scope (the library refuses an empty one) */
    if (ctx->scope.len == 0) {
        ctx->scope.data = NULL;
    }

    n = ngx_http_read_client_request_body(r, ngx_http_idem_body_read);
    if (n >= NGX_HTTP_SPECIAL_RESPONSE) {
        return n;
    }

    ngx_http_finalize_request(r, NGX_DONE);
    return NGX_DONE;
}


/* ------------------------------------------------------------------------ */
/* Configuration                                                            */
/* ------------------------------------------------------------------------ */

static void *
ngx_http_idem_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_idem_main_conf_t));
    if (imcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&imcf->stores, cf->pool, 2,
                       sizeof(ngx_http_idem_store_t *)) != NGX_OK
        || ngx_array_init(&imcf->confs, cf->pool, 4,
                          sizeof(ngx_http_idem_loc_conf_t *)) != NGX_OK
        || ngx_array_init(&imcf->created, cf->pool, 2, sizeof(ngx_str_t))
           != NGX_OK)
    {
        return NULL;
    }

    return imcf;
}


static void *
ngx_http_idem_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_idem_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_idem_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->methods = 0;
     *     conf->prefix = { 0, NULL };
     *     conf->url = { 0, NULL };
     *     conf->store = NULL;
     *     conf->layer = NULL;
     */

    conf->enable = NGX_CONF_UNSET;
    conf->required = NGX_CONF_UNSET;
    conf->lease = NGX_CONF_UNSET_MSEC;
    conf->ttl = NGX_CONF_UNSET;
    conf->scope = NGX_CONF_UNSET_PTR;

    return conf;
}


/* A SQLite store's file as the worker user will need it: its directory is
 * made when missing, and whatever nginx -t creates there as root is given
 * to that user by ngx_http_idem_init_module(). */
static ngx_int_t
ngx_http_idem_sqlite_prepare(ngx_conf_t *cf, ngx_str_t *url,
    ngx_uint_t *created)
{
    u_char                     *path, *end, *slash;
    ngx_str_t                  *dir;
    ngx_file_info_t             fi;
    ngx_http_idem_main_conf_t  *imcf;

    *created = 0;

    if (ngx_strncmp(url->data, "sqlite://", sizeof("sqlite://") - 1) != 0) {
        return NGX_OK;
    }

    path = url->data + sizeof("sqlite://") - 1;
    end = (u_char *) ngx_strchr(path, '?');
    if (end == NULL) {
        end = url->data + url->len;
    }

    slash = ngx_strlchr(path, end, '/');
    if (slash == NULL) {
        /* not a path: the library says what is wrong */
        return NGX_OK;
    }

    while (ngx_strlchr(slash + 1, end, '/')) {
        slash = ngx_strlchr(slash + 1, end, '/');
    }

    imcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_idempotency_module);

    if (slash > path) {
        dir = ngx_array_push(&imcf->created);
        if (dir == NULL) {
            return NGX_ERROR;
        }

        dir->len = slash - path;
        dir->data = ngx_pnalloc(cf->pool, dir->len + 1);
        if (dir->data == NULL) {
            return NGX_ERROR;
        }

        *ngx_cpymem(dir->data, path, dir->len) = '\0';

        if (ngx_file_info(dir->data, &fi) == NGX_OK
            || ngx_create_dir(dir->data, 0700) != NGX_OK)
        {
            /* there already, or not ours to make: left as it is */
            imcf->created.nelts--;
        }
    }

    *created = ngx_file_info(path, &fi) == NGX_FILE_ERROR;

    return NGX_OK;
}


/* Open the store once, so that nginx -t fails on a URL the library refuses
 * or a store that cannot be reached; workers open their own on first use. */
static ngx_http_idem_store_t *
ngx_http_idem_store_get(ngx_conf_t *cf, ngx_str_t *url, const char *directive)
{
    int                         rc;
    ngx_str_t                  *file;
    ngx_uint_t                  i, created;
    idem_store                 *store;
    ngx_http_idem_store_t      *st, **stp;
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_idempotency_module);

    stp = imcf->stores.elts;
    for (i = 0; i < imcf->stores.nelts; i++) {
        if (stp[i]->url.len == url->len
            && ngx_strncmp(stp[i]->url.data, url->data, url->len) == 0)
        {
            return stp[i];
        }
    }

    if (ngx_http_idem_sqlite_prepare(cf, url, &created) != NGX_OK) {
        return NULL;
    }

    rc = idem_store_open(&store, (const char *) url->data);
    if (rc != IDEM_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%s\" cannot open \"%V\": %s",
                           directive, url, idem_last_error());
        return NULL;
    }

    idem_store_close(store);

    if (created) {
        file = ngx_array_push(&imcf->created);
        if (file == NULL) {
            return NULL;
        }

        file->data = url->data + sizeof("sqlite://") - 1;
        file->len = ngx_strlen(file->data);
    }

    st = ngx_pcalloc(cf->pool, sizeof(ngx_http_idem_store_t));
    stp = ngx_array_push(&imcf->stores);
    if (st == NULL || stp == NULL) {
        return NULL;
    }

    st->url = *url;
    if (pthread_mutex_init(&st->mutex, NULL) != 0) {
        return NULL;
    }

    *stp = st;

    return st;
}


static char *
ngx_http_idem_store(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_idem_loc_conf_t  *ilcf = conf;

    ngx_str_t  *value;

    if (ilcf->url.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    ilcf->url = value[1];

    /* checked here, where a message names this line */
    ilcf->store = ngx_http_idem_store_get(cf, &ilcf->url, "idempotency_store");
    if (ilcf->store == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* The library's own checks of lease, TTL and prefix, on a store in memory,
 * so that nginx -t refuses what a worker's layer would. */
static char *
ngx_http_idem_check_options(ngx_conf_t *cf, ngx_http_idem_loc_conf_t *conf)
{
    int            rc;
    idem_store    *store;
    idem_layer    *layer;
    idem_options   opts;

    if (conf->lease == 0 || conf->lease > UINT32_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"idempotency_lease\" must be from 1ms to 49d");
        return NGX_CONF_ERROR;
    }

    if (conf->ttl == 0 || conf->ttl > UINT32_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"idempotency_ttl\" must be from 1s to 136y");
        return NGX_CONF_ERROR;
    }

    ngx_http_idem_options(&opts, conf);
    conf->max_body = opts.max_response_len;
    conf->max_key = opts.max_key_len;

    rc = idem_store_open(&store, "memory://");
    if (rc == IDEM_OK) {
        rc = idem_layer_new(&layer, store, &opts);
        idem_layer_free(layer);
        idem_store_close(store);
    }

    if (rc != IDEM_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"idempotency_key_prefix\" \"%V\": %s",
                           &conf->prefix, idem_last_error());
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_idem_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_idem_loc_conf_t *prev = parent;
    ngx_http_idem_loc_conf_t *conf = child;

    ngx_str_t                   dflt = ngx_string(NGX_HTTP_IDEM_DEFAULT_STORE);
    ngx_http_idem_loc_conf_t  **confp;
    ngx_http_idem_main_conf_t  *imcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);
    ngx_conf_merge_value(conf->required, prev->required, 0);
    ngx_conf_merge_bitmask_value(conf->methods, prev->methods,
                                 (NGX_CONF_BITMASK_SET
                                  |NGX_HTTP_POST|NGX_HTTP_PATCH));
    ngx_conf_merge_msec_value(conf->lease, prev->lease, 60000);
    ngx_conf_merge_sec_value(conf->ttl, prev->ttl, 86400);
    ngx_conf_merge_str_value(conf->prefix, prev->prefix, "");
    ngx_conf_merge_ptr_value(conf->scope, prev->scope, NULL);

    if (conf->url.data == NULL) {
        conf->url = prev->url;
        conf->store = prev->store;
    }

    if (!conf->enable) {
        return NGX_CONF_OK;
    }

    if (ngx_http_idem_check_options(cf, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    if (conf->store == NULL) {
        conf->url = dflt;
        conf->store = ngx_http_idem_store_get(cf, &conf->url, "idempotency");
        if (conf->store == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    imcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_idempotency_module);

    confp = ngx_array_push(&imcf->confs);
    if (confp == NULL) {
        return NGX_CONF_ERROR;
    }

    *confp = conf;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_idem_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_idempotency_module);

    if (imcf->confs.nelts == 0) {
        return NGX_OK;
    }

    imcf->pool = ngx_thread_pool_add(cf, NULL);
    if (imcf->pool == NULL) {
        return NGX_ERROR;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_idem_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_idem_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_idem_body_filter;

    return NGX_OK;
}


/* Give the SQLite directories and files nginx made as root (nginx -t, or
 * the master's configuration) to the user the workers run as; that user is
 * only known once the whole configuration is read. */
static ngx_int_t
ngx_http_idem_init_module(ngx_cycle_t *cycle)
{
    ngx_str_t                  *path;
    ngx_uint_t                  i;
    ngx_core_conf_t            *ccf;
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_idempotency_module);
    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);

    if (imcf == NULL || geteuid() != 0
        || ccf->user == (ngx_uid_t) NGX_CONF_UNSET_UINT)
    {
        return NGX_OK;
    }

    path = imcf->created.elts;
    for (i = 0; i < imcf->created.nelts; i++) {
        if (chown((const char *) path[i].data, ccf->user, ccf->group) == -1) {
            /* not fatal: the workers then answer 503 and say why */
            ngx_log_error(NGX_LOG_ALERT, cycle->log, ngx_errno,
                          "idempotency: chown(\"%V\") failed", &path[i]);
        }
    }

    return NGX_OK;
}


static void
ngx_http_idem_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                  i;
    ngx_http_idem_store_t     **stp;
    ngx_http_idem_loc_conf_t  **confp;
    ngx_http_idem_main_conf_t  *imcf;

    imcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_idempotency_module);

    /* A claim still held (until its lease ends) needs its layer: the
     * process ends anyway, and the store lets the claim expire. */
    if (imcf == NULL || ngx_http_idem_claims_held) {
        return;
    }

    confp = imcf->confs.elts;
    for (i = 0; i < imcf->confs.nelts; i++) {
        idem_layer_free(confp[i]->layer);
        confp[i]->layer = NULL;
    }

    stp = imcf->stores.elts;
    for (i = 0; i < imcf->stores.nelts; i++) {
        idem_store_close(stp[i]->store);
        stp[i]->store = NULL;
    }
}
