"""Log observer factories for twistd's ``--logger``.

``twistd --logger udptime.logging.json_stdout -n udptime`` writes one JSON
object per line to standard output, for journald, Docker or a log shipper:
``time`` (RFC 3339 UTC), ``level``, ``namespace``, ``message`` (the event
formatted as text) and every structured field of the event (``udp_format``,
``host``, ``port``, ``worker``, the counts of a summary, ...) at top level.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer


@implementer(ILogObserver)
class JsonLinesObserver:
    """One compact JSON object per event and line."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                event.get("log_time", 0.0), datetime.UTC
            ).isoformat(timespec="microseconds"),
            "level": getattr(level, "name", str(level)),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, default=repr) + "\n")
        self._out.flush()


def json_stdout() -> ILogObserver:
    """JSON lines on the standard output twistd started with."""
    return JsonLinesObserver(sys.stdout)
