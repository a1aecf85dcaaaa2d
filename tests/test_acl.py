"""Least-privilege Redis users: ``ppbridge acl``, a bridge running under them, what they stop,
and what a missing permission costs in the log.

The story: an operator runs ``ppbridge acl`` on the forwarder's config and on each proxy's,
pastes the ``ACL SETUSER`` lines into redis-cli, and puts each side's user in its
``redis.url``. The bridge then works as before, rotation included; the owner of proxy host
``beta``, logged in as beta's user, can neither read ``alpha``'s traffic nor inject into its
channels, nor read the forwarder's; and an ACL missing a permission shows up as one clear line
per backoff step naming what to fix, not a reconnect loop, and heals once the ACL is fixed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, cast

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ppbridge import redisperm
from ppbridge.bus import RedisBus
from ppbridge.channels import Channels
from ppbridge.config import load_forwarder_config
from ppbridge.forwarder import ForwarderService
from ppbridge.scaffold import TomlValue, write_forwarder_config, write_proxy_config
from tests.processes import OUT, PPBRIDGE, run
from tests.redisclient import RawRedisClient, RedisReplyError
from tests.support import Client, Stack, key_pair, poll, temp_folder
from tests.test_cli import call

WAIT = 15.0
ROUTES: dict[str, Mapping[str, TomlValue]] = {"alpha": {"path_prefix": "/a"}, "beta": {"path_prefix": "/b"}}
FAST_REKEY: dict[str, TomlValue] = {"mode": "fixed", "period": 1.0, "grace": 10.0}
FORWARDER_COMMANDS = "+subscribe +unsubscribe +publish +pubsub|numsub +ping +select +client|setname"
PROXY_COMMANDS = "+subscribe +unsubscribe +ping +select +client|setname"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_password_file(path: Path, password: str, file_name: str) -> None:
    """Add ``password_file`` (a new 0600 file next to ``path`` holding ``password``) to the
    [redis] table of the config at ``path``."""
    secret = path.parent / file_name
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    text = path.read_text()
    path.write_text(text.replace("[redis]\n", f'[redis]\npassword_file = "{file_name}"\n', 1))


class AclStack(Stack):
    """A Stack whose forwarder and proxies log in to its Redis as users of their own: the user
    in ``redis.url`` (``ppbridge-forwarder``, ``ppbridge-NAME``), the password in a 0600 file.
    The configs can be written (for ``ppbridge acl``) before anything starts."""

    def url_for(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.redis.port}/0"

    def password_of(self, user: str) -> str:
        return f"pw-{user}-{sha256(str(self.folder))[:12]}"

    def forwarder_config(self, routes: Mapping[str, Mapping[str, TomlValue]],
                         overrides: Mapping[str, TomlValue] | None = None, redis_url: str | None = None) -> Path:
        path = super().forwarder_config(routes, overrides, self.url_for("ppbridge-forwarder"))
        with_password_file(path, self.password_of("ppbridge-forwarder"), "forwarder.password")
        return path

    def proxy_config(self, name: str, upstream: str = "http://127.0.0.1:9",
                     overrides: Mapping[str, TomlValue] | None = None,
                     rekey: Mapping[str, TomlValue] | None = None, redis_url: str | None = None) -> Path:
        path = super().proxy_config(name, upstream, overrides, rekey, self.url_for(f"ppbridge-{name}"))
        with_password_file(path, self.password_of(f"ppbridge-{name}"), f"{name}.password")
        return path


@defer.inlineCallbacks
def printed_lines(case: TestCase, config: Path):  # type: ignore[no-untyped-def]
    """What the installed ``ppbridge acl CONFIG`` prints on stdout (it must exit 0)."""
    child = yield run(case, config.parent, [PPBRIDGE, "acl", str(config)])
    case.assertEqual(child.exit_code, 0, child.describe())
    return [line for line in child.lines[OUT] if line.strip()]


@defer.inlineCallbacks
def create_users(case: TestCase, admin: RawRedisClient, stack: AclStack,
                 rekey: Mapping[str, TomlValue] | None = None):  # type: ignore[no-untyped-def]
    """Run ``ppbridge acl`` on the forwarder's config (its own line) and on each proxy's (its
    line, with the hashed password), and apply those lines as redis-cli would (split on spaces)."""
    forwarder_lines = yield printed_lines(case, stack.forwarder_config(ROUTES))
    lines = [forwarder_lines[0]]
    for name in ROUTES:
        lines += (yield printed_lines(case, stack.proxy_config(name, rekey=rekey)))
    for line in lines:
        case.assertEqual(admin.command(*line.split()), "OK", line)
    return lines


def users_of_named_connections(admin: RawRedisClient) -> dict[str, set[str]]:
    """CLIENT LIST: for each Redis user, the names of its connections named ``ppbridge-*``."""
    listing = admin.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    found: dict[str, set[str]] = {}
    for line in listing.decode().splitlines():
        fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
        if fields.get("name", "").startswith("ppbridge-"):
            found.setdefault(fields["user"], set()).add(fields["name"])
    return found


def refused(admin_port: int, user: str, password: str, *command: bytes | str) -> str:
    """Run one command as ``user`` on a connection of its own: "ok", or the error's first word."""
    client = RawRedisClient("127.0.0.1", admin_port)
    try:
        client.command("AUTH", user, password)
        client.command(*command)
        return "ok"
    except RedisReplyError as err:
        return str(err).split(" ", 1)[0].lstrip("-")
    finally:
        client.close()


