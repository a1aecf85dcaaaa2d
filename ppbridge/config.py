"""Configuration files: TOML in, validated frozen settings out.

:func:`load_forwarder_config` and :func:`load_proxy_config` read one file, apply overrides
from the command line, check every key and return frozen dataclasses holding loaded keys.
Every problem is a one-line :class:`ConfigError`, ``<file>: <dotted.key>: <problem>``, or
``command line <option>: <problem>`` when the bad value came from an override, so a service
can print it and exit without a traceback. Relative paths resolve against the file's folder.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from ppbridge import keys
from ppbridge.wire import MAX_HEADERS, NAME_RE
from ppbridge.errors import ConfigError, KeyFileError

MIN_FRAME_SIZE = 65536
MAX_FRAME_SIZE = 1048576
MAX_WINDOW = 8388608
NAME_PATTERN = NAME_RE
NAMESPACE_PATTERN = r"[A-Za-z0-9_.-]{1,64}"

_HOST_RE = re.compile(r"(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_DB_RE = re.compile(r"/?|/([0-9]{1,10})")


DEFAULT_MAX_KEY_AGE = 86400.0  # a day
MIN_KEY_AGE, MAX_KEY_AGE = 2.0, 7 * 86400.0


@dataclass(frozen=True)
class RedisSettings:
    """Where the bus is: a parsed ``redis://`` / ``rediss://`` URL plus the password from its file."""

    url: str = "redis://127.0.0.1:6379/0"
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    namespace: str = "ppbridge"


@dataclass(frozen=True)
class Route:
    """One ``[proxies.NAME]`` table: which requests go to which proxy, and its public key."""

    name: str
    public_key: RSAPublicKey
    public_key_path: Path
    path_prefix: str = ""  # no trailing "/"; "" matches every path
    hosts: tuple[str, ...] = ()  # lowercased, may carry ":port"; () matches every host


@dataclass(frozen=True, kw_only=True)
class ForwarderSettings:
    """Everything the forwarder service needs, validated. Times in seconds, sizes in bytes."""

    source: Path
    redis: RedisSettings
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1:backlog=1024",)
    signing_key: RSAPrivateKey = field(repr=False)
    signing_key_path: Path
    request_timeout: float = 30.0
    stream_idle_timeout: float = 300.0
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight requests may take to finish; 0 = stop at once
    max_body_size: int = 1 << 30  # 0 = no limit
    frame_size: int = 262144
    window: int = 1048576
    announce_interval: float = 15.0
    max_clock_skew: float = 300.0
    key_grace: float = 60.0
    max_key_age: float = 86400.0  # hard cap on any session key's lifetime, whatever a proxy asks
    max_header_line: int = 16384  # longest request line or header line; longer: 431
    max_headers: int = 100  # header lines per request; more: 431 too-many-headers
    header_timeout: float = 10.0  # seconds to send a whole request head; slower: 408
    admin_listen: str | None = "tcp:9180:interface=127.0.0.1"  # None = no admin server
    # Peers whose X-Forwarded-For, Forwarded, X-Forwarded-Host/-Proto are believed.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    access_log: bool = True  # one line per request (never header values or bodies)
    access_log_query: bool = False  # with the query string (it may hold tokens)
    proxies: tuple[Route, ...]


