"""Clients that keep writing while the server changes under them (upgrades, restarts):
qemu-io fed commands as it runs, and an nbdsh (libnbd) loop with structured replies
and block status; and the checks of the image afterwards."""

import json
import subprocess
import textwrap
import threading
import time

from helpers import qcownbd_cmd, qcownbd_env, run

SIZE = 16 * 1024 * 1024
BLOCK = 64 * 1024


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


def nbdsh_loop(uri: str, base: int, stop_file) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/python3", "-c", NBDSH_LOOP, uri, str(base),
                             str(stop_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_nbdsh(proc: subprocess.Popen, stop_file) -> int:
    stop_file.write_text("")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    return int(out.split()[-1])


def make_qcow(tmp_path, name="d.qcow"):
    path = tmp_path / name
    run(qcownbd_cmd("create", path, str(SIZE)), env=qcownbd_env())
    return path


def verify(image, written: dict[int, int]) -> None:
    """Every acknowledged write is in the image (QEMU reads QCOW1 itself), and it is
    sound."""
    commands = []
    for offset, pattern in sorted(written.items()):
        commands += ["-c", f"read -P {pattern} {offset} {BLOCK}"]
    out = run(["qemu-io", "-r", "-f", "qcow", *commands, image], timeout=120).stdout
    assert "fail" not in out.lower(), out[-2000:]
    run(qcownbd_cmd("check", image), env=qcownbd_env())


#: a fleet's golden image: data here (pattern GOLDEN_PATTERN), where no client writes
GOLDEN_DATA = (12 * 1024 * 1024, 1024 * 1024)
GOLDEN_PATTERN = 0xAB
#: where the nbdsh loop of a fleet test writes (the qemu-io session: blocks 0-63)
NBDSH_BASE = 128 * BLOCK


def make_fleet(tmp_path, overlays="persistent"):
    """(config file, golden image) of fleet `fleet`: a raw golden image of SIZE bytes
    with GOLDEN_DATA, persistent or ephemeral overlays in tmp_path/overlays."""
    golden = tmp_path / "golden.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", golden, str(SIZE)])
    offset, length = GOLDEN_DATA
    run(["qemu-io", "-f", "raw", "-c", f"write -P {GOLDEN_PATTERN} {offset} {length}", golden])
    config = tmp_path / "fleet.toml"
    config.write_text(f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "raw"\n'
                      f'overlay_dir = "{tmp_path / "overlays"}"\noverlays = "{overlays}"\n')
    return config, golden


def fleet_list(config) -> dict[str, bool]:
    """`qcownbd fleet list`: {overlay: in use}."""
    rows = json.loads(run(qcownbd_cmd("fleet", "list", config, "--json"), timeout=60,
                          env=qcownbd_env()).stdout)
    return {row["overlay"]: row["in-use"] for row in rows}


def nbdsh_written(ops: int) -> dict[int, int]:
    """{offset: pattern} an nbdsh loop at NBDSH_BASE left after ``ops`` operations."""
    return {NBDSH_BASE + (op % 32) * BLOCK: op % 251 + 1 for op in range(max(0, ops - 32), ops)}


def verify_isolated(overlay, written: dict[int, int], other_blocks) -> None:
    """``overlay`` holds its client's writes (`verify`), the golden data, and zeros
    (the golden image's) in ``other_blocks``, where only the other client wrote."""
    offset, length = GOLDEN_DATA
    commands = ["-c", f"read -P {GOLDEN_PATTERN} {offset} {length}"]
    for block in other_blocks:
        commands += ["-c", f"read -P 0 {block} {BLOCK}"]
    out = run(["qemu-io", "-r", "-f", "qcow", *commands, overlay], timeout=120).stdout
    assert "fail" not in out.lower(), out[-2000:]
    verify(overlay, written)
