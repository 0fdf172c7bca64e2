"""Key files, key descriptions and the cache of keys the worker has loaded."""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMT_PUBLIC,
    TPMU_PUBLIC_PARMS,
)

from .. import keyfile, keypolicy
from ..definitions import CURVES, Padding
from ..errors import BadDigestError, BadKeyError, UnsupportedError
from ..protocol import STORAGE_PRIMARY, Curve, Hash, KeyType, Scheme, Usage
from ..templates import ecc_parms, rsa_parms, usage_attributes

PERSISTENT_FIRST = 0x81000000
PERSISTENT_LAST = 0x81FFFFFF

# RSA sizes the broker asks the TPM about (TPM2_TestParms) for STATUS; GENERATE asks the
# TPM about whatever size it is given, and refuses only what the TPM refuses.
RSA_SIZES = (1024, 2048, 3072, 4096)
# A TPM2B_AUTH holds at most a digest of the key's nameAlg: SHA-512's is the largest.
MAX_AUTH_ANY = 64


def is_persistent(handle: int) -> bool:
    return PERSISTENT_FIRST <= handle <= PERSISTENT_LAST


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    key_id: bytes
    key_type: KeyType
    bits: int
    curve: Curve
    public_key: bytes  # SubjectPublicKeyInfo DER


@dataclasses.dataclass(frozen=True)
class Tss2Key:
    """A parsed TSS2 PRIVATE KEY: enough to load it again at any time."""

    tss: Any  # TSSPrivKey
    rsa_parent: bool  # the file asks for the H-1 RSA storage primary as parent
    # An importable key: the encrypted seed (TPM2B_ENCRYPTED_SECRET's contents), and
    # `private` is the duplicate TPM2_Import takes. None for a loadable key.
    import_secret: bytes | None = None
    # The key's policy commands, replayed in a policy session before each use; empty
    # for a key authorized by its password alone.
    policy: tuple[keypolicy.PolicyStep, ...] = ()
    # Signed policies (authPolicy [3]), for a policy that starts with PolicyAuthorize:
    # (name, commands ending in the signed PolicyAuthorize), tried in order.
    auth_policies: tuple[tuple[str, tuple[keypolicy.PolicyStep, ...]], ...] = ()

    @property
    def parent(self) -> int:
        return int(self.tss.parent)

    @property
    def public(self) -> Any:  # TPM2B_PUBLIC
        return self.tss.public

    @property
    def private(self) -> Any:  # TPM2B_PRIVATE
        return self.tss.private


def parse_tss2_key(der: bytes) -> Tss2Key:
    """Parse a DER TSS2 PRIVATE KEY; BadKeyError or UnsupportedError if it cannot be used.

    Strict: the file as keyfile.decode reads it, and the public and private TPM2B blobs
    must fill their OCTET STRINGs exactly and re-marshal to the same bytes. Whatever does
    not parse is BAD_KEY, never a broker error.
    """
    seq = keyfile.decode(der)
    importable = seq.object_type == keyfile.IMPORTABLE_OID
    public = _tpm2b(TPM2B_PUBLIC, seq.public, "public")
    private = _tpm2b(TPM2B_PRIVATE, seq.private, "private")
    # emptyAuth absent means the key has a password (TPM 2.0 Key File spec).
    tss = TSSPrivKey(private, public, empty_auth=bool(seq.empty_auth), parent=seq.parent)
    policy = tuple(keypolicy.from_asn1(seq.policy)) if seq.policy is not None else ()
    auth_policies = tuple((entry.name or "", tuple(keypolicy.from_asn1(entry.policy)))
                          for entry in seq.auth_policy or ())
    seed = (bytes(_tpm2b(TPM2B_ENCRYPTED_SECRET, seq.secret, "encrypted seed"))
            if importable and seq.secret else None)
    key = Tss2Key(tss, rsa_parent=bool(seq.rsa_parent), import_secret=seed, policy=policy,
                  auth_policies=auth_policies)
    if not (key.parent == STORAGE_PRIMARY or is_persistent(key.parent)):
        raise UnsupportedError(f"key parent 0x{key.parent:08x} is neither the storage "
                               "primary (0x40000001) nor a persistent handle")
    try:
        check_signing_key(key.public.publicArea)
    except (ValueError, TypeError, TSS2_Exception) as exc:
        raise BadKeyError(f"cannot read the key's public area: {exc}") from None
    if policy:
        check_key_policy(key.public.publicArea, policy)
    for _name, steps in auth_policies:
        keypolicy.signed_policy_steps(steps)
    return key


