"""The control socket: a running server answers `qcownbd status` and `qcownbd snapshot`.

A Unix stream socket, off unless configured (``control_socket`` in the
config's [server] table, or ``serve --control PATH``), created owner-only
(mode 0600): whoever can connect can freeze exports and read every client's
address.  The protocol is one JSON object per line each way:

    {"command": "status"}
    {"command": "snapshot", "export": "NAME", "name": "FILE"}   ("name" optional)

answered by ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
"one line"}``.  Several requests may share a connection; a line longer than
`MAX_LINE`, or no request for `IDLE_TIMEOUT` seconds, ends it.
"""

import asyncio
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable

from qcownbd.errors import ConfigError, ControlError, QcownbdError

log = logging.getLogger("qcownbd.control")

#: where `qcownbd status` and `snapshot` look when not told (the systemd units' path)
DEFAULT_PATH = "/run/qcownbd/control/socket"
MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 60.0

Handler = Callable[[dict], Awaitable[object]]


# -- the wire format: pure functions ---------------------------------------

def encode(message: dict) -> bytes:
    """One line of the protocol."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    """A request or answer from one line; ControlError when it is not a JSON object."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("not a JSON line") from None
    if not isinstance(message, dict):
        raise ControlError("not a JSON object")
    return message


def answer(result: object = None, error: str | None = None) -> dict:
    """The answer to one request."""
    return {"ok": False, "error": error} if error is not None else {"ok": True, "result": result}


# -- the server side -------------------------------------------------------

class ControlServer:
    """Listens on ``path`` and hands each request to ``handlers[command](request)``."""

    def __init__(self, path: str, handlers: dict[str, Handler]):
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (a stale socket file is replaced, a live one refused) and listen, or
        listen on ``sock``, the socket a previous server listened on (a handover)."""
        sock = sock or bind_owner_only(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        log.info("control socket: %s", self.path)

    async def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def stop_listening(self) -> socket.socket | None:
        """A live handover: a duplicate of the listening socket for the successor; this
        process stops accepting, and the socket file stays (the successor listens on
        it).  Requests already connected are still answered."""
        if self._server is None:
            return None
        sock = self._server.sockets[0].dup()
        self._server.close()
        self._server = None
        return sock

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(encode(answer(error=f"request longer than {MAX_LINE} bytes")))
                    break
                if not line:
                    break
                writer.write(encode(await self._handle(line)))
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _handle(self, line: bytes) -> dict:
        try:
            request = decode(line)
            handler = self.handlers.get(request.get("command"))
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise ControlError(f"unknown command {request.get('command')!r} "
                                   f"(known: {known})")
            return answer(await handler(request))
        except QcownbdError as exc:
            return answer(error=str(exc))
        except Exception as exc:   # a bug answers this request, never ends the server
            log.error("control request failed", exc_info=True)
            return answer(error=f"internal error: {exc}")


def bind_owner_only(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` with mode 0600.

    The file is created under umask 177 (no moment where others may
    connect); a leftover socket nobody listens on is replaced; anything
    else at ``path`` is refused with a one-line ConfigError.
    """
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)         # left by a server that is gone
        return
    except OSError as exc:
        raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"control socket {path}: another server is listening there")


# -- the client side -------------------------------------------------------

def ask(path: str, request: dict, timeout: float = 120.0) -> object:
    """Send one request to the server listening on ``path``; its result, or
    ControlError with the server's (or the connection's) one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path} (is the server running with "
                               "control_socket set, or --control?)") from None
        except OSError as exc:
            reason = ("nobody is listening" if exc.errno == errno.ECONNREFUSED
                      else exc.strerror)
            raise ControlError(f"control socket {path}: {reason}") from None
        sock.sendall(encode(request))
        reply = sock.makefile("rb").readline(MAX_LINE * 16)
    except socket.timeout:
        raise ControlError(f"control socket {path}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror}") from None
    finally:
        sock.close()
    if not reply:
        raise ControlError(f"control socket {path}: the server closed the connection")
    message = decode(reply)
    if not message.get("ok"):
        raise ControlError(str(message.get("error", "request failed")))
    return message.get("result")
