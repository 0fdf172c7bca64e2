/*
 * Ephemeral ECDH for TLS, so the provider order does not matter.
 *
 * libssl only enables the EC TLS groups of a provider whose key management is the first
 * "EC" one found. With tpmbroker listed first that is ours, whose keys live in the TPM, and
 * TLS 1.2 with ECDSA certificates fails ("no shared cipher"). This file announces
 * secp256r1 and secp384r1 itself, with a key type of its own, TPMBROKER-ECDHE: ordinary
 * software keys of tpmb_crypto_libctx, wrapped, plus the matching key exchange. Nothing here
 * touches the broker. With the default provider first, libssl uses the default provider's
 * groups and none of this runs.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/prov_ssl.h>

#include "provider.h"

#define ECDHE_KEYMGMT "TPMBROKER-ECDHE"
#define ECDHE_KEYEXCH "TPMBROKER-ECDH"

/* --- TLS-GROUP capability -------------------------------------------------------------- */

struct tls_group {
    const char *name;     /* IANA */
    const char *internal; /* OpenSSL's curve name */
    unsigned int id;
    unsigned int secbits;
};

static const struct tls_group groups[] = {
    { "secp256r1", "prime256v1", 23, 128 },
    { "secp384r1", "secp384r1", 24, 192 },
};

int tpmb_get_capabilities(void *provctx, const char *capability, OSSL_CALLBACK *cb, void *arg)
{
    size_t i;

    (void)provctx;
    if (OPENSSL_strcasecmp(capability, "TLS-GROUP") != 0)
        return 0;
    for (i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) {
        unsigned int id = groups[i].id, secbits = groups[i].secbits, is_kem = 0;
        int min_tls = TLS1_VERSION, max_tls = 0, min_dtls = DTLS1_VERSION, max_dtls = 0;
        OSSL_PARAM p[11];

        p[0] = OSSL_PARAM_construct_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME,
                                                (char *)groups[i].name, 0);
        p[1] = OSSL_PARAM_construct_utf8_string(OSSL_CAPABILITY_TLS_GROUP_NAME_INTERNAL,
                                                (char *)groups[i].internal, 0);
        p[2] = OSSL_PARAM_construct_utf8_string(OSSL_CAPABILITY_TLS_GROUP_ALG,
                                                (char *)ECDHE_KEYMGMT, 0);
        p[3] = OSSL_PARAM_construct_uint(OSSL_CAPABILITY_TLS_GROUP_ID, &id);
        p[4] = OSSL_PARAM_construct_uint(OSSL_CAPABILITY_TLS_GROUP_SECURITY_BITS, &secbits);
        p[5] = OSSL_PARAM_construct_uint(OSSL_CAPABILITY_TLS_GROUP_IS_KEM, &is_kem);
        p[6] = OSSL_PARAM_construct_int(OSSL_CAPABILITY_TLS_GROUP_MIN_TLS, &min_tls);
        p[7] = OSSL_PARAM_construct_int(OSSL_CAPABILITY_TLS_GROUP_MAX_TLS, &max_tls);
        p[8] = OSSL_PARAM_construct_int(OSSL_CAPABILITY_TLS_GROUP_MIN_DTLS, &min_dtls);
        p[9] = OSSL_PARAM_construct_int(OSSL_CAPABILITY_TLS_GROUP_MAX_DTLS, &max_dtls);
        p[10] = OSSL_PARAM_construct_end();
        if (!cb(p, arg))
            return 0;
    }
    return 1;
}

/* --- key management: a wrapped software EC key ------------------------------------------ */

typedef struct ecdhe_key {
    TPMBROKER_CTX *prov;
    EVP_PKEY *pkey; /* in prov->libctx; NULL until generated or imported */
} ECDHE_KEY;

static void *ek_new(void *provctx)
{
    ECDHE_KEY *k = calloc(1, sizeof(*k));

    if (k != NULL)
        k->prov = provctx;
    return k;
}

