#!/usr/bin/env python3
"""Boot storm: N clients at once, each on its own copy-on-write overlay of one
golden image, side by side with the peers (on demand; not part of the test run).

The golden image is a raw file (default 1 GiB) whose 1 MiB extents hold
deterministic pseudo-random data in 60% of them (the rest are holes).  Every
client replays its own deterministic boot-like trace (default 160 MiB: by
bytes 85% sequential reads of 128K-1M in runs of 1-16 MiB, 10% random 4K
reads, 5% writes of 4K-32K, interleaved) with fio's nbd engine at queue
depth 8 (fio --read_iolog).  All N fio processes start at once; the storm
ends when the last one exits.  Per server and N, the medians of the rounds:

    storm s      until the last client finished
    p99 ms       completion latency over every request of every client (fio's
                 histograms merged)
    last/first   the last client's finish time over the first's (1.00 is fair)
    rss MiB      peak RSS of the server: the highest sum over its processes,
                 sampled every 100 ms, and never below the sum of the VmHWM of
                 the processes still running at the end
    pss MiB      the same sampled sum of PSS (shared pages split between the
                 processes sharing them: what forked servers really use)
    cpu s        CPU time of the server's processes (reaped children included)
and, per row, the most CPU steal (% of the CPU time) and the highest 1-minute
load average seen over its rounds: figures taken on a busy machine say so.

Servers (each skipped with a note when its program is not installed):
    qcownbd        this checkout's fleet export: its default worker processes
                   (one per core), one QCOW1 overlay per client (export
                   fleet/c0, fleet/c1, ...)
    nbdkit         nbdkit --filter=cow file, a process per client (the cow
                   filter shares its overlay between connections)
    nbd-server     copyonwrite = true: one daemon, a forked child and a diff
                   file per connection
    qemu-nbd       qemu-nbd -s (a temporary snapshot), a process per client
    qemu-nbd-qcow  qemu-nbd on a QCOW1 overlay made by qemu-img, a process per
                   client (slow; not in the default list)
NAME='TEMPLATE' replaces a server's command, filled in with {python},
{port}, {golden}, {export}, {config}, {pidfile}, {overlay} and {scratch}, e.g.
to measure another checkout:
    python3 tests/bench/bootstorm.py qcownbd='env PYTHONPATH=/src/other {python} -m qcownbd serve --listen 127.0.0.1:{port} --config {config}'
A new NAME is a process per client serving {golden} with an overlay of its own,
unless it is a known name with a suffix: qcownbd-before='...' is a qcownbd
fleet too (to compare two checkouts side by side).
Overlays and temporary files (TMPDIR) live in the run's directory on /dev/shm.

--verify then checks each storm: the golden image is unchanged, and each
client's export reads back as the golden image plus that client's own writes
(fio writes a byte pattern per client) and nobody else's.  nbd-server drops a
client's writes at disconnect, so only the golden image is checked for it.
fio ends a replay without waiting for its last requests, and nbdkit 1.32
(Debian 12) can abort when a client hangs up with requests in flight: its
rounds then fail --verify (the storm's figures are not affected).

Examples:
    python3 tests/bench/bootstorm.py                     # N=8,16,32, 3 rounds (~15 minutes)
    python3 tests/bench/bootstorm.py --clients 4 --golden-size 256 --trace-size 32 --rounds 1
Needs fio (with its nbd engine), nbdcopy (--verify), and the servers compared:
    apt-get install fio libnbd-bin qemu-utils nbdkit nbd-server
"""

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nbdbench
from nbdbench import MIB, comma_list, free_port, stop_server

# -- the workload -----------------------------------------------------------------

GOLDEN_SEED = 16
DATA_SHARE = 0.6
SEQ_SHARE, RANDOM_SHARE = 0.85, 0.10  # of the trace's bytes; writes get the rest
SEQ_CHUNKS = range(128 << 10, (1 << 20) + 1, 64 << 10)
SEQ_RUN = (1 * MIB, 16 * MIB)
WRITE_SIZES = (4 << 10, 8 << 10, 16 << 10, 32 << 10)
BLOCK = 4096
QUEUE_DEPTH = 8
TAIL_READS = 2 * QUEUE_DEPTH
RSS_SAMPLE_S = 0.1


