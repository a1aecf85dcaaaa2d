"""One blocking connection to Redis, sending with ``hiredis.pack_command`` and reading with
``hiredis.Reader``: what ``ppbridge.redis_server`` asks a server it started, what the tests' raw
client (``tests/redisclient.py``) and hostile Redis (``tests/hostile.py``) encode and parse with.
Not the product's data path (txredisapi, in ``bus.py`` and ``redisconn.py``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Self

import hiredis

INCOMPLETE = object()  # what hiredis.Reader.gets() returns until a whole reply is in


class RedisReplyError(Exception):
    """A RESP error reply (``-ERR ...``); the message is the error text."""


class RedisConnection:
    """One blocking connection to Redis: commands out, whole replies in (``hiredis.Reader``).

    Replies come as hiredis gives them (bulk strings as bytes, integers, lists, None), with
    two differences: an error reply is a ``RedisReplyError`` instance (returned, not raised),
    and a status reply (``+OK``) is a str, as RESP tells them apart from bulk strings. That
    last holds for a reply that starts a chunk read into an empty buffer, which is every reply
    of a connection that waits for each answer before the next command; a status reply read
    behind another one in the same chunk (pipelined) comes as bytes.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=INCOMPLETE)
        self._head: bytes | None = None  # the type byte of the reply at the buffer's start
        self._sock: socket.socket | None = socket.create_connection((host, port), timeout)

    def send(self, *commands: Sequence[bytes | str | int]) -> None:
        """Send ``commands`` (each a sequence of arguments) in one write, as RESP arrays.

        Raises ``TypeError`` for an argument that is not bytes, str or int, before sending.
        """
        data = b"".join(encode_command(args) for args in commands)
        self._socket().sendall(data)

    def reply(self, deadline: float | None) -> object:
        """The next whole reply, by ``deadline`` (``time.monotonic()``; None waits forever).

        Raises ``TimeoutError`` with the buffer kept, so a later call resumes cleanly, and
        ``ConnectionError`` when the server closes the connection or sends what is not RESP.
        """
        sock = self._socket()
        while True:
            head = self._head
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as err:
                raise ConnectionError(f"not a RESP reply: {err}") from err
            if reply is not INCOMPLETE:
                self._head = None
                return reply.decode("utf-8", "replace") if head == b"+" and isinstance(reply, bytes) else reply
            if deadline is None:
                sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out waiting for a redis reply")
                sock.settimeout(remaining)
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            if not self._reader.has_data():
                self._head = chunk[:1]
            self._reader.feed(chunk)

    def close(self) -> None:
        """Close the socket; idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionError("the redis connection is closed")
        return self._sock


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP array of bulk strings (``hiredis.pack_command``).

    str is sent as UTF-8 and int in decimal; anything else (bool and float included) raises
    ``TypeError``.
    """
    items: list[bytes | str | int] = []
    for arg in args:
        if isinstance(arg, (bytearray, memoryview)):
            arg = bytes(arg)
        if isinstance(arg, bool) or not isinstance(arg, (bytes, str, int)):
            raise TypeError(f"redis arguments are bytes, str or int, not {type(arg).__name__}")
        items.append(arg)
    return hiredis.pack_command(tuple(items))  # type: ignore[arg-type]


def parse_info(raw: object) -> dict[str, str]:
    """An INFO reply as ``{field: value}`` (section headers and blank lines left out)."""
    if not isinstance(raw, bytes):
        raise RedisReplyError(f"unexpected INFO reply: {raw!r}")
    fields: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value
    return fields
