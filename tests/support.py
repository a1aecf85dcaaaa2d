"""Real parts for integration tests: a redis-server of our own, the sample upstream, and
forwarder and proxy services configured from TOML files exactly as users write them.

Nothing on the end-to-end path is mocked: HTTP over loopback, pub/sub through Redis.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ppbridge import keys
from ppbridge.bus import RedisBus
from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.forwarder import ForwarderService
from ppbridge.proxy import ProxyService
from ppbridge.redis_server import RedisServer
from ppbridge.sampleapp import SampleApp, make_site
from ppbridge.scaffold import TomlValue, write_forwarder_config, write_proxy_config
from ppbridge.webface import BridgeSite

TEST_BITS = 2048  # tests make many keys; the product defaults to 3072
_KEY_CACHE: dict[str, Path] = {}
_KEY_DIR: list[str] = []


def key_pair(folder: Path, name: str) -> None:
    """Copy a cached key pair for ``name`` into ``folder/keys`` (generated once per run)."""
    if not _KEY_DIR:
        _KEY_DIR.append(tempfile.mkdtemp(prefix="ppbridge-test-keys-"))
    cache = Path(_KEY_DIR[0])
    if name not in _KEY_CACHE:
        keys.write_key_pair(name, cache, TEST_BITS)
        _KEY_CACHE[name] = cache
    target = folder / "keys"
    target.mkdir(exist_ok=True)
    for suffix in (".key", ".pub"):
        dest = target / f"{name}{suffix}"
        shutil.copyfile(cache / f"{name}{suffix}", dest)
        dest.chmod(0o600)


def temp_folder(case: TestCase) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="ppbridge-test-"))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def start_redis(case: TestCase, **kwargs: Any) -> RedisServer:
    """A private redis-server on a free port, killed after the test. No Redis fails setUp."""
    server = RedisServer(**kwargs)
    server.start()
    case.addCleanup(server.kill)
    return server


@defer.inlineCallbacks
def listen(case: TestCase, factory: Any, endpoint: Any = None):  # type: ignore[no-untyped-def]
    """Listen on a free loopback port (or on ``endpoint``, e.g. a TLS one); the base URL
    (``https://`` for a TLS endpoint). At cleanup the port closes and so does
    every connection it accepted that is still open (a server may legitimately keep one, e.g.
    lingering after an early answer), so no test leaves sockets or their timers behind."""
    accepted: list[Any] = []
    build = factory.buildProtocol

    def tracking(addr: Any) -> Any:
        protocol = build(addr)
        accepted.append(protocol)
        return protocol

    factory.buildProtocol = tracking
    endpoint = endpoint or TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1")
    port = yield endpoint.listen(factory)

    @defer.inlineCallbacks
    def close():  # type: ignore[no-untyped-def]
        yield port.stopListening()
        # twisted.web wraps its HTTPChannel; the transport sits on the channel inside.
        transports = [getattr(getattr(p, "_channel", p), "transport", None) for p in accepted]
        open_ = [t for t in transports if t is not None and t.connected]
        for transport in open_:
            transport.abortConnection()
        if open_:
            yield deferLater(reactor, 0, lambda: None)  # abortConnection completes next turn

    case.addCleanup(close)
    scheme = "https" if isinstance(endpoint, SSL4ServerEndpoint) else "http"
    return f"{scheme}://127.0.0.1:{port.getHost().port}"


class Stack:
    """One bridge for one test: Redis, a sample upstream, a forwarder, proxies."""

    def __init__(self, case: TestCase, **redis_options: Any) -> None:
        """``redis_options`` go to the stack's RedisServer (e.g. ``extra_args`` for a TLS port)."""
        self.case = case
        self.folder = temp_folder(case)
        self.redis = start_redis(case, **redis_options)
        self.redis_keys: dict[str, object] = {}  # [redis] keys added to every config, e.g. {"redis.ca_file": path}
        self.forwarders: list[ForwarderService] = []
        self.forwarder_urls: list[str] = []
        self.proxies: dict[str, ProxyService] = {}
        self.app: SampleApp | None = None
        self.upstream = ""
        key_pair(self.folder, "forwarder")

    @property
    def forwarder(self) -> ForwarderService:
        return self.forwarders[0]

    @property
    def url(self) -> str:
        return self.forwarder_urls[0]

    @defer.inlineCallbacks
    def start(self, routes: Mapping[str, Mapping[str, TomlValue]] | None = None,
              forwarder: Mapping[str, TomlValue] | None = None,
              proxy: Mapping[str, TomlValue] | None = None,
              rekey: Mapping[str, TomlValue] | None = None,
              upstreams: Mapping[str, str] | None = None,
              without: tuple[str, ...] = (),
              forwarder_redis: str | None = None,
              proxy_redis: str | None = None):  # type: ignore[no-untyped-def]
        """Start the upstream, one forwarder and one proxy per route (except ``without``),
        each calling ``upstreams[name]`` or the sample app; wait until all have keys.
        ``forwarder_redis``/``proxy_redis``: a Redis URL that side connects to instead of
        the stack's own (e.g. a hostile Redis in the middle of it)."""
        routes = routes or {"alpha": {"path_prefix": "/"}}
        site, self.app = make_site()
        self.upstream = yield listen(self.case, site)
        yield self.add_forwarder(routes, forwarder, redis_url=forwarder_redis)
        running = [name for name in routes if name not in without]
        for name in running:
            self.add_proxy(name, (upstreams or {}).get(name, self.upstream), proxy, rekey, redis_url=proxy_redis)
        yield self.ready(*running)
        return self

    @defer.inlineCallbacks
    def add_forwarder(self, routes: Mapping[str, Mapping[str, TomlValue]],
                      overrides: Mapping[str, TomlValue] | None = None,
                      redis_url: str | None = None):  # type: ignore[no-untyped-def]
        """A forwarder for ``routes``, on the stack's Redis or ``redis_url``."""
        for name in routes:
            key_pair(self.folder, name)
        settings = load_forwarder_config(self.forwarder_config(routes, overrides, redis_url), self.redis_keys)
        service = ForwarderService(settings, RedisBus(settings.redis, reactor), reactor)
        self.run(service)
        url = yield listen(self.case, BridgeSite(service))
        self.forwarders.append(service)
        self.forwarder_urls.append(url)
        return service

    def add_proxy(self, name: str, upstream: str, overrides: Mapping[str, TomlValue] | None = None,
                  rekey: Mapping[str, TomlValue] | None = None, redis_url: str | None = None) -> ProxyService:
        """A proxy process ``name`` calling ``upstream``, on the stack's Redis or ``redis_url``."""
        key_pair(self.folder, name)
        settings = load_proxy_config(self.proxy_config(name, upstream, overrides, rekey, redis_url), self.redis_keys)
        service = ProxyService(settings, RedisBus(settings.redis, reactor), reactor, reactor)
        self.run(service)
        self.proxies.setdefault(name, service)
        return service

    def forwarder_config(self, routes: Mapping[str, Mapping[str, TomlValue]],
                         overrides: Mapping[str, TomlValue] | None = None, redis_url: str | None = None) -> Path:
        """Write the next forwarder's config file (on the stack's Redis or ``redis_url``)."""
        # drain_timeout 0: a test's stopService ends what is in flight at once, unless it asks for a drain
        overrides = {"drain_timeout": 0, **(overrides or {})}
        return write_forwarder_config(self.folder, redis_url or self.redis.url, "tcp:0", routes, forwarder=overrides,
                                      name=f"forwarder{len(self.forwarders)}.toml")

    def proxy_config(self, name: str, upstream: str, overrides: Mapping[str, TomlValue] | None = None,
                     rekey: Mapping[str, TomlValue] | None = None, redis_url: str | None = None) -> Path:
        """Write proxy ``name``'s config file (drain_timeout 0 unless asked, as for forwarders)."""
        overrides = {"drain_timeout": 0, **(overrides or {})}
        return write_proxy_config(self.folder, name, redis_url or self.redis.url, upstream, settings=overrides,
                                  rekey=rekey)

    def run(self, service: Any) -> None:
        service.startService()
        self.case.addCleanup(lambda: service.stopService() if service.running else None)

    def ready(self, *names: str) -> defer.Deferred[Any]:
        """Fires when every forwarder holds a confirmed key for every named proxy."""
        waits = [f.wait_for_proxy(n) for f in self.forwarders for n in names]
        return defer.gatherResults(waits).addTimeout(15, reactor)


class Client:
    """A plain HTTP client (Agent on its own pool: no gzip, no cookie jar, no redirects)."""

    def __init__(self, case: TestCase) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 256
        self.agent = Agent(reactor, pool=self.pool)
        case.addCleanup(self.pool.closeCachedConnections)

    def request(self, method: bytes, url: str, headers: Mapping[bytes, list[bytes]] | None = None,
                body: Any = None) -> defer.Deferred[IResponse]:
        producer = None
        if body is not None:
            from twisted.web.client import FileBodyProducer
            import io

            producer = body if not isinstance(body, bytes) else FileBodyProducer(io.BytesIO(body))
        return self.agent.request(method, url.encode("ascii"), Headers(dict(headers or {})), producer)

    @defer.inlineCallbacks
    def fetch(self, method: bytes, url: str, headers: Mapping[bytes, list[bytes]] | None = None,
              body: Any = None):  # type: ignore[no-untyped-def]
        """(response, body bytes)."""
        response = yield self.request(method, url, headers, body)
        data = yield treq.content(response)
        return response, data

    @defer.inlineCallbacks
    def digest(self, url: str):  # type: ignore[no-untyped-def]
        """(response, sha256 hex, length) of a streamed download, never held in memory."""
        response = yield self.request(b"GET", url)
        h = hashlib.sha256()
        size = [0]

        def eat(data: bytes) -> None:
            h.update(data)
            size[0] += len(data)

        yield treq.collect(response, eat)
        return response, h.hexdigest(), size[0]


def error_of(response: IResponse) -> bytes | None:
    """The X-PPBridge-Error header of a response, if any."""
    values = response.headers.getRawHeaders(b"x-ppbridge-error")
    return values[0] if values else None


@defer.inlineCallbacks
def poll(predicate: Any, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Fires once ``predicate()`` is true, checked every ``interval`` s by a reactor delay (the
    state is in-process, with no event to await); fails naming ``what`` after ``timeout`` s."""
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        yield deferLater(reactor, interval, lambda: None)


def redis_client_list(admin: Any) -> list[dict[str, str]]:
    """CLIENT LIST of a RawRedisClient's server: each client's fields."""
    listing = admin.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return [dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            for line in listing.decode().splitlines()]


def redis_clients(admin: Any) -> dict[str, dict[str, str]]:
    """CLIENT LIST of a RawRedisClient's server, by client name (unnamed clients left out)."""
    return {fields["name"]: fields for fields in redis_client_list(admin) if fields.get("name")}


@defer.inlineCallbacks
def sequential_load(client: Client, url: str, running: list[bool], codes: list[int],
                    pause: float = 0.02):  # type: ignore[no-untyped-def]
    """GET ``url`` one request after the other (``pause`` seconds between, a reactor delay)
    while ``running[0]``; each status goes to ``codes``. No request may take over 30 s."""
    from twisted.internet.task import deferLater

    n = 0
    while running[0]:
        response, _ = yield client.fetch(b"GET", f"{url}?n={n}").addTimeout(30, reactor)
        codes.append(response.code)
        n += 1
        yield deferLater(reactor, pause, lambda: None)
