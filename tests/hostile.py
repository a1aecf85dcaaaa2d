"""A hostile Redis in the middle: a test fixture that relays Redis connections and lies.

The attacker owns the network between our services and a real ``redis-server``. Each client
connection accepted on :attr:`HostileRedis.url` is relayed to the real server on a connection
of its own; on the way the attacker may:

* lie about PUBLISH receiver counts and PUBSUB NUMSUB counts (:attr:`publish_count`,
  :attr:`numsub_count`);
* drop, hold back (and later release, in order or reversed) or duplicate each PUBLISH
  (:attr:`on_publish`, :attr:`held`, :meth:`release`, :meth:`release_reversed`);
* publish messages of its own on the real Redis (:meth:`inject`);
* push a subscriber a pub/sub message far larger than any publisher would send
  (:meth:`send_oversized`), streamed with the victim's TCP backpressure;
* read every PUBLISH (:attr:`publishes`) and cut the network (:meth:`drop_connections`).

Wire handling: the client->server stream is parsed with ``hiredis.Reader`` into commands and
re-encoded as RESP arrays of bulk strings. Replies of a connection that has not subscribed are
matched to its commands through a FIFO of expectations (commands are pipelined), so synthetic
replies for dropped/held PUBLISHes go out in command order. Once a connection subscribes, the
server's replies no longer match commands one to one (pushed messages, one confirmation per
channel): from then on each parsed reply is relayed as it comes. Every server reply is
re-encoded whole, so the attacker's own messages are only ever inserted between two replies.
Status replies (``+OK``) are re-encoded as bulk strings, which txredisapi (hiredis reader, as
installed here) cannot tell apart.

Runs in the test process's reactor; :meth:`HostileRedis.stop` leaves no port, connection or
timer behind.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from typing import Callable, Sequence

import hiredis
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IListeningPort, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ppbridge.redisraw import INCOMPLETE as _INCOMPLETE
from ppbridge.redisraw import RedisReplyError, encode_command

log = Logger()

CONNECT_TIMEOUT = 5  # seconds to reach the real Redis
PASS, DROP, HOLD, DUPLICATE = "pass", "drop", "hold", "duplicate"
_DECISIONS = (PASS, DROP, HOLD, DUPLICATE)
_SUBSCRIBING = {b"SUBSCRIBE", b"PSUBSCRIBE"}


# --- RESP encoding (commands: ppbridge.redisraw.encode_command) ---------------------------


def encode_reply(reply: object) -> bytes:
    """A reply parsed by hiredis, re-encoded (status replies become bulk strings)."""
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if isinstance(reply, bool):  # before int: bool is an int (RESP3 only, never sent here)
        raise TypeError("RESP3 boolean reply: not relayed")
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, RedisReplyError):
        text = str(reply.args[0]) if reply.args else "ERR"
        return b"-%s\r\n" % text.encode("utf-8", "replace")
    if isinstance(reply, list):
        return b"*%d\r\n" % len(reply) + b"".join(encode_reply(item) for item in reply)
    raise TypeError(f"unexpected reply type {type(reply).__name__}")


def _push_header(channel: bytes, pattern: bytes | None, size: int) -> bytes:
    """The start of a pushed pub/sub message whose body (``size`` bytes + CRLF) follows."""
    if pattern is None:
        head = b"*3\r\n$7\r\nmessage\r\n"
    else:
        head = b"*4\r\n$8\r\npmessage\r\n$%d\r\n%s\r\n" % (len(pattern), pattern)
    return head + b"$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, size)


# --- the oversized push -------------------------------------------------------------------


@implementer(IPushProducer)
class _OversizedStream:
    """Streams one pushed message of ``size`` body bytes to one client transport, writing a
    chunk only while the transport is not paused; never holds more than one chunk."""

    def __init__(self, header: bytes, size: int, chunk: int, done: Deferred[None]) -> None:
        self._header = header
        self._remaining = size
        self._block = b"\x00" * min(chunk, size) if size else b""
        self._done = done
        self._transport: ITransport | None = None
        self._paused = False
        self._on_end: Callable[[], None] = lambda: None
        self.finished = False

    def begin(self, transport: ITransport, on_end: Callable[[], None]) -> None:
        """Register on ``transport`` and start writing; ``on_end`` runs once, when finished."""
        self._transport = transport
        self._on_end = on_end
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if not self.finished:  # registering on a closed transport stops us at once
            transport.write(self._header)
            self.resumeProducing()

    def resumeProducing(self) -> None:
        """Write chunks until the transport pauses us or the body is complete."""
        self._paused = False
        transport = self._transport
        while not self._paused and not self.finished and transport is not None:
            if self._remaining == 0:
                transport.write(b"\r\n")
                self._end()
                return
            piece = self._block if self._remaining >= len(self._block) else self._block[: self._remaining]
            self._remaining -= len(piece)
            transport.write(piece)

    def pauseProducing(self) -> None:
        """The client's socket buffer is full: stop writing until resumed."""
        self._paused = True

    def stopProducing(self) -> None:
        """The client connection closed (or the relay is shutting down): give up."""
        self._end()

    def _end(self) -> None:
        """Finish once: unregister from the transport, let the relay go on, fire ``done``."""
        if self.finished:
            return
        self.finished = True
        self._block = b""
        if self._transport is not None:  # also when stopped: else loseConnection would wait on us
            self._transport.unregisterProducer()  # type: ignore[attr-defined]
        self._on_end()
        self._done.callback(None)


