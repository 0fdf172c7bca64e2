/*
 * Encoders writing a TPM key as TSS2 PRIVATE KEY (PEM or DER), so `openssl genpkey` and
 * `req -newkey` save what the broker generated, and a text encoder for `pkey -text`. Public
 * keys need no encoder here: OpenSSL exports the public half to the default provider's
 * SubjectPublicKeyInfo encoders.
 */
#include <openssl/bio.h>
#include <openssl/core_names.h>
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

/* `openssl pkey -text`: what the key is, then its public half as libcrypto prints it. */
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
    if (key == NULL || key->pub == NULL)
        return 0;
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
                                                                  : "") > 0;
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
