"""The project's own benchmarks (tests/bench), run for a fraction of a second on
tiny images: they start, measure qcownbd and its peers side by side, and print
and write results of the documented shape; the boot storm's workload is the
one it says it is."""

import json
import sys

import pytest

from helpers import REPO, run

BENCH = REPO / "tests" / "bench"
sys.path.insert(0, str(BENCH))
import bootstorm  # noqa: E402

MIB = bootstorm.MIB
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


# -- the boot storm (tests/bench/bootstorm.py) --------------------------------------

#: two clients on a 32 MiB golden image, 4 MiB traces, one round, every write checked
TINY_STORM = ["--clients", "2", "--golden-size", "32", "--trace-size", "4", "--rounds", "1",
              "--verify"]
STORM_KEYS = {"server", "clients", "rounds", "rounds_failed", "storm_s", "p99_ms", "fairness",
              "first_s", "last_s", "peak_rss_mib", "peak_pss_mib", "server_cpu_s", "steal_pct",
              "load1"}


@pytest.mark.timeout(120)
def test_bootstorm_gives_each_client_its_own_overlay_on_qcownbd_and_peers(tmp_path):
    # qemu-nbd -s and nbd-server's copyonwrite beside qcownbd's fleet (nbdkit's cow
    # filter is left out: nbdkit 1.32 can abort when fio hangs up with requests in
    # flight, and its exports then cannot be read back for --verify)
    servers = ["qcownbd", "qemu-nbd", "nbd-server"]
    results = tmp_path / "storm.json"
    out = run([sys.executable, BENCH / "bootstorm.py", *TINY_STORM, "--servers",
               ",".join(servers), "--json", results], timeout=100, cwd=tmp_path)
    rows = json.loads(results.read_text())
    # --verify passed: golden image unchanged, each client read back its own writes only
    assert [r["server"] for r in rows] == servers and all("error" not in r for r in rows), rows
    for row in rows:
        assert set(row) == STORM_KEYS, row
        assert row["clients"] == 2 and row["rounds"] == 1 and row["rounds_failed"] == 0
        assert 0 < row["first_s"] <= row["last_s"] == row["storm_s"]
        # each figure is rounded to 3 decimals: the ratio of the rounded times is as exact
        first, last, half = row["first_s"], row["last_s"], 0.0005
        assert (last - half) / (first + half) - half <= row["fairness"] \
            <= (last + half) / (first - half) + half
        assert row["p99_ms"] > 0 and row["peak_rss_mib"] >= row["peak_pss_mib"] > 0
        assert row["server_cpu_s"] > 0
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["clients", "server", "storm", "s", "p99", "ms", "last/first",
                                "rss", "MiB", "pss", "MiB", "cpu", "s", "steal%", "load"]
    assert [line.split()[:2] for line in lines[1:]] == [["2", name] for name in servers]
    assert len([line for line in out.stderr.splitlines() if line.startswith("{")]) == 3


@pytest.mark.timeout(60)
def test_bootstorm_catches_writes_to_the_golden_image_and_skips_missing_servers(tmp_path):
    # nbdkit's file plugin without the cow filter: the clients write the golden image
    results = tmp_path / "storm.json"
    out = run([sys.executable, BENCH / "bootstorm.py", *TINY_STORM, "--servers", "plain,ghost",
               "plain=nbdkit -f -i 127.0.0.1 -p {port} -e {export} file {golden}",
               "ghost=no-such-nbd-server -p {port} {golden}", "--json", results],
              timeout=50, cwd=tmp_path, check=False)
    assert out.returncode == 1, out.stderr
    plain, ghost = json.loads(results.read_text())
    assert plain == {"server": "plain", "clients": 2, "error": "plain changed the golden image"}
    assert ghost == {"server": "ghost", "clients": 2,
                     "skipped": "no-such-nbd-server is not installed"}
    assert "skipping ghost: no-such-nbd-server is not installed" in out.stderr
    assert out.stdout.splitlines()[1:] == [
        "      2 plain          ERROR plain changed the golden image",
        "      2 ghost          skipped: no-such-nbd-server is not installed"]


def test_bootstorm_golden_image_and_traces_are_the_boot_storm_of_the_issue(tmp_path):
    # the golden image: the same bytes every time, data in 60% of its 1 MiB extents
    first, second = tmp_path / "a.raw", tmp_path / "b.raw"
    extents = bootstorm.make_golden(str(first), 20)
    bootstorm.make_golden(str(second), 20)
    assert first.read_bytes() == second.read_bytes() and len(extents) == 12
    data = first.read_bytes()
    assert [i for i in range(20) if data[i * MIB:(i + 1) * MIB].count(0) < MIB // 2] == extents
    # the default trace on the default 1 GiB image: by bytes 85% sequential reads of
    # 128K-1M, 10% random 4K reads, 5% writes of 4K-32K, all 4K-aligned, in the image
    size, trace_bytes = 1 << 30, 160 * MIB
    lines, writes = bootstorm.make_trace(3, size, bootstorm.data_extents(1024), trace_bytes)
    assert lines[:3] == ["fio version 2 iolog", "nbd add", "nbd open"]
    assert lines[-1] == "nbd close"
    ops = [(action, int(offset), int(length))
           for _, action, offset, length in (line.split() for line in lines[3:-1])]
    ops = ops[:-bootstorm.TAIL_READS]
    moved = {"seq": 0, "random": 0, "write": 0}
    for action, offset, length in ops:
        assert offset % 4096 == 0 and length % 4096 == 0 and offset + length <= size
        kind = "write" if action == "write" else "seq" if length >= 128 << 10 else "random"
        assert (kind != "random" or length == 4096) and length <= MIB
        moved[kind] += length
    assert moved["seq"] / trace_bytes == pytest.approx(0.85, abs=0.01)
    assert moved["random"] / trace_bytes == pytest.approx(0.10, abs=0.01)
    assert moved["write"] / trace_bytes == pytest.approx(0.05, abs=0.01)
    assert [(o, n) for a, o, n in ops if a == "write"] == writes
    assert {n for o, n in writes} == {4096, 8192, 16384, 32768}
    # sequential: most large reads start where the previous large read ended
    large = [(o, n) for a, o, n in ops if a == "read" and n >= 128 << 10]
    follows = sum(o == prev_o + prev_n for (prev_o, prev_n), (o, _) in zip(large, large[1:]))
    assert follows / len(large) > 0.8
    # each client its own trace, the same on every run
    assert bootstorm.make_trace(3, size, bootstorm.data_extents(1024), trace_bytes)[0] == lines
    assert bootstorm.make_trace(4, size, bootstorm.data_extents(1024), trace_bytes)[0] != lines
