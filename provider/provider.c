/* Provider entry point: identity, configuration, errors and the operation tables. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include "provider.h"

static const OSSL_PARAM provider_param_types[] = {
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_BUILDINFO, OSSL_PARAM_UTF8_PTR, NULL, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *provider_gettable_params(void *provctx)
{
    (void)provctx;
    return provider_param_types;
}

static int provider_get_params(void *provctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;

    (void)provctx;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
    if (p != NULL
        && !OSSL_PARAM_set_utf8_ptr(p, "tpmbroker: TPM 2.0 keys through a session broker"))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
    if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, TPMBROKER_VERSION))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
    if (p != NULL && !OSSL_PARAM_set_utf8_ptr(p, TPMBROKER_NAME "-" TPMBROKER_VERSION))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
    if (p != NULL && !OSSL_PARAM_set_int(p, 1))
        return 0;
    return 1;
}

static const OSSL_ALGORITHM keymgmt_algs[] = {
    { "EC:id-ecPublicKey:1.2.840.10045.2.1", TPMBROKER_PROPS, tpmb_ec_keymgmt_functions,
      "TPM 2.0 EC keys through tpmbroker" },
    { "RSA:rsaEncryption:1.2.840.113549.1.1.1", TPMBROKER_PROPS, tpmb_rsa_keymgmt_functions,
      "TPM 2.0 RSA keys through tpmbroker" },
    { "RSA-PSS:RSASSA-PSS:1.2.840.113549.1.1.10", TPMBROKER_PROPS,
      tpmb_rsapss_keymgmt_functions, "TPM 2.0 RSA keys bound to RSASSA-PSS through tpmbroker" },
    { "TPMBROKER-ECDHE", TPMBROKER_PROPS, tpmb_ecdhe_keymgmt_functions,
      "ephemeral EC keys for TLS key exchange (software)" },
    { NULL, NULL, NULL, NULL },
};

static const OSSL_ALGORITHM keyexch_algs[] = {
    { "TPMBROKER-ECDH", TPMBROKER_PROPS, tpmb_ecdh_keyexch_functions,
      "ECDH for TLS key exchange (software)" },
    { TPMB_TPM_ECDH_NAME, TPMBROKER_PROPS, tpmb_tpm_ecdh_keyexch_functions,
      "ECDH with a TPM key" },
    { NULL, NULL, NULL, NULL },
};

static const OSSL_ALGORITHM signature_algs[] = {
    { "ECDSA", TPMBROKER_PROPS, tpmb_signature_functions, "ECDSA with a TPM key" },
    { "RSA:rsaEncryption:1.2.840.113549.1.1.1", TPMBROKER_PROPS, tpmb_signature_functions,
      "RSA PKCS#1 v1.5 and PSS with a TPM key" },
    { NULL, NULL, NULL, NULL },
};

/* PEM armour off, for the labels TSS2 PRIVATE KEY and EC PARAMETERS only */
#define PEM_DECODER { "DER", TPMBROKER_PROPS ",input=pem", tpmb_pem_decoder_functions, NULL }
#define TSS2_DECODERS                                                                     \
    { "EC", TPMBROKER_PROPS ",input=der,structure=TSS2", tpmb_ec_decoder_functions, NULL },   \
    { "RSA", TPMBROKER_PROPS ",input=der,structure=TSS2", tpmb_rsa_decoder_functions, NULL }, \
    { "RSA-PSS", TPMBROKER_PROPS ",input=der,structure=TSS2", tpmb_rsapss_decoder_functions, \
      NULL }

static const OSSL_ALGORITHM decoder_algs[] = {
    PEM_DECODER,
    TSS2_DECODERS,
    { NULL, NULL, NULL, NULL },
};

/* Where no other provider reads EC parameters (tpmbroker alone, or with base): a named
 * curve becomes a tpmbroker key holding it, so genpkey -paramfile makes a TPM key. */
static const OSSL_ALGORITHM decoder_algs_with_ec_params[] = {
    PEM_DECODER,
    { "EC", TPMBROKER_PROPS ",input=der,structure=type-specific",
      tpmb_ecparams_decoder_functions, NULL },
    TSS2_DECODERS,
    { NULL, NULL, NULL, NULL },
};

