/*
 * Store loader for persistent TPM keys, by the URIs tpm2-openssl users know:
 *   handle:0x81000001        the persistent handle itself;
 *   handle:0x01000010        an NV index holding a certificate or a public key
 *                            (SubjectPublicKeyInfo), DER or PEM, as tpm2_nvwrite wrote it
 *                            (x509 -in, s_server -cert, pkeyutl -peerkey);
 *   object:PATH              a file tpm2-tools wrote with `tpm2_evictcontrol -o`: a
 *                            serialized ESYS_TR, whose first field is the TPM handle;
 * either with `?pass` when the key has a password (asked through the passphrase callback).
 *
 * Failures come where OpenSSL's apps (and tpm2-openssl) put them: an object: file that
 * cannot be opened fails the open ("Could not open file or uri"); a URI that opens but
 * names nothing usable (handle:0xBAD, a file that is no serialized handle, a handle with
 * no key) fails the load ("Could not read"/"Could not find"). Either way our reason is on
 * the error stack, after whatever OpenSSL's own file loader said about the same URI.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include "provider.h"

#define PERSISTENT_FIRST 0x81000000ul
#define PERSISTENT_LAST 0x81fffffful
#define NV_FIRST 0x01000000ul
#define NV_LAST 0x01fffffful
#define MAX_OBJECT_FILE 4096 /* a serialized ESYS_TR with its public area is far smaller */

typedef struct store_ctx {
    TPMBROKER_CTX *prov;
    uint32_t handle;
    int need_pass;
    int nv;          /* an NV index: its contents are a certificate or a public key */
    int done;
    char error[512]; /* set: the URI cannot be used; raised at load (paths cut at 400) */
} STORE_CTX;

static int is_persistent(unsigned long h)
{
    return h >= PERSISTENT_FIRST && h <= PERSISTENT_LAST;
}

/* Splits a trailing "?pass" off `rest` into `path` (of `size` bytes); -1 if too long. */
static int take_pass(const char *rest, char *path, size_t size)
{
    size_t n = strlen(rest);
    int pass = n >= 5 && strcmp(rest + n - 5, "?pass") == 0;

    if (pass)
        n -= 5;
    if (n >= size)
        return -1;
    memcpy(path, rest, n);
    path[n] = '\0';
    return pass;
}

static void open_handle(STORE_CTX *ctx, const char *uri, const char *rest)
{
    char text[64];
    char *end;
    unsigned long h;
    int pass = take_pass(rest, text, sizeof(text));

    h = pass < 0 ? 0 : strtoul(text, &end, 0);
    if (pass < 0 || end == text || *end != '\0'
        || !(is_persistent(h) || (h >= NV_FIRST && h <= NV_LAST && !pass))) {
        snprintf(ctx->error, sizeof(ctx->error), "%.300s: give a persistent handle, e.g. "
                 "handle:0x81000001 (add ?pass if the key has a password), or an NV index "
                 "holding a certificate or public key, e.g. handle:0x01000010", uri);
        return;
    }
    ctx->handle = (uint32_t)h;
    ctx->need_pass = pass;
    ctx->nv = !is_persistent(h);
}

