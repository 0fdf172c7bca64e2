/*
 * Signatures with TPM keys: ECDSA, RSA PKCS#1 v1.5 and RSA-PSS.
 *
 * Hashing happens here, with libcrypto's digests from the private libctx (the model is
 * OpenSSL's ecdsa_sig.c), or from the application's FIPS provider when its default
 * properties ask for fips=yes (tpmb_crypto_libctx); only the digest travels to the broker
 * in one SIGN request.
 * Verification uses the public key locally, so verify never needs the broker.
 *
 * Restricted signing keys (attestation keys) sign only what the TPM hashed itself: for
 * them digest_sign keeps the message, up to WIRE_MAX_MESSAGE bytes, and sends it in one
 * SIGN_MESSAGE. Keys by handle: or object: are kept that way too (the provider has not
 * seen their attributes; the broker hashes an ordinary key's message itself), falling
 * back to SIGN with the digest when the message outgrows the limit. A bare digest
 * (pkeyutl -sign without -rawin) cannot be signed by a restricted key.
 *
 * The broker is not trusted with the signature it returns: it must have the key's shape
 * (ECDSA: DER Ecdsa-Sig-Value with 0 < r, s < n of the key's curve; RSA: exactly the
 * modulus long, below the modulus) and, unless `verify = 0`, verify with the public key
 * over the digest that was sent, before OpenSSL sees it.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>

#include "provider.h"

#define MDNAME_MAX 50
_Static_assert(MDNAME_MAX <= TPMB_VERIFY_NAME_MAX, "a kept MGF1 name fits its slot");

typedef struct sig_ctx {
    TPMBROKER_CTX *prov;
    TPMB_KEY *key;          /* not owned: the EVP_PKEY behind the operation keeps it alive */
    EVP_MD *md;             /* NULL until known */
    uint16_t hash;          /* wire hash id of md */
    size_t mdsize;
    EVP_MD_CTX *mdctx;      /* digest_sign / digest_verify */
    int pad;                /* RSA_PKCS1_PADDING or RSA_PKCS1_PSS_PADDING */
    int saltlen;            /* as asked; checked against what the TPM does */
    char mgf1[MDNAME_MAX];  /* empty: same as md */
    int buffering;          /* digest_sign keeps the message (restricted or unknown key) */
    int overflow;           /* the message outgrew WIRE_MAX_MESSAGE: not kept */
    unsigned char *msg;
    size_t msglen, msgcap;
} SIG_CTX;

#define TPMA_OBJECT_RESTRICTED 0x00010000u

static int key_restricted(const TPMB_KEY *key)
{
    return (key->attributes & TPMA_OBJECT_RESTRICTED) != 0;
}

/* Persistent keys come from the broker's LOAD, which does not say their attributes. */
static int key_attributes_unknown(const TPMB_KEY *key)
{
    return key->source == WIRE_KEY_SOURCE_PERSISTENT_HANDLE;
}

static void *sig_newctx(void *provctx, const char *propq)
{
    SIG_CTX *ctx = calloc(1, sizeof(*ctx));

    (void)propq; /* digests come from tpmb_crypto_libctx, never from us */
    if (ctx == NULL)
        return NULL;
    ctx->prov = provctx;
    ctx->pad = RSA_PKCS1_PADDING;
    ctx->saltlen = RSA_PSS_SALTLEN_AUTO;
    return ctx;
}

static void sig_freectx(void *vctx)
{
    SIG_CTX *ctx = vctx;

    if (ctx == NULL)
        return;
    EVP_MD_CTX_free(ctx->mdctx);
    EVP_MD_free(ctx->md);
    free(ctx->msg);
    free(ctx);
}

