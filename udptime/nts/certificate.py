"""The NTS-KE certificate and key as operators handle them: files, dates, renewals.

OpenSSL's own file loading prompts on the terminal for an encrypted key (a
server started by systemd then hangs) and reports a missing file as an error
tuple that names neither the file nor the reason. Here both files are read
once, parsed with ``cryptography``, and every problem is a
:class:`CertificateError` whose message is one line naming the file and what
is wrong with it; the TLS context is then built from what was parsed, so the
checked pair is the served pair. Dates are checked separately
(:func:`validity_problem`): an expired certificate is served with a warning,
since a renewal and a SIGHUP mend it without a restart
(:class:`CertificateService`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    ec,
    ed448,
    ed25519,
    rsa,
)
from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

#: Warn this many days before the certificate expires (ACME renews at 30).
DEFAULT_WARN_DAYS = 14

_DAY = 86400.0
_KeyTypes = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class CertificateError(ValueError):
    """The certificate or key cannot be served; the message is one line."""


@dataclass(frozen=True)
class CertificatePair:
    """A certificate chain (leaf first) and the private key of its leaf."""

    cert_path: str
    key_path: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def describe(self) -> str:
        """The subject and the expiry, for log lines."""
        return f"{self.leaf.subject.rfc4514_string() or 'no subject'}, valid until {_date(self.not_after)}"


def _date(timestamp: float) -> str:
    when = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateError(
            f"{option} {path!r}: cannot read it: {exc.strerror or exc}"
        ) from None


def load_pair(cert_path: str, key_path: str) -> CertificatePair:
    """Read and check a PEM certificate chain and its unencrypted PEM key.

    The files may be one and the same (key and chain together). Raises
    :class:`CertificateError`; never prompts for a pass phrase.
    """
    cert_data = _read("--tls-cert", cert_path)
    key_data = cert_data if key_path == cert_path else _read("--tls-key", key_path)
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_data))
    except ValueError:
        raise CertificateError(
            f"--tls-cert {cert_path!r}: no PEM certificate in it "
            "(expected -----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertificateError(
            f"--tls-key {key_path!r}: the key is encrypted with a pass phrase, "
            "which a server cannot be asked for: store it unencrypted, "
            "readable by the server only (chmod 600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        detail = str(exc).split(". ")[0]
        raise CertificateError(
            f"--tls-key {key_path!r}: no usable PEM private key in it ({detail})"
        ) from None
    if not isinstance(key, _KeyTypes):
        raise CertificateError(
            f"--tls-key {key_path!r}: a {type(key).__name__} cannot sign TLS"
        )
    if _public(key.public_key()) != _public(chain[0].public_key()):
        raise CertificateError(
            f"--tls-key {key_path!r} is not the key of the certificate in "
            f"--tls-cert {cert_path!r} (a renewal replaces both files: "
            "are they from the same one?)"
        )
    return CertificatePair(cert_path, key_path, chain, key)


def _public(public_key: object) -> bytes:
    encode = getattr(public_key, "public_bytes", None)
    if encode is None:
        return b""
    data: bytes = encode(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def validity_problem(
    pair: CertificatePair, now: float, warn_days: float = DEFAULT_WARN_DAYS
) -> str | None:
    """What an operator must hear about the dates at *now*, or ``None``."""
    where = f"NTS-KE certificate {pair.cert_path!r} ({pair.describe()})"
    if now < pair.not_before:
        return (
            f"{where} is not valid until {_date(pair.not_before)}: "
            "clients refuse it (is the clock right?)"
        )
    if now >= pair.not_after:
        return f"{where} has expired: clients refuse it; renew it and send SIGHUP"
    left = pair.not_after - now
    if left < warn_days * _DAY:
        return f"{where} expires in {left / _DAY:.1f} days: renew it and send SIGHUP"
    return None


#: How often a running server looks at the dates again.
DEFAULT_CHECK_INTERVAL = 6 * 3600.0


class CertificateService(service.Service):
    """The certificate being served: warns about its dates, reloads it on SIGHUP.

    *install* puts a pair into service (builds the TLS context new handshakes
    use); it may raise :class:`CertificateError`. The dates are checked at
    start and every *check_interval* seconds, so a server nobody restarts
    still says, *warn_days* ahead, that its certificate is about to expire.
    """

    log = Logger()

    def __init__(
        self,
        pair: CertificatePair,
        install: Callable[[CertificatePair], None],
        clock: IReactorTime,
        *,
        warn_days: float = DEFAULT_WARN_DAYS,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        self.pair = pair
        self._install = install
        self._clock = clock
        self.warn_days = warn_days
        self.check_interval = check_interval
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    @property
    def expiry(self) -> float:
        """When the served certificate expires (Unix seconds), for the metric."""
        return self.pair.not_after

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.check_interval, now=True)

    def stopService(self) -> None:
        if self._loop.running:
            self._loop.stop()
        super().stopService()  # type: ignore[no-untyped-call]

    def check(self) -> str | None:
        """Log a warning about the served certificate's dates, if there is one."""
        problem = validity_problem(self.pair, self._clock.seconds(), self.warn_days)
        if problem is not None:
            self.log.emit(LogLevel.warn, "{problem}", problem=problem)
        return problem

    def reload(self) -> str:
        """Read the files again and serve them; on any error keep the old pair.

        A SIGHUP reloader: the result says what new handshakes now present.
        """
        old = self.pair
        pair = load_pair(old.cert_path, old.key_path)
        self._install(pair)
        self.pair = pair
        problem = self.check()
        same = " (unchanged)" if pair.leaf == old.leaf else ""
        warning = "; but see the warning above" if problem else ""
        return f"new handshakes present {pair.describe()}{same}{warning}"
