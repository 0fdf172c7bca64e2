/* Frame codec of the tpmbroker wire protocol, version 1 (docs/protocol.md). Pure: no I/O. */
#ifndef TPMBROKER_WIRE_H
#define TPMBROKER_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "definitions.h" /* opcodes, statuses and every other shared number */

#define WIRE_MIN_LENGTH (WIRE_HEADER_SIZE - 4)
#define WIRE_MAX_LENGTH (WIRE_MAX_FRAME - 4)

/* A frame under construction; everything goes into one fixed buffer. */
typedef struct wire_writer {
    uint8_t buf[WIRE_MAX_FRAME];
    size_t len;
    int overflow;
} WIRE_WRITER;

/* A read cursor over a received body; any short read sets err and sticks. */
typedef struct wire_reader {
    const uint8_t *p;
    size_t len;
    size_t pos;
    int err;
} WIRE_READER;

typedef struct wire_header {
    uint32_t length;
    uint8_t version;
    uint8_t opcode;
    uint16_t flags;
    uint32_t request_id;
    uint32_t timeout_ms;
} WIRE_HEADER;

/* A byte string pointing into the frame it came from. */
typedef struct wire_bytes {
    const uint8_t *p;
    size_t len;
} WIRE_BYTES;

void wire_begin(WIRE_WRITER *w, uint8_t opcode, uint32_t request_id, uint32_t timeout_ms);
void wire_put_u8(WIRE_WRITER *w, uint8_t v);
void wire_put_u16(WIRE_WRITER *w, uint16_t v);
void wire_put_u32(WIRE_WRITER *w, uint32_t v);
void wire_put_bytes(WIRE_WRITER *w, const void *p, size_t n);
void wire_put_str(WIRE_WRITER *w, const char *s);
/* Patches the length field; returns the frame size, or 0 if anything overflowed. */
size_t wire_finish(WIRE_WRITER *w);

/* Requests: each returns the frame size in w->buf, 0 on overflow. */
size_t wire_hello(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const char *client);
size_t wire_load(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t source,
                 const uint8_t *key, size_t keylen, const uint8_t *auth, size_t authlen);
size_t wire_sign(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                 size_t key_id_len, uint8_t scheme, uint16_t hash, const uint8_t *digest,
                 size_t digestlen);
/* SIGN_MESSAGE: the message itself, at most WIRE_MAX_MESSAGE bytes (0 past that). */
size_t wire_sign_message(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                         const uint8_t *key_id, size_t key_id_len, uint8_t scheme,
                         uint16_t hash, const uint8_t *message, size_t messagelen);
size_t wire_generate(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t key_type,
                     uint16_t param, const uint8_t *auth, size_t authlen, uint32_t parent,
                     uint8_t usage, uint16_t hash, const uint8_t *parent_auth,
                     size_t parent_authlen);
/* LOAD with the password of the key's parent (a trailing field, omitted when empty:
 * wire_load is this with none). */
size_t wire_load_parent(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t source,
                        const uint8_t *key, size_t keylen, const uint8_t *auth, size_t authlen,
                        const uint8_t *parent_auth, size_t parent_authlen);
size_t wire_status(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms);
size_t wire_unload(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                   size_t key_id_len);
size_t wire_random(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint16_t count);
size_t wire_nv_read(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t index);
/* IMPORT: an importable key file (DER) for TPM2_Import under its parent; an empty key
 * asks for the public area of `parent` alone. parent_auth is omitted when empty. */
size_t wire_import(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t parent,
                   const uint8_t *key, size_t keylen, const uint8_t *parent_auth,
                   size_t parent_authlen);
size_t wire_derive(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                   size_t key_id_len, const uint8_t *point, size_t pointlen);
/* Persistent handles (the tpmbroker command sends these; the provider does not). The
 * owner hierarchy's password is a trailing field, omitted when empty. */
size_t wire_persist(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                    size_t key_id_len, uint32_t handle, const uint8_t *owner_auth,
                    size_t owner_authlen);
size_t wire_evict(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t handle,
                  const uint8_t *owner_auth, size_t owner_authlen);
size_t wire_keys(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms);

/* DECRYPT's fields (docs/protocol.md); hash, mgf1_hash and label are OAEP's, else 0. */
typedef struct wire_decrypt_request {
    const uint8_t *key_id;  /* WIRE_KEY_ID_SIZE bytes */
    uint8_t padding;        /* WIRE_PADDING_* */
    uint8_t flags;          /* WIRE_DECRYPT_FLAG_* */
    uint16_t hash;
    uint16_t mgf1_hash;
    const uint8_t *label;
    size_t labellen;
    const uint8_t *ciphertext;
    size_t ciphertextlen;
} WIRE_DECRYPT_REQUEST;

size_t wire_decrypt(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                    const WIRE_DECRYPT_REQUEST *d);

/* Parses the 16 header bytes. Returns 0 when the length breaks framing, else 1. */
int wire_parse_header(const uint8_t hdr[WIRE_HEADER_SIZE], WIRE_HEADER *h);

void wire_reader_init(WIRE_READER *r, const uint8_t *body, size_t len);
uint8_t wire_get_u8(WIRE_READER *r);
uint16_t wire_get_u16(WIRE_READER *r);
uint32_t wire_get_u32(WIRE_READER *r);
WIRE_BYTES wire_get_bytes(WIRE_READER *r);
/* 1 if every byte was consumed and nothing was short. */
int wire_reader_done(const WIRE_READER *r);

/*
 * Reads the status word of a response body. On a non-zero status also reads tpm_rc and
 * the message and checks the body is consumed. Returns the status, or -1 if malformed.
 * On OK, r is left at the first result field.
 */
int wire_response_status(WIRE_READER *r, uint32_t *tpm_rc, WIRE_BYTES *message);

/* Symbolic name of a status code, for messages. */
const char *wire_status_name(int status);

#endif
