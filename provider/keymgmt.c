/*
 * Key management for TPM EC and RSA keys.
 *
 * A key object holds the TPM key blob and its password, never private key material; the
 * public half is an ordinary EVP_PKEY of tpmb_crypto_libctx, so parameters, public export
 * and comparisons are answered by libcrypto itself. Export of the private half is refused:
 * that refusal is what makes OpenSSL bring signing back to this provider whatever the
 * provider order.
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

/*
 * An RSA or RSA-PSS public key from its modulus and exponent. An RSA-PSS key whose TPM
 * scheme binds a hash carries OpenSSL's PSS restrictions: that hash, MGF1 with it, and a
 * salt of its length, as the TPM signs.
 */
static EVP_PKEY *rsa_pub(TPMBROKER_CTX *prov, int type, const BIGNUM *n, const BIGNUM *e,
                         uint16_t pss_hash)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = NULL;
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
    params = OSSL_PARAM_BLD_to_param(bld);
    pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(prov), tpmb_key_type_name(type),
                                      tpmb_crypto_propq(prov));
    if (params == NULL || pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pub, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pub = NULL;
end:
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
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
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *pctx = NULL;
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
    params = OSSL_PARAM_BLD_to_param(bld);
    pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(prov), tpmb_key_type_name(info->type),
                                      tpmb_crypto_propq(prov));
    if (params == NULL || pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pub, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pub = NULL;
end:
    EVP_PKEY_CTX_free(pctx);
    OSSL_PARAM_free(params);
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

static void *key_new_ec(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_EC);
}

static void *key_new_rsa(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_RSA);
}

static void *key_new_rsapss(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_RSA_PSS);
}

static void key_free(void *keydata)
{
    tpmb_key_free(keydata);
}

/* Takes the key a decoder or store handed over by reference. */
static void *key_load(const void *reference, size_t reference_sz)
{
    TPMB_KEY *key;

    if (reference == NULL || reference_sz != sizeof(key))
        return NULL;
    key = *(TPMB_KEY **)reference;
    *(TPMB_KEY **)reference = NULL; /* ownership moves to the caller */
    return key;
}

static void *key_dup(const void *keydata_from, int selection)
{
    const TPMB_KEY *from = keydata_from;
    TPMB_KEY *key = tpmb_key_new(from->prov, from->type);

    if (key == NULL)
        return NULL;
    key->source = from->source;
    key->auth_missing = from->auth_missing;
    key->bits = from->bits;
    key->curve = from->curve;
    key->pss_hash = from->pss_hash;
    key->parent = from->parent;
    key->attributes = from->attributes;
    key->empty_auth = from->empty_auth;
    memcpy(key->key_id, from->key_id, WIRE_KEY_ID_SIZE);
    if (from->blob != NULL && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)) {
        key->blob = malloc(from->bloblen);
        key->auth = malloc(from->authlen > 0 ? from->authlen : 1);
        if (key->blob == NULL || key->auth == NULL)
            goto fail;
        memcpy(key->blob, from->blob, from->bloblen);
        key->bloblen = from->bloblen;
        if (from->authlen > 0)
            memcpy(key->auth, from->auth, from->authlen);
        key->authlen = from->authlen;
        if (from->parent_auth != NULL
            && (key->parent_auth = strdup(from->parent_auth)) == NULL)
            goto fail;
    }
    if (from->pub != NULL) {
        if (!EVP_PKEY_up_ref(from->pub))
            goto fail;
        key->pub = from->pub; /* immutable once made: sharing is safe */
    }
    return key;
fail:
    tpmb_key_free(key);
    return NULL;
}

static int key_has(const void *keydata, int selection)
{
    const TPMB_KEY *key = keydata;

    if (key == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && key->blob == NULL)
        return 0;
    if ((selection & (OSSL_KEYMGMT_SELECT_PUBLIC_KEY | OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS))
        && key->pub == NULL)
        return 0;
    return 1;
}