static void *sig_dupctx(void *vctx)
{
    SIG_CTX *src = vctx, *dst = malloc(sizeof(*dst));

    if (dst == NULL)
        return NULL;
    *dst = *src;
    dst->md = NULL;
    dst->mdctx = NULL;
    dst->msg = NULL;
    if (src->msg != NULL) {
        dst->msg = malloc(src->msgcap);
        if (dst->msg == NULL)
            goto fail;
        memcpy(dst->msg, src->msg, src->msglen);
    }
    if (src->md != NULL) {
        if (!EVP_MD_up_ref(src->md))
            goto fail;
        dst->md = src->md;
    }
    if (src->mdctx != NULL) {
        dst->mdctx = EVP_MD_CTX_new();
        if (dst->mdctx == NULL || !EVP_MD_CTX_copy_ex(dst->mdctx, src->mdctx))
            goto fail;
    }
    return dst;
fail:
    sig_freectx(dst);
    return NULL;
}

/* Maps a digest to the wire's hash id; 0 when the TPM path does not support it. */
static uint16_t hash_id(const EVP_MD *md)
{
    if (EVP_MD_is_a(md, "SHA2-256"))
        return WIRE_HASH_SHA256;
    if (EVP_MD_is_a(md, "SHA2-384"))
        return WIRE_HASH_SHA384;
    if (EVP_MD_is_a(md, "SHA2-512"))
        return WIRE_HASH_SHA512;
    if (EVP_MD_is_a(md, "SHA1"))
        return WIRE_HASH_SHA1;
    return 0;
}

static int set_md(SIG_CTX *ctx, const char *name)
{
    EVP_MD *md = EVP_MD_fetch(tpmb_crypto_libctx(ctx->prov), name, tpmb_crypto_propq(ctx->prov));
    uint16_t id;

    if (md == NULL) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "unknown digest %s", name);
        return 0;
    }
    id = hash_id(md);
    if (id == 0) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "digest %s: TPM keys sign SHA-1, SHA-256, SHA-384 and SHA-512", name);
        EVP_MD_free(md);
        return 0;
    }
    if (ctx->key != NULL && ctx->key->pss_hash != 0 && id != ctx->key->pss_hash) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "digest %s: this RSA-PSS TPM key is bound to "
                   "%s", name, tpmb_hash_name(ctx->key->pss_hash) != NULL
                                   ? tpmb_hash_name(ctx->key->pss_hash) : "another digest");
        EVP_MD_free(md);
        return 0;
    }
    tpmb_debug("digest %s from provider %s", name,
               OSSL_PROVIDER_get0_name(EVP_MD_get0_provider(md)));
    EVP_MD_free(ctx->md);
    ctx->md = md;
    ctx->hash = id;
    ctx->mdsize = (size_t)EVP_MD_get_size(md);
    return 1;
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[]);

static int sig_init(SIG_CTX *ctx, void *keydata, const OSSL_PARAM params[], int need_private)
{
    TPMB_KEY *key = keydata;

    if (key == NULL && ctx->key == NULL)
        return 0;
    if (key != NULL)
        ctx->key = key;
    if (need_private && !tpmb_key_ready(ctx->prov, ctx->key, "to sign"))
        return 0;
    if (ctx->key->pub == NULL)
        return 0;
    if (ctx->key->type == WIRE_KEY_TYPE_RSA_PSS)
        ctx->pad = RSA_PKCS1_PSS_PADDING; /* its scheme is bound to PSS */
    return sig_set_ctx_params(ctx, params);
}

static int sig_sign_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return sig_init(vctx, keydata, params, 1);
}

static int sig_verify_init(void *vctx, void *keydata, const OSSL_PARAM params[])
{
    return sig_init(vctx, keydata, params, 0);
}

static size_t max_sig_size(const SIG_CTX *ctx)
{
    return (size_t)EVP_PKEY_get_size(ctx->key->pub);
}

