"""Tests for ppbridge.streams: framed bodies within credit (Outbound) and flow control (Inbound)."""

from __future__ import annotations

import hashlib
from collections import deque

from twisted.trial.unittest import TestCase

from ppbridge.errors import BusMessageError
from ppbridge.streams import Inbound, Outbound


class Source:
    """Records what an Outbound asked of its body source."""

    def __init__(self) -> None:
        self.paused = False
        self.events: list[str] = []

    def pause(self) -> None:
        self.paused = True
        self.events.append("pause")

    def resume(self) -> None:
        self.paused = False
        self.events.append("resume")


def outbound(credit: int, max_chunk: int = 1 << 20) -> tuple[Outbound, list[tuple[bytes, bool]], Source]:
    frames: list[tuple[bytes, bool]] = []
    source = Source()
    out = Outbound(credit, max_chunk, lambda chunk, end: frames.append((chunk, end)), source.pause, source.resume)
    return out, frames, source


def body_of(frames: list[tuple[bytes, bool]]) -> bytes:
    return b"".join(chunk for chunk, _ in frames)


class OutboundTests(TestCase):
    """The sending side of a body."""

    def test_never_beyond_credit(self) -> None:
        """No more bytes are sent than the peer has granted, however much the source writes."""
        out, frames, _ = outbound(credit=100)
        out.write(b"a" * 250)
        self.assertEqual(len(body_of(frames)), 100)
        out.write(b"b" * 50)
        self.assertEqual(len(body_of(frames)), 100)
        out.grant(30)
        self.assertEqual(len(body_of(frames)), 130)
        out.grant(1000)
        self.assertEqual(body_of(frames), b"a" * 250 + b"b" * 50)
        self.assertEqual(out.sent_bytes, 300)
        self.assertEqual(out.credit, 1130 - 300)

    def test_chunks_at_max_chunk(self) -> None:
        """Frames carry at most max_chunk bytes, and together the body in order."""
        out, frames, _ = outbound(credit=10_000, max_chunk=64)
        data = bytes(range(256)) * 2
        out.write(data)
        self.assertEqual([len(c) for c, _ in frames], [64] * 8)
        self.assertEqual(body_of(frames), data)

    def test_chunking_with_many_small_writes(self) -> None:
        """Small writes are sent as they come (no frame exceeds max_chunk) and nothing is lost or reordered."""
        out, frames, _ = outbound(credit=10_000, max_chunk=7)
        data = b"".join(b"%03d" % i for i in range(200))
        for i in range(0, len(data), 5):
            out.write(data[i : i + 5])
        self.assertTrue(all(0 < len(c) <= 7 for c, _ in frames))
        self.assertEqual(body_of(frames), data)

    def test_cut_writes_are_not_copied(self) -> None:
        """A write cut at the frame's end by the credit goes out as memoryviews of it (no
        copy), the first part now and the rest when credit comes, together the write."""
        out, frames, _ = outbound(credit=100, max_chunk=1000)
        data = bytes(range(256)) + b"x" * 44
        out.write(data)
        out.grant(1000)
        self.assertEqual([len(c) for c, _ in frames], [100, 200])
        for chunk, _ in frames:
            self.assertIsInstance(chunk, memoryview)
            self.assertIs(chunk.obj, data)  # type: ignore[union-attr]
        self.assertEqual(body_of(frames), data)

    def test_credit_smaller_than_chunk(self) -> None:
        """With less credit than max_chunk, the frame is cut to the credit."""
        out, frames, _ = outbound(credit=10, max_chunk=64)
        out.write(b"x" * 100)
        self.assertEqual([len(c) for c, _ in frames], [10])
        out.grant(5)
        self.assertEqual([len(c) for c, _ in frames], [10, 5])

    def test_pauses_source_when_queueing(self) -> None:
        """The source is paused as soon as bytes wait for credit, and resumed when they are all sent."""
        out, frames, source = outbound(credit=100)
        out.write(b"a" * 80)
        self.assertEqual(source.events, [])
        out.write(b"b" * 80)
        self.assertEqual(source.events, ["pause"])
        self.assertEqual(out.buffered, 60)
        out.grant(30)
        self.assertEqual(source.events, ["pause"])  # 30 still waiting
        out.grant(30)
        self.assertEqual(source.events, ["pause", "resume"])
        self.assertEqual(out.buffered, 0)
        self.assertEqual(len(body_of(frames)), 160)

    def test_pause_once_per_stall(self) -> None:
        """Repeated writes while paused do not pause again; each stall gives one pause and one resume."""
        out, _, source = outbound(credit=10)
        for _ in range(3):
            out.write(b"z" * 20)
        self.assertEqual(source.events, ["pause"])
        out.grant(50)
        out.write(b"q" * 20)
        out.grant(20)
        self.assertEqual(source.events, ["pause", "resume", "pause", "resume"])

    def test_no_pause_when_everything_fits(self) -> None:
        """A source that stays within the credit is never paused."""
        out, _, source = outbound(credit=1000)
        for _ in range(10):
            out.write(b"y" * 100)
        out.finish()
        self.assertEqual(source.events, [])

    def test_finish_sends_end_once(self) -> None:
        """After the data, finish() sends exactly one END frame, and calling it again sends nothing."""
        out, frames, _ = outbound(credit=1000)
        out.write(b"hello")
        out.finish()
        out.finish()
        self.assertEqual(frames, [(b"hello", False), (b"", True)])
        self.assertTrue(out.finished)

    def test_end_on_last_data_frame(self) -> None:
        """When finish() comes while data waits for credit, the last data frame carries END; no extra frame."""
        out, frames, _ = outbound(credit=10, max_chunk=8)
        out.write(b"0123456789abcdef")
        out.finish()
        self.assertFalse(out.finished)
        self.assertEqual([end for _, end in frames], [False, False])
        out.grant(100)
        self.assertEqual(frames, [(b"01234567", False), (b"89", False), (b"abcdef", True)])
        self.assertTrue(out.finished)
        out.grant(100)
        out.finish()
        self.assertEqual(len(frames), 3)
        self.assertEqual(sum(end for _, end in frames), 1)

    def test_empty_body(self) -> None:
        """An empty body is one empty END frame, even with no credit at all."""
        out, frames, source = outbound(credit=0)
        out.finish()
        self.assertEqual(frames, [(b"", True)])
        self.assertEqual(source.events, [])

    def test_finish_without_credit_waits(self) -> None:
        """With data queued and no credit, finish() sends nothing until credit arrives."""
        out, frames, _ = outbound(credit=0)
        out.write(b"abc")
        out.finish()
        self.assertEqual(frames, [])
        out.grant(3)
        self.assertEqual(frames, [(b"abc", True)])

    def test_write_after_finish(self) -> None:
        """Writing after finish() is a programming error, not a silently extended body."""
        out, _, _ = outbound(credit=10)
        out.finish()
        self.assertRaises(RuntimeError, out.write, b"late")

    def test_empty_writes_ignored(self) -> None:
        """An empty write sends no frame."""
        out, frames, _ = outbound(credit=10)
        out.write(b"")
        self.assertEqual(frames, [])