static int key_match(const void *keydata1, const void *keydata2, int selection)
{
    const TPMB_KEY *k1 = keydata1, *k2 = keydata2;

    if (k1->type != k2->type || k1->pub == NULL || k2->pub == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return EVP_PKEY_eq(k1->pub, k2->pub) == 1;
    if (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS)
        return EVP_PKEY_parameters_eq(k1->pub, k2->pub) == 1;
    return 1;
}

/* Public parts only: certificates' keys come in here to be compared with TPM keys. */
static int key_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    TPMB_KEY *key = keydata;
    EVP_PKEY_CTX *pctx;
    EVP_PKEY *pub = NULL;
    int sel;

    if (key == NULL || key->blob != NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        sel = EVP_PKEY_PUBLIC_KEY;
    else if (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS)
        sel = EVP_PKEY_KEY_PARAMETERS;
    else
        return 0;
    pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(key->prov), tpmb_key_type_name(key->type),
                                      tpmb_crypto_propq(key->prov));
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pub, sel, (OSSL_PARAM *)params) <= 0) {
        EVP_PKEY_CTX_free(pctx);
        return 0;
    }
    EVP_PKEY_CTX_free(pctx);
    EVP_PKEY_free(key->pub);
    key->pub = pub;
    key->bits = EVP_PKEY_get_bits(pub);
    return 1;
}

static const OSSL_PARAM ec_import_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM rsa_import_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ec_import_types_fn(int selection)
{
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : ec_import_types;
}

static const OSSL_PARAM *rsa_import_types_fn(int selection)
{
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : rsa_import_types;
}

static int key_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    TPMB_KEY *key = keydata;

    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) {
        /* No error on the stack: OpenSSL tries this first and then comes back to us. */
        tpmb_debug("refused export of a TPM private key");
        return 0;
    }
    if (key == NULL || key->pub == NULL)
        return 0;
    return EVP_PKEY_export(key->pub, selection, cb, cbarg);
}

static const OSSL_PARAM *ec_export_types_fn(int selection)
{
    return ec_import_types_fn(selection);
}

static const OSSL_PARAM *rsa_export_types_fn(int selection)
{
    return rsa_import_types_fn(selection);
}

static int key_get_params(void *keydata, OSSL_PARAM params[])
{
    TPMB_KEY *key = keydata;
    OSSL_PARAM *p;

    if (key == NULL || key->pub == NULL)
        return 0;
    /* the public key knows bits, security-bits, max-size, group, encoded point and more */
    if (!EVP_PKEY_get_params(key->pub, params))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PKEY_PARAM_DEFAULT_DIGEST);
    if (p != NULL) {
        const char *md = tpmb_hash_name(key->pss_hash);

        if (md == NULL)
            md = key->type != WIRE_KEY_TYPE_EC ? "SHA256"
                 : key->bits > 384 ? "SHA512" : key->bits > 256 ? "SHA384" : "SHA256";
        if (!OSSL_PARAM_set_utf8_string(p, md))
            return 0;
    }
    return 1;
}

static const OSSL_PARAM ec_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_X, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_EC_PUB_Y, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM rsa_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ec_gettable_fn(void *provctx)
{
    (void)provctx;
    return ec_gettable;
}

static const OSSL_PARAM *rsa_gettable_fn(void *provctx)
{
    (void)provctx;
    return rsa_gettable;
}

#define rsapss_gettable_fn rsa_gettable_fn
#define rsapss_import_types_fn rsa_import_types_fn
#define rsapss_export_types_fn rsa_export_types_fn
#define rsapss_query_operation_name rsa_query_operation_name

static const char *ec_query_operation_name(int operation_id)
{
    if (operation_id == OSSL_OP_KEYEXCH)
        return TPMB_TPM_ECDH_NAME; /* exchange.c: OpenSSL fetches it for TPM keys only */
    return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : NULL;
}

static const char *rsa_query_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_SIGNATURE ? "RSA" : NULL;
}

/* --- key generation, forwarded to the broker ---------------------------------------- */

