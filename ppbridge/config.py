"""Configuration files: TOML in, validated frozen settings out.

:func:`load_forwarder_config` and :func:`load_proxy_config` read one file, apply overrides
from the command line, check every key and return frozen dataclasses holding loaded keys.
Every problem is a one-line :class:`ConfigError`, ``<file>: <dotted.key>: <problem>``, or
``command line <option>: <problem>`` when the bad value came from an override, so a service
can print it and exit without a traceback. Relative paths resolve against the file's folder.

This module owns what the files hold: the settings dataclasses, the tables and keys each file
may have, the bounds of its numbers and the checks that span keys. Reading one value of a
given type (and the error that names it) is :mod:`ppbridge.configfields`'.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from ppbridge import keys
from ppbridge.accessconfig import AccessSettings, read_access
from ppbridge.configfields import (
    MISSING,
    Bound,
    Key,
    Reader,
    check_endpoint,
    describe,
    endpoint_list,
    has_bad_chars,
    host_list,
    network_list,
    read_toml,
    show_number,
    split_url,
)
from ppbridge.redisconfig import REDIS_KEYS, RedisSettings, read_redis
from ppbridge.wire import DEFAULT_FRAME_SIZE, MAX_HEADERS, NAME_RE
from ppbridge.errors import ConfigError

MIN_FRAME_SIZE = 65536
MAX_FRAME_SIZE = 1048576
MAX_WINDOW = 8388608
NAME_PATTERN = NAME_RE


DEFAULT_MAX_KEY_AGE = 86400.0  # a day
MIN_KEY_AGE, MAX_KEY_AGE = 2.0, 7 * 86400.0


@dataclass(frozen=True)
class Route:
    """One ``[proxies.NAME]`` table: which requests go to which proxy, and its public key."""

    name: str
    public_key: RSAPublicKey
    public_key_path: Path
    path_prefix: str = ""  # no trailing "/"; "" matches every path
    hosts: tuple[str, ...] = ()  # lowercased, may carry ":port"; () matches every host
    access: AccessSettings | None = None  # [proxies.NAME.access]; None: [forwarder.access] applies


@dataclass(frozen=True, kw_only=True)
class ForwarderSettings:
    """Everything the forwarder service needs, validated. Times in seconds, sizes in bytes."""

    source: Path
    redis: RedisSettings
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1:backlog=1024",)
    reuse_port: bool = False  # bind every listen endpoint with SO_REUSEPORT: forwarders on one host share it
    signing_key: RSAPrivateKey = field(repr=False)
    signing_key_path: Path
    request_timeout: float = 30.0
    stream_idle_timeout: float = 300.0
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight requests may take to finish; 0 = stop at once
    max_body_size: int = 1 << 30  # 0 = no limit
    frame_size: int = DEFAULT_FRAME_SIZE
    window: int = 1048576
    announce_interval: float = 15.0
    max_clock_skew: float = 300.0
    key_grace: float = 60.0
    max_key_age: float = 86400.0  # hard cap on any session key's lifetime, whatever a proxy asks
    max_header_line: int = 16384  # longest request line or header line; longer: 431
    max_headers: int = 100  # header lines per request; more: 431 too-many-headers
    header_timeout: float = 10.0  # seconds to send a whole request head; slower: 408
    upgrade_idle_timeout: float = 3600.0  # an upgraded connection with no byte either way is closed; 0 = never
    max_upgraded: int = 1000  # upgraded connections open per proxy; more: 503 upgrade-limit; 0 = no limit
    admin_listen: str | None = "tcp:9180:interface=127.0.0.1"  # None = no admin server
    # Peers whose X-Forwarded-For, Forwarded, X-Forwarded-Host/-Proto are believed.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    access_log: bool = True  # one line per request (never header values or bodies)
    access_log_query: bool = False  # with the query string (it may hold tokens)
    access: AccessSettings | None = None  # [forwarder.access]: routes without a table of their own
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
    frame_size: int = DEFAULT_FRAME_SIZE
    window: int = 1048576
    max_clock_skew: float = 300.0
    rekey: RekeySettings = field(default_factory=RekeySettings)
    admin_listen: str | None = "tcp:9181:interface=127.0.0.1"  # None = no admin server


_POSITIVE = Bound(0, above=True)
_FLOW = {"frame_size": Bound(MIN_FRAME_SIZE, MAX_FRAME_SIZE, integer=True),
         "window": Bound(1, MAX_WINDOW, integer=True)}  # and window >= frame_size
_FORWARDER_NUMBERS = {
    "request_timeout": _POSITIVE, "stream_idle_timeout": _POSITIVE, "drain_timeout": Bound(0),
    "max_body_size": Bound(0, integer=True), **_FLOW, "announce_interval": _POSITIVE,
    "max_clock_skew": _POSITIVE, "key_grace": Bound(0), "max_key_age": Bound(MIN_KEY_AGE, MAX_KEY_AGE),
    # A head the edge lets through always fits one REQ_HEAD: at most 32 KiB (a minimum frame
    # is 64 KiB) and MAX_HEADERS - 4 lines (the forwarder adds up to 4 X-Forwarded-*/Forwarded).
    "max_header_line": Bound(1024, 32768, integer=True), "max_headers": Bound(1, MAX_HEADERS - 4, integer=True),
    "header_timeout": Bound(0, 3600, above=True),
    "upgrade_idle_timeout": Bound(0), "max_upgraded": Bound(0, integer=True),
}
_PROXY_NUMBERS = {
    "upstream_connect_timeout": _POSITIVE, "upstream_timeout": _POSITIVE,
    "stream_idle_timeout": _POSITIVE, "drain_timeout": Bound(0), **_FLOW, "max_clock_skew": _POSITIVE,
}
_REKEY_NUMBERS = {
    "period": Bound(1), "min_period": Bound(1), "max_period": Bound(1),
    "messages_per_key": Bound(1, 2**31, integer=True), "grace": Bound(0), "max_key_age": Bound(0, MAX_KEY_AGE),
}
_ROUTE_KEYS = ("public_key", "path_prefix", "hosts", "access")
_REDIS_KEYS = REDIS_KEYS
_Schema = Mapping[str, tuple[str, ...] | None]  # table -> keys; None: a table of [name.X] tables
_FORWARDER_SCHEMA: _Schema = {
    "redis": _REDIS_KEYS,
    "forwarder": ("listen", "reuse_port", "signing_key", "trusted_proxies", "access_log", "access_log_query", "access",
                  *_FORWARDER_NUMBERS),
    "admin": ("listen",), "proxies": None,
}
_PROXY_SCHEMA: _Schema = {
    "redis": _REDIS_KEYS, "proxy": ("name", "private_key", "forwarder_key", "upstream", *_PROXY_NUMBERS),
    "rekey": ("mode", *_REKEY_NUMBERS), "admin": ("listen",),
}


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _suggest(word: str, choices: _Schema | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


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


def _check_keys(r: Reader, base: Key, table: object, allowed: tuple[str, ...] | None) -> None:
    if not isinstance(table, dict):
        r.fail(base, f"expected a table, got {describe(table)}")
    for key, value in table.items():
        if allowed is None:
            _check_keys(r, base + (key,), value, _ROUTE_KEYS)
        elif key not in allowed:
            r.fail(base + (key,), f"unknown key{_suggest(key, allowed)}")


def _open(path: str | Path, overrides: Mapping[str, object] | None,
          option_names: Mapping[str, str] | None, schema: _Schema) -> Reader:
    """Read the file, apply overrides, refuse unknown tables and keys."""
    data = read_toml(Path(path), str(path))
    cli = _apply_overrides(data, overrides or {}, option_names or {}, schema)
    r = Reader(str(path), Path(path).absolute(), data, cli)
    for name, table in data.items():
        if name not in schema:
            kind = "table" if isinstance(table, dict) else "key"
            r.fail((name,), f"unknown {kind}{_suggest(name, schema)}")
        _check_keys(r, (name,), table, schema[name])
    return r


def _admin(r: Reader, default: str) -> str | None:
    """The [admin] listen endpoint; an empty string turns the admin server off."""
    value = r.string(("admin", "listen"), default)
    if not value.strip():
        return None
    check_endpoint(r, ("admin", "listen"), value)
    return value


def _flow(r: Reader, table: str, values: Mapping[str, Any]) -> None:
    if values["window"] < values["frame_size"]:
        r.fail((table, "window"), f"must be at least frame_size ({values['frame_size']}), got {values['window']}")


def _route(r: Reader, name: str) -> Route:
    """One [proxies.NAME] table; path_prefix "/a/" becomes "/a" and "/" becomes ""."""
    base = ("proxies", name)
    if not re.fullmatch(NAME_PATTERN, name):
        r.fail(base, f"proxy name must match {NAME_PATTERN}")
    prefix_key, hosts_key = base + ("path_prefix",), base + ("hosts",)
    if r.get(prefix_key) is MISSING and r.get(hosts_key) is MISSING:
        r.fail(base, "needs path_prefix or hosts (or both)")
    prefix = r.string(prefix_key, "/")
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix or has_bad_chars(prefix):
        r.fail(prefix_key, f"must start with '/' and hold no '?', '#' or whitespace, got {describe(prefix)}")
    hosts = () if r.get(hosts_key) is MISSING else host_list(r, hosts_key)
    public_key, path = r.key(base + ("public_key",), keys.load_public_key)
    return Route(name=name, public_key=public_key, public_key_path=path,
                 path_prefix=prefix.rstrip("/"), hosts=hosts, access=read_access(r, base + ("access",)))


def _routes(r: Reader) -> tuple[Route, ...]:
    """All [proxies.NAME] tables; no two may claim the same path_prefix and host."""
    tables = r.get(("proxies",))
    if tables is MISSING or not tables:
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


def _reuse_port(r: Reader, listen: tuple[str, ...], default: bool) -> bool:
    """[forwarder] reuse_port; when true, the system must have SO_REUSEPORT and every listen
    endpoint must be one it applies to (tcp, tcp6, ssl)."""
    from ppbridge import reuseport

    key = ("forwarder", "reuse_port")
    if not r.boolean(key, default):
        return False
    problem = reuseport.unavailable()
    if problem:
        r.fail(key, problem)
    for description in listen:
        if not reuseport.can_share(description):
            r.fail(("forwarder", "listen"), f"{description!r} is not a {reuseport.SHAREABLE_KINDS} endpoint, "
                   "the only kinds reuse_port = true can share")
    return True


def _upstream(r: Reader, key: Key) -> str:
    """An http(s) base URL with a host and optional path; no user info, query or fragment."""
    url = r.string(key)
    parts, _ = split_url(r, key, url, ("http", "https"), 80)
    if "@" in parts.netloc:
        r.fail(key, "must not contain a user name or password")
    return url


def _rekey(r: Reader) -> RekeySettings:
    """The proxy's [rekey] table."""
    defaults = _defaults(RekeySettings)
    mode = r.string(("rekey", "mode"), defaults["mode"])
    if mode not in ("fixed", "adaptive"):
        r.fail(("rekey", "mode"), f"must be 'fixed' or 'adaptive', got {describe(mode)}")
    values = r.numbers("rekey", _REKEY_NUMBERS, defaults)
    if values["max_period"] < values["min_period"]:
        r.fail(("rekey", "max_period"), f"must be at least min_period ({show_number(values['min_period'])}), "
               f"got {show_number(values['max_period'])}")
    if 0 < values["max_key_age"] < MIN_KEY_AGE:
        r.fail(("rekey", "max_key_age"), f"must be 0 (twice the period) or at least {show_number(MIN_KEY_AGE)}, "
               f"got {show_number(values['max_key_age'])}")
    return RekeySettings(mode=mode, **values)


