"""Framing of what clients send, byte for byte, without a socket (nbd/reader.py)
and the dispatcher's replies through a recording replies port (nbd/dispatch.py)."""

import errno
import logging
import random
import struct

import pytest

from qcownbd.errors import ImageIOError
from qcownbd.image.backend import Extent
from qcownbd.nbd.dispatch import ConnectionStats, Dispatcher
from qcownbd.nbd.negotiation import Session
from qcownbd.nbd.protocol import ReplyMode, Request
from qcownbd.ratelimit import RateLimitedLog
from qcownbd.nbd.reader import (
    LARGE_PAYLOAD, RECV_BUFFER, ClientFlags, Option, OversizedOption, Payload, PayloadNeeded,
    RequestReader, State, Violation,
)

IHAVEOPT = b"IHAVEOPT"
REQUEST_MAGIC, EXTENDED_MAGIC = 0x25609513, 0x21E41C71
READ, WRITE, DISC, FLUSH, TRIM = 0, 1, 2, 3, 4
PAYLOAD_LEN = 1 << 5
MAX_OPTION = 9 * 1024


def compact(cmd, cookie, offset=0, length=0, flags=0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def extended(cmd, cookie, offset=0, length=0, flags=0) -> bytes:
    return struct.pack(">IHHQQQ", EXTENDED_MAGIC, flags, cmd, cookie, offset, length)


def option(opt, payload=b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(payload)) + payload


def feed(reader, data: bytes, piece: int | None = None) -> None:
    """Hand ``data`` to the reader the way the transport does, ``piece`` bytes at most per receive."""
    view = memoryview(data)
    while view:
        buf = reader.get_buffer()
        assert len(buf) > 0, "the reader must always offer room while it is fed"
        count = min(len(buf), len(view), piece or len(view))
        buf[:count] = view[:count]
        reader.received(count)
        view = view[count:]


def events(reader) -> list:
    """Every event available now (decisions on payloads are the caller's: stop at one)."""
    found = []
    while (event := reader.next_event()) is not None:
        found.append(event)
        if isinstance(event, (PayloadNeeded, OversizedOption, Violation)):
            break
    return found


def transmitting(mode=ReplyMode.STRUCTURED) -> RequestReader:
    reader = RequestReader(MAX_OPTION)
    feed(reader, b"\0\0\0\3")
    assert events(reader) == [ClientFlags(b"\0\0\0\3")]
    reader.start_transmission(mode)
    return reader


# ------------------------------------------------------------------ handshake

def test_flags_and_options_split_across_receives_byte_by_byte():
    reader = RequestReader(MAX_OPTION)
    stream = b"\0\0\0\1" + option(3) + option(7, b"\0\0\0\1a\0\0") + option(8)
    got = []
    for byte in stream:
        feed(reader, bytes([byte]))
        got += events(reader)
    assert got == [ClientFlags(b"\0\0\0\1"), Option(3, b""), Option(7, b"\0\0\0\1a\0\0"),
                   Option(8, b"")]
    assert reader.buffered == 0


def test_an_oversized_option_is_announced_and_its_payload_skipped():
    reader = RequestReader(MAX_OPTION)
    big = bytes(range(256)) * 400          # 102,400 bytes: longer than the buffer
    feed(reader, b"\0\0\0\1" + option(6, big)[:5000])
    assert events(reader) == [ClientFlags(b"\0\0\0\1"), OversizedOption(6, len(big))]
    reader.skip(len(big))
    assert reader.state is State.SKIPPING
    feed(reader, option(6, big)[5000:] + option(3), piece=777)
    assert events(reader) == [Option(3, b"")]


def test_bad_option_magic_is_a_violation_and_nothing_after_it_is_framed():
    reader = RequestReader(MAX_OPTION)
    feed(reader, b"\0\0\0\1" + option(3) + b"IHAVEOPX" + bytes(8) + option(3))
    got = events(reader)
    assert got[:2] == [ClientFlags(b"\0\0\0\1"), Option(3, b"")]
    assert isinstance(got[2], Violation) and "magic" in got[2].reason
    feed(reader, option(3))
    assert reader.next_event() is None and reader.state is State.BROKEN


def test_requests_pipelined_behind_the_final_option_survive_the_switch():
    reader = RequestReader(MAX_OPTION)
    feed(reader, b"\0\0\0\1" + option(7, b"x") + compact(READ, 1, 0, 512))
    assert reader.next_event() == ClientFlags(b"\0\0\0\1")
    assert reader.next_event() == Option(7, b"x")   # GO: the caller switches at once
    reader.start_transmission(ReplyMode.SIMPLE)
    assert events(reader) == [Request(0, READ, 1, 0, 512)]


# --------------------------------------------------------------- transmission

@pytest.mark.parametrize("mode, encode", [(ReplyMode.SIMPLE, compact),
                                          (ReplyMode.EXTENDED, extended)])
def test_headers_split_across_receives(mode, encode):
    reader = transmitting(mode)
    stream = b"".join(encode(READ, cookie, cookie * 4096, 4096) for cookie in range(1, 40))
    got, rnd = [], random.Random(1)
    while stream:
        cut = rnd.randrange(1, 60)
        feed(reader, stream[:cut])
        stream = stream[cut:]
        got += events(reader)
    assert got == [Request(0, READ, c, c * 4096, 4096) for c in range(1, 40)]


def test_extended_lengths_are_64_bit():
    reader = transmitting(ReplyMode.EXTENDED)
    feed(reader, extended(TRIM, 9, 1 << 40, 5 << 32))
    assert events(reader) == [Request(0, TRIM, 9, 1 << 40, 5 << 32)]


def test_a_payload_in_the_receive_buffer_is_a_view_of_it():
    reader = transmitting()
    feed(reader, compact(WRITE, 1, 0, 5) + b"hello" + compact(FLUSH, 2))
    [needed] = events(reader)
    assert needed == PayloadNeeded(Request(0, WRITE, 1, 0, 5))
    assert reader.next_event() == needed          # until the caller decides
    assert bytes(reader.payload_in_buffer()) == b"hello"
    assert events(reader) == [Request(0, FLUSH, 2, 0, 0)]


def test_a_payload_split_across_receives_lands_in_its_own_buffer():
    reader = transmitting()
    payload = random.Random(2).randbytes(300_000)
    stream = compact(WRITE, 1, 4096, len(payload)) + payload + compact(READ, 2, 0, 1)
    feed(reader, stream[:1000])
    [needed] = events(reader)
    assert reader.payload_in_buffer() is None          # not all of it has arrived
    own = memoryview(bytearray(len(payload)))
    reader.receive_payload(own)
    assert reader.state is State.PAYLOAD
    feed(reader, stream[1000:28 + len(payload)], piece=4093)
    [done] = events(reader)
    assert isinstance(done, Payload) and done.request == needed.request
    assert done.data.obj is own.obj and bytes(done.data) == payload
    # after a large payload only one header is received, so the next large
    # payload can land in its own buffer
    assert len(payload) >= LARGE_PAYLOAD
    assert len(reader.get_buffer()) == 28
    feed(reader, stream[28 + len(payload):] + compact(READ, 3, 0, 1) * 2)
    assert events(reader) == [Request(0, READ, c, 0, 1) for c in (2, 3, 3)]


def test_a_reader_with_no_room_says_it_is_full():
    """Reading must pause whenever `get_buffer` would be empty: with a received payload
    not yet taken (the connection's turn ended), a TLS transport read into the empty
    buffer and took it for the client's close_notify, ending the connection."""
    reader = transmitting()
    payload = bytes(range(256)) * 1200
    feed(reader, compact(WRITE, 1, 0, len(payload)) + payload[:1000])
    [needed] = events(reader)
    reader.receive_payload(memoryview(bytearray(len(payload))))
    assert not reader.full and len(reader.get_buffer()) == len(payload) - 1000
    feed(reader, payload[1000:])
    assert reader.full and len(reader.get_buffer()) == 0
    [done] = events(reader)
    assert bytes(done.data) == payload
    assert not reader.full and len(reader.get_buffer()) > 0


def test_a_payload_announced_by_payload_len_in_extended_mode():
    reader = transmitting(ReplyMode.EXTENDED)
    feed(reader, extended(7, 3, 0, 8, flags=PAYLOAD_LEN) + b"12345678")
    [needed] = events(reader)
    assert needed.request == Request(PAYLOAD_LEN, 7, 3, 0, 8)
    assert bytes(reader.payload_in_buffer()) == b"12345678"


def test_a_refused_oversized_payload_is_skipped_across_receives():
    reader = transmitting()
    junk = bytes(3 * RECV_BUFFER + 123)
    stream = compact(WRITE, 1, 0, len(junk)) + junk + compact(FLUSH, 2) + compact(READ, 3, 0, 9)
    feed(reader, stream[:70_000])
    [needed] = events(reader)
    reader.skip(needed.request.length)
    assert reader.state is State.SKIPPING and reader.next_event() is None
    feed(reader, stream[70_000:], piece=100_000)
    assert events(reader) == [Request(0, FLUSH, 2, 0, 0), Request(0, READ, 3, 0, 9)]


def test_a_violation_in_the_middle_of_a_batch_comes_after_the_good_requests():
    reader = transmitting()
    bad = struct.pack(">IHHQQI", 0xDEADBEEF, 0, READ, 3, 0, 1)
    feed(reader, compact(READ, 1, 0, 1) + compact(FLUSH, 2) + bad + compact(READ, 4, 0, 1))
    got = events(reader)
    assert got[:2] == [Request(0, READ, 1, 0, 1), Request(0, FLUSH, 2, 0, 0)]
    assert isinstance(got[2], Violation) and "0xdeadbeef" in got[2].reason
    assert reader.next_event() is None


def test_a_header_cut_by_the_end_of_the_buffer_is_moved_to_its_start():
    reader = transmitting()
    whole, part = divmod(RECV_BUFFER, 28)
    stream = b"".join(compact(READ, c, 0, 1) for c in range(whole + 1))
    feed(reader, stream[:RECV_BUFFER])
    assert len(events(reader)) == whole and reader.buffered == part
    feed(reader, stream[RECV_BUFFER:])
    assert events(reader) == [Request(0, READ, whole, 0, 1)]


def test_a_full_buffer_is_compacted_and_a_stopped_reader_drops_everything():
    reader = transmitting()
    one = compact(READ, 1, 0, 1)
    count = RECV_BUFFER // len(one) + 10
    got = []
    for index in range(count):
        feed(reader, one)
        if index % 1000 == 999:
            got += events(reader)
    got += events(reader)
    assert len(got) == count
    reader.stop()
    feed(reader, one * 3)
    assert reader.next_event() is None and reader.buffered == 0


# ----------------------------------------------------------------- dispatcher

class RecordingReplies:
    """The replies port, recording what the dispatcher sends."""

    direct = False

    def __init__(self):
        self.sent = []

    def send(self, parts):
        self.sent.append(b"".join(bytes(p) for p in parts))

    def lend(self, length):
        return memoryview(bytearray(length))

    def materialize_files(self):
        pass


class MemoryBackend:
    size, can_trim, can_fast_zero = 1 << 20, True, False

    def __init__(self):
        self.data = bytearray(self.size)
        self.flushes = 0

    def read_into(self, offset, buf):
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, offset, data):
        if offset == 4096:
            raise ImageIOError(errno.ENOSPC, "/srv/secret/customer.raw: write failed")
        self.data[offset:offset + len(data)] = data

    def flush(self):
        self.flushes += 1

    def block_status(self, offset, length):
        return [Extent(length, False, False, 1)]


