"""One metadata cache budget for the whole server (`qcownbd.image.metadata_cache`).

Real clients: 64 libnbd handles (Debian's python3) each on its own fleet
overlay, qemu-io, and `qcownbd status` on the control socket; QEMU
(qemu-img compare) is the oracle for what was written while tables were
evicted from under the writers.
"""

import json
import random
import subprocess
import threading

import pytest

from helpers import LoggedServer, qcownbd_check, qcownbd_cmd, qemu_compare, qemu_io, run
from qcownbd.control import ask

MiB = 1024 * 1024
#: a fleet overlay's L2 table: 4096 entries of 512-byte clusters, 2 MiB of disk, 32 KiB
OVERLAY_TABLE_SPAN, OVERLAY_TABLE_BYTES = 2 * MiB, 32 * 1024
CLIENTS = 64
TABLES_PER_CLIENT = 32

# libnbd: CLIENTS handles, each on overlay fleet/cN, all connected at once; each writes
# a 4 KiB block into TABLES_PER_CLIENT different L2 tables of its overlay, then reads
# them back and some golden blocks; then "ready", and the handles stay open until
# stdin closes (the test samples the server meanwhile).
SCRIPT = """
import nbd, sys
uri, clients, tables, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
regions = span // (2 << 20)
handles = []
for i in range(clients):
    h = nbd.NBD()
    h.connect_uri(f"{uri}/c{i}")
    handles.append(h)
def blocks(i):
    return [((i * 7 + k * (regions // tables)) % regions) * (2 << 20) + 4096 * (i % 64)
            for k in range(tables)]
for i, h in enumerate(handles):
    for offset in blocks(i):
        h.pwrite(bytes([i + 1]) * 4096, offset)
for i, h in enumerate(handles):
    for offset in blocks(i):
        assert h.pread(4096, offset) == bytes([i + 1]) * 4096, (i, offset)
    # a golden block, never one this client wrote
    assert h.pread(4096, (i % 16) * (64 << 20) + 4096 * ((i + 1) % 16)) == b"Z" * 4096
print("ready", flush=True)
sys.stdin.read()
for h in handles:
    h.shutdown()
"""


def status(ctl) -> dict:
    return json.loads(run(qcownbd_cmd("status", "--control", str(ctl), "--json"),
                          timeout=30).stdout)


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