# --- one relayed connection ---------------------------------------------------------------


class _ClientSide(Protocol):
    """The connection a victim opened to the attacker; hands every event to its relay."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        """A victim connected: the relay opens its twin to the real Redis."""
        self.relay.client_up()

    def dataReceived(self, data: bytes) -> None:
        """Bytes of commands from the victim."""
        self.relay.from_client(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The victim left (or was cut): the twin goes too."""
        self.relay.client_lost()


class _ServerSide(Protocol):
    """The attacker's connection to the real Redis on behalf of one victim."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        """Connected to the real Redis: commands buffered meanwhile go out."""
        self.relay.server_up(self)

    def dataReceived(self, data: bytes) -> None:
        """Bytes of replies and pushed messages from the real Redis."""
        self.relay.from_server(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The real Redis closed (or was cut): the victim's connection goes too."""
        self.relay.server_lost()


class _Expect:
    """One entry of a connection's reply FIFO, in command order. ``kind``: ``real`` (the next
    server reply, passed through ``transform``), ``discard`` (the next server reply, not sent
    on), ``synthetic`` (``reply`` made up by the attacker) or ``switch`` (from here on the
    connection is subscribed: relay every reply as it comes)."""

    __slots__ = ("kind", "transform", "reply")

    def __init__(self, kind: str, transform: Callable[[object], object] | None = None,
                 reply: object = None) -> None:
        self.kind = kind
        self.transform = transform
        self.reply = reply


