/* Shared declarations of the tpmbroker provider. */
#ifndef TPMBROKER_PROVIDER_H
#define TPMBROKER_PROVIDER_H

#include <openssl/core.h>
#include <openssl/core_dispatch.h>

#define TPMBROKER_NAME "tpmbroker"
#define TPMBROKER_VERSION "0.1.0"

/* Per-load provider context, handed to every operation. */
typedef struct tpmbroker_ctx {
    const OSSL_CORE_HANDLE *core;
    OSSL_LIB_CTX *libctx; /* private: hashing here never recurses into us */
} TPMBROKER_CTX;

#endif
