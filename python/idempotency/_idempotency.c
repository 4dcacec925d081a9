/*
 * _idempotency: the CPython binding of libidempotency's public API
 * (<idempotency/idempotency.h> and <idempotency/http.h>). The package
 * `idempotency` (idempotency/__init__.py) builds the seed's decorator and
 * the WSGI/ASGI middleware on it; this module stays a thin, typed layer:
 *
 *   Layer(url, *, lease_ms, ttl_s, key_prefix, ...)  a store and a policy
 *   Layer.begin(key, fingerprint=None, scope=None)   -> Claim or Reply
 *   Claim.commit(status, body, headers=()) / abort() / extend(ms) / abandon()
 *   Claim.checkpoint(name, data) / last_checkpoint / subkey(step)
 *   http_key_parse, http_fingerprint, http_error_answer, http_problem,
 *   Reply.http_answer()
 *
 * The GIL is released around every call that may reach the store, so
 * Python threads wait for their round trips in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include <idempotency/http.h>
#include <idempotency/idempotency.h>

/* The exception classes, one per error code of the library (see init). */
static PyObject *IdempotencyError, *InvalidArgument, *BackendError, *ClaimLost, *CorruptRecord,
    *ResponseTooLarge, *Unsupported;

/* Raise the exception of code rc with the calling thread's message from the
 * library, which says what failed and what to do next; e.code is rc. */
static PyObject *raise_idem(int rc)
{
    if (rc == IDEM_ENOMEM)
        return PyErr_NoMemory();
    PyObject *cls = IdempotencyError;
    switch (rc) {
    case IDEM_EINVAL: case IDEM_EKEY: cls = InvalidArgument; break;
    case IDEM_EBACKEND: cls = BackendError; break;
    case IDEM_ELOST: cls = ClaimLost; break;
    case IDEM_ECORRUPT: cls = CorruptRecord; break;
    case IDEM_ETOOBIG: cls = ResponseTooLarge; break;
    case IDEM_EUNSUPPORTED: cls = Unsupported; break;
    default: break;
    }
    const char *msg = idem_last_error();
    if (!msg || !*msg)
        msg = idem_strerror(rc);
    PyObject *exc = PyObject_CallFunction(cls, "s", msg);
    if (!exc)
        return NULL;
    PyObject *code = PyLong_FromLong(rc);
    if (!code || PyObject_SetAttrString(exc, "code", code) < 0) {
        Py_XDECREF(code);
        Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(code);
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

/* Header fields as Python sees them: a list of (name, value) str pairs.
 * Values are any bytes but NUL, CR and LF, so they travel as latin-1, as
 * WSGI carries them. */
static PyObject *headers_to_list(const idem_header *h, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *name = PyUnicode_DecodeLatin1(h[i].name, (Py_ssize_t)strlen(h[i].name), NULL);
        PyObject *value = name ? PyUnicode_DecodeLatin1(h[i].value, (Py_ssize_t)strlen(h[i].value), NULL)
                               : NULL;
        PyObject *pair = value ? PyTuple_Pack(2, name, value) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (!pair) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    return list;
}

/* An answer of <idempotency/http.h> as (status, headers, body). */
static PyObject *answer_to_tuple(const idem_http_answer *ans)
{
    PyObject *headers = headers_to_list(ans->headers, ans->nheaders);
    if (!headers)
        return NULL;
    return Py_BuildValue("(iNy#)", ans->status, headers, (const char *)ans->body,
                         (Py_ssize_t)ans->body_len);
}

/*
 * The reverse: a sequence of (name, value) pairs as idem_header fields whose
 * strings point into *keep (a list of bytes objects the caller releases).
 * None is no fields. A NUL inside a name or value would cut it short where
 * the library reads it, so it is refused here.
 */
static int headers_from_seq(PyObject *seq, idem_header **out, size_t *n, PyObject **keep)
{
    *out = NULL;
    *n = 0;
    *keep = NULL;
    if (seq == Py_None)
        return 0;
    PyObject *fast = PySequence_Fast(seq, "headers must be a sequence of (name, value) pairs");
    if (!fast)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    *keep = PyList_New(0);
    idem_header *h = PyMem_Calloc(len ? (size_t)len : 1, sizeof *h);
    if (!*keep || !h)
        goto fail;
    for (Py_ssize_t i = 0; i < len; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *nv[2];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "each header must be a (name, value) tuple");
            goto fail;
        }
        for (int j = 0; j < 2; j++) {
            PyObject *s = PyTuple_GET_ITEM(pair, j);
            nv[j] = PyUnicode_Check(s) ? PyUnicode_AsLatin1String(s) : NULL;
            if (!nv[j]) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_TypeError, "header names and values must be str");
                goto fail;
            }
            int added = PyList_Append(*keep, nv[j]);
            Py_DECREF(nv[j]);
            if (added < 0)
                goto fail;
            if ((size_t)PyBytes_GET_SIZE(nv[j]) != strlen(PyBytes_AS_STRING(nv[j]))) {
                PyErr_SetString(PyExc_ValueError, "a header name or value holds a NUL character");
                goto fail;
            }
        }
        h[i].name = PyBytes_AS_STRING(nv[0]);
        h[i].value = PyBytes_AS_STRING(nv[1]);
    }
    Py_DECREF(fast);
    *out = h;
    *n = (size_t)len;
    return 0;
