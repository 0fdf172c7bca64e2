/*
 * ECDH with TPM EC keys: `pkeyutl -derive`, CMS and S/MIME with EC recipients, any
 * EVP_PKEY_derive on a key of this provider's EC key management.
 *
 * The peer's public point goes to the broker in one DERIVE request; the TPM computes the
 * shared point (TPM2_ECDH_ZGen) and the broker answers Z, its x-coordinate. Without a KDF,
 * Z is the secret, as OpenSSL's own ECDH gives it. With one (kdf-type "X963KDF", as CMS
 * sets it, or any KDF by name), the KDF is fetched from the provider's private library
 * context and run on Z here; the parameter names are those of OpenSSL's ecdh_exch.c.
 *
 * This is not the ephemeral ECDH of ecdhe.c: that one is TPMBROKER-ECDH, for the
 * TPMBROKER-ECDHE software keys TLS key shares use. This one is TPMBROKER-TPM-ECDH, and
 * only the EC key management of TPM keys names it (keymgmt.c, query_operation_name), so
 * OpenSSL reaches it for TPM keys alone, and software keys keep their own provider's ECDH
 * whatever the provider order: no other provider registers either name.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "provider.h"

#define KDF_NAME_MAX 50
#define MAX_FIELD_BYTES 66 /* P-521 */

typedef struct exch_ctx {
    TPMBROKER_CTX *prov;
    TPMB_KEY *key;  /* not owned: the EVP_PKEY behind the operation keeps it alive */
    TPMB_KEY *peer; /* not owned, likewise */
    int cofactor_mode;              /* -1: the key's default; NIST curves have cofactor 1 */
    char kdf[KDF_NAME_MAX];         /* empty: none, Z is the secret */
    char kdf_md[KDF_NAME_MAX];      /* the KDF's digest */
    char kdf_md_props[KDF_NAME_MAX];
    size_t kdf_outlen;
    unsigned char *ukm;             /* the KDF's shared info (CMS: ECC-CMS-SharedInfo) */
    size_t ukmlen;
} EXCH_CTX;

static void *exch_newctx(void *provctx)
{
    EXCH_CTX *ctx = calloc(1, sizeof(*ctx));

    if (ctx != NULL) {
        ctx->prov = provctx;
        ctx->cofactor_mode = -1;
    }
    return ctx;
}

static void exch_freectx(void *vctx)
{
    EXCH_CTX *ctx = vctx;

    if (ctx == NULL)
        return;
    OPENSSL_clear_free(ctx->ukm, ctx->ukmlen);
    free(ctx);
}

static void *exch_dupctx(void *vctx)
{
    const EXCH_CTX *from = vctx;
    EXCH_CTX *ctx = malloc(sizeof(*ctx));

    if (ctx == NULL)
        return NULL;
    *ctx = *from;
    ctx->ukm = NULL;
    if (from->ukm != NULL && (ctx->ukm = OPENSSL_memdup(from->ukm, from->ukmlen)) == NULL) {
        free(ctx);
        return NULL;
    }
    return ctx;
}

static int exch_set_ctx_params(void *vctx, const OSSL_PARAM params[]);

static int exch_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    EXCH_CTX *ctx = vctx;
    TPMB_KEY *key = provkey;

    if (ctx == NULL || key == NULL || key->pub == NULL)
        return 0;
    if (key->type != WIRE_KEY_TYPE_EC) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "ECDH needs an EC key");
        return 0;
    }
    if (!tpmb_key_ready(ctx->prov, key, "to derive with it"))
        return 0;
    ctx->key = key;
    ctx->peer = NULL;
    ctx->cofactor_mode = -1;
    ctx->kdf[0] = ctx->kdf_md[0] = ctx->kdf_md_props[0] = '\0';
    ctx->kdf_outlen = 0;
    OPENSSL_clear_free(ctx->ukm, ctx->ukmlen);
    ctx->ukm = NULL;
    ctx->ukmlen = 0;
    return exch_set_ctx_params(ctx, params);
}

static int group_of(const TPMB_KEY *key, char *name, size_t size)
{
    return EVP_PKEY_get_utf8_string_param(key->pub, OSSL_PKEY_PARAM_GROUP_NAME, name, size,
                                          NULL);
}