def data_extents(size_mib: int) -> list[int]:
    """The 1 MiB extents of the golden image that hold data (60% of them, always
    the same ones for a size)."""
    rng = random.Random(GOLDEN_SEED)
    return sorted(rng.sample(range(size_mib), max(1, round(size_mib * DATA_SHARE))))


def make_golden(path: str, size_mib: int) -> list[int]:
    """The golden raw image: pseudo-random data (same seed, same bytes) in its data
    extents, holes elsewhere.  Returns the indexes of the data extents."""
    extents, rng = data_extents(size_mib), random.Random(GOLDEN_SEED + 1)
    with open(path, "wb") as golden:
        golden.truncate(size_mib * MIB)
        for extent in extents:
            golden.seek(extent * MIB)
            golden.write(rng.randbytes(MIB))
    return extents


def make_trace(client: int, size: int, extents: list[int],
               trace_bytes: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Client ``client``'s boot-like trace as fio iolog lines (version 2), and its
    writes as (offset, length).  Reads go to the golden image's data ``extents``
    (files being loaded), writes anywhere (logs, new files)."""
    rng = random.Random(client)

    def data_offset() -> int:
        return rng.choice(extents) * MIB + rng.randrange(MIB // BLOCK) * BLOCK

    seq: list[tuple[str, int, int]] = []  # runs of 1-16 MiB, one after the other
    seq_left = int(trace_bytes * SEQ_SHARE)
    while seq_left > 0:
        offset, run = data_offset(), rng.randint(*SEQ_RUN)
        while run > 0 and seq_left > 0 and offset < size:
            length = min(rng.choice(SEQ_CHUNKS), size - offset)
            seq.append(("read", offset, length))
            offset, run, seq_left = offset + length, run - length, seq_left - length
    randoms = [("read", data_offset(), BLOCK)
               for _ in range(int(trace_bytes * RANDOM_SHARE) // BLOCK)]
    writes: list[tuple[str, int, int]] = []
    write_left = trace_bytes - int(trace_bytes * SEQ_SHARE) - len(randoms) * BLOCK
    while write_left > 0:
        length = min(rng.choice(WRITE_SIZES), size)
        writes.append(("write", rng.randrange((size - length) // BLOCK + 1) * BLOCK, length))
        write_left -= length
    # interleaved: each next request from a stream picked in proportion to what
    # it has left, so a sequential run goes on where it stopped
    streams = [seq, randoms, writes]
    cursors = [0, 0, 0]
    lines = ["fio version 2 iolog", "nbd add", "nbd open"]
    while True:
        left = [len(stream) - at for stream, at in zip(streams, cursors)]
        if not any(left):
            break
        pick = rng.choices(range(3), weights=left)[0]
        action, offset, length = streams[pick][cursors[pick]]
        cursors[pick] += 1
        lines.append(f"nbd {action} {offset} {length}")
    # fio 3.33's nbd engine can end a replay with its last few requests queued in
    # libnbd and never sent (nbdkit's log filter shows them missing): the trace
    # ends with reads of one block that may be lost in their place
    lines += [f"nbd read 0 {BLOCK}"] * TAIL_READS
    lines.append("nbd close")
    return lines, [(offset, length) for _, offset, length in writes]


def client_pattern(client: int) -> int:
    """The byte every write of ``client`` is filled with (never 0: holes read as 0)."""
    return client % 255 + 1


# -- the servers ------------------------------------------------------------------

def qcownbd_config(golden: str, scratch: str, port: int) -> str:
    """A fleet export of ``golden``, its overlays kept (so --verify can read them)."""
    return (f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "raw"\n'
            f'overlay_dir = "{scratch}/overlays"\noverlays = "persistent"\n')


def nbd_server_config(golden: str, scratch: str, port: int) -> str:
    """One copy-on-write export, its diff files beside the other overlays."""
    return (f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n"
            f"    allowlist = true\n[storm]\n    exportname = {golden}\n"
            f"    copyonwrite = true\n    cowdir = {scratch}\n")


@dataclass(frozen=True)
class Server:
    """How a server gives each client an overlay of the golden image."""
    template: str
    #: a process of its own per client (on its own port), else one for all clients
    per_client: bool = True
    #: the export each client asks for; {client} is the client's number
    export: str = "storm"
    #: the text of its {config} file: (golden, scratch directory, port) -> text
    config: Callable[[str, str, int], str] | None = None


SERVERS = {
    "qcownbd": Server("{python} -m qcownbd serve --listen 127.0.0.1:{port} --config {config}",
                      per_client=False, export="fleet/c{client}", config=qcownbd_config),
    "nbdkit": Server("nbdkit -f -i 127.0.0.1 -p {port} -e {export} --filter=cow file {golden}"),
    "nbd-server": Server("nbd-server -C {config} -p {pidfile}", per_client=False,
                         config=nbd_server_config),
    "qemu-nbd": Server("qemu-nbd -f raw -s -t -x {export} -b 127.0.0.1 -p {port} {golden}"),
    "qemu-nbd-qcow": Server("qemu-nbd -f qcow -t -x {export} -b 127.0.0.1 -p {port} {overlay}"),
}
DEFAULT_SERVERS = "qcownbd,nbdkit,nbd-server,qemu-nbd"
#: servers whose overlay ends with the connection: their writes cannot be read back
OVERLAY_PER_CONNECTION = {"nbd-server"}


class Running:
    """A server under test, started: its root processes and the clients' URIs."""

    def __init__(self, name: str, server: Server, clients: int, golden: str, scratch: str):
        self.uris: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.daemons: list[int] = []  # roots that daemonized (nbd-server)
        try:
            for process in range(clients if server.per_client else 1):
                port = self._start(name, server, process, golden, scratch)
                exports = [server.export.format(client=client) for client in range(clients)]
                mine = exports[process:process + 1] if server.per_client else exports
                self.uris += [f"nbd://127.0.0.1:{port}/{export}" for export in mine]
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, server: Server, process: int, golden: str,
               scratch: str) -> int:
        """Start the server's process number ``process``; its port."""
        port = free_port()
        fields = {"python": sys.executable, "port": port, "golden": golden, "export": "storm",
                  "scratch": scratch, "pidfile": os.path.join(scratch, f"{name}.pid"),
                  "overlay": os.path.join(scratch, f"overlay-{process}.qcow"),
                  "config": os.path.join(scratch, f"{name}-{process}.conf")}
        if "{overlay}" in server.template:
            nbdbench.qemu_img("create", "-q", "-f", "qcow", "-b", golden, "-F", "raw",
                              fields["overlay"])
        if server.config:
            with open(fields["config"], "w") as config:
                config.write(server.config(golden, scratch, port))
        cmd = shlex.split(server.template.format(
            **{key: shlex.quote(str(value)) for key, value in fields.items()}))
        log = os.path.join(scratch, f"{name}.log")
        env = {"TMPDIR": scratch}  # nbdkit's and qemu-nbd's overlays go there
        if "{pidfile}" in server.template:
            self.daemons.append(start_daemon(cmd, port, fields["pidfile"], log, env))
        else:
            self.procs.append(nbdbench.spawn_listening(cmd, port, log, env))
        return port

    def roots(self) -> list[int]:
        return [proc.pid for proc in self.procs] + self.daemons

    def stop(self) -> None:
        for proc in self.procs:
            stop_server(proc)
        for pid in self.daemons:
            stop_daemon(pid)


