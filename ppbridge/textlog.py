"""twistd's default text log, the same bytes for less CPU.

``twistd ppforwarder`` without ``--logger`` or ``--syslog`` writes every event as a line
``TIMESTAMP [namespace#level] text`` to standard output or ``--logfile`` (Twisted's
``textFileLogObserver``). Twisted formats the timestamp anew for each event (a datetime, a time
zone and ``strftime``), and the text through ``string.Formatter``: about 115 k instructions per
access-log line, a tenth of a small request's cost in the forwarder. :class:`ClassicText` writes
the same line: the timestamp text kept for the current second, and the access event's
pre-built ``access_line`` taken as is; every other event goes through Twisted's own formatter.

:func:`offer` hands twistd that observer: twistd (``AppLogger.start``) uses an ``ILogObserver``
component of the application when no ``--logger`` is given, before building its own.
"""

from __future__ import annotations

from math import floor
from typing import Any, Callable

from twisted.logger import (FileLogObserver, ILogObserver, LogEvent, formatEventAsClassicLogText, formatTime,
                            timeFormatRFC3339)
from twisted.python.components import Componentized

from ppbridge.logs import ACCESS_FORMAT

# A timestamp text holds for [second, second + LAST): datetime rounds to the microsecond, so a
# time within half a microsecond of the next second may already show the next one.
LAST = 0.999999


def twistd_time(when: float | None) -> str:
    """The timestamp text of twistd's default observer (``formatTime`` in RFC 3339 form)."""
    return formatTime(when, timeFormatRFC3339)


class ClassicText:
    """``formatEventAsClassicLogText`` with twistd's time format, for a ``FileLogObserver``:
    the same text for every event, with the timestamp of the current second computed once
    (by ``stamp``, twistd's own by default)."""

    def __init__(self, stamp: Callable[[float | None], str] = twistd_time) -> None:
        self._stamp_of = stamp
        self._low = self._high = 0.0  # the cached stamp holds for times in [low, high)
        self._stamp = ""

    def time(self, when: float | None) -> str:
        """``stamp(when)``, from the cache when ``when`` falls in the cached second."""
        if when is not None and self._low <= when < self._high:
            return self._stamp
        stamp = self._stamp_of(when)
        if when is not None:
            second = floor(when)
            if when < second + LAST:
                self._low, self._high, self._stamp = second, second + LAST, stamp
        return stamp

    def __call__(self, event: LogEvent) -> str | None:
        """The line for ``event``, newline included (``None`` for an event with no text)."""
        line = event.get("access_line")
        if (event.get("log_format") == ACCESS_FORMAT and type(line) is str and line
                and "log_failure" not in event and "log_system" not in event):
            level = event.get("log_level")
            return "%s [%s#%s] %s\n" % (self.time(event.get("log_time")), event.get("log_namespace", "-"),
                                       "-" if level is None else level.name, line.replace("\n", "\n\t"))
        return formatEventAsClassicLogText(event, formatTime=self.time)


def offer(application: object, twistd_options: Any) -> bool:
    """Make ``application`` carry a text observer writing where twistd's default one would (the
    ``--logfile``, rotated on SIGUSR1, or standard output), if twistd would write its default
    text log: run by ``twistd``, without ``--logger`` or ``--syslog``. True if it does."""
    from twisted.scripts._twistd_unix import ServerOptions

    if not isinstance(twistd_options, ServerOptions) or not isinstance(application, Componentized):
        return False  # not twistd (tests, ``twist``): its logging stays as it is
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return False
    if application.getComponent(ILogObserver, None) is not None:
        return False
    observer = _twistd_text_observer(twistd_options)
    if observer is None:
        return False
    observer.formatEvent = ClassicText()
    application.setComponent(ILogObserver, observer)
    return True


def _twistd_text_observer(twistd_options: Any) -> FileLogObserver | None:
    """The text observer twistd's own default would be, or None if that is not a
    ``FileLogObserver``.

    PRIVATE TWISTED DETAIL, checked against Twisted 26.10: ``UnixAppLogger._getLogObserver``
    is the code twistd runs when nothing else is configured (standard output, or a ``LogFile``
    plus its SIGUSR1 rotation handler). Calling it keeps where and how the log is written
    exactly twistd's; only the observer's public ``formatEvent`` is replaced.
    tests/test_textlog.py (``TwistdPrivateDetailTests``) fails if this changes.
    """
    from twisted.scripts._twistd_unix import UnixAppLogger

    observer = UnixAppLogger(twistd_options)._getLogObserver()
    return observer if isinstance(observer, FileLogObserver) else None
