"""The installed programs as users run them: ``twistd ppforwarder`` / ``twistd ppproxy`` and the
``ppbridge`` command, each a child process started from the venv's own scripts in a folder
outside the repository, so the installed package (plugins included) is what runs.

Every wait is for a line the child prints, bounded by ``addTimeout``; every child is stopped
and reaped in cleanup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from ppbridge.redis_server import free_port
from ppbridge.sampleapp import make_site
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from tests.processes import DEMO_TIMEOUT, ERR, OUT, PPBRIDGE, REPO, TWISTD, refuses_connections, run, spawn
from tests.redisclient import RawRedisClient
from tests.support import Client, key_pair, listen, start_redis, temp_folder

def header_values(echo: dict, name: str) -> list[str]:
    """Values of a header in the sample app's /echo JSON (names compared case-insensitively)."""
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


class PluginDiscovery(TestCase):
    """The twistd plugins are found in the installed package (not the source tree)."""

    @defer.inlineCallbacks
    def test_get_plugins_finds_both_tapnames(self):
        """In a fresh interpreter outside the repository, getPlugins(IServiceMaker) yields the
        tapnames ppforwarder and ppproxy, and ppbridge is imported from the install."""
        folder = temp_folder(self)
        code = ("import ppbridge; from twisted.plugin import getPlugins;"
                " from twisted.application.service import IServiceMaker;"
                " print('module', ppbridge.__file__);"
                " [print('tapname', p.tapname) for p in getPlugins(IServiceMaker)]")
        child = yield run(self, folder, [sys.executable, "-c", code])
        self.assertEqual(child.exit_code, 0, child.describe())
        module = [line.split(" ", 1)[1] for line in child.lines[OUT] if line.startswith("module ")]
        self.assertEqual(len(module), 1, child.describe())
        self.assertFalse(Path(module[0]).resolve().is_relative_to(REPO / "ppbridge"),
                         f"ppbridge came from the source tree, not the install: {module[0]}")
        tapnames = {line.split(" ", 1)[1] for line in child.lines[OUT] if line.startswith("tapname ")}
        self.assertLessEqual({"ppforwarder", "ppproxy"}, tapnames, child.describe())

    @defer.inlineCallbacks
    def test_twistd_help_lists_both_commands(self):
        """``twistd --help`` run from outside the repository lists ppforwarder and ppproxy."""
        folder = temp_folder(self)
        child = yield run(self, folder, [TWISTD, "--help"])
        self.assertEqual(child.exit_code, 0, child.describe())
        commands = {line.split()[0] for line in child.lines[OUT] if line.startswith("    ") and line.split()}
        self.assertIn("ppforwarder", commands, child.describe())
        self.assertIn("ppproxy", commands, child.describe())


