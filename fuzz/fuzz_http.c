/*
 * Fuzz target: the Idempotency-Key parser (idem_http_key_parse), on field
 * values a client may send, and the answer built from its refusal.
 *
 * The input is one field value, or two when it holds a NUL (the second
 * after it). Besides the sanitizers' checks: a key that parses is 1..255
 * bytes of printable ASCII, NUL-terminated; written back as an sf-string it
 * parses to the same key; a bare value that parses is the key itself; a
 * refusal is IDEM_EKEY with a reason that quotes nothing of the input and
 * makes a 400 problem answer.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <idempotency/http.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size + 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    const char *lines[2] = {buf, NULL};
    size_t n = 1, first = strlen(buf);
    if (first < size) {
        lines[1] = buf + first + 1;
        n = 2;
    }

    char key[256];
    size_t len = 0;
    int rc = idem_http_key_parse(key, sizeof key, &len, lines, n);
    if (rc == IDEM_OK) {
        if (n != 1 || len == 0 || len > 255 || key[len] != '\0' || strlen(key) != len)
            abort();
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)key[i] < 0x20 || (unsigned char)key[i] > 0x7e)
                abort();
        /* back as an sf-string: the same key */
        char quoted[2 * 255 + 3], again[256];
        size_t q = 0, len2 = 0;
        quoted[q++] = '"';
        for (size_t i = 0; i < len; i++) {
            if (key[i] == '"' || key[i] == '\\')
                quoted[q++] = '\\';
            quoted[q++] = key[i];
        }
        quoted[q++] = '"';
        quoted[q] = '\0';
        const char *one[1] = {quoted};
        if (idem_http_key_parse(again, sizeof again, &len2, one, 1) != IDEM_OK || len2 != len ||
            memcmp(again, key, len) != 0)
            abort();
        if (buf[0] != '"' && buf[0] != ' ' && buf[0] != '\t' && !strpbrk(buf, ";\" \t") &&
            (len != first || memcmp(key, buf, len) != 0))
            abort(); /* a bare value is the key itself */
    } else {
        if (rc != IDEM_EKEY)
            abort();
        const char *why = idem_last_error();
        if (!why[0] || (first >= 8 && strstr(why, buf)))
            abort(); /* a reason for the client never echoes the request */
        idem_http_answer ans;
        if (idem_http_answer_make(&ans, rc, NULL) != IDEM_OK || ans.status != 400 || ans.body_len == 0)
            abort();
        idem_http_answer_clear(&ans);
    }
    free(buf);
    return 0;
}
