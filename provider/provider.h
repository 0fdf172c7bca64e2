/* Shared declarations of the tpmbroker provider. */
#ifndef TPMBROKER_PROVIDER_H
#define TPMBROKER_PROVIDER_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include "client.h"
#include "debug.h"
#include "version.h"
#include "wire.h"

#define TPMBROKER_NAME "tpmbroker"
#define TPMBROKER_PROPS "provider=tpmbroker"
/* Added to every property definition with `fips = yes` (all but the random source), and
 * always to decoders, encoders and store loaders, which do no cryptography (as OpenSSL's
 * base provider declares its own). */
#define TPMBROKER_FIPS_PROP ",fips=yes"
#define TPMBROKER_DEFAULT_TIMEOUT_MS 30000
/* The key exchange of TPM EC keys (exchange.c); ecdhe.c's TPMBROKER-ECDH is TLS's. */
#define TPMB_TPM_ECDH_NAME "TPMBROKER-TPM-ECDH"

/* provider.c keeps copies of these operations' tables with fips=yes declared. */
enum tpmb_operation_table {
    TPMB_TABLE_KEYMGMT, TPMB_TABLE_SIGNATURE, TPMB_TABLE_KEYEXCH, TPMB_TABLE_ASYM_CIPHER,
    TPMB_TABLE_DECODER, TPMB_TABLE_ENCODER, TPMB_TABLE_STORE, TPMB_OPERATION_TABLES
};

enum tpmb_crypto_mode { TPMB_CRYPTO_UNDECIDED, TPMB_CRYPTO_PRIVATE, TPMB_CRYPTO_FIPS };

/* Per-load provider context, handed to every operation. */
typedef struct tpmbroker_ctx {
    const OSSL_CORE_HANDLE *core;
    OSSL_LIB_CTX *libctx; /* private: hashing here never recurses into us */
    /* The application's providers and default properties (a child library context).
     * When those ask for fips=yes, hashing and every other software operation of ours
     * come from there, with tpmbroker itself excluded: tpmb_crypto_libctx(). */
    OSSL_LIB_CTX *app_libctx;
    int crypto_mode;      /* TPMB_CRYPTO_*: decided at first use */
    int fips;             /* `fips = yes`: the site declares our algorithms fips=yes */
    OSSL_ALGORITHM *tables[TPMB_OPERATION_TABLES]; /* with TPMBROKER_FIPS_PROP added */
    TPMB_CLIENT *client;
    int verify;           /* verify every signature the broker returns (default 1) */
    char *parent_auth;    /* password of persistent parents: env or config; NULL: none */
    OSSL_FUNC_core_new_error_fn *new_error;
    OSSL_FUNC_core_set_error_debug_fn *set_error_debug;
    OSSL_FUNC_core_vset_error_fn *vset_error;
} TPMBROKER_CTX;

/* Reason codes; the strings are in errors.c. */
extern const OSSL_ITEM tpmb_reason_strings[];
enum tpmb_reason {
    TPMB_R_BROKER_UNREACHABLE = 1,
    TPMB_R_BROKER_TIMEOUT,
    TPMB_R_BROKER_PROTOCOL,
    TPMB_R_BROKER_REFUSED,
    TPMB_R_AUTH_FAILED,
    TPMB_R_BAD_KEY,
    TPMB_R_UNSUPPORTED,
    TPMB_R_PRIVATE_EXPORT,
    TPMB_R_INVALID_ARGUMENT,
    TPMB_R_NO_PRIVATE_KEY,
    TPMB_R_MALLOC,
    TPMB_R_INTERNAL,
    TPMB_R_TPM_BUSY,
    TPMB_R_LOCKOUT,
    TPMB_R_PASSWORD_NEEDED,
    TPMB_R_PARENT_AUTH_FAILED,
    TPMB_R_POLICY_FAILED,
    TPMB_R_FIPS_NOT_DECLARED,
};

/*
 * Where the provider's own software cryptography (hashing, checking signatures with the
 * public key, encryption to it, ephemeral ECDH) is fetched from: the private libctx, or,
 * when the application's default properties ask for fips=yes, the application's
 * providers (its FIPS provider) without tpmbroker. Pass tpmb_crypto_propq() with it.
 */
OSSL_LIB_CTX *tpmb_crypto_libctx(TPMBROKER_CTX *ctx);
const char *tpmb_crypto_propq(TPMBROKER_CTX *ctx);
/* 0, with an error saying what to set, when the application asks for fips=yes and this
 * site has not declared tpmbroker's algorithms fips=yes; 1 otherwise. */
int tpmb_fips_permits_keys(TPMBROKER_CTX *ctx);

