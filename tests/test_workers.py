"""Worker processes (serve --workers N): every core serves, as one service.

Real clients (libnbd's nbdsh, qemu-io, nbdinfo) against a server with two
workers: the connections of one export meet one image (a reader on a second
connection sees what the first flushed), a worker killed with SIGKILL is
replaced and its export served again, a reload reaches the workers, an
upgrade takes the workers' connections along (a fleet's ephemeral overlays
too, reopened in the successor's workers), a fleet's overlays spread over the
workers, each client's writes in its own overlay only, and each worker has its
part of the metadata cache's budget.
"""

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from handover_clients import (BLOCK, NBDSH_BASE, QemuIoSession, finish_nbdsh, fleet_list,
                              make_fleet, make_qcow, nbdsh_loop, verify)
from helpers import (LoggedServer, children, free_port, qcownbd_cmd, qcownbd_env, qemu_io,
                     run, wait_for)
from test_upgrade import HandingServer, _alive

pytestmark = pytest.mark.timeout(180)


def status(control) -> dict:
    return json.loads(run(qcownbd_cmd("status", "--control", control, "--json"),
                          env=qcownbd_env()).stdout)


def worker_of(control, export: str) -> dict:
    """The worker that has ``export`` open (status --json); {} while none has (one is
    being replaced)."""
    owners = [w for w in status(control)["workers"] if export in w["exports"]]
    assert len(owners) <= 1, owners
    return owners[0] if owners else {}


TWO_CONNECTIONS = textwrap.dedent("""
    import nbd, sys
    uri = sys.argv[1]
    writer, reader = nbd.NBD(), nbd.NBD()
    writer.connect_uri(uri)
    reader.connect_uri(uri)
    assert writer.can_multi_conn() and reader.can_multi_conn()
    for step in range(20):
        data = bytes([step + 1]) * 65536
        writer.pwrite(data, step * 65536)
        writer.flush()
        assert reader.pread(65536, step * 65536) == data, step
    print("consistent", flush=True)
    sys.stdin.readline()        # both stay connected while the test looks at the status
    writer.shutdown()
    reader.shutdown()
""")