@pytest.mark.timeout(300)
def test_budget_holds_with_64_overlays_open(tmp_path):
    """64 clients, each on its own overlay, touch 2048 overlay tables (64 MiB of them):
    the cache's bytes stay within its 1 MiB budget, and so does the server's memory."""
    budget = MiB
    golden = tmp_path / "golden.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", golden, "1G"])
    qemu_io(golden, *[f"write -P 0x5a {n * 64}M 64k" for n in range(16)])
    config = tmp_path / "fleet.toml"
    config.write_text(f'[server]\ncontrol_socket = "ctl"\nmetadata_cache = "1M"\n'
                      f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "qcow1"\n'
                      f'overlay_dir = "overlays"\noverlays = "ephemeral"\n')
    ctl = tmp_path / "ctl"
    with LoggedServer("--config", config, cwd=tmp_path) as server:
        idle = server.rss_bytes()
        clients = subprocess.Popen(
            ["/usr/bin/python3", "-c", SCRIPT, server.uri("fleet"), str(CLIENTS),
             str(TABLES_PER_CLIENT), str(1024 * MiB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples, done = [], threading.Event()

        def sample() -> None:
            while not done.is_set():    # the control socket's client, in-process: quick
                samples.append(ask(str(ctl), {"command": "status"})["metadata_cache"])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            ready = clients.stdout.readline().strip()
            done.set()
            sampler.join(60)
            assert ready == "ready", clients.stderr.read()
            during = status(ctl)
            text = run(qcownbd_cmd("status", "--control", str(ctl)), timeout=30).stdout
            peak = vm_hwm(server.proc.pid)
        finally:
            done.set()
            out, err = clients.communicate("", timeout=120)
        assert clients.returncode == 0, err
    cache = during["metadata_cache"]
    assert len(during["clients"]) == CLIENTS
    assert len(samples) >= 10
    assert max(sample["used"] for sample in samples + [cache]) <= budget
    assert cache["budget"] == budget and cache["images"] >= CLIENTS + 1
    # the clients' tables were far more than the budget: it was used, and evicted from
    assert cache["used"] > budget // 2 and cache["evictions"] > CLIENTS * TABLES_PER_CLIENT // 2
    assert cache["misses"] >= CLIENTS * TABLES_PER_CLIENT
    # memory: the idle server, the budget, and a quarter MiB per client (without the
    # budget the tables alone would add 64 MiB); well inside the target of
    # 64 MiB + 1 MiB per client
    assert peak <= idle + budget + CLIENTS * MiB // 4, (peak, idle)
    assert peak <= 64 * MiB + CLIENTS * MiB, peak
    line = next(line for line in text.splitlines() if line.startswith("metadata cache:"))
    assert " of 1 MiB (" in line and f"L2 tables of {cache['images']} images" in line, line
    assert "Traceback" not in server.stderr


def _writes(seed: int, size: int, count: int) -> list[str]:
    """qemu-io commands: runs of back-to-back data and zero writes scattered over every
    L2 table of ``size`` bytes, some across a table's end, most ending inside a cluster
    (the next write's first cluster must then hold both), each read back at once."""
    rnd = random.Random(seed)
    commands = []
    for n in range(count):
        if n % 3 == 0:
            offset = rnd.randrange(0, size - MiB)
        length = rnd.choice([512, 4096, 65536, 300 * 1024]) + rnd.randrange(512)
        pattern = n % 250 + 1 if n % 5 else 0
        commands.append(f"write {'-z' if pattern == 0 else f'-P {pattern}'} {offset} {length}")
        commands.append(f"read -P {pattern} {offset} {length}")
        offset += length
    return commands


@pytest.mark.timeout(300)
def test_tiny_budget_keeps_every_write(tmp_path):
    """A budget of a few tables, shared by a QCOW1 export and two fleet overlays written
    at once: every table is evicted again and again (dirty ones too), and what the
    clients wrote is what QEMU reads, through the server and from the files after."""
    size = 64 * MiB
    plain = tmp_path / "plain.qcow"
    golden = tmp_path / "golden.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", plain, str(size)])
    run(["qemu-img", "create", "-q", "-f", "qcow", golden, str(size)])
    qemu_io(golden, *[f"write -P 0x5a {n * 4}M 1M" for n in range(16)])
    config = tmp_path / "serve.toml"
    config.write_text(f'[exports.d]\npath = "{plain}"\n'
                      f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "qcow1"\n'
                      f'overlay_dir = "overlays"\n')
    jobs = {"d": _writes(1, size, 150), "fleet/a": _writes(2, size, 150),
            "fleet/b": _writes(3, size, 150)}
    refs = {}
    for name, commands in jobs.items():
        refs[name] = tmp_path / f"{name.replace('/', '-')}.raw"
        run(["qemu-img", "convert", "-O", "raw", "-f", "qcow",
             plain if name == "d" else golden, refs[name]])
        qemu_io(refs[name], *[c for c in commands if c.startswith("write")], fmt="raw")
    # 64 KiB: sixteen 4 KiB tables of the plain image and golden, or two 32 KiB overlay
    # tables: a new table may find only dirty ones ahead of it, and leave before its
    # pending entries do
    with LoggedServer("--config", config, "--metadata-cache", "64K", cwd=tmp_path) as server:
        writers = [subprocess.Popen(
            ["qemu-io", "-f", "raw", *[arg for c in commands for arg in ("-c", c)],
             server.uri(name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, commands in jobs.items()]
        for writer in writers:
            out, err = writer.communicate(timeout=240)
            # qemu-io says "Pattern verification failed" and goes on: its output tells
            assert writer.returncode == 0 and not err and "failed" not in out, out[-2000:]
        for name, ref in refs.items():
            result = qemu_compare(server.uri(name), ref, fmt="raw")
            assert result.returncode == 0, (name, result.stdout + result.stderr)
    assert "Traceback" not in server.stderr
    for name, image in [("d", plain), ("fleet/a", tmp_path / "overlays" / "a.qcow"),
                        ("fleet/b", tmp_path / "overlays" / "b.qcow")]:
        result = qemu_compare(image, refs[name])
        assert result.returncode == 0, (name, result.stdout + result.stderr)
        qcownbd_check(image)
