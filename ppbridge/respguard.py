"""A streaming guard in front of the Redis reply parser: nothing big is ever buffered.

txredisapi hands every byte from Redis to ``hiredis.Reader``, which buffers a whole bulk
string (and preallocates a whole array) before anything above it can look at the size. Redis
is untrusted, and any publisher can make it push a huge pub/sub message, so
:class:`RespGuard` scans the RESP2 server-to-client stream first, sans I/O, and passes on only
bytes whose sizes it has checked:

* a pub/sub push (``*3 message <channel> <payload>``, ``*4 pmessage <pattern> <channel>
  <payload>``) whose payload is longer than ``limit_for(channel)``: the payload's header is
  replaced by an empty bulk (``$0``), its body is skipped by arithmetic as it streams in, and
  ``on_oversized(channel, size)`` is called once, at the header. The reply that carried it is
  marked: :meth:`RespGuard.delivered`, called once per reply the parser produces, says which
  to swallow. A push whose channel name is longer than ``max_name`` (a pattern subscription
  matches such names) is dropped the same way, reported with the name's first ``max_name``
  bytes;
* anything else out of bounds raises :class:`RespProtocolError` (the connection must be
  dropped): a line (status, error, integer, length) over ``max_line`` bytes, a bulk other than
  a push payload over ``max_bulk``, a reply whose other bytes pass ``max_reply`` or whose arrays
  declare more than ``max_elements`` elements, nesting deeper than ``max_depth``, a length that
  hiredis would not accept either, or a type byte other than ``+ - : $ *``.

A push payload of at least ``cut_min`` bytes is **cut out** of the stream (it is within its
limit, or it would be dropped as above): the parser gets its
header only once the body is complete, as ``$0``, and the guard keeps memoryviews of the body
as it streams in and joins them once, into the payload the reply is delivered with
(:meth:`RespGuard.cut_payload`, after :meth:`RespGuard.delivered`). hiredis would otherwise
copy each frame-sized payload into its buffer, move the rest of that buffer up, and copy the
payload out again. The bytes it is cut from are the ones the guard has checked, so what is
delivered is exactly what the server sent; the bulk must end in CRLF.

Bulk bodies are skipped by length, never scanned; line ends are found with ``bytes.find``.
The pass-through is the input object itself unless something was replaced or an incomplete
line is held back for the next :meth:`feed`. Which arrays are pushes follows txredisapi's own
test (``reply[-3] == b"message"`` or ``reply[-4] == b"pmessage"``), restricted to bulk
strings; an array the guard does not take for a push gets the general limits, so a
disagreement can only make a message fail, never make it big.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Callable

MAX_LINE = 64 * 1024
MAX_BULK = 64 * 1024
MAX_NAME = 1024  # a channel name inside a push
MAX_REPLY = 1024 * 1024  # one reply's bytes, not counting a push payload
MAX_ELEMENTS = 65536  # array elements declared by one reply
MAX_DEPTH = 8
CUT_MIN = 16 * 1024  # a push payload at least this big and spread over reads is cut out (see above)
EMPTY_BULK = b"$0\r\n\r\n"
_MESSAGE, _PMESSAGE = b"message", b"pmessage"
_BULK, _ARRAY, _STATUS, _ERROR, _INTEGER = 0x24, 0x2A, 0x2B, 0x2D, 0x3A
_GENERAL, _KIND, _CHANNEL, _PAYLOAD = range(4)
_MESSAGE_HEAD, _PMESSAGE_HEAD = b"*3\r\n$7\r\nmessage\r\n", b"*4\r\n$8\r\npmessage\r\n"
_BULK_LINE = re.compile(rb"\$(0|[1-9][0-9]{0,9})\r\n")  # a length hiredis accepts


class RespProtocolError(Exception):
    """The server broke RESP2 or one of the guard's limits; the connection must go."""


def _ignore(channel: bytes, size: int) -> None:
    return None


