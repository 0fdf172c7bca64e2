/* Frame codec of the tpmbroker wire protocol, version 1. Big-endian throughout. */
#include <string.h>

#include "wire.h"

static void put_raw(WIRE_WRITER *w, const void *p, size_t n)
{
    if (w->overflow || n > sizeof(w->buf) - w->len) {
        w->overflow = 1;
        return;
    }
    if (n > 0)
        memcpy(w->buf + w->len, p, n);
    w->len += n;
}

void wire_put_u8(WIRE_WRITER *w, uint8_t v)
{
    put_raw(w, &v, 1);
}

void wire_put_u16(WIRE_WRITER *w, uint16_t v)
{
    uint8_t b[2] = { (uint8_t)(v >> 8), (uint8_t)v };

    put_raw(w, b, 2);
}

void wire_put_u32(WIRE_WRITER *w, uint32_t v)
{
    uint8_t b[4] = { (uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v };

    put_raw(w, b, 4);
}

void wire_put_bytes(WIRE_WRITER *w, const void *p, size_t n)
{
    if (n > WIRE_MAX_FIELD) {
        w->overflow = 1;
        return;
    }
    wire_put_u16(w, (uint16_t)n);
    put_raw(w, p, n);
}

void wire_put_str(WIRE_WRITER *w, const char *s)
{
    wire_put_bytes(w, s, s == NULL ? 0 : strlen(s));
}

void wire_begin(WIRE_WRITER *w, uint8_t opcode, uint32_t request_id, uint32_t timeout_ms)
{
    w->len = 0;
    w->overflow = 0;
    wire_put_u32(w, 0); /* patched by wire_finish */
    wire_put_u8(w, WIRE_VERSION);
    wire_put_u8(w, opcode);
    wire_put_u16(w, 0);
    wire_put_u32(w, request_id);
    wire_put_u32(w, timeout_ms);
}

size_t wire_finish(WIRE_WRITER *w)
{
    uint32_t length;

    if (w->overflow || w->len < WIRE_HEADER_SIZE || w->len - 4 > WIRE_MAX_LENGTH)
        return 0;
    length = (uint32_t)(w->len - 4);
    w->buf[0] = (uint8_t)(length >> 24);
    w->buf[1] = (uint8_t)(length >> 16);
    w->buf[2] = (uint8_t)(length >> 8);
    w->buf[3] = (uint8_t)length;
    return w->len;
}

size_t wire_hello(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const char *client)
{
    wire_begin(w, WIRE_OPCODE_HELLO, id, timeout_ms);
    wire_put_u8(w, WIRE_VERSION);
    wire_put_str(w, client);
    return wire_finish(w);
}

/* A trailing field added after a message's first release: absent means empty, so an
 * empty one is not written and the frame keeps its old bytes. */
static void put_optional_bytes(WIRE_WRITER *w, const uint8_t *p, size_t n)
{
    if (n > 0)
        wire_put_bytes(w, p, n);
}

size_t wire_load(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t source,
                 const uint8_t *key, size_t keylen, const uint8_t *auth, size_t authlen)
{
    return wire_load_parent(w, id, timeout_ms, source, key, keylen, auth, authlen, NULL, 0);
}

size_t wire_load_parent(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t source,
                        const uint8_t *key, size_t keylen, const uint8_t *auth, size_t authlen,
                        const uint8_t *parent_auth, size_t parent_authlen)
{
    wire_begin(w, WIRE_OPCODE_LOAD, id, timeout_ms);
    wire_put_u8(w, source);
    wire_put_bytes(w, key, keylen);
    wire_put_bytes(w, auth, authlen);
    put_optional_bytes(w, parent_auth, parent_authlen);
    return wire_finish(w);
}

size_t wire_sign(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                 size_t key_id_len, uint8_t scheme, uint16_t hash, const uint8_t *digest,
                 size_t digestlen)
{
    wire_begin(w, WIRE_OPCODE_SIGN, id, timeout_ms);
    wire_put_bytes(w, key_id, key_id_len);
    wire_put_u8(w, scheme);
    wire_put_u16(w, hash);
    wire_put_bytes(w, digest, digestlen);
    return wire_finish(w);
}

size_t wire_sign_message(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                         const uint8_t *key_id, size_t key_id_len, uint8_t scheme,
                         uint16_t hash, const uint8_t *message, size_t messagelen)
{
    if (messagelen > WIRE_MAX_MESSAGE)
        return 0;
    wire_begin(w, WIRE_OPCODE_SIGN_MESSAGE, id, timeout_ms);
    wire_put_bytes(w, key_id, key_id_len);
    wire_put_u8(w, scheme);
    wire_put_u16(w, hash);
    wire_put_bytes(w, message, messagelen);
    return wire_finish(w);
}

size_t wire_generate(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint8_t key_type,
                     uint16_t param, const uint8_t *auth, size_t authlen, uint32_t parent,
                     uint8_t usage, uint16_t hash, const uint8_t *parent_auth,
                     size_t parent_authlen)
{
    wire_begin(w, WIRE_OPCODE_GENERATE, id, timeout_ms);
    wire_put_u8(w, key_type);
    wire_put_u16(w, param);
    wire_put_bytes(w, auth, authlen);
    wire_put_u32(w, parent);
    /* The optional tail: absent is the version-1 frame; parent_auth may end it early. */
    if (usage != 0 || hash != 0 || parent_authlen != 0) {
        wire_put_u8(w, usage);
        wire_put_u16(w, hash);
        put_optional_bytes(w, parent_auth, parent_authlen);
    }
    return wire_finish(w);
}

size_t wire_status(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms)
{
    wire_begin(w, WIRE_OPCODE_STATUS, id, timeout_ms);
    return wire_finish(w);
}

size_t wire_unload(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                   size_t key_id_len)
{
    wire_begin(w, WIRE_OPCODE_UNLOAD, id, timeout_ms);
    wire_put_bytes(w, key_id, key_id_len);
    return wire_finish(w);
}

size_t wire_random(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint16_t count)
{
    wire_begin(w, WIRE_OPCODE_RANDOM, id, timeout_ms);
    wire_put_u16(w, count);
    return wire_finish(w);
}

size_t wire_nv_read(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t index)
{
    wire_begin(w, WIRE_OPCODE_NV_READ, id, timeout_ms);
    wire_put_u32(w, index);
    return wire_finish(w);
}

size_t wire_derive(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                   size_t key_id_len, const uint8_t *point, size_t pointlen)
{
    wire_begin(w, WIRE_OPCODE_DERIVE, id, timeout_ms);
    wire_put_bytes(w, key_id, key_id_len);
    wire_put_bytes(w, point, pointlen);
    return wire_finish(w);
}

size_t wire_persist(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                    size_t key_id_len, uint32_t handle, const uint8_t *owner_auth,
                    size_t owner_authlen)
{
    wire_begin(w, WIRE_OPCODE_PERSIST, id, timeout_ms);
    wire_put_bytes(w, key_id, key_id_len);
    wire_put_u32(w, handle);
    put_optional_bytes(w, owner_auth, owner_authlen);
    return wire_finish(w);
}

size_t wire_evict(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t handle,
                  const uint8_t *owner_auth, size_t owner_authlen)
{
    wire_begin(w, WIRE_OPCODE_EVICT, id, timeout_ms);
    wire_put_u32(w, handle);
    put_optional_bytes(w, owner_auth, owner_authlen);
    return wire_finish(w);
}

size_t wire_keys(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms)
{
    wire_begin(w, WIRE_OPCODE_KEYS, id, timeout_ms);
    return wire_finish(w);
}

size_t wire_import(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, uint32_t parent,
                   const uint8_t *key, size_t keylen, const uint8_t *parent_auth,
                   size_t parent_authlen)
{
    wire_begin(w, WIRE_OPCODE_IMPORT, id, timeout_ms);
    wire_put_u32(w, parent);
    wire_put_bytes(w, key, keylen);
    put_optional_bytes(w, parent_auth, parent_authlen);
    return wire_finish(w);
}

size_t wire_decrypt(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                    const WIRE_DECRYPT_REQUEST *d)
{
    wire_begin(w, WIRE_OPCODE_DECRYPT, id, timeout_ms);
    wire_put_bytes(w, d->key_id, WIRE_KEY_ID_SIZE);
    wire_put_u8(w, d->padding);
    wire_put_u8(w, d->flags);
    wire_put_u16(w, d->hash);
    wire_put_u16(w, d->mgf1_hash);
    wire_put_bytes(w, d->label, d->labellen);
    wire_put_bytes(w, d->ciphertext, d->ciphertextlen);
    return wire_finish(w);
}

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int wire_parse_header(const uint8_t hdr[WIRE_HEADER_SIZE], WIRE_HEADER *h)
{
    h->length = be32(hdr);
    h->version = hdr[4];
    h->opcode = hdr[5];
    h->flags = (uint16_t)(hdr[6] << 8 | hdr[7]);
    h->request_id = be32(hdr + 8);
    h->timeout_ms = be32(hdr + 12);
    return h->length >= WIRE_MIN_LENGTH && h->length <= WIRE_MAX_LENGTH;
}

void wire_reader_init(WIRE_READER *r, const uint8_t *body, size_t len)
{
    r->p = body;
    r->len = len;
    r->pos = 0;
    r->err = 0;
}

static const uint8_t *take(WIRE_READER *r, size_t n)
{
    const uint8_t *at;

    if (r->err || n > r->len - r->pos) {
        r->err = 1;
        return NULL;
    }
    at = r->p + r->pos;
    r->pos += n;
    return at;
}

uint8_t wire_get_u8(WIRE_READER *r)
{
    const uint8_t *b = take(r, 1);

    return b == NULL ? 0 : b[0];
}

uint16_t wire_get_u16(WIRE_READER *r)
{
    const uint8_t *b = take(r, 2);

    return b == NULL ? 0 : (uint16_t)(b[0] << 8 | b[1]);
}

uint32_t wire_get_u32(WIRE_READER *r)
{
    const uint8_t *b = take(r, 4);

    return b == NULL ? 0 : be32(b);
}

WIRE_BYTES wire_get_bytes(WIRE_READER *r)
{
    WIRE_BYTES out = { NULL, 0 };
    uint16_t n = wire_get_u16(r);
    const uint8_t *b = take(r, n);

    if (b != NULL) {
        out.p = b;
        out.len = n;
    }
    return out;
}

int wire_reader_done(const WIRE_READER *r)
{
    return !r->err && r->pos == r->len;
}

int wire_response_status(WIRE_READER *r, uint32_t *tpm_rc, WIRE_BYTES *message)
{
    uint16_t status = wire_get_u16(r);

    *tpm_rc = 0;
    message->p = NULL;
    message->len = 0;
    if (r->err)
        return -1;
    if (status == WIRE_STATUS_OK)
        return WIRE_STATUS_OK;
    *tpm_rc = wire_get_u32(r);
    *message = wire_get_bytes(r);
    if (!wire_reader_done(r))
        return -1;
    return status;
}

const char *wire_status_name(int status)
{
#define WIRE_STATUS_NAME(name, value) [value] = #name,
    static const char *const names[] = { WIRE_STATUS_LIST(WIRE_STATUS_NAME) };
#undef WIRE_STATUS_NAME

    if (status < 0 || (size_t)status >= sizeof(names) / sizeof(names[0]) || names[status] == NULL)
        return "UNKNOWN_STATUS";
    return names[status];
}
