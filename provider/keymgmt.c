/*
 * Key management for TPM EC, RSA and RSA-PSS keys: what the three share. Each key type's
 * dispatch table is in its own file (keymgmt_ec.c, keymgmt_rsa.c, keymgmt_rsapss.c), key
 * generation in keymgmt_gen.c, the key object in key.c.
 *
 * The public half is an ordinary EVP_PKEY of tpmb_crypto_libctx, so parameters, public
 * export and comparisons are answered by libcrypto itself. Export of the private half is
 * refused: that refusal is what makes OpenSSL bring signing back to this provider whatever
 * the provider order.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "keymgmt.h"

void km_key_free(void *keydata)
{
    tpmb_key_free(keydata);
}

/* Takes the key a decoder or store handed over by reference. */
void *km_key_load(const void *reference, size_t reference_sz)
{
    TPMB_KEY *key;

    if (reference == NULL || reference_sz != sizeof(key))
        return NULL;
    key = *(TPMB_KEY **)reference;
    *(TPMB_KEY **)reference = NULL; /* ownership moves to the caller */
    return key;
}

void *km_key_dup(const void *keydata_from, int selection)
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

int km_key_has(const void *keydata, int selection)
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

int km_key_match(const void *keydata1, const void *keydata2, int selection)
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
int km_key_import(void *keydata, int selection, const OSSL_PARAM params[])
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

int km_key_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
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

int km_key_get_params(void *keydata, OSSL_PARAM params[])
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