typedef struct gen_ctx {
    TPMBROKER_CTX *prov;
    int type;
    uint16_t curve;
    unsigned int bits;
    uint32_t parent;
    char *auth;
    uint8_t usage;    /* WIRE_USAGE_*; DEFAULT lets the broker choose (sign) */
    uint16_t hash;    /* RSA-PSS: the hash the key's scheme is bound to */
    uint16_t mgf1;    /* RSA-PSS: the MGF1 hash asked for, 0 = the same */
    char *parent_auth; /* -pkeyopt parent-auth: */
} GEN_CTX;

#define CURVES_TEXT "P-192, P-224, P-256, P-384 and P-521, as the TPM has them"

static uint16_t curve_from_name(const char *name)
{
    static const struct { const char *name; uint16_t curve; } curves[] = {
        { "P-192", WIRE_CURVE_P192 }, { "prime192v1", WIRE_CURVE_P192 },
        { "secp192r1", WIRE_CURVE_P192 }, { "P-224", WIRE_CURVE_P224 },
        { "secp224r1", WIRE_CURVE_P224 },
        { "P-256", WIRE_CURVE_P256 }, { "prime256v1", WIRE_CURVE_P256 },
        { "secp256r1", WIRE_CURVE_P256 }, { "P-384", WIRE_CURVE_P384 },
        { "secp384r1", WIRE_CURVE_P384 }, { "P-521", WIRE_CURVE_P521 },
        { "secp521r1", WIRE_CURVE_P521 },
    };
    size_t i;

    for (i = 0; i < sizeof(curves) / sizeof(curves[0]); i++)
        if (OPENSSL_strcasecmp(name, curves[i].name) == 0)
            return curves[i].curve;
    return 0;
}

static int gen_set_params(void *genctx, const OSSL_PARAM params[]);

static void *gen_init(void *provctx, int type, int selection, const OSSL_PARAM params[])
{
    GEN_CTX *g;

    if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) == 0) {
        TPMB_RAISE(provctx, TPMB_R_UNSUPPORTED,
                   "tpmbroker generates key pairs only; make parameters with the default "
                   "provider");
        return NULL;
    }
    g = calloc(1, sizeof(*g));
    if (g == NULL)
        return NULL;
    g->prov = provctx;
    g->type = type;
    g->curve = WIRE_CURVE_P256;
    g->bits = 2048;
    g->parent = WIRE_STORAGE_PRIMARY;
    if (!gen_set_params(g, params)) {
        free(g);
        return NULL;
    }
    return g;
}

static void *ec_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return gen_init(provctx, WIRE_KEY_TYPE_EC, selection, params);
}

static void *rsa_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return gen_init(provctx, WIRE_KEY_TYPE_RSA, selection, params);
}

static void *rsapss_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return gen_init(provctx, WIRE_KEY_TYPE_RSA_PSS, selection, params);
}

/* OpenSSL's digest name as a wire hash, 0 for none the TPM keys sign with. */
static uint16_t hash_from_name(TPMBROKER_CTX *prov, const char *name)
{
    EVP_MD *md = EVP_MD_fetch(tpmb_crypto_libctx(prov), name, tpmb_crypto_propq(prov));
    uint16_t hash = 0;

    if (md != NULL) {
        hash = EVP_MD_is_a(md, "SHA1") ? WIRE_HASH_SHA1
               : EVP_MD_is_a(md, "SHA2-256") ? WIRE_HASH_SHA256
               : EVP_MD_is_a(md, "SHA2-384") ? WIRE_HASH_SHA384
               : EVP_MD_is_a(md, "SHA2-512") ? WIRE_HASH_SHA512 : 0;
        EVP_MD_free(md);
    }
    return hash;
}