def check_key_policy(public: Any, policy: Sequence[keypolicy.PolicyStep]) -> None:
    """BadKeyError unless `policy` is one the broker replays and its digest is the key's
    authPolicy: a file whose policy cannot open its key is refused at LOAD."""
    try:
        name_alg = Hash(int(public.nameAlg))
    except ValueError:
        raise UnsupportedError(f"key name hash 0x{int(public.nameAlg):04x}") from None
    if any(step.command_code == keypolicy.CC_POLICY_AUTHORIZE for step in policy[1:]):
        raise BadKeyError("TPM2_PolicyAuthorize in the key's policy must come first (it "
                          "resets the policy digest)")
    if bytes(public.authPolicy) != keypolicy.policy_digest(policy, name_alg):
        raise BadKeyError("the key file's policy does not give the key's authPolicy: "
                          "the TPM would refuse every use")


def _tpm2b(kind: Any, raw: bytes, what: str) -> Any:
    """Unmarshal a TPM2B that must fill `raw` exactly, in canonical form."""
    try:
        value, used = kind.unmarshal(raw)
        if used != len(raw) or int.from_bytes(raw[:2], "big") != len(raw) - 2:
            raise ValueError(f"{len(raw) - used} bytes left over")
        if bytes(value.marshal()) != raw:
            raise ValueError("not in canonical form")
    except (ValueError, TypeError, TSS2_Exception) as exc:
        raise BadKeyError(f"cannot parse the key's {what} blob: {exc}") from None
    return value


def check_signing_key(public: Any) -> None:
    """UnsupportedError unless `public` (TPMT_PUBLIC) is a key the broker can sign with,
    or an RSA key it can decrypt with."""
    describe(public)
    attributes = int(public.objectAttributes)
    if not attributes & TPMA_OBJECT.SIGN_ENCRYPT:
        if public.type == TPM2_ALG.RSA and attributes & TPMA_OBJECT.DECRYPT and not (
                attributes & TPMA_OBJECT.RESTRICTED):
            return  # a decryption key: SIGN refuses it (check_key_scheme)
        if public.type == TPM2_ALG.ECC and attributes & TPMA_OBJECT.DECRYPT:
            check_ecdh_key(public)  # an ECDH-only key; signing checks the attribute
            return
        raise UnsupportedError("the key is not a signing key (sign attribute clear)")
    if attributes & TPMA_OBJECT.RESTRICTED and public.parameters.asymDetail.scheme.scheme \
            == TPM2_ALG.NULL:
        raise BadKeyError("a restricted signing key without a fixed scheme")


def describe(public: Any) -> tuple[KeyType, int, Curve]:
    """Key type, bits and curve of a TPMT_PUBLIC."""
    if public.type == TPM2_ALG.ECC:
        curve_id = int(public.parameters.eccDetail.curveID)
        try:
            curve = Curve(curve_id)
        except ValueError:
            raise UnsupportedError(f"unsupported curve 0x{curve_id:04x}") from None
        if curve is Curve.NONE:
            raise UnsupportedError("EC key without a curve")
        return KeyType.EC, curve.bits, curve
    if public.type == TPM2_ALG.RSA:
        bound = public.parameters.rsaDetail.scheme.scheme == TPM2_ALG.RSAPSS
        return (KeyType.RSA_PSS if bound else KeyType.RSA,
                int(public.parameters.rsaDetail.keyBits), Curve.NONE)
    raise UnsupportedError(f"unsupported key type 0x{int(public.type):04x}")


def key_info(key_id: bytes, public: Any) -> KeyInfo:
    key_type, bits, curve = describe(public)
    try:
        spki = public.to_der()
    except ValueError as exc:
        raise BadKeyError(f"cannot encode the public key: {exc}") from None
    return KeyInfo(key_id, key_type, bits, curve, spki)


