"""The printed report: tables with ratios to direct and to ssh -R (HTTP and WebSocket), ppbridge
as multiples of the floors measured in the same run (the relay floor, the twisted.web floor, the
bus floor), the targets, a comparison with an earlier run's JSON. Works only on the JSON-ready
result dict, so ``--compare`` reads old files exactly as this run writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Result = Mapping[str, Any]
TARGET_CONCURRENCY = "16"
FLAT_MEMORY_MIB = 16.0
ISSUE_SSH = {"rps": 7200.0, "p99_ms": 43.0, "us_per_req": 25.0, "mb_s": 110.0}
LOCALTUNNEL = {"rps": 4500.0, "p99_ms": 9.0, "us_per_req": 260.0, "mb_s": 400.0}
RELAY, TWFLOOR, BUSFLOOR, SSH = "relay floor", "twisted.web floor", "bus floor", "ssh -R"
FLOOR_CPU_MAX = 1.3  # issue 12: ppbridge's CPU per request at most this many times the relay floor's
SSH_RPS_MIN = 0.5  # issue 12: ppbridge's req/s at least this share of ssh -R's (with a lower p99)
TRANSFERS = ("download", "upload")  # the one-stream measurements, each a DownloadResult with CPU per GB


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns right-aligned (the first left-aligned), two spaces apart."""
    body = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers))]
    lines = []
    for r in body:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    r = value / base
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def _ok(rows: Result) -> dict[str, Result]:
    return {name: row for name, row in rows.items() if row.get("status") == "ok"}


def small(row: Result | None, conc: str) -> Result | None:
    """The small-request figures of ``row`` at concurrency ``conc``, if it has them."""
    if row is None:
        return None
    found: Result | None = row.get("small", {}).get(conc)
    return found


def field(run: Result | None, key: str) -> float | None:
    return None if run is None else run.get(key)


def tunnel_us(row: Result, conc: str) -> float | None:
    run = small(row, conc)
    return None if run is None else run.get("row_us_per_req")


def small_section(result: Result) -> str:
    rows = _ok(result["rows"])
    direct, ssh = rows.get("direct"), rows.get("ssh -R")
    out = []
    for name, row in rows.items():
        for conc, run in row.get("small", {}).items():
            d, s = small(direct, conc), small(ssh, conc)
            out.append([name if conc == next(iter(row["small"])) else "", conc, fmt(run["rps"], 0),
                        fmt(run["p50_ms"], 2), fmt(run["p99_ms"], 2), str(sum(run["errors"].values())),
                        ratio(run["rps"], field(d, "rps")), ratio(run["rps"], field(s, "rps")),
                        ratio(run["p99_ms"], field(s, "p99_ms")), fmt(run.get("row_us_per_req"), 0),
                        fmt(run.get("others_cpu_pct"), 0)])
    return table(["row", "conc", "req/s", "p50 ms", "p99 ms", "errors", "req/s vs direct", "req/s vs ssh",
                  "p99 vs ssh", "row CPU us/req", "others %CPU"], out)


