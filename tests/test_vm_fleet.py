"""A fleet: four guests boot at once from one golden root image, each on its own overlay.

vm1 and vm2 get their disk from QEMU's NBD client (virtio), vm3 and vm4 boot
diskless through the kernel's NBD client; each names its overlay fleet/vmN.
Each guest's /sbin/init (vm.disks.ROOT_INIT) writes a marker with its
identity and its boot count. Afterwards QEMU reads every overlay through its
backing chain and e2fsprogs finds only that guest's marker in it, while the
golden image is byte-for-byte what it was. A rebooted guest sees its disk
again (boot count 2).
"""

import hashlib
import subprocess

import pytest

from helpers import run
from vm import Guest
from vm.disks import ROOT_INIT, debugfs_cat, fsck_clean, make_ext4, root_tree, to_qcow1, to_raw

pytestmark = pytest.mark.vm

ROOT_UUID = "51c04b0d-0000-4000-8000-0000000000f7"
KERNEL_CLIENT = ("nbd-client -N fleet/{name} 10.0.2.100 10809 /dev/nbd0 || exit 1\n"
                 "mount -t ext4 -o rw /dev/nbd0 /newroot && echo /newroot > /switch-root\n")
VIRTIO = "mount -t ext4 -o rw /dev/vda /newroot && echo /newroot > /switch-root\n"
GUESTS = {"vm1": "virtio", "vm2": "virtio", "vm3": "nbd", "vm4": "nbd"}
DEVICE = {"virtio": "/dev/vda", "nbd": "/dev/nbd0"}


def start_guest(kit, server, workdir, name: str, boot: int) -> Guest:
    """Guest ``name`` booting from overlay fleet/NAME with its client kind."""
    if GUESTS[name] == "virtio":
        options = {"drives": [server.uri(f"fleet/{name}")]}
        script = VIRTIO
    else:
        options = {"nbd_ports": [server.port]}
        script = KERNEL_CLIENT.format(name=name)
    return Guest(kit, script, workdir, name=f"{name}-boot{boot}", append=f"qcownbd.id={name}",
                 **options)


def marker_line(name: str, boots: int) -> str:
    return f"id={name} root={DEVICE[GUESTS[name]]} pid=1 boots={boots}"


@pytest.mark.timeout(150)
def test_four_guests_boot_from_one_golden_image(vm_kit, qcownbd_server, tmp_path):
    tree = root_tree(vm_kit, tmp_path / "tree", ROOT_INIT)
    golden = to_qcow1(make_ext4(tmp_path / "golden-built.raw", 32, uuid=ROOT_UUID, tree=tree),
                      tmp_path / "golden.qcow")
    golden_sha = hashlib.sha256(golden.read_bytes()).hexdigest()
    config = tmp_path / "fleet.toml"
    config.write_text('[exports.fleet]\ngolden = "golden.qcow"\ngolden_format = "qcow1"\n'
                      'overlay_dir = "overlays"\n')
    server = qcownbd_server("--config", config)

    guests = [start_guest(vm_kit, server, tmp_path, name, 1) for name in GUESTS]
    try:
        results = {name: guest.wait(100).check() for name, guest in zip(GUESTS, guests)}
    finally:
        for guest in guests:
            guest.kill()
    for name, result in results.items():
        assert result.markers("QCOWNBD-ROOT-MARKER") == [marker_line(name, 1)], result.output
    with start_guest(vm_kit, server, tmp_path, "vm3", 2) as again:
        result = again.wait(60).check()
    assert result.markers("QCOWNBD-ROOT-MARKER") == [marker_line("vm3", 2)], result.output

    status, log = server.stop(), server.stderr
    assert status == 0 and "Traceback" not in log, log
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == golden_sha
    golden_raw = to_raw(golden, tmp_path / "golden-after.raw")
    assert b"File not found" in subprocess.run(
        ["debugfs", "-R", "cat /marker", str(golden_raw)], capture_output=True,
        timeout=60).stderr
    for name in GUESTS:
        check_overlay(tmp_path, vm_kit, golden, name, boots=2 if name == "vm3" else 1)


def check_overlay(tmp_path, kit, golden, name: str, boots: int) -> None:
    """QEMU reads the overlay with its backing chain; only this guest's marker is in it."""
    overlay = tmp_path / "overlays" / f"{name}.qcow"
    info = run(["qemu-img", "info", overlay]).stdout
    assert f"backing file: {golden}" in info, info
    raw = to_raw(overlay, tmp_path / f"{name}-after.raw")
    fsck_clean(raw)
    device = DEVICE[GUESTS[name]]
    assert debugfs_cat(raw, "/marker").decode() == (
        f"id={name}\nroot={device}\npid=1\nkernel={kit.kernel_release}\nboots={boots}\n")
    ids = [line for line in debugfs_cat(raw, "/markers.log").decode().splitlines()
           if line.startswith("id=")]
    assert ids == [f"id={name}"] * boots, ids
