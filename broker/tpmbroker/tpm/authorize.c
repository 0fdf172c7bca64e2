/* HMAC-session authorization of TPM commands (TPM 2.0 Part 1 "Session-based
 * authorization", "Session-based encryption"; Part 3 command layout), in C.
 * See authorize.h. Algorithms are fetched once per context: OpenSSL 3 fetches by
 * name are what make tss2-esys spend milliseconds per command. */
#include "authorize.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/obj_mac.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define ST_SESSIONS 0x8002
#define HEADER_SIZE 10
#define ALG_SHA1 0x0004
#define ALG_SHA256 0x000B
#define ALG_SHA384 0x000C
#define ALG_SHA512 0x000D
#define ALG_RSASSA 0x0014
#define ALG_RSAPSS 0x0016
#define ALG_ECDSA 0x0018
#define ATTR_DECRYPT 0x20
#define ATTR_ENCRYPT 0x40
#define AES_KEY_BYTES 16
#define AES_BLOCK_BYTES 16
#define MAX_DIGEST 64
#define MAX_HANDLES 3
#define MAX_AUTH 64

enum { HASH_SHA1, HASH_SHA256, HASH_SHA384, HASH_SHA512, HASH_COUNT };

static const char *const hash_names[HASH_COUNT] = {"SHA1", "SHA256", "SHA384", "SHA512"};

#define EC_CURVES 3 /* ECDH peers' curves: P-256, P-384, P-521 */

struct tb_ctx {
    EVP_MD *md[HASH_COUNT];
    EVP_MAC_CTX *hmac[HASH_COUNT]; /* digest set once; each use only sets the key */
    EVP_MD_CTX *digest;
    EVP_CIPHER *aes_cfb;
    EVP_CIPHER_CTX *cipher;
    EC_GROUP *groups[EC_CURVES];   /* made on first use (tb_ec_point_on_curve) */
    BN_CTX *bn;
};

static int hash_index(uint16_t alg)
{
    switch (alg) {
    case ALG_SHA1:
        return HASH_SHA1;
    case ALG_SHA256:
        return HASH_SHA256;
    case ALG_SHA384:
        return HASH_SHA384;
    case ALG_SHA512:
        return HASH_SHA512;
    default:
        return -1;
    }
}

void tb_ctx_free(tb_ctx *ctx)
{
    if (ctx == NULL)
        return;
    for (int i = 0; i < HASH_COUNT; i++) {
        EVP_MAC_CTX_free(ctx->hmac[i]);
        EVP_MD_free(ctx->md[i]);
    }
    EVP_MD_CTX_free(ctx->digest);
    EVP_CIPHER_CTX_free(ctx->cipher);
    EVP_CIPHER_free(ctx->aes_cfb);
    for (int i = 0; i < EC_CURVES; i++)
        EC_GROUP_free(ctx->groups[i]);
    BN_CTX_free(ctx->bn);
    free(ctx);
}

tb_ctx *tb_ctx_new(void)
{
    tb_ctx *ctx = calloc(1, sizeof(*ctx));
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);

    if (ctx == NULL || mac == NULL)
        goto fail;
    for (int i = 0; i < HASH_COUNT; i++) {
        OSSL_PARAM params[2];

        ctx->md[i] = EVP_MD_fetch(NULL, hash_names[i], NULL);
        ctx->hmac[i] = EVP_MAC_CTX_new(mac);
        if (ctx->md[i] == NULL || ctx->hmac[i] == NULL)
            goto fail;
        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                     (char *)hash_names[i], 0);
        params[1] = OSSL_PARAM_construct_end();
        if (!EVP_MAC_CTX_set_params(ctx->hmac[i], params))
            goto fail;
    }
    ctx->digest = EVP_MD_CTX_new();
    ctx->cipher = EVP_CIPHER_CTX_new();
    ctx->aes_cfb = EVP_CIPHER_fetch(NULL, "AES-128-CFB", NULL);
    if (ctx->digest == NULL || ctx->cipher == NULL || ctx->aes_cfb == NULL)
        goto fail;
    EVP_MAC_free(mac); /* the contexts keep their own reference */
    return ctx;
fail:
    EVP_MAC_free(mac);
    tb_ctx_free(ctx);
    return NULL;
}

/* --- byte helpers ------------------------------------------------------------------ */

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* --- the session arithmetic ------------------------------------------------------------ */

struct piece {
    const uint8_t *data;
    size_t len;
};

