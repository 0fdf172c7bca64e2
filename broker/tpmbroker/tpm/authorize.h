/* Commands authorized by one HMAC session, and their responses checked, in C.
 *
 * The same arithmetic as session_crypto.py and reference.py (the oracle the tests hold
 * this code to); here it costs a few microseconds per signature instead of tens.
 * Pure: no I/O. build_provider.py compiles it into tpmbroker.tpm._authorize with
 * cffi (API mode) and reads this header, minus its # lines, as the cffi cdef.
 */
#ifndef TPMBROKER_AUTHORIZE_H
#define TPMBROKER_AUTHORIZE_H
#include <stddef.h>
#include <stdint.h>

/* Results of tb_prepare and tb_finish. */
#define TB_OK 0
#define TB_TPM_ERROR 1 /* the TPM refused (tb_result.rc); the session's nonce stands */
#define TB_MALFORMED 2 /* the response cannot be the TPM's answer to the command */
#define TB_AUTH_FAILED 3 /* the response's HMAC is wrong */
#define TB_BAD_ARGUMENT 4 /* sizes out of range, unknown hash */
#define TB_CRYPTO_ERROR 5 /* libcrypto failed */

/* One thread's libcrypto contexts (HMAC, digest, AES-CFB), reused command after
 * command. Not shared between threads. */
typedef struct tb_ctx tb_ctx;

/* What checking a command's response needs (sessionKey || authValue, nonceCaller). */
typedef struct {
    uint8_t hmac_key[128];
    size_t hmac_key_len;
    uint8_t nonce_caller[64];
    size_t nonce_caller_len;
    uint32_t command_code;
    uint16_t hash_alg;
    uint32_t response_handles;
} tb_pending;

tb_ctx *tb_ctx_new(void);
void tb_ctx_free(tb_ctx *ctx);

/* Frame command `command_code` on `handles`, its first handle authorized by the session
 * (`session_handle`, `session_key`, its last `nonce_tpm`) with `auth` as authValue.
 * With no handles (TPM2_GetRandom) the session authorizes nothing and only encrypts:
 * `auth` is then empty, and the HMAC key is the sessionKey alone.
 * `names` are the handles' Names, concatenated. `first`, unless has_first is 0, is the
 * contents of the first parameter (a sized buffer), encrypted when `attributes` asks
 * for DECRYPT; `rest` the other parameters, marshalled. `nonce_caller` of the session's
 * nonce size, or NULL for a random one. */
int tb_prepare(tb_ctx *ctx, uint16_t hash_alg, uint32_t session_handle,
               const uint8_t *session_key, size_t session_key_len,
               const uint8_t *nonce_tpm, size_t nonce_tpm_len,
               const uint8_t *nonce_caller, uint32_t command_code,
               const uint32_t *handles, size_t handle_count,
               const uint8_t *names, size_t names_len,
               const uint8_t *auth, size_t auth_len,
               int has_first, const uint8_t *first, size_t first_len,
               const uint8_t *rest, size_t rest_len, uint8_t attributes,
               uint32_t response_handles, tb_pending *pending, uint8_t *out, size_t out_size, size_t *out_len);

/* What tb_finish read from a response. */
typedef struct {
    uint32_t rc; /* the response code, whenever the header was readable */
    size_t params_offset; /* the response parameters: response[offset, offset + len) */
    size_t params_len;
    uint8_t nonce_tpm[64]; /* the session's new nonceTPM */
    size_t nonce_tpm_len;
    uint8_t attributes; /* the response's session attributes */
    int decrypted; /* 1: the parameters, their first decrypted, are in `clear` */
} tb_result;

/* Check `response` against `pending`; on TB_OK all of `result` is filled in. When the
 * TPM encrypted the first parameter (a sized buffer; the command asked for ENCRYPT),
 * the parameters are copied to `clear` (room for `clear_size` bytes) with that one
 * decrypted: AES-128-CFB keyed by KDFa(hmac key, "CFB", nonceTPM (the response's),
 * nonceCaller). In the same call, so the caller never copies the encrypted form: the
 * clear one is only in `clear`, which the caller wipes. */
int tb_finish(tb_ctx *ctx, const tb_pending *pending, const uint8_t *response,
              size_t response_len, tb_result *result, uint8_t *clear, size_t clear_size);

/* A TPM2_Sign response's TPMT_SIGNATURE as the bytes users expect: DER Ecdsa-Sig-Value
 * for ECDSA, the signature left-padded to at least `rsa_bytes` for RSASSA/RSAPSS. Returns the
 * length written, 0 when the layout is not one of these (the caller decides), or -1
 * when it is malformed. */
long tb_signature_bytes(const uint8_t *params, size_t params_len, size_t rsa_bytes,
                        uint8_t *out, size_t out_size);

/* An ECDH peer's public key checked before it goes to the TPM: *on_curve is 1 if
 * `point` is an uncompressed SEC1 point (0x04 || x || y) on the NIST curve `curve`
 * ("P-256", "P-384", "P-521"; their cofactor is 1, so on the curve is in the group), 0
 * if it is not. TB_BAD_ARGUMENT for another curve, TB_CRYPTO_ERROR when libcrypto fails.
 * Each curve's group is made once per context. */
int tb_ec_point_on_curve(tb_ctx *ctx, const char *curve, const uint8_t *point, size_t len,
                         int *on_curve);

#endif