class AclLinesTests(TestCase):
    """``ppbridge acl`` output, no Redis involved."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)

    def test_forwarder_config_prints_every_user_without_passwords(self) -> None:
        """A forwarder config whose redis.url names user ``fwd`` and whose password file is
        readable, with proxies alpha and beta and namespace ``acme``: exit 0; stdout is exactly
        three lines, the forwarder's (``&acme:*``, its commands, ``#`` + the SHA-256 of its
        password) and one per proxy (its own channels, ``acme:announce``, the publish
        selector, created ``off``: no password is known); stderr comments say how to turn
        the proxies' users on; the password appears nowhere."""
        path = write_forwarder_config(self.folder, "redis://fwd@redis.example:6379/0", "tcp:0", ROUTES)
        path.write_text(path.read_text().replace("[redis]\n", '[redis]\nnamespace = "acme"\n', 1))
        with_password_file(path, "s3cret-forwarder", "fw.password")
        status, out, err = call("acl", str(path))
        self.assertEqual(status, 0, err)
        self.assertEqual(out.splitlines(), [
            f"ACL SETUSER fwd reset on #{sha256('s3cret-forwarder')} resetchannels &acme:* -@all {FORWARDER_COMMANDS}",
            f"ACL SETUSER ppbridge-alpha reset off resetchannels &acme:p:alpha:* &acme:n:alpha:* "
            f"&acme:announce -@all {PROXY_COMMANDS} (+publish &acme:negotiate &acme:f:*)",
            f"ACL SETUSER ppbridge-beta reset off resetchannels &acme:p:beta:* &acme:n:beta:* "
            f"&acme:announce -@all {PROXY_COMMANDS} (+publish &acme:negotiate &acme:f:*)",
        ])
        comments = err.splitlines()
        self.assertTrue(all(line.startswith("#") for line in comments), comments)
        self.assertEqual(sum("creates the user off" in line for line in comments), 2, comments)
        self.assertNotIn("s3cret-forwarder", out + err)

    def test_proxy_config_prints_only_its_user(self) -> None:
        """A proxy config for ``alpha`` whose redis.url names no user, with a readable password
        file: stdout is alpha's line alone, user ``ppbridge-alpha``, password ``#`` + SHA-256;
        a comment asks for ``ppbridge-alpha@`` in redis.url; the password appears nowhere."""
        path = write_proxy_config(self.folder, "alpha", "redis://127.0.0.1:6379/0", "http://intranet:8000")
        with_password_file(path, "s3cret-alpha", "alpha.password")
        status, out, err = call("acl", str(path))
        self.assertEqual(status, 0, err)
        self.assertEqual(out.splitlines(), [
            f"ACL SETUSER ppbridge-alpha reset on #{sha256('s3cret-alpha')} resetchannels &ppbridge:p:alpha:* "
            f"&ppbridge:n:alpha:* &ppbridge:announce -@all {PROXY_COMMANDS} (+publish &ppbridge:negotiate "
            "&ppbridge:f:*)"])
        self.assertIn("put ppbridge-alpha@ in it", err)
        self.assertNotIn("s3cret-alpha", out + err)

    def test_unreadable_password_file_gives_the_placeholder(self) -> None:
        """A password file that is missing, or readable by others: exit 0 all the same, the
        line creates the user ``off`` and a comment names the file's problem."""
        for problem, prepare in (("no such file", lambda p: p.unlink()), ("too open", lambda p: p.chmod(0o644))):
            path = write_proxy_config(self.folder, "alpha", "redis://alpha@127.0.0.1:6379/0", "http://intranet:8000")
            with_password_file(path, "s3cret-alpha", "alpha.password")
            prepare(self.folder / "alpha.password")
            status, out, err = call("acl", str(path))
            self.assertEqual(status, 0, err)
            [line] = out.splitlines()
            self.assertIn(" reset off resetchannels ", line)
            self.assertIn(problem, err)
            self.assertNotIn("s3cret-alpha", out + err)

    def test_behind_sentinels_role_is_allowed(self) -> None:
        """A forwarder config with ``[redis] sentinels``: every printed user (the forwarder's
        and its proxies') may also run ROLE, which each connection asks behind sentinels; the
        same config without sentinels grants no ROLE."""
        path = write_forwarder_config(self.folder, "redis://127.0.0.1:6379/0", "tcp:0", ROUTES)
        _, plain, _ = call("acl", str(path))
        path.write_text(path.read_text().replace(
            "[redis]\n", '[redis]\nsentinels = ["127.0.0.1:26379"]\nmaster_name = "ppbridge"\n', 1))
        status, out, err = call("acl", str(path))
        self.assertEqual(status, 0, err)
        self.assertEqual([" +role" in line for line in out.splitlines()], [True, True, True])
        self.assertEqual([" +role" in line for line in plain.splitlines()], [False, False, False])

    def test_one_user_for_two_sides_is_refused(self) -> None:
        """A forwarder whose redis.url names user ``ppbridge-alpha`` (a proxy's user): exit 2,
        nothing on stdout, and the error says the user would serve two sides."""
        path = write_forwarder_config(self.folder, "redis://ppbridge-alpha@127.0.0.1:6379/0", "tcp:0", ROUTES)
        status, out, err = call("acl", str(path))
        self.assertEqual((status, out), (2, ""))
        self.assertIn("'ppbridge-alpha' would serve two sides", err)


