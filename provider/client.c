/*
 * Broker client: the operations, each run on a pooled connection (conn.c) by run(), which
 * owns the deadline, the retry on a stale connection and the LOAD-and-retry after
 * UNKNOWN_KEY. The operations on a LOADed key share one call driven by a table.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "conn.h"
#include "debug.h"

/* A byte field of a result, copied into a malloc'd buffer the caller frees. */
static int copy_out(WIRE_BYTES b, uint8_t **out, size_t *outlen, CLIENT_ERR *err)
{
    *out = malloc(b.len > 0 ? b.len : 1);
    if (*out == NULL) {
        set_err(err, CLIENT_E_NOMEM, 0, "out of memory");
        return 0;
    }
    if (b.len > 0)
        memcpy(*out, b.p, b.len);
    *outlen = b.len;
    return 1;
}

/* LOAD on this connection; fills out when not NULL. */
static int conn_load(struct tpmb_client *c, struct conn *cn, const CLIENT_KEY *key,
                     int64_t deadline, CLIENT_LOAD_RESULT *out, CLIENT_ERR *err)
{
    WIRE_READER body;
    WIRE_BYTES id, spki;
    uint8_t type;
    uint16_t bits, curve;
    size_t n;

    n = wire_load_parent(cn->w, next_id(cn), remaining(deadline), key->source, key->blob,
                         key->bloblen, key->auth, key->authlen, key->parent_auth,
                         key->parent_authlen);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "key blob of %zu bytes does not fit in a frame",
                key->bloblen);
        return 0;
    }
    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "LOAD", err))
        return 0;
    id = wire_get_bytes(&body);
    type = wire_get_u8(&body);
    bits = wire_get_u16(&body);
    curve = wire_get_u16(&body);
    spki = wire_get_bytes(&body);
    if (!wire_reader_done(&body) || id.len != WIRE_KEY_ID_SIZE)
        return malformed(c, cn, "LOAD", err);
    if (memcmp(id.p, key->key_id, WIRE_KEY_ID_SIZE) != 0) {
        set_err(err, CLIENT_E_PROTOCOL, 0,
                "tpmbroker at %s computed another key id than this provider", c->path);
        return 0;
    }
    conn_note_key(cn, key);
    if (out != NULL) {
        memcpy(out->key_id, id.p, WIRE_KEY_ID_SIZE);
        out->key_type = type;
        out->bits = bits;
        out->curve = curve;
        out->spki = malloc(spki.len > 0 ? spki.len : 1);
        if (out->spki == NULL) {
            set_err(err, CLIENT_E_NOMEM, 0, "out of memory");
            return 0;
        }
        memcpy(out->spki, spki.p, spki.len);
        out->spkilen = spki.len;
    }
    return 1;
}

/*
 * Runs op, a request with `opcode`, on a pooled connection. UNKNOWN_KEY (a broker that
 * forgot the key) is answered with LOAD and one retry. A restart goes unnoticed within the
 * deadline: a request the stopping broker could not serve (SHUTTING_DOWN, or its connection
 * lost with the request out) is sent again to the successor if doing it twice changes
 * nothing (WIRE_REPEATABLE_OPCODES); a key generation is never sent twice.
 */
typedef int (*conn_op)(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                       CLIENT_ERR *err);

static int run(struct tpmb_client *c, uint8_t opcode, unsigned int timeout_ms, conn_op op,
               void *arg, CLIENT_ERR *err)
{
    int64_t deadline = now_ms() + timeout_ms;
    struct conn *cn = conn_acquire(c, deadline, err);
    int repeatable = opcode < 32 && ((WIRE_REPEATABLE_OPCODES >> opcode) & 1u);
    int ok = 0, reloaded = 0, lost = 0;
    unsigned int delay = RETRY_FIRST_MS;

    if (cn == NULL)
        return 0;
    for (;;) {
        int fresh = 0;

        if (cn->fd >= 0 && conn_unsolicited(cn)) {
            tpmb_debug("dropping a connection to %s that carries data no request asked for "
                       "(or was closed)", c->path);
            conn_close(cn);
        }
        if (cn->fd < 0) {
            if (!conn_open(c, cn, deadline, err)) {
                /* A stopping broker that answered HELLO: nothing of the request went out,
                 * so any request waits for the successor, repeatable or not. */
                if (err->status != WIRE_STATUS_SHUTTING_DOWN || !pause_until(delay, deadline))
                    break;
                delay = delay < RETRY_MAX_MS ? delay * 2 : RETRY_MAX_MS;
                continue;
            }
            fresh = 1;
        }
        ok = op(c, cn, deadline, arg, err);
        if (ok)
            break;
        if (err->status == WIRE_STATUS_UNKNOWN_KEY && !reloaded) {
            reloaded = 1;
            continue; /* op dropped the key from the cache: it LOADs again */
        }
        if (!repeatable)
            break;
        if (err->status == CLIENT_E_IO && !fresh && lost == 0) {
            lost++;
            continue; /* a pooled connection the broker closed: reconnect at once */
        }
        if ((err->status == WIRE_STATUS_SHUTTING_DOWN
             || (err->status == CLIENT_E_IO && lost++ < MAX_LOST_CONNECTIONS))
            && pause_until(delay, deadline)) {
            tpmb_debug("the broker went away with the request (%s): sending it again",
                       err->message);
            conn_close(cn); /* the next try connects to the successor */
            delay = delay < RETRY_MAX_MS ? delay * 2 : RETRY_MAX_MS;
            continue;
        }
        break;
    }
    conn_release(c, cn);
    return ok;
}