static void ek_free(void *keydata)
{
    ECDHE_KEY *k = keydata;

    if (k == NULL)
        return;
    EVP_PKEY_free(k->pkey);
    free(k);
}

static void *ek_dup(const void *keydata, int selection)
{
    const ECDHE_KEY *from = keydata;
    ECDHE_KEY *k = ek_new(from->prov);

    (void)selection;
    if (k != NULL && from->pkey != NULL && (k->pkey = EVP_PKEY_dup(from->pkey)) == NULL) {
        ek_free(k);
        return NULL;
    }
    return k;
}

static int ek_has(const void *keydata, int selection)
{
    const ECDHE_KEY *k = keydata;
    BIGNUM *priv = NULL;
    int ok;

    if (k == NULL || k->pkey == NULL)
        return selection == 0;
    ok = 1;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) {
        ok = EVP_PKEY_get_bn_param(k->pkey, OSSL_PKEY_PARAM_PRIV_KEY, &priv);
        BN_clear_free(priv);
    }
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)) {
        size_t len = 0;

        ok = EVP_PKEY_get_octet_string_param(k->pkey, OSSL_PKEY_PARAM_PUB_KEY, NULL, 0, &len)
             && len > 0;
    }
    return ok;
}

static int ek_match(const void *keydata1, const void *keydata2, int selection)
{
    const ECDHE_KEY *a = keydata1, *b = keydata2;

    if (a->pkey == NULL || b->pkey == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return EVP_PKEY_eq(a->pkey, b->pkey) == 1;
    return EVP_PKEY_parameters_eq(a->pkey, b->pkey) == 1;
}

static int ek_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    ECDHE_KEY *k = keydata;
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(k->prov), "EC",
                                                    tpmb_crypto_propq(k->prov));
    EVP_PKEY *pkey = NULL;
    int sel = (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) ? EVP_PKEY_KEYPAIR
              : (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) ? EVP_PKEY_PUBLIC_KEY
                                                             : EVP_PKEY_KEY_PARAMETERS;
    int ok = pctx != NULL && EVP_PKEY_fromdata_init(pctx) > 0
             && EVP_PKEY_fromdata(pctx, &pkey, sel, (OSSL_PARAM *)params) > 0;

    EVP_PKEY_CTX_free(pctx);
    if (ok) {
        EVP_PKEY_free(k->pkey);
        k->pkey = pkey;
    }
    return ok;
}

static int ek_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg)
{
    ECDHE_KEY *k = keydata;

    return k->pkey != NULL && EVP_PKEY_export(k->pkey, selection, cb, cbarg);
}

static const OSSL_PARAM ek_io_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_PRIV_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ek_io_types_fn(int selection)
{
    (void)selection;
    return ek_io_types;
}

static int ek_get_params(void *keydata, OSSL_PARAM params[])
{
    ECDHE_KEY *k = keydata;

    return k->pkey != NULL && EVP_PKEY_get_params(k->pkey, params);
}

static const OSSL_PARAM ek_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ek_gettable_fn(void *provctx)
{
    (void)provctx;
    return ek_gettable;
}

/* The peer's point arrives this way, set on a parameters-only key. */
static int ek_set_params(void *keydata, const OSSL_PARAM params[])
{
    ECDHE_KEY *k = keydata;

    return k->pkey != NULL && EVP_PKEY_set_params(k->pkey, (OSSL_PARAM *)params);
}

static const OSSL_PARAM ek_settable[] = {
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ek_settable_fn(void *provctx)
{
    (void)provctx;
    return ek_settable;
}

static int ek_validate(const void *keydata, int selection, int checktype)
{
    const ECDHE_KEY *k = keydata;
    EVP_PKEY_CTX *pctx;
    int ok = 1;

    (void)checktype;
    if (k->pkey == NULL)
        return 0;
    pctx = EVP_PKEY_CTX_new_from_pkey(tpmb_crypto_libctx(k->prov), k->pkey,
                                      tpmb_crypto_propq(k->prov));
    if (pctx == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY)
        ok = EVP_PKEY_public_check(pctx) == 1;
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY))
        ok = EVP_PKEY_private_check(pctx) == 1;
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