def signature_scheme_alg(key_type: KeyType, scheme: Scheme) -> int:
    """The TPM2_ALG signing scheme for a wire scheme, or UnsupportedError."""
    if key_type is KeyType.EC and scheme is Scheme.ECDSA:
        return int(TPM2_ALG.ECDSA)
    if key_type is KeyType.RSA and scheme is Scheme.PKCS1:
        return int(TPM2_ALG.RSASSA)
    if key_type is KeyType.RSA_PSS and scheme is not Scheme.PSS:
        raise UnsupportedError(f"an RSA-PSS key signs with PSS only, not {scheme.name}")
    if key_type in (KeyType.RSA, KeyType.RSA_PSS) and scheme is Scheme.PSS:
        # The TPM picks the PSS salt length, not the caller: swtpm (libtpms) uses the
        # digest length, which is what TLS 1.3 and our wire protocol require, but real
        # TPMs following the spec use the maximum salt length the modulus allows.
        # Verifiers that insist on salt = digest length reject those signatures.
        return int(TPM2_ALG.RSAPSS)
    raise UnsupportedError(f"scheme {scheme.name} does not fit a {key_type.name} key")


def check_key_scheme(public: Any, scheme_alg: int, hash_alg: Hash) -> None:
    """A key created with a fixed scheme signs only with that scheme and hash."""
    if not int(public.objectAttributes) & TPMA_OBJECT.SIGN_ENCRYPT:
        raise UnsupportedError("the key is not a signing key (sign attribute clear)")
    fixed = public.parameters.asymDetail.scheme
    if fixed.scheme == TPM2_ALG.NULL:
        return
    if fixed.scheme != scheme_alg or fixed.details.anySig.hashAlg != hash_alg:
        raise UnsupportedError(
            f"the key only signs with {_alg_name(fixed.scheme)}/"
            f"{_alg_name(fixed.details.anySig.hashAlg)}")


def decryption_scheme(public: Any, padding: Padding, hash: Hash, mgf1: Hash,
                      label: bytes) -> tuple[int, int, bytes] | None:
    """How TPM2_RSA_Decrypt serves a request with this key (TPMT_PUBLIC), or
    UnsupportedError saying why it cannot.

    None: the key's scheme is NULL, so the TPM does the raw private operation and the
    broker removes the padding (tpm/depad.py). Otherwise the key's scheme is fixed and
    the TPM removes it: (inScheme, its hash, label) for the command. The TPM's OAEP uses
    one hash for the digest and MGF1, and takes only labels that are empty or end in a
    zero byte (it hashes them as they are).
    """
    if public.type != TPM2_ALG.RSA:
        raise UnsupportedError("only RSA keys decrypt; EC keys agree on secrets (ECDH)")
    attributes = int(public.objectAttributes)
    if not attributes & TPMA_OBJECT.DECRYPT:
        raise UnsupportedError("the key cannot decrypt: its decrypt attribute is clear "
                               "(a sign-only key, made with usage sign); keys made without "
                               "a usage both sign and decrypt")
    if attributes & TPMA_OBJECT.RESTRICTED:
        raise UnsupportedError("the key is a restricted decryption key (a storage parent): "
                               "the TPM decrypts only its own objects with it")
    fixed = public.parameters.rsaDetail.scheme
    if fixed.scheme == TPM2_ALG.NULL:
        return None
    if fixed.scheme == TPM2_ALG.RSAES:
        if padding is not Padding.PKCS1:
            raise UnsupportedError(f"the key's scheme is fixed to RSAES-PKCS1-v1_5; "
                                   f"{padding.name} padding is not possible with it")
        return int(TPM2_ALG.NULL), 0, b""
    if fixed.scheme == TPM2_ALG.OAEP:
        key_hash = int(fixed.details.oaep.hashAlg)
        name = Hash(key_hash).name if key_hash in set(Hash) else _alg_name(key_hash)
        if padding is not Padding.OAEP or hash != key_hash or mgf1 != key_hash:
            raise UnsupportedError(f"the key's scheme is fixed to OAEP with {name} (and "
                                   f"MGF1-{name}); ask for exactly that")
        if label and label[-1] != 0:
            raise UnsupportedError("the key's scheme is fixed to OAEP, and the TPM takes "
                                   "only labels that end in a zero byte; this one does not")
        return int(TPM2_ALG.NULL), 0, label
    raise UnsupportedError(f"the key's scheme {_alg_name(fixed.scheme)} is not a "
                           "decryption scheme")


