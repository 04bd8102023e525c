"""The NBD codec and the option negotiation, byte for byte, without a server."""

import errno
import struct
from types import SimpleNamespace

import pytest

from nbdclient import OPTION_REPLY_MAGIC, go_payload, meta_payload
from qcownbd.errors import ImageIOError, NoSuchExport, ProtocolError
from qcownbd.image.backend import Extent
from qcownbd.nbd import protocol
from qcownbd.nbd.constants import Opt, Rep, TransmissionFlag
from qcownbd.nbd.negotiation import Action, Negotiation
from qcownbd.nbd.protocol import BadOption, ReplyMode

OPT_REPLY_MAGIC = OPTION_REPLY_MAGIC.to_bytes(8, "big")


def test_greeting_is_magic_ihaveopt_and_flags():
    assert protocol.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_accepted(flags):
    assert int(protocol.parse_client_flags(struct.pack(">I", flags))) == flags


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_are_a_protocol_error(flags):
    with pytest.raises(ProtocolError):
        protocol.parse_client_flags(struct.pack(">I", flags))


def test_option_header_and_bad_magic():
    assert protocol.parse_option_header(b"IHAVEOPT" + bytes.fromhex("00000007 0000000a")) == (7, 10)
    with pytest.raises(ProtocolError):
        protocol.parse_option_header(b"IHAVEOPX" + bytes(8))


def test_option_reply_layout():
    reply = protocol.option_reply(7, Rep.ACK)
    assert reply == OPT_REPLY_MAGIC + bytes.fromhex("00000007 00000001 00000000")
    err = protocol.option_error(3, Rep.ERR_UNSUP, "no")
    assert err == OPT_REPLY_MAGIC + bytes.fromhex("00000003 80000001 00000002") + b"no"


def test_info_request_parsing_and_errors():
    payload = go_payload(b"abc", 1, 3)
    assert protocol.parse_info_request(payload) == ("abc", [1, 3])
    for bad in (payload[:-1], payload + b"x", struct.pack(">I", 99) + b"abc"):
        with pytest.raises(BadOption) as info:
            protocol.parse_info_request(bad)
        assert info.value.rep == Rep.ERR_INVALID


def test_meta_context_request_and_matching():
    queries = [b"base:", b"qemu:allocation-depth", b"nope:x"]
    payload = meta_payload(b"e", queries)
    name, parsed = protocol.parse_meta_context_request(payload)
    assert (name, parsed) == ("e", ["base:", "qemu:allocation-depth", "nope:x"])
    known = {"base:allocation": 1, "qemu:allocation-depth": 2}
    assert protocol.match_meta_contexts(parsed, known, listing=False) == list(known.items())
    assert protocol.match_meta_contexts([], known, listing=True) == list(known.items())
    assert protocol.match_meta_contexts([], known, listing=False) == []
    assert protocol.match_meta_contexts(["qemu:"], known, listing=False) == [
        ("qemu:allocation-depth", 2)]


def test_info_payloads_and_export_name_reply():
    assert protocol.info_export(1 << 40, 0x1234) == bytes.fromhex("0000 0000010000000000 1234")
    assert protocol.info_block_size(1, 65536, 1 << 25) == bytes.fromhex(
        "0003 00000001 00010000 02000000")
    assert protocol.info_text(2, "hi") == b"\x00\x02hi"
    assert protocol.server_entry("ab", "desc") == b"\x00\x00\x00\x02abdesc"
    assert protocol.export_name_reply(512, 3, no_zeroes=True) == bytes.fromhex(
        "0000000000000200 0003")
    assert len(protocol.export_name_reply(512, 3, no_zeroes=False)) == 10 + 124


def test_transmission_flags_follow_capabilities():
    flags = protocol.transmission_flags(read_only=True, can_trim=True, can_fast_zero=True)
    assert flags & TransmissionFlag.READ_ONLY
    assert not flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_FUA
                        | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO)
    flags = protocol.transmission_flags(read_only=False, can_trim=False, can_fast_zero=False)
    assert flags & TransmissionFlag.SEND_FUA and flags & TransmissionFlag.CAN_MULTI_CONN
    assert not flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_FAST_ZERO)
    assert flags == 0b0_0101_1100_1101


def test_compact_and_extended_request_parsing():
    compact = bytes.fromhex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    assert protocol.parse_request(compact, 0, ReplyMode.STRUCTURED) == (1, 1, 0x0102030405060708,
                                                                       4096, 512)
    extended = bytes.fromhex("21e41c71 0000 0007 00000000000000ff 0000000000000000"
                             "0000020000000000")
    assert protocol.parse_request(b"xx" + extended, 2, ReplyMode.EXTENDED) == (
        0, 7, 255, 0, 1 << 41)
    with pytest.raises(ProtocolError):
        protocol.parse_request(compact + bytes(4), 0, ReplyMode.EXTENDED)
    with pytest.raises(ProtocolError):
        protocol.parse_request(extended, 0, ReplyMode.SIMPLE)


