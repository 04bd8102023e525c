"""guestfwd relay: QEMU's slirp socket (stdin/stdout) <-> a server on 127.0.0.1:PORT.

libslirp hands the command a loopback TCP socket with Nagle on. busybox nc
writes a 4 KiB read reply as 4096 + 16 bytes, and the second write then waits
for slirp's delayed ACK: about 40 ms per request. This relay turns Nagle off
on both sockets and forwards in large chunks.

Usage: python3 relay.py PORT   (run by QEMU once per guest connection)
"""

import os
import socket
import sys
import threading

CHUNK = 1 << 20


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (e.g. a socketpair): nothing to turn off
        pass


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # One side vanished: drop both so the other direction ends too.
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main(port: int) -> None:
    """Relay until both directions have ended."""
    guest = socket.socket(fileno=os.dup(0))
    server = socket.create_connection(("127.0.0.1", port))
    for sock in (guest, server):
        _nodelay(sock)
    upstream = threading.Thread(target=_pump, args=(guest, server), daemon=True)
    upstream.start()
    _pump(server, guest)
    upstream.join()


if __name__ == "__main__":
    main(int(sys.argv[1]))
