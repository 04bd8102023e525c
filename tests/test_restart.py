"""Restarts clients live through: systemd's file descriptor store (`serve --fd-store`),
the successor's MAINPID under Type=notify, and QEMU reconnecting after a plain stop.

The host's PID 1 is not systemd here, so the test plays systemd as sd_notify(3)
and sd_listen_fds_with_names(3) describe it: a datagram notify socket that
receives READY/STOPPING and FDSTORE=1/FDNAME= messages with their descriptors
(SCM_RIGHTS), and a new start with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES and
those descriptors at 3, 4, ...  A libnbd client and qemu-io keep writing,
flushing and reading back across the restart without an error.
"""

import array
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from handover_clients import (
    BLOCK, GOLDEN_DATA, GOLDEN_PATTERN, NBDSH_BASE, QemuIoSession, finish_nbdsh, fleet_list,
    make_fleet, make_qcow, nbdsh_loop, verify,
)
from helpers import (DrainedPipe, children, free_port, qcownbd_cmd, qcownbd_env, run,
                     stop_process, wait_listening)

pytestmark = pytest.mark.timeout(180)

# What systemd does when it starts a service with stored descriptors: they are
# put at 3, 4, ... in the order given, LISTEN_PID is the service's own pid.
LAUNCHER = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[2].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=sys.argv[1])
os.execv(sys.executable, [sys.executable, "-m", "qcownbd", *sys.argv[3:]])
"""


class FakeSystemd:
    """The manager's side of $NOTIFY_SOCKET: messages, and the file descriptor store."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        #: FDNAME -> descriptors, as systemd keeps them
        self.store: dict[str, list[int]] = {}

    def receive(self, timeout: float = 20.0) -> str:
        """The next message (its descriptors go to the store, by FDNAME)."""
        self.sock.settimeout(timeout)
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        text = data.decode()
        fields = dict(line.split("=", 1) for line in text.splitlines())
        if fields.get("FDSTORE") == "1":
            self.store.setdefault(fields.get("FDNAME", "stored"), []).extend(fds)
        elif fds:
            raise AssertionError(f"descriptors without FDSTORE=1: {text!r}")
        if fields.get("FDSTOREREMOVE") == "1":
            for fd in self.store.pop(fields["FDNAME"]):
                os.close(fd)
        self.messages.append(text)
        return text

    def wait_for(self, predicate, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.receive(max(0.1, deadline - time.monotonic()))
            if predicate(text):
                return text

    def close(self):
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


def _serve(cmd, env, pass_fds=()):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, pass_fds=pass_fds)
    proc.stderr = DrainedPipe(proc.stderr)
    return proc


def restart_through_the_store(systemd: FakeSystemd, first, args: list, env):
    """`systemctl restart` of ``first`` (serving two clients): SIGTERM to each of its
    processes (systemd's KillMode=control-group: workers too), the store filled, a
    new start given it; the new process once it took everything."""
    for pid in [first.pid, *children(first.pid)]:
        os.kill(pid, signal.SIGTERM)
    assert first.wait(30) == 0
    while True:     # what it sent before it exited is all queued by now
        try:
            systemd.receive(0.5)
        except socket.timeout:
            break
    assert "STOPPING=1" in systemd.messages
    assert sorted(systemd.store) == ["qcownbd-conn-0", "qcownbd-conn-1",
                                     "qcownbd-listen", "qcownbd-state"], systemd.messages
    time.sleep(0.5)     # the clients wait meanwhile, their requests in the kernel
    names = list(systemd.store)
    fds = [systemd.store[name][0] for name in names]
    launcher = [sys.executable, "-c", LAUNCHER, ":".join(names),
                ",".join(map(str, fds)), *args]
    new = _serve(launcher, env, fds)
    try:
        systemd.wait_for(lambda text: "READY=1" in text)
    except socket.timeout:
        raise AssertionError("".join(new.stderr.lines)) from None
    # everything it was given leaves the store (FDSTOREREMOVE=1)
    systemd.wait_for(lambda _text: not systemd.store)
    return new


def _end_restart(systemd: FakeSystemd, *servers) -> None:
    """Kill whichever of ``servers`` (None: never started) still runs; close the store."""
    for proc in servers:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
    systemd.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_systemctl_restart_keeps_the_connections_through_the_fd_store(tmp_path, workers):
    image = make_qcow(tmp_path)
    systemd = FakeSystemd(tmp_path)
    port = free_port()
    env = qcownbd_env(NOTIFY_SOCKET=systemd.path)
    args = ["serve", "--fd-store", "--workers", str(workers), "--listen", f"127.0.0.1:{port}",
            f"d={image}"]
    first = _serve(qcownbd_cmd(*args), env)
    new = None
    stop_file = tmp_path / "stop"
    try:
        systemd.wait_for(lambda text: "READY=1" in text)
        qemu = QemuIoSession(f"nbd://127.0.0.1:{port}/d", first_block=0)
        nbdsh = nbdsh_loop(f"nbd://127.0.0.1:{port}/d", 128 * 65536, stop_file)
        time.sleep(1.0)
        new = restart_through_the_store(systemd, first, args, env)
        time.sleep(1.0)
        qemu.finish()
        assert finish_nbdsh(nbdsh, stop_file) > 0
        assert stop_process(new) == 0
    finally:
        _end_restart(systemd, first, new)
    old_log, new_log = first.stderr.read(), new.stderr.read()
    assert "kept 2 connection(s) and 1 listening socket(s) in systemd's file descriptor " \
           "store" in old_log, old_log
    assert "restart: resumed 2 connection(s) and 1 listening socket(s)" in new_log, new_log
    assert ("2 workers serve" in old_log + new_log) == (workers == 2), old_log + new_log
    assert "Traceback" not in old_log + new_log
    verify(image, qemu.written)


