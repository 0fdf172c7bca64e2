/* Errors: raised on OpenSSL's error queue through the core (and on stderr when debugging),
 * with the reason codes of provider.h and a hint for each broker refusal. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "provider.h"

const OSSL_ITEM tpmb_reason_strings[] = {
    { TPMB_R_BROKER_UNREACHABLE, "cannot reach the tpmbroker daemon" },
    { TPMB_R_BROKER_TIMEOUT, "tpmbroker did not answer in time" },
    { TPMB_R_BROKER_PROTOCOL, "tpmbroker protocol error" },
    { TPMB_R_BROKER_REFUSED, "tpmbroker refused the request" },
    { TPMB_R_AUTH_FAILED, "wrong TPM key password" },
    { TPMB_R_BAD_KEY, "the TPM cannot use this key" },
    { TPMB_R_UNSUPPORTED, "not supported by tpmbroker" },
    { TPMB_R_PRIVATE_EXPORT, "a TPM private key cannot be exported" },
    { TPMB_R_INVALID_ARGUMENT, "invalid argument" },
    { TPMB_R_NO_PRIVATE_KEY, "the key has no TPM private part" },
    { TPMB_R_MALLOC, "out of memory" },
    { TPMB_R_INTERNAL, "internal error" },
    { TPMB_R_TPM_BUSY, "the TPM is busy" },
    { TPMB_R_LOCKOUT, "the TPM is in dictionary-attack lockout" },
    { TPMB_R_PASSWORD_NEEDED, "the TPM key needs a password" },
    { TPMB_R_PARENT_AUTH_FAILED, "wrong or missing password for the key's parent" },
    { TPMB_R_POLICY_FAILED, "the TPM key's policy does not hold" },
    { TPMB_R_FIPS_NOT_DECLARED, "FIPS mode: tpmbroker's algorithms are not declared fips=yes" },
    { 0, NULL },
};

void tpmb_raise(TPMBROKER_CTX *ctx, const char *file, int line, const char *func, int reason,
                const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    if (tpmb_debug_on()) {
        va_list cp;

        va_copy(cp, ap);
        fputs("tpmbroker: error: ", stderr);
        vfprintf(stderr, fmt, cp);
        fputc('\n', stderr);
        va_end(cp);
    }
    if (ctx != NULL && ctx->new_error != NULL && ctx->vset_error != NULL) {
        ctx->new_error(ctx->core);
        if (ctx->set_error_debug != NULL)
            ctx->set_error_debug(ctx->core, file, line, func);
        ctx->vset_error(ctx->core, reason, fmt, ap);
    }
    va_end(ap);
}

void tpmb_raise_client(TPMBROKER_CTX *ctx, const char *file, int line, const char *func,
                       const char *what, const CLIENT_ERR *err)
{
    int reason;
    const char *hint = "";

    switch (err->status) {
    case CLIENT_E_CONNECT:
    case WIRE_STATUS_SHUTTING_DOWN: /* a stopping broker: the next request reconnects */
        reason = TPMB_R_BROKER_UNREACHABLE;
        break;
    case CLIENT_E_TIMEOUT:
    case WIRE_STATUS_DEADLINE:
        reason = TPMB_R_BROKER_TIMEOUT;
        break;
    case CLIENT_E_IO:
    case CLIENT_E_PROTOCOL:
    case WIRE_STATUS_MALFORMED:
    case WIRE_STATUS_UNSUPPORTED_VERSION:
    case WIRE_STATUS_UNKNOWN_OPCODE:
    case WIRE_STATUS_TOO_LARGE:
        reason = TPMB_R_BROKER_PROTOCOL;
        break;
    case CLIENT_E_NOMEM:
        reason = TPMB_R_MALLOC;
        break;
    case CLIENT_E_ARG:
        reason = TPMB_R_INVALID_ARGUMENT;
        break;
    case WIRE_STATUS_AUTH_FAILED:
        reason = TPMB_R_AUTH_FAILED;
        hint = "; give the key's password with -passin/-pass (wrong tries count toward the "
               "TPM's lockout)";
        break;
    case WIRE_STATUS_PARENT_AUTH_FAILED:
        reason = TPMB_R_PARENT_AUTH_FAILED;
        hint = "; give the parent's password: -pkeyopt parent-auth: (genpkey), "
               "TPMBROKER_PARENT_AUTH or parent-auth in the provider's config section";
        break;
    case WIRE_STATUS_POLICY_FAILED:
        reason = TPMB_R_POLICY_FAILED;
        hint = "; the key is bound to the platform's state (PCRs), which differs now";
        break;
    case WIRE_STATUS_BAD_KEY:
        reason = TPMB_R_BAD_KEY;
        /* an NV index is no key: its message (no NV index at ...) says all */
        if (strstr(what, "NV index") == NULL)
            hint = "; was the key made on this TPM, under this parent?";
        break;
    case WIRE_STATUS_UNSUPPORTED:
    case WIRE_STATUS_BAD_DIGEST:
        reason = TPMB_R_UNSUPPORTED;
        break;
    case WIRE_STATUS_NO_SESSIONS:
    case WIRE_STATUS_OVERLOADED:
    case WIRE_STATUS_TPM_UNAVAILABLE:
        reason = TPMB_R_TPM_BUSY;
        break;
    case WIRE_STATUS_BUSY: /* refused on arrival: the provider does not retry it */
        reason = TPMB_R_TPM_BUSY;
        hint = "; retry later, or raise `timeout` in the provider's config section";
        break;
    case WIRE_STATUS_LOCKOUT:
        reason = TPMB_R_LOCKOUT;
        hint = "; wait for the lockout to expire or reset it (tpm2_dictionarylockout)";
        break;
    case WIRE_STATUS_PERMISSION_DENIED:
        reason = TPMB_R_BROKER_REFUSED;
        hint = "; ask the broker's administrator to allow this user (--allow-uid/--allow-gid, "
               "or the key's entry in the key policy)";
        break;
    default:
        reason = TPMB_R_BROKER_REFUSED;
        break;
    }
    if (err->status > 0 && err->tpm_rc != 0)
        tpmb_raise(ctx, file, line, func, reason, "%s: %s: %s (TPM rc 0x%03x)%s", what,
                   wire_status_name(err->status), err->message, err->tpm_rc, hint);
    else if (err->status > 0)
        tpmb_raise(ctx, file, line, func, reason, "%s: %s: %s%s", what,
                   wire_status_name(err->status), err->message, hint);
    else
        tpmb_raise(ctx, file, line, func, reason, "%s: %s", what, err->message);
}

void tpmb_tell_refusal(TPMB_KEY *key, const char *what, const CLIENT_ERR *err)
{
    if (err->status != WIRE_STATUS_UNSUPPORTED && err->status != WIRE_STATUS_PERMISSION_DENIED)
        return;
    if (tpmb_debug_on() || key->refusal_told) /* debug output has every error already */
        return;
    key->refusal_told = 1;
    fprintf(stderr, "tpmbroker: %s: %s: %s\n", what, wire_status_name(err->status),
            err->message);
}
