/* Responses, which a handler fills, and replies, which a caller gets. */
#include <stdlib.h>
#include <string.h>

#include "layer.h"

void idem_reply_clear(idem_reply *reply)
{
    if (!reply)
        return;
    free(reply->body);
    free(reply->headers);
    memset(reply, 0, sizeof *reply);
}

bool idem_reply_ran(const idem_reply *reply)
{
    return reply && (reply->outcome == IDEM_EXECUTED || reply->outcome == IDEM_FAILED);
}

int idem__reply_body(idem_reply *reply, const void *body, size_t len)
{
    reply->body = malloc(len + 1);
    if (!reply->body)
        return idem_error_set(IDEM_ENOMEM, "out of memory copying a %zu-byte response", len);
    if (len)
        memcpy(reply->body, body, len);
    reply->body[len] = '\0';
    reply->body_len = len;
    return IDEM_OK;
}

/* IDEM_OK if (status, body, len) is a response this layer can store. */
int idem__check_response(const idem_layer *l, int status, const void *body, size_t len)
{
    if (status < MIN_STATUS || status > MAX_STATUS)
        return idem_error_set(IDEM_EINVAL, "response status %d is out of range; use %d..%d",
                              status, MIN_STATUS, MAX_STATUS);
    if (!body && len)
        return idem_error_set(IDEM_EINVAL, "response body is NULL but its length is %zu", len);
    if (len > l->max_body)
        return idem_error_set(IDEM_ETOOBIG, "response body is %zu bytes; the limit is %zu (%s)", len,
                              l->max_body,
                              l->store_limits ? "the largest item the store accepts"
                                              : "idem_options.max_response_len");
    return IDEM_OK;
}

/* IDEM_OK if a body of len bytes and header fields of fields_len bytes fit
 * in one record of the store. */
int idem__check_fields_fit(const idem_layer *l, size_t fields_len, size_t len)
{
    size_t cap = idem__store_max_record_len(l->store);
    if (fields_len == 0 || cap == SIZE_MAX || IDEM_RECORD_FIELDS_OVERHEAD + fields_len + len <= cap)
        return IDEM_OK;
    return idem_error_set(IDEM_ETOOBIG, "a %zu-byte body with %zu bytes of header fields is over the "
                          "largest item the store accepts (%zu bytes)", len, fields_len, cap);
}

/* IDEM_OK if a claim's response (status, header fields, body) is one layer
 * l can store, from this process; else the first check's error. */
int idem__check_completion(const idem_layer *l, int status, const idem_header *headers, size_t nheaders,
                           const void *body, size_t len)
{
    size_t fields_len;
    int rc = idem__headers_check(headers, nheaders, &fields_len);
    if (rc == IDEM_OK)
        rc = idem__check_response(l, status, body, len);
    if (rc == IDEM_OK)
        rc = idem__check_fields_fit(l, fields_len, len);
    if (rc == IDEM_OK)
        rc = idem__store_check_process(l->store);
    return rc;
}

/* The fields are kept in one block, copied anew for each field added (at
 * most IDEM_MAX_HEADERS), so the reply can take the block as it is. */
int idem_response_add_header(idem_response *resp, const char *name, const char *value)
{
    if (!resp)
        return idem_error_set(IDEM_EINVAL, "idem_response_add_header: resp is NULL");
    size_t n = resp->nheaders, fields_len;
    idem_header list[IDEM_MAX_HEADERS + 1];
    if (n >= IDEM_MAX_HEADERS)
        return idem_error_set(IDEM_ETOOBIG, "the response has %d header fields already; the limit "
                              "is %d (IDEM_MAX_HEADERS)", IDEM_MAX_HEADERS, IDEM_MAX_HEADERS);
    if (n)
        memcpy(list, resp->headers, n * sizeof *list);
    list[n] = (idem_header){.name = name, .value = value};
    idem_header *block;
    int rc = idem__headers_check(list, n + 1, &fields_len);
    if (rc == IDEM_OK)
        rc = idem__check_fields_fit(resp->layer, fields_len, resp->len);
    if (rc == IDEM_OK)
        rc = idem__headers_copy(list, n + 1, &block);
    if (rc)
        return rc;
    free(resp->headers);
    resp->headers = block;
    resp->nheaders = n + 1;
    resp->fields_len = fields_len;
    return IDEM_OK;
}

int idem_response_set(idem_response *resp, int status, const void *body, size_t len)
{
    if (!resp)
        return idem_error_set(IDEM_EINVAL, "idem_response_set: resp is NULL");
    int rc = idem__check_response(resp->layer, status, body, len);
    if (rc == IDEM_OK)
        rc = idem__check_fields_fit(resp->layer, resp->fields_len, len);
    if (rc)
        return rc;
    unsigned char *copy = malloc(len + 1);
    if (!copy)
        return idem_error_set(IDEM_ENOMEM, "out of memory copying a %zu-byte response", len);
    if (len)
        memcpy(copy, body, len);
    copy[len] = '\0';
    free(resp->body);
    resp->status = status;
    resp->body = copy;
    resp->len = len;
    return IDEM_OK;
}

int idem_response_extend(idem_response *resp, uint32_t lease_ms)
{
    idem__error_clear();
    if (!resp || !resp->claim)
        return idem_error_set(IDEM_EINVAL, "idem_response_extend: resp is NULL or not a running handler's");
    idem_claim *c = resp->claim;
    pthread_mutex_lock(&c->mu);
    int rc = idem__claim_extend_locked(c, lease_ms ? lease_ms : c->layer->opts.lease_ms);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

uint32_t idem_response_lease_left_ms(const idem_response *resp)
{
    if (!resp || !resp->claim)
        return 0;
    idem_claim *c = resp->claim;
    pthread_mutex_lock(&c->mu);
    uint64_t now = idem__mono_ms();
    uint64_t left = c->lost || c->lease_end <= now ? 0 : c->lease_end - now;
    pthread_mutex_unlock(&c->mu);
    return left > UINT32_MAX ? UINT32_MAX : (uint32_t)left;
}
