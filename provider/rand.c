/*
 * RAND: random bytes from the TPM, through the broker (RANDOM).
 *
 * Registered as "CTR-DRBG", the name OpenSSL 3 fetches for its primary, public and private
 * DRBGs (crypto/rand/rand_lib.c, unless RAND_set_DRBG_type or the config's [random] section
 * name another), as tpm2-openssl does: `openssl rand -provider tpmbroker` then reads the
 * TPM. The TPM keeps its own DRBG seeded; this one holds no state, ignores its parent
 * (OpenSSL hands it the seed source as one) and asks the broker for every request. The
 * broker reads TPM2_GetRandom through a salted session, so the bytes cross the TPM's bus
 * encrypted. The client has deadlines and is thread- and fork-safe; a broker that cannot
 * be reached fails the request with an error on the core's stack, and the next request
 * tries again.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "provider.h"

/* The TPM's generator is specified for at least 128 bits; TPMs with SHA-256 claim 256. */
#define RAND_STRENGTH 256

typedef struct tpmb_rand {
    TPMBROKER_CTX *prov;
    int state;            /* EVP_RAND_STATE_* */
    CRYPTO_RWLOCK *lock;  /* made by enable_locking, when OpenSSL asks for one */
} TPMB_RAND;

static OSSL_FUNC_rand_newctx_fn rand_newctx;
static OSSL_FUNC_rand_freectx_fn rand_freectx;
static OSSL_FUNC_rand_instantiate_fn rand_instantiate;
static OSSL_FUNC_rand_uninstantiate_fn rand_uninstantiate;
static OSSL_FUNC_rand_generate_fn rand_generate;
static OSSL_FUNC_rand_reseed_fn rand_reseed;
static OSSL_FUNC_rand_enable_locking_fn rand_enable_locking;
static OSSL_FUNC_rand_lock_fn rand_lock;
static OSSL_FUNC_rand_unlock_fn rand_unlock;
static OSSL_FUNC_rand_gettable_ctx_params_fn rand_gettable_ctx_params;
static OSSL_FUNC_rand_get_ctx_params_fn rand_get_ctx_params;

static void *rand_newctx(void *provctx, void *parent, const OSSL_DISPATCH *parent_calls)
{
    TPMB_RAND *r = calloc(1, sizeof(*r));

    (void)parent; /* the TPM seeds itself: no entropy is taken from a parent */
    (void)parent_calls;
    if (r == NULL) {
        TPMB_RAISE(provctx, TPMB_R_MALLOC, "out of memory");
        return NULL;
    }
    r->prov = provctx;
    r->state = EVP_RAND_STATE_UNINITIALISED;
    return r;
}

static void rand_freectx(void *vctx)
{
    TPMB_RAND *r = vctx;

    if (r == NULL)
        return;
    CRYPTO_THREAD_lock_free(r->lock);
    free(r);
}

/* No I/O: the broker is asked at the first generate (as keys are at their first use). */
static int rand_instantiate(void *vctx, unsigned int strength, int prediction_resistance,
                            const unsigned char *pstr, size_t pstr_len,
                            const OSSL_PARAM params[])
{
    TPMB_RAND *r = vctx;

    (void)prediction_resistance; /* every request reaches the TPM's generator anyway */
    (void)pstr;
    (void)pstr_len;
    (void)params;
    if (strength > RAND_STRENGTH) {
        TPMB_RAISE(r->prov, TPMB_R_UNSUPPORTED, "the TPM's generator gives %d bits of "
                   "security strength, not %u", RAND_STRENGTH, strength);
        return 0;
    }
    r->state = EVP_RAND_STATE_READY;
    return 1;
}

static int rand_uninstantiate(void *vctx)
{
    TPMB_RAND *r = vctx;

    r->state = EVP_RAND_STATE_UNINITIALISED;
    return 1;
}

