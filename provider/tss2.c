/*
 * The TSS2 PRIVATE KEY format (OID 2.23.133.10.1.3), as written by tpm2-openssl,
 * openssl_tpm2_engine and the broker:
 *
 *   TPMKey ::= SEQUENCE {
 *     type       OBJECT IDENTIFIER,
 *     emptyAuth  [0] EXPLICIT BOOLEAN OPTIONAL,
 *     policy     [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
 *     secret     [2] EXPLICIT OCTET STRING OPTIONAL,
 *     ...        further [n] fields of later revisions, skipped
 *     parent     INTEGER,
 *     pubkey     OCTET STRING,   -- TPM2B_PUBLIC
 *     privkey    OCTET STRING }  -- TPM2B_PRIVATE
 *
 * The provider reads the public key and whether a password is required, so a key file can
 * be decoded without the broker (nginx -t, pkey -pubout); the broker does the rest. A
 * hand-written reader keeps this small and strict.
 */
#include <string.h>

#include "provider.h"

static const uint8_t loadable_oid[] = { 0x67, 0x81, 0x05, 0x0a, 0x01, 0x03 };
/* 2.23.133.10.1.4: an importable key (wrapped to the parent; the broker imports it). */
static const uint8_t importable_oid[] = { 0x67, 0x81, 0x05, 0x0a, 0x01, 0x04 };

#define TPM2_ALG_RSA 0x0001
#define TPM2_ALG_ECC 0x0023

struct tlv {
    uint8_t tag;
    const uint8_t *val;
    size_t len;
};

/* Reads one DER TLV at *p (definite lengths only); advances *p. */
static int read_tlv(const uint8_t **p, const uint8_t *end, struct tlv *t)
{
    const uint8_t *q = *p;
    size_t len;

    if (end - q < 2)
        return 0;
    t->tag = *q++;
    if ((t->tag & 0x1f) == 0x1f)
        return 0; /* multi-byte tags do not occur here */
    len = *q++;
    if (len & 0x80) {
        size_t n = len & 0x7f;

        if (n == 0 || n > 3 || (size_t)(end - q) < n)
            return 0;
        len = 0;
        while (n-- > 0)
            len = len << 8 | *q++;
    }
    if ((size_t)(end - q) < len)
        return 0;
    t->val = q;
    t->len = len;
    *p = q + len;
    return 1;
}

struct rd {
    const uint8_t *p;
    size_t len;
    size_t pos;
    int err;
};

static uint16_t rd16(struct rd *r)
{
    uint16_t v;

    if (r->err || r->len - r->pos < 2) {
        r->err = 1;
        return 0;
    }
    v = (uint16_t)(r->p[r->pos] << 8 | r->p[r->pos + 1]);
    r->pos += 2;
    return v;
}

static uint32_t rd32(struct rd *r)
{
    uint32_t hi = rd16(r);

    return hi << 16 | rd16(r);
}

static const uint8_t *rd2b(struct rd *r, size_t *n)
{
    const uint8_t *at;

    *n = rd16(r);
    if (r->err || r->len - r->pos < *n) {
        r->err = 1;
        return NULL;
    }
    at = r->p + r->pos;
    r->pos += *n;
    return at;
}

#define TPM2_ALG_NULL 0x0010
#define TPM2_ALG_RSAPSS 0x0016
#define TPM2_ALG_RSAES 0x0015
#define TPM2_ALG_ECDAA 0x001A

/* TPMT_PUBLIC (Part 2, 12.2.4), only as far as RSA and ECC keys go. */
static int parse_public(const uint8_t *p, size_t len, TSS2_INFO *info)
{
    struct rd r = { p, len, 0, 0 };
    uint16_t type, alg;
    size_t n;

    type = rd16(&r);
    (void)rd16(&r);   /* nameAlg */
    info->attributes = rd32(&r);
    (void)rd2b(&r, &n); /* authPolicy */
    alg = rd16(&r);   /* symmetric */
    if (alg != TPM2_ALG_NULL) {
        (void)rd16(&r);
        (void)rd16(&r);
    }
    alg = rd16(&r);   /* scheme */
    if (type == TPM2_ALG_RSA) {
        if (alg != TPM2_ALG_NULL && alg != TPM2_ALG_RSAES)
            info->scheme_hash = rd16(&r);
        /* a scheme bound to PSS makes it an RSA-PSS key, as OpenSSL sees such keys */
        info->type = alg == TPM2_ALG_RSAPSS ? WIRE_KEY_TYPE_RSA_PSS : WIRE_KEY_TYPE_RSA;
        info->bits = rd16(&r);
        info->exponent = rd32(&r);
        if (info->exponent == 0)
            info->exponent = 65537;
        info->n = rd2b(&r, &info->nlen);
    } else if (type == TPM2_ALG_ECC) {
        if (alg != TPM2_ALG_NULL) {
            (void)rd16(&r);
            if (alg == TPM2_ALG_ECDAA)
                (void)rd16(&r);
        }
        info->type = WIRE_KEY_TYPE_EC;
        info->curve = rd16(&r);
        alg = rd16(&r); /* kdf */
        if (alg != TPM2_ALG_NULL)
            (void)rd16(&r);
        info->x = rd2b(&r, &info->xlen);
        info->y = rd2b(&r, &info->ylen);
    } else {
        return 0;
    }
    return !r.err && r.pos == r.len;
}

int tss2_parse(const uint8_t *der, size_t len, TSS2_INFO *info)
{
    const uint8_t *p = der, *end = der + len, *q, *qend;
    struct tlv seq, t;
    uint16_t size;
    size_t i;

    memset(info, 0, sizeof(*info));
    if (!read_tlv(&p, end, &seq) || seq.tag != 0x30)
        return 0;
    q = seq.val;
    qend = seq.val + seq.len;
    if (!read_tlv(&q, qend, &t) || t.tag != 0x06 || t.len != sizeof(loadable_oid)
        || (memcmp(t.val, loadable_oid, sizeof(loadable_oid)) != 0
            && memcmp(t.val, importable_oid, sizeof(importable_oid)) != 0))
        return 0;
    for (;;) {
        if (!read_tlv(&q, qend, &t))
            return 0;
        if ((t.tag & 0xe0) != 0xa0)
            break; /* past the optional [n] fields */
        if (t.tag == 0xa0) {
            const uint8_t *b = t.val;
            struct tlv bo;

            if (!read_tlv(&b, t.val + t.len, &bo) || bo.tag != 0x01 || bo.len != 1)
                return 0;
            info->empty_auth = bo.val[0] != 0;
        }
    }
    if (t.tag != 0x02 || t.len == 0 || t.len > 5 || (t.len == 5 && t.val[0] != 0))
        return 0; /* parent: a non-negative INTEGER that fits a TPM handle */
    for (i = 0; i < t.len; i++)
        info->parent = info->parent << 8 | t.val[i];
    if (!read_tlv(&q, qend, &t) || t.tag != 0x04 || t.len < 4) /* TPM2B_PUBLIC */
        return 0;
    size = (uint16_t)(t.val[0] << 8 | t.val[1]);
    if ((size_t)size + 2 != t.len || !parse_public(t.val + 2, size, info))
        return 0;
    if (!read_tlv(&q, qend, &t) || t.tag != 0x04) /* TPM2B_PRIVATE */
        return 0;
    return 1;
}