@dataclass(frozen=True)
class RekeySettings:
    """When a proxy replaces its session key: on a fixed period or adapted to traffic."""

    mode: str = "fixed"  # "fixed" | "adaptive"
    period: float = 3600.0
    min_period: float = 60.0
    max_period: float = 3600.0
    messages_per_key: int = 1_000_000  # hard budget; rotation starts at half of it
    grace: float = 60.0
    max_key_age: float = 0.0  # hard lifetime; 0 = twice the (maximum) period, at most a day

    @property
    def key_lifetime(self) -> float:
        """The hard lifetime a proxy asks for its keys."""
        if self.max_key_age:
            return self.max_key_age
        return min(2 * (self.period if self.mode == "fixed" else self.max_period), DEFAULT_MAX_KEY_AGE)


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """Everything the proxy service needs, validated. Times in seconds, sizes in bytes."""

    source: Path
    redis: RedisSettings
    name: str
    private_key: RSAPrivateKey = field(repr=False)
    private_key_path: Path
    forwarder_key: RSAPublicKey
    forwarder_key_path: Path
    upstream: str
    upstream_connect_timeout: float = 10.0
    upstream_timeout: float = 60.0
    stream_idle_timeout: float = 300.0
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight calls may take to finish; 0 = stop at once
    frame_size: int = 262144
    window: int = 1048576
    max_clock_skew: float = 300.0
    rekey: RekeySettings = field(default_factory=RekeySettings)
    admin_listen: str | None = "tcp:9181:interface=127.0.0.1"  # None = no admin server


@dataclass(frozen=True)
class _Bound:
    """Type and range of a numeric key: ``low <= x <= high``, or ``x > low`` when ``above``.

    Without ``high``, a sanity cap applies: 2**63-1 for integers, 10**9 (seconds) for floats.
    """

    low: float
    high: float | None = None
    above: bool = False
    integer: bool = False


_POSITIVE = _Bound(0, above=True)
_FLOW = {"frame_size": _Bound(MIN_FRAME_SIZE, MAX_FRAME_SIZE, integer=True),
         "window": _Bound(1, MAX_WINDOW, integer=True)}  # and window >= frame_size
_FORWARDER_NUMBERS = {
    "request_timeout": _POSITIVE, "stream_idle_timeout": _POSITIVE, "drain_timeout": _Bound(0),
    "max_body_size": _Bound(0, integer=True), **_FLOW, "announce_interval": _POSITIVE,
    "max_clock_skew": _POSITIVE, "key_grace": _Bound(0), "max_key_age": _Bound(MIN_KEY_AGE, MAX_KEY_AGE),
    # A head the edge lets through always fits one REQ_HEAD: at most 32 KiB (a minimum frame
    # is 64 KiB) and MAX_HEADERS - 4 lines (the forwarder adds up to 4 X-Forwarded-*/Forwarded).
    "max_header_line": _Bound(1024, 32768, integer=True), "max_headers": _Bound(1, MAX_HEADERS - 4, integer=True),
    "header_timeout": _Bound(0, 3600, above=True),
}
_PROXY_NUMBERS = {
    "upstream_connect_timeout": _POSITIVE, "upstream_timeout": _POSITIVE,
    "stream_idle_timeout": _POSITIVE, "drain_timeout": _Bound(0), **_FLOW, "max_clock_skew": _POSITIVE,
}
_REKEY_NUMBERS = {
    "period": _Bound(1), "min_period": _Bound(1), "max_period": _Bound(1),
    "messages_per_key": _Bound(1, 2**31, integer=True), "grace": _Bound(0), "max_key_age": _Bound(0, MAX_KEY_AGE),
}
_ROUTE_KEYS = ("public_key", "path_prefix", "hosts")
_REDIS_KEYS = ("url", "password_file", "namespace", "ca_file")
_Schema = Mapping[str, tuple[str, ...] | None]  # table -> keys; None: a table of [name.X] tables
_FORWARDER_SCHEMA: _Schema = {
    "redis": _REDIS_KEYS,
    "forwarder": ("listen", "signing_key", "trusted_proxies", "access_log", "access_log_query", *_FORWARDER_NUMBERS),
    "admin": ("listen",), "proxies": None,
}
_PROXY_SCHEMA: _Schema = {
    "redis": _REDIS_KEYS, "proxy": ("name", "private_key", "forwarder_key", "upstream", *_PROXY_NUMBERS),
    "rekey": ("mode", *_REKEY_NUMBERS), "admin": ("listen",),
}