static int gen_set_params(void *genctx, const OSSL_PARAM params[])
{
    GEN_CTX *g = genctx;
    const OSSL_PARAM *p;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    if (p != NULL && g->type == WIRE_KEY_TYPE_EC) {
        const char *name;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name))
            return 0;
        g->curve = curve_from_name(name);
        if (g->curve == 0) {
            TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "curve %s: TPM keys are on " CURVES_TEXT,
                       name);
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_BITS);
    if (p != NULL && g->type != WIRE_KEY_TYPE_EC) {
        /* the broker asks the TPM (TPM2_TestParms) and refuses with the TPM's reason */
        if (!OSSL_PARAM_get_uint(p, &g->bits))
            return 0;
        if (g->bits == 0 || g->bits > 0xffff) {
            TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT, "RSA-%u: no such key size", g->bits);
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_MGF1_DIGEST);
    if (p != NULL && g->type == WIRE_KEY_TYPE_RSA_PSS) {
        const char *md;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &md))
            return 0;
        g->mgf1 = hash_from_name(g->prov, md);
        if (g->mgf1 == 0) {
            TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "MGF1 digest %s: the TPM uses the "
                       "signature digest for MGF1", md);
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, "usage");
    if (p != NULL) {
        const char *usage;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &usage))
            return 0;
        if (strcmp(usage, "sign") == 0) {
            g->usage = WIRE_USAGE_SIGN;
        } else if (strcmp(usage, "decrypt") == 0) {
            g->usage = WIRE_USAGE_DECRYPT;
        } else if (strcmp(usage, "sign,decrypt") == 0 || strcmp(usage, "decrypt,sign") == 0) {
            g->usage = WIRE_USAGE_SIGN_DECRYPT;
        } else {
            TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT,
                       "usage %s: give sign, decrypt or sign,decrypt", usage);
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_E);
    if (p != NULL && g->type != WIRE_KEY_TYPE_EC) {
        BIGNUM *e = NULL;
        int ok = OSSL_PARAM_get_BN(p, &e) && BN_is_word(e, 65537);

        BN_free(e);
        if (!ok) {
            TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "the TPM keys use the exponent 65537 only");
            return 0;
        }
    }
    p = OSSL_PARAM_locate_const(params, "user-auth");
    if (p != NULL) {
        const char *auth;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &auth))
            return 0;
        if (g->auth != NULL) {
            OPENSSL_cleanse(g->auth, strlen(g->auth));
            free(g->auth);
        }
        g->auth = strdup(auth);
        if (g->auth == NULL)
            return 0;
    }
    p = OSSL_PARAM_locate_const(params, "parent");
    if (p != NULL) {
        uint32_t parent;

        if (!OSSL_PARAM_get_uint32(p, &parent))
            return 0;
        if (parent != WIRE_STORAGE_PRIMARY && (parent & 0xff000000u) != 0x81000000u) {
            TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT, "parent 0x%08x: give 0x40000001 "
                       "(storage primary) or a persistent handle 0x81xxxxxx", parent);
            return 0;
        }
        g->parent = parent;
    }
    p = OSSL_PARAM_locate_const(params, "parent-auth");
    if (p != NULL) {
        const char *pauth;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &pauth))
            return 0;
        if (g->parent_auth != NULL) {
            OPENSSL_cleanse(g->parent_auth, strlen(g->parent_auth));
            free(g->parent_auth);
            g->parent_auth = NULL;
        }
        if (*pauth != '\0' && (g->parent_auth = strdup(pauth)) == NULL)
            return 0;
    }
    p = OSSL_PARAM_locate_const(params, "digest");
    if (p != NULL && g->type == WIRE_KEY_TYPE_RSA_PSS) {
        const char *md;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &md))
            return 0;
        g->hash = hash_from_name(g->prov, md);
        if (g->hash == 0) {
            TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "digest %s: RSA-PSS TPM keys are bound to "
                       "SHA-1, SHA-256, SHA-384 or SHA-512", md);
            return 0;
        }
    } else if (p != NULL) {
        const char *md;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &md))
            return 0;
        if (OPENSSL_strcasecmp(md, "SHA256") != 0 && OPENSSL_strcasecmp(md, "SHA2-256") != 0
            && OPENSSL_strcasecmp(md, "SHA-256") != 0) {
            TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "digest %s: tpmbroker keys use SHA-256 "
                       "names; any hash can still be used for signing", md);
            return 0;
        }
    }
    return 1;
}

/* What every key generation takes: the key's password, its parent and the parent's
 * password, its digest and its usage. */
