"""The Linux kernel's NBD client, in a QEMU guest, against qcownbd serving QCOW1.

One boot runs every client variant in turn on the same export (boots cost
seconds under TCG): netlink with one and with four connections, ioctl mode
(-L) with one and two. Each variant verifies what the previous one wrote, so
data must survive disconnects and cross connections. A second server that
fails every write is the negative control: the guest's write check must see
the failure. Afterwards QEMU and e2fsprogs check the image on the host.
"""

import subprocess
import uuid

import pytest

from helpers import free_port, qemu_io, raw_file, run, wait_listening
from vm import boot, nbd_address
from vm.disks import debugfs_cat, fsck_clean, to_raw

pytestmark = pytest.mark.vm

FS_UUID = str(uuid.UUID(int=0x51C0_4B0D_0000_4000_8000_0000_0000_0001))

GUEST_SCRIPT = r"""
GOOD=@GOOD@ BAD=@BAD@
ok() { echo "QCOWNBD-OK $1 $(cut -d' ' -f1 /proc/uptime)"; }
fail() { echo "QCOWNBD-FAIL $1"; exit 1; }
attach() {  # attach DEVICE [nbd-client options...]: connect to the good server
    dev=$1; shift
    nbd-client -N disk "$@" $GOOD 10809 $dev || fail "connect $dev $*"
    # In ioctl mode a forked child finishes the setup: wait for the size.
    for i in $(seq 50); do
        [ "$(cat /sys/block/${dev#/dev/}/size)" = 131072 ] && return
        sleep 0.1
    done
    fail "size of $dev"
}
detach() { nbd-client -d $1 || fail "disconnect $1"; }
readback() {  # readback DEVICE PATTERN-FILE SEEK-IN-64K-BLOCKS, bypassing caches
    echo 3 > /proc/sys/vm/drop_caches
    count=$(( $(stat -c %s $2) / 65536 ))
    dd if=$1 bs=64k skip=$3 count=$count 2>/dev/null | cmp - $2 || fail "read back $2 from $1"
}
# Patterns (0xa5 and 0x5a) that the host checks with qemu-io read -P.
head -c 1048576 /dev/zero | tr '\0' '\245' > /tmp/pat_a
head -c 4194304 /dev/zero | tr '\0' '\132' > /tmp/pat_b

attach /dev/nbd0
dd if=/tmp/pat_a of=/dev/nbd0 bs=64k seek=896 conv=fsync 2>/dev/null || fail "write pat_a"
readback /dev/nbd0 /tmp/pat_a 896
/usr/sbin/mke2fs -q -F -t ext4 -U @UUID@ -E hash_seed=@UUID@ /dev/nbd0 48M || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail "mount nbd0"
echo netlink-single > /mnt/one.txt && cp /bin/busybox /mnt/busybox.bin || fail "write files"
sync && umount /mnt && detach /dev/nbd0
ok netlink-single

attach /dev/nbd1 -C 4
readback /dev/nbd1 /tmp/pat_a 896
mount -t ext4 /dev/nbd1 /mnt || fail "mount nbd1"
[ "$(cat /mnt/one.txt)" = netlink-single ] || fail "one.txt via -C 4"
cmp /mnt/busybox.bin /bin/busybox || fail "busybox.bin via -C 4"
for i in 1 2 3 4; do cp /bin/busybox /mnt/copy$i & done; wait
echo netlink-multi > /mnt/two.txt && sync && umount /mnt || fail "write via -C 4"
dd if=/tmp/pat_b of=/dev/nbd1 bs=128k seek=464 conv=fsync 2>/dev/null || fail "write pat_b"
detach /dev/nbd1
ok netlink-multi

attach /dev/nbd2 -L
readback /dev/nbd2 /tmp/pat_b 928
mount -t ext4 /dev/nbd2 /mnt || fail "mount nbd2"
for i in 1 2 3 4; do cmp /mnt/copy$i /bin/busybox || fail "copy$i via -L"; done
[ "$(cat /mnt/two.txt)" = netlink-multi ] || fail "two.txt via -L"
echo ioctl-single > /mnt/three.txt && rm /mnt/copy4 && sync && umount /mnt || fail "write via -L"
detach /dev/nbd2
ok ioctl-single

attach /dev/nbd3 -L -C 2
mount -t ext4 /dev/nbd3 /mnt || fail "mount nbd3"
[ "$(cat /mnt/three.txt)" = ioctl-single ] && [ ! -e /mnt/copy4 ] || fail "files via -L -C 2"
echo ioctl-multi > /mnt/four.txt && sync && umount /mnt || fail "write via -L -C 2"
detach /dev/nbd3
ok ioctl-multi

nbd-client -N disk $BAD 10809 /dev/nbd4 || fail "connect to the failing server"
if dd if=/tmp/pat_a of=/dev/nbd4 bs=64k count=16 conv=fsync 2>/dev/null; then
    fail "negative control: a failing server's writes looked fine"
fi
nbd-client -d /dev/nbd4
ok negative-control
"""
GUEST_SCRIPT = (GUEST_SCRIPT.replace("@UUID@", FS_UUID).replace("@GOOD@", nbd_address(0))
                .replace("@BAD@", nbd_address(1)))

