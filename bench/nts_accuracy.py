#!/usr/bin/env python3
"""NTS accuracy: the offset independent NTS clients measure against udptime.

Run: ``python bench/nts_accuracy.py [--runs N] [--out FILE.json]``.

One host, one clock: what a client measures against a server on the same
machine is the server's stamping error (plus the clients' own). For each
server (udptime with NTS, the same with ``--verbose``, chronyd with NTS as
the reference, and plain udptime NTP for comparison), idle and while loaded
at half its measured maximum by the benchmark's load (NTS servers: the
``bench/nts_load.py`` requests through ``loadgen``):

* ``chronyd -Q`` (over NTS for NTS servers), *runs* times (each run an
  NTS-KE session and a burst of authenticated polls, ending in one offset);
* NTPsec's ``ntpd`` over NTS (NTS servers only: without NTS it asks port
  123 only) for a while, its ``peerstats`` offsets (one per poll), when an
  NTPsec ntpd is found (``build/ntpsec/`` as unpacked by
  ``.ci/run``, or ``--ntpsec PATH``) and 127.0.0.1:123 can be bound.

Neither client may discipline the clock: chronyd runs with ``-Q``; ntpd
with ``disable ntp``, ``disable kernel``, bound to loopback only, and
without ``CAP_SYS_TIME``. Servers, pinning and load come from
``bench/run.py``. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

NTPSEC = bench.REPO / "build" / "ntpsec" / "usr" / "sbin" / "ntpd"
LOCAL = bench.LOCAL
SERVERS = (
    bench.Variant(
        bench.UDPTIME_NTP,
        "udptime",
        "ntp",
        "ntp",
        LOCAL,
        note="plain NTP from the same server, for comparison",
    ),
    bench.Variant(
        bench.UDPTIME_NTS, "udptime", "ntp", "ntp", LOCAL, nts=True, note="defaults"
    ),
    bench.Variant(
        bench.UDPTIME_NTS + ", --verbose",
        "udptime",
        "ntp",
        "ntp",
        (*LOCAL, "--verbose"),
        nts=True,
        note="one log line per request",
    ),
    bench.Variant(bench.CHRONYD_NTS, "chronyd", "ntp", nts=True, note="reference"),
)


def chronyd_query(server: bench.Server) -> dict[str, Any]:
    """``chronyd -Q`` (over NTS for an NTS server): one offset, the clock
    never set."""
    chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
    work = Path(tempfile.mkdtemp(prefix="nts-acc-chrony-"))
    cmd = [chronyd, "-Q", "-t", "8"]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]
    source = f"server {server.host} port {server.port} iburst minpoll -6 maxpoll -6"
    nts = []
    if server.ke_port is not None:
        source += f" nts ntsport {server.ke_port}"
        nts = [f"ntstrustedcerts {server.workdir / 'nts-cert.pem'}"]
    cmd += [
        source,
        *nts,
        f"pidfile {work / 'chronyd.pid'}",
        "cmdport 0",
        "bindcmdaddress /",
    ]
    cmd = bench.pin(bench.LOAD_CPU, cmd)
    try:
        done = subprocess.run(
            cmd, capture_output=True, check=False, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = done.stdout + done.stderr
    found = re.search(r"System clock wrong by (-?[0-9.]+) seconds", text)
    if found is None:
        return {"error": text.strip()[-300:] or f"status {done.returncode}"}
    return {"offset_s": float(found.group(1))}


def ntpsec_offsets(ntpd: Path, server: bench.Server, seconds: float) -> dict[str, Any]:
    """NTPsec's ntpd over NTS for *seconds*: its peerstats offsets."""
    if server.ke_port is None:
        # Without NTS, ntpd's server line takes no port: it asks port 123.
        return {"skipped": "NTPsec's ntpd queries plain NTP on port 123 only"}
    work = Path(tempfile.mkdtemp(prefix="nts-acc-ntpsec-"))
    stats = work / "stats"
    stats.mkdir()
    conf = work / "ntp.conf"
    conf.write_text(
        f"server localhost:{server.ke_port} nts "
        f"ca {server.workdir / 'nts-cert.pem'} iburst minpoll 0 maxpoll 0\n"
        "disable ntp\n"
        "disable kernel\n"
        "interface ignore all\n"
        "interface listen 127.0.0.1\n"
        f"statsdir {stats}/\n"
        "statistics peerstats\n"
        "filegen peerstats file peerstats type none enable\n"
    )
    cmd = bench.pin(
        bench.LOAD_CPU,
        [
            "setpriv",
            "--bounding-set",
            "-sys_time",
            "--inh-caps",
            "-sys_time",
            "--",
            str(ntpd),
            "-n",
            "-c",
            str(conf),
            "-l",
            str(work / "ntpd.log"),
            "-f",
            str(work / "ntp.drift"),
            "-p",
            str(work / "ntpd.pid"),
        ],
    )
    proc = bench.PROCS.start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
    finally:
        bench.PROCS.stop(proc)
    out: dict[str, Any] = {"command": shlex.join(cmd)}
    try:
        lines = (stats / "peerstats").read_text().splitlines()
    except OSError:
        log = (work / "ntpd.log").read_text(errors="replace")[-400:]
        shutil.rmtree(work, ignore_errors=True)
        return {**out, "error": f"no peerstats; log: {log}"}
    shutil.rmtree(work, ignore_errors=True)
    offsets = []
    for line in lines:
        parts = line.split()
        # Authentic (CTL_PST_AUTHENTIC << 8) samples only.
        if len(parts) >= 6 and int(parts[3], 16) & 0x2000:
            offsets.append(float(parts[4]))
    return {**out, **summary(offsets)}


