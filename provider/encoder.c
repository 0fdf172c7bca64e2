/*
 * Encoders for TPM keys, so that `-provider tpmbroker` alone writes every form the apps ask
 * for (with it alone nothing of the default or base providers exists):
 * - the key file, TSS2 PRIVATE KEY (PEM or DER), for what `genpkey`, `genrsa` and
 *   `req -newkey` ask as PrivateKeyInfo;
 * - the public key as SubjectPublicKeyInfo (EC, RSA, RSA-PSS) and as PKCS#1 RSAPublicKey,
 *   PEM or DER (`pkey -pubout`, `rsa -pubout`, `rsa -RSAPublicKey_out`, `ec -pubout`);
 * - text (`pkey -text`).
 * Public keys are written from the key's public half, an EVP_PKEY of the private libctx,
 * by that libctx's own encoders: nothing is fetched from the caller's providers (`base`
 * has no digests, which RSA-PSS parameters name).
 */
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/encoder.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "provider.h"

static void *enc_newctx(void *provctx)
{
    return provctx;
}

static void enc_freectx(void *ctx)
{
    (void)ctx;
}

static int enc_does_selection(void *ctx, int selection)
{
    (void)ctx;
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0;
}

static int encode(void *vctx, OSSL_CORE_BIO *cout, const void *obj_raw, int selection, int pem)
{
    TPMBROKER_CTX *prov = vctx;
    const TPMB_KEY *key = obj_raw;
    BIO *bio;
    int ok;

    if (key == NULL || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0)
        return 0;
    if (key->blob == NULL || key->source != WIRE_KEY_SOURCE_TSS2_DER) {
        TPMB_RAISE(prov, TPMB_R_UNSUPPORTED,
                   "this TPM key has no key file to write (persistent handle or public only)");
        return 0;
    }
    bio = BIO_new_from_core_bio(prov->libctx, cout);
    if (bio == NULL)
        return 0;
    if (pem)
        ok = PEM_write_bio(bio, "TSS2 PRIVATE KEY", "", key->blob, (long)key->bloblen) > 0;
    else
        ok = BIO_write(bio, key->blob, (int)key->bloblen) == (int)key->bloblen;
    BIO_free(bio);
    return ok;
}

static int encode_pem(void *vctx, OSSL_CORE_BIO *cout, const void *obj_raw,
                      const OSSL_PARAM obj_abstract[], int selection,
                      OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    (void)obj_abstract;
    (void)cb;
    (void)cbarg;
    return encode(vctx, cout, obj_raw, selection, 1);
}

static int encode_der(void *vctx, OSSL_CORE_BIO *cout, const void *obj_raw,
                      const OSSL_PARAM obj_abstract[], int selection,
                      OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    (void)obj_abstract;
    (void)cb;
    (void)cbarg;
    return encode(vctx, cout, obj_raw, selection, 0);
}

/* Public keys: which structures the apps name, and what the private libctx calls them. */
static int enc_public_does_selection(void *ctx, int selection)
{
    (void)ctx;
    /* as OpenSSL's own: a selection with the private key is for the key file encoders */
    return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0
           && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0;
}

static int encode_public(TPMBROKER_CTX *prov, OSSL_CORE_BIO *cout, const TPMB_KEY *key,
                         int selection, const char *output, const char *structure)
{
    OSSL_ENCODER_CTX *ectx = NULL;
    BIO *bio = NULL;
    int ok = 0;

    if (key == NULL || (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0)
        return 0;
    if (key->pub == NULL) {
        TPMB_RAISE(prov, TPMB_R_BAD_KEY, "the TPM key has no public key to write");
        return 0;
    }
    ectx = OSSL_ENCODER_CTX_new_for_pkey(key->pub, EVP_PKEY_PUBLIC_KEY, output, structure,
                                         NULL);
    if (ectx == NULL || OSSL_ENCODER_CTX_get_num_encoders(ectx) == 0) {
        TPMB_RAISE(prov, TPMB_R_UNSUPPORTED, "cannot write a %s public key as %s %s",
                   tpmb_key_type_name(key->type), output, structure);
        goto end;
    }
    bio = BIO_new_from_core_bio(prov->libctx, cout);
    ok = bio != NULL && OSSL_ENCODER_to_bio(ectx, bio);
    if (!ok)
        TPMB_RAISE(prov, TPMB_R_INTERNAL, "writing the %s public key as %s %s failed",
                   tpmb_key_type_name(key->type), output, structure);
end:
    BIO_free(bio);
    OSSL_ENCODER_CTX_free(ectx);
    return ok;
}

#define PUBLIC_ENCODER(fn, output, structure)                                               \
    static int fn(void *vctx, OSSL_CORE_BIO *cout, const void *obj_raw,                     \
                  const OSSL_PARAM obj_abstract[], int selection,                           \
                  OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)                                \
    {                                                                                       \
        (void)obj_abstract;                                                                 \
        (void)cb;                                                                           \
        (void)cbarg;                                                                        \
        return encode_public(vctx, cout, obj_raw, selection, output, structure);            \
    }                                                                                       \
    const OSSL_DISPATCH tpmb_##fn##_functions[] = {                                         \
        { OSSL_FUNC_ENCODER_NEWCTX, (void (*)(void))enc_newctx },                           \
        { OSSL_FUNC_ENCODER_FREECTX, (void (*)(void))enc_freectx },                         \
        { OSSL_FUNC_ENCODER_DOES_SELECTION, (void (*)(void))enc_public_does_selection },    \
        { OSSL_FUNC_ENCODER_ENCODE, (void (*)(void))fn },                                   \
        { 0, NULL },                                                                        \
    };

