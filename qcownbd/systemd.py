"""The two things qcownbd asks of systemd, with the standard library only.

Socket activation (sd_listen_fds) and readiness notification (sd_notify).
Both are silent no-ops when the service was not started by systemd.
"""

import os
import socket

SD_LISTEN_FDS_START = 3


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets passed by systemd (LISTEN_FDS/LISTEN_PID), if any.

    The variables are removed so that children do not inherit them.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