struct load_arg {
    const CLIENT_KEY *key;
    CLIENT_LOAD_RESULT *out;
};

/* The answer to an operation on a loaded key: one sized field. A key the broker no longer
 * knows is dropped from the connection, so that run()'s retry loads it again. */
static int key_answer(struct tpmb_client *c, struct conn *cn, const CLIENT_KEY *key, size_t n,
                      int64_t deadline, const char *op, WIRE_READER *body, WIRE_BYTES *field,
                      CLIENT_ERR *err)
{
    if (!conn_exchange(c, cn, n, deadline, body, err))
        return 0;
    if (!response_ok(c, cn, body, op, err)) {
        if (err->status == WIRE_STATUS_UNKNOWN_KEY)
            conn_drop_key(cn, key);
        return 0;
    }
    *field = wire_get_bytes(body);
    if (!wire_reader_done(body))
        return malformed(c, cn, op, err);
    return 1;
}

/* Copies a field into the caller's buffer of *len bytes; `what` names it in the error. */
static int copy_into(WIRE_BYTES b, uint8_t *out, size_t *len, const char *what, CLIENT_ERR *err)
{
    if (b.len > *len) {
        set_err(err, CLIENT_E_ARG, 0, "%s of %zu bytes exceeds the buffer of %zu", what, b.len,
                *len);
        return 0;
    }
    memcpy(out, b.p, b.len);
    *len = b.len;
    return 1;
}

static int op_load(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                   CLIENT_ERR *err)
{
    struct load_arg *a = arg;

    return conn_load(c, cn, a->key, deadline, a->out, err);
}

int client_load(TPMB_CLIENT *c, const CLIENT_KEY *key, CLIENT_LOAD_RESULT *out, CLIENT_ERR *err)
{
    struct load_arg a = { key, out };

    memset(out, 0, sizeof(*out));
    return run(c, WIRE_OPCODE_LOAD, c->timeout_ms, op_load, &a, err);
}

/* --- operations on a LOADed key: one table, one call ------------------------------------ */

/*
 * SIGN, SIGN_MESSAGE, DERIVE and DECRYPT have one shape: LOAD the key on this connection if
 * it is not there yet, send the request, take the one byte field back into the caller's
 * buffer. Each row says how its request is written and what its answer is called.
 */
struct key_call {
    uint8_t opcode;
    const char *name;   /* the opcode's name, for errors */
    size_t (*encode)(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms, const uint8_t *key_id,
                     const void *args);
    void (*too_large)(CLIENT_ERR *err, const void *args); /* encode found no room */
    const char *result; /* the answer's name, for errors */
    int secret;         /* the answer is secret: no trace of it left in the buffer */
};

struct sign_args {
    uint8_t scheme;
    uint16_t hash;
    const uint8_t *data; /* the digest, or the message for SIGN_MESSAGE */
    size_t datalen;
};

struct derive_args {
    const uint8_t *point;
    size_t pointlen;
};

static size_t encode_sign(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                          const uint8_t *key_id, const void *args)
{
    const struct sign_args *a = args;

    return wire_sign(w, id, timeout_ms, key_id, WIRE_KEY_ID_SIZE, a->scheme, a->hash, a->data,
                     a->datalen);
}

static void sign_too_large(CLIENT_ERR *err, const void *args)
{
    (void)args;
    set_err(err, CLIENT_E_ARG, 0, "digest too large");
}

