"""`qcownbd snapshot` and `qcownbd status` against a running server, with real clients.

The snapshot test runs fio (`--verify=crc32c`) through the export while the
snapshot is taken: fio must see no error, the snapshot must hold exactly the
disk as it was at one instant (every block fio's random pass had written by
then, none it wrote later, give or take the requests in flight), and the
chain must read what fio left.  QEMU reads every file directly afterwards.
"""

import hashlib
import json
import os
import socket
import stat
import subprocess

import pytest

from helpers import (LoggedServer, qcownbd_check, qcownbd_cmd, qcownbd_env, qemu_compare,
                     qemu_io, qemu_raw, run, wait_for)

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4096
DEPTH = 4


def control(tmp_path, *args, check=True) -> subprocess.CompletedProcess:
    """`qcownbd ARGS --control tmp_path/ctl`."""
    command, *rest = args
    return run(qcownbd_cmd(command, "--control", str(tmp_path / "ctl"), *rest),
               env=qcownbd_env(), check=check, timeout=60)


def status(tmp_path) -> dict:
    return json.loads(control(tmp_path, "status", "--json").stdout)


def fio(uri: str, *args: str) -> list[str]:
    return ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--bs={BLOCK}",
            f"--size={SIZE}", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--output-format=json", *args]


def fio_result(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])["jobs"][0]


def iolog_writes(path) -> list[int]:
    """The offsets fio wrote, in the order it issued them (iolog version 3 lines:
    "TIME FILE write OFFSET LENGTH")."""
    writes = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 5 and parts[2] == "write":
            writes.append(int(parts[3]))
    assert len(writes) == SIZE // BLOCK, "fio's write log"
    return writes


