"""What a live handover passes on: each connection's state, and the messages.

A connection is handed over at a request boundary, in transmission, without
TLS (an ssl session's keys live in the process); what the successor needs
to go on serving it is what negotiation agreed (`Session`), its counters,
the file of the fleet overlay it writes (if any), and the bytes already
read from the socket but not yet framed (the rest of the client's stream
waits in the kernel for the successor).  Everything
here is pure: JSON in, JSON out, byte for byte the same on a round trip.

A server with worker processes (`qcownbd.workers`) hands a connection to
its worker earlier, while it negotiates, at the option that names the
export (`NegotiatingState`): the worker answers that option itself, as if
it had read it (it comes back first in ``leftover``).

The messages between the two processes are JSON lines over a Unix socket
pair (`qcownbd.handover_channel`); the descriptors travel with them
(SCM_RIGHTS), in the order the message lists them.
"""

import base64
import json
import time
from dataclasses import dataclass
from typing import ClassVar

from qcownbd.errors import HandoverError
from qcownbd.nbd import protocol
from qcownbd.nbd.negotiation import Negotiation, Session
from qcownbd.nbd.protocol import ReplyMode

#: the environment variable naming the successor's end of the socket pair
HANDOVER_FD_ENV = "QCOWNBD_HANDOVER_FD"
#: the version of the state; a successor refuses one it does not know
STATE_VERSION = 1


@dataclass(frozen=True)
class ConnectionState:
    """One transmitting connection as the successor must resume it."""

    #: (`NegotiatingState` is the one still negotiating)
    negotiating: ClassVar[bool] = False
    session: Session
    client: str                 # the label the log knows it by
    requests: int
    bytes_read: int
    bytes_written: int
    errors: int
    seconds: float              # how long it has been connected
    leftover: bytes             # received, not yet framed
    #: a fleet overlay's file (the export is `FLEET/ID`): the successor opens that very
    #: file before it resumes the connection; None for a configured export
    overlay: str | None = None


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
        "overlay": state.overlay,
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
                               base64.b64decode(data["leftover"], validate=True),
                               _optional_str(data.get("overlay")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HandoverError(f"handover: bad connection state: {exc!r}") from None


def _optional_str(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"not a string: {value!r}")
    return value


@dataclass(frozen=True)
class NegotiatingState:
    """A connection still negotiating, handed on at an option naming its export."""

    negotiating: ClassVar[bool] = True
    mode: ReplyMode
    no_zeroes: bool
    contexts: dict[int, str]    # set by SET_META_CONTEXT ...
    context_export: str | None  # ... for this export
    client: str
    leftover: bytes             # the option itself, then what followed it

    def negotiation(self, exports, tls: str) -> Negotiation:
        """The negotiation to go on with (never over TLS: it is not handed on)."""
        negotiation = Negotiation(exports, tls, no_zeroes=self.no_zeroes)
        negotiation.mode = self.mode
        negotiation.contexts = dict(self.contexts)
        negotiation.context_export = self.context_export
        return negotiation


def negotiating_state_of(conn, option: int, payload: bytes) -> NegotiatingState:
    """The state of ``conn`` (an `NbdConnection` negotiating, not reading) with the
    option it just read, ``option`` with ``payload``, put back in front of the rest."""
    negotiation = conn.negotiation
    request = protocol.option_request(option, payload)
    return NegotiatingState(negotiation.mode, negotiation.no_zeroes,
                            dict(negotiation.contexts), negotiation.context_export,
                            conn.client.label, request + conn.reader.leftover())


def encode_negotiating(state: NegotiatingState) -> dict:
    """The JSON-able form of ``state``."""
    return {"version": STATE_VERSION, "negotiating": True, "mode": state.mode.name,
            "no_zeroes": state.no_zeroes,
            "contexts": {str(cid): name for cid, name in state.contexts.items()},
            "context_export": state.context_export, "client": state.client,
            "leftover": base64.b64encode(state.leftover).decode("ascii")}


def decode_any(data: dict) -> "ConnectionState | NegotiatingState":
    """A state `encode_state` or `encode_negotiating` wrote; HandoverError otherwise."""
    if not isinstance(data, dict) or not data.get("negotiating"):
        return decode_state(data)
    try:
        if data["version"] != STATE_VERSION:
            raise HandoverError(f"handover: connection state version {data['version']!r} "
                                f"(this qcownbd knows {STATE_VERSION})")
        context_export = data["context_export"]
        return NegotiatingState(
            ReplyMode[data["mode"]], bool(data["no_zeroes"]),
            {int(cid): str(name) for cid, name in data["contexts"].items()},
            None if context_export is None else str(context_export), str(data["client"]),
            base64.b64decode(data["leftover"], validate=True))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HandoverError(f"handover: bad connection state: {exc!r}") from None


def state_of(conn) -> ConnectionState:
    """The state of ``conn`` (an `NbdConnection` held at a request boundary)."""
    stats = conn.stats
    # a transient export is a fleet's overlay, opened on the client's lookup
    overlay = conn.export.config.path if conn.export.transient else None
    return ConnectionState(conn.session, conn.client.label, stats.requests, stats.bytes_read,
                           stats.bytes_written, stats.errors,
                           round(time.monotonic() - stats.started, 6), conn.reader.leftover(),
                           overlay)


def overlays_of(states) -> dict[str, str]:
    """{export name: overlay file} of the fleet overlays ``states`` are connected to."""
    return {state.session.export_name: state.overlay for state in states
            if state.overlay is not None}


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
