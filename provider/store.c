/*
 * Store loader for persistent TPM keys, by the URIs tpm2-openssl users know:
 *   handle:0x81000001        the persistent handle itself;
 *   handle:0x01000010        an NV index holding a DER certificate (x509 -in, s_server -cert);
 *   object:PATH              a file tpm2-tools wrote with `tpm2_evictcontrol -o`: a
 *                            serialized ESYS_TR, whose first field is the TPM handle;
 * either with `?pass` when the key has a password (asked through the passphrase callback).
 *
 * A URI of ours that cannot be used still opens, and its load raises the reason: OpenSSL
 * tries its file loader on the same URI first and keeps that loader's errors unless a
 * loader opens, so refusing at open would bury our message under unrelated file errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include "provider.h"

#define PERSISTENT_FIRST 0x81000000ul
#define PERSISTENT_LAST 0x81fffffful
#define NV_FIRST 0x01000000ul
#define NV_LAST 0x01fffffful
#define MAX_OBJECT_FILE 4096 /* a serialized ESYS_TR with its public area is far smaller */

typedef struct store_ctx {
    TPMBROKER_CTX *prov;
    uint32_t handle;
    int need_pass;
    int nv;          /* an NV index: its contents are a certificate */
    int done;
    char error[512]; /* set: the URI cannot be used; raised at load (paths cut at 400) */
} STORE_CTX;

static int is_persistent(unsigned long h)
{
    return h >= PERSISTENT_FIRST && h <= PERSISTENT_LAST;
}

/* Splits a trailing "?pass" off `rest` into `path` (of `size` bytes); -1 if too long. */
static int take_pass(const char *rest, char *path, size_t size)
{
    size_t n = strlen(rest);
    int pass = n >= 5 && strcmp(rest + n - 5, "?pass") == 0;

    if (pass)
        n -= 5;
    if (n >= size)
        return -1;
    memcpy(path, rest, n);
    path[n] = '\0';
    return pass;
}

static void open_handle(STORE_CTX *ctx, const char *uri, const char *rest)
{
    char text[64];
    char *end;
    unsigned long h;
    int pass = take_pass(rest, text, sizeof(text));

    h = pass < 0 ? 0 : strtoul(text, &end, 0);
    if (pass < 0 || end == text || *end != '\0'
        || !(is_persistent(h) || (h >= NV_FIRST && h <= NV_LAST && !pass))) {
        snprintf(ctx->error, sizeof(ctx->error), "%.300s: give a persistent handle, e.g. "
                 "handle:0x81000001 (add ?pass if the key has a password), or an NV index "
                 "holding a certificate, e.g. handle:0x01000010", uri);
        return;
    }
    ctx->handle = (uint32_t)h;
    ctx->need_pass = pass;
    ctx->nv = !is_persistent(h);
}

static void open_object(STORE_CTX *ctx, const char *uri, const char *rest)
{
    char path[4096];
    uint8_t buf[MAX_OBJECT_FILE + 1];
    size_t n;
    FILE *f;
    unsigned long h;
    int pass = take_pass(rest, path, sizeof(path));

    if (pass < 0 || path[0] == '\0') {
        snprintf(ctx->error, sizeof(ctx->error), "%.400s: give the file tpm2_evictcontrol -o "
                 "wrote, e.g. object:key.tr (add ?pass if the key has a password)", uri);
        return;
    }
    f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(ctx->error, sizeof(ctx->error), "Could not open %.400s for reading", path);
        return;
    }
    n = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    if (n < 4 || n > MAX_OBJECT_FILE) {
        snprintf(ctx->error, sizeof(ctx->error), "Could not read %.400s: not a serialized TPM "
                 "object (%zu bytes)", path, n);
        return;
    }
    /* Esys_TR_Serialize writes the TPM handle first, big-endian. */
    h = (unsigned long)buf[0] << 24 | (unsigned long)buf[1] << 16
        | (unsigned long)buf[2] << 8 | buf[3];
    if (!is_persistent(h)) {
        snprintf(ctx->error, sizeof(ctx->error), "Could not read %.400s: it names TPM handle "
                 "0x%08lx, not a persistent key (0x81xxxxxx)", path, h);
        return;
    }
    ctx->handle = (uint32_t)h;
    ctx->need_pass = pass;
}

