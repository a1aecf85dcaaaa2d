"""The capacity measurement of ``make bench``: what one Redis carries (docs/CAPACITY.md).

1. **PUBLISH throughput** of a private ``redis-server``, started as the ppbridge row starts
   it (``ppbridge.redis_server.RedisServer``, same binary and arguments), at ppbridge's
   message sizes: 512 bytes (a small request head or a small response: one PUBLISH each
   way) and 256 KiB (a full DATA frame at the default ``frame_size``), with 1 subscriber and
   with 4 on the channel, and once with 100 idle forwarder-shaped pattern subscriptions
   (Redis matches every PUBLISH against every pattern). Small messages go through
   ``redis-benchmark`` (C; 16 connections, one command at a time each, or 16 pipelined) to
   subscribers in ``bench/pubload.py subscribe`` (one process, reads and discards); frames
   through ``bench/pubload.py pubsub`` (publishers and subscribers in one loop, closed by a
   2 MiB window as ppbridge's flow control closes it), because a 256 KiB argument does not
   fit a command line. Each case runs ``warmup`` seconds, then ``seconds``
   measured on Redis's side: PUBLISH calls (INFO commandstats), bytes in and out (INFO
   stats), Redis's CPU time (/proc), the largest client output buffer (INFO clients,
   sampled every 0.2 s).
2. **The model** (:func:`model`): these costs combined with what the ppbridge row of the
   same run measured per request (PUBLISH and bytes per request, per MiB downloaded, per
   WebSocket round trip; CPU per request of the forwarder, the proxy and Redis). Every
   derived figure names the JSON fields it comes from.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ppbridge.redis_server import RedisServer

from children import LineReader, _die_with_parent, child_env
from procstats import cpu_seconds, loadavg, machine_busy_seconds
from pubload import Resp

HERE = Path(__file__).resolve().parent
SMALL = 512  # bytes: a small request head, or a small response (head and body in one message)
FRAME = 256 << 10  # bytes: a full DATA frame at the default frame_size
PATTERNS = 100  # idle forwarder patterns in the pattern case
CHANNEL = "ppbridge:p:bench:" + "5eb1c0de5eb1c0de"  # shaped like a proxy's data channel
ARGV_LIMIT = 128 << 10  # Linux's MAX_ARG_STRLEN: the longest single command-line argument
SAMPLE_EVERY = 0.2
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Case:
    key: str  # the case's name in the JSON: capacity.cases.KEY
    label: str
    size: int
    subscribers: int
    connections: int
    pipeline: int
    patterns: int = 0


CASES = (
    Case("small_1sub", "512 B, 1 subscriber, 16 conns, one command at a time", SMALL, 1, 16, 1),
    Case("small_1sub_pipelined", "512 B, 1 subscriber, 16 conns x 16 pipelined", SMALL, 1, 16, 16),
    Case("small_4sub_pipelined", "512 B, 4 subscribers, 16 conns x 16 pipelined", SMALL, 4, 16, 16),
    Case("small_patterns_pipelined", f"512 B, 1 subscriber + {PATTERNS} idle patterns, 16 conns x 16 pipelined",
         SMALL, 1, 16, 16, PATTERNS),
    Case("frame_1sub", "256 KiB, 1 subscriber, 2 conns x 2 pipelined", FRAME, 1, 2, 2),
    Case("frame_4sub", "256 KiB, 4 subscribers, 2 conns x 2 pipelined", FRAME, 4, 2, 2),
)
WINDOW = 2 << 20  # bytes the slowest subscriber may lag behind bench/pubload.py pubsub's publishers


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class LineChild:
    """A child speaking lines on stdout (READY, RESULT json, FAILED reason); its stdin
    closing tells it to finish."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=child_env(), preexec_fn=_die_with_parent)  # noqa: PLW1509
        self._reader = LineReader(self.proc, name, self.log)

    def line(self, timeout: float) -> tuple[str, str]:
        return self._reader.line(timeout)

    def wait_ready(self) -> None:
        kind, rest = self.line(READY_TIMEOUT)
        if kind != "READY":
            raise RuntimeError(f"{self.name}: expected READY, got {kind} {rest}")

    def finish(self) -> dict[str, Any]:
        """Close stdin and read RESULT."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        kind, rest = self.line(30.0)
        if kind != "RESULT":
            raise RuntimeError(f"{self.name}: expected RESULT, got {kind} {rest}")
        found: dict[str, Any] = json.loads(rest)
        return found

    def log_tail(self) -> str:
        return self._reader.log_tail()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _version(binary: str, flag: str = "--version") -> str:
    try:
        out = subprocess.run([binary, flag], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def _counters(conn: Resp) -> dict[str, float]:
    commands, stats = conn.info("commandstats"), conn.info("stats")
    calls = dict(part.split("=", 1) for part in commands.get("cmdstat_publish", "calls=0").split(",") if "=" in part)
    return {"publish": float(calls.get("calls", 0)), "in": float(stats.get("total_net_input_bytes", 0)),
            "out": float(stats.get("total_net_output_bytes", 0))}


@contextlib.contextmanager
def _load(case: Case, port: int, benchmark: str | None,
          folder: Path) -> Iterator[tuple[str, dict[str, int], Callable[[], dict[str, Any]]]]:
    """Subscribers and publishers for ``case`` running against ``port``; yields the tool, the
    client pids by role and a callable that ends the load and gives the clients' result."""
    common = ["--port", str(port), "--channel", CHANNEL, "--subscribers", str(case.subscribers), "--patterns",
              str(case.patterns)]
    if benchmark is not None and case.size < ARGV_LIMIT:
        subs = LineChild(f"subscribers-{case.key}", [sys.executable, str(HERE / "pubload.py"), "subscribe", *common],
                         folder)
        proc: subprocess.Popen[bytes] | None = None

        def stop_benchmark() -> None:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        def finish() -> dict[str, Any]:
            stop_benchmark()
            return subs.finish()

        try:
            subs.wait_ready()
            with open(folder / f"redis-benchmark-{case.key}.log", "wb") as log:
                proc = subprocess.Popen(
                    [benchmark, "-h", "127.0.0.1", "-p", str(port), "-c", str(case.connections), "-P",
                     str(case.pipeline), "-l", "-q", "PUBLISH", CHANNEL, "x" * case.size],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                    preexec_fn=_die_with_parent)  # noqa: PLW1509 (the benchmark starts no threads)
            tool = f"redis-benchmark -c {case.connections} -P {case.pipeline}; bench/pubload.py subscribe"
            yield tool, {"publisher": proc.pid, "subscribers": subs.proc.pid}, finish
        finally:
            stop_benchmark()
            subs.stop()
        return
    both = LineChild(f"pubsub-{case.key}", [sys.executable, str(HERE / "pubload.py"), "pubsub", *common, "--size",
                                            str(case.size), "--connections", str(case.connections), "--pipeline",
                                            str(case.pipeline), "--window", str(WINDOW)], folder)
    try:
        both.wait_ready()
        tool = (f"bench/pubload.py pubsub: {case.connections} conns x {case.pipeline}, closed loop"
                f" ({WINDOW >> 20} MiB window)")
        yield tool, {"publisher and subscribers": both.proc.pid}, both.finish
    finally:
        both.stop()


