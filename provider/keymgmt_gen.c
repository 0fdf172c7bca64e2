/*
 * Key generation for every key type, forwarded to the broker (GENERATE) and written as a
 * TSS2 PRIVATE KEY: the generation context, the parameters the apps and -pkeyopt set (a
 * table of setters), -paramfile's template, and the call.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "keymgmt.h"

typedef struct gen_ctx {
    TPMBROKER_CTX *prov;
    int type;
    uint16_t curve;
    unsigned int bits;
    uint32_t parent;
    char *auth;
    uint8_t usage;    /* WIRE_USAGE_*; DEFAULT: sign and decrypt (RSA-PSS: sign) */
    uint16_t hash;    /* the key's nameAlg (and RSA-PSS scheme hash), 0 = SHA-256 */
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

/* --- -pkeyopt and the apps' parameters: one setter each, in a table ------------------- */

/* Which key types a parameter applies to; the others ignore it, as OpenSSL's own do. */
#define FOR_EC (1u << WIRE_KEY_TYPE_EC)
#define FOR_RSA ((1u << WIRE_KEY_TYPE_RSA) | (1u << WIRE_KEY_TYPE_RSA_PSS))
#define FOR_RSA_PSS (1u << WIRE_KEY_TYPE_RSA_PSS)
#define FOR_ALL (FOR_EC | FOR_RSA)

/* A password given as a string, copied (the old copy wiped); "" clears it if empty_clears. */
static int set_secret(char **slot, const OSSL_PARAM *p, int empty_clears)
{
    const char *value;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &value))
        return 0;
    if (*slot != NULL) {
        OPENSSL_cleanse(*slot, strlen(*slot));
        free(*slot);
        *slot = NULL;
    }
    if (empty_clears && *value == '\0')
        return 1;
    return (*slot = strdup(value)) != NULL;
}

/* The curve by its name, from a parameter or a -paramfile template. */
static int set_curve(GEN_CTX *g, const char *name)
{
    g->curve = curve_from_name(name);
    if (g->curve == 0) {
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "curve %s: TPM keys are on " CURVES_TEXT, name);
        return 0;
    }
    return 1;
}

static int set_group(GEN_CTX *g, const OSSL_PARAM *p)
{
    const char *name;

    return OSSL_PARAM_get_utf8_string_ptr(p, &name) && set_curve(g, name);
}

/* The broker asks the TPM (TPM2_TestParms) and refuses with the TPM's reason. */
static int set_bits(GEN_CTX *g, const OSSL_PARAM *p)
{
    if (!OSSL_PARAM_get_uint(p, &g->bits))
        return 0;
    if (g->bits == 0 || g->bits > 0xffff) {
        TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT, "RSA-%u: no such key size", g->bits);
        return 0;
    }
    return 1;
}

/* `openssl genrsa` always sets it (2 unless -primes). */
static int set_primes(GEN_CTX *g, const OSSL_PARAM *p)
{
    size_t primes;

    if (!OSSL_PARAM_get_size_t(p, &primes))
        return 0;
    if (primes != 2) {
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "RSA keys with %zu primes: the TPM makes "
                   "two-prime keys only (-primes 2)", primes);
        return 0;
    }
    return 1;
}

static int set_exponent(GEN_CTX *g, const OSSL_PARAM *p)
{
    BIGNUM *e = NULL;
    int ok = OSSL_PARAM_get_BN(p, &e) && BN_is_word(e, 65537);

    BN_free(e);
    if (!ok)
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "the TPM keys use the exponent 65537 only");
    return ok;
}

/* The wire hash a digest-name parameter names, into *out; `what` and `why` word the
 * refusal of one the TPM keys cannot take. */
static int set_hash(GEN_CTX *g, const OSSL_PARAM *p, uint16_t *out, const char *what,
                    const char *why)
{
    const char *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &md))
        return 0;
    *out = hash_from_name(g->prov, md);
    if (*out == 0) {
        TPMB_RAISE(g->prov, TPMB_R_UNSUPPORTED, "%s %s: %s", what, md, why);
        return 0;
    }
    return 1;
}

static int set_mgf1(GEN_CTX *g, const OSSL_PARAM *p)
{
    return set_hash(g, p, &g->mgf1, "MGF1 digest", "the TPM uses the signature digest for MGF1");
}