static void *store_open(void *provctx, const char *uri)
{
    STORE_CTX *ctx;

    if (OPENSSL_strncasecmp(uri, "handle:", 7) != 0
        && OPENSSL_strncasecmp(uri, "object:", 7) != 0)
        return NULL;
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return NULL;
    ctx->prov = provctx;
    if (OPENSSL_strncasecmp(uri, "handle:", 7) == 0)
        open_handle(ctx, uri, uri + 7);
    else
        open_object(ctx, uri, uri + 7);
    return ctx;
}

/* An NV index's contents, handed to OpenSSL as a DER certificate. */
static int load_certificate(STORE_CTX *ctx, OSSL_CALLBACK *object_cb, void *object_cbarg)
{
    CLIENT_ERR err;
    uint8_t *der = NULL;
    size_t len = 0;
    int object_type = OSSL_OBJECT_CERT, ok;
    OSSL_PARAM params[3];
    char what[64];

    snprintf(what, sizeof(what), "reading NV index 0x%08x", (unsigned int)ctx->handle);
    if (!client_nv_read(ctx->prov->client, ctx->handle, &der, &len, &err)) {
        TPMB_RAISE_CLIENT(ctx->prov, what, &err);
        return 0;
    }
    params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, der, len);
    params[2] = OSSL_PARAM_construct_end();
    ok = object_cb(params, object_cbarg);
    free(der);
    return ok;
}

static int store_load(void *vctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    STORE_CTX *ctx = vctx;
    uint8_t be[4];
    char pw[1024];
    size_t pwlen = 0;
    TPMB_KEY *key;
    int object_type = OSSL_OBJECT_PKEY, ok;
    OSSL_PARAM params[4];

    ctx->done = 1;
    if (ctx->error[0] != '\0') {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "%s", ctx->error);
        return 0;
    }
    if (ctx->nv)
        return load_certificate(ctx, object_cb, object_cbarg);
    if (!tpmb_fips_permits_keys(ctx->prov))
        return 0;
    if (ctx->need_pass) {
        OSSL_PARAM info[] = {
            OSSL_PARAM_utf8_string(OSSL_PASSPHRASE_PARAM_INFO, (char *)"TPM key", 0),
            OSSL_PARAM_END,
        };

        if (pw_cb == NULL || !pw_cb(pw, sizeof(pw), &pwlen, info, pw_cbarg)) {
            TPMB_RAISE(ctx->prov, TPMB_R_PASSWORD_NEEDED, "the TPM key needs its password: "
                       "give it with -passin");
            return 0;
        }
    }
    be[0] = (uint8_t)(ctx->handle >> 24);
    be[1] = (uint8_t)(ctx->handle >> 16);
    be[2] = (uint8_t)(ctx->handle >> 8);
    be[3] = (uint8_t)ctx->handle;
    key = tpmb_key_load(ctx->prov, WIRE_KEY_SOURCE_PERSISTENT_HANDLE, be, sizeof(be), (const uint8_t *)pw,
                        pwlen);
    OPENSSL_cleanse(pw, sizeof(pw));
    if (key == NULL)
        return 0;
    params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                 (char *)tpmb_key_type_name(key->type), 0);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key,
                                                  sizeof(key));
    params[3] = OSSL_PARAM_construct_end();
    ok = object_cb(params, object_cbarg);
    tpmb_key_free(key);
    return ok;
}

static int store_eof(void *vctx)
{
    return ((STORE_CTX *)vctx)->done;
}

static int store_close(void *vctx)
{
    free(vctx);
    return 1;
}

static int store_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    (void)vctx;
    (void)params;
    return 1;
}

static const OSSL_PARAM *store_settable_ctx_params(void *provctx)
{
    static const OSSL_PARAM none[] = { OSSL_PARAM_END };

    (void)provctx;
    return none;
}

const OSSL_DISPATCH tpmb_store_functions[] = {
    { OSSL_FUNC_STORE_OPEN, (void (*)(void))store_open },
    { OSSL_FUNC_STORE_LOAD, (void (*)(void))store_load },
    { OSSL_FUNC_STORE_EOF, (void (*)(void))store_eof },
    { OSSL_FUNC_STORE_CLOSE, (void (*)(void))store_close },
    { OSSL_FUNC_STORE_SET_CTX_PARAMS, (void (*)(void))store_set_ctx_params },
    { OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, (void (*)(void))store_settable_ctx_params },
    { 0, NULL },
};
