/* The versioned record encoding (layout in <idempotency/backend.h>). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define RECORD_VERSION       1   /* STARTED records, and COMPLETED ones without header fields */
#define RECORD_VERSION_FIELDS 2  /* COMPLETED records with header fields (since 0.2) */
#define RECORD_VERSION_CHECKPOINT 3 /* STARTED records with a checkpoint (since 0.3) */
#define FLAG_FINGERPRINT     0x01u
#define OFF_FLAGS            6
#define OFF_ZERO             7
#define OFF_DIGEST           32
#define OFF_STATUS           IDEM_RECORD_HEADER_LEN
#define OFF_BODY_LEN         (IDEM_RECORD_HEADER_LEN + 4)
#define OFF_NFIELDS          (IDEM_RECORD_HEADER_LEN + 8)   /* format 2 */
#define OFF_FIELDS_ZERO      (IDEM_RECORD_HEADER_LEN + 10)
#define OFF_FIELDS_LEN       (IDEM_RECORD_HEADER_LEN + 12)
#define OFF_CP_KEPT          IDEM_RECORD_HEADER_LEN          /* format 3 */
#define OFF_CP_NAME_LEN      (IDEM_RECORD_HEADER_LEN + 4)
#define OFF_CP_ZERO          (IDEM_RECORD_HEADER_LEN + 6)
#define OFF_CP_DATA_LEN      (IDEM_RECORD_HEADER_LEN + 8)
#define MAX_NAME_LEN         255
#define MIN_STATUS           100
#define MAX_STATUS           999

static const uint8_t magic[4] = {'I', 'D', 'E', 'M'};

static void put_be32(uint8_t *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* ---- header fields ---- */

/* tchar of RFC 9110, section 5.6.2. */
bool idem__is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

bool idem__header_name_ok(const char *name, size_t len)
{
    if (len == 0 || len > MAX_NAME_LEN)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!idem__is_tchar((unsigned char)name[i]))
            return false;
    return true;
}

bool idem__header_value_ok(const char *value, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (value[i] == '\0' || value[i] == '\r' || value[i] == '\n')
            return false;
    return true;
}

/*
 * Format 2 encodes each field as name length (2 bytes, big-endian), value
 * length (2 bytes), the name, the value.
 */
int idem__headers_check(const idem_header *h, size_t n, size_t *fields_len)
{
    *fields_len = 0;
    if (!h && n)
        return idem_error_set(IDEM_EINVAL, "header fields are NULL but their count is %zu", n);
    if (n > IDEM_MAX_HEADERS)
        return idem_error_set(IDEM_ETOOBIG, "the response has %zu header fields; the limit is %d "
                              "(IDEM_MAX_HEADERS)", n, IDEM_MAX_HEADERS);
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (!h[i].name || !h[i].value)
            return idem_error_set(IDEM_EINVAL, "header field %zu has a NULL name or value", i);
        size_t nl = strlen(h[i].name), vl = strlen(h[i].value);
        if (!idem__header_name_ok(h[i].name, nl))
            return idem_error_set(IDEM_EINVAL, "header field %zu: a name must be 1 to %d letters, "
                                  "digits, backquotes or !#$%%&'*+-.^_|~ (an RFC 9110 token)", i,
                                  MAX_NAME_LEN);
        if (!idem__header_value_ok(h[i].value, vl))
            return idem_error_set(IDEM_EINVAL, "header field %zu (%s): a value must not hold CR or LF",
                                  i, h[i].name);
        bytes += nl + vl;
        if (bytes > IDEM_MAX_HEADERS_LEN)
            return idem_error_set(IDEM_ETOOBIG, "the response's header fields take more than %d bytes "
                                  "of names and values (IDEM_MAX_HEADERS_LEN)", IDEM_MAX_HEADERS_LEN);
    }
    *fields_len = bytes + 4 * n;
    return IDEM_OK;
}

/* One block: n idem_header, then each name and value NUL-terminated. */
static int headers_block(size_t n, size_t strings, idem_header **out, char **text)
{
    *out = NULL;
    if (n == 0)
        return IDEM_OK;
    idem_header *h = malloc(n * sizeof *h + strings);
    if (!h)
        return idem_error_set(IDEM_ENOMEM, "out of memory copying %zu header fields", n);
    *out = h;
    *text = (char *)(h + n);
    return IDEM_OK;
}