/* Checks the RSA parameters against what the TPM does; returns the wire scheme or 0. */
static uint8_t scheme_for(SIG_CTX *ctx)
{
    if (ctx->key->type == WIRE_KEY_TYPE_EC)
        return WIRE_SCHEME_ECDSA;
    if (ctx->pad == RSA_PKCS1_PADDING)
        return WIRE_SCHEME_PKCS1;
    /* RSA_PKCS1_PSS_PADDING, checked in set_ctx_params */
    if (ctx->saltlen != RSA_PSS_SALTLEN_DIGEST && ctx->saltlen != RSA_PSS_SALTLEN_AUTO
        && ctx->saltlen != RSA_PSS_SALTLEN_MAX && (size_t)ctx->saltlen != ctx->mdsize) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "PSS salt length %d: the TPM signs with salt length = digest length (%zu); "
                   "use rsa_pss_saltlen:digest", ctx->saltlen, ctx->mdsize);
        return 0;
    }
    if (ctx->mgf1[0] != '\0' && !EVP_MD_is_a(ctx->md, ctx->mgf1)) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "MGF1 digest %s: the TPM uses the signature digest (%s) for MGF1",
                   ctx->mgf1, EVP_MD_get0_name(ctx->md));
        return 0;
    }
    return WIRE_SCHEME_PSS;
}

static int do_verify(SIG_CTX *ctx, const unsigned char *sig, size_t siglen,
                     const unsigned char *tbs, size_t tbslen);

/* ECDSA: strict DER (what we decode re-encodes to the same bytes), 0 < r, s < n. */
static int ecdsa_shape_ok(const SIG_CTX *ctx, const unsigned char *sig, size_t siglen)
{
    const unsigned char *p = sig;
    ECDSA_SIG *es = NULL;
    EC_GROUP *group = NULL;
    unsigned char *der = NULL;
    char curve[64];
    const BIGNUM *r, *s, *n;
    int derlen, ok = 0;

    if (siglen == 0 || siglen > 512)
        return 0;
    es = d2i_ECDSA_SIG(NULL, &p, (long)siglen);
    if (es == NULL || p != sig + siglen)
        goto end;
    derlen = i2d_ECDSA_SIG(es, &der);
    if (derlen < 0 || (size_t)derlen != siglen || memcmp(der, sig, siglen) != 0)
        goto end;
    if (!EVP_PKEY_get_utf8_string_param(ctx->key->pub, OSSL_PKEY_PARAM_GROUP_NAME, curve,
                                        sizeof(curve), NULL))
        goto end;
    group = EC_GROUP_new_by_curve_name_ex(tpmb_crypto_libctx(ctx->prov),
                                          tpmb_crypto_propq(ctx->prov), OBJ_sn2nid(curve));
    if (group == NULL)
        goto end;
    n = EC_GROUP_get0_order(group);
    ECDSA_SIG_get0(es, &r, &s);
    ok = !BN_is_zero(r) && !BN_is_negative(r) && BN_cmp(r, n) < 0
         && !BN_is_zero(s) && !BN_is_negative(s) && BN_cmp(s, n) < 0;
end:
    OPENSSL_free(der);
    EC_GROUP_free(group);
    ECDSA_SIG_free(es);
    return ok;
}

/* RSA: exactly the modulus long, and below the modulus. */
static int rsa_shape_ok(const SIG_CTX *ctx, const unsigned char *sig, size_t siglen)
{
    BIGNUM *n = NULL, *v = NULL;
    int ok = 0;

    if (siglen != max_sig_size(ctx))
        return 0;
    if (!EVP_PKEY_get_bn_param(ctx->key->pub, OSSL_PKEY_PARAM_RSA_N, &n))
        return 0;
    v = BN_bin2bn(sig, (int)siglen, NULL);
    ok = v != NULL && BN_cmp(v, n) < 0;
    BN_free(v);
    BN_free(n);
    return ok;
}

/*
 * What came back from the broker: the key's shape, always; a valid signature over this
 * digest with the TPM's parameters (PSS: salt = digest length), unless verify is off.
 */