class _Relay:
    """One client connection and its twin to the real Redis: parses both directions, applies
    the attacker's policy, keeps replies in command order and owns the queue of bytes and
    oversized pushes bound for the client."""

    def __init__(self, owner: HostileRedis) -> None:
        self.owner = owner
        self.client = _ClientSide(self)
        self.server: _ServerSide | None = None
        self.client_open = False
        self.subscribed = False  # SUBSCRIBE/PSUBSCRIBE seen: replies no longer match commands
        self.channels: set[bytes] = set()
        self.patterns: set[bytes] = set()
        self._connecting: Deferred[_ServerSide] | None = None
        self._to_server: list[bytes] = []
        self._expect: deque[_Expect] = deque()
        self._passthrough = False
        self._out: deque[bytes | _OversizedStream] = deque()
        self._streaming: _OversizedStream | None = None
        self._client_reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._server_reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=_INCOMPLETE)
        self._client_done = False
        self._server_done = False
        self._closed_waiters: list[Deferred[None]] = []

    # lifecycle

    def client_up(self) -> None:
        """A victim connected: open our own connection to the real Redis."""
        self.client_open = True
        endpoint = TCP4ClientEndpoint(reactor, self.owner.upstream_host, self.owner.upstream_port,
                                      timeout=CONNECT_TIMEOUT)
        self._connecting = connectProtocol(endpoint, _ServerSide(self))
        self._connecting.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        """The real Redis is unreachable (or the attempt was cancelled): cut the victim."""
        self._connecting = None
        log.warn("hostile Redis could not reach the real Redis: {err}", err=failure.getErrorMessage())
        self._set_server_done()
        self.abort()

    def server_up(self, server: _ServerSide) -> None:
        """The twin is connected; flush commands that arrived before it was."""
        self._connecting = None
        self.server = server
        if not self.client_open:
            self.abort()
            return
        pending, self._to_server = self._to_server, []
        if pending and server.transport is not None:
            server.transport.write(b"".join(pending))

    def client_lost(self) -> None:
        """The victim's connection closed: end its pushes, close or cancel the twin."""
        self.client_open = False
        self._stop_streams()
        self._client_done = True
        if self._connecting is not None:
            self._connecting.cancel()  # errback -> _connect_failed -> server done
        elif self.server is not None and self.server.transport is not None:
            self.server.transport.loseConnection()
        self._check_closed()

    def server_lost(self) -> None:
        """The twin closed: end the pushes and close the victim's connection."""
        self._set_server_done()
        self._stop_streams()
        if self.client_open:
            self.client.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Cut both connections at once (a network failure), oversized pushes included."""
        self._stop_streams()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.server is not None and self.server.transport is not None:
            self.server.transport.abortConnection()  # type: ignore[attr-defined]
        if self.client_open and self.client.transport is not None:
            self.client.transport.abortConnection()  # type: ignore[attr-defined]

    def when_closed(self) -> Deferred[None]:
        """Fires once both connections are closed (or were never opened)."""
        if self._client_done and self._server_done:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def _set_server_done(self) -> None:
        """The twin is closed, or will never open."""
        self._server_done = True
        self._check_closed()

    def _check_closed(self) -> None:
        """When both sides are closed: forget this relay and wake :meth:`when_closed`."""
        if self._client_done and self._server_done:
            self.owner._relay_closed(self)
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # client -> server

    def from_client(self, data: bytes) -> None:
        """Parse whole commands out of the victim's stream; cut it if it is not RESP."""
        self._client_reader.feed(data)
        while True:
            try:
                command = self._client_reader.gets()
            except hiredis.ProtocolError as err:
                log.warn("hostile Redis: unparsable client command ({err}); cutting", err=err)
                self.abort()
                return
            if command is _INCOMPLETE:
                return
            if not isinstance(command, list) or not command or not all(isinstance(a, bytes) for a in command):
                log.warn("hostile Redis: client sent a non-command {c!r}; cutting", c=command)
                self.abort()
                return
            self._command(command)

    def _command(self, args: list[bytes]) -> None:
        """Apply the attacker's policy to one command and queue what its reply will be."""
        name = args[0].upper()
        self._track_subscriptions(name, args[1:])
        if name == b"PUBLISH" and len(args) == 3:
            self.owner.publishes.append((args[1], args[2]))
        if self.subscribed:
            self._forward(args)
            return
        if name in _SUBSCRIBING:
            self.subscribed = True
            self._expect.append(_Expect("switch"))
            self._forward(args)
        elif name == b"PUBLISH" and len(args) == 3:
            self._publish(args[1], args[2])
        elif name == b"PUBSUB" and len(args) >= 2 and args[1].upper() == b"NUMSUB":
            self._forward(args)
            self._expect.append(_Expect("real", self.owner._numsub_lie))
        else:
            self._forward(args)
            self._expect.append(_Expect("real"))
        self._flush_synthetic()

    def _publish(self, channel: bytes, message: bytes) -> None:
        """Pass, drop, hold or duplicate one PUBLISH as ``on_publish`` says. An answer that is
        none of these raises ValueError (Twisted logs it and drops the connection, so the
        test fails)."""
        owner = self.owner
        decision = owner.on_publish(channel, message) if owner.on_publish is not None else PASS
        if decision not in _DECISIONS:
            raise ValueError(f"on_publish returned {decision!r}, not one of {_DECISIONS}")

        def lie(reply: object) -> object:
            """The count told for this message's real reply."""
            return owner._publish_lie(channel, message, reply)

        command = [b"PUBLISH", channel, message]
        if decision in (PASS, DUPLICATE):
            self._forward(command)
            self._expect.append(_Expect("real", lie))
        if decision == DUPLICATE:
            self._forward(command)
            self._expect.append(_Expect("discard"))
        if decision in (DROP, HOLD):
            self._expect.append(_Expect("synthetic", reply=owner._made_up_count(channel, message)))
        if decision == HOLD:
            owner.held.append((channel, message))

    def _track_subscriptions(self, name: bytes, names: list[bytes]) -> None:
        """Remember what this connection listens to (for :meth:`push_oversized`)."""
        kept = self.channels if name in (b"SUBSCRIBE", b"UNSUBSCRIBE") else self.patterns
        if name in _SUBSCRIBING:
            kept.update(names)
        elif name in (b"UNSUBSCRIBE", b"PUNSUBSCRIBE"):
            if names:
                kept.difference_update(names)
            else:
                kept.clear()

    def _forward(self, args: Sequence[bytes]) -> None:
        """Re-encode a command to the real Redis (buffered until the twin is connected)."""
        data = encode_command(args)
        if self.server is not None and self.server.transport is not None:
            self.server.transport.write(data)
        else:
            self._to_server.append(data)

    # server -> client

    def from_server(self, data: bytes) -> None:
        """Parse whole replies out of the real Redis's stream."""
        self._server_reader.feed(data)
        while True:
            try:
                reply = self._server_reader.gets()
            except hiredis.ProtocolError as err:
                log.warn("hostile Redis: unparsable server reply ({err}); cutting", err=err)
                self.abort()
                return
            if reply is _INCOMPLETE:
                return
            self._server_reply(reply)

    def _server_reply(self, reply: object) -> None:
        """Match one server reply to its command (unless subscribed) and send it on."""
        if self._passthrough or not self._expect:
            self._emit(encode_reply(reply))
            return
        expected = self._expect.popleft()  # a "real" or "discard": synthetics were flushed
        if expected.kind == "real":
            if expected.transform is not None:
                reply = expected.transform(reply)
            self._emit(encode_reply(reply))
        self._flush_synthetic()

    def _flush_synthetic(self) -> None:
        """Send the made-up replies now at the head of the FIFO; enter pass-through at a
        ``switch``. Stops at the first entry that waits for a real reply."""
        while self._expect and self._expect[0].kind in ("synthetic", "switch"):
            entry = self._expect.popleft()
            if entry.kind == "switch":
                self._passthrough = True
                self._expect.clear()
                return
            self._emit(encode_reply(entry.reply))

    # output to the client: whole replies, and oversized pushes between them

    def _emit(self, item: bytes | _OversizedStream) -> None:
        """Queue a whole encoded reply or an oversized push for the victim, in order."""
        self._out.append(item)
        self._pump()

    def _pump(self) -> None:
        """Write queued replies until an oversized push starts; it resumes the pump when done."""
        transport = self.client.transport
        while self._out and self._streaming is None and self.client_open and transport is not None:
            item = self._out.popleft()
            if isinstance(item, bytes):
                transport.write(item)
            else:
                self._streaming = item
                item.begin(transport, self._stream_ended)

    def _stream_ended(self) -> None:
        """An oversized push is complete (or abandoned): carry on with the queue."""
        self._streaming = None
        if self.client_open:
            self._pump()

    def _stop_streams(self) -> None:
        """Abandon every oversized push of this connection (their Deferreds fire) and the
        replies queued behind them: the connection is going away."""
        streams = [item for item in self._out if isinstance(item, _OversizedStream)]
        self._out.clear()
        if self._streaming is not None:
            streams.insert(0, self._streaming)
        for stream in streams:
            stream.stopProducing()

    def push_oversized(self, channel: bytes, size: int, chunk: int) -> Deferred[None] | None:
        """Queue an oversized push if this subscriber would receive ``channel``; its
        completion, or None when this connection is not a receiver."""
        if not self.client_open or not self.subscribed:
            return None
        if channel in self.channels:
            pattern = None
        else:
            text = channel.decode("latin-1")
            matching = [p for p in sorted(self.patterns) if fnmatch.fnmatchcase(text, p.decode("latin-1"))]
            if not matching:
                return None
            pattern = matching[0]
        done: Deferred[None] = Deferred()
        self._emit(_OversizedStream(_push_header(channel, pattern, size), size, chunk, done))
        return done


