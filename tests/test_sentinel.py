"""Redis behind Sentinel: the bus finds the master through the sentinels, keeps only a
master, and follows a failover.

The story: production runs Redis as a master, a replica and three sentinels. The master's
process dies (SIGKILL); the sentinels agree it is down and promote the replica. Neither the
forwarder nor the proxy is restarted: their connections find the new master through the
sentinels, resubscribe, and the services renegotiate; the requests caught in between fail
fast with a cause, and none hangs. A master can also be demoted without dying (it keeps its
clients and takes PUBLISH as a replica, silently): the bus notices by asking ROLE.

Real processes (the same redis-server binary in each role) on free loopback ports, started
by the fixtures below and SIGKILLed at cleanup. Waits are polls of state with deadlines.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from ppbridge import bus as bus_module
from ppbridge.bus import RedisBus, _PublisherFactory, _SubscriberFactory
from ppbridge.errors import BusUnavailable
from ppbridge.redis_server import RedisServer, find_redis_server, free_port
from ppbridge.redisraw import RedisReplyError
from ppbridge.redisconfig import RedisSettings
from ppbridge.sentinel import QUERY_TIMEOUT, MasterEndpoint, Sentinels, parse_master_reply, parse_switch
from tests.redisclient import RawRedisClient
from tests.support import Client, Stack, error_of, poll, redis_clients, start_redis, temp_folder

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000  # sentinel down-after-milliseconds
FAILOVER_TIMEOUT_MS = 3000  # sentinel failover-timeout
GROUP_READY = 30.0  # sentinels know each other and the replica: hello messages every 2 s
FAILOVER_LIMIT = 60.0  # give up waiting for the promotion (it takes about 2-4 s here)
SERVED_AGAIN = 5.0  # the behaviour under test: served again within the failover time + this
REQUEST_LIMIT = 15.0  # no request may take longer: failing fast, not hanging (request_timeout 30 s)
PACE = 0.05  # seconds between two requests of the steady traffic
REDIS_DOWN_CAUSES = {502: {b"redis-connection-lost"}, 503: {b"redis-unavailable", b"proxy-unavailable"}}
WAIT = 15.0
CHANNEL = b"ns:p:alpha:" + b"0" * 16
log = Logger()  # the failover figures go to the test log as well as to stdout


class SentinelProcess:
    """One ``redis-server sentinel.conf --sentinel`` on a free loopback port, monitoring
    ``master_port`` as MASTER_NAME (quorum 2), in a folder of its own (Sentinel rewrites its
    config file); SIGKILLed at cleanup."""

    def __init__(self, case: TestCase, folder: Path, master_port: int) -> None:
        self.port = free_port()
        folder.mkdir()
        self.logfile = folder / "sentinel.log"
        conf = folder / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f'dir "{folder}"', f'logfile "{self.logfile}"',
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
        ]) + "\n")
        self.proc = subprocess.Popen([find_redis_server(), str(conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        case.addCleanup(self.kill)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def ask(self, *command: str) -> object:
        """One command's reply, or None while this sentinel does not answer."""
        try:
            with RawRedisClient("127.0.0.1", self.port, timeout=1.0) as client:
                return client.command(*command)
        except (OSError, RedisReplyError):
            return None

    def master_port(self) -> int | None:
        """The port of the master this sentinel names (None: not answering, or unknown)."""
        reply = self.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else None

    def knows_all(self) -> bool:
        """Knows the replica and both other sentinels: a failover can happen."""
        reply = self.ask("SENTINEL", "MASTER", MASTER_NAME)
        if not isinstance(reply, list):
            return False
        fields = dict(zip(reply[::2], reply[1::2]))
        return fields.get(b"num-slaves") == b"1" and fields.get(b"num-other-sentinels") == b"2"


