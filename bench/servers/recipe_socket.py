"""The recipe's raw-socket ctime server loop, as printed.

Copied from /work/shared/recipe/udp-server-recipe.rst (Python Cookbook,
11.3 "Creating a UDP Server", the ``socket``-only variant). Changes: the port
comes from ``sys.argv[1]`` instead of the literal 20000, the function is
annotated, and ruff's formatter normalised the quotes. The per-request
``print`` is kept; the benchmark sends this process's stdout to /dev/null.
"""

import sys
import time
from socket import AF_INET, SOCK_DGRAM, socket


def time_server(address: tuple[str, int]) -> None:
    sock = socket(AF_INET, SOCK_DGRAM)
    sock.bind(address)
    while True:
        msg, addr = sock.recvfrom(8192)  # noqa: RUF059 (as printed)
        print("Got message from", addr)
        resp = time.ctime()
        sock.sendto(resp.encode("ascii"), addr)


if __name__ == "__main__":
    time_server(("", int(sys.argv[1])))