/* The key's hash: its nameAlg, and what an RSA-PSS key's scheme is bound to. */
static int set_digest(GEN_CTX *g, const OSSL_PARAM *p)
{
    return set_hash(g, p, &g->hash, "digest",
                    "a TPM key's hash is SHA-1, SHA-256, SHA-384 or SHA-512");
}

static int set_usage(GEN_CTX *g, const OSSL_PARAM *p)
{
    static const struct { const char *name; uint8_t usage; } usages[] = {
        { "sign", WIRE_USAGE_SIGN }, { "decrypt", WIRE_USAGE_DECRYPT },
        { "sign,decrypt", WIRE_USAGE_SIGN_DECRYPT }, { "decrypt,sign", WIRE_USAGE_SIGN_DECRYPT },
    };
    const char *usage;
    size_t i;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &usage))
        return 0;
    for (i = 0; i < sizeof(usages) / sizeof(usages[0]); i++) {
        if (strcmp(usage, usages[i].name) == 0) {
            g->usage = usages[i].usage;
            return 1;
        }
    }
    TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT, "usage %s: give sign, decrypt or sign,decrypt",
               usage);
    return 0;
}

static int set_user_auth(GEN_CTX *g, const OSSL_PARAM *p)
{
    return set_secret(&g->auth, p, 0);
}

static int set_parent(GEN_CTX *g, const OSSL_PARAM *p)
{
    uint32_t parent;

    if (!OSSL_PARAM_get_uint32(p, &parent))
        return 0;
    if (parent != WIRE_STORAGE_PRIMARY && (parent & 0xff000000u) != 0x81000000u) {
        TPMB_RAISE(g->prov, TPMB_R_INVALID_ARGUMENT, "parent 0x%08x: give 0x40000001 "
                   "(storage primary) or a persistent handle 0x81xxxxxx", parent);
        return 0;
    }
    g->parent = parent;
    return 1;
}

static int set_parent_auth(GEN_CTX *g, const OSSL_PARAM *p)
{
    return set_secret(&g->parent_auth, p, 1);
}

static const struct gen_param {
    const char *name;
    unsigned int types; /* FOR_* */
    int (*set)(GEN_CTX *g, const OSSL_PARAM *p);
} gen_params[] = {
    { OSSL_PKEY_PARAM_GROUP_NAME, FOR_EC, set_group },
    { OSSL_PKEY_PARAM_RSA_BITS, FOR_RSA, set_bits },
    { OSSL_PKEY_PARAM_RSA_PRIMES, FOR_RSA, set_primes },
    { OSSL_PKEY_PARAM_MGF1_DIGEST, FOR_RSA_PSS, set_mgf1 },
    { "usage", FOR_ALL, set_usage },
    { OSSL_PKEY_PARAM_RSA_E, FOR_RSA, set_exponent },
    { "user-auth", FOR_ALL, set_user_auth },
    { "parent", FOR_ALL, set_parent },
    { "parent-auth", FOR_ALL, set_parent_auth },
    { "digest", FOR_ALL, set_digest },
};

int km_gen_set_params(void *genctx, const OSSL_PARAM params[])
{
    GEN_CTX *g = genctx;
    size_t i;

    if (params == NULL)
        return 1;
    for (i = 0; i < sizeof(gen_params) / sizeof(gen_params[0]); i++) {
        const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, gen_params[i].name);

        if (p != NULL && (gen_params[i].types & (1u << g->type)) != 0
            && !gen_params[i].set(g, p))
            return 0;
    }
    return 1;
}

void *km_gen_init(void *provctx, int type, int selection, const OSSL_PARAM params[])
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
    if (!km_gen_set_params(g, params)) {
        free(g);
        return NULL;
    }
    return g;
}

/* -paramfile: the curve comes from a parameters-only key imported into this keymgmt. */
int km_gen_set_template(void *genctx, void *templ)
{
    GEN_CTX *g = genctx;
    TPMB_KEY *t = templ;
    char name[64];

    if (g->type != WIRE_KEY_TYPE_EC || t == NULL || t->pub == NULL)
        return 1;
    return EVP_PKEY_get_utf8_string_param(t->pub, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name),
                                          NULL)
           && set_curve(g, name);
}

void *km_gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg)
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

void km_gen_cleanup(void *genctx)
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
