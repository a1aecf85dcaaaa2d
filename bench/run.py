"""``make bench``: ppbridge against direct access and ``ssh -R``, on loopback, in one run.

Starts a fast upstream (nginx, else a Twisted static server), then each row in turn (direct,
the twisted.web floor, the relay floor, the bus floor, ppbridge, ssh -R), measures small-request
throughput and latency at several concurrencies, a one-stream download and upload of a big file
(not through the bus floor), WebSocket echo round
trips and one-connection WebSocket throughput (nginx only, not the floors), the CPU time and
peak memory of every process of the row; then the capacity of one Redis (PUBLISH throughput at
ppbridge's message sizes, combined with the ppbridge row's Redis commands and bytes per
request: docs/CAPACITY.md); prints the table with ratios and targets, and writes the figures
as JSON under bench/results/.
A benchmark, not a test: it reports, and exits 0 unless it could not run at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import capacity
import report
import rows
from loadgen import Downloader, DownloadResult, LoadGenerator, LoadResult, Uploader
from procstats import Snapshot, loadavg, machine_busy_seconds, peak_rss_mib
from upstreams import BIG_PATH, SMALL_PATH, UPLOAD_PATH, WS_PATH, Upstream, start_upstream

WS_IMPORT_ERROR = ""
try:
    import wsload
except ImportError as _err:  # websockets missing: the WebSocket measurements are skipped
    wsload = None  # type: ignore[assignment]
    WS_IMPORT_ERROR = f"the websockets library is not importable ({_err}): pip install websockets"

HERE = Path(__file__).resolve().parent
ROW_NAMES = {"direct": "direct", "twfloor": "twisted.web floor", "relay": "relay floor", "busfloor": "bus floor",
             "ppbridge": "ppbridge", "ssh": "ssh -R"}
DEFAULT_ROWS = ",".join(ROW_NAMES)
WS_SMALL = 100  # bytes per WebSocket echo message
WS_BIG_MIB = 1  # MiB per WebSocket throughput message
WS_INFLIGHT = 4  # throughput messages on their way at once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs: 2 s each, 0.5 s warm-up, one download and upload")
    p.add_argument("--duration", type=float, help="seconds per small-request run (default 8; quick 2)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each run, discarded (default 2; quick 0.5)")
    p.add_argument("--download-time", type=float,
                   help="repeat the big download, then the upload, until this many seconds have passed"
                        " (default 5; quick 0)")
    p.add_argument("--download-max", type=int, default=10, help="at most this many downloads (and uploads) per row (10)")
    p.add_argument("--no-upload", action="store_true", help="skip the one-stream uploads")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts (1,16,64)")
    p.add_argument("--big-mib", type=int, default=64, help="size of the big file in MiB (64)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"rows to run, in this order: {DEFAULT_ROWS} (all)")
    p.add_argument("--wan-delay", type=float, metavar="MS",
                   help="also measure ppbridge at c1 with MS ms added each way between proxy and Redis")
    p.add_argument("--wan-only", action="store_true", help="with --wan-delay: skip the ordinary rows")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto", help="small-request client")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1: the rest of 2 cores is the row's)")
    p.add_argument("--downloader", choices=("auto", "curl", "python"), default="auto",
                   help="download and upload client")
    p.add_argument("--no-nginx", action="store_true", help="use the Twisted static upstream even if nginx exists")
    p.add_argument("--no-ws", action="store_true", help="skip the WebSocket measurements")
    p.add_argument("--ws-duration", type=float,
                   help="seconds per WebSocket run, after --warmup seconds discarded (default 5; quick 2)")
    p.add_argument("--ws-concurrency", default="1,16", help="comma-separated WebSocket connection counts (1,16)")
    p.add_argument("--no-capacity", action="store_true",
                   help="skip the capacity measurement (PUBLISH throughput of a private Redis)")
    p.add_argument("--capacity-seconds", type=float,
                   help="seconds per capacity case, after a warm-up of at most 1 s (default 3; quick 1.5)")
    p.add_argument("--compare", type=Path, metavar="OLD.json", help="print before/after against an earlier run")
    p.add_argument("--show", type=Path, metavar="RUN.json", help="print the report of a saved run, run nothing")
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder for the JSON (bench/results)")
    p.add_argument("--no-save", action="store_true", help="do not write the JSON file")
    p.add_argument("--profile", action="store_true",
                   help="run ppbridge's forwarder and proxy under cProfile; top functions go to bench/results")
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    args = p.parse_args(argv)
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 2.0)
    args.download_time = args.download_time if args.download_time is not None else (0.0 if quick else 5.0)
    args.ws_duration = args.ws_duration if args.ws_duration is not None else (2.0 if quick else 5.0)
    args.capacity_seconds = args.capacity_seconds if args.capacity_seconds is not None else (1.5 if quick else 3.0)
    args.conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.ws_conc = [int(c) for c in args.ws_concurrency.split(",") if c.strip()]
    args.row_keys = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_keys if r not in ROW_NAMES]
    if unknown or not args.conc or min(args.conc) < 1 or not args.ws_conc or min(args.ws_conc) < 1:
        p.error(f"bad --rows {unknown}, --concurrency {args.concurrency!r} or --ws-concurrency"
                f" {args.ws_concurrency!r}")
    if args.wan_only and args.wan_delay is None:
        p.error("--wan-only needs --wan-delay MS")
    return args


def say(text: str) -> None:
    """Progress, on stderr so the report on stdout stays clean."""
    print(text, file=sys.stderr, flush=True)


class Bench:
    """One benchmark run: options, clients, the upstream, and the result being built."""

    def __init__(self, args: argparse.Namespace, tmp: Path, upstream: Upstream,
                 loadgen: LoadGenerator, downloader: Downloader, ws: wsload.WsClient | None = None,
                 uploader: Uploader | None = None) -> None:
        self.args, self.tmp, self.upstream = args, tmp, upstream
        self.loadgen, self.downloader, self.ws, self.uploader = loadgen, downloader, ws, uploader

    def measured(self, run: rows.RowRun, action: Callable[[], Any]) -> tuple[Any, dict[str, float], float,
                                                                           dict[str, float]]:
        """Run ``action``; the CPU seconds each process role used meanwhile, what the rest of
        the machine used (busy CPU seconds minus our roles and the client), and how much the
        row's counters grew."""
        roles = {**run.roles, **run.helpers}
        counters0 = run.counters() if run.counters else {}
        before, busy0 = Snapshot.take(roles), machine_busy_seconds()
        value = action()
        after, busy1 = Snapshot.take(roles), machine_busy_seconds()
        counters1 = run.counters() if run.counters else {}
        used = after.since(before)
        client = getattr(value, "client_cpu_s", 0.0)
        grown = {k: v - counters0.get(k, 0.0) for k, v in counters1.items() if v - counters0.get(k, 0.0) > 0}
        return value, used, max(0.0, busy1 - busy0 - sum(used.values()) - client), grown

    def small_run(self, run: rows.RowRun, conc: int, duration: float) -> dict[str, Any]:
        url = run.base_url + SMALL_PATH
        if self.args.warmup > 0:
            self.loadgen.run(url, conc, self.args.warmup)
        load: LoadResult
        load, used, others, grown = self.measured(run, lambda: self.loadgen.run(url, conc, duration))
        n = max(1, load.requests)
        own = {role: used[role] for role in run.roles}
        figures = load.to_json()
        figures.update({
            "cpu_s": {r: round(v, 3) for r, v in used.items()},
            "cpu_s_per_1k": {r: round(v / n * 1000, 4) for r, v in own.items()},
            "helpers_cpu_s_per_1k": {r: round(used[r] / n * 1000, 4) for r in run.helpers},
            "row_us_per_req": round(sum(own.values()) / n * 1e6, 1) if own else None,
            "others_cpu_pct": round(others / max(load.seconds, 1e-9) * 100, 1),
            "per_request": {k: round(v / n, 2) for k, v in grown.items()},
        })
        say(f"  {run.name} c{conc}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms,"
            f" errors {load.error_count}" + (f", row CPU {figures['row_us_per_req']:.0f} us/req" if own else "")
            + f", rest of machine {figures['others_cpu_pct']:.0f}% CPU")
        return figures

    def download_run(self, run: rows.RowRun) -> dict[str, Any]:
        a = self.args
        return self.transfer_run(run, "download", lambda: self.downloader.run(
            run.base_url + BIG_PATH, self.upstream.big_size, a.download_time, a.download_max, timeout=120))

    def upload_run(self, run: rows.RowRun) -> dict[str, Any]:
        """PUTs of the big file, checked against what the upstream (or the twisted.web floor) received."""
        a, up, uploader = self.args, self.upstream, self.uploader
        assert uploader is not None and up.root is not None
        source = up.root / BIG_PATH.lstrip("/")
        return self.transfer_run(run, "upload", lambda: uploader.run(
            run.base_url + UPLOAD_PATH, source, a.download_time, a.download_max, 120,
            up.upload_received, up.upload_reset))

    def transfer_run(self, run: rows.RowRun, what: str, action: Callable[[], DownloadResult]) -> dict[str, Any]:
        """One-stream transfers measured: MB/s, the CPU of each process per GB carried."""
        dl: DownloadResult
        dl, used, others, grown = self.measured(run, action)
        gb = max(dl.total_bytes, 1) / 1e9
        own = {role: used[role] for role in run.roles}
        figures: dict[str, Any] = dl.to_json()
        figures.update({
            "cpu_s": {r: round(v, 3) for r, v in used.items()},
            "cpu_s_per_gb": {r: round(v / gb, 3) for r, v in own.items()},
            "helpers_cpu_s_per_gb": {r: round(used[r] / gb, 3) for r in run.helpers},
            "row_s_per_gb": round(sum(own.values()) / gb, 3) if own else None,
            "others_cpu_pct": round(others / max(dl.seconds, 1e-9) * 100, 1),
            "per_mib": {k: round(v / (max(dl.total_bytes, 1) / 2**20), 2) for k, v in grown.items()},
        })
        say(f"  {run.name} {what}: {dl.median_mb_s:,.0f} MB/s over {len(dl.speeds_mb_s)} run(s)"
            + (f", row CPU {figures['row_s_per_gb']:.2f} s/GB" if own else "")
            + (f", errors: {'; '.join(dl.errors)}" if dl.errors else ""))
        return figures

    def measure_row(self, run: rows.RowRun) -> dict[str, Any]:
        everything = {**run.roles, **run.helpers}
        result: dict[str, Any] = {"status": "ok", "url": run.base_url, "notes": run.notes,
                                  "row_roles": list(run.roles), "versions": run.versions,
                                  "loadavg_before": loadavg(), "small": {}}
        for conc in self.args.conc:
            result["small"][str(conc)] = self.small_run(run, conc, self.args.duration)
        rss: dict[str, Any] = {"after_small": _rounded(peak_rss_mib(everything))}
        if not run.transfers:
            result["rss_mib"] = rss
            return result
        result["download"] = self.download_run(run)
        rss["after_download"] = _rounded(peak_rss_mib(everything))
        if self.uploader is not None:
            result["upload"] = self.upload_run(run)
            rss["after_upload"] = _rounded(peak_rss_mib(everything))
        if self.ws is not None and run.ws:
            result["ws"] = self.ws_row(run)
            rss["after_ws"] = _rounded(peak_rss_mib(everything))
        result["rss_mib"] = rss
        return result

    def ws_row(self, run: rows.RowRun) -> dict[str, Any]:
        """The WebSocket figures of a row: echo round trips at each --ws-concurrency, then one
        connection's throughput; a failure is reported with the figures measured before it."""
        url = "ws://" + run.base_url.removeprefix("http://") + WS_PATH
        wsrun = dataclasses.replace(run, helpers={**run.helpers, **self.upstream.ws_roles()})
        out: dict[str, Any] = {"status": "ok", "url": url, "echo": {}}
        try:
            for conc in self.args.ws_conc:
                out["echo"][str(conc)] = self.ws_run(wsrun, url, "echo", conc, WS_SMALL)
            out["throughput"] = self.ws_run(wsrun, url, "throughput", 1, WS_BIG_MIB << 20)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as err:
            say(f"  {run.name} WebSocket: FAILED: {err}")
            out.update(status="failed", reason=str(err).splitlines()[0] if str(err) else repr(err))
        return out

    def ws_run(self, run: rows.RowRun, url: str, mode: str, conc: int, size: int) -> dict[str, Any]:
        """One bench/wsload.py run, its warm-up discarded, measured like the small requests:
        CPU per process from /proc around the measured seconds (the client's apart)."""
        assert self.ws is not None
        with self.ws.session(url, mode, conc, size, self.args.warmup, self.args.ws_duration,
                             WS_INFLIGHT) as session:
            res: wsload.WsResult
            res, used, others, grown = self.measured(run, session.measure)
        own = {role: used[role] for role in run.roles}
        figures: dict[str, Any] = res.to_json()
        figures.update({"cpu_s": {r: round(v, 3) for r, v in used.items()},
                        "others_cpu_pct": round(others / max(res.seconds, 1e-9) * 100, 1)})
        if mode == "echo":
            n = max(1, res.messages)
            figures.update({
                "cpu_s_per_1k": {r: round(v / n * 1000, 4) for r, v in own.items()},
                "helpers_cpu_s_per_1k": {r: round(used[r] / n * 1000, 4) for r in run.helpers},
                "row_us_per_msg": round(sum(own.values()) / n * 1e6, 1) if own else None,
                "per_message": {k: round(v / n, 2) for k, v in grown.items()},
            })
            say(f"  {run.name} WebSocket c{conc}: {res.rate:,.0f} round trips/s, p50 {res.p50_ms:.2f} ms,"
                f" p99 {res.p99_ms:.2f} ms, errors {sum(res.errors.values())}"
                + (f", row CPU {figures['row_us_per_msg']:.0f} us/msg" if own else "")
                + f", rest of machine {figures['others_cpu_pct']:.0f}% CPU")
        else:
            carried = max(1, 2 * res.bytes_total)  # every echoed byte crossed the row twice
            gb = carried / 1e9
            figures.update({
                "carried_bytes": carried,
                "cpu_s_per_gb": {r: round(v / gb, 3) for r, v in own.items()},
                "helpers_cpu_s_per_gb": {r: round(used[r] / gb, 3) for r in run.helpers},
                "row_s_per_gb": round(sum(own.values()) / gb, 3) if own else None,
                "per_mib": {k: round(v / (carried / 2**20), 2) for k, v in grown.items()},
            })
            say(f"  {run.name} WebSocket throughput: {res.mb_s or 0:,.0f} MB/s echoed ({size >> 20} MiB messages,"
                f" {WS_INFLIGHT} on their way), errors {sum(res.errors.values())}")
        return figures

    def row_factory(self, key: str) -> Callable[[], AbstractContextManager[rows.RowRun]]:
        if key == "direct":
            return lambda: rows.direct(self.upstream)
        if key == "twfloor":
            return lambda: rows.twisted_floor(self.upstream, self.tmp / "twfloor")
        if key == "relay":
            return lambda: rows.relay_floor(self.upstream, self.tmp / "relay")
        if key == "busfloor":
            return lambda: rows.bus_floor(self.upstream, self.tmp / "busfloor")
        if key == "ppbridge":
            profile = self.tmp / "profiles" if self.args.profile else None
            if profile is not None:
                profile.mkdir(exist_ok=True)
            return lambda: rows.ppbridge(self.upstream, self.tmp / "ppbridge", profile_dir=profile)
        return lambda: rows.ssh_reverse(self.upstream, self.tmp / "ssh")

    def run_row(self, name: str, factory: Callable[[], AbstractContextManager[rows.RowRun]],
                measure: Callable[[rows.RowRun], dict[str, Any]]) -> dict[str, Any]:
        """Start, measure and stop one row; a row that cannot start is reported, not fatal
        (but a dead upstream ends the whole run)."""
        if not self.upstream.child.alive():
            raise RuntimeError(f"the upstream exited; log:\n{self.upstream.child.log_tail()}")
        say(f"{name}: starting")
        try:
            with factory() as run:
                figures: dict[str, Any] = measure(run)
                return figures
        except rows.RowSkipped as err:
            say(f"{name}: SKIPPED: {err}")
            return {"status": "skipped", "reason": str(err)}
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as err:
            say(f"{name}: FAILED: {err}")
            return {"status": "failed", "reason": str(err).splitlines()[0] if str(err) else repr(err),
                    "detail": traceback.format_exc()}

    def small_c1(self, run: rows.RowRun, duration: float) -> dict[str, Any]:
        return self.small_run(run, 1, duration)

    def wan(self) -> dict[str, Any] | None:
        """ppbridge at c1 through the delay relay at 0 ms and at --wan-delay ms."""
        delay = self.args.wan_delay
        runs: dict[str, dict[str, Any]] = {}
        for label, ms in (("base", 0.0), ("delayed", delay)):
            name = f"ppbridge wan {ms:g}ms"
            # Enough requests even when each costs a round trip or more of the delay.
            duration = max(self.args.duration, min(30.0, 40 * 4 * ms / 1000))
            factory = functools.partial(rows.ppbridge, self.upstream, self.tmp / "ppbridge", ms, name)
            measure = functools.partial(self.small_c1, duration=duration)
            runs[label] = self.run_row(name, factory, measure)
            if "rps" not in runs[label]:
                say(f"WAN mode: {name} did not run")
                return None
        increase = runs["delayed"]["p50_ms"] - runs["base"]["p50_ms"]
        return {"delay_ms": delay, "tool": self.loadgen.tool, "base": runs["base"], "delayed": runs["delayed"],
                "increase_ms": round(increase, 2), "round_trips": round(increase / (2 * delay), 3) if delay else None}


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def machine_busy_now(seconds: float = 1.0) -> float:
    """Percent of one core the whole machine was busy over ``seconds`` (before we start)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return round((machine_busy_seconds() - before) / seconds * 100, 1)


def save_profiles(folder: Path, results: Path, started: datetime) -> list[str]:
    """Each ``*.pstats`` in ``folder`` as text under ``results``: own time summed per source
    file, then the top 40 functions by own time and by cumulative time; the paths written."""
    import io
    import pstats

    written = []
    results.mkdir(parents=True, exist_ok=True)
    for stats_file in sorted(folder.glob("*.pstats")):
        text = io.StringIO()
        text.write(by_file(pstats.Stats(str(stats_file))) + "\n\n")
        for order in ("tottime", "cumulative"):
            stats = pstats.Stats(str(stats_file), stream=text)
            stats.strip_dirs().sort_stats(order).print_stats(40)
        path = results / f"{started.strftime('%Y%m%d-%H%M%S')}-profile-{stats_file.stem}.txt"
        path.write_text(text.getvalue())
        written.append(str(path))
        say(f"profile of the {stats_file.stem} written to {path}")
    return written


def package_digest(folder: Path) -> str:
    """A short digest of the ``*.py`` files in ``folder``: tells which code was measured."""
    digest = hashlib.sha256()
    for source in sorted(folder.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def installed_ppbridge() -> dict[str, Any]:
    """Where the measured ppbridge is installed, its digest and whether it matches the source
    tree (if not, ``make install`` was not run after the last change)."""
    import ppbridge

    installed = Path(ppbridge.__file__).resolve().parent
    digest, source = package_digest(installed), package_digest(HERE.parent / "ppbridge")
    return {"path": str(installed), "version": ppbridge.__version__, "digest": digest,
            "matches_source_tree": digest == source}


def by_file(stats: Any) -> str:
    """Own time per source file (``~`` is C builtins such as socket calls and epoll), the
    idle wait in ``epoll.poll`` apart, as a share of the busy time."""
    per_file: dict[str, float] = {}
    idle = 0.0
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        if "poll' of 'select.epoll" in function:
            idle += tottime
            continue
        key = filename if filename == "~" else "/".join(Path(filename).parts[-2:])
        per_file[key] = per_file.get(key, 0.0) + tottime
    busy = sum(per_file.values()) or 1.0
    lines = [f"busy {busy:.2f} s, idle in epoll {idle:.2f} s; own time by file:"]
    for key, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:30]:
        lines.append(f"  {seconds / busy * 100:5.1f}%  {seconds:7.3f} s  {key}")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                             check=False, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit, SIGINT KeyboardInterrupt (even when started with
    SIGINT ignored, as background jobs are), so every ``finally`` stops what it started."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def start_meta(args: argparse.Namespace, started: datetime) -> dict[str, Any]:
    """What the run is: options, machine, versions, the measured code, the load before it."""
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "commit": git_commit(), "loadavg_start": loadavg(),
        "duration": args.duration, "warmup": args.warmup, "download_time": args.download_time,
        "big_mib": args.big_mib, "concurrency": args.conc, "argv": sys.argv[1:], "notes": [],
    }
    meta["ppbridge"] = installed_ppbridge()
    if not meta["ppbridge"]["matches_source_tree"]:
        meta["notes"].append("the installed ppbridge differs from ppbridge/ in the source tree: run 'make install'")
    meta["machine_busy_pct_before"] = machine_busy_now()
    say(f"load average {meta['loadavg_start']}; machine busy {meta['machine_busy_pct_before']}% of one core"
        f" in the second before the start ({meta['cpus']} CPUs)")
    return meta


def run_all(args: argparse.Namespace, tmp: Path, result: dict[str, Any], started: datetime) -> None:
    """The upstream, then every row and the WAN mode, filling ``result``; all stopped on return."""
    meta = result["meta"]
    loadgen = LoadGenerator(tmp, args.loadgen, args.wrk_threads)
    downloader = Downloader(args.downloader)
    uploader = None if args.no_upload or args.wan_only else Uploader(args.downloader)
    meta.update(loadgen=loadgen.tool, downloader=downloader.tool, uploader=uploader.tool if uploader else None)
    meta["notes"] += [n for n in (loadgen.note, downloader.note, uploader.note if uploader else "") if n]
    ws_wanted = not args.no_ws and not args.wan_only and wsload is not None
    with start_upstream(tmp, args.big_mib << 20, allow_nginx=not args.no_nginx, ws=ws_wanted) as upstream:
        meta["upstream"] = upstream.kind
        meta["notes"] += upstream.notes
        ws = None
        skipped = ("--no-ws" if args.no_ws else "--wan-only" if args.wan_only
                   else WS_IMPORT_ERROR if wsload is None else upstream.ws_skipped)
        if not skipped:
            ws = wsload.WsClient(tmp)
        meta["ws"] = {"skipped": skipped or None, "tool": ws.tool if ws else None, "duration": args.ws_duration,
                      "warmup": args.warmup, "concurrency": args.ws_conc, "echo_bytes": WS_SMALL,
                      "throughput_mib": WS_BIG_MIB, "inflight": WS_INFLIGHT,
                      "path": f"nginx {WS_PATH} -> bench/wsecho.py" if ws else None}
        if skipped:
            say(f"WebSocket measurements skipped: {skipped}")
        bench = Bench(args, tmp, upstream, loadgen, downloader, ws, uploader)
        if not args.wan_only:
            for key in args.row_keys:
                name = ROW_NAMES[key]
                result["rows"][name] = bench.run_row(name, bench.row_factory(key), bench.measure_row)
        if args.wan_delay is not None:
            result["wan"] = bench.wan()
    if not args.no_capacity and not args.wan_only:  # the upstream is stopped: Redis and its clients only
        say("capacity: PUBLISH throughput of a private redis-server")
        result["capacity"] = capacity.measure(tmp / "capacity", min(args.warmup, 1.0), args.capacity_seconds)
        result["capacity"]["model"] = capacity.model(result)
        if args.profile:
            result["capacity"]["notes"].append("forwarder and proxy ran under cProfile: their per-request CPU,"
                                               " and the process counts derived from it, are inflated")
    if args.profile:
        meta["profiles"] = save_profiles(tmp / "profiles", args.results, started)


def show(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the report (and the comparison, if asked)."""
    print(report.render(result))
    if args.compare:
        print()
        print(report.compare(json.loads(args.compare.read_text()), result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        show(args, json.loads(args.show.read_text()))
        return 0
    started = datetime.now()
    result: dict[str, Any] = {"meta": start_meta(args, started), "rows": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ppbridge-bench-"))
    os.chmod(tmp, 0o711)  # nginx workers (another user) must reach the served folder
    try:
        with stop_on_signals():
            run_all(args, tmp, result, started)
    except (KeyboardInterrupt, SystemExit):
        say("interrupted: every process this run started has been stopped")
        raise
    finally:
        if args.keep_temp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["finished"] = datetime.now().isoformat(timespec="seconds")
    result["targets"] = report.targets(result)
    show(args, result)
    if not args.no_save:
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        say(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
