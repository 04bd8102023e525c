"""Option haggling of one connection as a state machine without I/O.

The connection reads an option, hands it to `Negotiation.option`, sends the
replies it gets back and does what the result's action says.  Tests drive
it with bytes alone.  What was agreed when transmission starts is one small
value, the `Session`; a negotiation that ends without one says why in
`Negotiation.unattached` (the connection's one log line).
"""

import logging
from dataclasses import dataclass, field
from enum import Enum

from qcownbd.errors import ExportOpening, NoSuchExport, QcownbdError
from qcownbd.nbd import protocol
from qcownbd.nbd.constants import (
    MAX_REQUEST_SIZE, MAX_STRING, META_CONTEXT_IDS, ClientFlag, Info, Opt, Rep,
)
from qcownbd.nbd.protocol import BadOption, ReplyMode

#: option payloads above this are discarded unread and refused (ERR_TOO_BIG)
MAX_OPTION_PAYLOAD = 2 * MAX_STRING + 1024
#: ... and above this the connection closes: skipping gigabytes of junk would only
#: keep a connection slot busy (qemu-nbd and nbdkit close at once too)
MAX_SKIPPED_OPTION = 1024 * 1024
#: the rate-limit kind of a refusal's log line, by the error reply it got
REFUSAL_KINDS = {Rep.ERR_UNKNOWN: "export refused", Rep.ERR_TLS_REQD: "TLS required",
                 Rep.ERR_POLICY: "TLS not offered"}


class Action(Enum):
    """What the connection does after sending an option's replies."""

    CONTINUE = "continue"
    TRANSMIT = "transmit"
    CLOSE = "close"
    STARTTLS = "starttls"
    #: ask the same option again once ``pending`` is done (an export is being opened)
    WAIT = "wait"


@dataclass(frozen=True)
class Session:
    """What a client agreed before transmission: the state its requests are served in."""

    export_name: str
    mode: ReplyMode
    #: metadata context id -> name, for BLOCK_STATUS
    contexts: dict[int, str]
    no_zeroes: bool
    tls: bool

    def summary(self, read_only: bool) -> str:
        """What was agreed, for the log: "replies=structured contexts=base:allocation ..."."""
        contexts = ",".join(self.contexts.values()) or "-"
        return (f"replies={self.mode.name.lower()} contexts={contexts} "
                f"tls={'yes' if self.tls else 'no'} read-only={'yes' if read_only else 'no'}")


class Refused(BadOption):
    """A refusal whose log text (``str()``) says more than the client may read
    (``public``): an allow list's refusal reads as an unknown name to the client."""

    def __init__(self, rep: int, public: str, detail: str):
        QcownbdError.__init__(self, detail, public=public)
        self.rep = rep


@dataclass
class OptionResult:
    """Replies to send, then the next step (with the chosen export on TRANSMIT)."""

    replies: list[bytes] = field(default_factory=list)
    action: Action = Action.CONTINUE
    export: object = None
    #: WAIT: the future to wait for
    pending: object = None


def transmission_flags(export) -> int:
    """The NBD_FLAG_* of ``export``, from what it and its backend say they can do."""
    return protocol.transmission_flags(export.read_only, export.backend.can_trim,
                                       export.backend.can_fast_zero)


