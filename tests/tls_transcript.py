"""What a TLS handshake negotiated, read from the messages themselves.

`openssl s_client -msg` dumps every handshake message it sends and receives as hex. The
summary lines s_client prints ("Peer signature type", "Server Temp Key") change wording
between OpenSSL releases; the bytes on the wire do not. This module parses the dump and
reads the server's signature scheme and key-exchange group from the messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HANDSHAKE_SERVER_HELLO = 2
HANDSHAKE_SERVER_KEY_EXCHANGE = 12
HANDSHAKE_CERTIFICATE_VERIFY = 15
EXTENSION_KEY_SHARE = 0x0033

# IANA TLS SignatureScheme and NamedGroup code points the tests name.
SIGNATURE_SCHEMES = {
    0x0401: "rsa_pkcs1_sha256", 0x0501: "rsa_pkcs1_sha384", 0x0601: "rsa_pkcs1_sha512",
    0x0403: "ecdsa_secp256r1_sha256", 0x0503: "ecdsa_secp384r1_sha384",
    0x0603: "ecdsa_secp521r1_sha512",
    0x0804: "rsa_pss_rsae_sha256", 0x0805: "rsa_pss_rsae_sha384",
    0x0806: "rsa_pss_rsae_sha512",
    0x0809: "rsa_pss_pss_sha256", 0x080A: "rsa_pss_pss_sha384", 0x080B: "rsa_pss_pss_sha512",
}
GROUPS = {
    0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1", 0x001D: "x25519",
    0x001E: "x448", 0x11EC: "X25519MLKEM768", 0x11EB: "SecP256r1MLKEM768",
}

_HEADER = re.compile(r"^(<<<|>>>) .*?(Handshake|RecordHeader|ChangeCipherSpec|Alert|"
                     r"ApplicationData|InnerContent)\b.*\[length ([0-9a-fA-F]+)\]")
_HEX_LINE = re.compile(r"^\s+((?:[0-9a-f]{2} ?)+)\s*$")


@dataclass(frozen=True)
class Message:
    received: bool  # by the client, that is: sent by the server
    kind: str  # "Handshake", "RecordHeader", ...
    data: bytes


def parse(dump: str) -> list[Message]:
    """The messages of an `s_client -msg` dump, in order."""
    messages: list[Message] = []
    current: tuple[bool, str] | None = None
    data = bytearray()

    def flush() -> None:
        if current is not None:
            messages.append(Message(current[0], current[1], bytes(data)))

    for line in dump.splitlines():
        header = _HEADER.match(line)
        if header:
            flush()
            current, data = (header.group(1) == "<<<", header.group(2)), bytearray()
            continue
        hex_line = _HEX_LINE.match(line)
        if hex_line and current is not None:
            data += bytes.fromhex(hex_line.group(1))
            continue
        if line.startswith(("<<<", ">>>")):  # a header this parser does not know
            flush()
            current = None
    flush()
    return messages


def from_server(dump: str, handshake_type: int) -> list[bytes]:
    """The bodies of the handshake messages of this type that the server sent."""
    return [m.data[4:] for m in parse(dump)
            if m.received and m.kind == "Handshake" and m.data[:1] == bytes([handshake_type])]


def _server_key_exchange_ecdhe(body: bytes) -> tuple[int, int]:
    """(group, signature scheme) of a TLS 1.2 ECDHE ServerKeyExchange."""
    if body[0] != 3:  # ECCurveType named_curve
        raise ValueError(f"ServerKeyExchange with curve type {body[0]}")
    group = int.from_bytes(body[1:3], "big")
    point_end = 4 + body[3]
    return group, int.from_bytes(body[point_end:point_end + 2], "big")


def signature_scheme(dump: str) -> str:
    """The scheme the server signed the handshake with: TLS 1.3's CertificateVerify or
    TLS 1.2's ECDHE ServerKeyExchange."""
    verify = from_server(dump, HANDSHAKE_CERTIFICATE_VERIFY)
    if verify:
        code = int.from_bytes(verify[-1][:2], "big")
    else:
        exchange = from_server(dump, HANDSHAKE_SERVER_KEY_EXCHANGE)
        if not exchange:
            raise AssertionError("no CertificateVerify or ServerKeyExchange from the server:\n"
                                 + dump)
        code = _server_key_exchange_ecdhe(exchange[-1])[1]
    return SIGNATURE_SCHEMES.get(code, f"0x{code:04x}")


def key_exchange_group(dump: str) -> str:
    """The group of the key exchange: TLS 1.3's key_share in the (last) ServerHello, or
    TLS 1.2's ECDHE ServerKeyExchange."""
    exchange = from_server(dump, HANDSHAKE_SERVER_KEY_EXCHANGE)
    if exchange:
        code = _server_key_exchange_ecdhe(exchange[-1])[0]
        return GROUPS.get(code, f"0x{code:04x}")
    hellos = from_server(dump, HANDSHAKE_SERVER_HELLO)
    if not hellos:
        raise AssertionError("no ServerHello in the transcript:\n" + dump)
    hello = hellos[-1]
    pos = 2 + 32  # legacy_version, random
    pos += 1 + hello[pos]  # legacy_session_id_echo
    pos += 2 + 1  # cipher_suite, legacy_compression_method
    end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
    pos += 2
    while pos < end:
        ext_type = int.from_bytes(hello[pos:pos + 2], "big")
        ext_len = int.from_bytes(hello[pos + 2:pos + 4], "big")
        if ext_type == EXTENSION_KEY_SHARE:
            code = int.from_bytes(hello[pos + 4:pos + 6], "big")
            return GROUPS.get(code, f"0x{code:04x}")
        pos += 4 + ext_len
    raise AssertionError("ServerHello without key_share (not TLS 1.3?):\n" + dump)