def check_ecdh_key(public: Any) -> None:
    """UnsupportedError, saying why, unless `public` (TPMT_PUBLIC) may do
    TPM2_ECDH_ZGen: an EC key with decrypt, not restricted, scheme NULL or ECDH."""
    if public.type != TPM2_ALG.ECC:
        raise UnsupportedError("ECDH needs an EC key, and this is an RSA key")
    attributes = int(public.objectAttributes)
    if not attributes & TPMA_OBJECT.DECRYPT:
        raise UnsupportedError("the key cannot do ECDH: it is a sign-only key (decrypt "
                               "attribute clear, made with usage sign); keys made without "
                               "a usage both sign and derive")
    if attributes & TPMA_OBJECT.RESTRICTED:
        raise UnsupportedError("the key cannot do ECDH: it is a restricted decryption "
                               "key (a storage parent)")
    scheme = int(public.parameters.eccDetail.scheme.scheme)
    if scheme not in (TPM2_ALG.NULL, TPM2_ALG.ECDH):
        raise UnsupportedError(f"the key cannot do ECDH: its scheme is {_alg_name(scheme)}, "
                               "and ECDH needs scheme NULL or ECDH")


# Curves ECDH is done on: the ones cryptography checks peer points on.
_ECDH_CURVES = (Curve.P256, Curve.P384, Curve.P521)


def check_peer_point(curve: int, point: bytes) -> tuple[bytes, bytes]:
    """(x, y) of an uncompressed SEC1 `point` on `curve` (a TPM2_ECC_CURVE id), each as
    long as the curve's field; BadDigestError if it is not a point of that curve (off
    the curve, the point at infinity, another curve's size, compressed)."""
    ec_curve = keyfile.pyca_curve(curve) if curve in _ECDH_CURVES else None
    if ec_curve is None:
        raise UnsupportedError(f"ECDH on curve 0x{int(curve):04x} is not supported")
    bits = ec_curve.key_size
    name = Curve(curve).nist_name
    field = (bits + 7) // 8
    if len(point) != 1 + 2 * field or point[:1] != b"\x04":
        raise BadDigestError(f"the peer's public key is not an uncompressed {name} point "
                             f"({1 + 2 * field} bytes starting 04), but {len(point)} bytes")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec_curve, point)  # on the curve
    except ValueError:
        raise BadDigestError(f"the peer's public key is not a point on {name}, the "
                             "key's curve") from None
    return point[1:1 + field], point[1 + field:]


def _alg_name(alg: Any) -> str:
    try:
        return str(TPM2_ALG.to_string(alg))
    except ValueError:  # a corrupted or future algorithm id
        return f"0x{int(alg):04x}"


def generation_template(key_type: KeyType, param: int, password: bool = False,
                        usage: Usage = Usage.DEFAULT, hash_alg: Hash | None = None) -> Any:
    """TPMT_PUBLIC for a new key.

    Attributes follow tpm2-openssl's key templates, except for sign and decrypt, which
    come from `usage` (usage_attributes). Scheme NULL leaves the scheme and hash to each
    signature. `hash_alg` (SHA-256 by default) is the key's hash: its nameAlg, which
    names the key and bounds its password's length (auth_limit), and for an RSA-PSS key
    also the hash its RSAPSS scheme is bound to.
    A key without a password gets noDA: there is nothing to guess, and a DA-protected key
    makes every TPM crash after its use count toward the lockout. A key with a password
    stays DA-protected, so that guessing it is throttled by the TPM. Sizes and curves
    are not checked here: the worker asks the TPM (TPM2_TestParms) first.
    """
    attributes = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.FIXEDTPM
                  | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    attributes |= usage_attributes(key_type, usage)
    if not password:
        attributes |= TPMA_OBJECT.NODA
    name_alg = hash_alg or Hash.SHA256
    if key_type is KeyType.EC:
        if param not in CURVES:
            raise UnsupportedError(f"cannot generate EC keys on curve 0x{param:04x}: "
                                   "OpenSSL has no ECDSA for it")
        return TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=name_alg,
                           objectAttributes=attributes,
                           parameters=TPMU_PUBLIC_PARMS(eccDetail=ecc_parms(param)))
    if key_type in (KeyType.RSA, KeyType.RSA_PSS):
        pss_hash = name_alg if key_type is KeyType.RSA_PSS else None
        return TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=name_alg,
                           objectAttributes=attributes,
                           parameters=TPMU_PUBLIC_PARMS(rsaDetail=rsa_parms(param, pss_hash)))
    raise UnsupportedError(f"unsupported key type {key_type!r}")


