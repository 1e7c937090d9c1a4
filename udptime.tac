"""Classic deployment: ``twistd -ny udptime.tac``.

Edit DEFAULT_OPTIONS to change what this file serves; ``UDPTIME_OPTIONS`` in
the environment (e.g. ``UDPTIME_OPTIONS="--port 20001 --format time"``) is
parsed by the same ``Options`` as the twistd plugin and replaces them, so
containers and tests use this file unedited. From there on it is the plugin's
code path: ``Options`` builds the one ``Config`` and ``makeService`` serves it.
"""

import os
import shlex
import sys

from twisted.application import service
from twisted.python import usage

from udptime import tap

DEFAULT_OPTIONS = ""

options = tap.Options()
try:
    options.parseOptions(
        shlex.split(os.environ.get("UDPTIME_OPTIONS", DEFAULT_OPTIONS))
    )
except (usage.UsageError, ValueError) as exc:  # ValueError: shlex quoting
    sys.stderr.write(f"udptime.tac: UDPTIME_OPTIONS: {exc}\n")
    raise SystemExit(2) from None

application = service.Application("udptime")
tap.makeService(options).setServiceParent(application)
