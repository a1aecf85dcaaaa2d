"""Reload on SIGHUP (issue 9, item 2): a running forwarder or proxy re-reads its config file.

Unit tests call ``reload(settings)`` on services over the in-memory bus (real HTTP on
loopback, configs written and loaded as the taps do); two child-process tests send SIGHUP to
the installed ``twistd -n ppforwarder`` and ``twistd -n ppproxy`` (see tests/processes.py and
tests/test_faults.py).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.forwarder import ForwarderService
from ppbridge.memorybus import MemoryBroker
from ppbridge.proxy import ProxyService
from ppbridge.reload import ReloadOnHangup
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from ppbridge.webface import BridgeSite
from tests.processes import TWISTD, spawn
from tests.support import Client, error_of, key_pair, listen, poll, sequential_load, temp_folder
from tests.test_faults import (
    CONFIRMED,
    PROXY_STARTED,
    REQUEST_LIMIT,
    ROUTES,
    ChildBridge,
    assert_alive,
    assert_clean,
)

REDIS_URL = "redis://127.0.0.1:9/0"  # never contacted: the bus is in memory
TWO_ROUTES = {"alpha": {"path_prefix": "/"}, "c": {"path_prefix": "/c"}}


class Logged:
    """The log events emitted while a test runs (text and level)."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(e) for e in self.events if level is None or e.get("log_level") == level]


class MemoryStack:
    """A forwarder and proxies over one MemoryBroker, on the real reactor, each upstream a
    sample app on loopback; the forwarder's config is a file the test rewrites."""

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.folder = temp_folder(case)
        self.broker = MemoryBroker()
        self.apps: dict[str, Any] = {}
        self.upstreams: dict[str, str] = {}
        self.proxies: dict[str, ProxyService] = {}
        key_pair(self.folder, "forwarder")

    @defer.inlineCallbacks
    def upstream(self, label: str):  # type: ignore[no-untyped-def]
        site, self.apps[label] = make_site()
        self.upstreams[label] = yield listen(self.case, site)
        return self.upstreams[label]

    def forwarder_config(self, routes: dict[str, dict[str, Any]]) -> Any:
        for name in routes:
            key_pair(self.folder, name)
        return write_forwarder_config(self.folder, REDIS_URL, "tcp:0", routes, forwarder={"drain_timeout": 0})

    @defer.inlineCallbacks
    def start_forwarder(self, routes: dict[str, dict[str, Any]]):  # type: ignore[no-untyped-def]
        self.fconf = self.forwarder_config(routes)
        self.forwarder = ForwarderService(load_forwarder_config(self.fconf), self.broker.client(), reactor)
        self._run(self.forwarder)
        self.url = yield listen(self.case, BridgeSite(self.forwarder))
        return self.forwarder

    def start_proxy(self, name: str, upstream: str) -> ProxyService:
        key_pair(self.folder, name)
        settings = load_proxy_config(write_proxy_config(self.folder, name, REDIS_URL, upstream,
                                                        settings={"drain_timeout": 0}))
        service = ProxyService(settings, self.broker.client(), reactor, reactor)
        self._run(service)
        self.proxies[name] = service
        return service

    def _run(self, service: Any) -> None:
        service.startService()
        self.case.addCleanup(lambda: service.stopService() if service.running else None)

    def keyed(self, name: str) -> defer.Deferred[Any]:
        return poll(lambda: bool(self.forwarder.candidates(name)), 10, f"proxy {name} keyed")


