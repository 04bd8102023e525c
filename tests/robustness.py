"""Helpers shared by the fuzz, crash, fault and load tests (no tests here)."""

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading

import pytest

from conftest import QcownbdServer, qcownbd_cmd, run

SECTOR = 512


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
        return greeting == b"NBDMAGIC" and self.proc.poll() is None

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


@pytest.fixture
def logged_server():
    """Factory like conftest's qcownbd_server, but the stderr is drained (LoggedServer)."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(LoggedServer(*args, **kwargs))


def qcownbd_check(image) -> subprocess.CompletedProcess:
    """`qcownbd check IMAGE`, asserted to be 0 (clean) or 3 (leaks only)."""
    result = run(qcownbd_cmd("check", image), timeout=60, check=False)
    assert result.returncode in (0, 3), f"check exit {result.returncode}: " \
        f"{result.stdout}{result.stderr}"
    return result


def qemu_raw_bytes(image, out, fmt="qcow") -> bytes:
    """What QEMU reads from ``image`` (`qemu-img convert -O raw`)."""
    run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, out], timeout=60)
    with open(out, "rb") as f:
        return f.read()


def make_image(tmp_path, backing: bool, size: int, seed: int = 1) -> tuple[str, bytearray]:
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


def assert_sectors_old_or_new(got: bytes, old: bytes, *new: bytes) -> None:
    """Every 512-byte sector of ``got`` is that sector of ``old`` or of one of ``new``."""
    for pos in range(0, len(got), SECTOR):
        sector = got[pos:pos + SECTOR]
        choices = [old[pos:pos + SECTOR]] + [data[pos:pos + SECTOR] for data in new]
        assert sector in choices, f"sector at +{pos} is neither old nor newly written data"