static int exch_set_peer(void *vctx, void *provkey)
{
    EXCH_CTX *ctx = vctx;
    TPMB_KEY *peer = provkey;
    char mine[64], theirs[64];

    if (ctx == NULL || ctx->key == NULL || peer == NULL || peer->pub == NULL)
        return 0;
    if (peer->type != WIRE_KEY_TYPE_EC || !group_of(ctx->key, mine, sizeof(mine))
        || !group_of(peer, theirs, sizeof(theirs))) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "the peer key is not an EC key");
        return 0;
    }
    if (strcmp(mine, theirs) != 0) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "the peer key is on %s and the TPM key on %s: ECDH needs one curve",
                   theirs, mine);
        return 0;
    }
    ctx->peer = peer;
    return 1;
}

/* The key's field size in bytes: the length of Z. */
static size_t field_bytes(const TPMB_KEY *key)
{
    return (size_t)(key->bits + 7) / 8;
}

/* 04 || x || y of the peer's public key, each coordinate as long as the field. */
static int peer_point(EXCH_CTX *ctx, unsigned char *point, size_t *pointlen)
{
    size_t n = field_bytes(ctx->key);
    BIGNUM *x = NULL, *y = NULL;
    int ok;

    ok = n <= MAX_FIELD_BYTES
         && EVP_PKEY_get_bn_param(ctx->peer->pub, OSSL_PKEY_PARAM_EC_PUB_X, &x)
         && EVP_PKEY_get_bn_param(ctx->peer->pub, OSSL_PKEY_PARAM_EC_PUB_Y, &y)
         && BN_bn2binpad(x, point + 1, (int)n) == (int)n
         && BN_bn2binpad(y, point + 1 + n, (int)n) == (int)n;
    BN_free(x);
    BN_free(y);
    if (!ok) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "cannot read the peer's public point");
        return 0;
    }
    point[0] = 0x04;
    *pointlen = 1 + 2 * n;
    return 1;
}

/* Z from the broker: the TPM multiplies the peer's point by the key's private scalar. */
static int derive_z(EXCH_CTX *ctx, unsigned char *z, size_t *zlen)
{
    unsigned char point[1 + 2 * MAX_FIELD_BYTES];
    size_t pointlen, want = field_bytes(ctx->key);
    CLIENT_KEY ref;
    CLIENT_ERR err;

    if (!peer_point(ctx, point, &pointlen))
        return 0;
    tpmb_key_client_ref(ctx->key, &ref);
    *zlen = want;
    if (!client_derive(ctx->prov->client, &ref, point, pointlen, z, zlen, &err)) {
        TPMB_RAISE_CLIENT(ctx->prov, "ECDH with the TPM key", &err);
        return 0;
    }
    if (*zlen != want) {
        TPMB_RAISE(ctx->prov, TPMB_R_BROKER_PROTOCOL,
                   "the broker sent a %zu-byte shared secret for a %zu-byte field", *zlen,
                   want);
        OPENSSL_cleanse(z, *zlen);
        return 0;
    }
    return 1;
}

static int run_kdf(EXCH_CTX *ctx, const unsigned char *z, size_t zlen, unsigned char *out,
                   size_t outlen)
{
    EVP_KDF *kdf = EVP_KDF_fetch(tpmb_crypto_libctx(ctx->prov), ctx->kdf,
                                 tpmb_crypto_propq(ctx->prov));
    EVP_KDF_CTX *kctx = kdf != NULL ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM params[5], *p = params;
    int ok;

    *p++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, ctx->kdf_md, 0);
    if (ctx->kdf_md_props[0] != '\0')
        *p++ = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_PROPERTIES, ctx->kdf_md_props,
                                                0);
    *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)z, zlen);
    if (ctx->ukm != NULL)
        *p++ = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, ctx->ukm, ctx->ukmlen);
    *p = OSSL_PARAM_construct_end();
    ok = kctx != NULL && EVP_KDF_derive(kctx, out, outlen, params) > 0;
    if (!ok)
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "the KDF %s with digest %s failed on the "
                   "shared secret", ctx->kdf, ctx->kdf_md);
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return ok;
}

static int exch_derive(void *vctx, unsigned char *secret, size_t *secretlen, size_t outlen)
{
    EXCH_CTX *ctx = vctx;
    unsigned char z[MAX_FIELD_BYTES];
    size_t zlen = 0;
    int ok;

    if (ctx == NULL || ctx->key == NULL)
        return 0;
    if (ctx->kdf[0] == '\0') {
        /* As OpenSSL's ECDH: Z, cut to the buffer if that is shorter. */
        if (secret == NULL) {
            *secretlen = field_bytes(ctx->key);
            return 1;
        }
    } else {
        if (ctx->kdf_outlen == 0 || ctx->kdf_md[0] == '\0') {
            TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                       "a KDF needs kdf-digest and kdf-outlen");
            return 0;
        }
        if (secret == NULL) {
            *secretlen = ctx->kdf_outlen;
            return 1;
        }
        if (outlen < ctx->kdf_outlen) {
            TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                       "a buffer of %zu bytes for a KDF output of %zu", outlen,
                       ctx->kdf_outlen);
            return 0;
        }
    }
    if (ctx->peer == NULL) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "no peer key set");
        return 0;
    }
    if (!derive_z(ctx, z, &zlen))
        return 0;
    if (ctx->kdf[0] == '\0') {
        *secretlen = outlen < zlen ? outlen : zlen;
        memcpy(secret, z, *secretlen);
        ok = 1;
    } else {
        ok = run_kdf(ctx, z, zlen, secret, ctx->kdf_outlen);
        if (ok)
            *secretlen = ctx->kdf_outlen;
    }
    OPENSSL_cleanse(z, sizeof(z));
    return ok;
}