@pytest.mark.parametrize("workers", [1, 2])
def test_fleet_clients_keep_their_ephemeral_overlays_through_a_restart(tmp_path, workers):
    """Two clients of a fleet with ephemeral overlays: the new start opens the overlays
    the stored connections write (not deleting them as stale; with workers, each in the
    worker its client goes to) before it resumes them; they are deleted once the
    clients have left."""
    config, golden = make_fleet(tmp_path, overlays="ephemeral")
    golden_sum = hashlib.sha256(golden.read_bytes()).hexdigest()
    systemd = FakeSystemd(tmp_path)
    port = free_port()
    env = qcownbd_env(NOTIFY_SOCKET=systemd.path)
    args = ["serve", "--fd-store", "--workers", str(workers), "--config", config,
            "--listen", f"127.0.0.1:{port}"]
    first = _serve(qcownbd_cmd(*args), env)
    new = None
    stop_file = tmp_path / "stop"
    try:
        systemd.wait_for(lambda text: "READY=1" in text)
        qemu = QemuIoSession(f"nbd://127.0.0.1:{port}/fleet/a", first_block=0)
        nbdsh = nbdsh_loop(f"nbd://127.0.0.1:{port}/fleet/b", NBDSH_BASE, stop_file)
        time.sleep(1.0)
        listed = fleet_list(config)
        assert listed == {"fleet/a": True, "fleet/b": True}
        new = restart_through_the_store(systemd, first, args, env)
        assert fleet_list(config) == listed
        time.sleep(1.0)
        # each overlay, read through the new server: the golden data, and none of what
        # the other client writes (the clients check their own writes themselves)
        offset, length = GOLDEN_DATA
        for ident, others in (("a", (NBDSH_BASE, 32 * BLOCK)), ("b", (0, 64 * BLOCK))):
            out = run(["qemu-io", "-r", "-f", "raw", "-c", f"read -P 0 {others[0]} {others[1]}",
                       "-c", f"read -P {GOLDEN_PATTERN} {offset} {length}",
                       f"nbd://127.0.0.1:{port}/fleet/{ident}"], timeout=60).stdout
            assert "fail" not in out.lower() and out.count("read ") == 2, out
        qemu.finish()
        nbdsh_ops = finish_nbdsh(nbdsh, stop_file)
        assert nbdsh_ops > 0
        assert fleet_list(config) == {}     # ephemeral: gone with their clients
        assert stop_process(new) == 0
    finally:
        _end_restart(systemd, first, new)
    old_log, new_log = first.stderr.read(), new.stderr.read()
    assert "kept 2 connection(s)" in old_log, old_log
    assert "restart: resumed 2 connection(s)" in new_log, new_log
    ephemeral = tmp_path / "overlays" / "ephemeral"
    assert new_log.count(f"reopened overlay {ephemeral}/") == 2, new_log
    assert "removed stale" not in new_log and "not resumed" not in new_log, new_log
    assert "Traceback" not in old_log + new_log
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == golden_sum


def test_the_successor_tells_systemd_its_pid(tmp_path):
    image = make_qcow(tmp_path)
    systemd = FakeSystemd(tmp_path)
    port = free_port()
    control = tmp_path / "control"
    server = _serve(qcownbd_cmd("serve", "--listen", f"127.0.0.1:{port}", "--control",
                                control, f"d={image}"),
                    qcownbd_env(NOTIFY_SOCKET=systemd.path))
    try:
        systemd.wait_for(lambda text: "READY=1" in text)
        done = run(qcownbd_cmd("upgrade", "--control", control), env=qcownbd_env())
        new_pid = int(done.stdout.split()[2])
        assert server.wait(30) == 0
        text = systemd.wait_for(lambda text: "MAINPID" in text)
        assert text == f"MAINPID={new_pid}\nREADY=1"
        os.kill(new_pid, signal.SIGTERM)
        systemd.wait_for(lambda text: "STOPPING=1" in text)
    finally:
        if server.poll() is None:
            server.kill()
        systemd.close()


def test_qemu_with_reconnect_delay_sees_no_error_across_a_stop_and_a_start(tmp_path):
    """No fd store: the server answers what is in flight and exits; QEMU reconnects
    to the next server on the same port and resends what was not answered."""
    image = make_qcow(tmp_path)
    port = free_port()
    args = qcownbd_cmd("serve", "--listen", f"127.0.0.1:{port}", f"d={image}")
    first = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=qcownbd_env())
    first.stderr = DrainedPipe(first.stderr)
    wait_listening(port, first)
    opts = ["--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
            f"server.port={port},export=d,reconnect-delay=20"]
    qemu = QemuIoSession("", first_block=0, opts=opts)
    time.sleep(1.0)
    assert stop_process(first) == 0
    time.sleep(1.0)
    second = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=qcownbd_env())
    second.stderr = DrainedPipe(second.stderr)
    try:
        wait_listening(port, second)
        time.sleep(1.5)
        qemu.finish()
    finally:
        stop_process(second)
    log = first.stderr.read() + second.stderr.read()
    assert "errors=0" in log and "Traceback" not in log
    verify(image, qemu.written)