class ForwarderReload(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_new_route_served_after_reload(self):
        """A forwarder started with alpha alone sends /c/echo to alpha (prefix "/"); after
        its file gains ``[proxies.c]`` (prefix /c) and ``reload`` runs, proxy c (started
        meanwhile, refused before as unknown) negotiates and /c/echo reaches c's upstream,
        while /echo still reaches alpha's; "reloaded <file>: proxies (proxies added: c; ...)"
        is logged."""
        stack = MemoryStack(self)
        logged = Logged(self)
        alpha_url, c_url = (yield stack.upstream("alpha")), (yield stack.upstream("c"))
        forwarder = yield stack.start_forwarder(ROUTES)
        stack.start_proxy("alpha", alpha_url)
        yield stack.keyed("alpha")
        stack.start_proxy("c", c_url)
        client = Client(self)
        yield client.fetch(b"GET", stack.url + "/c/echo")  # alpha's app has no /c/echo: its 404
        self.assertEqual((stack.apps["alpha"].hits["/c/echo"], stack.apps["c"].hits["/echo"]), (1, 0))

        forwarder.reload(load_forwarder_config(stack.forwarder_config(TWO_ROUTES)))
        yield stack.keyed("c")
        response, _ = yield client.fetch(b"GET", stack.url + "/c/echo")
        self.assertEqual((response.code, stack.apps["c"].hits["/echo"]), (200, 1))
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, stack.apps["alpha"].hits["/echo"]), (200, 1))
        reloaded = [line for line in logged.lines(LogLevel.info) if line.startswith("reloaded ")]
        self.assertEqual(reloaded, [f"reloaded {stack.fconf}: proxies (proxies added: c; removed: none)"])

    @defer.inlineCallbacks
    def test_removed_proxy_no_longer_routed(self):
        """Routes alpha (/a) and c (/c), both keyed; the file loses ``[proxies.c]`` and
        ``reload`` runs: /c/echo is answered 404 no-route and never reaches c's upstream,
        /a/echo still reaches alpha's, and c is gone from /status, from the instances and
        from the key map (its next key request would be refused as unknown)."""
        stack = MemoryStack(self)
        alpha_url, c_url = (yield stack.upstream("alpha")), (yield stack.upstream("c"))
        routes = {"alpha": {"path_prefix": "/a"}, "c": {"path_prefix": "/c"}}
        forwarder = yield stack.start_forwarder(routes)
        stack.start_proxy("alpha", alpha_url)
        stack.start_proxy("c", c_url)
        yield stack.keyed("alpha")
        yield stack.keyed("c")

        forwarder.reload(load_forwarder_config(stack.forwarder_config({"alpha": {"path_prefix": "/a"}})))
        client = Client(self)
        response, _ = yield client.fetch(b"GET", stack.url + "/c/echo")
        self.assertEqual((response.code, error_of(response)), (404, b"no-route"))
        self.assertEqual(stack.apps["c"].hits["/echo"], 0)
        response, _ = yield client.fetch(b"GET", stack.url + "/a/echo")
        self.assertEqual((response.code, stack.apps["alpha"].hits["/echo"]), (200, 1))
        self.assertEqual(list(forwarder.status()["proxies"]), ["alpha"])
        self.assertNotIn("c", forwarder.negotiator._proxy_keys)
        self.assertNotIn("c", forwarder.instances)

    @defer.inlineCallbacks
    def test_restart_only_keys_keep_their_value_with_a_warning(self):
        """A reload whose file changes ``listen`` and ``announce_interval`` and the request
        timeout: the timeout is applied, the two restart-only keys keep their old values and
        each is named in a warning."""
        stack = MemoryStack(self)
        logged = Logged(self)
        forwarder = yield stack.start_forwarder(ROUTES)
        old = forwarder.settings
        path = write_forwarder_config(stack.folder, REDIS_URL, "tcp:1234", ROUTES,
                                      forwarder={"drain_timeout": 0, "announce_interval": 5, "request_timeout": 7})
        forwarder.reload(load_forwarder_config(path))
        self.assertEqual((forwarder.settings.listen, forwarder.settings.announce_interval),
                         (old.listen, old.announce_interval))
        self.assertEqual(forwarder.settings.request_timeout, 7)
        warned = logged.lines(LogLevel.warn)
        for key in ("listen", "announce_interval"):
            self.assertEqual(len([w for w in warned if f": {key} changed; it needs a restart" in w]), 1, warned)
        self.assertIn(f"reloaded {path}: request_timeout", logged.lines(LogLevel.info))