/* 0: the file cannot be opened at all, raised, and the open fails. */
static int open_object(STORE_CTX *ctx, const char *uri, const char *rest)
{
    char path[4096];
    uint8_t buf[MAX_OBJECT_FILE + 1];
    size_t n;
    FILE *f;
    unsigned long h;
    int pass = take_pass(rest, path, sizeof(path));

    if (pass < 0 || path[0] == '\0') {
        snprintf(ctx->error, sizeof(ctx->error), "%.400s: give the file tpm2_evictcontrol -o "
                 "wrote, e.g. object:key.tr (add ?pass if the key has a password)", uri);
        return 1;
    }
    f = fopen(path, "rb");
    if (f == NULL) {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "%.400s: cannot open %.400s: %s; give "
                   "the file tpm2_evictcontrol -o wrote", uri, path, strerror(errno));
        return 0;
    }
    n = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    if (n < 4 || n > MAX_OBJECT_FILE) {
        snprintf(ctx->error, sizeof(ctx->error), "Could not read %.400s: not a serialized TPM "
                 "object (%s %d bytes)", path, n > MAX_OBJECT_FILE ? "more than" : "less than",
                 n > MAX_OBJECT_FILE ? MAX_OBJECT_FILE : 4);
        return 1;
    }
    /* Esys_TR_Serialize writes the TPM handle first, big-endian. */
    h = (unsigned long)buf[0] << 24 | (unsigned long)buf[1] << 16
        | (unsigned long)buf[2] << 8 | buf[3];
    if (!is_persistent(h)) {
        snprintf(ctx->error, sizeof(ctx->error), "Could not read %.400s: it names TPM handle "
                 "0x%08lx, not a persistent key (0x81xxxxxx)", path, h);
        return 1;
    }
    ctx->handle = (uint32_t)h;
    ctx->need_pass = pass;
    return 1;
}

static void *store_open(void *provctx, const char *uri)
{
    STORE_CTX *ctx;

    if (OPENSSL_strncasecmp(uri, "handle:", 7) != 0
        && OPENSSL_strncasecmp(uri, "object:", 7) != 0)
        return NULL;
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        TPMB_RAISE(provctx, TPMB_R_MALLOC, "out of memory");
        return NULL;
    }
    ctx->prov = provctx;
    if (OPENSSL_strncasecmp(uri, "handle:", 7) == 0) {
        open_handle(ctx, uri, uri + 7);
    } else if (!open_object(ctx, uri, uri + 7)) {
        free(ctx);
        return NULL;
    }
    return ctx;
}

/* What an NV index holds for OpenSSL: a certificate or a public key, both as DER. */
enum nv_kind { NV_CERTIFICATE, NV_PUBLIC_KEY };

/* The tag of the first element inside the DER SEQUENCE at `der`, -1 if unreadable. */
static int first_inner_tag(const uint8_t *der, size_t len, const uint8_t **inner,
                           long *innerlen)
{
    const unsigned char *p = der;
    long content = 0;
    int tag, xclass;

    if (ASN1_get_object(&p, &content, &tag, &xclass, (long)len) & 0x80
        || tag != V_ASN1_SEQUENCE)
        return -1;
    *inner = p;
    *innerlen = content;
    if (ASN1_get_object(&p, &content, &tag, &xclass, content) & 0x80)
        return -1;
    return xclass == V_ASN1_UNIVERSAL ? tag : -1;
}

/*
 * A DER SEQUENCE's kind, by its shape (no decoder needed: with -provider tpmbroker alone
 * there are none): a SubjectPublicKeyInfo starts with its AlgorithmIdentifier, a SEQUENCE
 * whose first element is an OID; a Certificate with its TBSCertificate, whose first
 * element is the [0] version or the serial INTEGER.
 */
static enum nv_kind der_kind(const uint8_t *der, size_t len)
{
    const uint8_t *inner;
    long innerlen;

    if (first_inner_tag(der, len, &inner, &innerlen) == V_ASN1_SEQUENCE
        && first_inner_tag(inner, (size_t)innerlen, &inner, &innerlen) == V_ASN1_OBJECT)
        return NV_PUBLIC_KEY;
    return NV_CERTIFICATE;
}

/*
 * The certificate or public key in an NV index's contents, as DER: tpm2_nvwrite stores a
 * file as it is, DER or PEM, and an index larger than the file keeps its padding after it.
 * PEM armour is taken off here (PEM_read_bio needs no provider: with -provider tpmbroker
 * alone there are no decoders); DER is cut at the end of its outer SEQUENCE. 0: neither,
 * raised.
 */