Key = tuple[str, ...]
_K = TypeVar("_K")
_MISSING: Any = object()
_REQUIRED: Any = object()


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _describe(value: object) -> str:
    """A value as an error message shows it: its TOML type and, when short, the value."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = repr(value)
        return f"string {shown if len(shown) <= 40 else shown[:36] + '...' + shown[-1]}"
    if isinstance(value, int):
        return f"integer {_num(value)}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, (list, tuple, dict)):
        return "table" if isinstance(value, dict) else "array"
    return type(value).__name__


def _num(value: float) -> str:
    whole = isinstance(value, float) and value.is_integer() and abs(value) < 1e15
    text = str(int(value)) if whole else str(value)
    return text if len(text) <= 24 else text[:20] + "..."


def _has_bad_chars(text: str) -> bool:
    return any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text)


def _suggest(word: str, choices: _Schema | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class _Reader:
    """One parsed file plus overrides: typed look-ups that raise a ConfigError naming the key."""

    def __init__(self, shown: str, source: Path, data: dict[str, Any], cli: Mapping[Key, str]) -> None:
        self.shown, self.source, self.data, self.cli = shown, source, data, cli

    def fail(self, key: Key, problem: str) -> NoReturn:
        """Raise the one-line error for ``key``, blaming the command line when it set the value."""
        where = f"command line {self.cli[key]}" if key in self.cli else f"{self.shown}: {'.'.join(key)}"
        raise ConfigError(f"{where}: {problem}".replace("\n", "\\n"))

    def get(self, key: Key) -> Any:
        node: Any = self.data
        for part in key:
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def number(self, key: Key, default: float, bound: _Bound) -> Any:
        """An int, or a float (ints accepted, bools never), within ``bound``."""
        value = self.get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int if bound.integer else (int, float)):
            self.fail(key, f"expected {'an integer' if bound.integer else 'a number'}, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value}")
        if bound.high is not None and not bound.low <= value <= bound.high:
            self.fail(key, f"must be between {_num(bound.low)} and {_num(bound.high)}, got {_num(value)}")
        if value < bound.low or (bound.above and value == bound.low):
            limit = "greater than" if bound.above else "at least"
            self.fail(key, f"must be {limit} {_num(bound.low)}, got {_num(value)}")
        if value > (2**63 - 1 if bound.integer else 10**9):
            self.fail(key, f"must be at most {2**63 - 1 if bound.integer else 10**9}, got {_num(value)}")
        return value if bound.integer else float(value)

    def numbers(self, table: str, bounds: Mapping[str, _Bound], defaults: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.number((table, name), defaults[name], b) for name, b in bounds.items()}

    def boolean(self, key: Key, default: bool) -> bool:
        """true or false (TOML booleans only)."""
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def string(self, key: Key, default: Any = _REQUIRED) -> str:
        """A string; ``required`` when absent and there is no default."""
        value = self.get(key)
        if value is _MISSING:
            if default is _REQUIRED:
                self.fail(key, "required")
            return str(default)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_describe(value)}")
        return value

    def path(self, key: Key) -> Path:
        """A required file path, relative to the config file's folder (to the cwd for overrides)."""
        value = self.string(key)
        if not value or "\0" in value:
            self.fail(key, "expected a file path, got an empty or invalid string")
        path = Path(value).expanduser()
        return path.absolute() if key in self.cli else self.source.parent / path

    def optional_path(self, key: Key) -> Path | None:
        return None if self.get(key) is _MISSING else self.path(key)

    def key(self, key: Key, load: Callable[[Path], _K]) -> tuple[_K, Path]:
        """Load the key file the value names; a KeyFileError becomes this key's error."""
        path = self.path(key)
        try:
            return load(path), path
        except KeyFileError as e:
            self.fail(key, str(e))
        except (ValueError, OSError, UnsupportedAlgorithm) as e:
            self.fail(key, f"{path}: cannot load the key ({e})")

    def read_file(self, key: Key, path: Path) -> tuple[bytes, int]:
        """Contents and permission bits of a file, or this key's error."""
        try:
            with path.open("rb") as f:
                return f.read(), stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            self.fail(key, f"{path}: no such file")
        except OSError as e:
            self.fail(key, f"{path}: cannot read ({e.strerror or e})")