def run_case(case: Case, redis: RedisServer, conn: Resp, benchmark: str | None, folder: Path,
             warmup: float, seconds: float) -> dict[str, Any]:
    """One case: subscribers, then the load; figures over ``seconds`` after ``warmup``."""
    redis_pid = redis.pid
    assert redis_pid is not None
    with _load(case, redis.port, benchmark, folder) as (tool, clients, finish):
        numsub = conn.command("PUBSUB", "NUMSUB", CHANNEL)[1]
        numpat = conn.command("PUBSUB", "NUMPAT")
        time.sleep(warmup)
        pids = {"redis-server": redis_pid, **clients}
        c0, cpu0, busy0, t0 = _counters(conn), _cpu(pids), machine_busy_seconds(), time.monotonic()
        peak_buffer = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(min(SAMPLE_EVERY, max(0.0, seconds - (time.monotonic() - t0))))
            peak_buffer = max(peak_buffer, int(conn.info("clients").get("client_recent_max_output_buffer", 0)))
        c1, cpu1, busy1, t1 = _counters(conn), _cpu(pids), machine_busy_seconds(), time.monotonic()
        received = finish()
    if received.get("errors"):
        raise RuntimeError(f"{case.key}: {received['errors']} error replies to PUBLISH")
    elapsed = t1 - t0
    used = {role: round(max(0.0, cpu1[role] - cpu0[role]), 3) for role in pids}
    publishes = c1["publish"] - c0["publish"]
    bytes_in, bytes_out = c1["in"] - c0["in"], c1["out"] - c0["out"]
    n = max(publishes, 1.0)
    others = busy1 - busy0 - sum(used.values())
    figures = {
        **{k: v for k, v in asdict(case).items() if k != "key"}, "tool": tool,
        "subscribers_seen": int(numsub), "patterns_seen": int(numpat),
        "seconds": round(elapsed, 3), "publishes": int(publishes), "publish_per_s": round(publishes / elapsed, 1),
        "cpu_s": used, "redis_cpu_pct": round(used["redis-server"] / elapsed * 100, 1),
        "redis_us_per_publish": round(used["redis-server"] / n * 1e6, 3),
        "bytes_in": int(bytes_in), "bytes_out": int(bytes_out),
        "in_mb_s": round(bytes_in / elapsed / 1e6, 1), "out_mb_s": round(bytes_out / elapsed / 1e6, 1),
        "redis_cpu_s_per_gb_out": round(used["redis-server"] / max(bytes_out, 1) * 1e9, 3),
        "peak_output_buffer_bytes": peak_buffer, "subscribers_lost": received.get("connections_lost", 0),
        "others_cpu_pct": round(max(0.0, others) / elapsed * 100, 1),
    }
    say(f"  capacity {case.key}: {figures['publish_per_s']:,.0f} PUBLISH/s, Redis CPU"
        f" {figures['redis_cpu_pct']:.0f}% = {figures['redis_us_per_publish']:.2f} us/PUBLISH,"
        f" out {figures['out_mb_s']:,.0f} MB/s, subscribers lost {figures['subscribers_lost']},"
        f" rest of machine {figures['others_cpu_pct']:.0f}% CPU")
    return figures


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    return {role: cpu_seconds(pid) or 0.0 for role, pid in pids.items()}


