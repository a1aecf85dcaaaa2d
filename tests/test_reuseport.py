"""Several forwarder processes on one host: ``[forwarder] reuse_port = true`` (SO_REUSEPORT).

From the bottom up: the stand-in reactor of :mod:`ppbridge.reuseport` against the real one
(loopback sockets: the option is set, a second port on the same number is granted, TLS still
works), the setting and its checks, the one line a forwarder prints when its port is taken,
the systemd template unit, and two ``twistd -n ppforwarder`` child processes on one port
behind which one proxy serves the sample upstream.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from ppbridge import reuseport
from ppbridge.forwarder import RESTART_ONLY
from ppbridge.redis_server import free_port
from ppbridge.reload import split_settings
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from ppbridge.tap import cannot_listen
from tests.processes import OUT, REPO, TWISTD, Child, spawn
from tests.support import key_pair, listen, poll, start_redis, temp_folder
from tests.test_cli import call, unit
from tests.test_config import FORWARDER, ConfigTestCase
from tests.test_faults import CONFIRMED, LISTENING, REQUEST_LIMIT, assert_clean
from tests.test_redis_tls import write_certificates

REQUESTS = 60  # through two forwarders: all on one of them by chance has probability 2 * 2**-60
ACCESS_LINE = r"\bGET /echo/(\d+) 200\b"  # a forwarder's access-log line for request N
log = Logger()  # the split between the forwarders goes to the test log (_trial_temp/test.log under trial)


class _Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello\n")


class _Reader(protocol.Protocol):
    def __init__(self) -> None:
        self.received: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.received.called:
            self.received.callback(data)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def socket_of(port: Any) -> socket.socket:
    """A duplicate of a listening port's socket (from its ``fileno()``); close it after use."""
    return socket.fromfd(port.fileno(), socket.AF_INET6 if ":" in port.getHost().host else socket.AF_INET,
                         socket.SOCK_STREAM)


def reuse_port_option(port: Any) -> int:
    """The SO_REUSEPORT value of a listening port's socket."""
    with socket_of(port) as sock:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