def _times(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def floors_section(result: Result) -> str | None:
    """ppbridge's figures as multiples of the floors' and of ssh -R's (same run, same
    concurrency): req/s, CPU per request and what it spends above the relay floor; the
    download's MB/s and CPU per GB. The bus floor's small requests get lines of their own
    (what the shape costs with none of ppbridge's work), and a column for ppbridge's."""
    rows = _ok(result["rows"])
    pp = rows.get("ppbridge")
    if pp is None or not (RELAY in rows or TWFLOOR in rows):
        return None
    relay, tw, bus, ssh = rows.get(RELAY), rows.get(TWFLOOR), rows.get(BUSFLOOR), rows.get(SSH)
    out = []
    for label, row in (("", pp), ("bus floor ", bus)):
        for conc, run in (row or {}).get("small", {}).items():
            r, t, b, s = small(relay, conc), small(tw, conc), small(bus, conc), small(ssh, conc)
            cpu, relay_cpu = run.get("row_us_per_req"), field(r, "row_us_per_req")
            above = None if cpu is None or relay_cpu is None else cpu - relay_cpu
            out.append([f"{label}c{conc}", fmt(run["rps"], 0), ratio(run["rps"], field(r, "rps")),
                        ratio(run["rps"], field(s, "rps")), ratio(run["p99_ms"], field(s, "p99_ms")), fmt(cpu, 0),
                        ratio(cpu, relay_cpu), ratio(cpu, field(t, "row_us_per_req")),
                        "-" if row is bus else ratio(cpu, field(b, "row_us_per_req")),
                        ratio(cpu, field(s, "row_us_per_req")), fmt(above, 0)])
    for what in TRANSFERS:
        dl = pp.get(what)
        if not dl:
            continue
        base = {name: (row or {}).get(what) or {}
                for name, row in ((RELAY, relay), (TWFLOOR, tw), (SSH, ssh))}
        mb_s, gb = dl["median_mb_s"], dl.get("row_s_per_gb")
        relay_gb = base[RELAY].get("row_s_per_gb")
        out.append([what, f"{fmt(mb_s, 0)} MB/s", ratio(mb_s, base[RELAY].get("median_mb_s")),
                    ratio(mb_s, base[SSH].get("median_mb_s")), "-", f"{fmt(gb, 2)} s/GB", ratio(gb, relay_gb),
                    ratio(gb, base[TWFLOOR].get("row_s_per_gb")), "-", ratio(gb, base[SSH].get("row_s_per_gb")),
                    "-" if gb is None or relay_gb is None else f"{gb - relay_gb:.2f} s/GB"])
    return table(["ppbridge", "req/s", "x relay floor", "x ssh -R", "p99 x ssh -R", "row CPU us/req",
                  "x relay floor", "x twisted.web floor", "x bus floor", "x ssh -R", "above relay floor"], out)


def cpu_section(result: Result) -> str:
    out = []
    for name, row in _ok(result["rows"]).items():
        for conc, run in row.get("small", {}).items():
            per_k = run.get("cpu_s_per_1k", {})
            parts = ", ".join(f"{role} {v:.3f}" for role, v in per_k.items()) or "(no tunnel processes)"
            up = ", ".join(f"{role} {v:.3f}" for role, v in _helpers(run, "_cpu_s_per_1k").items())
            client = run["client_cpu_s"] / run["requests"] * 1000 if run["requests"] else 0.0
            row_us = run.get("row_us_per_req")
            out.append([f"{name} c{conc}", parts, fmt(None if row_us is None else row_us / 1000, 3), up,
                        f"{client:.3f}"])
        for what in TRANSFERS:
            dl = row.get(what)
            if not dl:
                continue
            parts = ", ".join(f"{role} {v:.2f}" for role, v in dl.get("cpu_s_per_gb", {}).items()) or "-"
            up = ", ".join(f"{role} {v:.2f}" for role, v in _helpers(dl, "_cpu_s_per_gb").items())
            total = dl.get("row_s_per_gb")
            out.append([f"{name} {what}", f"{parts} (s/GB)" if total is not None else "-",
                        "-" if total is None else f"{total:.2f} s/GB", up, "-"])
        out += _ws_cpu_rows(name, row)
    return table(["measurement", "row processes (CPU s per 1000 req)", "row total", "upstream (not counted)",
                  "client"], out)


def _ws_cpu_rows(name: str, row: Result) -> list[list[str]]:
    """The CPU lines of a row's WebSocket runs: per 1000 round trips, per GB carried."""
    ws = row.get("ws") or {}
    out = []
    for conc, run in ws.get("echo", {}).items():
        parts = ", ".join(f"{role} {v:.3f}" for role, v in run.get("cpu_s_per_1k", {}).items())
        up = ", ".join(f"{role} {v:.3f}" for role, v in run.get("helpers_cpu_s_per_1k", {}).items())
        client = run["client_cpu_s"] / run["messages"] * 1000 if run["messages"] else 0.0
        us = run.get("row_us_per_msg")
        label = f"{parts} (per 1000 round trips)" if parts else "(no tunnel processes)"
        out.append([f"{name} WebSocket c{conc}", label, fmt(None if us is None else us / 1000, 3), up, f"{client:.3f}"])
    tp = ws.get("throughput")
    if tp:
        parts = ", ".join(f"{role} {v:.2f}" for role, v in tp.get("cpu_s_per_gb", {}).items())
        up = ", ".join(f"{role} {v:.2f}" for role, v in tp.get("helpers_cpu_s_per_gb", {}).items())
        total = tp.get("row_s_per_gb")
        client = tp["client_cpu_s"] / (tp["carried_bytes"] / 1e9) if tp.get("carried_bytes") else 0.0
        out.append([f"{name} WebSocket throughput", f"{parts} (s/GB carried)" if parts else "-",
                    "-" if total is None else f"{total:.2f} s/GB", up, f"{client:.2f} s/GB"])
    return out


def _helpers(run: Result, suffix: str) -> Mapping[str, float]:
    """The not-counted processes' figures (``upstream_*`` in runs saved before ``helpers_*``)."""
    found: Mapping[str, float] = run.get("helpers" + suffix) or run.get("upstream" + suffix) or {}
    return found


def counters_section(result: Result) -> str | None:
    """Redis commands and bytes per request (and per MiB downloaded), for rows that count them."""
    out = []
    for name, row in _ok(result["rows"]).items():
        for conc, run in row.get("small", {}).items():
            if run.get("per_request"):
                out.append([f"{name} c{conc}", "per request", _counters(run["per_request"])])
        for what in TRANSFERS:
            dl = row.get(what) or {}
            if dl.get("per_mib"):
                out.append([f"{name} {what}", "per MiB", _counters(dl["per_mib"])])
        ws = row.get("ws") or {}
        for conc, run in ws.get("echo", {}).items():
            if run.get("per_message"):
                out.append([f"{name} WebSocket c{conc}", "per round trip", _counters(run["per_message"])])
        if (ws.get("throughput") or {}).get("per_mib"):
            out.append([f"{name} WebSocket throughput", "per MiB carried", _counters(ws["throughput"]["per_mib"])])
    return table(["measurement", "", "Redis commands and bytes"], out) if out else None


def _counters(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('redis ')} {v:,.2f}" if v < 100 else f"{k.removeprefix('redis ')} {v:,.0f}"
                     for k, v in sorted(values.items()))


