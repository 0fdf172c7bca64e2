/* RSA decryption paddings removed in constant time (see depad.h). */
#define OPENSSL_SUPPRESS_DEPRECATED /* RSA_padding_check_PKCS1_OAEP_mgf1: no successor API */

#include "depad.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#define KDK_SIZE 32
#define MAX_K 1024 /* 8192-bit moduli */
#define LENGTH_TRIES 128

/* --- constant-time helpers: all-ones or all-zeros masks, no branches ------------------ */

static unsigned int ct_msb(unsigned int a)
{
    return 0u - (a >> (sizeof(a) * 8 - 1));
}

static unsigned int ct_is_zero(unsigned int a)
{
    return ct_msb(~a & (a - 1));
}

static unsigned int ct_eq(unsigned int a, unsigned int b)
{
    return ct_is_zero(a ^ b);
}

static unsigned int ct_lt(unsigned int a, unsigned int b)
{
    return ct_msb(a ^ ((a ^ b) | ((a - b) ^ b)));
}

static unsigned int ct_ge(unsigned int a, unsigned int b)
{
    return ~ct_lt(a, b);
}

static unsigned int ct_select(unsigned int mask, unsigned int a, unsigned int b)
{
    return (mask & a) | (~mask & b);
}

/* --- implicit rejection: the key derivation of OpenSSL 3.2 (rsa_ossl.c, rsa_pk1.c) ----- */

struct td_ctx {
    EVP_MAC_CTX *hmac; /* HMAC with SHA2-256 set once; each use sets only the key */
};

td_ctx *td_ctx_new(void)
{
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA2-256", 0),
        OSSL_PARAM_construct_end()
    };
    td_ctx *ctx = calloc(1, sizeof(*ctx));
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);

    if (ctx == NULL || mac == NULL || (ctx->hmac = EVP_MAC_CTX_new(mac)) == NULL
        || !EVP_MAC_CTX_set_params(ctx->hmac, params)) {
        td_ctx_free(ctx);
        ctx = NULL;
    }
    EVP_MAC_free(mac); /* the context keeps its own reference */
    return ctx;
}

void td_ctx_free(td_ctx *ctx)
{
    if (ctx == NULL)
        return;
    EVP_MAC_CTX_free(ctx->hmac);
    free(ctx);
}

/* One HMAC-SHA256 of msg: with key, keyed anew; with key NULL, re-initialised from the
 * key the last call set (OpenSSL keeps the keyed state: no key schedule again). */
static int hmac_once(EVP_MAC_CTX *mac, const uint8_t *key, const uint8_t *msg, size_t len,
                     uint8_t *out)
{
    size_t outlen = 0;

    return EVP_MAC_init(mac, key, key != NULL ? KDK_SIZE : 0, NULL)
           && EVP_MAC_update(mac, msg, len) && EVP_MAC_final(mac, out, &outlen, KDK_SIZE)
           && outlen == KDK_SIZE;
}

/* PRF(kdk, label, bits): HMAC-SHA256(kdk, be16(i) || label || be16(bits)), i = 0, 1, ...
 * kdk NULL: `mac` is keyed with it already. */
static int prf(EVP_MAC_CTX *mac, const uint8_t *kdk, const char *label, uint8_t *out,
               size_t len)
{
    uint8_t msg[2 + 16 + 2], block[KDK_SIZE];
    size_t llen = strlen(label), pos;
    unsigned int bits = (unsigned int)(len * 8);
    uint16_t i = 0;
    int ok = 1;

    if (llen > 16 || bits > 0xFFFF)
        return 0;
    memcpy(msg + 2, label, llen);
    msg[2 + llen] = (uint8_t)(bits >> 8);
    msg[3 + llen] = (uint8_t)bits;
    for (pos = 0; ok && pos < len; pos += sizeof(block), i++) {
        msg[0] = (uint8_t)(i >> 8);
        msg[1] = (uint8_t)i;
        ok = hmac_once(mac, i == 0 ? kdk : NULL, msg, 4 + llen, block);
        memcpy(out + pos, block, len - pos < sizeof(block) ? len - pos : sizeof(block));
    }
    OPENSSL_cleanse(block, sizeof(block));
    return ok;
}

