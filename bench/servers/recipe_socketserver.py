"""The recipe's ``socketserver.UDPServer`` ctime server, as printed.

Copied from /work/shared/recipe/udp-server-recipe.rst (Python Cookbook,
11.3 "Creating a UDP Server"). Changes: the port comes from ``sys.argv[1]``
instead of the literal 20000, ``handle`` is annotated, and ruff's formatter
normalised the quotes. The per-request ``print`` is kept; the benchmark
sends this process's stdout to /dev/null.
"""

import sys
import time
from socketserver import BaseRequestHandler, UDPServer


class TimeHandler(BaseRequestHandler):
    def handle(self) -> None:
        print("Got connection from", self.client_address)
        # Get message and client socket
        msg, sock = self.request  # noqa: RUF059 (as printed)
        resp = time.ctime()
        sock.sendto(resp.encode("ascii"), self.client_address)


if __name__ == "__main__":
    serv = UDPServer(("", int(sys.argv[1])), TimeHandler)
    serv.serve_forever()