def download_section(result: Result, what: str = "download") -> str:
    """The one-stream ``what`` (download or upload) of every row, with ratios to direct and ssh -R."""
    rows = _ok(result["rows"])
    base = {k: rows[k][what]["median_mb_s"] for k in ("direct", "ssh -R") if k in rows and rows[k].get(what)}
    out = []
    for name, row in rows.items():
        dl = row.get(what)
        if not dl:
            continue
        speeds = ", ".join(f"{v:.0f}" for v in dl["speeds_mb_s"])
        out.append([name, fmt(dl["median_mb_s"], 0), speeds, ratio(dl["median_mb_s"], base.get("direct")),
                    ratio(dl["median_mb_s"], base.get("ssh -R")), fmt(dl.get("row_s_per_gb"), 2),
                    fmt(dl.get("others_cpu_pct"), 0), "; ".join(dl["errors"]) or "-"])
    return table(["row", "MB/s (median)", "each run MB/s", "vs direct", "vs ssh", "row CPU s/GB", "others %CPU",
                  "errors"], out)


def memory_section(result: Result) -> str:
    out = []
    with_ws = any("after_ws" in row.get("rss_mib", {}) for row in _ok(result["rows"]).values())
    with_up = any("after_upload" in row.get("rss_mib", {}) for row in _ok(result["rows"]).values())
    for name, row in _ok(result["rows"]).items():
        rss = row.get("rss_mib", {})
        small_peak, dl_peak = rss.get("after_small", {}), rss.get("after_download", {})
        up_peak, ws_peak = rss.get("after_upload", {}), rss.get("after_ws", {})
        for role in ws_peak or up_peak or dl_peak or small_peak:
            a, b, c = small_peak.get(role), dl_peak.get(role), up_peak.get(role)
            grow = None if a is None or b is None else max(b, c if c is not None else b) - a
            out.append([name, role, fmt(a), fmt(b)] + ([fmt(c)] if with_up else []) + [fmt(grow)]
                       + ([fmt(ws_peak.get(role))] if with_ws else []))
    return table(["row", "process", "peak RSS MiB after small reqs", "after big download"]
                 + (["after big upload"] if with_up else []) + ["growth"]
                 + (["after WebSocket"] if with_ws else []), out)


def _any_ws(result: Result) -> bool:
    return any(row.get("ws") for row in _ok(result["rows"]).values())


