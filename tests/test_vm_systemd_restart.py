"""`systemctl restart` and a live handover under a real systemd, with kernel clients attached.

A TCG guest boots a minimal Debian (vm.debian_root: debootstrap, systemd as
PID 1) with this checkout's qcownbd installed and the shipped
systemd/qcownbd.service unit, unmodified, serving a QCOW1 image from
/var/lib/qcownbd on 127.0.0.1 inside the guest. A oneshot unit ordered after
it attaches the export with the guest kernel's NBD client in netlink mode and
in ioctl mode (-L) and runs the verified O_DIRECT write/fsync/read loops of
vm.io_loop on both devices, while it runs `systemctl restart qcownbd` five
times and `systemctl kill -s USR2 qcownbd` (a live handover) once, letting the
loops go on between each. The guest reports, and the host asserts: the unit
active after each, a new MainPID each time, every round verified, no NBD
error from the kernel; then the image (on its own virtio disk) holds every
slot's last acknowledged pattern (qemu-io) and is sound (`qcownbd check`).
"""

import dataclasses
import gzip
import re
from pathlib import Path

import pytest

from helpers import qcownbd_check, qemu_io, run
from vm import Guest
from vm.cpio import CpioArchive
from vm.debian_root import debian_root
from vm.disks import make_ext4
from vm.io_loop import BLOCK, SLOTS, acknowledged, loop_script, parse_rounds
from vm.packages import PackageError

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ATTACHMENTS = [("/dev/nbd0", "", 8 * MiB), ("/dev/nbd1", "-L", 9 * MiB)]
STOP_OFFSET = 16 * MiB
RESTARTS = 5
IMAGE_DISK_UUID = "51c04b0d-0000-4000-8000-0000000000d7"
STATE_DIR = "/var/lib/private/qcownbd"     # DynamicUser='s /var/lib/qcownbd
DMESG_TROUBLE = ("error", "dead connection", "timed out", "disconnected", "shutting down",
                 "receive control failed", "send control failed")
GUEST_SECONDS = 400

EXPORTS = """\
[server]
listen = ["127.0.0.1:10809"]

[exports.disk]
path = "/var/lib/qcownbd/disk.qcow"
format = "qcow1"
"""

CONSOLE_SCRIPT = """\
#!/usr/bin/python3
import sys
from qcownbd.cli import main
sys.exit(main())
"""

# Runs the check once systemd has started qcownbd.service; powers the guest off.
TEST_UNIT = """\
[Unit]
Description=qcownbd restart test under systemd
Wants=qcownbd.service
After=qcownbd.service
SuccessAction=poweroff-force
FailureAction=poweroff-immediate

[Service]
Type=oneshot
ExecStart=/bin/bash /usr/local/lib/qcownbd-test/restart.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=400

[Install]
WantedBy=multi-user.target
"""