def test_simple_and_structured_replies():
    assert protocol.simple_reply(9, 22) == bytes.fromhex("67446698 00000016 0000000000000009")
    assert protocol.done_reply(ReplyMode.STRUCTURED, 9, 0) == protocol.simple_reply(9)
    assert protocol.done_reply(ReplyMode.EXTENDED, 9, 77) == bytes.fromhex(
        "6e8a278c 0001 0000 0000000000000009 000000000000004d 0000000000000000")
    assert protocol.offset_data_header(ReplyMode.STRUCTURED, 5, 0, 4096, 100, True) == bytes.fromhex(
        "668e33ef 0001 0001 0000000000000005 0000006c 0000000000001000")
    assert protocol.offset_hole_chunk(ReplyMode.STRUCTURED, 5, 0, 8192, 4096, False) == bytes.fromhex(
        "668e33ef 0000 0002 0000000000000005 0000000c 0000000000002000 00001000")
    assert protocol.error_chunk(ReplyMode.STRUCTURED, 5, 0, 5, "x") == bytes.fromhex(
        "668e33ef 0001 8001 0000000000000005 00000007 00000005 0001") + b"x"
    assert protocol.error_chunk(ReplyMode.STRUCTURED, 5, 0, 5, "", offset=3)[-8:] == bytes(7) + b"\3"
    assert protocol.error_reply(ReplyMode.SIMPLE, 5, 0, 1) == protocol.simple_reply(5, 1)


def test_block_status_chunks():
    compact = protocol.block_status_chunk(ReplyMode.STRUCTURED, 1, 0, 2, [(4096, 3), (512, 0)], True)
    assert compact == bytes.fromhex("668e33ef 0001 0005 0000000000000001 00000014 00000002"
                                    "00001000 00000003 00000200 00000000")
    ext = protocol.block_status_chunk(ReplyMode.EXTENDED, 1, 0, 2, [(1 << 33, 1)], False)
    assert ext == bytes.fromhex("6e8a278c 0000 0006 0000000000000001 0000000000000000"
                                "0000000000000018 00000002 00000001"
                                "0000000200000000 0000000000000001")


def test_status_descriptors_merge_per_context():
    extents = [Extent(10, True, True, 0), Extent(5, False, True, 1), Extent(7, False, False, 1)]
    assert protocol.status_descriptors(extents, "base:allocation") == [(10, 3), (5, 2), (7, 0)]
    assert protocol.status_descriptors(extents, "qemu:allocation-depth") == [(10, 0), (12, 1)]


FAST_ZERO, DF = 1 << 4, 1 << 2


@pytest.mark.parametrize("exc, flags, wire", [
    (ImageIOError(errno.ENOSPC), 0, 28), (ImageIOError(errno.EPERM), 0, 1),
    (ImageIOError(errno.EOPNOTSUPP), FAST_ZERO, 95), (OSError(errno.EIO, "x"), 0, 5),
    (OSError(errno.EDQUOT, "x"), 0, 28), (ImageIOError(errno.ENOENT), 0, 5),
    (ValueError("bug"), 0, 5), (MemoryError(), 0, 12), (ImageIOError(errno.EOVERFLOW), DF, 75),
    (ImageIOError(errno.EINVAL), 0, 22), (ImageIOError(errno.ESHUTDOWN), 0, 108),
    # nbdkit's rule: ENOTSUP only answers FAST_ZERO, EOVERFLOW only DF; else EINVAL
    (ImageIOError(errno.ENOTSUP), 0, 22), (ImageIOError(errno.EOPNOTSUPP), DF, 22),
    (ImageIOError(errno.EOVERFLOW), 0, 22), (OSError(errno.EOVERFLOW, "x"), FAST_ZERO, 22),
])
def test_nbd_error_code(exc, flags, wire):
    assert protocol.nbd_error_code(exc, flags) == wire


def test_client_messages_name_no_host_path():
    assert protocol.client_message(ImageIOError(errno.ENOSPC, "/srv/x.raw: write failed")) \
        == "No space left on device"
    assert protocol.client_message(OSError(errno.EIO, "Input/output error", "/srv/x")) \
        == "Input/output error"
    assert protocol.client_message(KeyError("/srv/x")) == "internal error"


# ------------------------------------------------------------ negotiation

class FakeExport:
    """What negotiation needs of an export (the real one wraps a backend)."""

    def __init__(self, name, description=""):
        self.name, self.description = name, description
        self.size, self.read_only, self.preferred_block_size = 1 << 20, True, 4096
        self.backend = SimpleNamespace(can_trim=False, can_fast_zero=False)

    def claim(self):
        pass