static const char *put_string(char **text, const void *s, size_t len)
{
    char *at = *text;
    memcpy(at, s, len);
    at[len] = '\0';
    *text = at + len + 1;
    return at;
}

int idem__headers_copy(const idem_header *src, size_t n, idem_header **out)
{
    size_t strings = 0;
    for (size_t i = 0; i < n; i++)
        strings += strlen(src[i].name) + strlen(src[i].value) + 2;
    char *text = NULL;
    int rc = headers_block(n, strings, out, &text);
    for (size_t i = 0; rc == IDEM_OK && i < n; i++) {
        (*out)[i].name = put_string(&text, src[i].name, strlen(src[i].name));
        (*out)[i].value = put_string(&text, src[i].value, strlen(src[i].value));
    }
    return rc;
}

int idem__headers_from_record(const idem_record *rec, idem_header **out)
{
    size_t n = rec->nheaders;
    char *text = NULL;
    /* 4 bytes of lengths per field become 2 NULs */
    int rc = headers_block(n, rec->fields_len - 2 * n, out, &text);
    const uint8_t *p = rec->fields;
    for (size_t i = 0; rc == IDEM_OK && i < n; i++) {
        size_t nl = get_be16(p), vl = get_be16(p + 2);
        (*out)[i].name = put_string(&text, p + 4, nl);
        (*out)[i].value = put_string(&text, p + 4 + nl, vl);
        p += 4 + nl + vl;
    }
    return rc;
}

/* The encoded length of the fields of rec (0 for none). */
static size_t fields_len(const idem_record *rec)
{
    if (rec->nheaders == 0)
        return 0;
    if (rec->fields)
        return rec->fields_len;
    size_t len = 0;
    for (size_t i = 0; i < rec->nheaders; i++)
        len += 4 + strlen(rec->headers[i].name) + strlen(rec->headers[i].value);
    return len;
}

/* Are the len bytes at p n well-formed fields? */
static bool fields_ok(const uint8_t *p, size_t len, size_t n)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        if (len < 4)
            return false;
        size_t nl = get_be16(p), vl = get_be16(p + 2);
        if (len - 4 < nl + vl || !idem__header_name_ok((const char *)p + 4, nl) ||
            !idem__header_value_ok((const char *)p + 4 + nl, vl))
            return false;
        bytes += nl + vl;
        p += 4 + nl + vl;
        len -= 4 + nl + vl;
    }
    return len == 0 && bytes <= IDEM_MAX_HEADERS_LEN;
}

/* ---- records ---- */

size_t idem__record_len(const idem_record *rec)
{
    if (rec->state != IDEM_STATE_COMPLETED)
        return rec->cp_name_len ? IDEM_RECORD_CHECKPOINT_OVERHEAD + rec->cp_name_len + rec->cp_len
                                : IDEM_RECORD_HEADER_LEN;
    if (rec->nheaders == 0)
        return IDEM_RECORD_COMPLETED_OVERHEAD + rec->body_len;
    return IDEM_RECORD_FIELDS_OVERHEAD + fields_len(rec) + rec->body_len;
}

