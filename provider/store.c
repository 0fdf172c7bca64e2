/*
 * Store loader for persistent TPM keys: `handle:0x81000001`, or `handle:0x81000001?pass`
 * when the key has a password (asked through the passphrase callback, as tpm2-openssl does).
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/params.h>

#include "provider.h"

typedef struct store_ctx {
    TPMBROKER_CTX *prov;
    uint32_t handle;
    int need_pass;
    int done;
} STORE_CTX;

static void *store_open(void *provctx, const char *uri)
{
    STORE_CTX *ctx;
    const char *p;
    char *end;
    unsigned long h;

    if (OPENSSL_strncasecmp(uri, "handle:", 7) != 0)
        return NULL;
    p = uri + 7;
    h = strtoul(p, &end, 0);
    if (end == p || (*end != '\0' && strcmp(end, "?pass") != 0)
        || (h & 0xff000000ul) != 0x81000000ul || h > 0xfffffffful) {
        TPMB_RAISE(provctx, TPMB_R_INVALID_ARGUMENT,
                   "%s: give a persistent handle, e.g. handle:0x81000001 (add ?pass if the "
                   "key has a password)", uri);
        return NULL;
    }
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return NULL;
    ctx->prov = provctx;
    ctx->handle = (uint32_t)h;
    ctx->need_pass = *end != '\0';
    return ctx;
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
