"""Live handover (qcownbd upgrade, SIGUSR2) with real clients writing through it.

QEMU's qemu-io and libnbd's nbdsh keep writing, flushing and reading back
patterned data while the server hands its sockets and connections to a
successor, several times: no request may fail, the pid changes each time,
and the image is sound and holds every write afterwards.  A successor that
cannot take over (a broken config, an image it cannot open) leaves the old
server serving, and `qcownbd upgrade` says why in one line.
"""

import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time

import pytest

from helpers import LoggedServer, qcownbd_cmd, qcownbd_env, run, wait_for

pytestmark = pytest.mark.timeout(180)
SIZE = 16 * 1024 * 1024
BLOCK = 64 * 1024
HANDED = "handover: took "


class HandingServer(LoggedServer):
    """A LoggedServer whose pid moves: the current one is in its --pid-file."""

    def __init__(self, tmp_path, *serve_args, **kwargs):
        self.pid_file = tmp_path / "server.pid"
        self.control = tmp_path / "control"
        super().__init__("--pid-file", self.pid_file, "--control", self.control,
                         *serve_args, **kwargs)
        assert wait_for(self.pid_file.exists)

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def handovers(self) -> int:
        return self.log.count(HANDED)

    def upgrade_by_signal(self) -> int:
        """SIGUSR2; the successor's pid once it serves and the old one has exited."""
        old, count = self.pid, self.handovers()
        os.kill(old, signal.SIGUSR2)
        assert wait_for(lambda: self.handovers() > count and self.pid != old
                        and not _alive(old), 60), self.log[-3000:]
        return self.pid

    def upgrade_command(self, check=True):
        return run(qcownbd_cmd("upgrade", "--control", self.control), timeout=120,
                   check=check, env=qcownbd_env())

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.stderr.closed:
            return self.proc.returncode
        pid = self.pid if self.pid_file.exists() else self.proc.pid
        if _alive(pid):
            os.kill(pid, sig)
            assert wait_for(lambda: not _alive(pid), timeout)
        return super().stop(sig, timeout)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class QemuIoSession:
    """qemu-io on an export, fed commands while it runs: write a pattern, flush, read
    it back (verified), again and again, until `finish`."""

    def __init__(self, uri: str, *, first_block: int, opts: list[str] | None = None):
        self.proc = subprocess.Popen(
            ["qemu-io", *(opts or ["-f", "raw", uri])], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.written: dict[int, int] = {}
        self._block = first_block
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self):
        step = 0
        while not self._stop.is_set():
            offset = (self._block + step % 64) * BLOCK
            pattern = 1 + (step * 7) % 250
            self.proc.stdin.write(f"write -P {pattern} {offset} {BLOCK}\nflush\n"
                                  f"read -P {pattern} {offset} {BLOCK}\nsleep 20\n")
            self.proc.stdin.flush()
            self.written[offset] = pattern
            step += 1
            time.sleep(0.03)
        self.steps = step

    def finish(self) -> str:
        """Stop feeding, let qemu-io end; its output (every request must have worked)."""
        self._stop.set()
        self._thread.join(10)
        out, _ = self.proc.communicate("quit\n", timeout=120)
        assert self.proc.returncode == 0, out[-3000:]
        bad = [line for line in out.splitlines()
               if "error" in line.lower() or "fail" in line.lower()]
        assert not bad, bad[:5]
        assert out.count("wrote 65536/65536") == self.steps, out[-2000:]
        assert out.count("read 65536/65536") == self.steps, out[-2000:]
        return out


NBDSH_LOOP = textwrap.dedent("""
    import nbd, os, sys
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(sys.argv[1])
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    base, ops = int(sys.argv[2]), 0
    seen = []
    while not os.path.exists(sys.argv[3]):
        off = base + (ops % 32) * 65536
        data = bytes([ops % 251 + 1]) * 65536
        h.pwrite(data, off)
        h.flush()
        assert h.pread(65536, off) == data, off
        h.block_status(65536, off, lambda ctx, o, ents, err: seen.append(ents[1] & 1 == 0))
        ops += 1
    assert all(seen), "a written block reported as a hole"
    print("ops", ops, flush=True)
    h.shutdown()
""")


