"""A plain asyncio ctime UDP server: the stdlib event loop's baseline.

``asyncio.DatagramProtocol`` answering every datagram with ``time.ctime()``,
like the recipe but without the per-request ``print``. No caching, no
policy, no counters: what a careful hand-written asyncio server costs.

usage: python asyncio_ctime.py PORT [HOST]   (HOST defaults to 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, cast


class CtimeProtocol(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport; asyncio's own class for it does not
        # inherit DatagramTransport, so no isinstance check here.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(time.ctime().encode("ascii"), addr)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        CtimeProtocol, local_addr=(host, port)
    )
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


def main(argv: list[str]) -> None:
    port = int(argv[1])
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    try:
        asyncio.run(serve(host, port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv)
