"""The WebSocket upstream of the benchmark: an echo server on the ``websockets`` library.

``python bench/wsecho.py --port P`` serves WebSocket on 127.0.0.1:P (asyncio, one process)
and sends every text and binary message back as it came, whatever the path. nginx proxies
``/ws`` to it (bench/upstreams.py), so every row reaches it through the same base URL and the
same extra hop as the HTTP upstream. No compression (permessage-deflate is not offered back),
no keepalive pings, messages up to 16 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

MAX_MESSAGE = 16 << 20


async def echo(connection: ServerConnection) -> None:
    try:
        async for message in connection:
            await connection.send(message)
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with serve(echo, "127.0.0.1", port, compression=None, max_size=MAX_MESSAGE, ping_interval=None,
                     backlog=1024):
        print(f"wsecho listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