static int check_signature(SIG_CTX *ctx, const unsigned char *sig, size_t siglen,
                           const unsigned char *tbs, size_t tbslen)
{
    int saltlen = ctx->saltlen, ok;

    if (ctx->key->type == WIRE_KEY_TYPE_EC ? !ecdsa_shape_ok(ctx, sig, siglen)
                                           : !rsa_shape_ok(ctx, sig, siglen)) {
        TPMB_RAISE(ctx->prov, TPMB_R_BROKER_PROTOCOL,
                   "tpmbroker returned %zu bytes that are not a %s signature of this key "
                   "(no signature was returned)", siglen,
                   ctx->key->type == WIRE_KEY_TYPE_EC ? "DER ECDSA" : "modulus-long RSA");
        return 0;
    }
    if (!ctx->prov->verify)
        return 1;
    ctx->saltlen = RSA_PSS_SALTLEN_DIGEST; /* what the TPM signs with, nothing else */
    ok = do_verify(ctx, sig, siglen, tbs, tbslen);
    ctx->saltlen = saltlen;
    if (!ok) {
        TPMB_RAISE(ctx->prov, TPMB_R_BROKER_PROTOCOL,
                   "tpmbroker returned a signature that does not verify with the key's "
                   "public key over this digest (no signature was returned; `verify = 0` "
                   "in the provider's section turns this check off)");
        return 0;
    }
    return 1;
}

/* Signs the digest tbs; with msg != NULL sends the message it is the digest of instead. */
static int do_sign(SIG_CTX *ctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                   const unsigned char *tbs, size_t tbslen, const unsigned char *msg,
                   size_t msglen)
{
    CLIENT_KEY ref;
    CLIENT_ERR err;
    uint8_t scheme;
    int ok;

    if (ctx->md == NULL) {
        /* a bare digest: its length says which hash (only ECDSA is hash-agnostic) */
        static const char *const by_len[] = { "SHA1", "SHA2-256", "SHA2-384", "SHA2-512" };
        static const size_t lens[] = { 20, 32, 48, 64 };
        size_t i;

        if (ctx->key->type == WIRE_KEY_TYPE_RSA) {
            TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                       "RSA signing with a TPM key needs the digest named "
                       "(e.g. -pkeyopt digest:sha256)");
            return 0;
        }
        for (i = 0; i < 4 && lens[i] != tbslen; i++)
            ;
        if (i == 4 || !set_md(ctx, by_len[i])) {
            TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                       "input of %zu bytes is not a SHA-1/SHA-2 digest; sign with -rawin or "
                       "hash first", tbslen);
            return 0;
        }
    }
    if (tbslen != ctx->mdsize) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT,
                   "input of %zu bytes is not a %s digest (%zu bytes)", tbslen,
                   EVP_MD_get0_name(ctx->md), ctx->mdsize);
        return 0;
    }
    scheme = scheme_for(ctx);
    if (scheme == 0)
        return 0;
    if (sigsize < max_sig_size(ctx)) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "signature buffer too small");
        return 0;
    }
    *siglen = sigsize;
    tpmb_key_client_ref(ctx->key, &ref);
    if (msg != NULL)
        ok = client_sign_message(ctx->prov->client, &ref, scheme, ctx->hash, msg, msglen, sig,
                                 siglen, &err);
    else
        ok = client_sign(ctx->prov->client, &ref, scheme, ctx->hash, tbs, tbslen, sig, siglen,
                         &err);
    if (!ok) {
        TPMB_RAISE_CLIENT(ctx->prov, "signing with the TPM key", &err);
        return 0;
    }
    if (!check_signature(ctx, sig, *siglen, tbs, tbslen)) {
        OPENSSL_cleanse(sig, sigsize);
        *siglen = 0;
        return 0;
    }
    return 1;
}

