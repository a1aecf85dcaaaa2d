"""Framed, flow-controlled bodies, without I/O.

A body travels as frames of at most ``max_chunk`` bytes with per-stream sequence numbers; the
last frame carries the END flag (authenticated, so truncation is detectable). Flow control is
credit based, like HTTP/2: the receiver lets the sender have at most ``window`` bytes that its
consumer has not yet taken, and grants more (a WINDOW message) as the consumer takes data.
So whatever the body size or the consumer's speed, each side buffers at most about one window
per stream, and Redis never holds more than that for a stream either.

:class:`Outbound` is the sending side, fed by a push producer it can pause.
:class:`Inbound` is the receiving side, feeding a consumer that can push back.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Protocol, Union

from ppbridge.errors import BusMessageError

# A frame's body: a write as it came, or a memoryview of one cut at a frame boundary (a slice
# of bytes would copy it).
Chunk = Union[bytes, memoryview]

# A body of at most this size travels inside its head when both fit one frame: a small
# request or response is then one bus message each way.
INLINE_MAX = 64 * 1024


class Scheduler(Protocol):
    """What :class:`Outbound` needs of a clock (``IReactorTime`` provides it)."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> Any: ...


COALESCE = 0.001  # seconds a partial frame may wait for more data before it is sent anyway