def start_daemon(cmd: list[str], port: int, pidfile: str, log_path: str,
                 env: dict[str, str]) -> int:
    """Run a server that daemonizes and writes ``pidfile``; its pid once it listens."""
    with open(log_path, "ab") as log:
        subprocess.run(cmd, stdout=log, stderr=log, env={**os.environ, **env}, timeout=30,
                       check=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                pid = int(f.read())
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return pid
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"{cmd[0]} did not start listening (see {log_path})")


def stop_daemon(pid: int) -> None:
    """SIGTERM a daemon we started and then, by pid, whatever it forked and left."""
    children = descendants([pid])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in [pid, *children]:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in [pid, *children]):
            time.sleep(0.05)
        if not any(alive(p) for p in [pid, *children]):
            return


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- measuring the server ---------------------------------------------------------

def descendants(roots: list[int]) -> list[int]:
    """Every running process below ``roots`` (from each process's parent in /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
    found, frontier = [], set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier}
        found += frontier
    return found


def rss_and_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; zeros once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:  # gone, or not ours to read
        pass
    return rss, pss


class MemorySampler(threading.Thread):
    """The peak sums of RSS and of PSS over a server's process tree, until stopped."""

    def __init__(self, roots: list[int]):
        super().__init__(daemon=True)
        self.roots, self.peak_rss_kib, self.peak_pss_kib = roots, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            pids = self.roots + descendants(self.roots)
            sums = [sum(col) for col in zip(*(rss_and_pss(pid) for pid in pids))]
            self.peak_rss_kib = max(self.peak_rss_kib, sums[0])
            self.peak_pss_kib = max(self.peak_pss_kib, sums[1])
            if self.done.wait(RSS_SAMPLE_S):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