def test_connections_of_one_export_meet_one_image(tmp_path):
    images = [make_qcow(tmp_path, f"{name}.qcow") for name in "abcd"]
    control = tmp_path / "control"
    with LoggedServer("--workers", "2", "--control", control,
                      *(f"{name}={image}" for name, image in zip("abcd", images))) as server:
        assert len(status(control)["workers"]) == 2
        for name in "abcd":
            proc = subprocess.Popen(["/usr/bin/python3", "-c", TWO_CONNECTIONS,
                                     server.uri(name)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                assert proc.stdout.readline().strip() == "consistent", proc.stdout.read()
                owner = worker_of(control, name)
                assert owner["connections"] == 2, status(control)["workers"]
            finally:
                out, _ = proc.communicate("\n", timeout=60)
            assert proc.returncode == 0, out
        # both workers serve (the four exports spread over them)
        assert all(w["exports"] for w in status(control)["workers"])
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    for step in range(20):
        qemu_io(images[0], f"read -P {step + 1} {step * 65536} 65536", read_only=True)


def test_a_worker_killed_is_replaced_and_clients_reconnect(tmp_path):
    image = make_qcow(tmp_path)
    control = tmp_path / "control"
    with LoggedServer("--workers", "2", "--control", control, f"d={image}") as server:
        uri = server.uri("d")
        qemu_io(uri, "write -P 5 0 64k", fmt="raw")
        held = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: worker_of(control, "d").get("connections") == 1)
        victim = worker_of(control, "d")
        os.kill(victim["pid"], signal.SIGKILL)
        # its client's connection died with it
        out, _ = held.communicate("read -P 5 0 64k\nquit\n", timeout=60)
        assert "read 65536/65536" not in out, out
        assert wait_for(lambda: worker_of(control, "d").get("pid", victim["pid"])
                        != victim["pid"], 30)
        replacement = worker_of(control, "d")
        assert replacement["index"] == victim["index"]
        assert set(children(server.proc.pid)) == {w["pid"] for w in status(control)["workers"]}
        # the replacement opened the image again: a new client reads and writes it
        qemu_io(uri, "read -P 5 0 64k", "write -P 6 64k 64k", "read -P 6 64k 64k", fmt="raw")
        assert "worker %d (pid %d) died" % (victim["index"], victim["pid"]) in server.log
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    qemu_io(image, "read -P 5 0 64k", "read -P 6 64k 64k", read_only=True)


def test_a_stop_that_signals_every_process_is_a_clean_stop(tmp_path):
    """systemctl stop signals the unit's every process at once: the workers leave it to
    the parent, which stops them (no worker 'died', none replaced)."""
    image = make_qcow(tmp_path)
    control = tmp_path / "control"
    with LoggedServer("--workers", "2", "--control", control, f"d={image}") as server:
        qemu_io(server.uri("d"), "write -P 5 0 64k", fmt="raw")
        pids = [w["pid"] for w in status(control)["workers"]]
        for pid in pids:        # the workers first: the parent hears of them first
            os.kill(pid, signal.SIGTERM)
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.stop() == 0
    assert "ERROR" not in server.stderr and "replaces" not in server.stderr, server.stderr
    qemu_io(image, "read -P 5 0 64k", read_only=True)


def write_exports(config, port, control, exports: dict) -> None:
    lines = ["[server]", f'listen = ["127.0.0.1:{port}"]', f'control_socket = "{control}"',
             "workers = 2", ""]
    for name, (path, description) in exports.items():
        lines += [f"[exports.{name}]", f'path = "{path}"', f'description = "{description}"', ""]
    config.write_text("\n".join(lines))


def test_a_reload_reaches_every_worker(tmp_path):
    one, two, three, four = (make_qcow(tmp_path, f"{n}.qcow")
                             for n in ("one", "two", "three", "four"))
    for number, image in enumerate((one, two, three, four), 1):
        qemu_io(image, f"write -P {number} 0 64k")
    config, control, port = tmp_path / "qcownbd.toml", tmp_path / "control", free_port()
    write_exports(config, port, control, {"a": (one, "first")})
    with LoggedServer("--config", config, port=port) as server:
        assert len(status(control)["workers"]) == 2
        qemu_io(server.uri("a"), "read -P 1 0 64k", fmt="raw")
        # a changed to another image, b and c added
        write_exports(config, port, control, {"a": (three, "third"), "b": (two, "second"),
                                              "c": (four, "fourth")})
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: {e["name"] for e in status(control)["exports"]}
                        == {"a", "b", "c"}, 30), status(control)
        qemu_io(server.uri("a"), "read -P 3 0 64k", fmt="raw")
        qemu_io(server.uri("b"), "read -P 2 0 64k", fmt="raw")
        qemu_io(server.uri("c"), "read -P 4 0 64k", fmt="raw")
        listing = run(["nbdinfo", "--list", server.uri("")]).stdout
        assert "third" in listing and "second" in listing and "fourth" in listing
        assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_systemctl_kill_usr2_reaches_every_process_and_one_upgrade_happens(tmp_path):
    """`systemctl kill -s USR2` signals every process of the unit, the successor the
    old server starts a moment later too: it must not die of it (nor the workers),
    and the one upgrade asked for happens."""
    image = make_qcow(tmp_path)
    with HandingServer(tmp_path, "--workers", "2", f"d={image}") as server:
        qemu_io(server.uri("d"), "write -P 7 0 64k", fmt="raw")
        old, workers = server.pid, set(children(server.pid))
        os.kill(old, signal.SIGUSR2)
        for pid in workers:
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        successor = None
        while successor is None and time.monotonic() < deadline:
            successor = next(iter(set(children(old)) - workers), None)
        assert successor is not None
        os.kill(successor, signal.SIGUSR2)   # at once: before Python set any handler
        assert wait_for(lambda: server.pid == successor and not _alive(old), 60), \
            server.log[-3000:]
        assert server.handovers() == 1 and "upgrade failed" not in server.log, server.log
        qemu_io(server.uri("d"), "read -P 7 0 64k", fmt="raw")
        assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_an_upgrade_takes_the_workers_connections_along(tmp_path):
    images = {name: make_qcow(tmp_path, f"{name}.qcow") for name in ("d", "e")}
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, "--workers", "2",
                       *(f"{name}={image}" for name, image in images.items())) as server:
        qemu = QemuIoSession(server.uri("d"), first_block=0)
        nbdsh = nbdsh_loop(server.uri("e"), 128 * BLOCK, stop_file)
        time.sleep(1.0)
        old_workers = set(children(server.pid))
        assert len(old_workers) == 2
        for _ in range(2):
            server.upgrade_by_signal()
            time.sleep(0.5)
        server.upgrade_command()
        time.sleep(0.5)
        assert not any(_alive(pid) for pid in old_workers)
        qemu.finish()
        assert finish_nbdsh(nbdsh, stop_file) > 0
        assert len(status(server.control)["workers"]) == 2
        assert server.log.count("handover: took 2 connection(s) and 2 listening socket(s)") \
            == 3, server.log
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    verify(images["d"], qemu.written)


def overlays_on_workers(control) -> list[list[str]]:
    """The fleet overlays each worker has open."""
    return [sorted(e for e in w["exports"] if e.startswith("fleet/"))
            for w in status(control)["workers"]]


