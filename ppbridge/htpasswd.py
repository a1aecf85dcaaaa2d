"""Apache htpasswd files of bcrypt hashes: ``htpasswd_file`` (what ``htpasswd -B`` writes).

:func:`parse` reads one: a ``user:hash`` line per user (blank lines and lines starting with
``#`` skipped, as Apache does). Every hash must be bcrypt (``$2y$``, ``$2b$`` or ``$2a$``, cost
04 to 31); any other kind (``$apr1$`` Apache MD5, ``{SHA}``, crypt, plain text) is a
:class:`HtpasswdError` naming the line, the user and the kind, so a file that would silently
let nobody in, or let anyone in by a weak hash, never loads. A user listed twice, a line
without ``:`` and a file without users are errors too.

:class:`HtpasswdFile` is one such file in use: it looks at the file's identity (device,
inode, size, modification time) at most once per :data:`RECHECK` seconds and re-reads it
when that changed, so an edit or a replacement (``htpasswd -B``, an editor's rename) is
honoured within about a second without a restart. A version that does not parse is logged
(once per version, never with a hash) and the previous one stays in force until a good one
replaces it. The clock is injected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ppbridge.logsafe import escape

log = Logger()
RECHECK = 1.0  # seconds between looks at the file's identity
MAX_FILE = 4 << 20  # bytes: a file larger than this is refused (thousands of users fit in far less)
BCRYPT = re.compile(rb"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_KINDS = (
    (rb"$apr1$", "Apache MD5 ($apr1$, htpasswd -m)"), (rb"{SHA}", "SHA-1 ({SHA}, htpasswd -s)"),
    (rb"$1$", "MD5-crypt ($1$)"), (rb"$5$", "SHA-256-crypt ($5$)"), (rb"$6$", "SHA-512-crypt ($6$)"),
    (rb"$argon2", "Argon2"), (rb"$2", "a malformed bcrypt hash"),
)
_DES = re.compile(rb"[./A-Za-z0-9]{13}")


class HtpasswdError(ValueError):
    """A file that is not an htpasswd file of bcrypt hashes; the message says where and why."""


def hash_kind(hashed: bytes) -> str:
    """What a hash that is not bcrypt looks like, for an error message (never the hash)."""
    for prefix, kind in _KINDS:
        if hashed.startswith(prefix):
            return kind
    if _DES.fullmatch(hashed):
        return "DES crypt (htpasswd -d)"
    return "plain text or a hash of an unknown kind (htpasswd -p)"


def parse(data: bytes) -> dict[bytes, bytes]:
    """User name -> bcrypt hash, in file order; HtpasswdError for anything else."""
    users: dict[bytes, bytes] = {}
    lines: dict[bytes, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.rstrip(b"\r")
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        hashed = hashed.rstrip()
        if not sep or not user:
            raise HtpasswdError(f"line {number}: expected user:hash")
        who = f"line {number} (user {escape(user, 64)!r})"
        if not BCRYPT.fullmatch(hashed):
            raise HtpasswdError(f"{who}: {hash_kind(hashed)} is not a bcrypt hash; ppbridge takes bcrypt only "
                                "($2y$, $2b$ or $2a$): make the file with htpasswd -B")
        if user in users:
            raise HtpasswdError(f"{who}: the user is listed on line {lines[user]} already")
        users[user], lines[user] = hashed, number
    if not users:
        raise HtpasswdError("holds no user (every request would be refused)")
    return users


def read(path: Path) -> tuple[dict[bytes, bytes], tuple[int, ...]]:
    """(users, identity) of the file at ``path``; OSError or HtpasswdError."""
    with path.open("rb") as f:
        identity = _identity(os.fstat(f.fileno()))
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise HtpasswdError(f"larger than {MAX_FILE} bytes")
    return parse(data), identity


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class HtpasswdFile:
    """One htpasswd file in use: its users now (:meth:`current`) and how many times it was
    re-read (``generation``: anything derived from an older version is stale)."""

    def __init__(self, path: Path, clock: IReactorTime) -> None:
        """Reads the file at once: OSError or HtpasswdError when it cannot be used."""
        self.path = path
        self.clock = clock
        self.users, self._identity = read(path)
        self.generation = 0
        self._looked = clock.seconds()
        self._refused: tuple[int, ...] | None = None  # the identity of a version that did not load

    def current(self) -> dict[bytes, bytes]:
        """The users in force, after looking at the file if :data:`RECHECK` seconds passed."""
        now = self.clock.seconds()
        if not 0 <= now - self._looked < RECHECK:
            self._looked = now
            self._look()
        return self.users

    def _look(self) -> None:
        try:
            identity = _identity(os.stat(self.path))
        except OSError as e:
            self._refuse((-1,), e.strerror or str(e))
            return
        if identity in (self._identity, self._refused):
            return
        try:
            users, identity = read(self.path)
        except OSError as e:
            self._refuse(identity, e.strerror or str(e))
            return
        except HtpasswdError as e:
            self._refuse(identity, str(e))
            return
        self.users, self._identity, self._refused = users, identity, None
        self.generation += 1
        log.info("re-read {path}: {n} users", path=str(self.path), n=len(users))

    def _refuse(self, identity: tuple[int, ...], problem: str) -> None:
        if identity != self._refused:
            self._refused = identity
            log.error("{path}: {problem}; the version read before stays in force", path=str(self.path),
                      problem=problem)
