"""The system libcrypto (OpenSSL 3) through cffi in ABI mode: sign with provider-held keys.

Each `Libcrypto` owns a private OSSL_LIB_CTX with the providers it was asked for, so a
benchmark process can drive the tpmbroker provider (or tpm2-openssl) without touching the
process-wide OpenSSL configuration. cffi releases the GIL for the duration of every C call,
so Python threads calling `Signer.sign` are a real multi-threaded libcrypto load.

Run as a module it is the load process used for providers that are not thread-safe:
`python -m benchmarks.libcrypto --providers tpm2,base --key KEY --seconds S` loads the
key, prints `ready`, waits for a line on stdin, signs in a loop for S seconds and prints a
JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CDEF = """
typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;
typedef struct ossl_provider_st OSSL_PROVIDER;
typedef struct bio_st BIO;
typedef struct evp_pkey_st EVP_PKEY;
typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct evp_md_st EVP_MD;

OSSL_LIB_CTX *OSSL_LIB_CTX_new(void);
void OSSL_LIB_CTX_free(OSSL_LIB_CTX *ctx);
int OSSL_LIB_CTX_load_config(OSSL_LIB_CTX *ctx, const char *config_file);
int OSSL_PROVIDER_set_default_search_path(OSSL_LIB_CTX *ctx, const char *path);
OSSL_PROVIDER *OSSL_PROVIDER_load(OSSL_LIB_CTX *ctx, const char *name);
int OSSL_PROVIDER_unload(OSSL_PROVIDER *prov);

BIO *BIO_new_mem_buf(const void *buf, int len);
int BIO_free(BIO *a);
EVP_PKEY *PEM_read_bio_PrivateKey_ex(BIO *bp, EVP_PKEY **x, void *cb, void *u,
                                     OSSL_LIB_CTX *libctx, const char *propq);
void EVP_PKEY_free(EVP_PKEY *pkey);
int EVP_PKEY_get_size(const EVP_PKEY *pkey);
int i2d_PUBKEY(const EVP_PKEY *a, unsigned char **pp);
void CRYPTO_free(void *ptr, const char *file, int line);

EVP_MD_CTX *EVP_MD_CTX_new(void);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int EVP_DigestSignInit_ex(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const char *mdname,
                          OSSL_LIB_CTX *libctx, const char *props, EVP_PKEY *pkey,
                          const void *params);
int EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sigret, size_t *siglen,
                   const unsigned char *tbs, size_t tbslen);

EVP_PKEY_CTX *EVP_PKEY_CTX_new_from_pkey(OSSL_LIB_CTX *libctx, EVP_PKEY *pkey,
                                         const char *propquery);
void EVP_PKEY_CTX_free(EVP_PKEY_CTX *ctx);
int EVP_PKEY_sign_init(EVP_PKEY_CTX *ctx);
int EVP_PKEY_sign(EVP_PKEY_CTX *ctx, unsigned char *sig, size_t *siglen,
                  const unsigned char *tbs, size_t tbslen);
EVP_MD *EVP_MD_fetch(OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties);
void EVP_MD_free(EVP_MD *md);
int EVP_PKEY_CTX_set_signature_md(EVP_PKEY_CTX *ctx, const EVP_MD *md);

int EVP_PKEY_decrypt_init(EVP_PKEY_CTX *ctx);
int EVP_PKEY_decrypt(EVP_PKEY_CTX *ctx, unsigned char *out, size_t *outlen,
                     const unsigned char *in, size_t inlen);
int EVP_PKEY_derive_init(EVP_PKEY_CTX *ctx);
int EVP_PKEY_derive_set_peer(EVP_PKEY_CTX *ctx, EVP_PKEY *peer);
int EVP_PKEY_derive(EVP_PKEY_CTX *ctx, unsigned char *key, size_t *keylen);
EVP_PKEY *PEM_read_bio_PUBKEY_ex(BIO *bp, EVP_PKEY **x, void *cb, void *u,
                                 OSSL_LIB_CTX *libctx, const char *propq);

typedef struct engine_st ENGINE;
int OPENSSL_init_crypto(uint64_t opts, const void *settings);
ENGINE *ENGINE_by_id(const char *id);
int ENGINE_init(ENGINE *e);
EVP_PKEY *ENGINE_load_private_key(ENGINE *e, const char *key_id, void *ui_method,
                                  void *callback_data);
const EVP_MD *EVP_sha256(void);
int EVP_DigestSignInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type,
                       ENGINE *e, EVP_PKEY *pkey);

unsigned long ERR_get_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
void ERR_clear_error(void);
"""

_lock = threading.Lock()
_ffi: Any = None
_lib: Any = None


def _load() -> tuple[Any, Any]:
    global _ffi, _lib
    with _lock:
        if _lib is None:
            from cffi import FFI

            ffi = FFI()
            ffi.cdef(_CDEF)
            _lib = ffi.dlopen("libcrypto.so.3")
            _ffi = ffi
    return _ffi, _lib


class LibcryptoError(Exception):
    """An OpenSSL call failed; the message carries OpenSSL's error queue."""