def tree_cpu_and_hwm(roots: list[int]) -> tuple[float, float]:
    """CPU seconds of the tree (roots and running descendants, each with its reaped
    children) and the sum of their VmHWM in MiB."""
    cpu = hwm = 0.0
    for pid in roots + descendants(roots):
        try:
            seconds, peak = nbdbench.cpu_and_peak_rss(pid)
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # gone, or a zombie without memory
        cpu, hwm = cpu + seconds, hwm + peak
    return cpu, hwm


def cpu_steal_ticks() -> tuple[int, int]:
    """(all CPU ticks, steal ticks) from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


# -- one storm --------------------------------------------------------------------

def run_clients(uris: list[str], traces: list[str], scratch: str, timeout: float):
    """Start one fio per client at once; (storm seconds, each client's finish
    seconds, merged latency histogram {ns: count})."""
    procs = []
    start = time.monotonic()
    for client, (uri, trace) in enumerate(zip(uris, traces)):
        out = os.path.join(scratch, f"fio-{client}")
        cmd = ["fio", f"--name=client{client}", "--ioengine=nbd", f"--uri={uri}",
               f"--read_iolog={trace}", f"--iodepth={QUEUE_DEPTH}", "--replay_no_stall=1",
               f"--buffer_pattern={client_pattern(client):#04x}",
               "--output-format=json+", f"--output={out}.json"]
        with open(f"{out}.err", "wb") as err:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err))

    def finish(proc: subprocess.Popen) -> float:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return time.monotonic() - start

    with ThreadPoolExecutor(len(procs)) as pool:
        futures = [pool.submit(finish, proc) for proc in procs]
        finished = [future.result() for future in futures]
    histogram: dict[int, int] = {}
    for client, proc in enumerate(procs):
        out = os.path.join(scratch, f"fio-{client}")
        if proc.returncode != 0:
            with open(f"{out}.err") as err:
                raise RuntimeError(f"fio of client {client} failed: {err.read().strip()[-300:]}")
        with open(f"{out}.json") as f:
            job = nbdbench.fio_json(f.read())["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio of client {client}: job error {job['error']}")
        for side in ("read", "write"):
            for ns, count in job[side]["clat_ns"].get("bins", {}).items():
                histogram[int(ns)] = histogram.get(int(ns), 0) + count
    return max(finished), finished, histogram


def percentile(histogram: dict[int, int], share: float) -> float:
    """The smallest latency (ns) at or below which ``share`` of the requests completed."""
    total, seen = sum(histogram.values()), 0
    for ns in sorted(histogram):
        seen += histogram[ns]
        if seen >= share * total:
            return ns
    raise ValueError("no requests completed")


def storm(name: str, server: Server, clients: int, golden: str, traces: list[str],
          writes: list[list[tuple[int, int]]], workdir: str, args) -> dict:
    """One server, N clients, one round, on fresh overlays."""
    scratch = tempfile.mkdtemp(prefix=f"{name}-{clients}-", dir=workdir)
    try:
        running = Running(name, server, clients, golden, scratch)
        try:
            cpu_before, _ = tree_cpu_and_hwm(running.roots())
            sampler = MemorySampler(running.roots())
            sampler.start()
            ticks_before = cpu_steal_ticks()
            try:
                seconds, finished, histogram = run_clients(
                    running.uris, traces[:clients], scratch, timeout=args.timeout)
            finally:
                sampler.stop()
            ticks_after = cpu_steal_ticks()
            cpu_after, hwm = tree_cpu_and_hwm(running.roots())
            if args.verify:
                verify(name, running, golden, writes, args.golden_sha256, scratch)
        finally:
            running.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    all_ticks, steal = (after - before for after, before in zip(ticks_after, ticks_before))
    return {"server": name, "clients": clients, "storm_s": round(seconds, 3),
            "p99_ms": round(percentile(histogram, 0.99) / 1e6, 2),
            "fairness": round(max(finished) / min(finished), 3),
            "first_s": round(min(finished), 3), "last_s": round(max(finished), 3),
            "peak_rss_mib": round(max(sampler.peak_rss_kib / 1024, hwm), 1),
            "peak_pss_mib": round(sampler.peak_pss_kib / 1024, 1),
            "server_cpu_s": round(cpu_after - cpu_before, 2),
            "steal_pct": round(100 * steal / all_ticks, 1) if all_ticks else 0.0,
            "load1": round(os.getloadavg()[0], 2)}


def verify(name: str, running: Running, golden: str, writes: list[list[tuple[int, int]]],
           golden_sha256: str, scratch: str) -> None:
    """The golden image is unchanged, and each client's export holds the golden image
    plus exactly that client's writes (AssertionError otherwise)."""
    if sha256(golden) != golden_sha256:
        raise AssertionError(f"{name} changed the golden image")
    if name in OVERLAY_PER_CONNECTION:
        return
    with open(golden, "rb") as f:
        pristine = f.read()
    readback = os.path.join(scratch, "readback.raw")
    for client, uri in enumerate(running.uris):
        copy = subprocess.run(["nbdcopy", uri, readback], capture_output=True, text=True,
                              timeout=600)
        if copy.returncode != 0:
            exited = [proc.returncode for proc in running.procs if proc.poll() is not None]
            raise AssertionError(f"{name}: client {client}'s export cannot be read back"
                                 + (f" (server processes exited: {exited})" if exited else "")
                                 + f": {copy.stderr.strip()[-200:]}")
        expected = bytearray(pristine)
        pattern = client_pattern(client)
        for offset, length in writes[client]:
            expected[offset:offset + length] = bytes([pattern]) * length
        with open(readback, "rb") as f:
            if f.read() != expected:
                raise AssertionError(f"{name}: client {client} does not read back the golden "
                                     "image plus its own writes")
        os.unlink(readback)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


