"""Live upgrades under live clients: the Linux kernel's NBD client in a guest and
QEMU's own client on the host keep working, without one error, while the server
hands itself over to successors (issue 15).

One guest boot per test attaches one QCOW1 export three ways (netlink, ioctl
mode -L, netlink with two connections, -C 2) and runs a verified O_DIRECT
write/fsync/read loop on each device, concurrently (vm.io_loop). qemu-io on
the host, without reconnect-delay (a lost connection fails every request after
it), runs the same loop on its own region. Meanwhile the host upgrades the
server with SIGUSR2, waiting for the guest's loops and qemu-io to make progress
between upgrades. Then the host writes the stop mark, and checks: every round
verified, no NBD error in the guest's kernel log, every slot on the host holding
the pattern of its last acknowledged write, `qcownbd check` clean.
"""

import time

import pytest

from helpers import qcownbd_check, qemu_io, run, wait_for
from upgrade_clients import HandoverServer, QemuIoLoop
from vm import Guest
from vm.io_loop import BLOCK, SLOTS, STOP_BYTE, acknowledged, loop_script, parse_rounds

pytestmark = pytest.mark.vm

MiB = 1 << 20
# (device, nbd-client options, region): one export, three kernel attachments
ATTACHMENTS = [("/dev/nbd0", "", 8 * MiB), ("/dev/nbd1", "-L", 9 * MiB),
               ("/dev/nbd2", "-C 2", 10 * MiB)]
LOOP_NAMES = ["netlink", "ioctl (-L)", "netlink -C 2"]
KERNEL_CONNECTIONS = 4        # 1 + 1 + 2
QEMU_REGION = 12 * MiB
STOP_OFFSET = 16 * MiB
GUEST_SCRIPT = loop_script(ATTACHMENTS, STOP_OFFSET)
# kernel messages that mean a client saw trouble
DMESG_TROUBLE = ("error", "dead connection", "timed out", "disconnected", "shutting down",
                 "receive control failed", "send control failed")


class Session:
    """A served QCOW1 export, a guest running the loops on it and qemu-io on the host."""

    def __init__(self, vm_kit, workdir):
        self.workdir = workdir
        self.image = workdir / "disk.qcow"
        run(["qemu-img", "create", "-f", "qcow", self.image, "64M"])
        self.config = workdir / "qcownbd.toml"
        self.config_text = f'[exports.disk]\npath = "{self.image}"\nformat = "qcow1"\n'
        self.config.write_text(self.config_text)
        self.server = HandoverServer(workdir, "--config", self.config)
        self.qemu = self.guest = None
        try:
            self.qemu = QemuIoLoop(self.server.port, "disk", QEMU_REGION)
            self.guest = Guest(vm_kit, GUEST_SCRIPT, workdir, name="upgrade",
                               nbd_ports=[self.server.port], cpus=2)
        except BaseException:
            self.close()
            raise
        self.marks: list[tuple[int, ...]] = []   # rounds done when each upgrade began
        self.seen: dict[tuple[int, int], float] = {}  # (loop, round) -> first seen, host

    def counts(self) -> tuple[int, ...]:
        """Rounds each guest loop has reported so far, then qemu-io's."""
        console = self.guest.output()
        rounds = parse_rounds(console)
        now = time.monotonic()
        for round_ in rounds:
            self.seen.setdefault((round_.loop, round_.number), now)
        bad = [r for r in rounds if r.status != "ok"]
        assert not bad and "QCOWNBD-FAIL" not in console, \
            f"guest loops failed: {bad[:5]}\n{console[-4000:]}"
        assert not self.qemu.errors, self.qemu.errors[:10]
        return (*(sum(1 for r in rounds if r.loop == i) for i in range(len(ATTACHMENTS))),
                self.qemu.rounds)

    def wait_progress(self, rounds: int, timeout: float = 90) -> tuple[int, ...]:
        """Wait until every loop did ``rounds`` more rounds; the new counts."""
        start = self.counts()
        done = wait_for(lambda: self.guest.poll() is not None or all(
            now - before >= rounds for now, before in zip(self.counts(), start)), timeout)
        assert done and self.guest.poll() is None, (
            f"loops stalled at {self.counts()} (from {start}); guest console:\n"
            f"{self.guest.output()[-4000:]}\nserver log:\n{self.server.log()[-3000:]}")
        return self.counts()

    def upgrade(self) -> int:
        """One live upgrade between rounds of every loop."""
        self.marks.append(self.counts())
        pid = self.server.upgrade()
        self.wait_progress(2)
        return pid

    def finish(self):
        """Stop the loops (the stop mark, written by qemu-io), wait for the guest,
        stop the server: the guest's result."""
        self.qemu.finish(f"write -P {STOP_BYTE} {STOP_OFFSET} 4k")
        result = self.guest.wait(120)
        self.server.stop()
        return result

    def close(self) -> None:
        """Stop whatever still runs."""
        for client in (self.guest, self.qemu):
            if client is not None:
                client.kill()
        self.server.stop()


@pytest.fixture
def session(vm_kit, tmp_path):
    session = Session(vm_kit, tmp_path)
    try:
        yield session
    finally:
        session.close()