static int nv_object(STORE_CTX *ctx, const uint8_t *data, size_t len, uint8_t **der,
                     size_t *derlen, enum nv_kind *kind)
{
    static const char begin[] = "-----BEGIN ";
    size_t start = 0;

    /* leading whitespace may precede PEM armour */
    while (start < len && (data[start] == ' ' || data[start] == '\t' || data[start] == '\r'
                           || data[start] == '\n'))
        start++;
    if (len - start >= sizeof(begin) - 1
        && memcmp(data + start, begin, sizeof(begin) - 1) == 0) {
        BIO *mem = BIO_new_mem_buf(data + start, (int)(len - start));
        char *name = NULL, *header = NULL;
        unsigned char *body = NULL;
        long bodylen = 0;
        int read, known;

        ERR_set_mark();
        read = mem != NULL && PEM_read_bio(mem, &name, &header, &body, &bodylen) > 0;
        ERR_pop_to_mark();
        BIO_free(mem);
        known = read && (strcmp(name, "CERTIFICATE") == 0
                         || strcmp(name, "X509 CERTIFICATE") == 0
                         || strcmp(name, "PUBLIC KEY") == 0);
        if (known && bodylen > 0 && (*der = malloc((size_t)bodylen)) != NULL) {
            memcpy(*der, body, (size_t)bodylen);
            *derlen = (size_t)bodylen;
            *kind = strcmp(name, "PUBLIC KEY") == 0 ? NV_PUBLIC_KEY : NV_CERTIFICATE;
        } else {
            TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "NV index 0x%08x holds PEM %s%.64s%s, "
                       "not a certificate (BEGIN CERTIFICATE) or a public key (BEGIN PUBLIC "
                       "KEY)", (unsigned int)ctx->handle,
                       read ? "of type \"" : "that cannot be read", read ? name : "",
                       read ? "\"" : "");
            read = 0;
        }
        OPENSSL_free(name);
        OPENSSL_free(header);
        OPENSSL_free(body);
        return read;
    }
    if (len >= 2 && data[0] == 0x30) {
        const unsigned char *p = data;
        long content = 0;
        int tag, xclass;
        int rc = ASN1_get_object(&p, &content, &tag, &xclass, (long)len);

        if (!(rc & 0x80) && tag == V_ASN1_SEQUENCE
            && (size_t)(p - data) + (size_t)content <= len) {
            *derlen = (size_t)(p - data) + (size_t)content;
            *der = malloc(*derlen);
            if (*der == NULL) {
                TPMB_RAISE(ctx->prov, TPMB_R_MALLOC, "out of memory");
                return 0;
            }
            memcpy(*der, data, *derlen);
            *kind = der_kind(*der, *derlen);
            return 1;
        }
    }
    TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "NV index 0x%08x holds no certificate or public "
               "key: neither DER nor PEM (first byte 0x%02x)", (unsigned int)ctx->handle,
               len > 0 ? data[0] : 0);
    return 0;
}

/*
 * An NV index's contents, handed to OpenSSL as DER: a certificate, or a public key as a
 * SubjectPublicKeyInfo for OpenSSL's decoders to read (tpm2-openssl's keys.md keeps a
 * peer key for -peerkey there).
 */
static int load_nv(STORE_CTX *ctx, OSSL_CALLBACK *object_cb, void *object_cbarg)
{
    CLIENT_ERR err;
    uint8_t *data = NULL, *der = NULL;
    size_t len = 0, derlen = 0;
    enum nv_kind kind = NV_CERTIFICATE;
    int object_type, ok;
    OSSL_PARAM params[4], *param = params;
    char what[64];

    snprintf(what, sizeof(what), "reading NV index 0x%08x", (unsigned int)ctx->handle);
    if (!client_nv_read(ctx->prov->client, ctx->handle, &data, &len, &err)) {
        TPMB_RAISE_CLIENT(ctx->prov, what, &err);
        return 0;
    }
    ok = nv_object(ctx, data, len, &der, &derlen, &kind);
    free(data);
    if (!ok)
        return 0;
    object_type = kind == NV_PUBLIC_KEY ? OSSL_OBJECT_PKEY : OSSL_OBJECT_CERT;
    *param++ = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
    *param++ = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_DATA, der, derlen);
    if (kind == NV_PUBLIC_KEY)
        *param++ = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
                                                    (char *)"SubjectPublicKeyInfo", 0);
    *param = OSSL_PARAM_construct_end();
    ok = object_cb(params, object_cbarg);
    if (!ok)
        TPMB_RAISE(ctx->prov, TPMB_R_UNSUPPORTED, "NV index 0x%08x: OpenSSL cannot read the "
                   "%s in it%s", (unsigned int)ctx->handle,
                   kind == NV_PUBLIC_KEY ? "public key" : "certificate",
                   kind == NV_PUBLIC_KEY ? " (its decoders come with -provider base or "
                                           "default)" : "");
    free(der);
    return ok;
}