def auth_limit(public: Any) -> int:
    """The longest password a key can have: a TPM2B_AUTH is at most its nameAlg's digest
    (TPM 2.0 Part 1, 27.2.3); MAX_AUTH_ANY for a nameAlg the broker does not know."""
    try:
        return Hash(int(public.nameAlg)).digest_size
    except ValueError:
        return MAX_AUTH_ANY


def tss2_key_der(private: Any, public: Any, empty_auth: bool, parent: int,
                 policy: Sequence[keypolicy.PolicyStep] = ()) -> bytes:
    """DER TSS2 PRIVATE KEY for a key made by TPM2_Create, with its policy [1] if any.
    Without a policy, emptyAuth is written TRUE or FALSE, as tpm2-pytss writes it."""
    return keyfile.encode(public=bytes(public.marshal()), private=bytes(private.marshal()),
                          parent=parent, empty_auth=empty_auth if not policy else
                          (True if empty_auth else None),
                          policy=keypolicy.to_asn1(policy) if policy else None)


def imported(key: Tss2Key, private: Any) -> Tss2Key:
    """The loadable key an importable `key` became: TPM2_Import's outPrivate with the
    same public area, password rule, parent and policies."""
    tss = TSSPrivKey(private, key.public, empty_auth=bool(key.tss.empty_auth),
                     parent=key.parent)
    return Tss2Key(tss, rsa_parent=key.rsa_parent, policy=key.policy,
                   auth_policies=key.auth_policies)


def tss2_der(*, public: Any, private: Any, parent: int, empty_auth: bool,
             rsa_parent: bool = False, import_secret: bytes | None = None,
             policy: Sequence[keypolicy.PolicyStep] = ()) -> bytes:
    """DER TSS2 PRIVATE KEY: loadable, or importable when `import_secret` is given.
    emptyAuth is written TRUE or left out (a password), as the spec asks."""
    return keyfile.encode(
        public=bytes(public.marshal()), private=bytes(private.marshal()), parent=parent,
        empty_auth=True if empty_auth else None, rsa_parent=rsa_parent,
        secret=(bytes(TPM2B_ENCRYPTED_SECRET(import_secret).marshal())
                if import_secret is not None else None),
        policy=keypolicy.to_asn1(policy) if policy else None)


def loadable_der(key: Tss2Key) -> bytes:
    return tss2_der(public=key.public, private=key.private, parent=key.parent,
                    empty_auth=bool(key.tss.empty_auth), rsa_parent=key.rsa_parent,
                    policy=key.policy)


# --- the cache ------------------------------------------------------------------------

