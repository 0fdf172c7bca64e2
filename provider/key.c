/*
 * The TPM key object (TPMB_KEY) every operation uses: the TPM key blob (or persistent
 * handle) and its password, never private key material, the broker's key id, and the public
 * half as an ordinary EVP_PKEY of tpmb_crypto_libctx. Made from a key file (decoders), by
 * LOAD from the broker (store, generation), and freed here; keymgmt*.c hand it to OpenSSL.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "provider.h"

const char *tpmb_key_type_name(int type)
{
    return type == WIRE_KEY_TYPE_EC ? "EC" : type == WIRE_KEY_TYPE_RSA_PSS ? "RSA-PSS" : "RSA";
}

/* The TPM's NIST curves OpenSSL signs ECDSA with; field: bytes of a coordinate. */
static const struct tpm_curve {
    uint16_t id;
    const char *group;
    size_t field;
} tpm_curves[] = {
    { WIRE_CURVE_P192, "P-192", 24 }, { WIRE_CURVE_P224, "P-224", 28 },
    { WIRE_CURVE_P256, "P-256", 32 }, { WIRE_CURVE_P384, "P-384", 48 },
    { WIRE_CURVE_P521, "P-521", 66 },
};

static const struct tpm_curve *tpm_curve(uint16_t id)
{
    size_t i;

    for (i = 0; i < sizeof(tpm_curves) / sizeof(tpm_curves[0]); i++)
        if (tpm_curves[i].id == id)
            return &tpm_curves[i];
    return NULL;
}

/* OpenSSL's name of a wire hash (TPM2_ALG id), NULL for others. */
const char *tpmb_hash_name(uint16_t hash)
{
    switch (hash) {
    case WIRE_HASH_SHA1:
        return "SHA1";
    case WIRE_HASH_SHA256:
        return "SHA2-256";
    case WIRE_HASH_SHA384:
        return "SHA2-384";
    case WIRE_HASH_SHA512:
        return "SHA2-512";
    default:
        return NULL;
    }
}

int tpmb_rsa_pad_mode(const OSSL_PARAM *p, int *pad)
{
    static const struct { const char *name; int pad; } modes[] = {
        { OSSL_PKEY_RSA_PAD_MODE_PKCSV15, RSA_PKCS1_PADDING },
        { OSSL_PKEY_RSA_PAD_MODE_OAEP, RSA_PKCS1_OAEP_PADDING },
        { OSSL_PKEY_RSA_PAD_MODE_PSS, RSA_PKCS1_PSS_PADDING },
        { OSSL_PKEY_RSA_PAD_MODE_NONE, RSA_NO_PADDING },
    };
    size_t i;

    if (p->data_type != OSSL_PARAM_UTF8_STRING)
        return OSSL_PARAM_get_int(p, pad);
    *pad = -1;
    for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
        if (OPENSSL_strcasecmp(p->data, modes[i].name) == 0)
            *pad = modes[i].pad;
    return 1;
}

/* The public key of `type` that the parameters in `bld` describe, in tpmb_crypto_libctx. */
static EVP_PKEY *pub_from_params(TPMBROKER_CTX *prov, int type, OSSL_PARAM_BLD *bld)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(prov),
                                                    tpmb_key_type_name(type),
                                                    tpmb_crypto_propq(prov));
    EVP_PKEY *pub = NULL;

    if (params == NULL || pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pub, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pub = NULL;
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
    return pub;
}

/*
 * An RSA or RSA-PSS public key from its modulus and exponent. An RSA-PSS key whose TPM
 * scheme binds a hash carries OpenSSL's PSS restrictions: that hash, MGF1 with it, and a
 * salt of its length, as the TPM signs.
 */