void idem__record_write(const idem_record *rec, uint8_t *p)
{
    bool completed = rec->state == IDEM_STATE_COMPLETED;
    memcpy(p, magic, sizeof magic);
    p[4] = RECORD_VERSION;
    p[IDEM_RECORD_STATE_OFFSET] = (uint8_t)rec->state;
    p[OFF_FLAGS] = rec->has_fingerprint ? FLAG_FINGERPRINT : 0;
    p[OFF_ZERO] = 0;
    memcpy(p + IDEM_RECORD_TOKEN_OFFSET, rec->token, IDEM_TOKEN_LEN);
    put_be64(p + IDEM_RECORD_DEADLINE_OFFSET, completed ? 0 : rec->deadline_ms);
    if (rec->has_fingerprint)
        memcpy(p + OFF_DIGEST, rec->digest, IDEM_DIGEST_LEN);
    else
        memset(p + OFF_DIGEST, 0, IDEM_DIGEST_LEN);
    if (!completed && rec->cp_name_len) {
        /* Format 3: 0.2 readers refuse it as IDEM_ECORRUPT, never misread it. */
        p[4] = RECORD_VERSION_CHECKPOINT;
        put_be32(p + OFF_CP_KEPT, rec->kept_ms);
        put_be16(p + OFF_CP_NAME_LEN, (uint16_t)rec->cp_name_len);
        put_be16(p + OFF_CP_ZERO, 0);
        put_be32(p + OFF_CP_DATA_LEN, (uint32_t)rec->cp_len);
        memcpy(p + IDEM_RECORD_CHECKPOINT_OVERHEAD, rec->cp_name, rec->cp_name_len);
        if (rec->cp_len)
            memcpy(p + IDEM_RECORD_CHECKPOINT_OVERHEAD + rec->cp_name_len, rec->cp_data, rec->cp_len);
    }
    if (completed) {
        put_be32(p + OFF_STATUS, (uint32_t)rec->status);
        put_be32(p + OFF_BODY_LEN, (uint32_t)rec->body_len);
        size_t body_at = IDEM_RECORD_COMPLETED_OVERHEAD;
        if (rec->nheaders) {
            /* Format 2: 0.1.0 readers check the version byte and refuse the
             * record with IDEM_ECORRUPT, never misread it. */
            p[4] = RECORD_VERSION_FIELDS;
            size_t flen = fields_len(rec);
            put_be16(p + OFF_NFIELDS, (uint16_t)rec->nheaders);
            put_be16(p + OFF_FIELDS_ZERO, 0);
            put_be32(p + OFF_FIELDS_LEN, (uint32_t)flen);
            uint8_t *f = p + IDEM_RECORD_FIELDS_OVERHEAD;
            if (rec->fields) {
                memcpy(f, rec->fields, flen);
            } else {
                for (size_t i = 0; i < rec->nheaders; i++) {
                    size_t nl = strlen(rec->headers[i].name), vl = strlen(rec->headers[i].value);
                    put_be16(f, (uint16_t)nl);
                    put_be16(f + 2, (uint16_t)vl);
                    memcpy(f + 4, rec->headers[i].name, nl);
                    memcpy(f + 4 + nl, rec->headers[i].value, vl);
                    f += 4 + nl + vl;
                }
            }
            body_at = IDEM_RECORD_FIELDS_OVERHEAD + flen;
        }
        if (rec->body_len)
            memcpy(p + body_at, rec->body, rec->body_len);
    }
}

int idem__record_encode(const idem_record *rec, uint8_t **out, size_t *out_len)
{
    size_t len = idem__record_len(rec);
    uint8_t *p = malloc(len);
    if (!p)
        return IDEM_ENOMEM;
    idem__record_write(rec, p);
    *out = p;
    *out_len = len;
    return IDEM_OK;
}

int idem_record_build(void **out, size_t *out_len, int state, const uint8_t *token,
                      uint64_t deadline_ms, int status, const void *body, size_t body_len)
{
    if (!out || !out_len || !token)
        return idem_error_set(IDEM_EINVAL, "idem_record_build: out, out_len and token must not be NULL");
    idem_record rec = {.state = state, .deadline_ms = deadline_ms};
    memcpy(rec.token, token, IDEM_TOKEN_LEN);
    if (state == IDEM_STATE_STARTED) {
        if (deadline_ms == 0)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: a STARTED record needs a lease deadline");
    } else if (state == IDEM_STATE_COMPLETED) {
        if (status < MIN_STATUS || status > MAX_STATUS)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: status %d is out of range; use %d..%d",
                                  status, MIN_STATUS, MAX_STATUS);
        if ((!body && body_len) || body_len > UINT32_MAX)
            return idem_error_set(IDEM_EINVAL, "idem_record_build: a body of %zu bytes at %p cannot be "
                                  "stored", body_len, body);
        rec.status = status;
        rec.body = body;
        rec.body_len = body_len;
    } else {
        return idem_error_set(IDEM_EINVAL, "idem_record_build: state must be IDEM_STATE_STARTED or "
                              "IDEM_STATE_COMPLETED, not %d", state);
    }
    uint8_t *p;
    if (idem__record_encode(&rec, &p, out_len) != IDEM_OK)
        return idem_error_set(IDEM_ENOMEM, "idem_record_build: out of memory encoding a %zu-byte body",
                              body_len);
    *out = p;
    return IDEM_OK;
}

