"""Child processes of the benchmark: started with their output in a log file, stopped for sure.

Every child gets ``PR_SET_PDEATHSIG`` (SIGTERM) so it goes when the benchmark dies by any
means; :meth:`Child.stop` sends SIGTERM, then SIGKILL, and also ends the descendants it saw
(nginx workers, sshd's per-connection processes), each checked by pid *and* start time so
no unrelated process is ever signalled.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from procstats import start_ticks, with_descendants

_PR_SET_PDEATHSIG = 1
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an http_proxy
STOP_TIMEOUT = 5.0


def _die_with_parent() -> None:
    """In the forked child: receive SIGTERM when the benchmark process ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


EXTRA_ENV: dict[str, str] = {}  # set by bench/ab.py: the PYTHONPATH of the build it measures
WRAP: dict[str, list[str]] = {}
"""A command put before a child's own, by the child's name (bench/callgrind.py: valgrind)."""


def child_env() -> dict[str, str]:
    """The benchmark's environment minus PYTHONPATH (children run the installed package),
    plus :data:`EXTRA_ENV`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(EXTRA_ENV)
    return env


class Child:
    """One long-running child process; owns its log file and the descendants it has seen."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.args = [*WRAP.get(name, []), *args]
        self.log_path = log_dir / f"{name.replace(' ', '-')}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(cwd) if cwd else None, env=child_env(),
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (the benchmark starts no threads)
            )
        self._seen: dict[int, int] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """This process and its live descendants (remembered, to be stopped at the end)."""
        found = with_descendants(self.pid) if self.alive() else []
        for pid in found:
            ticks = start_ticks(pid)
            if ticks is not None:
                self._seen.setdefault(pid, ticks)
        return found

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``STOP_TIMEOUT``; then any descendant still alive; idempotent."""
        self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, ticks in self._seen.items():
            if pid != self.pid and start_ticks(pid) == ticks:
                _kill_checked(pid, ticks)


def _kill_checked(pid: int, ticks: int) -> None:
    """SIGTERM then SIGKILL one process, if (pid, start time) still names it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if start_ticks(pid) != ticks:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and start_ticks(pid) == ticks:
            time.sleep(0.05)


def wait_until(check: Callable[[], bool], timeout: float, what: str, child: Child | None = None) -> None:
    """Poll ``check`` every 0.1 s until it is true; RuntimeError (with the log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited (status {child.proc.returncode}) while waiting for"
                               f" {what}; log tail:\n{child.log_tail()}")
        if check():
            return
        time.sleep(0.1)
    tail = f"; {child.name} log tail:\n{child.log_tail()}" if child is not None else ""
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 within 2 s."""
    try:
        with _DIRECT.open(url, timeout=2) as response:
            response.read()
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class LineReader:
    """The line protocol of a bench child on its stdout (``READY``, ``RESULT json``,
    ``FAILED reason``): :meth:`line` returns the next (kind, rest), RuntimeError on EOF, on a
    FAILED line or after ``timeout`` seconds of silence."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
        self.proc, self.name, self.log = proc, name, log
        self._buffer = b""

    def line(self, timeout: float) -> tuple[str, str]:
        if self.proc.stdout is None:
            raise RuntimeError(f"{self.name}: no stdout pipe")
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name} said nothing for {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited (status {self.proc.wait()}): {self.log_tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        kind, _, rest = line.decode("utf-8", "replace").partition(" ")
        if kind == "FAILED":
            raise RuntimeError(f"{self.name}: {rest}")
        return kind, rest

    def log_tail(self) -> str:
        """The last three lines of the child's stderr log."""
        try:
            return " | ".join(self.log.read_text("utf-8", "replace").strip().splitlines()[-3:]) or "(no output)"
        except OSError:
            return "(no log)"
