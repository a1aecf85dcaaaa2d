"""PUBLISH load and pub/sub subscribers against one Redis, for the capacity measurement
(bench/capacity.py), plus the small RESP client the bench reads Redis's counters with.

Two modes, each run as a child process of the bench:

    python bench/pubload.py subscribe --port P --channel CH --subscribers N [--patterns K]
    python bench/pubload.py pubsub --port P --channel CH --subscribers N [--patterns K]
                            --size BYTES --connections C --pipeline D --window BYTES

- ``subscribe``: subscribers only, for an outside publisher (redis-benchmark). Opens N
  connections, each SUBSCRIBEd to CH, and with ``--patterns K`` one more connection
  PSUBSCRIBEd to K patterns shaped like idle forwarders' (``ppbridge:f:<16 hex>:*``, never
  matching CH); prints ``READY`` once Redis has confirmed every subscription, then reads and
  discards everything (``recv_into`` one buffer, no parsing) until its stdin closes, and
  prints ``RESULT {json}``: bytes received per subscriber and how many connections Redis
  closed meanwhile (a subscriber past ``client-output-buffer-limit pubsub`` is disconnected).
- ``pubsub``: the same subscribers and, in the same process and event loop, C publishing
  connections, each sending D PUBLISH commands of a BYTES-byte payload at once and counting
  their replies. Closed loop, as ppbridge's flow control is: no PUBLISH starts while the
  slowest subscriber is more than ``--window`` bytes behind, so Redis's output buffers stay
  bounded and the figures are what Redis carries, not how fast a buffer fills up. Used for
  256 KiB frames (which do not fit redis-benchmark's command line: Linux limits one argument
  to 128 KiB) and for every size where redis-benchmark is missing. ``RESULT`` adds commands
  sent and acknowledged and error replies.

Nothing here is timed: the bench counts PUBLISH calls, bytes and CPU on Redis's side
(INFO and /proc) over the seconds it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import selectors
import socket
import sys
from collections.abc import Sequence
from typing import Any

import hiredis

RECV_BUFFER = 1 << 20
CONNECT_TIMEOUT = 10.0


def encode(*args: bytes | str | int) -> bytes:
    """One RESP command (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += [b"$%d\r\n" % len(raw), raw, b"\r\n"]
    return b"".join(parts)


class Resp:
    """A blocking RESP connection to Redis on 127.0.0.1, replies parsed by ``hiredis``."""

    def __init__(self, port: int, host: str = "127.0.0.1", password: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        if password is not None:
            self.command("AUTH", password)

    def send(self, *args: bytes | str | int) -> None:
        self.sock.sendall(encode(*args))

    def reply(self) -> Any:
        """The next reply (an error reply raises RuntimeError)."""
        while True:
            found = self.reader.gets()
            if found is not False:
                if isinstance(found, hiredis.ReplyError):
                    raise RuntimeError(f"Redis: {found}")
                return found
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("Redis closed the connection")
            self.reader.feed(chunk)

    def command(self, *args: bytes | str | int) -> Any:
        self.send(*args)
        return self.reply()

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict of its ``key:value`` lines."""
        text = self.command("INFO", section)
        out: dict[str, str] = {}
        for line in bytes(text).decode("utf-8", "replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                out[key.strip()] = value.strip()
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def idle_patterns(count: int) -> list[bytes]:
    """``count`` patterns of the shape a forwarder subscribes to, for forwarders that exist
    nowhere: every PUBLISH is matched against each of them and matches none."""
    return [b"ppbridge:f:%s:*" % secrets.token_hex(8).encode() for _ in range(count)]


def emit(kind: str, payload: Any = None) -> None:
    sys.stdout.write(kind + ("" if payload is None else " " + json.dumps(payload)) + "\n")
    sys.stdout.flush()


def open_subscribers(args: argparse.Namespace) -> list[Resp]:
    """The N subscribers to the channel, then (with --patterns) the idle pattern connection,
    each confirmed by Redis."""
    conns: list[Resp] = []
    for _ in range(args.subscribers):
        conn = Resp(args.port)
        conn.command("SUBSCRIBE", args.channel)
        conns.append(conn)
    if args.patterns:
        conn = Resp(args.port)
        patterns = idle_patterns(args.patterns)
        conn.send("PSUBSCRIBE", *patterns)
        for _ in patterns:
            conn.reply()
        conns.append(conn)
    return conns


def subscribe(args: argparse.Namespace) -> int:
    conns = open_subscribers(args)
    sel = selectors.DefaultSelector()
    received = [0] * len(conns)
    lost = 0
    for i, conn in enumerate(conns):
        conn.sock.setblocking(False)
        sel.register(conn.sock, selectors.EVENT_READ, i)
    sel.register(sys.stdin, selectors.EVENT_READ, -1)
    emit("READY")
    buf = bytearray(RECV_BUFFER)
    view = memoryview(buf)
    running = True
    while running:
        for key, _ in sel.select():
            i = key.data
            if i == -1:
                if not os.read(sys.stdin.fileno(), 4096):
                    running = False
                continue
            try:
                n = conns[i].sock.recv_into(view)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                lost += 1
                sel.unregister(conns[i].sock)
            received[i] += n
    emit("RESULT", {"received_bytes": received[: args.subscribers], "connections_lost": lost})
    return 0


def message_size(channel: bytes, size: int) -> int:
    """Bytes one ``size``-byte message on ``channel`` takes on a subscriber's connection."""
    return len(b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n\r\n" % (len(channel), channel, size)) + size


class PubSub:
    """Publishers and subscribers in one non-blocking loop, the publishers held back by a
    window on the slowest subscriber (see the module's docstring)."""

    def __init__(self, args: argparse.Namespace, subs: list[Resp]) -> None:
        self.channel = args.channel.encode()
        self.batch = encode("PUBLISH", self.channel, os.urandom(args.size)) * args.pipeline
        self.depth = args.pipeline
        self.unit = message_size(self.channel, args.size)
        self.max_behind = max(args.pipeline, args.window // self.unit)  # messages
        self.subs = subs[: args.subscribers]
        self.received = [0] * len(self.subs)
        self.pubs = [Resp(args.port) for _ in range(args.connections)]
        self.pending: list[memoryview | None] = [None] * len(self.pubs)
        self.started = self.acked = self.errors = self.lost = 0
        self.sel = selectors.DefaultSelector()

    def behind(self) -> int:
        """Messages the slowest subscriber has yet to receive."""
        return self.started - min((r // self.unit for r in self.received), default=self.started)

    def run(self) -> dict[str, Any]:
        for i, conn in enumerate(self.subs):
            conn.sock.setblocking(False)
            self.sel.register(conn.sock, selectors.EVENT_READ, ("sub", i))
        for i, conn in enumerate(self.pubs):
            conn.sock.setblocking(False)
            self.sel.register(conn.sock, selectors.EVENT_READ, ("pub", i))
        self.sel.register(sys.stdin, selectors.EVENT_READ, ("stdin", 0))
        buf = memoryview(bytearray(RECV_BUFFER))
        running = True
        while running:
            self.refill()
            for key, events in self.sel.select(0.5):
                kind, i = key.data
                if kind == "stdin":
                    running = bool(os.read(sys.stdin.fileno(), 4096))
                elif kind == "sub":
                    self.read_sub(i, buf)
                elif events & selectors.EVENT_WRITE:
                    self.write_pub(i)
                if kind == "pub" and events & selectors.EVENT_READ:
                    self.read_pub(i)
        return {"received_bytes": self.received, "connections_lost": self.lost, "sent": self.started,
                "acked": self.acked, "errors": self.errors}

    def refill(self) -> None:
        """Start a batch on every idle publisher while the window allows."""
        for i, conn in enumerate(self.pubs):
            if self.pending[i] is None and self.behind() + self.depth <= self.max_behind:
                self.pending[i] = memoryview(self.batch)
                self.started += self.depth
                self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ("pub", i))

    def write_pub(self, i: int) -> None:
        pending = self.pending[i]
        if pending is None:
            return
        try:
            sent = self.pubs[i].sock.send(pending)
        except BlockingIOError:
            return
        rest = pending[sent:]
        if len(rest):
            self.pending[i] = rest
        else:
            self.pending[i] = None
            self.sel.modify(self.pubs[i].sock, selectors.EVENT_READ, ("pub", i))

    def read_pub(self, i: int) -> None:
        try:
            data = self.pubs[i].sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise RuntimeError("Redis closed a publishing connection")
        self.acked += data.count(b"\n")
        self.errors += data.count(b"-")

    def read_sub(self, i: int, buf: memoryview) -> None:
        try:
            n = self.subs[i].sock.recv_into(buf)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:  # Redis dropped this subscriber: count it and stop waiting for it
            self.lost += 1
            self.sel.unregister(self.subs[i].sock)
            self.received[i] = 1 << 62
        else:
            self.received[i] += n


def pubsub(args: argparse.Namespace) -> int:
    subs = open_subscribers(args)
    emit("READY")
    emit("RESULT", PubSub(args, subs).run())
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("subscribe", "pubsub"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--subscribers", type=int, default=1)
    p.add_argument("--patterns", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--pipeline", type=int, default=1)
    p.add_argument("--window", type=int, default=2 << 20, help="bytes the slowest subscriber may lag (2 MiB)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return subscribe(args) if args.mode == "subscribe" else pubsub(args)
    except (OSError, RuntimeError) as err:
        emit("FAILED", str(err))
        return 1


if __name__ == "__main__":
    sys.exit(main())
