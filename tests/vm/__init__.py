"""Throwaway QEMU guests for end-to-end tests (kernel NBD client, root on NBD).

    kit = guest_kit()      # or the `vm_kit` fixture: Debian cloud kernel +
                           # cached base initramfs (busybox, nbd.ko, nbd-client, mke2fs)
    guest = Guest(kit, script, workdir, name="vm1", nbd_ports=[port],
                  drives=["nbd://127.0.0.1:PORT/NAME"], append="qcownbd.id=x",
                  snapshot_drives=[cached_raw_image])   # before drives, writes discarded
    result = guest.wait(timeout)              # kills and raises GuestError on timeout
    result = boot(kit, script, workdir, timeout=..., **same_options)
    result.check()                            # QEMU exit 0 and `QCOWNBD-EXIT 0`
    result.markers("QCOWNBD-OK")              # what the script printed after a tag

`script` is the guest's /test.sh (busybox sh), run by a generic /init after
the modules and the network are up. NBD server i in nbd_ports is reachable in
the guest at nbd_address(i):10809 (10.0.2.100, .101, ...). A script that writes
a mount point into /switch-root makes /init switch_root into it and run its
/sbin/init (vm.disks.ROOT_INIT writes an identity marker). Guest is a context
manager (kill on exit); start several for fleets.
"""

from .guest import Guest, GuestError, GuestResult, boot, choose_accel, nbd_address
from .initramfs import GuestKit, guest_kit

__all__ = ["Guest", "GuestError", "GuestResult", "boot", "choose_accel", "nbd_address",
           "GuestKit", "guest_kit"]