class Consumer:
    """Records what an Inbound delivered."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.finished = 0

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> None:
        self.finished += 1

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def inbound(window: int) -> tuple[Inbound, list[int]]:
    updates: list[int] = []
    return Inbound(window, updates.append), updates


class InboundTests(TestCase):
    """The receiving side of a body."""

    def test_sequence_in_order(self) -> None:
        """Frames numbered 1, 2, 3... are accepted in order."""
        stream, _ = inbound(100)
        for seq in (1, 2, 3, 4):
            stream.check_seq(seq)

    def test_sequence_gap(self) -> None:
        """A skipped frame (a lost message) is a stream-gap error."""
        stream, _ = inbound(100)
        stream.check_seq(1)
        self.assertEqual(self.assertRaises(BusMessageError, stream.check_seq, 3).reason, "stream-gap")

    def test_sequence_repeat_or_backwards(self) -> None:
        """A repeated or earlier frame number is a stream-gap error too."""
        stream, _ = inbound(100)
        stream.check_seq(1)
        stream.check_seq(2)
        self.assertEqual(self.assertRaises(BusMessageError, stream.check_seq, 2).reason, "stream-gap")
        self.assertEqual(self.assertRaises(BusMessageError, stream.check_seq, 0).reason, "stream-gap")

    def test_first_seq(self) -> None:
        """The first expected sequence number is configurable (the head may carry frame 0)."""
        stream = Inbound(100, lambda n: None, first_seq=0)
        stream.check_seq(0)
        self.assertRaises(BusMessageError, stream.check_seq, 2)

    def test_beyond_window(self) -> None:
        """A peer that sends more than the window it was granted is a flow-control error."""
        stream, _ = inbound(100)
        stream.data(b"x" * 60, False)
        stream.data(b"x" * 40, False)  # exactly the window: fine
        self.assertEqual(self.assertRaises(BusMessageError, stream.data, b"x", False).reason, "flow-control")

    def test_beyond_window_after_updates(self) -> None:
        """Credit granted by updates is honoured, and exceeding the total is still caught."""
        stream, updates = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"x" * 100, False)
        self.assertEqual(updates, [100])
        stream.pause()  # hold further credit back
        stream.data(b"y" * 100, False)
        self.assertEqual(self.assertRaises(BusMessageError, stream.data, b"z", False).reason, "flow-control")

    def test_data_after_end(self) -> None:
        """Data after the END frame is rejected."""
        stream, _ = inbound(100)
        stream.data(b"last", True)
        self.assertEqual(self.assertRaises(BusMessageError, stream.data, b"more", False).reason, "stream-closed")

    def test_held_until_attach(self) -> None:
        """Data arriving before a consumer is attached is held, then delivered in order, then finished."""
        stream, updates = inbound(100)
        stream.data(b"one ", False)
        stream.data(b"two ", False)
        stream.data(b"three", True)
        self.assertEqual(updates, [])
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        self.assertEqual(consumer.chunks, [b"one ", b"two ", b"three"])
        self.assertEqual(consumer.finished, 1)

    def test_delivers_after_attach(self) -> None:
        """Once attached, frames go straight to the consumer, and END finishes it exactly once."""
        stream, _ = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"a", False)
        self.assertEqual(consumer.chunks, [b"a"])
        self.assertEqual(consumer.finished, 0)
        stream.data(b"b", True)
        self.assertEqual((consumer.data, consumer.finished), (b"ab", 1))

    def test_empty_end_frame(self) -> None:
        """An empty END frame finishes the consumer without writing anything."""
        stream, _ = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"", True)
        self.assertEqual((consumer.chunks, consumer.finished), ([], 1))

    def test_no_update_without_consumer(self) -> None:
        """Data that nobody has taken earns the peer no credit."""
        stream, updates = inbound(100)
        stream.data(b"x" * 100, False)
        self.assertEqual(updates, [])

    def test_updates_as_consumer_takes(self) -> None:
        """Credit is returned as the consumer takes data, in batches, never beyond what was taken."""
        stream, updates = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"x" * 30, False)
        self.assertEqual(updates, [])  # a small amount is batched
        stream.data(b"x" * 30, False)
        self.assertEqual(sum(updates), 60)
        self.assertLessEqual(sum(updates), stream.consumed)
        self.assertEqual(stream.granted, 100 + sum(updates))

    def test_no_update_while_paused(self) -> None:
        """While the consumer is paused no credit is sent; on resume what it took is credited."""
        stream, updates = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.pause()
        stream.data(b"x" * 60, False)
        stream.data(b"x" * 40, False)
        self.assertEqual(consumer.data, b"x" * 100)
        self.assertEqual(updates, [])
        self.assertRaises(BusMessageError, stream.data, b"x", False)

    def test_resume_credits_taken_data(self) -> None:
        """resume() credits exactly what was written to the paused consumer."""
        stream, updates = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.pause()
        stream.data(b"x" * 70, False)
        self.assertEqual(updates, [])
        stream.resume()
        self.assertEqual(updates, [70])
        stream.pause()
        stream.data(b"y" * 100, False)  # 30 left + 70 credited
        self.assertRaises(BusMessageError, stream.data, b"z" * 1, False)

    def test_held_data_attached_while_paused(self) -> None:
        """Held data delivered to a consumer that paused before attaching is credited only on resume."""
        stream, updates = inbound(100)
        stream.data(b"x" * 80, False)
        stream.pause()
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        self.assertEqual(len(consumer.data), 80)
        self.assertEqual(updates, [])
        stream.resume()
        self.assertEqual(updates, [80])

    def test_no_update_after_end(self) -> None:
        """Once the peer has ended the stream it needs no more credit."""
        stream, updates = inbound(100)
        consumer = Consumer()
        stream.attach(consumer.write, consumer.finish)
        stream.data(b"x" * 90, True)
        self.assertEqual(updates, [])


class LoopTests(TestCase):
    """An Outbound feeding an Inbound through a simulated bus, with a slow, pausing consumer."""

    TOTAL = 10 * 1024 * 1024
    WINDOW = 64 * 1024
    CHUNK = 16 * 1024
    SOURCE_WRITE = 40 * 1024
    DRAIN_PER_STEP = 8 * 1024
    HIGH_WATER = 24 * 1024

    def test_ten_mebibytes_through_small_window(self) -> None:
        """10 MiB arrive intact and in order, and at no point are more than ``window`` bytes sent
        but not taken by the consumer, nor more than one source write queued at the sender."""
        frames: deque[tuple[int, bytes, bool]] = deque()
        updates: deque[int] = deque()
        sender_seq = [0]
        source_paused = [False]
        produced = [0]
        sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()

        def send(chunk: bytes, end: bool) -> None:
            sender_seq[0] += 1
            frames.append((sender_seq[0], chunk, end))

        def pause() -> None:
            source_paused[0] = True

        def resume() -> None:
            source_paused[0] = False

        out = Outbound(self.WINDOW, self.CHUNK, send, pause, resume)
        stream = Inbound(self.WINDOW, updates.append)
        buffer = bytearray()  # what the slow consumer has accepted but not yet processed
        drained = [0]
        finished = [0]
        paused = [False]

        def consume(data: bytes) -> None:
            buffer.extend(data)
            if len(buffer) > self.HIGH_WATER and not paused[0]:
                paused[0] = True
                stream.pause()

        def done() -> None:
            finished[0] += 1

        stream.attach(consume, done)
        max_outstanding = max_queued = 0
        for step in range(100_000):
            if not source_paused[0] and produced[0] < self.TOTAL:
                n = min(self.SOURCE_WRITE, self.TOTAL - produced[0])
                block = (hashlib.sha256(b"%d" % produced[0]).digest() * (n // 32 + 1))[:n]
                sent_hash.update(block)
                produced[0] += n
                out.write(block)
                if produced[0] == self.TOTAL:
                    out.finish()
            # the bus delivers a few frames and all window updates per step
            for _ in range(3):
                if frames:
                    seq, chunk, end = frames.popleft()
                    stream.check_seq(seq)
                    stream.data(chunk, end)
            while updates:
                out.grant(updates.popleft())
            # the consumer is slow: it processes a little each step
            take = bytes(buffer[: self.DRAIN_PER_STEP])
            del buffer[: self.DRAIN_PER_STEP]
            received_hash.update(take)
            drained[0] += len(take)
            if paused[0] and len(buffer) <= self.HIGH_WATER // 2:
                paused[0] = False
                stream.resume()
            max_outstanding = max(max_outstanding, out.sent_bytes - stream.consumed)
            max_queued = max(max_queued, out.buffered)
            self.assertLessEqual(out.sent_bytes - stream.consumed, self.WINDOW, f"step {step}")
            self.assertLessEqual(out.sent_bytes - drained[0], self.WINDOW + self.HIGH_WATER, f"step {step}")
            self.assertLessEqual(out.buffered, self.SOURCE_WRITE, f"step {step}")
            if finished[0] and not buffer and not frames:
                break
        else:
            self.fail(f"stalled: {drained[0]} of {self.TOTAL} bytes delivered")
        self.assertEqual(drained[0], self.TOTAL)
        self.assertEqual(received_hash.hexdigest(), sent_hash.hexdigest())
        self.assertEqual(finished[0], 1)
        self.assertTrue(out.finished)
        self.assertTrue(stream.ended)
        self.assertGreater(max_outstanding, self.WINDOW // 2)  # the window was actually used


class CoalescingTests(TestCase):
    """Outbound with a clock: partial frames wait a moment for more data."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from ppbridge.streams import COALESCE

        self.clock = Clock()
        self.delay = COALESCE
        self.frames: list[tuple[bytes, bool]] = []
        self.out = Outbound(10 << 20, 256 * 1024, lambda c, e: self.frames.append((c, e)), lambda: None,
                            lambda: None, self.clock)

    def test_reads_are_joined_into_full_frames(self) -> None:
        """Four 64 KiB writes in a row go out as one 256 KiB frame, not four."""
        for i in range(4):
            self.out.write(bytes([i]) * 65536)
        self.assertEqual([len(c) for c, _ in self.frames], [262144])
        self.assertEqual(self.frames[0][0], b"".join(bytes([i]) * 65536 for i in range(4)))

    def test_big_write_goes_alone_uncopied(self) -> None:
        """A write of at least half a frame that fits one goes out as it is (the same object,
        not a copy) instead of being topped up with a slice of the next write; writes of
        under half a frame are still joined into full frames."""
        first, second = b"a" * 200_000, b"b" * 262_144
        self.out.write(first)
        self.assertEqual(self.frames, [])  # a partial frame waits for more
        self.out.write(second)
        self.assertIs(self.frames[0][0], first)
        self.assertIs(self.frames[1][0], second)
        small = [bytes([i]) * 100_000 for i in range(3)]
        for chunk in small:
            self.out.write(chunk)
        self.assertEqual([len(c) for c, _ in self.frames], [200_000, 262_144, 262_144])
        self.clock.advance(self.delay)
        self.assertEqual(b"".join(c for c, _ in self.frames[2:]), b"".join(small))

    def test_a_partial_frame_goes_out_after_the_delay(self) -> None:
        """A small write is not held longer than the coalescing delay (events stay live)."""
        self.out.write(b"data: 1\n\n")
        self.assertEqual(self.frames, [])
        self.clock.advance(self.delay)
        self.assertEqual(self.frames, [(b"data: 1\n\n", False)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_finish_sends_at_once_and_leaves_no_timer(self) -> None:
        """finish() sends what waits with END immediately; stop() cancels a pending timer."""
        self.out.write(b"x" * 1000)
        self.out.finish()
        self.assertEqual(self.frames, [(b"x" * 1000, True)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        other = Outbound(1 << 20, 1024, lambda c, e: None, lambda: None, lambda: None, self.clock)
        other.write(b"y")
        other.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_credit_sends_full_frames_and_the_rest_waits(self) -> None:
        """New credit sends the full frames it allows at once; what is left over, a partial
        frame, waits for more data (at most the coalescing delay) instead of going out as a
        small frame of its own."""
        frames: list[tuple[bytes, bool]] = []
        out = Outbound(0, 256 * 1024, lambda c, e: frames.append((c, e)), lambda: None, lambda: None, self.clock)
        out.write(b"a" * (300 * 1024))
        out.grant(1 << 20)
        self.assertEqual([len(c) for c, _ in frames], [256 * 1024])
        out.write(b"b" * (212 * 1024))
        self.assertEqual([len(c) for c, _ in frames], [256 * 1024, 256 * 1024])
        out.write(b"c" * 1000)
        self.clock.advance(self.delay)
        self.assertEqual([len(c) for c, _ in frames], [256 * 1024, 256 * 1024, 1000])
        self.assertEqual(self.clock.getDelayedCalls(), [])