fail:
    Py_DECREF(fast);
    PyMem_Free(h);
    Py_CLEAR(*keep);
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Reply: the outcome of a claim that lost (replayed, in progress, mismatch) */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    idem_reply reply;
} ReplyObject;

static void Reply_dealloc(ReplyObject *self)
{
    idem_reply_clear(&self->reply);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Reply_get_outcome(ReplyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->reply.outcome);
}

static PyObject *Reply_get_status(ReplyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->reply.status);
}

static PyObject *Reply_get_body(ReplyObject *self, void *closure)
{
    (void)closure;
    return PyBytes_FromStringAndSize(self->reply.body ? (const char *)self->reply.body : "",
                                     (Py_ssize_t)self->reply.body_len);
}

static PyObject *Reply_get_retry_after_ms(ReplyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->reply.retry_after_ms);
}

static PyObject *Reply_get_headers(ReplyObject *self, void *closure)
{
    (void)closure;
    return headers_to_list(self->reply.headers, self->reply.nheaders);
}

static PyGetSetDef Reply_getset[] = {
    {"outcome", (getter)Reply_get_outcome, NULL, "REPLAYED, IN_PROGRESS or MISMATCH", NULL},
    {"status", (getter)Reply_get_status, NULL, "stored status; 409 in progress; 422 mismatch", NULL},
    {"body", (getter)Reply_get_body, NULL, "the stored body (bytes)", NULL},
    {"retry_after_ms", (getter)Reply_get_retry_after_ms, NULL, "IN_PROGRESS: when to retry", NULL},
    {"headers", (getter)Reply_get_headers, NULL, "stored header fields, [(name, value)]", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *Reply_http_answer(ReplyObject *self, PyObject *unused)
{
    (void)unused;
    idem_http_answer ans;
    int rc = idem_http_answer_make(&ans, IDEM_OK, &self->reply);
    PyObject *res = rc == IDEM_OK ? answer_to_tuple(&ans) : raise_idem(rc);
    idem_http_answer_clear(&ans);
    return res;
}

static PyMethodDef Reply_methods[] = {
    {"http_answer", (PyCFunction)Reply_http_answer, METH_NOARGS,
     "The HTTP answer to send for this reply: (status, headers, body)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReplyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "idempotency._idempotency.Reply",
    .tp_basicsize = sizeof(ReplyObject),
    .tp_dealloc = (destructor)Reply_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "What a request that did not get the key receives.",
    .tp_getset = Reply_getset,
    .tp_methods = Reply_methods,
};

/* ------------------------------------------------------------------------ */
/* Layer: a store opened from a URL and a policy on it                      */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    idem_store *store;
    idem_layer *layer;
} LayerObject;

static void Layer_dealloc(LayerObject *self)
{
    /* Both calls are safe in a child of the process that opened them: the
     * library frees only this process's memory there and leaves the parent's
     * connections and threads alone. */
    idem_layer_free(self->layer);
    idem_store_close(self->store);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Options arrive as Python ints (None: the library's default). */
static int opt_u32(PyObject *o, const char *name, uint32_t *out)
{
    if (o == Py_None)
        return 0;
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (PyErr_Occurred() || v > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must be an int from 0 to %lu", name, (unsigned long)UINT32_MAX);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int opt_size(PyObject *o, const char *name, size_t *out)
{
    if (o == Py_None)
        return 0;
    size_t v = PyLong_AsSize_t(o);
    if (PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-negative int", name);
        return -1;
    }
    *out = v;
    return 0;
}

static int Layer_init(LayerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"url", "lease_ms", "ttl_s", "key_prefix", "max_key_len",
                             "max_response_len", "cache_bytes", "auto_extend",
                             "commit_timeout_ms", "subkey_secret", NULL};
    const char *url;
    const char *key_prefix = NULL, *subkey_secret = NULL;
    PyObject *lease_ms = Py_None, *ttl_s = Py_None, *max_key_len = Py_None,
             *max_response_len = Py_None, *cache_bytes = Py_None, *auto_extend = Py_None,
             *commit_timeout_ms = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|$OOzOOOOOz", kwlist, &url, &lease_ms, &ttl_s,
                                     &key_prefix, &max_key_len, &max_response_len, &cache_bytes,
                                     &auto_extend, &commit_timeout_ms, &subkey_secret))
        return -1;
    if (self->layer) {
        PyErr_SetString(PyExc_RuntimeError, "Layer is already initialised");
        return -1;
    }
    idem_options opts;
    idem_options_init(&opts);
    if (opt_u32(lease_ms, "lease_ms", &opts.lease_ms) < 0 || opt_u32(ttl_s, "ttl_s", &opts.ttl_s) < 0 ||
        opt_size(max_key_len, "max_key_len", &opts.max_key_len) < 0 ||
        opt_size(max_response_len, "max_response_len", &opts.max_response_len) < 0 ||
        opt_size(cache_bytes, "cache_bytes", &opts.cache_bytes) < 0 ||
        opt_u32(commit_timeout_ms, "commit_timeout_ms", &opts.commit_timeout_ms) < 0)
        return -1;
    if (auto_extend != Py_None) {
        int truth = PyObject_IsTrue(auto_extend);
        if (truth < 0)
            return -1;
        opts.auto_extend = truth;
    }
    if (key_prefix)
        opts.key_prefix = key_prefix;
    opts.subkey_secret = subkey_secret;

    idem_store *store = NULL;
    idem_layer *layer = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = idem_store_open(&store, url);
    if (rc == IDEM_OK) {
        rc = idem_layer_new(&layer, store, &opts);
        if (rc != IDEM_OK)
            idem_store_close(store);
    }
    Py_END_ALLOW_THREADS
    if (rc != IDEM_OK) {
        raise_idem(rc);
        return -1;
    }
    self->store = store;
    self->layer = layer;
    return 0;
}

/* Every method below needs a layer that __init__ made. */
static int layer_ready(LayerObject *self)
{
    if (self->layer)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "Layer was not initialised");
    return 0;
}

typedef struct {
    PyObject_HEAD
    idem_claim *claim;   /* NULL once committed, aborted or abandoned */
    LayerObject *layer;  /* kept alive while the claim is: the layer must outlive it */
} ClaimObject;

static PyTypeObject ClaimType;

static PyObject *Layer_begin(LayerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "fingerprint", "scope", NULL};
    Py_buffer key = {0}, fp = {0}, scope = {0};
    PyObject *fp_obj = Py_None, *scope_obj = Py_None;
    if (!layer_ready(self))
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|OO", kwlist, &key, &fp_obj, &scope_obj))
        return NULL;
    if ((fp_obj != Py_None && PyObject_GetBuffer(fp_obj, &fp, PyBUF_SIMPLE) < 0) ||
        (scope_obj != Py_None && PyObject_GetBuffer(scope_obj, &scope, PyBUF_SIMPLE) < 0)) {
        PyBuffer_Release(&key);
        PyBuffer_Release(&fp);
        return NULL;
    }
    ReplyObject *reply = PyObject_New(ReplyObject, &ReplyType);
    ClaimObject *claim_obj = PyObject_New(ClaimObject, &ClaimType);
    PyObject *res = NULL;
    if (!reply || !claim_obj)
        goto done;
    memset(&reply->reply, 0, sizeof reply->reply);
    claim_obj->claim = NULL;
    claim_obj->layer = NULL;

    idem_request req = {key.buf, (size_t)key.len, fp.buf, (size_t)fp.len};
    idem_claim *claim = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = idem_begin_scoped(self->layer, scope.buf, (size_t)scope.len, &req, &claim, &reply->reply);
    Py_END_ALLOW_THREADS
    if (rc != IDEM_OK) {
        raise_idem(rc);
    } else if (claim) {
        claim_obj->claim = claim;
        Py_INCREF(self);
        claim_obj->layer = self;
        res = (PyObject *)claim_obj;
        claim_obj = NULL;
    } else {
        res = (PyObject *)reply;
        reply = NULL;
    }
done:
    Py_XDECREF(reply);
    Py_XDECREF(claim_obj);
    PyBuffer_Release(&key);
    PyBuffer_Release(&fp);
    PyBuffer_Release(&scope);
    return res;
}

static PyObject *Layer_get_backend(LayerObject *self, void *closure)
{
    (void)closure;
    if (!layer_ready(self))
        return NULL;
    return PyUnicode_FromString(idem_store_backend(self->store));
}

static PyObject *Layer_stats(LayerObject *self, PyObject *unused)
{
    (void)unused;
    if (!layer_ready(self))
        return NULL;
    idem_stats s;
    idem_layer_stats(self->layer, &s);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsK}", "executed", (unsigned long long)s.executed,
                         "replayed", (unsigned long long)s.replayed, "in_progress",
                         (unsigned long long)s.in_progress, "mismatched",
                         (unsigned long long)s.mismatched, "failed", (unsigned long long)s.failed,
                         "lost", (unsigned long long)s.lost, "backend_errors",
                         (unsigned long long)s.backend_errors, "unstored",
                         (unsigned long long)s.unstored, "extended", (unsigned long long)s.extended,
                         "claims_freed", (unsigned long long)s.claims_freed, "cache_hits",
                         (unsigned long long)s.cache_hits);
}

