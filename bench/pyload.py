"""The Python load generator, used when wrk is not installed; one process of it.

``python bench/pyload.py --port P --path /small.txt --connections N --duration S`` runs N
keep-alive HTTP/1.1 connections on asyncio streams, each sending one GET after the other
until the time is up, and prints one JSON line: requests, errors, seconds and every latency
in microseconds. ``loadgen.run_python`` starts one such process per core and merges them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


class _Totals:
    def __init__(self) -> None:
        self.latencies_us: list[int] = []
        self.errors: dict[str, int] = {"connect": 0, "read": 0, "status": 0}


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> None:
    """Read (and drop) the body the response head announces: Content-Length or chunked."""
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        await reader.readexactly(int(lower[at + 17 : end]))
        return
    if b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return


async def _connection(port: int, request: bytes, deadline: float, totals: _Totals) -> None:
    """One keep-alive connection sending requests back to back until ``deadline``."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, TimeoutError):
            totals.errors["connect"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter_ns()
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                await asyncio.wait_for(_read_body(reader, head), 10)
                totals.latencies_us.append((time.perf_counter_ns() - start) // 1000)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    totals.errors["status"] += 1
                if b"\r\nconnection: close" in head.lower():
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            totals.errors["read"] += 1
        finally:
            writer.close()


async def run(port: int, path: str, connections: int, duration: float) -> dict[str, object]:
    """Run the load and return the totals as a JSON-ready dict."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode("ascii")
    totals = _Totals()
    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(*(_connection(port, request, deadline, totals) for _ in range(connections)))
    return {"requests": len(totals.latencies_us), "seconds": time.monotonic() - started,
            "errors": totals.errors, "latencies_us": totals.latencies_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.port, args.path, args.connections, args.duration))))


if __name__ == "__main__":
    main()