class Export:
    def __init__(self):
        self.backend, self.read_only = MemoryBackend(), False


def dispatcher(mode=ReplyMode.SIMPLE):
    replies, offloaded = RecordingReplies(), []
    disp = Dispatcher(Export(), Session("e", mode, {}, True, False), replies, ConnectionStats(),
                      "test", offload=lambda fn, done: offloaded.append((fn, done)),
                      defer=lambda callback: callback(), on_async_done=lambda: None,
                      log=RateLimitedLog(logging.getLogger("test")))
    return disp, replies, offloaded


def test_dispatcher_answers_byte_for_byte_and_says_when_the_client_left():
    disp, replies, offloaded = dispatcher()
    disp.run(Request(0, WRITE, 7, 100, 3), memoryview(b"abc"))
    assert disp.run_checked(Request(0, READ, 8, 99, 5))
    assert replies.sent == [struct.pack(">IIQ", 0x67446698, 0, 7),
                            struct.pack(">IIQ", 0x67446698, 0, 8) + b"\0abc\0"]
    assert disp.run_checked(Request(0, FLUSH, 9, 0, 0))
    [(flush, done)] = offloaded
    assert disp.inflight == 1
    flush()

    class Done:
        def cancelled(self):
            return False

        def exception(self):
            return None
    done(Done())
    assert disp.inflight == 0 and replies.sent[-1] == struct.pack(">IIQ", 0x67446698, 0, 9)
    assert disp.run_checked(Request(0, DISC, 10, 0, 0)) is False
    assert disp.stats.requests == 4


def test_dispatcher_errors_name_no_host_path_and_unknown_commands_are_einval():
    disp, replies, _ = dispatcher(ReplyMode.STRUCTURED)
    disp.run(Request(0, WRITE, 1, 4096, 3), memoryview(b"abc"))
    assert disp.run_checked(Request(0, 99, 2, 0, 1))
    failed, unknown = replies.sent
    assert struct.unpack(">IHHQI", failed[:20])[2] == 0x8001
    errno_, length = struct.unpack(">IH", failed[20:26])
    assert errno_ == 28 and failed[26:26 + length] == b"No space left on device"
    assert b"/srv" not in failed
    assert struct.unpack(">I", unknown[20:24])[0] == 22
    assert disp.stats.errors == 2
