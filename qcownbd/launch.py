"""What scripts, inetd and daemon managers need from a starting server.

A script must not reach for the server before it listens.  `--fork`
detaches only once it does (the parent exits 0 then, or with the child's
status after the child's one-line error); `--pid-file` is written then
(atomically) and removed at exit, after the images are committed; `--run
CMD` runs CMD then, with nbdkit's captive-mode variables ($uri, $nbd,
$port, $unixsocket, $exportname, $tls), and the server stops and exits
with CMD's status when CMD exits.  `--stdin` serves the one connection
handed over on standard input (inetd).  `--fd-store` is `qcownbd.fdstore`'s.

A detached server keeps logging to the stderr it was started with, unless
that is a pipe or a socket other than the journal: whoever reads one (a
`$(...)`, `| tee`, a test harness) would wait for its end as long as the
daemon runs, and a full one would stall the server.  Its stdin and stdout
become /dev/null.
"""

import asyncio
import contextlib
import logging
import os
import socket
import stat
import sys
from urllib.parse import quote

from qcownbd.errors import ConfigError, UsageError

log = logging.getLogger("qcownbd.server")

#: what the detached child writes to its parent once it listens
READY = b"listening\n"
#: how long a captive command has to exit after the server was told to stop
COMMAND_GRACE = 10.0


class Launch:
    """The start as the command line asked for it: --fork, --pid-file, --run, --stdin.

    `detach` runs before the images are opened (their locks belong to the
    process that serves them); `listening` once the server accepts clients;
    `close` at the very end.
    """

    def __init__(self, *, fork: bool = False, pid_file: str | None = None,
                 command: str | None = None, stdin: bool = False, fd_store: bool = False):
        self.fork, self.command, self.stdin = fork, command, stdin
        #: --fd-store: SIGTERM keeps the clients in systemd's store (`qcownbd.fdstore`)
        self.fd_store = fd_store
        self.pid_file = PidFile(pid_file) if pid_file else None
        self._ready_fd: int | None = None
        self.process: asyncio.subprocess.Process | None = None

    def detach(self) -> None:
        """--fork: continue in a child in its own session; the parent waits for it to
        listen (or fail) and exits with what it learnt, never returning."""
        if not self.fork:
            return
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(write_fd)
            os._exit(_parent_status(read_fd, pid))   # no cleanup: the child owns it all
        os.close(read_fd)
        os.setsid()
        _to_devnull(0)
        _to_devnull(1)
        self._ready_fd = write_fd

    def keeps_stderr(self) -> bool:
        """Whether stderr stays what it is after `listening` (--fork lets a pipe or a
        socket go: processes started before must not hold it either)."""
        return self._ready_fd is None or not _would_block(2)

    async def listening(self, where: list, export_name: str, tls: str) -> None:
        """The server accepts clients on ``where`` (socket names): write the pid file,
        release the --fork parent, start the --run command."""
        if self.pid_file:
            self.pid_file.write()
        if self._ready_fd is not None:
            if _would_block(2):
                log.info("detached; stderr is a pipe or a socket, so no more log lines "
                         "(start with 2>>FILE to keep them)")
                _to_devnull(2)
            os.write(self._ready_fd, READY)
            os.close(self._ready_fd)
            self._ready_fd = None
        if self.command:
            env = {**os.environ, **captive_env(where, export_name, tls)}
            self.process = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", self.command, env=env)
            log.info("running %s (pid %d)", self.command, self.process.pid)

    def interrupt_command(self) -> None:
        """The server is stopping first: ask the --run command to end too."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()

    async def command_status(self) -> int:
        """The --run command's exit status (shell style: 128+N after signal N), once it
        ended; killed after COMMAND_GRACE seconds if it was asked to end.  0 without one."""
        if self.process is None:
            return 0
        try:
            status = await asyncio.wait_for(self.process.wait(), COMMAND_GRACE)
        except asyncio.TimeoutError:
            log.warning("the --run command did not exit; killing it")
            self.process.kill()
            status = await self.process.wait()
        return 128 - status if status < 0 else status

    def close(self) -> None:
        """At exit: remove the pid file (the images are committed by now)."""
        if self.pid_file:
            self.pid_file.remove()


def _parent_status(read_fd: int, pid: int) -> int:
    """The --fork parent: 0 once the child listens; else the child's exit status (it
    printed its one-line error itself, on the stderr both share)."""
    with os.fdopen(read_fd, "rb") as pipe:
        said = pipe.read()
    if said == READY:
        return 0
    _pid, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code > 0:
        return code
    how = f" (signal {-code})" if code < 0 else ""
    print(f"qcownbd: error: the server stopped before it listened{how}", file=sys.stderr)
    return 1


def _to_devnull(fd: int) -> None:
    """Point ``fd`` at /dev/null, keeping the number (sys.std* and logging still use it)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, fd)
    os.close(null)


