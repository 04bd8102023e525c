"""The guest kit: Debian's cloud kernel plus a cached base initramfs.

The base initramfs holds busybox, the virtio/nbd modules, the host's nbd-client
and mke2fs (with the libraries ldd lists) and a generic /init that runs
/test.sh. Each boot appends a tiny second archive carrying /test.sh, so the
big archive is built once and cached under the hash of its contents.
"""

import functools
import gzip
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cpio import CpioArchive
from .packages import PackageError, cache_dir, cache_lock, resolve_kernel_package, unpacked

# Modules the guests need; their dependencies are loaded first automatically.
GUEST_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "nbd")
HOST_BINARIES = ("/usr/sbin/nbd-client", "/usr/sbin/mke2fs")
HOST_FILES = ("/etc/mke2fs.conf",)
QBOOT = Path("/usr/share/qemu/qboot.rom")  # firmware that boots faster than SeaBIOS
# Host files the guests need, with the Debian package that provides each.
HOST_REQUIREMENTS = {
    "/usr/sbin/nbd-client": "nbd-client",
    "/usr/sbin/mke2fs": "e2fsprogs",
    "/etc/mke2fs.conf": "e2fsprogs",
    "/usr/bin/qemu-system-x86_64": "qemu-system-x86",
    str(QBOOT): "qemu-system-data",
}

INIT_SCRIPT = r"""#!/bin/sh
# PID 1 of a test guest: devices, modules, network, then /test.sh; the markers
# it prints on the serial console are what the host test asserts on.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules/order); do
    insmod /modules/$module.ko || echo "QCOWNBD-INIT-ERROR insmod $module"
done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 \
        || echo "QCOWNBD-INIT-ERROR network"
fi
echo "QCOWNBD-START $(cut -d' ' -f1 /proc/uptime)"
sh /test.sh
echo "QCOWNBD-EXIT $? $(cut -d' ' -f1 /proc/uptime)"
# A test script that mounted a new root asks for it by writing its path here.
if [ -s /switch-root ]; then
    exec switch_root "$(cat /switch-root)" /sbin/init
fi
sync
poweroff -f
"""


@dataclass(frozen=True)
class GuestKit:
    """What a guest boots: kernel, base initramfs, and a host-runnable static busybox."""
    kernel: Path
    initrd: Path
    busybox: Path
    kernel_release: str


def _module_index(modules_root: Path) -> dict[str, Path]:
    return {ko.name[:-3].replace("-", "_"): ko for ko in modules_root.rglob("*.ko")}


def _module_depends(ko: Path) -> list[str]:
    # modinfo is not installed on the host; the field sits in the .modinfo section.
    match = re.search(rb"\0depends=([^\0]*)\0", ko.read_bytes())
    return [name for name in (match.group(1).decode().split(",") if match else []) if name]


def module_load_order(modules_root: Path, wanted=GUEST_MODULES) -> list[tuple[str, Path]]:
    """Modules `wanted` plus their dependencies, each after everything it depends on."""
    index = _module_index(modules_root)
    order: list[tuple[str, Path]] = []

    def visit(name: str) -> None:
        if name in (loaded for loaded, _ in order):
            return
        if name not in index:
            raise PackageError(f"guest kernel has no module {name} under {modules_root}")
        for dependency in _module_depends(index[name]):
            visit(dependency)
        order.append((name, index[name]))

    for name in wanted:
        visit(name)
    return order


def _shared_libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


def _add_host_file(archive: CpioArchive, path: str, mode: int = 0o755) -> None:
    if path not in archive:
        archive.add_file(path, Path(path).resolve().read_bytes(), mode)


def _add_busybox(archive: CpioArchive, busybox: Path) -> None:
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    for applet in applets:
        if applet not in archive:
            archive.add_symlink(applet, "/bin/busybox")


def build_base_archive(kernel_tree: Path, release: str, busybox: Path) -> bytes:
    """The uncompressed base initramfs."""
    archive = CpioArchive()
    for directory in ("dev", "proc", "sys", "tmp", "mnt", "newroot", "etc", "run", "root"):
        archive.add_dir(directory)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("init", INIT_SCRIPT.encode(), 0o755)
    _add_busybox(archive, busybox)
    order = module_load_order(kernel_tree / "lib" / "modules" / release)
    for name, ko in order:
        archive.add_file(f"modules/{name}.ko", ko.read_bytes())
    archive.add_file("modules/order", "".join(f"{name}\n" for name, _ in order).encode())
    for binary in HOST_BINARIES:
        _add_host_file(archive, binary)
        for library in _shared_libraries(binary):
            _add_host_file(archive, library)
    for path in HOST_FILES:
        _add_host_file(archive, path, 0o644)
    return archive.getvalue()


def _cached_gzip(cache: Path, data: bytes) -> Path:
    """Store gzip -1 of data under the hash of data; reuse an earlier build."""
    path = cache / f"initramfs-{hashlib.sha256(data).hexdigest()[:20]}.cpio.gz"
    if not path.exists():
        with cache_lock(cache):
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
            tmp.rename(path)
    return path


@functools.cache
def guest_kit() -> GuestKit:
    """Fetch (once) and assemble everything a test guest boots; raises PackageError."""
    missing = [f"{path} (Debian package {package})"
               for path, package in HOST_REQUIREMENTS.items() if not os.path.exists(path)]
    if missing:
        raise PackageError(f"missing on the host: {', '.join(missing)}")
    kernel_tree = unpacked(resolve_kernel_package())
    busybox = unpacked("busybox-static") / "bin" / "busybox"
    kernels = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
    if not kernels or not busybox.exists():
        raise PackageError(f"unpacked packages lack vmlinuz or busybox: {kernel_tree}, {busybox}")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    data = build_base_archive(kernel_tree, release, busybox)
    return GuestKit(kernels[-1], _cached_gzip(cache_dir(), data), busybox, release)


def script_archive(script: str) -> bytes:
    """gzip'd cpio holding /test.sh, to append to the base initramfs."""
    archive = CpioArchive()
    archive.add_file("test.sh", script.encode(), 0o755)
    return gzip.compress(archive.getvalue(), compresslevel=1, mtime=0)
