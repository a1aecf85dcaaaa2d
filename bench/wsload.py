"""WebSocket load: echo round trips and one-connection throughput, against bench/wsecho.py.

The client runs as a child process (asyncio + ``websockets``, one process, no compression),
so its CPU time is its own process's and is never counted in a row's figures:

    python bench/wsload.py --url ws://127.0.0.1:P/ws --mode echo --connections 16 --size 100
                           --warmup 2 --duration 5

1. opens its connections (the handshake times are kept) and runs the load for ``--warmup``
   seconds, discarded;
2. prints ``READY`` and waits for a ``GO`` line on stdin (the bench takes its CPU snapshot
   in between);
3. runs the measured load for ``--duration`` seconds, prints ``RESULT {json}``, closes.

Any failure (a refused handshake, a connection that will not open) prints ``FAILED reason``
instead and exits 1.

Modes:

- ``echo``: each connection sends one ``--size``-byte binary message, waits for its echo
  (checked byte for byte), and repeats; every round trip's time (``time.perf_counter``) is
  kept; p50/p90/p99/max over all connections together.
- ``throughput``: one connection keeps ``--inflight`` binary messages of ``--size`` bytes
  (1 MiB: four pseudo-random blocks, incompressible, in turn) on their way to the echo
  server, sending the next as each echo comes back (checked byte for byte). MB/s = echoed
  bytes the client received within the measured seconds / those seconds (10^6 bytes per
  MB); the same amount went the other way meanwhile.

:class:`WsClient` is the bench's side: it starts the child, waits for ``READY``, and its
session's :meth:`WsSession.measure` sends ``GO`` and reads the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from children import LineReader, _die_with_parent, child_env
from procstats import cpu_seconds

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
RECV_TIMEOUT = 10.0  # one echo that takes longer is an error (the connection is reopened)
GRACE = 30.0  # beyond a phase's own duration before the bench gives up on the child


# ---------------------------------------------------------------------------- the child


def percentile(sorted_values: list[int], pct: float) -> float:
    """Nearest-rank percentile (as bench/loadgen.py computes pyload's)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[index])


class Load:
    """The client's state: its connections, and the figures of the phase being run."""

    def __init__(self, url: str, size: int, inflight: int) -> None:
        self.url, self.size, self.inflight = url, size, inflight
        self.handshakes_ms: list[float] = []
        self.latencies_us: list[int] = []
        self.errors: dict[str, int] = {}
        self.received = 0  # echoed bytes received within the phase's deadline
        self.received_all = 0  # ... and all of them, the drain after the deadline included
        self.messages = 0
        self.last_done = 0.0

    def reset(self) -> None:
        self.latencies_us, self.errors = [], {}
        self.received = self.received_all = self.messages = 0
        self.last_done = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def open(self) -> ClientConnection:
        started = time.perf_counter()
        conn = await connect(self.url, compression=None, proxy=None, max_size=max(self.size * 2, MiB),
                             ping_interval=None, open_timeout=RECV_TIMEOUT, close_timeout=2,
                             user_agent_header="ppbridge-bench-wsload")
        self.handshakes_ms.append((time.perf_counter() - started) * 1000)
        return conn

    async def echo(self, conn: ClientConnection, until: float) -> ClientConnection:
        """Round trips on ``conn`` until ``until``; reopens it after an error."""
        payload = random.Random(id(conn)).randbytes(self.size)
        while time.perf_counter() < until:
            started = time.perf_counter_ns()
            try:
                await conn.send(payload)
                got = await asyncio.wait_for(conn.recv(), RECV_TIMEOUT)
            except (ConnectionClosed, TimeoutError, OSError) as err:
                self.error("timeout" if isinstance(err, TimeoutError) else "closed")
                with contextlib.suppress(OSError, WebSocketException):
                    await conn.close()
                conn = await self._reopen(until)
                continue
            done = time.perf_counter_ns()
            self.latencies_us.append((done - started) // 1000)
            self.messages += 1
            self.last_done = done / 1e9
            if got != payload:
                self.error("mismatch")
        return conn

    async def _reopen(self, until: float) -> ClientConnection:
        while True:
            try:
                return await self.open()
            except (OSError, TimeoutError, WebSocketException):
                self.error("connect")
                if time.perf_counter() >= until:
                    raise
                await asyncio.sleep(0.1)

    async def throughput(self, conn: ClientConnection, until: float) -> None:
        """``inflight`` messages on their way at all times until ``until``, then drained."""
        blocks = [random.Random(i).randbytes(self.size) for i in range(4)]
        credit = asyncio.Semaphore(self.inflight)
        sent = 0

        async def sender() -> None:
            nonlocal sent
            while time.perf_counter() < until:
                await credit.acquire()
                if time.perf_counter() >= until:
                    credit.release()
                    return
                await conn.send(blocks[sent % len(blocks)])
                sent += 1

        async def receiver() -> None:
            count = 0
            while True:
                if count == sent and sending.done():
                    return
                got = await asyncio.wait_for(conn.recv(), RECV_TIMEOUT * 3)
                now = time.perf_counter()
                if got != blocks[count % len(blocks)]:
                    self.error("mismatch")
                count += 1
                self.messages += 1
                self.received_all += len(got)
                if now <= until:
                    self.received += len(got)
                    self.last_done = now
                credit.release()

        sending = asyncio.ensure_future(sender())
        try:
            await receiver()
        finally:
            sending.cancel()


async def wait_for_go() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise SystemExit("wsload: no GO from the bench")


def emit(kind: str, text: str) -> None:
    sys.stdout.write(f"{kind} {text}\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args.url, args.size, args.inflight)
    conns = await asyncio.gather(*(load.open() for _ in range(args.connections)))
    handshakes = sorted(load.handshakes_ms)

    async def phase(seconds: float) -> float:
        load.reset()
        started = time.perf_counter()
        until = started + seconds
        if args.mode == "echo":
            conns[:] = await asyncio.gather(*(load.echo(c, until) for c in conns))
        else:
            await load.throughput(conns[0], until)
        return started

    if args.warmup > 0:
        await phase(args.warmup)
    emit("READY", "")
    await wait_for_go()
    started = await phase(args.duration)
    seconds = max(1e-9, (load.last_done or time.perf_counter()) - started)
    lat = sorted(load.latencies_us)
    figures: dict[str, Any] = {
        "messages": load.messages, "seconds": round(seconds, 4), "errors": load.errors,
        "handshake_ms": round(handshakes[len(handshakes) // 2], 2),
    }
    if args.mode == "echo":
        figures.update({f"{name}_ms": round(percentile(lat, pct) / 1000, 3)
                        for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))})
    else:
        figures.update({"bytes": load.received, "bytes_total": load.received_all,
                        "mb_s": round(load.received / args.duration / 1e6, 1)})
    emit("RESULT", json.dumps(figures))
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="ws://host:port/path of the echo server")
    parser.add_argument("--mode", choices=("echo", "throughput"), required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument("--inflight", type=int, default=4, help="throughput: messages on their way at once")
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except (OSError, TimeoutError, WebSocketException) as err:
        emit("FAILED", f"{type(err).__name__}: {err}".replace("\n", " "))
        return 1
    return 0


# ---------------------------------------------------------------------------- the bench's side


@dataclass
class WsResult:
    """One measured WebSocket run (echo or throughput) of one row."""

    mode: str
    connections: int
    size: int
    messages: int
    seconds: float
    handshake_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    bytes: int = 0
    bytes_total: int = 0
    mb_s: float | None = None
    client_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["client_cpu_s"] = round(self.client_cpu_s, 3)
        if self.mode == "echo":
            for key in ("bytes", "bytes_total"):
                data.pop(key)
            data["round_trips_per_s"] = round(self.rate, 1)
        return data


def _cpu_seconds(pid: int) -> float:
    return cpu_seconds(pid) or 0.0


class WsSession:
    """A started wsload child, past its warm-up: :meth:`measure` runs the measured phase."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, mode: str, connections: int, size: int,
                 duration: float) -> None:
        self.proc, self.log, self.mode = proc, log, mode
        self.connections, self.size, self.duration = connections, size, duration
        self._reader = LineReader(proc, "bench/wsload.py", log)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def _line(self, timeout: float) -> tuple[str, str]:
        """The next line the child prints, as (kind, rest); RuntimeError on EOF or timeout."""
        return self._reader.line(timeout)

    def log_tail(self) -> str:
        return self._reader.log_tail()

    def wait_ready(self, timeout: float) -> None:
        kind, rest = self._line(timeout)
        if kind != "READY":
            raise RuntimeError(f"bench/wsload.py: expected READY, got {kind} {rest}")

    def measure(self) -> WsResult:
        """GO, then the result; the child's own CPU meanwhile is ``client_cpu_s``."""
        assert self.proc.stdin is not None
        cpu0 = _cpu_seconds(self.proc.pid)
        self.proc.stdin.write(b"GO\n")
        self.proc.stdin.flush()
        kind, rest = self._line(self.duration + GRACE)
        cpu1 = _cpu_seconds(self.proc.pid)
        if kind != "RESULT":
            raise RuntimeError(f"bench/wsload.py: expected RESULT, got {kind} {rest}")
        data = json.loads(rest)
        return WsResult(self.mode, self.connections, self.size, client_cpu_s=max(0.0, cpu1 - cpu0), **data)


class WsClient:
    """Starts bench/wsload.py children (the measuring client of the WebSocket figures)."""

    tool = f"bench/wsload.py (asyncio, websockets {websockets.__version__}, one process, no compression)"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @contextmanager
    def session(self, url: str, mode: str, connections: int, size: int, warmup: float, duration: float,
                inflight: int = 4) -> Iterator[WsSession]:
        """A child connected and warmed up (READY); stopped on exit whatever happened."""
        log = self.workdir / f"wsload-{mode}-{connections}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "wsload.py"), "--url", url, "--mode", mode, "--connections",
                 str(connections), "--size", str(size), "--inflight", str(inflight), "--warmup", str(warmup),
                 "--duration", str(duration)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=child_env(),
                preexec_fn=_die_with_parent)  # noqa: PLW1509 (the benchmark starts no threads)
        session = WsSession(proc, log, mode, connections, size, duration)
        try:
            session.wait_ready(warmup + RECV_TIMEOUT + GRACE)
            yield session
        finally:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
