"""Typed reads of one parsed config file, each bad value a one-line error naming its key.

:class:`Reader` holds a file's parsed TOML and its command-line overrides and looks values up
by key; every problem it finds raises the :class:`~ppbridge.errors.ConfigError` that names the
key (or the option that set it). The functions here are the field types the two services
share: numbers within a :class:`Bound`, URLs, a password file, a CA file, Twisted endpoint
strings, networks and host names. Which tables and keys a file has, and the settings they
become, are :mod:`ppbridge.config`'s.
"""

from __future__ import annotations

import ipaddress
import math
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import SplitResult, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm

from ppbridge.errors import ConfigError, KeyFileError

_HOST_RE = re.compile(r"(?:[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")

Key = tuple[str, ...]
_K = TypeVar("_K")
MISSING: Any = object()
_REQUIRED: Any = object()


@dataclass(frozen=True)
class Bound:
    """Type and range of a numeric key: ``low <= x <= high``, or ``x > low`` when ``above``.

    Without ``high``, a sanity cap applies: 2**63-1 for integers, 10**9 (seconds) for floats.
    """

    low: float
    high: float | None = None
    above: bool = False
    integer: bool = False


def describe(value: object) -> str:
    """A value as an error message shows it: its TOML type and, when short, the value."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = repr(value)
        return f"string {shown if len(shown) <= 40 else shown[:36] + '...' + shown[-1]}"
    if isinstance(value, int):
        return f"integer {show_number(value)}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, (list, tuple, dict)):
        return "table" if isinstance(value, dict) else "array"
    return type(value).__name__


def show_number(value: float) -> str:
    """A number as an error message shows it: whole floats without ".0", long ones cut."""
    whole = isinstance(value, float) and value.is_integer() and abs(value) < 1e15
    text = str(int(value)) if whole else str(value)
    return text if len(text) <= 24 else text[:20] + "..."


def has_bad_chars(text: str) -> bool:
    """Whether ``text`` holds whitespace or a control character."""
    return any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text)


class Reader:
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
                return MISSING
            node = node[part]
        return node

    def number(self, key: Key, default: float, bound: Bound) -> Any:
        """An int, or a float (ints accepted, bools never), within ``bound``."""
        value = self.get(key)
        if value is MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int if bound.integer else (int, float)):
            self.fail(key, f"expected {'an integer' if bound.integer else 'a number'}, got {describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value}")
        if bound.high is not None and not bound.low <= value <= bound.high:
            self.fail(key, f"must be between {show_number(bound.low)} and {show_number(bound.high)}, got {show_number(value)}")
        if value < bound.low or (bound.above and value == bound.low):
            limit = "greater than" if bound.above else "at least"
            self.fail(key, f"must be {limit} {show_number(bound.low)}, got {show_number(value)}")
        if value > (2**63 - 1 if bound.integer else 10**9):
            self.fail(key, f"must be at most {2**63 - 1 if bound.integer else 10**9}, got {show_number(value)}")
        return value if bound.integer else float(value)

    def numbers(self, table: str, bounds: Mapping[str, Bound], defaults: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.number((table, name), defaults[name], b) for name, b in bounds.items()}

    def boolean(self, key: Key, default: bool) -> bool:
        """true or false (TOML booleans only)."""
        value = self.get(key)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {describe(value)}")
        return value

    def string(self, key: Key, default: Any = _REQUIRED) -> str:
        """A string; ``required`` when absent and there is no default."""
        value = self.get(key)
        if value is MISSING:
            if default is _REQUIRED:
                self.fail(key, "required")
            return str(default)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {describe(value)}")
        return value

    def path(self, key: Key) -> Path:
        """A required file path, relative to the config file's folder (to the cwd for overrides)."""
        value = self.string(key)
        if not value or "\0" in value:
            self.fail(key, "expected a file path, got an empty or invalid string")
        path = Path(value).expanduser()
        return path.absolute() if key in self.cli else self.source.parent / path

    def optional_path(self, key: Key) -> Path | None:
        return None if self.get(key) is MISSING else self.path(key)

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


def read_toml(path: Path, shown: str) -> dict[str, Any]:
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


def split_url(r: Reader, key: Key, url: str, schemes: tuple[str, str], default_port: int
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
    if "?" in url or "#" in url or has_bad_chars(url):
        r.fail(key, "must not contain a query string, fragment, whitespace or control characters")
    if not parts.hostname:
        r.fail(key, "has no host")
    if not 1 <= port <= 65535:
        r.fail(key, "port must be between 1 and 65535")
    return parts, port


def password_from_file(r: Reader, key: Key) -> str | None:
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


def check_endpoint(r: Reader, key: Key, description: str, item: str = "") -> None:
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


def check_ca_file(r: Reader, key: Key, path: Path) -> None:
    """The file must hold PEM certificates, every one of which parses (a CA bundle)."""
    from cryptography import x509

    raw, _mode = r.read_file(key, path)
    try:
        x509.load_pem_x509_certificates(raw)
    except ValueError:
        r.fail(key, f"{path}: not a PEM bundle of CA certificates (none in it, or one that does not parse)")


def endpoint_list(r: Reader, key: Key, default: tuple[str, ...]) -> tuple[str, ...]:
    """One endpoint string or a non-empty array of them (the endpoint syntax is Twisted's to check)."""
    value = r.get(key)
    if value is MISSING:
        return default
    if isinstance(value, str) and not value.strip():
        r.fail(key, "must not be empty")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        r.fail(key, f"expected an endpoint string or a non-empty array of them, got {describe(value)}")
    for i, item in enumerate(items, 1):
        if not isinstance(item, str) or not item.strip():
            r.fail(key, f"item {i}: expected a non-empty endpoint string, got {describe(item)}")
        check_endpoint(r, key, item, f"item {i}: " if isinstance(value, list) else "")
    return tuple(items)


def network_list(r: Reader, key: Key) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """An array of IPv4/IPv6 networks in CIDR notation (host bits ignored, a bare address is
    one host); duplicates dropped. Absent: no network."""
    value = r.get(key)
    if value is MISSING:
        return ()
    if not isinstance(value, list):
        r.fail(key, f"expected an array of networks like \"10.0.0.0/8\", got {describe(value)}")
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            r.fail(key, f"item {i}: expected a network string like \"10.0.0.0/8\", got {describe(item)}")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            r.fail(key, f"item {i}: not an IPv4 or IPv6 network (CIDR like \"10.0.0.0/8\" or "
                   f"\"2001:db8::/32\"), got {describe(item)}")
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def host_list(r: Reader, key: Key) -> tuple[str, ...]:
    """A non-empty array of host names (optionally with :port), lowercased, duplicates dropped."""
    value = r.get(key)
    if not isinstance(value, list) or not value:
        r.fail(key, f"expected a non-empty array of host names, got {describe(value)}")
    hosts: list[str] = []
    for i, item in enumerate(value, 1):
        match = _HOST_RE.fullmatch(item.lower()) if isinstance(item, str) else None
        if match is None or not 1 <= int(match.group(1) or 1) <= 65535:
            r.fail(key, f"item {i}: expected a host name with an optional :port, got {describe(item)}")
        if item.lower() not in hosts:
            hosts.append(item.lower())
    return tuple(hosts)
