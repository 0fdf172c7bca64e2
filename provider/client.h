/* Broker client: a pool of Unix socket connections, thread-safe and fork-safe. */
#ifndef TPMBROKER_CLIENT_H
#define TPMBROKER_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "wire.h"

typedef struct tpmb_client TPMB_CLIENT;

/* Local failures use negative codes; broker refusals carry the wire status (> 0). */
enum client_error {
    CLIENT_E_CONNECT = -1,  /* the socket cannot be reached */
    CLIENT_E_IO = -2,       /* the connection broke mid-request */
    CLIENT_E_TIMEOUT = -3,  /* the deadline passed */
    CLIENT_E_PROTOCOL = -4, /* the broker sent something unparseable */
    CLIENT_E_NOMEM = -5,
    CLIENT_E_ARG = -6,      /* a field too large for a frame, a buffer too small */
};

typedef struct client_err {
    int status;      /* enum client_error or enum wire_status */
    uint32_t tpm_rc;
    char message[512];
} CLIENT_ERR;

/* Everything needed to (re)LOAD a key on any connection. */
typedef struct client_key {
    uint8_t key_id[WIRE_KEY_ID_SIZE];
    uint8_t source;
    const uint8_t *blob;
    size_t bloblen;
    const uint8_t *auth;
    size_t authlen;
    const uint8_t *parent_auth; /* the password of the key's parent; NULL: none */
    size_t parent_authlen;
} CLIENT_KEY;

typedef struct client_load_result {
    uint8_t key_id[WIRE_KEY_ID_SIZE];
    uint8_t key_type;
    uint16_t bits;
    uint16_t curve;
    uint8_t *spki; /* malloc'd SubjectPublicKeyInfo DER */
    size_t spkilen;
} CLIENT_LOAD_RESULT;

/* No I/O: connections are opened on first use. */
TPMB_CLIENT *client_new(const char *socket_path, unsigned int timeout_ms);
void client_free(TPMB_CLIENT *c);
const char *client_socket_path(const TPMB_CLIENT *c);

/* All return 1 on success, 0 on failure with *err filled in. */
int client_load(TPMB_CLIENT *c, const CLIENT_KEY *key, CLIENT_LOAD_RESULT *out, CLIENT_ERR *err);
int client_sign(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                const uint8_t *digest, size_t digestlen, uint8_t *sig, size_t *siglen,
                CLIENT_ERR *err);
/* SIGN_MESSAGE: the message itself (at most WIRE_MAX_MESSAGE bytes), for restricted keys,
 * whose message the TPM must hash, and keys whose attributes the provider does not know. */
int client_sign_message(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                        const uint8_t *message, size_t messagelen, uint8_t *sig,
                        size_t *siglen, CLIENT_ERR *err);
/* What GENERATE asks for: the key, its password, its parent and the parent's password. */
typedef struct {
    uint8_t key_type;       /* WIRE_KEY_TYPE_* */
    uint16_t param;         /* curve for EC, bits for RSA and RSA-PSS */
    const uint8_t *auth;    /* the new key's password */
    size_t authlen;
    uint32_t parent;        /* WIRE_STORAGE_PRIMARY or a persistent handle */
    uint8_t usage;          /* WIRE_USAGE_*; DEFAULT lets the broker choose */
    uint16_t hash;          /* the key's nameAlg (and RSA-PSS scheme hash), 0 = SHA-256 */
    const uint8_t *parent_auth;
    size_t parent_authlen;
} CLIENT_KEYGEN;
int client_generate(TPMB_CLIENT *c, const CLIENT_KEYGEN *req, uint8_t **key, size_t *keylen,
                    CLIENT_ERR *err);
/* RANDOM: fills out[0..n) with bytes from the TPM's generator, in requests of at most
 * WIRE_MAX_RANDOM bytes, all within one deadline. */
int client_random(TPMB_CLIENT *c, uint8_t *out, size_t n, CLIENT_ERR *err);
/* NV_READ: the contents of NV index `index`, malloc'd into *data (the caller frees). */
int client_nv_read(TPMB_CLIENT *c, uint32_t index, uint8_t **data, size_t *len,
                   CLIENT_ERR *err);
/* DERIVE: ECDH with an EC key; `point` is the peer's uncompressed public point. Writes Z
 * (the shared x-coordinate, as long as the curve's field) to secret, *secretlen its room. */
int client_derive(TPMB_CLIENT *c, const CLIENT_KEY *key, const uint8_t *point, size_t pointlen,
                  uint8_t *secret, size_t *secretlen, CLIENT_ERR *err);

/* DECRYPT: RSA decryption with the key. d->key_id is filled in from `key`; the plaintext
 * goes to out (room for *outlen bytes, the modulus length will do), *outlen its length. */
int client_decrypt(TPMB_CLIENT *c, const CLIENT_KEY *key, WIRE_DECRYPT_REQUEST *d,
                   uint8_t *out, size_t *outlen, CLIENT_ERR *err);

#endif