def test_an_upgrade_takes_fleet_clients_along_to_their_workers(tmp_path):
    """Two clients of a fleet with ephemeral overlays, one on each worker, write through
    three upgrades: each old worker hands its client back with the overlay's file, and
    the successor's worker that gets the overlay reopens it (no worker of the successor
    takes it for a stale leftover).  The metadata cache's budget is split between the
    workers, and the status sums it."""
    config, _golden = make_fleet(tmp_path, overlays="ephemeral")
    config.write_text('[server]\nworkers = 2\nmetadata_cache = "8M"\n' + config.read_text())
    stop_file = tmp_path / "stop"
    with HandingServer(tmp_path, "--config", config) as server:
        qemu = QemuIoSession(server.uri("fleet/a"), first_block=0)
        nbdsh = nbdsh_loop(server.uri("fleet/b"), NBDSH_BASE, stop_file)
        assert wait_for(lambda: sorted(overlays_on_workers(server.control))
                        == [["fleet/a"], ["fleet/b"]], 30), status(server.control)
        cache = status(server.control)
        assert [w["metadata_cache"]["budget"] for w in cache["workers"]] == [4 << 20] * 2
        assert cache["metadata_cache"]["budget"] == 8 << 20
        assert cache["metadata_cache"]["images"] == sum(
            w["metadata_cache"]["images"] for w in cache["workers"]) > 0
        for upgrade in (server.upgrade_by_signal, server.upgrade_by_signal,
                        server.upgrade_command):
            upgrade()
            time.sleep(0.5)
            assert fleet_list(config) == {"fleet/a": True, "fleet/b": True}
            assert sorted(overlays_on_workers(server.control)) == [["fleet/a"], ["fleet/b"]]
        qemu.finish()
        assert finish_nbdsh(nbdsh, stop_file) > 0
        assert server.stop() == 0
    log = server.stderr
    assert log.count("handover: took 2 connection(s) and 2 listening socket(s)") == 3, log
    assert log.count("reopened overlay") == 6, log
    assert "not resumed" not in log and "Traceback" not in log, log
    assert fleet_list(config) == {}     # ephemeral: gone with their clients


FLEET_CLIENT = textwrap.dedent("""
    import nbd, sys
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    pattern = bytes([int(sys.argv[2])]) * 65536
    h.pwrite(pattern, 0)
    h.flush()
    assert h.pread(65536, 0) == pattern
    print("written", flush=True)
    sys.stdin.readline()
    h.shutdown()
""")


def test_fleet_clients_spread_over_the_workers(tmp_path):
    golden = tmp_path / "golden.qcow"
    run(qcownbd_cmd("create", golden, "16M"), env=qcownbd_env())
    qemu_io(golden, "write -P 9 0 128k")
    config, control, port = tmp_path / "qcownbd.toml", tmp_path / "control", free_port()
    config.write_text(textwrap.dedent(f"""
        [server]
        listen = ["127.0.0.1:{port}"]
        control_socket = "{control}"
        workers = 2

        [exports.lab]
        golden = "{golden}"
        golden_format = "qcow1"
        overlay_dir = "{tmp_path / 'overlays'}"
    """))
    idents = ["vm1", "vm2", "vm3", "vm4"]
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / ".left.1.tmp").write_bytes(b"half an overlay")
    with LoggedServer("--config", config, port=port) as server:
        # one worker tidies the overlay directory (two at once would each find a
        # leftover locked by the other, and leave it)
        assert not (tmp_path / "overlays" / ".left.1.tmp").exists()
        assert server.log.count("removed stale") == 1, server.log
        assert "worker 0: export lab: removed stale" in server.log, server.log
        clients = []
        try:
            for number, ident in enumerate(idents, 1):
                proc = subprocess.Popen(["/usr/bin/python3", "-c", FLEET_CLIENT,
                                         server.uri(f"lab/{ident}"), str(number)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                clients.append(proc)
                assert proc.stdout.readline().strip() == "written", proc.stdout.read()
            workers = status(control)["workers"]
            overlays = [sorted(e for e in w["exports"] if e.startswith("lab/")) for w in workers]
            # both workers own overlays, each overlay one worker, the golden image all
            assert all(overlays) and sorted(sum(overlays, [])) == [f"lab/{i}" for i in idents]
            assert all("lab" in w["exports"] and w["connections"] == 2 for w in workers)
            # each worker's log lines say which worker wrote them
            for w, names in zip(workers, overlays):
                for name in names:
                    assert f"worker {w['index']}: export lab: created overlay " \
                           f"{tmp_path / 'overlays' / name.split('/')[1]}.qcow" in server.log, \
                           server.log
        finally:
            for proc in clients:
                out, _ = proc.communicate("\n", timeout=60)
                assert proc.returncode == 0, out
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    for number, ident in enumerate(idents, 1):
        overlay = tmp_path / "overlays" / f"{ident}.qcow"
        # its own write, the golden image's data beyond it
        qemu_io(overlay, f"read -P {number} 0 64k", "read -P 9 64k 64k", read_only=True)
