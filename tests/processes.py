"""Child processes for tests: the installed programs, started from the venv's own scripts in a
folder outside the repository (so the installed package, plugins included, is what runs).

Every wait is for a line the child prints, bounded by ``addTimeout``; every child is stopped
and reaped in the test's cleanup.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet import defer, error, protocol, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
PPBRIDGE = str(BIN / "ppbridge")
REPO = Path(__file__).resolve().parent.parent

START_TIMEOUT = 30.0  # a child becoming ready (imports, key negotiation over Redis)
EXIT_TIMEOUT = 20.0  # a child exiting once asked (or once it has nothing to do)
DEMO_TIMEOUT = 90.0  # the demo makes two RSA-3072 keys before it is ready
OUT, ERR = 1, 2
# In a child's output, the marks of an error nobody handled or of a logged failure:
# log.failure and an unhandled failed Deferred both print a traceback.
FAILURE_MARKS = ("Traceback (most recent call last)", "Unhandled error in Deferred")


_T = TypeVar("_T")


def awaited(waits: list[Any], entry: Any, waiting: defer.Deferred[_T], timeout: float,
            message: Callable[[float], str]) -> defer.Deferred[_T]:
    """``waiting`` after ``entry`` joins ``waits`` (whoever fires it removes it): after
    ``timeout`` s the entry is dropped and it fails with AssertionError(``message(timeout)``)."""
    waits.append(entry)

    def timed_out(result: Any, seconds: float) -> Failure:
        if entry in waits:
            waits.remove(entry)
        return Failure(AssertionError(message(seconds)))

    return waiting.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


class Child(protocol.ProcessProtocol):
    """One child process: owns its output (as lines, per stream), the waits for marker lines
    and the waits for its end. ``exit_code``/``exit_signal`` are set once it has been reaped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: dict[int, list[str]] = {OUT: [], ERR: []}
        self._partial: dict[int, bytes] = {OUT: b"", ERR: b""}
        self._line_waits: list[tuple[int, re.Pattern[str], defer.Deferred[re.Match[str]]]] = []
        self._end_waits: list[defer.Deferred[Child]] = []
        self.ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    # -- what the test reads ---------------------------------------------------------

    def text(self, fd: int = OUT) -> str:
        return "\n".join(self.lines[fd])

    def failures(self) -> list[str]:
        """Each line of either stream carrying one of ``FAILURE_MARKS``, with the ten lines
        after it (what failed and where), joined; empty for a clean output."""
        found = []
        for fd in (OUT, ERR):
            lines = self.lines[fd]
            for i, line in enumerate(lines):
                if any(mark in line for mark in FAILURE_MARKS):
                    found.append("\n".join(lines[i : i + 11]))
        return found

    def describe(self) -> str:
        """Both streams' last lines, for failure messages."""
        tail = lambda fd: "\n    ".join(self.lines[fd][-25:]) or "(nothing)"  # noqa: E731
        return f"{self.name}:\n  stdout:\n    {tail(OUT)}\n  stderr:\n    {tail(ERR)}"

    def wait_for(self, pattern: str, fd: int = OUT, timeout: float = START_TIMEOUT) -> defer.Deferred[re.Match[str]]:
        """Fires with the match of the first line (seen already or to come) on ``fd`` that
        ``pattern`` matches (re.search); fails if the child ends first or on timeout."""
        regex = re.compile(pattern)
        for line in self.lines[fd]:
            found = regex.search(line)
            if found:
                return defer.succeed(found)
        if self.ended:
            return defer.fail(AssertionError(f"{self.name} ended before printing /{pattern}/\n{self.describe()}"))
        waiting: defer.Deferred[re.Match[str]] = defer.Deferred()
        return awaited(self._line_waits, (fd, regex, waiting), waiting, timeout,
                       lambda s: f"no line /{pattern}/ from {self.name} in {s} s\n{self.describe()}")

    def wait_end(self, timeout: float = EXIT_TIMEOUT) -> defer.Deferred[Child]:
        """Fires with this child once it has exited and been reaped; fails on timeout."""
        if self.ended:
            return defer.succeed(self)
        waiting: defer.Deferred[Child] = defer.Deferred()
        return awaited(self._end_waits, waiting, waiting, timeout,
                       lambda s: f"{self.name} still running after {s} s\n{self.describe()}")

    def signal(self, name: str) -> None:
        """Send a signal ("INT", "TERM", "KILL") unless the child has already exited."""
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Cleanup: SIGTERM (so a child can stop what it started), SIGKILL if that is not
        enough, and always wait until the process has been reaped."""
        if self.ended:
            return
        self.signal("TERM")
        try:
            yield self.wait_end(10)
        except AssertionError:
            self.signal("KILL")
            yield self.wait_end(10)

    # -- ProcessProtocol -------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *complete, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for raw in complete:
            self._line(childFD, raw)

    def _line(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.lines.setdefault(fd, []).append(line)
        for entry in list(self._line_waits):
            wfd, regex, waiting = entry
            found = regex.search(line) if wfd == fd else None
            if found:
                self._line_waits.remove(entry)
                waiting.callback(found)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._line(fd, rest)
        self.ended = True
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.exit_signal = getattr(reason.value, "signal", None)
        waits, self._line_waits = self._line_waits, []
        for _fd, regex, waiting in waits:
            waiting.errback(AssertionError(
                f"{self.name} ended (exit {self.exit_code}, signal {self.exit_signal}) before printing"
                f" /{regex.pattern}/\n{self.describe()}"))
        ends, self._end_waits = self._end_waits, []
        for waiting in ends:
            waiting.callback(self)


def child_env() -> dict[str, str]:
    """The test's environment minus PYTHONPATH (so only the installed package is importable).

    Under ``make coverage`` it carries COVERAGE_PROCESS_CONFIG, by which coverage.py measures
    the child too (see .coveragerc): keep it when filtering the environment."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(case: TestCase, cwd: Path, args: Sequence[str], name: str | None = None) -> Child:
    """Start ``args`` in ``cwd``; stopped and reaped in the test's cleanup."""
    child = Child(name or " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args[:3])))
    reactor.spawnProcess(child, args[0], list(args), env=child_env(), path=str(cwd))
    case.addCleanup(child.stop)
    return child


@defer.inlineCallbacks
def run(case: TestCase, cwd: Path, args: Sequence[str], timeout: float = EXIT_TIMEOUT):  # type: ignore[no-untyped-def]
    """Run a command to its end; the (reaped) Child."""
    child = spawn(case, cwd, args)
    yield child.wait_end(timeout)
    return child


def refuses_connections(port: int) -> bool:
    """Whether nothing accepts TCP connections on 127.0.0.1:port (loopback: answers at once)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except ConnectionRefusedError:
        return True
    sock.close()
    return False


def forwarder_child(case: TestCase, *twistd_args: str) -> tuple[Child, int, Path]:
    """The installed ``twistd -n --pidfile= ARGS ppforwarder`` in a new folder, with a Redis and
    keys of its own and one route, everything to proxy alpha (not started): (child, port, folder)."""
    from ppbridge.redis_server import free_port
    from ppbridge.scaffold import write_forwarder_config
    from tests.support import key_pair, start_redis, temp_folder

    folder = temp_folder(case)
    redis = start_redis(case)
    key_pair(folder, "forwarder")
    key_pair(folder, "alpha")
    port = free_port()
    config = write_forwarder_config(folder, redis.url, f"tcp:{port}:interface=127.0.0.1",
                                    {"alpha": {"path_prefix": "/"}})
    child = spawn(case, folder, [TWISTD, "-n", "--pidfile=", *twistd_args, "ppforwarder", "--config", str(config)])
    return child, port, folder
