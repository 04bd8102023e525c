"""Booting a test guest in QEMU: a Popen-like handle whose console is captured.

Networking is QEMU user mode with restrict=on: the guest reaches nothing but
the forwarded NBD servers. Forward i is at 10.0.2.(100+i):10809 in the guest;
libslirp runs tests/vm/relay.py once per guest connection, so the host side
of every connection is loopback and multi-connection clients work.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .initramfs import QBOOT, GuestKit, script_archive

RELAY = Path(__file__).with_name("relay.py")
GUEST_NBD_PORT = 10809


class GuestError(AssertionError):
    """A guest did not finish in time or reported a failure; carries its console."""


def nbd_address(index: int = 0) -> str:
    """The guest-side address of forwarded NBD server `index`."""
    return f"10.0.2.{100 + index}"


def choose_accel() -> str:
    """KVM only with a real kvm_intel/kvm_amd and a usable /dev/kvm, else multi-threaded TCG.

    /dev/kvm alone proves nothing: nested software hypervisors (kvm_pvm) pass
    QEMU's checks and then die on stock kernels. $QCOWNBD_VM_ACCEL overrides.
    """
    if os.environ.get("QCOWNBD_VM_ACCEL"):
        return os.environ["QCOWNBD_VM_ACCEL"]
    real_kvm = any(Path(f"/sys/module/{name}").exists() for name in ("kvm_intel", "kvm_amd"))
    if real_kvm and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg,thread=multi"


def _netdev_args(nbd_ports) -> list[str]:
    if not nbd_ports:
        return []
    relay = f"{sys.executable} {RELAY}"
    if any(char in part for part in (sys.executable, str(RELAY)) for char in ", "):
        raise GuestError(f"QEMU cannot run a guestfwd command with these paths: {relay}")
    forwards = "".join(
        f",guestfwd=tcp:{nbd_address(i)}:{GUEST_NBD_PORT}-cmd:{relay} {port}"
        for i, port in enumerate(nbd_ports))
    return ["-netdev", f"user,id=n0,restrict=on{forwards}",
            "-device", "virtio-net-pci,netdev=n0"]


@dataclass
class GuestResult:
    """A finished guest: QEMU's exit status, console text, wall time."""
    returncode: int
    output: str
    seconds: float

    def markers(self, tag: str) -> list[str]:
        """What follows each `tag` up to the end of its console line, in order."""
        # Not anchored at line starts: kernel messages may share a console line.
        return re.findall(rf"{re.escape(tag)}[ \t]*([^\r\n]*)", self.output)

    def check(self, exit_status: int = 0) -> "GuestResult":
        """Raise GuestError unless QEMU exited cleanly and /test.sh exited `exit_status`."""
        exits = self.markers("QCOWNBD-EXIT")
        if self.returncode != 0 or not exits or exits[-1].split()[0] != str(exit_status):
            raise GuestError(f"guest failed (qemu exit {self.returncode}, test.sh exit "
                             f"{exits or 'missing'}); console:\n{self.output[-6000:]}")
        return self


class Guest:
    """A running QEMU guest (start several for fleets); stop it with wait() or kill()."""

    def __init__(self, kit: GuestKit, script: str, workdir: Path, *, name="guest",
                 nbd_ports=(), drives=(), snapshot_drives=(), append="", memory_mb=256,
                 cpus=1):
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.console = workdir / f"{name}.console"
        initrd = workdir / f"{name}.initrd"
        initrd.write_bytes(kit.initrd.read_bytes() + script_archive(script))
        cmd = ["qemu-system-x86_64", "-nodefaults", "-nographic", "-serial", "stdio",
               "-no-reboot", "-bios", str(QBOOT), "-accel", choose_accel(),
               "-m", str(memory_mb), "-smp", str(cpus), "-kernel", str(kit.kernel),
               "-initrd", str(initrd),
               # no_timer_check: a vCPU starved by a loaded host can fail the boot-time
               # timer check ("IO-APIC + timer doesn't work") and panic
               "-append", f"console=ttyS0 quiet panic=-1 no_timer_check rdinit=/init "
                          f"{append}".strip(),
               *_netdev_args(nbd_ports)]
        # Shared (cached) images come first (/dev/vda, ...): the guest's writes to
        # them go to temporary files.
        for drive in snapshot_drives:
            cmd += ["-drive", f"file={drive},format=raw,if=virtio,snapshot=on"]
        for drive in drives:
            cmd += ["-drive", f"file={drive},format=raw,if=virtio"]
        self.cmd = cmd
        self.started = time.monotonic()
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc_info) -> None:
        self.kill()

    def output(self) -> str:
        """Console text so far."""
        return self.console.read_bytes().decode(errors="replace")

    def poll(self):
        """QEMU's exit status, or None while the guest runs."""
        return self.proc.poll()

    def kill(self) -> None:
        """Stop QEMU at once."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float) -> GuestResult:
        """Wait for the guest to power off; on timeout kill it and raise GuestError."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError(f"guest {self.name} still running after {timeout} s; console:\n"
                             f"{self.output()[-6000:]}") from None
        return GuestResult(self.proc.returncode, self.output(), time.monotonic() - self.started)


def boot(kit: GuestKit, script: str, workdir: Path, *, timeout: float, **options) -> GuestResult:
    """Boot one guest running `script` and wait for it (see Guest for options)."""
    with Guest(kit, script, workdir, **options) as guest:
        return guest.wait(timeout)