def _read_toml(path: Path, shown: str) -> dict[str, Any]:
    """Parse the file, or raise ConfigError saying why it could not be read or parsed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{shown}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{shown}: invalid TOML: {e}") from None


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, object],
                     option_names: Mapping[str, str], schema: _Schema) -> dict[Key, str]:
    """Set each dotted key in ``data`` (None values mean "not given" and are skipped).

    Returns the keys set, each with the name of its command-line option.
    """
    cli: dict[Key, str] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        label, key = option_names.get(dotted, dotted), tuple(dotted.split("."))
        if key[0] not in schema:
            raise ConfigError(f"command line {label}: unknown table {key[0]}{_suggest(key[0], schema)}")
        allowed = schema[key[0]] or _ROUTE_KEYS
        if len(key) != (2 if schema[key[0]] else 3) or not all(key) or key[-1] not in allowed:
            raise ConfigError(f"command line {label}: unknown key {dotted}{_suggest(key[-1], allowed)}")
        node = data
        for part in key[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line {label}: {part} is not a table in the file")
        node[key[-1]] = list(value) if isinstance(value, tuple) else value
        cli[key] = label
    return cli


def _check_keys(r: _Reader, base: Key, table: object, allowed: tuple[str, ...] | None) -> None:
    if not isinstance(table, dict):
        r.fail(base, f"expected a table, got {_describe(table)}")
    for key, value in table.items():
        if allowed is None:
            _check_keys(r, base + (key,), value, _ROUTE_KEYS)
        elif key not in allowed:
            r.fail(base + (key,), f"unknown key{_suggest(key, allowed)}")


def _open(path: str | Path, overrides: Mapping[str, object] | None,
          option_names: Mapping[str, str] | None, schema: _Schema) -> _Reader:
    """Read the file, apply overrides, refuse unknown tables and keys."""
    data = _read_toml(Path(path), str(path))
    cli = _apply_overrides(data, overrides or {}, option_names or {}, schema)
    r = _Reader(str(path), Path(path).absolute(), data, cli)
    for name, table in data.items():
        if name not in schema:
            kind = "table" if isinstance(table, dict) else "key"
            r.fail((name,), f"unknown {kind}{_suggest(name, schema)}")
        _check_keys(r, (name,), table, schema[name])
    return r


def _split_url(r: _Reader, key: Key, url: str, schemes: tuple[str, str], default_port: int
               ) -> tuple[SplitResult, int]:
    """Split a URL and check scheme, host and port. Never echoes the URL: it may hold a secret."""
    try:
        parts = urlsplit(url)
        port = default_port if parts.port is None else parts.port
    except ValueError:
        r.fail(key, "not a valid URL (check the host and port)")
    if parts.scheme not in schemes or not url.lower().startswith(parts.scheme + "://"):
        article = "an" if schemes[0][0] in "aehiou" else "a"
        r.fail(key, f"must be {article} {schemes[0]}:// or {schemes[1]}:// URL")
    if "?" in url or "#" in url or _has_bad_chars(url):
        r.fail(key, "must not contain a query string, fragment, whitespace or control characters")
    if not parts.hostname:
        r.fail(key, "has no host")
    if not 1 <= port <= 65535:
        r.fail(key, "port must be between 1 and 65535")
    return parts, port


def _password(r: _Reader, key: Key) -> str | None:
    """The password in the file ``key`` names: private, UTF-8, one line, trailing newline dropped."""
    path = r.optional_path(key)
    if path is None:
        return None
    raw, mode = r.read_file(key, path)
    if mode & 0o077:
        r.fail(key, f"{path}: permissions {mode:04o} are too open for a password file; chmod 600 it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        r.fail(key, f"{path}: not UTF-8 text")
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if not text:
        r.fail(key, f"{path}: is empty")
    if "\n" in text or "\r" in text:
        r.fail(key, f"{path}: must hold the password on a single line")
    return text


def _redis(r: _Reader) -> RedisSettings:
    """The [redis] table."""
    defaults = _defaults(RedisSettings)
    url = r.string(("redis", "url"), defaults["url"])
    parts, port = _split_url(r, ("redis", "url"), url, ("redis", "rediss"), 6379)
    if parts.password is not None:
        r.fail(("redis", "url"), "do not put the password in the URL; use redis.password_file")
    db = _DB_RE.fullmatch(parts.path)
    if db is None or int(db.group(1) or 0) > 2**31 - 1:
        r.fail(("redis", "url"), f"path must be empty or /N with N the database number, got {parts.path!r}")
    password = _password(r, ("redis", "password_file"))
    namespace = r.string(("redis", "namespace"), defaults["namespace"])
    if not re.fullmatch(NAMESPACE_PATTERN, namespace):
        r.fail(("redis", "namespace"), f"must match {NAMESPACE_PATTERN}, got {_describe(namespace)}")
    ca_file = r.optional_path(("redis", "ca_file"))
    if ca_file is not None:
        if parts.scheme != "rediss":
            r.fail(("redis", "ca_file"), "only used with TLS; redis.url must start with rediss://")
        _check_ca_file(r, ("redis", "ca_file"), ca_file)
    username = unquote(parts.username) if parts.username else None
    return RedisSettings(url=url, host=parts.hostname or "", port=port, db=int(db.group(1) or 0),
                         username=username, password=password, tls=parts.scheme == "rediss",
                         ca_file=ca_file, namespace=namespace)


def _check_endpoint(r: _Reader, key: Key, description: str, item: str = "") -> None:
    """Parse a server endpoint string the way twistd will, without binding anything.

    ``serverFromString`` only builds the endpoint object (nothing listens until its
    ``listen()``), and it is given a MemoryReactor that would merely record a listen. What the
    parser rejects (unknown type, ``tcp:notaport``, unknown argument, unreadable ssl key file)
    becomes this key's one-line error, so a service fails at start with the message
    ``ppbridge check`` gives instead of a traceback.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except Exception as e:  # the parsers raise ValueError, TypeError, OSError, OpenSSL errors...
        r.fail(key, f"{item}not a valid endpoint {description!r} ({e})")
    # The port is only checked when listening; TCP4/TCP6ServerEndpoint keep it in ``_port``
    # (Twisted 26.10). A changed attribute name skips this check, the parse check stays.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        r.fail(key, f"{item}not a valid endpoint {description!r} (port must be between 0 and 65535)")