# --- the attacker's own connection ---------------------------------------------------------


class _AttackerLink(Protocol):
    """The attacker's own client connection to the real Redis (inject, release): pipelined
    commands, each answered by a Deferred in order."""

    def __init__(self, password: str | None, username: str | None) -> None:
        self._reader = hiredis.Reader(replyError=RedisReplyError, notEnoughData=_INCOMPLETE)
        self._waiting: deque[Deferred[object]] = deque()
        self._unsent: list[bytes] = []
        self.gone = False
        self.lost: Deferred[None] = Deferred()
        if password is not None:
            auth = [b"AUTH"] + ([username.encode()] if username else []) + [password.encode()]
            self.send(auth).addErrback(lambda f: log.warn("attacker AUTH failed: {e}", e=f.getErrorMessage()))

    def send(self, args: Sequence[bytes]) -> Deferred[object]:
        """Send a command (now, or once connected); fires with its reply."""
        if self.gone:
            return defer.fail(ConnectionDone("the attacker's Redis connection is closed"))
        waiter: Deferred[object] = Deferred()
        self._waiting.append(waiter)
        data = encode_command(args)
        if self.transport is not None:
            self.transport.write(data)
        else:
            self._unsent.append(data)
        return waiter

    def connectionMade(self) -> None:
        """Connected: send what was asked meanwhile."""
        unsent, self._unsent = self._unsent, []
        if unsent:
            self.transport.write(b"".join(unsent))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Replies, in command order: each fires the oldest waiting Deferred."""
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not _INCOMPLETE:
            if not self._waiting:
                continue
            waiter = self._waiting.popleft()
            if isinstance(reply, RedisReplyError):
                waiter.errback(reply)
            else:
                waiter.callback(reply)

    def fail_all(self, reason: Failure) -> None:
        """No more answers will come: fail every command still waiting."""
        self.gone = True
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            waiter.errback(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Closed: every command still waiting fails; :attr:`lost` fires."""
        self.fail_all(reason)
        self.lost.callback(None)