def ws_sections(result: Result) -> list[str]:
    """The WebSocket tables (echo round trips, one-connection throughput), or why there are none."""
    meta = result["meta"].get("ws")
    if not meta:
        return []  # a run saved before the WebSocket measurements existed
    if meta.get("skipped"):
        return ["", f"WebSocket: skipped ({meta['skipped']})"]
    rows = {name: row for name, row in _ok(result["rows"]).items() if row.get("ws")}
    parts = ["", (f"WebSocket echo round trips ({meta['path']}, the same hop for every row):"
                  f" {meta['echo_bytes']}-byte binary messages, each connection sends one, waits for its echo,"
                  f" repeats; {meta['duration']:g} s per run after {meta['warmup']:g} s warm-up; {meta['tool']}")]
    for name, row in rows.items():
        if row["ws"].get("status") != "ok":
            parts.append(f"row {name!r} WebSocket failed: {row['ws'].get('reason')}")
    echo = {name: row["ws"].get("echo", {}) for name, row in rows.items()}
    direct, ssh = echo.get("direct", {}), echo.get("ssh -R", {})
    out = []
    for name, runs in echo.items():
        for i, (conc, run) in enumerate(runs.items()):
            d, s = direct.get(conc), ssh.get(conc)
            out.append([name if i == 0 else "", conc, fmt(run["round_trips_per_s"], 0), fmt(run["p50_ms"], 2),
                        fmt(run["p99_ms"], 2), str(sum(run["errors"].values())),
                        ratio(run["p50_ms"], field(d, "p50_ms")), ratio(run["p50_ms"], field(s, "p50_ms")),
                        ratio(run["p99_ms"], field(d, "p99_ms")), ratio(run["p99_ms"], field(s, "p99_ms")),
                        ratio(run["round_trips_per_s"], field(s, "round_trips_per_s")),
                        fmt(run.get("row_us_per_msg"), 0), fmt(run.get("others_cpu_pct"), 0)])
    if out:
        parts.append(table(["row", "conns", "round trips/s", "p50 ms", "p99 ms", "errors", "p50 vs direct",
                            "p50 vs ssh", "p99 vs direct", "p99 vs ssh", "rt/s vs ssh", "row CPU us/msg",
                            "others %CPU"], out))
    tps = {name: row["ws"]["throughput"] for name, row in rows.items() if row["ws"].get("throughput")}
    if tps:
        base = {k: tps[k]["mb_s"] for k in ("direct", "ssh -R") if k in tps}
        parts += ["", (f"WebSocket throughput, one connection: {meta['throughput_mib']} MiB binary messages,"
                       f" {meta['inflight']} on their way at once, each echoed back; MB/s = echoed bytes received"
                       " per second (as many went the other way meanwhile); CPU per GB carried (both ways)")]
        parts.append(table(["row", "MB/s", "vs direct", "vs ssh", "handshake ms", "row CPU s/GB", "others %CPU",
                            "errors"], [
            [name, fmt(tp["mb_s"], 0), ratio(tp["mb_s"], base.get("direct")), ratio(tp["mb_s"], base.get("ssh -R")),
             fmt(tp["handshake_ms"], 2), fmt(tp.get("row_s_per_gb"), 2), fmt(tp.get("others_cpu_pct"), 0),
             str(sum(tp["errors"].values()))] for name, tp in tps.items()]))
    return parts


def wan_section(wan: Result) -> str:
    lines = [(f"WAN shape: {wan['delay_ms']:g} ms added each way between proxy and Redis"
              f" (round trip {2 * wan['delay_ms']:g} ms), c1, {wan['tool']}")]
    lines.append(table(["run", "req/s", "p50 ms", "p99 ms", "errors"], [
        [label, fmt(run["rps"], 1), fmt(run["p50_ms"], 2), fmt(run["p99_ms"], 2), str(sum(run["errors"].values()))]
        for label, run in (("relay, 0 ms", wan["base"]), (f"relay, {wan['delay_ms']:g} ms", wan["delayed"]))]))
    lines.append(f"p50 latency increase {wan['increase_ms']:.1f} ms = {wan['round_trips']:.2f} proxy<->Redis round"
                 f" trips per request (the design expects 1: one message each way)")
    return "\n".join(lines)


