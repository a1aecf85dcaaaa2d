"""ppbridge.textlog: twistd's default text log lines, byte for byte, for less CPU.

Unit tests compare :class:`ClassicText` with the formatter of Twisted's own
``textFileLogObserver`` (the one twistd installs) on every kind of event and on timestamps
around second boundaries and a change of summer time; twistd's choice of observer is checked
with twistd's own option parser and application runner; the child-process tests run the
installed ``twistd -n ppforwarder`` and read its standard output and its ``--logfile``
(rotated by SIGUSR1).
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import (FileLogObserver, ILogObserver, Logger, LogLevel, formatTime, textFileLogObserver,
                            timeFormatRFC3339)
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner, UnixAppLogger
from twisted.trial.unittest import TestCase

from ppbridge.logs import ACCESS_FORMAT, AccessLog
from ppbridge.scaffold import write_forwarder_config
from ppbridge.textlog import ClassicText, offer
from tests.processes import OUT, forwarder_child
from tests.support import Client, key_pair, poll, temp_folder

WAIT = 10.0
TWISTED_LINE = textFileLogObserver(io.StringIO()).formatEvent  # what twistd's default observer writes
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
# The forwarder's line for a GET /q while proxy alpha is not running.
ACCESS_503 = re.compile(STAMP + r" \[ppbridge\.access#info\] 127\.0\.0\.1 GET /q 503 proxy-unavailable in=0 "
                        r"out=\d+ \d+\.\d{3}s proxy=alpha instance=-")


def access_event() -> dict[str, Any]:
    """One event as the forwarder's AccessLog emits it."""
    events: list[dict[str, Any]] = []
    AccessLog(logger=Logger(namespace="ppbridge.access", observer=events.append)).emit(
        client="127.0.0.1", method=b"GET", uri=b"/a/echo?k=v", code=200, cause="", bytes_in=0, bytes_out=270,
        duration=0.0031, proxy="alpha", instance="2ae0d9ae5b8af343")
    return events[0]


def failure() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()
    raise RuntimeError("unreachable")


class ClassicTextTests(TestCase):
    """ClassicText against the formatter of Twisted's textFileLogObserver."""

    def setUp(self) -> None:
        tz = os.environ.get("TZ")
        self.addCleanup(time.tzset)
        self.addCleanup(lambda: os.environ.__setitem__("TZ", tz) if tz is not None else os.environ.pop("TZ", None))

    def test_every_kind_of_event_gives_twisteds_line(self) -> None:
        """For an access event, one with a newline in its line, one with log_system, one with a
        failure, one without log_format, without log_time / level / namespace, a bytes format,
        an unformattable one, and an access-format event whose line is not text, ClassicText
        returns exactly what Twisted's default text observer would write (None included)."""
        now = time.time()
        access = access_event()
        events: list[dict[str, Any]] = [
            access,
            {**access, "access_line": "two\nlines"},
            {**access, "access_line": 404},
            {**access, "access_line": ""},
            {**access, "log_system": "HTTPChannel,3,127.0.0.1"},
            {**access, "log_failure": failure()},
            {"log_format": "Starting factory {factory!r}", "factory": object(), "log_time": now,
             "log_namespace": "twisted.web", "log_level": LogLevel.info},
            {"log_format": "no level", "log_time": now, "log_namespace": "x"},
            {"log_format": "no namespace, no time", "log_level": LogLevel.warn},
            {"log_format": b"bytes format {a}", "a": 1, "log_time": now},
            {"log_format": "missing {field}", "log_time": now},
            {"log_time": now, "log_namespace": "x", "log_level": LogLevel.info},
            {"log_format": "failed", "log_failure": failure(), "log_time": now, "log_level": LogLevel.critical},
        ]
        text = ClassicText()
        for event in events:
            self.assertEqual(text(dict(event)), TWISTED_LINE(dict(event)), event)
        self.assertEqual(text(access), f"{formatTime(access['log_time'])} [ppbridge.access#info] "
                                        f"127.0.0.1 GET /a/echo 200 - in=0 out=270 0.003s proxy=alpha "
                                        f"instance=2ae0d9ae5b8af343\n")
        self.assertEqual(access["log_format"], ACCESS_FORMAT)

    def test_timestamps_around_seconds_and_a_summer_time_change_are_twisteds(self) -> None:
        """In a zone with summer time (CET/CEST), one ClassicText gives formatTime's text, in
        twistd's format, for times in order across 2024-03-31 01:00 UTC (clocks go forward),
        across second boundaries, within half a microsecond of the next second (shown as that
        second), back in time, at and before 1970, and for no time at all ("-")."""
        os.environ["TZ"] = "CET-1CEST,M3.5.0,M10.5.0/3"
        time.tzset()
        change = 1711846800.0
        offsets = [-1.5, -1.0, -0.9999996, -0.0000006, -0.0000004, 0.0, 0.3, 0.9999994, 0.9999996, 1.0, 1.2, 0.1]
        times: list[float | None] = [change + d for d in offsets] + [0.5, 0.0, -0.5, -1.5, -1.2, None, 1.5e9]
        text = ClassicText()
        shown = [text.time(when) for when in times]
        self.assertEqual(shown, [formatTime(when, timeFormatRFC3339) for when in times])
        self.assertEqual(shown[3:5], ["2024-03-31T01:59:59+0100", "2024-03-31T03:00:00+0200"])

    def test_the_timestamp_is_made_once_per_second(self) -> None:
        """The stamp function is asked once per second met in a row; a time within a
        microsecond of the next second, or back in an earlier second, is asked for anew."""
        asked: list[float | None] = []

        def stamp(when: float | None) -> str:
            asked.append(when)
            return f"T{when}"

        text = ClassicText(stamp)
        times = [100.1, 100.5, 100.9, 101.0, 101.2, 100.95, 102.9999996, 102.2, 102.3, None]
        self.assertEqual([text.time(t) for t in times],
                         ["T100.1", "T100.1", "T100.1", "T101.0", "T101.0", "T100.95", "T102.9999996", "T102.2",
                          "T102.2", "TNone"])
        self.assertEqual(asked, [100.1, 101.0, 100.95, 102.9999996, 102.2, None])