def _check_ca_file(r: _Reader, key: Key, path: Path) -> None:
    """The file must hold at least one PEM certificate that parses."""
    from cryptography import x509

    raw, _mode = r.read_file(key, path)
    try:
        x509.load_pem_x509_certificates(raw)
    except ValueError:
        r.fail(key, f"{path}: not a PEM file of CA certificates (no certificate in it parses)")


def _listen(r: _Reader, key: Key, default: tuple[str, ...]) -> tuple[str, ...]:
    """One endpoint string or a non-empty array of them (the endpoint syntax is Twisted's to check)."""
    value = r.get(key)
    if value is _MISSING:
        return default
    if isinstance(value, str) and not value.strip():
        r.fail(key, "must not be empty")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        r.fail(key, f"expected an endpoint string or a non-empty array of them, got {_describe(value)}")
    for i, item in enumerate(items, 1):
        if not isinstance(item, str) or not item.strip():
            r.fail(key, f"item {i}: expected a non-empty endpoint string, got {_describe(item)}")
        _check_endpoint(r, key, item, f"item {i}: " if isinstance(value, list) else "")
    return tuple(items)


def _networks(r: _Reader, key: Key) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """An array of IPv4/IPv6 networks in CIDR notation (host bits ignored, a bare address is
    one host); duplicates dropped. Absent: no network."""
    value = r.get(key)
    if value is _MISSING:
        return ()
    if not isinstance(value, list):
        r.fail(key, f"expected an array of networks like \"10.0.0.0/8\", got {_describe(value)}")
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            r.fail(key, f"item {i}: expected a network string like \"10.0.0.0/8\", got {_describe(item)}")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            r.fail(key, f"item {i}: not an IPv4 or IPv6 network (CIDR like \"10.0.0.0/8\" or "
                   f"\"2001:db8::/32\"), got {_describe(item)}")
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def _admin(r: _Reader, default: str) -> str | None:
    """The [admin] listen endpoint; an empty string turns the admin server off."""
    value = r.string(("admin", "listen"), default)
    if not value.strip():
        return None
    _check_endpoint(r, ("admin", "listen"), value)
    return value


