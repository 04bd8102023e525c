"""The two things qcownbd asks of systemd, with the standard library only.

Socket activation (sd_listen_fds) and readiness notification (sd_notify).
Both are silent no-ops when the service was not started by systemd.  And
what a unit's processes must expect of it: `systemctl stop` and `systemctl
kill` signal every process of the unit (`ignoring_signals`).
"""

import os
import signal
import socket

SD_LISTEN_FDS_START = 3


def ignoring_signals(*signals: int):
    """A ``preexec_fn`` for a child this process starts: it ignores ``signals`` from
    before its program starts (an ignored signal stays ignored across exec).
    `systemctl kill -s USR2` signals every process of the unit, a child started a
    moment before too, which would die of it before it set its own handlers."""
    def ignore() -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
    return ignore


def inherited_sockets() -> list[socket.socket]:
    """The sockets passed by systemd (LISTEN_FDS/LISTEN_PID), if any."""
    return [socket.socket(fileno=fd) for _name, fd in inherited_fds()]


def inherited_fds() -> list[tuple[str, int]]:
    """(name, descriptor) of what systemd passed (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES,
    sd_listen_fds_with_names(3)): a socket unit's sockets, and what the service put in
    its file descriptor store before it restarted.  The name is "unknown" when
    systemd gave none.

    The variables are removed so that children do not inherit them.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    names += ["unknown"] * (count - len(names))
    fds = []
    for index, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        fds.append((names[index] or "unknown", fd))
    return fds


def notify(state: str, fds: list[int] = ()) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET, with ``fds`` (FDSTORE=1);
    False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            if fds:
                socket.send_fds(sock, [state.encode()], list(fds))
            else:
                sock.sendall(state.encode())
    except OSError:
        return False
    return True