PUBLIC_ENCODER(encoder_spki_der, "DER", "SubjectPublicKeyInfo")
PUBLIC_ENCODER(encoder_spki_pem, "PEM", "SubjectPublicKeyInfo")
/* PKCS#1 RSAPublicKey ("RSA PUBLIC KEY"): the apps say pkcs1, type-specific or rsa */
PUBLIC_ENCODER(encoder_pkcs1_der, "DER", "pkcs1")
PUBLIC_ENCODER(encoder_pkcs1_pem, "PEM", "pkcs1")

/* `openssl pkey -text`: what the key is, then its public half as libcrypto prints it. */
/* TPMA_OBJECT bits, in the spelling tpm2-tools uses. */
static const struct {
    uint32_t bit;
    const char *name;
} object_attributes[] = {
    { 0x00000002, "fixedtpm" }, { 0x00000004, "stclear" }, { 0x00000010, "fixedparent" },
    { 0x00000020, "sensitivedataorigin" }, { 0x00000040, "userwithauth" },
    { 0x00000080, "adminwithpolicy" }, { 0x00000400, "noda" },
    { 0x00000800, "encryptedduplication" }, { 0x00010000, "restricted" },
    { 0x00020000, "decrypt" }, { 0x00040000, "sign" },
};

/* What the key file says about the key inside the TPM: parent, attributes, password. */
static int print_tpm_details(BIO *bio, const TPMB_KEY *key)
{
    const char *sep = "";
    size_t i;

    if (BIO_printf(bio, "TPM parent: 0x%08x%s\n", (unsigned int)key->parent,
                   key->parent == WIRE_STORAGE_PRIMARY
                   ? " (the storage primary from the TCG template)" : "") <= 0
        || BIO_printf(bio, "TPM attributes: 0x%08x ", (unsigned int)key->attributes) <= 0)
        return 0;
    for (i = 0; i < sizeof(object_attributes) / sizeof(object_attributes[0]); i++) {
        if (key->attributes & object_attributes[i].bit) {
            if (BIO_printf(bio, "%s%s", sep, object_attributes[i].name) <= 0)
                return 0;
            sep = "|";
        }
    }
    return BIO_printf(bio, "\nTPM password: %s\n",
                      key->empty_auth ? "none (emptyAuth)"
                      : (key->attributes & 0x00000400)
                      ? "needed; failures are not counted (noda)"
                      : "needed; each wrong one counts toward the TPM's lockout") > 0;
}

static int encode_text(void *vctx, OSSL_CORE_BIO *cout, const void *obj_raw,
                       const OSSL_PARAM obj_abstract[], int selection,
                       OSSL_PASSPHRASE_CALLBACK *cb, void *cbarg)
{
    TPMBROKER_CTX *prov = vctx;
    const TPMB_KEY *key = obj_raw;
    BIO *bio;
    int ok = 1;

    (void)obj_abstract;
    (void)cb;
    (void)cbarg;
    if (key == NULL || key->pub == NULL) {
        TPMB_RAISE(prov, TPMB_R_BAD_KEY, "the TPM key has no public key to print");
        return 0;
    }
    bio = BIO_new_from_core_bio(prov->libctx, cout);
    if (bio == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && key->blob != NULL) {
        if (key->source == WIRE_KEY_SOURCE_PERSISTENT_HANDLE)
            ok = BIO_printf(bio, "TPM %s-%d key at persistent handle 0x%02x%02x%02x%02x; "
                            "the private part stays in the TPM\n",
                            tpmb_key_type_name(key->type), key->bits, key->blob[0],
                            key->blob[1], key->blob[2], key->blob[3]) > 0;
        else
            ok = BIO_printf(bio, "TPM %s-%d key (TSS2 PRIVATE KEY%s); the private part "
                            "stays in the TPM\n", tpmb_key_type_name(key->type), key->bits,
                            key->auth_missing || key->authlen > 0 ? ", with a password"
                                                                  : "") > 0
                 && print_tpm_details(bio, key);
    }
    ok = ok && EVP_PKEY_print_public(bio, key->pub, 0, NULL) > 0;
    BIO_free(bio);
    return ok;
}

static int enc_text_does_selection(void *ctx, int selection)
{
    (void)ctx;
    return (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0;
}

const OSSL_DISPATCH tpmb_encoder_text_functions[] = {
    { OSSL_FUNC_ENCODER_NEWCTX, (void (*)(void))enc_newctx },
    { OSSL_FUNC_ENCODER_FREECTX, (void (*)(void))enc_freectx },
    { OSSL_FUNC_ENCODER_DOES_SELECTION, (void (*)(void))enc_text_does_selection },
    { OSSL_FUNC_ENCODER_ENCODE, (void (*)(void))encode_text },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_encoder_pem_functions[] = {
    { OSSL_FUNC_ENCODER_NEWCTX, (void (*)(void))enc_newctx },
    { OSSL_FUNC_ENCODER_FREECTX, (void (*)(void))enc_freectx },
    { OSSL_FUNC_ENCODER_DOES_SELECTION, (void (*)(void))enc_does_selection },
    { OSSL_FUNC_ENCODER_ENCODE, (void (*)(void))encode_pem },
    { 0, NULL },
};

const OSSL_DISPATCH tpmb_encoder_der_functions[] = {
    { OSSL_FUNC_ENCODER_NEWCTX, (void (*)(void))enc_newctx },
    { OSSL_FUNC_ENCODER_FREECTX, (void (*)(void))enc_freectx },
    { OSSL_FUNC_ENCODER_DOES_SELECTION, (void (*)(void))enc_does_selection },
    { OSSL_FUNC_ENCODER_ENCODE, (void (*)(void))encode_der },
    { 0, NULL },
};
