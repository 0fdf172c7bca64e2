/*
 * Golden-frame test of provider/wire.c, driven by tests/test_provider_wire.py.
 *
 *   provider_wire_test encode        prints "name hex" for each golden request, encoded here
 *   provider_wire_test decode        reads "name hex" lines of responses on stdin and prints
 *                                    "name id status rc fields..." for each
 *   provider_wire_test malformed     runs the codec's refusal cases; prints "ok" or the failure
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static WIRE_WRITER w;

static void hex(const char *name, const uint8_t *p, size_t n)
{
    size_t i;

    printf("%s ", name);
    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\n");
}

static void put_hex(const uint8_t *p, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
    if (n == 0)
        printf("-");
}

static int encode(void)
{
    uint8_t kid[32], zero[32] = { 0 }, aa[48], point[65];
    static const uint8_t key[] = { 0x30, 0x03, 0x02, 0x01, 0x01 };
    static const uint8_t handle[] = { 0x81, 0x00, 0x00, 0x01 };
    size_t i;

    for (i = 0; i < 32; i++)
        kid[i] = (uint8_t)i;
    memset(aa, 0xaa, sizeof(aa));
    hex("hello_request", w.buf, wire_hello(&w, 1, 5000, "tpmbroker-provider/0.1.0"));
    hex("load_request", w.buf, wire_load(&w, 2, 30000, WIRE_KEY_SOURCE_TSS2_DER, key, sizeof(key),
                                         (const uint8_t *)"pw", 2));
    hex("load_handle_request", w.buf,
        wire_load(&w, 3, 0, WIRE_KEY_SOURCE_PERSISTENT_HANDLE, handle, sizeof(handle), NULL, 0));
    hex("sign_request", w.buf, wire_sign(&w, 4, 1000, kid, 32, WIRE_SCHEME_ECDSA,
                                         WIRE_HASH_SHA256, zero, 32));
    hex("sign_pss_request", w.buf, wire_sign(&w, 0xFFFFFFFEu, 0, kid, 32, WIRE_SCHEME_PSS,
                                             WIRE_HASH_SHA384, aa, 48));
    hex("generate_request", w.buf, wire_generate(&w, 6, 60000, WIRE_KEY_TYPE_RSA, 2048, NULL, 0,
                                                 WIRE_STORAGE_PRIMARY, 0, 0, NULL, 0));
    hex("generate_rsa_pss_request", w.buf,
        wire_generate(&w, 6, 60000, WIRE_KEY_TYPE_RSA_PSS, 3072, NULL, 0, WIRE_STORAGE_PRIMARY,
                      WIRE_USAGE_SIGN, WIRE_HASH_SHA384, NULL, 0));
    hex("status_request", w.buf, wire_status(&w, 7, 0));
    hex("unload_request", w.buf, wire_unload(&w, 8, 0, kid, 32));
    hex("random_request", w.buf, wire_random(&w, 9, 2000, 48));
    hex("random_max_request", w.buf, wire_random(&w, 10, 0, WIRE_MAX_RANDOM));
    hex("nv_read_request", w.buf, wire_nv_read(&w, 12, 5000, 0x01000010));
    hex("sign_message_request", w.buf,
        wire_sign_message(&w, 13, 3000, kid, 32, WIRE_SCHEME_ECDSA, WIRE_HASH_SHA256,
                          (const uint8_t *)"hello, world", 12));
    hex("sign_message_empty_request", w.buf,
        wire_sign_message(&w, 14, 0, kid, 32, WIRE_SCHEME_PSS, WIRE_HASH_SHA384, NULL, 0));
    for (i = 0; i < sizeof(point); i++)
        point[i] = (uint8_t)(i == 0 ? 0x04 : 0x3f + i);
    hex("derive_request", w.buf, wire_derive(&w, 13, 3000, kid, 32, point, sizeof(point)));
    hex("import_request", w.buf,
        wire_import(&w, 16, 60000, 0x40000001, (const uint8_t *)"\x30\x03\x02\x01\x01", 5,
                    (const uint8_t *)"parentpass", 10));
    hex("import_parent_public_request", w.buf, wire_import(&w, 17, 5000, 0, NULL, 0, NULL, 0));
    hex("persist_request", w.buf, wire_persist(&w, 15, 30000, kid, 32, 0x81000010u, NULL, 0));
    hex("persist_owner_auth_request", w.buf,
        wire_persist(&w, 16, 0, kid, 32, 0x81000010u, (const uint8_t *)"ownerpass", 9));
    hex("evict_request", w.buf, wire_evict(&w, 17, 30000, 0x81000010u, NULL, 0));
    hex("keys_request", w.buf, wire_keys(&w, 18, 0));
    hex("load_parent_auth_request", w.buf,
        wire_load_parent(&w, 13, 0, WIRE_KEY_SOURCE_TSS2_DER, key, sizeof(key), NULL, 0,
                         (const uint8_t *)"parentpass", 10));
    hex("generate_parent_auth_request", w.buf,
        wire_generate(&w, 14, 0, WIRE_KEY_TYPE_EC, WIRE_CURVE_P256, (const uint8_t *)"pw", 2,
                      0x81000002u, 0, 0, (const uint8_t *)"parentpass", 10));
    {
        static const uint8_t label[] = "label", ct8[8] = { 0xee, 0xee, 0xee, 0xee, 0xee, 0xee,
                                                            0xee, 0xee };
        uint8_t ct16[16];
        WIRE_DECRYPT_REQUEST d = { 0 };

        for (i = 0; i < 16; i++)
            ct16[i] = (uint8_t)i;
        d.key_id = kid;
        d.padding = WIRE_PADDING_PKCS1;
        d.flags = WIRE_DECRYPT_FLAG_IMPLICIT_REJECTION;
        d.ciphertext = ct16;
        d.ciphertextlen = sizeof(ct16);
        hex("decrypt_request", w.buf, wire_decrypt(&w, 13, 3000, &d));
        d.padding = WIRE_PADDING_OAEP;
        d.flags = 0;
        d.hash = WIRE_HASH_SHA256;
        d.mgf1_hash = WIRE_HASH_SHA1;
        d.label = label;
        d.labellen = 5;
        d.ciphertext = ct8;
        d.ciphertextlen = sizeof(ct8);
        hex("decrypt_oaep_request", w.buf, wire_decrypt(&w, 14, 0, &d));
    }
    return 0;
}

static size_t unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    unsigned int b;

    while (s[0] && s[1] && n < cap && sscanf(s, "%2x", &b) == 1) {
        out[n++] = (uint8_t)b;
        s += 2;
    }
    return n;
}

/* Response fields by opcode, printed as hex byte strings / decimal integers. */
static int print_result(uint8_t op, WIRE_READER *r)
{
    WIRE_BYTES a, b;

    switch (op & ~WIRE_RESPONSE_BIT) {
    case WIRE_OPCODE_HELLO: {
        unsigned v = wire_get_u8(r);

        a = wire_get_bytes(r);
        printf(" %u ", v);
        put_hex(a.p, a.len);
        printf(" %u", wire_get_u32(r));
        break;
    }
    case WIRE_OPCODE_LOAD: {
        unsigned t, bits, curve;

        a = wire_get_bytes(r);
        t = wire_get_u8(r);
        bits = wire_get_u16(r);
        curve = wire_get_u16(r);
        b = wire_get_bytes(r);
        printf(" ");
        put_hex(a.p, a.len);
        printf(" %u %u %u ", t, bits, curve);
        put_hex(b.p, b.len);
        break;
    }
    case WIRE_OPCODE_SIGN:
    case WIRE_OPCODE_STATUS:
    case WIRE_OPCODE_RANDOM:
    case WIRE_OPCODE_NV_READ:
    case WIRE_OPCODE_SIGN_MESSAGE:
    case WIRE_OPCODE_DERIVE:
    case WIRE_OPCODE_DECRYPT:
    case WIRE_OPCODE_CERTIFY:
        a = wire_get_bytes(r);
        printf(" ");
        put_hex(a.p, a.len);
        break;
    case WIRE_OPCODE_GENERATE:
    case WIRE_OPCODE_IMPORT:
    case WIRE_OPCODE_PCR_READ:
        a = wire_get_bytes(r);
        b = wire_get_bytes(r);
        printf(" ");
        put_hex(a.p, a.len);
        printf(" ");
        put_hex(b.p, b.len);
        break;
    case WIRE_OPCODE_UNLOAD:
    case WIRE_OPCODE_EVICT:
        break;
    case WIRE_OPCODE_KEYS:
        a = wire_get_bytes(r);
        printf(" ");
        put_hex(a.p, a.len);
        break;
    case WIRE_OPCODE_PERSIST: {
        unsigned long handle = wire_get_u32(r);

        a = wire_get_bytes(r);
        printf(" %lu ", handle);
        put_hex(a.p, a.len);
        break;
    }
    default:
        return 0;
    }
    return wire_reader_done(r);
}