@dataclasses.dataclass
class CachedKey:
    """A key the worker knows. `blob` or `persistent_handle` lets it be loaded again."""

    info: KeyInfo
    public: Any  # TPMT_PUBLIC
    blob: Tss2Key | None = None
    persistent_handle: int = 0
    handle: Any = None  # ESYS_TR in the current ESAPI context, None when not loaded
    # RSA-PSS: None until the first PSS signature shows whether the TPM's own salt is
    # the digest length (False) or the broker must pad (True); see tpm/pss.py.
    pss_by_broker: bool | None = None
    # PKCS#1 v1.5 implicit rejection: the key's secret (tpm/depad.py), once asked for.
    kdk_secret: bytes | None = None
    # (signature scheme, hash) pairs checked against the key's fixed scheme: reading it
    # through tpm2-pytss costs more than the rest of a signature.
    schemes_checked: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    # The password of the key's parent, to load it again after eviction (tpm/parents.py).
    parent_auth: bytes = dataclasses.field(default=b"", repr=False)
    # The Name of the parent it was loaded under: another parent at the same handle
    # cannot load it again (tpm/objects.py).
    parent_name: bytes = b""
    # Without noDA, a failed authorization counts toward the TPM's lockout.
    da_protected: bool = dataclasses.field(init=False)
    # The longest password the key can have (auth_limit), read once: off the hot path.
    max_auth: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.da_protected = not int(self.public.objectAttributes) & int(TPMA_OBJECT.NODA)
        self.max_auth = auth_limit(self.public)

    @functools.cached_property
    def name(self) -> bytes:
        """The TPM's Name of the key (nameAlg || hash of its public area): what a
        session's HMAC binds, and what tells a key at a persistent handle from the next
        one there."""
        return bytes(self.public.get_name())

    @property
    def shield_id(self) -> bytes:
        """What the dictionary-attack shield remembers passwords by. A key file's id names
        one private blob, so one password. A handle is only a place: the key there can
        be evicted and another persisted in its place, so a persistent key is known by
        its Name."""
        return self.name if self.blob is None else self.info.key_id

    @property
    def policy(self) -> tuple[keypolicy.PolicyStep, ...]:
        """The policy commands that authorize the key; empty: its password does."""
        return self.blob.policy if self.blob is not None else ()

    @property
    def restricted(self) -> bool:
        """An attestation key: it signs only what the TPM hashed itself (SIGN_MESSAGE)."""
        return bool(int(self.public.objectAttributes) & int(TPMA_OBJECT.RESTRICTED))

    @property
    def can_sign(self) -> bool:
        return bool(int(self.public.objectAttributes) & int(TPMA_OBJECT.SIGN_ENCRYPT))

    @property
    def can_decrypt(self) -> bool:
        return bool(int(self.public.objectAttributes) & int(TPMA_OBJECT.DECRYPT))

    @property
    def rsa_public_numbers(self) -> tuple[int, int]:
        """(modulus, exponent) of an RSA key."""
        modulus = int.from_bytes(bytes(self.public.unique.rsa), "big")
        return modulus, int(self.public.parameters.rsaDetail.exponent) or 65537

    @property
    def is_transient(self) -> bool:
        return self.blob is not None


class KeyCache:
    """Keys by key id, least recently used first."""

    def __init__(self) -> None:
        self._keys: collections.OrderedDict[bytes, CachedKey] = collections.OrderedDict()

    def get(self, key_id: bytes) -> CachedKey | None:
        return self._keys.get(key_id)

    def add(self, key: CachedKey) -> None:
        self._keys[key.info.key_id] = key

    def remove(self, key_id: bytes) -> CachedKey | None:
        return self._keys.pop(key_id, None)

    def touch(self, key_id: bytes) -> None:
        self._keys.move_to_end(key_id)

    def pop_oldest(self) -> CachedKey:
        """Forget the least recently used key (and return it)."""
        return self._keys.popitem(last=False)[1]

    def resident(self) -> Iterator[CachedKey]:
        """Keys with a handle in the TPM now, least recently used first."""
        return (key for key in list(self._keys.values()) if key.handle is not None)

    def remove_persistent(self, handle: int) -> list[CachedKey]:
        """Forget the keys loaded by persistent handle `handle` (it was evicted)."""
        gone = [key for key in self._keys.values() if key.persistent_handle == handle]
        for key in gone:
            del self._keys[key.info.key_id]
        return gone

    def __iter__(self) -> Iterator[CachedKey]:
        """Every key, least recently used first."""
        return iter(list(self._keys.values()))

    def forget_handles(self) -> None:
        """The ESAPI context is gone: nothing is loaded any more as far as we know."""
        for key in self._keys.values():
            key.handle = None

    def __len__(self) -> int:
        return len(self._keys)
