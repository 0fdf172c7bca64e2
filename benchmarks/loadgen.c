/*
 * Load generator for the tpmbroker provider: C threads calling EVP_DigestSign on one
 * EVP_PKEY, as nginx workers or any libcrypto program would. Used by tests/test_provider.py
 * and by the benchmark, `python -m benchmarks` (both compile it on the spot with cc
 * against the system libcrypto; the tpmbroker package neither ships nor needs it).
 *
 *   loadgen stress MODDIR KEY PUB THREADS ITERS CHILDREN CHILD_THREADS
 *       loads KEY once, signs once, forks CHILDREN processes, then every process signs
 *       with THREADS (children: CHILD_THREADS) threads ITERS times each through the one
 *       EVP_PKEY; every signature is verified with PUB by the default provider.
 *   loadgen outage MODDIR KEY PUB
 *       signs, waits for a line on stdin (the broker is stopped meanwhile), signs again
 *       (must fail fast), waits for another line (broker restarted), signs again.
 *   loadgen watch MODDIR KEY PUB
 *       signs and verifies every 10 ms until stdin closes, printing "ok|fail|bad T" per
 *       signature, T being CLOCK_MONOTONIC seconds: a long-lived signer across broker
 *       crashes and restarts (tests/test_broker_life.py).
 *   loadgen timed MODDIR KEY PUB THREADS SECONDS [decrypt|derive INPUT EXPECTED]
 *       THREADS threads sign for SECONDS, verifying one signature in 50; prints a line per
 *       thread ("thread I signed N failed F bad B"), one "latencies_us" line with every
 *       signature's latency and "window_us W", the microseconds from the start to the
 *       last thread's end. Each thread signs once before the start, uncounted: a key's
 *       first use on a connection is set-up (LOAD), not the steady state. With decrypt or derive, they decrypt the ciphertext in the
 *       file INPUT (EVP_PKEY_decrypt, PKCS#1 v1.5) or derive with the peer public key in
 *       the PEM file INPUT (EVP_PKEY_derive) instead, each through a fresh EVP_PKEY_CTX
 *       as TLS does, one result in 50 compared with the bytes of the file EXPECTED.
 *
 * Exit status 0 only when every signature that should work did and verified.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>

static EVP_PKEY *key, *pub, *peer;
static enum { SIGN, DECRYPT, DERIVE } op = SIGN;
static unsigned char input[4096], expected[4096];
static size_t input_len, expected_len;
static int iters;
static const char *mdname = "SHA256";
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;
static long signed_ok, failures, bad;

static void errors_line(char *out, size_t cap)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *p;
    long n;

    ERR_print_errors(b);
    n = BIO_get_mem_data(b, &p);
    if (n < 0)
        n = 0;
    if ((size_t)n >= cap)
        n = (long)cap - 1;
    memcpy(out, p, (size_t)n);
    out[n] = '\0';
    for (p = out; *p; p++)
        if (*p == '\n')
            *p = ' ';
    BIO_free(b);
}

/* timed mode: each thread's counts and latencies, written only by that thread */
typedef struct {
    long signed_ok, failed, bad, busy;
    long *lat_us;
    size_t n_lat, cap_lat;
} THREAD_TALLY;

static THREAD_TALLY *tallies;
static int64_t stop_at_us;
static pthread_barrier_t warmed, go; /* every thread's first operation done; the start */

static int64_t now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/*
 * 1 signed (and, when `check`, verified), 0 signing failed, -1 did not verify. A signing
 * error goes to `err` when given, else to stderr unless `quiet`.
 */
/* Whether the last signing error of this thread was tpmbroker's BUSY. */
static __thread int last_busy;

