#!/usr/bin/env python3
"""udptime benchmark: throughput, latency and NTP accuracy on loopback.

One command::

    python bench/run.py [--quick] [--out bench/results]

Builds the C load generator and the C ceiling server into ``bench/build/``,
then, one server at a time, starts each server pinned to CPU 1, drives it from
CPU 0 with the closed-loop load generator (same sockets, window and duration
for every server), measures replies/s, the server's CPU and low-load RTT, and
stops it. NTP servers are then queried by independent clients (``chronyd -Q``
and, where port 123 can be bound, ``sntp``) idle and while loaded at half their
measured maximum. Writes ``results.json``, ``results.md`` and ``results.png``
(to ``bench/results/``; a ``--quick`` smoke run to ``bench/build/results-quick/``).
See docs/benchmarks.md.

NTS rows (udptime and chronyd serving RFC 8915) first hold one NTS-KE session
with the server, then replay 64 authenticated requests made from its cookies
and keys (``bench/nts_load.py``, ``loadgen --payload-file``); their replies/s
are compared with plain udptime NTP and with chronyd's NTS.

Roughtime rows (udptime and ``roughly``, an independent Python server, run
by the Python 3.12 that ``UDPTIME_ROUGHTIME_PEER`` or ``.venv-roughtime``
names) get the same load: 64 valid 1024-byte requests
(``bench/roughtime_load.py``) replayed; udptime's signatures per second and
mean batch size come from its ``/metrics`` before and after the measurement.

Which servers run is the ``VARIANTS`` table below. A udptime row whose format
or options the installed udptime does not offer (asked with ``python -m
udptime.describe``) is skipped and the reason recorded. Only
loopback addresses are ever targeted; every process started here is ended on
exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
SERVERS = BENCH / "servers"

LOAD_CPU = 0
SERVER_CPU = 1
LOOPBACK = "127.0.0.1"
#: Loopback addresses for the accuracy phase's port-123 servers (sntp only
#: talks to port 123); one per server so they never collide.
NTP123_HOSTS = {"udptime ntp": "127.0.123.1", "chronyd": "127.0.123.2"}
SOURCE_BASE = "127.1.0.1"
#: Requests rotate over this many source addresses: at 200k requests/s that
#: is ~6/s per source, under the default per-source limit of udptime (10/s).
DEFAULT_SOURCES = 32768

RECIPE = "recipe socketserver"
CEILING = "C ceiling"
CHRONYD = "chronyd"
CHRONYD_NTS = "chronyd + NTS"
UDPTIME_NTP = "udptime ntp"
UDPTIME_NTS = "udptime ntp + NTS"
UDPTIME_ROUGHTIME = "udptime roughtime"
ROUGHLY = "roughly (Python Roughtime)"

NTP_UNIX_OFFSET = 2_208_988_800
#: A round during which other processes kept this much of a CPU busy is
#: "disturbed"; see Profile.max_rounds.
DISTURBED_PCT = 10.0
#: Seconds kept free for the NTP offset phase.
ACCURACY_RESERVE_S = 25.0


# --------------------------------------------------------------------------
# What runs: profiles and the variant table.


@dataclass(frozen=True)
class Profile:
    name: str
    warmup: float  # seconds of load before each measurement, not counted
    duration: float  # seconds measured per round
    rounds: int  # rounds over all servers at least; the best round is reported
    latency_duration: float  # seconds of W=1, K=1 load for RTT percentiles
    sockets: int  # K
    window: int  # W: requests in flight per socket
    sntp_samples: int
    budget_s: float  # the whole run stays under this
    #: Rows whose best round was disturbed (other CPU above DISTURBED_PCT) get
    #: more rounds, up to this many, while the budget lasts.
    max_rounds: int


FULL = Profile(
    name="full",
    warmup=0.5,
    duration=2.5,
    rounds=3,
    latency_duration=1.0,
    sockets=16,
    window=8,
    sntp_samples=10,
    max_rounds=8,
    budget_s=275.0,
)
QUICK = Profile(
    name="quick",
    warmup=0.3,
    duration=1.5,
    rounds=1,
    latency_duration=0.5,
    sockets=16,
    window=8,
    sntp_samples=3,
    max_rounds=1,
    budget_s=58.0,
)


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a server and how to talk to it."""

    name: str
    kind: str  # udptime | recipe_socketserver | recipe_socket | asyncio | chronyd | ceiling | roughly
    payload: str  # "empty" (text formats), "ntp" (48-byte client request), "roughtime"
    fmt: str = "ctime"  # udptime --format
    extra_args: tuple[str, ...] = ()  # further udptime options
    quick: bool = False  # also run under --quick
    accuracy: bool = False  # NTP offset measured with independent clients
    note: str = ""
    cpus: str = ""  # taskset CPU list for the server; default SERVER_CPU
    #: NTS on (RFC 8915): the server gets a self-signed certificate and an
    #: NTS-KE port; the load is authenticated requests from one KE session.
    nts: bool = False


#: NTP rows serve the unsynchronised clock of this machine the way chronyd's
#: ``local stratum 10`` does; without it udptime says LI=3, stratum 16 (as it
#: should), and clients such as sntp and chronyd -Q refuse the reply.
LOCAL = ("--local-stratum", "10")

VARIANTS: tuple[Variant, ...] = (
    Variant(
        "udptime ctime",
        "udptime",
        "empty",
        "ctime",
        quick=True,
        note="defaults (per-source rate limit on; the load spreads over sources)",
    ),
    Variant(
        "udptime ctime, rate limit off",
        "udptime",
        "empty",
        "ctime",
        ("--rate-limit", "off"),
        note="per-source rate limiter switched off",
    ),
    Variant(
        "udptime ctime, access lists",
        "udptime",
        "empty",
        "ctime",
        ("--allow", "127.0.0.0/8", "--allow", "::1/128", "--deny", "10.0.0.0/8"),
        note="defaults plus --allow/--deny lists that admit the load",
    ),
    Variant(
        "udptime ctime, metrics on",
        "udptime",
        "empty",
        "ctime",
        ("--metrics", "0"),
        note="defaults plus Prometheus metrics (latency histogram kept per datagram)",
    ),
    Variant(
        "udptime ctime, portable path",
        "udptime",
        "empty",
        "ctime",
        ("--no-batch",),
        note="Twisted's udp.Port, one recvfrom/sendto per datagram (the path off Linux)",
    ),
    Variant("udptime time", "udptime", "empty", "time", note="RFC 868, defaults"),
    Variant(
        UDPTIME_NTP,
        "udptime",
        "ntp",
        "ntp",
        LOCAL,
        quick=True,
        accuracy=True,
        note="--local-stratum 10, otherwise defaults",
    ),
    Variant(
        "udptime ntp, rate limit off",
        "udptime",
        "ntp",
        "ntp",
        (*LOCAL, "--rate-limit", "off"),
        note="--local-stratum 10, per-source rate limiter switched off",
    ),
    Variant(
        "udptime ntp, 2 workers",
        "udptime",
        "ntp",
        "ntp",
        (*LOCAL, "--workers", "2"),
        cpus="0,1",
        note="--workers 2 on both CPUs, sharing them with the load generator; "
        "server CPU counts the first process only",
    ),
    Variant(
        UDPTIME_NTS,
        "udptime",
        "ntp",
        "ntp",
        LOCAL,
        quick=True,
        nts=True,
        note="--local-stratum 10 and --nts-ke (self-signed P-256 certificate, "
        "keys file in the temp dir), otherwise defaults; load: 64 NTS-authenticated "
        "requests (one cookie, no placeholders) replayed",
    ),
    Variant(
        UDPTIME_ROUGHTIME,
        "udptime",
        "roughtime",
        "roughtime",
        LOCAL,
        quick=True,
        note="--roughtime-key (delegations made by the server), --local-stratum 10, "
        "otherwise defaults; load: 64 valid 1024-byte requests replayed",
    ),
    Variant(
        ROUGHLY,
        "roughly",
        "roughtime",
        note="roughly 0.3.0's own server (asyncio, 5 ms batching window, "
        "--no-grease) under Python 3.12; same load as udptime roughtime",
    ),
    Variant(
        RECIPE,
        "recipe_socketserver",
        "empty",
        quick=True,
        note="recipe's socketserver.UDPServer, per-request print to /dev/null",
    ),
    Variant(
        "recipe socket loop",
        "recipe_socket",
        "empty",
        note="recipe's recvfrom/sendto loop, per-request print to /dev/null",
    ),
    Variant("asyncio ctime", "asyncio", "empty", note="stdlib asyncio, no print"),
    Variant(
        CHRONYD,
        "chronyd",
        "ntp",
        quick=True,
        accuracy=True,
        note="chronyd -x as an NTP server, local stratum 10",
    ),
    Variant(
        CHRONYD_NTS,
        "chronyd",
        "ntp",
        nts=True,
        note="chronyd -x as an NTS server (ntsservercert/ntsserverkey, same "
        "certificate kind), local stratum 10; load as udptime ntp + NTS",
    ),
    Variant(
        CEILING,
        "ceiling",
        "empty",
        quick=True,
        note="C recvmmsg/sendmmsg, batch 64, ctime cached per second",
    ),
)


