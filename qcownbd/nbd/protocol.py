"""The NBD wire format as pure functions: bytes in, values out, and back.

No sockets here (the h11 idea): the handshake logic (`negotiation`) and the
connection feed these functions bytes and send what they return, so every
message can be checked byte for byte without a server running.
"""

import errno as host_errno
import struct
from enum import IntEnum
from typing import NamedTuple

from qcownbd.errors import ImageIOError, ProtocolError, QcownbdError
from qcownbd.nbd.constants import (
    CONTEXT_ALLOCATION_DEPTH, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, IHAVEOPT, NBDMAGIC,
    OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, ClientFlag,
    CmdFlag, Errno, HandshakeFlag, Info, Rep, ReplyFlag, ReplyType, StateFlag, TransmissionFlag,
)

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_CHUNK = struct.Struct(">IHHQI")
EXTENDED_CHUNK = struct.Struct(">IHHQQQ")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ERROR_PAYLOAD = struct.Struct(">IH")
_HOLE_PAYLOAD = struct.Struct(">QI")
_BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")
#: an OFFSET_DATA chunk header and its offset, packed at once (the READ reply path)
_STRUCTURED_DATA = struct.Struct(">IHHQIQ")
_EXTENDED_DATA = struct.Struct(">IHHQQQQ")

#: the 124 zero bytes that end an EXPORT_NAME reply unless NO_ZEROES was agreed
EXPORT_NAME_PADDING = bytes(124)


class ReplyMode(IntEnum):
    """Which reply headers the client agreed to during negotiation."""

    SIMPLE = 0
    STRUCTURED = 1
    EXTENDED = 2


class Request(NamedTuple):
    """One transmission-phase request header (its WRITE payload follows it)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class BadOption(QcownbdError):
    """An option cannot be granted; answered with ``rep`` and the negotiation goes on.

    Its message is sent to the client, so it names nothing of the host.
    """

    def __init__(self, rep: int, message: str):
        super().__init__(message, public=message)
        self.rep = rep


# ---------------------------------------------------------------- handshake

def greeting() -> bytes:
    """The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
    flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def parse_client_flags(data) -> ClientFlag:
    """The client's 32-bit flags; unknown bits are a protocol error (close)."""
    (value,) = CLIENT_FLAGS.unpack(data)
    known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    if value & ~known:
        raise ProtocolError(f"unknown client flags {value:#x}")
    return ClientFlag(value)


def parse_option_header(data) -> tuple[int, int]:
    """(option, payload length) from a 16-byte option header."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return option, length


def option_request(option: int, payload: bytes) -> bytes:
    """One option as the client sent it (handed on to a worker, which reads it again)."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload


def option_reply(option: int, rep: int, payload=b"") -> bytes:
    """One option reply: header and payload."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, rep, len(payload)) + payload


def option_error(option: int, rep: int, message: str) -> bytes:
    """An option error reply carrying a human-readable message."""
    return option_reply(option, rep, message.encode()[:4096])


def _take(data, pos: int, count: int, what: str) -> tuple[bytes, int]:
    if pos + count > len(data):
        raise BadOption(Rep.ERR_INVALID, f"option payload too short for {what}")
    return bytes(data[pos:pos + count]), pos + count


def _take_u32(data, pos: int, what: str) -> tuple[int, int]:
    raw, pos = _take(data, pos, 4, what)
    return _U32.unpack(raw)[0], pos


def _decode_name(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadOption(Rep.ERR_INVALID, f"{what} is not UTF-8") from None


def parse_info_request(data) -> tuple[str, list[int]]:
    """(export name, requested NBD_INFO_* types) from an INFO/GO payload."""
    name_len, pos = _take_u32(data, 0, "the name length")
    raw, pos = _take(data, pos, name_len, "the export name")
    raw_count, pos = _take(data, pos, 2, "the info request count")
    (count,) = _U16.unpack(raw_count)
    raw_infos, pos = _take(data, pos, 2 * count, "the info requests")
    if pos != len(data):
        raise BadOption(Rep.ERR_INVALID, "trailing bytes after the info requests")
    infos = list(struct.unpack(f">{count}H", raw_infos))
    return _decode_name(raw, "export name"), infos


def parse_meta_context_request(data) -> tuple[str, list[str]]:
    """(export name, queries) from a LIST/SET_META_CONTEXT payload."""
    name_len, pos = _take_u32(data, 0, "the name length")
    raw, pos = _take(data, pos, name_len, "the export name")
    count, pos = _take_u32(data, pos, "the query count")
    queries = []
    for _ in range(count):
        query_len, pos = _take_u32(data, pos, "a query length")
        query, pos = _take(data, pos, query_len, "a query")
        queries.append(_decode_name(query, "meta context query"))
    if pos != len(data):
        raise BadOption(Rep.ERR_INVALID, "trailing bytes after the queries")
    return _decode_name(raw, "export name"), queries


def match_meta_contexts(queries: list[str], known: dict[str, int],
                        listing: bool) -> list[tuple[str, int]]:
    """The (name, id) pairs the queries select among ``known`` contexts.

    A query naming a namespace ("base:", "qemu:") selects all of it; with no
    queries LIST returns every context and SET selects none (per the spec).
    """
    if not queries:
        return list(known.items()) if listing else []
    chosen = []
    for query in queries:
        for name, ctx_id in known.items():
            hit = name == query or (query.endswith(":") and name.startswith(query))
            if hit and (name, ctx_id) not in chosen:
                chosen.append((name, ctx_id))
    return chosen


def server_entry(name: str, description: str) -> bytes:
    """REP_SERVER payload for LIST: the name, then its description."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def meta_context_entry(ctx_id: int, name: str) -> bytes:
    """REP_META_CONTEXT payload: the id, then the context name."""
    return _U32.pack(ctx_id) + name.encode()


