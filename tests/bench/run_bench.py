#!/usr/bin/env python3
"""Reproduce the README's performance table (on demand; not part of the test run).

Runs the team's side-by-side benchmark, ../shared/bench/nbdbench.py next to
this repository, with this checkout's qcownbd against qemu-nbd, nbdkit's
file plugin and the client's ceiling (nbdkit's null plugin, "limit"), then
prints nbdbench's table followed by the ratios issue 7 sets targets for:

    raw vs nbdkit (>= 1.0)     raw vs limit (4k >= 0.9, 1m >= 0.8)
    qcow vs raw (>= 0.85, allocwrite >= 0.5)     qcow vs qemu-nbd (>= 10)
    peak RSS (<= 64 MiB)

Usage:  python3 tests/bench/run_bench.py [--rounds 3] [nbdbench options...]
Needs fio, qemu-img, qemu-nbd, nbdkit and nbdcopy.  The figures are only
comparable within one run: the machine's other load moves them all.
"""

import json
import os
import subprocess
import sys
import tempfile
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
    with tempfile.NamedTemporaryFile(suffix=".json") as results:
        status = run_nbdbench(sys.argv[1:], results.name)
        try:
            with open(results.name) as f:
                rows = json.load(f)
        except (OSError, ValueError):
            return status or 1
    print()
    print("\n".join(ratio_table(rows)))
    return status


if __name__ == "__main__":
    sys.exit(main())