static size_t encode_sign_message(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                                  const uint8_t *key_id, const void *args)
{
    const struct sign_args *a = args;

    return wire_sign_message(w, id, timeout_ms, key_id, WIRE_KEY_ID_SIZE, a->scheme, a->hash,
                             a->data, a->datalen);
}

static void message_too_large(CLIENT_ERR *err, const void *args)
{
    set_err(err, CLIENT_E_ARG, 0, "message of %zu bytes: a restricted key signs at most %u "
            "bytes, which the TPM hashes (MAX_MESSAGE)",
            ((const struct sign_args *)args)->datalen, (unsigned int)WIRE_MAX_MESSAGE);
}

static size_t encode_derive(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                            const uint8_t *key_id, const void *args)
{
    const struct derive_args *a = args;

    return wire_derive(w, id, timeout_ms, key_id, WIRE_KEY_ID_SIZE, a->point, a->pointlen);
}

static void point_too_large(CLIENT_ERR *err, const void *args)
{
    (void)args;
    set_err(err, CLIENT_E_ARG, 0, "peer point too large");
}

static size_t encode_decrypt(WIRE_WRITER *w, uint32_t id, uint32_t timeout_ms,
                             const uint8_t *key_id, const void *args)
{
    WIRE_DECRYPT_REQUEST d = *(const WIRE_DECRYPT_REQUEST *)args;

    d.key_id = key_id;
    return wire_decrypt(w, id, timeout_ms, &d);
}

static void ciphertext_too_large(CLIENT_ERR *err, const void *args)
{
    (void)args;
    set_err(err, CLIENT_E_ARG, 0, "ciphertext or label too large");
}

static const struct key_call CALL_SIGN = { WIRE_OPCODE_SIGN, "SIGN", encode_sign,
                                          sign_too_large, "signature", 0 };
static const struct key_call CALL_SIGN_MESSAGE = { WIRE_OPCODE_SIGN_MESSAGE, "SIGN_MESSAGE",
                                                  encode_sign_message, message_too_large,
                                                  "signature", 0 };
static const struct key_call CALL_DERIVE = { WIRE_OPCODE_DERIVE, "DERIVE", encode_derive,
                                            point_too_large, "shared secret", 1 };
static const struct key_call CALL_DECRYPT = { WIRE_OPCODE_DECRYPT, "DECRYPT", encode_decrypt,
                                             ciphertext_too_large, "plaintext", 1 };

struct key_call_arg {
    const struct key_call *call;
    const CLIENT_KEY *key;
    const void *args;
    uint8_t *out;
    size_t *outlen;
};

static int op_key_call(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                       CLIENT_ERR *err)
{
    const struct key_call_arg *a = arg;
    const struct key_call *call = a->call;
    WIRE_READER body;
    WIRE_BYTES answer;
    size_t n;
    int ok;

    if (!conn_key_ready(cn, a->key) && !conn_load(c, cn, a->key, deadline, NULL, err))
        return 0;
    n = call->encode(cn->w, next_id(cn), remaining(deadline), a->key->key_id, a->args);
    if (n == 0) {
        call->too_large(err, a->args);
        return 0;
    }
    ok = key_answer(c, cn, a->key, n, deadline, call->name, &body, &answer, err)
         && copy_into(answer, a->out, a->outlen, call->result, err);
    if (call->secret)
        OPENSSL_cleanse(cn->rbuf, WIRE_MAX_FRAME); /* nothing left behind, even half read */
    return ok;
}

static int key_call(TPMB_CLIENT *c, const struct key_call *call, const CLIENT_KEY *key,
                    const void *args, uint8_t *out, size_t *outlen, CLIENT_ERR *err)
{
    struct key_call_arg a = { call, key, args, out, outlen };

    return run(c, call->opcode, c->timeout_ms, op_key_call, &a, err);
}

int client_sign(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                const uint8_t *digest, size_t digestlen, uint8_t *sig, size_t *siglen,
                CLIENT_ERR *err)
{
    struct sign_args a = { scheme, hash, digest, digestlen };

    return key_call(c, &CALL_SIGN, key, &a, sig, siglen, err);
}

int client_sign_message(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                        const uint8_t *message, size_t messagelen, uint8_t *sig,
                        size_t *siglen, CLIENT_ERR *err)
{
    struct sign_args a = { scheme, hash, message, messagelen };

    return key_call(c, &CALL_SIGN_MESSAGE, key, &a, sig, siglen, err);
}

