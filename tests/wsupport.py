"""Real parts for WebSocket tests: a WebSocket upstream built with the ``websockets`` library,
a client session on the same library, and a Stack whose proxies call that upstream.

The server runs ``websockets.sync.server`` in threads of its own; a client session runs
``websockets.sync.client.connect`` in a reactor thread-pool thread through ``deferToThread``,
so the test itself stays on the reactor (the bridge is in-process on that reactor) and waits
on Deferreds, never on sleeps. Every blocking call in those threads has a timeout, and each
fixture's cleanup shuts its sockets, so a test that fails never leaves a thread blocked.

Upstream behaviour, by path:

* ``/echo``: every text and binary message comes back as it came, except two control texts:
  ``close:CODE:REASON`` makes the server close with that code and reason, and ``drop`` makes
  it close its TCP connection without a closing handshake (the time is recorded in
  ``drops``). Subprotocol ``chat.v2`` is selected when the client offers it.
* ``/push?mib=N``: N binary messages of 1 MiB (``push_block(i)``, incompressible and
  reproducible), as fast as the connection takes them, then a close with 1000.
* ``/sink?rate=BYTES_PER_S``: reads the client's binary messages at most ``rate`` bytes/s
  (default 16 MiB/s; paced in the connection's own handler thread) and, when the text
  ``done`` arrives, sends one text message, the JSON :func:`sink_report` of what it read
  (total bytes, message count, SHA-256 of all their bytes in order, how many reads waited on
  the pace), then closes with 1000. Any other text message: a close with 1003.
* ``/forbidden``: the handshake is refused with ``403`` and a short body.
* ``/plain``: a plain HTTP ``GET`` answered ``200`` with ``PLAIN_BODY``.
* ``/page``: ``BROWSER_PAGE``, an HTML page whose script opens a WebSocket to ``/echo`` on its
  own origin, exchanges two messages and writes the outcome into ``#result`` (then resolves
  the promise ``window.outcome``, which :func:`browser_dom_result` awaits).
* anything else: ``404``.

Each connection's end is recorded in ``closes`` (a :class:`ServerClose`, with the code and
reason the client sent and the monotonic time the server noticed), for the tests to await.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol
from zope.interface import implementer

from ppbridge.scaffold import TomlValue
from tests import test_streaming as streaming
from tests.processes import spawn
from tests.support import Stack, temp_folder

T = TypeVar("T")

MiB = 1 << 20
SUBPROTOCOL = "chat.v2"
PLAIN_BODY = "plain upstream\n"
FORBIDDEN_BODY = "no entry\n"
BROWSER_PAGE = """<!doctype html>
<html><head><title>ppbridge websocket</title></head>
<body><div id="result">pending</div>
<script>
window.outcome = new Promise((resolve) => {
  const result = document.getElementById("result");
  const ws = new WebSocket(`ws://${location.host}/echo`, ["chat.v2"]);
  const got = [];
  ws.onopen = () => { ws.send("from the browser"); ws.send("second"); };
  ws.onmessage = (event) => {
    got.push(event.data);
    if (got.length === 2) { ws.close(4003, "seen"); }
  };
  ws.onclose = (event) => {
    result.textContent = `protocol=${ws.protocol} got=${got.join("|")} close=${event.code}`;
    resolve();
  };
});
</script></body></html>
"""
WAIT = 30.0  # bound on any one blocking call in a client or server thread
MAX_MESSAGE = 64 * MiB  # both sides take the 16 MiB message (websockets' default is 1 MiB)


def push_block(i: int) -> bytes:
    """The ``i``-th 1 MiB message of ``/push``: pseudo-random (deflate cannot shrink it) and
    the same on every call, so a client can check what it received."""
    return random.Random(i).randbytes(MiB)


@dataclass(frozen=True)
class ServerClose:
    """How one server-side WebSocket connection ended."""

    path: str
    code: int | None  # the close code received from the client (1006: none, the TCP just ended)
    reason: str | None
    at: float  # time.monotonic() when the server's handler saw the end


class WebSocketUpstream:
    """A ``websockets`` server on 127.0.0.1, a free port, served by a daemon thread."""

    def __init__(self) -> None:
        self.closes: queue.Queue[ServerClose] = queue.Queue()
        self.drops: queue.Queue[float] = queue.Queue()  # monotonic time of each ``drop``
        self.requests: list[Request] = []  # every handshake request the server parsed
        self._connections: set[ServerConnection] = set()
        self._lock = threading.Lock()
        self.server: Server = serve(
            self._handle,
            "127.0.0.1",
            0,
            select_subprotocol=_select_subprotocol,
            process_request=self._process_request,
            max_size=MAX_MESSAGE,
            ping_interval=None,  # no keepalive pings of its own: tests see only their traffic
            open_timeout=WAIT,
            close_timeout=5,
        )
        self.port: int = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="ws-upstream", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL a proxy is configured with (``upstream``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The URL a client uses to reach the server directly."""
        return f"ws://127.0.0.1:{self.port}"

    def next_close(self, timeout: float = WAIT) -> defer.Deferred[ServerClose]:
        """Fires with the next connection end the server sees; fails after ``timeout`` s."""
        return threads.deferToThread(self.closes.get, True, timeout)

    def next_drop(self, timeout: float = WAIT) -> defer.Deferred[float]:
        """Fires with the monotonic time of the next ``drop``; fails after ``timeout`` s."""
        return threads.deferToThread(self.drops.get, True, timeout)

    def stop(self) -> defer.Deferred[None]:
        """Shut every connection's socket (so no handler thread stays blocked), then the server."""
        with self._lock:
            for connection in list(self._connections):
                _shut(connection.socket)
        return threads.deferToThread(self.server.shutdown)

    # the server's side, in its threads

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request)
        path = urlsplit(request.path).path
        if path == "/plain":
            return connection.respond(200, PLAIN_BODY)
        if path == "/page":
            response = connection.respond(200, BROWSER_PAGE)
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        if path == "/forbidden":
            return connection.respond(403, FORBIDDEN_BODY)
        if path not in ("/echo", "/push", "/sink"):
            return connection.respond(404, "not found\n")
        return None

    def _handle(self, ws: ServerConnection) -> None:
        with self._lock:
            self._connections.add(ws)
        path = urlsplit(ws.request.path).path if ws.request is not None else ""
        try:
            if path == "/push":
                self._push(ws)
            elif path == "/sink":
                self._sink(ws)
            else:
                self._echo(ws)
        except ConnectionClosed:
            pass
        finally:
            self.closes.put(ServerClose(path, ws.close_code, ws.close_reason, time.monotonic()))
            with self._lock:
                self._connections.discard(ws)

    def _echo(self, ws: ServerConnection) -> None:
        for message in ws:
            if isinstance(message, str) and message.startswith("close:"):
                _, code, reason = message.split(":", 2)
                ws.close(int(code), reason)
            elif message == "drop":
                at = time.monotonic()
                ws.close_socket()  # the TCP connection ends, no close frame
                self.drops.put(at)
            else:
                ws.send(message)

    def _push(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request is not None else {}
        for i in range(int(query.get("mib", ["1"])[0])):
            ws.send(push_block(i))
        ws.close(1000)
        # wait for the client's closing frame, so the close code is the client's answer
        for _ in ws:
            pass

    def _sink(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request is not None else {}
        rate = float(query.get("rate", [str(16 * MiB)])[0])
        digest = hashlib.sha256()
        total = messages = waited = 0
        first: float | None = None  # the clock starts with the first message, not the handshake
        while True:
            # Pacing, not synchronisation: this handler (its connection's own server thread)
            # sleeps until its schedule allows the next read, so it reads at most ``rate``
            # bytes/s and a faster sender backs up behind it. No outcome depends on the timing:
            # everything sent is still read, and the report waits for the client's ``done``.
            if first is not None:
                delay = first + total / rate - time.monotonic()
                if delay > 0:
                    waited += 1
                    time.sleep(delay)
            message = ws.recv(timeout=WAIT)
            if isinstance(message, str):
                if message == "done":
                    break
                ws.close(1003, "binary messages only")
                return
            if first is None:
                first = time.monotonic()
            total += len(message)
            messages += 1
            digest.update(message)
        took = time.monotonic() - first if first is not None else 0.0
        ws.send(sink_report(total, messages, digest.hexdigest(), waited, took))
        ws.close(1000)
        # wait for the client's closing frame, so the close code is the client's answer
        for _ in ws:
            pass


def sink_report(total: int, messages: int, sha256: str, waited: int = 0, seconds: float = 0.0) -> str:
    """The text ``/sink`` answers ``done`` with: JSON with ``bytes`` (total of the binary
    messages), ``messages``, ``sha256`` (hex, of their bytes in order), ``waited`` (reads the
    sink delayed to keep its rate: the sender was ahead of it) and ``seconds`` (first message
    to ``done``)."""
    return json.dumps({"bytes": total, "messages": messages, "sha256": sha256, "waited": waited,
                       "seconds": round(seconds, 3)})


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``chat.v2`` when the client offers it; no subprotocol (not a refusal) otherwise."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def start_upstream(case: TestCase) -> WebSocketUpstream:
    """A WebSocket upstream for one test, stopped at its cleanup."""
    upstream = WebSocketUpstream()
    case.addCleanup(upstream.stop)
    return upstream


class WebSocketClient:
    """Runs synchronous ``websockets`` client sessions in reactor threads, one per call.

    A session is a function of the open connection; its return value (or exception) is the
    Deferred's result. The connection is closed normally when the session returns (unless
    the session closed it) and its socket shut at the test's cleanup in any case.
    """

    def __init__(self, case: TestCase) -> None:
        self._open: set[ClientConnection] = set()
        self._lock = threading.Lock()
        case.addCleanup(self._shut_all)

    def session(self, url: str, run: Callable[[ClientConnection], T], **options: Any) -> defer.Deferred[T]:
        """Connect to ``url`` (``ws://...``) with ``options`` for ``connect`` and call ``run``."""
        return threads.deferToThread(self._session, url, run, options)

    def _session(self, url: str, run: Callable[[ClientConnection], T], options: Mapping[str, Any]) -> T:
        settings: dict[str, Any] = dict(proxy=None, open_timeout=WAIT, close_timeout=5, ping_interval=None,
                                        max_size=MAX_MESSAGE)
        settings.update(options)
        with connect(url, **settings) as ws:
            with self._lock:
                self._open.add(ws)
            try:
                return run(ws)
            finally:
                with self._lock:
                    self._open.discard(ws)

    def _shut_all(self) -> None:
        with self._lock:
            for ws in list(self._open):
                _shut(ws.socket)


def ws_url(http_url: str, path: str) -> str:
    """``ws://host:port/path`` for a forwarder's ``http://host:port``."""
    return "ws" + http_url[len("http"):] + path


@defer.inlineCallbacks
def websocket_stack(case: TestCase, upstream: WebSocketUpstream,
                    routes: Mapping[str, Mapping[str, TomlValue]] | None = None,
                    forwarder: Mapping[str, TomlValue] | None = None,
                    proxy: Mapping[str, TomlValue] | None = None,
                    rekey: Mapping[str, TomlValue] | None = None):  # type: ignore[no-untyped-def]
    """A started :class:`Stack` whose every proxy calls ``upstream`` instead of the sample app
    (the sample app still runs: ``stack.upstream``)."""
    routes = routes or {"alpha": {"path_prefix": "/"}}
    stack = Stack(case)
    yield stack.start(routes=routes, forwarder=forwarder, proxy=proxy, rekey=rekey,
                      upstreams={name: upstream.url for name in routes})
    return stack



def from_thread() -> tuple[defer.Deferred[Any], Callable[[Any], None]]:
    """A Deferred for the reactor and the function a client thread calls to fire it (through
    ``callFromThread``): how a session tells the test it has reached a point."""
    reached: defer.Deferred[Any] = defer.Deferred()

    def fire(value: Any = None) -> None:
        reactor.callFromThread(reached.callback, value)  # type: ignore[attr-defined]

    return reached, fire


class ChildBridge(streaming.ChildBridge):
    """tests/test_streaming.py's twistd children (a private Redis, ``twistd -n ppforwarder``
    and ``twistd -n ppproxy``, route ``alpha`` at ``/``) whose proxy calls a
    :class:`WebSocketUpstream` running in this process; everything stopped in cleanup."""

    def __init__(self, case: TestCase, upstream: WebSocketUpstream) -> None:
        super().__init__(case)
        self.upstream = upstream

    def start(self, forwarder: dict[str, Any] | None = None,
              proxy: dict[str, Any] | None = None) -> defer.Deferred[ChildBridge]:
        return super().start(forwarder, proxy, upstream=self.upstream.url)


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-proxy-server", "--no-first-run",
                  "--remote-debugging-port=0")


@defer.inlineCallbacks
def browser_dom_result(case: TestCase, client: WebSocketClient, page_url: str):  # type: ignore[no-untyped-def]
    """Load ``page_url`` (a :data:`BROWSER_PAGE`) in headless Chromium (Debian's ``chromium``)
    and return the text of its ``#result`` once ``window.outcome`` has resolved.

    The test drives the browser over the DevTools protocol (a WebSocket, through the same
    client): create a tab, navigate, await the load event, then evaluate a promise; so the
    wait is the page's own event, not a guess at how long it takes."""
    browser = shutil.which("chromium")
    if browser is None:
        raise SkipTest("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    profile = temp_folder(case)
    child = spawn(case, profile, [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"], "chromium")
    found = yield child.wait_for(r"DevTools listening on (ws://\S+)", fd=2)
    return (yield client.session(found.group(1), lambda ws: _devtools_result(ws, page_url), compression=None))


def _devtools_result(ws: ClientConnection, page_url: str) -> Any:
    events: list[dict[str, Any]] = []
    ids = iter(range(1, 1_000_000))

    def call(method: str, params: Mapping[str, Any] | None = None, session: str | None = None) -> Any:
        n = next(ids)
        ws.send(json.dumps({"id": n, "method": method, "params": dict(params or {}),
                            **({"sessionId": session} if session else {})}))
        while True:
            reply = json.loads(ws.recv(timeout=WAIT))
            if reply.get("id") != n:
                events.append(reply)
            elif "error" in reply:
                raise AssertionError(f"DevTools {method}: {reply['error']}")
            else:
                return reply["result"]

    def event(method: str, session: str) -> None:
        while not any(e.get("method") == method and e.get("sessionId") == session for e in events):
            events.append(json.loads(ws.recv(timeout=WAIT)))

    target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    call("Page.enable", session=session)
    call("Page.navigate", {"url": page_url}, session)
    event("Page.loadEventFired", session)
    answer = call("Runtime.evaluate", {
        "expression": 'window.outcome.then(() => document.getElementById("result").textContent)',
        "awaitPromise": True, "returnByValue": True, "timeout": WAIT * 1000}, session)
    if "exceptionDetails" in answer:
        raise AssertionError(f"the page failed: {answer['exceptionDetails']}")
    return answer["result"].get("value")


# --- a non-WebSocket upgrade: raw bytes and half-close ------------------------------------------

RAW_TOKEN = b"x-raw-echo"
EOF_SEEN = b"[eof seen]"
HALF_CLOSE = b"[half-close]"


@implementer(IHalfCloseableProtocol)
class _RawUpgradeServer(Protocol):
    """Answers an ``Upgrade: x-raw-echo`` request 101, then echoes raw bytes; on the client's
    EOF it writes ``EOF_SEEN`` and closes (so a half-close that is carried is visible). Told
    ``HALF_CLOSE`` it half-closes its own side instead of echoing. Each connection's end goes
    to ``lost``."""

    transport: Any  # TCP: loseConnection, write

    def __init__(self, heads: list[bytes], lost: defer.DeferredQueue[Any]) -> None:
        self.heads = heads
        self.lost = lost
        self.buffer = b""
        self.raw = False

    def dataReceived(self, data: bytes) -> None:
        if self.raw and data == HALF_CLOSE:
            self.transport.loseWriteConnection()
        elif self.raw:
            self.transport.write(data)
        if self.raw:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        self.heads.append(head)
        if b"upgrade: " + RAW_TOKEN in head.lower():
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                                 + RAW_TOKEN + b"\r\n\r\n")
            self.raw = True
            if rest:
                self.transport.write(rest)
        else:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self.transport.write(EOF_SEEN)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        return None

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.put(type(reason.value).__name__ if reason is not None else "?")  # not the Failure: it would errback


class RawUpgradeUpstream(Factory):
    """The factory of :class:`_RawUpgradeServer`; ``heads`` holds each request head it read,
    ``lost`` each connection's end (a DeferredQueue: ``lost.get()`` waits for the next)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.lost: defer.DeferredQueue[Any] = defer.DeferredQueue()

    def buildProtocol(self, addr: Any) -> Protocol:
        return _RawUpgradeServer(self.heads, self.lost)


@implementer(IHalfCloseableProtocol)
class RawClient(Protocol):
    """A raw TCP client on the reactor: writes what it is told, keeps what it reads;
    :meth:`when` fires once the bytes read satisfy a predicate, ``closed`` at the end."""

    transport: Any  # TCP: loseWriteConnection, abortConnection

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._waits: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def when(self, predicate: Callable[[bytes], bool], timeout: float = WAIT) -> defer.Deferred[bytes]:
        waiting: defer.Deferred[bytes] = defer.Deferred()
        self._waits.append((predicate, waiting))
        self._check()
        return waiting.addTimeout(timeout, reactor)

    def _check(self) -> None:
        for entry in list(self._waits):
            if entry[0](self.data):
                self._waits.remove(entry)
                entry[1].callback(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    abort_on_eof = False  # reset the connection (RST) on EOF instead of closing it (FIN)

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.abort_on_eof:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        return None

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.data)


@defer.inlineCallbacks
def raw_client(case: TestCase, base_url: str):  # type: ignore[no-untyped-def]
    """A connected :class:`RawClient` to ``base_url``'s port, aborted at cleanup if still open."""
    client = RawClient()
    port = int(base_url.rsplit(":", 1)[1])
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    case.addCleanup(lambda: client.transport.abortConnection() if not client.closed.called else None)
    return client
