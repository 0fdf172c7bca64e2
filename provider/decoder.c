/*
 * Decoders for TSS2 PRIVATE KEY files: PEM armour to DER (this label only; the default
 * provider does not pass unknown labels on), then DER to a key object. The public key comes
 * from the file itself, so decoding needs no broker.
 *
 * And for EC PARAMETERS (`openssl ecparam -name P-256 -out p.pem`): a named curve becomes
 * a tpmbroker EC key holding only its group, so that `genpkey -paramfile p.pem` with
 * `-propquery ?provider=tpmbroker` (or tpmbroker alone) makes a TPM key, not one of the
 * default provider's.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include "provider.h"

#define TSS2_PEM_LABEL "TSS2 PRIVATE KEY"
#define EC_PARAMETERS_PEM_LABEL "EC PARAMETERS"
#define PASSWORD_MAX 1024

static void *dec_newctx(void *provctx)
{
    return provctx; /* nothing per decode to keep */
}

static void dec_freectx(void *ctx)
{
    (void)ctx;
}

static int pem_decode(void *vctx, OSSL_CORE_BIO *cin, int selection, OSSL_CALLBACK *object_cb,
                      void *object_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    TPMBROKER_CTX *prov = vctx;
    BIO *bio = BIO_new_from_core_bio(prov->libctx, cin);
    char *name = NULL, *header = NULL;
    unsigned char *data = NULL;
    long len = 0;
    int ok = 1, read;

    (void)selection;
    (void)pw_cb;
    (void)pw_cbarg;
    if (bio == NULL)
        return 0;
    /* other PEM types are not an error here: other decoders will take them */
    ERR_set_mark();
    read = PEM_read_bio(bio, &name, &header, &data, &len);
    ERR_pop_to_mark();
    if (read && strcmp(name, TSS2_PEM_LABEL) == 0) {
        OSSL_PARAM params[3];

        params[0] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, data, (size_t)len);
        params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
                                                     (char *)"TSS2", 0);
        params[2] = OSSL_PARAM_construct_end();
        ok = object_cb(params, object_cbarg);
    } else if (read && strcmp(name, EC_PARAMETERS_PEM_LABEL) == 0) {
        /* as OpenSSL's own PEM decoder passes it on: EC, type-specific (ECParameters) */
        OSSL_PARAM params[4];

        params[0] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, data, (size_t)len);
        params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                     (char *)"EC", 0);
        params[2] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
                                                     (char *)"type-specific", 0);
        params[3] = OSSL_PARAM_construct_end();
        ok = object_cb(params, object_cbarg);
    }
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(data);
    BIO_free(bio);
    return ok;
}

/* Reads the whole input; a TSS2 key is a few hundred bytes, a frame caps it at 64 KiB. */
static unsigned char *read_all(BIO *bio, size_t *len)
{
    size_t cap = 4096, n = 0;
    unsigned char *buf = malloc(cap);

    while (buf != NULL) {
        int r;

        if (n == cap) {
            unsigned char *nb;

            if (cap >= WIRE_MAX_FRAME)
                break;
            nb = realloc(buf, cap * 2);
            if (nb == NULL)
                break;
            buf = nb;
            cap *= 2;
        }
        r = BIO_read(bio, buf + n, (int)(cap - n));
        if (r <= 0) {
            *len = n;
            return buf;
        }
        n += (size_t)r;
    }
    free(buf);
    return NULL;
}

/* The whole of the core's input, or NULL. */
static unsigned char *read_input(TPMBROKER_CTX *prov, OSSL_CORE_BIO *cin, size_t *len)
{
    BIO *bio = BIO_new_from_core_bio(prov->libctx, cin);
    unsigned char *data;

    if (bio == NULL)
        return NULL;
    data = read_all(bio, len);
    BIO_free(bio);
    return data;
}

static int der_decode(TPMBROKER_CTX *prov, int expected, OSSL_CORE_BIO *cin, int selection,
                      OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    unsigned char *der;
    size_t len = 0, pwlen = 0;
    char pw[PASSWORD_MAX];
    int ok = 1, missing = 0;
    TSS2_INFO info;
    TPMB_KEY *key;

    if (selection != 0 && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0
        && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0)
        return 1;
    der = read_input(prov, cin, &len);
    if (der == NULL)
        return 0;
    if (!tss2_parse(der, len, &info) || info.type != expected) {
        free(der); /* not ours, or the other key type's decoder will take it */
        return 1;
    }
    if (!tpmb_fips_permits_keys(prov)) {
        free(der); /* ours, but OpenSSL would only say "unsupported": say what to set */
        return 0;
    }
    /*
     * No password at hand is not a decoding error: OpenSSL would hide ours behind
     * "unsupported". The key decodes (its public half is usable) and signing says why not.
     */
    if (!info.empty_auth && (pw_cb == NULL || !pw_cb(pw, sizeof(pw), &pwlen, NULL, pw_cbarg)))
        missing = 1;
    /* no broker here: a key file decodes offline; the broker LOADs it at first use */
    key = tpmb_key_from_tss2(prov, der, len, &info, (const uint8_t *)pw, pwlen);
    OPENSSL_cleanse(pw, sizeof(pw));
    free(der);
    if (key == NULL)
        return 0;
    key->auth_missing = missing;
    {
        int object_type = OSSL_OBJECT_PKEY;
        OSSL_PARAM params[4];

        params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
        params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                     (char *)tpmb_key_type_name(info.type), 0);
        params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key,
                                                      sizeof(key));
        params[3] = OSSL_PARAM_construct_end();
        ok = object_cb(params, object_cbarg);
    }
    tpmb_key_free(key); /* NULL when the keymgmt took it */
    return ok;
}