/*
 * A verification context made ready once per key and parameters: each signature the
 * broker returns is verified with a duplicate of it (making one afresh fetches the
 * signature algorithm and the digest again). signature.c fills them.
 */
#define TPMB_VERIFY_SLOTS 4
#define TPMB_VERIFY_NAME_MAX 50
typedef struct tpmb_verify_slot {
    EVP_PKEY_CTX *ctx;                 /* NULL: empty; verify-initialised otherwise */
    const EVP_PKEY *pub;               /* what it was made for: the key's public key, */
    OSSL_LIB_CTX *libctx;              /* in this library context, */
    char md[TPMB_VERIFY_NAME_MAX];     /* with this digest ("" none), */
    int pad, saltlen;                  /* RSA padding and PSS salt length (EC: 0), */
    char mgf1[TPMB_VERIFY_NAME_MAX];   /* PSS MGF1 digest ("" the digest's) */
} TPMB_VERIFY_SLOT;

/*
 * A key object: the TPM key blob (or persistent handle) and password, the broker's key id
 * and the public key as an EVP_PKEY of tpmb_crypto_libctx. blob == NULL means public only
 * (imported, e.g. from a certificate, to be matched against a TPM key).
 */
typedef struct tpmb_key {
    TPMBROKER_CTX *prov;
    int type;              /* WIRE_KEY_TYPE_EC, _RSA or _RSA_PSS */
    uint16_t pss_hash;     /* RSA-PSS keys: the wire hash the scheme is bound to, 0 unknown */
    uint8_t source;        /* WIRE_KEY_SOURCE_* */
    uint8_t *blob;
    size_t bloblen;
    uint8_t *auth;
    size_t authlen;
    int auth_missing;      /* a password is needed but none was given when decoding */
    uint8_t key_id[WIRE_KEY_ID_SIZE];
    EVP_PKEY *pub;
    int bits;
    uint16_t curve;
    /* From a TSS2 PRIVATE KEY file (0 for handle: keys), for -text. */
    uint32_t parent;
    uint32_t attributes;   /* TPMA_OBJECT */
    int empty_auth;        /* the file says the key has no password */
    char *parent_auth;     /* -pkeyopt parent-auth: at generation; NULL: the provider's */
    int refusal_told;      /* tpmb_tell_refusal wrote this key's refusal to stderr */
    pthread_mutex_t verify_lock; /* guards verify[]: threads share a key */
    TPMB_VERIFY_SLOT verify[TPMB_VERIFY_SLOTS];
    unsigned int verify_next;    /* the slot a new set of parameters replaces */
} TPMB_KEY;

void tpmb_raise(TPMBROKER_CTX *ctx, const char *file, int line, const char *func, int reason,
                const char *fmt, ...) __attribute__((format(printf, 6, 7)));
#define TPMB_RAISE(ctx, reason, ...) \
    tpmb_raise((ctx), __FILE__, __LINE__, __func__, (reason), __VA_ARGS__)
/* Turns a client failure into an error with a reason that says what to do. */
void tpmb_raise_client(TPMBROKER_CTX *ctx, const char *file, int line, const char *func,
                       const char *what, const CLIENT_ERR *err);
#define TPMB_RAISE_CLIENT(ctx, what, err) \
    tpmb_raise_client((ctx), __FILE__, __LINE__, __func__, (what), (err))
/*
 * An RSA decryption the broker refused for the key's sake (its usage, the key policy) is
 * also written to stderr, once per key: CMS clears OpenSSL's error queue after a failed
 * key decryption (its defence against padding oracles) and reports only "bad decrypt".
 * A refusal does not depend on the ciphertext, so saying it tells an attacker nothing; a
 * padding failure (BAD_DIGEST) is never written. (CMS keeps ECDH errors on the queue.)
 */
void tpmb_tell_refusal(TPMB_KEY *key, const char *what, const CLIENT_ERR *err);


/* tss2.c: the TSS2 PRIVATE KEY file format; pointers point into the DER given. */
typedef struct tss2_info {
    int type;        /* WIRE_KEY_TYPE_EC, _RSA, or _RSA_PSS for an RSA key with scheme RSAPSS */
    uint16_t scheme_hash; /* the hash of the key's scheme (TPM2_ALG), 0 for scheme NULL */
    int empty_auth;  /* 1: no password; 0: emptyAuth false or absent, a password is needed */
    uint32_t parent; /* 0x40000001: the storage primary from the TCG template */
    uint32_t attributes; /* TPMA_OBJECT */
    unsigned int bits;
    uint32_t exponent;
    const uint8_t *n;
    size_t nlen;
    uint16_t curve;  /* TPM2_ECC_CURVE */
    const uint8_t *x, *y;
    size_t xlen, ylen;
} TSS2_INFO;