class RefusalTests(TestCase):
    """ppbridge.redisperm without I/O: recognising a refusal, and its backoff."""

    def test_permission_errors_recognised(self) -> None:
        """NOPERM, NOAUTH and WRONGPASS are recognised in txredisapi's ResponseError, in the
        ValueError of its failed AUTH/SELECT and inside a Failure; a lost connection, another
        error reply and a word that merely starts with NOPERM are not."""
        self.assertEqual(
            [redisperm.code_of(e) for e in (
                txredisapi.ResponseError("NOPERM this user has no permissions to access one of the channels used "
                                         "as arguments"),
                ValueError("Redis error: could not auth: WRONGPASS invalid username-password pair or user is "
                           "disabled."),
                Failure(ValueError("Redis error: could not set dbid=0: NOAUTH Authentication required.")),
                txredisapi.ConnectionError("Lost connection"),
                txredisapi.ResponseError("unknown command 'FOO'"),
                txredisapi.ResponseError("NOPERMS"),
                "NOPERM as a string, not an error",
            )],
            ["NOPERM", "WRONGPASS", "NOAUTH", None, None, None, None])

    def test_one_line_per_backoff_step(self) -> None:
        """A refusal every 0.1 s for 120 s gets a line at 0, 1, 3, 7, 15, 31, 61 and 91 s only
        (1 s doubling to 30 s), each saying how many went unlogged since the previous one; the
        step may be retried (``due``) only once it is over."""
        refusals = redisperm.Refusals("u")
        lines: list[tuple[float, int]] = []
        for tenth in range(1201):
            now = tenth / 10
            logged, unlogged, _ = refusals.refused("k", now)
            if logged:
                lines.append((now, unlogged))
        self.assertEqual(lines, [(0.0, 0), (1.0, 9), (3.0, 19), (7.0, 39), (15.0, 79), (31.0, 159), (61.0, 299),
                                 (91.0, 299)])
        self.assertFalse(refusals.due("k", 120.9))
        self.assertTrue(refusals.due("k", 121.0))
        self.assertTrue(refusals.due("other", 0.0))

    def test_quiet_key_starts_afresh(self) -> None:
        """After QUIET seconds without a refusal, the next one is logged at once and its step
        is FIRST again (a second refusal FIRST later gets a line)."""
        refusals = redisperm.Refusals(None)
        for now in (0.0, 1.0, 3.0, 7.0):
            self.assertTrue(refusals.refused("k", now)[0])
        later = 7.0 + redisperm.QUIET + 0.5
        self.assertEqual(refusals.refused("k", later), (True, 0, redisperm.FIRST))
        self.assertTrue(refusals.refused("k", later + redisperm.FIRST)[0])

    def test_advice_names_user_command_and_fix(self) -> None:
        """NOPERM names the user (or the default user) and what was refused, and says to apply
        ``ppbridge acl``'s lines; WRONGPASS and NOAUTH point at redis.password_file."""
        self.assertEqual(redisperm.advice("NOPERM", "ppbridge-alpha", "SUBSCRIBE ns:p:alpha:00"),
                         "Redis user ppbridge-alpha may not SUBSCRIBE ns:p:alpha:00: " + redisperm.FIX)
        self.assertIn("default Redis user", redisperm.advice("NOPERM", None, "PING"))
        for code in ("WRONGPASS", "NOAUTH"):
            self.assertIn("redis.password_file", redisperm.advice(code, "u", "the publisher connection"))
        self.assertEqual(redisperm.describe("SUBSCRIBE", [b"a", b"b\r\n", b"c", b"d"]),
                         "SUBSCRIBE a, b\\x0d\\x0a, c and 1 more")


