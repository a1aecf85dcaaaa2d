"""An in-memory pub/sub bus with Redis's ordering, for unit tests of the sans-I/O core.

:class:`MemoryBus` has the interface of :class:`ppbridge.bus.RedisBus`; the end-to-end
tests use the real thing.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ppbridge.bus import MessageHandler, OversizedHandler, StateHandler
from ppbridge.config import MAX_FRAME_SIZE
from ppbridge.errors import BusUnavailable
from ppbridge.wire import OVERHEAD


def _ignore(*args: object) -> None:
    return None


class MemoryBroker:
    """A pub/sub broker in memory with Redis's ordering: FIFO, delivered to each subscriber.

    For unit tests of the sans-I/O core. ``published`` records everything (an eavesdropper);
    ``drop`` can be set to a predicate that loses chosen messages.
    """

    def __init__(self) -> None:
        self.clients: list[MemoryBus] = []
        self.published: list[tuple[bytes, bytes]] = []
        self.drop: Callable[[bytes, bytes], bool] | None = None
        self._queue: deque[tuple[MemoryBus, bytes, bytes]] = deque()
        self._delivering = False

    def client(self) -> MemoryBus:
        bus = MemoryBus(self)
        self.clients.append(bus)
        return bus

    def publish(self, channel: bytes, message: bytes) -> int:
        self.published.append((channel, message))
        receivers = [c for c in self.clients if c.connected and c.wants(channel)]
        if self.drop is not None and self.drop(channel, message):
            return len(receivers)
        for client in receivers:
            self._queue.append((client, channel, message))
        if not self._delivering:
            self._delivering = True
            try:
                while self._queue:
                    client, ch, msg = self._queue.popleft()
                    if len(msg) > client.max_message:  # as RedisBus: refused unread
                        client.on_oversized(ch, len(msg))
                    else:
                        client.on_message(ch, msg)
            finally:
                self._delivering = False
        return len(receivers)


class MemoryBus:
    """One client of a :class:`MemoryBroker`; same interface as :class:`RedisBus`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self.on_message: MessageHandler = _ignore
        self.on_state: StateHandler = _ignore
        self.on_oversized: OversizedHandler = _ignore
        self.on_public: Callable[[], None] = _ignore  # never: one connection here
        self.max_message = MAX_FRAME_SIZE + OVERHEAD
        self.public_losses = 0  # one connection in memory, never lost on its own
        self.channels: set[bytes] = set()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        self.set_connected(True)

    def stop(self) -> Deferred[None]:
        self.set_connected(False)
        return defer.succeed(None)

    def set_connected(self, up: bool) -> None:
        """Simulate the link going down or coming back."""
        if up != self._connected:
            self._connected = up
            self.on_state(up)

    def wants(self, channel: bytes) -> bool:
        return channel in self.channels

    def publish(self, channel: bytes, message: bytes | bytearray) -> Deferred[int]:
        if not self._connected:
            return defer.fail(BusUnavailable())
        return defer.succeed(self._broker.publish(channel, bytes(message)))

    def numsub(self, channels: list[bytes]) -> Deferred[dict[bytes, int]]:
        if not self._connected:
            return defer.fail(BusUnavailable())
        live = [c for c in self._broker.clients if c.connected]
        return defer.succeed({ch: sum(ch in c.channels for c in live) for ch in channels})

    def subscribe(self, channel: bytes) -> Deferred[None]:
        self.channels.add(channel)
        return defer.succeed(None)

    def unsubscribe(self, channel: bytes) -> Deferred[None]:
        self.channels.discard(channel)
        return defer.succeed(None)