int client_derive(TPMB_CLIENT *c, const CLIENT_KEY *key, const uint8_t *point, size_t pointlen,
                  uint8_t *secret, size_t *secretlen, CLIENT_ERR *err)
{
    struct derive_args a = { point, pointlen };

    return key_call(c, &CALL_DERIVE, key, &a, secret, secretlen, err);
}

int client_decrypt(TPMB_CLIENT *c, const CLIENT_KEY *key, WIRE_DECRYPT_REQUEST *d,
                   uint8_t *out, size_t *outlen, CLIENT_ERR *err)
{
    d->key_id = key->key_id;
    return key_call(c, &CALL_DECRYPT, key, d, out, outlen, err);
}

struct generate_arg {
    const CLIENT_KEYGEN *req;
    uint8_t **key;
    size_t *keylen;
};

static int op_generate(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                       CLIENT_ERR *err)
{
    struct generate_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES key;
    size_t n;

    n = wire_generate(cn->w, next_id(cn), remaining(deadline), a->req->key_type,
                      a->req->param, a->req->auth, a->req->authlen, a->req->parent,
                      a->req->usage, a->req->hash, a->req->parent_auth,
                      a->req->parent_authlen);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "password too long");
        return 0;
    }
    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "GENERATE", err))
        return 0;
    key = wire_get_bytes(&body);
    (void)wire_get_bytes(&body); /* the public key comes again with LOAD */
    if (!wire_reader_done(&body) || key.len == 0)
        return malformed(c, cn, "GENERATE", err);
    return copy_out(key, a->key, a->keylen, err);
}

int client_generate(TPMB_CLIENT *c, const CLIENT_KEYGEN *req, uint8_t **key, size_t *keylen,
                    CLIENT_ERR *err)
{
    struct generate_arg a = { req, key, keylen };
    /* RSA key generation on a TPM can take tens of seconds */
    unsigned int timeout_ms = c->timeout_ms > 120000 ? c->timeout_ms : 120000;

    return run(c, WIRE_OPCODE_GENERATE, timeout_ms, op_generate, &a, err);
}

/* --- RANDOM ----------------------------------------------------------------------------- */

struct random_arg {
    uint8_t *out;
    size_t n;
    size_t done; /* kept across a retry on a fresh connection */
};

static int op_random(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                     CLIENT_ERR *err)
{
    struct random_arg *a = arg;

    while (a->done < a->n) {
        size_t want = a->n - a->done, n;
        WIRE_READER body;
        WIRE_BYTES got;

        if (want > WIRE_MAX_RANDOM)
            want = WIRE_MAX_RANDOM;
        n = wire_random(cn->w, next_id(cn), remaining(deadline), (uint16_t)want);
        if (!conn_exchange(c, cn, n, deadline, &body, err))
            return 0;
        if (!response_ok(c, cn, &body, "RANDOM", err))
            return 0;
        got = wire_get_bytes(&body);
        if (!wire_reader_done(&body) || got.len != want)
            return malformed(c, cn, "RANDOM", err);
        memcpy(a->out + a->done, got.p, got.len);
        OPENSSL_cleanse(cn->rbuf, WIRE_HEADER_SIZE + body.len);
        a->done += got.len;
    }
    return 1;
}

int client_random(TPMB_CLIENT *c, uint8_t *out, size_t n, CLIENT_ERR *err)
{
    struct random_arg a = { out, n, 0 };

    return run(c, WIRE_OPCODE_RANDOM, c->timeout_ms, op_random, &a, err);
}

struct nv_read_arg {
    uint32_t index;
    uint8_t **data;
    size_t *len;
};

static int op_nv_read(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                      CLIENT_ERR *err)
{
    struct nv_read_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES got;
    size_t n = wire_nv_read(cn->w, next_id(cn), remaining(deadline), a->index);

    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "NV_READ", err))
        return 0;
    got = wire_get_bytes(&body);
    if (!wire_reader_done(&body))
        return malformed(c, cn, "NV_READ", err);
    return copy_out(got, a->data, a->len, err);
}

int client_nv_read(TPMB_CLIENT *c, uint32_t index, uint8_t **data, size_t *len,
                   CLIENT_ERR *err)
{
    struct nv_read_arg a = { index, data, len };

    return run(c, WIRE_OPCODE_NV_READ, c->timeout_ms, op_nv_read, &a, err);
}
