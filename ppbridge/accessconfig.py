"""The ``[forwarder.access]`` and ``[proxies.NAME.access]`` tables: who may reach a route.

:func:`read_access` reads one table into :class:`AccessSettings` (or None when the file has
none), each problem a one-line :class:`~ppbridge.errors.ConfigError` naming the file, the key
and what is wrong, as everywhere in :mod:`ppbridge.config`, which calls it for the
forwarder's default and for each route. A route's own table replaces the default whole
(an empty one opens the route to everyone). What the settings become at run time is
:mod:`ppbridge.access`'s.

To add a mechanism: its keys go into :data:`ACCESS_KEYS`, its fields into
:class:`AccessSettings` and its checks into :func:`read_access`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ppbridge import htpasswd
from ppbridge.clientcert import CLIENT_CERT_KEYS, ClientCertSettings, read_client_cert
from ppbridge.configfields import MISSING, Bound, Key, Reader, describe, network_list
from ppbridge.forwardauth import FORWARD_AUTH_KEYS, ForwardAuthSettings, read_forward_auth

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ACCESS_KEYS = ("allow_cidrs", "deny_cidrs", "htpasswd_file", "realm", "pass_authorization", "max_failures",
               "failure_window", *CLIENT_CERT_KEYS, *FORWARD_AUTH_KEYS)
_REALM = re.compile(r'[\x20-\x7e]{1,64}')  # printable ASCII; '"' and '\' refused apart (quoted-string)


@dataclass(frozen=True)
class AccessSettings:
    """One access table. Every mechanism it names must pass; none named: everyone passes."""

    allow_cidrs: tuple[Network, ...] = ()  # () = every address (deny_cidrs still applies)
    deny_cidrs: tuple[Network, ...] = ()
    htpasswd_file: Path | None = None  # HTTP Basic against this file of bcrypt hashes
    realm: str = "ppbridge"  # the Basic challenge's realm (browsers show it)
    pass_authorization: bool = False  # forward the Authorization header the log-in used
    max_failures: int = 10  # failed log-ins per client address before 429 ...
    failure_window: float = 60.0  # ... refilled over this many seconds
    client_cert: ClientCertSettings | None = None  # client_ca_file, client_names (ppbridge.clientcert)
    forward_auth: ForwardAuthSettings | None = None  # forward_auth* (ppbridge.forwardauth)


def _suggest(word: str) -> str:
    close = difflib.get_close_matches(word, ACCESS_KEYS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read_access(r: Reader, key: Key) -> AccessSettings | None:
    """The access table at ``key`` (``("forwarder", "access")`` or ``("proxies", NAME,
    "access")``), checked; None when absent."""
    table = r.get(key)
    if table is MISSING:
        return None
    if not isinstance(table, dict):
        r.fail(key, f"expected a table, got {describe(table)}")
    for name in table:
        if name not in ACCESS_KEYS:
            r.fail(key + (name,), f"unknown key{_suggest(name)}")
    defaults = AccessSettings()
    realm = r.string(key + ("realm",), defaults.realm)
    if not _REALM.fullmatch(realm) or '"' in realm or "\\" in realm:
        r.fail(key + ("realm",), f"must be 1 to 64 printable ASCII characters without '\"' or '\\', "
               f"got {describe(realm)}")
    return AccessSettings(
        allow_cidrs=network_list(r, key + ("allow_cidrs",)),
        deny_cidrs=network_list(r, key + ("deny_cidrs",)),
        htpasswd_file=_htpasswd_file(r, key + ("htpasswd_file",)),
        realm=realm,
        pass_authorization=r.boolean(key + ("pass_authorization",), defaults.pass_authorization),
        max_failures=r.number(key + ("max_failures",), defaults.max_failures, Bound(1, 1_000_000, integer=True)),
        failure_window=r.number(key + ("failure_window",), defaults.failure_window, Bound(0, 86400, above=True)),
        client_cert=read_client_cert(r, key),
        forward_auth=read_forward_auth(r, key),
    )


def _htpasswd_file(r: Reader, key: Key) -> Path | None:
    """The path, once the file has loaded as an htpasswd file of bcrypt hashes."""
    path = r.optional_path(key)
    if path is None:
        return None
    try:
        htpasswd.read(path)
    except FileNotFoundError:
        r.fail(key, f"{path}: no such file")
    except OSError as e:
        r.fail(key, f"{path}: cannot read ({e.strerror or e})")
    except htpasswd.HtpasswdError as e:
        r.fail(key, f"{path}: {e}")
    return path