/* One entry per key type, output and structure the apps ask for. */
#define ENCODER(type, props, fns) { type, TPMBROKER_PROPS "," props, fns, NULL }
#define PUBLIC_ENCODERS(type)                                                                \
    ENCODER(type, "output=der,structure=SubjectPublicKeyInfo", tpmb_encoder_spki_der_functions), \
    ENCODER(type, "output=pem,structure=SubjectPublicKeyInfo", tpmb_encoder_spki_pem_functions)
#define KEY_FILE_ENCODERS(type)                                                              \
    ENCODER(type, "output=der,structure=PrivateKeyInfo", tpmb_encoder_der_functions),          \
    ENCODER(type, "output=pem,structure=PrivateKeyInfo", tpmb_encoder_pem_functions),          \
    ENCODER(type, "output=text", tpmb_encoder_text_functions)

static const OSSL_ALGORITHM encoder_algs[] = {
    /* apps ask for PrivateKeyInfo; a TPM key can only be written as TSS2 PRIVATE KEY */
    KEY_FILE_ENCODERS("EC"),
    KEY_FILE_ENCODERS("RSA"),
    KEY_FILE_ENCODERS("RSA-PSS"),
    PUBLIC_ENCODERS("EC"),
    PUBLIC_ENCODERS("RSA"),
    PUBLIC_ENCODERS("RSA-PSS"),
    /* PKCS#1 RSAPublicKey, `rsa -RSAPublicKey_out`: OpenSSL's names for it */
    ENCODER("RSA", "output=der,structure=pkcs1", tpmb_encoder_pkcs1_der_functions),
    ENCODER("RSA", "output=pem,structure=pkcs1", tpmb_encoder_pkcs1_pem_functions),
    ENCODER("RSA", "output=der,structure=type-specific", tpmb_encoder_pkcs1_der_functions),
    ENCODER("RSA", "output=pem,structure=type-specific", tpmb_encoder_pkcs1_pem_functions),
    ENCODER("RSA", "output=der,structure=rsa", tpmb_encoder_pkcs1_der_functions),
    ENCODER("RSA", "output=pem,structure=rsa", tpmb_encoder_pkcs1_pem_functions),
    ENCODER("RSA-PSS", "output=der,structure=pkcs1", tpmb_encoder_pkcs1_der_functions),
    ENCODER("RSA-PSS", "output=pem,structure=pkcs1", tpmb_encoder_pkcs1_pem_functions),
    { NULL, NULL, NULL, NULL },
};

static const OSSL_ALGORITHM store_algs[] = {
    { "handle", TPMBROKER_PROPS, tpmb_store_functions,
      "persistent TPM keys: handle:0x81xxxxxx; certificates in NV: handle:0x01xxxxxx" },
    { "object", TPMBROKER_PROPS, tpmb_store_functions,
      "persistent TPM keys by tpm2-tools' serialized handle: object:FILE" },
    { NULL, NULL, NULL, NULL },
};

static const OSSL_ALGORITHM asym_cipher_algs[] = {
    { "RSA:rsaEncryption:1.2.840.113549.1.1.1", TPMBROKER_PROPS, tpmb_asym_cipher_functions,
      "RSA PKCS#1 v1.5, OAEP and raw decryption with a TPM key" },
    { NULL, NULL, NULL, NULL },
};

/* rand.c: "CTR-DRBG" is the name OpenSSL fetches for its DRBGs (see rand.c) */
static const OSSL_ALGORITHM rand_algs[] = {
    { "CTR-DRBG", TPMBROKER_PROPS, tpmb_rand_functions, "random bytes from the TPM" },
    { NULL, NULL, NULL, NULL },
};