static PyMethodDef Layer_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))Layer_begin, METH_VARARGS | METH_KEYWORDS,
     "begin(key, fingerprint=None, scope=None) -> Claim or Reply\n\n"
     "Claim the key (bytes). A Claim: this caller holds it and must commit or abort.\n"
     "A Reply: another request has it (REPLAYED, IN_PROGRESS or MISMATCH)."},
    {"stats", (PyCFunction)Layer_stats, METH_NOARGS, "The layer's counters, as a dict."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Layer_getset[] = {
    {"backend", (getter)Layer_get_backend, NULL, "the store's driver: 'sqlite', 'redis', ...", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LayerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "idempotency._idempotency.Layer",
    .tp_basicsize = sizeof(LayerObject),
    .tp_dealloc = (destructor)Layer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Layer(url, *, lease_ms=None, ttl_s=None, key_prefix=None, max_key_len=None,\n"
              "      max_response_len=None, cache_bytes=None, auto_extend=None,\n"
              "      commit_timeout_ms=None, subkey_secret=None)\n\n"
              "A store opened from url and the policy applied to it (None: the library's default).",
    .tp_methods = Layer_methods,
    .tp_getset = Layer_getset,
    .tp_init = (initproc)Layer_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* Claim: a key this process holds until it commits or aborts               */
/* ------------------------------------------------------------------------ */

static void Claim_dealloc(ClaimObject *self)
{
    /* A claim dropped unfinished is left as a process that died would leave
     * it: its key frees itself when the lease ends. Aborting here would make
     * a store call from the garbage collector, and would let a retry run
     * work that may have been done. The claim's few bytes are not freed:
     * the public API frees a claim only by committing or aborting it. */
    Py_XDECREF(self->layer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int claim_held(ClaimObject *self)
{
    if (self->claim)
        return 1;
    PyErr_SetString(IdempotencyError, "this claim was already committed, aborted or abandoned");
    return 0;
}

static PyObject *Claim_commit(ClaimObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"status", "body", "headers", NULL};
    int status;
    Py_buffer body = {0};
    PyObject *headers_obj = Py_None;
    if (!claim_held(self))
        return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*|O", kwlist, &status, &body, &headers_obj))
        return NULL;
    idem_header *headers;
    size_t nheaders;
    PyObject *keep;
    if (headers_from_seq(headers_obj, &headers, &nheaders, &keep) < 0) {
        PyBuffer_Release(&body);
        return NULL;
    }
    int rc;
    idem_claim *claim = self->claim;
    Py_BEGIN_ALLOW_THREADS
    rc = idem_commit_headers(claim, status, headers, nheaders, body.buf, (size_t)body.len);
    Py_END_ALLOW_THREADS
    PyMem_Free(headers);
    Py_XDECREF(keep);
    PyBuffer_Release(&body);
    /* IDEM_OK and IDEM_ELOST free the claim; every other error leaves it
     * with us, to commit again or abort. */
    if (rc == IDEM_OK || rc == IDEM_ELOST)
        self->claim = NULL;
    if (rc != IDEM_OK)
        return raise_idem(rc);
    Py_RETURN_NONE;
}

static PyObject *Claim_abort(ClaimObject *self, PyObject *unused)
{
    (void)unused;
    if (!claim_held(self))
        return NULL;
    int rc;
    idem_claim *claim = self->claim;
    self->claim = NULL; /* freed by idem_abort whatever it returns */
    Py_BEGIN_ALLOW_THREADS
    rc = idem_abort(claim);
    Py_END_ALLOW_THREADS
    if (rc != IDEM_OK)
        return raise_idem(rc);
    Py_RETURN_NONE;
}

static PyObject *Claim_extend(ClaimObject *self, PyObject *args)
{
    unsigned int lease_ms;
    if (!claim_held(self) || !PyArg_ParseTuple(args, "I", &lease_ms))
        return NULL;
    int rc;
    idem_claim *claim = self->claim;
    Py_BEGIN_ALLOW_THREADS
    rc = idem_extend(claim, lease_ms);
    Py_END_ALLOW_THREADS
    if (rc != IDEM_OK)
        return raise_idem(rc);
    Py_RETURN_NONE;
}

static PyObject *Claim_checkpoint(ClaimObject *self, PyObject *args)
{
    const char *name;
    Py_buffer data = {0};
    if (!claim_held(self) || !PyArg_ParseTuple(args, "sy*", &name, &data))
        return NULL;
    int rc;
    idem_claim *claim = self->claim;
    Py_BEGIN_ALLOW_THREADS
    rc = idem_checkpoint(claim, name, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (rc != IDEM_OK)
        return raise_idem(rc);
    Py_RETURN_NONE;
}

static PyObject *Claim_get_checkpoint(ClaimObject *self, void *closure)
{
    (void)closure;
    if (!claim_held(self))
        return NULL;
    const char *name;
    const void *data;
    size_t len;
    int rc = idem_claim_checkpoint(self->claim, &name, &data, &len);
    if (rc != IDEM_OK)
        return raise_idem(rc);
    if (!*name)
        Py_RETURN_NONE;
    return Py_BuildValue("(sy#)", name, (const char *)data, (Py_ssize_t)len);
}

static PyObject *Claim_subkey(ClaimObject *self, PyObject *args)
{
    const char *step;
    if (!claim_held(self) || !PyArg_ParseTuple(args, "s", &step))
        return NULL;
    char out[IDEM_SUBKEY_SIZE];
    int rc = idem_claim_subkey(self->claim, step, out, sizeof out);
    if (rc != IDEM_OK)
        return raise_idem(rc);
    return PyUnicode_FromString(out);
}

static PyObject *Claim_abandon(ClaimObject *self, PyObject *unused)
{
    (void)unused;
    if (!claim_held(self))
        return NULL;
    self->claim = NULL; /* see Claim_dealloc */
    Py_RETURN_NONE;
}

static PyObject *Claim_get_held(ClaimObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->claim != NULL);
}

static PyMethodDef Claim_methods[] = {
    {"commit", (PyCFunction)(void (*)(void))Claim_commit, METH_VARARGS | METH_KEYWORDS,
     "commit(status, body, headers=None): store the response; frees the claim on success\n"
     "and on ClaimLost; on any other error the claim stays (commit again or abort)."},
    {"abort", (PyCFunction)Claim_abort, METH_NOARGS,
     "abort(): give the key up so a retry runs; the claim is finished even on error."},
    {"extend", (PyCFunction)Claim_extend, METH_VARARGS,
     "extend(lease_ms): renew the lease; ClaimLost when another request took the key."},
    {"checkpoint", (PyCFunction)Claim_checkpoint, METH_VARARGS,
     "checkpoint(name, data): save a finished step (str) and its data (bytes) in the key's\n"
     "record, fenced by the claim, and renew the lease. A claim that takes the key over\n"
     "(this holder died, or aborted) starts from it."},
    {"subkey", (PyCFunction)Claim_subkey, METH_VARARGS,
     "subkey(step) -> str: the Idempotency-Key for step's call to another service, the same\n"
     "for every holder of this key, different for any other key, scope, prefix or step."},
    {"abandon", (PyCFunction)Claim_abandon, METH_NOARGS,
     "abandon(): stop using the claim and leave the key claimed until its lease ends,\n"
     "for work that is done but whose response could not be stored."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Claim_getset[] = {
    {"held", (getter)Claim_get_held, NULL, "True until committed, aborted or abandoned", NULL},
    {"last_checkpoint", (getter)Claim_get_checkpoint, NULL,
     "(name, data) of the last checkpoint, this claim's own or the one it took over; None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ClaimType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "idempotency._idempotency.Claim",
    .tp_basicsize = sizeof(ClaimObject),
    .tp_dealloc = (destructor)Claim_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A key held by this process. Not thread-safe: one thread at a time.",
    .tp_methods = Claim_methods,
    .tp_getset = Claim_getset,
};

/* ------------------------------------------------------------------------ */
/* HTTP                                                                     */
/* ------------------------------------------------------------------------ */

/* http_key_parse(lines, key_size) -> (key bytes, None) or (None, answer):
 * answer is the 400 to send, with the reason, made on this thread right
 * after the refusal as <idempotency/http.h> requires. */
static PyObject *mod_http_key_parse(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *seq;
    Py_ssize_t key_size;
    if (!PyArg_ParseTuple(args, "On", &seq, &key_size))
        return NULL;
    if (key_size < 2 || key_size > 4096) {
        PyErr_SetString(PyExc_ValueError, "key_size must be from 2 to 4096");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "lines must be a sequence of str");
    if (!fast)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    const char **lines = PyMem_Calloc(n ? (size_t)n : 1, sizeof *lines);
    char *key = PyMem_Malloc((size_t)key_size);
    PyObject *res = NULL;
    if (!lines || !key) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* Field values are latin-1 in WSGI and ASGI; a key is printable
         * ASCII, which the library checks. */
        PyObject *line = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyUnicode_Check(line)) {
            PyErr_SetString(PyExc_TypeError, "lines must be a sequence of str");
            goto done;
        }
        lines[i] = PyUnicode_AsUTF8(line);
        if (!lines[i])
            goto done;
    }
    size_t key_len = 0;
    int rc = idem_http_key_parse(key, (size_t)key_size, &key_len, lines, (size_t)n);
    if (rc == IDEM_OK) {
        res = Py_BuildValue("(y#O)", key, (Py_ssize_t)key_len, Py_None);
    } else if (rc == IDEM_EKEY) {
        idem_http_answer ans;
        rc = idem_http_answer_make(&ans, IDEM_EKEY, NULL);
        PyObject *answer = rc == IDEM_OK ? answer_to_tuple(&ans) : raise_idem(rc);
        idem_http_answer_clear(&ans);
        if (answer)
            res = Py_BuildValue("(ON)", Py_None, answer);
    } else {
        raise_idem(rc);
    }
done:
    PyMem_Free(key);
    PyMem_Free(lines);
    Py_DECREF(fast);
    return res;
}

/* http_fingerprint(method, path, body, headers=None) -> 32 bytes. headers:
 * (name, value or None) pairs, None being an absent header. */
static PyObject *mod_http_fingerprint(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *method, *path;
    Py_buffer body = {0};
    PyObject *hdrs = Py_None;
    if (!PyArg_ParseTuple(args, "ssy*|O", &method, &path, &body, &hdrs))
        return NULL;
    PyObject *fast = NULL;
    idem_header *h = NULL;
    Py_ssize_t n = 0;
    PyObject *res = NULL;
    if (hdrs != Py_None) {
        fast = PySequence_Fast(hdrs, "headers must be a sequence of (name, value) pairs");
        if (!fast)
            goto done;
        n = PySequence_Fast_GET_SIZE(fast);
        h = PyMem_Calloc(n ? (size_t)n : 1, sizeof *h);
        if (!h) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *pair = PySequence_Fast_GET_ITEM(fast, i);
            if (!PyArg_ParseTuple(pair, "sz", &h[i].name, &h[i].value))
                goto done;
        }
    }
    uint8_t out[IDEM_HTTP_FINGERPRINT_LEN];
    int rc = idem_http_fingerprint(out, method, path, body.buf, (size_t)body.len, h, (size_t)n);
    res = rc == IDEM_OK ? PyBytes_FromStringAndSize((const char *)out, sizeof out) : raise_idem(rc);
done:
    PyMem_Free(h);
    Py_XDECREF(fast);
    PyBuffer_Release(&body);
    return res;
}

/* http_error_answer(code) -> answer for an IdempotencyError raised before
 * anything ran: 503 for a store failure, 500 for the rest. */
static PyObject *mod_http_error_answer(PyObject *mod, PyObject *args)
{
    (void)mod;
    int code;
    if (!PyArg_ParseTuple(args, "i", &code))
        return NULL;
    if (code >= 0 || code == IDEM_EKEY) {
        PyErr_SetString(PyExc_ValueError, "code must be a negative error code other than EKEY");
        return NULL;
    }
    idem_reply reply = {0};
    idem_http_answer ans;
    int rc = idem_http_answer_make(&ans, code, &reply);
    PyObject *res = rc == IDEM_OK ? answer_to_tuple(&ans) : raise_idem(rc);
    idem_http_answer_clear(&ans);
    return res;
}

/* http_problem(status, detail=None) -> an RFC 9457 answer of our own. */
static PyObject *mod_http_problem(PyObject *mod, PyObject *args)
{
    (void)mod;
    int status;
    const char *detail = NULL;
    if (!PyArg_ParseTuple(args, "i|z", &status, &detail))
        return NULL;
    idem_http_answer ans;
    int rc = idem_http_answer_problem(&ans, status, detail);
    PyObject *res = rc == IDEM_OK ? answer_to_tuple(&ans) : raise_idem(rc);
    idem_http_answer_clear(&ans);
    return res;
}

static PyMethodDef module_methods[] = {
    {"http_key_parse", mod_http_key_parse, METH_VARARGS,
     "http_key_parse(lines, key_size) -> (key, None) or (None, (400, headers, body))"},
    {"http_fingerprint", mod_http_fingerprint, METH_VARARGS,
     "http_fingerprint(method, path, body, headers=None) -> bytes"},
    {"http_error_answer", mod_http_error_answer, METH_VARARGS,
     "http_error_answer(code) -> (status, headers, body) for an error before anything ran"},
    {"http_problem", mod_http_problem, METH_VARARGS,
     "http_problem(status, detail=None) -> (status, headers, body), an RFC 9457 document"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "idempotency._idempotency",
    .m_doc = "libidempotency's C API for the idempotency package.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* One exception class: added to the module and kept in *slot. */
static int add_exception(PyObject *m, PyObject **slot, const char *name, const char *doc,
                         PyObject *base)
{
    char qualified[96];
    snprintf(qualified, sizeof qualified, "idempotency.%s", name);
    *slot = PyErr_NewExceptionWithDoc(qualified, doc, base, NULL);
    if (!*slot)
        return -1;
    Py_INCREF(*slot);
    return PyModule_AddObject(m, name, *slot) < 0 ? (Py_DECREF(*slot), -1) : 0;
}

PyMODINIT_FUNC PyInit__idempotency(void);

PyMODINIT_FUNC PyInit__idempotency(void)
{
    if (PyType_Ready(&ReplyType) < 0 || PyType_Ready(&LayerType) < 0 || PyType_Ready(&ClaimType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    PyObject *value_bases = NULL;
    if (add_exception(m, &IdempotencyError, "IdempotencyError",
                      "An error of libidempotency; .code is its IDEM_E* code.", PyExc_Exception) < 0)
        goto fail;
    value_bases = PyTuple_Pack(2, IdempotencyError, PyExc_ValueError);
    if (!value_bases ||
        add_exception(m, &InvalidArgument, "InvalidArgument",
                      "A key, URL or option the library refuses (IDEM_EINVAL).", value_bases) < 0 ||
        add_exception(m, &BackendError, "BackendError",
                      "The store is unreachable or failing (IDEM_EBACKEND).", IdempotencyError) < 0 ||
        add_exception(m, &ClaimLost, "ClaimLost",
                      "The lease ended and another request took the key (IDEM_ELOST).",
                      IdempotencyError) < 0 ||
        add_exception(m, &CorruptRecord, "CorruptRecord",
                      "The store holds a record this library did not write (IDEM_ECORRUPT).",
                      IdempotencyError) < 0 ||
        add_exception(m, &ResponseTooLarge, "ResponseTooLarge",
                      "The response is over the layer's or the store's limit (IDEM_ETOOBIG).",
                      IdempotencyError) < 0 ||
        add_exception(m, &Unsupported, "Unsupported",
                      "Not supported by this build or this store (IDEM_EUNSUPPORTED).",
                      IdempotencyError) < 0)
        goto fail;
    Py_CLEAR(value_bases);

    Py_INCREF(&LayerType);
    if (PyModule_AddObject(m, "Layer", (PyObject *)&LayerType) < 0) {
        Py_DECREF(&LayerType);
        goto fail;
    }
    Py_INCREF(&ClaimType);
    if (PyModule_AddObject(m, "Claim", (PyObject *)&ClaimType) < 0) {
        Py_DECREF(&ClaimType);
        goto fail;
    }
    Py_INCREF(&ReplyType);
    if (PyModule_AddObject(m, "Reply", (PyObject *)&ReplyType) < 0) {
        Py_DECREF(&ReplyType);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "EXECUTED", IDEM_EXECUTED) < 0 ||
        PyModule_AddIntConstant(m, "REPLAYED", IDEM_REPLAYED) < 0 ||
        PyModule_AddIntConstant(m, "IN_PROGRESS", IDEM_IN_PROGRESS) < 0 ||
        PyModule_AddIntConstant(m, "MISMATCH", IDEM_MISMATCH) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", IDEM_FAILED) < 0 ||
        PyModule_AddIntConstant(m, "EBACKEND", IDEM_EBACKEND) < 0 ||
        PyModule_AddIntConstant(m, "ETOOBIG", IDEM_ETOOBIG) < 0 ||
        PyModule_AddIntConstant(m, "HTTP_FINGERPRINT_LEN", IDEM_HTTP_FINGERPRINT_LEN) < 0)
        goto fail;
    {
        char version[32];
        snprintf(version, sizeof version, "%d.%d.%d", IDEM_VERSION_MAJOR, IDEM_VERSION_MINOR,
                 IDEM_VERSION_PATCH);
        if (PyModule_AddStringConstant(m, "LIBRARY_VERSION", version) < 0)
            goto fail;
    }
    return m;
fail:
    Py_XDECREF(value_bases);
    Py_DECREF(m);
    return NULL;
}