class Outbound:
    """Sends one body as DATA frames within the credit the peer granted.

    ``send(chunk, end)`` publishes one frame. ``pause``/``resume`` act on the body's source
    (the client connection on the forwarder, the upstream response on the proxy), so at most
    about a frame of the source waits here beyond the credit.

    With a ``clock``, small writes are coalesced: a partial frame waits up to ``COALESCE``
    seconds for more data (a socket read gives at most 64 KiB; a frame holds 256 KiB), so a
    fast body costs a quarter of the messages, at the price of at most a millisecond.

    ``on_finished()`` is called once, after the END frame went out, whatever sent it: the
    owner's ``finish``, new credit, or the coalescing timer (which no caller of ours is on the
    stack of, so the owner could not otherwise notice that the body is over).
    """

    def __init__(
        self,
        credit: int,
        max_chunk: int,
        send: Callable[[Chunk, bool], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
        clock: Scheduler | None = None,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        self.credit = credit
        self.max_chunk = max_chunk
        self.sent_bytes = 0
        self._send = send
        self._pause = pause
        self._resume = resume
        self._clock = clock
        self._on_finished = on_finished
        self._timer: Any = None
        self._queue: deque[Chunk] = deque()
        self._queued = 0
        self._finishing = False
        self.finished = False
        self._paused = False

    @property
    def buffered(self) -> int:
        return self._queued

    def write(self, data: bytes) -> None:
        """More body from the source."""
        if self._finishing:
            raise RuntimeError("write after finish")
        if data:
            self._queue.append(data)
            self._queued += len(data)
            self._flush_full()

    def _flush_partial(self) -> None:
        self._timer = None
        self._flush(force=True)

    def finish(self) -> None:
        """The source is done: send what remains, then the END frame."""
        self._finishing = True
        self._flush(force=True)

    def grant(self, increment: int) -> None:
        """The peer allowed ``increment`` more bytes. Coalescing, only full frames go at once:
        the rest of the queue is a partial frame, which waits for more data like any other."""
        self.credit += increment
        self._flush_full()

    def _flush_full(self) -> None:
        """Send the full frames the credit allows (everything, without a clock); a partial
        frame left waits at most ``COALESCE`` seconds."""
        self._flush(force=self._clock is None)
        if self._queue and self._clock is not None and self._timer is None and self.credit > 0:
            self._timer = self._clock.callLater(COALESCE, self._flush_partial)

    def stop(self) -> None:
        """The stream is over (aborted or done): drop what waits, cancel the timer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()
        self._queued = 0

    def _flush(self, force: bool) -> None:
        was_finished = self.finished
        while self._queue and self.credit > 0 and (force or self._queued >= self.max_chunk):
            chunk = self._take(min(self.credit, self.max_chunk))
            self.credit -= len(chunk)
            self.sent_bytes += len(chunk)
            last = self._finishing and not self._queue
            self._send(chunk, last)
            self.finished = last
        if self._finishing and not self._queue and not self.finished:
            self._send(b"", True)
            self.finished = True
        if self.finished or not self._queue:
            self.stop()
        self._apply_backpressure()
        if self.finished and not was_finished and self._on_finished is not None:
            self._on_finished()  # last: the owner may end the stream (and stop this) now

    def _take(self, n: int) -> Chunk:
        """Up to ``n`` bytes from the front of the queue, across writes. A write of at least
        half of ``n`` that fits goes alone, as it is: topping it up with a slice of the next
        write would copy both (with reads of about a frame, every byte twice). A write cut at
        the frame's end (by the frame size or the credit) is cut as memoryviews, uncopied."""
        first = self._queue[0]
        if n // 2 <= len(first) <= n:
            self._queued -= len(first)
            return self._queue.popleft()
        parts: list[Chunk] = []
        size = 0
        while self._queue and size < n:
            first = self._queue[0]
            room = n - size
            if len(first) <= room:
                parts.append(self._queue.popleft())
                size += len(first)
            else:
                view = first if isinstance(first, memoryview) else memoryview(first)
                parts.append(view[:room])
                self._queue[0] = view[room:]
                size += room
        self._queued -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _apply_backpressure(self) -> None:
        # Pause the source when what waits cannot go (no credit) or fills a frame already.
        over = self._queued >= self.max_chunk or (self._queued > 0 and self.credit <= 0)
        if over and not self._paused:
            self._paused = True
            self._pause()
        elif not over and self._paused and not self.finished:
            self._paused = False
            self._resume()


class Inbound:
    """Receives one body: checks sequence and credit, buffers until a consumer is attached,
    and grants more credit as the consumer takes data.

    ``send_update(increment)`` publishes a WINDOW message.
    """

    def __init__(self, window: int, send_update: Callable[[int], None], first_seq: int = 1) -> None:
        self.window = window
        self.granted = window  # total bytes the peer may have sent so far
        self.received = 0
        self.consumed = 0
        self.expected_seq = first_seq
        self.ended = False
        self._send_update = send_update
        self._write: Callable[[bytes], None] | None = None
        self._finish: Callable[[], None] | None = None
        self._held: deque[bytes] = deque()
        self._paused = False
        self._unacked = 0  # written to a paused consumer; credited on resume

    def check_seq(self, seq: int) -> None:
        """Raise unless ``seq`` is the next frame of this stream (a gap means a lost frame)."""
        if seq != self.expected_seq:
            raise BusMessageError("stream-gap", f"frame {seq} where {self.expected_seq} was due")
        self.expected_seq += 1

    def data(self, chunk: bytes, end: bool) -> None:
        """A frame's body bytes (already sequence-checked)."""
        if self.ended:
            raise BusMessageError("stream-closed", "data after END")
        self.received += len(chunk)
        if self.received > self.granted:
            raise BusMessageError("flow-control", "peer sent more than its credit")
        self.ended = end
        if chunk:
            if self._write is None:
                self._held.append(chunk)
            else:
                self._deliver(self._write, chunk)
        if end and self._finish is not None:
            self._finish()

    def attach(self, write: Callable[[bytes], None], finish: Callable[[], None]) -> None:
        """Start delivering to a consumer (held frames first)."""
        self._write, self._finish = write, finish
        while self._held:
            self._deliver(write, self._held.popleft())
        if self.ended:
            finish()

    def _deliver(self, write: Callable[[bytes], None], chunk: bytes) -> None:
        write(chunk)
        if self._paused:
            self._unacked += len(chunk)
        else:
            self._credit(len(chunk))

    def pause(self) -> None:
        """The consumer is full; stop granting credit."""
        self._paused = True

    def resume(self) -> None:
        """The consumer drained; credit what it took meanwhile."""
        self._paused = False
        taken, self._unacked = self._unacked, 0
        self._credit(taken)

    def _credit(self, n: int) -> None:
        self.consumed += n
        due = self.consumed + self.window - self.granted
        if due >= self.window // 2 and not self.ended:
            self.granted += due
            self._send_update(due)


class RecentlyClosed:
    """The last ``size`` stream ids that ended, so frames still in flight for them (a WINDOW
    crossing the END frame, the rest of an upload the upstream did not wait for) are ignored
    quietly instead of being reported as unknown streams."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._order: deque[object] = deque()
        self._members: set[object] = set()

    def add(self, key: object) -> None:
        if key in self._members:
            return
        self._order.append(key)
        self._members.add(key)
        if len(self._order) > self._size:
            self._members.discard(self._order.popleft())

    def __contains__(self, key: object) -> bool:
        return key in self._members