/* digest.c: software digests for setups that have none (-provider base); see standing_in */
#define DIGEST_PROPS TPMBROKER_PROPS ",tpmbroker.digest=yes"
static const OSSL_ALGORITHM digest_algs[] = {
    { "SHA1:SHA-1:SSL3-SHA1", DIGEST_PROPS, tpmb_sha1_functions, "SHA-1, in software" },
    { "SHA2-224:SHA-224:SHA224", DIGEST_PROPS, tpmb_sha224_functions, "SHA-224, in software" },
    { "SHA2-256:SHA-256:SHA256", DIGEST_PROPS, tpmb_sha256_functions, "SHA-256, in software" },
    { "SHA2-384:SHA-384:SHA384", DIGEST_PROPS, tpmb_sha384_functions, "SHA-384, in software" },
    { "SHA2-512:SHA-512:SHA512", DIGEST_PROPS, tpmb_sha512_functions, "SHA-512, in software" },
    { NULL, NULL, NULL, NULL },
};

/*
 * 1 when the application has neither the default nor the FIPS provider: only then does
 * tpmbroker stand in for them, with digests and an EC PARAMETERS decoder. Beside either,
 * ours would compete with theirs (a fetch without a query takes whichever was registered
 * first, `-propquery ?provider=tpmbroker` would prefer ours, and the decoders of the
 * provider loaded last are tried first), moving hashing out of the FIPS provider and
 * turning software keys made from parameter files into TPM keys. Asked at every fetch
 * (not cached), so a provider loaded later counts.
 */
static int crypto_mode(TPMBROKER_CTX *ctx);

static int standing_in(TPMBROKER_CTX *prov)
{
    /*
     * Asked of the child of the application's context (its providers, in this module's
     * libcrypto), never of the core's own pointer: the core may be another copy of
     * libcrypto (Python cryptography's, reading the same OPENSSL_CONF). An application in
     * FIPS mode is never stood in for, and its FIPS provider is not looked up: fips.so is
     * one module shared by every libcrypto of the process, and looking it up from a child
     * context instantiates it again under another core, which leaves the other copies'
     * FIPS provider unusable ("unsupported" for every digest).
     */
    OSSL_LIB_CTX *app = prov->app_libctx;

    return app != NULL && crypto_mode(prov) != TPMB_CRYPTO_FIPS
           && !OSSL_PROVIDER_available(app, "default");
}

/* The tables provider_query answers with, by tpmb_operation_table. Those that do no
 * cryptography are always declared fips=yes; the others only with `fips = yes`. The random
 * source never is: the FIPS provider's DRBG stays the application's. */
static const struct {
    const OSSL_ALGORITHM *algs;
    int crypto;
} operation_tables[TPMB_OPERATION_TABLES] = {
    [TPMB_TABLE_KEYMGMT] = { keymgmt_algs, 1 },
    [TPMB_TABLE_SIGNATURE] = { signature_algs, 1 },
    [TPMB_TABLE_KEYEXCH] = { keyexch_algs, 1 },
    [TPMB_TABLE_ASYM_CIPHER] = { asym_cipher_algs, 1 },
    [TPMB_TABLE_DECODER] = { decoder_algs, 0 },
    [TPMB_TABLE_ENCODER] = { encoder_algs, 0 },
    [TPMB_TABLE_STORE] = { store_algs, 0 },
};

static const OSSL_ALGORITHM *table(const TPMBROKER_CTX *ctx, enum tpmb_operation_table t)
{
    return ctx->tables[t] != NULL ? ctx->tables[t] : operation_tables[t].algs;
}

static const OSSL_ALGORITHM *provider_query(void *provctx, int operation_id, int *no_cache)
{
    const TPMBROKER_CTX *ctx = provctx;

    *no_cache = 0;
    if (operation_id == OSSL_OP_DIGEST) {
        *no_cache = 1;
        return standing_in(provctx) ? digest_algs : NULL;
    }
    if (operation_id == OSSL_OP_DECODER) {
        *no_cache = 1;
        return standing_in(provctx) ? decoder_algs_with_ec_params
                                    : table(ctx, TPMB_TABLE_DECODER);
    }
    switch (operation_id) {
    case OSSL_OP_KEYMGMT:
        return table(ctx, TPMB_TABLE_KEYMGMT);
    case OSSL_OP_SIGNATURE:
        return table(ctx, TPMB_TABLE_SIGNATURE);
    case OSSL_OP_KEYEXCH:
        return table(ctx, TPMB_TABLE_KEYEXCH);
    case OSSL_OP_ENCODER:
        return table(ctx, TPMB_TABLE_ENCODER);
    case OSSL_OP_STORE:
        return table(ctx, TPMB_TABLE_STORE);
    case OSSL_OP_RAND:
        return rand_algs;
    case OSSL_OP_ASYM_CIPHER:
        return table(ctx, TPMB_TABLE_ASYM_CIPHER);
    default:
        return NULL;
    }
}