static const char *ek_query_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_KEYEXCH ? ECDHE_KEYEXCH : NULL;
}

typedef struct ecdhe_gen {
    TPMBROKER_CTX *prov;
    int selection;
    char group[32];
} ECDHE_GEN;

static int ek_gen_set_params(void *genctx, const OSSL_PARAM params[])
{
    ECDHE_GEN *g = genctx;
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    const char *name;

    if (p == NULL)
        return 1;
    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || strlen(name) >= sizeof(g->group))
        return 0;
    strcpy(g->group, name);
    return 1;
}

static void *ek_gen_init(void *provctx, int selection, const OSSL_PARAM params[])
{
    ECDHE_GEN *g = calloc(1, sizeof(*g));

    if (g == NULL)
        return NULL;
    g->prov = provctx;
    g->selection = selection;
    if (!ek_gen_set_params(g, params)) {
        free(g);
        return NULL;
    }
    return g;
}

/* TLS 1.3 makes its key share from the peer's key, handed over as a template. */
static int ek_gen_set_template(void *genctx, void *templ)
{
    ECDHE_GEN *g = genctx;
    ECDHE_KEY *t = templ;

    if (t == NULL || t->pkey == NULL)
        return 0;
    return EVP_PKEY_get_utf8_string_param(t->pkey, OSSL_PKEY_PARAM_GROUP_NAME, g->group,
                                          sizeof(g->group), NULL);
}

static const OSSL_PARAM ek_gen_settable[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *ek_gen_settable_fn(void *genctx, void *provctx)
{
    (void)genctx;
    (void)provctx;
    return ek_gen_settable;
}

static void *ek_gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg)
{
    ECDHE_GEN *g = genctx;
    ECDHE_KEY *k;
    OSSL_PARAM params[2];

    (void)cb;
    (void)cbarg;
    if (g->group[0] == '\0')
        return NULL;
    k = ek_new(g->prov);
    if (k == NULL)
        return NULL;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, g->group, 0);
    params[1] = OSSL_PARAM_construct_end();
    if (g->selection & OSSL_KEYMGMT_SELECT_KEYPAIR) {
        k->pkey = EVP_PKEY_Q_keygen(tpmb_crypto_libctx(g->prov), tpmb_crypto_propq(g->prov), "EC",
                                    g->group);
    } else {
        /* parameters only: the peer's public point is set on it afterwards */
        EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_name(tpmb_crypto_libctx(g->prov), "EC",
                                                        tpmb_crypto_propq(g->prov));

        if (pctx == NULL || EVP_PKEY_fromdata_init(pctx) <= 0
            || EVP_PKEY_fromdata(pctx, &k->pkey, EVP_PKEY_KEY_PARAMETERS, params) <= 0)
            k->pkey = NULL;
        EVP_PKEY_CTX_free(pctx);
    }
    if (k->pkey == NULL) {
        ek_free(k);
        return NULL;
    }
    return k;
}

static void ek_gen_cleanup(void *genctx)
{
    free(genctx);
}

