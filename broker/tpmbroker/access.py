"""Per-key access control: which peers may use which keys (`tpmbroker serve --policy`).

The policy file is TOML:

    default = "deny"                  # keys not named below: "allow" (the default) or "deny"

    [keys.ca]                         # the name appears in the audit log
    file = "/etc/tpmbroker/ca.pem"    # or key_id = "hex…" or handle = 0x81000001
    uids = ["root", 1000]             # user names or numbers
    gids = ["pki"]                    # groups, primary or supplementary
    executables = ["/usr/bin/openssl"]
    operations = ["sign"]             # what it may do: sign, decrypt, derive (default: all)

A key entry names one key, by exactly one of `file`, `key_id` or `handle`. A peer may use
the key if its uid is in `uids` or one of its groups in `gids` (any admitted peer when both
are absent), and, when `executables` is given, its /proc/PID/exe is one of them. Root is
not exempt. Several entries naming the same key each grant it. A key named by no entry is
allowed or refused by `default`.

`operations` says what an admitted peer may do with the key: "sign" (SIGN, SIGN_MESSAGE),
"decrypt" (DECRYPT) and "derive" (DERIVE, ECDH). Without it, every operation the key's TPM
attributes allow, so a file written before `operations` keeps its meaning. With a key
that can also sign, RSA decryption without padding is a signature by another name
(m^d mod n), and PKCS#1 v1.5 decryption that reports bad padding (implicit rejection
off) is a Bleichenbacher oracle that computes m^d too: both need "sign" as well as
"decrypt". Entries for the same key add up: a peer gets the operations of every entry
that admits it. A peer may LOAD a key it is admitted to even with `operations = []` (it
reads the public key); each operation is checked when it is asked for.

Keys named by `file` are recognised by their public key, whatever the bytes a client sends
(another encoding of the same key is the same key); `key_id` names exact LOAD bytes, and
`handle` a persistent handle.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from .definitions import KeySource
from .errors import TpmBrokerError
from .protocol import key_id_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_ENTRY_FIELDS = {"file", "key_id", "handle", "uids", "gids", "executables", "operations"}

# The rights a key entry grants (`operations`): SIGN and SIGN_MESSAGE need "sign", DECRYPT
# "decrypt", DERIVE "derive".
OPERATIONS = ("sign", "decrypt", "derive")
_WHY_SIGN = (": with a key that can sign, decryption without padding, or PKCS#1 v1.5 "
             "without implicit rejection, gives signatures")


class AccessPolicyError(ValueError):
    """The policy file cannot be used; the message says where."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is asking: what the policy decides on."""

    uid: int
    gids: frozenset[int]
    exe: str | None  # /proc/PID/exe when the broker may read it, else None

    @classmethod
    def of(cls, pid: int, uid: int, gid: int) -> Peer:
        groups = {gid}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
        except OSError:
            pass
        try:
            exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:  # gone, or another user's process and the broker is not root
            exe = None
        return cls(uid, frozenset(groups), exe)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    name: str
    key_ids: frozenset[bytes]
    public_keys: frozenset[bytes]  # SubjectPublicKeyInfo DER
    uids: frozenset[int]
    gids: frozenset[int]
    executables: frozenset[str]
    operations: frozenset[str] = frozenset(OPERATIONS)

    def names(self, key_id: bytes, public_key: bytes) -> bool:
        return key_id in self.key_ids or public_key in self.public_keys

    def admits(self, peer: Peer) -> bool:
        if (self.uids or self.gids) and not (peer.uid in self.uids or peer.gids & self.gids):
            return False
        return not self.executables or peer.exe in self.executables


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    key: str  # the rule's name, or the key id in hex when no rule names the key
    reason: str
    operation: str | None = None  # the right refused; None: the key itself


@dataclasses.dataclass(frozen=True)
class AccessPolicy:
    rules: tuple[KeyRule, ...]
    default_allow: bool = True
    path: str = ""

    def decide(self, peer: Peer, key_id: bytes, public_key: bytes,
               operations: tuple[str, ...] = ()) -> Decision:
        """May `peer` use the key, and do each of `operations` with it (none: LOAD)?"""
        matching = [rule for rule in self.rules if rule.names(key_id, public_key)]
        if not matching:
            return Decision(self.default_allow, key_id.hex()[:16],
                            f"not named in the policy (default {self.default_name})")
        admitting = [rule for rule in matching if rule.admits(peer)]
        who = f"uid {peer.uid}" + (f" ({peer.exe})" if peer.exe else "")
        if not admitting:
            names = ", ".join(rule.name for rule in matching)
            return Decision(False, matching[0].name,
                            f"policy key {names} does not admit {who}")
        granted = frozenset().union(*(rule.operations for rule in admitting))
        for operation in operations:
            if operation not in granted:
                names = ", ".join(rule.name for rule in admitting)
                also = (f"; this {operations[0]} needs {operation} too"
                        + (_WHY_SIGN if operation == "sign" else "")
                        if operation != operations[0] else "")
                return Decision(False, admitting[0].name,
                                f"policy key {names} does not grant {operation} to {who}"
                                f" (operations = [{', '.join(sorted(granted))}]){also}",
                                operation)
        return Decision(True, admitting[0].name, f"policy key {admitting[0].name}")

    def name_of(self, key_id: bytes, public_key: bytes) -> str:
        for rule in self.rules:
            if rule.names(key_id, public_key):
                return rule.name
        return key_id.hex()[:16]

    @property
    def default_name(self) -> str:
        return "allow" if self.default_allow else "deny"


