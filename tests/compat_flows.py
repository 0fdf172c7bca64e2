"""What tpm2-openssl's documentation tells its users to type, re-pointed at tpmbroker: the
table the compatibility suite (tests/test_compat.py) replays.

Each flow comes from one page of tpm2-openssl's docs/ (named in `doc`) and is a list of shell
command lines as a user types them, run in order in a directory of their own that holds a
small file `testdata`. `-provider tpm2` becomes `{providers}`, which each variant fills in:

- alone:   `-provider tpmbroker`
- base:    `-provider tpmbroker -provider base`
- default: `-provider tpmbroker -provider default -propquery '?provider=tpmbroker'`
           (the docs add the property query wherever they load the default provider, so that
           key generation is the TPM's and not the software's)

The provider is found through OPENSSL_MODULES, so the commands stay as users type them.
Commands without `{providers}` are the checks and the software side (the default provider,
or CHECK below where a check reads a TPM key file): a signature verified with the public key
that tpm2-tools reads from the TPM, a
plaintext or a shared secret compared with what the software peer holds, a certificate
verified, a TLS page fetched. `{port}` is a free loopback port, `{dir}` the flow's directory.
Persistent handles and NV indices a flow makes are removed after it, so the next flow puts
its key at the same handle again: users rotate keys that way, and that is where stale keys
show.

A variant a flow cannot have (tpm2-openssl fails it too, for want of a provider its docs
load there) says why in `not_for`; a variant that fails today carries the
issue item and the error seen in `known`, and runs as a strict expected failure until fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

VARIANTS: dict[str, str] = {
    "alone": "-provider tpmbroker",
    "base": "-provider tpmbroker -provider base",
    "default": "-provider tpmbroker -provider default -propquery '?provider=tpmbroker'",
}

# The checks load the key files with the base provider's file loader and encoders, as
# tpm2-openssl's docs do; the rest of a check is the default provider's software.
CHECK = "-provider tpmbroker -provider base"


@dataclasses.dataclass(frozen=True)
class Expect:
    """A command whose output (stdout and stderr together) must match `output` (a regex)."""

    command: str
    output: str


@dataclasses.dataclass(frozen=True)
class Serve:
    """A server started in the background for the rest of the flow; it must accept TCP
    connections on {port} before the flow goes on."""

    command: str


@dataclasses.dataclass(frozen=True)
class RandomFromTpm:
    """The broker's count of random bytes grew by at least `count` during the flow: the
    bytes came from the TPM, not from a software generator of another provider."""

    count: int


Step = str | Expect | Serve | RandomFromTpm


@dataclasses.dataclass(frozen=True)
class Flow:
    name: str
    doc: str  # the tpm2-openssl docs page and section the commands come from
    steps: tuple[Step, ...]
    not_for: Mapping[str, str] = dataclasses.field(default_factory=dict)  # variant -> why
    known: Mapping[str, str] = dataclasses.field(default_factory=dict)  # variant -> failure
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(v for v in VARIANTS if v not in self.not_for)


# --- pieces several flows share ----------------------------------------------------------------

# keys.md, "Key Generation": an attestation key made by tpm2-tools, persisted at 0x81000000.
RSA_AK = (
    "tpm2_createek -G rsa -c ek_rsa.ctx",
    "tpm2_createak -C ek_rsa.ctx -G rsa -g sha256 -s rsassa -c ak_rsa.ctx",
    "tpm2_evictcontrol -c ak_rsa.ctx 0x81000000",
)
# certificates.md, "Certificate Signing": the same with an ECDSA key.
EC_AK = (
    "tpm2_createek -G ecc -c ek_ecc.ctx",
    "tpm2_createak -C ek_ecc.ctx -G ecc -g sha256 -s ecdsa -c ak_ecc.ctx",
    "tpm2_evictcontrol -c ak_ecc.ctx 0x81000000",
)
# keys.md, "You may also generate the key using standard TPM2 tools and then make the key
# persistent": an ordinary (unrestricted, sign and decrypt) key under the owner's primary.
TOOLS_KEY = (
    "tpm2_createprimary -C o -c primary.ctx",
    "tpm2_create -C primary.ctx -G {alg} -u key.pub -r key.priv",
    "tpm2_load -C primary.ctx -u key.pub -r key.priv -c key.ctx",
    "tpm2_evictcontrol -c key.ctx 0x81000000",
)
# The public key as tpm2-tools reads it from the TPM: what the checks trust.
TOOLS_PUBLIC = "tpm2_readpublic -c 0x81000000 -f pem -o tools.pub"


def tools_key(alg: str) -> tuple[str, ...]:
    return tuple(step.replace("{alg}", alg) for step in TOOLS_KEY)


def same_public_key(mine: str, theirs: str = "tools.pub") -> str:
    """Two PEM public keys are the same key (compared as DER by the default provider)."""
    return (f"cmp <(openssl pkey -pubin -in {mine} -outform der) "
            f"<(openssl pkey -pubin -in {theirs} -outform der)")


VERIFIED = "Signature Verified Successfully"

# certificates.md, "Certificate Signing": a new TPM key and a self-signed certificate.
REQ_X509 = ("openssl req {providers} -x509 -subj \"/C=GB/CN=foo\" -keyout testkey.pem "
            "-out testcert.pem")
REQ_X509_CHECKS: tuple[Step, ...] = (
    Expect("head -1 testkey.pem", "BEGIN TSS2 PRIVATE KEY"),
    Expect("openssl verify -CAfile testcert.pem testcert.pem", "testcert.pem: OK"),
    f"openssl pkey {CHECK} -in testkey.pem -pubout -out testkey.pub",
    "openssl x509 -in testcert.pem -pubkey -noout > testcert.pub",
    same_public_key("testkey.pub", "testcert.pub"),
)

FILES_NEED_BASE = ("a key file is read by the file loader of the base (or default) provider; "
                   "tpm2-openssl has none either, and its docs add -provider base")
TLS_NEEDS_DEFAULT = ("TLS needs the default provider's ciphers, digests and key exchange, "
                     "as the docs say")
KEYOUT_NEEDS_CIPHER = ("req -x509 -keyout (the docs give no -noenc) encrypts the key file "
                       "with DES-EDE3-CBC, a cipher only the default provider has "
                       "(`Algorithm (DES-EDE3-CBC : 27)` unsupported, with tpm2-openssl too); "
                       "the docs load -provider default")
CMS_FILES = ("cms reads the certificate through the file loader of base or default "
             "(tpm2-openssl alone fails the same); the docs load -provider default")

# --- what fails today, by issue 18's items (the error each prints) ----------------------------

ITEM1_PUBOUT = ("issue 18 item 1: with -provider tpmbroker alone, `openssl pkey -in handle:…` "
                "(or object:) `-pubout` exits 1 and prints nothing (item 8 too)")
ITEM1_REQ = ("issue 18 item 1: the provider alone cannot encode the public key: `req -new` "
             "fails with `X509_PUBKEY_set:unsupported algorithm`")
ITEM2 = ("issue 18 item 2: `pkey -provider tpmbroker -provider base -in testkey.priv -pubout` "
         "of an RSA-PSS key fails with `inner_evp_generic_fetch:unsupported ... "
         "Algorithm (SHA2-256 : 0)`")
ITEM4_STALE = ("issue 18 item 4: the broker answers for the key an earlier flow had at "
               "0x81000000: the public key (modulus) it gives is that key's, not the one "
               "tpm2_readpublic reads there now")
ITEM4_AUTH = ("issue 18 item 4: signing with the key now at 0x81000000 fails with AUTH_FAILED "
              "(the broker uses the earlier key's Name; the TPM counts a lockout failure), and "
              "from then on `this password was refused for this key already`")
ITEM5_DECRYPT = ("issue 18 item 5: keys made by genpkey are sign-only: `pkeyutl -decrypt` "
                 "fails with `UNSUPPORTED: the key cannot decrypt: its decrypt attribute is "
                 "clear (a signing-only key)`")
ITEM5_DERIVE = ("issue 18 item 5: keys made by genpkey are sign-only: `pkeyutl -derive` fails "
                "with `UNSUPPORTED: the key cannot do ECDH: it is a sign-only key (decrypt "
                "attribute clear)`")
ITEM5_CMS = ("issue 18 item 5: the key req -x509 made is sign-only and CMS hides the "
             "refusal: `cms -decrypt` exits 4 with `ossl_cipher_unpadblock:bad decrypt`")
ITEM7 = ("issue 18 item 7: a PEM certificate in NV does not load: `x509 -in handle:0x1000011` "
         "prints `Could not read certificate from handle:0x1000011` and "
         "`ossl_store_handle_load_result:unsupported`")
PARAMFILE_DEFAULT = ("with the default provider loaded, `genpkey -paramfile` makes a software "
                     "key (`BEGIN PRIVATE KEY`): OpenSSL 3.0 tries the decoders of the provider "
                     "loaded last first, whatever -propquery, and genpkey keeps the keymgmt of "
                     "the parameters it decoded; tpmbroker's EC PARAMETERS decoder is offered "
                     "only where neither default nor fips is loaded (alone, with base), so "
                     "that loading tpmbroker never turns other software keys into TPM keys "
                     "(tpm2-openssl 1.3 has no such decoder; its docs use -provider base)")

# --- the flows, in the order of the docs' pages ----------------------------------------------

FLOWS: tuple[Flow, ...] = (
    # initialization.md
    Flow("list-providers", "initialization.md: Loading the Provider", (
        Expect("openssl list -providers {providers}", r"(?s)tpmbroker.*status: active"),
    )),
    Flow("list-public-key-algorithms", "initialization.md: Loading the Provider", (
        Expect("openssl list -public-key-algorithms {providers}", r"@ tpmbroker"),
    )),
    # keys.md
    Flow("genpkey-rsa-1024", "keys.md: Key Generation", (
        "openssl genpkey {providers} -algorithm RSA -pkeyopt bits:1024 -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        Expect(f"openssl pkey {CHECK} -in testkey.priv -pubout | "
               "openssl pkey -pubin -text -noout", r"Public-Key: \(1024 bit\)"),
    )),
    Flow("genpkey-ec-password", "keys.md: Key Generation", (
        "openssl genpkey {providers} -algorithm EC -pkeyopt group:P-256 "
        "-pkeyopt user-auth:abc -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        # The key works with its password (asymmetric.md's signing, with -passin).
        f"openssl pkey {CHECK} -in testkey.priv -passin pass:abc -pubout -out testkey.pub",
        f"openssl pkeyutl {CHECK} -sign -inkey testkey.priv -passin pass:abc -rawin "
        "-digest sha256 -in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    )),
    Flow("genpkey-rsa-exponent-digest", "keys.md: Key Generation (bits, e, digest)", (
        # e:65537: swtpm refuses other exponents (TPM_RC_VALUE), with tpm2-openssl too.
        "openssl genpkey {providers} -algorithm RSA -pkeyopt bits:2048 -pkeyopt e:65537 "
        "-pkeyopt digest:sha256 -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        f"openssl pkey {CHECK} -in testkey.priv -pubout -out testkey.pub",
        Expect("openssl pkey -pubin -in testkey.pub -text -noout",
               r"(?s)Public-Key: \(2048 bit\).*Exponent: 65537 "),
        # Signed without -digest: the key's own hash is the one used.
        f"openssl pkeyutl {CHECK} -sign -inkey testkey.priv -rawin -in testdata "
        "-out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    )),
    Flow("genpkey-ec-p384-digest", "keys.md: Key Generation (group, digest)", (
        "openssl genpkey {providers} -algorithm EC -pkeyopt group:secp384r1 "
        "-pkeyopt digest:sha384 -out testkey.priv",
        f"openssl pkey {CHECK} -in testkey.priv -pubout -out testkey.pub",
        Expect("openssl pkey -pubin -in testkey.pub -text -noout", "ASN1 OID: secp384r1"),
        f"openssl pkeyutl {CHECK} -sign -inkey testkey.priv -rawin -digest sha384 "
        "-in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha384 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    )),
    Flow("genpkey-ec-paramfile", "keys.md: Key Generation", (
        "openssl ecparam -name prime256v1 -out testparam.pem",
        "openssl genpkey {providers} -paramfile testparam.pem -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        Expect(f"openssl pkey {CHECK} -in testkey.priv -pubout | "
               "openssl pkey -pubin -text -noout", "ASN1 OID: prime256v1"),
    ), known={"default": PARAMFILE_DEFAULT}),
    Flow("genpkey-rsa-pss", "keys.md: Key Generation (RSA-PSS)", (
        "openssl genpkey {providers} -algorithm RSA-PSS -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        "openssl pkey {providers} -in testkey.priv -pubout -out testkey.pub",
        "openssl pkeyutl {providers} -sign -inkey testkey.priv -rawin -digest sha256 "
        "-in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("genpkey-parent", "keys.md: Key Generation (parent, parent-auth)", (
        "tpm2_createprimary -C o -p parentpass -c parent.ctx",
        "tpm2_evictcontrol -C o -c parent.ctx 0x81000001",
        "openssl genpkey {providers} -algorithm RSA -pkeyopt parent:0x81000001 "
        "-pkeyopt parent-auth:parentpass -out testkey.priv",
        Expect("head -1 testkey.priv", "BEGIN TSS2 PRIVATE KEY"),
        # Using it needs the parent's password too: TPM2OPENSSL_PARENT_AUTH, as the docs say.
        f"openssl pkey {CHECK} -in testkey.priv -pubout -out testkey.pub",
        f"openssl pkeyutl {CHECK} -sign -inkey testkey.priv -rawin -digest sha256 "
        "-in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    ), env={"TPM2OPENSSL_PARENT_AUTH": "parentpass"}),
    Flow("key-file-parameters",
         "keys.md: Key Parameter Retrieval; Storing the Private or a Public Key; Using PEM File", (
             "openssl genpkey {providers} -algorithm RSA -out testkey.priv",
             "openssl rsa {providers} -in testkey.priv -modulus -noout > modulus.priv",
             "openssl rsa {providers} -modulus -noout -in file:{dir}/testkey.priv > modulus.file",
             "openssl pkey {providers} -in testkey.priv -pubout -out testkey.pub",
             # The docs' `openssl rsa -modulus -noout -in testkey.pub` needs -pubin in
             # OpenSSL 3.0 (without it the default provider alone refuses a public key too).
             "openssl rsa -modulus -noout -in testkey.pub -pubin > modulus.pub",
             "cmp modulus.priv modulus.pub",
             "cmp modulus.file modulus.pub",
             Expect("openssl rsa {providers} -in testkey.priv -text -noout",
                    "(?i)modulus"),
         ), not_for={"alone": FILES_NEED_BASE}),
    Flow("key-file-encoders", "keys.md: Storing the Private or a Public Key (encoders table)", (
        "openssl genpkey {providers} -algorithm RSA -out testkey.priv",
        "openssl pkey {providers} -in testkey.priv -outform der -out testkey.der",
        "openssl pkey {providers} -in testkey.priv -pubout -out testkey.pub",
        "openssl pkey {providers} -in testkey.priv -pubout -outform der -out testkey.pub.der",
        "openssl rsa {providers} -in testkey.priv -RSAPublicKey_out -out testkey.rsapub",
        "openssl rsa {providers} -in testkey.priv -RSAPublicKey_out -outform der "
        "-out testkey.rsapub.der",
        Expect("openssl pkey {providers} -in testkey.priv -text -noout", "(?i)modulus"),
        # Every form is the same key; the DER private key is a TSS2 key (OID 2.23.133.10.1.3).
        Expect("openssl asn1parse -inform der -in testkey.der", "2.23.133.10.1.3"),
        "cmp <(openssl pkey -pubin -in testkey.pub -outform der) testkey.pub.der",
        "cmp <(openssl rsa -RSAPublicKey_in -in testkey.rsapub -pubout -outform der) "
        "testkey.pub.der",
        "cmp <(openssl rsa -RSAPublicKey_in -inform der -in testkey.rsapub.der -pubout "
        "-outform der) testkey.pub.der",
        f"cmp <(openssl pkey {CHECK} -inform der -in testkey.der -pubout -outform der) "
        "testkey.pub.der",
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("key-file-password", "keys.md: Using PEM File (-passin)", (
        "openssl genpkey {providers} -algorithm RSA -pkeyopt user-auth:abc -out testkey.priv",
        "openssl rsa {providers} -modulus -noout -in testkey.priv -passin pass:abc "
        "> modulus.priv",
        f"openssl pkey {CHECK} -in testkey.priv -passin pass:abc -pubout -out testkey.pub",
        "cmp modulus.priv <(openssl rsa -pubin -in testkey.pub -modulus -noout)",
        "openssl pkeyutl {providers} -sign -inkey testkey.priv -passin pass:abc -rawin "
        "-digest sha256 -in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("handle-modulus", "keys.md: Key Generation (tpm2_createak); Using Key Handle", (
        *RSA_AK,
        "openssl rsa {providers} -modulus -noout -in handle:0x81000000 > modulus.tpm",
        TOOLS_PUBLIC,
        "cmp modulus.tpm <(openssl rsa -pubin -in tools.pub -modulus -noout)",
    )),
    Flow("handle-password", "keys.md: Using Key Handle (?pass, -passin env:)", (
        "tpm2_createek -G rsa -c ek_rsa.ctx",
        "tpm2_createak -C ek_rsa.ctx -G rsa -g sha256 -s rsassa -p abc -c ak_rsa.ctx",
        "tpm2_evictcontrol -c ak_rsa.ctx 0x81000000",
        "openssl rsa {providers} -modulus -noout -in handle:0x81000000?pass "
        "-passin env:PASSWORD > modulus.tpm",
        TOOLS_PUBLIC,
        "cmp modulus.tpm <(openssl rsa -pubin -in tools.pub -modulus -noout)",
        # asymmetric.md's signing command with this key and its password.
        "openssl pkeyutl {providers} -inkey handle:0x81000000?pass -passin env:PASSWORD "
        "-sign -rawin -in testdata -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey tools.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    ), env={"PASSWORD": "abc"}),
    Flow("object-modulus", "keys.md: Using a Serialized Object", (
        *RSA_AK[:2],
        "tpm2_evictcontrol -c ak_rsa.ctx -o ak_rsa.obj",
        "openssl rsa {providers} -modulus -noout -in object:ak_rsa.obj > modulus.tpm",
        "tpm2_readpublic -c ak_rsa.ctx -f pem -o tools.pub",
        "cmp modulus.tpm <(openssl rsa -pubin -in tools.pub -modulus -noout)",
        # The object's public key written out and used to verify asymmetric.md's signature.
        "openssl pkey {providers} -in object:ak_rsa.obj -pubout -out testkey.pub",
        same_public_key("testkey.pub"),
        "openssl pkeyutl {providers} -inkey object:ak_rsa.obj -sign -rawin -in testdata "
        "-out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    )),
    Flow("derive-handle-nv-peer", "keys.md: Using NV Index", (
        *tools_key("ecc256"),
        "openssl pkey {providers} -in handle:0x81000000 -pubout -out testkey1.pub",
        TOOLS_PUBLIC,
        same_public_key("testkey1.pub"),
        "openssl genpkey -algorithm EC -pkeyopt group:P-256 -out testkey2.priv",
        "openssl pkey -in testkey2.priv -pubout -outform der -out testkey2.pub.der",
        "tpm2_nvdefine -C o -s $(stat -c %s testkey2.pub.der) 0x1000010",
        "tpm2_nvwrite -C o -i testkey2.pub.der 0x1000010",
        "openssl pkeyutl {providers} -derive -inkey handle:0x81000000 "
        "-peerkey handle:0x1000010 -out secret.key",
        "openssl pkeyutl -derive -inkey testkey2.priv -peerkey tools.pub -out secret2.key",
        "cmp secret.key secret2.key",
    ), not_for={"alone": "the peer key in NV is SubjectPublicKeyInfo DER, read by the base "
                         "provider's decoders; the docs add -provider base"}),
    Flow("nv-certificate-der", "keys.md: Using NV Index (certificates)", (
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout cert.key -subj /CN=nv -out cert.pem",
        "openssl x509 -in cert.pem -outform der -out cert.der",
        "tpm2_nvdefine -C o -s $(stat -c %s cert.der) 0x1000011",
        "tpm2_nvwrite -C o -i cert.der 0x1000011",
        "openssl x509 {providers} -in handle:0x1000011 -out nvcert.pem",
        "cmp nvcert.pem cert.pem",
    )),
    Flow("nv-certificate-pem", "keys.md: Using NV Index (certificates)", (
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout cert.key -subj /CN=nv -out cert.pem",
        "tpm2_nvdefine -C o -s $(stat -c %s cert.pem) 0x1000011",
        "tpm2_nvwrite -C o -i cert.pem 0x1000011",
        "openssl x509 {providers} -in handle:0x1000011 -out nvcert.pem",
        "cmp nvcert.pem cert.pem",
    )),
    # asymmetric.md
    Flow("sign-handle-rawin", "asymmetric.md: Signature (restricted key by handle)", (
        *RSA_AK,
        "openssl pkeyutl {providers} -inkey handle:0x81000000 -sign -rawin -in testdata "
        "-out testdata.sig",
        TOOLS_PUBLIC,
        "openssl pkey {providers} -in handle:0x81000000 -pubout -out testkey.pub",
        same_public_key("testkey.pub"),
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -digest sha256 "
               "-in testdata -sigfile testdata.sig", VERIFIED),
    )),
    Flow("sign-pss-sha512", "asymmetric.md: Signature (sha512 and pss)", (
        "openssl genpkey {providers} -algorithm RSA -out testkey.priv",
        "openssl pkey {providers} -in testkey.priv -pubout -out testkey.pub",
        "openssl pkeyutl {providers} -sign -inkey testkey.priv -rawin -in testdata "
        "-digest sha512 -pkeyopt pad-mode:pss -out testdata.sig",
        Expect("openssl pkeyutl -verify -pubin -inkey testkey.pub -rawin -in testdata "
               "-digest sha512 -pkeyopt pad-mode:pss -sigfile testdata.sig", VERIFIED),
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("decrypt-key-file", "asymmetric.md: Decryption", (
        "openssl genpkey {providers} -algorithm RSA -out testkey.priv",
        "openssl pkey {providers} -in testkey.priv -pubout -out testkey.pub",
        "cp testdata testdata.orig",
        "openssl pkeyutl -encrypt -pubin -inkey testkey.pub -in testdata -out testdata.crypt",
        "openssl pkeyutl {providers} -inkey testkey.priv -decrypt -in testdata.crypt "
        "-out testdata",
        "cmp testdata testdata.orig",
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("decrypt-handle-tools-key",
         "keys.md: Key Generation (tpm2 tools, persistent); asymmetric.md: Decryption", (
             *tools_key("rsa2048"),
             "openssl pkey {providers} -in handle:0x81000000 -pubout -out testkey.pub",
             TOOLS_PUBLIC,
             same_public_key("testkey.pub"),
             "cp testdata testdata.orig",
             "openssl pkeyutl -encrypt -pubin -inkey testkey.pub -in testdata "
             "-out testdata.crypt",
             "openssl pkeyutl {providers} -inkey handle:0x81000000 -decrypt "
             "-in testdata.crypt -out testdata",
             "cmp testdata testdata.orig",
             # The same with OAEP padding.
             "openssl pkeyutl -encrypt -pubin -inkey testkey.pub -pkeyopt rsa_padding_mode:oaep "
             "-in testdata -out testdata.oaep",
             "openssl pkeyutl {providers} -inkey handle:0x81000000 -decrypt "
             "-pkeyopt rsa_padding_mode:oaep -in testdata.oaep -out testdata",
             "cmp testdata testdata.orig",
         )),
    Flow("derive-key-file", "asymmetric.md: Shared Secret Derivation", (
        "openssl genpkey {providers} -algorithm EC -pkeyopt group:P-256 -out testkey1.priv",
        "openssl genpkey -algorithm EC -pkeyopt group:P-256 -out testkey2.priv",
        "openssl pkey -in testkey2.priv -pubout -out testkey2.pub",
        "openssl pkeyutl {providers} -derive -inkey testkey1.priv -peerkey testkey2.pub "
        "-out secret.key",
        f"openssl pkey {CHECK} -in testkey1.priv -pubout -out testkey1.pub",
        "openssl pkeyutl -derive -inkey testkey2.priv -peerkey testkey1.pub -out secret2.key",
        "cmp secret.key secret2.key",
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("derive-handle-tools-key",
         "keys.md: Key Generation (tpm2 tools, persistent); asymmetric.md: Shared Secret "
         "Derivation", (
             *tools_key("ecc256"),
             "openssl pkey {providers} -in handle:0x81000000 -pubout -out testkey1.pub",
             TOOLS_PUBLIC,
             same_public_key("testkey1.pub"),
             "openssl genpkey -algorithm EC -pkeyopt group:P-256 -out testkey2.priv",
             "openssl pkey -in testkey2.priv -pubout -out testkey2.pub",
             "openssl pkeyutl {providers} -derive -inkey handle:0x81000000 "
             "-peerkey testkey2.pub -out secret.key",
             "openssl pkeyutl -derive -inkey testkey2.priv -peerkey tools.pub "
             "-out secret2.key",
             "cmp secret.key secret2.key",
         ), not_for={"alone": "the peer's PUBLIC KEY file is read by the base provider's "
                              "file loader; the docs add -provider base"}),
    # certificates.md
    Flow("req-x509-new-key", "certificates.md: Certificate Signing", (
        REQ_X509,
        *REQ_X509_CHECKS,
    ), not_for={"base": KEYOUT_NEEDS_CIPHER}),
    Flow("req-csr-handle", "certificates.md: Certificate Signing (CSR, attestation key)", (
        *EC_AK,
        "openssl req {providers} -new -subj \"/C=GB/CN=foo\" -key handle:0x81000000 "
        "-out testcsr.pem",
        Expect("openssl req -verify -in testcsr.pem -noout", "verify OK"),
        TOOLS_PUBLIC,
        "openssl req -in testcsr.pem -pubkey -noout > testcsr.pub",
        same_public_key("testcsr.pub"),
    )),
    Flow("x509-ca-signs", "certificates.md: Certificate Signing (openssl x509 as a CA)", (
        "openssl genpkey {providers} -algorithm EC -pkeyopt group:P-256 -out cakey.priv",
        "openssl req {providers} -new -x509 -key cakey.priv -subj /CN=ca "
        "-addext basicConstraints=critical,CA:TRUE -out cacert.pem",
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout leaf.key -subj /CN=leaf -out leaf.csr",
        "openssl x509 {providers} -req -in leaf.csr -CA cacert.pem -CAkey cakey.priv "
        "-CAcreateserial -out leaf.pem",
        Expect("openssl verify -CAfile cacert.pem cacert.pem leaf.pem", "leaf.pem: OK"),
    ), not_for={"alone": FILES_NEED_BASE}),
    Flow("cms-sign", "certificates.md: Cryptographic Message Standard (S/MIME)", (
        REQ_X509,
        "openssl cms -sign {providers} -nodetach -md sha256 -inkey testkey.pem "
        "-signer testcert.pem -in testdata -text -out testdata.sig",
        Expect("openssl cms -verify -in testdata.sig -CAfile testcert.pem -text "
               "-out testdata.verified", "Verification successful"),
        "cmp testdata <(tr -d '\\r' < testdata.verified)",
    ), not_for={"alone": CMS_FILES, "base": KEYOUT_NEEDS_CIPHER}),
    Flow("cms-decrypt", "certificates.md: Cryptographic Message Standard (S/MIME)", (
        REQ_X509,
        "cp testdata testdata.orig",
        "openssl cms -encrypt -binary -in testdata -out testdata.enc testcert.pem",
        "openssl cms -decrypt {providers} -inkey testkey.pem -recip testcert.pem "
        "-in testdata.enc -out testdata",
        "cmp testdata testdata.orig",
    ), not_for={"alone": CMS_FILES, "base": KEYOUT_NEEDS_CIPHER}),
    Flow("tls-server", "certificates.md: TLS Handshake (s_server, curl)", (
        REQ_X509,
        *REQ_X509_CHECKS,
        Serve("openssl s_server {providers} -accept 127.0.0.1:{port} -www "
              "-key testkey.pem -cert testcert.pem"),
        # The docs fetch https://localhost:4443/; the certificate names foo, so curl is told
        # that foo is this machine.
        Expect("curl --silent --show-error --cacert testcert.pem "
               "--resolve foo:{port}:127.0.0.1 https://foo:{port}/",
               "Ciphers supported in s_server binary"),
    ), not_for={"alone": TLS_NEEDS_DEFAULT, "base": KEYOUT_NEEDS_CIPHER}),
    Flow("tls-server-handle", "certificates.md: TLS Handshake (-key by persistent handle)", (
        *EC_AK,
        "openssl req {providers} -new -x509 -key handle:0x81000000 -subj \"/C=GB/CN=foo\" "
        "-out testcert.pem",
        TOOLS_PUBLIC,
        "openssl x509 -in testcert.pem -pubkey -noout > testcert.pub",
        same_public_key("testcert.pub"),
        Serve("openssl s_server {providers} -accept 127.0.0.1:{port} -www "
              "-key handle:0x81000000 -cert testcert.pem"),
        Expect("curl --silent --show-error --cacert testcert.pem "
               "--resolve foo:{port}:127.0.0.1 https://foo:{port}/",
               "Ciphers supported in s_server binary"),
    ), not_for={"alone": TLS_NEEDS_DEFAULT, "base": TLS_NEEDS_DEFAULT}),
    Flow("tls-client-handle", "certificates.md: TLS Handshake (mTLS client, key by handle)", (
        *EC_AK,
        "openssl req {providers} -new -x509 -key handle:0x81000000 -subj /CN=client "
        "-out client.crt",
        TOOLS_PUBLIC,
        "openssl x509 -in client.crt -pubkey -noout > client.pub",
        same_public_key("client.pub"),
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
        "-keyout server.key -subj /CN=localhost -out server.crt",
        Serve("openssl s_server -accept 127.0.0.1:{port} -www -key server.key "
              "-cert server.crt -Verify 1 -CAfile client.crt -verify_return_error"),
        # The server's page shows the certificate the client proved it holds the key of.
        Expect("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client {providers} "
               "-connect 127.0.0.1:{port} -CAfile server.crt -cert client.crt "
               "-key handle:0x81000000 -state -debug -ign_eof",
               r"(?s)Verify return code: 0 \(ok\).*Client certificate.*CN\s*=\s*client"),
    ), not_for={"alone": TLS_NEEDS_DEFAULT, "base": TLS_NEEDS_DEFAULT}),
    # rng.md
    Flow("rand", "rng.md: Random Number Generation", (
        Expect("openssl rand {providers} -hex 10", r"^[0-9a-f]{20}\n?$"),
        RandomFromTpm(10),
        Expect("tpm2_getrandom --hex 10", r"^[0-9a-f]{20}\n?$"),
    )),
)