def info_export(size: int, flags: int) -> bytes:
    """NBD_INFO_EXPORT payload."""
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def info_text(info: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload."""
    return _U16.pack(info) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_INFO_BLOCK_SIZE payload."""
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to a successful NBD_OPT_EXPORT_NAME."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + EXPORT_NAME_PADDING


def transmission_flags(read_only: bool, can_trim: bool, can_fast_zero: bool) -> int:
    """The NBD_FLAG_* an export advertises, from what its backend can do.

    CAN_MULTI_CONN holds because all connections to an export share one
    backend object, so a FLUSH on any of them covers every completed write.
    """
    flags = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
             | TransmissionFlag.SEND_DF | TransmissionFlag.CAN_MULTI_CONN
             | TransmissionFlag.SEND_CACHE)
    if read_only:
        return int(flags | TransmissionFlag.READ_ONLY)
    flags |= TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES
    if can_trim:
        flags |= TransmissionFlag.SEND_TRIM
    if can_fast_zero:
        flags |= TransmissionFlag.SEND_FAST_ZERO
    return int(flags)


# ------------------------------------------------------------ transmission

# plain ints for the per-request functions (enum members cost an attribute lookup
# each, and arithmetic with an IntFlag runs Python code)
_EXTENDED = ReplyMode.EXTENDED
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA, _NONE = int(ReplyType.OFFSET_DATA), int(ReplyType.NONE)


def request_size(mode: ReplyMode) -> int:
    """Bytes in one request header for the negotiated mode."""
    return EXTENDED_REQUEST.size if mode == ReplyMode.EXTENDED else REQUEST.size


def parse_request(buf, pos: int, mode: ReplyMode) -> Request:
    """The request header at ``buf[pos:]`` (compact or extended by ``mode``)."""
    if mode == _EXTENDED:
        magic, flags, cmd, cookie, offset, length = EXTENDED_REQUEST.unpack_from(buf, pos)
        expected = EXTENDED_REQUEST_MAGIC
    else:
        magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf, pos)
        expected = REQUEST_MAGIC
    if magic != expected:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, cmd, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (a successful READ's data follows it)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(mode: ReplyMode, flags: int, rtype: int, cookie: int,
                 req_offset: int, length: int) -> bytes:
    """A structured (or, in extended mode, extended) reply chunk header."""
    if mode == _EXTENDED:
        return EXTENDED_CHUNK.pack(EXTENDED_REPLY_MAGIC, flags, rtype, cookie,
                                   req_offset, length)
    return STRUCTURED_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def offset_data_header(mode: ReplyMode, cookie: int, req_offset: int, offset: int,
                       data_len: int, done: bool) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; ``data_len`` bytes follow."""
    flags = _DONE if done else 0
    if mode == _EXTENDED:
        return _EXTENDED_DATA.pack(EXTENDED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                   req_offset, 8 + data_len, offset)
    return _STRUCTURED_DATA.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                 8 + data_len, offset)


def offset_hole_chunk(mode: ReplyMode, cookie: int, req_offset: int, offset: int,
                      length: int, done: bool) -> bytes:
    """An OFFSET_HOLE chunk: ``length`` bytes of zeros at ``offset``."""
    return chunk_header(mode, ReplyFlag.DONE if done else 0, ReplyType.OFFSET_HOLE,
                        cookie, req_offset, _HOLE_PAYLOAD.size) + _HOLE_PAYLOAD.pack(offset, length)


def block_status_chunk(mode: ReplyMode, cookie: int, req_offset: int, ctx_id: int,
                       extents: list[tuple[int, int]], done: bool) -> bytes:
    """A BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk of (length, flags) extents."""
    flat = [value for extent in extents for value in extent]
    if mode == ReplyMode.EXTENDED:
        payload = (_BLOCK_STATUS_EXT_HEAD.pack(ctx_id, len(extents))
                   + struct.pack(f">{len(flat)}Q", *flat))
        rtype = ReplyType.BLOCK_STATUS_EXT
    else:
        payload = _U32.pack(ctx_id) + struct.pack(f">{len(flat)}I", *flat)
        rtype = ReplyType.BLOCK_STATUS
    return chunk_header(mode, ReplyFlag.DONE if done else 0, rtype, cookie,
                        req_offset, len(payload)) + payload


def error_chunk(mode: ReplyMode, cookie: int, req_offset: int, error: int,
                message: str = "", offset: int | None = None) -> bytes:
    """A final ERROR chunk (ERROR_OFFSET when ``offset`` is given)."""
    text = message.encode()[:4096]
    payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
    rtype = ReplyType.ERROR
    if offset is not None:
        payload += _U64.pack(offset)
        rtype = ReplyType.ERROR_OFFSET
    return chunk_header(mode, ReplyFlag.DONE, rtype, cookie, req_offset,
                        len(payload)) + payload


def done_reply(mode: ReplyMode, cookie: int, req_offset: int) -> bytes:
    """Success without data: a simple reply, or a NONE chunk in extended mode."""
    if mode == _EXTENDED:
        return chunk_header(mode, _DONE, _NONE, cookie, req_offset, 0)
    return simple_reply(cookie)


def error_reply(mode: ReplyMode, cookie: int, req_offset: int, error: int,
                message: str = "") -> bytes:
    """A failed request's reply, structured whenever the client allows it."""
    if mode == ReplyMode.SIMPLE:
        return simple_reply(cookie, error)
    return error_chunk(mode, cookie, req_offset, error, message)


