#!/usr/bin/env python3
"""Noisy neighbours: one client's read latency while another client misbehaves.

On demand, not part of the test run.  For each server (this checkout's
qcownbd, qemu-nbd, nbdkit) and each attacker, a fresh server is started on
an image in /dev/shm, the attacker starts, and a victim client in its own
process reads 4 KiB at queue depth 1 (random offsets in the first 64 MiB of
the same export) for --seconds.  The table gives the victim's p50/p99/max
latency and the server's peak RSS; qcownbd's rows are checked against the
isolation targets: p99 <= 50 ms and <= 10x its p99 alone, RSS <= 128 MiB.

Attackers (the isolation issue's list):
  alone             nobody: the victim's baseline
  slow-uploads      4 clients announce 32 MiB WRITEs and send one payload byte a second
  unread-handshake  4 clients pipeline NBD_OPT_LIST and never read the replies
  block-status      whole-disk BLOCK_STATUS again and again on a 4 GiB QCOW1 image with
                    512-byte clusters, all allocated (nbdkit, which has no QCOW1: a raw
                    image with 65,536 data extents)
  write-zeroes      one 4 GiB WRITE_ZEROES after another on an overlay (QCOW1 over a raw
                    image; nbdkit: its cow filter over the raw image)
  pipeline          a client pipelining 64 KiB READs without reading the replies

Usage:  python3 tests/bench/noisy_neighbour.py [--servers qcownbd,qemu-nbd,nbdkit]
                                                [--attacks ...] [--seconds 10]
Needs qemu-img, qemu-nbd and nbdkit.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from helpers import allocated_qcow1, free_port, wait_listening  # noqa: E402
from nbdclient import (  # noqa: E402
    CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE, OPT_LIST, NbdClient, option,
)

MiB, GiB = 1 << 20, 1 << 30
CMD_WRITE_ZEROES = 6
#: the longest range a compact request header can name, 512-aligned
LONGEST = 0xFFFFFE00
VICTIM_SPAN = 64 * MiB
ATTACKS = ["alone", "slow-uploads", "unread-handshake", "block-status", "write-zeroes",
           "pipeline"]
TARGET_P99_MS, TARGET_FACTOR, TARGET_RSS_MIB = 50.0, 10.0, 128.0


# -- images: (path, format, read-only, nbdkit filter) per attack and server ---------

class Images:
    """The images of one run, made once in ``workdir`` and copied fresh per server."""

    def __init__(self, workdir: str, size: int):
        self.dir, self.size = workdir, size
        self.plain = self._path("plain.raw")
        with open(self.plain, "wb") as f:
            f.truncate(GiB)
            f.write(random.Random(1).randbytes(VICTIM_SPAN))
        self.allocated = self._path("allocated.qcow")
        allocated_qcow1(self.allocated, size)
        self.extents = self._path("extents.raw")
        with open(self.extents, "wb") as f:
            f.truncate(size)
            block = random.Random(2).randbytes(4096)
            for offset in range(0, size, 64 * 1024):
                f.seek(offset)
                f.write(block)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def for_attack(self, attack: str, server: str) -> tuple[str, str, bool, str | None]:
        """(image, format, read-only, nbdkit filter) a fresh server serves for ``attack``."""
        if attack == "block-status":
            if server == "nbdkit":
                return self.extents, "raw", True, None
            return self.allocated, "qcow", True, None
        scratch = self._path(f"scratch-{server}")
        if os.path.exists(scratch):
            shutil.rmtree(scratch)
        os.makedirs(scratch)
        base = os.path.join(scratch, "base.raw")
        subprocess.run(["cp", "--sparse=always", self.plain, base], check=True)
        if attack != "write-zeroes":
            return base, "raw", False, None
        if server == "nbdkit":
            return base, "raw", False, "cow"
        overlay = os.path.join(scratch, "top.qcow")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw",
                        overlay, str(self.size)], check=True)
        return overlay, "qcow", False, None


def server_command(server: str, port: int, image: str, fmt: str, read_only: bool,
                   nbdkit_filter: str | None) -> list[str]:
    """The command line serving ``image`` as export "bench" on 127.0.0.1:port."""
    if server == "qcownbd":
        return [sys.executable, "-m", "qcownbd", "serve", "--listen", f"127.0.0.1:{port}",
                *(["--read-only"] if read_only else []), f"bench={image}"]
    if server == "qemu-nbd":
        return ["qemu-nbd", "-f", fmt, "-t", "-e", "64", "-x", "bench", "-b", "127.0.0.1",
                "-p", str(port), *(["-r"] if read_only else []), image]
    return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "bench",
            *(["-r"] if read_only else []),
            *([f"--filter={nbdkit_filter}"] if nbdkit_filter else []), "file", image]


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- attackers -----------------------------------------------------------------------

class Attacker:
    """Threads misbehaving against one server until `stop`."""

    def __init__(self, attack: str, port: int, size: int):
        self.attack, self.port, self.size = attack, port, size
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.errors: list[str] = []

    def start(self) -> None:
        runs = {"alone": [], "slow-uploads": [self._slow_uploads],
                "unread-handshake": [self._unread_handshake] * 4,
                "block-status": [self._block_status], "write-zeroes": [self._write_zeroes],
                "pipeline": [self._pipeline]}[self.attack]
        for target in runs:
            thread = threading.Thread(target=self._guarded, args=(target,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(30)

    def _guarded(self, target) -> None:
        try:
            target()
        except (OSError, EOFError, ValueError) as exc:
            if not self.stopping.is_set():
                self.errors.append(f"{self.attack}: {exc}")

    def _client(self, negotiate: bool = True, **go) -> NbdClient:
        client = NbdClient(self.port, timeout=600)
        self.sockets.append(client.sock)
        if negotiate:
            client.go("bench", **go)
        return client

    def _slow_uploads(self) -> None:
        clients = [self._client() for _ in range(4)]
        for client in clients:
            client.send(client.request(CMD_WRITE, 0, 32 * MiB, 1) + b"x")
        while not self.stopping.wait(1.0):
            for client in clients:
                client.send(b"x")

    def _unread_handshake(self) -> None:
        client = self._client(negotiate=False)
        client.greet()
        client.sock.settimeout(0.2)
        burst = option(OPT_LIST) * 4096
        while not self.stopping.is_set():
            try:
                client.sock.send(burst)
            except (TimeoutError, BlockingIOError):
                pass

    def _block_status(self) -> None:
        client = self._client(structured=True, contexts=(b"base:allocation",))
        self._drain(client)
        request = client.request(CMD_BLOCK_STATUS, 0, min(LONGEST, self.size), 1)
        while not self.stopping.is_set():
            client.send(request * 8)

    def _drain(self, client: NbdClient) -> None:
        """Read and drop the replies in a thread of their own (cheaply: no parsing)."""
        def drain():
            buffer = bytearray(1 << 20)
            while client.sock.recv_into(buffer):
                pass
        thread = threading.Thread(target=self._guarded, args=(drain,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _write_zeroes(self) -> None:
        client = self._client()
        cookie = 0
        while not self.stopping.is_set():
            cookie += 1
            client.send(client.request(CMD_WRITE_ZEROES, 0, min(LONGEST, self.size), cookie))
            client.simple_reply()

    def _pipeline(self) -> None:
        client = self._client()
        client.sock.settimeout(0.2)
        burst = b"".join(client.request(CMD_READ, (i % 1024) * 65536, 65536, i)
                         for i in range(256))
        while not self.stopping.is_set():
            try:
                client.sock.send(burst)
            except (TimeoutError, BlockingIOError):
                pass


# -- the victim, in its own process --------------------------------------------------

def victim(port: int, seconds: float) -> dict:
    """4 KiB READs at queue depth 1 for ``seconds``: latency percentiles in ms."""
    client = NbdClient.connect(port, "bench", timeout=120)
    rng = random.Random(3)
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        offset = rng.randrange(VICTIM_SPAN // 4096) * 4096
        start = time.perf_counter()
        client.read(offset, 4096)
        latencies.append((time.perf_counter() - start) * 1000)
    client.close()
    latencies.sort()
    return {"reads": len(latencies), "p50": statistics.median(latencies),
            "p99": latencies[int(len(latencies) * 0.99)], "max": latencies[-1]}


def run_victim(port: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--victim", str(port), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 600)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout)


# -- one measurement -----------------------------------------------------------------

def measure(server: str, attack: str, images: Images, seconds: float) -> dict:
    """Start a fresh server, the attack, then the victim; return the row."""
    image, fmt, read_only, nbdkit_filter = images.for_attack(attack, server)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(server_command(server, port, image, fmt, read_only, nbdkit_filter),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    attacker = Attacker(attack, port, images.size)
    try:
        wait_listening(port, proc)
        attacker.start()
        time.sleep(1.0)
        row = run_victim(port, seconds)
        row["rss"] = peak_rss_mib(proc.pid)
    finally:
        attacker.stop()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if attacker.errors:
        row["attacker"] = attacker.errors[0][:120]
    return {"server": server, "attack": attack, **row}


def print_table(rows: list[dict]) -> None:
    print(f"{'attack':18} {'server':9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>9} "
          f"{'reads':>7} {'rss MiB':>8}  targets")
    alone = {r["server"]: r.get("p99") for r in rows if r["attack"] == "alone"}
    for row in rows:
        if "error" in row:
            print(f"{row['attack']:18} {row['server']:9} victim failed: {row['error']}")
            continue
        verdict = ""
        if row["server"] == "qcownbd":
            ok = (row["p99"] <= TARGET_P99_MS and row["rss"] <= TARGET_RSS_MIB
                  and row["p99"] <= TARGET_FACTOR * (alone.get("qcownbd") or float("inf")))
            verdict = "ok" if ok else "MISSED"
        print(f"{row['attack']:18} {row['server']:9} {row['p50']:8.2f} {row['p99']:8.2f} "
              f"{row['max']:9.1f} {row['reads']:7} {row['rss']:8.1f}  {verdict}"
              + (f"  (attacker: {row['attacker']})" if "attacker" in row else ""))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--victim":
        print(json.dumps(victim(int(sys.argv[2]), float(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="qcownbd,qemu-nbd,nbdkit")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size-gib", type=int, default=4, help="of the attacked images")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="noisy-", dir=shm) as workdir:
        images = Images(workdir, args.size_gib * GiB)
        for attack in args.attacks.split(","):
            for server in args.servers.split(","):
                rows.append(measure(server, attack, images, args.seconds))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
