/* Built against an installed libidempotency with pkg-config by .ci/install-check. */
#include <stdio.h>
#include <string.h>

#include <idempotency/http.h>
#include <idempotency/idempotency.h>

static int hello(void *arg, idem_response *resp)
{
    (void)arg;
    return idem_response_set(resp, 200, "hello", 5);
}

int main(int argc, char *argv[])
{
    idem_store *store;
    idem_layer *layer;
    idem_reply reply = {0};
    idem_request req = {.key = "k", .key_len = 1};
    if (argc != 2 || idem_store_open(&store, argv[1]) || idem_layer_new(&layer, store, NULL))
        return fprintf(stderr, "hello: %s\n", idem_last_error()), 2;
    int rc = idem_run(layer, &req, hello, NULL, &reply);
    idem_http_answer ans = {0};
    int ok = rc == IDEM_OK && reply.status == 200 && strcmp((char *)reply.body, "hello") == 0 &&
             idem_http_answer_make(&ans, rc, &reply) == IDEM_OK && ans.status == 200;
    idem_http_answer_clear(&ans);
    printf("%s: %s\n", idem_error_name(rc), ok ? (char *)reply.body : idem_last_error());
    idem_reply_clear(&reply);
    idem_layer_free(layer);
    idem_store_close(store);
    return ok ? 0 : 1;
}