def measure(folder: Path, warmup: float, seconds: float) -> dict[str, Any]:
    """Every case against one private redis-server; the result's ``status`` says if it ran."""
    folder.mkdir(parents=True, exist_ok=True)
    benchmark = shutil.which("redis-benchmark")
    out: dict[str, Any] = {"status": "ok", "warmup": warmup, "seconds": seconds, "channel": CHANNEL,
                           "loadavg_before": loadavg(), "cases": {}, "notes": []}
    if benchmark is None:
        out["notes"].append("redis-benchmark not found (apt-get install redis-tools): bench/pubload.py pubsub"
                            " (Python) publishes the small messages too, and may not saturate Redis")
    redis = RedisServer(workdir=str(folder))
    try:
        redis.start()
        out["redis"] = {"binary": redis.binary, "version": _version(redis.binary)}
        out["redis_benchmark"] = _version(benchmark) if benchmark else None
        with Resp(redis.port) as conn:
            limit = conn.command("CONFIG", "GET", "client-output-buffer-limit")
            out["redis"]["client_output_buffer_limit"] = bytes(limit[1]).decode() if limit else "?"
            out["redis"]["io_threads"] = bytes(conn.command("CONFIG", "GET", "io-threads")[1]).decode()
            for case in CASES:
                out["cases"][case.key] = run_case(case, redis, conn, benchmark, folder, warmup, seconds)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
        say(f"capacity: FAILED: {err}")
        out.update(status="failed", reason=str(err).splitlines()[0] if str(err) else repr(err))
    finally:
        redis.stop()
    out["loadavg_after"] = loadavg()
    return out


# The model -----------------------------------------------------------------------------------


