"""The project's own benchmark (tests/bench), run for a fraction of a second on
tiny images: it starts, measures qcownbd and nbdkit's null plugin side by side,
and prints and writes results of the documented shape."""

import json
import sys

import pytest

from helpers import REPO, run

BENCH = REPO / "tests" / "bench"
#: Two servers, raw only, a 4K random read of 0.2 s and a copy of 4 MiB.
TINY = ["--servers", "qcownbd,limit", "--formats", "raw", "--workloads", "randread4k,copy",
        "--size", "4", "--runtime", "0.2", "--rounds", "1"]
ROW_KEYS = {"server", "format", "workload", "iops", "mib_s", "server_cpu_s", "peak_rss_mib",
            "ratio"}


@pytest.mark.timeout(120)
def test_nbdbench_measures_qcownbd_and_the_ceiling_side_by_side(tmp_path):
    results = tmp_path / "results.json"
    out = run([sys.executable, BENCH / "nbdbench.py", *TINY, "--reference", "limit",
               "--json", results], timeout=100, cwd=tmp_path)
    rows = json.loads(results.read_text())
    assert [(r["workload"], r["server"]) for r in rows] == [
        ("randread4k", "qcownbd"), ("randread4k", "limit"), ("copy", "qcownbd"), ("copy", "limit")]
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["format"] == "raw" and row["iops"] > 0 and row["mib_s"] > 0
        assert row["peak_rss_mib"] > 0
    assert [r["ratio"] for r in rows if r["server"] == "limit"] == [1.0, 1.0]
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["format", "workload", "server", "IOPS", "MiB/s", "cpu", "s",
                                "rss", "MiB", "vs", "limit"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["raw", r["workload"], r["server"]] for r in rows]
    # one JSON line per measurement on stderr, as it happens
    assert len([line for line in out.stderr.splitlines() if line.startswith("{")]) == 4


@pytest.mark.timeout(180)
def test_run_bench_uses_the_benchmark_in_the_repository(tmp_path):
    out = run([sys.executable, BENCH / "run_bench.py", *TINY, "--multi-conn-reps", "1"],
              timeout=160, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert "shared" not in (BENCH / "run_bench.py").read_text()
    ratios = lines.index(next(line for line in lines if line.startswith("workload ")))
    assert lines[ratios].split()[1:5] == ["raw/nbdkit", "raw/limit", "qcow/raw", "qcow/qemu-nbd"]
    # no nbdkit and no QCOW1 in this run: only raw/limit has a value
    for workload, line in zip(("randread4k", "copy"), lines[ratios + 1:ratios + 3]):
        cells = line.split()
        assert cells[:2] == [workload, "-"] and float(cells[2]) > 0
        assert cells[-4:-2] == ["-", "-"], line
    multi = lines.index(next(line for line in lines if line.startswith("multi-conn ")))
    assert [line.split()[:2] for line in lines[multi + 1:]] == [["raw", "copy"], ["qcow", "copy"]]
