"""Live handover (qcownbd upgrade, SIGUSR2) with real clients writing through it.

QEMU's qemu-io and libnbd's nbdsh keep writing, flushing and reading back
patterned data while the server hands its sockets and connections to a
successor, several times: no request may fail, the pid changes each time,
and the image is sound and holds every write afterwards.  A successor that
cannot take over (a broken config, an image it cannot open) leaves the old
server serving, and `qcownbd upgrade` says why in one line.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from handover_clients import (
    BLOCK, NBDSH_BASE, QemuIoSession, finish_nbdsh, fleet_list, make_fleet, make_qcow, nbdsh_loop,
    nbdsh_written, verify, verify_isolated,
)
from helpers import (DrainedPipe, LoggedServer, free_port, qcownbd_cmd, qcownbd_env, run,
                     wait_for, wait_listening)
from test_tls import pki, tls_args  # noqa: F401 (pki is the fixture of x509 files)

pytestmark = pytest.mark.timeout(180)
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


def test_clients_write_through_repeated_upgrades_without_an_error(tmp_path):
    image = make_qcow(tmp_path)
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, f"d={image}") as server:
        pids = [server.pid]
        qemu = QemuIoSession(server.uri("d"), first_block=0)
        nbdsh = nbdsh_loop(server.uri("d"), 128 * BLOCK, stop_file)
        time.sleep(1.0)
        for _ in range(3):
            pids.append(server.upgrade_by_signal())
            time.sleep(0.5)
        done = server.upgrade_command()
        pids.append(server.pid)
        assert done.stdout.strip() == f"upgraded: pid {pids[-1]} serves now (was pid {pids[-2]})"
        time.sleep(0.5)
        qemu.finish()
        assert finish_nbdsh(nbdsh, stop_file) > 0
        status = json.loads(run(qcownbd_cmd("status", "--control", server.control, "--json"),
                                env=qcownbd_env()).stdout)
        assert status["pid"] == pids[-1]
        assert len(set(pids)) == 5
        log = server.log
        assert log.count("handover: took 2 connection(s) and 2 listening socket(s)") == 4, log
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    verify(image, qemu.written)


def test_a_successor_that_cannot_take_over_leaves_the_old_server_serving(tmp_path):
    image = make_qcow(tmp_path)
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
        # the old server holds its image's lock again (QEMU's: a writer is there)
        locked = run(["qemu-io", "-f", "qcow", "-r", "-c", "read 0 512", image], check=False)
        assert 'Failed to get shared "write" lock' in locked.stderr, locked
        time.sleep(0.5)
        second = server.upgrade_by_signal()
        time.sleep(0.3)
        qemu.finish()
        assert second != first
        assert server.stop() == 0
    log = server.stderr
    assert log.count("upgrade failed, still serving") == 2, log
    assert "Traceback" not in log, log
    verify(image, qemu.written)


def test_tls_clients_are_closed_cleanly_and_qemu_reconnects_over_tls(tmp_path, pki):
    """A TLS session cannot change process: its requests are answered, then it is closed;
    QEMU (reconnect-delay) connects to the successor over TLS again, without an error,
    while the plain client on the same server is handed over."""
    image = make_qcow(tmp_path)
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, *tls_args(pki, "on"), f"d={image}") as server:
        opts = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.good}",
                "--image-opts", f"driver=nbd,server.type=inet,server.host=127.0.0.1,"
                f"server.port={server.port},export=d,tls-creds=tls0,reconnect-delay=20"]
        qemu = QemuIoSession("", first_block=0, opts=opts)
        plain = nbdsh_loop(server.uri("d"), 128 * BLOCK, stop_file)
        assert wait_for(lambda: server.log.count("attached export=d") == 2, 30), server.log
        server.upgrade_by_signal()
        # QEMU attached again, to the successor
        assert wait_for(lambda: server.log.count("tls=yes") == 2, 30), server.log
        server.upgrade_by_signal()
        time.sleep(1.0)
        qemu.finish()
        assert finish_nbdsh(plain, stop_file) > 0
        assert server.stop() == 0
    log = server.stderr
    assert log.count("a TLS session cannot be handed over") == 2, log
    assert log.count("handover: took 1 connection(s)") == 2, log
    assert log.count("tls=yes") == 3, log
    assert "Traceback" not in log
    verify(image, qemu.written)


def test_a_reload_that_changes_the_listen_addresses_hands_over(tmp_path):
    """SIGHUP with new listen addresses: a successor listens there, keeps the old
    sockets still wanted, and the client of a dropped address goes on."""
    image = make_qcow(tmp_path)
    first_port, second_port = free_port(), free_port()
    config = tmp_path / "q.toml"
    exports = f'[exports.d]\npath = "{image}"\n'
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{first_port}"]\n{exports}')
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(qcownbd_cmd("serve", "--config", config, "--pid-file", pid_file),
                            stderr=subprocess.PIPE, text=True, env=qcownbd_env())
    proc.stderr = DrainedPipe(proc.stderr)
    try:
        wait_listening(first_port, proc)
        qemu = QemuIoSession(f"nbd://127.0.0.1:{first_port}/d", first_block=0)
        time.sleep(0.5)
        config.write_text(f'[server]\nlisten = ["127.0.0.1:{first_port}", '
                          f'"127.0.0.1:{second_port}"]\n{exports}')
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0
        assert wait_for(lambda: _listens(second_port), 30), "".join(proc.stderr.lines)
        run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k",
             f"nbd://127.0.0.1:{second_port}/d"], timeout=30)
        second = int(pid_file.read_text())
        config.write_text(f'[server]\nlisten = ["127.0.0.1:{second_port}"]\n{exports}')
        os.kill(second, signal.SIGHUP)
        assert wait_for(lambda: not _alive(second) and not _listens(first_port), 30)
        assert _listens(second_port)
        time.sleep(0.5)
        qemu.finish()
        third = int(pid_file.read_text())
        os.kill(third, signal.SIGTERM)
        assert wait_for(lambda: not _alive(third), 30)
    finally:
        for pid in {proc.pid, int(pid_file.read_text())} if pid_file.exists() else {proc.pid}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    log = proc.stderr.read()
    assert log.count("handover: took 1 connection(s) and 1 listening socket(s)") == 2, log
    assert f"no longer listening on ('127.0.0.1', {first_port})" in log, log
    assert "Traceback" not in log
    verify(image, qemu.written)


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def test_fleet_clients_keep_their_own_overlays_through_upgrades(tmp_path):
    """Two clients of a fleet, each on its own overlay, write through three handovers:
    the successor opens those very overlays before it resumes them.  One whose fleet
    keeps its overlays elsewhere cannot take them: the old server serves on, holding
    the overlays' locks again."""
    config, golden = make_fleet(tmp_path)
    golden_sum = hashlib.sha256(golden.read_bytes()).hexdigest()
    overlays = tmp_path / "overlays"
    good = config.read_text()
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, "--config", config) as server:
        qemu = QemuIoSession(server.uri("fleet/a"), first_block=0)
        nbdsh = nbdsh_loop(server.uri("fleet/b"), NBDSH_BASE, stop_file)
        assert wait_for(lambda: server.log.count("attached export=fleet/") == 2, 30), server.log
        assert fleet_list(config) == {"fleet/a": True, "fleet/b": True}
        for _ in range(3):
            server.upgrade_by_signal()
            time.sleep(0.5)
            assert fleet_list(config) == {"fleet/a": True, "fleet/b": True}
        first = server.pid
        config.write_text(good.replace(str(overlays), str(tmp_path / "elsewhere")))
        failed = server.upgrade_command(check=False)
        config.write_text(good)
        assert failed.returncode == 1, failed
        line = failed.stderr.strip()
        assert line.startswith(f"qcownbd: error: upgrade failed, still serving as pid {first}: "
                               ) and "\n" not in line, line
        assert f"overlay fleet/a: its file {overlays / 'a.qcow'} is not this fleet's" in line
        assert server.pid == first
        for ident in "ab":
            locked = run(["qemu-io", "-f", "qcow", "-r", "-c", "read 0 512",
                          overlays / f"{ident}.qcow"], check=False)
            assert 'Failed to get shared "write" lock' in locked.stderr, locked
        time.sleep(0.5)
        qemu.finish()
        ops = finish_nbdsh(nbdsh, stop_file)
        assert ops > 0
        assert server.stop() == 0
    log = server.stderr
    assert log.count("handover: took 2 connection(s) and 2 listening socket(s)") == 3, log
    assert log.count("reopened overlay") == 6, log
    assert "not handed over" not in log and "Traceback" not in log, log
    assert fleet_list(config) == {"fleet/a": False, "fleet/b": False}
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == golden_sum
    verify_isolated(overlays / "a.qcow", qemu.written, nbdsh_written(ops))
    verify_isolated(overlays / "b.qcow", nbdsh_written(ops), qemu.written)