static int store_load(void *vctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    STORE_CTX *ctx = vctx;
    uint8_t be[4];
    char pw[1024];
    size_t pwlen = 0;
    TPMB_KEY *key;
    int object_type = OSSL_OBJECT_PKEY, ok;
    OSSL_PARAM params[4];

    ctx->done = 1;
    if (ctx->error[0] != '\0') {
        TPMB_RAISE(ctx->prov, TPMB_R_INVALID_ARGUMENT, "%s", ctx->error);
        return 0;
    }
    if (ctx->nv)
        return load_nv(ctx, object_cb, object_cbarg);
    if (!tpmb_fips_permits_keys(ctx->prov))
        return 0;
    if (ctx->need_pass) {
        OSSL_PARAM info[] = {
            OSSL_PARAM_utf8_string(OSSL_PASSPHRASE_PARAM_INFO, (char *)"TPM key", 0),
            OSSL_PARAM_END,
        };

        if (pw_cb == NULL || !pw_cb(pw, sizeof(pw), &pwlen, info, pw_cbarg)) {
            TPMB_RAISE(ctx->prov, TPMB_R_PASSWORD_NEEDED, "the TPM key needs its password: "
                       "give it with -passin");
            return 0;
        }
    }
    be[0] = (uint8_t)(ctx->handle >> 24);
    be[1] = (uint8_t)(ctx->handle >> 16);
    be[2] = (uint8_t)(ctx->handle >> 8);
    be[3] = (uint8_t)ctx->handle;
    key = tpmb_key_load(ctx->prov, WIRE_KEY_SOURCE_PERSISTENT_HANDLE, be, sizeof(be),
                        (const uint8_t *)pw, pwlen);
    OPENSSL_cleanse(pw, sizeof(pw));
    if (key == NULL)
        return 0;
    params[0] = OSSL_PARAM_construct_int(OSSL_OBJECT_PARAM_TYPE, &object_type);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE,
                                                 (char *)tpmb_key_type_name(key->type), 0);
    params[2] = OSSL_PARAM_construct_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key,
                                                  sizeof(key));
    params[3] = OSSL_PARAM_construct_end();
    ok = object_cb(params, object_cbarg);
    tpmb_key_free(key);
    return ok;
}

static int store_eof(void *vctx)
{
    return ((STORE_CTX *)vctx)->done;
}

static int store_close(void *vctx)
{
    free(vctx);
    return 1;
}

static int store_set_ctx_params(void *vctx, const OSSL_PARAM params[])
{
    (void)vctx;
    (void)params;
    return 1;
}

static const OSSL_PARAM *store_settable_ctx_params(void *provctx)
{
    static const OSSL_PARAM none[] = { OSSL_PARAM_END };

    (void)provctx;
    return none;
}

const OSSL_DISPATCH tpmb_store_functions[] = {
    { OSSL_FUNC_STORE_OPEN, (void (*)(void))store_open },
    { OSSL_FUNC_STORE_LOAD, (void (*)(void))store_load },
    { OSSL_FUNC_STORE_EOF, (void (*)(void))store_eof },
    { OSSL_FUNC_STORE_CLOSE, (void (*)(void))store_close },
    { OSSL_FUNC_STORE_SET_CTX_PARAMS, (void (*)(void))store_set_ctx_params },
    { OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, (void (*)(void))store_settable_ctx_params },
    { 0, NULL },
};