def twistd_application(case: TestCase, *twistd_args: str) -> Any:
    """The application twistd makes for ``twistd ARGS ppforwarder --config F`` (its own option
    parser and runner, nothing started): the component it will look for is on it."""
    folder = temp_folder(case)
    key_pair(folder, "forwarder")
    key_pair(folder, "alpha")
    config = write_forwarder_config(folder, "redis://127.0.0.1:1/0", "tcp:0:interface=127.0.0.1",
                                    {"alpha": {"path_prefix": "/"}})
    options = ServerOptions()
    options.parseOptions([*twistd_args, "--pidfile=", "ppforwarder", "--config", str(config)])
    return UnixApplicationRunner(options).createOrGetApplication()


class TwistdChoiceTests(TestCase):
    """Which observer the application offers twistd, for each way of starting it."""

    def test_default_twistd_gets_classic_text_observer(self) -> None:
        """``twistd -n ppforwarder``: the application carries an ILogObserver, a
        FileLogObserver whose formatEvent is a ClassicText."""
        observer = twistd_application(self, "-n").getComponent(ILogObserver)
        self.assertIsInstance(observer, FileLogObserver)
        self.assertIsInstance(observer.formatEvent, ClassicText)

    def test_logger_and_syslog_are_left_to_twistd(self) -> None:
        """With ``--logger`` or ``--syslog`` the application carries no ILogObserver, so
        twistd builds the one asked for."""
        self.assertIsNone(twistd_application(self, "-n", "--logger", "ppbridge.logs.json_logger")
                          .getComponent(ILogObserver))
        self.assertIsNone(twistd_application(self, "-n", "--syslog").getComponent(ILogObserver))

    def test_logfile_gets_the_line_and_a_rotation_handler(self) -> None:
        """``twistd -n --logfile F``: the observer writes each line to F at once (Twisted's
        line for the same event) and SIGUSR1 gets a handler (twistd's log rotation)."""
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = temp_folder(self) / "forwarder.log"
        observer = twistd_application(self, "-n", "--logfile", str(path)).getComponent(ILogObserver)
        self.addCleanup(observer._outFile.close)  # the LogFile twistd would close at exit
        event = access_event()
        observer(event)
        self.assertEqual(path.read_text(), TWISTED_LINE(event))
        self.assertNotIn(signal.getsignal(signal.SIGUSR1), (signal.SIG_DFL, None))

    def test_other_parents_and_options_are_left_alone(self) -> None:
        """offer() does nothing without twistd's options (tests, ``twist``), or when the
        application already carries an observer."""
        from twisted.application.service import Application, MultiService

        application = Application("x")
        self.assertFalse(offer(application, None))
        self.assertFalse(offer(MultiService(), ServerOptions()))
        application.setComponent(ILogObserver, TWISTED_LINE)
        self.assertFalse(offer(application, ServerOptions()))
        self.assertIs(application.getComponent(ILogObserver), TWISTED_LINE)


