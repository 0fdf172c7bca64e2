/*
 * RSA decryption with TPM keys (pkeyutl -decrypt, cms -decrypt, smime -decrypt):
 * PKCS#1 v1.5, OAEP (digest, MGF1 digest, label) and no padding, through the broker's
 * DECRYPT. The broker removes the padding in constant time; PKCS#1 v1.5 uses implicit
 * rejection by default (a bad padding gives a synthetic message, as OpenSSL 3.2 does),
 * which "implicit-rejection" = 0 turns off.
 *
 * Encryption needs only the public key: it runs in software (tpmb_crypto_libctx), with
 * the same parameters, so `pkeyutl -encrypt -inkey <TPM key>` works too.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include "provider.h"

#ifndef OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION /* OpenSSL 3.2's name; 3.0 lacks it */
#define OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION "implicit-rejection"
#endif

#define MDNAME_MAX 50

typedef struct cipher_ctx {
    TPMBROKER_CTX *prov;
    TPMB_KEY *key;         /* not owned: the EVP_PKEY behind the operation keeps it alive */
    int pad;               /* RSA_PKCS1_PADDING, RSA_PKCS1_OAEP_PADDING or RSA_NO_PADDING */
    char oaep_md[MDNAME_MAX];
    char mgf1_md[MDNAME_MAX]; /* empty: the OAEP digest */
    uint8_t *label;
    size_t labellen;
    unsigned int implicit_rejection;
} CIPHER_CTX;

static void *cipher_newctx(void *provctx)
{
    CIPHER_CTX *ctx = calloc(1, sizeof(*ctx));

    if (ctx == NULL)
        return NULL;
    ctx->prov = provctx;
    ctx->pad = RSA_PKCS1_PADDING;
    strcpy(ctx->oaep_md, "SHA1"); /* OpenSSL's OAEP default */
    ctx->implicit_rejection = 1;
    return ctx;
}

static void cipher_freectx(void *vctx)
{
    CIPHER_CTX *ctx = vctx;

    if (ctx == NULL)
        return;
    OPENSSL_free(ctx->label);
    free(ctx);
}

static void *cipher_dupctx(void *vctx)
{
    CIPHER_CTX *src = vctx, *dst = malloc(sizeof(*dst));

    if (dst == NULL)
        return NULL;
    *dst = *src;
    dst->label = NULL;
    if (src->label != NULL && (dst->label = OPENSSL_memdup(src->label, src->labellen)) == NULL) {
        free(dst);
        return NULL;
    }
    return dst;
}

static int cipher_set_ctx_params(void *vctx, const OSSL_PARAM params[]);

static int cipher_init(CIPHER_CTX *ctx, void *keydata, const OSSL_PARAM params[],
                       int need_private)
{
    TPMB_KEY *key = keydata;

    if (key == NULL && ctx->key == NULL)
        return 0;
    if (key != NULL)
        ctx->key = key;
    if (ctx->key->type != WIRE_KEY_TYPE_RSA) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "only RSA TPM keys encrypt and decrypt");
        return 0;
    }
    if (need_private && !tpmb_key_ready(ctx->prov, ctx->key, "to decrypt"))
        return 0;
    if (ctx->key->pub == NULL)
        return 0;
    return cipher_set_ctx_params(ctx, params);
}

static int cipher_encrypt_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return cipher_init(vctx, keydata, params, 0);
}

static int cipher_decrypt_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return cipher_init(vctx, keydata, params, 1);
}

static size_t modulus_size(const CIPHER_CTX *ctx)
{
    return (size_t)EVP_PKEY_get_size(ctx->key->pub);
}

/* The wire's hash id of a digest name, 0 if the broker has none such. */
static uint16_t wire_hash_of(CIPHER_CTX *ctx, const char *name)
{
    EVP_MD *md = EVP_MD_fetch(tpmb_crypto_libctx(ctx->prov), name, tpmb_crypto_propq(ctx->prov));
    uint16_t id = 0;

    if (md == NULL)
        return 0;
    if (EVP_MD_is_a(md, "SHA1"))
        id = WIRE_HASH_SHA1;
    else if (EVP_MD_is_a(md, "SHA2-256"))
        id = WIRE_HASH_SHA256;
    else if (EVP_MD_is_a(md, "SHA2-384"))
        id = WIRE_HASH_SHA384;
    else if (EVP_MD_is_a(md, "SHA2-512"))
        id = WIRE_HASH_SHA512;
    EVP_MD_free(md);
    return id;
}

