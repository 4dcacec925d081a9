/*
 * http_bench: requests per second through examples/payment_api, with the
 * idempotency layer and with it switched off (--no-idempotency), on each
 * store, at 1 and 8 concurrent clients. Path "new": every request is a new
 * payment (a new key), which costs the store two round trips. Path
 * "replay": each client sends one key again and again, as a retrying
 * client does; one round trip (a read) after the first.
 *
 *   http_bench --api build/examples/payment_api [--seconds S] [--stores sqlite,redis]
 *              [--clients 1,8] [--quick]
 *
 * Each client is a thread with one keep-alive libcurl connection. The
 * server and its store (a SQLite file, or a redis-server the harness starts
 * on a free port) are started afresh for every row. Prints a Markdown
 * table; exits 1 when a row served no request or a request failed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "harness.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

typedef struct client {
    uint16_t port;
    int      id;
    double   until;
    bool     replay;
    double  *lat;       /* seconds per request */
    size_t   n, cap;
    unsigned errors;
} client;

static atomic_uint run_id;

static size_t sink(char *p, size_t size, size_t n, void *arg)
{
    (void)p, (void)arg;
    return size * n;
}

static void *drive(void *arg)
{
    client *c = arg;
    CURL *h = curl_easy_init();
    char url[64], key[96];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/payments", c->port);
    unsigned run = atomic_load(&run_id);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, "{\"amount\": 100}");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 30L);
    for (unsigned long i = 0; now_s() < c->until; i++) {
        snprintf(key, sizeof key, "Idempotency-Key: \"bench-%u-%d-%lu-%ld\"", run, c->id,
                 c->replay ? 0 : i, (long)getpid());
        struct curl_slist *hl = curl_slist_append(NULL, key);
        hl = curl_slist_append(hl, "Content-Type: application/json");
        hl = curl_slist_append(hl, "Expect:");
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
        double t0 = now_s();
        CURLcode rc = curl_easy_perform(h);
        double dt = now_s() - t0;
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        curl_slist_free_all(hl);
        if (rc != CURLE_OK || status != 201) {
            c->errors++;
            continue;
        }
        if (c->n == c->cap) {
            c->cap = c->cap ? c->cap * 2 : 4096;
            c->lat = realloc(c->lat, c->cap * sizeof *c->lat);
        }
        c->lat[c->n++] = dt;
    }
    curl_easy_cleanup(h);
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One row: start the store and the server, drive it, print, stop. */
static int row(const char *api, const char *store, bool layer, bool replay, int clients,
               double seconds)
{
    idem_test_server srv;
    if (idem_test_server_start(&srv, store) != 0)
        return 1;
    uint16_t port = idem_test_free_port();
    char portstr[16], log[4200];
    snprintf(portstr, sizeof portstr, "%u", port);
    snprintf(log, sizeof log, "%s/payment_api.log", srv.dir);
    char *argv[] = {(char *)api, "--url", srv.url, "--port", portstr, "--name", "bench",
                    layer ? NULL : "--no-idempotency", NULL};
    pid_t pid = idem_test_spawn(argv, log);
    if (pid <= 0 || !idem_test_wait_port(port, 10000)) {
        fprintf(stderr, "http_bench: payment_api did not start (%s)\n", log);
        idem_test_stop_pid(pid, 2000);
        idem_test_server_stop(&srv);
        return 1;
    }
    atomic_fetch_add(&run_id, 1);
    client *c = calloc((size_t)clients, sizeof *c);
    pthread_t *t = calloc((size_t)clients, sizeof *t);
    double start = now_s(), until = start + seconds;
    for (int i = 0; i < clients; i++) {
        c[i] = (client){.port = port, .id = i, .until = until, .replay = replay};
        pthread_create(&t[i], NULL, drive, &c[i]);
    }
    size_t total = 0;
    unsigned errors = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(t[i], NULL);
        total += c[i].n;
        errors += c[i].errors;
    }
    double elapsed = now_s() - start;
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < clients; i++) {
        memcpy(all + k, c[i].lat, c[i].n * sizeof *all);
        k += c[i].n;
        free(c[i].lat);
    }
    qsort(all, total, sizeof *all, cmp);
    double p50 = total ? all[total / 2] * 1e6 : 0, p99 = total ? all[total * 99 / 100] * 1e6 : 0;
    printf("| %s | %s | %s | %d | %.0f | %.0f | %.0f | %u |\n", store, layer ? "on" : "off",
           layer ? (replay ? "replay" : "new") : "-", clients,
           (double)total / elapsed, p50, p99, errors);
    fflush(stdout);
    free(all);
    free(c);
    free(t);
    idem_test_stop_pid(pid, 5000);
    idem_test_server_stop(&srv);
    return total == 0 || errors ? 1 : 0;
}

int main(int argc, char **argv)
{
    const char *api = NULL;
    char stores[256] = "sqlite,redis", counts[64] = "1,8";
    double seconds = 10;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--api") == 0 && i + 1 < argc)
            api = argv[++i];
        else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--stores") == 0 && i + 1 < argc)
            snprintf(stores, sizeof stores, "%s", argv[++i]);
        else if (strcmp(argv[i], "--clients") == 0 && i + 1 < argc)
            snprintf(counts, sizeof counts, "%s", argv[++i]);
        else if (strcmp(argv[i], "--quick") == 0)
            seconds = 1;
        else {
            fprintf(stderr, "usage: http_bench --api PATH [--seconds S] [--stores sqlite,redis] "
                            "[--clients 1,8] [--quick]\n");
            return 2;
        }
    }
    if (!api || seconds <= 0) {
        fprintf(stderr, "http_bench: --api names examples/payment_api\n");
        return 2;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    printf("| store | layer | path | clients | requests/s | p50 µs | p99 µs | errors |\n"
           "|---|---|---|--:|--:|--:|--:|--:|\n");
    int failed = 0;
    for (char *s = strtok(stores, ","); s; s = strtok(NULL, ",")) {
        char list[64];
        snprintf(list, sizeof list, "%s", counts);
        char *save;
        for (char *n = strtok_r(list, ",", &save); n; n = strtok_r(NULL, ",", &save)) {
            failed |= row(api, s, false, false, atoi(n), seconds);
            failed |= row(api, s, true, false, atoi(n), seconds);
            failed |= row(api, s, true, true, atoi(n), seconds);
        }
    }
    curl_global_cleanup();
    return failed;
}
