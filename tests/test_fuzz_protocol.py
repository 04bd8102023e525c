"""Protocol fuzzer: hostile handshakes, options and requests against a live server.

Fuzz threads (stdlib `random`, seeded; the seed and session number are in
every failure message, QCOWNBD_FUZZ_SEED overrides the seed) open raw
sockets to 127.0.0.1 and send a mix of valid and mutated messages:
garbage greetings, random client flags, options with flipped bytes, lying
length fields, truncations and oversized payloads, then transmission-phase
requests in simple, structured and extended mode with random commands,
flags, offsets and lengths, bad magics and payloads cut short.  Meanwhile a
real libnbd client (nbdsh) does verified I/O on its own export.

Proved: the server never dies and never logs a traceback, its fd count
returns to the baseline and its RSS stays bounded once the storm is over,
the libnbd client saw no error and its data is intact on disk.
"""

import os
import random
import socket
import struct
import subprocess
import threading
import time

import pytest

from helpers import LoggedServer, qemu_compare, run
from nbdclient import (OPT_EXPORT_NAME, OPT_EXTENDED, OPT_GO, OPT_SET_META, OPT_STRUCTURED,
                       go_payload, meta_payload, option, request)

MiB = 1 << 20
LEGIT = "legit-export-7f3a9c"       # fuzzers never send this name
FUZZ_EXPORTS = [b"fz", b"fzraw", b"", b"nope", b"fz\0", b"\xff\xfe"]
CONTEXTS = [b"base:allocation", b"qemu:allocation-depth", b"base:", b"qemu:", b"x:y", b""]

LEGIT_SCRIPT = r"""
import random, sys, time
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
ref = bytearray(size)
deadline = time.monotonic() + seconds
ops = 0
while time.monotonic() < deadline:
    length = rnd.choice([1, 512, 4096, 65536, 200000])
    offset = rnd.randrange(size - length)
    if rnd.random() < 0.6:
        data = rnd.randbytes(length)
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
        ref[offset:offset + length] = data
    elif rnd.random() < 0.8:
        assert h.pread(length, offset) == ref[offset:offset + length], f"mismatch at {offset}"
    else:
        h.flush()
    ops += 1
h.flush()
assert h.pread(size, 0) == ref, "final read mismatch"
open(ref_path, "wb").write(ref)
h.shutdown()
print("legit ops", ops)
"""


def random_info_payload(rnd, name: bytes) -> bytes:
    infos = [rnd.randrange(5) for _ in range(rnd.randrange(4))]
    return go_payload(name, *infos)


def random_meta_payload(rnd, name: bytes) -> bytes:
    return meta_payload(name, rnd.sample(CONTEXTS, rnd.randrange(4)))


def valid_option(rnd) -> bytes:
    """One well-formed option, of any kind (GO/EXPORT_NAME name fuzz exports only)."""
    opt = rnd.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, rnd.randrange(1 << 32)])
    name = rnd.choice(FUZZ_EXPORTS)
    if opt in (6, 7):
        return option(opt, random_info_payload(rnd, name))
    if opt in (9, 10):
        return option(opt, random_meta_payload(rnd, name))
    if opt == OPT_EXPORT_NAME:
        return option(opt, name)
    return option(opt, rnd.randbytes(rnd.choice([0, 0, 0, 3, 100])))


def mutate(rnd, data: bytes) -> bytes:
    """A random corruption of ``data``: flipped bytes, lying lengths, cuts, splices."""
    data = bytearray(data)
    how = rnd.randrange(6)
    if how == 0 and data:
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
    elif how == 1 and len(data) >= 16:   # the length word of an option or request header
        pos = rnd.choice([12, min(len(data) - 4, 24)])
        data[pos:pos + 4] = struct.pack(">I", rnd.choice(
            [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 33 * MiB, 65536, rnd.randrange(1 << 32)]))
    elif how == 2:
        del data[rnd.randrange(len(data) + 1):]
    elif how == 3:
        data += rnd.randbytes(rnd.randrange(1, 64))
    elif how == 4:
        data = data * rnd.randint(2, 3)
    else:
        data[:0] = rnd.randbytes(rnd.randrange(1, 24))
    return bytes(data)


def random_request(rnd, extended: bool, size: int) -> bytes:
    """A transmission request: mostly in range, sometimes absurd."""
    cmd = rnd.choice([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, rnd.randrange(1 << 16)])
    flags = rnd.choice([0, 0, 1, 4, 8, 16, 32, rnd.randrange(1 << 16)])
    length = rnd.choice([1, 512, 4096, 65536, 0, 32 * MiB, 32 * MiB + 1, rnd.randrange(1 << 32)])
    offset = rnd.choice([0, rnd.randrange(size), size - 1, size, (1 << 64) - 1 - rnd.randrange(4096)])
    cookie = rnd.randrange(1 << 64)
    header = request(cmd, offset, length, cookie, flags, extended=extended)
    carries = cmd == 1 or (extended and flags & 32)
    if carries and length <= 65536:
        header += rnd.randbytes(length if rnd.random() < 0.8 else rnd.randrange(length + 1))
    return mutate(rnd, header) if rnd.random() < 0.15 else header