/* Encryption: software, with the public key, in tpmb_crypto_libctx. */
static int cipher_encrypt(void *vctx, unsigned char *out, size_t *outlen, size_t outsize,
                          const unsigned char *in, size_t inlen)
{
    CIPHER_CTX *ctx = vctx;
    EVP_PKEY_CTX *pctx;
    int ok = 0;

    if (out == NULL) {
        *outlen = modulus_size(ctx);
        return 1;
    }
    pctx = EVP_PKEY_CTX_new_from_pkey(tpmb_crypto_libctx(ctx->prov), ctx->key->pub,
                                      tpmb_crypto_propq(ctx->prov));
    if (pctx == NULL || EVP_PKEY_encrypt_init(pctx) <= 0
        || EVP_PKEY_CTX_set_rsa_padding(pctx, ctx->pad) <= 0)
        goto end;
    if (ctx->pad == RSA_PKCS1_OAEP_PADDING) {
        uint8_t *label = NULL;

        if (EVP_PKEY_CTX_set_rsa_oaep_md_name(pctx, ctx->oaep_md, NULL) <= 0
            || EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, ctx->mgf1_md[0] != '\0' ? ctx->mgf1_md
                                                                           : ctx->oaep_md,
                                                 NULL) <= 0)
            goto end;
        if (ctx->labellen > 0) {
            label = OPENSSL_memdup(ctx->label, ctx->labellen);
            if (label == NULL
                || EVP_PKEY_CTX_set0_rsa_oaep_label(pctx, label, (int)ctx->labellen) <= 0) {
                OPENSSL_free(label);
                goto end;
            }
        }
    }
    *outlen = outsize;
    ok = EVP_PKEY_encrypt(pctx, out, outlen, in, inlen) > 0;
end:
    if (!ok)
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "RSA encryption with the TPM key's public key failed (input of %zu bytes)",
                   inlen);
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

static int cipher_decrypt(void *vctx, unsigned char *out, size_t *outlen, size_t outsize,
                          const unsigned char *in, size_t inlen)
{
    CIPHER_CTX *ctx = vctx;
    size_t k = modulus_size(ctx), plainlen;
    WIRE_DECRYPT_REQUEST d = { 0 };
    CLIENT_KEY ref;
    CLIENT_ERR err;
    uint8_t *plain;
    int ok = 0;

    if (out == NULL) {
        *outlen = k;
        return 1;
    }
    if (inlen != k) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "ciphertext of %zu bytes; this key's are %zu", inlen, k);
        return 0;
    }
    d.ciphertext = in;
    d.ciphertextlen = inlen;
    if (ctx->pad == RSA_PKCS1_PADDING) {
        d.padding = WIRE_PADDING_PKCS1;
        d.flags = ctx->implicit_rejection ? WIRE_DECRYPT_FLAG_IMPLICIT_REJECTION : 0;
    } else if (ctx->pad == RSA_NO_PADDING) {
        d.padding = WIRE_PADDING_NONE;
    } else {
        const char *mgf1 = ctx->mgf1_md[0] != '\0' ? ctx->mgf1_md : ctx->oaep_md;

        d.padding = WIRE_PADDING_OAEP;
        d.hash = wire_hash_of(ctx, ctx->oaep_md);
        d.mgf1_hash = wire_hash_of(ctx, mgf1);
        if (d.hash == 0 || d.mgf1_hash == 0) {
            TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                       "OAEP with %s and MGF1-%s: TPM keys decrypt OAEP with SHA-1, "
                       "SHA-256, SHA-384 and SHA-512", ctx->oaep_md, mgf1);
            return 0;
        }
        d.label = ctx->label;
        d.labellen = ctx->labellen;
    }
    plain = OPENSSL_malloc(k);
    if (plain == NULL) {
        TPMB_RAISE(ctx->prov, TPMB_R_MALLOC, "out of memory");
        return 0;
    }
    plainlen = k;
    tpmb_key_client_ref(ctx->key, &ref);
    if (!client_decrypt(ctx->prov->client, &ref, &d, plain, &plainlen, &err)) {
        if (err.status == WIRE_STATUS_BAD_DIGEST) /* the padding did not decode */
            TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                       "decrypting with the TPM key: %s", err.message);
        else
            TPMB_RAISE_CLIENT(ctx->prov, "decrypting with the TPM key", &err);
        tpmb_tell_refusal(ctx->key, "decrypting with the TPM key", &err);
        goto end;
    }
    if (plainlen > outsize) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "plaintext of %zu bytes does not fit the buffer of %zu", plainlen, outsize);
        goto end;
    }
    memcpy(out, plain, plainlen);
    *outlen = plainlen;
    ok = 1;