static int hmac_pieces(tb_ctx *ctx, int h, const uint8_t *key, size_t key_len,
                       const struct piece *pieces, size_t count, uint8_t *out)
{
    EVP_MAC_CTX *mac = ctx->hmac[h];
    size_t out_len = 0;

    /* HMAC with an empty key is legal (an unsalted, unbound session with no password). */
    static const uint8_t no_key[1];
    if (!EVP_MAC_init(mac, key_len ? key : no_key, key_len, NULL))
        return 0;
    for (size_t i = 0; i < count; i++)
        if (pieces[i].len && !EVP_MAC_update(mac, pieces[i].data, pieces[i].len))
            return 0;
    return EVP_MAC_final(mac, out, &out_len, MAX_DIGEST);
}

static int digest_pieces(tb_ctx *ctx, int h, const struct piece *pieces, size_t count,
                         uint8_t *out)
{
    if (!EVP_DigestInit_ex2(ctx->digest, ctx->md[h], NULL))
        return 0;
    for (size_t i = 0; i < count; i++)
        if (pieces[i].len && !EVP_DigestUpdate(ctx->digest, pieces[i].data, pieces[i].len))
            return 0;
    return EVP_DigestFinal_ex(ctx->digest, out, NULL);
}

/* AES-128-CFB parameter encryption: key and IV from KDFa(hash, hmac key, "CFB",
 * newer, older, 256). One KDFa round gives 256 bits for every session hash but SHA-1,
 * which needs two. */
static int cfb(tb_ctx *ctx, int h, int encrypt, const uint8_t *key, size_t key_len,
               const uint8_t *newer, const uint8_t *older, size_t nonce_len, uint8_t *data,
               size_t len)
{
    static const uint8_t label[] = "CFB"; /* the NUL is part of the KDF input */
    uint8_t counter[4], bits[4], material[2 * MAX_DIGEST];
    size_t have = 0, md_size = (size_t)EVP_MD_get_size(ctx->md[h]);
    int out_len = 0, ok;

    put32(bits, 8 * (AES_KEY_BYTES + AES_BLOCK_BYTES));
    for (uint32_t i = 1; have < AES_KEY_BYTES + AES_BLOCK_BYTES; i++) {
        struct piece kdf[] = {{counter, 4}, {label, sizeof(label)}, {newer, nonce_len},
                              {older, nonce_len}, {bits, 4}};
        put32(counter, i);
        if (!hmac_pieces(ctx, h, key, key_len, kdf, 5, material + have))
            return 0;
        have += md_size;
    }
    ok = EVP_CipherInit_ex2(ctx->cipher, ctx->aes_cfb, material, material + AES_KEY_BYTES,
                            encrypt, NULL)
         && EVP_CipherUpdate(ctx->cipher, data, &out_len, data, (int)len)
         && (size_t)out_len == len;
    OPENSSL_cleanse(material, sizeof(material));
    return ok;
}

/* --- commands ------------------------------------------------------------------------ */

