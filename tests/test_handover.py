"""The state a live handover passes on, without a server: JSON byte for byte, and the
reader's unframed bytes picked up by the successor's reader mid-request."""

import asyncio
import socket

import pytest

from qcownbd.errors import HandoverError, ProtocolError
from qcownbd.handover import (
    ConnectionState, decode_state, dumps, encode_state, loads, overlays_of,
)
from qcownbd.handover_channel import AsyncChannel, Channel
from qcownbd.nbd.constants import EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC, Cmd
from qcownbd.nbd.negotiation import Session
from qcownbd.nbd.protocol import EXTENDED_REQUEST, REQUEST, ReplyMode, Request
from qcownbd.nbd.negotiation import MAX_OPTION_PAYLOAD
from qcownbd.nbd.reader import Payload, PayloadNeeded, RequestReader

STATE = ConnectionState(
    Session("fleet/vm42", ReplyMode.STRUCTURED, {1: "base:allocation", 7: "qemu:dirty"},
            True, False),
    "127.0.0.1:40000", 12, 4096, 8192, 1, 3.25, b"\x25\x60\x95\x13\x00\x00partial",
    "/srv/fleet/vm42.qcow")
WIRE = (b'{"bytes_read":4096,"bytes_written":8192,"client":"127.0.0.1:40000",'
        b'"contexts":{"1":"base:allocation","7":"qemu:dirty"},"errors":1,'
        b'"export":"fleet/vm42","leftover":"JWCVEwAAcGFydGlhbA==","mode":"STRUCTURED",'
        b'"no_zeroes":true,"overlay":"/srv/fleet/vm42.qcow","requests":12,"seconds":3.25,'
        b'"version":1}\n')


def test_a_connection_state_is_one_json_line_and_round_trips_exactly():
    assert dumps(encode_state(STATE)) == WIRE
    again = decode_state(loads(WIRE))
    assert again == STATE
    assert dumps(encode_state(again)) == WIRE


def test_a_state_without_an_overlay_is_of_a_configured_export():
    plain = WIRE.replace(b'"overlay":"/srv/fleet/vm42.qcow",', b'')
    assert decode_state(loads(plain)).overlay is None
    assert overlays_of([STATE, decode_state(loads(plain))]) == {
        "fleet/vm42": "/srv/fleet/vm42.qcow"}


@pytest.mark.parametrize("broken, why", [
    (WIRE.replace(b'"version":1', b'"version":2'), "version 2"),
    (WIRE.replace(b'"STRUCTURED"', b'"FANCY"'), "bad connection state"),
    (WIRE.replace(b'"JWCV', b'"!!'), "bad connection state"),
    (WIRE.replace(b'"1":', b'"one":'), "bad connection state"),
    (WIRE.replace(b'"export":"fleet/vm42",', b''), "bad connection state"),
    (WIRE.replace(b'"/srv/fleet/vm42.qcow"', b'42'), "bad connection state"),
])
def test_a_state_that_is_not_one_is_a_one_line_error(broken, why):
    with pytest.raises(HandoverError, match=why) as caught:
        decode_state(loads(broken))
    assert "\n" not in str(caught.value)


def test_a_message_that_is_not_a_json_object_is_refused():
    for line in (b"[1]", b"{", b"\xff"):
        with pytest.raises(HandoverError):
            loads(line)


def _transmitting(mode=ReplyMode.STRUCTURED) -> RequestReader:
    reader = RequestReader(MAX_OPTION_PAYLOAD)
    reader.start_transmission(mode)
    return reader


def _feed(reader: RequestReader, data: bytes) -> None:
    while data:
        buf = reader.get_buffer()
        count = min(len(buf), len(data))
        buf[:count] = data[:count]
        reader.received(count)
        data = data[count:]


def test_a_request_split_at_the_handover_point_is_framed_by_the_successor():
    read = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 7, 4096, 512)
    write = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 8, 0, 4) + b"data"
    old = _transmitting()
    # the old server read one whole request and 10 bytes of the next header
    _feed(old, read + write[:10])
    assert old.next_event() == Request(0, Cmd.READ, 7, 4096, 512)
    assert old.next_event() is None and old.at_boundary
    leftover = old.leftover()
    assert leftover == write[:10]
    new = _transmitting()
    new.preload(leftover)
    assert new.next_event() is None
    _feed(new, write[10:])      # what the kernel kept for the successor
    event = new.next_event()
    assert event == PayloadNeeded(Request(0, Cmd.WRITE, 8, 0, 4))
    assert bytes(new.payload_in_buffer()) == b"data"
    assert new.next_event() is None and new.leftover() == b""


def test_extended_headers_resume_with_the_payload_half_received():
    write = EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, 0, Cmd.WRITE, 9, 0, 6) + b"abcdef"
    old = _transmitting(ReplyMode.EXTENDED)
    _feed(old, write[:36])      # the header and 4 bytes of its payload
    new = _transmitting(ReplyMode.EXTENDED)
    new.preload(old.leftover())
    _feed(new, write[36:])
    assert new.next_event() == PayloadNeeded(Request(0, Cmd.WRITE, 9, 0, 6))
    assert bytes(new.payload_in_buffer()) == b"abcdef"


def test_no_leftover_is_taken_in_the_middle_of_a_payload():
    big = 1024 * 1024
    reader = _transmitting()
    _feed(reader, REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, big))
    assert isinstance(reader.next_event(), PayloadNeeded)
    payload = bytearray(big)
    reader.receive_payload(memoryview(payload))
    assert not reader.at_boundary
    with pytest.raises(ProtocolError, match="no request boundary"):
        reader.leftover()
    _feed(reader, b"x" * big)
    assert isinstance(reader.next_event(), Payload) and reader.at_boundary
    with pytest.raises(ProtocolError):
        _transmitting().preload(b"y" * (1 << 21))


def test_messages_carry_their_descriptors_over_the_channel():
    ours, theirs = socket.socketpair()
    a, b = Channel(ours), Channel(theirs)
    left, right = socket.socketpair()
    try:
        a.send({"release": {"listening": 1}}, [left.fileno()])
        message, socks = b.receive(5)
        assert message == {"release": {"listening": 1}} and len(socks) == 1
        socks[0].sendall(b"through the copy")
        assert right.recv(100) == b"through the copy"
        socks[0].close()
        b.send({"failed": "export d: no such file"})
        with pytest.raises(HandoverError, match="^export d: no such file$"):
            a.receive(5)
        b.close()
        with pytest.raises(HandoverError, match="went away"):
            a.receive(5)
    finally:
        for sock in (ours, left, right):
            sock.close()


def test_an_async_channel_delivers_what_the_blocking_one_read_past_its_message():
    # a worker reads its parent's first message blocking; a "stop" sent right after it
    # may come in the same read and must reach the event loop's channel
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(dumps({"start": {}, "fds": 0}) + dumps({"stop": True, "fds": 0}))
        first = Channel(theirs)
        assert first.receive(5)[0] == {"start": {}, "fds": 0}

        async def after_start():
            heard = asyncio.get_running_loop().create_future()
            channel = AsyncChannel(theirs, lambda message, _socks: heard.set_result(message),
                                   lambda: None, first.leftover())
            try:
                return await asyncio.wait_for(heard, 5)
            finally:
                channel.close()
        assert asyncio.run(after_start()) == {"stop": True, "fds": 0}
    finally:
        ours.close()
