"""The client's half of Roughtime, pure: requests, full verification of
replies, server lists, chained nonces and malfeasance reports.

A reply is trusted only through the long-term key the client already has
(section 5.4): that key signs the DELE, the DELE's key signs the SREP, the
SREP's ROOT must be reached from the client's own request packet along PATH
and INDX, and MIDP must lie within MINT..MAXT. Anything else raises
:class:`VerificationError`; tags the client does not know are ignored
(section 7's grease).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from udptime.roughtime import wire
from udptime.roughtime.merkle import root_from_path

PUBLIC_KEY_TYPE = "ed25519"


class VerificationError(Exception):
    """A reply that does not prove what it claims; ``reason`` says which check."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServerListError(ValueError):
    """A server list or malfeasance report not in the RFC's JSON format."""


def make_request(
    nonce: bytes | None = None,
    *,
    public_key: bytes | None = None,
    versions: Sequence[int] = wire.SUPPORTED_VERSIONS,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """A request packet; with *public_key* it names the server (SRV)."""
    if nonce is None:
        nonce = random(wire.NONCE_SIZE)
    srv = wire.srv_value(public_key) if public_key is not None else None
    return wire.encode_request(nonce, versions=versions, srv=srv)


@dataclass(frozen=True, slots=True)
class Verified:
    """A valid reply: true time was within (midpoint - radius,
    midpoint + radius) while the server processed the request."""

    midpoint: int
    radius: int
    version: int
    response: wire.Response

    @property
    def earliest(self) -> int:
        return self.midpoint - self.radius

    @property
    def latest(self) -> int:
        return self.midpoint + self.radius


def _verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_response(
    request: bytes,
    response: bytes,
    public_key: bytes,
    *,
    response_context: bytes = wire.RESPONSE_CONTEXT,
    delegation_context: bytes = wire.DELEGATION_CONTEXT,
) -> Verified:
    """Check *response* to *request* against the server's long-term key.

    The context strings are parameters only so that draft-era vectors
    (RFC 10049 Appendix B) can be checked; leave them alone otherwise.
    """
    try:
        sent = wire.decode_message(wire.decode_packet(request))
        offered = wire.read_u32_list(sent[wire.VER], "VER")
        nonce = sent[wire.NONC]
    except (wire.WireError, KeyError) as e:
        raise ValueError(f"not a request we could have sent: {e}") from None
    try:
        reply = wire.parse_response(response)
    except wire.WireError as e:
        raise VerificationError(f"malformed response: {e}", "format") from None
    if reply.nonce != nonce:
        raise VerificationError("NONC is not our nonce", "nonce")
    if reply.version not in offered or reply.version not in wire.SUPPORTED_VERSIONS:
        raise VerificationError(
            f"version {reply.version:#x} was not offered", "version"
        )
    if reply.version not in reply.versions:
        raise VerificationError("VERS lacks the reply's version", "version")
    if reply.radius == 0:
        raise VerificationError("RADI is zero", "radius")
    if not _verify_signature(
        public_key, reply.cert_signature, delegation_context + reply.dele
    ):
        raise VerificationError("DELE not signed by the long-term key", "delegation")
    if not _verify_signature(
        reply.public_key, reply.signature, response_context + reply.srep
    ):
        raise VerificationError("SREP not signed by the delegated key", "signature")
    if root_from_path(request, reply.index, reply.path) != reply.root:
        raise VerificationError("our request is not under ROOT", "merkle")
    if not reply.mint <= reply.midpoint <= reply.maxt:
        raise VerificationError("MIDP outside MINT..MAXT", "delegation-window")
    return Verified(reply.midpoint, reply.radius, reply.version, reply)


# Chained queries and malfeasance reports (sections 8.2 and 8.4).


def chained_nonce(previous_response: bytes, rand: bytes) -> bytes:
    """The nonce of the next query in a chain: ``H(resp || rand)``."""
    if len(rand) != 32:
        raise ValueError("rand is 32 bytes")
    return wire.digest(previous_response + rand)


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One query of a measurement sequence, as a report carries it."""

    public_key: bytes
    request: bytes
    response: bytes
    rand: bytes | None = None


def inconsistencies(results: Sequence[Verified]) -> list[tuple[int, int]]:
    """Pairs (i, j), i received before j, that break causal order:
    ``MIDP_i - RADI_i > MIDP_j + RADI_j``."""
    return [
        (i, j)
        for i in range(len(results))
        for j in range(i + 1, len(results))
        if results[i].earliest > results[j].latest
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def malfeasance_report(links: Sequence[ChainLink]) -> dict[str, Any]:
    """The report object of section 8.4.1 (``application/roughtime-malfeasance+json``)."""
    responses = []
    for link in links:
        entry = {}
        if link.rand is not None:
            entry["rand"] = _b64(link.rand)
        entry["publicKey"] = _b64(link.public_key)
        entry["request"] = _b64(link.request)
        entry["response"] = _b64(link.response)
        responses.append(entry)
    return {"responses": responses}


def _decode_b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ServerListError(f"{what} is not a string")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ServerListError(f"{what} is not base64") from None


def parse_report(document: Mapping[str, Any]) -> list[ChainLink]:
    """The links of a malfeasance report object."""
    entries = document.get("responses") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ServerListError("a report has a non-empty list of responses")
    links = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ServerListError(f"response {n} is not an object")
        rand = entry.get("rand")
        if rand is None and n:
            raise ServerListError(f"response {n} has no rand")
        links.append(
            ChainLink(
                public_key=_decode_b64(entry.get("publicKey"), "publicKey"),
                request=_decode_b64(entry.get("request"), "request"),
                response=_decode_b64(entry.get("response"), "response"),
                rand=None if rand is None else _decode_b64(rand, "rand"),
            )
        )
    return links


def verify_chain(
    links: Sequence[ChainLink],
    *,
    response_context: bytes = wire.RESPONSE_CONTEXT,
    delegation_context: bytes = wire.DELEGATION_CONTEXT,
) -> list[Verified]:
    """Every reply verified and every nonce after the first derived from the
    reply before it; what a report must pass to prove anything."""
    results = []
    previous: bytes | None = None
    for n, link in enumerate(links):
        if previous is not None:
            if link.rand is None:
                raise VerificationError(f"link {n} has no rand", "chain")
            nonce = wire.decode_message(wire.decode_packet(link.request)).get(wire.NONC)
            if nonce != chained_nonce(previous, link.rand):
                raise VerificationError(f"link {n}'s nonce is not chained", "chain")
        results.append(
            verify_response(
                link.request,
                link.response,
                link.public_key,
                response_context=response_context,
                delegation_context=delegation_context,
            )
        )
        previous = link.response
    return results


# Server lists (section 8.3, ``application/roughtime-server+json``).


@dataclass(frozen=True, slots=True)
class Address:
    protocol: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ServerEntry:
    name: str
    version: int
    public_key_type: str
    public_key: bytes
    addresses: tuple[Address, ...]

    @property
    def usable(self) -> bool:
        """Whether this client can check the server's replies."""
        return self.public_key_type == PUBLIC_KEY_TYPE and len(self.public_key) == 32


@dataclass(frozen=True, slots=True)
class ServerList:
    servers: tuple[ServerEntry, ...]
    sources: tuple[str, ...]
    reports: str | None


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as the RFC writes them."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ServerListError(f"bad address {text!r}")
        try:
            if "%" in host:  # zone identifiers are not allowed
                raise ValueError(host)
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ServerListError(f"bad IPv6 address in {text!r}") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ServerListError(f"bad address {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or not port.isascii():
        raise ServerListError(f"bad port in {text!r}")
    return host, int(port)


def _server(n: int, entry: object) -> ServerEntry:
    if not isinstance(entry, Mapping):
        raise ServerListError(f"server {n} is not an object")
    name = entry.get("name")
    version = entry.get("version")
    key_type = entry.get("publicKeyType")
    addresses = entry.get("addresses")
    if not isinstance(name, str) or not isinstance(key_type, str):
        raise ServerListError(f"server {n}: name and publicKeyType are strings")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ServerListError(f"server {n}: version is an integer")
    if not isinstance(addresses, list):
        raise ServerListError(f"server {n}: addresses is a list")
    key = _decode_b64(entry.get("publicKey"), f"server {n} publicKey")
    if key_type == PUBLIC_KEY_TYPE and len(key) != 32:
        raise ServerListError(f"server {n}: an ed25519 key is 32 bytes")
    parsed = []
    for address in addresses:
        if not isinstance(address, Mapping):
            raise ServerListError(f"server {n}: an address is an object")
        protocol = address.get("protocol")
        text = address.get("address")
        if protocol not in ("udp", "tcp") or not isinstance(text, str):
            raise ServerListError(f"server {n}: bad address {address!r}")
        parsed.append(Address(protocol, *parse_address(text)))
    return ServerEntry(name, version, key_type, key, tuple(parsed))


def parse_server_list(text: str | bytes) -> ServerList:
    try:
        document = json.loads(text)
    except ValueError as e:
        raise ServerListError(f"not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("servers"), list):
        raise ServerListError("a server list is an object with a list of servers")
    sources = document.get("sources", [])
    reports = document.get("reports")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ServerListError("sources is a list of URLs")
    if reports is not None and not isinstance(reports, str):
        raise ServerListError("reports is a URL")
    servers = tuple(_server(n, e) for n, e in enumerate(document["servers"]))
    return ServerList(servers, tuple(sources), reports)


def server_entry(
    name: str, public_key: bytes, addresses: Sequence[tuple[str, str, int]]
) -> dict[str, Any]:
    """This server's entry for a server list; *addresses* are
    (protocol, host, port), IPv6 hosts bare (they are bracketed here)."""

    def address(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    return {
        "name": name,
        "version": wire.VERSION_1,
        "publicKeyType": PUBLIC_KEY_TYPE,
        "publicKey": _b64(public_key),
        "addresses": [
            {"protocol": protocol, "address": address(host, port)}
            for protocol, host, port in addresses
        ],
    }