int tb_prepare(tb_ctx *ctx, uint16_t hash_alg, uint32_t session_handle,
               const uint8_t *session_key, size_t session_key_len,
               const uint8_t *nonce_tpm, size_t nonce_tpm_len,
               const uint8_t *nonce_caller, uint32_t command_code,
               const uint32_t *handles, size_t handle_count,
               const uint8_t *names, size_t names_len,
               const uint8_t *auth, size_t auth_len,
               int has_first, const uint8_t *first, size_t first_len,
               const uint8_t *rest, size_t rest_len, uint8_t attributes,
               uint32_t response_handles, tb_pending *pending, uint8_t *out, size_t out_size, size_t *out_len)
{
    int h = hash_index(hash_alg);
    size_t nonce_len = nonce_tpm_len, md_size, auth_area, params_len, size;
    uint8_t *cmd, *p, *params, cp_hash[MAX_DIGEST], cc[4], attrs = attributes;

    /* handle_count 0: a command without handles, the session used for encryption only */
    if (h < 0 || nonce_len == 0 || nonce_len > sizeof(pending->nonce_caller)
        || handle_count > MAX_HANDLES || auth_len > MAX_AUTH
        || session_key_len + auth_len > sizeof(pending->hmac_key) || first_len > 0xFFFF)
        return TB_BAD_ARGUMENT;
    md_size = (size_t)EVP_MD_get_size(ctx->md[h]);
    while (auth_len > 0 && auth[auth_len - 1] == 0)
        auth_len--; /* the TPM drops an authValue's trailing zeros */

    auth_area = 4 + 2 + nonce_len + 1 + 2 + md_size;
    params_len = (has_first ? 2 + first_len : 0) + rest_len;
    size = HEADER_SIZE + 4 * handle_count + 4 + auth_area + params_len;
    if (size > out_size || size > 0xFFFFFFFFu)
        return TB_BAD_ARGUMENT;

    memset(pending, 0, sizeof(*pending));
    pending->command_code = command_code;
    pending->hash_alg = hash_alg;
    pending->response_handles = response_handles;
    pending->nonce_caller_len = nonce_len;
    if (nonce_caller != NULL)
        memcpy(pending->nonce_caller, nonce_caller, nonce_len);
    else if (RAND_bytes(pending->nonce_caller, (int)nonce_len) != 1)
        return TB_CRYPTO_ERROR;
    if (session_key_len)
        memcpy(pending->hmac_key, session_key, session_key_len);
    if (auth_len)
        memcpy(pending->hmac_key + session_key_len, auth, auth_len);
    pending->hmac_key_len = session_key_len + auth_len;

    cmd = out;
    put16(cmd, ST_SESSIONS);
    put32(cmd + 2, (uint32_t)size);
    put32(cmd + 6, command_code);
    p = cmd + HEADER_SIZE;
    for (size_t i = 0; i < handle_count; i++, p += 4)
        put32(p, handles[i]);
    put32(p, (uint32_t)auth_area);
    p += 4;
    uint8_t *auth_start = p;

    /* Parameters first: the HMAC covers them as sent (encrypted). */
    params = auth_start + auth_area;
    p = params;
    if (has_first) {
        put16(p, (uint16_t)first_len);
        if (first_len)
            memcpy(p + 2, first, first_len);
        if ((attributes & ATTR_DECRYPT) && first_len
            && !cfb(ctx, h, 1, pending->hmac_key, pending->hmac_key_len,
                    pending->nonce_caller, nonce_tpm, nonce_len, p + 2, first_len))
            return TB_CRYPTO_ERROR;
        p += 2 + first_len;
    }
    if (rest_len)
        memcpy(p, rest, rest_len);

    put32(cc, command_code);
    struct piece cp[] = {{cc, 4}, {names, names_len}, {params, params_len}};
    if (!digest_pieces(ctx, h, cp, 3, cp_hash))
        return TB_CRYPTO_ERROR;

    p = auth_start;
    put32(p, session_handle);
    put16(p + 4, (uint16_t)nonce_len);
    memcpy(p + 6, pending->nonce_caller, nonce_len);
    p += 6 + nonce_len;
    *p++ = attrs;
    put16(p, (uint16_t)md_size);
    struct piece mac[] = {{cp_hash, md_size}, {pending->nonce_caller, nonce_len},
                          {nonce_tpm, nonce_len}, {&attrs, 1}};
    if (!hmac_pieces(ctx, h, pending->hmac_key, pending->hmac_key_len, mac, 4, p + 2))
        return TB_CRYPTO_ERROR;

    *out_len = size;
    return TB_OK;
}

int tb_finish(tb_ctx *ctx, const tb_pending *pending, const uint8_t *response,
              size_t response_len, tb_result *result, uint8_t *clear, size_t clear_size)
{
    int h = hash_index(pending->hash_alg);
    size_t off, md_size, plen, nlen, hlen, first_len;
    uint8_t rp_hash[MAX_DIGEST], expected[MAX_DIGEST], code[4], cc[4];

    if (h < 0)
        return TB_BAD_ARGUMENT;
    result->decrypted = 0;
    if (response_len < HEADER_SIZE || get32(response + 2) != response_len)
        return TB_MALFORMED;
    result->rc = get32(response + 6);
    if (result->rc != 0)
        return response_len == HEADER_SIZE ? TB_TPM_ERROR : TB_MALFORMED;

    off = HEADER_SIZE + 4 * (size_t)pending->response_handles;
    if (off + 4 > response_len)
        return TB_MALFORMED;
    plen = get32(response + off);
    off += 4;
    if (plen > response_len - off)
        return TB_MALFORMED;
    result->params_offset = off;
    result->params_len = plen;
    off += plen;
    if (off + 2 > response_len)
        return TB_MALFORMED;
    nlen = get16(response + off);
    off += 2;
    if (nlen != pending->nonce_caller_len || nlen > sizeof(result->nonce_tpm)
        || nlen > response_len - off)
        return TB_MALFORMED;
    const uint8_t *nonce_tpm = response + off;
    off += nlen;
    if (off + 3 > response_len)
        return TB_MALFORMED;
    result->attributes = response[off++];
    hlen = get16(response + off);
    off += 2;
    md_size = (size_t)EVP_MD_get_size(ctx->md[h]);
    if (hlen != md_size || off + hlen != response_len)
        return TB_MALFORMED;

    put32(code, result->rc);
    put32(cc, pending->command_code);
    struct piece rp[] = {{code, 4}, {cc, 4}, {response + result->params_offset, plen}};
    if (!digest_pieces(ctx, h, rp, 3, rp_hash))
        return TB_CRYPTO_ERROR;
    struct piece mac[] = {{rp_hash, md_size}, {nonce_tpm, nlen},
                          {pending->nonce_caller, nlen}, {&result->attributes, 1}};
    if (!hmac_pieces(ctx, h, pending->hmac_key, pending->hmac_key_len, mac, 4, expected))
        return TB_CRYPTO_ERROR;
    if (CRYPTO_memcmp(expected, response + off, md_size) != 0)
        return TB_AUTH_FAILED;
    memcpy(result->nonce_tpm, nonce_tpm, nlen);
    result->nonce_tpm_len = nlen;
    if (!(result->attributes & ATTR_ENCRYPT))
        return TB_OK;

    /* Authentic, and its first parameter encrypted: the clear copy goes to `clear`. */
    const uint8_t *params = response + result->params_offset;
    if (plen < 2 || (first_len = get16(params)) > plen - 2)
        return TB_MALFORMED;
    if (plen > clear_size)
        return TB_BAD_ARGUMENT;
    memcpy(clear, params, plen);
    if (first_len && !cfb(ctx, h, 0, pending->hmac_key, pending->hmac_key_len, nonce_tpm,
                          pending->nonce_caller, nlen, clear + 2, first_len))
        return TB_CRYPTO_ERROR;
    result->decrypted = 1;
    return TB_OK;
}