def _length(line: bytes) -> int:
    """The length of a ``$``/``*`` line, as strictly as hiredis reads it (no sign, space,
    underscore or leading zero); -1 means null."""
    digits = line[1:]
    if digits.isdigit() and len(digits) <= 15 and (digits[0] != 0x30 or len(digits) == 1):
        return int(digits)
    if digits == b"-1":
        return -1
    raise RespProtocolError(f"bad length line {line[:40]!r}")


class RespGuard:
    """Checks one connection's reply stream; owns the parse state between :meth:`feed` calls.

    ``limit_for(channel)`` gives the largest payload a push on ``channel`` may carry; without
    it (a connection that never subscribes) pushes get no special treatment and every bulk is
    held to ``max_bulk``.
    """

    def __init__(self, limit_for: Callable[[bytes], int] | None = None,
                 on_oversized: Callable[[bytes, int], None] = _ignore, *, max_line: int = MAX_LINE,
                 max_bulk: int = MAX_BULK, max_name: int = MAX_NAME, max_reply: int = MAX_REPLY,
                 max_elements: int = MAX_ELEMENTS, max_depth: int = MAX_DEPTH, cut_min: int = CUT_MIN) -> None:
        self.limit_for = limit_for
        self.on_oversized = on_oversized
        self.max_line, self.max_bulk, self.max_name = max_line, max_bulk, max_name
        self.max_reply, self.max_elements, self.max_depth = max_reply, max_elements, max_depth
        self.cut_min = cut_min
        self.replies = 0  # replies completed so far; the index of the one being read
        self.dropped: deque[int] = deque()  # indices of replies carrying a replaced payload
        self.cut: deque[tuple[int, bytes]] = deque()  # (reply index, payload) cut out of the stream
        self._cut_out: bytes | None = None  # the payload of the reply delivered last, if cut
        self._cut_parts: list[memoryview] | None = None  # the payload being cut out, so far
        self._cut_left = 0  # ... its bytes still to come (not counting the CRLF)
        self._cut_tail = b""  # ... the CRLF after it, as it came
        self._delivered = 0
        self._partial = b""  # an incomplete line, held back
        self._out: list[bytes] = []  # during feed(): the pass-through up to _emit_from
        self._emit_from = 0
        self._stack: list[int] = []  # elements still to come, per open array
        self._skip = 0  # body bytes (with CRLF) of the current bulk still to come
        self._discard = False  # ... and they are dropped, not passed on
        self._capture: bytearray | None = None  # ... and the first few are kept here
        self._capture_left = 0
        self._capture_role = _GENERAL
        self._new_reply()

    def _new_reply(self) -> None:
        self._top = 0  # length of the top-level array (0: the reply is not an array)
        self._index = 0  # index of the top-level array's element being read
        self._kind_at: int | None = None  # index of a bulk "message"/"pmessage" marking a push
        self._channel: bytes | None = None
        self._channel_dropped = False
        self._bytes = 0
        self._elements = 0

    def delivered(self) -> bool:
        """Call once per reply the parser behind produces, in order: True for a reply whose
        payload was replaced (a dropped message: do not deliver it)."""
        index = self._delivered
        self._delivered += 1
        cut = self.cut
        self._cut_out = cut.popleft()[1] if cut and cut[0][0] == index else None
        if self.dropped and self.dropped[0] == index:
            self.dropped.popleft()
            return True
        return False

    def cut_payload(self) -> bytes | None:
        """The payload cut out of the reply :meth:`delivered` was last called for (the parser
        saw it as empty: deliver this in its place), once; None when nothing was cut."""
        payload, self._cut_out = self._cut_out, None
        return payload

    def feed(self, data: bytes) -> bytes:
        """Scan the next bytes from the server; return those the parser may have now.

        Raises :class:`RespProtocolError`; after that the guard is unusable.
        """
        if self._partial:
            data, self._partial = self._partial + data, b""
        end = len(data)
        self._out = []
        self._emit_from = pos = 0
        while pos < end:
            if self._skip:
                pos = self._body(data, pos, end)
                continue
            if not self._stack:
                after = self._whole_push(data, pos, end)
                if after:
                    pos = after
                    continue
            eol = data.find(b"\r\n", pos, pos + self.max_line + 2)
            if eol < 0:
                if end - pos >= self.max_line + 2:
                    raise RespProtocolError(f"a line of over {self.max_line} bytes")
                self._partial = data[pos:]
                end = pos
                break
            pos = self._line(data, pos, eol, end)
        if self._emit_from == 0 and end == len(data):
            return data
        self._out.append(data[self._emit_from:end])
        return b"".join(self._out)

    def _replace(self, data: bytes, start: int, stop: int, by: bytes = b"") -> None:
        """Pass on ``by`` instead of ``data[start:stop]``."""
        if self._emit_from < start:
            self._out.append(data[self._emit_from:start])
        if by:
            self._out.append(by)
        self._emit_from = stop

    def _body(self, data: bytes, pos: int, end: int) -> int:
        """Pass, capture or discard what is here of the current bulk's body."""
        take = min(self._skip, end - pos)
        capture = self._capture
        if capture is not None and self._capture_left:
            keep = min(take, self._capture_left)
            capture += data[pos:pos + keep]
            self._capture_left -= keep
        parts = self._cut_parts
        if parts is not None:
            self._cut_body(parts, data, pos, take)
        if self._discard:
            self._replace(data, pos, pos + take)
        self._skip -= take
        if not self._skip:
            if self._cut_parts is not None:
                self._cut_done(data, pos + take)
            self._bulk_done()
        return pos + take

    def _cut_body(self, parts: list[memoryview], data: bytes, pos: int, take: int) -> None:
        """Keep (uncopied, in ``parts``) what is here of the payload being cut out, and of its CRLF."""
        size = min(take, self._cut_left)
        if size:
            parts.append(memoryview(data)[pos:pos + size])
            self._cut_left -= size
        if take > size:
            self._cut_tail += data[pos + size:pos + take]

    def _cut_done(self, data: bytes, at: int) -> None:
        """The payload being cut out is complete: join it, and let the parser have its
        header now, as an empty bulk, at ``at`` (just after the body)."""
        parts, tail = self._cut_parts or [], self._cut_tail
        self._cut_parts, self._cut_tail = None, b""
        if tail != b"\r\n":
            raise RespProtocolError("a bulk string not ended by CRLF")
        self.cut.append((self.replies, b"".join(parts)))
        self._replace(data, at, at, EMPTY_BULK)

    def _line(self, data: bytes, pos: int, eol: int, end: int) -> int:
        """Act on the line ``data[pos:eol]``; the position after what was consumed."""
        kind = data[pos]
        self._count(eol + 2 - pos)
        if kind == _BULK:
            size = _length(data[pos:eol])
            if self._bulk_header(size):
                self._replace(data, pos, eol + 2, EMPTY_BULK)
            elif self._capture_role == _PAYLOAD and size >= self.cut_min:
                self._replace(data, pos, eol + 2)  # "$0" follows the body (_cut_done)
                self._discard = True
                self._cut_parts, self._cut_left = [], size
            pos = eol + 2
            if size < 0:
                self._done()
            elif not self._discard and pos + size + 2 <= end:
                if self._capture is not None:  # the whole body is here and passes
                    self._capture += data[pos:pos + self._capture_left]
                    self._capture_left = 0
                self._bulk_done()
                return pos + size + 2
            else:
                self._skip = size + 2
            return pos
        if kind == _ARRAY:
            self._array(_length(data[pos:eol]))
        elif kind == _STATUS or kind == _ERROR or kind == _INTEGER:
            self._check_not_payload()
            self._done()
        else:
            raise RespProtocolError(f"unexpected type byte {bytes([kind])!r}")
        return eol + 2

    def _whole_push(self, data: bytes, pos: int, end: int) -> int:
        """The fast path: a plain push that is all in ``data`` and within its limit passes at
        once (the position after it); 0 when the general path must look at it."""
        limit_for = self.limit_for
        if limit_for is None:
            return 0
        if data.startswith(_MESSAGE_HEAD, pos):
            at = pos + len(_MESSAGE_HEAD)
        elif data.startswith(_PMESSAGE_HEAD, pos):
            pattern = _BULK_LINE.match(data, pos + len(_PMESSAGE_HEAD))
            if pattern is None or int(pattern[1]) > self.max_name:
                return 0
            at = pattern.end() + int(pattern[1]) + 2
        else:
            return 0
        name = _BULK_LINE.match(data, at)
        if name is None or int(name[1]) > self.max_name:
            return 0
        at = name.end() + int(name[1])
        payload = _BULK_LINE.match(data, at + 2)
        if payload is None:
            return 0
        size = int(payload[1])
        after = payload.end() + size + 2
        if after > end or size >= self.cut_min or size > limit_for(data[name.end():at]):
            return 0
        self.replies += 1
        return after

    # one element at a time

    def _role(self) -> int:
        """What the element starting now is to a possible push around it."""
        if self.limit_for is None or len(self._stack) != 1:
            return _GENERAL
        i, top = self._index, self._top
        if self._kind_at is not None:
            if i == top - 2:
                return _CHANNEL
            if i == top - 1:
                return _PAYLOAD
        elif i == top - 3 or i == top - 4:
            return _KIND
        return _GENERAL

    def _check_not_payload(self) -> None:
        if self._role() == _PAYLOAD:
            raise RespProtocolError("a pub/sub message whose payload is not a bulk string")

    def _bulk_header(self, size: int) -> bool:
        """Decide about a bulk of ``size`` bytes; True when it is to be replaced by ``$0``."""
        role = self._role()
        self._discard = False
        self._capture_role = role
        limit_for = self.limit_for
        if role == _PAYLOAD and limit_for is not None:
            if size < 0:
                raise RespProtocolError("a pub/sub message with a null payload")
            channel = self._channel if self._channel is not None else b""
            if not self._channel_dropped and size <= limit_for(channel):
                return False
            self.dropped.append(self.replies)
            self._discard = True
            self.on_oversized(channel, size)
            return True
        if size < 0:
            return False
        if role == _CHANNEL:
            self._start_capture(min(size, self.max_name))
            self._count(min(size, self.max_name) + 2)
            self._channel_dropped = self._discard = size > self.max_name
            return self._discard
        if size > self.max_bulk:
            raise RespProtocolError(f"a bulk string of {size} bytes (limit {self.max_bulk})")
        self._count(size + 2)
        if role == _KIND and size == len(self._kind_word()):
            self._start_capture(size)
        return False

    def _kind_word(self) -> bytes:
        """The word that, at the current index, makes the array a push."""
        return _MESSAGE if self._index == self._top - 3 else _PMESSAGE

    def _count(self, size: int) -> None:
        self._bytes += size
        if self._bytes > self.max_reply:
            raise RespProtocolError(f"a reply of over {self.max_reply} bytes")

    def _start_capture(self, size: int) -> None:
        self._capture = bytearray()
        self._capture_left = size

    def _bulk_done(self) -> None:
        if self._capture is not None:
            value = bytes(self._capture)
            if self._capture_role == _CHANNEL:
                self._channel = value
            elif value == self._kind_word():
                self._kind_at = self._index
            self._capture = None
        self._discard = False
        self._done()

    def _array(self, size: int) -> None:
        self._check_not_payload()
        if size <= 0:
            self._done()
            return
        self._elements += size
        if self._elements > self.max_elements:
            raise RespProtocolError(f"a reply of over {self.max_elements} array elements")
        if len(self._stack) >= self.max_depth:
            raise RespProtocolError(f"arrays nested over {self.max_depth} deep")
        if not self._stack:
            self._top = size
        self._stack.append(size)

    def _done(self) -> None:
        """One element is complete: close the arrays it completes, and the reply."""
        stack = self._stack
        while stack:
            if len(stack) == 1:
                self._index += 1
            stack[-1] -= 1
            if stack[-1]:
                return
            stack.pop()
        self.replies += 1
        self._new_reply()