int td_pkcs1(td_ctx *ctx, const uint8_t *em, const uint8_t *ct, size_t k,
             const uint8_t *kdk_secret, int implicit, uint8_t *out, size_t *out_len)
{
    uint8_t kdk[KDK_SIZE], synthetic[MAX_K], lengths[LENGTH_TRIES * 2];
    unsigned int good, found_zero = 0, zero_index = 0, msg_index, synth_index;
    unsigned int max_len, len_mask, synth_len = 0, candidate;
    size_t i, j;
    int ret = TD_CRYPTO_ERROR;

    if (ctx == NULL || k < 11 + 2 || k > MAX_K)
        return TD_BAD_ARGUMENT;
    /* The synthetic message is computed every time, good padding or not. */
    if (!hmac_once(ctx->hmac, kdk_secret, ct, k, kdk)
        || !prf(ctx->hmac, kdk, "message", synthetic, k)
        || !prf(ctx->hmac, NULL, "length", lengths, sizeof(lengths)))
        goto end;
    max_len = len_mask = (unsigned int)k - 2 - 8;
    len_mask |= len_mask >> 1;
    len_mask |= len_mask >> 2;
    len_mask |= len_mask >> 4;
    len_mask |= len_mask >> 8;
    for (i = 0; i < sizeof(lengths); i += 2) {
        candidate = ((unsigned int)lengths[i] << 8 | lengths[i + 1]) & len_mask;
        synth_len = ct_select(ct_lt(candidate, max_len), candidate, synth_len);
    }
    synth_index = (unsigned int)k - synth_len;

    /* 0x00 0x02 PS (at least 8 non-zero bytes) 0x00 M */
    good = ct_is_zero(em[0]) & ct_eq(em[1], 2);
    for (i = 2; i < k; i++) {
        unsigned int is_zero = ct_is_zero(em[i]);

        zero_index = ct_select(~found_zero & is_zero, (unsigned int)i, zero_index);
        found_zero |= is_zero;
    }
    good &= ct_ge(zero_index, 2 + 8);
    msg_index = ct_select(good, zero_index + 1, synth_index);
    /* Read both buffers whatever `good` is: the cache sees the same accesses. */
    for (i = msg_index, j = 0; i < k; i++, j++)
        out[j] = (uint8_t)ct_select(good, em[i], synthetic[i]);
    *out_len = j;
    ret = TD_OK;
    if (!implicit && !good) { /* explicit rejection: the error is the signal anyway */
        OPENSSL_cleanse(out, k);
        *out_len = 0;
        ret = TD_BAD_PADDING;
    }
end:
    OPENSSL_cleanse(kdk, sizeof(kdk));
    OPENSSL_cleanse(synthetic, sizeof(synthetic));
    OPENSSL_cleanse(lengths, sizeof(lengths));
    return ret;
}

int td_pkcs1_answer(td_ctx *ctx, const uint8_t *answer, size_t answer_len,
                    const uint8_t *ct, size_t k, const uint8_t *kdk_secret, int implicit,
                    uint8_t *out, size_t *out_len)
{
    uint8_t em[MAX_K];
    size_t len;
    int ret;

    if (k > MAX_K)
        return TD_BAD_ARGUMENT;
    if (answer_len < 2 || (len = ((size_t)answer[0] << 8) | answer[1]) != answer_len - 2
        || len > k)
        return TD_MALFORMED;
    /* The size field crossed the bus in the clear: where EM starts is no secret here. */
    memset(em, 0, k - len);
    memcpy(em + k - len, answer + 2, len);
    ret = td_pkcs1(ctx, em, ct, k, kdk_secret, implicit, out, out_len);
    OPENSSL_cleanse(em, k);
    return ret;
}

int td_oaep(const uint8_t *em, size_t k, const uint8_t *label, size_t label_len,
            const char *md_name, const char *mgf1_name, uint8_t *out, size_t *out_len)
{
    EVP_MD *md = NULL, *mgf1 = NULL;
    int n, ret = TD_BAD_ARGUMENT;

    if (k == 0 || k > MAX_K || label_len > 0xFFFF)
        return TD_BAD_ARGUMENT;
    md = EVP_MD_fetch(NULL, md_name, NULL);
    mgf1 = EVP_MD_fetch(NULL, mgf1_name, NULL);
    if (md == NULL || mgf1 == NULL)
        goto end;
    n = RSA_padding_check_PKCS1_OAEP_mgf1(out, (int)k, em, (int)k, (int)k, label,
                                          (int)label_len, md, mgf1);
    if (n < 0) {
        ERR_clear_error(); /* the status says it; the broker reads no error queue */
        ret = TD_BAD_PADDING;
    } else {
        *out_len = (size_t)n;
        ret = TD_OK;
    }
end:
    EVP_MD_free(md);
    EVP_MD_free(mgf1);
    return ret;
}
