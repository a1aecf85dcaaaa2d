"""Packaging and the command line: versions, the example configs shipped in the package,
``ppbridge check`` (endpoints, CA files, the config kind), keygen names, the systemd units and
the pidfile advice.

Tests that use :func:`call` run :func:`ppbridge.cli.main` in this process; the others run the
installed programs as child processes from a folder outside the repository (see
``tests/processes.py``), so they check what ``pip install`` put in place.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import shlex
import signal

from twisted.internet import defer
from twisted.trial.unittest import TestCase

import ppbridge
from ppbridge import cli
from ppbridge.redis_server import free_port
from ppbridge.scaffold import write_forwarder_config, write_proxy_config
from tests.processes import ERR, OUT, PPBRIDGE, REPO, TWISTD, run, spawn
from tests.support import key_pair, temp_folder
from tests.test_config import ca_pem
from tests import test_processes  # not its classes by name: pytest would run them twice here

KINDS = ("forwarder", "proxy")


def call(*argv: str) -> tuple[int, str, str]:
    """``ppbridge ARGV`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exit:  # argparse: --version, usage errors
            status = int(exit.code or 0)
    return status, out.getvalue(), err.getvalue()


class Versions(TestCase):
    """``--version`` of the three installed programs names ppbridge and its version."""

    @defer.inlineCallbacks
    def test_ppbridge_version(self):
        """``ppbridge --version`` prints exactly ``ppbridge <ppbridge.__version__>``, nothing on
        stderr, and exits 0."""
        child = yield run(self, temp_folder(self), [PPBRIDGE, "--version"])
        self.assertEqual(child.exit_code, 0, child.describe())
        self.assertEqual(child.lines[OUT], [f"ppbridge {ppbridge.__version__}"], child.describe())
        self.assertEqual([line for line in child.lines[ERR] if line.strip()], [], child.describe())

    @defer.inlineCallbacks
    def test_twistd_plugins_version(self):
        """``twistd ppforwarder --version`` and ``twistd ppproxy --version`` exit 0 and print
        ``ppbridge <version> (<tapname>)`` as their first line and Twisted's version as the
        second (no --config needed)."""
        from twisted import copyright

        folder = temp_folder(self)
        children = yield defer.gatherResults([run(self, folder, [TWISTD, tap, "--version"])
                                              for tap in ("ppforwarder", "ppproxy")])
        for tap, child in zip(("ppforwarder", "ppproxy"), children):
            self.assertEqual(child.exit_code, 0, child.describe())
            self.assertEqual(child.lines[OUT][:2], [f"ppbridge {ppbridge.__version__} ({tap})",
                                                    f"Twisted {copyright.version}"], child.describe())


class ExampleConfigs(TestCase):
    """The example configs travel in the package and ``ppbridge example-config`` prints them."""

    def test_checkout_prints_conf_files(self):
        """From a source checkout (ppbridge imported from the repository, nothing installed
        there), ``ppbridge example-config KIND`` exits 0 and prints conf/KIND.example.toml
        exactly, for both kinds."""
        for kind in KINDS:
            self.assertEqual(call("example-config", kind),
                             (0, (REPO / "conf" / f"{kind}.example.toml").read_text(), ""))

    @defer.inlineCallbacks
    def test_installed_command_prints_each_example(self):
        """``ppbridge example-config forwarder|proxy``, run from the install outside the
        repository, exits 0 and prints conf/KIND.example.toml exactly."""
        folder = temp_folder(self)
        children = yield defer.gatherResults([run(self, folder, [PPBRIDGE, "example-config", kind]) for kind in KINDS])
        for kind, child in zip(KINDS, children):
            self.assertEqual(child.exit_code, 0, child.describe())
            self.assertEqual(child.text(OUT), (REPO / "conf" / f"{kind}.example.toml").read_text().rstrip("\n"))

    def test_unknown_kind_is_a_usage_error(self):
        """``ppbridge example-config router`` exits 2 and prints nothing on stdout."""
        status, out, err = call("example-config", "router")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("invalid choice: 'router'", err)

    @defer.inlineCallbacks
    def test_plugin_help_points_to_example_config(self):
        """``twistd ppforwarder --help`` names ``ppbridge example-config forwarder`` and
        ``--pidfile=``; ``twistd ppproxy --help`` names ``ppbridge example-config proxy``."""
        folder = temp_folder(self)
        children = yield defer.gatherResults([run(self, folder, [TWISTD, tap, "--help"])
                                              for tap in ("ppforwarder", "ppproxy")])
        for kind, child in zip(KINDS, children):
            self.assertEqual(child.exit_code, 0, child.describe())
            text = " ".join(child.text(OUT).split())  # the help is wrapped at any space
            self.assertIn(f"`ppbridge example-config {kind}` prints", text, child.describe())
            self.assertIn("--pidfile=", text, child.describe())


class InCheck(TestCase):
    """``ppbridge check`` in this process: which loader a file gets, and the new validations."""

    def setUp(self) -> None:
        self.folder = temp_folder(self)
        key_pair(self.folder, "forwarder")
        key_pair(self.folder, "alpha")
        self.forwarder = write_forwarder_config(self.folder, "redis://127.0.0.1:6390/0", "tcp:0:interface=127.0.0.1",
                                                {"alpha": {"path_prefix": "/"}})
        self.proxy = write_proxy_config(self.folder, "alpha", "redis://127.0.0.1:6390/0", "http://127.0.0.1:9/")

    def test_kind_from_the_one_table(self):
        """A file with only [forwarder] is checked as a forwarder, one with only [proxy] as a
        proxy, without --kind: exit 0 and the "ok" line of that kind."""
        status, out, _ = call("check", str(self.forwarder))
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith(f"{self.forwarder}: ok: forwarder on tcp:0:interface=127.0.0.1"), out)
        status, out, _ = call("check", str(self.proxy))
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith(f"{self.proxy}: ok: proxy 'alpha'"), out)

    def test_ambiguous_file_needs_kind(self):
        """A file with both [forwarder] and [proxy], or neither, is a one-line error (exit 2)
        naming the file and saying to pass --kind; it is not guessed from a substring (a
        forwarder route named "proxy" used to make it a proxy config)."""
        both = self.folder / "both.toml"
        both.write_text(self.forwarder.read_text().replace("[admin]", "[proxy]\nname = 'alpha'\n[admin]"))
        neither = self.folder / "neither.toml"
        neither.write_text('[redis]\nurl = "redis://127.0.0.1:6390/0"\n[proxies.proxy]\npublic_key = "keys/alpha.pub"\n'
                           'path_prefix = "/"\n')
        for path, has in ((both, "both [forwarder] and [proxy] tables"),
                          (neither, "neither a [forwarder] nor a [proxy] table")):
            status, out, err = call("check", str(path))
            self.assertEqual((status, out), (2, ""))
            self.assertEqual(err, f"ppbridge check: {path}: has {has}; pass --kind forwarder or --kind proxy\n")

    def test_kind_given_wins(self):
        """--kind proxy on a forwarder file runs the proxy loader (its error names the
        [forwarder] table as unknown); --kind forwarder on the same file passes."""
        status, _, err = call("check", "--kind", "proxy", str(self.forwarder))
        self.assertEqual(status, 2)
        self.assertIn(f"{self.forwarder}: forwarder: unknown table", err)
        self.assertEqual(call("check", "--kind", "forwarder", str(self.forwarder))[0], 0)

    def test_unreadable_file_reported_by_loader(self):
        """A missing file is the loader's one-line "no such file", exit 2, even without --kind."""
        status, _, err = call("check", str(self.folder / "nowhere.toml"))
        self.assertEqual((status, err), (2, f"ppbridge check: {self.folder / 'nowhere.toml'}: no such file\n"))


class StartChecks(TestCase):
    """A bad endpoint or CA file stops ``ppbridge check`` and the twistd service alike, with
    the same single line naming file, key and problem (``BadConfigs.assert_rejected``)."""

    setUp = test_processes.BadConfigs.setUp
    forwarder_config = test_processes.BadConfigs.forwarder_config
    proxy_config = test_processes.BadConfigs.proxy_config
    assert_rejected = test_processes.BadConfigs.assert_rejected

    def test_forwarder_listen_not_a_port(self):
        """forwarder.listen = "tcp:notaport": the line names the key, the endpoint and
        int()'s complaint."""
        return self.assert_rejected("ppforwarder", self.forwarder_config(listen="tcp:notaport"),
                                    ["forwarder.listen", "not a valid endpoint 'tcp:notaport'", "'notaport'"])

    def test_proxy_admin_listen_unknown_type(self):
        """[admin] listen = "tpc:9181" in a proxy config: the line names admin.listen and the
        unknown endpoint type."""
        config = write_proxy_config(self.folder, "alpha", self.redis_url, "http://127.0.0.1:9/", admin="tpc:9181")
        return self.assert_rejected("ppproxy", config, ["admin.listen", "Unknown endpoint type: 'tpc'"])

    def test_ca_file_not_pem(self):
        """redis.ca_file naming a file that holds no PEM certificate: the line names the key and
        the CA file."""
        config = self.proxy_config()
        (self.folder / "ca.pem").write_text("not a certificate\n")
        config.write_text(config.read_text().replace('url = "redis://', 'ca_file = "ca.pem"\nurl = "rediss://', 1))
        return self.assert_rejected("ppproxy", config, ["redis.ca_file", str(self.folder / "ca.pem"),
                                                        "not a PEM bundle of CA certificates"])

    @defer.inlineCallbacks
    def test_good_ca_file_passes_check(self):
        """The same config with a real PEM certificate as ca_file passes ``ppbridge check``."""
        config = self.proxy_config()
        (self.folder / "ca.pem").write_bytes(ca_pem())
        config.write_text(config.read_text().replace('url = "redis://', 'ca_file = "ca.pem"\nurl = "rediss://', 1))
        child = yield run(self, self.folder, [PPBRIDGE, "check", str(config)])
        self.assertEqual(child.exit_code, 0, child.describe())


class KeygenNames(TestCase):
    """``ppbridge keygen NAME`` takes proxy names (and "forwarder") only."""

    @defer.inlineCallbacks
    def test_path_like_names_refused(self):
        """``bad/name``, ``../x``, ``.hidden`` and ``-`` are each one stderr line naming the
        name, exit status 2, and nothing is created: not in --out, not next to it, and --out
        itself is not made."""
        folder = temp_folder(self)
        out = folder / "out" / "keys"
        before = sorted(folder.rglob("*"))
        for name in ("bad/name", "../x", ".hidden", "-"):
            child = yield run(self, folder, [PPBRIDGE, "keygen", "--bits", "2048", "--out", str(out), "--", name])
            self.assertEqual(child.exit_code, 2, child.describe())
            errors = [line for line in child.lines[ERR] if line.strip()]
            self.assertEqual(len(errors), 1, child.describe())
            self.assertIn(f"{name!r}: not a valid name", errors[0])
            self.assertNotIn("Traceback", child.text(ERR))
        self.assertEqual(sorted(folder.rglob("*")), before)

    def test_forwarder_and_proxy_names_accepted(self):
        """"forwarder" and a proxy name with dots, dashes and underscores are written to --out."""
        out = temp_folder(self) / "k"
        for name in ("forwarder", "site-2.office_a"):
            status, stdout, err = call("keygen", name, "--out", str(out), "--bits", "2048")
            self.assertEqual((status, err), (0, ""))
            self.assertIn(f"private key: {out / (name + '.key')}", stdout)
        self.assertEqual(sorted(p.name for p in out.iterdir()),
                         ["forwarder.key", "forwarder.pub", "site-2.office_a.key", "site-2.office_a.pub"])


def unit(tap: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(interpolation=None, strict=True)
    parsed.optionxform = str  # type: ignore[assignment,method-assign]
    parsed.read_string((REPO / "contrib" / "systemd" / f"{tap}.service").read_text())
    return parsed


class SystemdUnits(TestCase):
    """contrib/systemd/*.service run the services as documented, without a pidfile."""

    def test_units(self):
        """Each unit runs ``twistd -n --pidfile= TAP --config /etc/ppbridge/KIND.toml`` (an
        absolute twistd path), restarts always, as a dedicated non-root user, with
        NoNewPrivileges, ProtectSystem=strict, /etc/ppbridge read-only and a private /tmp."""
        for tap, kind in (("ppforwarder", "forwarder"), ("ppproxy", "proxy")):
            service = unit(tap)["Service"]
            argv = shlex.split(service["ExecStart"])
            self.assertTrue(argv[0].startswith("/") and argv[0].endswith("/twistd"), argv)
            self.assertEqual(argv[1:], ["-n", "--pidfile=", tap, "--config", f"/etc/ppbridge/{kind}.toml"])
            self.assertEqual(service["Restart"], "always")
            self.assertNotIn(service["User"], ("", "root", "0", "nobody"))
            self.assertEqual((service["NoNewPrivileges"], service["ProtectSystem"], service["PrivateTmp"]),
                             ("yes", "strict", "yes"))
            self.assertIn("/etc/ppbridge", service["ReadOnlyPaths"].split())
            self.assertEqual(unit(tap)["Install"]["WantedBy"], "multi-user.target")


class Pidfiles(TestCase):
    """Two twistd services started from one folder, as the units start them."""

    @defer.inlineCallbacks
    def test_units_command_line_runs_two_services_in_one_folder(self):
        """The units' ExecStart arguments (config path replaced) start a forwarder and a proxy
        from one folder at the same time: both come up (their admin sites start), neither
        writes twistd.pid there, and both stop on SIGTERM. Without ``--pidfile=``, the second
        twistd refuses to start because of the first one's twistd.pid — what the option is
        for."""
        folder = temp_folder(self)
        key_pair(folder, "forwarder")
        key_pair(folder, "alpha")
        redis = f"redis://127.0.0.1:{free_port()}/0"  # nobody there: the services keep retrying
        any_port = "tcp:0:interface=127.0.0.1"
        configs = {
            "ppforwarder": write_forwarder_config(folder, redis, any_port, {"alpha": {"path_prefix": "/"}},
                                                  admin=any_port),
            "ppproxy": write_proxy_config(folder, "alpha", redis, "http://127.0.0.1:9/", admin=any_port),
        }
        children = {}
        for tap, config in configs.items():
            argv = shlex.split(unit(tap)["Service"]["ExecStart"])[1:]
            argv[argv.index("--config") + 1] = str(config)
            children[tap] = spawn(self, folder, [TWISTD, *argv], name=tap)
        yield defer.gatherResults([child.wait_for(r"starting on \d+") for child in children.values()])
        self.assertFalse((folder / "twistd.pid").exists())
        for child in children.values():
            child.signal("TERM")
        ended = yield defer.gatherResults([child.wait_end() for child in children.values()])
        for child in ended:  # twistd ends a SIGTERM stop by killing itself with SIGTERM
            self.assertIn((child.exit_code, child.exit_signal), [(0, None), (None, signal.SIGTERM)],
                          child.describe())

        first = spawn(self, folder, [TWISTD, "-n", "ppforwarder", "--config", str(configs["ppforwarder"])],
                      name="first")
        yield first.wait_for(r"starting on \d+")
        self.assertTrue((folder / "twistd.pid").exists())
        second = yield run(self, folder, [TWISTD, "-n", "ppproxy", "--config", str(configs["ppproxy"])])
        self.assertNotEqual(second.exit_code, 0, second.describe())
        self.assertIn("Another twistd server is running", second.text(ERR), second.describe())
