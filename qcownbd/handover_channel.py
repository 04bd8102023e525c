"""The socket pairs between a server and its successor or its workers: JSON lines
with descriptors.

Each message is one JSON line (`qcownbd.handover.dumps`) sent in one
sendmsg with its descriptors (SCM_RIGHTS).  The two sides take turns (one
message, then the other's answer), so the bytes and descriptors of two
messages are never read together.  Calls block, with a timeout: the old
server makes them from a worker thread, the successor before its event
loop starts.
"""

import asyncio
import os
import select
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

    def leftover(self) -> bytes:
        """What was received past the last message (for an `AsyncChannel` taking over)."""
        return self._buffer

    def close(self) -> None:
        """Close this end."""
        self.sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class AsyncChannel:
    """One end of a socket pair between a server and one of its workers, on the
    event loop: messages (`dumps` lines, each with its descriptors) are sent at once
    and arrive through ``on_message(message, sockets)``; ``ask`` waits for the
    answer (the message naming it in ``reply_to``); ``on_closed()`` follows the
    other side's end.  Each message says how many descriptors came with it
    (``fds``): a receive may take several messages, never the descriptors of one
    it does not take, so they are dealt out in order."""

    def __init__(self, sock: socket.socket, on_message, on_closed, received: bytes = b""):
        self.sock = sock
        self.on_message, self.on_closed = on_message, on_closed
        #: ``received``: what a blocking `Channel` on this socket read past its last
        #: message (a worker's parent may say ``stop`` right after ``start``)
        self._buffer = received
        self._fds: list[int] = []
        self._asked: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self.closed = False
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._readable)
        if received:
            loop.call_soon(self._deliver)

    def send(self, message: dict, fds: list[int] = (), timeout: float = 30.0) -> None:
        """Send one message with ``fds``; HandoverError when the other side is gone."""
        if self.closed:
            raise HandoverError("the other process went away")
        data = dumps({**message, "fds": len(fds)})
        try:
            sent = _retry(lambda: socket.send_fds(self.sock, [data], list(fds)), self.sock,
                          timeout)
            while sent < len(data):
                sent += _retry(lambda: self.sock.send(data[sent:]), self.sock, timeout)
        except OSError as exc:
            raise HandoverError(f"the other process went away ({exc.strerror or exc})") \
                from None

    async def ask(self, message: dict, fds: list[int] = (), timeout: float = 30.0) -> tuple:
        """Send ``message`` and return the answer (message, sockets); HandoverError
        when there is none within ``timeout`` seconds, or the other side is gone."""
        self._next_id += 1
        ident = self._next_id
        answer = asyncio.get_running_loop().create_future()
        self._asked[ident] = answer
        try:
            self.send({**message, "id": ident}, fds, timeout)
            return await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            raise HandoverError(f"no answer within {timeout:g} s") from None
        finally:
            self._asked.pop(ident, None)

    def answer(self, question: dict, message: dict, fds: list[int] = ()) -> None:
        """Answer ``question`` (a message `ask` sent)."""
        self.send({**message, "reply_to": question.get("id")}, fds)

    def _readable(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._fds += fds
        if not data:
            self.close()
            return
        self._buffer += data
        self._deliver()

    def _deliver(self) -> None:
        """Hand out every whole message received."""
        while b"\n" in self._buffer and not self.closed:
            line, _sep, self._buffer = self._buffer.partition(b"\n")
            try:
                message = loads(line)
                count = int(message.get("fds", 0))
            except (HandoverError, TypeError, ValueError):
                self.close()
                return
            taken, self._fds = self._fds[:count], self._fds[count:]
            socks = [socket.socket(fileno=fd) for fd in taken]
            waiting = self._asked.get(message.get("reply_to"))
            if waiting is not None and not waiting.done():
                if "failed" in message:
                    _close_all([s.detach() for s in socks])
                    waiting.set_exception(HandoverError(str(message["failed"])))
                else:
                    waiting.set_result((message, socks))
            else:
                self.on_message(message, socks)

    def close(self) -> None:
        """Close this end (the other side sees EOF); `on_closed` follows once."""
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        _close_all(self._fds)
        self._fds = []
        for waiting in self._asked.values():
            if not waiting.done():
                waiting.set_exception(HandoverError("the other process went away"))
        self.on_closed()


def _retry(call, sock: socket.socket, timeout: float):
    """``call()`` on the non-blocking ``sock``, waiting up to ``timeout`` seconds for
    room to send (messages are small: the wait is rare and short)."""
    while True:
        try:
            return call()
        except (BlockingIOError, InterruptedError):
            _readable, writable, _x = select.select([], [sock], [], timeout)
            if not writable:
                raise HandoverError(f"could not send within {timeout:g} s") from None
