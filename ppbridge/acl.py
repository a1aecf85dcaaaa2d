"""``ppbridge acl CONFIG``: the Redis ACL users a deployment needs, each with least privilege.

One user per side (Redis 7 ACL rules; see README "Redis users (ACL)"):

* the forwarder: every channel of the namespace (``&ns:*``) and only the commands it sends
  (txredisapi 1.6.0 and :mod:`ppbridge.bus`, checked: AUTH and SELECT when connecting, CLIENT
  SETNAME, PING, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, PUBSUB NUMSUB; AUTH needs no permission;
  behind Redis Sentinel also ROLE, :mod:`ppbridge.sentinel`);
* proxy ``NAME``: SUBSCRIBE/UNSUBSCRIBE only on its own channels (``ns:p:NAME:*`` data,
  ``ns:n:NAME:*`` grants) and ``ns:announce``; PUBLISH only on ``ns:negotiate`` and the
  forwarders' channels (``ns:f:*``), in a selector, so that it cannot subscribe to those.

User names come from the config's ``redis.url`` when it names a user, else
``ppbridge-forwarder`` / ``ppbridge-NAME``. Passwords are never printed: with the side's
``redis.password_file`` readable, its SHA-256 (``#<hex>``, ACL SETUSER's hashed form);
otherwise the user is created ``off`` (disabled: no guessable placeholder password) and a
comment says how to turn it on. Each line starts with
``reset``, so applying it again gives the same user.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ppbridge.channels import Channels
from ppbridge.configfields import MISSING, Key, Reader, password_from_file, read_toml, split_url
from ppbridge.errors import ConfigError
from ppbridge.redisconfig import NAMESPACE_PATTERN
from ppbridge.wire import NAME_PATTERN

OFF = "off"  # no password known: the user is created disabled, turned on by hand with its password
# What each side's connections send (see the module docstring), as ACL command rules.
FORWARDER_COMMANDS = ("+subscribe", "+unsubscribe", "+publish", "+pubsub|numsub", "+ping", "+select",
                      "+client|setname")
PROXY_COMMANDS = ("+subscribe", "+unsubscribe", "+ping", "+select", "+client|setname")
SENTINEL_COMMANDS = ("+role",)  # behind sentinels, each connection asks its server's role
_USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_URL_KEY: Key = ("redis", "url")
_PASSWORD_KEY: Key = ("redis", "password_file")


@dataclass(frozen=True)
class AclUser:
    """One ACL user: who it is for, its name, its password rule and its other rules."""

    side: str  # "forwarder" or "proxy NAME"
    name: str
    password: str | None  # "#<sha256 hex>", or None: unknown, the user is created off
    rules: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what the operator must still do, as comment lines

    def line(self) -> str:
        """The ``ACL SETUSER`` command, one line, for redis-cli."""
        login = ("on", self.password) if self.password else (OFF,)
        return " ".join(("ACL", "SETUSER", self.name, "reset", *login, *self.rules))


def forwarder_rules(channels: Channels, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every channel of the namespace, and only the commands a forwarder sends (and ``extra``)."""
    return ("resetchannels", "&" + channels.namespace_pattern().decode("ascii"), "-@all", *FORWARDER_COMMANDS,
            *extra)


