"""User-space instructions per small request of one process of a row, counted by callgrind.

Starts a row as ``make bench`` does, with one of its processes under
``valgrind --tool=callgrind --instr-atstart=no``; sends warm-up GETs of the 100-byte file,
switches counting on (``callgrind_control -i on``), sends the measured GETs at the given
concurrency on keep-alive connections, switches it off and dumps. Instructions are
repeatable whatever else the machine does (seconds are not), so this is how a per-request
cut is judged before a quiet full run confirms it. Example::

    .venv/bin/python bench/callgrind.py --role forwarder --requests 1280

Roles: ``forwarder``, ``proxy`` (the ppbridge row), ``relay`` (relay floor), ``front``, ``back``
(bus floor). The forwarder signs an announcement every so often (RSA, ~31 M instructions);
when one falls in the window it is reported and taken out of the per-request figure.

``--cache-sim`` also simulates the caches and branch predictors (``--cache-sim=yes
--branch-sim=yes``, valgrind's model of the host's caches, one process alone on its core) and
prints their misses per request: what each row's instructions cost beyond their count, before
any other process evicts what it left in the caches.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import children
import rows
from rows import RowRun
from upstreams import SMALL_PATH, Upstream, start_upstream

ROLES: dict[str, tuple[str, Callable[[Upstream, Path], contextlib.AbstractContextManager[RowRun]]]] = {
    "forwarder": ("ppbridge-forwarder", lambda up, folder: rows.ppbridge(up, folder)),
    "proxy": ("ppbridge-proxy", lambda up, folder: rows.ppbridge(up, folder)),
    "relay": ("relayfloor", rows.relay_floor),
    "front": ("busfloor-front", rows.bus_floor),
    "back": ("busfloor-back", rows.bus_floor),
}
"""Role -> (the bench child's name, the row that starts it)."""
SIGN = re.compile(r"RsaPrivateKey.*sign|EVP_PKEY_sign\b")
"""The forwarder's periodic announcement signature, in callgrind_annotate's function names."""


def get_many(base_url: str, total: int, concurrency: int) -> None:
    """``total`` GETs of the small file on ``concurrency`` keep-alive connections; each must be
    a 200 with a body."""
    split = urlsplit(base_url)
    errors: list[str] = []

    def worker(count: int) -> None:
        conn = http.client.HTTPConnection(split.hostname or "127.0.0.1", split.port, timeout=300)
        try:
            for _ in range(count):
                conn.request("GET", SMALL_PATH)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or not body:
                    errors.append(f"{response.status} {len(body)} bytes")
        except (OSError, http.client.HTTPException) as err:
            errors.append(repr(err))
        finally:
            conn.close()

    share, extra = divmod(total, concurrency)
    threads = [threading.Thread(target=worker, args=(share + (i < extra),)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} GETs failed, first: {errors[0]}")


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def totals(out: Path) -> int:
    """The instruction total of a callgrind dump (its ``totals:`` line; ``summary:`` is 0 in a
    dump asked for while running); 0 for a file not written yet (the one written at exit)."""
    return events(out).get("Ir", 0)


def events(out: Path) -> dict[str, int]:
    """Every event total of a callgrind dump by its name (``Ir``, and with ``--cache-sim`` the
    misses: ``I1mr``, ``D1mr``, ``Bcm``...); empty for a file not written yet."""
    text = out.read_text("utf-8", "replace")
    names = re.search(r"^events:\s*(.+)$", text, re.M)
    found = re.search(r"^totals:\s*([\d ]+)$", text, re.M)
    if names is None or found is None:
        return {}
    return dict(zip(names.group(1).split(), (int(n) for n in found.group(1).split())))


MISSES = (("L1 instruction misses", ("I1mr",)), ("L1 data misses", ("D1mr", "D1mw")),
          ("last-level misses", ("ILmr", "DLmr", "DLmw")), ("mispredicted branches", ("Bcm", "Bim")))
"""What ``--cache-sim`` prints per request: a name and the callgrind events it sums."""


def miss_lines(counts: dict[str, int], requests: int) -> list[str]:
    """Per-request misses of the simulated caches and branch predictors, one line each."""
    return [f"{name}: {sum(counts.get(e, 0) for e in names) / requests / 1e3:.2f} k per request"
            for name, names in MISSES]


def wait_for_dump(out_dir: Path, pid: int, wake: Callable[[], None], timeout: float = 120.0) -> Path:
    """The dump asked of ``pid``: valgrind sees the request only when the process runs, so it
    is woken (``wake``, uncounted) until the file is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dumps = sorted(out_dir.glob(f"callgrind.out.{pid}.*"), key=lambda path: path.stat().st_mtime)
        written = [path for path in dumps if totals(path) > 0]
        if written:
            return written[-1]
        wake()
        time.sleep(1.0)
    files = sorted(path.name for path in out_dir.iterdir())
    raise RuntimeError(f"callgrind wrote no counts for pid {pid} within {timeout:g} s; files: {files}")


def annotate(out: Path, top: int) -> tuple[int, list[str]]:
    """(instructions inside the RSA signature, the ``top`` functions by inclusive count)."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)], check=True, capture_output=True,
                          text=True, timeout=600).stdout
    lines = [line for line in text.splitlines() if re.match(r"\s*[\d,]+ \(", line)]
    signed = 0
    for line in lines:
        if SIGN.search(line):
            signed = max(signed, int(line.split()[0].replace(",", "")))
    return signed, lines[:top]


@contextlib.contextmanager
def wrapped(child_name: str, out_dir: Path, cache_sim: bool = False) -> Iterator[None]:
    """Run the bench child called ``child_name`` under callgrind, counting off until asked
    (and simulating caches and branch predictors with ``cache_sim``)."""
    simulate = ["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []
    children.WRAP[child_name] = ["valgrind", "--tool=callgrind", "--instr-atstart=no", *simulate,
                                 f"--callgrind-out-file={out_dir}/callgrind.out.%p"]
    before = rows.READY_TIMEOUT
    rows.READY_TIMEOUT = 900.0  # startup under valgrind is tens of times slower
    try:
        yield
    finally:
        children.WRAP.pop(child_name, None)
        rows.READY_TIMEOUT = before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=sorted(ROLES), required=True)
    p.add_argument("--requests", type=int, default=320, help="measured GETs (default 320)")
    p.add_argument("--warmup", type=int, default=160, help="GETs before counting starts (default 160)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--top", type=int, default=0, help="also print the N functions with the most inclusive instructions")
    p.add_argument("--keep", type=Path, default=None, help="copy the callgrind file here")
    p.add_argument("--cache-sim", action="store_true",
                   help="also simulate caches and branch prediction; print their misses per request")
    args = p.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    child_name, row = ROLES[args.role]
    with tempfile.TemporaryDirectory(prefix="ppbridge-callgrind-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o711)  # nginx workers (another user) must reach the served folder
        out_dir = tmp / "callgrind"
        out_dir.mkdir()
        with start_upstream(tmp, 1 << 20, ws=False) as upstream, wrapped(child_name, out_dir, args.cache_sim), \
                row(upstream, tmp / "row") as run:
            pid = run.roles[args.role]()[0]
            get_many(run.base_url, args.warmup, args.concurrency)
            control("-i", "on", str(pid))
            started = time.monotonic()
            get_many(run.base_url, args.requests, args.concurrency)
            control("-i", "off", str(pid))
            seconds = time.monotonic() - started
            control("-d", str(pid))
            dump = wait_for_dump(out_dir, pid, lambda: get_many(run.base_url, 1, 1))
            counts = events(dump)
            total = counts.get("Ir", 0)
            signed, top = annotate(dump, args.top)
            if args.keep is not None:
                shutil.copyfile(dump, args.keep)
        net = total - signed
        print(f"{args.role}: {total / args.requests / 1e6:.4f} M instructions per request"
              f" ({args.requests} GETs at c{args.concurrency} in {seconds:.0f} s)")
        if signed:
            print(f"{args.role}: {net / args.requests / 1e6:.4f} M net of the RSA signature in the window"
                  f" ({signed / 1e6:.1f} M)")
        if args.cache_sim:
            for line in miss_lines(counts, args.requests):
                print(f"{args.role}: {line}")
        for line in top:
            print(line)


if __name__ == "__main__":
    main()