class AclOnRedisTests(TestCase):
    """A whole bridge on a real Redis, every side under the user ``ppbridge acl`` printed."""

    @defer.inlineCallbacks
    def test_bridge_serves_and_rotates_keys_under_the_printed_users(self):
        """Users created from the installed ``ppbridge acl``'s lines (the forwarder's from its
        config, each proxy's from its own); the forwarder and proxies alpha and beta log in as
        them: requests to both are answered 200 with the upstream's answer; alpha's key (period
        1 s) rotates, and a request after the rotation is answered 200 too. CLIENT LIST shows
        every ppbridge connection under its side's user, none under ``default``."""
        stack = AclStack(self)
        admin = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(admin.close)
        yield create_users(self, admin, stack, rekey=FAST_REKEY)
        yield stack.start(routes=ROUTES, rekey=FAST_REKEY)
        client = Client(self)
        for prefix in ("/a", "/b"):
            response, data = yield client.fetch(b"GET", stack.url + prefix + "/echo?acl")
            self.assertEqual(response.code, 200, data)
            self.assertIn(b"/echo?acl", data)
        forwarder = stack.forwarder
        [first] = [e.session.envelope.fingerprint for e in forwarder.candidates("alpha")]
        yield poll(lambda: [e.session.envelope.fingerprint for e in forwarder.candidates("alpha")] not in ([first], []),
                   WAIT, "alpha's key rotated")
        response, _ = yield client.fetch(b"GET", stack.url + "/a/echo?rotated")
        self.assertEqual(response.code, 200)
        connections = users_of_named_connections(admin)
        every = {"ppbridge-publisher", "ppbridge-subscriber", "ppbridge-public"}
        self.assertEqual(connections, {"ppbridge-forwarder": every, "ppbridge-alpha": every,
                                       "ppbridge-beta": every})

    @defer.inlineCallbacks
    def test_proxy_user_cannot_reach_another_proxys_or_the_forwarders_channels(self):
        """Logged in as beta's user (with beta's password), a raw client gets NOPERM for:
        SUBSCRIBE to alpha's data channel; PSUBSCRIBE to alpha's grant channels
        (``ppbridge:n:alpha:*``); PUBLISH on a grant channel of alpha's and on alpha's data
        channel; SUBSCRIBE to the forwarder's reply and control channels and to
        ``ppbridge:negotiate``. The same login may SUBSCRIBE to a data channel of beta's and
        PUBLISH on the forwarder's reply channel (what beta's process does), so the refusals
        are the channel rules at work, not a failed login."""
        stack = AclStack(self)
        admin = RawRedisClient("127.0.0.1", stack.redis.port)
        self.addCleanup(admin.close)
        yield create_users(self, admin, stack)
        yield stack.start(routes=ROUTES)
        forwarder, alpha = stack.forwarder, stack.proxies["alpha"]
        channels = Channels("ppbridge")
        password = stack.password_of("ppbridge-beta")

        def as_beta(*command: bytes | str) -> str:
            return refused(stack.redis.port, "ppbridge-beta", password, *command)

        attempts = {
            "SUBSCRIBE alpha's data channel": as_beta("SUBSCRIBE", alpha.data_channel),
            "PSUBSCRIBE alpha's grant channels": as_beta("PSUBSCRIBE", channels.proxy_patterns("alpha")[1]),
            "PUBLISH on alpha's grant channel": as_beta("PUBLISH", channels.negotiation_temp("alpha"), b"x"),
            "PUBLISH on alpha's data channel": as_beta("PUBLISH", alpha.data_channel, b"x"),
            "SUBSCRIBE the forwarder's reply channel": as_beta("SUBSCRIBE", channels.reply(forwarder.id)),
            "SUBSCRIBE the forwarder's control channel": as_beta("SUBSCRIBE", channels.forwarder_control(forwarder.id)),
            "SUBSCRIBE ppbridge:negotiate": as_beta("SUBSCRIBE", channels.negotiate),
        }
        self.assertEqual(attempts, {what: "NOPERM" for what in attempts})
        self.assertEqual(as_beta("SUBSCRIBE", channels.proxy_data("beta", b"\x00" * 8)), "ok")
        self.assertEqual(as_beta("PUBLISH", channels.reply(forwarder.id), b"x"), "ok")


