#!/usr/bin/env python3
"""Side-by-side NBD server benchmark (on demand; not part of the test run).

Serves the same images with each server in turn and drives them with fio's
nbd engine and with nbdcopy, all in one run, round after round, then prints
one table: IOPS, MiB/s, server CPU seconds and peak RSS per workload (the
median round of each), and each server's ratio to a reference server.

Servers are command templates, filled in with {python}, {port}, {export},
{image}, {fmt} and {size}:
    qcownbd    this checkout's qcownbd (python3 -m qcownbd with PYTHONPATH set)
    qemu-nbd   QEMU's server, raw and qcow
    nbdkit     nbdkit's file plugin (raw only)
    limit      nbdkit's null plugin (raw only): it stores nothing, so it shows
               the most this client and loopback allow on this machine
NAME='TEMPLATE' adds a server or replaces one.

Every measurement starts from a fresh sparse copy (cp --sparse=always) of a
pristine image: "full" (random data everywhere), "half" (every other MiB
data, the rest a hole; nbdcopy reads it) or "empty" (just created: writes to
it allocate).  Images live in /dev/shm, so the disk is out of the picture.

Examples:
    python3 tests/bench/nbdbench.py --servers qcownbd,qemu-nbd,nbdkit,limit --rounds 3
    python3 tests/bench/nbdbench.py --formats raw --workloads randread4k,copy --runtime 2
    python3 tests/bench/nbdbench.py qcownbd='qcownbd serve --listen 127.0.0.1:{port} {export}={image}'

Needs fio (with its nbd engine), qemu-img, nbdcopy, and the servers compared:
    apt-get install fio qemu-utils libnbd-bin nbdkit
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXPORT = "bench"
SERVERS = {
    "qcownbd": "{python} -m qcownbd serve --listen 127.0.0.1:{port} {export}={image}",
    "qemu-nbd": "qemu-nbd -f {fmt} -t -x {export} -b 127.0.0.1 -p {port} {image}",
    "nbdkit": "nbdkit -f -i 127.0.0.1 -p {port} -e {export} file {image}",
    "limit": "nbdkit -f -i 127.0.0.1 -p {port} -e {export} null size={size}",
}
#: Servers that cannot read QCOW1: only the raw rows have them.
RAW_ONLY = {"nbdkit", "limit"}
#: name: (fio rw, block size, iodepth, image kind); rw None is an nbdcopy to null:
WORKLOADS = {
    "randread4k": ("randread", "4k", 32, "full"),
    "randwrite4k": ("randwrite", "4k", 32, "full"),
    "seqread1m": ("read", "1m", 8, "full"),
    "seqwrite1m": ("write", "1m", 8, "full"),
    "allocwrite64k": ("write", "64k", 8, "empty"),
    "copy": (None, None, None, "half"),
}
MIB = 1 << 20


# -- images -----------------------------------------------------------------------

def make_images(workdir: str, size_mib: int, fmt: str) -> dict[str, str]:
    """The pristine images of one format in ``workdir``: {kind: path}."""
    raw = {"full": os.path.join(workdir, "full.raw"), "half": os.path.join(workdir, "half.raw")}
    with open(raw["full"], "wb") as full, open(raw["half"], "wb") as half:
        half.truncate(size_mib * MIB)
        for mib in range(size_mib):
            data = os.urandom(MIB)
            full.write(data)
            if mib % 2 == 0:
                # every other MiB of "half" holds data; the rest stays a hole
                half.seek(mib * MIB)
                half.write(data)
    images = dict(raw)
    if fmt != "raw":
        for kind, path in raw.items():
            images[kind] = os.path.join(workdir, f"{kind}.{fmt}")
            qemu_img("convert", "-f", "raw", "-O", fmt, path, images[kind])
            os.unlink(path)
    images["empty"] = os.path.join(workdir, f"empty.{fmt}")
    qemu_img("create", "-q", "-f", fmt, images["empty"], f"{size_mib}M")
    return images


def qemu_img(*args: str) -> str:
    """`qemu-img ARGS`, checked; its output."""
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True, timeout=600).stdout


def sparse_copy(image: str, dest: str) -> str:
    """A copy that keeps the holes: a plain copy on tmpfs would fill them, and an
    "empty" raw image would then measure overwrites where QCOW1 allocates."""
    subprocess.run(["cp", "--sparse=always", image, dest], check=True, timeout=600)
    return dest


# -- servers ----------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(template: str, image: str, fmt: str, log_path: str):
    """Start a server from its template on ``image``; (process, nbd:// URI) once it
    accepts connections."""
    port = free_port()
    size = json.loads(qemu_img("info", "--output=json", "-f", fmt, image))["virtual-size"]
    cmd = shlex.split(template.format(python=shlex.quote(sys.executable), port=port,
                                      export=EXPORT, image=shlex.quote(image), fmt=fmt,
                                      size=size))
    return spawn_listening(cmd, port, log_path), f"nbd://127.0.0.1:{port}/{EXPORT}"


def spawn_listening(cmd: list[str], port: int, log_path: str,
                    env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` (this checkout on its PYTHONPATH) in a session of its own, its
    output appended to ``log_path``; the process once 127.0.0.1:``port`` accepts."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"{cmd[0]} did not start listening (see {log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cpu_and_peak_rss(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system, reaped children included) and peak RSS in MiB."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = sum(int(ticks) for ticks in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    return cpu, int(hwm.split()[1]) / 1024


# -- clients ----------------------------------------------------------------------

def run_fio(uri: str, workload: str, runtime: float, size_mib: int) -> tuple[float, float]:
    """One fio job with the nbd engine: (IOPS, MiB/s).  Jobs on the "empty" image
    write it once; the others run for ``runtime`` seconds."""
    rw, block, depth, kind = WORKLOADS[workload]
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={block}", f"--iodepth={depth}", f"--size={size_mib}M",
           "--output-format=json", "--randrepeat=0"]
    if kind != "empty":
        cmd += [f"--runtime={max(1, round(runtime * 1000))}ms", "--time_based"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime * 4 + 120)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip()[-300:]}")
    job = fio_json(out.stdout)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    side = job["read"] if "read" in rw else job["write"]
    return side["iops"], side["bw"] / 1024


def fio_json(output: str) -> dict:
    """fio's --output-format=json(+) document; the nbd engine prints a line of its
    own before it."""
    return json.loads(output[output.index("{"):])


def run_copy(uri: str, size_mib: int, connections: int | None = None) -> tuple[float, float]:
    """nbdcopy of the whole export to null: (copies per second, MiB/s)."""
    cmd = ["nbdcopy", *([f"--connections={connections}"] if connections else []), uri, "null:"]
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"nbdcopy failed: {out.stderr.strip()[-300:]}")
    seconds = time.monotonic() - start
    return 1 / seconds, size_mib / seconds


def measure(name: str, template: str, fmt: str, workload: str, images: dict[str, str],
            workdir: str, args) -> dict:
    """One server, one workload, one round, on a fresh copy of its image."""
    scratch = sparse_copy(images[WORKLOADS[workload][3]],
                          os.path.join(workdir, f"scratch-{name}.{fmt}"))
    try:
        proc, uri = start_server(template, scratch, fmt, os.path.join(workdir, f"{name}.log"))
        try:
            cpu_before, _ = cpu_and_peak_rss(proc.pid)
            if WORKLOADS[workload][0] is None:
                iops, mib_s = run_copy(uri, args.size)
            else:
                iops, mib_s = run_fio(uri, workload, args.runtime, args.size)
            cpu_after, rss = cpu_and_peak_rss(proc.pid)
        finally:
            stop_server(proc)
    finally:
        os.unlink(scratch)
    return {"server": name, "format": fmt, "workload": workload, "iops": round(iops, 1),
            "mib_s": round(mib_s, 1), "server_cpu_s": round(cpu_after - cpu_before, 2),
            "peak_rss_mib": round(rss, 1)}


# -- the run ----------------------------------------------------------------------

def run(args) -> list[dict]:
    """Every (format, workload, round, server), side by side; the median row of each
    (format, workload, server), in the order measured."""
    servers = {**SERVERS, **dict(o.split("=", 1) for o in args.overrides)}
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="nbdbench-", dir=args.dir) as workdir:
        for fmt in args.formats:
            fdir = os.path.join(workdir, fmt)
            os.mkdir(fdir)
            images = make_images(fdir, args.size, fmt)
            for workload in args.workloads:
                for _round in range(args.rounds):
                    for name in args.servers:
                        if fmt != "raw" and name in RAW_ONLY:
                            continue
                        try:
                            row = measure(name, servers[name], fmt, workload, images, fdir, args)
                        except Exception as exc:  # one failure must not end the run
                            row = {"server": name, "format": fmt, "workload": workload,
                                   "error": str(exc)[:300]}
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        results.setdefault((fmt, workload, name), []).append(row)
    return [median_row(rows) for rows in results.values()]


def median_row(rows: list[dict]) -> dict:
    """The round with the median IOPS (the upper one of an even count); an error
    row only when every round failed."""
    good = sorted((row for row in rows if "error" not in row), key=lambda row: row["iops"])
    return good[len(good) // 2] if good else rows[0]


def add_ratios(rows: list[dict], reference: str) -> None:
    """Set each row's "ratio": its IOPS over the reference server's, same format and
    workload (None without a reference row)."""
    ref = {(r["format"], r["workload"]): r["iops"] for r in rows
           if r["server"] == reference and "error" not in r}
    for row in rows:
        base = ref.get((row["format"], row["workload"]))
        if "error" not in row:
            row["ratio"] = round(row["iops"] / base, 3) if base else None


def table(rows: list[dict], reference: str) -> list[str]:
    """The printed table, one line per row (ratios from add_ratios)."""
    lines = [f"{'format':6} {'workload':14} {'server':11} {'IOPS':>10} {'MiB/s':>9} "
             f"{'cpu s':>7} {'rss MiB':>8} {'vs ' + reference:>12}"]
    for r in rows:
        head = f"{r['format']:6} {r['workload']:14} {r['server']:11}"
        if "error" in r:
            lines.append(f"{head} ERROR {r['error']}")
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"{head} {r['iops']:10.0f} {r['mib_s']:9.1f} {r['server_cpu_s']:7.2f} "
                     f"{r['peak_rss_mib']:8.1f} {ratio:>12}")
    return lines


def parser() -> argparse.ArgumentParser:
    """The command line (run_bench.py adds its own options and other defaults)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="NAME=TEMPLATE",
                   help="add or replace a server's command template")
    p.add_argument("--servers", default="qcownbd,qemu-nbd", type=comma_list,
                   help="servers to compare, comma-separated (default qcownbd,qemu-nbd)")
    p.add_argument("--reference", default="qemu-nbd", help="the ratios' denominator")
    p.add_argument("--formats", default="qcow,raw", type=comma_list,
                   help="image formats, qemu-img's names (default qcow,raw)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), type=comma_list,
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default all)")
    p.add_argument("--size", type=int, default=512, help="image size in MiB (default 512)")
    p.add_argument("--runtime", type=float, default=5,
                   help="seconds per time-based fio job (default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each server this many times, keep the median (default 1)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the images go (default /dev/shm)")
    p.add_argument("--json", metavar="FILE", help="also write the table's rows here")
    return p