VARIANTS = ["netlink-single", "netlink-multi", "ioctl-single", "ioctl-multi",
            "negative-control"]


@pytest.fixture
def failing_server(tmp_path):
    """nbdkit serving a scratch file with every write failing (EIO)."""
    scratch = raw_file(tmp_path / "scratch.raw", size=64 << 20)
    port = free_port()
    log = open(tmp_path / "nbdkit.log", "w")  # a file: injected errors are logged
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
         "-e", "disk", "--filter=error", "file", str(scratch),
         "error-pwrite=EIO", "error-pwrite-rate=100%"],
        stderr=log)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def host_checks(image, raw):
    """What the guest wrote, seen through QEMU and e2fsprogs."""
    done = qemu_io(image, "read -P 0xa5 56M 1M", "read -P 0x5a 58M 4M", read_only=True,
                   check=False)
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    # host-side negative control
    wrong = qemu_io(image, "read -P 0x5a 56M 1M", read_only=True, check=False)
    assert "verification failed" in wrong.stdout, wrong.stdout
    to_raw(image, raw)
    fsck_clean(raw)
    assert f"Filesystem UUID:          {FS_UUID}" in run(["dumpe2fs", "-h", raw]).stdout
    texts = {name: debugfs_cat(raw, f"/{name}.txt") for name in ("one", "two", "three", "four")}
    assert texts == {"one": b"netlink-single\n", "two": b"netlink-multi\n",
                     "three": b"ioctl-single\n", "four": b"ioctl-multi\n"}
    busybox = debugfs_cat(raw, "/busybox.bin")
    assert [debugfs_cat(raw, f"/copy{i}") for i in (1, 2, 3)] == [busybox] * 3
    return busybox


@pytest.mark.timeout(240)
def test_kernel_client_variants_on_qcow1(vm_kit, qcownbd_server, failing_server, tmp_path):
    image = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-f", "qcow", image, "64M"])
    server = qcownbd_server(f"disk={image}")

    result = boot(vm_kit, GUEST_SCRIPT, tmp_path, timeout=180,  # good server first
                  nbd_ports=[server.port, failing_server]).check()

    assert [line.split()[0] for line in result.markers("QCOWNBD-OK")] == VARIANTS
    status, log = server.stop(), server.stderr
    assert status == 0 and "Traceback" not in log, log
    busybox = host_checks(image, tmp_path / "disk.raw")
    assert busybox == vm_kit.busybox.read_bytes()
    # The same bytes through qcownbd as through QEMU's own QCOW1 reader.
    reader = qcownbd_server("--read-only", f"disk={image}")
    run(["qemu-img", "compare", "-f", "raw", tmp_path / "disk.raw", "-F", "raw",
         reader.uri("disk")], timeout=120)