class FakeRegistry:
    def __init__(self, *exports):
        self.exports = {e.name: e for e in exports}

    def lookup(self, name):
        if name in self.exports:
            return self.exports[name]
        raise NoSuchExport(f"no export named {name!r}")

    def listing(self):
        return [(e.name, e.description) for e in self.exports.values()]


def _reply_types(result):
    return [struct.unpack(">I", reply[12:16])[0] for reply in result.replies]


def test_negotiation_go_sends_infos_then_ack():
    neg = Negotiation(FakeRegistry(FakeExport("a", "first")))
    result = neg.option(Opt.GO, go_payload(b"a", 1, 2))
    assert result.action is Action.TRANSMIT and result.export.name == "a"
    assert _reply_types(result) == [Rep.INFO] * 4 + [Rep.ACK]
    info_types = [struct.unpack(">H", r[20:22])[0] for r in result.replies[:4]]
    assert info_types == [0, 1, 2, 3]
    assert result.replies[2][22:] == b"first"


def test_negotiation_errors_keep_negotiating():
    neg = Negotiation(FakeRegistry(FakeExport("a")))
    assert _reply_types(neg.option(Opt.GO, go_payload(b"zz"))) == [Rep.ERR_UNKNOWN]
    assert _reply_types(neg.option(Opt.GO, b"\0\0")) == [Rep.ERR_INVALID]
    assert _reply_types(neg.option(99, b"")) == [Rep.ERR_UNSUP]
    assert _reply_types(neg.option(Opt.STARTTLS, b"")) == [Rep.ERR_POLICY]
    assert _reply_types(neg.option(Opt.LIST, b"x")) == [Rep.ERR_INVALID]
    assert _reply_types(neg.oversized(Opt.GO, 1 << 20)) == [Rep.ERR_TOO_BIG]
    assert neg.oversized(Opt.GO, 1 << 20).action is Action.CONTINUE
    assert neg.oversized(Opt.EXPORT_NAME, 1 << 20).action is Action.CLOSE
    assert neg.option(Opt.EXPORT_NAME, b"zz").action is Action.CLOSE


def test_negotiation_meta_contexts_need_structured_and_reset_on_other_export():
    neg = Negotiation(FakeRegistry(FakeExport("a"), FakeExport("b")))
    query = meta_payload(b"a", [b"base:"])
    assert _reply_types(neg.option(Opt.SET_META_CONTEXT, query)) == [Rep.ERR_INVALID]
    assert _reply_types(neg.option(Opt.STRUCTURED_REPLY, b"")) == [Rep.ACK]
    result = neg.option(Opt.SET_META_CONTEXT, query)
    assert _reply_types(result) == [Rep.META_CONTEXT, Rep.ACK]
    assert result.replies[0][20:] == struct.pack(">I", 1) + b"base:allocation"
    assert neg.contexts == {1: "base:allocation"}
    neg.option(Opt.GO, go_payload(b"b"))
    assert neg.contexts == {}


def test_negotiation_list_and_export_name():
    neg = Negotiation(FakeRegistry(FakeExport("a", "d"), FakeExport("b")))
    result = neg.option(Opt.LIST, b"")
    assert _reply_types(result) == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    assert result.replies[0][20:] == b"\0\0\0\1ad"
    neg.client_flags(struct.pack(">I", 3))
    result = neg.option(Opt.EXPORT_NAME, b"b")
    assert result.action is Action.TRANSMIT
    assert result.replies == [struct.pack(">QH", 1 << 20,
                                          protocol.transmission_flags(True, False, False))]


def test_negotiation_extended_headers_mode():
    neg = Negotiation(FakeRegistry(FakeExport("a")))
    assert _reply_types(neg.option(Opt.EXTENDED_HEADERS, b"")) == [Rep.ACK]
    assert neg.mode == ReplyMode.EXTENDED
    assert _reply_types(neg.option(Opt.STRUCTURED_REPLY, b"")) == [Rep.ERR_EXT_HEADER_REQD]
    assert _reply_types(neg.option(Opt.ABORT, b"")) == [Rep.ACK]


def test_option_payloads_beyond_a_mebibyte_are_refused_and_end_the_connection():
    neg = Negotiation(FakeRegistry(FakeExport("a")))
    result = neg.oversized(Opt.LIST, (1 << 20) + 1)
    assert _reply_types(result) == [Rep.ERR_TOO_BIG] and result.action is Action.CLOSE
    assert neg.oversized(Opt.INFO, 4 << 30).action is Action.CLOSE


def test_export_name_after_extended_headers_closes():
    """The spec forbids EXPORT_NAME once extended headers are agreed (QEMU closes too)."""
    neg = Negotiation(FakeRegistry(FakeExport("a")))
    neg.option(Opt.EXTENDED_HEADERS, b"")
    result = neg.option(Opt.EXPORT_NAME, b"a")
    assert result.action is Action.CLOSE and result.replies == []