static void free_table(OSSL_ALGORITHM *algs)
{
    size_t i;

    if (algs == NULL)
        return;
    for (i = 0; algs[i].algorithm_names != NULL; i++)
        free((char *)algs[i].property_definition);
    free(algs);
}

/* A copy of `algs` with TPMBROKER_FIPS_PROP added to every property definition. */
static OSSL_ALGORITHM *declared_fips(const OSSL_ALGORITHM *algs)
{
    OSSL_ALGORITHM *copy;
    size_t n = 0, i;

    while (algs[n].algorithm_names != NULL)
        n++;
    copy = calloc(n + 1, sizeof(*copy));
    if (copy == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        size_t len = strlen(algs[i].property_definition) + sizeof(TPMBROKER_FIPS_PROP);
        char *props = malloc(len);

        if (props == NULL) {
            free_table(copy);
            return NULL;
        }
        snprintf(props, len, "%s" TPMBROKER_FIPS_PROP, algs[i].property_definition);
        copy[i] = algs[i];
        copy[i].property_definition = props;
    }
    return copy;
}

static int make_tables(TPMBROKER_CTX *ctx)
{
    int t;

    for (t = 0; t < TPMB_OPERATION_TABLES; t++) {
        if (!operation_tables[t].crypto || ctx->fips) {
            ctx->tables[t] = declared_fips(operation_tables[t].algs);
            if (ctx->tables[t] == NULL)
                return 0;
        }
    }
    return 1;
}

static void free_tables(TPMBROKER_CTX *ctx)
{
    int t;

    for (t = 0; t < TPMB_OPERATION_TABLES; t++) {
        free_table(ctx->tables[t]);
        ctx->tables[t] = NULL;
    }
}

/* In FIPS mode everything is fetched from the application's providers but ours. */
#define FIPS_MODE_PROPQ "provider!=" TPMBROKER_NAME

static int crypto_mode(TPMBROKER_CTX *ctx)
{
    int mode = __atomic_load_n(&ctx->crypto_mode, __ATOMIC_ACQUIRE);

    if (mode == TPMB_CRYPTO_UNDECIDED) {
        /* Decided once, at the first operation: by then the application's configuration
         * has set its default properties. Racing threads decide the same. */
        mode = ctx->app_libctx != NULL && EVP_default_properties_is_fips_enabled(ctx->app_libctx)
                   ? TPMB_CRYPTO_FIPS : TPMB_CRYPTO_PRIVATE;
        tpmb_debug("software cryptography from %s", mode == TPMB_CRYPTO_FIPS
                   ? "the application's FIPS providers (default_properties fips=yes)"
                   : "the private library context");
        __atomic_store_n(&ctx->crypto_mode, mode, __ATOMIC_RELEASE);
    }
    return mode;
}

OSSL_LIB_CTX *tpmb_crypto_libctx(TPMBROKER_CTX *ctx)
{
    return crypto_mode(ctx) == TPMB_CRYPTO_FIPS ? ctx->app_libctx : ctx->libctx;
}

const char *tpmb_crypto_propq(TPMBROKER_CTX *ctx)
{
    return crypto_mode(ctx) == TPMB_CRYPTO_FIPS ? FIPS_MODE_PROPQ : NULL;
}

#define FIPS_NOT_DECLARED_HINT \
    "the application asks for FIPS-approved algorithms (default_properties = fips=yes); " \
    "if the TPM is FIPS 140 certified, set `fips = yes` in tpmbroker's provider section " \
    "of openssl.cnf (docs/provider.md, \"FIPS mode\")"

