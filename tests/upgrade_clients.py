"""Helpers for live-upgrade tests (no tests here): a server followed across
handovers through its pid file, and QEMU's NBD client in a verified loop.

    server = HandoverServer(workdir, "--config", conf)   # qcownbd serve --pid-file ...
    new_pid = server.upgrade()          # SIGUSR2; waits for the successor to serve
    server.upgrade_refused(reason)      # SIGUSR2 that must leave the old server serving
    loop = QemuIoLoop(server.port, "disk", region)   # qemu-io, no reconnect-delay
    ...; loop.finish(); loop.rounds, loop.errors, loop.acknowledged
"""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from helpers import free_port, qcownbd_cmd, qcownbd_env, wait_for, wait_listening
from vm.io_loop import BLOCK, SLOTS

HANDOVER = re.compile(r"handover: took (\d+) connection\(s\) and (\d+) listening "
                      r"socket\(s\) from pid (\d+)")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class HandoverServer:
    """`qcownbd serve --pid-file` on a free loopback port; its stderr (every
    generation's: successors inherit it) goes to ``log_path``."""

    def __init__(self, workdir: Path, *serve_args, env=None):
        self.port = free_port()
        self.pid_file = workdir / "qcownbd.pid"
        self.log_path = workdir / "qcownbd.log"
        #: (start, end) of every completed upgrade, and of every refused one,
        #: host monotonic seconds
        self.upgrade_windows: list[tuple[float, float]] = []
        self.refused_windows: list[tuple[float, float]] = []
        with open(self.log_path, "w") as log:
            self.first = subprocess.Popen(
                qcownbd_cmd("serve", "--listen", f"127.0.0.1:{self.port}",
                            "--pid-file", self.pid_file, *serve_args),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=qcownbd_env(**(env or {})), cwd=workdir)  # PYTHONPATH says which qcownbd
        wait_listening(self.port, self.first)
        assert wait_for(lambda: self.pid() == self.first.pid), self.log()

    def pid(self) -> int | None:
        """The pid in the pid file (None while there is none)."""
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        """What every generation of the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def handovers(self) -> dict[int, tuple[int, int]]:
        """Old pid -> (connections, listening sockets) its successor took, from the log."""
        return {int(pid): (int(conns), int(listeners))
                for conns, listeners, pid in HANDOVER.findall(self.log())}

    def _gone(self, pid: int) -> bool:
        if pid == self.first.pid:
            return self.first.poll() is not None  # our child: reap it
        return not alive(pid)

    def upgrade(self, timeout: float = 30.0) -> int:
        """SIGUSR2; wait until a successor's pid is in the pid file, it logged the
        handover from the old pid and the old process is gone. The successor's pid."""
        old = self.pid()
        started = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        # The old server exits once its successor serves (and has rewritten the pid file)
        done = wait_for(lambda: self._gone(old), timeout) and wait_for(
            lambda: self.pid() not in (old, None) and old in self.handovers(), 5)
        new = self.pid()
        assert done and alive(new), (f"upgrade of pid {old} did not complete in {timeout} s "
                                     f"(pid file: {new}); log:\n{self.log()[-3000:]}")
        self.upgrade_windows.append((started, time.monotonic()))
        if old == self.first.pid:
            assert self.first.returncode == 0, self.log()[-3000:]
        return new

    def upgrade_refused(self, reason: str, timeout: float = 30.0) -> None:
        """SIGUSR2 when the successor cannot start: wait until the old server logs
        that it serves on, for ``reason`` (a part of the line), then check its pid
        stayed."""
        old = self.pid()
        before = len(self.log())
        started = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        refused = f"upgrade failed, still serving as pid {old}: "
        assert wait_for(lambda: any(refused in line and reason in line
                                    for line in self.log()[before:].splitlines()), timeout), \
            f"no {refused!r} for {reason!r} after SIGUSR2:\n{self.log()[before:][-3000:]}"
        self.refused_windows.append((started, time.monotonic()))
        assert self.pid() == old and alive(old), self.log()[before:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the current generation; wait until it is gone."""
        pid = self.pid() or self.first.pid
        if not self._gone(pid):
            os.kill(pid, signal.SIGTERM)
            if not wait_for(lambda: self._gone(pid), timeout):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: self._gone(pid), 10)
        if self.first.poll() is None:  # SIGUSR2 never handed over: the first is still ours
            self.first.kill()
        self.first.wait(10)


class QemuIoLoop:
    """qemu-io over NBD (no reconnect-delay: a lost connection fails every request
    after it) writing, flushing and reading back verified patterns, one command at
    a time, in a thread, until finish()."""

    PROMPT = "qemu-io> "

    def __init__(self, port: int, export: str, region: int, pause: float = 0.05):
        self.region, self.pause = region, pause
        self.rounds = 0
        self.errors: list[str] = []
        self.acknowledged: dict[int, int] = {}   # slot -> pattern of its last acked write
        #: (start, end) of every round, host monotonic seconds
        self.round_times: list[tuple[float, float]] = []
        self._stopping = threading.Event()
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "qemu-io", "-f", "raw", f"nbd://127.0.0.1:{port}/{export}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._buffer = b""
        self._expect_prompt(30)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _expect_prompt(self, timeout: float) -> str:
        """Output up to the next prompt (qemu-io prints one after each command)."""
        deadline = time.monotonic() + timeout
        prompt = self.PROMPT.encode()
        while prompt not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError(f"qemu-io silent for {timeout} s: {self._buffer[-500:]!r}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"qemu-io exited: {self._buffer[-500:]!r}")
            self._buffer += chunk
        output, self._buffer = self._buffer.split(prompt, 1)
        return output.decode(errors="replace")

    def command(self, line: str, timeout: float = 60) -> str:
        """Run one qemu-io command; its output."""
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()
        return self._expect_prompt(timeout)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._round()
                time.sleep(self.pause)
        except (OSError, TimeoutError, EOFError) as exc:
            self.errors.append(f"qemu-io loop ended: {exc}")

    def _round(self) -> None:
        slot = self.rounds % SLOTS
        value = 0xC1 + self.rounds % 60
        offset = self.region + slot * BLOCK
        started = time.monotonic()
        wrote = self.command(f"write -P {value} {offset} {BLOCK}")
        flushed = self.command("flush")
        read = self.command(f"read -P {value} {offset} {BLOCK}")
        self.round_times.append((started, time.monotonic()))
        if wrote.startswith(f"wrote {BLOCK}/{BLOCK} bytes"):
            self.acknowledged[slot] = value
        for output in (wrote, flushed, read):
            self.errors += [line for line in output.splitlines()
                            if "fail" in line or "error" in line.lower()]
        if not read.startswith(f"read {BLOCK}/{BLOCK} bytes"):
            self.errors.append(f"round {self.rounds}: {read.strip()}")
        self.rounds += 1

    def finish(self, *last_commands: str) -> list[str]:
        """Stop the loop after its round, run ``last_commands``, quit; their outputs."""
        self._stopping.set()
        self._thread.join(120)
        outputs = [self.command(line) for line in last_commands]
        self.proc.stdin.close()
        self.proc.wait(30)
        return outputs

    def kill(self) -> None:
        """Stop qemu-io at once (cleanup)."""
        self._stopping.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