class TwistdPrivateDetailTests(TestCase):
    """The private Twisted detail ppbridge.textlog relies on (checked against Twisted 26.10)."""

    def test_get_log_observer_is_the_default_text_observer(self) -> None:
        """``UnixAppLogger._getLogObserver`` with twistd's options for ``-n`` and no logfile
        returns a FileLogObserver writing to standard output with a public ``formatEvent``
        giving textFileLogObserver's line."""
        options = ServerOptions()
        options.parseOptions(["-n", "--pidfile="])
        observer = UnixAppLogger(options)._getLogObserver()
        self.assertIsInstance(observer, FileLogObserver)
        self.assertIs(observer._outFile, sys.stdout)
        event = access_event()
        self.assertEqual(observer.formatEvent(event), TWISTED_LINE(event))


class TwistdTextLogTests(TestCase):
    """The installed ``twistd -n ppforwarder`` writing its text log."""

    timeout = 120

    @defer.inlineCallbacks
    def test_stdout_lines_keep_twisteds_format(self):  # type: ignore[no-untyped-def]
        """Every line on standard output is ``TIMESTAMP [namespace#level] text``; the start line
        is twistd's; a GET /q for a proxy not running gets its access line as soon as it is
        answered, stamped within the request's second(s), before the child stops."""
        child, port, _ = forwarder_child(self, )
        yield child.wait_for(r"Redis connected", OUT)
        before = formatTime(time.time())
        response, _ = yield Client(self).fetch(b"GET", f"http://127.0.0.1:{port}/q?k=v")
        self.assertEqual(response.code, 503)
        match = yield child.wait_for(ACCESS_503.pattern, OUT)
        after = formatTime(time.time())
        self.assertTrue(before <= match.group(0)[:24] <= after, (before, match.group(0), after))
        lines = child.lines[OUT]
        self.assertTrue(all(re.match(STAMP + r" \[[^\]]+\] ", line) or line.startswith("\t") for line in lines), lines)
        self.assertTrue(any(re.fullmatch(STAMP + r" \[twisted\.scripts\._twistd_unix\.UnixAppLogger#info\] "
                                         r"twistd \S+ \(.+\) starting up\.", line) for line in lines), lines)
        self.assertEqual([line for line in lines if ACCESS_503.fullmatch(line)], [match.group(0)])

    @defer.inlineCallbacks
    def test_logfile_gets_each_line_at_once_rotates_on_sigusr1_and_ends_whole(self):  # type: ignore[no-untyped-def]
        """``--logfile F``: an access line is in F while the forwarder runs; after SIGUSR1, F.1
        holds the lines so far and F the next request's line; after SIGTERM, F ends with
        twistd's "Server Shut Down." line, every line whole and in twistd's format."""
        child, port, folder = forwarder_child(self, "--logfile", "forwarder.log")
        log, rotated = folder / "forwarder.log", folder / "forwarder.log.1"
        yield poll(lambda: log.exists() and "Redis connected" in log.read_text(), WAIT, "Redis connected in F")
        client = Client(self)
        response, _ = yield client.fetch(b"GET", f"http://127.0.0.1:{port}/q")
        self.assertEqual(response.code, 503)
        yield poll(lambda: ACCESS_503.search(log.read_text()), WAIT, "the access line in F")
        child.transport.signalProcess(signal.SIGUSR1)  # twistd's log rotation
        yield poll(rotated.exists, WAIT, "F.1 after SIGUSR1")
        response, _ = yield client.fetch(b"GET", f"http://127.0.0.1:{port}/q")
        yield poll(lambda: ACCESS_503.search(log.read_text()), WAIT, "the next access line in the new F")
        child.signal("TERM")
        yield child.wait_end()
        old, new = rotated.read_text(), log.read_text()
        self.assertEqual(len(ACCESS_503.findall(old)), 1)
        self.assertEqual(len(ACCESS_503.findall(new)), 1)
        for text in (old, new):
            self.assertTrue(text.endswith("\n"))
            for line in text.splitlines():
                self.assertTrue(re.match(STAMP + r" \[[^\]]+\] ", line) or line.startswith("\t"), line)
        self.assertRegex(new.splitlines()[-1], STAMP + r" \[twisted\.scripts\._twistd_unix\.UnixAppLogger#info\] "
                                                        r"Server Shut Down\.$")
        self.assertEqual(child.text(OUT), "")
