/*
 * The AlgorithmIdentifier of a TPM signature, for X.509 (OSSL_SIGNATURE_PARAM_ALGORITHM_ID):
 * ecdsa-with-SHAx, shaxWithRSAEncryption, or RSASSA-PSS with hash = MGF1 hash = the digest
 * and salt length = digest length (what the TPM does). Fixed DER with the arcs filled in.
 */
#include <string.h>

#include <openssl/rsa.h>

#include "provider.h"

int tpmb_signature_algorithm_id(int key_type, int pad, uint16_t hash, size_t mdsize,
                                unsigned char *out, size_t *outlen)
{
    static const unsigned char ecdsa[] = {
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x00
    };
    static const unsigned char ecdsa_sha1[] = {
        0x30, 0x09, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01
    };
    static const unsigned char rsa[] = {
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x00, 0x05, 0x00
    };
    static const unsigned char pss[] = {
        0x30, 0x41, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a,
        0x30, 0x34,
        0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
        0x00 /* [29] hash */, 0x05, 0x00,
        0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01,
        0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
        0x00 /* [59] hash */, 0x05, 0x00,
        0xa2, 0x03, 0x02, 0x01, 0x00 /* [66] salt */
    };
    unsigned char nist; /* last arc of the NIST hash OID */

    switch (hash) {
    case WIRE_HASH_SHA256:
        nist = 1;
        break;
    case WIRE_HASH_SHA384:
        nist = 2;
        break;
    case WIRE_HASH_SHA512:
        nist = 3;
        break;
    case WIRE_HASH_SHA1:
        nist = 0;
        break;
    default:
        return 0;
    }
    if (key_type == WIRE_KEY_TYPE_EC) {
        if (nist == 0) {
            memcpy(out, ecdsa_sha1, sizeof(ecdsa_sha1));
            *outlen = sizeof(ecdsa_sha1);
        } else {
            memcpy(out, ecdsa, sizeof(ecdsa));
            out[11] = (unsigned char)(nist + 1);
            *outlen = sizeof(ecdsa);
        }
        return 1;
    }
    if (pad == RSA_PKCS1_PADDING) {
        memcpy(out, rsa, sizeof(rsa));
        out[12] = nist == 0 ? 0x05 : (unsigned char)(0x0a + nist);
        *outlen = sizeof(rsa);
        return 1;
    }
    if (nist == 0)
        return 0; /* PSS with SHA-1 has no use with these keys */
    memcpy(out, pss, sizeof(pss));
    out[29] = nist;
    out[59] = nist;
    out[66] = (unsigned char)mdsize;
    *outlen = sizeof(pss);
    return 1;
}
