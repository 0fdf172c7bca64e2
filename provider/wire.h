/* Frame codec of the tpmbroker wire protocol, version 1 (docs/protocol.md). Pure: no I/O. */
#ifndef TPMBROKER_WIRE_H
#define TPMBROKER_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define WIRE_VERSION 1
#define WIRE_MAX_FRAME 65536
#define WIRE_HEADER_SIZE 16
#define WIRE_MIN_LENGTH (WIRE_HEADER_SIZE - 4)
#define WIRE_MAX_LENGTH (WIRE_MAX_FRAME - 4)
#define WIRE_RESPONSE_BIT 0x80
#define WIRE_MAX_FIELD 0xFFFF
#define WIRE_KEY_ID_LEN 32

enum wire_opcode {
    WIRE_OP_HELLO = 0x01,
    WIRE_OP_LOAD = 0x02,
    WIRE_OP_SIGN = 0x03,
    WIRE_OP_GENERATE = 0x04,
    WIRE_OP_STATUS = 0x05,
    WIRE_OP_UNLOAD = 0x06,
    WIRE_OP_RANDOM = 0x07,
};

/* RANDOM: the broker serves at most this many bytes per request */
#define WIRE_MAX_RANDOM 1024

enum wire_source { WIRE_SOURCE_TSS2_DER = 1, WIRE_SOURCE_HANDLE = 2 };
enum wire_key_type { WIRE_KEY_EC = 1, WIRE_KEY_RSA = 2 };
enum wire_scheme { WIRE_SCHEME_ECDSA = 1, WIRE_SCHEME_PKCS1 = 2, WIRE_SCHEME_PSS = 3 };
enum wire_hash {
    WIRE_HASH_SHA1 = 0x0004,
    WIRE_HASH_SHA256 = 0x000B,
    WIRE_HASH_SHA384 = 0x000C,
    WIRE_HASH_SHA512 = 0x000D,
};
enum wire_curve { WIRE_CURVE_NONE = 0, WIRE_CURVE_P256 = 0x0003, WIRE_CURVE_P384 = 0x0004 };

#define WIRE_STORAGE_PRIMARY 0x40000001u

enum wire_status {
    WIRE_OK = 0,
    WIRE_MALFORMED = 1,
    WIRE_UNSUPPORTED_VERSION = 2,
    WIRE_UNKNOWN_OPCODE = 3,
    WIRE_TOO_LARGE = 4,
    WIRE_UNKNOWN_KEY = 5,
    WIRE_BAD_KEY = 6,
    WIRE_AUTH_FAILED = 7,
    WIRE_BAD_DIGEST = 8,
    WIRE_UNSUPPORTED = 9,
    WIRE_DEADLINE = 10,
    WIRE_NO_SESSIONS = 11,
    WIRE_TPM_ERROR = 12,
    WIRE_TPM_UNAVAILABLE = 13,
    WIRE_PERMISSION_DENIED = 14,
    WIRE_INTERNAL = 15,
    WIRE_OVERLOADED = 16,
    WIRE_LOCKOUT = 17,
};

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
size_t wire_generate(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t key_type,
                     uint16_t param, const uint8_t *auth, size_t authlen, uint32_t parent);
size_t wire_status(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms);
size_t wire_unload(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                   size_t key_id_len);
size_t wire_random(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint16_t count);

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