end:
    OPENSSL_clear_free(plain, k);
    return ok;
}

/* --- parameters ------------------------------------------------------------------------ */

static int parse_pad(CIPHER_CTX *ctx, const OSSL_PARAM *p)
{
    int pad;

    if (!tpmb_rsa_pad_mode(p, &pad))
        return 0;
    if (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_OAEP_PADDING && pad != RSA_NO_PADDING) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "RSA padding mode %d: TPM keys decrypt with pkcs1, oaep or none", pad);
        return 0;
    }
    ctx->pad = pad;
    return 1;
}

static int get_md_name(CIPHER_CTX *ctx, const OSSL_PARAM *p, char *out)
{
    const char *name;
    EVP_MD *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || strlen(name) >= MDNAME_MAX)
        return 0;
    md = EVP_MD_fetch(tpmb_crypto_libctx(ctx->prov), name, tpmb_crypto_propq(ctx->prov));
    if (md == NULL) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "unknown digest %s", name);
        return 0;
    }
    EVP_MD_free(md);
    strcpy(out, name);
    return 1;
}

static int cipher_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    CIPHER_CTX *ctx = vctx;
    const OSSL_PARAM *p;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != NULL && !parse_pad(ctx, p))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != NULL && !get_md_name(ctx, p, ctx->oaep_md))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST);
    if (p != NULL && !get_md_name(ctx, p, ctx->mgf1_md))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL);
    if (p != NULL) {
        void *label = NULL;
        size_t len = 0;

        if (!OSSL_PARAM_get_octet_string(p, &label, 0, &len))
            return 0;
        OPENSSL_free(ctx->label);
        ctx->label = label;
        ctx->labellen = len;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION);
    if (p != NULL && !OSSL_PARAM_get_uint(p, &ctx->implicit_rejection))
        return 0;
    return 1;
}

static const OSSL_PARAM settable_ctx[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *cipher_settable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return settable_ctx;
}

static int cipher_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    CIPHER_CTX *ctx = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != NULL) {
        if (p->data_type == OSSL_PARAM_UTF8_STRING) {
            const char *s = ctx->pad == RSA_PKCS1_OAEP_PADDING ? OSSL_PKEY_RSA_PAD_MODE_OAEP
                            : ctx->pad == RSA_NO_PADDING       ? OSSL_PKEY_RSA_PAD_MODE_NONE
                                                               : OSSL_PKEY_RSA_PAD_MODE_PKCSV15;

            if (!OSSL_PARAM_set_utf8_string(p, s))
                return 0;
        } else if (!OSSL_PARAM_set_int(p, ctx->pad)) {
            return 0;
        }
    }
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != NULL && !OSSL_PARAM_set_utf8_string(p, ctx->oaep_md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST);
    if (p != NULL && !OSSL_PARAM_set_utf8_string(p, ctx->mgf1_md[0] != '\0' ? ctx->mgf1_md
                                                                        : ctx->oaep_md))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL);
    if (p != NULL && !OSSL_PARAM_set_octet_ptr(p, ctx->label, ctx->labellen))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION);
    if (p != NULL && !OSSL_PARAM_set_uint(p, ctx->implicit_rejection))
        return 0;
    return 1;
}

static const OSSL_PARAM gettable_ctx[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_octet_ptr(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_IMPLICIT_REJECTION, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *cipher_gettable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return gettable_ctx;
}

const OSSL_DISPATCH tpmb_asym_cipher_functions[] = {
    { OSSL_FUNC_ASYM_CIPHER_NEWCTX, (void (*)(void))cipher_newctx },
    { OSSL_FUNC_ASYM_CIPHER_FREECTX, (void (*)(void))cipher_freectx },
    { OSSL_FUNC_ASYM_CIPHER_DUPCTX, (void (*)(void))cipher_dupctx },
    { OSSL_FUNC_ASYM_CIPHER_ENCRYPT_INIT, (void (*)(void))cipher_encrypt_init },
    { OSSL_FUNC_ASYM_CIPHER_ENCRYPT, (void (*)(void))cipher_encrypt },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, (void (*)(void))cipher_decrypt_init },
    { OSSL_FUNC_ASYM_CIPHER_DECRYPT, (void (*)(void))cipher_decrypt },
    { OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, (void (*)(void))cipher_get_ctx_params },
    { OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, (void (*)(void))cipher_gettable_ctx_params },
    { OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, (void (*)(void))cipher_set_ctx_params },
    { OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, (void (*)(void))cipher_settable_ctx_params },
    { 0, NULL },
};