class SentinelGroup:
    """``master`` (a RedisServer), a replica of it and three sentinels watching it."""

    def __init__(self, case: TestCase, master: RedisServer) -> None:
        folder = temp_folder(case)
        self.master = master
        self.replica = start_redis(case, extra_args=["--replicaof", "127.0.0.1", str(master.port)])
        self.sentinels = [SentinelProcess(case, folder / f"sentinel{i}", master.port) for i in range(3)]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def ready(self) -> Deferred[Any]:
        """Fires once the replica is in sync and every sentinel names the master and knows
        the replica and the other two."""
        def ready() -> bool:
            if self.replica.info("replication").get("master_link_status") != "up":
                return False
            return all(s.master_port() == self.master.port and s.knows_all() for s in self.sentinels)

        return poll(ready, GROUP_READY, "the sentinel group ready", interval=0.2)


class LogLines:
    """Formatted log lines of the ``ppbridge.bus`` and ``ppbridge.sentinel`` loggers."""

    def __init__(self, case: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") in ("ppbridge.bus", "ppbridge.sentinel"):
            self.lines.append(formatEvent(event))

    def having(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


# --- the failover, end to end -------------------------------------------------------------------


class Traffic:
    """GET requests one after the other (PACE apart) while running; each answer as
    (status, X-PPBridge-Error, started at, seconds taken). Each request is bounded by
    REQUEST_LIMIT: one that takes longer fails the loop, and so the test."""

    def __init__(self, client: Client, url: str) -> None:
        self.answers: list[tuple[int, bytes | None, float, float]] = []
        self.running = True
        self.done = self._run(client, url)

    @defer.inlineCallbacks
    def _run(self, client: Client, url: str):  # type: ignore[no-untyped-def]
        n = 0
        while self.running:
            start = reactor.seconds()
            response, _ = yield client.fetch(b"GET", f"{url}/echo?n={n}").addTimeout(REQUEST_LIMIT, reactor)
            self.answers.append((response.code, error_of(response), start, reactor.seconds() - start))
            n += 1
            yield task.deferLater(reactor, PACE, lambda: None)

    def served_since(self, when: float) -> list[tuple[int, bytes | None, float, float]]:
        return [a for a in self.answers if a[0] == 200 and a[2] >= when]


class FailoverTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def start(self, *, dead_sentinel: bool = False):  # type: ignore[no-untyped-def]
        """A sentinel group around the stack's Redis, and the stack's forwarder and proxy
        configured with the sentinels (``url`` then gives only the scheme and database)."""
        self.lines = LogLines(self)
        self.stack = Stack(self)
        self.group = SentinelGroup(self, self.stack.redis)
        yield self.group.ready()
        if dead_sentinel:
            self.group.sentinels[0].kill()
        self.stack.redis_keys = {"redis.sentinels": self.group.addresses, "redis.master_name": MASTER_NAME}
        yield self.stack.start()
        self.services = [self.stack.forwarder, self.stack.proxies["alpha"]]
        self.instance = self.stack.proxies["alpha"].instance

    def on(self, server: RedisServer) -> bool:
        """Both services' publishers and main subscribers are up on ``server`` (by CLIENT
        LIST there), and each bus says its connections are there."""
        with RawRedisClient("127.0.0.1", server.port) as admin:
            names = [c["name"] for c in redis_clients_list(admin)]
        buses = [service.bus._connections() for service in self.services]  # type: ignore[attr-defined]
        return (names.count("ppbridge-publisher") == 2 and names.count("ppbridge-subscriber") == 2
                and all(p.master == ("127.0.0.1", server.port) for conns in buses for p in conns))

    @defer.inlineCallbacks
    def test_master_killed_replica_promoted_traffic_resumes(self):
        """Steady sequential GETs through a forwarder and a proxy configured with three
        sentinels; the master SIGKILLed. Asserted: the sentinels promote the replica; a
        request succeeds again within (the failover time + 5 s) of the kill; every request
        that failed meanwhile was a 502 or 503 with an X-PPBridge-Error cause of a lost
        Redis (redis-connection-lost, redis-unavailable, proxy-unavailable), and none took
        over 15 s (no hang); afterwards 20 requests in a row succeed; both services heard the
        sentinels' +switch-master (a log line each); the same forwarder and proxy services
        (same proxy instance) run, their connections on the new master (and say so). The
        number of failed requests and the timings are printed and logged."""
        yield self.start()
        yield self.failover_under_traffic()

    @defer.inlineCallbacks
    def test_failover_with_one_sentinel_dead(self):
        """The same with the first configured sentinel killed before the services start:
        the lookups skip it (each sentinel in turn) and the +switch-master listener uses
        another. Asserted as above: served again within (the failover time + 5 s), every
        failure a 502/503 with a lost-Redis cause, none over 15 s, +switch-master heard by
        both services, the services unrestarted and on the new master."""
        yield self.start(dead_sentinel=True)
        yield self.failover_under_traffic()

    @defer.inlineCallbacks
    def failover_under_traffic(self):  # type: ignore[no-untyped-def]
        group, stack = self.group, self.stack
        traffic = Traffic(Client(self), stack.url)

        def stop_traffic() -> Deferred[Any]:
            traffic.running = False
            return traffic.done.addErrback(lambda _: None)  # a failure there has failed the test already

        self.addCleanup(stop_traffic)
        yield poll(lambda: len(traffic.served_since(0)) >= 5, WAIT, "traffic served before the kill")
        killed_at = reactor.seconds()
        group.master.kill()
        watching = [s for s in group.sentinels if s.proc.poll() is None]
        yield poll(lambda: watching[0].master_port() == group.replica.port, FAILOVER_LIMIT,
                   "the sentinels promoting the replica", interval=0.1)
        failover = reactor.seconds() - killed_at
        yield poll(lambda: traffic.served_since(killed_at), FAILOVER_LIMIT, "a request served after the kill")
        first = traffic.served_since(killed_at)[0]
        back = first[2] + first[3] - killed_at
        yield poll(lambda: len(traffic.served_since(first[2])) >= 21, WAIT, "20 more requests served")
        traffic.running = False
        yield traffic.done
        after = [a for a in traffic.answers if a[2] > first[2]]
        failed = [a for a in traffic.answers if a[0] != 200]
        causes = Counter((code, cause) for code, cause, _, _ in failed)
        report = (f"failover: the test saw the replica promoted {failover:.2f} s after the SIGKILL; served again"
                  f" {back:.2f} s after it; {len(failed)} of {len(traffic.answers)} requests failed ("
                  + ", ".join(f"{n} x {code} {cause!r}" for (code, cause), n in sorted(causes.items()))
                  + f"); the slowest answer took {max(a[3] for a in traffic.answers):.2f} s")
        print("\n" + report)
        log.info("{report}", report=report)
        self.assertLessEqual(back, failover + SERVED_AGAIN, report)
        for code, cause, _, took in failed:
            self.assertIn(code, REDIS_DOWN_CAUSES, report)
            self.assertIn(cause, REDIS_DOWN_CAUSES[code], report)
        self.assertLess(max(a[3] for a in traffic.answers), REQUEST_LIMIT, report)
        self.assertEqual([a[0] for a in after if a[0] != 200], [], report)
        self.assertTrue(all(service.running for service in self.services))
        self.assertEqual(stack.proxies["alpha"].instance, self.instance)
        switched = f"switched the master {MASTER_NAME} to 127.0.0.1:{group.replica.port}"
        yield poll(lambda: len(self.lines.having(switched)) >= 2, WAIT, "+switch-master heard by both services")
        yield poll(lambda: self.on(group.replica), WAIT, "all six connections on the new master")


def redis_clients_list(admin: RawRedisClient) -> list[dict[str, str]]:
    """CLIENT LIST entries that have a name (``redis_clients`` keys them by name, so two
    processes' ``ppbridge-publisher`` would be one)."""
    listing = admin.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    found = []
    for line in listing.decode().splitlines():
        fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
        if fields.get("name"):
            found.append(fields)
    return found


# --- keeping only a master -----------------------------------------------------------------------


class Lookup:
    """Stands in for the sentinels' answer: the address of ``server`` until told
    otherwise; records every lookup."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.asked: list[int] = []

    def master(self) -> Deferred[tuple[str, int]]:
        self.asked.append(self.server.port)
        return defer.succeed(("127.0.0.1", self.server.port))


class Watched:
    """A RedisBus configured with a (never answering) sentinel, whose master lookup is
    ``lookup``; subscribed to CHANNEL; records its states and messages."""

    def __init__(self, case: TestCase, lookup: Lookup) -> None:
        settings = RedisSettings(namespace="ns", sentinels=(("127.0.0.1", free_port()),), master_name=MASTER_NAME)
        self.bus = RedisBus(settings, reactor)
        assert self.bus._failover is not None
        self.bus._failover.sentinels.master = lookup.master  # type: ignore[method-assign]
        self.states: list[bool] = []
        self.messages: list[bytes] = []
        self.bus.on_state = self.states.append
        self.bus.on_message = lambda channel, data: self.messages.append(data)
        self.bus.subscribe(CHANNEL)
        self.bus.start()
        case.addCleanup(self.bus.stop)


@defer.inlineCallbacks
def delivered(server: RedisServer, watched: Watched, data: bytes):  # type: ignore[no-untyped-def]
    """PUBLISH ``data`` on ``server`` until a subscriber takes it; wait until the bus has it."""
    with RawRedisClient("127.0.0.1", server.port) as admin:
        yield poll(lambda: admin.publish(CHANNEL, data) == 1, WAIT, f"a subscriber for {data!r}", interval=0.1)
    yield poll(lambda: data in watched.messages, WAIT, f"{data!r} delivered")


class MasterOnlyTests(TestCase):
    """A bus behind sentinels on real redis-servers, its master lookup stood in for."""

    @defer.inlineCallbacks
    def test_lookup_naming_a_replica_is_not_kept(self):
        """The lookup names a replica: each connection there is dropped after ROLE (a warn
        line says "is not the master (its role: slave)"), the bus never reports itself
        connected, and asks again with a growing delay; once the lookup names the master the
        bus connects there (its only on_state is True), no ppbridge connection stays on the
        replica, and a message published on the master is delivered."""
        master = start_redis(self)
        replica = start_redis(self, extra_args=["--replicaof", "127.0.0.1", str(master.port)])
        lines = LogLines(self)
        lookup = Lookup(replica)
        watched = Watched(self, lookup)
        yield poll(lambda: len(lines.having("is not the master (its role: slave)")) >= 4, WAIT,
                   "connections to the replica refused after ROLE")
        self.assertEqual(watched.states, [])
        self.assertFalse(watched.bus.connected)
        self.assertGreater(watched.bus._pub_factory.refusals, 0)  # type: ignore[union-attr]
        self.assertEqual(set(lookup.asked), {replica.port})  # asked before each attempt
        self.assertGreaterEqual(len(lookup.asked), 4)
        lookup.server = master
        yield poll(lambda: watched.bus.connected, WAIT, "the bus connected to the master")
        yield delivered(master, watched, b"on the master")
        self.assertEqual(watched.states, [True])
        with RawRedisClient("127.0.0.1", replica.port) as admin:
            yield poll(lambda: not redis_clients(admin), WAIT, "no ppbridge connection left on the replica")

    @defer.inlineCallbacks
    def test_demoted_master_is_left(self):
        """The bus is connected to server A (the lookup's answer); A is made a replica of B
        with REPLICAOF (Redis keeps its clients, which could go on publishing there without
        an error) and the lookup now names B: the health check's ROLE (every 0.2 s here)
        finds A demoted, a warn line says A "is no longer the master", the bus reconnects,
        and ends with every connection on B, where a published message is delivered."""
        self.patch(bus_module, "HEALTH_INTERVAL", 0.2)
        a, b = start_redis(self), start_redis(self)
        lines = LogLines(self)
        lookup = Lookup(a)
        watched = Watched(self, lookup)
        yield delivered(a, watched, b"on A")
        lookup.server = b
        with RawRedisClient("127.0.0.1", a.port) as admin:
            admin.command("REPLICAOF", "127.0.0.1", str(b.port))
        yield poll(lambda: lines.having(f"127.0.0.1:{a.port} is no longer the master"), WAIT, "A found demoted")
        yield delivered(b, watched, b"on B")
        with RawRedisClient("127.0.0.1", b.port) as admin:
            self.assertEqual(sorted(redis_clients(admin)), ["ppbridge-publisher", "ppbridge-subscriber"])
        self.assertEqual(watched.states[0], True)
        self.assertEqual(watched.states[-1], True)


class ReadOnlyTests(TestCase):
    """No sockets: the bus's protocols on StringTransports, behind (unused) sentinels."""

    def test_readonly_reply_drops_every_connection_to_that_server(self):
        """A publisher and a subscriber, both past ROLE (master) on server M; a PUBLISH is
        answered ``-READONLY`` (M was demoted): the publish fails with BusUnavailable (the
        lost-Redis path: 502/503 with a cause), and both connections to M are aborted, so
        they reconnect through the sentinels; a warn line names M and -READONLY."""
        events: list[dict[str, Any]] = []
        self.patch(bus_module, "log", Logger(observer=events.append))
        master = ("10.0.0.5", 6379)
        settings = RedisSettings(namespace="ns", sentinels=(("10.0.0.9", 26379),), master_name=MASTER_NAME)
        bus = RedisBus(settings, Clock())
        bus.subscribe(CHANNEL)
        role = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"

        pub_factory = _PublisherFactory(bus)
        sub_factory = _SubscriberFactory(bus, bus._main)
        protos = []
        for factory in (pub_factory, sub_factory):
            factory.charset, factory.convertNumbers, factory.dbid, factory.master = None, False, 0, master
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(b"+OK\r\n+OK\r\n" + role)  # SELECT, CLIENT SETNAME, ROLE
            self.assertTrue(proto.checked)
            protos.append(proto)
        pub, sub = protos
        sub.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(CHANNEL), CHANNEL))
        bus._publisher_up(pub)  # what the factory's addConnection does a reactor turn later
        self.assertTrue(bus.connected)

        published = bus.publish(CHANNEL, b"x")
        pub.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
        self.failureResultOf(published, BusUnavailable)
        self.assertTrue(pub.transport.disconnecting or pub.transport.disconnected)
        self.assertTrue(sub.transport.disconnecting or sub.transport.disconnected)
        warned = [formatEvent(e) for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len([w for w in warned if "10.0.0.5:6379 is no longer the master (it answered -READONLY)"
                              in w]), 1, warned)

    def test_replica_at_connect_counts_as_a_failed_attempt(self):
        """A connection whose server answers ROLE "slave" is aborted before it is reported
        up, and the factory's next reconnection waits as after a failed attempt (its delay
        grows with each such refusal, reset by a connection to a master)."""
        bus = RedisBus(RedisSettings(namespace="ns", sentinels=(("10.0.0.9", 26379),), master_name=MASTER_NAME),
                       Clock())
        factory = _PublisherFactory(bus)
        factory.charset, factory.convertNumbers, factory.dbid, factory.master = None, False, 0, ("10.0.0.6", 6379)
        factory.jitter = 0
        delays = [factory.retryDelay(1)]
        for _ in range(3):
            proto = factory.buildProtocol(None)
            proto.makeConnection(StringTransport())
            proto.dataReceived(b"+OK\r\n+OK\r\n*5\r\n$5\r\nslave\r\n$8\r\n10.0.0.5\r\n:6379\r\n$9\r\nconnected\r\n"
                               b":10\r\n")
            self.assertFalse(proto.checked)
            self.assertTrue(proto.transport.disconnected)
            delays.append(factory.retryDelay(1))
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8])
        self.assertIsNone(bus._pub)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"+OK\r\n+OK\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        self.assertTrue(proto.checked)
        self.assertEqual(factory.retryDelay(1), 0.1)


