"""A guest whose root filesystem is a QCOW1 image exported by qcownbd.

(a) QEMU's own NBD client provides the disk (virtio, /dev/vda);
(b) diskless: the initramfs attaches the export with the kernel's NBD client
    and switches root into it.
The root's /sbin/init (vm.disks.ROOT_INIT) records who booted, from which
device, as PID 1, and powers off; the test reads that marker from the image.
"""

import secrets

import pytest

from helpers import run
from vm import boot
from vm.disks import ROOT_INIT, debugfs_cat, fsck_clean, make_ext4, root_tree, to_qcow1, to_raw

pytestmark = pytest.mark.vm

ROOT_UUID = "51c04b0d-0000-4000-8000-0000000000f5"

# Initramfs stage: mount the root device, then /init switches root into it.
ATTACH = {
    "virtio": "",
    "nbd": 'nbd-client -N root 10.0.2.100 10809 /dev/nbd0 || exit 1\n',
}
MOUNT = 'mount -t ext4 -o rw {dev} /newroot && echo /newroot > /switch-root\n'
DEVICE = {"virtio": "/dev/vda", "nbd": "/dev/nbd0"}


@pytest.fixture
def root_image(vm_kit, tmp_path):
    """A QCOW1 image (converted by QEMU) of an ext4 root built with mke2fs -d."""
    tree = root_tree(vm_kit, tmp_path / "tree", ROOT_INIT)
    raw = make_ext4(tmp_path / "root-built.raw", 32, uuid=ROOT_UUID, tree=tree)
    return to_qcow1(raw, tmp_path / "root.qcow")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["virtio", "nbd"])
def test_guest_boots_from_qcow1_export(vm_kit, qcownbd_server, root_image, tmp_path, client):
    server = qcownbd_server(f"root={root_image}")
    identity = secrets.token_hex(8)
    options = ({"drives": [server.uri("root")]} if client == "virtio"
               else {"nbd_ports": [server.port]})
    script = ATTACH[client] + MOUNT.format(dev=DEVICE[client])

    result = boot(vm_kit, script, tmp_path, timeout=90, append=f"qcownbd.id={identity}",
                  **options).check()

    expected = f"id={identity} root={DEVICE[client]} pid=1 boots=1"
    assert result.markers("QCOWNBD-ROOT-MARKER") == [expected], result.output
    status, log = server.stop(), server.stderr
    assert status == 0 and "Traceback" not in log, log
    raw = to_raw(root_image, tmp_path / "root-after.raw")
    fsck_clean(raw)
    assert debugfs_cat(raw, "/marker").decode() == (
        f"id={identity}\nroot={DEVICE[client]}\npid=1\n"
        f"kernel={vm_kit.kernel_release}\nboots=1\n")
    # The marker is in the export's QCOW1 clusters, not only in a guest cache.
    assert run(["qemu-img", "compare", "-q", "-f", "raw", tmp_path / "root-built.raw",
                "-F", "qcow", root_image], check=False).returncode == 1
