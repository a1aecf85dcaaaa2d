"""Message types and their binary encoding, with strict decoding.

Two families travel on the bus:

* **Session messages** (requests, responses, body frames, flow control) are AEAD envelopes:
  a fixed 40-byte cleartext :class:`Header`, bound as associated data, then AES-256-GCM
  ciphertext (see :mod:`ppbridge.envelope`). Their payloads are encoded here.
* **Negotiation messages** (key request, key grant, announcement) are signed, not encrypted;
  their only secret, the key material, is RSA-OAEP-wrapped inside the grant.

Decoding never trusts a length: every read is bounds-checked and every failure is a
:class:`~ppbridge.errors.BusMessageError`. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, NoReturn, TypeVar

from ppbridge.errors import BusMessageError

VERSION = 3  # 2: request deadlines, key limits, announce interval; 3: channels laid out for ACL users


class MsgType(enum.IntEnum):
    """Every message type, session and negotiation."""

    REQ_HEAD = 1
    REQ_DATA = 2
    RESP_HEAD = 3
    RESP_DATA = 4
    WINDOW = 5
    RESET = 6
    CONFIRM = 7
    KEY_REQUEST = 16
    KEY_GRANT = 17
    ANNOUNCE = 18


SESSION_TYPES = frozenset(t for t in MsgType if t < MsgType.KEY_REQUEST)
_SESSION_TYPE = {int(t): t for t in SESSION_TYPES}  # type byte -> MsgType, without the Enum call


class Role(enum.IntEnum):
    """Who sealed a session message; each role has its own key."""

    FORWARDER = 0
    PROXY = 1


_ROLES = (Role.FORWARDER, Role.PROXY)  # sender byte -> Role, without the Enum call

FLAG_END = 0x01  # last frame of this stream in this direction

_HEADER = struct.Struct(">BBBB8sQ16sI")
HEADER_SIZE = _HEADER.size  # 40
COUNTER_BYTES = slice(12, 20)  # a packed header's counter, big-endian: the last 8 bytes of its nonce
TAG_SIZE = 16
OVERHEAD = HEADER_SIZE + TAG_SIZE
DEFAULT_FRAME_SIZE = 262144  # [forwarder]/[proxy] frame_size when not set
FRAME_PAYLOAD = DEFAULT_FRAME_SIZE - OVERHEAD  # body bytes in one DATA frame at that size
ID_SIZE = 8
STREAM_ID_SIZE = 16
# The stream id of a proxy's CONFIRM on a forwarder's control channel saying "I am draining:
# send me nothing new" (PROTOCOL.md §3.1). Any other id there is a confirmation or heartbeat.
LEAVING = b"\xff" * STREAM_ID_SIZE
NONCE_SIZE = 16
X25519_SIZE = 32
UNKNOWN_LENGTH = (1 << 64) - 1

MAX_METHOD = 32
MAX_TARGET = 65536
MAX_HEADERS = 500
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 65536
MAX_CHANNEL = 256
MAX_REASON = 1024

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # RFC 9110 tchar
_TOKEN = re.compile(_TCHAR + b"+")
# A header block's names joined by NUL: tokens of at most MAX_HEADER_NAME bytes each.
_NAME = _TCHAR + b"{1,%d}" % MAX_HEADER_NAME
_NAMES = re.compile(_NAME + b"(?:\0" + _NAME + b")*")
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"  # proxy names, also checked by config
NAME_PATTERN = re.compile(NAME_RE)  # always fullmatch()
_new = tuple.__new__  # a named tuple from a tuple of its fields, without its __new__'s Python frame


class Header(NamedTuple):
    """The cleartext part of a session message, authenticated as associated data.

    An immutable record made once per message each way: a named tuple, built from the
    unpacked fields in one step (a frozen dataclass sets each field through
    ``object.__setattr__``, about five times the cost).
    """

    version: int
    type: MsgType
    flags: int
    sender: Role
    key_id: bytes
    counter: int
    stream_id: bytes
    seq: int

    def pack(self) -> bytes:
        return _HEADER.pack(*self)

    @property
    def end(self) -> bool:
        return bool(self.flags & FLAG_END)


def peek_type(data: bytes) -> tuple[int, int]:
    """(version, type) of any bus message, or BusMessageError when too short."""
    if len(data) < 2:
        raise BusMessageError("malformed", "shorter than two bytes")
    return data[0], data[1]


def unpack_header(data: bytes) -> Header:
    """Parse and sanity-check the header of a session message (the AEAD check comes later)."""
    if len(data) < OVERHEAD:
        raise BusMessageError("malformed", "session message shorter than header and tag")
    version, mtype, flags, sender, key_id, counter, stream_id, seq = _HEADER.unpack_from(data)
    if version != VERSION:
        raise BusMessageError("bad-version", f"version {version}")
    session_type = _SESSION_TYPE.get(mtype)
    if session_type is None:
        raise BusMessageError("bad-type", f"type {mtype} in a session message")
    if sender not in (0, 1) or flags & ~FLAG_END:
        raise BusMessageError("malformed", "bad sender or flags")
    return _new(Header, (version, session_type, flags, _ROLES[sender], key_id, counter, stream_id, seq))


def pack_header(mtype: MsgType, flags: int, sender: Role, key_id: bytes, counter: int, stream_id: bytes, seq: int) -> bytes:
    """The 40 header bytes of a session message."""
    return _HEADER.pack(VERSION, mtype, flags, sender, key_id, counter, stream_id, seq)


class Writer:
    """Accumulates length-prefixed fields."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack(">B", v))
        return self

    def u16(self, v: int) -> Writer:
        self._parts.append(struct.pack(">H", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def raw(self, v: bytes) -> Writer:
        self._parts.append(v)
        return self

    def blob16(self, v: bytes) -> Writer:
        return self.u16(len(v)).raw(v)

    def blob32(self, v: bytes) -> Writer:
        return self.u32(len(v)).raw(v)

    def bytes(self) -> bytes:
        return b"".join(self._parts)


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Bounds-checked reads; any overrun is a BusMessageError."""

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self._data = bytes(data)
        self._pos = offset
        self._end = len(self._data)

    def _at(self, n: int) -> int:
        pos = self._pos
        if pos + n > self._end:
            raise BusMessageError("malformed", "truncated field")
        self._pos = pos + n
        return pos

    def u8(self) -> int:
        return self._data[self._at(1)]

    def u16(self) -> int:
        return _U16.unpack_from(self._data, self._at(2))[0]  # type: ignore[no-any-return]

    def u32(self) -> int:
        return _U32.unpack_from(self._data, self._at(4))[0]  # type: ignore[no-any-return]

    def u64(self) -> int:
        return _U64.unpack_from(self._data, self._at(8))[0]  # type: ignore[no-any-return]

    def raw(self, n: int) -> bytes:
        pos = self._at(n)
        return self._data[pos : pos + n]

    def blob16(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise BusMessageError("malformed", "field over its limit")
        return self.raw(n)

    def blob32(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise BusMessageError("malformed", "field over its limit")
        return self.raw(n)

    @property
    def offset(self) -> int:
        return self._pos

    def rest(self) -> bytes:
        pos, self._pos = self._pos, self._end
        return self._data[pos:]

    def done(self) -> None:
        if self._pos != self._end:
            raise BusMessageError("malformed", "trailing bytes")


HeaderList = list[tuple[bytes, bytes]]


MAX_HEADER_BLOCK = 256 * 1024
_CONTROL = re.compile(rb"[\x00-\x20\x7f]")
_REASON_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9112: HTAB, SP, VCHAR, obs-text only
_REQ_FIXED = struct.Struct(">HBIIQQ")  # reply, method, target, header block lengths; Content-Length; deadline
_RESP_FIXED = struct.Struct(">HHIQ")  # status, reason and header block lengths; Content-Length


def _header_block(headers: HeaderList) -> bytes:
    """Names and values joined by NUL: one C-speed split decodes it (neither may hold a NUL)."""
    if len(headers) > MAX_HEADERS:
        raise ValueError("too many headers")
    block = b"\0".join(chain.from_iterable(headers))
    if block.count(b"\0") != 2 * len(headers) - 1 and headers:
        raise ValueError("NUL in a header name or value")
    return block


def _parse_header_block(block: bytes) -> HeaderList:
    """The (name, value) pairs of a header block; BusMessageError unless every name is a token
    of at most MAX_HEADER_NAME bytes, every value at most MAX_HEADER_VALUE bytes without CR or
    LF, and there are at most MAX_HEADERS of them."""
    if not block:
        return []
    parts = block.split(b"\0")
    n = len(parts)
    # The values are only searched for CR and LF (find: C's memchr, not the regex engine's loop
    # per byte), and measured only if the block could hold one too long; one match checks
    # every name.
    if (n % 2 or n > 2 * MAX_HEADERS or block.find(b"\r") >= 0 or block.find(b"\n") >= 0
            or (len(block) > MAX_HEADER_VALUE and max(map(len, parts[1::2])) > MAX_HEADER_VALUE)
            or not _NAMES.fullmatch(b"\0".join(parts[0::2]))):
        _refuse_header_block(block, parts)
    pairs = iter(parts)
    return list(zip(pairs, pairs))


def _refuse_header_block(block: bytes, parts: list[bytes]) -> NoReturn:
    """Raise the BusMessageError saying what is wrong with a header block refused."""
    if b"\r" in block or b"\n" in block:
        raise BusMessageError("malformed", "CR or LF in a header")
    if len(parts) % 2 or len(parts) > 2 * MAX_HEADERS:
        raise BusMessageError("malformed", "bad header block")
    if max(map(len, parts[1::2])) > MAX_HEADER_VALUE:
        raise BusMessageError("malformed", "header value over its limit")
    raise BusMessageError("malformed", "bad header name")


def _length_out(n: int | None) -> int:
    return UNKNOWN_LENGTH if n is None else n


def _length_in(n: int) -> int | None:
    return None if n == UNKNOWN_LENGTH else n


def _fields(data: bytes, fixed: struct.Struct) -> tuple[tuple[int, ...], int]:
    if len(data) < fixed.size:
        raise BusMessageError("malformed", "head shorter than its fixed part")
    return fixed.unpack_from(data), fixed.size


def _cut(data: bytes, pos: int, n: int, limit: int) -> tuple[bytes, int]:
    if n > limit or pos + n > len(data):
        raise BusMessageError("malformed", "field over its limit or past the end")
    return data[pos : pos + n], pos + n


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the proxy needs to call its upstream. ``target`` is origin-form (``/path?query``).

    ``deadline_ms`` is the forwarder's clock (ms since the epoch) at which it answers the
    client 504 if nothing came back: a proxy never starts a request past it.
    """

    method: bytes
    target: bytes
    headers: HeaderList
    reply_channel: bytes
    content_length: int | None
    deadline_ms: int = 0

    def with_deadline(self, deadline_ms: int) -> RequestHead:
        """This head with another deadline (what ``dataclasses.replace`` gives, without its
        walk over the fields)."""
        return RequestHead(self.method, self.target, self.headers, self.reply_channel, self.content_length,
                           deadline_ms)

    def encode(self, body: bytes = b"", deadline_ms: int | None = None) -> bytes:
        """The head's bytes, then ``body``; with ``deadline_ms``, as :meth:`with_deadline` would
        encode (without making that head: the forwarder sets the deadline as it publishes)."""
        block = _header_block(self.headers)
        fixed = _REQ_FIXED.pack(len(self.reply_channel), len(self.method), len(self.target), len(block),
                                _length_out(self.content_length),
                                self.deadline_ms if deadline_ms is None else deadline_ms)
        return b"".join((fixed, self.reply_channel, self.method, self.target, block, body))

    @classmethod
    def decode(cls, data: bytes) -> tuple[RequestHead, bytes]:
        """The head and the inline body bytes that follow it."""
        (n_reply, n_method, n_target, n_block, length, deadline), pos = _fields(data, _REQ_FIXED)
        reply, pos = _cut(data, pos, n_reply, MAX_CHANNEL)
        method, pos = _cut(data, pos, n_method, MAX_METHOD)
        target, pos = _cut(data, pos, n_target, MAX_TARGET)
        block, pos = _cut(data, pos, n_block, MAX_HEADER_BLOCK)
        if not _TOKEN.fullmatch(method):
            raise BusMessageError("malformed", "bad method")
        if not is_origin_form(target):
            raise BusMessageError("malformed", "target is not origin-form")
        return cls(method, target, _parse_header_block(block), reply, _length_in(length), deadline), data[pos:]


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """Status line and headers of an upstream response."""

    status: int
    reason: bytes
    headers: HeaderList
    content_length: int | None

    def encode(self, body: bytes = b"") -> bytes:
        block = _header_block(self.headers)
        fixed = _RESP_FIXED.pack(self.status, len(self.reason), len(block), _length_out(self.content_length))
        return b"".join((fixed, self.reason, block, body))

    @classmethod
    def decode(cls, data: bytes) -> tuple[ResponseHead, bytes]:
        (status, n_reason, n_block, length), pos = _fields(data, _RESP_FIXED)
        if not 100 <= status <= 999:
            raise BusMessageError("malformed", "bad status")
        reason, pos = _cut(data, pos, n_reason, MAX_REASON)
        block, pos = _cut(data, pos, n_block, MAX_HEADER_BLOCK)
        if _REASON_FORBIDDEN.search(reason):
            raise BusMessageError("malformed", "bad reason")
        return cls(status, reason, _parse_header_block(block), _length_in(length)), data[pos:]


def is_origin_form(target: bytes) -> bool:
    """A request target a REQ_HEAD may carry: ``/path?query`` without spaces or control bytes."""
    return target.startswith(b"/") and not _CONTROL.search(target)


def clean_reason(reason: bytes) -> bytes:
    """A reason phrase as ResponseHead.decode accepts it: forbidden bytes removed, cut to
    MAX_REASON (the proxy passes on what any upstream sent)."""
    return _REASON_FORBIDDEN.sub(b"", reason)[:MAX_REASON]


def encode_window(increment: int) -> bytes:
    return struct.pack(">I", increment)


def decode_window(data: bytes) -> int:
    r = Reader(data)
    n = r.u32()
    r.done()
    if n == 0:
        raise BusMessageError("malformed", "zero window increment")
    return n


def encode_reset(code: int, message: str = "") -> bytes:
    return Writer().u16(code).blob16(message.encode("utf-8")[:MAX_REASON]).bytes()


def decode_reset(data: bytes) -> tuple[int, str]:
    r = Reader(data)
    code = r.u16()
    message = r.blob16(MAX_REASON).decode("utf-8", "replace")
    r.done()
    return code, message


# --- negotiation messages --------------------------------------------------------------------


def _check_name(name: bytes) -> str:
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise BusMessageError("malformed", "name is not ASCII") from None
    if not NAME_PATTERN.fullmatch(text):
        raise BusMessageError("malformed", "bad proxy name")
    return text


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """Step 2, proxy to forwarders: "give me a session key", signed by the proxy."""

    proxy: str
    instance: bytes
    reply_channel: bytes
    nonce: bytes
    timestamp_ms: int
    ephemeral: bytes
    frame_size: int
    window: int
    target: bytes  # a forwarder id, or eight zero bytes for every forwarder
    lifetime_ms: int = 86_400_000  # the key's hard lifetime the proxy asks for
    max_messages: int = 1_000_000  # and its hard message budget

    def encode_body(self) -> bytes:
        return (
            Writer().u8(VERSION).u8(MsgType.KEY_REQUEST).blob16(self.proxy.encode("ascii")).raw(self.instance)
            .blob16(self.reply_channel).raw(self.nonce).u64(self.timestamp_ms).raw(self.ephemeral)
            .u32(self.frame_size).u32(self.window).raw(self.target).u32(self.lifetime_ms).u64(self.max_messages)
            .bytes()
        )

    @classmethod
    def decode_body(cls, r: Reader) -> KeyRequest:
        proxy = _check_name(r.blob16(64))
        return cls(
            proxy, r.raw(ID_SIZE), r.blob16(MAX_CHANNEL), r.raw(NONCE_SIZE), r.u64(), r.raw(X25519_SIZE),
            r.u32(), r.u32(), r.raw(ID_SIZE), r.u32(), r.u64(),
        )


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """Step 2, forwarder to proxy: a wrapped secret and an ephemeral key, signed, bound to the request."""

    forwarder: bytes
    request_nonce: bytes
    key_id: bytes
    wrapped: bytes
    ephemeral: bytes
    frame_size: int
    window: int
    timestamp_ms: int
    lifetime_ms: int = 86_400_000  # the hard lifetime both sides enforce (the smaller of both limits)
    max_messages: int = 1_000_000  # the hard message budget both sides enforce
    announce_ms: int = 15_000  # how often this forwarder announces itself

    def encode_body(self) -> bytes:
        return (
            Writer().u8(VERSION).u8(MsgType.KEY_GRANT).raw(self.forwarder).raw(self.request_nonce).raw(self.key_id)
            .blob16(self.wrapped).raw(self.ephemeral).u32(self.frame_size).u32(self.window)
            .u64(self.timestamp_ms).u32(self.lifetime_ms).u64(self.max_messages).u32(self.announce_ms).bytes()
        )

    @classmethod
    def decode_body(cls, r: Reader) -> KeyGrant:
        return cls(
            r.raw(ID_SIZE), r.raw(NONCE_SIZE), r.raw(ID_SIZE), r.blob16(1024), r.raw(X25519_SIZE),
            r.u32(), r.u32(), r.u64(), r.u32(), r.u64(), r.u32(),
        )


@dataclass(frozen=True, slots=True)
class Announce:
    """A forwarder saying it is alive (every ``interval_ms``); a proxy with no key for it
    negotiates at once, one with a key answers with a sealed CONFIRM (its heartbeat)."""

    forwarder: bytes
    nonce: bytes
    timestamp_ms: int
    interval_ms: int = 15_000

    def encode_body(self) -> bytes:
        return (Writer().u8(VERSION).u8(MsgType.ANNOUNCE).raw(self.forwarder).raw(self.nonce).u64(self.timestamp_ms)
                .u32(self.interval_ms).bytes())

    @classmethod
    def decode_body(cls, r: Reader) -> Announce:
        return cls(r.raw(ID_SIZE), r.raw(NONCE_SIZE), r.u64(), r.u32())


SignedT = TypeVar("SignedT", KeyRequest, KeyGrant, Announce)
_SIGNED_TYPES: dict[type, MsgType] = {
    KeyRequest: MsgType.KEY_REQUEST,
    KeyGrant: MsgType.KEY_GRANT,
    Announce: MsgType.ANNOUNCE,
}
MAX_SIGNATURE = 1024


def encode_signed(body: bytes, signature: bytes) -> bytes:
    """A negotiation message: its encoded body, then the signature over label+channel+body."""
    return body + struct.pack(">H", len(signature)) + signature


def decode_signed(data: bytes, kind: type[SignedT]) -> tuple[SignedT, bytes, bytes]:
    """(message, signed body bytes, signature); raises on any structural problem."""
    expected = _SIGNED_TYPES[kind]
    version, mtype = peek_type(data)
    if version != VERSION:
        raise BusMessageError("bad-version", f"version {version}")
    if mtype != expected:
        raise BusMessageError("bad-type", f"type {mtype} where {expected.name} was expected")
    r = Reader(data, 2)
    message = kind.decode_body(r)
    body_end = r.offset
    signature = r.blob16(MAX_SIGNATURE)
    r.done()
    return message, data[:body_end], signature
