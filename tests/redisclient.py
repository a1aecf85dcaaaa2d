"""A blocking, binary-safe raw Redis client for tests: commands, PUBLISH and a subscriber.

Built on :class:`ppbridge.redisraw.RedisConnection` (``hiredis.Reader`` reads the
replies), so the tests speak to Redis with no parser of their own. Status replies (``+OK``,
``+PONG``) come as str, bulk strings as bytes; a top-level error reply is raised as
``RedisReplyError``, one nested in an array reply is returned as an instance.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence

from ppbridge.redis_server import RedisServer
from ppbridge.redisraw import RedisConnection, RedisReplyError, parse_info

__all__ = ["RawRedisClient", "RedisReplyError", "client_for"]


class RawRedisClient(RedisConnection):
    """One connection to Redis (authenticated when given a password), for tests and tools."""

    def __init__(
        self, host: str, port: int, password: str | None = None, timeout: float = 5.0
    ) -> None:
        super().__init__(host, port, timeout)
        self._pending: collections.deque[tuple[bytes, bytes, bytes]] = collections.deque()
        if password is not None:
            try:
                self.command("AUTH", password)
            except BaseException:
                self.close()
                raise

    def command(self, *args: bytes | str | int) -> object:
        """Send one command and return its reply; raise ``RedisReplyError`` on ``-ERR``."""
        self.send(args)
        reply = self.reply(time.monotonic() + self.timeout)
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def publish(self, channel: bytes | str, message: bytes) -> int:
        """PUBLISH; returns the number of subscribers that received it."""
        count = self.command("PUBLISH", channel, message)
        if not isinstance(count, int):
            raise RedisReplyError(f"unexpected PUBLISH reply: {count!r}")
        return count

    def info(self, section: str = "") -> dict[str, str]:
        """INFO [section] parsed into ``{field: value}``."""
        return parse_info(self.command("INFO", section) if section else self.command("INFO"))

    def subscribe(self, *channels: bytes | str) -> None:
        """SUBSCRIBE and wait for every confirmation; the connection is then a subscriber."""
        self._subscribe("SUBSCRIBE", channels)

    def psubscribe(self, *patterns: bytes | str) -> None:
        """PSUBSCRIBE and wait for every confirmation."""
        self._subscribe("PSUBSCRIBE", patterns)

    def read_message(self, timeout: float | None = None) -> tuple[bytes, bytes, bytes] | None:
        """Next ``(kind, channel, payload)`` pushed to a subscriber; None after ``timeout``.

        ``kind`` is ``b"message"`` or ``b"pmessage"``; confirmations are skipped. ``timeout``
        None blocks until a message arrives.
        """
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                reply = self.reply(deadline)
            except TimeoutError:
                return None
            message = _as_message(reply)
            if message is not None:
                return message

    def _subscribe(self, verb: str, names: Sequence[bytes | str]) -> None:
        if not names:
            raise ValueError(f"{verb} needs at least one channel or pattern")
        self.send((verb, *names))
        confirmations = 0
        deadline = time.monotonic() + self.timeout
        while confirmations < len(names):
            reply = self.reply(deadline)
            if isinstance(reply, RedisReplyError):
                raise reply
            message = _as_message(reply)
            if message is not None:
                self._pending.append(message)
            elif isinstance(reply, list) and reply and reply[0] == verb.lower().encode():
                confirmations += 1


def client_for(server: RedisServer) -> RawRedisClient:
    """A new client connected (and authenticated) to ``server``."""
    return RawRedisClient(server.host, server.port, server.password)


def _as_message(reply: object) -> tuple[bytes, bytes, bytes] | None:
    """``(kind, channel, payload)`` if ``reply`` is a pushed (p)message, else None."""
    if not isinstance(reply, list) or not all(isinstance(item, bytes) for item in reply):
        return None
    if len(reply) == 3 and reply[0] == b"message":
        return (b"message", reply[1], reply[2])
    if len(reply) == 4 and reply[0] == b"pmessage":
        return (b"pmessage", reply[2], reply[3])
    return None
