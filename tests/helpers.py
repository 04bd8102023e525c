"""Helpers shared by the tests (no tests here): running tools, qcownbd servers,
QEMU and `qcownbd check` as oracles, and the images tests start from.

The NBD client is in nbdclient.py; the pytest fixtures built on these helpers
(qcownbd_server, logged_server, vm_kit) are in conftest.py.
"""

import os
import pty
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from nbdclient import NBDMAGIC, NbdClient
from qcownbd.image.backend import Extent
from qcownbd.image.metadata_cache import MIN_BUDGET, MetadataCache
from qcownbd.image.qcow1 import Qcow1Image, is_qcow1
from qcownbd.image.raw import RawImage

REPO = Path(__file__).resolve().parent.parent
SECTOR = 512


# -- processes ---------------------------------------------------------------------

def run(cmd, timeout=120, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool with a bounded time, text output captured; with ``check``, a
    non-zero exit is an AssertionError that shows the tool's output."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{[str(c) for c in cmd]} failed ({result.returncode}):\n"
                             f"{result.stdout}{result.stderr}")
    return result


def qcownbd_cmd(*args) -> list[str]:
    """The command line that runs this checkout's qcownbd."""
    return [sys.executable, "-m", "qcownbd", *map(str, args)]


def qcownbd_env(**extra: str) -> dict[str, str]:
    """The environment in which `qcownbd_cmd` runs this checkout, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def copy_checkout(dest: Path) -> Path:
    """A copy of this checkout at ``dest``, without version control, venvs and
    build or cache litter: what a user unpacks or clones.  Returns ``dest``."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until 127.0.0.1:port accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server exited early ({proc.returncode}): {out}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not start listening")


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports the process holds listening sockets on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a server's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as file:
            found += [int(child) for child in file.read().split()]
    return found


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds passed (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal ``proc`` unless it has exited, wait (SIGKILL after ``timeout``); its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def on_terminal(*args) -> tuple[int, bytes]:
    """Run qcownbd with stderr on a pseudo-terminal: (exit status, what it showed there)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(qcownbd_cmd(*args), stdout=subprocess.DEVNULL, stderr=slave,
                            env=qcownbd_env())
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:                # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return proc.wait(30), output


# -- servers -------------------------------------------------------------------------

class QcownbdServer:
    """A `qcownbd serve` process on a free loopback port; stopped with SIGTERM.

    ``launcher``: a command that runs the server (e.g. prlimit and its options).
    """

    def __init__(self, *serve_args, port=None, env=None, cwd=None, launcher=()):
        self.port = port or free_port()
        self.args = ["serve", "--listen", f"127.0.0.1:{self.port}", *map(str, serve_args)]
        self.proc = subprocess.Popen(
            [*launcher, *qcownbd_cmd(*self.args)], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=qcownbd_env(**(env or {})), cwd=cwd)
        wait_listening(self.port, self.proc)

    def uri(self, export: str = "") -> str:
        """nbd:// URI of an export."""
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait; returns its exit status (idempotent).
        Everything it logged is then in ``self.stderr``."""
        if self.proc.stderr.closed:
            return self.proc.returncode
        stop_process(self.proc, sig, timeout)
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode

    def fd_count(self) -> int:
        """Open file descriptors of the server process."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_bytes(self) -> int:
        """Resident set size of the server process."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


class DrainedPipe:
    """A server's stderr pipe read by a thread, so the server can never block on it.

    Stands in for ``proc.stderr``: `read` waits for EOF and returns everything.
    """

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.closed = False
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe) -> None:
        with pipe:
            for line in pipe:
                self.lines.append(line)

    def read(self) -> str:
        """All the output, once the writer closed its end."""
        self._thread.join(10)
        return "".join(self.lines)

    def close(self) -> None:
        """Mark closed (the thread closes the pipe itself at EOF)."""
        self.closed = True


class LoggedServer(QcownbdServer):
    """A `qcownbd serve` whose stderr is drained while it runs (storms log a lot:
    an undrained pipe would fill up and block the server on its own logging)."""

    def __init__(self, *serve_args, **kwargs):
        for _attempt in range(3):
            super().__init__(*serve_args, **kwargs)
            self.proc.stderr = DrainedPipe(self.proc.stderr)
            if self._greets():
                return
            # free_port() races other test processes: someone else took the port
            self.stop(signal.SIGKILL)
        raise RuntimeError(f"no NBD greeting from our server: {self.stderr[-2000:]}")

    def _greets(self) -> bool:
        """True when the process listening on our port is this server, alive and greeting."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                greeting = sock.recv(8, socket.MSG_WAITALL)
        except OSError:
            return False
        return greeting == NBDMAGIC and self.proc.poll() is None

    @property
    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "".join(self.proc.stderr.lines)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.stop()

    def kill9(self) -> None:
        """SIGKILL: no shutdown code runs (a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def first_byte(port: int, export: str | bytes = "d") -> bytes:
    """The first byte of ``export``, read over a new NBD connection."""
    with NbdClient.connect(port, export) as client:
        return client.read(0, 1)


# -- QEMU and qcownbd as oracles -----------------------------------------------------

def qemu_img(*args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """`qemu-img ARGS`, asserted to succeed."""
    return run(["qemu-img", *args], timeout=timeout, **kwargs)


def qemu_io(image, *commands: str, fmt="qcow", read_only=False, timeout=60,
            check=True) -> subprocess.CompletedProcess:
    """`qemu-io -f FMT [-r] -c COMMAND... IMAGE` (a file or an nbd:// URI)."""
    args = [arg for command in commands for arg in ("-c", command)]
    return run(["qemu-io", "-f", fmt, *(["-r"] if read_only else []), *args, image],
               timeout=timeout, check=check)


def qemu_raw(image, out, fmt="qcow") -> bytes:
    """What QEMU reads from ``image`` (`qemu-img convert -O raw` into ``out``)."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, out], timeout=60)
    with open(out, "rb") as f:
        return f.read()


def qemu_compare(image, raw, fmt="qcow", live=False) -> subprocess.CompletedProcess:
    """`qemu-img compare -f FMT IMAGE -F raw RAW` (exit 0 = identical), not checked;
    ``live``: the image is served right now (-U: QEMU's lock would refuse it)."""
    return run(["qemu-img", "compare", *(["-U"] if live else []), "-f", fmt, image,
                "-F", "raw", raw], check=False)


def qcownbd_check(image) -> subprocess.CompletedProcess:
    """`qcownbd check IMAGE`, asserted to be 0 (clean) or 3 (leaks only)."""
    result = run(qcownbd_cmd("check", image), timeout=60, check=False)
    assert result.returncode in (0, 3), f"check exit {result.returncode}: " \
        f"{result.stdout}{result.stderr}"
    return result


# -- images ----------------------------------------------------------------------------

def raw_file(path, content: bytes = b"", size: int = 1 << 20):
    """A raw file of ``size`` bytes starting with ``content`` (the rest a hole); its path."""
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)
    return path


def make_qcow1(tmp_path, backing: bool, size: int, seed: int = 1) -> tuple[str, bytearray]:
    """A qemu-img made QCOW1 (over a random raw base when ``backing``) and its contents."""
    image = str(tmp_path / "disk.qcow")
    if backing:
        base = random.Random(seed).randbytes(size * 3 // 4)
        (tmp_path / "base.raw").write_bytes(base)
        run(["qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw",
             image, str(size)])
        return image, bytearray(base + bytes(size - len(base)))
    run(["qemu-img", "create", "-f", "qcow", image, str(size)])
    return image, bytearray(size)


def hdr(magic=0x514649FB, version=1, bfo=0, bfs=0, mtime=0, size=1 << 20,
        cb=12, l2b=9, pad=0, crypt=0, l1o=48) -> bytes:
    """A 48-byte QCOW1 header with the given fields (qcow1.md §14)."""
    return struct.pack(">IIQIIQBBHIQ", magic, version, bfo, bfs, mtime,
                       size, cb, l2b, pad, crypt, l1o)


def be64(*values) -> bytes:
    """Big-endian u64s."""
    return struct.pack(">%dQ" % len(values), *values)


def compressed_entry(offset: int, csize: int, cluster_bits: int) -> int:
    """An L2 entry for a compressed run."""
    return (1 << 63) | (csize << (63 - cluster_bits)) | offset


def backing_opener_for(overlay_path):
    """A backing_opener resolving names like QEMU (relative to the overlay's dir)."""
    def opener(name: bytes):
        path = os.path.join(os.path.dirname(os.fspath(overlay_path)), os.fsdecode(name))
        return open_image(path, read_only=True)
    return opener


def small_cache(path, tables: int | None) -> MetadataCache | None:
    """A metadata cache of its own that holds ``tables`` L2 tables of the QCOW1 image
    ``path`` (evictions in every few requests); None: the process's shared one."""
    if tables is None:
        return None
    with open(path, "rb") as file:
        header = file.read(48)
    l2_bits = header[33]
    return MetadataCache(max(MIN_BUDGET, tables * (8 << l2_bits)))


def open_image(path, *, read_only=True, cache_tables=None, **kwargs):
    """Open a QCOW1 (by magic) or raw file as a Backend, with the QCOW1 backend alone.

    Unlike qcownbd.image.probe.open_image, the backing opener is minimal (names
    resolved against the overlay's directory, QCOW1 recognised by magic,
    everything else raw, always read-only): the QCOW1 tests depend on nothing else.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        if is_qcow1(os.pread(fd, 48, 0)):
            return Qcow1Image(fd, path, read_only=read_only,
                              backing_opener=backing_opener_for(path),
                              metadata_cache=small_cache(path, cache_tables), **kwargs)
        return RawImage(fd, path, read_only=read_only)
    except BaseException:
        os.close(fd)
        raise


def read(image, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of an open Backend."""
    buf = bytearray(length)
    image.read_into(offset, memoryview(buf))
    return bytes(buf)


def read_all(image) -> bytes:
    """The whole disk of an open Backend."""
    return read(image, 0, image.size)


def assert_sectors_old_or_new(got: bytes, old: bytes, *new: bytes) -> None:
    """Every 512-byte sector of ``got`` is that sector of ``old`` or of one of ``new``."""
    for pos in range(0, len(got), SECTOR):
        sector = got[pos:pos + SECTOR]
        choices = [old[pos:pos + SECTOR]] + [data[pos:pos + SECTOR] for data in new]
        assert sector in choices, f"sector at +{pos} is neither old nor newly written data"


def allocated_qcow1(path, size: int, cluster_bits: int = 9, l2_bits: int = 12,
                    backing: str | None = None) -> None:
    """A QCOW1 image of ``size`` bytes, every cluster allocated (the tables of a fully
    written disk, which a read-write open scans): its data lies in the file's sparse
    tail.  The default geometry is the one qemu-img gives overlays (512-byte clusters);
    12 and 9 is the one of images without a backing file.  ``backing``: the backing
    file name to record."""
    l2_entries, cluster = 1 << l2_bits, 1 << cluster_bits
    tables = size // (l2_entries * cluster)
    name = os.fsencode(backing or "")
    l1_at = -(-(48 + len(name)) // 8) * 8
    tables_at = -(-(l1_at + 8 * tables) // cluster) * cluster
    data_at = tables_at + tables * 8 * l2_entries
    with open(path, "wb") as f:
        f.write(hdr(size=size, cb=cluster_bits, l2b=l2_bits, l1o=l1_at,
                    bfo=48 if name else 0, bfs=len(name)) + name)
        f.seek(l1_at)
        f.write(struct.pack(f">{tables}Q", *(tables_at + 8 * l2_entries * t
                                             for t in range(tables))))
        f.seek(tables_at)
        for table in range(tables):
            first = data_at + table * l2_entries * cluster
            f.write(struct.pack(f">{l2_entries}Q", *range(first, first + l2_entries * cluster,
                                                          cluster)))
        f.truncate(data_at + size)


def whole_status(image, offset: int = 0, length: int | None = None) -> list:
    """A backend's block status over the whole range, as a client gathers it: call
    after call (each bounds its work), equal neighbours merged."""
    end = image.size if length is None else offset + length
    extents: list = []
    while offset < end:
        got = image.block_status(offset, end - offset)
        assert got and all(e.length > 0 for e in got), f"no progress at {offset}"
        for extent in got:
            last = extents[-1] if extents else None
            if last is not None and (last.hole, last.zero, last.depth) == (
                    extent.hole, extent.zero, extent.depth):
                extents[-1] = Extent(last.length + extent.length, last.hole, last.zero,
                                     last.depth)
            else:
                extents.append(extent)
            offset += extent.length
    return extents
