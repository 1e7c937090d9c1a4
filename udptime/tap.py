"""The one wiring: command-line ``Options`` and ``makeService`` for twistd and the .tac."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.application import service
from twisted.python import usage

from udptime.formats import Settings, format_names, get_format
from udptime.listener import TimeListener
from udptime.listenspec import (
    SYSTEMD,
    ListenSpec,
    ListenSpecError,
    parse_host,
    parse_listen,
    parse_port,
)
from udptime.protocol import TimeProtocol

DEFAULT_PORT = 20000


def _coerce(parse: Any) -> Any:
    """Turn a parser's ``ListenSpecError`` into the ``UsageError`` twistd prints."""

    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ListenSpecError as exc:
            raise usage.UsageError(str(exc)) from None

    coerce.coerceDoc = getattr(parse, "coerceDoc", "")  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the current time over UDP: ctime text (the default, as the "
        "socketserver recipe), RFC 867 daytime or RFC 868 time."
    )

    optFlags: ClassVar[list[list[str]]] = [
        [
            "verbose",
            "v",
            "Log every request (off by default: floods stay out of the log).",
        ],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", DEFAULT_PORT, "UDP port to serve.", _coerce(parse_port)],
        [
            "interface",
            "i",
            "",
            (
                "Address to bind: default all IPv4; '::' serves IPv6 (and IPv4 "
                "where the OS maps it)."
            ),
            _coerce(parse_host),
        ],
        ["format", "f", "ctime", "Reply format: " + ", ".join(format_names()) + "."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """FORMAT@PORT, FORMAT@HOST:PORT or FORMAT@[IPV6]:PORT; repeatable.
        Replaces --port/--interface/--format."""
        try:
            fmt, host, port = parse_listen(value)
        except ListenSpecError as exc:
            raise usage.UsageError(str(exc)) from None
        self["listen"].append(ListenSpec(fmt, host, port))

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [
                ListenSpec(self["format"], self["interface"], self["port"])
            ]
        for spec in self["listen"]:
            try:
                get_format(spec.format)
            except KeyError as exc:
                raise usage.UsageError(exc.args[0]) from None
        seen: set[tuple[str, int]] = set()
        for spec in self["listen"]:
            key = (spec.host, spec.port)
            if (spec.port or spec.host == SYSTEMD) and key in seen:
                raise usage.UsageError(f"{spec.describe()}: address given twice")
            seen.add(key)

    @property
    def listeners(self) -> list[ListenSpec]:
        return list(self["listen"])


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """A ``MultiService`` with one UDP listener per ``ListenSpec``.

    *reactor* defaults to the global one, imported here rather than at module
    level so that loading the plugin never installs a reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = service.MultiService()
    settings = Settings(wall_clock=reactor.seconds)
    for spec in options.listeners:
        fmt = get_format(spec.format)
        protocol = TimeProtocol(
            fmt.make_responder(settings),
            reactor,
            format_name=fmt.name,
            verbose=bool(options["verbose"]),
        )
        listener = TimeListener(protocol, spec, reactor)
        listener.setName(spec.describe())  # type: ignore[no-untyped-call]
        listener.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