def _errors(lib: Any, ffi: Any) -> str:
    out: list[str] = []
    buf = ffi.new("char[]", 256)
    while True:
        code = lib.ERR_get_error()
        if not code:
            break
        lib.ERR_error_string_n(code, buf, 256)
        out.append(ffi.string(buf).decode(errors="replace"))
    return "; ".join(out) or "no OpenSSL error recorded"


class Libcrypto:
    """A private OSSL_LIB_CTX: providers loaded by name, or from a configuration file."""

    def __init__(self, providers: Sequence[str] = (), search_path: str | None = None,
                 config: str | os.PathLike[str] | None = None) -> None:
        self.ffi, self.lib = _load()
        self.ctx = self.lib.OSSL_LIB_CTX_new()
        if self.ctx == self.ffi.NULL:
            raise LibcryptoError("OSSL_LIB_CTX_new failed")
        self._providers: list[Any] = []
        try:
            if config is not None and not self.lib.OSSL_LIB_CTX_load_config(
                    self.ctx, os.fsencode(config)):
                raise LibcryptoError(f"loading {config}: {self.error()}")
            if search_path is not None and not self.lib.OSSL_PROVIDER_set_default_search_path(
                    self.ctx, search_path.encode()):
                raise LibcryptoError(f"search path {search_path}: {self.error()}")
            for name in providers:
                prov = self.lib.OSSL_PROVIDER_load(self.ctx, name.encode())
                if prov == self.ffi.NULL:
                    raise LibcryptoError(f"provider {name}: {self.error()}")
                self._providers.append(prov)
        except BaseException:
            self.close()
            raise

    def error(self) -> str:
        return _errors(self.lib, self.ffi)

    def load_pem_key(self, pem: bytes) -> Any:
        """An EVP_PKEY (cdata) from PEM, decoded by whichever provider claims it."""
        buf = self.ffi.from_buffer(pem)
        bio = self.lib.BIO_new_mem_buf(buf, len(pem))
        try:
            pkey = self.lib.PEM_read_bio_PrivateKey_ex(bio, self.ffi.NULL, self.ffi.NULL,
                                                       self.ffi.NULL, self.ctx, self.ffi.NULL)
        finally:
            self.lib.BIO_free(bio)
        if pkey == self.ffi.NULL:
            raise LibcryptoError(f"cannot load the key: {self.error()}")
        return self.ffi.gc(pkey, self.lib.EVP_PKEY_free)

    def public_der(self, pkey: Any) -> bytes:
        out = self.ffi.new("unsigned char **")
        n = self.lib.i2d_PUBKEY(pkey, out)
        if n <= 0:
            raise LibcryptoError(f"i2d_PUBKEY: {self.error()}")
        try:
            return bytes(self.ffi.buffer(out[0], n))
        finally:
            self.lib.CRYPTO_free(out[0], b"", 0)

    def close(self) -> None:
        for prov in reversed(self._providers):
            self.lib.OSSL_PROVIDER_unload(prov)
        self._providers.clear()
        if self.ctx is not None and self.ctx != self.ffi.NULL:
            self.lib.OSSL_LIB_CTX_free(self.ctx)
        self.ctx = None