static int sig_sign(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize,
                    const unsigned char *tbs, size_t tbslen)
{
    SIG_CTX *ctx = vctx;

    if (sig == NULL) {
        *siglen = max_sig_size(ctx);
        return 1;
    }
    if (key_restricted(ctx->key)) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "a restricted signing key (an attestation key) signs only a message the "
                   "TPM hashes itself, not a digest: give the message with -rawin "
                   "(openssl pkeyutl -sign -rawin -digest sha256), or use dgst -sign");
        return 0;
    }
    return do_sign(ctx, sig, siglen, sigsize, tbs, tbslen, NULL, 0);
}

/* A verification context for ctx's key and parameters, in the key's libctx
 * (tpmb_crypto_libctx), made from nothing. */
static EVP_PKEY_CTX *new_verify_ctx(SIG_CTX *ctx)
{
    EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new_from_pkey(tpmb_crypto_libctx(ctx->prov), ctx->key->pub,
                                                    tpmb_crypto_propq(ctx->prov));

    if (pctx == NULL || EVP_PKEY_verify_init(pctx) <= 0)
        goto fail;
    if (ctx->md != NULL && EVP_PKEY_CTX_set_signature_md(pctx, ctx->md) <= 0)
        goto fail;
    if (ctx->key->type == WIRE_KEY_TYPE_RSA) {
        if (EVP_PKEY_CTX_set_rsa_padding(pctx, ctx->pad) <= 0)
            goto fail;
        if (ctx->pad == RSA_PKCS1_PSS_PADDING) {
            if (EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, ctx->saltlen) <= 0)
                goto fail;
            if (ctx->mgf1[0] != '\0'
                && EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, ctx->mgf1, NULL) <= 0)
                goto fail;
        }
    }
    return pctx;
fail:
    EVP_PKEY_CTX_free(pctx);
    return NULL;
}

/* Fills `want` with what a verification context for ctx is made for; 0 if it cannot be
 * named (a digest name too long), and then is not kept. */
static int verify_params(SIG_CTX *ctx, TPMB_VERIFY_SLOT *want)
{
    const char *md = ctx->md != NULL ? EVP_MD_get0_name(ctx->md) : "";
    int rsa = ctx->key->type == WIRE_KEY_TYPE_RSA, pss = rsa && ctx->pad == RSA_PKCS1_PSS_PADDING;

    memset(want, 0, sizeof(*want));
    if (md == NULL || strlen(md) >= sizeof(want->md))
        return 0;
    want->pub = ctx->key->pub;
    want->libctx = tpmb_crypto_libctx(ctx->prov);
    strcpy(want->md, md);
    want->pad = rsa ? ctx->pad : 0;
    want->saltlen = pss ? ctx->saltlen : 0;
    if (pss)
        strcpy(want->mgf1, ctx->mgf1); /* fits: see the assertion below MDNAME_MAX */
    return 1;
}

static int same_params(const TPMB_VERIFY_SLOT *a, const TPMB_VERIFY_SLOT *b)
{
    return a->pub == b->pub && a->libctx == b->libctx && a->pad == b->pad
           && a->saltlen == b->saltlen && strcmp(a->md, b->md) == 0
           && strcmp(a->mgf1, b->mgf1) == 0;
}

/*
 * A verification context for ctx: a duplicate of the one the key keeps for these
 * parameters, made and kept on first use. The lock is only tried: a thread that finds it
 * taken (or a child forked while another thread held it) makes its own, as before.
 */
static EVP_PKEY_CTX *verify_ctx(SIG_CTX *ctx)
{
    TPMB_KEY *key = ctx->key;
    TPMB_VERIFY_SLOT want, *slot = NULL;
    EVP_PKEY_CTX *copy = NULL;
    int i;

    if (!verify_params(ctx, &want) || pthread_mutex_trylock(&key->verify_lock) != 0)
        return new_verify_ctx(ctx);
    for (i = 0; i < TPMB_VERIFY_SLOTS && slot == NULL; i++)
        if (key->verify[i].ctx != NULL && same_params(&key->verify[i], &want))
            slot = &key->verify[i];
    if (slot == NULL && (want.ctx = new_verify_ctx(ctx)) != NULL) {
        slot = &key->verify[key->verify_next++ % TPMB_VERIFY_SLOTS];
        EVP_PKEY_CTX_free(slot->ctx);
        *slot = want;
    }
    if (slot != NULL)
        copy = EVP_PKEY_CTX_dup(slot->ctx);
    pthread_mutex_unlock(&key->verify_lock);
    return copy != NULL ? copy : new_verify_ctx(ctx);
}