def targets(result: Result) -> list[dict[str, Any]]:
    """Each target of the issue with ppbridge's figure and whether it is met (c16 figures)."""
    rows = _ok(result["rows"])
    pp, ssh = rows.get("ppbridge"), rows.get("ssh -R")
    if pp is None:
        return []
    run, ssh_run = small(pp, TARGET_CONCURRENCY), small(ssh, TARGET_CONCURRENCY)
    rps, p99 = (run["rps"], run["p99_ms"]) if run else (None, None)
    cpu = tunnel_us(pp, TARGET_CONCURRENCY)
    mb_s = pp["download"]["median_mb_s"] if pp.get("download") else None
    ssh_rps = ssh_run["rps"] if ssh_run else ISSUE_SSH["rps"]
    ssh_p99 = ssh_run["p99_ms"] if ssh_run else ISSUE_SSH["p99_ms"]
    ssh_src = "this run" if ssh_run else "the issue's figure"
    growth = _max_growth(pp)
    found = [
        ("milestone", "req/s at c16 > localtunnel's 4,500", rps, rps is not None and rps > LOCALTUNNEL["rps"]),
        ("milestone", "p99 at c16 < localtunnel's 9 ms", p99, p99 is not None and p99 < LOCALTUNNEL["p99_ms"]),
        ("milestone", "CPU per request < localtunnel's 260 us", cpu, cpu is not None and cpu < LOCALTUNNEL["us_per_req"]),
        ("milestone", "download > localtunnel's 400 MB/s", mb_s, mb_s is not None and mb_s > LOCALTUNNEL["mb_s"]),
        ("target", f"req/s at c16 >= ssh -R's {ssh_rps:,.0f} ({ssh_src})", rps, rps is not None and rps >= ssh_rps),
        ("target", f"p99 at c16 < ssh -R's {ssh_p99:.2f} ms ({ssh_src})", p99, p99 is not None and p99 < ssh_p99),
        ("target", "CPU (forwarder+proxy+Redis) <= 100 us per request", cpu, cpu is not None and cpu <= 100),
        ("target", "one-stream download >= 300 MB/s", mb_s, mb_s is not None and mb_s >= 300),
        ("target", (f"memory flat with size: peak RSS growth during the big download and upload <= {FLAT_MEMORY_MIB:g} MiB"
                    " per process"), growth, growth is not None and growth <= FLAT_MEMORY_MIB),
    ]
    found += _floor_targets(rows, pp)
    return [{"kind": k, "target": t, "measured": None if v is None else round(v, 2), "met": met}
            for k, t, v, met in found]


def _floor_targets(rows: Mapping[str, Result], pp: Result) -> list[tuple[str, str, float | None, bool]]:
    """Issue 12's targets: ratios within this run (c16), against the relay floor and ssh -R;
    not met when the row compared with was not measured."""
    relay, ssh = rows.get(RELAY), rows.get(SSH)
    run, r, s = small(pp, TARGET_CONCURRENCY), small(relay, TARGET_CONCURRENCY), small(ssh, TARGET_CONCURRENCY)
    missing = {RELAY: " (relay floor not measured)" if r is None else "",
               SSH: " (ssh -R not measured)" if s is None else ""}
    cpu = _times(field(run, "row_us_per_req"), field(r, "row_us_per_req"))
    rps = _times(field(run, "rps"), field(s, "rps"))
    p99, ssh_p99 = field(run, "p99_ms"), field(s, "p99_ms")
    found = [

        ("issue 12", f"CPU per request (forwarder+proxy+Redis) / relay floor's <= {FLOOR_CPU_MAX:g}{missing[RELAY]}",
         cpu, cpu is not None and cpu <= FLOOR_CPU_MAX),
        ("issue 12", f"req/s at c16 / ssh -R's >= {SSH_RPS_MIN:g}, with p99 below ssh -R's"
                     + ("" if p99 is None or ssh_p99 is None else f" ({p99:.2f} vs {ssh_p99:.2f} ms)") + missing[SSH],
         rps, rps is not None and rps >= SSH_RPS_MIN and p99 is not None and ssh_p99 is not None and p99 < ssh_p99),
    ]
    for what in TRANSFERS:
        dl, ssh_dl = pp.get(what) or {}, (ssh or {}).get(what) or {}
        if what != "download" and not dl:
            continue  # a run without uploads (--no-upload, or saved before they were measured)
        mb_s = _times(dl.get("median_mb_s"), ssh_dl.get("median_mb_s"))
        per_gb = _times(dl.get("row_s_per_gb"), ssh_dl.get("row_s_per_gb"))
        found += [
            ("issue 12", f"one-stream {what} MB/s / ssh -R's >= 1.0{missing[SSH]}", mb_s,
             mb_s is not None and mb_s >= 1.0),
            ("issue 12", f"{what} CPU s/GB / ssh -R's <= 1.0{missing[SSH]}", per_gb,
             per_gb is not None and per_gb <= 1.0),
        ]
    return found