class Signer:
    """Signs with one key; use one Signer per thread (the key itself may be shared).

    mode "digest-sign": EVP_DigestSignInit_ex + EVP_DigestSign over the message, as TLS
    and `openssl dgst`/`req` do (the provider hashes). mode "pkey-sign": EVP_PKEY_sign over
    a SHA-256 digest computed here, as `openssl pkeyutl` does.
    """

    def __init__(self, crypto: Libcrypto, pkey: Any, mode: str = "digest-sign",
                 props: str | None = None) -> None:
        if mode not in ("digest-sign", "pkey-sign"):
            raise ValueError(f"unknown mode {mode}")
        self.c = crypto
        self.pkey = pkey
        self.mode = mode
        self.props = props.encode() if props else crypto.ffi.NULL
        ffi = crypto.ffi
        self.sig = ffi.new("unsigned char[]", max(crypto.lib.EVP_PKEY_get_size(pkey), 1024))
        self.siglen = ffi.new("size_t *")
        self.md_ctx = ffi.gc(crypto.lib.EVP_MD_CTX_new(), crypto.lib.EVP_MD_CTX_free)
        self.pctx: Any = None
        if mode == "pkey-sign":
            lib = crypto.lib
            pctx = lib.EVP_PKEY_CTX_new_from_pkey(crypto.ctx, pkey, self.props)
            if pctx == ffi.NULL:
                raise LibcryptoError(f"EVP_PKEY_CTX_new_from_pkey: {crypto.error()}")
            self.pctx = ffi.gc(pctx, lib.EVP_PKEY_CTX_free)
            md = lib.EVP_MD_fetch(crypto.ctx, b"SHA256", ffi.NULL)
            try:
                if lib.EVP_PKEY_sign_init(self.pctx) <= 0 or (
                        md != ffi.NULL and lib.EVP_PKEY_CTX_set_signature_md(self.pctx, md) <= 0):
                    raise LibcryptoError(f"EVP_PKEY_sign_init: {crypto.error()}")
            finally:
                if md != ffi.NULL:
                    lib.EVP_MD_free(md)

    def sign(self, message: bytes) -> bytes:
        lib, ffi = self.c.lib, self.c.ffi
        self.siglen[0] = len(self.sig)
        if self.mode == "pkey-sign":
            digest = hashlib.sha256(message).digest()
            ok = lib.EVP_PKEY_sign(self.pctx, self.sig, self.siglen, digest, len(digest))
        else:
            ok = lib.EVP_DigestSignInit_ex(self.md_ctx, ffi.NULL, b"SHA256", self.c.ctx,
                                           self.props, self.pkey, ffi.NULL)
            if ok > 0:
                ok = lib.EVP_DigestSign(self.md_ctx, self.sig, self.siglen, message,
                                        len(message))
        if ok <= 0:
            raise LibcryptoError(self.c.error())
        return bytes(ffi.buffer(self.sig, self.siglen[0]))


class EngineSigner:
    """Signs through an ENGINE's key (the process-wide library context, as engines need):
    the engine comes from the OpenSSL configuration ($OPENSSL_CONF), the key by its id
    (a PKCS#11 URI for libp11's engine), as nginx's `engine:` keys do."""

    def __init__(self, engine_id: str, key_id: str) -> None:
        self.ffi, self.lib = ffi, lib = _load()
        lib.OPENSSL_init_crypto(0x40, ffi.NULL)  # OPENSSL_INIT_LOAD_CONFIG
        engine = lib.ENGINE_by_id(engine_id.encode())
        if engine == ffi.NULL or not lib.ENGINE_init(engine):
            raise LibcryptoError(f"engine {engine_id}: {_errors(lib, ffi)}")
        pkey = lib.ENGINE_load_private_key(engine, key_id.encode(), ffi.NULL, ffi.NULL)
        if pkey == ffi.NULL:
            raise LibcryptoError(f"cannot load the key: {_errors(lib, ffi)}")
        self.pkey = ffi.gc(pkey, lib.EVP_PKEY_free)
        self.md_ctx = ffi.gc(lib.EVP_MD_CTX_new(), lib.EVP_MD_CTX_free)
        self.sig = ffi.new("unsigned char[]", max(lib.EVP_PKEY_get_size(pkey), 1024))
        self.siglen = ffi.new("size_t *")

    def public_der(self) -> bytes:
        out = self.ffi.new("unsigned char **")
        n = self.lib.i2d_PUBKEY(self.pkey, out)
        if n <= 0:
            raise LibcryptoError(f"i2d_PUBKEY: {_errors(self.lib, self.ffi)}")
        try:
            return bytes(self.ffi.buffer(out[0], n))
        finally:
            self.lib.CRYPTO_free(out[0], b"", 0)

    def sign(self, message: bytes) -> bytes:
        lib, ffi = self.lib, self.ffi
        self.siglen[0] = len(self.sig)
        if lib.EVP_DigestSignInit(self.md_ctx, ffi.NULL, lib.EVP_sha256(), ffi.NULL,
                                  self.pkey) <= 0 or lib.EVP_DigestSign(
                self.md_ctx, self.sig, self.siglen, message, len(message)) <= 0:
            raise LibcryptoError(_errors(lib, ffi))
        return bytes(ffi.buffer(self.sig, self.siglen[0]))