# The guest's side: the loops in the background, the restarts in front.
RESTART_SCRIPT = r"""
LOOPS=/usr/local/lib/qcownbd-test/loops.sh
LOG=/run/qcownbd-loops.log
fail() {
    echo "QCOWNBD-FAIL $*"
    cat $LOG
    timeout 20 journalctl -u qcownbd -o cat --no-pager | sed 's/^/QCOWNBD-JOURNAL /'
    echo "QCOWNBD-EXIT 1"
    # At once: a clean shutdown would wait on the loops stuck on dead devices.
    systemctl poweroff --force --force
    exit 1
}
rounds() { grep -c "^QCOWNBD-ROUND $1 " $LOG; }
progress() {  # progress N: wait until every loop did N more rounds, none failing (bounded)
    local want=$1 i before=() deadline=$((SECONDS + 120))
    for i in @LOOP_INDEXES@; do before[i]=$(rounds $i); done
    while [ $SECONDS -lt $deadline ]; do
        grep -q QCOWNBD-FAIL $LOG && fail "loops: $(grep QCOWNBD-FAIL $LOG)"
        grep -Eq "^QCOWNBD-ROUND .* (read|write)-error$" $LOG && fail "I/O errors in the loops"
        local done=1
        for i in @LOOP_INDEXES@; do
            [ $(rounds $i) -ge $((before[i] + want)) ] || done=0
        done
        [ $done = 1 ] && return 0
        sleep 0.2
    done
    fail "loops stalled"
}
main_pid() { systemctl show -p MainPID --value qcownbd; }
report() {  # report WHAT: the unit's state after WHAT
    echo "QCOWNBD-UNIT $1 $(systemctl is-active qcownbd) $(main_pid) \
$(systemctl show -p NRestarts --value qcownbd)"
}

echo "QCOWNBD-SYSTEMD $(systemctl --version | head -1)"
report start
sh $LOOPS > $LOG 2>&1 &
loops=$!
deadline=$((SECONDS + 60))
until grep -q QCOWNBD-ATTACHED $LOG; do
    grep -q QCOWNBD-FAIL $LOG && fail "attach"
    [ $SECONDS -lt $deadline ] || fail "attach: timed out"
    sleep 0.2
done
progress 2
for n in $(seq @RESTARTS@); do
    timeout 60 systemctl restart qcownbd || fail "systemctl restart qcownbd"
    report restart-$n
    progress 2
done
before=$(main_pid)
timeout 30 systemctl kill -s USR2 qcownbd || fail "systemctl kill -s USR2"
deadline=$((SECONDS + 30))
# the successor tells systemd MAINPID= when it serves
while [ "$(main_pid)" = "$before" ] && [ $SECONDS -lt $deadline ]; do
    sleep 0.1
done
[ "$(main_pid)" != "$before" ] || fail "USR2: no successor serves"
report handover
progress 2
# (before the detach, whose own messages would read like trouble)
journalctl -k -o cat --no-pager | grep -i nbd | sed 's/^/QCOWNBD-KERNEL-JOURNAL /'
# The stop mark (vm.io_loop) ends the loops; they detach and print the kernel's NBD lines.
head -c 4096 /dev/zero | tr '\0' '\123' \
    | dd of=/dev/nbd0 bs=4k seek=@STOP_BLOCK@ oflag=direct conv=notrunc,fsync 2>/dev/null \
    || fail "stop mark"
wait $loops || fail "loops exited $?"
cat $LOG
journalctl -u qcownbd -o cat --no-pager | sed 's/^/QCOWNBD-JOURNAL /'
# Commit and close the image before the power goes.
timeout 60 systemctl stop qcownbd || fail "systemctl stop"
umount @STATE_DIR@ || fail "umount"
sync
echo "QCOWNBD-EXIT 0"
"""

# The initramfs stage (busybox): the Debian root as /, the image disk as the
# service's state directory, this test's files on top; then systemd.
STAGE_SCRIPT = f"""\
mount -t ext4 -o rw /dev/vda /newroot || exit 1
mkdir -p /newroot{STATE_DIR} && mount -t ext4 -o rw /dev/vdb /newroot{STATE_DIR} || exit 1
cp -a /payload/. /newroot/ || exit 1
echo /newroot > /switch-root
"""


