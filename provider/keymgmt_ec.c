/* Key management for TPM EC keys: the EC key's own parts (keymgmt.h has the shared ones). */
#include <openssl/evp.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keymgmt.h"

static void *ec_new(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_EC);
}

static const OSSL_PARAM ec_import_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ec_import_types_fn(int selection)
{
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : ec_import_types;
}

static const OSSL_PARAM *ec_export_types_fn(int selection)
{
    return ec_import_types_fn(selection);
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

static const OSSL_PARAM *ec_gettable_fn(void *provctx)
{
    (void)provctx;
    return ec_gettable;
}

static const char *ec_query_operation_name(int operation_id)
{
    if (operation_id == OSSL_OP_KEYEXCH)
        return TPMB_TPM_ECDH_NAME; /* exchange.c: OpenSSL fetches it for TPM keys only */
    return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : NULL;
}

static void *ec_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return km_gen_init(provctx, WIRE_KEY_TYPE_EC, selection, params);
}

static const OSSL_PARAM ec_gen_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    GEN_SETTABLE_COMMON,
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ec_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return ec_gen_settable;
}

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
