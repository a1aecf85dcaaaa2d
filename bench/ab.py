"""A/B of ppbridge itself: the ppbridge row of ``make bench`` started with two (or more) builds
of the package in turn, in one run, so every build sees the same machine.

    .venv/bin/pip install --no-deps --target /tmp/before-site DIR_OF_THE_OLD_TREE
    .venv/bin/python bench/ab.py --rounds 3 before=/tmp/before-site after=-

Each variant is ``NAME=SITE``: a folder a build was installed into (the children get it first on
their PYTHONPATH, so the installed twistd plugin imports that ``ppbridge``), or ``-`` for the
installed package. Per round, per variant in turn: a fresh row (Redis, forwarder, proxy, nginx
shared), 1 s of warm-up, CPU per request of the forwarder, the proxy and Redis (/proc) over
``--seconds`` of small requests at c16 (wrk), then ``--downloads`` one-stream downloads of the
64 MiB file (curl), each measured on its own. Prints the median (and the minimum) per
variant. On a shared machine one round says little: the rounds alternate so that the others'
load falls on every variant alike. A benchmark: it reports and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import children
import rows
from loadgen import LoadGenerator
from procstats import Snapshot
from upstreams import BIG_PATH, SMALL_PATH, Upstream, start_upstream

BIG = 64 << 20
Samples = dict[str, list[dict[str, float]]]


def measure(upstream: Upstream, folder: Path, load: LoadGenerator, seconds: float, downloads: int,
            into: Samples) -> None:
    """One round of one variant: c16 CPU per request, then CPU per GB of each download."""
    with rows.ppbridge(upstream, folder) as row:
        load.run(row.base_url + SMALL_PATH, 16, 1)  # warm-up
        before = Snapshot.take(row.roles)
        result = load.run(row.base_url + SMALL_PATH, 16, seconds)
        used = Snapshot.take(row.roles).since(before)
        into["c16"].append({**{r: s / result.requests * 1e6 for r, s in used.items()},
                            "req/s": result.requests / result.seconds})
        for _ in range(downloads):
            before, began = Snapshot.take(row.roles), time.perf_counter()
            subprocess.run(["curl", "-s", "-o", "/dev/null", row.base_url + BIG_PATH], check=True)
            took = time.perf_counter() - began
            used = Snapshot.take(row.roles).since(before)
            into["download"].append({**{r: s / (BIG / 1e9) for r, s in used.items()}, "MB/s": BIG / 1e6 / took})


def summary(name: str, samples: Samples) -> list[str]:
    """A line per kind measured (none for downloads with ``--downloads 0``): medians per
    process, the total's median and minimum."""
    lines = []
    for kind, unit, rate in (("c16", "us/req", "req/s"), ("download", "s/GB", "MB/s")):
        runs = samples[kind]
        if not runs:
            continue
        roles = [r for r in runs[0] if r != rate]
        totals = [sum(run[r] for r in roles) for run in runs]
        parts = ", ".join(f"{r} {statistics.median(run[r] for run in runs):.2f}" for r in roles)
        lines.append(f"{name} {kind}: {unit} median {statistics.median(totals):.2f} (min {min(totals):.2f}; {parts});"
                     f" {rate} median {statistics.median(run[rate] for run in runs):.0f} ({len(runs)} samples)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="NAME=SITE", help="a build's folder, or - for the installed one")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="c16 small requests per round (4)")
    p.add_argument("--downloads", type=int, default=6, help="downloads per round (6)")
    args = p.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    samples: dict[str, Samples] = {name: {"c16": [], "download": []} for name, _ in variants}
    tmp = Path(tempfile.mkdtemp(prefix="ppbridge-ab-"))
    tmp.chmod(0o755)  # nginx's worker reads the files in it
    with start_upstream(tmp, BIG, ws=False) as upstream:
        load = LoadGenerator(tmp)
        for round_ in range(args.rounds):
            for name, site in variants:
                children.EXTRA_ENV.clear()
                if site != "-":
                    children.EXTRA_ENV["PYTHONPATH"] = site
                measure(upstream, tmp / f"{name}-{round_}", load, args.seconds, args.downloads, samples[name])
                print(f"round {round_ + 1}: {name} done", flush=True)
    for name, _ in variants:
        print("\n".join(summary(name, samples[name])))


if __name__ == "__main__":
    main()
