/*
 * SHA-1 and SHA-2 digests, computed in software in the provider's private library context,
 * for the setups tpm2-openssl users know: `-provider tpmbroker -provider base` has no digest
 * at all, and `req -x509 -addext basicConstraints=...` needs SHA-1 for the subject key
 * identifier. tpm2-openssl offers its digests too (hashed by the TPM).
 *
 * They never stand in for another provider's: provider.c offers them only while neither
 * the default nor the FIPS provider is available to the application, so hashing stays
 * where it was (in the FIPS provider on a FIPS site) whatever the order or -propquery.
 */
#include <stdlib.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "provider.h"

typedef struct {
    EVP_MD_CTX *md_ctx;
} DIGEST_CTX;

static void *digest_newctx(TPMBROKER_CTX *prov, const char *name)
{
    DIGEST_CTX *ctx = calloc(1, sizeof(*ctx));
    EVP_MD *md = EVP_MD_fetch(prov->libctx, name, NULL);

    if (ctx == NULL || md == NULL || (ctx->md_ctx = EVP_MD_CTX_new()) == NULL
        || !EVP_DigestInit_ex2(ctx->md_ctx, md, NULL)) {
        if (ctx != NULL)
            EVP_MD_CTX_free(ctx->md_ctx);
        free(ctx);
        EVP_MD_free(md);
        TPMB_RAISE(prov, TPMB_R_INTERNAL, "digest %s: not in the private library context", name);
        return NULL;
    }
    EVP_MD_free(md); /* the context holds its own reference */
    return ctx;
}

static void digest_freectx(void *vctx)
{
    DIGEST_CTX *ctx = vctx;

    if (ctx != NULL)
        EVP_MD_CTX_free(ctx->md_ctx);
    free(ctx);
}

static void *digest_dupctx(void *vctx)
{
    DIGEST_CTX *from = vctx, *ctx = calloc(1, sizeof(*ctx));

    if (ctx == NULL || (ctx->md_ctx = EVP_MD_CTX_new()) == NULL
        || !EVP_MD_CTX_copy_ex(ctx->md_ctx, from->md_ctx)) {
        digest_freectx(ctx);
        return NULL;
    }
    return ctx;
}

static int digest_init(void *vctx, const OSSL_PARAM params[])
{
    DIGEST_CTX *ctx = vctx;

    (void)params;
    return EVP_DigestInit_ex2(ctx->md_ctx, NULL, NULL);
}

static int digest_update(void *vctx, const unsigned char *in, size_t inl)
{
    return EVP_DigestUpdate(((DIGEST_CTX *)vctx)->md_ctx, in, inl);
}

static int digest_final(void *vctx, unsigned char *out, size_t *outl, size_t outsz)
{
    DIGEST_CTX *ctx = vctx;
    unsigned int n = 0;

    if (outsz < (size_t)EVP_MD_CTX_get_size(ctx->md_ctx)
        || !EVP_DigestFinal_ex(ctx->md_ctx, out, &n))
        return 0;
    *outl = n;
    return 1;
}

static int digest_params(OSSL_PARAM params[], size_t size, size_t block_size)
{
    OSSL_PARAM *p;

    if ((p = OSSL_PARAM_locate(params, OSSL_DIGEST_PARAM_BLOCK_SIZE)) != NULL
        && !OSSL_PARAM_set_size_t(p, block_size))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_DIGEST_PARAM_SIZE)) != NULL
        && !OSSL_PARAM_set_size_t(p, size))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_DIGEST_PARAM_XOF)) != NULL
        && !OSSL_PARAM_set_int(p, 0))
        return 0;
    if ((p = OSSL_PARAM_locate(params, OSSL_DIGEST_PARAM_ALGID_ABSENT)) != NULL
        && !OSSL_PARAM_set_int(p, 0))
        return 0;
    return 1;
}

static const OSSL_PARAM *digest_gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_size_t(OSSL_DIGEST_PARAM_BLOCK_SIZE, NULL),
        OSSL_PARAM_size_t(OSSL_DIGEST_PARAM_SIZE, NULL),
        OSSL_PARAM_int(OSSL_DIGEST_PARAM_XOF, NULL),
        OSSL_PARAM_int(OSSL_DIGEST_PARAM_ALGID_ABSENT, NULL),
        OSSL_PARAM_END,
    };

    (void)provctx;
    return gettable;
}

/* One dispatch table per digest: OpenSSL's name in the private library context, sizes. */
#define DIGEST(id, name, size, block_size)                                                   \
    static void *id##_newctx(void *provctx)                                                  \
    {                                                                                        \
        return digest_newctx(provctx, name);                                                 \
    }                                                                                        \
    static int id##_get_params(OSSL_PARAM params[])                                          \
    {                                                                                        \
        return digest_params(params, size, block_size);                                      \
    }                                                                                        \
    const OSSL_DISPATCH tpmb_##id##_functions[] = {                                          \
        { OSSL_FUNC_DIGEST_NEWCTX, (void (*)(void))id##_newctx },                            \
        { OSSL_FUNC_DIGEST_INIT, (void (*)(void))digest_init },                              \
        { OSSL_FUNC_DIGEST_UPDATE, (void (*)(void))digest_update },                          \
        { OSSL_FUNC_DIGEST_FINAL, (void (*)(void))digest_final },                            \
        { OSSL_FUNC_DIGEST_FREECTX, (void (*)(void))digest_freectx },                        \
        { OSSL_FUNC_DIGEST_DUPCTX, (void (*)(void))digest_dupctx },                          \
        { OSSL_FUNC_DIGEST_GET_PARAMS, (void (*)(void))id##_get_params },                    \
        { OSSL_FUNC_DIGEST_GETTABLE_PARAMS, (void (*)(void))digest_gettable_params },        \
        { 0, NULL },                                                                         \
    }

DIGEST(sha1, "SHA1", 20, 64);
DIGEST(sha224, "SHA2-224", 28, 64);
DIGEST(sha256, "SHA2-256", 32, 64);
DIGEST(sha384, "SHA2-384", 48, 128);
DIGEST(sha512, "SHA2-512", 64, 128);