/* Verifies with the public key in its libctx (tpmb_crypto_libctx), same parameters. */
static int do_verify(SIG_CTX *ctx, const unsigned char *sig, size_t siglen,
                     const unsigned char *tbs, size_t tbslen)
{
    EVP_PKEY_CTX *pctx = verify_ctx(ctx);
    int ok = pctx != NULL && EVP_PKEY_verify(pctx, sig, siglen, tbs, tbslen) == 1;

    EVP_PKEY_CTX_free(pctx);
    return ok;
}

static int sig_verify(void *vctx, const unsigned char *sig, size_t siglen,
                      const unsigned char *tbs, size_t tbslen)
{
    return do_verify(vctx, sig, siglen, tbs, tbslen);
}

static int digest_init(SIG_CTX *ctx, const char *mdname, void *keydata,
                       const OSSL_PARAM params[], int need_private)
{
    if (!sig_init(ctx, keydata, params, need_private))
        return 0;
    if (mdname == NULL || *mdname == '\0')
        mdname = ctx->md != NULL ? EVP_MD_get0_name(ctx->md)
                 : tpmb_hash_name(ctx->key->pss_hash) != NULL ? tpmb_hash_name(ctx->key->pss_hash)
                 : ctx->key->type == WIRE_KEY_TYPE_EC && ctx->key->bits > 384 ? "SHA2-512"
                 : ctx->key->type == WIRE_KEY_TYPE_EC && ctx->key->bits > 256 ? "SHA2-384"
                                                                         : "SHA2-256";
    if (!set_md(ctx, mdname))
        return 0;
    if (ctx->mdctx == NULL)
        ctx->mdctx = EVP_MD_CTX_new();
    if (ctx->mdctx == NULL || !EVP_DigestInit_ex2(ctx->mdctx, ctx->md, NULL)) {
        TPMB_RAISE(ctx->prov, TPMB_R_INTERNAL, "cannot start the %s digest", mdname);
        return 0;
    }
    ctx->buffering = need_private
                     && (key_restricted(ctx->key) || key_attributes_unknown(ctx->key));
    ctx->overflow = 0;
    ctx->msglen = 0;
    return 1;
}

static int sig_digest_sign_init(void *vctx, const char *mdname, void *keydata,
                                const OSSL_PARAM params[])
{
    return digest_init(vctx, mdname, keydata, params, 1);
}

static int sig_digest_verify_init(void *vctx, const char *mdname, void *keydata,
                                  const OSSL_PARAM params[])
{
    return digest_init(vctx, mdname, keydata, params, 0);
}

static int sig_digest_update(void *vctx, const unsigned char *data, size_t datalen)
{
    SIG_CTX *ctx = vctx;

    return ctx->mdctx != NULL && EVP_DigestUpdate(ctx->mdctx, data, datalen);
}

/* Hashes, and keeps the message while it fits a SIGN_MESSAGE. */
static int sig_digest_sign_update(void *vctx, const unsigned char *data, size_t datalen)
{
    SIG_CTX *ctx = vctx;
    unsigned char *grown;
    size_t cap;

    if (!sig_digest_update(vctx, data, datalen))
        return 0;
    if (!ctx->buffering || ctx->overflow || datalen == 0)
        return 1;
    if (datalen > WIRE_MAX_MESSAGE - ctx->msglen) {
        ctx->overflow = 1; /* refused at final for a restricted key, else signed as a digest */
        free(ctx->msg);
        ctx->msg = NULL;
        ctx->msglen = ctx->msgcap = 0;
        return 1;
    }
    if (ctx->msglen + datalen > ctx->msgcap) {
        for (cap = ctx->msgcap ? ctx->msgcap : 1024; cap < ctx->msglen + datalen; cap *= 2)
            ;
        if (cap > WIRE_MAX_MESSAGE)
            cap = WIRE_MAX_MESSAGE;
        grown = realloc(ctx->msg, cap);
        if (grown == NULL) {
            TPMB_RAISE(ctx->prov, TPMB_R_MALLOC, "out of memory for the message to sign");
            return 0;
        }
        ctx->msg = grown;
        ctx->msgcap = cap;
    }
    memcpy(ctx->msg + ctx->msglen, data, datalen);
    ctx->msglen += datalen;
    return 1;
}