class ProxyReload(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_proxy_follows_a_new_upstream(self):
        """The proxy's file names a second upstream and ``reload`` runs: the next request is
        answered by the new upstream, the old one sees no more requests."""
        stack = MemoryStack(self)
        old_url, new_url = (yield stack.upstream("old")), (yield stack.upstream("new"))
        yield stack.start_forwarder(ROUTES)
        proxy = stack.start_proxy("alpha", old_url)
        yield stack.keyed("alpha")
        client = Client(self)
        response, _ = yield client.fetch(b"GET", stack.url + "/echo")
        self.assertEqual((response.code, stack.apps["old"].hits["/echo"]), (200, 1))

        proxy.reload(load_proxy_config(write_proxy_config(stack.folder, "alpha", REDIS_URL, new_url,
                                                          settings={"drain_timeout": 0, "upstream_timeout": 9},
                                                          rekey={"mode": "adaptive"})))
        self.assertEqual((proxy.settings.upstream_timeout, proxy.settings.rekey.mode), (9, "adaptive"))
        self.assertTrue(type(proxy.schedule.policy).__name__.lower().startswith("adaptive"), proxy.schedule.policy)
        for _ in range(2):
            response, _ = yield client.fetch(b"GET", stack.url + "/echo")
            self.assertEqual(response.code, 200)
        self.assertEqual((stack.apps["old"].hits["/echo"], stack.apps["new"].hits["/echo"]), (1, 2))


class HangupHandler(TestCase):
    def test_bad_config_refused_with_one_line(self):
        """``ReloadOnHangup.reload`` with a file that does not load: one error line (the
        config error's one line, naming file and key), and the service's apply is never
        called; with a good file, apply gets the loaded settings."""
        folder = temp_folder(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        path = write_forwarder_config(folder, REDIS_URL, "tcp:0", ROUTES)
        applied: list[Any] = []
        hangup = ReloadOnHangup(str(path), lambda: load_forwarder_config(path), applied.append, reactor)
        logged = Logged(self)
        path.write_text(path.read_text() + "\n[proxies.c]\npath_prefix = 7\n")
        hangup.reload()
        errors = logged.lines(LogLevel.error) + logged.lines(LogLevel.critical)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(str(path), errors[0])
        self.assertIn("proxies.c", errors[0])
        self.assertEqual(applied, [])
        write_forwarder_config(folder, REDIS_URL, "tcp:0", ROUTES)
        hangup.reload()
        self.assertEqual([s.source for s in applied], [path])


class ChildReload(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_sighup_adds_a_route_and_refuses_a_broken_file(self):
        """A ``twistd -n ppforwarder`` child routing alpha only; a ppproxy child for c runs
        (its key requests refused). ``[proxies.c]`` is written into the forwarder's file and
        SIGHUP sent: the same process logs "reloaded", c's key is confirmed and /c/echo is
        answered by c's upstream, while GETs to alpha under light load all succeed. Then a
        broken file and SIGHUP: one error line naming the file, key and problem; the same
        process still serves alpha and c; neither printed a traceback."""
        bridge = yield ChildBridge(self).start()
        pid = bridge.forwarder.transport.pid
        key_pair(bridge.folder, "c")
        site, c_app = make_site()
        c_upstream = yield listen(self, site)
        cconf = write_proxy_config(bridge.folder, "c", bridge.redis.url, c_upstream)
        c_proxy = spawn(self, bridge.run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(cconf)], "c")
        yield c_proxy.wait_for(r"calling ")
        client = Client(self)
        running, codes = [True], []
        load = sequential_load(client, bridge.url + "/echo", running, codes, pause=0.05)

        text = bridge.fconf.read_text()
        bridge.fconf.write_text(text + '\n[proxies.c]\npublic_key = "keys/c.pub"\npath_prefix = "/c"\n')
        bridge.forwarder.signal("HUP")
        yield bridge.forwarder.wait_for(r"reloaded .*forwarder\.toml: proxies \(proxies added: c; removed: none\)",
                                        timeout=10)
        yield bridge.forwarder.wait_for(r"proxy c \(instance [0-9a-f]+\) confirmed key", timeout=30)
        response, _ = yield client.fetch(b"GET", bridge.url + "/c/echo").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual((response.code, c_app.hits["/echo"]), (200, 1))
        yield task.deferLater(reactor, 1.0, lambda: None)

        bridge.fconf.write_text(text + '\n[proxies.c]\npublic_key = "keys/c.pub"\npath_prefix = 7\n')
        bridge.forwarder.signal("HUP")
        refused = yield bridge.forwarder.wait_for(r"reload refused", timeout=10)
        yield task.deferLater(reactor, 1.0, lambda: None)
        running[0] = False
        yield load
        self.assertTrue(codes, "no request under load completed")
        self.assertEqual(set(codes), {200}, f"{len(codes)} requests: {codes}")
        line = refused.string
        self.assertIn(str(bridge.fconf), line)
        self.assertIn("proxies.c.path_prefix", line)
        self.assertEqual(len([x for x in bridge.forwarder.lines[1] if "reload refused" in x]), 1)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual(response.code, 200)
        response, _ = yield client.fetch(b"GET", bridge.url + "/c/echo").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual((response.code, c_app.hits["/echo"]), (200, 2))
        assert_alive(self, bridge.forwarder, pid)
        self.assertFalse(re.search("Traceback", c_proxy.text()), c_proxy.describe())

    @defer.inlineCallbacks
    def test_proxy_sighup_follows_a_new_upstream_and_refuses_a_broken_file(self):
        """A ``twistd -n ppproxy`` child calling one sample app; its file is rewritten with a
        second sample app as ``upstream`` and SIGHUP sent: it logs "reloaded <file>: upstream"
        and the next two GETs are answered 200 by the new app, none more by the old. Then a
        file with an ftp:// upstream and SIGHUP: exactly one "reload refused" line, naming the
        file and proxy.upstream; the next GET is still answered by the new app. Throughout, the
        same process (pid) and the same instance (the only one the forwarder ever confirmed),
        and no traceback from either child."""
        bridge = yield ChildBridge(self).start()
        pid = bridge.proxy.transport.pid
        instance = (yield bridge.proxy.wait_for(PROXY_STARTED, timeout=1)).group(1)
        site, new_app = make_site()
        new_upstream = yield listen(self, site)
        client = Client(self)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual((response.code, bridge.app.hits["/echo"]), (200, 1))

        write_proxy_config(bridge.folder, "alpha", bridge.redis.url, new_upstream)
        bridge.proxy.signal("HUP")
        yield bridge.proxy.wait_for(r"reloaded .*alpha\.toml: upstream$", timeout=10)
        for _ in range(2):
            response, _ = yield client.fetch(b"GET", bridge.url + "/echo").addTimeout(REQUEST_LIMIT, reactor)
            self.assertEqual(response.code, 200)
        self.assertEqual((bridge.app.hits["/echo"], new_app.hits["/echo"]), (1, 2))

        write_proxy_config(bridge.folder, "alpha", bridge.redis.url, "ftp://127.0.0.1:1/")
        bridge.proxy.signal("HUP")
        refused = yield bridge.proxy.wait_for(r"reload refused", timeout=10)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual((response.code, bridge.app.hits["/echo"], new_app.hits["/echo"]), (200, 1, 3))
        self.assertIn(str(bridge.pconf), refused.string)
        self.assertIn("proxy.upstream", refused.string)
        self.assertEqual(len([x for x in bridge.proxy.lines[1] if "reload refused" in x]), 1)
        assert_alive(self, bridge.proxy, pid)
        confirmed = {m.group(1) for m in map(re.compile(CONFIRMED).search, bridge.forwarder.lines[1]) if m}
        self.assertEqual(confirmed, {instance})
        assert_clean(self, bridge.forwarder)
