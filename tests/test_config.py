"""Tests for ppbridge.config: loading, defaults, overrides and one-line error messages."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from twisted.trial.unittest import TestCase

from ppbridge import keys
from ppbridge.config import (
    ForwarderSettings,
    ProxySettings,
    RekeySettings,
    load_forwarder_config,
    load_proxy_config,
)
from ppbridge.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
_PAIRS: dict[str, tuple[bytes, bytes]] = {}

ROUTE = """
[proxies.intranet]
public_key = "keys/intranet.pub"
path_prefix = "/"
"""
FORWARDER = ROUTE + """
[forwarder]
signing_key = "keys/forwarder.key"
"""  # extra lines appended by a test land in [forwarder]
PROXY = """
[proxy]
name = "intranet"
private_key = "keys/intranet.key"
forwarder_key = "keys/forwarder.pub"
upstream = "http://127.0.0.1:8000"
"""


def install_key_pair(name: str, out_dir: Path) -> None:
    """Put ``name.key`` (0600) and ``name.pub`` in out_dir; each pair is generated once per run."""
    if name not in _PAIRS:
        key_path, pub_path, _ = keys.write_key_pair(name, out_dir, bits=2048)
        _PAIRS[name] = (key_path.read_bytes(), pub_path.read_bytes())
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = _PAIRS[name]
    fd = os.open(out_dir / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    (out_dir / f"{name}.pub").write_bytes(public)


def ca_pem() -> bytes:
    """A self-signed CA certificate in PEM (a fresh EC key; nothing is written)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ppbridge test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