def drain(sock, wait: float) -> bool:
    """Read and drop replies for up to ``wait`` seconds; True once the server closed."""
    sock.settimeout(wait)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True
    return False


class Fuzzer:
    """One fuzz thread: sequential sessions until the deadline."""

    def __init__(self, port: int, seed: int, size: int):
        self.port, self.seed, self.size = port, seed, size
        self.rnd = random.Random(seed)
        self.sessions = 0

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.sessions += 1
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            try:
                self.session(sock)
            except OSError:
                pass  # the server closing on us is an acceptable answer to garbage
            finally:
                if self.rnd.random() < 0.3:   # abortive close: RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def session(self, sock) -> None:
        rnd = self.rnd
        sock.settimeout(5)
        sock.recv(18)
        if rnd.random() < 0.1:
            sock.sendall(rnd.randbytes(rnd.randrange(1, 300)))
            drain(sock, 0.05)
            return
        sock.sendall(struct.pack(">I", rnd.choice([1, 3, 3, 0, 2, rnd.randrange(1 << 32)])))
        if rnd.random() < 0.5:
            for _ in range(rnd.randrange(1, 8)):
                message = valid_option(rnd)
                sock.sendall(mutate(rnd, message) if rnd.random() < 0.4 else message)
                if drain(sock, 0.01):
                    return
            if rnd.random() < 0.5:
                return
        self.transmission(sock)

    def transmission(self, sock) -> None:
        rnd = self.rnd
        mode = rnd.choice(["simple", "structured", "extended"])
        name = rnd.choice([b"fz", b"fzraw"])
        if mode == "structured":
            sock.sendall(option(OPT_STRUCTURED))
        if mode == "extended":
            sock.sendall(option(OPT_EXTENDED))
        if mode != "simple" and rnd.random() < 0.7:
            sock.sendall(option(OPT_SET_META, random_meta_payload(rnd, name)))
        if rnd.random() < 0.2:
            sock.sendall(option(OPT_EXPORT_NAME, name))
        else:
            sock.sendall(option(OPT_GO, random_info_payload(rnd, name)))
        if drain(sock, 0.02):
            return
        for _ in range(rnd.randrange(1, 40)):
            sock.sendall(random_request(rnd, mode == "extended", self.size))
            if rnd.random() < 0.2 and drain(sock, 0.01):
                return
        drain(sock, 0.05)


def fuzz_storm(tmp_path, seconds: float, threads: int) -> None:
    """Run the storm and the legitimate client, then check the server's health."""
    seed = int(os.environ.get("QCOWNBD_FUZZ_SEED", "20261125"))
    legit = tmp_path / "legit.qcow"
    run(["qemu-img", "create", "-f", "qcow", legit, "16M"])
    run(["qemu-img", "create", "-f", "qcow", tmp_path / "fz.qcow", "16M"])
    run(["qemu-img", "create", "-f", "raw", tmp_path / "fz.raw", "4M"])
    server = LoggedServer(f"{LEGIT}={legit}", f"fz={tmp_path / 'fz.qcow'}",
                          f"fzraw={tmp_path / 'fz.raw'}")
    try:
        base_fds, base_rss = server.fd_count(), server.rss_bytes()
        client = subprocess.Popen(
            ["/usr/bin/python3", "-m", "nbd", "-n", "-c",
             f"uri, seed, seconds, ref_path = {(server.uri(LEGIT), seed, seconds, str(tmp_path / 'legit.ref'))!r}",
             "-c", LEGIT_SCRIPT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + seconds
        fuzzers = [Fuzzer(server.port, seed + i, 16 * MiB) for i in range(threads)]
        workers = [threading.Thread(target=f.run, args=(deadline,), daemon=True) for f in fuzzers]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(seconds + 60)
        out, err = client.communicate(timeout=seconds + 60)
        sessions = sum(f.sessions for f in fuzzers)
        where = f"(seed {seed}, {sessions} sessions)"
        assert server.proc.poll() is None, f"server died {where}: {server.log[-3000:]}"
        assert client.returncode == 0 and "legit ops" in out, f"legit client failed {where}: {err}"
        _wait_for_fds(server, base_fds, where)
        grown = server.rss_bytes() - base_rss
        assert grown < 64 * MiB, f"RSS grew by {grown >> 20} MiB {where}"
        assert server.rss_bytes() < 150 * MiB, where
    finally:
        server.stop()
    assert "Traceback" not in server.stderr, server.stderr[server.stderr.find("Traceback"):][:3000]
    result = qemu_compare(legit, tmp_path / "legit.ref")
    assert result.returncode == 0, f"legit data damaged on disk {where}: {result.stdout}"


def _wait_for_fds(server, base: int, where: str) -> None:
    """Closed clients must give their fds back (the server sees EOF or RST at once)."""
    deadline = time.monotonic() + 10
    while server.fd_count() > base and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.fd_count() <= base, \
        f"fd leak: {server.fd_count()} open, {base} before the storm {where}"


@pytest.mark.timeout(120)
def test_protocol_fuzz_storm(tmp_path):
    fuzz_storm(tmp_path, seconds=15, threads=3)


@pytest.mark.long
@pytest.mark.timeout(900)
def test_protocol_fuzz_storm_long(tmp_path):
    fuzz_storm(tmp_path, seconds=300, threads=4)
