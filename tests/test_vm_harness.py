"""The guest harness itself: its initramfs pieces and that guest failures surface."""

import subprocess

import pytest

from vm import Guest, GuestError, boot, choose_accel
from vm.cpio import CpioArchive
from vm.initramfs import module_load_order

pytestmark = pytest.mark.vm


def test_cpio_archive_lists_like_cpio(vm_kit):
    archive = CpioArchive()
    archive.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_symlink("sbin/tool", "/bin/tool")
    archive.add_char_device("dev/console", 5, 1)
    listing = subprocess.run([str(vm_kit.busybox), "cpio", "-t", "-v"],
                             input=archive.getvalue(), capture_output=True, timeout=30,
                             check=True).stdout.decode()
    lines = [line.split() for line in listing.splitlines()]
    entries = {line[-1] if "->" not in line else line[-3]: line[0] for line in lines}
    assert entries == {"bin": "drwxr-xr-x", "bin/tool": "-rwxr-xr-x",
                       "sbin": "drwxr-xr-x", "sbin/tool": "lrwxrwxrwx",
                       "dev": "drwxr-xr-x", "dev/console": "crw-------"}
    with pytest.raises(ValueError):
        archive.add_dir("bin")


def test_modules_load_after_their_dependencies(vm_kit):
    modules = vm_kit.kernel.parent.parent / "lib" / "modules" / vm_kit.kernel_release
    names = [name for name, _ in module_load_order(modules)]
    assert {"nbd", "virtio_net", "virtio_blk", "virtio_pci", "net_failover"} <= set(names)
    for before, after in [("virtio_ring", "virtio_pci"), ("failover", "net_failover"),
                          ("net_failover", "virtio_net"), ("virtio", "virtio_blk")]:
        assert names.index(before) < names.index(after)


def test_accelerator_override(monkeypatch):
    monkeypatch.setenv("QCOWNBD_VM_ACCEL", "tcg")
    assert choose_accel() == "tcg"


@pytest.mark.timeout(120)
def test_failing_and_hanging_guests_are_reported(vm_kit, tmp_path):
    result = boot(vm_kit, "echo QCOWNBD-OK before-failing\nexit 3\n", tmp_path,
                  name="failing", timeout=60)
    assert result.markers("QCOWNBD-OK") == ["before-failing"]
    with pytest.raises(GuestError, match="test.sh exit"):
        result.check()
    result.check(exit_status=3)

    hanging = Guest(vm_kit, "sleep 600\n", tmp_path, name="hanging")
    with pytest.raises(GuestError, match="still running"):
        hanging.wait(timeout=3)
    assert hanging.poll() is not None