static int sig_digest_sign_final(void *vctx, unsigned char *sig, size_t *siglen, size_t sigsize)
{
    SIG_CTX *ctx = vctx;
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;

    if (sig == NULL) {
        *siglen = max_sig_size(ctx);
        return 1;
    }
    if (ctx->mdctx == NULL || !EVP_DigestFinal_ex(ctx->mdctx, digest, &dlen))
        return 0;
    if (ctx->buffering && !ctx->overflow)
        return do_sign(ctx, sig, siglen, sigsize, digest, dlen,
                       ctx->msg != NULL ? ctx->msg : (const unsigned char *)"", ctx->msglen);
    if (ctx->buffering && key_restricted(ctx->key)) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "message over %u bytes: a restricted signing key signs only what the TPM "
                   "hashed, and at most %u bytes go to the TPM through tpmbroker "
                   "(MAX_MESSAGE)", (unsigned int)WIRE_MAX_MESSAGE,
                   (unsigned int)WIRE_MAX_MESSAGE);
        return 0;
    }
    return do_sign(ctx, sig, siglen, sigsize, digest, dlen, NULL, 0);
}

static int sig_digest_verify_final(void *vctx, const unsigned char *sig, size_t siglen)
{
    SIG_CTX *ctx = vctx;
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;

    if (ctx->mdctx == NULL || !EVP_DigestFinal_ex(ctx->mdctx, digest, &dlen))
        return 0;
    return do_verify(ctx, sig, siglen, digest, dlen);
}

static int sig_get_ctx_params(void *vctx, OSSL_PARAM params[])
{
    SIG_CTX *ctx = vctx;
    OSSL_PARAM *p;

    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
    if (p != NULL) {
        unsigned char der[80];
        size_t len;

        if (ctx->md == NULL || ctx->key == NULL
            || !tpmb_signature_algorithm_id(ctx->key->type, ctx->pad, ctx->hash, ctx->mdsize,
                                            der, &len)
            || !OSSL_PARAM_set_octet_string(p, der, len))
            return 0;
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != NULL && (ctx->md == NULL || !OSSL_PARAM_set_utf8_string(p, EVP_MD_get0_name(ctx->md))))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST_SIZE);
    if (p != NULL && !OSSL_PARAM_set_size_t(p, ctx->mdsize))
        return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != NULL) {
        if (p->data_type == OSSL_PARAM_UTF8_STRING) {
            if (!OSSL_PARAM_set_utf8_string(p, ctx->pad == RSA_PKCS1_PSS_PADDING ? "pss" : "pkcs1"))
                return 0;
        } else if (!OSSL_PARAM_set_int(p, ctx->pad)) {
            return 0;
        }
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != NULL) {
        if (p->data_type == OSSL_PARAM_UTF8_STRING) {
            if (!OSSL_PARAM_set_utf8_string(p, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST))
                return 0;
        } else if (!OSSL_PARAM_set_int(p, (int)ctx->mdsize)) {
            return 0;
        }
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != NULL && ctx->md != NULL
        && !OSSL_PARAM_set_utf8_string(p, ctx->mgf1[0] != '\0' ? ctx->mgf1
                                                                : EVP_MD_get0_name(ctx->md)))
        return 0;
    return 1;
}

