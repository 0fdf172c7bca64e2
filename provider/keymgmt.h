/*
 * Key management shared by the key types (keymgmt.c: the key object's OpenSSL side;
 * keymgmt_gen.c: generation). Each key type's file (keymgmt_ec.c, keymgmt_rsa.c,
 * keymgmt_rsapss.c) adds what is its own and lists it all with KEYMGMT_COMMON.
 */
#ifndef TPMBROKER_KEYMGMT_H
#define TPMBROKER_KEYMGMT_H

#include "provider.h"

void km_key_free(void *keydata);
void *km_key_load(const void *reference, size_t reference_sz);
void *km_key_dup(const void *keydata_from, int selection);
int km_key_has(const void *keydata, int selection);
int km_key_match(const void *keydata1, const void *keydata2, int selection);
int km_key_import(void *keydata, int selection, const OSSL_PARAM params[]);
int km_key_export(void *keydata, int selection, OSSL_CALLBACK *cb, void *cbarg);
int km_key_get_params(void *keydata, OSSL_PARAM params[]);

void *km_gen_init(void *provctx, int type, int selection, const OSSL_PARAM params[]);
int km_gen_set_params(void *genctx, const OSSL_PARAM params[]);
int km_gen_set_template(void *genctx, void *templ);
void *km_gen(void *genctx, OSSL_CALLBACK *cb, void *cbarg);
void km_gen_cleanup(void *genctx);

/* keymgmt_rsa.c: the public-key parts RSA-PSS keys share with RSA keys */
const OSSL_PARAM *km_rsa_import_types(int selection);
const OSSL_PARAM *km_rsa_export_types(int selection);
const OSSL_PARAM *km_rsa_gettable(void *provctx);
const char *km_rsa_query_operation_name(int operation_id);

/* What every key generation takes: the key's password, its parent and the parent's
 * password, its hash and its usage. */
#define GEN_SETTABLE_COMMON                                 \
    OSSL_PARAM_utf8_string("user-auth", NULL, 0),           \
    OSSL_PARAM_uint32("parent", NULL),                      \
    OSSL_PARAM_utf8_string("parent-auth", NULL, 0),         \
    OSSL_PARAM_utf8_string("digest", NULL, 0),              \
    OSSL_PARAM_utf8_string("usage", NULL, 0)

/* The dispatch entries every key type has; `kind` names its own functions. */
#define KEYMGMT_COMMON(kind) \
    { OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))km_key_free }, \
    { OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))km_key_load }, \
    { OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))km_key_dup }, \
    { OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))km_key_has }, \
    { OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))km_key_match }, \
    { OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))km_key_import }, \
    { OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))kind##_import_types_fn }, \
    { OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))km_key_export }, \
    { OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))kind##_export_types_fn }, \
    { OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))km_key_get_params }, \
    { OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))kind##_gettable_fn }, \
    { OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))kind##_query_operation_name }, \
    { OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))kind##_new }, \
    { OSSL_FUNC_KEYMGMT_GEN_INIT, (void (*)(void))kind##_gen_init }, \
    { OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, (void (*)(void))km_gen_set_params }, \
    { OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS, (void (*)(void))kind##_gen_settable_fn }, \
    { OSSL_FUNC_KEYMGMT_GEN_SET_TEMPLATE, (void (*)(void))km_gen_set_template }, \
    { OSSL_FUNC_KEYMGMT_GEN, (void (*)(void))km_gen }, \
    { OSSL_FUNC_KEYMGMT_GEN_CLEANUP, (void (*)(void))km_gen_cleanup }, \
    { 0, NULL }

#endif