# --- the fixture --------------------------------------------------------------------------


class _RelayFactory(Factory):
    """Builds one :class:`_Relay` per accepted connection and returns its client side."""

    noisy = False

    def __init__(self, owner: HostileRedis) -> None:
        self.owner = owner

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """A new relay for an accepted connection; its client side is the protocol."""
        relay = _Relay(self.owner)
        self.owner._relays.add(relay)
        return relay.client


class HostileRedis:
    """A man in the middle between Redis clients and a real ``redis-server``.

    Owns a listening port on 127.0.0.1, every relayed connection pair, and one connection of
    the attacker's own (opened on first :meth:`inject`/:meth:`release`). Policy attributes
    are read at the moment they apply, so a test may change them at any time.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, password: str | None = None,
                 username: str | None = None) -> None:
        """Relay to ``upstream_host:upstream_port``. ``password``/``username`` are only for
        the attacker's own connection (relayed clients send their own AUTH)."""
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.url = ""
        self.publish_count: Callable[[bytes, bytes, int], int] | None = None
        self.numsub_count: Callable[[bytes, int], int] | None = None
        self.on_publish: Callable[[bytes, bytes], str] | None = None
        self.held: list[tuple[bytes, bytes]] = []
        self.publishes: list[tuple[bytes, bytes]] = []
        self._password = password
        self._username = username
        self._listening: IListeningPort | None = None
        self._relays: set[_Relay] = set()
        self._attacker: _AttackerLink | None = None
        self._attacker_connecting: Deferred[_AttackerLink] | None = None

    # lifecycle

    def start(self) -> Deferred[HostileRedis]:
        """Listen on a free port of 127.0.0.1; fires with this fixture, ``port`` and ``url``
        set."""

        def listening(port: IListeningPort) -> HostileRedis:
            """Remember the port and the URL clients should use."""
            self._listening = port
            self.port = port.getHost().port  # type: ignore[attr-defined]
            self.url = f"redis://127.0.0.1:{self.port}/0"
            return self

        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        return endpoint.listen(_RelayFactory(self)).addCallback(listening)

    def stop(self) -> Deferred[None]:
        """Stop listening, cut every relayed connection and the attacker's own; fires once all
        of them are closed (so trial finds a clean reactor)."""
        waits: list[Deferred[None]] = []
        if self._listening is not None:
            stopped = self._listening.stopListening()
            if stopped is not None:
                waits.append(stopped)
            self._listening = None
        for relay in list(self._relays):
            relay.abort()
            waits.append(relay.when_closed())
        if self._attacker_connecting is not None:
            self._attacker_connecting.cancel()
        if self._attacker is not None:
            link = self._attacker
            if link.transport is not None and not link.gone:
                waits.append(link.lost)
                link.transport.abortConnection()  # type: ignore[attr-defined]
            self._attacker = None
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def connections(self) -> int:
        """How many relayed client connections are open now."""
        return sum(1 for relay in self._relays if relay.client_open)

    def drop_connections(self) -> None:
        """Abort every relayed connection, both sides (a network cut). Clients may reconnect."""
        for relay in list(self._relays):
            relay.abort()

    def _relay_closed(self, relay: _Relay) -> None:
        """Both sides of ``relay`` are closed: stop tracking it."""
        self._relays.discard(relay)

    # lies

    def _publish_lie(self, channel: bytes, message: bytes, reply: object) -> object:
        """The PUBLISH count told to the client for a real reply."""
        if self.publish_count is None or not isinstance(reply, int):
            return reply
        return self.publish_count(channel, message, reply)

    def _made_up_count(self, channel: bytes, message: bytes) -> int:
        """The PUBLISH count told for a dropped or held message."""
        return self.publish_count(channel, message, 1) if self.publish_count is not None else 1

    def _numsub_lie(self, reply: object) -> object:
        """The PUBSUB NUMSUB reply told to the client: each count through ``numsub_count``."""
        lie = self.numsub_count
        if lie is None or not isinstance(reply, list):
            return reply
        told = list(reply)
        for i in range(0, len(told) - 1, 2):
            channel, count = told[i], told[i + 1]
            if isinstance(channel, bytes) and isinstance(count, int):
                told[i + 1] = lie(channel, count)
        return told

    # the attacker's own publishing

    def _attacker_send(self, args: Sequence[bytes]) -> Deferred[object]:
        """Send a command on the attacker's own connection, opening it if need be."""
        if self._attacker is None or self._attacker.gone:
            link = _AttackerLink(self._password, self._username)
            self._attacker = link
            endpoint = TCP4ClientEndpoint(reactor, self.upstream_host, self.upstream_port,
                                          timeout=CONNECT_TIMEOUT)
            self._attacker_connecting = connectProtocol(endpoint, link)

            def connected(proto: _AttackerLink) -> None:
                """Connected: nothing left to cancel."""
                self._attacker_connecting = None

            def failed(failure: Failure) -> None:
                """Unreachable or cancelled: fail everything asked of the link."""
                self._attacker_connecting = None
                link.fail_all(failure)

            self._attacker_connecting.addCallbacks(connected, failed)
        return self._attacker.send(args)

    def inject(self, channel: bytes, message: bytes) -> Deferred[int]:
        """Publish a message of the attacker's own on the real Redis; fires with the true
        receiver count."""
        return self._attacker_send([b"PUBLISH", channel, message])  # type: ignore[return-value]

    def release(self, predicate: Callable[[bytes, bytes], bool] | None = None) -> int:
        """Publish the held messages (all, or those ``predicate`` accepts) on the real Redis
        now, in the order they were held; how many. :meth:`wait_released` awaits them."""
        return self._release(predicate, reverse=False)

    def release_reversed(self, predicate: Callable[[bytes, bytes], bool] | None = None) -> int:
        """Like :meth:`release`, newest first (reordering)."""
        return self._release(predicate, reverse=True)

    def _release(self, predicate: Callable[[bytes, bytes], bool] | None, reverse: bool) -> int:
        """Take the chosen held messages out of ``held`` and publish them."""
        chosen = [m for m in self.held if predicate is None or predicate(*m)]
        self.held = [m for m in self.held if not (predicate is None or predicate(*m))]
        for channel, message in reversed(chosen) if reverse else chosen:
            d = self._attacker_send([b"PUBLISH", channel, message])
            d.addErrback(lambda f: log.warn("hostile Redis: a release failed: {e}", e=f.getErrorMessage()))
        return len(chosen)

    def wait_released(self) -> Deferred[None]:
        """Fires once the real Redis has answered everything the attacker sent so far
        (released and injected messages): a PING behind them on the same connection."""
        return self._attacker_send([b"PING"]).addCallback(lambda _: None)

    # the oversized push

    def send_oversized(self, channel: bytes, size: int, chunk: int = 1 << 20) -> Deferred[None]:
        """Push every relayed subscriber of ``channel`` (a plain subscription, else the first
        matching pattern, as ``pmessage``) one pub/sub message of ``size`` zero bytes, streamed
        in ``chunk``-byte writes as the client's TCP window allows, between two relayed
        replies. Fires when every push is written or its client has gone; fails with
        LookupError when no relayed connection subscribes to ``channel``."""
        if size < 0 or chunk <= 0:
            raise ValueError("size must be >= 0 and chunk > 0")
        pushes = [d for relay in list(self._relays)
                  if (d := relay.push_oversized(channel, size, chunk)) is not None]
        if not pushes:
            return defer.fail(LookupError(f"no relayed subscriber of {channel!r}"))
        return defer.gatherResults(pushes).addCallback(lambda _: None)