def _flow(r: _Reader, table: str, values: Mapping[str, Any]) -> None:
    if values["window"] < values["frame_size"]:
        r.fail((table, "window"), f"must be at least frame_size ({values['frame_size']}), got {values['window']}")


def _hosts(r: _Reader, key: Key) -> tuple[str, ...]:
    """A non-empty array of host names (optionally with :port), lowercased, duplicates dropped."""
    value = r.get(key)
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty array of host names, got {_describe(value)}")
    hosts: list[str] = []
    for i, item in enumerate(value, 1):
        match = _HOST_RE.fullmatch(item.lower()) if isinstance(item, str) else None
        if match is None or not 1 <= int(match.group(1) or 1) <= 65535:
            r.fail(key, f"item {i}: expected a host name with an optional :port, got {_describe(item)}")
        if item.lower() not in hosts:
            hosts.append(item.lower())
    return tuple(hosts)


def _route(r: _Reader, name: str) -> Route:
    """One [proxies.NAME] table; path_prefix "/a/" becomes "/a" and "/" becomes ""."""
    base = ("proxies", name)
    if not re.fullmatch(NAME_PATTERN, name):
        r.fail(base, f"proxy name must match {NAME_PATTERN}")
    prefix_key, hosts_key = base + ("path_prefix",), base + ("hosts",)
    if r.get(prefix_key) is _MISSING and r.get(hosts_key) is _MISSING:
        r.fail(base, "needs path_prefix or hosts (or both)")
    prefix = r.string(prefix_key, "/")
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix or _has_bad_chars(prefix):
        r.fail(prefix_key, f"must start with '/' and hold no '?', '#' or whitespace, got {_describe(prefix)}")
    hosts = () if r.get(hosts_key) is _MISSING else _hosts(r, hosts_key)
    public_key, path = r.key(base + ("public_key",), keys.load_public_key)
    return Route(name=name, public_key=public_key, public_key_path=path,
                 path_prefix=prefix.rstrip("/"), hosts=hosts)


def _routes(r: _Reader) -> tuple[Route, ...]:
    """All [proxies.NAME] tables; no two may claim the same path_prefix and host."""
    tables = r.get(("proxies",))
    if tables is _MISSING or not tables:
        r.fail(("proxies",), "no [proxies.NAME] table; the forwarder would route nowhere")
    routes = tuple(_route(r, name) for name in tables)
    seen: dict[tuple[str, str | None], str] = {}
    for route in routes:
        for host in route.hosts or (None,):
            other = seen.setdefault((route.path_prefix, host), route.name)
            if other != route.name:
                where = f"host {host!r}" if host else "any host"
                r.fail(("proxies", route.name), f"same path_prefix {route.path_prefix or '/'!r} and "
                       f"{where} as proxies.{other}; requests could not tell them apart")
    return routes


