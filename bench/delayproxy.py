"""A TCP relay on loopback that delays every byte by a fixed one-way time, in both directions.

``python bench/delayproxy.py --port P --target-port T --delay-ms MS`` accepts on 127.0.0.1:P and
relays each connection to 127.0.0.1:T. Bytes read at time t are written at t + MS, in order,
so a request/response exchange through it costs 2 x MS more: a WAN link's shape, not its
bandwidth. A direction holding more than ``MAX_QUEUED`` bytes stops reading until it drains.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal

MAX_QUEUED = 16 << 20


class _Pipe(asyncio.Protocol):
    """One direction's source socket; writes what it reads to ``peer`` ``delay`` seconds later."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._timer: asyncio.TimerHandle | None = None
        self._eof_pending = False
        self._lost = False
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._queue.append((loop.time() + self.delay, data))
        self._queued += len(data)
        if self._queued > MAX_QUEUED and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._arm()

    def eof_received(self) -> bool:
        self._eof_pending = True
        self._arm()
        return True  # keep our side open until the queue has drained to the peer

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof_pending = self._lost = True
        self._arm()

    def _arm(self) -> None:
        """Schedule the next flush (once the peer exists: until then bytes wait in the queue)."""
        if self._timer is not None or self.peer is None:
            return
        loop = asyncio.get_running_loop()
        when = self._queue[0][0] if self._queue else loop.time()
        self._timer = loop.call_at(when, self._flush)

    def _flush(self) -> None:
        """Write every chunk that is due, in order; re-arm for the next one."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        peer = self.peer.transport if self.peer is not None else None
        while self._queue and self._queue[0][0] <= now:
            _, data = self._queue.popleft()
            self._queued -= len(data)
            if peer is not None and not peer.is_closing():
                peer.write(data)
        if self._reading_paused and self._queued <= MAX_QUEUED // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._queue:
            self._arm()
        elif self._eof_pending and peer is not None and not peer.is_closing():
            if self._lost or not peer.can_write_eof():
                peer.close()
            else:
                peer.write_eof()


async def _relay(delay: float, target_port: int, client: _Pipe) -> None:
    """Connect ``client`` (already accepted) to the target; close it if that fails."""
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await loop.create_connection(lambda: _Pipe(delay), "127.0.0.1", target_port)
    except OSError:
        if client.transport is not None:
            client.transport.close()
        return
    client.peer, upstream.peer = upstream, client
    client._arm()
    upstream._arm()


async def serve(port: int, target_port: int, delay: float) -> None:
    """Accept and relay until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def accepted() -> _Pipe:
        pipe = _Pipe(delay)
        task = loop.create_task(_relay(delay, target_port, pipe))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return pipe

    server = await loop.create_server(accepted, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"delayproxy 127.0.0.1:{port} -> 127.0.0.1:{target_port}, {delay * 1000:g} ms each way", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.target_port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