class _Link:
    """Stands in for a sentinel's live connection: its answer to the master lookup is
    ``answer`` (a Deferred the test fires, or never)."""

    def __init__(self, answer: Deferred[Any]) -> None:
        self.answer = answer
        self.asked = 0
        self.transport = StringTransport()

    def sentinel_get_master_addr_by_name(self, name: str) -> Deferred[Any]:
        self.asked += 1
        return self.answer


class LookupTests(TestCase):
    """No sockets: a MasterEndpoint over stand-in sentinel connections."""

    def test_cancelled_lookup_asks_no_other_sentinel_and_connects_nowhere(self):
        """The first sentinel never answers, the second would name a master at once. The
        connection attempt is cancelled while the first is being asked (what Twisted's
        ClientService does when the bus stops or restarts a factory). Asserted: the attempt
        fails with CancelledError; the second sentinel is never asked and no connection to a
        master is attempted (one made then would outlive its stopped service: automat's
        NoTransition ``_clientDisconnected`` in ``Stopped`` when it closes); neither
        sentinel's connection is dropped (a cancellation says nothing about the sentinel)."""
        clock = Clock()
        settings = RedisSettings(namespace="ns", sentinels=(("10.0.0.9", 26379), ("10.0.0.10", 26379)),
                                 master_name=MASTER_NAME)
        connects: list[tuple[str, int]] = []

        def endpoint_for(host: str, port: int) -> Any:
            connects.append((host, port))
            raise AssertionError("no connection may be attempted")

        sentinels = Sentinels(settings, clock, endpoint_for)
        silent = _Link(Deferred())
        answering = _Link(defer.succeed([b"10.0.0.5", b"6379"]))
        sentinels._links = [SimpleNamespace(live=link, stopped=False, disconnectCalled=False)  # type: ignore[misc]
                            for link in (silent, answering)]
        factory = SimpleNamespace()
        attempt = MasterEndpoint(sentinels, endpoint_for, factory).connect(object())
        self.assertEqual(silent.asked, 1)
        attempt.cancel()
        self.failureResultOf(attempt, defer.CancelledError)
        clock.advance(10)  # past every query timeout
        self.assertEqual((answering.asked, connects), (0, []))
        self.assertFalse(hasattr(factory, "master"))
        self.assertEqual((silent.transport.disconnected, answering.transport.disconnected), (False, False))

    def test_query_timeout_drops_that_sentinel_and_asks_the_next(self):
        """The first sentinel does not answer within QUERY_TIMEOUT: its connection is dropped
        (it may be dead without TCP knowing; it reconnects by itself), the second sentinel is
        asked, and the endpoint connects to the master it names."""
        clock = Clock()
        settings = RedisSettings(namespace="ns", sentinels=(("10.0.0.9", 26379), ("10.0.0.10", 26379)),
                                 master_name=MASTER_NAME)
        connects: list[tuple[str, int]] = []

        class Endpoint:
            def __init__(self, host: str, port: int) -> None:
                connects.append((host, port))

            def connect(self, protocol_factory: object) -> Deferred[str]:
                return defer.succeed("connected")

        sentinels = Sentinels(settings, clock, Endpoint)
        silent, answering = _Link(Deferred()), _Link(defer.succeed([b"10.0.0.5", b"6379"]))
        sentinels._links = [SimpleNamespace(live=link, stopped=False, disconnectCalled=False)  # type: ignore[misc]
                            for link in (silent, answering)]
        factory = SimpleNamespace()
        attempt = MasterEndpoint(sentinels, Endpoint, factory).connect(object())
        clock.advance(QUERY_TIMEOUT)
        self.assertEqual(self.successResultOf(attempt), "connected")
        self.assertEqual((silent.transport.disconnected, answering.transport.disconnected), (True, False))
        self.assertEqual((answering.asked, connects, factory.master), (1, [("10.0.0.5", 6379)], ("10.0.0.5", 6379)))


    def test_lookup_failure_names_what_each_sentinel_said(self):
        """Three sentinels: one refuses (an error reply), one does not know the master name
        (nil), one answers garbage. Asserted: the connection attempt fails with
        MasterNotFoundError naming each sentinel and what it said, none of them dropped
        (each answered), and no connection to any master is attempted."""
        settings = RedisSettings(namespace="ns", master_name=MASTER_NAME,
                                 sentinels=(("10.0.0.9", 26379), ("10.0.0.10", 26379), ("10.0.0.11", 26379)))
        connects: list[tuple[str, int]] = []

        def endpoint_for(host: str, port: int) -> Any:
            connects.append((host, port))
            raise AssertionError("no connection may be attempted")

        sentinels = Sentinels(settings, Clock(), endpoint_for)
        links = [_Link(defer.fail(txredisapi.ResponseError("NOAUTH Authentication required."))),
                 _Link(defer.succeed(None)), _Link(defer.succeed([b"10.0.0.5"]))]
        sentinels._links = [SimpleNamespace(live=link, stopped=False, disconnectCalled=False)  # type: ignore[misc]
                            for link in links]
        attempt = MasterEndpoint(sentinels, endpoint_for, SimpleNamespace()).connect(object())
        message = str(self.failureResultOf(attempt, txredisapi.MasterNotFoundError).value)
        for part in ("10.0.0.9:26379 ResponseError: NOAUTH Authentication required.",
                     f"10.0.0.10:26379 does not know {MASTER_NAME!r}",
                     "10.0.0.11:26379 ValueError: not a (host, port) reply"):
            self.assertIn(part, message)
        self.assertEqual([link.asked for link in links], [1, 1, 1])
        self.assertEqual([link.transport.disconnected for link in links], [False, False, False])
        self.assertEqual(connects, [])