# -- the run ----------------------------------------------------------------------

def installed(server: Server) -> str | None:
    """Why ``server`` cannot run here (its program is missing), or None."""
    program = shlex.split(server.template)[0]
    if program == "{python}" or shutil.which(program):
        return None
    return f"{program} is not installed"


def run(args) -> list[dict]:
    """Every (N, round, server), side by side; per (N, server) one row of medians, or
    an error or skipped row."""
    servers = {**SERVERS, **{name: Server(template, **_kind(name))
                             for name, template in (o.split("=", 1) for o in args.overrides)}}
    skipped = {name: why for name in args.servers if (why := installed(servers[name]))}
    for name, why in skipped.items():
        print(f"bootstorm: skipping {name}: {why}", file=sys.stderr, flush=True)
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bootstorm-", dir=args.dir) as workdir:
        golden = os.path.join(workdir, "golden.raw")
        extents = make_golden(golden, args.golden_size)
        args.golden_sha256 = sha256(golden) if args.verify else None
        traces, writes = [], []
        for client in range(max(args.clients)):
            lines, client_writes = make_trace(client, args.golden_size * MIB, extents,
                                              args.trace_size * MIB)
            traces.append(os.path.join(workdir, f"trace-{client}.log"))
            with open(traces[-1], "w") as trace:
                trace.write("\n".join(lines) + "\n")
            writes.append(client_writes)
        for clients in args.clients:
            for _round in range(args.rounds):
                for name in args.servers:
                    if name in skipped:
                        continue
                    try:
                        row = storm(name, servers[name], clients, golden, traces, writes,
                                    workdir, args)
                    except Exception as exc:  # one failure must not end the run
                        row = {"server": name, "clients": clients, "error": str(exc)[:300]}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    results.setdefault((clients, name), []).append(row)
            for name in args.servers:
                if name in skipped:
                    results[(clients, name)] = [{"server": name, "clients": clients,
                                                 "skipped": skipped[name]}]
    return [median_row(rows) for rows in results.values()]