static int decode(void)
{
    static char line[200000];
    static uint8_t frame[WIRE_MAX_FRAME];
    char name[100];

    while (fgets(line, sizeof(line), stdin) != NULL) {
        char *sp = strchr(line, ' ');
        size_t n;
        WIRE_HEADER h;
        WIRE_READER r;
        WIRE_BYTES msg;
        uint32_t rc;
        int st;

        if (sp == NULL || (size_t)(sp - line) >= sizeof(name))
            return 1;
        memcpy(name, line, (size_t)(sp - line));
        name[sp - line] = '\0';
        n = unhex(sp + 1, frame, sizeof(frame));
        if (n < WIRE_HEADER_SIZE || !wire_parse_header(frame, &h) || h.length + 4 != n) {
            printf("%s BADFRAME\n", name);
            continue;
        }
        wire_reader_init(&r, frame + WIRE_HEADER_SIZE, n - WIRE_HEADER_SIZE);
        st = wire_response_status(&r, &rc, &msg);
        printf("%s %u %d %u", name, h.request_id, st, rc);
        if (st > 0) {
            printf(" ");
            put_hex(msg.p, msg.len);
        } else if (st == 0 && !print_result(h.opcode, &r)) {
            printf(" MALFORMED");
        }
        printf("\n");
    }
    return 0;
}