def _upstream(r: _Reader, key: Key) -> str:
    """An http(s) base URL with a host and optional path; no user info, query or fragment."""
    url = r.string(key)
    parts, _ = _split_url(r, key, url, ("http", "https"), 80)
    if "@" in parts.netloc:
        r.fail(key, "must not contain a user name or password")
    return url


def _rekey(r: _Reader) -> RekeySettings:
    """The proxy's [rekey] table."""
    defaults = _defaults(RekeySettings)
    mode = r.string(("rekey", "mode"), defaults["mode"])
    if mode not in ("fixed", "adaptive"):
        r.fail(("rekey", "mode"), f"must be 'fixed' or 'adaptive', got {_describe(mode)}")
    values = r.numbers("rekey", _REKEY_NUMBERS, defaults)
    if values["max_period"] < values["min_period"]:
        r.fail(("rekey", "max_period"), f"must be at least min_period ({_num(values['min_period'])}), "
               f"got {_num(values['max_period'])}")
    if 0 < values["max_key_age"] < MIN_KEY_AGE:
        r.fail(("rekey", "max_key_age"), f"must be 0 (twice the period) or at least {_num(MIN_KEY_AGE)}, "
               f"got {_num(values['max_key_age'])}")
    return RekeySettings(mode=mode, **values)


def load_forwarder_config(path: str | Path, overrides: Mapping[str, object] | None = None,
                          option_names: Mapping[str, str] | None = None) -> ForwarderSettings:
    """Read and check a forwarder file; ``overrides`` maps dotted keys to command-line values.

    ``option_names`` maps dotted keys to the option that set them (``"redis.url": "--redis"``)
    so that an error in an overridden value names that option.
    """
    r = _open(path, overrides, option_names, _FORWARDER_SCHEMA)
    defaults = _defaults(ForwarderSettings)
    redis = _redis(r)
    listen = _listen(r, ("forwarder", "listen"), defaults["listen"])
    signing_key, signing_key_path = r.key(("forwarder", "signing_key"), keys.load_private_key)
    values = r.numbers("forwarder", _FORWARDER_NUMBERS, defaults)
    _flow(r, "forwarder", values)
    return ForwarderSettings(
        source=r.source, redis=redis, listen=listen, signing_key=signing_key,
        signing_key_path=signing_key_path, admin_listen=_admin(r, defaults["admin_listen"]),
        trusted_proxies=_networks(r, ("forwarder", "trusted_proxies")), proxies=_routes(r),
        access_log=r.boolean(("forwarder", "access_log"), defaults["access_log"]),
        access_log_query=r.boolean(("forwarder", "access_log_query"), defaults["access_log_query"]), **values,
    )


def load_proxy_config(path: str | Path, overrides: Mapping[str, object] | None = None,
                      option_names: Mapping[str, str] | None = None) -> ProxySettings:
    """Read and check a proxy file; overrides and option names as for :func:`load_forwarder_config`."""
    r = _open(path, overrides, option_names, _PROXY_SCHEMA)
    defaults = _defaults(ProxySettings)
    redis = _redis(r)
    name = r.string(("proxy", "name"))
    if not re.fullmatch(NAME_PATTERN, name):
        r.fail(("proxy", "name"), f"must match {NAME_PATTERN}, got {_describe(name)}")
    upstream = _upstream(r, ("proxy", "upstream"))
    private_key, private_key_path = r.key(("proxy", "private_key"), keys.load_private_key)
    forwarder_key, forwarder_key_path = r.key(("proxy", "forwarder_key"), keys.load_public_key)
    values = r.numbers("proxy", _PROXY_NUMBERS, defaults)
    _flow(r, "proxy", values)
    return ProxySettings(
        source=r.source, redis=redis, name=name, private_key=private_key,
        private_key_path=private_key_path, forwarder_key=forwarder_key,
        forwarder_key_path=forwarder_key_path, upstream=upstream, rekey=_rekey(r),
        admin_listen=_admin(r, defaults["admin_listen"]), **values,
    )
