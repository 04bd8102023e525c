"""Debian packages for test guests: downloaded and unpacked into a cache, never installed.

The cache lives in $QCOWNBD_VM_CACHE (default ~/.cache/qcownbd-vm). A package
is kept unpacked under pkg/<name>_<version>/, so a new Debian security update
(new version or new kernel ABI name) simply lands in a fresh directory.
"""

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


class PackageError(RuntimeError):
    """A package needed for test guests cannot be resolved, fetched or unpacked."""


def cache_dir() -> Path:
    """The directory that holds downloaded packages and built initramfs images."""
    path = Path(os.environ.get("QCOWNBD_VM_CACHE") or Path.home() / ".cache" / "qcownbd-vm")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(cache: Path):
    """Serialise cache updates between concurrent test processes."""
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _apt(cmd: list[str], what: str, cwd=None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageError(f"{what}: {' '.join(cmd)} failed: {exc}") from exc
    if done.returncode != 0:
        raise PackageError(f"{what}: {' '.join(cmd)} exited {done.returncode}: "
                           f"{done.stderr.strip()[-500:]}")
    return done.stdout


def resolve_kernel_package() -> str:
    """The versioned kernel package (linux-image-X-cloud-amd64) the metapackage pulls in."""
    out = _apt(["apt-cache", "depends", KERNEL_METAPACKAGE], "resolving the guest kernel")
    names = re.findall(r"^\s*Depends:\s*(linux-image-\S+)$", out, re.M)
    if not names:
        raise PackageError(f"`apt-cache depends {KERNEL_METAPACKAGE}` names no linux-image "
                           f"package (run apt-get update?):\n{out}")
    return names[0]


def candidate_version(name: str) -> str:
    """The version `apt-get download` would fetch."""
    out = _apt(["apt-cache", "show", "--no-all-versions", name], f"looking up {name}")
    match = re.search(r"^Version:\s*(\S+)$", out, re.M)
    if not match:
        raise PackageError(f"apt-cache knows no version of {name}")
    return match.group(1)


def unpacked(name: str) -> Path:
    """Directory holding the unpacked contents of Debian package `name` (fetched if needed)."""
    cache = cache_dir()
    version = candidate_version(name)
    target = cache / "pkg" / f"{name}_{version.replace(':', '%')}"
    if target.is_dir():
        return target
    with cache_lock(cache):
        if target.is_dir():  # another process fetched it while we waited
            return target
        target.parent.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _apt(["apt-get", "download", f"{name}={version}"], f"downloading {name}", cwd=tmp)
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise PackageError(f"apt-get download {name} left {len(debs)} .deb files")
            tree = Path(tmp) / "tree"
            _apt(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"unpacking {name}")
            shutil.move(tree, target)
    return target