/* --- signatures ---------------------------------------------------------------------- */

static long ecdsa_der(const uint8_t *r, size_t r_len, const uint8_t *s, size_t s_len,
                      uint8_t *out, size_t out_size)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *br = BN_bin2bn(r, (int)r_len, NULL), *bs = BN_bin2bn(s, (int)s_len, NULL);
    long len = -1;

    if (sig == NULL || br == NULL || bs == NULL || !ECDSA_SIG_set0(sig, br, bs)) {
        BN_free(br);
        BN_free(bs);
        ECDSA_SIG_free(sig);
        return -1;
    }
    int need = i2d_ECDSA_SIG(sig, NULL);
    if (need > 0 && (size_t)need <= out_size) {
        uint8_t *p = out;
        len = i2d_ECDSA_SIG(sig, &p);
    }
    ECDSA_SIG_free(sig); /* frees br and bs */
    return len;
}

long tb_signature_bytes(const uint8_t *params, size_t params_len, size_t rsa_bytes,
                        uint8_t *out, size_t out_size)
{
    if (params_len < 6)
        return -1;
    uint16_t sig_alg = get16(params);
    if (sig_alg == ALG_ECDSA) {
        size_t r_len = get16(params + 4), s_len;
        if (6 + r_len + 2 > params_len)
            return -1;
        s_len = get16(params + 6 + r_len);
        if (8 + r_len + s_len != params_len)
            return -1;
        return ecdsa_der(params + 6, r_len, params + 8 + r_len, s_len, out, out_size);
    }
    if (sig_alg == ALG_RSASSA || sig_alg == ALG_RSAPSS) {
        size_t len = get16(params + 4), width = len > rsa_bytes ? len : rsa_bytes;
        if (6 + len != params_len || width > out_size)
            return -1;
        memset(out, 0, width - len);
        memcpy(out + width - len, params + 6, len);
        return (long)width;
    }
    return 0;
}

/* --- ECDH peers' points ------------------------------------------------------------- */

int tb_ec_point_on_curve(tb_ctx *ctx, const char *curve, const uint8_t *point, size_t len,
                         int *on_curve)
{
    static const int nids[EC_CURVES] = {NID_X9_62_prime256v1, NID_secp384r1, NID_secp521r1};
    int nid = EC_curve_nist2nid(curve), i;
    EC_POINT *p;

    *on_curve = 0;
    for (i = 0; i < EC_CURVES && nids[i] != nid; i++)
        ;
    if (nid == NID_undef || i == EC_CURVES)
        return TB_BAD_ARGUMENT;
    if (ctx->bn == NULL && (ctx->bn = BN_CTX_new()) == NULL)
        return TB_CRYPTO_ERROR;
    if (ctx->groups[i] == NULL && (ctx->groups[i] = EC_GROUP_new_by_curve_name(nid)) == NULL)
        return TB_CRYPTO_ERROR;
    if ((p = EC_POINT_new(ctx->groups[i])) == NULL)
        return TB_CRYPTO_ERROR;
    /* oct2point refuses a point off the curve; the second check says it in so many words */
    *on_curve = len > 0 && point[0] == POINT_CONVERSION_UNCOMPRESSED
                && EC_POINT_oct2point(ctx->groups[i], p, point, len, ctx->bn) == 1
                && EC_POINT_is_on_curve(ctx->groups[i], p, ctx->bn) == 1
                && !EC_POINT_is_at_infinity(ctx->groups[i], p);
    ERR_clear_error(); /* a refused point leaves errors nobody reads */
    EC_POINT_free(p);
    return TB_OK;
}