def _max_growth(row: Result) -> float | None:
    rss = row.get("rss_mib", {})
    a, b, c = rss.get("after_small", {}), rss.get("after_download", {}), rss.get("after_upload", {})
    growth = [max(b[r], c.get(r, b[r])) - a[r] for r in b if r in a and r in row.get("row_roles", [])]
    return max(growth) if growth else None


def targets_section(found: list[dict[str, Any]]) -> str:
    return table(["", "target (ppbridge)", "measured", "met"], [
        [t["kind"], t["target"], fmt(t["measured"], 2), "yes" if t["met"] else "NO"] for t in found])


def render(result: Result) -> str:
    meta = result["meta"]
    parts = [
        (f"ppbridge benchmark {meta['started']}  ({meta['mode']}; {meta['cpus']} CPUs; load average at start"
         f" {meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')})"),
        (f"upstream: {meta['upstream']}   small requests: {meta['loadgen']}   download: {meta['downloader']}"
         + (f"   upload: {meta['uploader']}" if meta.get("uploader") else "")),
        (f"each small-request run: {meta['duration']:g} s after {meta['warmup']:g} s warm-up;"
         f" download{' and upload' if meta.get('uploader') else ''}: {meta['big_mib']} MiB file, one stream,"
         f" repeated for >= {meta['download_time']:g} s"),
    ]
    pp = meta.get("ppbridge")
    if pp:
        parts.append(f"ppbridge {pp['version']} from {pp['path']} (digest {pp['digest']},"
                     f" same as the source tree: {'yes' if pp['matches_source_tree'] else 'NO'}), commit {meta['commit']}")
    for note in meta.get("notes", []):
        parts.append(f"note: {note}")
    for name, row in result["rows"].items():
        if row.get("status") != "ok":
            parts.append(f"row {name!r} {row.get('status')}: {row.get('reason')}")
        for note in row.get("notes", []):
            parts.append(f"{name}: {note}")
    if _ok(result["rows"]):
        parts += rows_sections(result)
    if result.get("wan"):
        parts += ["", wan_section(result["wan"])]
    if result.get("capacity"):
        parts += capacity_sections(result["capacity"])
    if result.get("targets"):
        parts += ["", "Targets (informational: a benchmark never fails)", targets_section(result["targets"])]
    return "\n".join(parts)


def capacity_sections(cap: Result) -> list[str]:
    """The PUBLISH cases of the capacity measurement and the model derived from them
    (docs/CAPACITY.md explains both)."""
    if cap.get("status") != "ok":
        return ["", f"Capacity of one Redis: {cap.get('status')}: {cap.get('reason')}"]
    redis = cap.get("redis", {})
    parts = ["", (f"Capacity of one Redis: PUBLISH to {cap['channel']}, {cap['seconds']:g} s per case after"
                  f" {cap['warmup']:g} s warm-up, counted by Redis (INFO) and /proc; {redis.get('version', '?')};"
                  f" client-output-buffer-limit {redis.get('client_output_buffer_limit', '?')};"
                  f" load average {cap.get('loadavg_before')} -> {cap.get('loadavg_after')}")]
    parts += [f"note: {note}" for note in cap.get("notes", [])]
    parts.append(table(["case", "tool", "PUBLISH/s", "Redis %CPU", "Redis us/PUBLISH", "in MB/s", "out MB/s",
                        "peak out buf KiB", "subs lost", "others %CPU"], [
        [name, c["tool"], fmt(c["publish_per_s"], 0), fmt(c["redis_cpu_pct"], 0), fmt(c["redis_us_per_publish"], 2),
         fmt(c["in_mb_s"], 0), fmt(c["out_mb_s"], 0), fmt(c["peak_output_buffer_bytes"] / 1024, 0),
         str(c["subscribers_lost"]), fmt(c["others_cpu_pct"], 0)] for name, c in cap["cases"].items()]))
    found = cap.get("model") or {}
    if found:
        parts += ["", "Capacity model (each figure from the JSON fields or figures named under capacity.model)"]
        width = max(len(name) for name in found)
        parts += [f"{name.ljust(width)}  {f['value']:>12,}  {f['how']}" for name, f in found.items()]
    return parts


