"""The bridge survives its world: Redis, the forwarder and the proxy killed (SIGKILL) and
restarted, and Redis refusing the services' password for a while.

The killed programs run as they do in production: ``twistd -n ppforwarder`` / ``twistd -n
ppproxy`` child processes (see tests/processes.py), configured from TOML files; the upstream is
the sample app in the test process. Waits are for lines the children print, for Deferreds, or
short reactor-delay polls with hard deadlines.

What is asserted is outcomes: the status and cause of each failed request, being served
again, no process restarted, no traceback in a child's output. Time bounds appear only where
the bound is the behaviour ("fails fast rather than hanging", "served again at all"), and are
at least ten times what it takes; how long recovery takes is logged (a benchmark figure).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from ppbridge.bus import RedisBus
from ppbridge.config import load_forwarder_config, load_proxy_config
from ppbridge.forwarder import ForwarderService
from ppbridge.proxy import ProxyService
from ppbridge.redis_server import free_port
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import TomlValue, write_forwarder_config, write_proxy_config
from ppbridge.webface import BridgeSite
from tests.processes import TWISTD, Child, spawn
from tests.redisclient import RawRedisClient
from tests.support import Client, error_of, key_pair, listen, poll, redis_client_list, start_redis, temp_folder

ROUTES = {"alpha": {"path_prefix": "/"}}
REQUEST_TIMEOUT = 60.0  # the forwarder's request_timeout here: what a request waiting on Redis would hit
# "Fails fast rather than hanging": answered well before request_timeout. A failure takes
# milliseconds (a reset loopback connection, or a check before anything is sent), so this is
# far more than ten times that, and a quarter of what a hanging request would take.
FAIL_FAST = REQUEST_TIMEOUT / 4
# "Served again at all" after a restart: give up after this. Reconnecting (backoff up to 2 s
# with jitter) and negotiating a key take a few seconds; this is more than ten times that.
SERVED_AGAIN = 60.0
# The same after refused AUTHs: the bus watchdog retries every 5 s, so about 5 to 10 s.
SERVED_AGAIN_AFTER_AUTH = 100.0
REQUEST_LIMIT = 90.0  # no single request of these tests waits longer (above REQUEST_TIMEOUT)
# The causes a request may be answered with while Redis is gone, by status (ppbridge/errors.py):
# 502 the link dropped with the request in flight; 503 the forwarder is not connected, or it
# is again but no proxy holds a key yet.
REDIS_DOWN_CAUSES = {502: {b"redis-connection-lost"}, 503: {b"redis-unavailable", b"proxy-unavailable"}}
CONFIRMED = r"proxy alpha \(instance ([0-9a-f]+)\) confirmed key"
PROXY_KEYED = r"key \S+ from forwarder"
PROXY_STARTED = r"proxy alpha \(instance ([0-9a-f]+)\) calling"
FORWARDER_STARTED = r"forwarder ([0-9a-f]+) serving proxies"
LISTENING = r"(Bridge)?Site starting on {port}\b"
log = Logger()  # timings go to the test log (_trial_temp/test.log under trial)


def elapsed_since(start: float) -> float:
    return reactor.seconds() - start


@defer.inlineCallbacks
def first_success(client: Client, url: str, give_up: float,  # type: ignore[no-untyped-def]
                  context: Callable[[], str] = lambda: "", each_within: float = REQUEST_LIMIT):
    """GET ``url`` until it answers 200 (a short reactor delay between tries); the seconds that
    took and the (status, error) of every failed try. Fails after ``give_up`` seconds, or when
    a try is not answered within ``each_within`` seconds, saying ``context()`` too (the child
    processes' last lines, where there are children)."""
    start = reactor.seconds()
    failed: list[tuple[int, bytes | None]] = []
    while True:
        try:
            response, body = yield client.fetch(b"GET", url).addTimeout(each_within, reactor)
        except defer.TimeoutError:
            raise AssertionError(f"a try at {url} was not answered within {each_within} s (tries before it:"
                                 f" {failed[-5:]})\n{context()}") from None
        if response.code == 200:
            log.info("first 200 from {url} after {took:.2f} s and {n} failed tries", url=url,
                     took=elapsed_since(start), n=len(failed))
            return elapsed_since(start), failed
        failed.append((response.code, error_of(response)))
        if elapsed_since(start) > give_up:
            raise AssertionError(f"no 200 from {url} in {give_up} s; last answers {failed[-5:]}\n{context()}")
        yield task.deferLater(reactor, 0.05, lambda: None)


class ChildBridge:
    """A private Redis, the sample upstream, and ``twistd -n`` forwarder and proxy children from
    configs in one folder; the forwarder listens on a fixed port, so a restart reuses it."""

    def __init__(self, case: TestCase, forwarder: Mapping[str, TomlValue] | None = None, admin: bool = False) -> None:
        self.case = case
        self.folder = temp_folder(case)
        self.run_dir = temp_folder(case)  # cwd of the children: neither the repo nor the configs
        self.redis = start_redis(case)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{free_port()}" if admin else ""
        self.overrides = forwarder
        self.forwarder: Child | None = None
        self.proxy: Child | None = None

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        """Upstream, configs, both children; fires once the key is confirmed on both sides."""
        site, self.app = make_site()
        upstream = yield listen(self.case, site)
        admin = "tcp:%s:interface=127.0.0.1" % self.admin_url.rsplit(":", 1)[1] if self.admin_url else ""
        self.fconf = write_forwarder_config(self.folder, self.redis.url, f"tcp:{self.port}:interface=127.0.0.1",
                                            ROUTES, admin=admin, forwarder=self.overrides)
        self.pconf = write_proxy_config(self.folder, "alpha", self.redis.url, upstream)
        self.forwarder = self.spawn_forwarder()
        self.proxy = self.spawn_proxy()
        yield self.both(self.forwarder.wait_for(CONFIRMED), self.proxy.wait_for(PROXY_KEYED))
        return self

    @staticmethod
    def both(*waits: defer.Deferred[Any]) -> defer.Deferred[Any]:
        return defer.gatherResults(list(waits), consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def spawn_forwarder(self) -> Child:
        return spawn(self.case, self.run_dir, [TWISTD, "-n", "--pidfile=", "ppforwarder", "--config", str(self.fconf)],
                     "forwarder")

    def spawn_proxy(self) -> Child:
        return spawn(self.case, self.run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(self.pconf)],
                     "proxy")

    @defer.inlineCallbacks
    def kill(self, child: Child):  # type: ignore[no-untyped-def]
        """SIGKILL and wait until reaped."""
        child.signal("KILL")
        yield child.wait_end()

    def describe(self) -> str:
        return "\n".join(c.describe() for c in (self.forwarder, self.proxy) if c is not None)


def assert_clean(case: TestCase, child: Child) -> None:
    """``child`` has printed no traceback and no "Unhandled error in Deferred" (see
    ``Child.failures``)."""
    failures = child.failures()
    case.assertFalse(failures, f"{child.name} printed {len(failures)} failure(s):\n" + "\n---\n".join(failures))


def assert_alive(case: TestCase, child: Child, pid: int) -> None:
    """``child`` is the same process as before (same pid), still running, and has printed no
    traceback and no unhandled error."""
    case.assertFalse(child.ended, child.describe())
    case.assertEqual(child.transport.pid, pid, child.describe())
    assert_clean(case, child)


def assert_redis_down_answer(case: TestCase, response: Any, body: bytes, what: str) -> None:
    """A request Redis's absence failed: 502 or 503, with a cause that belongs to that status
    and to a missing Redis (``REDIS_DOWN_CAUSES``)."""
    cause = error_of(response)
    case.assertIn(response.code, REDIS_DOWN_CAUSES, f"{what}: {response.code} {cause!r} {body[:200]!r}")
    case.assertIn(cause, REDIS_DOWN_CAUSES[response.code], f"{what}: {response.code} with cause {cause!r}")


class RedisRestart(TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_redis_killed_and_restarted(self):
        """Redis SIGKILLed: a request in flight (GET /hang, request_timeout 60 s) and three
        requests while it is down are each answered 502 redis-connection-lost or 503
        redis-unavailable / proxy-unavailable, each within 15 s (fails fast rather than
        waiting for request_timeout; see FAIL_FAST); once Redis is back on the same port,
        traffic is served again (a GET, then a 100 kB POST), by the same two processes,
        neither of which printed a traceback; each try meanwhile is answered within 15 s too,
        never left to request_timeout (a proxy whose publisher came back after its subscriber
        did once let a GET wait 60 s for a 504). (How soon it is served again is logged.)"""
        bridge = yield ChildBridge(self, forwarder={"request_timeout": REQUEST_TIMEOUT}).start()
        pids = {c.name: c.transport.pid for c in (bridge.forwarder, bridge.proxy)}
        client = Client(self)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo?before")
        self.assertEqual(response.code, 200)

        in_flight = client.fetch(b"GET", bridge.url + "/hang").addTimeout(REQUEST_LIMIT + 10, reactor)
        yield poll(lambda: bridge.app.hits["/hang"] == 1, 10, "the /hang request reaching the upstream")
        killed_at = reactor.seconds()
        bridge.redis.kill()
        response, body = yield in_flight
        took = elapsed_since(killed_at)
        log.info("request in flight answered {code} {took:.2f} s after Redis died", code=response.code, took=took)
        assert_redis_down_answer(self, response, body, "the request in flight")
        self.assertLess(took, FAIL_FAST, f"the request in flight took {took:.1f} s to fail")

        for i in range(3):
            start = reactor.seconds()
            response, body = yield client.fetch(b"GET", f"{bridge.url}/echo?down={i}").addTimeout(REQUEST_LIMIT,
                                                                                                  reactor)
            took = elapsed_since(start)
            assert_redis_down_answer(self, response, body, f"request {i} while Redis is down")
            self.assertLess(took, FAIL_FAST, f"request {i} while Redis is down took {took:.1f} s")

        bridge.redis.restart()
        took, failed = yield first_success(client, bridge.url + "/echo?after", SERVED_AGAIN, bridge.describe,
                                           each_within=FAIL_FAST)
        for code, cause in failed:  # the tries before Redis was fully back: still only its causes
            self.assertIn(cause, REDIS_DOWN_CAUSES.get(code, set()), f"a try meanwhile got {code} {cause!r}")
        response, _ = yield client.fetch(b"POST", bridge.url + "/echo?again", body=b"x" * 100_000)
        self.assertEqual(response.code, 200)
        for child in (bridge.forwarder, bridge.proxy):
            assert_alive(self, child, pids[child.name])


def local_ports_to(pid: int, port: int) -> set[int]:
    """The local ports of process ``pid``'s TCP connections to 127.0.0.1:``port`` (its sockets,
    from /proc/PID/fd, matched by inode against /proc/PID/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and remote == f"0100007F:{port:04X}":
                found.add(int(local.split(":")[1], 16))
    return found


class ProxyLinkDrop(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_proxy_publisher_dropped_mid_request(self):
        """The proxy process's publisher connection killed (CLIENT KILL ID, found by the
        process's own sockets) while GET /hang waits on the upstream, the forwarder's
        connections untouched: the client is answered 502 redis-connection-lost within 15 s
        (FAIL_FAST; it used to wait for request_timeout, 60 s, and get 504), the next request
        is served, and both processes are the same ones, with no traceback printed."""
        bridge = yield ChildBridge(self, forwarder={"request_timeout": REQUEST_TIMEOUT}).start()
        pids = {c.name: c.transport.pid for c in (bridge.forwarder, bridge.proxy)}
        client = Client(self)
        in_flight = client.fetch(b"GET", bridge.url + "/hang").addTimeout(REQUEST_LIMIT, reactor)
        yield poll(lambda: bridge.app.hits["/hang"] == 1, 10, "the /hang request reaching the upstream")
        admin = RawRedisClient("127.0.0.1", bridge.redis.port)
        self.addCleanup(admin.close)
        ports = local_ports_to(pids["proxy"], bridge.redis.port)
        [publisher] = [c for c in redis_client_list(admin)
                       if c["name"] == "ppbridge-publisher" and int(c["addr"].rsplit(":", 1)[1]) in ports]
        killed_at = reactor.seconds()
        self.assertEqual(admin.command("CLIENT", "KILL", "ID", publisher["id"]), 1)
        response, body = yield in_flight
        took = elapsed_since(killed_at)
        self.assertEqual((response.code, error_of(response)), (502, b"redis-connection-lost"), body)
        self.assertLess(took, FAIL_FAST, f"the request in flight took {took:.1f} s to fail")
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo?after")
        self.assertEqual(response.code, 200)
        for child in (bridge.forwarder, bridge.proxy):
            assert_alive(self, child, pids[child.name])


class ForwarderRestart(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_forwarder_killed_and_restarted(self):
        """The forwarder SIGKILLed and started again (a new process, same config): once the new
        process listens, requests are served again (give-up after 60 s, SERVED_AGAIN), because
        the proxy learnt of it from its announcement and renegotiated by itself (its log says
        so for the new forwarder's id, whose log shows the key confirmed); the proxy process
        is the same one, and neither it nor the new forwarder printed a traceback."""
        bridge = yield ChildBridge(self).start()
        proxy_pid = bridge.proxy.transport.pid
        client = Client(self)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo?before")
        self.assertEqual(response.code, 200)
        yield client.pool.closeCachedConnections()

        yield bridge.kill(bridge.forwarder)
        new = bridge.forwarder = bridge.spawn_forwarder()
        yield new.wait_for(LISTENING.format(port=bridge.port))
        yield first_success(Client(self), bridge.url + "/echo?after", SERVED_AGAIN, bridge.describe)
        # Served: so these lines are printed already (the waits return what was seen).
        forwarder_id = (yield new.wait_for(FORWARDER_STARTED, timeout=1)).group(1)
        yield bridge.proxy.wait_for(rf"forwarder {forwarder_id} announced itself; negotiating", timeout=1)
        yield new.wait_for(CONFIRMED, timeout=1)
        assert_alive(self, bridge.proxy, proxy_pid)
        assert_clean(self, new)


class ProxyRestart(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_proxy_killed_and_restarted_replaces_the_dead_instance(self):
        """The proxy SIGKILLed and started again while a raw client holds PSUBSCRIBE * (so every
        PUBLISH has a receiver): the forwarder confirms the new instance's key (give-up after
        60 s, SERVED_AGAIN), and from that moment no request fails (none goes to the dead
        instance, which would time out): 40 requests, 20 at once then 20 in a row, all 200;
        /status then lists only the new instance; the forwarder is the same process and
        neither it nor the new proxy printed a traceback."""
        bridge = ChildBridge(self, forwarder={"request_timeout": 5.0}, admin=True)
        onlooker = RawRedisClient("127.0.0.1", bridge.redis.port)
        self.addCleanup(onlooker.close)
        onlooker.psubscribe(b"*")
        yield bridge.start()
        forwarder_pid = bridge.forwarder.transport.pid
        old = (yield bridge.forwarder.wait_for(CONFIRMED, timeout=1)).group(1)
        client = Client(self)
        response, _ = yield client.fetch(b"GET", bridge.url + "/echo?before")
        self.assertEqual(response.code, 200)

        yield bridge.kill(bridge.proxy)
        new = bridge.proxy = bridge.spawn_proxy()
        instance = (yield new.wait_for(PROXY_STARTED)).group(1)
        started_at = reactor.seconds()
        self.assertNotEqual(instance, old)
        yield bridge.forwarder.wait_for(CONFIRMED.replace("[0-9a-f]+", instance), timeout=SERVED_AGAIN)
        log.info("new proxy instance confirmed {took:.2f} s after it started", took=elapsed_since(started_at))

        # From here on, every request must be served by the new instance.
        answers: list[tuple[int, bytes | None, float]] = []

        @defer.inlineCallbacks
        def one(i: int):  # type: ignore[no-untyped-def]
            response, body = yield client.fetch(b"POST", f"{bridge.url}/echo?n={i}", body=b"%d" % i).addTimeout(
                REQUEST_LIMIT, reactor)
            answers.append((response.code, error_of(response), elapsed_since(started_at)))

        yield defer.gatherResults([one(i) for i in range(20)], consumeErrors=True)
        for i in range(20, 40):
            yield one(i)
        failures = [a for a in answers if a[0] != 200]
        self.assertEqual(len(failures), 0, f"{len(failures)} of {len(answers)} requests failed after the new instance"
                         f" was confirmed (status, cause, s since it started): {failures[:5]}\n{bridge.describe()}")

        @defer.inlineCallbacks
        def instances():  # type: ignore[no-untyped-def]
            response, body = yield client.fetch(b"GET", bridge.admin_url + "/status").addTimeout(10, reactor)
            self.assertEqual(response.code, 200)
            return [i["instance"] for i in json.loads(body)["proxies"]["alpha"]["instances"]]

        listed = yield instances()
        self.assertEqual(listed, [instance])
        assert_alive(self, bridge.forwarder, forwarder_pid)
        assert_clean(self, new)


def with_password_file(config: Path, password_file: Path) -> Path:
    """The config with ``[redis] password_file`` added."""
    text = config.read_text()
    if "[redis]\n" not in text:
        raise AssertionError(f"no [redis] table in {config}")
    config.write_text(text.replace("[redis]\n", f"[redis]\npassword_file = {json.dumps(str(password_file))}\n", 1))
    return config


def auth_failures(admin: RawRedisClient) -> int:
    """Failed AUTH attempts Redis recorded (ACL LOG entries with reason "auth", by count)."""
    total = 0
    for entry in admin.command("ACL", "LOG", "128"):  # type: ignore[union-attr]
        fields = dict(zip(entry[::2], entry[1::2]))
        if fields.get(b"reason") == b"auth":
            total += int(fields[b"count"])
    return total


class WrongPassword(TestCase):
    """Reconnects refused by AUTH must not stop reconnecting for good (txredisapi gives up
    after one failed AUTH; the bus watchdog must take over). In-process services here."""

    timeout = 300
    RIGHT, WRONG = "right-password-1", "other-password-2"

    def collect_refusals(self) -> None:
        """Cleanup, run last: collect the Deferreds that this test's refused AUTHs left failed
        and unhandled, and flush their reports, so they land here and not in whichever later test
        the garbage collector happens to run in (test_refused_auth_leaves_no_unhandled_error is
        the test that states that bug). Any other logged ValueError still fails the test."""
        gc.collect()
        others = [f for f in self.flushLoggedErrors(ValueError) if "could not auth" not in f.getErrorMessage()]
        self.assertEqual(others, [])

    @defer.inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.addCleanup(self.collect_refusals)
        self.redis = start_redis(self, password=self.RIGHT)
        folder = temp_folder(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        secret = folder / "redis.password"
        secret.write_text(self.RIGHT + "\n")
        secret.chmod(0o600)
        site, _ = make_site()
        upstream = yield listen(self, site)
        fsettings = load_forwarder_config(with_password_file(
            write_forwarder_config(folder, self.redis.url, "tcp:0", ROUTES,
                                   forwarder={"request_timeout": REQUEST_TIMEOUT}), secret))
        psettings = load_proxy_config(with_password_file(
            write_proxy_config(folder, "alpha", self.redis.url, upstream), secret))
        self.assertEqual((fsettings.redis.password, psettings.redis.password), (self.RIGHT, self.RIGHT))
        self.forwarder = ForwarderService(fsettings, RedisBus(fsettings.redis, reactor), reactor)
        self.proxy = ProxyService(psettings, RedisBus(psettings.redis, reactor), reactor, reactor)
        for service in (self.forwarder, self.proxy):
            service.startService()
            self.addCleanup(service.stopService)
        self.url = yield listen(self, BridgeSite(self.forwarder))
        yield self.forwarder.wait_for_proxy("alpha").addTimeout(15, reactor)
        self.client = Client(self)
        response, _ = yield self.client.fetch(b"GET", self.url + "/echo?before")
        self.assertEqual(response.code, 200)

    def admin(self, password: str) -> RawRedisClient:
        client = RawRedisClient("127.0.0.1", self.redis.port, password)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def refused_for_a_while(self, admin: RawRedisClient):  # type: ignore[no-untyped-def]
        """Both services disconnected; a request gets 503 redis-unavailable within FAIL_FAST
        (15 s, a quarter of request_timeout: it fails fast rather than waiting); reconnects are
        refused by AUTH over more than one watchdog period (at least 8 refusals: more than one
        round of their 6 connections), and the services stay disconnected."""
        buses = (self.forwarder.bus, self.proxy.bus)
        yield poll(lambda: not any(b.connected for b in buses), 10, "both services losing Redis")
        start = reactor.seconds()
        response, _ = yield self.client.fetch(b"GET", self.url + "/echo?refused").addTimeout(REQUEST_LIMIT, reactor)
        self.assertEqual((response.code, error_of(response)), (503, b"redis-unavailable"))
        self.assertLess(elapsed_since(start), FAIL_FAST)
        yield poll(lambda: auth_failures(admin) >= 8, 30, "eight refused AUTHs", interval=0.2)
        self.assertFalse(any(b.connected for b in buses))

    @defer.inlineCallbacks
    def test_password_changed_then_restored(self):
        """CONFIG SET requirepass to another password and CLIENT KILL of every client: the
        services' reconnects fail AUTH for a while; once the right password is set again they
        serve traffic again (give-up after 100 s, SERVED_AGAIN_AFTER_AUTH: the watchdog runs
        every 5 s), both buses are connected and the proxy is the same instance."""
        yield self.start()
        instance = self.proxy.instance
        admin = self.admin(self.RIGHT)
        admin.command("CONFIG", "SET", "requirepass", self.WRONG)
        for kind in ("pubsub", "normal"):
            admin.command("CLIENT", "KILL", "TYPE", kind)  # SKIPME yes: not the admin itself
        yield self.refused_for_a_while(admin)
        admin.command("CONFIG", "SET", "requirepass", self.RIGHT)
        yield first_success(self.client, self.url + "/echo?after", SERVED_AGAIN_AFTER_AUTH)
        self.assertTrue(self.forwarder.bus.connected and self.proxy.bus.connected)
        self.assertEqual(self.proxy.instance, instance)

    @defer.inlineCallbacks
    def test_redis_restarted_with_another_password_then_the_right_one(self):
        """Redis restarted with another password: reconnects fail AUTH for a while; Redis
        restarted with the right one: traffic is served again (give-up after 100 s,
        SERVED_AGAIN_AFTER_AUTH), by the same proxy instance."""
        yield self.start()
        instance = self.proxy.instance
        self.redis.password = self.WRONG
        self.redis.restart()
        yield self.refused_for_a_while(self.admin(self.WRONG))
        self.redis.password = self.RIGHT
        self.redis.restart()
        yield first_success(self.client, self.url + "/echo?after", SERVED_AGAIN_AFTER_AUTH)
        self.assertEqual(self.proxy.instance, instance)

    @defer.inlineCallbacks
    def test_refused_auth_leaves_no_unhandled_error(self):
        """A bus whose AUTH Redis refuses (at start and at each watchdog retry) logs the refusal
        but leaves no failed Deferred unhandled ("Unhandled error in Deferred" tracebacks)."""
        self.addCleanup(self.collect_refusals)
        self.redis = start_redis(self, password=self.RIGHT)
        folder = temp_folder(self)
        secret = folder / "redis.password"
        secret.write_text(self.WRONG + "\n")
        secret.chmod(0o600)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        settings = load_forwarder_config(with_password_file(
            write_forwarder_config(folder, self.redis.url, "tcp:0", ROUTES), secret))
        bus = RedisBus(settings.redis, reactor)
        bus.start()
        self.addCleanup(bus.stop)
        admin = self.admin(self.RIGHT)
        yield poll(lambda: auth_failures(admin) >= 4, 15, "AUTH refused at start and again after a watchdog retry",
                   interval=0.2)
        self.assertFalse(bus.connected)
        gc.collect()  # a dropped Deferred reports its unhandled failure when collected
        unhandled = [f.getErrorMessage() for f in self.flushLoggedErrors(ValueError)
                     if "could not auth" in f.getErrorMessage()]
        self.assertEqual(len(unhandled), 0, f"{len(unhandled)} failed Deferreds of txredisapi factories were left"
                         f" unhandled, e.g. {unhandled[:1]}")