def _get(result: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted JSON path ("rows.ppbridge.small.16.per_request.redis PUBLISH")."""
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def model(result: Mapping[str, Any]) -> dict[str, Any]:
    """What one Redis carries, from this run's capacity cases and ppbridge row. Each figure:
    ``{"value": ..., "from": [JSON paths, or names of other figures], "how": ...}``; empty
    when the capacity cases did not run. Figures whose sources are missing (no ppbridge row,
    no WebSocket measurements) are left out."""
    if (result.get("capacity") or {}).get("status") != "ok":
        return {}
    figures: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, sources: list[str], how: str, digits: int = 2) -> None:
        if value is not None:
            figures[name] = {"value": round(value, digits), "from": sources, "how": how}

    def measured(name: str, path: str, how: str, scale: float = 1.0, digits: int = 2) -> None:
        found = _get(result, path)
        if isinstance(found, (int, float)):
            put(name, found * scale, [path], how, digits)

    def get(name: str) -> float | None:
        found = figures.get(name)
        return None if found is None else float(found["value"])

    def derived(name: str, sources: list[str], formula: Any, how: str, digits: int = 2) -> None:
        values = [get(s) for s in sources]
        if all(v for v in values):
            put(name, formula(*values), sources, how, digits)

    def case(key: str, field: str) -> str:
        return f"capacity.cases.{key}.{field}"

    # Redis alone (the PUBLISH cases)
    measured("redis_us_per_small_publish", case("small_1sub", "redis_us_per_publish"),
             "Redis CPU per 512-byte PUBLISH to 1 subscriber, one command at a time on each of 16 connections",
             digits=3)
    measured("redis_us_per_small_publish_pipelined", case("small_1sub_pipelined", "redis_us_per_publish"),
             "the same with 16 commands pipelined per connection", digits=3)
    measured("redis_us_per_small_publish_4sub", case("small_4sub_pipelined", "redis_us_per_publish"),
             "pipelined, 4 subscribers", digits=3)
    measured("redis_us_per_small_publish_patterns", case("small_patterns_pipelined", "redis_us_per_publish"),
             f"pipelined, 1 subscriber and {PATTERNS} idle patterns", digits=3)
    derived("redis_us_per_extra_delivery", ["redis_us_per_small_publish_4sub", "redis_us_per_small_publish_pipelined"],
            lambda c, b: (c - b) / 3, "(4 subscribers - 1 subscriber) / 3", 3)
    derived("redis_ns_per_pattern", ["redis_us_per_small_publish_patterns", "redis_us_per_small_publish_pipelined"],
            lambda d, b: (d - b) / PATTERNS * 1000, f"(with {PATTERNS} idle patterns - without) / {PATTERNS}, ns", 1)
    derived("redis_small_publish_per_s_one_core", ["redis_us_per_small_publish"], lambda a: 1e6 / a,
            "1e6 / redis_us_per_small_publish: Redis runs commands on one thread", 0)
    measured("redis_cpu_s_per_gb_frames", case("frame_1sub", "redis_cpu_s_per_gb_out"),
             "Redis CPU per GB delivered in 256 KiB PUBLISH messages, 1 subscriber", digits=3)
    measured("redis_cpu_s_per_gb_frames_4sub", case("frame_4sub", "redis_cpu_s_per_gb_out"),
             "the same, 4 subscribers (per GB delivered, all subscribers together)", digits=3)
    # ppbridge's use of Redis (the ppbridge row of the same run)
    pp = "rows.ppbridge"
    measured("ppbridge_publish_per_small_request", f"{pp}.small.16.per_request.redis PUBLISH",
             "PUBLISH per small request, c16")
    measured("ppbridge_bytes_in_per_small_request", f"{pp}.small.16.per_request.redis bytes in",
             "bytes into Redis per small request, c16", digits=0)
    measured("ppbridge_bytes_out_per_small_request", f"{pp}.small.16.per_request.redis bytes out",
             "bytes out of Redis per small request, c16", digits=0)
    for conc in ("1", "16", "64"):
        measured(f"redis_us_per_small_request_in_row_c{conc}", f"{pp}.small.{conc}.cpu_s_per_1k.redis-server",
                 f"Redis CPU per small request in the ppbridge row at c{conc} (one forwarder, one proxy)", 1000)
    for role in ("forwarder", "proxy"):
        measured(f"{role}_us_per_small_request", f"{pp}.small.16.cpu_s_per_1k.{role}",
                 f"{role} CPU per small request, c16", 1000, 1)
        derived(f"{role}_requests_per_s_one_core", [f"{role}_us_per_small_request"], lambda us: 1e6 / us,
                f"small requests one {role} process (one thread) serves with a core to itself", 0)
    derived("redis_us_per_small_request", ["ppbridge_publish_per_small_request", "redis_us_per_small_publish"],
            lambda n, a: n * a, "PUBLISH per request x Redis CPU per PUBLISH", 2)
    derived("redis_small_requests_per_s", ["redis_us_per_small_request"], lambda us: 1e6 / us,
            "small requests per second at which one Redis core is busy all the time", 0)
    for role in ("forwarder", "proxy"):
        derived(f"{role}_processes_per_redis", ["redis_small_requests_per_s", f"{role}_requests_per_s_one_core"],
                lambda r, x: r / x, f"{role} processes, each flat out on its own core, that one Redis carries", 1)
    _patterns_fixed_point(figures, put)
    dl = f"{pp}.download"
    measured("ppbridge_publish_per_mib_download", f"{dl}.per_mib.redis PUBLISH", "PUBLISH per MiB downloaded")
    measured("ppbridge_bytes_in_per_mib_download", f"{dl}.per_mib.redis bytes in",
             "bytes into Redis per MiB downloaded", digits=0)
    measured("ppbridge_bytes_out_per_mib_download", f"{dl}.per_mib.redis bytes out",
             "bytes out of Redis per MiB downloaded", digits=0)
    measured("redis_cpu_s_per_gb_download_in_row", f"{dl}.cpu_s_per_gb.redis-server",
             "Redis CPU per GB downloaded through the ppbridge row", digits=3)
    for role in ("forwarder", "proxy"):
        measured(f"{role}_cpu_s_per_gb_download", f"{dl}.cpu_s_per_gb.{role}", f"{role} CPU per GB downloaded",
                 digits=3)
    measured("ppbridge_download_mb_s", f"{dl}.median_mb_s", "one-stream download through the row, MB/s", digits=0)
    derived("redis_download_gb_s_one_core", ["redis_cpu_s_per_gb_download_in_row"], lambda s: 1 / s,
            "GB/s of downloads one Redis core carries (CPU alone; the NIC carries each byte in and out)", 2)
    ws = f"{pp}.ws.echo.16"
    measured("ppbridge_publish_per_ws_round_trip", f"{ws}.per_message.redis PUBLISH",
             "PUBLISH per WebSocket round trip (100 bytes each way), 16 connections")
    measured("ppbridge_bytes_in_per_ws_round_trip", f"{ws}.per_message.redis bytes in",
             "bytes into Redis per WebSocket round trip", digits=0)
    measured("redis_us_per_ws_round_trip_in_row", f"{ws}.cpu_s_per_1k.redis-server",
             "Redis CPU per round trip in the ppbridge row, 16 connections", 1000)
    derived("redis_ws_round_trips_per_s", ["ppbridge_publish_per_ws_round_trip", "redis_us_per_small_publish"],
            lambda n, a: 1e6 / (n * a), "WebSocket round trips per second at which one Redis core is busy", 0)
    return figures


def _patterns_fixed_point(figures: dict[str, dict[str, Any]], put: Any) -> None:
    """Every forwarder process adds one pattern every PUBLISH is matched against: with F
    forwarders flat out at X req/s each, Redis needs F*X*n*(a + F*p) us per second (n
    PUBLISH per request, a us per PUBLISH, p us per pattern) <= 1e6. The largest such F."""
    try:
        a = figures["redis_us_per_small_publish"]["value"]
        p = figures["redis_ns_per_pattern"]["value"] / 1000
        x = figures["forwarder_requests_per_s_one_core"]["value"]
        n = figures["ppbridge_publish_per_small_request"]["value"]
    except KeyError:
        return
    sources = ["redis_us_per_small_publish", "redis_ns_per_pattern", "forwarder_requests_per_s_one_core",
               "ppbridge_publish_per_small_request"]
    how = "largest F with F*X*n*(a + F*p) <= 1e6: each forwarder's pattern is matched on every PUBLISH"
    if p <= 0:
        put("forwarder_processes_per_redis_with_patterns", 1e6 / (x * n * a), sources, how + " (p <= 0 here)", 1)
        return
    qa, qb = x * n * p, x * n * a
    put("forwarder_processes_per_redis_with_patterns", (-qb + (qb * qb + 4 * qa * 1e6) ** 0.5) / (2 * qa),
        sources, how, 1)
