"""Roughtime keys: the long-term root key and the online key it delegates to.

The root key is the server's identity, the thing clients pin, and should
live offline: it only ever signs delegations (section 5.2.6). It is kept as
an unencrypted PKCS#8 PEM file with mode 0600, readable by ``openssl pkey``.

A delegation is what a serving host needs and nothing more: a fresh online
key, and the CERT in which the root key vouches for that key between MINT
and MAXT (POSIX seconds). Its JSON file (mode 0600 too, since it holds the
online private key) also records the root's public key, so loading it checks
the whole chain before the server answers anyone. Loading either file
refuses one that group or others can read.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from udptime.roughtime import wire

DELEGATION_FORMAT = "udptime-roughtime-delegation"
DELEGATION_FILE_VERSION = 1


class KeyFileError(Exception):
    """A key or delegation file that cannot be written, read or trusted."""


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _seed(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def generate_key() -> Ed25519PrivateKey:
    """A key made per RFC 8032 section 5.1.5 (as section 9.3 requires)."""
    return Ed25519PrivateKey.generate()


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise KeyFileError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise KeyFileError(f"cannot write {path}: {e.strerror}") from None


def _read_private(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise KeyFileError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600"
        )
    return data


def write_root_key(
    path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False
) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem, overwrite=overwrite)


def load_root_key(path: Path) -> Ed25519PrivateKey:
    data = _read_private(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"{path}: not an unencrypted PEM private key ({e})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


@dataclass(frozen=True)
class Delegation:
    """An online key and the CERT that vouches for it; pure and immutable."""

    root_public_key: bytes
    online_key: Ed25519PrivateKey
    mint: int
    maxt: int
    cert: bytes

    @property
    def srv(self) -> bytes:
        """The SRV value that names this server's root key."""
        return wire.srv_value(self.root_public_key)

    def valid_at(self, seconds: int) -> bool:
        return self.mint <= seconds <= self.maxt

    def sign(self, srep: bytes) -> bytes:
        """The response signature over an SREP value."""
        return self.online_key.sign(wire.RESPONSE_CONTEXT + srep)


def delegate(
    root: Ed25519PrivateKey,
    mint: int,
    maxt: int,
    online: Ed25519PrivateKey | None = None,
) -> Delegation:
    """A fresh (or the given) online key, vouched for from *mint* to *maxt*."""
    if not 0 <= mint <= maxt < 1 << 64:
        raise ValueError("a delegation needs 0 <= MINT <= MAXT < 2**64")
    online = online if online is not None else generate_key()
    dele = wire.encode_dele(public_bytes(online), mint, maxt)
    cert = wire.encode_cert(dele, root.sign(wire.DELEGATION_CONTEXT + dele))
    return Delegation(public_bytes(root), online, mint, maxt, cert)


def check_delegation(
    root_public_key: bytes, online: Ed25519PrivateKey, cert: bytes
) -> Delegation:
    """The delegation *cert* makes, if it is the root's word for *online*."""
    try:
        pairs = wire.decode_message(cert)
        dele = pairs[wire.DELE]
        signature = pairs[wire.SIG]
        fields = wire.decode_message(dele)
        public_key = fields[wire.PUBK]
        mint = wire.read_u64(fields[wire.MINT], "MINT")
        maxt = wire.read_u64(fields[wire.MAXT], "MAXT")
    except (wire.WireError, KeyError) as e:
        raise ValueError(f"malformed CERT ({e})") from None
    if public_key != public_bytes(online):
        raise ValueError("CERT vouches for another online key")
    if mint > maxt:
        raise ValueError("CERT has MINT after MAXT")
    try:
        Ed25519PublicKey.from_public_bytes(root_public_key).verify(
            signature, wire.DELEGATION_CONTEXT + dele
        )
    except (InvalidSignature, ValueError):
        raise ValueError("CERT is not signed by the root key") from None
    return Delegation(root_public_key, online, mint, maxt, cert)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_delegation(
    path: Path, delegation: Delegation, *, overwrite: bool = True
) -> None:
    document = {
        "format": DELEGATION_FORMAT,
        "version": DELEGATION_FILE_VERSION,
        "root_public_key": _b64(delegation.root_public_key),
        "online_private_key": _b64(_seed(delegation.online_key)),
        "mint": delegation.mint,
        "maxt": delegation.maxt,
        "cert": _b64(delegation.cert),
    }
    text = json.dumps(document, indent=2) + "\n"
    _write_private(path, text.encode("ascii"), overwrite=overwrite)


def load_delegation(path: Path) -> Delegation:
    """The delegation in *path*, its chain checked; :class:`KeyFileError` if not."""
    data = _read_private(path)
    try:
        document = json.loads(data)
        if document.get("format") != DELEGATION_FORMAT:
            raise ValueError("not a udptime Roughtime delegation file")
        if document.get("version") != DELEGATION_FILE_VERSION:
            raise ValueError(f"unknown file version {document.get('version')!r}")
        root = base64.b64decode(document["root_public_key"], validate=True)
        seed = base64.b64decode(document["online_private_key"], validate=True)
        cert = base64.b64decode(document["cert"], validate=True)
        online = Ed25519PrivateKey.from_private_bytes(seed)
        delegation = check_delegation(root, online, cert)
        if (delegation.mint, delegation.maxt) != (document["mint"], document["maxt"]):
            raise ValueError("mint/maxt disagree with the CERT")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
        raise KeyFileError(f"{path}: {e}") from None
    return delegation