const OSSL_DISPATCH tpmb_ecdhe_keymgmt_functions[] = {
    { OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))ek_new },
    { OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))ek_free },
    { OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))ek_dup },
    { OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))ek_has },
    { OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))ek_match },
    { OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))ek_import },
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))ek_io_types_fn },
    { OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))ek_export },
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))ek_io_types_fn },
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))ek_get_params },
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))ek_gettable_fn },
    { OSSL_FUNC_KEYMGMT_SET_PARAMS, (void (*)(void))ek_set_params },
    { OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))ek_settable_fn },
    { OSSL_FUNC_KEYMGMT_VALIDATE, (void (*)(void))ek_validate },
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))ek_query_operation_name },
    { OSSL_FUNC_KEYMGMT_GEN_INIT, (void (*)(void))ek_gen_init },
    { OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, (void (*)(void))ek_gen_set_params },
    { OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS, (void (*)(void))ek_gen_settable_fn },
    { OSSL_FUNC_KEYMGMT_GEN_SET_TEMPLATE, (void (*)(void))ek_gen_set_template },
    { OSSL_FUNC_KEYMGMT_GEN, (void (*)(void))ek_gen },
    { OSSL_FUNC_KEYMGMT_GEN_CLEANUP, (void (*)(void))ek_gen_cleanup },
    { 0, NULL },
};

/* --- key exchange ------------------------------------------------------------------------ */

typedef struct ecdh_ctx {
    TPMBROKER_CTX *prov;
    ECDHE_KEY *key;  /* not owned */
    ECDHE_KEY *peer; /* not owned */
} ECDH_CTX;

static void *kx_newctx(void *provctx)
{
    ECDH_CTX *c = calloc(1, sizeof(*c));

    if (c != NULL)
        c->prov = provctx;
    return c;
}

static void kx_freectx(void *vctx)
{
    free(vctx);
}

static void *kx_dupctx(void *vctx)
{
    ECDH_CTX *c = malloc(sizeof(*c));

    if (c != NULL)
        *c = *(ECDH_CTX *)vctx;
    return c;
}

static int kx_init(void *vctx, void *provkey, const OSSL_PARAM params[])
{
    ECDH_CTX *c = vctx;

    (void)params;
    c->key = provkey;
    return c->key != NULL && c->key->pkey != NULL;
}

static int kx_set_peer(void *vctx, void *provkey)
{
    ECDH_CTX *c = vctx;

    c->peer = provkey;
    return c->peer != NULL && c->peer->pkey != NULL;
}

static int kx_derive(void *vctx, unsigned char *secret, size_t *secretlen, size_t outlen)
{
    ECDH_CTX *c = vctx;
    EVP_PKEY_CTX *pctx;
    int ok;

    if (c->key == NULL || c->peer == NULL)
        return 0;
    pctx = EVP_PKEY_CTX_new_from_pkey(tpmb_crypto_libctx(c->prov), c->key->pkey,
                                      tpmb_crypto_propq(c->prov));
    *secretlen = outlen;
    ok = pctx != NULL && EVP_PKEY_derive_init(pctx) > 0
         && EVP_PKEY_derive_set_peer_ex(pctx, c->peer->pkey, 0) > 0
         && EVP_PKEY_derive(pctx, secret, secretlen) > 0;
    EVP_PKEY_CTX_free(pctx);
    return ok;
}

static int kx_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    (void)vctx;
    (void)params;
    return 1;
}

static const OSSL_PARAM *kx_settable_ctx_params(void *vctx, void *provctx)
{
    static const OSSL_PARAM none[] = { OSSL_PARAM_END };

    (void)vctx;
    (void)provctx;
    return none;
}

const OSSL_DISPATCH tpmb_ecdh_keyexch_functions[] = {
    { OSSL_FUNC_KEYEXCH_NEWCTX, (void (*)(void))kx_newctx },
    { OSSL_FUNC_KEYEXCH_FREECTX, (void (*)(void))kx_freectx },
    { OSSL_FUNC_KEYEXCH_DUPCTX, (void (*)(void))kx_dupctx },
    { OSSL_FUNC_KEYEXCH_INIT, (void (*)(void))kx_init },
    { OSSL_FUNC_KEYEXCH_SET_PEER, (void (*)(void))kx_set_peer },
    { OSSL_FUNC_KEYEXCH_DERIVE, (void (*)(void))kx_derive },
    { OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, (void (*)(void))kx_set_ctx_params },
    { OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, (void (*)(void))kx_settable_ctx_params },
    { 0, NULL },
};