class Operator:
    """RSA decryption (PKCS#1 v1.5, EVP_PKEY_decrypt) or ECDH (EVP_PKEY_derive) with one
    key, of one fixed input: `data` is the ciphertext, or the peer's public key in PEM.
    One Operator per thread; each call sets its EVP_PKEY_CTX up afresh, as TLS does."""

    def __init__(self, crypto: Libcrypto, pkey: Any, mode: str, data: bytes) -> None:
        if mode not in ("decrypt", "derive"):
            raise ValueError(f"unknown mode {mode}")
        self.c, self.pkey, self.mode, self.data = crypto, pkey, mode, data
        ffi, lib = crypto.ffi, crypto.lib
        self.out = ffi.new("unsigned char[]", 1024)
        self.outlen = ffi.new("size_t *")
        self.peer: Any = None
        if mode == "derive":
            buf = ffi.from_buffer(data)
            bio = lib.BIO_new_mem_buf(buf, len(data))
            try:
                peer = lib.PEM_read_bio_PUBKEY_ex(bio, ffi.NULL, ffi.NULL, ffi.NULL,
                                                  crypto.ctx, ffi.NULL)
            finally:
                lib.BIO_free(bio)
            if peer == ffi.NULL:
                raise LibcryptoError(f"cannot load the peer key: {crypto.error()}")
            self.peer = ffi.gc(peer, lib.EVP_PKEY_free)

    def run(self) -> bytes:
        lib, ffi = self.c.lib, self.c.ffi
        pctx = lib.EVP_PKEY_CTX_new_from_pkey(self.c.ctx, self.pkey, ffi.NULL)
        if pctx == ffi.NULL:
            raise LibcryptoError(self.c.error())
        try:
            self.outlen[0] = 1024
            if self.mode == "decrypt":
                ok = lib.EVP_PKEY_decrypt_init(pctx) > 0 and lib.EVP_PKEY_decrypt(
                    pctx, self.out, self.outlen, self.data, len(self.data)) > 0
            else:
                ok = (lib.EVP_PKEY_derive_init(pctx) > 0
                      and lib.EVP_PKEY_derive_set_peer(pctx, self.peer) > 0
                      and lib.EVP_PKEY_derive(pctx, self.out, self.outlen) > 0)
            if not ok:
                raise LibcryptoError(self.c.error())
            return bytes(ffi.buffer(self.out, self.outlen[0]))
        finally:
            lib.EVP_PKEY_CTX_free(pctx)


def verify(public_der: bytes, signature: bytes, message: bytes) -> bool:
    """ECDSA or RSA PKCS#1 v1.5 with SHA-256 over `message`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    public = serialization.load_der_public_key(public_der)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --- load process ---------------------------------------------------------------------------

def _worker(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.libcrypto")
    ap.add_argument("--providers", default="", help="comma-separated, in load order")
    ap.add_argument("--engine", help="sign with this engine's key (--key is its id)")
    ap.add_argument("--openssl-conf", help="the OpenSSL configuration that names the engine")
    ap.add_argument("--key", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--mode", default="pkey-sign",
                    choices=["digest-sign", "pkey-sign", "decrypt", "derive"])
    ap.add_argument("--input", help="decrypt: the ciphertext; derive: the peer's PEM")
    ap.add_argument("--expect", help="decrypt, derive: the file the result must equal")
    ap.add_argument("--props")
    ap.add_argument("--verify-every", type=int, default=50)
    args = ap.parse_args(argv)

    result: dict[str, Any] = {"signatures": 0, "failures": 0, "bad_signatures": 0,
                              "errors": {}, "latencies_ms": []}
    operator: Operator | None = None
    signer: Signer | EngineSigner
    if args.openssl_conf:
        os.environ["OPENSSL_CONF"] = args.openssl_conf  # before libcrypto reads it
    try:
        if args.engine:
            signer = EngineSigner(args.engine, args.key)
            public = signer.public_der()
        else:
            crypto = Libcrypto([x for x in args.providers.split(",") if x])
            pkey = crypto.load_pem_key(Path(args.key).read_bytes())
            public = crypto.public_der(pkey)
        if args.engine:
            pass
        elif args.mode in ("decrypt", "derive"):
            operator = Operator(crypto, pkey, args.mode, Path(args.input).read_bytes())
            expected = Path(args.expect).read_bytes()
        else:
            signer = Signer(crypto, pkey, args.mode, args.props)
    except Exception as exc:
        print(f"setup failed: {exc}", flush=True)
        return 1
    # Uncounted, as every harness's first operation: set-up, not the steady state.
    with contextlib.suppress(LibcryptoError):
        operator.run() if operator is not None else signer.sign(b"warm-up")
    print("ready", flush=True)
    if not sys.stdin.readline():
        return 1
    errors: dict[str, int] = result["errors"]
    latencies: list[float] = result["latencies_ms"]
    done = failed = bad = 0
    end = time.monotonic() + args.seconds
    pid = os.getpid()
    while time.monotonic() < end:
        message = f"{pid}:{done}:{failed}".encode()
        t0 = time.perf_counter()
        try:
            if operator is not None:
                output = operator.run()
                latencies.append((time.perf_counter() - t0) * 1000)
                if done % args.verify_every == 0 and output != expected:
                    bad += 1
                done += 1
                continue
            signature = signer.sign(message)
        except LibcryptoError as exc:
            failed += 1
            text = str(exc)[:160]
            errors[text] = errors.get(text, 0) + 1
            continue
        latencies.append((time.perf_counter() - t0) * 1000)
        if done % args.verify_every == 0 and not verify(public, signature, message):
            bad += 1
        done += 1
    result.update(signatures=done, failures=failed, bad_signatures=bad)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