class StandInReactor(TestCase):
    """Ports listened on through ``reuseport.listening_reactor(reactor, True)`` with Twisted's
    own endpoint parser: real loopback sockets, closed at cleanup. These fail loudly if Twisted
    stops accepting a ``makeBinding`` object in place of the port number."""

    @defer.inlineCallbacks
    def listen(self, description: str, reuse_port: bool, factory: Any = None):  # type: ignore[no-untyped-def]
        listening = reuseport.listening_reactor(reactor, reuse_port)
        port = yield serverFromString(listening, description).listen(
            factory or protocol.Factory.forProtocol(_Greeter))
        self.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def assert_shared(self, template: str):  # type: ignore[no-untyped-def]
        """Listen on ``template`` with port 0, then again on the port number it got: both
        ports exist on that number and both sockets have SO_REUSEPORT set."""
        first = yield self.listen(template.format(port=0), True)
        number = first.getHost().port
        second = yield self.listen(template.format(port=number), True)
        self.assertEqual(second.getHost().port, number)
        self.assertEqual([reuse_port_option(first), reuse_port_option(second)], [1, 1])
        return first

    def test_tcp_port_shared(self):
        """tcp:PORT:interface=127.0.0.1 twice on one number: both granted, SO_REUSEPORT on both."""
        return self.assert_shared("tcp:{port}:interface=127.0.0.1:backlog=64")

    def test_tcp6_port_shared(self):
        """tcp6:PORT:interface=::1 twice on one number: both granted, SO_REUSEPORT on both, and
        the ports are IPv6 ones on ::1 (the stand-in passes the interface on, so Twisted picks
        AF_INET6)."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback on this host ({e})")
        d = self.assert_shared("tcp6:{port}:interface=\\:\\:1")
        d.addCallback(lambda port: self.assertEqual(port.getHost().host, "::1"))
        return d

    @defer.inlineCallbacks
    def test_ssl_port_shared_and_speaks_tls(self):
        """ssl:PORT with a certificate twice on one number: both granted with SO_REUSEPORT, and a
        TLS client connecting to that number gets the server's greeting through the TLS layer
        (the reactor's listenSSL still wraps the factory when given the binding)."""
        tls = write_certificates(temp_folder(self))
        template = f"ssl:{{port}}:interface=127.0.0.1:privateKey={tls}/server.key:certKey={tls}/server.pem"
        self.assertTrue(reuseport.can_share(template.format(port=0)))
        first = yield self.assert_shared(template)
        client = yield SSL4ClientEndpoint(reactor, "127.0.0.1", first.getHost().port, CertificateOptions()).connect(
            protocol.Factory.forProtocol(_Reader))
        greeting = yield client.received.addTimeout(10, reactor)
        self.assertEqual(greeting, b"hello\n")
        yield client.closed.addTimeout(10, reactor)

    @defer.inlineCallbacks
    def test_without_reuse_port_the_number_is_taken(self):
        """Through the plain reactor (reuse_port false) the socket has no SO_REUSEPORT and a
        second listen on the same number fails with CannotListenError (EADDRINUSE): the test
        above can fail."""
        first = yield self.listen("tcp:0:interface=127.0.0.1", False)
        self.assertEqual(reuse_port_option(first), 0)
        failed = yield self.assertFailure(self.listen(f"tcp:{first.getHost().port}:interface=127.0.0.1", False),
                                          CannotListenError)
        self.assertEqual(failed.socketError.errno, errno.EADDRINUSE)

    def test_which_endpoints_can_share(self):
        """can_share: tcp and tcp6 yes; unix, a bad string and an unknown type no."""
        self.assertEqual([reuseport.can_share(d) for d in ("tcp:8080", "tcp6:8080", "unix:/tmp/x.sock",
                                                            "tcp:notaport", "tpc:8080")],
                         [True, True, False, False, False])


class Setting(ConfigTestCase):
    """``[forwarder] reuse_port``: a boolean, off by default, only with endpoints it can share,
    restart-only, and shown by ``ppbridge check``."""

    def test_default_and_true(self) -> None:
        """Absent: False. ``reuse_port = true`` with tcp and tcp6 endpoints: True."""
        self.assertFalse(self.forwarder().reuse_port)
        settings = self.forwarder("reuse_port = true\nlisten = ['tcp:8080', 'tcp6:8080']\n")
        self.assertEqual((settings.reuse_port, settings.listen), (True, ("tcp:8080", "tcp6:8080")))

    def test_not_a_boolean(self) -> None:
        """``reuse_port = "yes"``: one line naming forwarder.reuse_port and the boolean it wants."""
        self.assertFileKeyError(self.fails(self.forwarder, "reuse_port = 'yes'\n"), "forwarder.reuse_port",
                                "expected true or false", "string 'yes'")

    def test_unshareable_endpoint_refused(self) -> None:
        """With reuse_port = true, a unix endpoint in listen is one line naming forwarder.listen,
        the endpoint and the kinds that can be shared; without reuse_port it loads."""
        message = self.fails(self.forwarder, "reuse_port = true\nlisten = ['tcp:8080', 'unix:/tmp/fw.sock']\n")
        self.assertFileKeyError(message, "forwarder.listen", "'unix:/tmp/fw.sock' is not a tcp, tcp6 or ssl endpoint")
        self.assertFalse(self.forwarder("listen = ['tcp:8080', 'unix:/tmp/fw.sock']\n").reuse_port)

    def test_unshareable_endpoint_from_the_command_line(self) -> None:
        """The same refusal for an endpoint given with --listen is blamed on that option."""
        message = self.fails(self.forwarder, "reuse_port = true\n", overrides={"forwarder.listen": ("unix:/tmp/x",)},
                             option_names={"forwarder.listen": "--listen"})
        self.assertTrue(message.startswith("command line --listen: 'unix:/tmp/x' is not a tcp"), message)

    def test_restart_only(self) -> None:
        """A reload that turns reuse_port on keeps it off (it is built into the ports) and names it."""
        old, new = self.forwarder(), self.forwarder("reuse_port = true\n")
        effective, applied, held = split_settings(old, new, RESTART_ONLY)
        self.assertEqual((effective.reuse_port, applied, held), (False, [], ["reuse_port"]))

    def test_check_shows_it(self) -> None:
        """``ppbridge check`` says "with SO_REUSEPORT" on its ok line and adds a note that the
        file's admin endpoint serves one process; without reuse_port, neither."""
        path = self.write(FORWARDER + "reuse_port = true\n")
        status, out, err = call("check", str(path))
        self.assertEqual((status, err), (0, ""))
        ok, note = out.splitlines()
        self.assertIn(": ok: forwarder on tcp:8080:interface=127.0.0.1:backlog=1024 with SO_REUSEPORT", ok)
        self.assertIn("note: admin.listen 'tcp:9180:interface=127.0.0.1' serves one process", note)
        status, out, _ = call("check", str(self.write(FORWARDER)))
        self.assertEqual((status, len(out.splitlines())), (0, 1))
        self.assertNotIn("SO_REUSEPORT", out)

    def test_example_shows_the_default(self) -> None:
        """conf/forwarder.example.toml sets reuse_port to its default, false."""
        text = (REPO / "conf" / "forwarder.example.toml").read_text()
        self.assertIn("\nreuse_port = false\n", text)


class CannotListenLine(TestCase):
    """The line :func:`ppbridge.tap.cannot_listen` makes of a port Twisted could not bind."""

    def line(self, code: int, setting: str = "forwarder.listen", reuse_port: bool = False) -> str:
        err = CannotListenError("127.0.0.1", 8080, OSError(code, os.strerror(code)))
        return cannot_listen(err, "tcp:8080:interface=127.0.0.1", setting, reuse_port)

    def test_lines(self) -> None:
        """Each names address, port, setting, endpoint and the system's reason; a taken forwarder
        port points at reuse_port (or, with it on, at the other process's settings), a taken
        admin port at --admin, a forbidden one at CAP_NET_BIND_SERVICE."""
        start = "cannot listen on 127.0.0.1:8080 (forwarder.listen 'tcp:8080:interface=127.0.0.1'): "
        self.assertTrue(self.line(errno.EADDRINUSE).startswith(start + "Address already in use; another process"))
        self.assertIn("[forwarder] reuse_port = true)", self.line(errno.EADDRINUSE))
        self.assertIn("must also set SO_REUSEPORT and run as the same user",
                      self.line(errno.EADDRINUSE, reuse_port=True))
        self.assertIn("admin endpoint of its own: --admin", self.line(errno.EADDRINUSE, "admin.listen"))
        self.assertIn("CAP_NET_BIND_SERVICE", self.line(errno.EACCES))
        self.assertNotIn("\n", "".join(self.line(c) for c in (errno.EADDRINUSE, errno.EACCES, errno.EINVAL)))


class TemplateUnit(TestCase):
    """contrib/systemd/ppforwarder@.service: one process per instance, same config."""

    def test_template(self) -> None:
        """ExecStart runs ``twistd -n --pidfile= ppforwarder --config /etc/ppbridge/forwarder.toml
        --admin tcp:%i:interface=127.0.0.1`` (no pidfile, the instance name as its own admin
        port on loopback); every other [Service] and [Install] setting equals ppforwarder.service's."""
        template, single = unit("ppforwarder@"), unit("ppforwarder")
        argv = shlex.split(template["Service"]["ExecStart"])
        self.assertEqual(argv, shlex.split(single["Service"]["ExecStart"]) + ["--admin", "tcp:%i:interface=127.0.0.1"])
        rest = lambda parsed: {k: v for k, v in parsed["Service"].items() if k != "ExecStart"}  # noqa: E731
        self.assertEqual(rest(template), rest(single))
        self.assertEqual(dict(template["Install"]), dict(single["Install"]))


class TwoProcesses(TestCase):
    """Two ``twistd -n ppforwarder`` children from one config on one fixed port."""

    timeout = 180

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        self.run_dir = temp_folder(self)  # the children's cwd: neither the repository nor the configs
        self.redis = start_redis(self)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        self.port = free_port()

    def forwarder_config(self, reuse_port: bool) -> Path:
        return write_forwarder_config(self.folder, self.redis.url, f"tcp:{self.port}:interface=127.0.0.1:backlog=256",
                                      {"alpha": {"path_prefix": "/"}}, forwarder={"reuse_port": reuse_port})

    def spawn_forwarder(self, config: Path, name: str) -> Child:
        return spawn(self, self.run_dir, [TWISTD, "-n", "--pidfile=", "ppforwarder", "--config", str(config)], name)

    @defer.inlineCallbacks
    def test_two_forwarders_share_the_port_and_both_serve(self):
        """reuse_port = true, two forwarder children and one proxy: 60 GETs of /echo/N, each on
        a new connection, are all answered 200; the access logs of the two forwarders hold each
        N exactly once between them, and each forwarder holds at least one; neither child printed
        a traceback."""
        site, _app = make_site()
        upstream = yield listen(self, site)
        config = self.forwarder_config(True)
        forwarders = [self.spawn_forwarder(config, "forwarder-a"), self.spawn_forwarder(config, "forwarder-b")]
        proxy_config = write_proxy_config(self.folder, "alpha", self.redis.url, upstream)
        spawn(self, self.run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(proxy_config)], "proxy")
        yield defer.gatherResults([f.wait_for(CONFIRMED) for f in forwarders], consumeErrors=True).addErrback(
            lambda f: f.value.subFailure)

        pool = HTTPConnectionPool(reactor, persistent=False)  # a new connection for every request
        agent = Agent(reactor, pool=pool)
        self.addCleanup(pool.closeCachedConnections)
        for n in range(REQUESTS):
            try:
                response = yield agent.request(b"GET", f"http://127.0.0.1:{self.port}/echo/{n}".encode()).addTimeout(
                    REQUEST_LIMIT, reactor)
                yield treq.content(response)
            except Exception as e:
                raise AssertionError(f"request {n}: {e!r}\n" + "\n".join(f.describe() for f in forwarders)) from e
            self.assertEqual(response.code, 200, f"request {n}")

        def served(child: Child) -> list[int]:
            return [int(m.group(1)) for m in map(re.compile(ACCESS_LINE).search, child.lines[OUT]) if m]

        yield poll(lambda: len(served(forwarders[0]) + served(forwarders[1])) >= REQUESTS, 10,
                   "an access-log line for every request")
        a, b = served(forwarders[0]), served(forwarders[1])
        log.info("two forwarders on one port served {a} and {b} of {n} requests", a=len(a), b=len(b), n=REQUESTS)
        self.assertEqual(sorted(a + b), list(range(REQUESTS)), "each request logged by exactly one forwarder")
        self.assertTrue(a and b, f"one forwarder served all: {len(a)} and {len(b)}")
        for child in forwarders:
            assert_clean(self, child)

    @defer.inlineCallbacks
    def test_without_reuse_port_the_second_forwarder_exits_with_one_line(self):
        """reuse_port = false: the second forwarder on the first one's port exits with status 1;
        exactly one line of its output names the port, and that line says "cannot listen on
        127.0.0.1:PORT", names forwarder.listen and "Address already in use" and points at
        reuse_port; it printed no traceback; the first forwarder still runs and accepts."""
        config = self.forwarder_config(False)
        first = self.spawn_forwarder(config, "forwarder-a")
        yield first.wait_for(LISTENING.format(port=self.port))
        second = self.spawn_forwarder(config, "forwarder-b")
        yield second.wait_end()
        self.assertEqual((second.exit_code, second.exit_signal), (1, None), second.describe())
        naming = [line for fd in second.lines for line in second.lines[fd] if str(self.port) in line]
        self.assertEqual(len(naming), 1, second.describe())
        for needle in (f"cannot listen on 127.0.0.1:{self.port} (forwarder.listen", "Address already in use",
                       "reuse_port = true"):
            self.assertIn(needle, naming[0])
        assert_clean(self, second)
        self.assertFalse(first.ended, first.describe())
        with socket.create_connection(("127.0.0.1", self.port), timeout=5):
            pass
