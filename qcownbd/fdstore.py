"""`systemctl restart` without losing a client: systemd's file descriptor store.

With ``serve --fd-store`` under systemd (the unit sets FileDescriptorStoreMax=),
SIGTERM holds every connection at a request boundary as a live handover
does, commits the images, and gives systemd (sd_notify(3): ``FDSTORE=1``,
``FDNAME=``) the listening sockets it bound itself, each connection's
socket, and a memfd with the connections' state (`qcownbd.handover`).
systemd keeps them while the service restarts and passes them to the next
start (LISTEN_FDS, LISTEN_FDNAMES: sd_listen_fds_with_names(3)), which
recognises the names, opens the fleet overlays the connections write,
serves on, and takes them out of the store
(``FDSTOREREMOVE=1``): a socket the store still held would stay open after
the server closed it.  A socket unit's own listening socket is systemd's
already and is not stored.
"""

import asyncio
import logging
import os
import socket

from qcownbd import systemd
from qcownbd.errors import HandoverError, QcownbdError
from qcownbd.handover import decode_state, dumps, loads
from qcownbd.upgrade import HOLD_TIMEOUT, commit_and_unlock, encoded_connections

log = logging.getLogger("qcownbd.server")

PREFIX = "qcownbd-"
LISTEN = PREFIX + "listen"
STATE = PREFIX + "state"
CONNECTION = PREFIX + "conn-"


async def keep_for_restart(server, registry, unit_sockets: list, pool=None) -> bool:
    """SIGTERM with --fd-store: hold the connections (with worker processes, ``pool``,
    theirs too), commit the images and store it all (not the socket unit's listeners,
    ``unit_sockets`` by name); False, and nothing held, when there is no
    $NOTIFY_SOCKET (the server then stops as usual)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        log.warning("--fd-store: no NOTIFY_SOCKET (not started by systemd); stopping "
                    "without keeping the connections")
        return False
    listening = [sock for sock in server.stop_listening()
                 if sock.getsockname() not in unit_sockets]
    held = await server.hold_for_handover(HOLD_TIMEOUT)
    collected = []
    try:
        await asyncio.get_running_loop().run_in_executor(
            None, commit_and_unlock, registry.open_exports())
        if pool is not None:
            # the workers' connections come here, held, their images committed
            collected = await pool.hold(HOLD_TIMEOUT)
    except HandoverError as exc:
        log.error("%s; stopping without keeping the connections", exc)
        server.release_held(held)
        return False
    connections = encoded_connections(held, collected)
    if not store(listening, connections):
        log.error("could not give systemd the file descriptors; the clients lose their "
                  "connections")
        server.release_held(held)
        if pool is not None:
            await pool.release(collected)
        return False
    if pool is not None:
        pool.finish()       # systemd has the connections: the workers go without a word
    log.info("kept %d connection(s) and %d listening socket(s) in systemd's file "
             "descriptor store for the next start", len(connections), len(listening))
    return True


def connection_name(index: int) -> str:
    """The FDNAME of the ``index``-th connection stored."""
    return f"{CONNECTION}{index}"


def state_document(named_states: dict) -> bytes:
    """The memfd's content: {FDNAME: connection state}."""
    return dumps({"version": 1, "connections": named_states})


def store(listening: list[socket.socket], connections: list[tuple]) -> bool:
    """Give systemd the ``listening`` sockets and the ``connections`` (encoded state,
    socket); False when it cannot be told (no $NOTIFY_SOCKET, or it refused)."""
    states = {connection_name(i): state for i, (state, _sock) in enumerate(connections)}
    memfd = os.memfd_create(STATE, os.MFD_CLOEXEC)
    try:
        os.write(memfd, state_document(states))
        sent = systemd.notify(f"FDSTORE=1\nFDNAME={STATE}", [memfd])
        for sock in listening:
            sent = sent and systemd.notify(f"FDSTORE=1\nFDNAME={LISTEN}", [sock.fileno()])
        for index, (_state, sock) in enumerate(connections):
            sent = sent and systemd.notify(f"FDSTORE=1\nFDNAME={connection_name(index)}",
                                           [sock.fileno()])
    finally:
        os.close(memfd)
    return sent


class Restored:
    """What a previous start left in the store: listening sockets and connections."""

    def __init__(self):
        self.listening: list[socket.socket] = []
        #: (ConnectionState, socket)
        self.connections: list[tuple] = []
        self.names: set[str] = set()

    @classmethod
    def take(cls, fds: list[tuple[str, int]]) -> tuple["Restored", list[tuple[str, int]]]:
        """Ours out of systemd's (name, fd) list; the rest is a socket unit's."""
        restored, others = cls(), []
        sockets, states = {}, {}
        for name, fd in fds:
            if not name.startswith(PREFIX):
                others.append((name, fd))
                continue
            restored.names.add(name)
            if name == STATE:
                states.update(_read_states(fd))
                os.close(fd)
            elif name == LISTEN:
                restored.listening.append(socket.socket(fileno=fd))
            else:
                sockets[name] = socket.socket(fileno=fd)
        for name, sock in sockets.items():
            if name in states:
                restored.connections.append((states[name], sock))
            else:
                log.warning("restart: connection %s has no state; closing it", name)
                sock.close()
        return restored, others

    async def reopen_overlays(self, reopen) -> None:
        """Open the fleet overlays the stored connections write, before they resume
        (``await reopen({FLEET/ID: file})``, in the process that will serve them); a
        connection whose overlay cannot be opened is closed (the server that stored it
        is gone: nobody else can serve it), and logged."""
        kept = []
        for state, sock in self.connections:
            if state.overlay is not None:
                try:
                    await reopen({state.session.export_name: state.overlay})
                except QcownbdError as exc:
                    log.error("restart: %s: not resumed: %s", state.client, exc)
                    sock.close()
                    continue
            kept.append((state, sock))
        self.connections[:] = kept

    def forget(self) -> None:
        """Take what we were given out of systemd's store (it is ours now)."""
        for name in sorted(self.names):
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        if self.names:
            log.info("restart: resumed %d connection(s) and %d listening socket(s) from "
                     "systemd's file descriptor store", len(self.connections),
                     len(self.listening))


def _read_states(fd: int) -> dict:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    try:
        document = loads(b"".join(chunks))
        return {name: decode_state(state) for name, state in document["connections"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, HandoverError) as exc:
        log.error("restart: the stored connection state is unreadable (%s); "
                  "closing the stored connections", exc)
        return {}