def proxy_rules(channels: Channels, name: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Subscribe to its own channels and ``ns:announce``; publish (a selector) to ``ns:negotiate``
    and the forwarders' channels only; the commands a proxy sends (and ``extra``)."""
    data, grants = (p.decode("ascii") for p in channels.proxy_patterns(name))
    publish = (channels.negotiate.decode("ascii"), channels.forwarders_pattern().decode("ascii"))
    return ("resetchannels", f"&{data}", f"&{grants}", "&" + channels.announce.decode("ascii"), "-@all",
            *PROXY_COMMANDS, *extra, f"(+publish &{publish[0]} &{publish[1]})")


def users(path: Path, kind: str) -> list[AclUser]:
    """The users a config needs: a forwarder's (``kind`` "forwarder": itself and every proxy in
    its [proxies] tables) or a proxy's (itself only)."""
    r = Reader(str(path), path.absolute(), read_toml(path, str(path)), {})
    namespace = r.string(("redis", "namespace"), "ppbridge")
    if not re.fullmatch(NAMESPACE_PATTERN, namespace):
        r.fail(("redis", "namespace"), f"must match {NAMESPACE_PATTERN}")
    channels = Channels(namespace)
    user, password, notes = _own_login(r)
    extra = SENTINEL_COMMANDS if r.get(("redis", "sentinels")) is not MISSING else ()
    if kind == "proxy":
        name = _proxy_name(r, ("proxy", "name"), r.string(("proxy", "name")))
        found = [AclUser(f"proxy {name}", user or f"ppbridge-{name}", password, proxy_rules(channels, name, extra),
                         _named(notes, user, f"ppbridge-{name}"))]
    else:
        found = [AclUser("forwarder", user or "ppbridge-forwarder", password, forwarder_rules(channels, extra),
                         _named(notes, user, "ppbridge-forwarder"))]
        tables = r.get(("proxies",))
        if tables is MISSING or not isinstance(tables, dict) or not tables:
            r.fail(("proxies",), "no [proxies.NAME] table: no proxy user to print")
        for name in tables:
            _proxy_name(r, ("proxies", name), name)
            found.append(AclUser(f"proxy {name}", f"ppbridge-{name}", None, proxy_rules(channels, name, extra),
                                 (f"its password is in the proxy's own config: `ppbridge acl` on that file prints "
                                  f"this line with the hashed password; this one creates the user off: then run "
                                  f"ACL SETUSER ppbridge-{name} on >PASSWORD (the one in its redis.password_file), "
                                  f"and put ppbridge-{name}@ in its redis.url",)))
    names = [u.name for u in found]
    for twice in sorted({n for n in names if names.count(n) > 1}):
        r.fail(_URL_KEY, f"the Redis user {twice!r} would serve two sides; give each side a user of its own")
    return found


def _own_login(r: Reader) -> tuple[str | None, str | None, list[str]]:
    """(the user in redis.url or None, the password rule, notes) of the side this file configures."""
    parts, _ = split_url(r, _URL_KEY, r.string(_URL_KEY, "redis://127.0.0.1:6379/0"), ("redis", "rediss"), 6379)
    user = unquote(parts.username) if parts.username else None
    if user is not None and not _USER_RE.fullmatch(user):
        r.fail(_URL_KEY, f"the user name must match {_USER_RE.pattern} to be printed in an ACL SETUSER line")
    notes: list[str] = []
    try:
        password = password_from_file(r, _PASSWORD_KEY)
    except ConfigError as err:
        password = None
        notes.append(f"its password file could not be read ({err}): the user is created off; turn it on with "
                     "ACL SETUSER NAME on >PASSWORD (or #SHA256-HEX)")
    if password is None and not notes:
        notes.append("the config sets no redis.password_file: the user is created off; turn it on with "
                     "ACL SETUSER NAME on >PASSWORD, and name a file holding that password in redis.password_file")
    rule = "#" + hashlib.sha256(password.encode("utf-8")).hexdigest() if password is not None else None
    return user, rule, notes


def _named(notes: list[str], user: str | None, default: str) -> tuple[str, ...]:
    """The notes, plus one asking for the user in redis.url when the config names none."""
    if user is None:
        notes = [*notes, f"redis.url names no user, so this side logs in as Redis's default user: put "
                         f"{default}@ in it (redis://{default}@HOST:PORT/DB)"]
    return tuple(notes)


def _proxy_name(r: Reader, key: Key, name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        r.fail(key, f"proxy name must match {NAME_PATTERN.pattern}")
    return name


def render(found: list[AclUser]) -> tuple[list[str], list[list[str]]]:
    """(the ACL SETUSER lines, the comment lines to show before each)."""
    comments = [[f"# {u.side}: Redis user {u.name}"] + [f"#   {note}" for note in u.notes] for u in found]
    return [u.line() for u in found], comments
