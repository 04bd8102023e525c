"""The socket pair between a server and its successor: JSON lines with descriptors.

Each message is one JSON line (`qcownbd.handover.dumps`) sent in one
sendmsg with its descriptors (SCM_RIGHTS).  The two sides take turns (one
message, then the other's answer), so the bytes and descriptors of two
messages are never read together.  Calls block, with a timeout: the old
server makes them from a worker thread, the successor before its event
loop starts.
"""

import os
import socket

from qcownbd.errors import HandoverError
from qcownbd.handover import dumps, loads

#: descriptors per message at most (the kernel's SCM_MAX_FD is 253)
MAX_FDS = 200
MAX_LINE = 64 * 1024 * 1024


class Channel:
    """One end of the socket pair."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = b""

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        """The end inherited as descriptor ``fd`` (the successor's)."""
        os.set_inheritable(fd, False)
        return cls(socket.socket(fileno=fd))

    def send(self, message: dict, fds: list[int] = (), timeout: float = 30.0) -> None:
        """Send one message with ``fds``; HandoverError when the peer is gone."""
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
        data = dumps(message)
        self.sock.settimeout(timeout)
        try:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as exc:
            raise HandoverError(f"the other server went away ({exc.strerror or exc})") from None

    def receive(self, timeout: float) -> tuple[dict, list[socket.socket]]:
        """The next message and its descriptors (as sockets); HandoverError on timeout,
        when the peer is gone, or when it said ``{"failed": reason}``."""
        self.sock.settimeout(timeout)
        fds: list[int] = []
        try:
            while b"\n" not in self._buffer:
                data, got, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, MAX_FDS)
                fds += got
                if not data:
                    raise HandoverError("the other server went away")
                self._buffer += data
                if len(self._buffer) > MAX_LINE:
                    raise HandoverError("a handover message too long")
        except socket.timeout:
            _close_all(fds)
            raise HandoverError(f"no answer within {timeout:g} s") from None
        except OSError as exc:
            _close_all(fds)
            raise HandoverError(f"the other server went away ({exc.strerror or exc})") from None
        line, _sep, self._buffer = self._buffer.partition(b"\n")
        try:
            message = loads(line)
        except HandoverError:
            _close_all(fds)
            raise
        if "failed" in message:
            _close_all(fds)
            raise HandoverError(str(message["failed"]))
        return message, [socket.socket(fileno=fd) for fd in fds]

    def close(self) -> None:
        """Close this end."""
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