def rows_sections(result: Result) -> list[str]:
    """The tables of the ordinary rows, each after a blank line and its title."""
    parts = ["", "Small requests (100-byte body)", small_section(result)]
    floors = floors_section(result)
    if floors:
        parts += ["", ("ppbridge as multiples of the floors and of ssh -R (same run, same concurrency; row CPU:"
                       " forwarder+proxy+Redis against the relay floor's one process; the bus floor's own lines:"
                       " front+back+Redis)"), floors]
    parts += ["", (("CPU by process (CPU seconds per 1000 requests or WebSocket round trips = ms per each;"
                   " download, upload and WebSocket throughput: per GB)") if _any_ws(result) else
                  "CPU by process (CPU seconds per 1000 requests = ms per request; download and upload: per GB)"),
              cpu_section(result)]
    counters = counters_section(result)
    if counters:
        parts += ["", "Through Redis (INFO commandstats/stats deltas)", counters]
    parts += ["", "One-stream download", download_section(result)]
    if any(row.get("upload") for row in _ok(result["rows"]).values()):
        parts += ["", "One-stream upload (the same file; each checked against the bytes the upstream received)",
                  download_section(result, "upload")]
    return parts + ws_sections(result) + [
        "", "Peak memory (VmHWM; largest process of each role)", memory_section(result)]


def _figures(row: Result) -> dict[str, float]:
    figures: dict[str, float] = {}
    for conc, run in row.get("small", {}).items():
        figures[f"c{conc} req/s"] = run["rps"]
        figures[f"c{conc} p50 ms"] = run["p50_ms"]
        figures[f"c{conc} p99 ms"] = run["p99_ms"]
        if run.get("row_us_per_req") is not None:
            figures[f"c{conc} row CPU us/req"] = run["row_us_per_req"]
    for what in TRANSFERS:
        dl = row.get(what)
        if dl:
            figures[f"{what} MB/s"] = dl["median_mb_s"]
            if dl.get("row_s_per_gb") is not None:
                figures[f"{what} row CPU s/GB"] = dl["row_s_per_gb"]
    ws = row.get("ws") or {}
    for conc, run in ws.get("echo", {}).items():
        figures[f"WebSocket c{conc} round trips/s"] = run["round_trips_per_s"]
        figures[f"WebSocket c{conc} p50 ms"] = run["p50_ms"]
        figures[f"WebSocket c{conc} p99 ms"] = run["p99_ms"]
        if run.get("row_us_per_msg") is not None:
            figures[f"WebSocket c{conc} row CPU us/msg"] = run["row_us_per_msg"]
    if ws.get("throughput"):
        figures["WebSocket MB/s"] = ws["throughput"]["mb_s"]
    peaks = row.get("rss_mib", {}).get("after_download", {})
    for role in row.get("row_roles", []):
        if role in peaks:
            figures[f"peak RSS MiB {role}"] = peaks[role]
    return figures


def compare(old: Result, new: Result) -> str:
    """Before/after of every figure both runs have, row by row."""
    out = []
    for name, row in _ok(new["rows"]).items():
        before_row = _ok(old["rows"]).get(name)
        if before_row is None:
            continue
        before, after = _figures(before_row), _figures(row)
        for key, value in after.items():
            if key in before:
                change = (value - before[key]) / before[key] * 100 if before[key] else 0.0
                out.append([name, key, fmt(before[key], 2), fmt(value, 2), f"{change:+.1f}%"])
    head = f"Compared with {old['meta']['started']} ({old['meta']['mode']}, load {old['meta']['loadavg_start']})"
    return head + "\n" + table(["row", "figure", "before", "after", "change"], out)