static EVP_PKEY *rsa_pub(TPMBROKER_CTX *prov, int type, const BIGNUM *n, const BIGNUM *e,
                         uint16_t pss_hash)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    EVP_PKEY *pub = NULL;
    const char *md = type == WIRE_KEY_TYPE_RSA_PSS ? tpmb_hash_name(pss_hash) : NULL;

    if (bld == NULL || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n)
        || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e))
        goto end;
    if (md != NULL) {
        EVP_MD *mdp = EVP_MD_fetch(tpmb_crypto_libctx(prov), md, tpmb_crypto_propq(prov));
        int saltlen = mdp != NULL ? EVP_MD_get_size(mdp) : 0;

        EVP_MD_free(mdp);
        if (saltlen <= 0 || !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_RSA_DIGEST, md, 0)
            || !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_RSA_MGF1_DIGEST, md, 0)
            || !OSSL_PARAM_BLD_push_int(bld, OSSL_PKEY_PARAM_RSA_PSS_SALTLEN, saltlen))
            goto end;
    }
    pub = pub_from_params(prov, type, bld);
end:
    OSSL_PARAM_BLD_free(bld);
    return pub;
}

TPMB_KEY *tpmb_key_new(TPMBROKER_CTX *prov, int type)
{
    TPMB_KEY *key = calloc(1, sizeof(*key));

    if (key == NULL) {
        TPMB_RAISE(prov, TPMB_R_MALLOC, "out of memory");
        return NULL;
    }
    key->prov = prov;
    key->type = type;
    if (pthread_mutex_init(&key->verify_lock, NULL) != 0) {
        free(key);
        TPMB_RAISE(prov, TPMB_R_MALLOC, "out of memory");
        return NULL;
    }
    return key;
}

void tpmb_key_free(TPMB_KEY *key)
{
    if (key == NULL)
        return;
    free(key->blob);
    if (key->auth != NULL) {
        OPENSSL_cleanse(key->auth, key->authlen);
        free(key->auth);
    }
    if (key->parent_auth != NULL) {
        OPENSSL_cleanse(key->parent_auth, strlen(key->parent_auth));
        free(key->parent_auth);
    }
    for (int i = 0; i < TPMB_VERIFY_SLOTS; i++)
        EVP_PKEY_CTX_free(key->verify[i].ctx);
    pthread_mutex_destroy(&key->verify_lock);
    EVP_PKEY_free(key->pub);
    free(key);
}

void tpmb_key_client_ref(const TPMB_KEY *key, CLIENT_KEY *ref)
{
    memcpy(ref->key_id, key->key_id, WIRE_KEY_ID_SIZE);
    ref->source = key->source;
    ref->blob = key->blob;
    ref->bloblen = key->bloblen;
    ref->auth = key->auth;
    ref->authlen = key->authlen;
    /* The parent's password: the one given at generation, else, for a key file under a
     * persistent parent, the provider's (env or config), as tpm2-openssl takes its
     * TPM2OPENSSL_PARENT_AUTH for persistent parents only. */
    ref->parent_auth = (const uint8_t *)key->parent_auth;
    if (ref->parent_auth == NULL && key->source == WIRE_KEY_SOURCE_TSS2_DER
        && (key->parent & 0xff000000u) == 0x81000000u)
        ref->parent_auth = (const uint8_t *)key->prov->parent_auth;
    ref->parent_authlen = ref->parent_auth != NULL ? strlen((const char *)ref->parent_auth) : 0;
}

int tpmb_key_ready(TPMBROKER_CTX *prov, const TPMB_KEY *key, const char *doing)
{
    if (key->blob == NULL) {
        TPMB_RAISE(prov, TPMB_R_NO_PRIVATE_KEY, "this key has only a public part; load the "
                   "TSS2 PRIVATE KEY file or handle: URI %s", doing);
        return 0;
    }
    if (key->auth_missing) {
        TPMB_RAISE(prov, TPMB_R_PASSWORD_NEEDED,
                   "the TPM key needs its password and none was given: use -passin/-pass "
                   "(or the application's passphrase callback)");
        return 0;
    }
    return 1;
}

