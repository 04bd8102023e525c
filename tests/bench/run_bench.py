#!/usr/bin/env python3
"""Reproduce the README's performance table (on demand; not part of the test run).

Runs nbdbench.py (beside this file) with this checkout's qcownbd against
qemu-nbd, nbdkit's file plugin and the client's ceiling (nbdkit's null
plugin, "limit"), three rounds, then prints nbdbench's table followed by the
ratios issue 7 set targets for:

    raw vs nbdkit (>= 1.0)     raw vs limit (4k >= 0.9, 1m >= 0.8)
    qcow vs raw (>= 0.85, allocwrite >= 0.5)     qcow vs qemu-nbd (>= 10)
    peak RSS (<= 64 MiB)

and then "several connections are never slower than one": nbdcopy of the
half-allocated image through qcownbd with --connections=1 and with 4
(nbdcopy's default, multi-conn), alternated, medians of --multi-conn-reps
copies each (0 skips it).

Usage:  python3 tests/bench/run_bench.py [--multi-conn-reps 15] [nbdbench options...]
About 25 minutes with the defaults; the figures are only comparable within
one run, since the machine's other load moves them all.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import nbdbench

DEFAULTS = {"servers": "qcownbd,qemu-nbd,nbdkit,limit", "rounds": 3}
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


def multi_conn_lines(reps: int, size_mib: int, workdir_parent: str | None) -> list[str]:
    """Median nbdcopy MiB/s through qcownbd with 1 and with 4 connections, per format."""
    lines = [f"{'multi-conn':14} {'1 conn MiB/s':>14} {'4 conns MiB/s':>14} {'4 vs 1':>8}"]
    with tempfile.TemporaryDirectory(prefix="run-bench-", dir=workdir_parent) as workdir:
        for fmt in ("raw", "qcow"):
            fdir = os.path.join(workdir, fmt)
            os.mkdir(fdir)
            image = nbdbench.make_images(fdir, size_mib, fmt)["half"]
            proc, uri = nbdbench.start_server(nbdbench.SERVERS["qcownbd"], image, fmt,
                                              os.path.join(fdir, "qcownbd.log"))
            seconds = {1: [], 4: []}
            try:
                for _ in range(reps):
                    for connections, times in seconds.items():
                        start = time.monotonic()
                        nbdbench.run_copy(uri, size_mib, connections)
                        times.append(time.monotonic() - start)
            finally:
                nbdbench.stop_server(proc)
            one, four = (size_mib / statistics.median(seconds[c]) for c in (1, 4))
            mark = "ok" if four >= one else "<1"
            lines.append(f"{fmt + ' copy':14} {one:>14,.0f} {four:>14,.0f} {four / one:>6.2f} {mark}")
    return lines


def ratio_table(rows: list[dict]) -> list[str]:
    """Lines of the target ratios (and qcownbd's peak RSS) per workload."""
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


def main(argv: list[str] | None = None) -> int:
    """nbdbench's table, the target ratios, the multi-conn comparison; 1 on a failed
    measurement."""
    p = nbdbench.parser()
    p.description = __doc__
    p.set_defaults(**DEFAULTS)
    p.add_argument("--multi-conn-reps", type=int, default=15,
                   help="nbdcopy runs per connection count (default 15; 0 skips them)")
    args = p.parse_args(argv)
    nbdbench.check_args(p, args)
    rows = nbdbench.run(args)
    nbdbench.add_ratios(rows, args.reference)
    print("\n".join(nbdbench.table(rows, args.reference)))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    print()
    print("\n".join(ratio_table(rows)))
    if args.multi_conn_reps > 0:
        print()
        print("\n".join(multi_conn_lines(args.multi_conn_reps, args.size, args.dir)))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
