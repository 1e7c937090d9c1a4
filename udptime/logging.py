"""Log observer factories for twistd's ``--logger``.

``twistd --logger udptime.logging.json_stdout -n udptime`` writes one JSON
object per line to standard output, with every structured field of the event
(``udp_format``, ``host``, ``port``, counts of a summary, ...), for journald,
Docker or a log shipper.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    """JSON lines on stdout (no RFC 7464 record separator: one object a line)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