int idem_record_peek(const void *buf, size_t len, idem_record_info *out)
{
    const uint8_t *p = buf;
    if (!p || !out || len < IDEM_RECORD_HEADER_LEN || memcmp(p, magic, sizeof magic) != 0 ||
        p[4] < RECORD_VERSION || p[4] > RECORD_VERSION_CHECKPOINT)
        return IDEM_ECORRUPT;
    int state = p[IDEM_RECORD_STATE_OFFSET];
    bool v2 = p[4] == RECORD_VERSION_FIELDS, v3 = p[4] == RECORD_VERSION_CHECKPOINT;
    if (state == IDEM_STATE_STARTED ? v2 || (v3 ? len < IDEM_RECORD_CHECKPOINT_OVERHEAD + 1
                                                : len != IDEM_RECORD_HEADER_LEN)
        : state == IDEM_STATE_COMPLETED ? v3 || len < (v2 ? IDEM_RECORD_FIELDS_OVERHEAD
                                                    : IDEM_RECORD_COMPLETED_OVERHEAD)
        : true)
        return IDEM_ECORRUPT;
    out->state = state;
    out->token = p + IDEM_RECORD_TOKEN_OFFSET;
    out->deadline_ms = get_be64(p + IDEM_RECORD_DEADLINE_OFFSET);
    return IDEM_OK;
}

int idem__record_decode(const void *buf, size_t len, idem_record *rec)
{
    const uint8_t *p = buf;
    idem_record_info info;
    if (idem_record_peek(buf, len, &info) != IDEM_OK)
        return IDEM_ECORRUPT;
    if ((p[OFF_FLAGS] & ~FLAG_FINGERPRINT) != 0 || p[OFF_ZERO] != 0)
        return IDEM_ECORRUPT;
    memset(rec, 0, sizeof *rec);
    rec->state = info.state;
    memcpy(rec->token, info.token, IDEM_TOKEN_LEN);
    rec->deadline_ms = info.deadline_ms;
    rec->has_fingerprint = (p[OFF_FLAGS] & FLAG_FINGERPRINT) != 0;
    memcpy(rec->digest, p + OFF_DIGEST, IDEM_DIGEST_LEN);
    if (!rec->has_fingerprint)
        for (int i = 0; i < IDEM_DIGEST_LEN; i++)
            if (rec->digest[i])
                return IDEM_ECORRUPT;
    if (info.state == IDEM_STATE_STARTED) {
        if (info.deadline_ms == 0)
            return IDEM_ECORRUPT;
        if (p[4] != RECORD_VERSION_CHECKPOINT)
            return IDEM_OK;
        size_t nl = get_be16(p + OFF_CP_NAME_LEN), dl = get_be32(p + OFF_CP_DATA_LEN);
        if (nl == 0 || nl > IDEM_CHECKPOINT_NAME_MAX || dl > IDEM_CHECKPOINT_MAX ||
            get_be16(p + OFF_CP_ZERO) != 0 || len != IDEM_RECORD_CHECKPOINT_OVERHEAD + nl + dl ||
            memchr(p + IDEM_RECORD_CHECKPOINT_OVERHEAD, '\0', nl))
            return IDEM_ECORRUPT;
        rec->kept_ms = get_be32(p + OFF_CP_KEPT);
        rec->cp_name = (const char *)p + IDEM_RECORD_CHECKPOINT_OVERHEAD;
        rec->cp_name_len = nl;
        rec->cp_data = p + IDEM_RECORD_CHECKPOINT_OVERHEAD + nl;
        rec->cp_len = dl;
        return IDEM_OK;
    }
    if (info.deadline_ms != 0)
        return IDEM_ECORRUPT;
    uint32_t status = get_be32(p + OFF_STATUS);
    uint32_t body_len = get_be32(p + OFF_BODY_LEN);
    size_t body_at = IDEM_RECORD_COMPLETED_OVERHEAD;
    if (p[4] == RECORD_VERSION_FIELDS) {
        size_t n = get_be16(p + OFF_NFIELDS);
        size_t flen = get_be32(p + OFF_FIELDS_LEN);
        if (n == 0 || n > IDEM_MAX_HEADERS || get_be16(p + OFF_FIELDS_ZERO) != 0 ||
            flen > len - IDEM_RECORD_FIELDS_OVERHEAD ||
            !fields_ok(p + IDEM_RECORD_FIELDS_OVERHEAD, flen, n))
            return IDEM_ECORRUPT;
        rec->nheaders = n;
        rec->fields = p + IDEM_RECORD_FIELDS_OVERHEAD;
        rec->fields_len = flen;
        body_at = IDEM_RECORD_FIELDS_OVERHEAD + flen;
    }
    if (status < MIN_STATUS || status > MAX_STATUS || body_len != len - body_at)
        return IDEM_ECORRUPT;
    rec->status = (int)status;
    rec->body = p + body_at;
    rec->body_len = body_len;
    return IDEM_OK;
}