static int exch_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    EXCH_CTX *ctx = vctx;
    const OSSL_PARAM *p;
    char *s;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (p != NULL) {
        int mode;

        /* The curves a TPM has (NIST, BN, SM2) have cofactor 1: both modes agree. */
        if (!OSSL_PARAM_get_int(p, &mode) || mode < -1 || mode > 1)
            return 0;
        ctx->cofactor_mode = mode;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_TYPE);
    if (p != NULL) {
        s = ctx->kdf;
        if (!OSSL_PARAM_get_utf8_string(p, &s, sizeof(ctx->kdf)))
            return 0;
        /* OpenSSL's ECDH takes "" (none) and X963KDF; any KDF by name works here. */
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST);
    if (p != NULL) {
        s = ctx->kdf_md;
        if (!OSSL_PARAM_get_utf8_string(p, &s, sizeof(ctx->kdf_md)))
            return 0;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS);
    if (p != NULL) {
        s = ctx->kdf_md_props;
        if (!OSSL_PARAM_get_utf8_string(p, &s, sizeof(ctx->kdf_md_props)))
            return 0;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN);
    if (p != NULL && !OSSL_PARAM_get_size_t(p, &ctx->kdf_outlen))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_UKM);
    if (p != NULL) {
        void *ukm = NULL;
        size_t ukmlen = 0;

        if (!OSSL_PARAM_get_octet_string(p, &ukm, 0, &ukmlen))
            return 0;
        OPENSSL_clear_free(ctx->ukm, ctx->ukmlen);
        ctx->ukm = ukm;
        ctx->ukmlen = ukmlen;
    }
    return 1;
}

static const OSSL_PARAM exch_settable[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *exch_settable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return exch_settable;
}

static int exch_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    EXCH_CTX *ctx = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE);
    if (p != NULL && !OSSL_PARAM_set_int(p, ctx->cofactor_mode == 1))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_TYPE);
    if (p != NULL && !OSSL_PARAM_set_utf8_string(p, ctx->kdf))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST);
    if (p != NULL && !OSSL_PARAM_set_utf8_string(p, ctx->kdf_md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN);
    if (p != NULL && !OSSL_PARAM_set_size_t(p, ctx->kdf_outlen))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_EXCHANGE_PARAM_KDF_UKM);
    if (p != NULL && !OSSL_PARAM_set_octet_ptr(p, ctx->ukm, ctx->ukmlen))
        return 0;
    return 1;
}

static const OSSL_PARAM exch_gettable[] = {
    OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
    OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
    OSSL_PARAM_octet_ptr(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *exch_gettable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return exch_gettable;
}

const OSSL_DISPATCH tpmb_tpm_ecdh_keyexch_functions[] = {
    { OSSL_FUNC_KEYEXCH_NEWCTX, (void (*)(void))exch_newctx },
    { OSSL_FUNC_KEYEXCH_FREECTX, (void (*)(void))exch_freectx },
    { OSSL_FUNC_KEYEXCH_DUPCTX, (void (*)(void))exch_dupctx },
    { OSSL_FUNC_KEYEXCH_INIT, (void (*)(void))exch_init },
    { OSSL_FUNC_KEYEXCH_SET_PEER, (void (*)(void))exch_set_peer },
    { OSSL_FUNC_KEYEXCH_DERIVE, (void (*)(void))exch_derive },
    { OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, (void (*)(void))exch_set_ctx_params },
    { OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, (void (*)(void))exch_settable_ctx_params },
    { OSSL_FUNC_KEYEXCH_GET_CTX_PARAMS, (void (*)(void))exch_get_ctx_params },
    { OSSL_FUNC_KEYEXCH_GETTABLE_CTX_PARAMS, (void (*)(void))exch_gettable_ctx_params },
    { 0, NULL },
};
