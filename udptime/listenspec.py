"""Parsing ``--listen`` values: which format to serve on which address and port."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: The host of a listener that adopts a socket from systemd (``ntp@systemd:0``);
#: its port is then the index among the sockets systemd passed.
SYSTEMD = "systemd"


class ListenSpecError(ValueError):
    """A ``--listen`` value, port or address that cannot be served."""


@dataclass(frozen=True)
class ListenSpec:
    """One listener: *format* served on UDP *host*:*port* (``""`` is all IPv4)."""

    format: str
    host: str
    port: int

    def describe(self) -> str:
        if self.host == SYSTEMD:
            return f"{self.format}@{SYSTEMD}:{self.port}"
        host = self.host or "0.0.0.0"
        return (
            f"{self.format}@[{host}]:{self.port}"
            if ":" in host
            else (f"{self.format}@{host}:{self.port}")
        )


def parse_port(text: str) -> int:
    """A UDP port number 0-65535 (0 lets the kernel pick one)."""
    try:
        port = int(text, 10)
    except ValueError:
        raise ListenSpecError(f"port must be a number, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise ListenSpecError(f"port {port} is out of range 0-65535")
    return port


def parse_host(text: str) -> str:
    """An IPv4 or IPv6 literal; ``""`` means every IPv4 address."""
    if text == "":
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ListenSpecError(
            f"interface must be an IPv4 or IPv6 address, not {text!r}"
        ) from None


def parse_listen(text: str) -> tuple[str, str, int]:
    """Split ``FORMAT@PORT``, ``FORMAT@HOST:PORT``, ``FORMAT@[IPV6]:PORT`` or
    ``FORMAT@systemd:N`` (the N-th socket passed by systemd, counting from 0).

    Returns ``(format, host, port)``; the caller checks the format name
    against the registry so this stays free of it.
    """
    fmt, at, where = text.partition("@")
    if not at or not fmt or not where:
        raise ListenSpecError(
            f"--listen {text!r}: expected FORMAT@PORT, FORMAT@HOST:PORT "
            "or FORMAT@[IPV6]:PORT"
        )
    if where.startswith("["):
        host, bracket, rest = where[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ListenSpecError(
                f"--listen {text!r}: an IPv6 address is written [ADDRESS]:PORT"
            )
        port_text = rest[1:]
        if ":" not in host:
            raise ListenSpecError(f"--listen {text!r}: {host!r} is not IPv6")
    elif ":" in where:
        host, _, port_text = where.rpartition(":")
        if ":" in host:
            raise ListenSpecError(
                f"--listen {text!r}: put an IPv6 address in brackets, "
                "FORMAT@[ADDRESS]:PORT"
            )
        if not host:
            raise ListenSpecError(f"--listen {text!r}: empty address before the port")
    else:
        host, port_text = "", where
    if host == SYSTEMD:
        if not port_text.isdigit() or int(port_text) > 1000:
            raise ListenSpecError(
                f"--listen {text!r}: systemd:N takes a socket index 0, 1, ..."
            )
        return fmt, SYSTEMD, int(port_text)
    try:
        return fmt, parse_host(host), parse_port(port_text)
    except ListenSpecError as exc:
        raise ListenSpecError(f"--listen {text!r}: {exc}") from None
