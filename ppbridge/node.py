"""What the forwarder and the proxy share on the bus: sealing, opening and dropping.

Every session message either side receives goes through :meth:`SessionNode.open`; every one
it sends through :meth:`SessionNode.send`. A message that fails any check is dropped,
counted by reason and logged (rate-limited, so a flood cannot fill the disk) and never
raises past the bus callback.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ppbridge.bus import Bus
from ppbridge.errors import BusMessageError
from ppbridge.keyring import KeyEntry, Keyring
from ppbridge.logsafe import Throttle, escape
from ppbridge.metrics import Metrics
from ppbridge.streams import Chunk
from ppbridge.wire import OVERHEAD, Header, MsgType, unpack_header

log = Logger()


class DropLog:
    """Counts every drop; logs the first few of each reason per minute, then a summary."""

    def __init__(self, metrics: Metrics, clock: IReactorTime, side: str) -> None:
        self._metrics = metrics
        self._clock = clock
        self._side = side
        self._throttle = Throttle()

    def __call__(self, err: BusMessageError, channel: bytes) -> None:
        self._metrics.dropped.labels(err.reason).inc()
        show, unlogged = self._throttle.allow(err.reason, self._clock.seconds())
        if unlogged:
            log.warn("{side}: {n} more bus messages dropped ({reason})", side=self._side, n=unlogged,
                     reason=err.reason)
        if show:
            log.warn("{side}: dropped a bus message on {channel}: {err}", side=self._side,
                     channel=escape(channel), err=escape(str(err), 200))

    def flush(self) -> None:
        """Write the summary of every window that closed with drops left unlogged (called from
        the services' timers, so a flood that stops still gets its line)."""
        for reason, unlogged in self._throttle.flush(self._clock.seconds()):
            log.warn("{side}: {n} more bus messages dropped ({reason})", side=self._side, n=unlogged, reason=reason)


class SessionNode:
    """Seals and opens session messages under the keys of one keyring."""

    def __init__(self, keyring: Keyring, bus: Bus, clock: IReactorTime, metrics: Metrics, max_message: int,
                 side: str) -> None:
        self.keyring = keyring
        self.bus = bus
        self.clock = clock
        self.metrics = metrics
        self.max_message = max_message
        self.messages = 0  # sealed + opened, for the traffic-driven rekey period
        self.side = side
        self.drop_log = DropLog(metrics, clock, side)
        self.drop: Callable[[BusMessageError, bytes], None] = self.drop_log

    def attach(self, dispatch: Callable[[bytes, bytes], None]) -> None:
        """Take the bus's input: each message goes to ``dispatch`` through :meth:`receive`, a
        message too long for its channel is dropped unread, and the public subscriber's
        losses are exported."""
        self.bus.on_message = partial(self.receive, dispatch)  # no Python frame of its own per message
        self.bus.max_message = self.max_message
        self.bus.on_oversized = self.oversized
        self.metrics.public_losses.set_function(lambda: self.bus.public_losses)

    def receive(self, handle: Callable[[bytes, bytes], None], channel: bytes, data: bytes) -> None:
        """Run a bus message handler; whatever it rejects is dropped, counted and logged, and
        nothing escapes into the bus adapter."""
        try:
            handle(channel, data)
        except BusMessageError as err:
            self.drop(err, channel)
        except Exception:
            self.metrics.dropped.labels("internal-error").inc()
            log.failure("{side}: error handling a bus message", side=self.side)

    def oversized(self, channel: bytes, size: int) -> None:
        """The bus skipped a message too long for its channel as it streamed in."""
        self.drop(BusMessageError("oversized", f"{size} bytes"), channel)

    def open(self, channel: bytes, data: bytes) -> tuple[KeyEntry, Header, bytes]:
        """Authenticate and decrypt; raises BusMessageError for anything we must not accept."""
        if len(data) > self.max_message:
            raise BusMessageError("oversized", f"{len(data)} bytes")
        header = unpack_header(data)
        now = self.clock.seconds()
        entry = self.keyring.get(header.key_id, now)
        if entry is None:
            raise BusMessageError("unknown-key", header.key_id.hex())
        if entry.expired(now):
            raise BusMessageError("key-expired", "past its hard lifetime or message budget")
        plaintext = entry.session.envelope.open(header, data, channel)
        self.messages += 1
        self.metrics.opened.inc()
        return entry, header, plaintext

    def send(self, entry: KeyEntry, channel: bytes, mtype: MsgType, stream_id: bytes, seq: int, payload: Chunk,
             flags: int = 0) -> Deferred[int]:
        """Seal under ``entry`` and publish; fires with the number of receivers."""
        if len(payload) + OVERHEAD > entry.session.frame_size:
            raise ValueError("message over the agreed frame size")
        message = entry.session.envelope.seal(mtype, stream_id, seq, channel, payload, flags)
        self.messages += 1
        self.metrics.sealed.inc()
        return self.bus.publish(channel, message)
