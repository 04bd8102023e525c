"""Host-side disk images for guests: ext4 built with `mke2fs -d`, read back with debugfs.

Nothing here mounts anything or needs loop devices: e2fsprogs and qemu-img
work on image files directly.
"""

import subprocess
from pathlib import Path

from helpers import run

from .initramfs import GuestKit

# /sbin/init of a guest root filesystem: record who booted, from which device,
# as PID 1, then leave the filesystem clean and power off.
ROOT_INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
id=$(sed -n 's/.*qcownbd\.id=\([^ ]*\).*/\1/p' /proc/cmdline)
root=$(awk '$2 == "/" { dev = $1 } END { print dev }' /proc/mounts)
boots=$(( $(cat /boot-count 2>/dev/null || echo 0) + 1 ))
echo $boots > /boot-count
printf 'id=%s\nroot=%s\npid=%s\nkernel=%s\nboots=%s\n' \
    "$id" "$root" "$$" "$(uname -r)" "$boots" > /marker
cat /marker >> /markers.log
sync
mount -o remount,ro /
echo "QCOWNBD-ROOT-MARKER id=$id root=$root pid=$$ boots=$boots"
poweroff -f
"""


def make_ext4(path: Path, size_mb: int, *, uuid: str, tree: Path | None = None) -> Path:
    """A raw ext4 image file (optionally filled from directory `tree`), fixed UUID.

    The fixed UUID and hash seed also spare guests' mke2fs the wait for
    entropy that a freshly booted TCG guest does not have.
    """
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-U", uuid, "-E", f"hash_seed={uuid}"]
    if tree is not None:
        cmd += ["-d", tree]
    run(cmd + [path, f"{size_mb}M"])
    return path


def root_tree(kit: GuestKit, tree: Path, init_script: str = ROOT_INIT) -> Path:
    """A minimal root directory: static busybox with its applet links and /sbin/init."""
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                      "etc"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    (tree / "bin" / "busybox").write_bytes(kit.busybox.read_bytes())
    (tree / "bin" / "busybox").chmod(0o755)
    applets = run([kit.busybox, "--list-full"]).stdout.split()
    for applet in applets:
        link = tree / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    init = tree / "sbin" / "init"
    init.unlink()
    init.write_text(init_script)
    init.chmod(0o755)
    return tree


def to_qcow1(raw: Path, qcow: Path) -> Path:
    """Convert a raw image to QCOW1 with QEMU."""
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow", raw, qcow])
    return qcow


def to_raw(image: Path, raw: Path, fmt: str = "qcow") -> Path:
    """Read an image back into a raw file with QEMU (the independent reader)."""
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])
    return raw


def debugfs_cat(raw: Path, path: str) -> bytes:
    """A file's contents from an ext4 image, read by debugfs (no mount)."""
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True,
                          timeout=60)
    if done.returncode != 0 or b"File not found" in done.stderr:
        raise AssertionError(f"debugfs cannot read {path} from {raw}: {done.stderr.decode()}")
    return done.stdout


def fsck_clean(raw: Path) -> str:
    """Run `e2fsck -fn`; raise AssertionError unless it finds nothing to fix."""
    done = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"e2fsck -fn {raw} exited {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done.stdout