static int sign_once(unsigned long tag, int check, char *err, size_t errcap, int quiet)
{
    unsigned char msg[64], sig[1024];
    size_t siglen = sizeof(sig), msglen;
    EVP_MD_CTX *s = EVP_MD_CTX_new();
    int rc = 0;

    msglen = (size_t)snprintf((char *)msg, sizeof(msg), "message %d/%lu", (int)getpid(), tag);
    if (EVP_DigestSignInit_ex(s, NULL, mdname, NULL, NULL, key, NULL) != 1
        || EVP_DigestSign(s, sig, &siglen, msg, msglen) != 1) {
        char line[1024];

        errors_line(line, sizeof(line));
        last_busy = strstr(line, "tpmbroker is busy") != NULL;
        if (err != NULL)
            snprintf(err, errcap, "%s", line);
        else if (!quiet)
            fprintf(stderr, "%s\n", line);
        goto end;
    }
    last_busy = 0;
    rc = 1;
    if (check) {
        EVP_MD_CTX *v = EVP_MD_CTX_new();

        if (EVP_DigestVerifyInit_ex(v, NULL, mdname, NULL, NULL, pub, NULL) != 1
            || EVP_DigestVerify(v, sig, siglen, msg, msglen) != 1) {
            rc = -1;
            ERR_print_errors_fp(stderr);
        }
        EVP_MD_CTX_free(v);
    }
end:
    ERR_clear_error();
    EVP_MD_CTX_free(s);
    return rc;
}

/* 1 decrypted or derived (and, when `check`, the result is `expected`), 0 failed, -1
 * a wrong result. */
static int operate_once(int check)
{
    unsigned char out[1024];
    size_t out_len = sizeof(out);
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, key, NULL);
    int ok, rc = 0;

    if (op == DECRYPT)
        ok = c != NULL && EVP_PKEY_decrypt_init(c) == 1
             && EVP_PKEY_decrypt(c, out, &out_len, input, input_len) == 1;
    else
        ok = c != NULL && EVP_PKEY_derive_init(c) == 1 && EVP_PKEY_derive_set_peer(c, peer) == 1
             && EVP_PKEY_derive(c, out, &out_len) == 1;
    if (!ok) {
        char line[1024];

        errors_line(line, sizeof(line));
        last_busy = strstr(line, "tpmbroker is busy") != NULL;
    } else {
        last_busy = 0;
        rc = check && (out_len != expected_len || memcmp(out, expected, out_len) != 0) ? -1 : 1;
    }
    ERR_clear_error();
    EVP_PKEY_CTX_free(c);
    return rc;
}

static int read_file(const char *path, unsigned char *buf, size_t cap, size_t *len)
{
    FILE *f = fopen(path, "rb");

    if (f == NULL)
        return 0;
    *len = fread(buf, 1, cap, f);
    fclose(f);
    return *len > 0 && *len < cap;
}

static int busy_refusal(void)
{
    return last_busy;
}

static int sign_verify(unsigned long tag, char *err, size_t errcap)
{
    return sign_once(tag, 1, err, errcap, 0);
}

static void *timed_worker(void *arg)
{
    THREAD_TALLY *t = &tallies[(size_t)arg];
    unsigned long n = 0;

    if (op == SIGN) /* uncounted; a failure here shows again below */
        sign_once((unsigned long)(size_t)arg * 100000000ul + 99999999ul, 0, NULL, 0, 1);
    else
        operate_once(0);
    pthread_barrier_wait(&warmed);
    pthread_barrier_wait(&go);
    while (now_us() < stop_at_us) {
        int64_t t0 = now_us();
        int r = op == SIGN ? sign_once((unsigned long)(size_t)arg * 100000000ul + n,
                                       n % 50 == 0, NULL, 0, 1)
                           : operate_once(n % 50 == 0);

        n++;
        if (r == 0) {
            /* The broker's fail-fast refusal: a well-behaved client backs off and tries
             * again later; it is not a failure (docs/broker.md, Fail fast). */
            if (busy_refusal()) {
                struct timespec pause = { 0, 200000000L + (long)(n % 7) * 50000000L };

                t->busy++;
                nanosleep(&pause, NULL);
            } else {
                t->failed++;
            }
            continue;
        }
        if (r < 0)
            t->bad++;
        t->signed_ok++;
        if (t->n_lat == t->cap_lat) {
            size_t cap = t->cap_lat ? t->cap_lat * 2 : 4096;
            long *grown = realloc(t->lat_us, cap * sizeof(*grown));

            if (grown == NULL)
                continue;
            t->lat_us = grown;
            t->cap_lat = cap;
        }
        t->lat_us[t->n_lat++] = (long)(now_us() - t0);
    }
    return NULL;
}