def load_policy(path: str | os.PathLike[str]) -> AccessPolicy:
    """Read and check a policy file; AccessPolicyError says what is wrong and where."""
    where = os.fspath(path)
    try:
        text = Path(where).read_text()
        data = tomllib.loads(text)
    except OSError as exc:
        raise AccessPolicyError(f"{where}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:  # it names the line and column
        raise AccessPolicyError(f"{where}: {exc}") from None
    unknown = set(data) - {"default", "keys"}
    if unknown:
        first = sorted(unknown)[0]
        raise AccessPolicyError(f"{where}:{_line_of(text, first)}: unknown setting(s) "
                                f"{', '.join(sorted(unknown))}")
    default = data.get("default", "allow")
    if default not in ("allow", "deny"):
        raise AccessPolicyError(f"{where}:{_line_of(text, 'default')}: default must be "
                                f"\"allow\" or \"deny\", not {default!r}")
    keys = data.get("keys", {})
    if not isinstance(keys, dict):
        raise AccessPolicyError(f"{where}:{_line_of(text, 'keys')}: keys must be tables "
                                "([keys.NAME])")
    rules = tuple(_rule(f"{where}:{_line_of(text, f'keys.{name}')}", name, entry)
                  for name, entry in keys.items())
    return AccessPolicy(rules, default_allow=default == "allow", path=where)


def _line_of(text: str, key: str) -> int:
    """The line (from 1) that sets `key` or opens the table `[key]`, for errors; the first
    line if it cannot be told."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip().replace(" ", "")
        if stripped.startswith(f"[{key}]") or stripped.startswith(f"{key}="):
            return number
    return 1


def _rule(where: str, name: str, entry: Any) -> KeyRule:
    at = f"{where}: [keys.{name}]"
    if not isinstance(entry, dict):
        raise AccessPolicyError(f"{at} must be a table")
    unknown = set(entry) - _ENTRY_FIELDS
    if unknown:
        raise AccessPolicyError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    named_by = [field for field in ("file", "key_id", "handle") if field in entry]
    if len(named_by) != 1:
        raise AccessPolicyError(f"{at} needs exactly one of file, key_id, handle")
    key_ids: set[bytes] = set()
    public_keys: set[bytes] = set()
    try:
        if "file" in entry:
            der, public_key = _key_file(str(entry["file"]))
            key_ids.add(key_id_for(KeySource.TSS2_DER, der))
            public_keys.add(public_key)
        elif "key_id" in entry:
            key_id = bytes.fromhex(str(entry["key_id"]))
            if len(key_id) != 32:
                raise ValueError("a key id is 32 bytes (64 hex digits)")
            key_ids.add(key_id)
        else:
            handle = entry["handle"]
            handle = int(handle, 0) if isinstance(handle, str) else int(handle)
            if not 0x81000000 <= handle <= 0x81FFFFFF:
                raise ValueError(f"0x{handle:08x} is not a persistent handle")
            key_ids.add(key_id_for(KeySource.PERSISTENT_HANDLE, handle.to_bytes(4, "big")))
        uids = frozenset(_ids(entry.get("uids", []), pwd.getpwnam, "pw_uid"))
        gids = frozenset(_ids(entry.get("gids", []), grp.getgrnam, "gr_gid"))
        exes = entry.get("executables", [])
        if not isinstance(exes, list) or not all(isinstance(e, str) and e.startswith("/")
                                                 for e in exes):
            raise ValueError("executables must be a list of absolute paths")
        operations = entry.get("operations", list(OPERATIONS))
        if not isinstance(operations, list) or not all(isinstance(o, str) for o in operations):
            raise ValueError(f"operations must be a list of {', '.join(OPERATIONS)}")
        unknown_operations = [o for o in operations if o not in OPERATIONS]
        if unknown_operations:
            raise ValueError(f"unknown operation(s) {', '.join(unknown_operations)}: give "
                             f"{', '.join(OPERATIONS)}")
    except (ValueError, KeyError, TypeError, TpmBrokerError) as exc:
        raise AccessPolicyError(f"{at}: {exc}") from None
    return KeyRule(name, frozenset(key_ids), frozenset(public_keys), uids, gids,
                   frozenset(os.path.realpath(e) for e in exes), frozenset(operations))


def _ids(values: Any, lookup: Any, attr: str) -> set[int]:
    if not isinstance(values, list):
        raise ValueError("uids and gids must be lists")
    out = set()
    for value in values:
        if isinstance(value, int):
            out.add(value)
        elif isinstance(value, str):
            out.add(int(getattr(lookup(value), attr)))
        else:
            raise ValueError(f"not a user or group: {value!r}")
    return out


def _key_file(path: str) -> tuple[bytes, bytes]:
    """(DER, SubjectPublicKeyInfo DER) of a TSS2 PRIVATE KEY file."""
    from .keyfile import to_der_if_pem
    from .tpm import keys

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    der = to_der_if_pem(data)
    parsed = keys.parse_tss2_key(der)
    info = keys.key_info(b"", parsed.public.publicArea)
    return der, info.public_key