# --------------------------------------------------------------------------
# Process bookkeeping: everything started here is ended here.


class Processes:
    """Every child started in its own session, ended by its own id."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def start(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        else:
            # The leader is gone; end anything it left in its group.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            with suppress(Exception):
                self.stop(proc, grace=2.0)


PROCS = Processes()


class Clock:
    """The run's deadline: steps that would not fit are skipped, not started."""

    def __init__(self, budget: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


# --------------------------------------------------------------------------
# Tools, pinning, ports, probes.


def twistd_path() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("twistd")
    if found is None:
        raise SystemExit("bench: no twistd beside this Python or on PATH")
    return found


def pinning_available() -> bool:
    if shutil.which("taskset") is None:
        return False
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - non-Linux
        return False
    return {LOAD_CPU, SERVER_CPU} <= cpus


PINNED = pinning_available()
#: Raised priority for the server and the load generator when we may (root):
#: other work on a shared machine then disturbs the measurement less.
NICE: int | None = -10 if os.geteuid() == 0 and shutil.which("nice") else None


def pin(cpu: int | str, cmd: Sequence[str]) -> list[str]:
    """*cmd* pinned to *cpu* (when possible) at the benchmark's priority."""
    out = ["taskset", "-c", str(cpu), *cmd] if PINNED else list(cmd)
    return ["nice", "-n", str(NICE), *out] if NICE is not None else out


def cpu_busy_ticks() -> int | None:
    """Busy clock ticks of the two benchmark CPUs so far, from /proc/stat."""
    wanted = {f"cpu{LOAD_CPU}", f"cpu{SERVER_CPU}"}
    total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            ticks = [int(v) for v in parts[1:]]
            total += sum(ticks[:8]) - ticks[3] - ticks[4]  # less idle, iowait
    return total


def free_udp_port() -> int:
    """A port free on every IPv4 address (the recipes bind ``''``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def can_bind(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((host, port))
    except OSError:
        return False
    return True


def ntp_request() -> bytes:
    now = time.time() + NTP_UNIX_OFFSET
    sec = int(now)
    frac = int((now - sec) * 2**32) & 0xFFFFFFFF
    return bytes([0x23]) + bytes(39) + struct.pack("!II", sec, frac)


def probe_once(host: str, port: int, payload: str, timeout: float) -> bytes | None:
    data = ntp_request() if payload == "ntp" else b""
    if payload == "roughtime":
        from roughtime_load import make_request

        data = make_request()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(data, (host, port))
            reply, _ = sock.recvfrom(2048)
        except OSError:
            return None
    return reply


class StartError(Exception):
    pass


class Interrupted(Exception):
    """SIGTERM arrived: stop measuring, end the servers, write what we have."""


def wait_ready(
    proc: subprocess.Popen[Any], host: str, port: int, payload: str, deadline: float
) -> float:
    """Poll with a real query until the server answers; seconds it took."""
    t0 = time.monotonic()
    end = t0 + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise StartError(f"exited with status {proc.returncode} before answering")
        reply = probe_once(host, port, payload, timeout=0.1)
        if reply:
            if payload == "ntp" and (len(reply) < 48 or reply[0] & 7 != 4):
                raise StartError(f"answered a probe with a non-NTP reply {reply[:8]!r}")
            return time.monotonic() - t0
    raise StartError(f"no answer to a probe within {deadline:.0f} s")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of *pid* from /proc/PID/stat, in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:].strip()


# --------------------------------------------------------------------------
# Building the C parts.


def build_c() -> dict[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: a C compiler (cc) is needed for the load generator")
    BUILD.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for name, src, libs in (
        ("loadgen", BENCH / "loadgen.c", ["-lm"]),
        ("ceiling", SERVERS / "ceiling.c", []),
    ):
        exe = BUILD / name
        cmd = [cc, "-O2", "-Wall", "-o", str(exe), str(src), *libs]
        result = subprocess.run(
            cmd, capture_output=True, check=False, text=True, timeout=120
        )
        if result.returncode != 0:
            raise SystemExit(f"bench: building {name} failed:\n{result.stderr}")
        out[name] = shlex.join(cmd)
    return out


# --------------------------------------------------------------------------
# udptime capabilities.


def udptime_description(twistd: str) -> tuple[dict[str, Any] | None, str]:
    """What the udptime beside *twistd* accepts, or ``None`` and why not.

    Asks its configuration (``python -m udptime.describe``: option
    names and formats as JSON) with the Python that runs *twistd*.
    """
    python = os.path.join(os.path.dirname(twistd), "python")
    if not os.access(python, os.X_OK):
        python = sys.executable
    command = [python, "-m", "udptime.describe"]
    result = subprocess.run(
        command, capture_output=True, check=False, text=True, timeout=60
    )
    why = f"installed udptime cannot describe its options ({shlex.join(command)}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        return None, f"{why}: {lines[-1]})"
    try:
        description = json.loads(result.stdout)
        if not isinstance(description["formats"], list):
            raise TypeError("formats is not a list")
        if not isinstance(description["options"], dict):
            raise TypeError("options is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"{why}: unexpected output, {exc})"
    return description, ""


def unsupported(variant: Variant, description: dict[str, Any]) -> str | None:
    """Why the described udptime cannot run *variant*, or None if it can."""
    if variant.kind != "udptime":
        return None
    formats = description["formats"]
    if variant.fmt not in formats:
        return (
            f"installed udptime has no --format {variant.fmt} "
            f"(it has: {', '.join(formats)})"
        )
    options = [a.split("=", 1)[0] for a in variant.extra_args if a.startswith("--")]
    if variant.nts:
        options += ["--nts-ke", "--tls-cert", "--tls-key", "--nts-keys"]
    for name in options:
        if name not in description["options"]:
            return f"installed udptime has no {name} option"
    return None


def udptime_skip_reasons(twistd: str, variants: Sequence[Variant]) -> dict[str, str]:
    description, why = udptime_description(twistd)
    reasons: dict[str, str] = {}
    for variant in variants:
        if variant.kind != "udptime":
            continue
        reason = why if description is None else unsupported(variant, description)
        if reason:
            reasons[variant.name] = reason
    return reasons


# --------------------------------------------------------------------------
# Servers.


@dataclass
class Server:
    variant: Variant
    proc: subprocess.Popen[Any]
    host: str
    port: int
    cmd: list[str]
    workdir: Path
    log: Path
    ready_s: float = 0.0
    #: NTS rows: the NTS-KE port, the request file and what NTS-KE gave.
    ke_port: int | None = None
    payload_file: Path | None = None
    nts: dict[str, Any] | None = None
    #: udptime Roughtime rows: its /metrics port (signature counters).
    metrics_port: int | None = None


def chronyd_config(
    workdir: Path, host: str, port: int, ke_port: int | None = None
) -> Path:
    conf = workdir / "chronyd.conf"
    lines = [
        f"port {port}",
        f"bindaddress {host}",
        "allow 127.0.0.0/8",
        "local stratum 10",
        "cmdport 0",
        "bindcmdaddress /",
        f"pidfile {workdir / 'chronyd.pid'}",
        f"driftfile {workdir / 'chronyd.drift'}",
    ]
    if ke_port is not None:
        lines += [
            f"ntsservercert {workdir / 'nts-cert.pem'}",
            f"ntsserverkey {workdir / 'nts-key.pem'}",
            f"ntsport {ke_port}",
            f"ntsdumpdir {workdir}",
        ]
    conf.write_text("\n".join([*lines, ""]))
    return conf


def server_command(
    variant: Variant,
    host: str,
    port: int,
    workdir: Path,
    twistd: str,
    ke_port: int | None = None,
    metrics_port: int | None = None,
) -> list[str]:
    py = sys.executable
    if variant.kind == "udptime":
        nts: list[str] = []
        if variant.fmt == "roughtime":
            from roughtime_load import write_root_key

            nts += ["--roughtime-key", str(write_root_key(workdir))]
            if metrics_port is not None:
                nts += ["--metrics", f"{host}:{metrics_port}"]
        if ke_port is not None:
            nts = [
                "--nts-ke",
                f"{host}:{ke_port}",
                "--tls-cert",
                str(workdir / "nts-cert.pem"),
                "--tls-key",
                str(workdir / "nts-key.pem"),
                "--nts-keys",
                str(workdir / "nts-keys.json"),
            ]
        return [
            twistd,
            "-n",
            "--pidfile=",
            "udptime",
            "--interface",
            host,
            "--port",
            str(port),
            "--format",
            variant.fmt,
            *variant.extra_args,
            *nts,
        ]
    if variant.kind == "recipe_socketserver":
        return [py, str(SERVERS / "recipe_socketserver.py"), str(port)]
    if variant.kind == "recipe_socket":
        return [py, str(SERVERS / "recipe_socket.py"), str(port)]
    if variant.kind == "asyncio":
        return [py, str(SERVERS / "asyncio_ctime.py"), str(port), host]
    if variant.kind == "ceiling":
        return [str(BUILD / "ceiling"), str(port), host]
    if variant.kind == "roughly":
        from roughtime_load import peer_command, peer_python

        python = peer_python(REPO)
        if python is None:
            raise ValueError("no Python with roughly")
        return peer_command(python, host, port)
    if variant.kind == "chronyd":
        chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
        cmd = [chronyd, "-x", "-d"]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # keep root: the temp dir's files stay ours
        return [*cmd, "-f", str(chronyd_config(workdir, host, port, ke_port))]
    raise ValueError(f"unknown server kind {variant.kind!r}")


def missing_tool(variant: Variant) -> str | None:
    if variant.kind == "roughly":
        from roughtime_load import PEER_ENV, PEER_VENV, peer_python

        if peer_python(REPO) is None:
            return (
                f"no Python with roughly: set {PEER_ENV} or make {PEER_VENV} "
                "(as .ci/run does)"
            )
    if variant.kind == "chronyd" and not (
        shutil.which("chronyd") or os.access("/usr/sbin/chronyd", os.X_OK)
    ):
        return "chronyd is not installed (apt-get install chrony)"
    if variant.nts:
        try:
            import nts_load  # noqa: F401  (pyOpenSSL, cryptography, udptime.nts)
        except ImportError as exc:
            return f"no NTS-KE client for the load: {exc}"
    if variant.kind == "chronyd" and variant.nts:
        chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
        version = run_text([chronyd, "-v"])
        if "+NTS" not in version:
            return f"chronyd was built without NTS ({version or 'no version output'})"
    return None


def free_tcp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nts_setup(server: Server) -> None:
    """One NTS-KE session against *server*, then its request file, checked."""
    from nts_load import NtsLoadError, prepare

    assert server.ke_port is not None
    path = server.workdir / "nts-requests.bin"
    try:
        server.nts = prepare(
            server.host,
            server.ke_port,
            server.port,
            server.workdir / "nts-cert.pem",
            path,
        )
    except NtsLoadError as exc:
        raise StartError(f"NTS: {exc}") from None
    server.payload_file = path


@contextmanager
def running_server(
    variant: Variant, twistd: str, host: str = LOOPBACK, port: int | None = None
) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix="udptime-bench-"))
    port = port if port is not None else free_udp_port()
    ke_port = None
    if variant.nts:
        from nts_load import make_certificate

        make_certificate(workdir)
        ke_port = free_tcp_port(host)
    metrics_port = None
    if variant.kind == "udptime" and variant.fmt == "roughtime":
        metrics_port = free_tcp_port(host)
    cmd = pin(
        variant.cpus or SERVER_CPU,
        server_command(variant, host, port, workdir, twistd, ke_port, metrics_port),
    )
    log = workdir / "server.log"
    quiet_stdout = variant.kind in ("recipe_socketserver", "recipe_socket")
    with open(log, "wb") as log_file:
        proc = PROCS.start(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if quiet_stdout else log_file,
            stderr=log_file,
        )
    server = Server(
        variant,
        proc,
        host,
        port,
        cmd,
        workdir,
        log,
        ke_port=ke_port,
        metrics_port=metrics_port,
    )
    try:
        try:
            server.ready_s = wait_ready(
                proc, host, port, variant.payload, deadline=20.0
            )
            if variant.nts:
                nts_setup(server)
            if variant.payload == "roughtime":
                from roughtime_load import write_requests

                server.payload_file = workdir / "roughtime-requests.bin"
                write_requests(server.payload_file)
        except StartError as exc:
            PROCS.stop(proc)
            raise StartError(f"{exc}; log: {tail(log) or '(empty)'}") from None
        yield server
    finally:
        PROCS.stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# The load generator.


def loadgen_command(
    server: Server,
    profile: Profile,
    *,
    duration: float,
    warmup: float,
    latency: bool = False,
    rate: float = 0.0,
    sources: int = 0,
) -> list[str]:
    cmd = [
        str(BUILD / "loadgen"),
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--payload",
        "empty" if server.variant.payload == "roughtime" else server.variant.payload,
        "--duration",
        f"{duration:g}",
        "--warmup",
        f"{warmup:g}",
        "--timeout-ms",
        "100",
    ]
    if latency:
        cmd.append("--latency")
    else:
        cmd += ["--sockets", str(profile.sockets), "--window", str(profile.window)]
    if sources:
        cmd += ["--sources", str(sources), "--source-base", SOURCE_BASE]
    if rate > 0:
        cmd += ["--rate", f"{rate:.0f}"]
    if server.payload_file is not None:
        cmd += ["--payload-file", str(server.payload_file)]
    return pin(LOAD_CPU, cmd)


def run_loadgen(cmd: list[str], timeout: float) -> dict[str, Any]:
    result = subprocess.run(
        cmd, capture_output=True, check=False, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"loadgen failed ({result.returncode}): {result.stderr.strip()}"
        )
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def measure(server: Server, profile: Profile, sources: int) -> dict[str, Any]:
    """One round against a running server: warm-up, throughput, latency."""
    pid = server.proc.pid
    warm = loadgen_command(
        server, profile, duration=profile.warmup, warmup=0, sources=sources
    )
    run_loadgen(warm, timeout=profile.warmup + 15)

    load = loadgen_command(
        server, profile, duration=profile.duration, warmup=0, sources=sources
    )
    signed0 = roughtime_counts(server)
    busy0 = cpu_busy_ticks()
    cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
    throughput = run_loadgen(load, timeout=profile.duration + 15)
    cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
    busy1 = cpu_busy_ticks()
    signed1 = roughtime_counts(server)
    server_cpu = other_cpu = None
    if cpu0 is not None and cpu1 is not None:
        server_cpu = round(100.0 * (cpu1 - cpu0) / (t1 - t0), 1)
        if busy0 is not None and busy1 is not None:
            # Busy time on the two CPUs that neither the server nor the load
            # generator used: other processes sharing the machine.
            busy = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
            other = busy - (cpu1 - cpu0) - float(throughput["loadgen_cpu_s"])
            other_cpu = round(max(0.0, 100.0 * other / (t1 - t0)), 1)

    lat_cmd = loadgen_command(
        server,
        profile,
        duration=profile.latency_duration,
        warmup=0.2,
        latency=True,
        sources=sources,
    )
    latency = run_loadgen(lat_cmd, timeout=profile.latency_duration + 15)
    naks = int(throughput.get("nts_nak", 0))
    if server.variant.nts and naks > 0.01 * max(1, int(throughput["replies"])):
        raise RuntimeError(
            f"{naks} of {throughput['replies']} replies under load were NTS NAKs"
        )
    return {
        "nts": server.nts,
        "roughtime": roughtime_rates(signed0, signed1, t1 - t0),
        "throughput": throughput,
        "server_cpu_pct": server_cpu,
        "other_cpu_pct": other_cpu,
        "loadgen_cpu_pct": round(
            100.0 * throughput["loadgen_cpu_s"] / throughput["duration_s"], 1
        ),
        "latency": latency,
        "commands": {"throughput": shlex.join(load), "latency": shlex.join(lat_cmd)},
        "cpu_pressure": cpu_pressure(),
    }


def roughtime_counts(server: Server) -> dict[str, float] | None:
    if server.metrics_port is None:
        return None
    from roughtime_load import scrape

    return scrape(server.host, server.metrics_port)


def roughtime_rates(
    before: dict[str, float] | None, after: dict[str, float] | None, seconds: float
) -> dict[str, float] | None:
    from roughtime_load import rates

    return rates(before, after, seconds)


#: bench/profile_batch.py rows standing in for the benchmark's udptime rows.
PROFILE_ROWS = {
    "udptime ntp": "ntp",
    "udptime ntp, rate limit off": "ntp-off",
    "udptime ctime": "ctime",
    "udptime ctime, rate limit off": "ctime-off",
    "udptime time": "time",
}


def python_profile() -> dict[str, Any]:
    """Python ns per datagram of the batch path, syscalls stubbed, per row.

    Run in a child pinned to the server's CPU, with the same Python as the
    server; best of five runs of 2,000 batches of 64 each.
    """
    cmd = pin(
        SERVER_CPU,
        [sys.executable, str(BENCH / "profile_batch.py"), *PROFILE_ROWS.values()],
    )
    result = subprocess.run(
        cmd, capture_output=True, check=False, text=True, timeout=600
    )
    if result.returncode != 0:
        return {"command": shlex.join(cmd), "error": result.stderr.strip()[-300:]}
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {
        "command": shlex.join(cmd),
        "python_ns": {r["row"]: r["python_ns_per_datagram"] for r in rows},
    }


def profile_table(report: dict[str, Any], rows: dict[str, Row]) -> list[str]:
    """Per reply: the server's measured CPU, its Python, the kernel's rest."""
    prof = report.get("profile_batch")
    if not prof:
        return []
    lines = ["", "## Where a reply's CPU goes", ""]
    if "error" in prof:
        return [*lines, f"Profile failed: {cell(prof['error'], 300)}"]
    lines += [
        (
            f"CPU: {report['machine']['cpu_model']}. Server CPU per reply is the "
            "best round's server CPU time over its replies; Python is "
            "`bench/profile_batch.py` (the same batch path, recvmmsg/sendmmsg "
            "replaced by copies, best of 5); the kernel and the rest is the "
            "difference (system calls, loopback delivery, the reactor)."
        ),
        "",
        (
            "| row | server CPU per reply ns | Python ns (syscalls stubbed) "
            "| kernel and the rest ns | Python share |"
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for name, key in PROFILE_ROWS.items():
        python = prof["python_ns"].get(key)
        row = rows.get(name)
        per_cpu = per_cpu_second(row.best) if row and row.best else None
        total = 1e9 / per_cpu if per_cpu else None
        rest = total - python if total is not None and python is not None else None
        share = f"{100 * python / total:.0f}%" if total and python else "–"
        lines.append(
            f"| {name} | {fmt_num(total)} | {fmt_num(python)} | {fmt_num(rest)} "
            f"| {share} |"
        )
    return lines


def cpu_pressure() -> str | None:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


# --------------------------------------------------------------------------
# NTP accuracy with independent clients.


def chronyd_query(host: str, port: int, workdir: Path) -> dict[str, Any]:
    """``chronyd -Q``: measure the offset to one server, never set the clock."""
    chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
    cmd = [chronyd, "-Q", "-t", "5"]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]
    cmd += [
        f"server {host} port {port} iburst minpoll -6 maxpoll -6",
        f"pidfile {workdir / 'query.pid'}",
        "cmdport 0",
        "bindcmdaddress /",
    ]
    cmd = pin(LOAD_CPU, cmd)
    t0 = time.monotonic()
    try:
        result = subprocess.run(
            cmd, capture_output=True, check=False, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return {"command": shlex.join(cmd), "error": "timed out"}
    text = result.stdout + result.stderr
    found = re.search(r"System clock wrong by (-?[0-9.]+) seconds", text)
    out: dict[str, Any] = {
        "command": shlex.join(cmd),
        "seconds": round(time.monotonic() - t0, 3),
    }
    if found:
        out["offset_s"] = float(found.group(1))
    else:
        out["error"] = (
            f"no offset in output (status {result.returncode}): {text.strip()[-300:]}"
        )
    return out


def sntp_query(host: str, samples: int) -> dict[str, Any]:
    """``sntp -j`` *samples* times (it only ever talks to port 123)."""
    sntp = shutil.which("sntp") or shutil.which("ntpdig")
    if sntp is None:
        return {"error": "sntp is not installed (apt-get install sntp)"}
    cmd = pin(LOAD_CPU, [sntp, "-j", "-t", "2", host])
    offsets: list[float] = []
    errors: list[str] = []
    for _ in range(samples):
        try:
            result = subprocess.run(
                cmd, capture_output=True, check=False, text=True, timeout=5
            )
        except subprocess.TimeoutExpired:
            errors.append("timed out")
            break
        found = re.search(r'"offset":\s*(-?[0-9.eE+-]+)', result.stdout)
        if found:
            offsets.append(float(found.group(1)))
        else:
            errors.append((result.stdout + result.stderr).strip()[-200:] or "no output")
            if len(errors) >= 2:
                break  # the server is not answering sntp: no point in more
    return {"command": shlex.join(cmd), **offset_summary(offsets), "errors": errors}


def offset_summary(offsets: list[float]) -> dict[str, Any]:
    if not offsets:
        return {"samples": 0}
    return {
        "samples": len(offsets),
        "offsets_s": offsets,
        "median_s": statistics.median(offsets),
        "max_abs_s": max(abs(o) for o in offsets),
    }


def accuracy_for(
    variant: Variant,
    twistd: str,
    profile: Profile,
    max_rate: float | None,
    sources: int,
) -> dict[str, Any]:
    """Offsets seen by chronyd -Q and sntp against *variant*, idle and loaded."""
    host, port = LOOPBACK, None
    sntp_reason = None
    wanted = NTP123_HOSTS.get(variant.name, "127.0.123.9")
    if os.geteuid() != 0:
        sntp_reason = "sntp only queries port 123, which needs root to bind"
    elif not can_bind(wanted, 123):
        sntp_reason = f"port 123 on {wanted} is not free"
    else:
        host, port = wanted, 123
    out: dict[str, Any] = {"server": variant.name}
    with running_server(variant, twistd, host=host, port=port) as server:
        out["address"] = f"{server.host}:{server.port}"
        out["server_command"] = shlex.join(server.cmd)
        for phase in ("idle", "loaded"):
            entry: dict[str, Any] = {}
            load_proc = None
            if phase == "loaded":
                rate = (max_rate or 2000.0) / 2
                cmd = loadgen_command(
                    server, profile, duration=120, warmup=0, rate=rate, sources=sources
                )
                entry["load_command"] = shlex.join(cmd)
                entry["target_rate"] = round(rate)
                load_proc = PROCS.start(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                time.sleep(0.5)  # let the load settle before the first query
            try:
                entry["chronyd_Q"] = chronyd_query(
                    server.host, server.port, server.workdir
                )
                if sntp_reason is None:
                    entry["sntp"] = sntp_query(server.host, profile.sntp_samples)
                else:
                    entry["sntp"] = {"skipped": sntp_reason}
            finally:
                if load_proc is not None:
                    with suppress(ProcessLookupError):
                        os.killpg(load_proc.pid, signal.SIGTERM)
                    try:
                        stdout, _ = load_proc.communicate(timeout=5)
                        entry["load"] = json.loads(stdout)
                    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                        entry["load"] = {"error": repr(exc)}
                    PROCS.stop(load_proc)
            out[phase] = entry
    return out


# --------------------------------------------------------------------------
# Machine description.


def run_text(cmd: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, check=False, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (result.stdout + result.stderr).strip()


def machine() -> dict[str, Any]:
    model = ""
    for line in run_text(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    commit = run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    changed = run_text(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "udptime", "twisted"]
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_at_start": load,
        "cpu_pressure_at_start": cpu_pressure(),
        "pinned": PINNED,
        "nice": NICE,
        "server_cpu": SERVER_CPU if PINNED else None,
        "load_cpu": LOAD_CPU if PINNED else None,
        "git_commit": commit,
        "udptime_tree_modified": bool(changed.strip()),
        "twisted": package_version("twisted"),
        "udptime": package_version("udptime"),
        "chronyd": run_text(["chronyd", "-v"]).split("(+")[0].strip() or None,
        "cc": run_text(["cc", "--version"]).splitlines()[0]
        if shutil.which("cc")
        else None,
    }


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------
# Results: ratios, Markdown, chart.


@dataclass
class Row:
    variant: Variant
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""
    command: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0

    def fail(self, reason: str) -> None:
        """A round failed: the row fails only if no round succeeded."""
        self.reason = f"{self.reason}; {reason}" if self.reason else reason
        if not self.rounds:
            self.status = "failed"

    @property
    def best(self) -> dict[str, Any] | None:
        ok = [r for r in self.rounds if r.get("throughput")]
        if not ok:
            return None
        return max(ok, key=lambda r: float(r["throughput"]["replies_per_s"]))

    @property
    def best_other_cpu(self) -> float:
        """Other processes' CPU during the best round (0 if unknown)."""
        best = self.best
        return float((best or {}).get("other_cpu_pct") or 0.0)

    @property
    def rate(self) -> float | None:
        best = self.best
        return float(best["throughput"]["replies_per_s"]) if best else None

    @property
    def best_latency(self) -> dict[str, Any] | None:
        lats = [
            r["latency"]["rtt_us"]
            for r in self.rounds
            if r.get("latency") and r["latency"].get("rtt_us")
        ]
        return min(lats, key=lambda rtt: float(rtt["p50"])) if lats else None


def ratios(rows: dict[str, Row]) -> dict[str, dict[str, float | None]]:
    def base(name: str) -> float | None:
        row = rows.get(name)
        return row.rate if row and row.status == "ok" else None

    def div(rate: float | None, b: float | None) -> float | None:
        return round(rate / b, 3) if rate is not None and b else None

    recipe, ceiling, chrony = base(RECIPE), base(CEILING), base(CHRONYD)
    plain, chrony_nts = base(UDPTIME_NTP), base(CHRONYD_NTS)
    roughly = base(ROUGHLY)
    roughly_row = rows.get(ROUGHLY)
    roughly_cpu = (
        per_cpu_second(roughly_row.best)
        if roughly_row is not None and roughly_row.best and roughly is not None
        else None
    )
    out: dict[str, dict[str, float | None]] = {}
    for name, row in rows.items():
        rate = row.rate if row.status == "ok" else None
        out[name] = {
            "vs_recipe_socketserver": div(rate, recipe),
            "vs_c_ceiling": div(rate, ceiling),
            "vs_chronyd": div(rate, chrony) if row.variant.payload == "ntp" else None,
        }
        if row.variant.nts:
            out[name]["vs_udptime_ntp"] = div(rate, plain)
            out[name]["vs_chronyd_nts"] = div(rate, chrony_nts)
        if row.variant.payload == "roughtime":
            out[name]["vs_udptime_ntp"] = div(rate, plain)
            out[name]["vs_roughly"] = div(rate, roughly)
            per_cpu = (
                per_cpu_second(row.best) if rate is not None and row.best else None
            )
            out[name]["vs_roughly_per_core"] = div(per_cpu, roughly_cpu)
    return out


TARGETS = (
    ("udptime ctime", "vs_recipe_socketserver", 3.0),
    ("udptime ctime", "vs_c_ceiling", 0.8),
    ("udptime ntp", "vs_chronyd", 0.9),
    (UDPTIME_ROUGHTIME, "vs_roughly_per_core", 10.0),
    (UDPTIME_ROUGHTIME, "vs_udptime_ntp", 0.5),
)


def rounds_text(rows: dict[str, Row]) -> str:
    counts = [len(row.rounds) for row in rows.values() if row.rounds]
    if not counts:
        return "no rounds"
    low, high = min(counts), max(counts)
    return f"{low} round(s) a row" if low == high else f"{low}–{high} rounds a row"


def per_cpu_second(result: dict[str, Any]) -> float | None:
    """Replies per second of server CPU: less sensitive to a shared machine."""
    cpu = result.get("server_cpu_pct")
    if not cpu:
        return None
    return float(result["throughput"]["replies_per_s"]) / (float(cpu) / 100.0)


def fmt_num(value: float | None, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def cell(text: Any, limit: int = 160) -> str:
    """*text* fit for one Markdown table cell: one line, no bare pipes."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def fmt_offset(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    micro = round(value * 1e6)
    return f"{micro:+d} µs" if micro else "0 µs"


def accuracy_cells(entry: dict[str, Any], phase: str) -> str:
    e = entry.get(phase, {})
    load = e.get("load", {})
    sntp = e.get("sntp", {})
    chq = e.get("chronyd_Q", {})
    if "offset_s" in chq:
        chronyd_q = fmt_offset(chq["offset_s"])
    else:
        chronyd_q = cell(chq.get("error", "–"), 100)
    if sntp.get("samples"):
        sntp_median = fmt_offset(sntp.get("median_s"))
    elif "skipped" in sntp or "error" in sntp:
        sntp_median = cell(sntp.get("skipped") or sntp.get("error"), 100)
    else:
        sntp_median = cell((sntp.get("errors") or ["no sample"])[0], 100)
    rate = fmt_num(load.get("replies_per_s")) if load else "–"
    return (
        f"| {entry['server']} | {entry['address']} | {phase} | {rate} "
        f"| {chronyd_q} | {sntp_median} | {fmt_offset(sntp.get('max_abs_s'))} "
        f"| {sntp.get('samples', '–')} |"
    )


def nts_table(
    rows: dict[str, Row], rat: dict[str, dict[str, float | None]], cpu: str = ""
) -> list[str]:
    """Authenticated NTP (NTS) against plain udptime NTP and chronyd's NTS."""
    nts_rows = [(n, r) for n, r in rows.items() if r.variant.nts and r.status == "ok"]
    if not nts_rows:
        return []
    lines = [
        "",
        "## NTS: authenticated NTP replies",
        "",
        (
            "One NTS-KE session per server, then 64 authenticated requests (own "
            "Unique Identifier, one cookie, no placeholders; each checked once to "
            "get an authenticated reply, not a NAK) replayed by the load "
            "generator; the servers keep no per-request state, so every request "
            f"is opened, checked and answered with a fresh cookie. {cpu}"
        ),
        "",
        (
            "| server | replies/s | × udptime ntp | × chronyd + NTS | request bytes "
            "| reply bytes | NTS NAKs | server CPU | RTT p50 µs | RTT p99 µs |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in nts_rows:
        best = row.best
        assert best is not None
        tp = best["throughput"]
        lat = row.best_latency or {}
        r = rat[name]
        lines.append(
            f"| {name} | {fmt_num(row.rate)} | {fmt_ratio(r.get('vs_udptime_ntp'))} "
            f"| {fmt_ratio(r.get('vs_chronyd_nts'))} "
            f"| {fmt_num(tp.get('request_bytes_mean'))} "
            f"| {fmt_num(tp.get('reply_bytes_mean'))} | {tp.get('nts_nak', '–')} "
            f"| {fmt_num(best['server_cpu_pct'], '.0f')}% "
            f"| {fmt_num(lat.get('p50'), '.0f')} | {fmt_num(lat.get('p99'), '.0f')} |"
        )
    return lines


def roughtime_table(
    rows: dict[str, Row], rat: dict[str, dict[str, float | None]]
) -> list[str]:
    """Roughtime servers under the same load: replies, signatures, batches."""
    measured = [
        (n, r)
        for n, r in rows.items()
        if r.variant.payload == "roughtime" and r.status == "ok"
    ]
    if not measured:
        return []
    lines = [
        "",
        "## Roughtime: signed replies",
        "",
        (
            "64 valid requests of the minimum size (1024-byte packets, own nonces, "
            "no SRV) replayed at both servers; every batch a server reads is one "
            "Merkle tree and one Ed25519 signature. Signatures/s and mean batch: "
            "udptime's /metrics over the measured interval (best round)."
        ),
        "",
        (
            "| server | replies/s | replies per server CPU-s | × roughly per core "
            "| × udptime ntp | signatures/s | mean batch | server CPU | lost "
            "| RTT p50 µs |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in measured:
        best = row.best
        assert best is not None
        signed = best.get("roughtime") or {}
        lat = row.best_latency or {}
        r = rat[name]
        lines.append(
            f"| {name} | {fmt_num(row.rate)} | {fmt_num(per_cpu_second(best))} "
            f"| {fmt_ratio(r.get('vs_roughly_per_core'))} "
            f"| {fmt_ratio(r.get('vs_udptime_ntp'))} "
            f"| {fmt_num(signed.get('signatures_per_s'))} "
            f"| {fmt_num(signed.get('mean_batch'), '.1f')} "
            f"| {fmt_num(best['server_cpu_pct'], '.0f')}% "
            f"| {best['throughput']['lost']} | {fmt_num(lat.get('p50'), '.0f')} |"
        )
    return lines


def markdown(report: dict[str, Any], rows: dict[str, Row]) -> str:
    m = report["machine"]
    p = report["profile"]
    rat = report["ratios"]
    #: Beside every table: ratios differ between CPU models.
    cpu = f"CPU: {m['cpu_model'] or 'unknown'}."
    pinning = (
        f"server on CPU {m['server_cpu']}, load generator on CPU {m['load_cpu']}"
        if m["pinned"]
        else "none (taskset or a second CPU missing)"
    )
    sources = (
        f"{report['sources']} source addresses from {SOURCE_BASE} in turn"
        if report["sources"]
        else "all from 127.0.0.1"
    )
    lines = [
        "# udptime benchmark results",
        "",
        f"- Command: `{report['command']}`",
        (
            f"- Date (UTC): {m['date_utc']}; commit {m['git_commit'] or '?'}"
            f"{' + uncommitted udptime changes' if m.get('udptime_tree_modified') else ''}; "
            f"run took {report['runtime_s']:.0f} s"
        ),
        (
            f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['kernel']}, "
            f"Python {m['python']}, Twisted {m['twisted']}, "
            f"udptime {m['udptime']}, {m['chronyd'] or 'no chronyd'}"
        ),
        f"- Pinning: {pinning}; priority: "
        + (f"nice {m['nice']}" if m.get("nice") is not None else "default"),
        (
            f"- Load: {p['sockets']} sockets × {p['window']} in flight, {sources}, "
            f"{p['warmup']:g} s warm-up then {p['duration']:g} s measured, "
            f"{rounds_text(rows)}, best round shown; RTT from "
            f"{p['latency_duration']:g} s with one request in flight"
        ),
        f"- Load average at start: {' '.join(m['loadavg_at_start'])}",
        "",
        (
            "| server | replies/s | × recipe socketserver | × C ceiling | × chronyd "
            "| server CPU | replies per server CPU-s | loadgen CPU | other CPU | lost "
            "| RTT p50 µs | RTT p99 µs |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if row.status != "ok":
            continue
        best = row.best
        assert best is not None
        lat = row.best_latency or {}
        r = rat[name]
        lines.append(
            f"| {name} | {fmt_num(row.rate)} | {fmt_ratio(r['vs_recipe_socketserver'])} "
            f"| {fmt_ratio(r['vs_c_ceiling'])} | {fmt_ratio(r['vs_chronyd'])} "
            f"| {fmt_num(best['server_cpu_pct'], '.0f')}% "
            f"| {fmt_num(per_cpu_second(best))} "
            f"| {fmt_num(best['loadgen_cpu_pct'], '.0f')}% "
            f"| {fmt_num(best.get('other_cpu_pct'), '.0f')}% "
            f"| {best['throughput']['lost']} "
            f"| {fmt_num(lat.get('p50'), '.0f')} | {fmt_num(lat.get('p99'), '.0f')} |"
        )
    lines += [
        "",
        (
            f"{cpu} replies/s: best round. server CPU: the server process's user+system "
            "time over the measured interval (100% = one core); replies per server "
            "CPU-s divides by it. loadgen CPU: the "
            "load generator's. other CPU: busy time on the two CPUs that neither "
            "used, i.e. other processes on the machine: a row with a high value "
            "was disturbed. lost: requests unanswered after 100 ms. RTT: one "
            "request in flight."
        ),
        "",
        "Rows:",
        "",
    ]
    for name, row in rows.items():
        lines.append(f"- {name}: {row.variant.note or row.variant.kind}")
    others = [row for row in rows.values() if row.status != "ok" or row.reason]
    if others:
        lines += ["", "Not measured, or not in every round:", ""]
        for row in others:
            lines.append(
                f"- **{row.variant.name}** — {row.status}: {cell(row.reason, 400)}"
            )
    if any(len(row.rounds) > 1 for row in rows.values()):
        lines += ["", "Replies/s in every round (other processes' CPU then):", ""]
        for name, row in rows.items():
            if row.rounds:
                per = ", ".join(
                    f"{fmt_num(r['throughput']['replies_per_s'])} "
                    f"({fmt_num(r.get('other_cpu_pct'), '.0f')}%)"
                    for r in row.rounds
                )
                lines.append(f"- {name}: {per}")
    lines += nts_table(rows, rat, cpu)
    lines += roughtime_table(rows, rat)
    lines += profile_table(report, rows)
    lines += ["", "## Targets (reported, not asserted)", "", cpu, ""]
    lines += ["| row | ratio | target | measured |", "|---|---|---:|---:|"]
    for name, key, target in TARGETS:
        value = rat.get(name, {}).get(key)
        lines.append(
            f"| {name} | {key.replace('_', ' ')} | ≥ {target:g}× | {fmt_ratio(value)} |"
        )
    acc = report.get("accuracy", [])
    if acc:
        lines += [
            "",
            "## NTP offset seen by independent clients",
            "",
            (
                "Offsets are server minus local clock, as the client prints them; "
                "client and server share one clock, so the ideal is 0. sntp: median "
                "(max |offset|) of its samples; chronyd -Q: one combined estimate. "
                "Loaded: the load generator at half the server's measured maximum. "
                + cpu
            ),
            "",
            (
                "| server | address | phase | load replies/s | chronyd -Q "
                "| sntp median | sntp max abs | sntp n |"
            ),
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for entry in acc:
            if "error" in entry:
                lines.append(
                    f"| {entry['server']} | – | – | – | {cell(entry['error'])} | | | |"
                )
                continue
            for phase in ("idle", "loaded"):
                lines.append(accuracy_cells(entry, phase))
    lines += ["", "## Commands", ""]
    for name, row in rows.items():
        if row.command:
            lines.append(f"- {name}: `{row.command}`")
    best_any = next((row.best for row in rows.values() if row.best), None)
    if best_any:
        lines += [
            f"- load, e.g. (throughput): `{best_any['commands']['throughput']}`",
            f"- load, e.g. (latency): `{best_any['commands']['latency']}`",
        ]
    chart = report.get("chart")
    lines += ["", f"Chart: {chart}" if chart else "Chart: skipped", ""]
    return "\n".join(lines)


def chart(
    path: Path, rows: dict[str, Row], rat: dict[str, dict[str, float | None]]
) -> str:
    """A bar chart of replies/s; returns a note saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "skipped: matplotlib is not installed"
    measured = [(n, r) for n, r in rows.items() if r.status == "ok" and r.rate]
    if not measured:
        return "skipped: nothing measured"
    colours = {
        "udptime": "#1f77b4",
        "recipe_socketserver": "#d62728",
        "recipe_socket": "#ff7f0e",
        "asyncio": "#9467bd",
        "chronyd": "#2ca02c",
        "ceiling": "#7f7f7f",
    }
    names = [n for n, _ in measured][::-1]
    values = [float(r.rate or 0) for _, r in measured][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.6))
    bars = ax.barh(
        names,
        values,
        color=[colours.get(rows[n].variant.kind, "#333333") for n in names],
    )
    top = max(values)
    for bar, name, value in zip(bars, names, values, strict=True):
        ratio = rat[name]["vs_recipe_socketserver"]
        label = f"{value:,.0f}" + (f"  ({ratio:.1f}× recipe)" if ratio else "")
        ax.text(
            value + top * 0.01,
            bar.get_y() + bar.get_height() / 2,
            label,
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, top * 1.35)
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda x, _pos: f"{x:,.0f}")
    )
    ax.set_xlabel("replies per second (closed loop, loopback, best round)")
    ax.set_title("UDP time servers on one pinned CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.name)


# --------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke run, under a minute"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.json/.md/.png (default: bench/results; "
        "with --quick bench/build/results-quick, so a smoke run never "
        "overwrites the committed full results)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="semicolon-separated row names to run (default: the profile's rows)",
    )
    parser.add_argument("--duration", type=float, help="seconds measured per round")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds over all servers before the extra rounds the time budget "
        "allows (full: 3, quick: 1)",
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=DEFAULT_SOURCES,
        help="distinct 127.1.x.y source addresses the load comes from, so a "
        f"per-source rate limiter is not what is measured (default "
        f"{DEFAULT_SOURCES}; 0: all from 127.0.0.1)",
    )
    parser.add_argument(
        "--no-accuracy", action="store_true", help="skip the NTP offset phase"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also measure udptime's Python per datagram with the system calls "
        "stubbed (bench/profile_batch.py) and split each udptime row's CPU per "
        "reply into Python and the kernel",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.duration or args.rounds:
        profile = Profile(
            **{
                **profile.__dict__,
                "duration": args.duration or profile.duration,
                "rounds": args.rounds or profile.rounds,
                "max_rounds": max(profile.max_rounds, args.rounds or 0),
            }
        )
    sources = args.sources
    clock = Clock(profile.budget_s)
    command = shlex.join(
        [sys.executable, *(sys.argv if argv is None else ["bench/run.py", *argv])]
    )

    if args.only:
        wanted = {n.strip() for n in args.only.split(";") if n.strip()}
        unknown = wanted - {v.name for v in VARIANTS}
        if unknown:
            raise SystemExit(f"bench: unknown rows {sorted(unknown)}")
        variants = [v for v in VARIANTS if v.name in wanted]
    else:
        variants = [v for v in VARIANTS if v.quick or not args.quick]

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_term)

    out_dir = args.out or (BUILD / "results-quick" if args.quick else BENCH / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(
        f"bench: {profile.name} run, {len(variants)} rows, budget {profile.budget_s:.0f} s"
    )
    build_cmds = build_c()
    twistd = twistd_path()
    skip = udptime_skip_reasons(twistd, variants)

    rows: dict[str, Row] = {v.name: Row(v) for v in variants}
    for name, reason in skip.items():
        rows[name].status, rows[name].reason = "skipped", reason
    for row in rows.values():
        missing = missing_tool(row.variant)
        if row.status == "pending" and missing:
            row.status, row.reason = "skipped", missing

    interrupted = False
    accuracy: list[dict[str, Any]] = []
    reserve = 0.0 if args.no_accuracy else ACCURACY_RESERVE_S
    cost = profile.warmup + profile.duration + profile.latency_duration + 3.5

    def one_round(row: Row, round_no: int) -> None:
        row.attempts += 1
        print(f"bench: round {round_no}: {row.variant.name} ...", flush=True)
        try:
            with running_server(row.variant, twistd) as server:
                row.command = shlex.join(server.cmd)
                result = measure(server, profile, sources)
                result["ready_s"] = round(server.ready_s, 3)
                if server.proc.poll() is not None:
                    raise StartError(
                        f"server exited during the run: {tail(server.log)}"
                    )
        except (StartError, RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            row.fail(f"round {round_no}: {exc}")
            print(f"bench:   failed: {exc}", flush=True)
            return
        result["round"] = round_no
        if result["throughput"]["replies"] == 0:
            row.fail(f"round {round_no}: no replies under load")
            return
        row.rounds.append(result)
        row.status = "ok"
        tp = result["throughput"]
        print(
            f"bench:   {tp['replies_per_s']:,.0f} replies/s, lost {tp['lost']}, "
            f"server CPU {result['server_cpu_pct']}%, "
            f"other CPU {result['other_cpu_pct']}%",
            flush=True,
        )

    try:
        for round_no in range(1, profile.rounds + 1):
            for row in rows.values():
                if row.status in ("skipped", "failed"):
                    continue
                if not clock.fits(cost + reserve):
                    if not row.rounds:
                        row.status, row.reason = "skipped", "time budget exhausted"
                    continue
                one_round(row, round_no)

        # While the budget lasts, more rounds (up to max_rounds a row): rows
        # that never had a quiet round first, then round-robin, so a slow spell
        # of the machine does not decide a row's number.
        while True:
            candidates = [
                row
                for row in rows.values()
                if row.status == "ok" and row.attempts < profile.max_rounds
            ]
            if not candidates or not clock.fits(cost + reserve):
                break
            disturbed = [r for r in candidates if r.best_other_cpu > DISTURBED_PCT]
            row = min(
                disturbed or candidates, key=lambda r: (r.attempts, -r.best_other_cpu)
            )
            one_round(row, row.attempts + 1)

        if not args.no_accuracy:
            for row in rows.values():
                if row.status != "ok" or not row.variant.accuracy:
                    continue
                if not clock.fits(12.0):
                    accuracy.append(
                        {"server": row.variant.name, "error": "time budget exhausted"}
                    )
                    continue
                print(f"bench: NTP offsets: {row.variant.name} ...", flush=True)
                t_acc = time.monotonic()
                try:
                    accuracy.append(
                        accuracy_for(row.variant, twistd, profile, row.rate, sources)
                    )
                    accuracy[-1]["seconds"] = round(time.monotonic() - t_acc, 1)
                except (StartError, RuntimeError, subprocess.TimeoutExpired) as exc:
                    accuracy.append({"server": row.variant.name, "error": str(exc)})
    except (Interrupted, KeyboardInterrupt):
        interrupted = True
        print("bench: interrupted; writing what was measured", file=sys.stderr)
        for row in rows.values():
            if row.status == "pending":
                row.status, row.reason = "skipped", "run interrupted"
    finally:
        PROCS.stop_all()

    profile_result = None
    if args.profile and not interrupted:
        print("bench: profiling the batch path (syscalls stubbed) ...", flush=True)
        profile_result = python_profile()
    rat = ratios(rows)
    report: dict[str, Any] = {
        "command": command,
        "profile": profile.__dict__,
        "sources": sources,
        "machine": info,
        "build": build_cmds,
        "runtime_s": round(clock.elapsed(), 1),
        "rows": [
            {
                "name": name,
                "kind": row.variant.kind,
                "payload": row.variant.payload,
                "nts": row.variant.nts,
                "note": row.variant.note,
                "status": row.status,
                "reason": row.reason,
                "command": row.command,
                "replies_per_s": row.rate,
                "replies_per_server_cpu_s": per_cpu_second(row.best)
                if row.best
                else None,
                "rtt_us_one_in_flight": row.best_latency,
                "attempts": row.attempts,
                "ratios": rat[name],
                "rounds": row.rounds,
            }
            for name, row in rows.items()
        ],
        "ratios": rat,
        "targets": [
            {"row": n, "ratio": k, "target": t, "measured": rat.get(n, {}).get(k)}
            for n, k, t in TARGETS
        ],
        "accuracy": accuracy,
        "profile_batch": profile_result,
    }
    png = out_dir / "results.png"
    note = chart(png, rows, rat)
    report["chart"] = note if note.startswith("skipped") else png.name
    report["runtime_s"] = round(clock.elapsed(), 1)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(report, rows))
    print(markdown(report, rows))
    print(
        f"bench: wrote {out_dir}/results.json, results.md, "
        + ("results.png" if not note.startswith("skipped") else f"no PNG ({note})")
    )
    if interrupted:
        return 130
    failed_udptime = [
        r.variant.name
        for r in rows.values()
        if r.status == "failed" and r.variant.kind == "udptime"
    ]
    if failed_udptime:
        print(
            f"bench: udptime rows failed: {', '.join(failed_udptime)}", file=sys.stderr
        )
        return 1
    if not any(r.status == "ok" for r in rows.values()):
        print("bench: nothing was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