class TwistdBridge(TestCase):
    """``twistd -n ppforwarder`` and ``twistd -n ppproxy`` as users run them, over a private Redis."""

    @defer.inlineCallbacks
    def test_request_goes_through_twistd_forwarder_and_proxy_with_overrides(self):
        """With both configs naming a Redis nobody listens on and the forwarder config naming
        another port, ``--redis`` and ``--listen`` on the command line win: the proxy gets a key,
        the forwarder confirms it, a GET on the --listen port reaches the sample app, the
        config's own listen port stays closed, and both exit 0 on SIGTERM."""
        folder = temp_folder(self)
        redis = start_redis(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        site, app = make_site()
        upstream = yield listen(self, site)
        wrong_redis = f"redis://127.0.0.1:{free_port()}/0"
        config_port, cli_port = free_port(), free_port()
        fconf = write_forwarder_config(folder, wrong_redis, f"tcp:{config_port}:interface=127.0.0.1",
                                       {"alpha": {"path_prefix": "/"}})
        pconf = write_proxy_config(folder, "alpha", wrong_redis, upstream)
        run_dir = temp_folder(self)  # cwd: neither the repo nor the config folder
        forwarder = spawn(self, run_dir, [TWISTD, "-n", "--pidfile=", "ppforwarder", "--config", str(fconf),
                                          "--redis", redis.url,
                                          "--listen", f"tcp:{cli_port}:interface=127.0.0.1"], "forwarder")
        proxy = spawn(self, run_dir, [TWISTD, "-n", "--pidfile=", "ppproxy", "--config", str(pconf),
                                      "--redis", redis.url], "proxy")
        yield defer.gatherResults([
            proxy.wait_for(r"key \S+ from forwarder"),
            forwarder.wait_for(r"proxy alpha \(instance \S+\) confirmed key"),
        ], consumeErrors=True).addErrback(lambda f: f.value.subFailure)

        client = Client(self)
        response, body = yield client.fetch(b"GET", f"http://127.0.0.1:{cli_port}/echo/x?via=twistd")
        self.assertEqual(response.code, 200, body)
        echo = json.loads(body)
        self.assertEqual((echo["method"], echo["uri"]), ("GET", "/echo/x?via=twistd"))
        self.assertEqual(app.hits["/echo/x"], 1)
        self.assertEqual(header_values(echo, "X-Forwarded-For"), ["127.0.0.1"])
        yield client.pool.closeCachedConnections()
        self.assertTrue(refuses_connections(config_port), "the config's listen was used despite --listen")

        for child in (forwarder, proxy):
            child.signal("TERM")
        for child in (forwarder, proxy):
            yield child.wait_end()
            # twistd re-raises the stopping signal once shut down (so the status shows it).
            self.assertIn((child.exit_code, child.exit_signal), [(0, None), (None, signal.SIGTERM)],
                          child.describe())
            self.assertIn("Server Shut Down.", child.text(OUT), child.describe())
            self.assertNotIn("Traceback", child.text(OUT) + child.text(ERR), child.describe())


class BadConfigs(TestCase):
    """A bad config stops twistd and ``ppbridge check`` with one line naming file and key."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        self.redis_url = "redis://127.0.0.1:6390/0"  # never contacted: loading fails first

    def forwarder_config(self, routes: dict | None = None, **forwarder: Any) -> Path:
        return write_forwarder_config(self.folder, self.redis_url, "tcp:0:interface=127.0.0.1",
                                      {"alpha": {"path_prefix": "/"}} if routes is None else routes,
                                      forwarder=forwarder)

    def proxy_config(self, **settings: Any) -> Path:
        return write_proxy_config(self.folder, "alpha", self.redis_url, "http://127.0.0.1:9/", settings=settings)

    @defer.inlineCallbacks
    def assert_rejected(self, tap: str, config: Path, needles: Sequence[str]):  # type: ignore[no-untyped-def]
        """twistd TAP --config CONFIG and ppbridge check CONFIG both refuse: non-zero (check: 2),
        exactly one non-empty stderr line holding the file name and every needle, no traceback."""
        twistd, check = yield defer.gatherResults([
            run(self, self.folder, [TWISTD, "-n", "--pidfile=", tap, "--config", str(config)]),
            run(self, self.folder, [PPBRIDGE, "check", str(config)]),
        ], consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        for child, codes in ((twistd, None), (check, {2})):
            self.assertIsNone(child.exit_signal, child.describe())
            if codes is None:
                self.assertNotEqual(child.exit_code, 0, child.describe())
            else:
                self.assertIn(child.exit_code, codes, child.describe())
            errors = [line for line in child.lines[ERR] if line.strip()]
            self.assertEqual(len(errors), 1, child.describe())
            for needle in (str(config), *needles):
                self.assertIn(needle, errors[0], child.describe())
            self.assertNotIn("Traceback", child.text(OUT) + child.text(ERR), child.describe())

    def test_missing_file(self):
        """A config path that does not exist: the message names the file and says so."""
        return self.assert_rejected("ppforwarder", self.folder / "nowhere.toml", ["no such file"])

    def test_invalid_toml(self):
        """A file that is not TOML: the message names the file and says invalid TOML."""
        path = self.folder / "broken.toml"
        path.write_text("[forwarder\nlisten = \n")
        return self.assert_rejected("ppproxy", path, ["invalid TOML"])

    def test_unknown_key(self):
        """A misspelt key is refused by name (forwarder.request_timeuot), not ignored."""
        return self.assert_rejected("ppforwarder", self.forwarder_config(request_timeuot=3),
                                    ["forwarder.request_timeuot"])

    def test_wrong_type_forwarder(self):
        """A string where a number belongs is refused naming forwarder.request_timeout."""
        return self.assert_rejected("ppforwarder", self.forwarder_config(request_timeout="soon"),
                                    ["forwarder.request_timeout"])

    def test_wrong_type_proxy(self):
        """A boolean where a number belongs is refused naming proxy.upstream_timeout."""
        return self.assert_rejected("ppproxy", self.proxy_config(upstream_timeout=True),
                                    ["proxy.upstream_timeout"])

    def test_unreadable_signing_key(self):
        """A signing_key path that cannot be read (a directory) is refused naming
        forwarder.signing_key."""
        path = self.forwarder_config()
        key = self.folder / "keys" / "forwarder.key"
        key.unlink()
        key.mkdir()
        return self.assert_rejected("ppforwarder", path, ["forwarder.signing_key"])

    def test_private_key_file_is_not_a_key(self):
        """A private_key file (mode 0600) holding no PEM key is refused naming proxy.private_key."""
        path = self.proxy_config()
        key = self.folder / "keys" / "alpha.key"
        key.write_text("not a key\n")
        key.chmod(0o600)
        return self.assert_rejected("ppproxy", path, ["proxy.private_key"])

    def test_public_key_file_is_not_a_key(self):
        """A proxy's public_key file holding no PEM key is refused naming proxies.alpha.public_key."""
        path = self.forwarder_config()
        (self.folder / "keys" / "alpha.pub").write_text("ssh-rsa AAAA nonsense\n")
        return self.assert_rejected("ppforwarder", path, ["proxies.alpha.public_key"])

    def test_private_key_readable_by_others(self):
        """A private key others may read (0644) is refused naming proxy.private_key."""
        path = self.proxy_config()
        (self.folder / "keys" / "alpha.key").chmod(0o644)
        return self.assert_rejected("ppproxy", path, ["proxy.private_key"])

    def test_forwarder_without_proxies(self):
        """A forwarder config with no [proxies.NAME] table is refused naming proxies."""
        return self.assert_rejected("ppforwarder", self.forwarder_config(routes={}), ["proxies"])

    def test_route_without_prefix_or_hosts(self):
        """A [proxies.alpha] table with neither path_prefix nor hosts is refused naming proxies.alpha."""
        return self.assert_rejected("ppforwarder", self.forwarder_config(routes={"alpha": {}}), ["proxies.alpha"])


class KeyCommands(TestCase):
    """``ppbridge keygen`` and ``ppbridge fingerprint``."""

    @defer.inlineCallbacks
    def test_keygen_writes_private_pair_and_fingerprint_matches(self):
        """keygen NAME --out DIR writes DIR/NAME.key (mode 0600) and DIR/NAME.pub, and prints
        the same "fingerprint: SHA256:..." that ``ppbridge fingerprint`` gives for the .pub
        and for the .key."""
        folder = temp_folder(self)
        out = folder / "made" / "here"
        child = yield run(self, folder, [PPBRIDGE, "keygen", "alpha", "--out", str(out), "--bits", "2048"])
        self.assertEqual(child.exit_code, 0, child.describe())
        key, pub = out / "alpha.key", out / "alpha.pub"
        self.assertEqual(stat.S_IMODE(key.stat().st_mode), 0o600)
        self.assertIn(b"PRIVATE KEY", key.read_bytes())
        self.assertIn(b"BEGIN PUBLIC KEY", pub.read_bytes())
        printed = [m.group(1) for m in map(re.compile(r"^fingerprint: (SHA256:\S+)$").match, child.lines[OUT]) if m]
        self.assertEqual(len(printed), 1, child.describe())
        of_pub, of_key = yield defer.gatherResults([
            run(self, folder, [PPBRIDGE, "fingerprint", str(pub)]),
            run(self, folder, [PPBRIDGE, "fingerprint", str(key)]),
        ])
        for each in (of_pub, of_key):
            self.assertEqual(each.exit_code, 0, each.describe())
            self.assertEqual([line for line in each.lines[OUT] if line], printed, each.describe())

    @defer.inlineCallbacks
    def test_keygen_refuses_to_overwrite(self):
        """A second keygen for the same name and folder exits non-zero with a one-line
        message and leaves both existing files as they were."""
        folder = temp_folder(self)
        args = [PPBRIDGE, "keygen", "alpha", "--out", str(folder), "--bits", "2048"]
        first = yield run(self, folder, args)
        self.assertEqual(first.exit_code, 0, first.describe())
        key, pub = folder / "alpha.key", folder / "alpha.pub"
        before = (key.read_bytes(), pub.read_bytes())
        second = yield run(self, folder, args)
        self.assertNotEqual(second.exit_code, 0, second.describe())
        errors = [line for line in second.lines[ERR] if line.strip()]
        self.assertEqual(len(errors), 1, second.describe())
        self.assertIn(str(key), errors[0])
        self.assertNotIn("Traceback", second.text(ERR))
        self.assertEqual((key.read_bytes(), pub.read_bytes()), before)
        self.assertEqual(stat.S_IMODE(key.stat().st_mode), 0o600)


def redis_pid(port: int) -> int | None:
    """The process id of the redis-server answering on ``port``, if one does."""
    try:
        with RawRedisClient("127.0.0.1", port, timeout=2) as conn:
            return int(conn.info("server")["process_id"])
    except (OSError, KeyError, ValueError):
        return None


def kill_if_redis(pid: int) -> None:
    """Cleanup for a failed demo test: SIGKILL the pid if it is still a redis-server."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"redis-server" in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Demo(TestCase):
    """``ppbridge demo``: the whole chain in one process, and nothing left behind."""

    @defer.inlineCallbacks
    def test_demo_serves_then_stops_everything_on_ctrl_c(self):
        """The demo prints its URL, answers / and /echo through the bridge (the echo shows
        X-Forwarded-For), and on SIGINT exits 0 saying nothing is left running, with its
        redis-server gone (its port refuses connections) and its temporary folder removed."""
        folder = temp_folder(self)
        port = free_port()
        demo = spawn(self, folder, [PPBRIDGE, "demo", "--port", str(port)], "ppbridge demo")
        yield demo.wait_for(rf"^  open   http://127\.0\.0\.1:{port}/$", timeout=DEMO_TIMEOUT)
        redis_port = int((yield demo.wait_for(r"Redis on redis://127\.0\.0\.1:(\d+)/0", timeout=1)).group(1))
        keys_folder = Path((yield demo.wait_for(r"Keys and configs: (\S+)$", timeout=1)).group(1))
        pid = redis_pid(redis_port)
        self.assertIsNotNone(pid, f"no redis-server answering on {redis_port}\n{demo.describe()}")
        self.addCleanup(kill_if_redis, pid)
        self.assertTrue(keys_folder.is_dir(), demo.describe())

        client = Client(self)
        url = f"http://127.0.0.1:{port}/"
        response, body = yield client.fetch(b"GET", url)
        self.assertEqual(response.code, 200, body)
        self.assertIn(b"X-Forwarded-For", body)
        response, body = yield client.fetch(b"GET", url + "echo?hello=world")
        self.assertEqual(response.code, 200, body)
        echo = json.loads(body)
        self.assertEqual(echo["uri"], "/echo?hello=world")
        self.assertEqual(header_values(echo, "X-Forwarded-For"), ["127.0.0.1"])
        yield client.pool.closeCachedConnections()

        demo.signal("INT")
        yield demo.wait_end()
        self.assertEqual((demo.exit_code, demo.exit_signal), (0, None), demo.describe())
        self.assertIn("nothing left running", demo.text(OUT))
        self.assertTrue(refuses_connections(redis_port), f"redis-server still up on {redis_port}")
        self.assertFalse(keys_folder.exists(), f"{keys_folder} left behind")