#define CHECK(cond)                                          \
    do {                                                     \
        if (!(cond)) {                                       \
            printf("failed: %s (line %d)\n", #cond, __LINE__); \
            return 1;                                        \
        }                                                    \
    } while (0)

static int malformed(void)
{
    static uint8_t big[70000];
    uint8_t hdr[WIRE_HEADER_SIZE] = { 0 };
    WIRE_HEADER h;
    WIRE_READER r;
    WIRE_BYTES msg;
    uint32_t rc;
    static const uint8_t truncated[] = { 0x00, 0x00, 0x00, 0x05 };       /* bytes of 5, 0 here */
    static const uint8_t trailing_err[] = { 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0xff };
    static const uint8_t short_status[] = { 0x00 };

    /* length below the header and above MAX_FRAME break framing */
    hdr[3] = 11;
    CHECK(!wire_parse_header(hdr, &h));
    hdr[3] = 12;
    CHECK(wire_parse_header(hdr, &h));
    hdr[1] = 0xff;
    hdr[2] = 0xfd;
    hdr[3] = 0x00; /* 65536 - 3 */
    CHECK(!wire_parse_header(hdr, &h));
    /* a field over 65535 bytes and a frame over MAX_FRAME are refused at encoding */
    CHECK(wire_load(&w, 1, 0, 1, big, 65536, NULL, 0) == 0);
    CHECK(wire_load(&w, 1, 0, 1, big, 65535, big, 100) == 0);
    CHECK(wire_load(&w, 1, 0, 1, big, 65000, NULL, 0) != 0);
    /* bodies must be consumed exactly */
    wire_reader_init(&r, truncated, sizeof(truncated));
    CHECK(wire_get_u16(&r) == 0 && !r.err);
    (void)wire_get_bytes(&r);
    CHECK(r.err);
    wire_reader_init(&r, trailing_err, sizeof(trailing_err));
    CHECK(wire_response_status(&r, &rc, &msg) == -1);
    wire_reader_init(&r, short_status, sizeof(short_status));
    CHECK(wire_response_status(&r, &rc, &msg) == -1);
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "encode") == 0)
        return encode();
    if (argc == 2 && strcmp(argv[1], "decode") == 0)
        return decode();
    if (argc == 2 && strcmp(argv[1], "malformed") == 0)
        return malformed();
    fprintf(stderr, "usage: %s encode|decode|malformed\n", argv[0]);
    return 2;
}