#define GEN_SETTABLE_COMMON                                 \
    OSSL_PARAM_utf8_string("user-auth", NULL, 0),           \
    OSSL_PARAM_uint32("parent", NULL),                      \
    OSSL_PARAM_utf8_string("parent-auth", NULL, 0),         \
    OSSL_PARAM_utf8_string("digest", NULL, 0),              \
    OSSL_PARAM_utf8_string("usage", NULL, 0)

static const OSSL_PARAM ec_gen_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    GEN_SETTABLE_COMMON,
    OSSL_PARAM_END,
};

static const OSSL_PARAM rsa_gen_settable[] = {
    OSSL_PARAM_uint(OSSL_PKEY_PARAM_RSA_BITS, NULL),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    GEN_SETTABLE_COMMON,
    OSSL_PARAM_END,
};

static const OSSL_PARAM rsapss_gen_settable[] = {
    OSSL_PARAM_uint(OSSL_PKEY_PARAM_RSA_BITS, NULL),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MGF1_DIGEST, NULL, 0),
    GEN_SETTABLE_COMMON,
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsapss_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return rsapss_gen_settable;
}

static const OSSL_PARAM *ec_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return ec_gen_settable;
}

static const OSSL_PARAM *rsa_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return rsa_gen_settable;
}

/* -paramfile: the curve comes from a parameters-only key imported into this keymgmt. */
static int gen_set_template(void *genctx, void *templ)
{
    GEN_CTX *g = genctx;
    TPMB_KEY *t = templ;
    char name[64];

    if (g->type != WIRE_KEY_TYPE_EC || t == NULL || t->pub == NULL)
        return 1;
    if (!EVP_PKEY_get_utf8_string_param(t->pub, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name),
                                        NULL))
        return 0;
    g->curve = curve_from_name(name);
    if (g->curve == 0) {
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "curve %s: TPM keys are on " CURVES_TEXT, name);
        return 0;
    }
    return 1;
}

static void *gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg)
{
    GEN_CTX *g = genctx;
    size_t authlen = g->auth != NULL ? strlen(g->auth) : 0;
    uint16_t param = g->type == WIRE_KEY_TYPE_EC ? g->curve : (uint16_t)g->bits;
    uint8_t *blob = NULL;
    size_t bloblen = 0;
    CLIENT_ERR err;
    CLIENT_KEYGEN req;
    TPMB_KEY *key;
    /* -pkeyopt parent-auth: for any parent (for 0x40000001 it is the owner hierarchy's);
     * else the provider's, for a persistent parent only (as tpm2-openssl does) */
    const char *pauth = g->parent_auth;

    (void)cb;
    (void)cbarg;
    if (g->mgf1 != 0 && g->mgf1 != (g->hash != 0 ? g->hash : WIRE_HASH_SHA256)) {
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "the TPM signs RSA-PSS with MGF1 over the "
                   "signature digest; give the same digest for both");
        return NULL;
    }
    if (pauth == NULL && g->parent != WIRE_STORAGE_PRIMARY)
        pauth = g->prov->parent_auth;
    req.key_type = (uint8_t)g->type;
    req.param = param;
    req.auth = (const uint8_t *)g->auth;
    req.authlen = authlen;
    req.parent = g->parent;
    req.usage = g->usage;
    req.hash = g->hash;
    req.parent_auth = (const uint8_t *)pauth;
    req.parent_authlen = pauth != NULL ? strlen(pauth) : 0;
    if (!client_generate(g->prov->client, &req, &blob, &bloblen, &err)) {
        TPMB_RAISE_CLIENT(g->prov, "generating a TPM key", &err);
        return NULL;
    }
    {
        TSS2_INFO info;

        if (!tss2_parse(blob, bloblen, &info) || info.type != g->type) {
            TPMB_RAISE(g->prov, TPMB_R_BROKER_PROTOCOL,
                       "tpmbroker generated a key file this provider cannot read");
            free(blob);
            return NULL;
        }
        key = tpmb_key_from_tss2(g->prov, blob, bloblen, &info, (const uint8_t *)g->auth,
                                 authlen);
    }
    free(blob);
    if (key != NULL && g->parent_auth != NULL
        && (key->parent_auth = strdup(g->parent_auth)) == NULL) {
        tpmb_key_free(key);
        return NULL;
    }
    return key;
}