def _would_block(fd: int) -> bool:
    """A pipe or a socket (the journal's excepted): see the module's docstring."""
    st = os.fstat(fd)
    if stat.S_ISFIFO(st.st_mode):
        return True
    journal = os.environ.get("JOURNAL_STREAM", "")
    return stat.S_ISSOCK(st.st_mode) and journal != f"{st.st_dev}:{st.st_ino}"


class PidFile:
    """--pid-file: the server's pid, written atomically once it listens and removed at
    exit, unless another server has written its own since."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._pid: int | None = None

    def write(self) -> None:
        """Write our pid (a reader sees the old file or the whole new one)."""
        pid = os.getpid()
        temp = f"{self.path}.{pid}.tmp"
        try:
            with open(temp, "w", encoding="ascii") as file:
                file.write(f"{pid}\n")
            os.replace(temp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise ConfigError(f"cannot write the pid file {self.path}: "
                              f"{exc.strerror or exc}") from None
        self._pid = pid

    def remove(self) -> None:
        """Remove the file if this process wrote it and it still holds our pid."""
        if self._pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            with open(self.path, encoding="ascii") as file:
                mine = file.read().strip() == str(self._pid)
            if mine:
                os.unlink(self.path)


def captive_env(where: list, export_name: str, tls: str) -> dict[str, str]:
    """nbdkit's --run variables for a server listening on ``where`` (socket names:
    (host, port, ...) tuples and Unix paths); the Unix socket is preferred for $uri."""
    paths = [name for name in where if isinstance(name, str)]
    tcp = [name for name in where if isinstance(name, tuple)]
    scheme = "nbds" if tls == "require" else "nbd"
    path = "/" + quote(export_name, safe="/") if export_name else ""
    env = {"exportname": export_name, "port": "", "unixsocket": ""}
    if tcp:
        host, port = _reachable(tcp[0][0]), tcp[0][1]
        env["port"] = str(port)
        env["uri"] = f"{scheme}://{host}:{port}{path}"
    if paths:
        env["unixsocket"] = paths[0]
        env["uri"] = f"{scheme}+unix://{path or '/'}?socket={quote(paths[0], safe='/')}"
    env["nbd"] = env["uri"]
    if tls != "off":
        env["tls"] = "2" if tls == "require" else "1"
    return env


def _reachable(host: str) -> str:
    """A host a local client can connect to, for a listening address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def stdin_socket() -> socket.socket:
    """--stdin: the connected socket on standard input (inetd, systemd's
    StandardInput=socket, `nbdinfo [ CMD ]`); stdin and stdout then become /dev/null,
    and so does stderr when it is the same socket (inetd's way), lest a log line
    reach the client."""
    try:
        st = os.fstat(0)
    except OSError:
        st = None
    if st is None or not stat.S_ISSOCK(st.st_mode):
        raise UsageError("--stdin: standard input is not a socket (start me from inetd, a "
                         "systemd socket with Accept=yes, or a client such as nbdinfo [ CMD ])")
    sock = socket.socket(fileno=os.dup(0))
    stderr_too = False
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET,
                                                         socket.SO_ACCEPTCONN):
        sock.close()
        raise UsageError("--stdin: standard input is not a connected stream socket")
    with contextlib.suppress(OSError):
        stderr_too = os.path.samestat(st, os.fstat(2))
    _to_devnull(0)
    _to_devnull(1)
    if stderr_too:
        _to_devnull(2)
    return sock