def guest_files() -> dict[str, tuple[bytes, int]]:
    """Path in the guest -> (contents, mode): qcownbd, its unit, the test."""
    files = {}
    for source in sorted((REPO / "qcownbd").rglob("*.py")):
        relative = source.relative_to(REPO)
        # Debian's python3 of any version finds packages here
        files[f"usr/lib/python3/dist-packages/{relative}"] = (source.read_bytes(), 0o644)
    files["usr/local/bin/qcownbd"] = (CONSOLE_SCRIPT.encode(), 0o755)
    files["etc/systemd/system/qcownbd.service"] = (
        (REPO / "systemd" / "qcownbd.service").read_bytes(), 0o644)
    files["etc/qcownbd/exports.toml"] = (EXPORTS.encode(), 0o644)
    files["etc/systemd/system/qcownbd-restart-test.service"] = (TEST_UNIT.encode(), 0o644)
    files["usr/local/lib/qcownbd-test/loops.sh"] = (
        loop_script(ATTACHMENTS, STOP_OFFSET, host="127.0.0.1").encode(), 0o755)
    replacements = {"@LOOP_INDEXES@": " ".join(str(i) for i in range(len(ATTACHMENTS))),
                    "@RESTARTS@": str(RESTARTS), "@STOP_BLOCK@": str(STOP_OFFSET // 4096),
                    "@STATE_DIR@": STATE_DIR}
    script = RESTART_SCRIPT
    for key, value in replacements.items():
        script = script.replace(key, value)
    files["usr/local/lib/qcownbd-test/restart.sh"] = (script.encode(), 0o755)
    return files


def payload_kit(kit, files, workdir: Path):
    """The kit with an initramfs that also carries `files` under /payload."""
    archive = CpioArchive()
    for path, (data, mode) in files.items():
        archive.add_file(f"payload/{path}", data, mode)
    wants = "payload/etc/systemd/system/multi-user.target.wants"
    for unit in ("qcownbd.service", "qcownbd-restart-test.service"):
        archive.add_symlink(f"{wants}/{unit}", f"/etc/systemd/system/{unit}")
    initrd = workdir / "payload.initrd"
    initrd.write_bytes(kit.initrd.read_bytes()
                       + gzip.compress(archive.getvalue(), compresslevel=1, mtime=0))
    return dataclasses.replace(kit, initrd=initrd)


@pytest.fixture(scope="session")
def debian_root_image():
    try:
        return debian_root()
    except PackageError as exc:
        pytest.fail(f"cannot build the Debian guest root: {exc}")


def run_guest(vm_kit, root, workdir: Path):
    """Boot the guest; (its result, the QCOW1 image it served, copied out of its disk)."""
    tree = workdir / "state"
    tree.mkdir()
    run(["qemu-img", "create", "-f", "qcow", tree / "disk.qcow", "64M"])
    disk = make_ext4(workdir / "state.raw", 160, uuid=IMAGE_DISK_UUID, tree=tree)
    kit = payload_kit(vm_kit, guest_files(), workdir)
    with Guest(kit, STAGE_SCRIPT, workdir, name="systemd", snapshot_drives=[root],
               drives=[disk], memory_mb=768, cpus=2, append="systemd.show_status=0") as guest:
        result = guest.wait(GUEST_SECONDS)
    image = workdir / "disk-after.qcow"
    run(["debugfs", "-R", f"dump /disk.qcow {image}", disk])
    return result, image


def check_outcome(result, image: Path) -> None:
    """What the issue asks of systemd, the kernel clients and the image."""
    result.check()
    units = [line.split() for line in result.markers("QCOWNBD-UNIT")]
    assert [u[0] for u in units] == (
        ["start"] + [f"restart-{n}" for n in range(1, RESTARTS + 1)] + ["handover"]), units
    assert all(u[1] == "active" for u in units), units
    pids = [u[2] for u in units]
    assert len(set(pids)) == len(pids) and "0" not in pids, f"MainPID did not change: {units}"
    assert all(u[3] == "0" for u in units), f"the unit failed and was restarted: {units}"

    rounds = parse_rounds(result.output)
    assert rounds and all(r.status == "ok" for r in rounds), \
        [r for r in rounds if r.status != "ok"][:10]
    for loop in range(len(ATTACHMENTS)):   # 2 before, 2 after each restart and the handover
        assert sum(1 for r in rounds if r.loop == loop) >= 2 * (RESTARTS + 2), rounds
    assert not result.markers("QCOWNBD-DD"), result.markers("QCOWNBD-DD")
    kernel = result.markers("QCOWNBD-DMESG") + result.markers("QCOWNBD-KERNEL-JOURNAL")
    trouble = [line for line in kernel if any(word in line.lower() for word in DMESG_TROUBLE)]
    assert not trouble, trouble
    journal = "\n".join(result.markers("QCOWNBD-JOURNAL"))
    assert "Traceback" not in journal, journal[-3000:]
    # two vCPUs: every start serves with two workers, whose connections go through the store
    assert journal.count("2 workers serve") >= RESTARTS + 1, journal[-3000:]

    expected = {ATTACHMENTS[loop][2] + slot * BLOCK: value
                for (loop, slot), value in acknowledged(rounds).items()}
    assert len(expected) == len(ATTACHMENTS) * SLOTS, expected
    checks = [f"read -P {value} {offset} {BLOCK}" for offset, value in expected.items()]
    done = qemu_io(image, *checks, read_only=True, check=False)
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    offset, value = next(iter(expected.items()))   # the check itself can fail:
    wrong = qemu_io(image, f"read -P {value ^ 0xff} {offset} {BLOCK}",
                    read_only=True, check=False)
    assert "verification failed" in wrong.stdout, wrong.stdout
    qcownbd_check(image)


@pytest.mark.timeout(GUEST_SECONDS + 600)   # the first run builds the root (debootstrap)
def test_systemctl_restart_keeps_kernel_clients(vm_kit, debian_root_image, tmp_path):
    result, image = run_guest(vm_kit, debian_root_image, tmp_path)
    version = result.markers("QCOWNBD-SYSTEMD")
    print(f"\nguest: {version}, {result.seconds:.1f} s boot to poweroff; units "
          f"{result.markers('QCOWNBD-UNIT')}; rounds per loop "
          f"{[sum(1 for r in parse_rounds(result.output) if r.loop == i) for i in range(2)]}")
    assert version and re.match(r"systemd \d+", version[0]), result.output[-3000:]
    check_outcome(result, image)