static void gen_cleanup(void *genctx)
{
    GEN_CTX *g = genctx;

    if (g == NULL)
        return;
    if (g->auth != NULL) {
        OPENSSL_cleanse(g->auth, strlen(g->auth));
        free(g->auth);
    }
    if (g->parent_auth != NULL) {
        OPENSSL_cleanse(g->parent_auth, strlen(g->parent_auth));
        free(g->parent_auth);
    }
    free(g);
}

#define KEYMGMT_COMMON(kind) \
    { OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free }, \
    { OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))key_load }, \
    { OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))key_dup }, \
    { OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))key_has }, \
    { OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))key_match }, \
    { OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))key_import }, \
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))kind##_import_types_fn }, \
    { OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))key_export }, \
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))kind##_export_types_fn }, \
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))key_get_params }, \
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))kind##_gettable_fn }, \
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))kind##_query_operation_name }, \
    { OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))key_new_##kind }, \
    { OSSL_FUNC_KEYMGMT_GEN_INIT, (void (*)(void))kind##_gen_init }, \
    { OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, (void (*)(void))gen_set_params }, \
    { OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS, (void (*)(void))kind##_gen_settable_fn }, \
    { OSSL_FUNC_KEYMGMT_GEN_SET_TEMPLATE, (void (*)(void))gen_set_template }, \
    { OSSL_FUNC_KEYMGMT_GEN, (void (*)(void))gen }, \
    { OSSL_FUNC_KEYMGMT_GEN_CLEANUP, (void (*)(void))gen_cleanup }, \
    { 0, NULL }

/*
 * A public EC key's point, set after its curve: CMS makes the originator's key of an EC
 * recipient that way (EVP_PKEY_copy_parameters, then EVP_PKEY_set1_encoded_public_key)
 * before ECDH with the TPM key (exchange.c). A TPM key's public key is the TPM's: refused.
 */
static int ec_set_params(void *keydata, const OSSL_PARAM params[])
{
    TPMB_KEY *key = keydata;
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    OSSL_PARAM build[3];
    EVP_PKEY_CTX *pctx;
    EVP_PKEY *pub = NULL;
    char group[64];
    int ok;

    if (p == NULL)
        return 1;
    if (key == NULL || key->blob != NULL || key->pub == NULL
        || p->data_type != OSSL_PARAM_OCTET_STRING
        || !EVP_PKEY_get_utf8_string_param(key->pub, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                           sizeof(group), NULL))
        return 0;
    build[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    build[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, p->data, p->data_size);
    build[2] = OSSL_PARAM_construct_end();
    pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(key->prov), "EC",
                                      tpmb_crypto_propq(key->prov));
    ok = pctx != NULL && EVP_PKEY_fromdata_init(pctx) > 0
         && EVP_PKEY_fromdata(pctx, &pub, EVP_PKEY_PUBLIC_KEY, build) > 0;
    EVP_PKEY_CTX_free(pctx);
    if (!ok)
        return 0;
    EVP_PKEY_free(key->pub);
    key->pub = pub;
    key->bits = EVP_PKEY_get_bits(pub);
    return 1;
}

static const OSSL_PARAM ec_settable[] = {
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ec_settable_fn(void *provctx)
{
    (void)provctx;
    return ec_settable;
}

const OSSL_DISPATCH tpmb_ec_keymgmt_functions[] = {
    { OSSL_FUNC_KEYMGMT_SET_PARAMS, (void (*)(void))ec_set_params },
    { OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))ec_settable_fn },
    KEYMGMT_COMMON(ec)
};
const OSSL_DISPATCH tpmb_rsa_keymgmt_functions[] = { KEYMGMT_COMMON(rsa) };
const OSSL_DISPATCH tpmb_rsapss_keymgmt_functions[] = { KEYMGMT_COMMON(rsapss) };
