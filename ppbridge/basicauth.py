"""``htpasswd_file``: HTTP Basic log-in (RFC 7617) against an htpasswd file of bcrypt hashes.

:class:`BasicCheck` answers, for one route:

* no Basic credentials (no Authorization header, or another scheme): 401 ``unauthorized``
  with ``WWW-Authenticate: Basic realm="<realm>", charset="UTF-8"`` (reason
  ``no-credentials``; not a failed attempt: it is how every browser starts);
* the client address (:mod:`ppbridge.bruteforce`) out of failed attempts: 429
  ``too-many-attempts`` with ``Retry-After`` (reason ``too-many-attempts``), before any hash
  is computed;
* malformed credentials, an unknown user or a wrong password: 401 with the challenge (reason
  ``bad-credentials``), a failed attempt;
* the right password: in. The ``Authorization`` header is then removed from the upstream
  request unless ``pass_authorization = true``.

bcrypt is slow on purpose (about 50 to 250 ms at the usual costs 10 to 12), so it runs on the
reactor's thread pool (:class:`Verifier`), never in the reactor thread, at most
:data:`MAX_PENDING` at a time (more: 429, reason ``busy``, ``Retry-After: 1``). A right
password is remembered for :data:`CACHE_SECONDS` as an HMAC of user and password under a key
made at start (never the password itself), for that version of the file only, so the many
requests of one page cost one bcrypt; at most :data:`CACHE_SIZE` are remembered.

Timing: bcrypt compares in constant time; an unknown user costs the same bcrypt as a known
one (checked against the file's first hash, the result discarded), so answers' timing does
not tell which users exist; the cache is looked up by HMAC value, which tells nothing of the
password. As Apache does, only the first 72 bytes of a password count (bcrypt's limit).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
from typing import Any

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ppbridge.accessconfig import AccessSettings
from ppbridge.accesscheck import ALLOW, Allow, Context, Facts, Runner, Verdict
from ppbridge.bruteforce import FailureLimiter
from ppbridge.errors import RequestError, TooManyAttempts, Unauthorized
from ppbridge.htpasswd import HtpasswdFile
from ppbridge.logsafe import escape

MAX_PENDING = 32  # bcrypt verifications queued or running at once, for the whole forwarder
CACHE_SECONDS = 60.0
CACHE_SIZE = 1024
MAX_CREDENTIALS = 4096  # bytes of base64 in an Authorization header; longer: malformed
BCRYPT_MAX = 72  # bytes of a password bcrypt reads
MALFORMED = (b"", b"")  # credentials that are there but cannot be read


def basic_credentials(values: list[bytes]) -> tuple[bytes, bytes] | None:
    """(user, password) of one ``Authorization: Basic`` header; None when there is no Basic
    credential at all; :data:`MALFORMED` for one that cannot be read (two headers, bad base64,
    no colon)."""
    basic = [rest for scheme, _, rest in (v.strip().partition(b" ") for v in values) if scheme.lower() == b"basic"]
    if not basic:
        return None
    if len(values) > 1:
        return MALFORMED
    token = basic[0].strip()
    if not token or len(token) > MAX_CREDENTIALS:
        return MALFORMED
    try:
        decoded = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return MALFORMED
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon and user else MALFORMED


class Verifier:
    """bcrypt off the reactor thread, with a bound on how many wait (one per forwarder)."""

    def __init__(self, run: Runner[bool], max_pending: int = MAX_PENDING) -> None:
        self.run = run
        self.max_pending = max_pending
        self.pending = 0

    @property
    def busy(self) -> bool:
        return self.pending >= self.max_pending

    def verify(self, password: bytes, hashed: bytes) -> Deferred[bool]:
        """Whether ``password`` matches the bcrypt ``hashed``. Cancelling the result leaves the
        work to finish (it cannot be stopped) and still counted until it has."""
        self.pending += 1

        def release(result: Any) -> Any:
            self.pending -= 1
            return result

        outer: Deferred[bool] = Deferred()
        self.run(lambda: bcrypt.checkpw(password[:BCRYPT_MAX], hashed)).addBoth(release).chainDeferred(outer)
        return outer


class BasicCheck:
    """HTTP Basic for one route: its file, its realm, its failure budget per address."""

    name = "htpasswd_file"

    def __init__(self, users: HtpasswdFile, realm: str, limiter: FailureLimiter, verifier: Verifier,
                 clock: IReactorTime, pass_authorization: bool = False) -> None:
        self.users = users
        self.limiter = limiter
        self.verifier = verifier
        self.clock = clock
        self.strips: frozenset[bytes] = frozenset() if pass_authorization else frozenset((b"authorization",))
        self.challenge = ((b"WWW-Authenticate", b'Basic realm="%s", charset="UTF-8"' % realm.encode("ascii")),)
        self._key = os.urandom(32)
        self._cache: dict[bytes, tuple[int, float]] = {}  # HMAC of user and password -> (generation, until)

    @classmethod
    def build(cls, settings: AccessSettings, route: str, context: Context) -> BasicCheck:
        """The check of one access table; the file watcher, the failure budget and the
        verifier carried over from the previous configuration where they fit."""
        path = settings.htpasswd_file
        if path is None:
            raise ValueError("a Basic check needs an htpasswd_file")
        users = context.keep(("htpasswd", path), lambda: HtpasswdFile(path, context.clock))
        limiter = context.keep(("failures", route, settings.max_failures, settings.failure_window),
                               lambda: FailureLimiter(settings.max_failures, settings.failure_window))
        verifier = context.keep("bcrypt", lambda: Verifier(context.run_blocking))
        return cls(users, settings.realm, limiter, verifier, context.clock, settings.pass_authorization)

    def check(self, facts: Facts) -> Verdict:
        credentials = basic_credentials(facts.values(b"authorization"))
        if credentials is None:
            return Unauthorized("no-credentials", note="no Basic credentials", headers=self.challenge)
        now = self.clock.seconds()
        wait = self.limiter.take(facts.client, now)
        if wait is not None:
            return TooManyAttempts("too-many-attempts", note="out of failed attempts for this address",
                                   headers=((b"Retry-After", b"%d" % wait),))
        if credentials is MALFORMED:
            return self._failed(b"", known=False, why="malformed Basic credentials")
        user, password = credentials
        users = self.users.current()
        generation = self.users.generation
        tag = hmac.new(self._key, len(user).to_bytes(4, "big") + user + password, hashlib.sha256).digest()
        seen = self._cache.get(tag)
        if seen is not None and seen[0] == generation and now < seen[1]:
            self.limiter.refund(facts.client)
            return ALLOW
        if self.verifier.busy:
            self.limiter.refund(facts.client)  # not this client's failure
            return TooManyAttempts("busy", note=f"{self.verifier.max_pending} password checks already waiting",
                                   headers=((b"Retry-After", b"1"),))
        hashed = users.get(user)
        d = self.verifier.verify(password, hashed if hashed is not None else next(iter(users.values())))
        return d.addCallback(self._verified, facts.client, user, hashed is not None, tag, generation)

    def _verified(self, right: bool, client: str, user: bytes, known: bool, tag: bytes,
                  generation: int) -> Allow | RequestError:
        if not (right and known):
            return self._failed(user, known, "wrong password" if known else "unknown user")
        self.limiter.refund(client)
        while len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[tag] = (generation, self.clock.seconds() + CACHE_SECONDS)
        return ALLOW

    def _failed(self, user: bytes, known: bool, why: str) -> Unauthorized:
        """A failed attempt (its token stays spent). The user is named in the log only when the
        file has it: an unknown name may be a password typed into the wrong field."""
        note = f"user {escape(user, 64)!r}: {why}" if known else why
        return Unauthorized("bad-credentials", note=note, headers=self.challenge)