def load_forwarder_config(path: str | Path, overrides: Mapping[str, object] | None = None,
                          option_names: Mapping[str, str] | None = None) -> ForwarderSettings:
    """Read and check a forwarder file; ``overrides`` maps dotted keys to command-line values.

    ``option_names`` maps dotted keys to the option that set them (``"redis.url": "--redis"``)
    so that an error in an overridden value names that option.
    """
    r = _open(path, overrides, option_names, _FORWARDER_SCHEMA)
    defaults = _defaults(ForwarderSettings)
    redis = read_redis(r)
    listen = endpoint_list(r, ("forwarder", "listen"), defaults["listen"])
    signing_key, signing_key_path = r.key(("forwarder", "signing_key"), keys.load_private_key)
    values = r.numbers("forwarder", _FORWARDER_NUMBERS, defaults)
    _flow(r, "forwarder", values)
    return ForwarderSettings(
        source=r.source, redis=redis, listen=listen, reuse_port=_reuse_port(r, listen, defaults["reuse_port"]),
        signing_key=signing_key,
        signing_key_path=signing_key_path, admin_listen=_admin(r, defaults["admin_listen"]),
        trusted_proxies=network_list(r, ("forwarder", "trusted_proxies")), proxies=_routes(r),
        access_log=r.boolean(("forwarder", "access_log"), defaults["access_log"]),
        access_log_query=r.boolean(("forwarder", "access_log_query"), defaults["access_log_query"]),
        access=read_access(r, ("forwarder", "access")), **values,
    )


def load_proxy_config(path: str | Path, overrides: Mapping[str, object] | None = None,
                      option_names: Mapping[str, str] | None = None) -> ProxySettings:
    """Read and check a proxy file; overrides and option names as for :func:`load_forwarder_config`."""
    r = _open(path, overrides, option_names, _PROXY_SCHEMA)
    defaults = _defaults(ProxySettings)
    redis = read_redis(r)
    name = r.string(("proxy", "name"))
    if not re.fullmatch(NAME_PATTERN, name):
        r.fail(("proxy", "name"), f"must match {NAME_PATTERN}, got {describe(name)}")
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