class Negotiation:
    """The negotiation state of one client: reply mode, contexts, chosen export.

    ``exports`` has ``lookup(name)`` (raising NoSuchExport) and ``listing()``
    -> [(name, description)]; an export has ``name``, ``size``, ``read_only``,
    ``backend`` (for its capabilities), ``description``, ``preferred_block_size``
    and ``claim()`` (raising NoSuchExport when GO/EXPORT_NAME cannot have it).

    ``tls`` is the server's policy ("off", "on" or "require"); ``tls_active``
    says this negotiation runs over TLS already (it restarts after STARTTLS).
    """

    def __init__(self, exports, tls: str = "off", tls_active: bool = False,
                 no_zeroes: bool = False):
        self.exports = exports
        self.tls = tls
        self.tls_active = tls_active
        self.mode = ReplyMode.SIMPLE
        self.no_zeroes = no_zeroes
        #: context id -> name, valid for ``context_export`` only
        self.contexts: dict[int, str] = {}
        self.context_export: str | None = None
        #: (rate-limit kind, reason) of the last option refused, for the log
        self.refusal: tuple[str, str] | None = None
        #: whether the client listed the exports (LIST), for the log
        self.listed = False

    def restarted_over_tls(self) -> "Negotiation":
        """The negotiation that starts after STARTTLS: nothing agreed before TLS holds."""
        return Negotiation(self.exports, self.tls, tls_active=True, no_zeroes=self.no_zeroes)

    def refuse(self, kind: str, reason: str) -> None:
        """Remember why the client was refused (``kind``: its log line's rate-limit kind)."""
        self.refusal = (kind, reason)

    def unattached(self) -> tuple[int, str, str]:
        """(log level, rate-limit kind, why) of a connection that ends before
        transmission: the last refusal, else what the client did ask."""
        if self.refusal is not None:
            return logging.WARNING, *self.refusal
        if self.listed:
            return logging.INFO, "client left", "client left after listing the exports"
        return logging.INFO, "client left", "client left without choosing an export"

    def session(self, export) -> Session:
        """The agreed state for transmission on ``export`` (after TRANSMIT)."""
        return Session(export.name, self.mode, dict(self.contexts), self.no_zeroes,
                       self.tls_active)

    def client_flags(self, data) -> None:
        """Take the client's flags word; unknown bits raise `ProtocolError`."""
        flags = protocol.parse_client_flags(data)
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)

    def oversized(self, option: int, length: int) -> OptionResult:
        """An option whose payload is too big to read: refused, and skipped (CONTINUE)
        when it is modestly big, else the connection closes."""
        if option == Opt.EXPORT_NAME:
            return self._closing("option refused", f"EXPORT_NAME of {length} bytes")
        result = self._error(option, Rep.ERR_TOO_BIG,
                             f"option payload of {length} bytes is too big")
        if length > MAX_SKIPPED_OPTION:
            result.action = Action.CLOSE
        return result

    def option(self, option: int, payload: bytes) -> OptionResult:
        """Answer one option."""
        if self.tls == "require" and not self.tls_active \
                and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                return self._closing("TLS required", "TLS is required; the client sent "
                                     "EXPORT_NAME without STARTTLS")
            return self._error(option, Rep.ERR_TLS_REQD, "TLS is required: use STARTTLS",
                               "TLS is required; the client did not use STARTTLS")
        handler = self._HANDLERS.get(option)
        if handler is None:
            return self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
        try:
            return handler(self, option, payload)
        except BadOption as exc:
            return self._error(option, exc.rep, exc.public, str(exc))
        except ExportOpening as exc:
            # handlers change nothing before their lookup: the option can be asked again
            return OptionResult(action=Action.WAIT, pending=exc.pending)

    def _error(self, option: int, rep: int, message: str, detail: str = "") -> OptionResult:
        """The error reply ``message``; ``detail`` (default: the message) is the log's."""
        self.refuse(REFUSAL_KINDS.get(rep, "option refused"), detail or message)
        return OptionResult([protocol.option_error(option, rep, message)])

    def _closing(self, kind: str, reason: str) -> OptionResult:
        """End the connection without a reply (EXPORT_NAME cannot be refused politely)."""
        self.refuse(kind, reason)
        return OptionResult(action=Action.CLOSE)

    @staticmethod
    def _require_empty(payload: bytes) -> None:
        if payload:
            raise BadOption(Rep.ERR_INVALID, "this option takes no data")

    def _lookup(self, name: str, claim: bool = False):
        """The export ``name`` (claimed for transmission when ``claim``), or ERR_UNKNOWN."""
        try:
            export = self.exports.lookup(name)
            if claim:
                export.claim()
            return export
        except NoSuchExport as exc:
            raise Refused(Rep.ERR_UNKNOWN, exc.public, str(exc)) from None

    # ------------------------------------------------------------ handlers

    def _export_name(self, option, payload) -> OptionResult:
        if self.mode == ReplyMode.EXTENDED:
            # the spec: a client that negotiated extended headers must use GO
            return self._closing("option refused", "EXPORT_NAME after extended headers")
        try:
            export = self.exports.lookup(payload.decode())
            export.claim()
        except NoSuchExport as exc:
            return self._closing("export refused", str(exc))
        except UnicodeDecodeError:
            return self._closing("export refused", "export name is not UTF-8")
        self._drop_contexts_unless(export.name)
        reply = protocol.export_name_reply(export.size, transmission_flags(export),
                                           self.no_zeroes)
        return OptionResult([reply], Action.TRANSMIT, export)

    def _abort(self, option, payload) -> OptionResult:
        return OptionResult([protocol.option_reply(option, Rep.ACK)], Action.CLOSE)

    def _list(self, option, payload) -> OptionResult:
        self._require_empty(payload)
        replies = [protocol.option_reply(option, Rep.SERVER, protocol.server_entry(name, desc))
                   for name, desc in self.exports.listing()]
        replies.append(protocol.option_reply(option, Rep.ACK))
        self.listed = True
        return OptionResult(replies)

    def _starttls(self, option, payload) -> OptionResult:
        self._require_empty(payload)
        if self.tls == "off":
            return self._error(option, Rep.ERR_POLICY, "TLS is not configured on this server",
                               "the client asked for TLS, which is off on this server")
        if self.tls_active:
            return self._error(option, Rep.ERR_INVALID, "TLS is already in use")
        return OptionResult([protocol.option_reply(option, Rep.ACK)], Action.STARTTLS)

    def _info_or_go(self, option, payload) -> OptionResult:
        name, infos = protocol.parse_info_request(payload)
        # GO claims the export before its replies go out, so claiming can still refuse
        export = self._lookup(name, claim=option == Opt.GO)
        replies = [protocol.option_reply(
            option, Rep.INFO, protocol.info_export(export.size, transmission_flags(export)))]
        if Info.NAME in infos:
            replies.append(protocol.option_reply(option, Rep.INFO,
                                                 protocol.info_text(Info.NAME, export.name)))
        if Info.DESCRIPTION in infos and export.description:
            replies.append(protocol.option_reply(
                option, Rep.INFO, protocol.info_text(Info.DESCRIPTION, export.description)))
        # sent unasked too: minimum 1 tells every client that any alignment works
        replies.append(protocol.option_reply(option, Rep.INFO, protocol.info_block_size(
            1, export.preferred_block_size, MAX_REQUEST_SIZE)))
        replies.append(protocol.option_reply(option, Rep.ACK))
        if option == Opt.INFO:
            return OptionResult(replies)
        self._drop_contexts_unless(export.name)
        return OptionResult(replies, Action.TRANSMIT, export)

    def _structured_reply(self, option, payload) -> OptionResult:
        self._require_empty(payload)
        if self.mode == ReplyMode.EXTENDED:
            return self._error(option, Rep.ERR_EXT_HEADER_REQD,
                               "extended headers are already in use")
        self.mode = ReplyMode.STRUCTURED
        return OptionResult([protocol.option_reply(option, Rep.ACK)])

    def _extended_headers(self, option, payload) -> OptionResult:
        self._require_empty(payload)
        self.mode = ReplyMode.EXTENDED
        return OptionResult([protocol.option_reply(option, Rep.ACK)])

    def _meta_context(self, option, payload) -> OptionResult:
        name, queries = protocol.parse_meta_context_request(payload)
        setting = option == Opt.SET_META_CONTEXT
        if setting and self.mode == ReplyMode.SIMPLE:
            raise BadOption(Rep.ERR_INVALID, "SET_META_CONTEXT needs structured replies")
        export = self._lookup(name)
        chosen = protocol.match_meta_contexts(queries, META_CONTEXT_IDS, listing=not setting)
        if setting:
            self.contexts = {ctx_id: ctx for ctx, ctx_id in chosen}
            self.context_export = export.name
        replies = [protocol.option_reply(option, Rep.META_CONTEXT,
                                         protocol.meta_context_entry(ctx_id if setting else 0, ctx))
                   for ctx, ctx_id in chosen]
        replies.append(protocol.option_reply(option, Rep.ACK))
        return OptionResult(replies)

    def _drop_contexts_unless(self, export_name: str) -> None:
        # contexts set for one export mean nothing for another (spec: GO drops them)
        if self.context_export != export_name:
            self.contexts = {}

    _HANDLERS = {
        Opt.EXPORT_NAME: _export_name,
        Opt.ABORT: _abort,
        Opt.LIST: _list,
        Opt.STARTTLS: _starttls,
        Opt.INFO: _info_or_go,
        Opt.GO: _info_or_go,
        Opt.STRUCTURED_REPLY: _structured_reply,
        Opt.LIST_META_CONTEXT: _meta_context,
        Opt.SET_META_CONTEXT: _meta_context,
        Opt.EXTENDED_HEADERS: _extended_headers,
    }