@pytest.mark.timeout(180)
def test_snapshot_while_fio_writes_and_verifies(tmp_path):
    image = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", image, str(SIZE)])
    with LoggedServer(f"d={image}", "--control", tmp_path / "ctl", cwd=tmp_path) as server:
        uri = server.uri("d")
        # the disk before: every block written once by fio, then read back whole
        first = run(fio(uri, "--rw=write", "--randseed=1"), cwd=tmp_path, timeout=60)
        assert fio_result(first.stdout)["error"] == 0
        before = qemu_raw(uri, tmp_path / "before.raw", fmt="raw")
        # a random pass over every block (fio's random map: each block once), paced so
        # that the snapshot falls in the middle of it (8 s, for a loaded machine)
        writer = subprocess.Popen(
            fio(uri, "--rw=randwrite", "--randseed=2", f"--iodepth={DEPTH}",
                "--rate_iops=500", f"--write_iolog={tmp_path / 'iolog'}"),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: any(c["bytes_written"] > 512 * 1024
                                        for c in status(tmp_path)["clients"]), 30)
            taken = json.loads(control(tmp_path, "snapshot", "--json", "d").stdout)
            out, err = writer.communicate(timeout=120)
        finally:
            writer.kill()
        job = fio_result(out)
        assert writer.returncode == 0 and job["error"] == 0, err
        assert job["write"]["io_bytes"] == SIZE and job["read"]["io_bytes"] == SIZE, \
            "fio wrote every block and verified all of them through the new chain"
        snapshot = taken["snapshot"]
        assert os.path.dirname(snapshot) == str(tmp_path) and taken["image"] == str(image)
        assert taken["paused_seconds"] < 5
        frozen = hashlib.sha256(open(snapshot, "rb").read()).hexdigest()
        end = qemu_raw(uri, tmp_path / "end.raw", fmt="raw")
        assert "Traceback" not in server.log
    # the chain reads what fio left; the snapshot never changed after it was taken
    assert qemu_compare(image, tmp_path / "end.raw").returncode == 0
    assert hashlib.sha256(open(snapshot, "rb").read()).hexdigest() == frozen
    info = json.loads(run(["qemu-img", "info", "--output=json", image]).stdout)
    assert info["backing-filename"] == os.path.basename(snapshot)
    qcownbd_check(snapshot)
    qcownbd_check(image)
    # the snapshot is the disk at one instant of the random pass
    snap = qemu_raw(snapshot, tmp_path / "snap.raw")
    written = []
    for index, offset in enumerate(iolog_writes(tmp_path / "iolog")):
        block = slice(offset, offset + BLOCK)
        assert before[block] != end[block]
        if snap[block] == end[block]:
            written.append(index)
        else:
            assert snap[block] == before[block], f"block at {offset}: neither before nor after"
    assert 0 < len(written) < SIZE // BLOCK, "the snapshot was not taken during the pass"
    first_missing = next(i for i in range(SIZE // BLOCK) if i not in set(written))
    assert max(written) < first_missing + DEPTH, \
        "writes issued after the snapshot are in it (or earlier ones are missing)"


@pytest.mark.timeout(120)
def test_status_shows_exports_clients_bytes_and_errors(tmp_path):
    image = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", image, "8M"])
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\ncontrol_socket = "ctl"\n'
                      f'[exports.d]\npath = "{image}"\n'
                      f'[exports.base]\npath = "base.raw"\nread_only = true\nformat = "raw"\n'
                      f'[exports.gone]\npath = "missing.qcow"\n')
    with LoggedServer("--config", config, cwd=tmp_path) as server:
        assert stat.S_IMODE(os.stat(tmp_path / "ctl").st_mode) == 0o600
        qemu_io(server.uri("d"), "write -P 0x33 0 1M", "read -P 0x33 0 1M", fmt="raw")
        # a client reading past the end (libnbd's own bounds check off): an error reply
        run(["/usr/bin/python3", "-m", "nbd", "-u", server.uri("d"), "-c",
             "h.set_strict_mode(0)\ntry:\n    h.pread(4096, 8 << 20)\n"
             "except nbd.Error:\n    pass"])
        holder = subprocess.Popen(
            ["/usr/bin/python3", "-m", "nbd", "-u", server.uri("base"), "-c",
             "h.pread(4096, 0); import time; time.sleep(30)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda: status(tmp_path)["clients"], 15)
            text = control(tmp_path, "status").stdout
            data = status(tmp_path)
        finally:
            holder.kill()
            holder.wait()
    exports = {e["name"]: e for e in data["exports"]}
    assert exports["d"]["image"] == str(image) and exports["d"]["format"] == "qcow1"
    assert exports["base"]["read_only"] and exports["base"]["clients"] == 1
    assert data["unavailable"][0]["name"] == "gone"
    [client] = data["clients"]
    assert client["export"] == "base" and client["bytes_read"] == 4096
    assert data["ended"]["clients"] >= 2 and data["ended"]["bytes_written"] == MiB
    assert data["ended"]["bytes_read"] >= MiB and data["ended"]["errors"] >= 1
    assert data["pid"] == server.proc.pid and data["listening"] == [f"127.0.0.1:{server.port}"]
    for words in (["EXPORT", "IMAGE", "CLIENTS"], ["d", str(image), "qcow1", "8 MiB", "rw"],
                  ["base", "ro", "1"], ["unavailable: gone"], ["CLIENT", "READ", "WRITTEN"],
                  ["ended:", "1 MiB written"]):
        assert any(all(word in line for word in words) for line in text.splitlines()), \
            (words, text)
    # the socket is gone with the server, and asking says so in one line
    gone = control(tmp_path, "status", check=False)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1
    assert "no control socket" in gone.stderr


@pytest.mark.timeout(120)
def test_snapshot_refusals_change_nothing_and_serving_goes_on(tmp_path):
    image = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", image, "4M"])
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(MiB))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\ncontrol_socket = "ctl"\n'
                      f'[exports.d]\npath = "{image}"\n'
                      f'[exports.ro]\npath = "ro.qcow"\nread_only = true\n'
                      f'[exports.raw]\npath = "{raw}"\nformat = "raw"\n'
                      f'[exports.fenced]\npath = "fenced.qcow"\n'
                      f'backing_dirs = ["{elsewhere}"]\n')
    for name in ("fenced.qcow", "ro.qcow"):
        run(["qemu-img", "create", "-q", "-f", "qcow", tmp_path / name, "4M"])
    (tmp_path / "taken.qcow").write_bytes(b"")
    with LoggedServer("--config", config, cwd=tmp_path) as server:
        qemu_io(server.uri("fenced"), "write -P 0x44 0 64k", fmt="raw")
        cases = {("nope",): "no export named 'nope'",
                 ("ro",): "read-only",
                 ("raw",): "whole QCOW1 image",
                 ("--name", "taken.qcow", "d"): "already exists",
                 ("--name", "../x.qcow", "d"): "plain file name",
                 ("fenced",): "the snapshot was undone"}
        files = sorted(os.listdir(tmp_path))
        for args, message in cases.items():
            result = control(tmp_path, "snapshot", *args, check=False)
            assert result.returncode == 1, (args, result.stdout)
            assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert sorted(os.listdir(tmp_path)) == files, "a refused snapshot leaves no file"
        # the export whose overlay could not open serves on, from its own image
        qemu_io(server.uri("fenced"), "read -P 0x44 0 64k", "write -P 0x45 64k 64k",
                fmt="raw")
        # a malformed request gets an error answer; the server goes on
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(tmp_path / "ctl"))
            sock.sendall(b"not json\n{\"command\": \"reboot\"}\n")
            sock.shutdown(socket.SHUT_WR)
            answers = sock.makefile().read().splitlines()
        assert [json.loads(a)["ok"] for a in answers] == [False, False]
        assert "unknown command 'reboot'" in answers[1]
        assert status(tmp_path)["exports"]
        assert "Traceback" not in server.log
    info = json.loads(run(["qemu-img", "info", "--output=json", tmp_path / "fenced.qcow"]).stdout)
    assert "backing-filename" not in info
    qemu_io(tmp_path / "fenced.qcow", "read -P 0x44 0 64k", "read -P 0x45 64k 64k",
            read_only=True)


@pytest.mark.timeout(120)
def test_control_socket_is_owner_only_and_one_server_per_path(tmp_path):
    image = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", image, "1M"])
    # a socket file left by a server that died is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "ctl"))
    stale.close()
    with LoggedServer(f"d={image}", "--control", tmp_path / "ctl", "--read-only"):
        assert stat.S_IMODE(os.stat(tmp_path / "ctl").st_mode) == 0o600
        assert status(tmp_path)["exports"][0]["name"] == "d"
        second = run(qcownbd_cmd("serve", "--unix", str(tmp_path / "nbd.sock"), "--read-only",
                                 "--control", str(tmp_path / "ctl"), f"d={image}"),
                     env=qcownbd_env(), check=False, timeout=30)
        last = second.stderr.splitlines()[-1]
        assert second.returncode == 1 and last.endswith("another server is listening there")
        assert "Traceback" not in second.stderr
        assert status(tmp_path)["exports"][0]["name"] == "d", "the first server still answers"
        assert not (tmp_path / "nbd.sock").exists()
    assert not (tmp_path / "ctl").exists()
    # without --control (or control_socket) there is no control socket at all
    with LoggedServer(f"d={image}", "--read-only", cwd=tmp_path) as server:
        assert not [p for p in os.listdir(tmp_path) if p != "disk.qcow"]
        assert "control socket" not in server.log