static int timed(int n, double seconds)
{
    pthread_t *th = calloc((size_t)n, sizeof(*th));
    int i, ok = 1;
    size_t j;

    int64_t started;

    tallies = calloc((size_t)n, sizeof(*tallies));
    if (th == NULL || tallies == NULL || pthread_barrier_init(&warmed, NULL, (unsigned)n + 1)
        || pthread_barrier_init(&go, NULL, (unsigned)n + 1))
        return 1;
    for (i = 0; i < n; i++)
        if (pthread_create(&th[i], NULL, timed_worker, (void *)(size_t)i) != 0)
            return 1;
    pthread_barrier_wait(&warmed);
    started = now_us();
    stop_at_us = started + (int64_t)(seconds * 1e6);
    pthread_barrier_wait(&go);
    for (i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    printf("window_us %lld\n", (long long)(now_us() - started));
    for (i = 0; i < n; i++) {
        printf("thread %d signed %ld failed %ld bad %ld busy %ld\n", i, tallies[i].signed_ok,
               tallies[i].failed, tallies[i].bad, tallies[i].busy);
        ok = ok && tallies[i].failed == 0 && tallies[i].bad == 0;
    }
    printf("latencies_us");
    for (i = 0; i < n; i++)
        for (j = 0; j < tallies[i].n_lat; j++)
            printf(" %ld", tallies[i].lat_us[j]);
    printf("\n");
    for (i = 0; i < n; i++)
        free(tallies[i].lat_us);
    free(tallies);
    free(th);
    return ok ? 0 : 1;
}

static void *worker(void *arg)
{
    unsigned long id = (unsigned long)(size_t)arg;
    int i;

    for (i = 0; i < iters; i++) {
        int r = sign_verify(id * 1000000ul + (unsigned long)i, NULL, 0);

        pthread_mutex_lock(&count_lock);
        if (r == 1)
            signed_ok++;
        else if (r == 0)
            failures++;
        else
            bad++;
        pthread_mutex_unlock(&count_lock);
    }
    return NULL;
}

static int run_threads(int n)
{
    pthread_t *t = calloc((size_t)n, sizeof(*t));
    int i;

    for (i = 0; i < n; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)(size_t)i) != 0)
            return 0;
    for (i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    free(t);
    printf("pid %d threads %d signed %ld failed %ld bad %ld\n", (int)getpid(), n, signed_ok,
           failures, bad);
    fflush(stdout);
    return failures == 0 && bad == 0 && signed_ok == (long)n * iters;
}

static EVP_PKEY *read_key(const char *path, int private)
{
    BIO *b = BIO_new_file(path, "r");
    EVP_PKEY *k;

    if (b == NULL)
        return NULL;
    k = private ? PEM_read_bio_PrivateKey_ex(b, NULL, NULL, NULL, NULL, NULL)
                : PEM_read_bio_PUBKEY_ex(b, NULL, NULL, NULL, NULL, NULL);
    BIO_free(b);
    return k;
}

static int wait_line(void)
{
    char line[64];

    fflush(stdout);
    return fgets(line, sizeof(line), stdin) != NULL;
}

static int outage(void)
{
    static char err[8192];
    int64_t t0;
    int r;

    r = sign_verify(1, err, sizeof(err));
    printf("first %s\n", r == 1 ? "ok" : "fail");
    if (r != 1)
        return 1;
    printf("stop the broker\n");
    if (!wait_line())
        return 1;
    t0 = now_us();
    r = sign_verify(2, err, sizeof(err));
    printf("down %s %lld ms: %s\n", r == 1 ? "ok" : "fail", (long long)((now_us() - t0) / 1000), err);
    printf("start the broker\n");
    if (!wait_line())
        return 1;
    err[0] = '\0';
    r = sign_verify(3, err, sizeof(err));
    printf("up %s: %s\n", r == 1 ? "ok" : "fail", err);
    fflush(stdout);
    return r == 1 ? 0 : 1;
}