def status_descriptors(extents, context: str) -> list[tuple[int, int]]:
    """(length, flags) descriptors of one metadata context, adjacent equals merged.

    ``extents`` are backend `Extent`s; base:allocation flags are HOLE|ZERO,
    qemu:allocation-depth flags are the depth itself.
    """
    depth = context == CONTEXT_ALLOCATION_DEPTH
    out: list[list[int]] = []
    for extent in extents:
        if depth:
            flags = extent.depth
        else:
            flags = (StateFlag.HOLE if extent.hole else 0) | (StateFlag.ZERO if extent.zero else 0)
        if out and out[-1][1] == flags:
            out[-1][0] += extent.length
        else:
            out.append([extent.length, int(flags)])
    return [(length, flags) for length, flags in out]


# ------------------------------------------------------------------ errors

_WIRE_ERRNO = {
    host_errno.EPERM: Errno.EPERM, host_errno.EACCES: Errno.EPERM,
    host_errno.EROFS: Errno.EPERM, host_errno.EIO: Errno.EIO,
    host_errno.ENOMEM: Errno.ENOMEM, host_errno.EINVAL: Errno.EINVAL,
    host_errno.ENOSPC: Errno.ENOSPC, host_errno.EDQUOT: Errno.ENOSPC,
    host_errno.EFBIG: Errno.ENOSPC, host_errno.EOVERFLOW: Errno.EOVERFLOW,
    host_errno.ENOTSUP: Errno.ENOTSUP, host_errno.EOPNOTSUPP: Errno.ENOTSUP,
    host_errno.ESHUTDOWN: Errno.ESHUTDOWN,
}
#: wire errors a client may only see when its request's flags ask for them
#: (nbdkit's nbd_errno): ENOTSUP answers FAST_ZERO, EOVERFLOW answers DF
_ONLY_WITH_FLAG = {Errno.ENOTSUP: int(CmdFlag.FAST_ZERO), Errno.EOVERFLOW: int(CmdFlag.DF)}


def nbd_error_code(exc: BaseException, flags: int = 0) -> int:
    """THE mapping from an exception to the errno an NBD client receives.

    ``flags`` are the failed request's command flags: ENOTSUP is only ever
    the answer to a FAST_ZERO request and EOVERFLOW to a DF one; anywhere
    else either becomes EINVAL, which every client understands.
    """
    if isinstance(exc, (ImageIOError, OSError)) and exc.errno is not None:
        code = _WIRE_ERRNO.get(exc.errno, Errno.EIO)
    elif isinstance(exc, MemoryError):
        code = Errno.ENOMEM
    else:
        code = Errno.EIO
    needed = _ONLY_WITH_FLAG.get(code)
    if needed is not None and not flags & needed:
        code = Errno.EINVAL
    return int(code)


def client_message(exc: BaseException) -> str:
    """The text a client may read about ``exc``: never a host path, never internals."""
    if isinstance(exc, QcownbdError):
        return exc.public
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror     # str(OSError) would add the file name
    return "internal error"