static int key_id_for(TPMBROKER_CTX *prov, uint8_t source, const uint8_t *blob, size_t len,
                      uint8_t out[WIRE_KEY_ID_SIZE])
{
    EVP_MD *md = EVP_MD_fetch(tpmb_crypto_libctx(prov), "SHA256", tpmb_crypto_propq(prov));
    EVP_MD_CTX *mctx = EVP_MD_CTX_new();
    unsigned int n = 0;
    int ok;

    ok = md != NULL && mctx != NULL && EVP_DigestInit_ex(mctx, md, NULL)
         && EVP_DigestUpdate(mctx, &source, 1) && EVP_DigestUpdate(mctx, blob, len)
         && EVP_DigestFinal_ex(mctx, out, &n) && n == WIRE_KEY_ID_SIZE;
    EVP_MD_CTX_free(mctx);
    EVP_MD_free(md);
    return ok;
}

/* A key object holding a copy of blob and auth, with its key id; no public part yet. */
static TPMB_KEY *key_with_blob(TPMBROKER_CTX *prov, uint8_t source, const uint8_t *blob,
                               size_t len, const uint8_t *auth, size_t authlen)
{
    TPMB_KEY *key = tpmb_key_new(prov, 0);

    if (key == NULL)
        return NULL;
    key->source = source;
    key->blob = malloc(len > 0 ? len : 1);
    key->auth = malloc(authlen > 0 ? authlen : 1);
    if (key->blob == NULL || key->auth == NULL) {
        TPMB_RAISE(prov, TPMB_R_MALLOC, "out of memory");
        goto fail;
    }
    memcpy(key->blob, blob, len);
    key->bloblen = len;
    if (authlen > 0)
        memcpy(key->auth, auth, authlen);
    key->authlen = authlen;
    if (!key_id_for(prov, source, blob, len, key->key_id)) {
        TPMB_RAISE(prov, TPMB_R_INTERNAL, "cannot compute the key id (SHA-256 unavailable)");
        goto fail;
    }
    return key;
fail:
    tpmb_key_free(key);
    return NULL;
}

TPMB_KEY *tpmb_key_load(TPMBROKER_CTX *prov, uint8_t source, const uint8_t *blob, size_t len,
                        const uint8_t *auth, size_t authlen)
{
    CLIENT_LOAD_RESULT res;
    CLIENT_KEY ref;
    CLIENT_ERR err;
    TPMB_KEY *key;
    const unsigned char *p;

    key = key_with_blob(prov, source, blob, len, auth, authlen);
    if (key == NULL)
        return NULL;
    tpmb_key_client_ref(key, &ref);
    if (!client_load(prov->client, &ref, &res, &err)) {
        TPMB_RAISE_CLIENT(prov, "loading the TPM key", &err);
        goto fail;
    }
    p = res.spki;
    key->pub = d2i_PUBKEY_ex(NULL, &p, (long)res.spkilen, tpmb_crypto_libctx(prov),
                             tpmb_crypto_propq(prov));
    free(res.spki);
    if (key->pub == NULL) {
        TPMB_RAISE(prov, TPMB_R_BROKER_PROTOCOL, "tpmbroker returned an unreadable public key");
        goto fail;
    }
    if (res.key_type == WIRE_KEY_TYPE_EC && EVP_PKEY_is_a(key->pub, "EC")) {
        key->type = WIRE_KEY_TYPE_EC;
    } else if (res.key_type == WIRE_KEY_TYPE_RSA && EVP_PKEY_is_a(key->pub, "RSA")) {
        key->type = WIRE_KEY_TYPE_RSA;
    } else if (res.key_type == WIRE_KEY_TYPE_RSA_PSS && EVP_PKEY_is_a(key->pub, "RSA")) {
        /* the broker sends rsaEncryption; the key signs PSS only, so it is an RSA-PSS key
         * (its bound hash is the broker's to enforce: a handle has no key file to read) */
        BIGNUM *n = NULL, *e = NULL;
        EVP_PKEY *pss = NULL;

        if (EVP_PKEY_get_bn_param(key->pub, OSSL_PKEY_PARAM_RSA_N, &n)
            && EVP_PKEY_get_bn_param(key->pub, OSSL_PKEY_PARAM_RSA_E, &e))
            pss = rsa_pub(prov, WIRE_KEY_TYPE_RSA_PSS, n, e, 0);
        BN_free(n);
        BN_free(e);
        if (pss == NULL) {
            TPMB_RAISE(prov, TPMB_R_INTERNAL, "cannot make the RSA-PSS public key");
            goto fail;
        }
        EVP_PKEY_free(key->pub);
        key->pub = pss;
        key->type = WIRE_KEY_TYPE_RSA_PSS;
    } else {
        TPMB_RAISE(prov, TPMB_R_UNSUPPORTED, "TPM key of unsupported type %u", res.key_type);
        goto fail;
    }
    key->bits = EVP_PKEY_get_bits(key->pub); /* the key's own, not the broker's word */
    key->curve = res.curve;
    tpmb_debug("loaded %s-%d key", tpmb_key_type_name(key->type), key->bits);
    return key;
fail:
    tpmb_key_free(key);
    return NULL;
}

