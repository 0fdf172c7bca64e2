/* Key management for TPM RSA-PSS keys: RSA keys whose TPM scheme is bound to RSASSA-PSS.
 * Their public parts are RSA's (keymgmt_rsa.c); generation takes the MGF1 digest too. */
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keymgmt.h"

static void *rsapss_new(void *provctx)
{
    return tpmb_key_new(provctx, WIRE_KEY_TYPE_RSA_PSS);
}

#define rsapss_gettable_fn km_rsa_gettable
#define rsapss_import_types_fn km_rsa_import_types
#define rsapss_export_types_fn km_rsa_export_types
#define rsapss_query_operation_name km_rsa_query_operation_name

static void *rsapss_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    return km_gen_init(provctx, WIRE_KEY_TYPE_RSA_PSS, selection, params);
}

static const OSSL_PARAM rsapss_gen_settable[] = {
    OSSL_PARAM_uint(OSSL_PKEY_PARAM_RSA_BITS, NULL),
    OSSL_PARAM_size_t(OSSL_PKEY_PARAM_RSA_PRIMES, NULL),
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

const OSSL_DISPATCH tpmb_rsapss_keymgmt_functions[] = { KEYMGMT_COMMON(rsapss) };
