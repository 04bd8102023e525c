"""What a live handover passes on: each connection's state, and the messages.

A connection is handed over at a request boundary, in transmission, without
TLS (an ssl session's keys live in the process); what the successor needs
to go on serving it is what negotiation agreed (`Session`), its counters,
and the bytes already read from the socket but not yet framed (the rest of
the client's stream waits in the kernel for the successor).  Everything
here is pure: JSON in, JSON out, byte for byte the same on a round trip.

The messages between the two processes are JSON lines over a Unix socket
pair (`qcownbd.handover_channel`); the descriptors travel with them
(SCM_RIGHTS), in the order the message lists them.
"""

import base64
import json
import time
from dataclasses import dataclass

from qcownbd.errors import HandoverError
from qcownbd.nbd.negotiation import Session
from qcownbd.nbd.protocol import ReplyMode

#: the environment variable naming the successor's end of the socket pair
HANDOVER_FD_ENV = "QCOWNBD_HANDOVER_FD"
#: the version of the state; a successor refuses one it does not know
STATE_VERSION = 1


@dataclass(frozen=True)
class ConnectionState:
    """One transmitting connection as the successor must resume it."""

    session: Session
    client: str                 # the label the log knows it by
    requests: int
    bytes_read: int
    bytes_written: int
    errors: int
    seconds: float              # how long it has been connected
    leftover: bytes             # received, not yet framed


def encode_state(state: ConnectionState) -> dict:
    """The JSON-able form of ``state``."""
    session = state.session
    return {
        "version": STATE_VERSION,
        "export": session.export_name,
        "mode": session.mode.name,
        # JSON keys are strings: the context ids become "1", "2"...
        "contexts": {str(cid): name for cid, name in session.contexts.items()},
        "no_zeroes": session.no_zeroes,
        "client": state.client,
        "requests": state.requests, "bytes_read": state.bytes_read,
        "bytes_written": state.bytes_written, "errors": state.errors,
        "seconds": state.seconds,
        "leftover": base64.b64encode(state.leftover).decode("ascii"),
    }


def decode_state(data: dict) -> ConnectionState:
    """The state `encode_state` wrote; HandoverError (one line) when it is not one."""
    try:
        if data["version"] != STATE_VERSION:
            raise HandoverError(f"handover: connection state version {data['version']!r} "
                              f"(this qcownbd knows {STATE_VERSION})")
        session = Session(str(data["export"]), ReplyMode[data["mode"]],
                          {int(cid): str(name) for cid, name in data["contexts"].items()},
                          bool(data["no_zeroes"]), False)
        return ConnectionState(session, str(data["client"]), int(data["requests"]),
                               int(data["bytes_read"]), int(data["bytes_written"]),
                               int(data["errors"]), float(data["seconds"]),
                               base64.b64decode(data["leftover"], validate=True))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HandoverError(f"handover: bad connection state: {exc!r}") from None


def state_of(conn) -> ConnectionState:
    """The state of ``conn`` (an `NbdConnection` held at a request boundary)."""
    stats = conn.stats
    return ConnectionState(conn.session, conn.client.label, stats.requests, stats.bytes_read,
                           stats.bytes_written, stats.errors,
                           round(time.monotonic() - stats.started, 6), conn.reader.leftover())


def dumps(message: dict) -> bytes:
    """One message line."""
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def loads(line: bytes) -> dict:
    """A message from one line; HandoverError when it is not a JSON object."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HandoverError("handover: a message that is not JSON") from None
    if not isinstance(message, dict):
        raise HandoverError("handover: a message that is not a JSON object")
    return message