static int watch(void)
{
    unsigned long n = 0;
    struct timespec ts, pause = { 0, 10 * 1000 * 1000 };
    int r;

    for (;;) {
        struct timeval tv = { 0, 0 };
        fd_set in;

        FD_ZERO(&in);
        FD_SET(0, &in);
        if (select(1, &in, NULL, NULL, &tv) > 0) /* stdin readable: closed, or a line */
            return 0;
        r = sign_once(++n, 1, NULL, 0, 1);
        clock_gettime(CLOCK_MONOTONIC, &ts);
        printf("%s %lld.%06ld\n", r == 1 ? "ok" : r == 0 ? "fail" : "bad", (long long)ts.tv_sec,
               ts.tv_nsec / 1000);
        fflush(stdout);
        nanosleep(&pause, NULL);
    }
}

int main(int argc, char **argv)
{
    int children, i, ok;
    pid_t *pids;

    if (argc < 5) {
        fprintf(stderr, "usage: see the comment at the top\n");
        return 2;
    }
    if (getenv("LOADGEN_MD") != NULL)
        mdname = getenv("LOADGEN_MD");
    OSSL_PROVIDER_set_default_search_path(NULL, argv[2]);
    if (OSSL_PROVIDER_load(NULL, "default") == NULL
        || OSSL_PROVIDER_load(NULL, "tpmbroker") == NULL) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    key = read_key(argv[3], 1);
    pub = read_key(argv[4], 0);
    if (key == NULL || pub == NULL) {
        ERR_print_errors_fp(stderr);
        return 2;
    }
    if (strcmp(argv[1], "outage") == 0)
        return outage();
    if (strcmp(argv[1], "watch") == 0)
        return watch();
    if (strcmp(argv[1], "timed") == 0 && argc == 7)
        return timed(atoi(argv[5]), atof(argv[6]));
    if (strcmp(argv[1], "timed") == 0 && argc == 10) {
        op = strcmp(argv[7], "decrypt") == 0 ? DECRYPT : strcmp(argv[7], "derive") == 0 ? DERIVE
                                                                                        : SIGN;
        if (op == SIGN || !read_file(argv[9], expected, sizeof(expected), &expected_len)
            || (op == DECRYPT && !read_file(argv[8], input, sizeof(input), &input_len))
            || (op == DERIVE && (peer = read_key(argv[8], 0)) == NULL)) {
            fprintf(stderr, "timed: cannot read %s or %s for %s\n", argv[8], argv[9], argv[7]);
            return 2;
        }
        return timed(atoi(argv[5]), atof(argv[6]));
    }
    if (strcmp(argv[1], "stress") != 0 || argc != 9)
        return 2;
    iters = atoi(argv[6]);
    children = atoi(argv[7]);
    /* the parent holds an open broker connection when it forks */
    if (sign_verify(0, NULL, 0) != 1)
        return 1;
    fflush(stdout);
    pids = calloc((size_t)children + 1, sizeof(*pids));
    for (i = 0; i < children; i++) {
        pids[i] = fork();
        if (pids[i] == 0)
            _exit(run_threads(atoi(argv[8])) ? 0 : 1);
        if (pids[i] < 0)
            return 1;
    }
    ok = run_threads(atoi(argv[5]));
    for (i = 0; i < children; i++) {
        int status;

        if (waitpid(pids[i], &status, 0) != pids[i] || !WIFEXITED(status)
            || WEXITSTATUS(status) != 0) {
            printf("child %d failed\n", (int)pids[i]);
            ok = 0;
        }
    }
    free(pids);
    EVP_PKEY_free(key);
    EVP_PKEY_free(pub);
    return ok ? 0 : 1;
}
