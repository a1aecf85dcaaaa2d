"""Redis refusing a command for want of a permission: recognised, explained, backed off.

Under ACL users (``ppbridge acl``) a command a user may not run, or a channel it may not use,
is answered ``-NOPERM``; a wrong password ``-WRONGPASS``; a server that wants a password it
was not given ``-NOAUTH``. Retrying at once never helps (an operator must change the ACL or
the password file) and would log a line per attempt, so :mod:`ppbridge.bus` asks here:

* :func:`code_of`: is this failure one of those refusals, and which;
* :func:`advice`: the one log line saying what was refused and what to fix;
* :class:`Refusals`: when a refusal gets that line and when the refused step may be tried
  again: once per step of a backoff of 1 s doubling to 30 s, per connection or command.

Nothing here does I/O; the time is passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.python.failure import Failure

from ppbridge.logsafe import escape

log = Logger()

FIRST = 1.0  # seconds: the first backoff step
MOST = 30.0  # the longest
QUIET = 2 * MOST  # a key without a refusal for this long starts again at FIRST
SHOWN_CHANNELS = 3  # channel names in one line at most
_CODE = re.compile(r"(?<![A-Za-z])(NOPERM|NOAUTH|WRONGPASS)(?![A-Za-z])")
FIX = "run `ppbridge acl` on the forwarder's config and apply its ACL SETUSER lines"


def code_of(error: object) -> str | None:
    """``NOPERM``, ``NOAUTH`` or ``WRONGPASS`` when ``error`` (an exception or a Failure:
    txredisapi's ResponseError for a command, the ValueError of its factory for AUTH/SELECT)
    is that refusal; None for anything else."""
    if isinstance(error, Failure):
        error = error.value
    if not isinstance(error, Exception):
        return None
    found = _CODE.search(str(error))
    return found.group(1) if found else None


def describe(command: str, channels: list[bytes] | tuple[bytes, ...] = ()) -> str:
    """``SUBSCRIBE ns:a, ns:b`` (at most three names, escaped: a hostile Redis names channels too)."""
    shown = ", ".join(escape(c) for c in channels[:SHOWN_CHANNELS])
    more = f" and {len(channels) - SHOWN_CHANNELS} more" if len(channels) > SHOWN_CHANNELS else ""
    return f"{command} {shown}{more}" if shown else command


def advice(code: str, user: str | None, what: str) -> str:
    """What was refused (``what``: a command and its channels, or a connection's setup) and
    what to fix, in one line."""
    who = f"Redis user {user}" if user else "The default Redis user (no user in redis.url)"
    if code == "WRONGPASS":
        return (f"Redis refused the password of {'user ' + user if user else 'the default user'} ({what}): "
                "check redis.password_file against the user's password (`ppbridge acl` prints its SHA-256 "
                "form for ACL SETUSER)")
    if code == "NOAUTH":
        return (f"Redis requires a password ({what}): set redis.password_file, and a user in redis.url; "
                f"{FIX}")
    return f"{who} may not {what}: {FIX}"


@dataclass
class _Step:
    delay: float  # the next step's length
    next_at: float  # the end of the current step
    last: float  # the latest refusal
    unlogged: int = 0  # refusals since the last line


class Refusals:
    """The permission refusals of one Redis user (``user``, None: the default user), per key
    (a connection, or a command): whether a refusal gets a log line now and when the refused
    step may be retried. The first refusal is logged at once; then at most one per backoff
    step (FIRST doubling to MOST); after QUIET seconds without one, afresh."""

    def __init__(self, user: str | None, first: float = FIRST, most: float = MOST, quiet: float = QUIET) -> None:
        self.user = user
        self._first, self._most, self._quiet = first, most, quiet
        self._steps: dict[str, _Step] = {}

    def note(self, key: str, code: str, what: str, now: float, retry: bool = True) -> None:
        """A refusal of ``what`` by ``key``: the :func:`advice` line when a backoff step begins.
        ``retry``: the caller tries again when :meth:`due` (else its callers do, or not)."""
        logged, unlogged, wait = self.refused(key, now)
        if logged:
            then = f"tried again in {wait:.0f} s or more" if retry else f"the next line in {wait:.0f} s at the earliest"
            more = f"; {unlogged} more refused since the last line" if unlogged else ""
            log.warn("{advice} ({code}, {key}; {then}{more})", advice=advice(code, self.user, what), code=code,
                     key=key, then=then, more=more)

    def refused(self, key: str, now: float) -> tuple[bool, int, float]:
        """Note a refusal. (log it now?, refusals left unlogged since the last line, seconds
        until the next step) — a line is due when a new step begins."""
        step = self._steps.get(key)
        if step is None or now - step.last > self._quiet:
            step = self._steps[key] = _Step(self._first, now, now)
        step.last = now
        if now < step.next_at:
            step.unlogged += 1
            return False, 0, step.next_at - now
        unlogged, step.unlogged = step.unlogged, 0
        step.next_at = now + step.delay
        wait, step.delay = step.delay, min(self._most, step.delay * 2)
        return True, unlogged, wait

    def due(self, key: str, now: float) -> bool:
        """The refused step of ``key`` may be tried again (its backoff step is over)."""
        step = self._steps.get(key)
        return step is None or now >= step.next_at