int tpmb_fips_permits_keys(TPMBROKER_CTX *ctx)
{
    static int told;

    if (ctx->fips || crypto_mode(ctx) != TPMB_CRYPTO_FIPS)
        return 1;
    /* OpenSSL's file store drops what a decoder raises and reports "unsupported" alone:
     * a misconfiguration this plain is also said on stderr, once per process. */
    if (!tpmb_debug_on() && !__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
        fputs("tpmbroker: " FIPS_NOT_DECLARED_HINT "\n", stderr);
    TPMB_RAISE(ctx, TPMB_R_FIPS_NOT_DECLARED, FIPS_NOT_DECLARED_HINT);
    return 0;
}

static const OSSL_ITEM *provider_reason_strings(void *provctx)
{
    (void)provctx;
    return tpmb_reason_strings;
}

static void provider_teardown(void *provctx)
{
    TPMBROKER_CTX *ctx = provctx;

    if (ctx == NULL)
        return;
    client_free(ctx->client);
    OSSL_LIB_CTX_free(ctx->app_libctx);
    OSSL_LIB_CTX_free(ctx->libctx);
    free_tables(ctx);
    if (ctx->parent_auth != NULL) {
        OPENSSL_cleanse(ctx->parent_auth, strlen(ctx->parent_auth));
        free(ctx->parent_auth);
    }
    free(ctx);
}

/* The password of persistent parents: TPMBROKER_PARENT_AUTH, else tpm2-openssl's
 * TPM2OPENSSL_PARENT_AUTH, else the config's `parent-auth`; NULL when none is set. */
static char *parent_auth(const char *configured)
{
    static const char *const names[] = { "TPMBROKER_PARENT_AUTH", "TPM2OPENSSL_PARENT_AUTH" };
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        const char *env = getenv(names[i]);

        if (env != NULL && *env != '\0')
            return strdup(env);
    }
    if (configured != NULL && *configured != '\0')
        return strdup(configured);
    return NULL;
}

static const OSSL_DISPATCH provider_dispatch[] = {
    { OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))provider_teardown },
    { OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))provider_gettable_params },
    { OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))provider_get_params },
    { OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))provider_query },
    { OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))provider_reason_strings },
    { OSSL_FUNC_PROVIDER_GET_CAPABILITIES, (void (*)(void))tpmb_get_capabilities },
    { 0, NULL },
};

/* socket: env TPMBROKER_SOCKET, else the config's `socket`, else the session's broker at
 * $XDG_RUNTIME_DIR/tpmbroker.sock where one is there, else the system service's: a user
 * logged in on a machine with the packaged service reaches it with no setting at all. */
static char *socket_path(const char *configured)
{
    const char *env = getenv("TPMBROKER_SOCKET");
    const char *runtime;
    char *path;

    if (env != NULL && *env != '\0')
        return strdup(env);
    if (configured != NULL && *configured != '\0')
        return strdup(configured);
    runtime = getenv("XDG_RUNTIME_DIR");
    if (runtime != NULL && *runtime != '\0') {
        size_t n = strlen(runtime) + sizeof("/tpmbroker.sock");

        path = malloc(n);
        if (path == NULL)
            return NULL;
        snprintf(path, n, "%s/tpmbroker.sock", runtime);
        if (access(path, F_OK) == 0)
            return path;
        free(path);
    }
    return strdup("/run/tpmbroker/tpmbroker.sock");
}

static int is_off(const char *v)
{
    return strcmp(v, "0") == 0 || OPENSSL_strcasecmp(v, "no") == 0
           || OPENSSL_strcasecmp(v, "off") == 0 || OPENSSL_strcasecmp(v, "false") == 0;
}

