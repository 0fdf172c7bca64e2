/* Key management for TPM RSA keys: the RSA key's own parts (keymgmt.h has the shared ones;
 * RSA-PSS keys reuse the public-key parts, keymgmt_rsapss.c). */
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keymgmt.h"

static void *rsa_new(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_RSA);
}

static const OSSL_PARAM rsa_import_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

const OSSL_PARAM *km_rsa_import_types(int selection)
{
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? NULL : rsa_import_types;
}

const OSSL_PARAM *km_rsa_export_types(int selection)
{
    return km_rsa_import_types(selection);
}

static const OSSL_PARAM rsa_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_END,
};

const OSSL_PARAM *km_rsa_gettable(void *provctx)
{
    (void)provctx;
    return rsa_gettable;
}

const char *km_rsa_query_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_SIGNATURE ? "RSA" : NULL;
}

static void *rsa_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return km_gen_init(provctx, WIRE_KEY_TYPE_RSA, selection, params);
}

static const OSSL_PARAM rsa_gen_settable[] = {
    OSSL_PARAM_uint(OSSL_PKEY_PARAM_RSA_BITS, NULL),
    OSSL_PARAM_size_t(OSSL_PKEY_PARAM_RSA_PRIMES, NULL),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    GEN_SETTABLE_COMMON,
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rsa_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return rsa_gen_settable;
}

#define rsa_import_types_fn km_rsa_import_types
#define rsa_export_types_fn km_rsa_export_types
#define rsa_gettable_fn km_rsa_gettable
#define rsa_query_operation_name km_rsa_query_operation_name

const OSSL_DISPATCH tpmb_rsa_keymgmt_functions[] = { KEYMGMT_COMMON(rsa) };