static int rand_generate(void *vctx, unsigned char *out, size_t outlen, unsigned int strength,
                         int prediction_resistance, const unsigned char *addin,
                         size_t addin_len)
{
    TPMB_RAND *r = vctx;
    CLIENT_ERR err;

    (void)prediction_resistance;
    (void)addin; /* additional input cannot be passed to TPM2_GetRandom */
    (void)addin_len;
    if (r->state != EVP_RAND_STATE_READY) {
        TPMB_RAISE(r->prov, TPMB_R_INTERNAL, "random generator used before instantiation");
        return 0;
    }
    if (strength > RAND_STRENGTH) {
        TPMB_RAISE(r->prov, TPMB_R_UNSUPPORTED, "%u bits of security strength asked; the "
                   "TPM's generator gives %d", strength, RAND_STRENGTH);
        return 0;
    }
    if (outlen == 0)
        return 1;
    if (!client_random(r->prov->client, out, outlen, &err)) {
        OPENSSL_cleanse(out, outlen);
        TPMB_RAISE_CLIENT(r->prov, "reading random bytes from the TPM", &err);
        return 0;
    }
    tpmb_debug("%zu random bytes from the TPM", outlen);
    return 1;
}

static int rand_reseed(void *vctx, int prediction_resistance, const unsigned char *ent,
                       size_t ent_len, const unsigned char *addin, size_t addin_len)
{
    /* The TPM reseeds its own generator; there is no state here to reseed. */
    (void)vctx;
    (void)prediction_resistance;
    (void)ent;
    (void)ent_len;
    (void)addin;
    (void)addin_len;
    return 1;
}

static int rand_enable_locking(void *vctx)
{
    TPMB_RAND *r = vctx;

    if (r->lock == NULL && (r->lock = CRYPTO_THREAD_lock_new()) == NULL) {
        TPMB_RAISE(r->prov, TPMB_R_MALLOC, "out of memory");
        return 0;
    }
    return 1;
}

static int rand_lock(void *vctx)
{
    TPMB_RAND *r = vctx;

    return r->lock == NULL || CRYPTO_THREAD_write_lock(r->lock);
}

static void rand_unlock(void *vctx)
{
    TPMB_RAND *r = vctx;

    if (r->lock != NULL)
        CRYPTO_THREAD_unlock(r->lock);
}

static const OSSL_PARAM rand_ctx_param_types[] = {
    OSSL_PARAM_int(OSSL_RAND_PARAM_STATE, NULL),
    OSSL_PARAM_uint(OSSL_RAND_PARAM_STRENGTH, NULL),
    OSSL_PARAM_size_t(OSSL_RAND_PARAM_MAX_REQUEST, NULL),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *rand_gettable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return rand_ctx_param_types;
}

static int rand_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    TPMB_RAND *r = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_STATE);
    if (p != NULL && !OSSL_PARAM_set_int(p, r->state))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_STRENGTH);
    if (p != NULL && !OSSL_PARAM_set_uint(p, RAND_STRENGTH))
        return 0;
    /* OpenSSL cuts larger requests into pieces of this size; one RANDOM request each */
    p = OSSL_PARAM_locate(params, OSSL_RAND_PARAM_MAX_REQUEST);
    if (p != NULL && !OSSL_PARAM_set_size_t(p, WIRE_MAX_RANDOM))
        return 0;
    return 1;
}

const OSSL_DISPATCH tpmb_rand_functions[] = {
    { OSSL_FUNC_RAND_NEWCTX, (void (*)(void))rand_newctx },
    { OSSL_FUNC_RAND_FREECTX, (void (*)(void))rand_freectx },
    { OSSL_FUNC_RAND_INSTANTIATE, (void (*)(void))rand_instantiate },
    { OSSL_FUNC_RAND_UNINSTANTIATE, (void (*)(void))rand_uninstantiate },
    { OSSL_FUNC_RAND_GENERATE, (void (*)(void))rand_generate },
    { OSSL_FUNC_RAND_RESEED, (void (*)(void))rand_reseed },
    { OSSL_FUNC_RAND_ENABLE_LOCKING, (void (*)(void))rand_enable_locking },
    { OSSL_FUNC_RAND_LOCK, (void (*)(void))rand_lock },
    { OSSL_FUNC_RAND_UNLOCK, (void (*)(void))rand_unlock },
    { OSSL_FUNC_RAND_GETTABLE_CTX_PARAMS, (void (*)(void))rand_gettable_ctx_params },
    { OSSL_FUNC_RAND_GET_CTX_PARAMS, (void (*)(void))rand_get_ctx_params },
    { 0, NULL },
};
