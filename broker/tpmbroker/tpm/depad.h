/* RSA decryption paddings removed in the broker, in constant time.
 *
 * The TPM does the raw private operation (TPM2_RSA_Decrypt with scheme NULL) and hands
 * back the encoded message EM = c^d mod n; these functions take the padding off. Their
 * running time and memory accesses do not depend on whether the padding is good, so a
 * client cannot tell a good PKCS#1 v1.5 padding from a bad one by the time an answer
 * takes (Bleichenbacher), only by the TPM's own time, which is the same for both.
 * Pure: no I/O. build_provider.py compiles it into tpmbroker.tpm._authorize beside
 * authorize.c and reads this header, minus its # lines, as part of the cffi cdef.
 */
#ifndef TPMBROKER_DEPAD_H
#define TPMBROKER_DEPAD_H
#include <stddef.h>
#include <stdint.h>

#define TD_OK 0
#define TD_BAD_PADDING 1 /* explicit rejection: the padding is not good */
#define TD_BAD_ARGUMENT 2 /* sizes out of range, unknown hash */
#define TD_CRYPTO_ERROR 3 /* libcrypto failed */
#define TD_MALFORMED 4 /* the TPM's answer is not a sized buffer of at most k bytes */

/* What td_pkcs1 keeps between calls: an HMAC-SHA256 context whose digest is fetched
 * once. One per thread; NULL from td_ctx_new when libcrypto cannot make it. */
typedef struct td_ctx td_ctx;
td_ctx *td_ctx_new(void);
void td_ctx_free(td_ctx *ctx);

/* RSAES-PKCS1-v1_5 decoding of `em` (`k` bytes, the modulus length, leading zero
 * included). With `implicit` set, a bad padding yields a synthetic message derived from
 * the ciphertext `ct` (`k` bytes) and the key's 32-byte secret `kdk_secret`, as OpenSSL
 * 3.2 and draft-irtf-cfrg-rsa-guidance's implicit rejection do, and TD_OK either way;
 * the same ciphertext always gives the same synthetic message. Without it a bad padding
 * is TD_BAD_PADDING. `out` has room for `k` bytes; *out_len is the message's length. */
int td_pkcs1(td_ctx *ctx, const uint8_t *em, const uint8_t *ct, size_t k,
             const uint8_t *kdk_secret, int implicit, uint8_t *out, size_t *out_len);

/* td_pkcs1 of the TPM's answer itself: `answer` is TPM2_RSA_Decrypt's response
 * parameters, a sized buffer whose leading zero bytes the TPM may have dropped. */
int td_pkcs1_answer(td_ctx *ctx, const uint8_t *answer, size_t answer_len,
                    const uint8_t *ct, size_t k, const uint8_t *kdk_secret, int implicit,
                    uint8_t *out, size_t *out_len);

/* RSAES-OAEP decoding of `em` (`k` bytes) with `label`, the hash `md_name` and MGF1 with
 * `mgf1_name` (OpenSSL digest names), by libcrypto's constant-time check. TD_BAD_PADDING
 * if it does not decode. `out` has room for `k` bytes. */
int td_oaep(const uint8_t *em, size_t k, const uint8_t *label, size_t label_len,
            const char *md_name, const char *mgf1_name, uint8_t *out, size_t *out_len);

#endif