def comma_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']."""
    return [item for item in text.split(",") if item]


def check_servers(p: argparse.ArgumentParser, args, servers) -> None:
    """Refuse a NAME=TEMPLATE without its =, and --servers that are neither in
    ``servers`` nor added by a template."""
    known = set(servers) | {o.split("=", 1)[0] for o in args.overrides if "=" in o}
    for override in args.overrides:
        if "=" not in override:
            p.error(f"{override!r} is not NAME=TEMPLATE")
    for name in args.servers:
        if name not in known:
            p.error(f"unknown server {name!r} (known: {', '.join(sorted(known))})")


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse unknown servers, workloads and templates before any image is made."""
    check_servers(p, args, SERVERS)
    for workload in args.workloads:
        if workload not in WORKLOADS:
            p.error(f"unknown workload {workload!r}")
    if args.size < 2 or args.rounds < 1 or args.runtime <= 0:
        p.error("--size must be at least 2, --rounds at least 1, --runtime positive")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table; 1 when a measurement failed."""
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    rows = run(args)
    add_ratios(rows, args.reference)
    return report(table(rows, args.reference), rows, args.json)


def report(lines: list[str], rows: list[dict], json_path: str | None) -> int:
    """Print the table's ``lines``, write ``rows`` to ``json_path`` if given; the exit
    status: 1 when a row is an error."""
    print("\n".join(lines))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(rows, out, indent=1)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    # a SIGTERM (from timeout, say) unwinds like Ctrl-C, so the finally blocks
    # stop the server under test instead of leaving it running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
