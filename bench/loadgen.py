"""Load generation: small-request runs (wrk, else bench/pyload.py) and one-stream downloads and
uploads (curl, else a plain socket). Every run is bounded in time and stops by itself; its client's
own CPU time is measured too (``RUSAGE_CHILDREN`` around it), so it can be told apart.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
GRACE = 30.0  # beyond a run's own duration before its process is killed

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d,'
    .. ' "write": %d, "status": %d, "timeout": %d}, "p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f,'
    .. ' "max_us": %.1f, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass
class LoadResult:
    """One small-request run at one concurrency."""

    tool: str
    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "rps": round(self.rps, 1)}


@dataclass
class DownloadResult:
    """One or more downloads (or uploads) of the big file over one connection each, one at a time."""

    tool: str
    size: int
    speeds_mb_s: list[float]
    total_bytes: int
    seconds: float
    errors: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0

    @property
    def median_mb_s(self) -> float:
        return statistics.median(self.speeds_mb_s) if self.speeds_mb_s else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "median_mb_s": round(self.median_mb_s, 1)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _percentile(sorted_values: list[int], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[index])


class LoadGenerator:
    """Runs small-request load with the tool chosen once: wrk if installed (and allowed)."""

    def __init__(self, workdir: Path, prefer: str = "auto", wrk_threads: int = 1) -> None:
        wrk = shutil.which("wrk")
        self.wrk = wrk if prefer in ("auto", "wrk") else None
        if prefer == "wrk" and not wrk:
            raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
        self.wrk_threads = wrk_threads
        self.script = workdir / "report.lua"
        self.script.write_text(WRK_SCRIPT)
        self.note = "" if self.wrk or prefer == "python" else "wrk not installed: small requests use bench/pyload.py"

    @property
    def tool(self) -> str:
        if self.wrk:
            return f"wrk ({self.wrk_threads} thread{'s' if self.wrk_threads > 1 else ''}, keep-alive)"
        return "bench/pyload.py (asyncio, keep-alive, one process per core)"

    def run(self, url: str, connections: int, duration: float) -> LoadResult:
        """``connections`` keep-alive clients for ``duration`` seconds against ``url``."""
        before = _children_cpu()
        result = self._wrk(url, connections, duration) if self.wrk else self._python(url, connections, duration)
        result.client_cpu_s = _children_cpu() - before
        return result

    def _wrk(self, url: str, connections: int, duration: float) -> LoadResult:
        assert self.wrk is not None
        threads = max(1, min(self.wrk_threads, connections))
        args = [self.wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
                "--timeout", "10s", "-s", str(self.script), url]
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=duration + GRACE)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        data = json.loads(line[len("WRKJSON "):])
        return LoadResult("wrk", connections, data["requests"], data["duration_us"] / 1e6,
                          data["p50_us"] / 1000, data["p90_us"] / 1000, data["p99_us"] / 1000,
                          data["max_us"] / 1000, {k: v for k, v in data["errors"].items() if v})

    def _python(self, url: str, connections: int, duration: float) -> LoadResult:
        parts = urlsplit(url)
        workers = max(1, min(os.cpu_count() or 1, connections))
        shares = [connections // workers + (1 if i < connections % workers else 0) for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, str(HERE / "pyload.py"), "--port", str(parts.port),
                                   "--path", parts.path or "/", "--connections", str(n), "--duration", str(duration)],
                                  stdout=subprocess.PIPE, text=True) for n in shares]
        latencies: list[int] = []
        errors: dict[str, int] = {}
        requests, seconds = 0, 0.0
        for proc in procs:
            try:
                stdout, _ = proc.communicate(timeout=duration + GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError("bench/pyload.py did not finish in time") from None
            data = json.loads(stdout)
            latencies += data["latencies_us"]
            requests += data["requests"]
            seconds = max(seconds, data["seconds"])
            for key, value in data["errors"].items():
                if value:
                    errors[key] = errors.get(key, 0) + value
        latencies.sort()
        p50, p90, p99 = (_percentile(latencies, p) / 1000 for p in (50, 90, 99))
        return LoadResult("pyload", connections, requests, seconds, p50, p90, p99,
                          (latencies[-1] / 1000 if latencies else 0.0), errors)


class _OneStream:
    """The client of one-stream transfers, chosen once: curl if installed (and allowed), else a socket."""

    WHAT = "transfers"

    def __init__(self, prefer: str = "auto") -> None:
        curl = shutil.which("curl")
        self.curl = curl if prefer in ("auto", "curl") else None
        if prefer == "curl" and not curl:
            raise SystemExit("--downloader curl: curl is not installed (apt-get install curl)")
        self.note = "" if self.curl or prefer == "python" else f"curl not installed: {self.WHAT} use a Python socket"

    def repeat(self, once: Callable[[], tuple[int, float, str]], size: int, min_seconds: float,
               max_count: int) -> DownloadResult:
        """``once()`` (bytes carried, seconds, what was wrong or "") one at a time until
        ``min_seconds`` have passed (at least once, at most ``max_count`` times); the first
        error ends the series."""
        before, started = _children_cpu(), time.monotonic()
        speeds: list[float] = []
        errors: list[str] = []
        total = 0
        while len(speeds) + len(errors) < max(1, max_count):
            try:
                got, seconds, wrong = once()
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
                errors.append(str(err))
                break
            total += got
            if wrong:
                errors.append(wrong)
                break
            speeds.append(got / seconds / 1e6 if seconds > 0 else 0.0)
            if time.monotonic() - started >= min_seconds:
                break
        cpu = _children_cpu() - before if self.curl else 0.0
        return DownloadResult("curl" if self.curl else "socket", size, speeds, total,
                              time.monotonic() - started, errors, cpu)


class Downloader(_OneStream):
    """One-stream downloads of the big file: curl if installed (and allowed), else a socket."""

    WHAT = "downloads"

    @property
    def tool(self) -> str:
        return "curl -o /dev/null" if self.curl else "Python socket (recv_into, 1 MiB buffer)"

    def run(self, url: str, size: int, min_seconds: float, max_count: int, timeout: float) -> DownloadResult:
        """Download ``url`` one at a time until ``min_seconds`` have passed (at least once,
        at most ``max_count`` times); each must deliver ``size`` bytes within ``timeout``."""
        def once() -> tuple[int, float, str]:
            got, seconds = self._curl(url, timeout) if self.curl else _socket_download(url, timeout)
            return got, seconds, "" if got == size else f"got {got} bytes, expected {size}"

        return self.repeat(once, size, min_seconds, max_count)

    def _curl(self, url: str, timeout: float) -> tuple[int, float]:
        assert self.curl is not None
        args = [self.curl, "-s", "-S", "--noproxy", "*", "-o", "/dev/null", "--max-time", str(timeout),
                "-w", "%{http_code} %{size_download} %{time_total} %{time_starttransfer}", url]
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout + GRACE)
        fields = out.stdout.split()
        if out.returncode != 0 or len(fields) != 4 or fields[0] != "200":
            raise RuntimeError(f"curl exit {out.returncode}, status {fields[:1]}: {out.stderr.strip()}")
        return int(fields[1]), float(fields[2])


def _socket_download(url: str, timeout: float) -> tuple[int, float]:
    """GET ``url`` over one socket and count the body bytes; (bytes, seconds)."""
    parts = urlsplit(url)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout) as sock:
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        head, in_body, received = bytearray(), False, 0
        while time.monotonic() < deadline:
            n = sock.recv_into(view)
            if n == 0:
                break
            if in_body:
                received += n
                continue
            head += view[:n]
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                status = bytes(head[: head.index(b"\r\n")])
                if not status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    raise RuntimeError(f"download answered {status.decode('latin-1')}")
                in_body, received = True, len(head) - end - 4
        else:
            raise RuntimeError(f"download not finished after {timeout:g} s")
    return received, time.perf_counter() - started


class Uploader(_OneStream):
    """One-stream uploads of the big file: ``curl -T`` (a PUT) if installed (and allowed), else a
    socket. The upstream's own record of what it received is checked after every upload."""

    WHAT = "uploads"

    @property
    def tool(self) -> str:
        return 'curl -T FILE -H "Expect:" (PUT)' if self.curl else "Python socket (sendfile)"

    def run(self, url: str, source: Path, min_seconds: float, max_count: int, timeout: float,
            received: Callable[[], int], reset: Callable[[], None]) -> DownloadResult:
        """PUT ``source`` to ``url`` one at a time until ``min_seconds`` have passed (at least
        once, at most ``max_count`` times); each must be answered 2xx within ``timeout``, after
        which ``received()`` (the upstream's count, cleared by ``reset()`` before each) must be
        the file's whole size."""
        size = source.stat().st_size

        def once() -> tuple[int, float, str]:
            reset()
            sent, seconds = (self._curl(url, source, timeout) if self.curl
                             else _socket_upload(url, source, size, timeout))
            got = received()
            wrong = "" if sent == size and got == size else (
                f"sent {sent} bytes, upstream received {got}, expected {size}")
            return max(0, got), seconds, wrong

        return self.repeat(once, size, min_seconds, max_count)

    def _curl(self, url: str, source: Path, timeout: float) -> tuple[int, float]:
        assert self.curl is not None
        args = [self.curl, "-s", "-S", "--noproxy", "*", "-T", str(source), "-H", "Expect:", "-o", "/dev/null",
                "--max-time", str(timeout), "-w", "%{http_code} %{size_upload} %{time_total}", url]
        out = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout + GRACE)
        fields = out.stdout.split()
        if out.returncode != 0 or len(fields) != 3 or not fields[0].startswith("2"):
            raise RuntimeError(f"curl upload exit {out.returncode}, status {fields[:1]}: {out.stderr.strip()}")
        return int(fields[1]), float(fields[2])


def _socket_upload(url: str, source: Path, size: int, timeout: float) -> tuple[int, float]:
    """PUT ``source`` to ``url`` over one socket (``sendfile``) and read the status line;
    (bytes sent, seconds until the answer)."""
    parts = urlsplit(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout) as sock:
        sock.sendall(f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {size}\r\n"
                     "Connection: close\r\n\r\n".encode())
        with open(source, "rb") as body:
            sent = sock.sendfile(body)
        status = sock.makefile("rb").readline()
    if not status.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
        raise RuntimeError(f"upload answered {status.decode('latin-1').strip()!r}")
    return sent, time.perf_counter() - started