def test_a_failed_upgrade_leaves_the_ephemeral_overlays_to_the_old_server(tmp_path):
    """The successor opened one overlay and cannot open the other (its file was
    removed): it gives up without deleting the ephemeral overlay it had opened, which
    the old server still serves."""
    config, _golden = make_fleet(tmp_path, overlays="ephemeral")
    ephemeral = tmp_path / "overlays" / "ephemeral"
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, "--config", config) as server:
        qemu = QemuIoSession(server.uri("fleet/a"), first_block=0)
        nbdsh = nbdsh_loop(server.uri("fleet/b"), NBDSH_BASE, stop_file)
        assert wait_for(lambda: server.log.count("attached export=fleet/") == 2, 30), server.log
        first = server.pid
        (ephemeral / "b.qcow").unlink()     # the old server writes on, to the open file
        failed = server.upgrade_command(check=False)
        assert failed.returncode == 1 and "overlay fleet/b: its file" in failed.stderr, failed
        assert server.pid == first
        assert fleet_list(config) == {"fleet/a": True}
        time.sleep(0.5)
        qemu.finish()
        assert finish_nbdsh(nbdsh, stop_file) > 0
        assert wait_for(lambda: not (ephemeral / "a.qcow").exists(), 30)
        assert server.stop() == 0
    assert "reopened overlay" in server.stderr and "Traceback" not in server.stderr