/* No I/O here: the broker is reached lazily, on the first operation that needs it. */
__attribute__((visibility("default")))
int OSSL_provider_init(const OSSL_CORE_HANDLE *core, const OSSL_DISPATCH *in,
                       const OSSL_DISPATCH **out, void **provctx)
{
    OSSL_FUNC_core_get_params_fn *get_params = NULL;
    TPMBROKER_CTX *ctx;
    const OSSL_DISPATCH *d;
    char *cfg_socket = NULL, *cfg_timeout = NULL, *cfg_debug = NULL, *cfg_verify = NULL;
    char *cfg_parent_auth = NULL, *cfg_fips = NULL;
    const char *env_verify = getenv("TPMBROKER_VERIFY");
    unsigned int timeout_ms = TPMBROKER_DEFAULT_TIMEOUT_MS;
    const char *env_debug = getenv("TPMBROKER_DEBUG");
    char *path;

    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        return 0;
    ctx->core = core;
    for (d = in; d->function_id != 0; d++) {
        switch (d->function_id) {
        case OSSL_FUNC_CORE_GET_PARAMS:
            get_params = OSSL_FUNC_core_get_params(d);
            break;
        case OSSL_FUNC_CORE_NEW_ERROR:
            ctx->new_error = OSSL_FUNC_core_new_error(d);
            break;
        case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
            ctx->set_error_debug = OSSL_FUNC_core_set_error_debug(d);
            break;
        case OSSL_FUNC_CORE_VSET_ERROR:
            ctx->vset_error = OSSL_FUNC_core_vset_error(d);
            break;
        default:
            break;
        }
    }
    if (get_params != NULL) {
        OSSL_PARAM params[] = {
            OSSL_PARAM_utf8_ptr("socket", &cfg_socket, 0),
            OSSL_PARAM_utf8_ptr("timeout", &cfg_timeout, 0),
            OSSL_PARAM_utf8_ptr("debug", &cfg_debug, 0),
            OSSL_PARAM_utf8_ptr("verify", &cfg_verify, 0),
            OSSL_PARAM_utf8_ptr("parent-auth", &cfg_parent_auth, 0),
            OSSL_PARAM_utf8_ptr("fips", &cfg_fips, 0),
            OSSL_PARAM_END,
        };

        get_params(core, params);
    }
    if ((env_debug != NULL && strcmp(env_debug, "0") != 0 && *env_debug != '\0')
        || (cfg_debug != NULL && strcmp(cfg_debug, "1") == 0))
        tpmb_debug_enable();
    /* verify: on unless turned off; the environment overrides the config file */
    ctx->verify = 1;
    if (env_verify != NULL && *env_verify != '\0')
        ctx->verify = !is_off(env_verify);
    else if (cfg_verify != NULL && *cfg_verify != '\0')
        ctx->verify = !is_off(cfg_verify);
    if (cfg_timeout != NULL && *cfg_timeout != '\0') {
        /* seconds, as in the config file; fractions allowed */
        char *end;
        double s = strtod(cfg_timeout, &end);

        if (end != cfg_timeout && s > 0 && s <= 300)
            timeout_ms = (unsigned int)(s * 1000);
        else
            tpmb_debug("ignoring timeout = %s (seconds, 0 < t <= 300)", cfg_timeout);
    }
    /* fips: off unless the site declares it (docs/provider.md, "FIPS mode") */
    ctx->fips = cfg_fips != NULL && *cfg_fips != '\0' && !is_off(cfg_fips);
    /* the core BIO upcalls are needed to read the decoders' input */
    ctx->libctx = OSSL_LIB_CTX_new_from_dispatch(core, in);
    ctx->app_libctx = OSSL_LIB_CTX_new_child(core, in);
    path = socket_path(cfg_socket);
    if (ctx->libctx == NULL || ctx->app_libctx == NULL || path == NULL || !make_tables(ctx)) {
        free(path);
        free_tables(ctx);
        OSSL_LIB_CTX_free(ctx->app_libctx);
        OSSL_LIB_CTX_free(ctx->libctx);
        free(ctx);
        return 0;
    }
    ctx->parent_auth = parent_auth(cfg_parent_auth);
    ctx->client = client_new(path, timeout_ms);
    tpmb_debug("loaded; socket %s, timeout %u ms, verify %s, fips %s", path, timeout_ms,
               ctx->verify ? "on" : "off", ctx->fips ? "declared" : "not declared");
    free(path);
    if (ctx->client == NULL) {
        free_tables(ctx);
        OSSL_LIB_CTX_free(ctx->app_libctx);
        OSSL_LIB_CTX_free(ctx->libctx);
        free(ctx->parent_auth);
        free(ctx);
        return 0;
    }
    *out = provider_dispatch;
    *provctx = ctx;
    return 1;
}
