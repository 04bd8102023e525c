#!/usr/bin/env python3
"""Reproduce the README's performance table (on demand; not part of the test run).

Runs the team's side-by-side benchmark, ../shared/bench/nbdbench.py next to
this repository, with this checkout's qcownbd against qemu-nbd, nbdkit's
file plugin and the client's ceiling (nbdkit's null plugin, "limit"), then
prints nbdbench's table followed by the ratios issue 7 sets targets for:

    raw vs nbdkit (>= 1.0)     raw vs limit (4k >= 0.9, 1m >= 0.8)
    qcow vs raw (>= 0.85, allocwrite >= 0.5)     qcow vs qemu-nbd (>= 10)
    peak RSS (<= 64 MiB)

and then "several connections are never slower than one": nbdcopy of the
half-allocated image through qcownbd with --connections=1 and with 4
(nbdcopy's default, multi-conn), alternated, medians of --multi-conn-reps
copies each (0 skips it).

Usage:  python3 tests/bench/run_bench.py [--rounds 3] [--multi-conn-reps 15]
                                         [nbdbench options...]
Needs fio, qemu-img, qemu-nbd, nbdkit and nbdcopy.  The figures are only
comparable within one run: the machine's other load moves them all.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NBDBENCH = REPO.parent / "shared" / "bench" / "nbdbench.py"
DEFAULTS = ["--servers", "qcownbd,qemu-nbd,nbdkit,limit", "--rounds", "3"]
#: (label, numerator (format, server), denominator (format, server), target(workload))
RATIOS = [
    ("raw/nbdkit", ("raw", "qcownbd"), ("raw", "nbdkit"), lambda w: 1.0),
    ("raw/limit", ("raw", "qcownbd"), ("raw", "limit"),
     lambda w: {"randread4k": 0.9, "randwrite4k": 0.9, "seqread1m": 0.8,
                "seqwrite1m": 0.8}.get(w)),
    ("qcow/raw", ("qcow", "qcownbd"), ("raw", "qcownbd"),
     lambda w: 0.5 if w == "allocwrite64k" else 0.85),
    ("qcow/qemu-nbd", ("qcow", "qcownbd"), ("qcow", "qemu-nbd"), lambda w: 10.0),
]
RSS_LIMIT_MIB = 64


def run_nbdbench(args: list[str], json_path: str) -> int:
    """nbdbench with this checkout's qcownbd; its table goes to our stdout."""
    template = (f"{sys.executable} -m qcownbd serve --listen 127.0.0.1:{{port}} "
                f"{{export}}={{image}}")
    options = DEFAULTS + args     # nbdbench's argparse: a later option wins
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(NBDBENCH), f"qcownbd={template}", *options, "--json", json_path]
    return subprocess.run(cmd, env=env, check=False).returncode


def load_nbdbench():
    """nbdbench.py as a module: its image maker and server start/stop are reused."""
    spec = importlib.util.spec_from_file_location("nbdbench", NBDBENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def multi_conn_lines(reps: int, size_mib: int) -> list[str]:
    """Median nbdcopy MiB/s through qcownbd with 1 and with 4 connections, per format."""
    nbdbench = load_nbdbench()
    template = f"{sys.executable} -m qcownbd serve --listen 127.0.0.1:{{port}} {{export}}={{image}}"
    lines = [f"{'multi-conn':14} {'1 conn MiB/s':>14} {'4 conns MiB/s':>14} {'4 vs 1':>8}"]
    os.environ["PYTHONPATH"] = str(REPO)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="run-bench-", dir=shm) as workdir:
        for fmt in ("raw", "qcow"):
            fdir = os.path.join(workdir, fmt)
            os.makedirs(fdir)
            image = nbdbench.make_images(fdir, size_mib, fmt)["half"]
            proc, uri = nbdbench.start_server("qcownbd", template, image, fmt, fdir)
            seconds = {1: [], 4: []}
            try:
                for _ in range(reps):
                    for connections in seconds:
                        start = time.monotonic()
                        subprocess.run(["nbdcopy", f"--connections={connections}", uri, "null:"],
                                       check=True, timeout=300)
                        seconds[connections].append(time.monotonic() - start)
            finally:
                nbdbench.stop_server(proc)
            one, four = (size_mib / statistics.median(seconds[c]) for c in (1, 4))
            mark = "ok" if four >= one else "<1"
            lines.append(f"{fmt + ' copy':14} {one:>14,.0f} {four:>14,.0f} {four / one:>6.2f} {mark}")
    return lines


def ratio_table(rows: list[dict]) -> list[str]:
    """Lines of the target ratios (and peak RSS) per workload."""
    by_key = {(r["format"], r["workload"], r["server"]): r for r in rows if "error" not in r}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    lines = [f"{'workload':14} " + " ".join(f"{label:>17}" for label, *_ in RATIOS)
             + f" {'max rss MiB':>12}"]
    for workload in workloads:
        cells = []
        for _label, (nf, ns), (df, ds), target in RATIOS:
            top, bottom = by_key.get((nf, workload, ns)), by_key.get((df, workload, ds))
            if not top or not bottom or not bottom["iops"]:
                cells.append(f"{'-':>17}")
                continue
            value, goal = top["iops"] / bottom["iops"], target(workload)
            mark = "" if goal is None else (" ok" if value >= goal else f" <{goal:g}")
            cells.append(f"{value:>11.2f}{mark:>6}")
        rss = max((r["peak_rss_mib"] for (f, w, s), r in by_key.items()
                   if w == workload and s == "qcownbd"), default=float("nan"))
        flag = " ok" if rss <= RSS_LIMIT_MIB else " over"
        lines.append(f"{workload:14} " + " ".join(cells) + f" {rss:>8.1f}{flag}")
    return lines


def main() -> int:
    if not NBDBENCH.exists():
        print(f"run_bench: {NBDBENCH} not found (the shared/ tree beside the repo)", file=sys.stderr)
        return 2
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--multi-conn-reps", type=int, default=15)
    ours, nbdbench_args = ours.parse_known_args()
    shared = argparse.ArgumentParser(add_help=False)     # read, and passed on to nbdbench
    shared.add_argument("--size", type=int, default=512)
    size_mib = shared.parse_known_args(nbdbench_args)[0].size
    with tempfile.NamedTemporaryFile(suffix=".json") as results:
        status = run_nbdbench(nbdbench_args, results.name)
        try:
            with open(results.name) as f:
                rows = json.load(f)
        except (OSError, ValueError):
            return status or 1
    print()
    print("\n".join(ratio_table(rows)))
    if ours.multi_conn_reps > 0:
        print()
        print("\n".join(multi_conn_lines(ours.multi_conn_reps, size_mib)))
    return status


if __name__ == "__main__":
    sys.exit(main())
