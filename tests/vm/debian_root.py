"""A minimal Debian root with systemd, built once by debootstrap and cached as an ext4 image.

    image = debian_root()      # raw ext4: boot it as a virtio disk with writes
                               # kept out of it (Guest(..., snapshot_drives=[image]))

debootstrap runs from its unpacked .deb (vm.packages), against the Debian
mirror this machine's apt uses, as --variant=minbase with systemd as init.
The guest boots the test kit's kernel and initramfs (their modules, nbd.ko
included, are loaded before the switch to this root), so the root carries no
kernel of its own. The image is cached under a hash of everything that goes
into it; a test adds its own files at boot (see tests/test_vm_systemd_restart.py).
"""

import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .disks import make_ext4
from .packages import PackageError, cache_dir, cache_lock, unpacked

PACKAGES = ("systemd-sysv", "udev", "kmod", "nbd-client", "python3", "iproute2")
IMAGE_MB = 1024
ROOT_UUID = "51c04b0d-0000-4000-8000-0000000000d6"
DEBOOTSTRAP_SECONDS = 900

# Files that make the root boot quickly and quietly on a serial console.
ROOT_FILES = {
    "etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
    "etc/hostname": "qcownbd-guest\n",
}
# Nobody logs in: no getty competing for the console the test prints on.
MASKED = ("serial-getty@ttyS0.service", "getty@tty1.service")


def codename() -> str:
    """This machine's Debian release (bookworm), the guest's too."""
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\S+)$", text, re.M)
    if not match:
        raise PackageError("/etc/os-release names no VERSION_CODENAME")
    return match.group(1)


def apt_mirror(suite: str) -> str:
    """The URI this machine's apt fetches `suite` (its main component) from."""
    sources = Path("/etc/apt")
    for path in sorted(sources.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if (suite in fields.get("Suites", "").split()
                    and "main" in fields.get("Components", "").split()
                    and "deb" in fields.get("Types", "").split()):
                return fields["URIs"].split()[0]
    for path in [sources / "sources.list", *sorted(sources.glob("sources.list.d/*.list"))]:
        if path.exists():
            for match in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{suite}\s.*\bmain\b",
                                     path.read_text(), re.M):
                return match[1]
    raise PackageError(f"no apt source for {suite} main in /etc/apt")


def _debootstrap(tool: Path, suite: str, mirror: str, target: Path) -> None:
    script_dir = tool / "usr" / "share" / "debootstrap"
    cmd = [str(tool / "usr" / "sbin" / "debootstrap"), "--variant=minbase",
           f"--include={','.join(PACKAGES)}", suite, str(target), mirror]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_SECONDS,
                              env={"DEBOOTSTRAP_DIR": str(script_dir),
                                   "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageError(f"debootstrap failed: {exc}") from exc
    if done.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise PackageError(f"debootstrap exited {done.returncode}: "
                           f"{(done.stderr + done.stdout)[-1000:]}\n{tail}")


def _finish_root(root: Path) -> None:
    for name, text in ROOT_FILES.items():
        (root / name).write_text(text)
    for unit in MASKED:
        path = root / "etc" / "systemd" / "system" / unit
        path.symlink_to("/dev/null")
    # DynamicUser= state directories live under /var/lib/private, mode 0700.
    (root / "var" / "lib" / "private").mkdir(mode=0o700, exist_ok=True)
    # The apt lists and package cache only make the image bigger.
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    for lists in (root / "var" / "lib" / "apt" / "lists").glob("*_*"):
        lists.unlink()


def debian_root() -> Path:
    """The cached raw ext4 image of the Debian root (built on first use, about 1-2 min)."""
    tool = unpacked("debootstrap")
    suite = codename()
    mirror = apt_mirror(suite)
    recipe = repr((tool.name, suite, mirror, PACKAGES, IMAGE_MB, ROOT_FILES, MASKED,
                   Path(__file__).read_bytes()))
    key = hashlib.sha256(recipe.encode()).hexdigest()[:20]
    cache = cache_dir()
    image = cache / f"debian-root-{key}.raw"
    if image.exists():
        return image
    with cache_lock(cache):
        if image.exists():      # another process built it while we waited
            return image
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            _debootstrap(tool, suite, mirror, root)
            _finish_root(root)
            built = Path(tmp) / "root.raw"
            make_ext4(built, IMAGE_MB, uuid=ROOT_UUID, tree=root)
            built.rename(image)
    return image