static int ec_decode(void *vctx, OSSL_CORE_BIO *cin, int selection, OSSL_CALLBACK *object_cb,
                     void *object_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    return der_decode(vctx, WIRE_KEY_TYPE_EC, cin, selection, object_cb, object_cbarg, pw_cb,
                      pw_cbarg);
}

static int rsa_decode(void *vctx, OSSL_CORE_BIO *cin, int selection, OSSL_CALLBACK *object_cb,
                      void *object_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    return der_decode(vctx, WIRE_KEY_TYPE_RSA, cin, selection, object_cb, object_cbarg, pw_cb,
                      pw_cbarg);
}

static int rsapss_decode(void *vctx, OSSL_CORE_BIO *cin, int selection,
                         OSSL_CALLBACK *object_cb, void *object_cbarg,
                         OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    return der_decode(vctx, WIRE_KEY_TYPE_RSA_PSS, cin, selection, object_cb, object_cbarg,
                      pw_cb, pw_cbarg);
}

/* An EC key of the private library context holding only the named curve `group`. */
static EVP_PKEY *ec_group_only(TPMBROKER_CTX *prov, const char *group)
{
    OSSL_PARAM params[2];
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(prov->libctx, "EC", NULL);
    EVP_PKEY *pkey = NULL;

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, (char *)group, 0);
    params[1] = OSSL_PARAM_construct_end();
    if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
        || EVP_PKEY_fromdata(pctx, &pkey, EVP_PKEY_KEY_PARAMETERS, params) <= 0)
        pkey = NULL;
    EVP_PKEY_CTX_free(pctx);
    return pkey;
}

/*
 * ECParameters DER naming a curve (an OID; explicit parameters are left to other
 * decoders) to a tpmbroker EC key holding the group. Any curve OpenSSL names is taken:
 * key generation then says whether the TPM has it, rather than another provider making a
 * software key in silence.
 */
static int ecparams_decode(void *vctx, OSSL_CORE_BIO *cin, int selection,
                           OSSL_CALLBACK *object_cb, void *object_cbarg,
                           OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    TPMBROKER_CTX *prov = vctx;
    unsigned char *der;
    const unsigned char *p;
    size_t len = 0;
    ASN1_OBJECT *oid = NULL;
    const char *group = NULL;
    TPMB_KEY *key = NULL;
    int ok = 1;

    (void)pw_cb;
    (void)pw_cbarg;
    if (selection != 0 && (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) == 0)
        return 1;
    der = read_input(prov, cin, &len);
    if (der == NULL)
        return 0;
    p = der;
    if (len > 2 && der[0] == V_ASN1_OBJECT
        && (oid = d2i_ASN1_OBJECT(NULL, &p, (long)len)) != NULL && p == der + len)
        group = OBJ_nid2sn(OBJ_obj2nid(oid));
    ASN1_OBJECT_free(oid);
    free(der);
    if (group == NULL)
        return 1; /* not a named curve: not ours */
    key = tpmb_key_new(prov, WIRE_KEY_TYPE_EC);
    if (key == NULL)
        return 0;
    key->pub = ec_group_only(prov, group);
    if (key->pub != NULL) {
        int object_type = OSSL_OBJECT_PKEY;
        OSSL_PARAM params[4];

        params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
        params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                     (char *)"EC", 0);
        params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key,
                                                      sizeof(key));
        params[3] = OSSL_PARAM_construct_end();
        ok = object_cb(params, object_cbarg);
    } /* else a curve the private library context lacks: not ours either */
    tpmb_key_free(key); /* NULL when the keymgmt took it */
    return ok;
}

static int ecparams_does_selection(void *provctx, int selection)
{
    (void)provctx;
    return selection == 0 || (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) != 0;
}

static int dec_does_selection(void *provctx, int selection)
{
    (void)provctx;
    return selection == 0 || (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0;
}

const OSSL_DISPATCH tpmb_pem_decoder_functions[] = {
    { OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx },
    { OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
    { OSSL_FUNC_DECODER_DECODE, (void (*)(void))pem_decode },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_ec_decoder_functions[] = {
    { OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx },
    { OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
    { OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection },
    { OSSL_FUNC_DECODER_DECODE, (void (*)(void))ec_decode },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_rsa_decoder_functions[] = {
    { OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx },
    { OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
    { OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection },
    { OSSL_FUNC_DECODER_DECODE, (void (*)(void))rsa_decode },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_rsapss_decoder_functions[] = {
    { OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx },
    { OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
    { OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))dec_does_selection },
    { OSSL_FUNC_DECODER_DECODE, (void (*)(void))rsapss_decode },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_ecparams_decoder_functions[] = {
    { OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))dec_newctx },
    { OSSL_FUNC_DECODER_FREECTX, (void (*)(void))dec_freectx },
    { OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))ecparams_does_selection },
    { OSSL_FUNC_DECODER_DECODE, (void (*)(void))ecparams_decode },
    { 0, NULL },
};