def check_outcome(session: Session, result, upgrades: int) -> None:
    """Everything issue 15 asks of the clients and the image."""
    result.check()
    rounds = parse_rounds(result.output)
    assert rounds and all(r.status == "ok" for r in rounds), \
        [r for r in rounds if r.status != "ok"][:10]
    assert not result.markers("QCOWNBD-DD"), result.markers("QCOWNBD-DD")
    dmesg = result.markers("QCOWNBD-DMESG")
    trouble = [line for line in dmesg if any(word in line.lower() for word in DMESG_TROUBLE)]
    assert not trouble, trouble
    assert not session.qemu.errors, session.qemu.errors[:10]

    # every loop went on between every two upgrades
    counts = [*session.marks, session.counts()]
    for before, after in zip(counts, counts[1:]):
        assert all(b - a >= 2 for a, b in zip(before, after)), counts

    log = session.server.log()
    assert "Traceback" not in log, log[-3000:]
    handovers = session.server.handovers()
    assert len(handovers) == upgrades, log[-3000:]
    assert set(handovers.values()) == {(KERNEL_CONNECTIONS + 1, 1)}, handovers

    # what the host finds: the last acknowledged pattern of every slot
    expected = {ATTACHMENTS[loop][2] + slot * BLOCK: value
                for (loop, slot), value in acknowledged(rounds).items()}
    expected |= {QEMU_REGION + slot * BLOCK: value
                 for slot, value in session.qemu.acknowledged.items()}
    checks = [f"read -P {value} {offset} {BLOCK}" for offset, value in expected.items()]
    assert len(checks) == (len(ATTACHMENTS) + 1) * SLOTS
    done = qemu_io(session.image, *checks, read_only=True, check=False)
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    offset, value = next(iter(expected.items()))   # the check itself can fail:
    wrong = qemu_io(session.image, f"read -P {value ^ 0xff} {offset} {BLOCK}",
                    read_only=True, check=False)
    assert "verification failed" in wrong.stdout, wrong.stdout
    qcownbd_check(session.image)


def pauses(session: Session, rounds) -> dict[str, tuple[float, float, int]]:
    """Per loop: the longest round that overlapped an upgrade (SIGUSR2 to the
    successor serving, or to the refusal logged), the longest of the others since the
    first attempt, and how many overlapped. Guest rounds are placed on the host's
    clock by the earliest sighting of their console lines."""
    windows = sorted(session.server.upgrade_windows + session.server.refused_windows)
    offset = min(session.seen[(r.loop, r.number)] - r.end for r in rounds
                 if (r.loop, r.number) in session.seen)
    spans = {label: [(r.start + offset, r.end + offset) for r in rounds if r.loop == loop]
             for loop, label in enumerate(LOOP_NAMES)}
    spans["qemu-io"] = session.qemu.round_times
    table = {}
    for label, times in spans.items():
        times = [(start, end) for start, end in times if end > windows[0][0]]
        overlapping, others = [], []
        for start, end in times:
            hit = any(start < done and end > began for began, done in windows)
            (overlapping if hit else others).append(end - start)
        table[label] = (max(overlapping, default=0), max(others, default=0), len(overlapping))
    return table


def report(name: str, session: Session, result) -> None:
    """Timings and the kernel's NBD messages, for the record (pytest -s shows them)."""
    windows = session.server.upgrade_windows
    print(f"\n{name}: rounds per loop {session.counts()}, upgrades (SIGUSR2 to successor "
          f"serving) took {[round(done - began, 2) for began, done in windows]} s, refused "
          f"ones {[round(done - began, 2) for began, done in session.server.refused_windows]} s")
    for label, (hit, other, count) in pauses(session, parse_rounds(result.output)).items():
        print(f"  {label}: longest round overlapping an upgrade {hit:.2f} s ({count} rounds), "
              f"longest other round meanwhile {other:.2f} s")
    for line in result.markers("QCOWNBD-DMESG"):
        print(f"  dmesg: {line}")


@pytest.mark.timeout(300)
def test_ten_upgrades_under_kernel_and_qemu_clients(session):
    session.wait_progress(3, timeout=120)       # boot, attach, a baseline
    for _ in range(10):
        session.upgrade()
        time.sleep(1)
    result = session.finish()
    check_outcome(session, result, upgrades=10)
    report("ten upgrades", session, result)


@pytest.mark.timeout(300)
def test_failing_successors_leave_the_old_server_serving(session):
    session.wait_progress(3, timeout=120)
    pid = session.server.pid()
    # A successor that cannot read its configuration fails before anything is held.
    session.config.write_text(session.config_text + "[exports.disk\n")
    session.marks.append(session.counts())
    session.server.upgrade_refused(str(session.config))
    session.config.write_text(session.config_text)
    session.wait_progress(2)
    # One that cannot open the image fails after the connections were held for it.
    moved = session.image.with_suffix(".moved")
    session.image.rename(moved)
    try:
        session.marks.append(session.counts())
        session.server.upgrade_refused(f"{session.image}: no such file")
    finally:
        moved.rename(session.image)
    session.wait_progress(2)
    assert session.server.pid() == pid
    session.upgrade()
    result = session.finish()
    check_outcome(session, result, upgrades=1)
    report("failing successors", session, result)
