"""Tests for ppbridge.logsafe: attacker-chosen text reaches the log escaped and bounded."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge.logs import instance_of, shown
from ppbridge.logsafe import MAX_SHOWN, escape
from tests.redisclient import RawRedisClient
from tests.support import Stack
from tests.test_security import DropWatcher


class EscapeTests(TestCase):
    """``escape`` on each kind of hostile byte."""

    def test_printable_ascii_unchanged(self) -> None:
        """Printable ASCII but the backslash passes as is, from bytes or str."""
        text = "ppbridge:f:0123abcd:r ~!\"#$%&'()*+,-./:;<=>?@[]^_`{|}"
        self.assertEqual(escape(text.encode("ascii")), text)
        self.assertEqual(escape(text), text)

    def test_control_characters(self) -> None:
        """NUL, the other C0 controls and DEL become ``\\xNN``."""
        self.assertEqual(escape(b"\x00"), "\\x00")
        self.assertEqual(escape(b"a\x01\x07\x08\x09\x1fb\x7f"), "a\\x01\\x07\\x08\\x09\\x1fb\\x7f")

    def test_line_breaks(self) -> None:
        """CR and LF cannot start a forged log line."""
        self.assertEqual(escape(b"x\r\nFAKE 200 OK"), "x\\x0d\\x0aFAKE 200 OK")
        self.assertEqual(escape("x\r\nFAKE"), "x\\x0d\\x0aFAKE")

    def test_ansi_escape(self) -> None:
        """ESC is escaped, so a terminal shows ``[2J`` as text instead of clearing the screen."""
        self.assertEqual(escape(b"\x1b[2J\x1b]0;title\x07"), "\\x1b[2J\\x1b]0;title\\x07")

    def test_backslash(self) -> None:
        """A literal backslash is escaped too, so input that already reads ``\\x0d`` cannot pass
        for an escaped CR."""
        self.assertEqual(escape(b"\\x0d"), "\\x5cx0d")

    def test_non_ascii(self) -> None:
        """Bytes over 0x7f are escaped one by one; str is escaped as its UTF-8 bytes (a lone
        surrogate as its backslash form, itself escaped)."""
        self.assertEqual(escape(b"\x80\xff"), "\\x80\\xff")
        self.assertEqual(escape("é"), "\\xc3\\xa9")
        self.assertEqual(escape("\u202e"), "\\xe2\\x80\\xae")  # right-to-left override
        self.assertEqual(escape("\udcff"), "\\x5cudcff")

    def test_every_byte_comes_out_printable(self) -> None:
        """Whatever the input, the output is printable ASCII only."""
        shown = escape(bytes(range(256)), limit=256)
        self.assertTrue(all(0x20 <= ord(c) < 0x7F for c in shown), shown)
        self.assertEqual(len(shown), 94 + 162 * 4)  # 94 printable as is; the other 162 bytes as \xNN

    def test_cut(self) -> None:
        """Input is cut to ``limit`` characters with ``...`` appended; exactly ``limit`` is not
        cut; the output is bounded however long the input (at most four characters a byte)."""
        self.assertEqual(escape(b"a" * MAX_SHOWN), "a" * MAX_SHOWN)
        self.assertEqual(escape(b"a" * (MAX_SHOWN + 1)), "a" * MAX_SHOWN + "...")
        self.assertEqual(escape(b"\r" * 10, limit=3), "\\x0d" * 3 + "...")
        self.assertEqual(len(escape(b"\x00" * 1_000_000)), 4 * MAX_SHOWN + 3)
        self.assertEqual(escape(b""), "")


class AccessShownTests(TestCase):
    """The access log's remembered escapes (``ppbridge.logs.shown``, ``instance_of``)."""

    def test_remembered_escape_is_escape_and_bounded(self) -> None:
        """``shown`` answers as ``escape`` does for hostile and plain values, asked again too,
        and keeps at most 1024 of them however many distinct values a client sends."""
        for value, limit in ((b"GET", 32), (b"G\r\nET", 32), ("alpha", 96), ("\x1b[2J", 96), (b"x" * 40, 32)):
            self.assertEqual((shown(value, limit), shown(value, limit)), (escape(value, limit),) * 2)
        for n in range(3000):
            shown(b"M%d" % n, 32)
        self.assertEqual(shown.cache_info().maxsize, 1024)
        self.assertLessEqual(shown.cache_info().currsize, 1024)

    def test_instance_of_a_peer(self) -> None:
        """``instance_of`` is the part of ``name:instance`` after the last colon, ``-`` for none."""
        self.assertEqual([instance_of(b"alpha:2ae0d9ae"), instance_of(b"a:b:c"), instance_of(None)],
                         ["2ae0d9ae", "c", "-"])


class DropLogLineTests(TestCase):
    @defer.inlineCallbacks
    def test_channel_name_cannot_forge_log_lines(self):
        """A channel named ``ppbridge:f:<forwarder hex>:\\r\\nFAKE 200 OK\\x1b[2J`` (CR LF, a
        fake status line, an ANSI clear-screen). Published on the real Redis it reaches no one
        (the forwarder subscribes to exact names, no pattern); a hostile Redis delivers garbage
        on it to the forwarder anyway (handed to the bus's message callback, as RedisBus does
        with what Redis sends). The forwarder drops it and logs the drop in one line that holds
        no CR, LF or ESC and shows the name escaped (``\\x0d\\x0aFAKE 200 OK\\x1b[2J``)."""
        lines: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        stack = Stack(self)
        yield stack.start()
        forwarder = stack.forwarder
        drops = DropWatcher(forwarder)
        channel = b"ppbridge:f:" + forwarder.id.hex().encode("ascii") + b":\r\nFAKE 200 OK\x1b[2J"
        attacker = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(attacker.close)
        self.assertEqual(attacker.publish(channel, b"\x01\x07garbage"), 0)
        forwarder.bus.on_message(channel, b"\x01\x07garbage")
        yield drops.wait("unexpected-channel")

        [line] = [text for text in lines if "FAKE 200 OK" in text]
        self.assertIn("dropped a bus message", line)
        for forbidden in ("\r", "\n", "\x1b"):
            self.assertNotIn(forbidden, line)
        self.assertIn(forwarder.id.hex() + ":\\x0d\\x0aFAKE 200 OK\\x1b[2J", line)