/* The public key of a TSS2 file as an EVP_PKEY of tpmb_crypto_libctx. */
static EVP_PKEY *pub_from_tss2(TPMBROKER_CTX *prov, const TSS2_INFO *info)
{
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY *pub = NULL;
    BIGNUM *n = NULL, *e = NULL;
    unsigned char point[1 + 2 * 66];
    size_t field;

    if (info->type == WIRE_KEY_TYPE_RSA || info->type == WIRE_KEY_TYPE_RSA_PSS) {
        n = BN_bin2bn(info->n, (int)info->nlen, NULL);
        e = BN_new();
        if (n != NULL && e != NULL && BN_set_word(e, info->exponent))
            pub = rsa_pub(prov, info->type, n, e, info->scheme_hash);
        goto end;
    } else {
        const struct tpm_curve *curve = tpm_curve(info->curve);
        const char *group = curve != NULL ? curve->group : NULL;

        bld = OSSL_PARAM_BLD_new();
        field = curve != NULL ? curve->field : 0;
        if (bld == NULL || group == NULL || info->xlen > field || info->ylen > field)
            goto end;
        /* uncompressed point; the TPM may drop leading zero bytes of x and y */
        memset(point, 0, sizeof(point));
        point[0] = 0x04;
        memcpy(point + 1 + field - info->xlen, info->x, info->xlen);
        memcpy(point + 1 + 2 * field - info->ylen, info->y, info->ylen);
        if (!OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, group, 0)
            || !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point,
                                                 1 + 2 * field))
            goto end;
    }
    pub = pub_from_params(prov, info->type, bld);
end:
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    return pub;
}

TPMB_KEY *tpmb_key_from_tss2(TPMBROKER_CTX *prov, const uint8_t *der, size_t len,
                             const TSS2_INFO *info, const uint8_t *auth, size_t authlen)
{
    TPMB_KEY *key = key_with_blob(prov, WIRE_KEY_SOURCE_TSS2_DER, der, len, auth, authlen);

    if (key == NULL)
        return NULL;
    key->type = info->type;
    key->pub = pub_from_tss2(prov, info);
    if (key->pub == NULL) {
        TPMB_RAISE(prov, TPMB_R_UNSUPPORTED,
                   "TPM key file with a public key tpmbroker cannot use (%s, curve 0x%04x)",
                   tpmb_key_type_name(info->type), info->curve);
        tpmb_key_free(key);
        return NULL;
    }
    key->bits = EVP_PKEY_get_bits(key->pub);
    key->curve = info->curve;
    key->pss_hash = info->type == WIRE_KEY_TYPE_RSA_PSS ? info->scheme_hash : 0;
    key->parent = info->parent;
    key->attributes = info->attributes;
    key->empty_auth = info->empty_auth;
    return key;
}