def summary(offsets: list[float]) -> dict[str, Any]:
    if not offsets:
        return {"samples": 0}
    return {
        "samples": len(offsets),
        "offsets_s": offsets,
        "median_s": statistics.median(offsets),
        "min_s": min(offsets),
        "max_s": max(offsets),
    }


def max_rate(server: bench.Server) -> float:
    """Replies/s with the benchmark's full closed-loop load, 3 s."""
    cmd = bench.loadgen_command(
        server, bench.FULL, duration=3, warmup=0.5, sources=bench.DEFAULT_SOURCES
    )
    return float(bench.run_loadgen(cmd, timeout=30)["replies_per_s"])


def port_123_free() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", 123))
        except OSError:
            return False
    return True


def measure(
    variant: bench.Variant, runs: int, ntpd: Path | None, ntpsec_s: float
) -> dict[str, Any]:
    twistd = bench.twistd_path()
    out: dict[str, Any] = {"server": variant.name}
    with bench.running_server(variant, twistd) as server:
        out["server_command"] = shlex.join(server.cmd)
        rate = max_rate(server)
        out["max_replies_per_s"] = round(rate)
        for phase in ("idle", "half load"):
            entry: dict[str, Any] = {}
            load = None
            if phase == "half load":
                cmd = bench.loadgen_command(
                    server,
                    bench.FULL,
                    duration=600,
                    warmup=0,
                    rate=rate / 2,
                    sources=bench.DEFAULT_SOURCES,
                )
                entry["load_command"] = shlex.join(cmd)
                load = bench.PROCS.start(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                time.sleep(1.0)
            try:
                chrony = [chronyd_query(server) for _ in range(runs)]
                entry["chronyd"] = {
                    **summary([c["offset_s"] for c in chrony if "offset_s" in c]),
                    "errors": [c["error"] for c in chrony if "error" in c],
                }
                if ntpd is not None:
                    entry["ntpsec"] = ntpsec_offsets(ntpd, server, ntpsec_s)
            finally:
                if load is not None:
                    with suppress(ProcessLookupError):
                        os.killpg(load.pid, signal.SIGTERM)
                    with suppress(subprocess.TimeoutExpired):
                        stdout, _ = load.communicate(timeout=5)
                        with suppress(json.JSONDecodeError):
                            got = json.loads(stdout)
                            entry["load_replies_per_s"] = round(got["replies_per_s"])
                    bench.PROCS.stop(load)
            out[phase] = entry
    return out


def us(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e6:+.0f}"


def cell(entry: dict[str, Any]) -> str:
    if not entry or not entry.get("samples"):
        return "–"
    return (
        f"{us(entry['median_s'])} ({us(entry['min_s'])} … {us(entry['max_s'])}), "
        f"n={entry['samples']}"
    )


def markdown(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        (
            f"Machine: {machine['cpu_model']}, {machine['cores']} cores, "
            f"{machine['kernel']}, load average at start "
            f"{' '.join(machine['loadavg_at_start'])}"
        ),
        "",
        (
            "| server | phase | load replies/s | chronyd -Q offset µs, median (min … max)"
            " | NTPsec offset µs, median (min … max) |"
        ),
        "|---|---|---:|---|---|",
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['server']} | error: {result['error']} | | | |")
            continue
        for phase in ("idle", "half load"):
            entry = result[phase]
            rate = entry.get("load_replies_per_s")
            lines.append(
                f"| {result['server']} | {phase} | "
                f"{'–' if rate is None else f'{rate:,}'} | "
                f"{cell(entry['chronyd'])} | {cell(entry.get('ntpsec', {}))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="chronyd -Q runs a phase")
    parser.add_argument(
        "--ntpsec-seconds", type=float, default=20.0, help="NTPsec time a phase"
    )
    parser.add_argument("--ntpsec", type=Path, default=NTPSEC, help="NTPsec's ntpd")
    parser.add_argument("--only", default="", help="semicolon-separated servers")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    bench.build_c()
    ntpd: Path | None = args.ntpsec
    if ntpd is None or not os.access(ntpd, os.X_OK):
        print(f"nts_accuracy: no NTPsec ntpd at {ntpd}: chronyd only", file=sys.stderr)
        ntpd = None
    elif os.geteuid() != 0 or not port_123_free():
        print("nts_accuracy: 127.0.0.1:123 not free (or not root): chronyd only")
        ntpd = None
    wanted = {name for name in args.only.split(";") if name}
    results = []
    try:
        for variant in SERVERS:
            if wanted and variant.name not in wanted:
                continue
            print(f"nts_accuracy: {variant.name}", file=sys.stderr)
            try:
                results.append(measure(variant, args.runs, ntpd, args.ntpsec_seconds))
            except (bench.StartError, RuntimeError, OSError) as exc:
                results.append({"server": variant.name, "error": str(exc)})
    finally:
        bench.PROCS.stop_all()
    machine = bench.machine()
    print(markdown(results, machine))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"machine": machine, "results": results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