class RefusedPermissionTests(TestCase):
    """A forwarder on a real Redis whose user lacks something, its time on a Clock: what it
    logs, how often it tries again, and that it heals once the ACL is fixed."""

    SECONDS = 120

    @defer.inlineCallbacks
    def start(self, breakage: tuple[str, ...]):  # type: ignore[no-untyped-def]
        """Users from ``ppbridge acl``, then ``ACL SETUSER ppbridge-forwarder <breakage>``; a
        forwarder (no HTTP face) whose timers and bus watchdog run on a Clock; what it logged
        of refusals, as (clock time, event)."""
        self.stack = AclStack(self)
        self.admin = RawRedisClient("127.0.0.1", self.stack.redis.port)
        self.addCleanup(self.admin.close)
        self.lines = yield create_users(self, self.admin, self.stack)
        self.assertEqual(self.admin.command("ACL", "SETUSER", "ppbridge-forwarder", *breakage), "OK")
        self.clock = Clock()
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.tracebacks: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "ppbridge.redisperm":
                self.events.append((self.clock.seconds(), event))
            elif "log_failure" in event:
                self.tracebacks.append(formatEvent(event))

        watcher = cast(ILogObserver, observer)
        globalLogPublisher.addObserver(watcher)
        self.addCleanup(globalLogPublisher.removeObserver, watcher)
        for name in ROUTES:
            key_pair(self.stack.folder, name)
        settings = load_forwarder_config(self.stack.forwarder_config(ROUTES))
        self.forwarder = ForwarderService(settings, RedisBus(settings.redis, self.clock, reactor), self.clock)
        self.stack.run(self.forwarder)

    def lines_by_key(self) -> dict[str, list[tuple[float, str]]]:
        found: dict[str, list[tuple[float, str]]] = {}
        for when, event in self.events:
            found.setdefault(event["key"], []).append((when, formatEvent(event)))
        return found

    @defer.inlineCallbacks
    def run_clock(self, seconds: int, settled: Any):  # type: ignore[no-untyped-def]
        """Advance the Clock one second at a time; after each, let the reactor run (a health
        check's PING is answered) and wait (real time) until ``settled()``: no retry of the
        bus is still waiting for Redis's answer."""
        for _ in range(seconds):
            self.clock.advance(1)
            yield deferLater(reactor, 0.01, lambda: None)
            yield poll(settled, WAIT, "the bus's retry answered", interval=0.005)

    def assert_backoff(self, times: list[float]) -> None:
        """At least five lines over SECONDS (it keeps trying, and says so), at most as many
        as backoff steps fit, each at least its step (1 s doubling to 30 s) after the last."""
        steps = [min(redisperm.MOST, redisperm.FIRST * 2 ** i) for i in range(len(times))]
        fit = sum(1 for i in range(len(steps)) if sum(steps[:i]) <= self.SECONDS)
        self.assertGreaterEqual(len(times), 5, times)
        self.assertLessEqual(len(times), fit, times)
        for i in range(1, len(times)):
            self.assertGreaterEqual(times[i] - times[i - 1], steps[i - 1], times)

    def subscriber_ids(self) -> dict[str, str]:
        """CLIENT LIST: the ids of the forwarder's two subscriber connections, by name."""
        listing = self.admin.command("CLIENT", "LIST")
        assert isinstance(listing, bytes)
        ids = {}
        for line in listing.decode().splitlines():
            fields = dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            if fields.get("user") == "ppbridge-forwarder" and fields.get("name") in ("ppbridge-subscriber",
                                                                                   "ppbridge-public"):
                ids[fields["name"]] = fields["id"]
        return ids

    @defer.inlineCallbacks
    def test_missing_subscribe_is_logged_once_per_backoff_step_then_recovers(self):
        """The forwarder's user lacks SUBSCRIBE (``-subscribe``). Over 120 s of Clock time its
        main and public subscriber connections each log lines naming the user, SUBSCRIBE, the
        channels refused and ``ppbridge acl``: at least five, no more than backoff steps fit,
        spaced by at least 1 s doubling to 30 s; no traceback; the bus is not connected, and
        neither connection was dropped and reopened (same CLIENT ids before and after). Once
        ``+subscribe`` is added, within 31 s of Clock time the bus is connected, Redis counts
        one subscriber on the control and reply channels and on ``ppbridge:negotiate``, and
        no further line is logged."""
        yield self.start(("-subscribe",))
        bus = self.forwarder.bus
        assert isinstance(bus, RedisBus)
        slots = (bus._main, bus._public)
        yield poll(lambda: all(s.denied is not None for s in slots), WAIT, "both subscriptions refused")
        yield poll(lambda: len(self.subscriber_ids()) == 2, WAIT, "both subscriber connections named")
        before = self.subscriber_ids()
        yield self.run_clock(self.SECONDS, lambda: all(s.denied is not None for s in slots))
        found = self.lines_by_key()
        self.assertEqual(sorted(found), ["public subscriber", "subscriber"])
        control, reply = (self.forwarder.channels.forwarder_control(self.forwarder.id),
                          self.forwarder.channels.reply(self.forwarder.id))
        wanted = {"subscriber": f"SUBSCRIBE {control.decode()}, {reply.decode()}",
                  "public subscriber": "SUBSCRIBE ppbridge:negotiate"}
        for key, lines in found.items():
            self.assert_backoff([when for when, _ in lines])
            for _, text in lines:
                self.assertIn(f"Redis user ppbridge-forwarder may not {wanted[key]}: run `ppbridge acl`", text)
        self.assertEqual(self.tracebacks, [])
        self.assertFalse(bus.connected)
        self.assertEqual(self.subscriber_ids(), before)

        logged = len(self.events)
        self.assertEqual(self.admin.command("ACL", "SETUSER", "ppbridge-forwarder", "+subscribe"), "OK")
        for _ in range(31):
            if bus.connected and bus._public.proto is not None:
                break
            yield self.run_clock(1, lambda: all(s.denied is not None or s.proto is not None for s in slots))
        self.assertTrue(bus.connected)
        counts = self.admin.command("PUBSUB", "NUMSUB", control, reply, b"ppbridge:negotiate")
        self.assertEqual(counts, [control, 1, reply, 1, b"ppbridge:negotiate", 1])
        self.assertEqual(len(self.events), logged)

    @defer.inlineCallbacks
    def test_wrong_password_is_logged_once_per_backoff_step_then_recovers(self):
        """The forwarder's user has another password than its password file (``resetpass
        >other``): each of its three connections fails AUTH; over 120 s of Clock time each
        logs lines saying Redis refused the password of ppbridge-forwarder and pointing at
        redis.password_file, at least five, no more than backoff steps fit, spaced by at least
        1 s doubling to 30 s. Once the line ``ppbridge acl`` printed is applied again, within
        31 s of Clock time the bus is connected."""
        yield self.start(("resetpass", ">other-password"))
        bus = self.forwarder.bus
        assert isinstance(bus, RedisBus)

        def factories() -> list[Any]:
            return [bus._pub_factory, bus._main.factory, bus._public.factory]

        def all_refused() -> bool:
            return all(f is not None and f.stopped for f in factories())

        yield poll(all_refused, WAIT, "the three connections refused")
        yield self.run_clock(self.SECONDS, all_refused)
        found = self.lines_by_key()
        self.assertEqual(sorted(found), ["public subscriber", "publisher", "subscriber"])
        for key, lines in found.items():
            self.assert_backoff([when for when, _ in lines])
            for _, text in lines:
                self.assertIn("Redis refused the password of user ppbridge-forwarder", text)
                self.assertIn("redis.password_file", text)
        self.assertFalse(bus.connected)
        self.assertEqual(self.tracebacks, [])

        self.assertEqual(self.admin.command(*self.lines[0].split()), "OK")
        yield self.run_clock(31, lambda: True)
        yield poll(lambda: bus.connected, WAIT, "the forwarder connected")