class ParseTests(TestCase):
    """What a sentinel sends is checked by type, length and pattern before use."""

    def test_master_reply(self):
        """GET-MASTER-ADDR-BY-NAME: two bulk strings give (host, port); nil gives None (the
        name is unknown); anything else, or a host or port out of pattern, is a ValueError."""
        self.assertEqual(parse_master_reply([b"10.0.0.5", b"6379"]), ("10.0.0.5", 6379))
        self.assertEqual(parse_master_reply([b"redis-1.example", b"6380"]), ("redis-1.example", 6380))
        self.assertIsNone(parse_master_reply(None))
        for bad in ([b"10.0.0.5"], b"10.0.0.5:6379", [b"10.0.0.5", b"0"], [b"10.0.0.5", b"65536"],
                    [b"host\r\nname", b"6379"], [b"", b"6379"], [b"h", b"63 79"], [b"x" * 300, b"6379"]):
            self.assertRaises(ValueError, parse_master_reply, bad)

    def test_switch_message(self):
        """+switch-master "<name> <old ip> <old port> <new ip> <new port>": the new address
        for our master name, None for another name, ValueError when malformed."""
        self.assertEqual(parse_switch(b"mymaster 10.0.0.5 6379 10.0.0.6 6380", "mymaster"), ("10.0.0.6", 6380))
        self.assertIsNone(parse_switch(b"other 10.0.0.5 6379 10.0.0.6 6380", "mymaster"))
        for bad in (b"mymaster 10.0.0.5 6379 10.0.0.6", b"mymaster a b c d", "mymaster 1 2 3 4", b"x" * 2000):
            self.assertRaises(ValueError, parse_switch, bad, "mymaster")
