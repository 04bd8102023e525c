"""Shared test fixtures: free ports, a qcownbd server started as a real process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def qcownbd_cmd(*args) -> list[str]:
    """The command line that runs this checkout's qcownbd."""
    return [sys.executable, "-m", "qcownbd", *map(str, args)]


class QcownbdServer:
    """A `qcownbd serve` process on a free loopback port; stopped with SIGTERM."""

    def __init__(self, *serve_args, port=None, env=None, cwd=None):
        self.port = port or free_port()
        self.args = ["serve", "--listen", f"127.0.0.1:{self.port}", *map(str, serve_args)]
        self.proc = subprocess.Popen(
            qcownbd_cmd(*self.args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            cwd=cwd)
        wait_listening(self.port, self.proc)

    def uri(self, export: str = "") -> str:
        """nbd:// URI of an export."""
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait; returns its exit status (idempotent)."""
        if self.proc.stderr.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def qcownbd_server():
    """Factory: start servers with `qcownbd_server(args...)`; all stopped at teardown."""
    servers = []

    def start(*args, **kwargs):
        server = QcownbdServer(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def run(cmd, timeout=120, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a client tool with a bounded time; text output captured."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, check=check, **kwargs)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long variants (minutes of fuzzing, hundreds of crash points)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip_long = pytest.mark.skip(reason="long variant: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip_long)


@pytest.fixture(scope="session")
def vm_kit():
    """Kernel + cached base initramfs for QEMU test guests (tests/vm); fails, never skips."""
    from vm.initramfs import guest_kit
    from vm.packages import PackageError
    try:
        return guest_kit()
    except PackageError as exc:
        pytest.fail(f"cannot prepare test guests: {exc}")