class ConfigTestCase(TestCase):
    """A temporary folder with key pairs in keys/ and helpers to write and load configs."""

    def setUp(self) -> None:
        # Not self.mktemp(): it is relative to the working directory, which under pytest is
        # the repository itself.
        self.dir = Path(tempfile.mkdtemp(prefix="ppbridge-config-test-"))
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        for name in ("forwarder", "intranet", "wiki"):
            install_key_pair(name, self.dir / "keys")

    def write(self, text: str, name: str = "conf.toml") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def forwarder(self, extra: str = "", base: str = FORWARDER, **kw: Any) -> ForwarderSettings:
        return load_forwarder_config(self.write(base + extra), **kw)

    def proxy(self, extra: str = "", base: str = PROXY, **kw: Any) -> ProxySettings:
        return load_proxy_config(self.write(base + extra), **kw)

    def fails(self, load: Callable[..., object], *args: Any, **kw: Any) -> str:
        """The message of the ConfigError ``load`` raises, checked to be a single line."""
        message = str(self.assertRaises(ConfigError, load, *args, **kw))
        self.assertNotIn("\n", message)
        return message

    def assertFileKeyError(self, message: str, key: str, *fragments: str) -> None:
        """``message`` is ``<this test's conf file>: <key>: ...`` and holds every fragment."""
        self.assertTrue(message.startswith(f"{self.dir / 'conf.toml'}: {key}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)


class ExampleFileTests(ConfigTestCase):
    def copy_example(self, name: str) -> Path:
        target = self.dir / name
        shutil.copyfile(CONF / name, target)
        return target

    def test_forwarder_example_loads(self) -> None:
        """conf/forwarder.example.toml loads when its key files exist at its relative paths."""
        settings = load_forwarder_config(self.copy_example("forwarder.example.toml"))
        self.assertEqual(settings.signing_key_path, self.dir / "keys" / "forwarder.key")
        self.assertEqual([r.name for r in settings.proxies], ["intranet", "wiki"])
        self.assertEqual(settings.proxies[1].path_prefix, "/wiki")

    def test_proxy_example_loads(self) -> None:
        """conf/proxy.example.toml loads when its key files exist at its relative paths."""
        settings = load_proxy_config(self.copy_example("proxy.example.toml"))
        self.assertEqual(settings.name, "intranet")
        self.assertEqual(settings.forwarder_key_path, self.dir / "keys" / "forwarder.pub")


class FileErrorTests(ConfigTestCase):
    def test_missing_file(self) -> None:
        """A missing file is reported as '<file>: no such file'."""
        path = self.dir / "nope.toml"
        self.assertEqual(self.fails(load_forwarder_config, path), f"{path}: no such file")

    def test_unreadable_file(self) -> None:
        """A path that cannot be read (here a folder) is '<file>: cannot read (...)'."""
        message = self.fails(load_proxy_config, self.dir)
        self.assertTrue(message.startswith(f"{self.dir}: cannot read ("), message)

    def test_invalid_toml(self) -> None:
        """A TOML syntax error is '<file>: invalid TOML: <tomllib message>'."""
        path = self.write("[forwarder\n")
        message = self.fails(load_forwarder_config, path)
        self.assertTrue(message.startswith(f"{path}: invalid TOML: "), message)
        self.assertIn("line 1", message)

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are a TOML error, not a UnicodeDecodeError."""
        path = self.dir / "conf.toml"
        path.write_bytes(b'[proxy]\nname = "\xff"\n')
        self.assertIn(": invalid TOML: not UTF-8", self.fails(load_proxy_config, path))


class UnknownKeyTests(ConfigTestCase):
    def test_typo_suggests_closest_key(self) -> None:
        """A misspelt key is unknown, and the closest valid key is suggested."""
        message = self.fails(self.forwarder, "reqest_timeout = 3\n")
        self.assertFileKeyError(message, "forwarder.reqest_timeout", "unknown key (did you mean request_timeout?)")

    def test_unknown_key_without_suggestion(self) -> None:
        """An unknown key with no close match gets no suggestion."""
        message = self.fails(self.proxy, "[rekey]\nzzzzzz = 1\n")
        self.assertFileKeyError(message, "rekey.zzzzzz", "unknown key")
        self.assertNotIn("did you mean", message)

    def test_unknown_table(self) -> None:
        """An unknown table is reported with a suggestion."""
        self.assertFileKeyError(self.fails(self.proxy, "[rekeys]\nmode = 'fixed'\n"), "rekeys",
                                "unknown table (did you mean rekey?)")

    def test_unknown_key_in_route(self) -> None:
        """Keys of a [proxies.NAME] table are checked too."""
        message = self.fails(self.forwarder, "[proxies.wiki]\npublic_key = 'keys/wiki.pub'\nhost = ['a.example']\n")
        self.assertFileKeyError(message, "proxies.wiki.host", "did you mean hosts?")

    def test_table_given_as_value(self) -> None:
        """A known table written as a plain value is a type error."""
        self.assertFileKeyError(self.fails(self.proxy, base='admin = "tcp:1"\n' + PROXY), "admin",
                                "expected a table, got string 'tcp:1'")


class TypeAndRangeTests(ConfigTestCase):
    def test_string_for_number(self) -> None:
        """A string where a number belongs names the type and the value."""
        self.assertFileKeyError(self.fails(self.forwarder, 'request_timeout = "30s"\n'),
                                "forwarder.request_timeout", "expected a number, got string '30s'")

    def test_bool_is_not_a_number(self) -> None:
        """Booleans are refused for numeric keys."""
        self.assertFileKeyError(self.fails(self.forwarder, "key_grace = true\n"),
                                "forwarder.key_grace", "expected a number, got boolean true")

    def test_int_accepted_for_float(self) -> None:
        """An integer is accepted for a float key and stored as a float."""
        value = self.forwarder("request_timeout = 5\n").request_timeout
        self.assertEqual((value, type(value)), (5.0, float))

    def test_float_refused_for_int(self) -> None:
        """A float is refused for an integer key, even a whole one."""
        self.assertFileKeyError(self.fails(self.forwarder, "frame_size = 65536.0\n"),
                                "forwarder.frame_size", "expected an integer, got float 65536.0")

    def test_infinity_refused(self) -> None:
        """inf is not a usable number of seconds."""
        self.assertFileKeyError(self.fails(self.proxy, "upstream_timeout = inf\n"),
                                "proxy.upstream_timeout", "finite")

    def test_ranges(self) -> None:
        """Out-of-range values name the allowed range."""
        for load, table, line, key, fragment in [
            (self.forwarder, "", "request_timeout = 0", "forwarder.request_timeout", "greater than 0, got 0"),
            (self.forwarder, "", "max_body_size = -1", "forwarder.max_body_size", "at least 0, got -1"),
            (self.forwarder, "", "frame_size = 1024", "forwarder.frame_size", "between 65536 and 1048576"),
            (self.proxy, "", "window = 8388609", "proxy.window", "between 1 and 8388608"),
            (self.proxy, "[rekey]\n", "period = 0.5", "rekey.period", "at least 1, got 0.5"),
            (self.proxy, "[rekey]\n", "messages_per_key = 0", "rekey.messages_per_key", "between 1 and 2147483648"),
            (self.proxy, "[rekey]\n", "grace = -1", "rekey.grace", "at least 0"),
        ]:
            self.assertFileKeyError(self.fails(load, table + line + "\n"), key, fragment)

    def test_window_below_frame_size(self) -> None:
        """window smaller than frame_size is an error on window that names frame_size."""
        self.assertFileKeyError(self.fails(self.forwarder, "frame_size = 131072\nwindow = 65536\n"),
                                "forwarder.window", "at least frame_size (131072), got 65536")

    def test_rekey_rules(self) -> None:
        """mode must be fixed or adaptive; max_period may not be below min_period."""
        self.assertFileKeyError(self.fails(self.proxy, "[rekey]\nmode = 'sometimes'\n"),
                                "rekey.mode", "'fixed' or 'adaptive'")
        self.assertFileKeyError(self.fails(self.proxy, "[rekey]\nmin_period = 600\nmax_period = 300\n"),
                                "rekey.max_period", "at least min_period (600)")
        self.assertEqual(self.proxy("[rekey]\nmode = 'adaptive'\nmessages_per_key = 2147483648\n").rekey,
                         RekeySettings(mode="adaptive", messages_per_key=2**31))

    def test_access_log_switches(self) -> None:
        """access_log defaults to true and access_log_query to false; both take TOML booleans
        only (a string is an error naming the key)."""
        settings = self.forwarder("")
        self.assertEqual((settings.access_log, settings.access_log_query), (True, False))
        settings = self.forwarder("access_log = false\naccess_log_query = true\n")
        self.assertEqual((settings.access_log, settings.access_log_query), (False, True))
        self.assertFileKeyError(self.fails(self.forwarder, "access_log = 'yes'\n"),
                                "forwarder.access_log", "expected true or false")

    def test_key_lifetime(self) -> None:
        """max_key_age 0 (the default) means twice the period (fixed) or max_period (adaptive),
        at most a day; a value in (0, 2) is an error naming the key; the forwarder's cap is
        bounded to 2 s .. 7 days."""
        self.assertEqual(self.proxy("").rekey.key_lifetime, 7200.0)
        self.assertEqual(self.proxy("[rekey]\nperiod = 100\n").rekey.key_lifetime, 200.0)
        self.assertEqual(self.proxy("[rekey]\nperiod = 86400\n").rekey.key_lifetime, 86400.0)
        self.assertEqual(self.proxy("[rekey]\nmode = 'adaptive'\nmax_period = 500\n").rekey.key_lifetime, 1000.0)
        self.assertEqual(self.proxy("[rekey]\nmax_key_age = 30\n").rekey.key_lifetime, 30.0)
        self.assertFileKeyError(self.fails(self.proxy, "[rekey]\nmax_key_age = 1\n"),
                                "rekey.max_key_age", "must be 0 (twice the period) or at least 2")
        self.assertEqual(self.forwarder("").max_key_age, 86400.0)
        self.assertFileKeyError(self.fails(self.forwarder, "max_key_age = 1\n"),
                                "forwarder.max_key_age", "between 2 and 604800")


class RequiredAndNameTests(ConfigTestCase):
    def test_required_keys(self) -> None:
        """Each required key, when missing, is reported as '<key>: required'."""
        for key in ("name", "private_key", "forwarder_key", "upstream"):
            text = "\n".join(line for line in PROXY.splitlines() if not line.startswith(key + " "))
            self.assertFileKeyError(self.fails(self.proxy, base=text), f"proxy.{key}", "required")
        self.assertFileKeyError(self.fails(self.forwarder, base=FORWARDER.replace("signing_key", "#")),
                                "forwarder.signing_key", "required")

    def test_proxy_name_pattern(self) -> None:
        """A proxy name must match the name pattern."""
        self.assertFileKeyError(self.fails(self.proxy, base=PROXY.replace('"intranet"', '"-bad name"')),
                                "proxy.name", "must match")


class PathTests(ConfigTestCase):
    def test_relative_paths_resolve_against_config_folder(self) -> None:
        """Relative key paths are relative to the config file's folder, not the working directory."""
        sub = self.dir / "etc"
        shutil.copytree(self.dir / "keys", sub / "keys")
        path = sub / "proxy.toml"
        path.write_text(PROXY)
        settings = load_proxy_config(path)
        self.assertEqual(settings.private_key_path, sub / "keys" / "intranet.key")
        self.assertEqual(settings.source, path)

    def test_absolute_paths_kept(self) -> None:
        """An absolute key path is used as it is."""
        absolute = self.dir / "keys" / "wiki.pub"
        settings = self.forwarder(f"[proxies.wiki]\npublic_key = '{absolute}'\nhosts = ['w']\n")
        self.assertEqual(settings.proxies[1].public_key_path, absolute)

    def test_missing_key_file(self) -> None:
        """A KeyFileError is reported under the config file and key, with the key file's path."""
        message = self.fails(self.proxy, base=PROXY.replace("keys/intranet.key", "keys/gone.key"))
        self.assertFileKeyError(message, "proxy.private_key", f"{self.dir / 'keys' / 'gone.key'}: no such file")

    def test_private_key_too_open(self) -> None:
        """A group-readable private key is refused."""
        (self.dir / "keys" / "intranet.key").chmod(0o644)
        self.assertFileKeyError(self.fails(self.proxy), "proxy.private_key", "permissions 0644 are too open")

    def test_wrong_kind_of_key(self) -> None:
        """A private key where a public key belongs is refused."""
        message = self.fails(self.proxy, base=PROXY.replace("forwarder.pub", "forwarder.key"))
        self.assertFileKeyError(message, "proxy.forwarder_key", "not a PEM public key")


class RedisTests(ConfigTestCase):
    def test_url_parts(self) -> None:
        """A rediss URL with user, IPv6 host, port and db is split into its parts."""
        redis = self.proxy("[redis]\nurl = 'rediss://alice@[::1]:6380/3'\nnamespace = 'a.b-c_1'\n").redis
        self.assertEqual((redis.host, redis.port, redis.db, redis.username, redis.tls, redis.namespace),
                         ("::1", 6380, 3, "alice", True, "a.b-c_1"))

    def test_url_errors(self) -> None:
        """Bad Redis URLs are refused with a reason, never echoing a password."""
        for url, fragment in [
            ("redis://:s3cret@host/0", "do not put the password in the URL; use redis.password_file"),
            ("http://host/0", "must be a redis:// or rediss:// URL"),
            ("redis:///0", "has no host"),
            ("redis://host:0/0", "port must be between 1 and 65535"),
            ("redis://host:99999/0", "not a valid URL"),
            ("redis://host/zero", "path must be empty or /N"),
            ("redis://host/0?db=1", "query string"),
        ]:
            message = self.fails(self.forwarder, f"[redis]\nurl = '{url}'\n")
            self.assertFileKeyError(message, "redis.url", fragment)
            self.assertNotIn("s3cret", message)

    def test_namespace_pattern(self) -> None:
        """The namespace must match its pattern."""
        self.assertFileKeyError(self.fails(self.proxy, "[redis]\nnamespace = 'a b'\n"), "redis.namespace", "must match")

    def test_password_file(self) -> None:
        """The password is read from a private file, relative to the config, minus one newline."""
        (self.dir / "pw").write_text("s3cret\n")
        (self.dir / "pw").chmod(0o600)
        redis = self.forwarder("[redis]\npassword_file = 'pw'\n").redis
        self.assertEqual(redis.password, "s3cret")
        self.assertNotIn("s3cret", repr(redis))

    def test_password_file_errors(self) -> None:
        """Too open, empty, multi-line and missing password files are refused."""
        pw = self.dir / "pw"
        for content, mode, fragment in [("s3cret", 0o644, "permissions 0644 are too open"),
                                        ("\n", 0o600, "is empty"), ("a\nb\n", 0o600, "single line")]:
            pw.write_text(content)
            pw.chmod(mode)
            message = self.fails(self.forwarder, "[redis]\npassword_file = 'pw'\n")
            self.assertFileKeyError(message, "redis.password_file", str(pw), fragment)
        pw.unlink()
        self.assertFileKeyError(self.fails(self.forwarder, "[redis]\npassword_file = 'pw'\n"),
                                "redis.password_file", "no such file")

    def test_ca_file(self) -> None:
        """ca_file resolves against the config folder and needs a rediss:// URL."""
        (self.dir / "ca.pem").write_bytes(ca_pem())
        redis = self.proxy("[redis]\nurl = 'rediss://h'\nca_file = 'ca.pem'\n").redis
        self.assertEqual(redis.ca_file, self.dir / "ca.pem")
        self.assertFileKeyError(self.fails(self.proxy, "[redis]\nurl = 'redis://h'\nca_file = 'ca.pem'\n"),
                                "redis.ca_file", "rediss://")

    def test_ca_file_must_hold_a_certificate(self) -> None:
        """A ca_file that is not PEM certificates (a truncated PEM header, a private key, random
        text) is a one-line redis.ca_file error naming the file; the same file holding a real
        certificate loads."""
        ca = self.dir / "ca.pem"
        private = self.dir / "keys" / "intranet.key"
        for content in (b"-----BEGIN CERTIFICATE-----\n", private.read_bytes(), b"hello\n"):
            ca.write_bytes(content)
            message = self.fails(self.proxy, "[redis]\nurl = 'rediss://h'\nca_file = 'ca.pem'\n")
            self.assertFileKeyError(message, "redis.ca_file", str(ca), "not a PEM bundle of CA certificates")
        ca.write_bytes(ca_pem())
        self.assertEqual(self.proxy("[redis]\nurl = 'rediss://h'\nca_file = 'ca.pem'\n").redis.ca_file, ca)


class RouteTests(ConfigTestCase):
    def test_no_proxies(self) -> None:
        """A forwarder without any [proxies.NAME] table is refused."""
        message = self.fails(self.forwarder, base="[forwarder]\nsigning_key = 'keys/forwarder.key'\n")
        self.assertEqual(message, f"{self.dir / 'conf.toml'}: proxies: no [proxies.NAME] table; "
                                  "the forwarder would route nowhere")

    def test_route_needs_prefix_or_hosts(self) -> None:
        """A route with neither path_prefix nor hosts is refused."""
        self.assertFileKeyError(self.fails(self.forwarder, "[proxies.wiki]\npublic_key = 'keys/wiki.pub'\n"),
                                "proxies.wiki", "needs path_prefix or hosts (or both)")

    def test_route_name_pattern(self) -> None:
        """A [proxies.NAME] table whose NAME breaks the name pattern is refused."""
        self.assertFileKeyError(self.fails(self.forwarder, '[proxies."a b"]\npublic_key = "x"\nhosts = ["h"]\n'),
                                "proxies.a b", "must match")

    def test_duplicate_route(self) -> None:
        """Two routes claiming the same path_prefix and host are refused, naming both."""
        extra = "[proxies.wiki]\npublic_key = 'keys/wiki.pub'\nhosts = ['a.example']\npath_prefix = '/'\n"
        message = self.fails(self.forwarder, extra, base=FORWARDER.replace('"/"', '"/"\nhosts = ["A.example"]'))
        self.assertFileKeyError(message, "proxies.wiki", "proxies.intranet", "'a.example'")

    def test_prefix_normalised_and_hosts_lowercased(self) -> None:
        """'/a/' becomes '/a', '/' becomes '', hosts are lowercased, ':port' is allowed."""
        base = FORWARDER.replace('"/"', '"/"\nhosts = ["Intranet.Example:8080", "[::1]"]')
        settings = self.forwarder("[proxies.wiki]\npublic_key = 'keys/wiki.pub'\npath_prefix = '/wiki/'\n",
                                  base=base)
        self.assertEqual(settings.proxies[0].path_prefix, "")
        self.assertEqual(settings.proxies[0].hosts, ("intranet.example:8080", "[::1]"))
        self.assertEqual(settings.proxies[1].path_prefix, "/wiki")
        self.assertEqual(settings.proxies[1].hosts, ())

    def test_bad_prefix_and_hosts(self) -> None:
        """Prefixes without a leading '/' or with '?', and bad hosts lists, are refused."""
        for line, key, fragment in [
            ("path_prefix = 'wiki'", "path_prefix", "must start with '/'"),
            ("path_prefix = '/a?b'", "path_prefix", "'?'"),
            ("hosts = 'a.example'", "hosts", "expected a non-empty array of host names"),
            ("hosts = []", "hosts", "non-empty array"),
            ("hosts = ['']", "hosts", "item 1"),
            ("hosts = ['a b']", "hosts", "item 1"),
            ("hosts = ['ok', 3]", "hosts", "item 2"),
        ]:
            text = "[proxies.wiki]\npublic_key = 'keys/wiki.pub'\n" + line + "\n"
            self.assertFileKeyError(self.fails(self.forwarder, text), f"proxies.wiki.{key}", fragment)


class ListenTests(ConfigTestCase):
    def test_listen_forms(self) -> None:
        """listen takes a string or a list of strings; admin listen '' turns the admin server off."""
        self.assertEqual(self.forwarder("listen = 'tcp:1'\n").listen, ("tcp:1",))
        settings = self.forwarder("listen = ['tcp:1', 'tcp6:2']\n[admin]\nlisten = ''\n")
        self.assertEqual((settings.listen, settings.admin_listen), (("tcp:1", "tcp6:2"), None))

    def test_listen_errors(self) -> None:
        """Empty or non-string listen values are refused."""
        for line, fragment in [("listen = ''", "must not be empty"), ("listen = []", "non-empty array"),
                               ("listen = ['tcp:1', '']", "item 2"), ("listen = 8080", "got integer 8080")]:
            self.assertFileKeyError(self.fails(self.forwarder, line + "\n"), "forwarder.listen", fragment)

    def test_listen_endpoint_syntax(self) -> None:
        """Each listen endpoint is parsed as twistd will parse it, without binding: an unknown
        type, a port that is not a number or is above 65535, and an unknown argument are each
        one line naming the file, forwarder.listen, the endpoint and the problem; in an array the
        item number is named too."""
        for line, fragments in [
            ("listen = 'tcp:notaport'", ("not a valid endpoint 'tcp:notaport'", "invalid literal for int()")),
            ("listen = 'tpc:8080'", ("not a valid endpoint 'tpc:8080'", "Unknown endpoint type: 'tpc'")),
            ("listen = 'tcp:70000'", ("not a valid endpoint 'tcp:70000'", "between 0 and 65535")),
            ("listen = 'tcp:8080:bogus=1'", ("not a valid endpoint", "bogus")),
            ("listen = ['tcp:1', 'tcp:x']", ("item 2: not a valid endpoint 'tcp:x'",)),
        ]:
            self.assertFileKeyError(self.fails(self.forwarder, line + "\n"), "forwarder.listen", *fragments)

    def test_listen_endpoint_not_bound(self) -> None:
        """Checking an endpoint does not listen on it: a port this test holds open loads as a
        listen value (a bind would fail with "address already in use")."""
        import socket

        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        endpoint = f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"
        self.assertEqual(self.forwarder(f"listen = '{endpoint}'\n[admin]\nlisten = '{endpoint}'\n").listen,
                         (endpoint,))

    def test_admin_listen_endpoint_syntax(self) -> None:
        """A bad [admin] listen endpoint is one line naming admin.listen, in both configs; given
        with --admin it is blamed on the command line option."""
        extra = "[admin]\nlisten = 'tcp:notaport'\n"
        self.assertFileKeyError(self.fails(self.forwarder, extra), "admin.listen", "not a valid endpoint")
        self.assertFileKeyError(self.fails(self.proxy, extra), "admin.listen", "'tcp:notaport'")
        message = self.fails(self.proxy, overrides={"admin.listen": "unix"}, option_names={"admin.listen": "--admin"})
        self.assertTrue(message.startswith("command line --admin: not a valid endpoint 'unix'"), message)


class TrustedProxiesTests(ConfigTestCase):
    def test_default_trusts_nobody(self) -> None:
        """Without trusted_proxies, and with an empty array, no peer is trusted."""
        self.assertEqual(self.forwarder().trusted_proxies, ())
        self.assertEqual(self.forwarder("trusted_proxies = []\n").trusted_proxies, ())

    def test_networks_parsed(self) -> None:
        """IPv4 and IPv6 CIDRs are parsed (host bits ignored, a bare address is one host),
        in order, duplicates dropped."""
        settings = self.forwarder("trusted_proxies = ['10.0.0.0/8', '192.168.1.7/24', '2001:db8::1/32', "
                                  "'127.0.0.1', '::1', '10.0.0.0/8']\n")
        self.assertEqual(settings.trusted_proxies, (
            ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24"),
            ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("127.0.0.1/32"),
            ipaddress.ip_network("::1/128")))

    def test_errors(self) -> None:
        """A value that is not an array of network strings, or an item that is not an IPv4
        or IPv6 network, is one line naming the file, forwarder.trusted_proxies and the item."""
        for line, fragments in [
            ("trusted_proxies = '10.0.0.0/8'", ("expected an array of networks", "got string '10.0.0.0/8'")),
            ("trusted_proxies = ['10.0.0.0/8', 10]", ("item 2", "got integer 10")),
            ("trusted_proxies = ['10.0.0.0/33']", ("item 1", "not an IPv4 or IPv6 network", "'10.0.0.0/33'")),
            ("trusted_proxies = ['lb.example']", ("item 1", "not an IPv4 or IPv6 network")),
            ("trusted_proxies = ['']", ("item 1", "not an IPv4 or IPv6 network")),
            ("trusted_proxies = ['10.0.0.1 ']", ("item 1", "not an IPv4 or IPv6 network")),
            ("trusted_proxies = ['2001:db8::/129']", ("item 1", "not an IPv4 or IPv6 network")),
        ]:
            self.assertFileKeyError(self.fails(self.forwarder, line + "\n"), "forwarder.trusted_proxies", *fragments)


class UpstreamTests(ConfigTestCase):
    def test_upstream_accepted(self) -> None:
        """http and https base URLs, with port and path, are kept as given."""
        for url in ("http://10.0.0.5:8000", "https://app.internal/base/", "http://[::1]/"):
            self.assertEqual(self.proxy(base=PROXY.replace("http://127.0.0.1:8000", url)).upstream, url)

    def test_upstream_errors(self) -> None:
        """Non-HTTP schemes, user info, queries, fragments and missing hosts are refused."""
        for url, fragment in [("ftp://h/", "must be an http:// or https:// URL"),
                              ("127.0.0.1:8000", "must be an http:// or https:// URL"),
                              ("http://u:p@h/", "user name or password"), ("http://h/?a=1", "query"),
                              ("http://h/#x", "fragment"), ("http:///x", "has no host")]:
            message = self.fails(self.proxy, base=PROXY.replace("http://127.0.0.1:8000", url))
            self.assertFileKeyError(message, "proxy.upstream", fragment)


class OverrideTests(ConfigTestCase):
    def test_overrides_applied(self) -> None:
        """Dotted overrides replace file values before validation."""
        settings = self.forwarder(overrides={"redis.url": "redis://r.example:7000/2",
                                             "forwarder.listen": ["tcp:9000"], "admin.listen": "tcp:0"})
        self.assertEqual((settings.redis.host, settings.redis.port, settings.redis.db),
                         ("r.example", 7000, 2))
        self.assertEqual((settings.listen, settings.admin_listen), (("tcp:9000",), "tcp:0"))
        proxy = self.proxy(overrides={"proxy.upstream": "https://other:8443", "admin.listen": None})
        self.assertEqual(proxy.upstream, "https://other:8443")
        self.assertEqual(proxy.admin_listen, "tcp:9181:interface=127.0.0.1", "None means not given")

    def test_bad_override_names_option(self) -> None:
        """A bad override is blamed on its command-line option, not on the file."""
        message = self.fails(self.forwarder, overrides={"redis.url": "redis://:pw@h/0"},
                             option_names={"redis.url": "--redis"})
        self.assertEqual(message, "command line --redis: do not put the password in the URL; "
                                  "use redis.password_file")
        message = self.fails(self.proxy, overrides={"proxy.upstream": "ftp://x"})
        self.assertTrue(message.startswith("command line proxy.upstream: must be an http://"), message)

    def test_unknown_override_key(self) -> None:
        """An override for a key that does not exist is refused with a suggestion."""
        message = self.fails(self.proxy, overrides={"proxy.upstrem": "http://h"},
                             option_names={"proxy.upstrem": "--upstream"})
        self.assertIn("command line --upstream: unknown key proxy.upstrem (did you mean upstream?)", message)

    def test_override_path_relative_to_cwd(self) -> None:
        """A key path given on the command line is relative to the working directory."""
        elsewhere = self.dir / "cwd"
        shutil.copytree(self.dir / "keys", elsewhere / "k")
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(elsewhere)
        settings = self.proxy(overrides={"proxy.private_key": "k/intranet.key"})
        self.assertEqual(settings.private_key_path, elsewhere / "k" / "intranet.key")


class DefaultTests(ConfigTestCase):
    def test_forwarder_defaults(self) -> None:
        """A minimal forwarder file gets the documented defaults."""
        s = self.forwarder()
        self.assertEqual(s.listen, ("tcp:8080:interface=127.0.0.1:backlog=1024",))
        self.assertEqual((s.request_timeout, s.stream_idle_timeout, s.max_body_size, s.frame_size, s.window),
                         (30.0, 300.0, 1 << 30, 262144, 1048576))
        self.assertEqual((s.announce_interval, s.max_clock_skew, s.key_grace, s.admin_listen),
                         (15.0, 300.0, 60.0, "tcp:9180:interface=127.0.0.1"))
        self.assertEqual((s.redis.url, s.redis.host, s.redis.port, s.redis.db, s.redis.password,
                          s.redis.username, s.redis.tls, s.redis.ca_file, s.redis.namespace),
                         ("redis://127.0.0.1:6379/0", "127.0.0.1", 6379, 0, None, None, False, None, "ppbridge"))

    def test_proxy_defaults(self) -> None:
        """A minimal proxy file gets the documented defaults, and the result is frozen."""
        s = self.proxy()
        self.assertEqual((s.upstream_connect_timeout, s.upstream_timeout, s.stream_idle_timeout,
                          s.frame_size, s.window, s.max_clock_skew, s.admin_listen),
                         (10.0, 60.0, 300.0, 262144, 1048576, 300.0, "tcp:9181:interface=127.0.0.1"))
        self.assertEqual(s.rekey, RekeySettings("fixed", 3600.0, 60.0, 3600.0, 1_000_000, 60.0))
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, s, "name", "other")

    def test_drain_timeout(self) -> None:
        """drain_timeout defaults to 30 s on both sides, takes 0 (stop at once) and refuses a
        negative number of seconds."""
        self.assertEqual((self.forwarder().drain_timeout, self.proxy().drain_timeout), (30.0, 30.0))
        self.assertEqual((self.forwarder("drain_timeout = 0\n").drain_timeout,
                          self.proxy("drain_timeout = 2.5\n").drain_timeout), (0.0, 2.5))
        self.assertFileKeyError(self.fails(self.forwarder, "drain_timeout = -1\n"), "forwarder.drain_timeout")
        self.assertFileKeyError(self.fails(self.proxy, "drain_timeout = -1\n"), "proxy.drain_timeout")

    def test_messages_never_span_lines(self) -> None:
        """A value with a newline is shown escaped, keeping the error on one line."""
        message = self.fails(self.proxy, "[rekey]\nmode = '''a\nb'''\n")
        self.assertIn(r"'a\nb'", message)
        self.assertTrue(re.match(r".+: rekey\.mode: ", message))