int tss2_parse(const uint8_t *der, size_t len, TSS2_INFO *info);

/* keymgmt.c */
TPMB_KEY *tpmb_key_new(TPMBROKER_CTX *prov, int type);
void tpmb_key_free(TPMB_KEY *key);
/* A persistent handle (4 bytes): LOADed through the broker to learn the public key. */
TPMB_KEY *tpmb_key_load(TPMBROKER_CTX *prov, uint8_t source, const uint8_t *blob, size_t len,
                        const uint8_t *auth, size_t authlen);
/* A TSS2 PRIVATE KEY: the public key comes from the file, the broker is asked at first use. */
TPMB_KEY *tpmb_key_from_tss2(TPMBROKER_CTX *prov, const uint8_t *der, size_t len,
                             const TSS2_INFO *info, const uint8_t *auth, size_t authlen);
void tpmb_key_client_ref(const TPMB_KEY *key, CLIENT_KEY *ref);
/* Whether the TPM can use `key`'s private part now: it has one (not a public key alone)
 * and its password, if it needs one. Raises why not; `doing` ends the hint ("to sign"). */
int tpmb_key_ready(TPMBROKER_CTX *prov, const TPMB_KEY *key, const char *doing);
const char *tpmb_key_type_name(int type);
const char *tpmb_hash_name(uint16_t hash); /* OpenSSL's name of a wire hash, or NULL */
/* An RSA pad-mode parameter, by name ("pkcs1", "oaep", "pss", "none") or number, as
 * RSA_*_PADDING; an unknown name gives -1. 0 only when the parameter cannot be read. */
int tpmb_rsa_pad_mode(const OSSL_PARAM *p, int *pad);
/* algorithm_id.c: AlgorithmIdentifier DER of a signature by a key of `key_type` with
 * `hash` (wire id) and, for RSA, `pad`; 0 for a combination TPM keys do not sign with. */
int tpmb_signature_algorithm_id(int key_type, int pad, uint16_t hash, size_t mdsize,
                                unsigned char *out, size_t *outlen);


extern const OSSL_DISPATCH tpmb_ec_keymgmt_functions[];
extern const OSSL_DISPATCH tpmb_rsa_keymgmt_functions[];
extern const OSSL_DISPATCH tpmb_rsapss_keymgmt_functions[];
extern const OSSL_DISPATCH tpmb_rsapss_decoder_functions[];
extern const OSSL_DISPATCH tpmb_signature_functions[];
extern const OSSL_DISPATCH tpmb_pem_decoder_functions[];
extern const OSSL_DISPATCH tpmb_ec_decoder_functions[];
extern const OSSL_DISPATCH tpmb_rsa_decoder_functions[];
extern const OSSL_DISPATCH tpmb_ecparams_decoder_functions[];
extern const OSSL_DISPATCH tpmb_sha1_functions[];
extern const OSSL_DISPATCH tpmb_sha224_functions[];
extern const OSSL_DISPATCH tpmb_sha256_functions[];
extern const OSSL_DISPATCH tpmb_sha384_functions[];
extern const OSSL_DISPATCH tpmb_sha512_functions[];
extern const OSSL_DISPATCH tpmb_encoder_der_functions[];
extern const OSSL_DISPATCH tpmb_encoder_pem_functions[];
extern const OSSL_DISPATCH tpmb_encoder_text_functions[];
extern const OSSL_DISPATCH tpmb_encoder_spki_der_functions[];
extern const OSSL_DISPATCH tpmb_encoder_spki_pem_functions[];
extern const OSSL_DISPATCH tpmb_encoder_pkcs1_der_functions[];
extern const OSSL_DISPATCH tpmb_encoder_pkcs1_pem_functions[];
extern const OSSL_DISPATCH tpmb_store_functions[];
extern const OSSL_DISPATCH tpmb_ecdhe_keymgmt_functions[];
extern const OSSL_DISPATCH tpmb_ecdh_keyexch_functions[];
extern const OSSL_DISPATCH tpmb_tpm_ecdh_keyexch_functions[]; /* exchange.c */
extern const OSSL_DISPATCH tpmb_rand_functions[]; /* rand.c */
extern const OSSL_DISPATCH tpmb_asym_cipher_functions[]; /* asymcipher.c */

/* ecdhe.c: TLS groups, so that TLS works whatever the provider order */
int tpmb_get_capabilities(void *provctx, const char *capability, OSSL_CALLBACK *cb, void *arg);

#endif