def _kind(name: str) -> dict:
    """A replaced template keeps its server's kind, and so does a new name that is a
    known one with a suffix (qcownbd-before); another new name runs per client."""
    known = SERVERS.get(name) or next(
        (SERVERS[k] for k in sorted(SERVERS, key=len, reverse=True)
         if name.startswith(k + "-")), None)
    return ({"per_client": known.per_client, "export": known.export, "config": known.config}
            if known else {})


MEDIAN_KEYS = ("storm_s", "p99_ms", "fairness", "first_s", "last_s", "peak_rss_mib",
               "peak_pss_mib", "server_cpu_s")


def median_row(rows: list[dict]) -> dict:
    """Each figure's median over the good rounds (steal and load: the highest), and
    how many rounds failed; an error or skipped row when no round succeeded."""
    good = [row for row in rows if "error" not in row and "skipped" not in row]
    if not good:
        return rows[0]
    row = {"server": good[0]["server"], "clients": good[0]["clients"], "rounds": len(good),
           "rounds_failed": len(rows) - len(good)}
    row.update({key: round(statistics.median(r[key] for r in good), 3) for key in MEDIAN_KEYS})
    row["steal_pct"] = max(r["steal_pct"] for r in good)
    row["load1"] = max(r["load1"] for r in good)
    return row


def table(rows: list[dict]) -> list[str]:
    """The printed table, one line per (N, server)."""
    lines = [f"{'clients':>7} {'server':14} {'storm s':>8} {'p99 ms':>8} {'last/first':>10} "
             f"{'rss MiB':>8} {'pss MiB':>8} {'cpu s':>7} {'steal%':>6} {'load':>5}"]
    for r in rows:
        head = f"{r['clients']:>7} {r['server']:14}"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
        elif "error" in r:
            lines.append(f"{head} ERROR {r['error']}")
        else:
            failed = r["rounds_failed"]
            lines.append(f"{head} {r['storm_s']:8.2f} {r['p99_ms']:8.1f} {r['fairness']:10.2f} "
                         f"{r['peak_rss_mib']:8.1f} {r['peak_pss_mib']:8.1f} "
                         f"{r['server_cpu_s']:7.2f} {r['steal_pct']:6.1f} {r['load1']:5.2f}"
                         + (f"  ({failed} rounds failed)" if failed else ""))
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="NAME=TEMPLATE",
                   help="replace a server's command template, or add a per-client server")
    p.add_argument("--servers", default=DEFAULT_SERVERS, type=comma_list,
                   help=f"servers to compare, comma-separated (default {DEFAULT_SERVERS})")
    p.add_argument("--clients", default=[8, 16, 32], type=int_list,
                   help="storm sizes, comma-separated (default 8,16,32)")
    p.add_argument("--rounds", type=int, default=3,
                   help="storms per server and size; medians are kept (default 3)")
    p.add_argument("--golden-size", type=int, default=1024,
                   help="golden image size in MiB (default 1024)")
    p.add_argument("--trace-size", type=int, default=160,
                   help="bytes each client's trace moves, in MiB (default 160)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds a client may take before the storm fails (default 600)")
    p.add_argument("--verify", action="store_true",
                   help="check the golden image and every client's data after each storm")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where images and overlays go (default /dev/shm)")
    p.add_argument("--json", metavar="FILE", help="also write the table's rows here")
    return p


def int_list(text: str) -> list[int]:
    """'8,16' -> [8, 16]."""
    return [int(item) for item in comma_list(text)]


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse unknown servers and impossible sizes before any image is made."""
    nbdbench.check_servers(p, args, SERVERS)
    if not args.clients or min(args.clients) < 1 or args.rounds < 1:
        p.error("--clients must be positive numbers, --rounds at least 1")
    if args.golden_size < 2 or args.trace_size < 1:
        p.error("--golden-size must be at least 2 (MiB), --trace-size at least 1 (MiB)")


def main(argv: list[str] | None = None) -> int:
    """Run the storms, print the table; 1 when a storm failed."""
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    rows = run(args)
    return nbdbench.report(table(rows), rows, args.json)


if __name__ == "__main__":
    # a SIGTERM (from timeout, say) unwinds like Ctrl-C, so the finally blocks
    # stop the servers under test instead of leaving them running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