static const OSSL_PARAM gettable_ctx[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_size_t(OSSL_SIGNATURE_PARAM_DIGEST_SIZE, NULL),
    OSSL_PARAM_int(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL),
    OSSL_PARAM_int(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *sig_gettable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return gettable_ctx;
}

static int parse_pad(SIG_CTX *ctx, const OSSL_PARAM *p)
{
    int pad;

    if (!tpmb_rsa_pad_mode(p, &pad))
        return 0;
    if (pad == RSA_PKCS1_PADDING && ctx->key != NULL && ctx->key->type == WIRE_KEY_TYPE_RSA_PSS) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "an RSA-PSS TPM key signs with PSS only, not PKCS#1 v1.5");
        return 0;
    }
    if (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_PSS_PADDING) {
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED,
                   "RSA padding mode %d: TPM keys sign with pkcs1 or pss", pad);
        return 0;
    }
    ctx->pad = pad;
    return 1;
}

static int parse_saltlen(SIG_CTX *ctx, const OSSL_PARAM *p)
{
    int saltlen;

    if (p->data_type == OSSL_PARAM_UTF8_STRING) {
        const char *s = p->data;

        if (strcmp(s, OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) == 0)
            saltlen = RSA_PSS_SALTLEN_DIGEST;
        else if (strcmp(s, OSSL_PKEY_RSA_PSS_SALT_LEN_MAX) == 0)
            saltlen = RSA_PSS_SALTLEN_MAX;
        else if (strcmp(s, OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO) == 0)
            saltlen = RSA_PSS_SALTLEN_AUTO;
        else
            saltlen = atoi(s);
    } else if (!OSSL_PARAM_get_int(p, &saltlen)) {
        return 0;
    }
    if (saltlen < RSA_PSS_SALTLEN_MAX) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "invalid PSS salt length %d", saltlen);
        return 0;
    }
    ctx->saltlen = saltlen; /* checked against the digest at signing time */
    return 1;
}

static int sig_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    SIG_CTX *ctx = vctx;
    const OSSL_PARAM *p;

    if (params == NULL)
        return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != NULL) {
        const char *name;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !set_md(ctx, name))
            return 0;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != NULL && !parse_pad(ctx, p))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != NULL && !parse_saltlen(ctx, p))
        return 0;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != NULL) {
        const char *name;

        if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || strlen(name) >= sizeof(ctx->mgf1))
            return 0;
        strcpy(ctx->mgf1, name);
    }
    return 1;
}

static const OSSL_PARAM settable_ctx[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES, NULL, 0),
    OSSL_PARAM_END,
};

static const OSSL_PARAM *sig_settable_ctx_params(void *vctx, void *provctx)
{
    (void)vctx;
    (void)provctx;
    return settable_ctx;
}

const OSSL_DISPATCH tpmb_signature_functions[] = {
    { OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))sig_newctx },
    { OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))sig_freectx },
    { OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))sig_dupctx },
    { OSSL_FUNC_SIGNATURE_SIGN_INIT, (void (*)(void))sig_sign_init },
    { OSSL_FUNC_SIGNATURE_SIGN, (void (*)(void))sig_sign },
    { OSSL_FUNC_SIGNATURE_VERIFY_INIT, (void (*)(void))sig_verify_init },
    { OSSL_FUNC_SIGNATURE_VERIFY, (void (*)(void))sig_verify },
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))sig_digest_sign_init },
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))sig_digest_sign_update },
    { OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))sig_digest_sign_final },
    { OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT, (void (*)(void))sig_digest_verify_init },
    { OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE, (void (*)(void))sig_digest_update },
    { OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL, (void (*)(void))sig_digest_verify_final },
    { OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))sig_get_ctx_params },
    { OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))sig_gettable_ctx_params },
    { OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))sig_set_ctx_params },
    { OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))sig_settable_ctx_params },
    { 0, NULL },
};
