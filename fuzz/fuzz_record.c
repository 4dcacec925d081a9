/*
 * Fuzz target: the record decoder (idem__record_decode) and the header
 * reader drivers use (idem_record_peek), on bytes a store may hand back,
 * whoever wrote them.
 *
 * Besides the sanitizers' checks: peek and decode agree, a decoded body
 * lies inside the input, and a record that decodes re-encodes to one that
 * decodes to the same fields.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A copy of exactly size bytes, so reading past it is caught. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    if (size)
        memcpy(buf, data, size);

    idem_record_info info;
    int peek = idem_record_peek(buf, size, &info);
    if (peek == IDEM_OK) {
        if (info.state != IDEM_STATE_STARTED && info.state != IDEM_STATE_COMPLETED)
            abort();
        if (info.token != buf + IDEM_RECORD_TOKEN_OFFSET)
            abort();
    } else if (peek != IDEM_ECORRUPT) {
        abort();
    }

    idem_record rec;
    int dec = idem__record_decode(buf, size, &rec);
    if (dec == IDEM_OK) {
        if (peek != IDEM_OK || rec.state != info.state)
            abort(); /* decode accepted what peek refused */
        if (rec.state == IDEM_STATE_COMPLETED) {
            if (rec.status < 0 || rec.status > 999)
                abort();
            if (rec.body < buf || rec.body + rec.body_len != buf + size)
                abort(); /* the body must be the rest of the input */
        }
        uint8_t *enc;
        size_t enc_len;
        if (idem__record_encode(&rec, &enc, &enc_len) == IDEM_OK) {
            idem_record again;
            if (idem__record_decode(enc, enc_len, &again) != IDEM_OK || again.state != rec.state ||
                memcmp(again.token, rec.token, IDEM_TOKEN_LEN) != 0 ||
                again.has_fingerprint != rec.has_fingerprint ||
                (rec.has_fingerprint && memcmp(again.digest, rec.digest, IDEM_DIGEST_LEN) != 0) ||
                again.status != rec.status || again.body_len != rec.body_len ||
                (rec.body_len && memcmp(again.body, rec.body, rec.body_len) != 0) ||
                again.nheaders != rec.nheaders || again.fields_len != rec.fields_len ||
                (rec.fields_len && memcmp(again.fields, rec.fields, rec.fields_len) != 0) ||
                (rec.state == IDEM_STATE_STARTED && again.deadline_ms != rec.deadline_ms))
                abort(); /* encode and decode disagree */
            free(enc);
        }
    } else if (dec != IDEM_ECORRUPT) {
        abort();
    }
    free(buf);
    return 0;
}