def _nbdsh_loop(uri: str, base: int, stop_file) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/python3", "-c", NBDSH_LOOP, uri, str(base),
                             str(stop_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish_nbdsh(proc: subprocess.Popen, stop_file) -> int:
    stop_file.write_text("")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return int(out.split()[-1])


def _qcow(tmp_path, name="d.qcow"):
    path = tmp_path / name
    run(qcownbd_cmd("create", path, str(SIZE)), env=qcownbd_env())
    return path


def _verify(image, written: dict[int, int]) -> None:
    """Every acknowledged write is in the image (QEMU reads QCOW1 itself), and it is
    sound."""
    commands = []
    for offset, pattern in sorted(written.items()):
        commands += ["-c", f"read -P {pattern} {offset} {BLOCK}"]
    out = run(["qemu-io", "-r", "-f", "qcow", *commands, image], timeout=120).stdout
    assert "fail" not in out.lower(), out[-2000:]
    run(qcownbd_cmd("check", image), env=qcownbd_env())


def test_clients_write_through_repeated_upgrades_without_an_error(tmp_path):
    image = _qcow(tmp_path)
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, f"d={image}") as server:
        pids = [server.pid]
        qemu = QemuIoSession(server.uri("d"), first_block=0)
        nbdsh = _nbdsh_loop(server.uri("d"), 128 * BLOCK, stop_file)
        time.sleep(1.0)
        for _ in range(3):
            pids.append(server.upgrade_by_signal())
            time.sleep(0.5)
        done = server.upgrade_command()
        pids.append(server.pid)
        assert done.stdout.strip() == f"upgraded: pid {pids[-1]} serves now (was pid {pids[-2]})"
        time.sleep(0.5)
        qemu.finish()
        assert _finish_nbdsh(nbdsh, stop_file) > 0
        status = json.loads(run(qcownbd_cmd("status", "--control", server.control, "--json"),
                                env=qcownbd_env()).stdout)
        assert status["pid"] == pids[-1]
        assert len(set(pids)) == 5
        log = server.log
        assert log.count("handover: took 2 connection(s) and 2 listening socket(s)") == 4, log
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    _verify(image, qemu.written)


def test_a_successor_that_cannot_take_over_leaves_the_old_server_serving(tmp_path):
    image = _qcow(tmp_path)
    config = tmp_path / "q.toml"
    good = f'[exports.d]\npath = "{image}"\n'
    config.write_text(good)
    with HandingServer(tmp_path, "--config", config) as server:
        first = server.pid
        qemu = QemuIoSession(server.uri("d"), first_block=0)
        time.sleep(0.5)
        # a config the successor cannot read: it never gets to the images
        config.write_text("[exports.d\n")
        os.kill(first, signal.SIGUSR2)
        assert wait_for(lambda: "upgrade failed" in server.log, 60)
        config.write_text(good)
        # an image the successor cannot open: the old one has let go of it already
        image.rename(tmp_path / "away.qcow")
        failed = server.upgrade_command(check=False)
        (tmp_path / "away.qcow").rename(image)
        assert failed.returncode == 1
        assert failed.stdout == ""
        line = failed.stderr.strip()
        assert "\n" not in line and line.startswith(
            f"qcownbd: error: upgrade failed, still serving as pid {first}: "), line
        assert f"export d: {image}" in line, line
        assert server.pid == first and _alive(first)
        time.sleep(0.5)
        second = server.upgrade_by_signal()
        time.sleep(0.3)
        qemu.finish()
        assert second != first
        assert server.stop() == 0
    log = server.stderr
    assert log.count("upgrade failed, still serving") == 2, log
    assert "Traceback" not in log, log
    _verify(image, qemu.written)
