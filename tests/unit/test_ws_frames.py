"""The sans-IO WebSocket codec: wsproto (the reference) agrees with it both ways for any message sequence and
any chunking, every protocol violation raises with the right close code, and the buffer behaves."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.speedups import apply_mask
from wsproto.frame_protocol import FrameProtocol, Opcode

from kohakuriver_proto import RemoteProtocolError
from kohakuriver_proto.ws_frames import (
    CLOSE_NO_STATUS,
    INITIAL_BUFFER,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameReader,
    Ping,
    Pong,
    WebSocketProtocolError,
    close_payload,
    frame_header,
    frame_parts,
    python_unmask,
)

MiB = 1 << 20
KEY = b"\x9a\x1b\xc7\x05"
UNMASKS = [python_unmask, apply_mask]

# -- helpers ------------------------------------------------------------------------------------------------


def feed(reader: FrameReader, wire: bytes, cuts=(), *, via: str = "receive_data") -> list:
    """Feed ``wire`` split at ``cuts``, draining events after each chunk; the events in order."""
    events = []
    bounds = [0, *sorted(set(cuts)), len(wire)]
    for a, b in itertools.pairwise(bounds):
        chunk = wire[a:b]
        if via == "receive_data":
            reader.receive_data(chunk)
        else:
            with reader.writable(max(len(chunk), 1)) as view:
                assert len(view) >= len(chunk)
                view[: len(chunk)] = chunk
            reader.commit(len(chunk))
        while (event := reader.next_event()) is not None:
            events.append(event)
    return events


def wsproto_decode(wire: bytes, *, masked: bool, chunk: int = 65521) -> list:
    """Messages and control frames as wsproto parses ``wire`` (``masked``: it plays the server), in the
    same shape as ``FrameReader`` events."""
    proto = FrameProtocol(client=not masked, extensions=[])
    events: list = []
    pieces: list = []
    for i in range(0, len(wire), chunk):
        proto.receive_bytes(bytes(wire[i : i + chunk]))
        for frame in proto.received_frames():
            if frame.opcode is Opcode.PING:
                events.append(Ping(bytes(frame.payload)))
            elif frame.opcode is Opcode.PONG:
                events.append(Pong(bytes(frame.payload)))
            elif frame.opcode is Opcode.CLOSE:
                events.append(Close(*frame.payload))
            else:
                pieces.append(frame.payload if frame.opcode is Opcode.TEXT else bytes(frame.payload))
                if frame.message_finished:
                    events.append("".join(pieces) if frame.opcode is Opcode.TEXT else b"".join(pieces))
                    pieces = []
    assert not pieces, "wsproto holds an unfinished message"
    return events


def protocol_error(data: bytes, *, masked: bool = False, max_message: int = MiB) -> WebSocketProtocolError:
    """The error ``FrameReader`` raises on ``data`` (the test fails if it raises none)."""
    reader = FrameReader(masked=masked, max_message=max_message)
    reader.receive_data(data)
    with pytest.raises(WebSocketProtocolError) as info:
        for _ in range(1000):
            if reader.next_event() is None:
                break
    assert isinstance(info.value, RemoteProtocolError)
    return info.value


def raw(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = False) -> bytes:
    """One frame; ``rsv`` is or-ed into the first byte."""
    if masked:
        head = frame_header(opcode, len(payload), fin=fin, mask_key=KEY)
        body = python_unmask(memoryview(payload), KEY)
    else:
        head, body = frame_header(opcode, len(payload), fin=fin), payload
    return bytes((head[0] | rsv,)) + head[1:] + body


# -- strategies ---------------------------------------------------------------------------------------------

controls = st.tuples(st.sampled_from(["ping", "pong"]), st.binary(max_size=125))
SENDABLE = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]  # and wsproto accepts them
close_codes = st.sampled_from(SENDABLE) | st.integers(3000, 4999)


@st.composite
def wsproto_messages(draw):
    """A data message as wsproto fragments it: ``("message", pieces, controls between the pieces)``."""
    piece = st.text(max_size=200) if draw(st.booleans()) else st.binary(max_size=700)
    pieces = draw(st.lists(piece, min_size=1, max_size=4))
    between = [draw(st.lists(controls, max_size=2)) for _ in pieces[:-1]]
    return ("message", pieces, between)


conversations = st.tuples(
    st.lists(wsproto_messages() | controls, max_size=8),
    st.none() | st.just(("close", None, "")) | st.tuples(st.just("close"), close_codes, st.text(max_size=30)),
)


def wsproto_encode(conversation, *, client: bool) -> tuple[bytes, list]:
    """(the wire bytes wsproto writes, the events a reader must return for them)."""
    items, close = conversation
    proto = FrameProtocol(client=client, extensions=[])
    wire = bytearray()
    expected: list = []

    def control(kind, payload):
        wire.extend(proto.ping(payload) if kind == "ping" else proto.pong(payload))
        expected.append(Ping(payload) if kind == "ping" else Pong(payload))

    for item in items:
        if item[0] != "message":
            control(*item)
            continue
        _, pieces, between = item
        for i, piece in enumerate(pieces):
            wire += proto.send_data(piece, fin=i == len(pieces) - 1)
            for kind, payload in between[i] if i < len(between) else ():
                control(kind, payload)
        expected.append("".join(pieces) if isinstance(pieces[0], str) else b"".join(pieces))
    if close is not None:
        _, code, reason = close
        wire += proto.close(code, reason if code is not None else None)
        expected.append(Close(CLOSE_NO_STATUS, "") if code is None else Close(code, reason))
    return bytes(wire), expected


@st.composite
def our_messages(draw):
    """``(opcode, payload, fragment cut points)``: text is cut at arbitrary bytes (inside characters too)."""
    if draw(st.booleans()):
        opcode, payload = OP_TEXT, draw(st.text(max_size=200)).encode("utf-8")
    else:
        opcode, payload = OP_BINARY, draw(st.binary(max_size=700))
    cuts = draw(st.lists(st.integers(0, len(payload)), max_size=3))
    return opcode, payload, sorted(cuts)


def our_encode(items, *, key: bytes | None) -> tuple[bytes, list]:
    """Frames made by ``frame_parts`` (whole messages, controls) and ``frame_header`` (fragments), masked
    with ``key`` unless it is None."""
    wire = bytearray()
    expected: list = []
    for item in items:
        if item[0] in ("ping", "pong"):
            opcode = OP_PING if item[0] == "ping" else OP_PONG
            wire += b"".join(frame_parts(opcode, item[1], mask_key=key))
            expected.append(Ping(item[1]) if item[0] == "ping" else Pong(item[1]))
            continue
        opcode, payload, cuts = item
        expected.append(payload.decode("utf-8") if opcode == OP_TEXT else payload)
        if not cuts:
            wire += b"".join(frame_parts(opcode, payload, mask_key=key))
            continue
        bounds = [0, *cuts, len(payload)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            piece = payload[a:b]
            fin = i == len(bounds) - 2
            op = opcode if i == 0 else OP_CONTINUATION
            if key is not None:
                wire += frame_header(op, len(piece), fin=fin, mask_key=key)
                wire += python_unmask(memoryview(piece), key)
            else:
                wire += frame_header(op, len(piece), fin=fin) + piece
    return bytes(wire), expected


# -- round trips against wsproto ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    conversation=conversations,
    client=st.booleans(),
    via=st.sampled_from(["receive_data", "writable"]),
    unmask=st.sampled_from(UNMASKS),
    data=st.data(),
)
def test_wsproto_frames_decode_to_the_same_events_in_any_chunking(conversation, client, via, unmask, data):
    wire, expected = wsproto_encode(conversation, client=client)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="cuts")
    reader = FrameReader(masked=client, max_message=MiB, unmask=unmask)
    assert feed(reader, wire, cuts, via=via) == expected
    assert reader.buffered == 0


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(our_messages() | controls, max_size=8),
    key=st.none() | st.binary(min_size=4, max_size=4),
    chunk=st.integers(1, 4096),
)
def test_our_frames_decode_in_wsproto_and_in_our_reader(items, key, chunk):
    mask = key is not None
    wire, expected = our_encode(items, key=key)
    assert wsproto_decode(wire, masked=mask, chunk=chunk) == expected
    reader = FrameReader(masked=mask, max_message=MiB)
    assert feed(reader, wire, range(chunk, len(wire), chunk)) == expected


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(our_messages() | controls, min_size=1, max_size=6),
    key=st.none() | st.binary(min_size=4, max_size=4),
    data=st.data(),
)
def test_missing_never_asks_for_more_than_the_frame_and_nothing_comes_sooner(items, key, data):
    """``missing`` is what the I/O layer may sleep for (``SO_RCVLOWAT``): asking for a byte beyond the
    frame being received would wait for ever on a peer that sent it whole; fewer bytes yield nothing."""
    wire, expected = our_encode(items, key=key)
    reader = FrameReader(masked=key is not None, max_message=MiB)
    events: list = []
    pos = 0
    while True:
        event = reader.next_event()
        if event is not None:
            events.append(event)
            continue
        if pos == len(wire):
            break
        missing = reader.missing
        assert 1 <= missing <= len(wire) - pos
        short = data.draw(st.integers(0, missing - 1), label="short")
        if short:
            reader.receive_data(wire[pos : pos + short])
            pos += short
            assert reader.next_event() is None
            assert reader.missing == missing - short
        more = data.draw(st.integers(missing - short, len(wire) - pos), label="more")
        reader.receive_data(wire[pos : pos + more])
        pos += more
    assert events == expected


@settings(max_examples=100, deadline=None)
@given(code=close_codes, reason=st.text(max_size=80), key=st.none() | st.binary(min_size=4, max_size=4))
def test_close_frames_agree_with_wsproto(code, reason, key):
    mask = key is not None
    wire = b"".join(frame_parts(OP_CLOSE, close_payload(code, reason), mask_key=key))
    (event,) = wsproto_decode(wire, masked=mask)
    assert event.code == code and reason.startswith(event.reason)
    assert feed(FrameReader(masked=mask, max_message=MiB), wire) == [event]
    # and wsproto's close frame decodes to the same in ours
    wire = bytes(FrameProtocol(client=mask, extensions=[]).close(code, reason))
    assert feed(FrameReader(masked=mask, max_message=MiB), wire) == [event]


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MiB - 1, MiB + 3, 3 * MiB + 1]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mask", [True, False])
def test_payload_lengths_around_every_encoding_boundary(size, mask):
    payload = bytes(i * 7 % 251 for i in range(size)) if size < 70000 else (bytes(range(251)) * 13000)[:size]
    # ours -> wsproto
    parts = frame_parts(OP_BINARY, payload, mask_key=KEY if mask else None)
    header_len = (2 if size < 126 else 4 if size <= 0xFFFF else 10) + (4 if mask else 0)
    assert len(parts[0]) == header_len
    wire = b"".join(parts)
    assert len(wire) == header_len + size
    assert wsproto_decode(wire, masked=mask) == [payload]
    text = "é" * (size // 2) + "x" * (size % 2)
    wire = b"".join(frame_parts(OP_TEXT, text.encode(), mask_key=KEY if mask else None, unmask=apply_mask))
    assert wsproto_decode(wire, masked=mask) == [text]
    # wsproto -> ours, in one piece and in odd chunks, through both ways of filling the buffer
    wire = bytes(FrameProtocol(client=mask, extensions=[]).send_data(payload))
    assert len(wire) == header_len + size
    for unmask in UNMASKS:
        reader = FrameReader(masked=mask, max_message=4 * MiB, unmask=unmask)
        assert feed(reader, wire) == [payload]
        reader = FrameReader(masked=mask, max_message=4 * MiB, unmask=unmask)
        assert feed(reader, wire, range(65521, len(wire), 65521), via="writable") == [payload]
        assert reader.buffered == 0
    wire = bytes(FrameProtocol(client=mask, extensions=[]).send_data(text))
    assert feed(FrameReader(masked=mask, max_message=4 * MiB), wire, range(999, len(wire), 999)) == [text]


def test_frame_header_encodings():
    assert frame_header(OP_BINARY, 0) == b"\x82\x00"
    assert frame_header(OP_TEXT, 125, fin=False) == b"\x01\x7d"
    assert frame_header(OP_BINARY, 126) == b"\x82\x7e\x00\x7e"
    assert frame_header(OP_BINARY, 65535) == b"\x82\x7e\xff\xff"
    assert frame_header(OP_BINARY, 65536) == b"\x82\x7f" + struct.pack(">Q", 65536)
    assert frame_header(OP_PING, 5, mask_key=KEY) == b"\x89\x85" + KEY
    assert frame_header(OP_CONTINUATION, 70000, mask_key=KEY) == b"\x80\xff" + struct.pack(">Q", 70000) + KEY


def test_frame_parts_keeps_the_payload_and_masks_with_the_key():
    payload = bytearray(b"hello world")
    header, body = frame_parts(OP_BINARY, payload)
    assert body is payload  # no copy on the unmasked path
    assert header == b"\x82\x0b"
    header, body = frame_parts(OP_TEXT, b"hello", mask_key=KEY)
    assert header == b"\x81\x85" + KEY
    assert body == bytes(c ^ KEY[i % 4] for i, c in enumerate(b"hello"))
    # the masking function given is the one used (the I/O layer passes the C one)
    calls = []

    def spy(data, key):
        calls.append((bytes(data), key))
        return apply_mask(bytes(data), key)

    assert frame_parts(OP_BINARY, bytearray(b"abc"), mask_key=KEY, unmask=spy)[1] == apply_mask(b"abc", KEY)
    assert calls == [(b"abc", KEY)]
    # the module has no randomness of its own: the same key gives the same frame
    assert frame_parts(OP_BINARY, b"same", mask_key=KEY) == frame_parts(OP_BINARY, b"same", mask_key=KEY)


# -- masking -------------------------------------------------------------------------------------------------


@given(data=st.binary(max_size=3000), key=st.binary(min_size=4, max_size=4))
def test_python_unmask_equals_the_c_version_and_is_its_own_inverse(data, key):
    masked = python_unmask(memoryview(data), key)
    assert isinstance(masked, bytes) and len(masked) == len(data)
    assert masked == apply_mask(data, key)
    assert masked == bytes(c ^ key[i % 4] for i, c in enumerate(data))
    assert python_unmask(memoryview(masked), key) == data


def test_python_unmask_on_a_slice_of_a_large_buffer():
    buf = bytearray(range(256)) * 4000
    view = memoryview(buf)[3 : 3 + 1_000_001]
    assert python_unmask(view, KEY) == apply_mask(bytes(view), KEY)


# -- protocol violations -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_reserved_bits_are_a_protocol_error(rsv):
    assert protocol_error(raw(OP_BINARY, b"abc", rsv=rsv)).code == 1002
    assert protocol_error(raw(OP_PING, b"", rsv=rsv), masked=False).code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(opcode):
    assert protocol_error(raw(opcode, b"x")).code == 1002
    assert protocol_error(raw(opcode, b"x", masked=True), masked=True).code == 1002


def test_masking_must_match_the_side():
    # an unmasked frame to a server, a masked one to a client
    assert protocol_error(raw(OP_BINARY, b"data"), masked=True).code == 1002
    assert protocol_error(raw(OP_BINARY, b"data", masked=True), masked=False).code == 1002
    assert protocol_error(raw(OP_PING, b"", masked=False), masked=True).code == 1002


@pytest.mark.parametrize("value", [0, 1, 125])
def test_non_minimal_16_bit_length(value):
    # only the header: the error comes before any payload is awaited
    assert protocol_error(b"\x82\x7e" + struct.pack(">H", value)).code == 1002


@pytest.mark.parametrize("value", [0, 125, 126, 65535])
def test_non_minimal_64_bit_length(value):
    assert protocol_error(b"\x82\x7f" + struct.pack(">Q", value)).code == 1002
    assert protocol_error(b"\x82\xff" + struct.pack(">Q", value) + KEY, masked=True).code == 1002


@pytest.mark.parametrize("value", [1 << 63, (1 << 63) + 5, (1 << 64) - 1])
def test_64_bit_length_with_the_top_bit_set(value):
    # 1002 (not 1009) even with a huge max_message, and no attempt to allocate the "payload"
    assert protocol_error(b"\x82\x7f" + struct.pack(">Q", value), max_message=1 << 62).code == 1002


def test_minimal_lengths_are_accepted():
    # a header alone with the smallest length of each encoding: no error, waiting for the payload
    assert feed(FrameReader(masked=False, max_message=MiB), b"\x82\x7e\x00\x7e") == []
    assert feed(FrameReader(masked=False, max_message=MiB), b"\x82\x7f" + struct.pack(">Q", 65536)) == []
    reader = FrameReader(masked=False, max_message=MiB)
    assert feed(reader, b"\x82\x7e\x00\x7e" + b"a" * 126) == [b"a" * 126]
    reader = FrameReader(masked=False, max_message=MiB)
    assert feed(reader, b"\x82\x7f" + struct.pack(">Q", 65536) + b"b" * 65536) == [b"b" * 65536]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(opcode):
    payload = b"\x03\xe8" if opcode == OP_CLOSE else b"x"
    assert protocol_error(raw(opcode, payload, fin=False)).code == 1002


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_payload_over_125(opcode):
    assert protocol_error(raw(opcode, b"\x03\xe8" + b"x" * 124)).code == 1002
    assert protocol_error(raw(opcode, b"\x03\xe8" + b"x" * 124, masked=True), masked=True).code == 1002
    # exactly 125 is fine
    reader = FrameReader(masked=False, max_message=MiB)
    (event,) = feed(reader, raw(opcode, b"\x03\xe8" + b"x" * 123))
    assert event == {OP_PING: Ping(b"\x03\xe8" + b"x" * 123), OP_PONG: Pong(b"\x03\xe8" + b"x" * 123)}.get(
        opcode, Close(1000, "x" * 123)
    )


def test_continuation_without_a_start():
    assert protocol_error(raw(OP_CONTINUATION, b"abc")).code == 1002
    assert protocol_error(raw(OP_CONTINUATION, b"abc", fin=False)).code == 1002
    # also after a fragmented message has ended
    data = raw(OP_BINARY, b"a", fin=False) + raw(OP_CONTINUATION, b"b") + raw(OP_CONTINUATION, b"c")
    reader = FrameReader(masked=False, max_message=MiB)
    reader.receive_data(data)
    assert reader.next_event() == b"ab"
    with pytest.raises(WebSocketProtocolError) as info:
        reader.next_event()
    assert info.value.code == 1002


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("second_fin", [True, False])
def test_new_data_frame_inside_a_fragmented_message(second, second_fin):
    data = raw(OP_BINARY, b"part", fin=False) + raw(second, b"new", fin=second_fin)
    assert protocol_error(data).code == 1002


def test_control_frames_between_fragments_are_allowed():
    data = (
        raw(OP_TEXT, "h€".encode()[:2], fin=False)
        + raw(OP_PING, b"p")
        + raw(OP_CONTINUATION, "h€".encode()[2:], fin=False)
        + raw(OP_PONG, b"q")
        + raw(OP_CONTINUATION, b"!")
    )
    assert feed(FrameReader(masked=False, max_message=MiB), data) == [Ping(b"p"), Pong(b"q"), "h€!"]


def test_message_over_max_message():
    # a single frame: refused from its header alone
    assert protocol_error(frame_header(OP_BINARY, 1001), max_message=1000).code == 1009
    header = frame_header(OP_TEXT, 5000, mask_key=KEY)
    assert protocol_error(header, masked=True, max_message=1000).code == 1009
    # exactly max_message is accepted
    reader = FrameReader(masked=False, max_message=1000)
    assert feed(reader, raw(OP_BINARY, b"z" * 1000)) == [b"z" * 1000]
    # fragments that add up to more
    data = raw(OP_BINARY, b"a" * 600, fin=False) + raw(OP_CONTINUATION, b"b" * 300, fin=False)
    data += raw(OP_CONTINUATION, b"c" * 101)
    assert protocol_error(data, max_message=1000).code == 1009
    data = raw(OP_BINARY, b"a" * 600, fin=False) + raw(OP_CONTINUATION, b"b" * 400)
    assert feed(FrameReader(masked=False, max_message=1000), data) == [b"a" * 600 + b"b" * 400]
    # the fragment count resets between messages
    data = raw(OP_BINARY, b"a" * 600, fin=False) + raw(OP_CONTINUATION, b"b" * 400)
    data += raw(OP_BINARY, b"c" * 1000)
    assert feed(FrameReader(masked=False, max_message=1000), data) == [b"a" * 600 + b"b" * 400, b"c" * 1000]


def test_invalid_utf8_text():
    assert protocol_error(raw(OP_TEXT, b"\xff")).code == 1007
    assert protocol_error(raw(OP_TEXT, "é".encode()[:1])).code == 1007  # cut character at the end
    assert protocol_error(raw(OP_TEXT, b"\xed\xa0\x80", masked=True), masked=True).code == 1007  # a surrogate
    data = raw(OP_TEXT, b"ok", fin=False) + raw(OP_CONTINUATION, b"\xc3", fin=False)
    data += raw(OP_CONTINUATION, b"x")
    assert protocol_error(data).code == 1007
    # binary is not checked
    assert feed(FrameReader(masked=False, max_message=MiB), raw(OP_BINARY, b"\xff")) == [b"\xff"]


def test_close_payload_of_one_byte():
    assert protocol_error(raw(OP_CLOSE, b"\x03")).code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_close_codes_that_may_not_be_sent(code):
    assert protocol_error(raw(OP_CLOSE, struct.pack(">H", code) + b"why")).code == 1002


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
)
def test_close_codes_that_may_be_sent(code):
    reader = FrameReader(masked=True, max_message=MiB)
    assert feed(reader, raw(OP_CLOSE, struct.pack(">H", code) + "bye é".encode(), masked=True)) == [
        Close(code, "bye é")
    ]


def test_every_close_code_follows_the_rule():
    allowed = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, *range(3000, 5000)}
    for code in range(0, 65536, 7):
        reader = FrameReader(masked=False, max_message=MiB)
        reader.receive_data(raw(OP_CLOSE, struct.pack(">H", code)))
        if code in allowed:
            assert reader.next_event() == Close(code, "")
        else:
            with pytest.raises(WebSocketProtocolError):
                reader.next_event()


def test_close_reason_not_utf8():
    assert protocol_error(raw(OP_CLOSE, b"\x03\xe8\xff\xfe")).code == 1007
    assert protocol_error(raw(OP_CLOSE, b"\x03\xe8" + "é".encode()[:1])).code == 1007


def test_empty_close_payload_means_no_status():
    assert feed(FrameReader(masked=False, max_message=MiB), raw(OP_CLOSE)) == [Close(1005, "")]
    assert feed(FrameReader(masked=True, max_message=MiB), raw(OP_CLOSE, masked=True)) == [Close(1005, "")]


def test_events_before_a_violation_are_delivered():
    reader = FrameReader(masked=False, max_message=MiB)
    reader.receive_data(raw(OP_BINARY, b"one") + raw(OP_PING, b"p") + raw(0x3, b"bad") + raw(OP_BINARY, b"x"))
    assert reader.next_event() == b"one"
    assert reader.next_event() == Ping(b"p")
    with pytest.raises(WebSocketProtocolError) as info:
        reader.next_event()
    assert info.value.code == 1002


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400), masked=st.booleans())
def test_arbitrary_bytes_only_raise_the_protocol_error(data, masked):
    reader = FrameReader(masked=masked, max_message=1 << 16)
    reader.receive_data(data)
    try:
        while (event := reader.next_event()) is not None:
            assert isinstance(event, bytes | str | Ping | Pong | Close)
    except WebSocketProtocolError as exc:
        assert exc.code in (1002, 1007, 1009)


# -- close_payload -------------------------------------------------------------------------------------------


def test_close_payload_cuts_the_reason_on_a_character_boundary():
    assert close_payload(1000) == b"\x03\xe8"
    assert close_payload(4000, "bye") == b"\x0f\xa0bye"
    assert close_payload(1000, "a" * 123) == b"\x03\xe8" + b"a" * 123
    assert close_payload(1000, "a" * 124) == b"\x03\xe8" + b"a" * 123
    assert close_payload(1000, "é" * 100) == b"\x03\xe8" + "é".encode() * 61  # 122 bytes, not half of one
    assert close_payload(1000, "a" + "é" * 100) == b"\x03\xe8" + b"a" + "é".encode() * 61  # 123 bytes
    assert close_payload(1000, "€" * 50) == b"\x03\xe8" + "€".encode() * 41  # 123 bytes
    assert close_payload(1000, "ab" + "€" * 50) == b"\x03\xe8ab" + "€".encode() * 40  # 122 bytes
    assert close_payload(1000, "😀" * 40) == b"\x03\xe8" + "😀".encode() * 30  # 120 bytes


@given(code=close_codes, reason=st.text(max_size=200))
def test_close_payload_is_the_longest_prefix_that_fits(code, reason):
    payload = close_payload(code, reason)
    assert len(payload) <= 125
    assert struct.unpack(">H", payload[:2]) == (code,)
    kept = payload[2:].decode("utf-8")
    assert reason.startswith(kept)
    if kept != reason:
        assert len(reason[: len(kept) + 1].encode()) > 123  # one more character would not fit
    (event,) = feed(FrameReader(masked=False, max_message=MiB), b"".join(frame_parts(OP_CLOSE, payload)))
    assert event == Close(code, kept)


# -- the buffer ----------------------------------------------------------------------------------------------


def test_a_frame_larger_than_the_initial_buffer():
    payload = bytes(range(256)) * (3 * MiB // 256) + b"tail"
    assert len(payload) > INITIAL_BUFFER
    for mask in (False, True):
        wire = b"".join(frame_parts(OP_BINARY, payload, mask_key=KEY if mask else None))
        reader = FrameReader(masked=mask, max_message=4 * MiB, unmask=apply_mask)
        # header, then the rest in 64 KiB reads, as the I/O layer does
        assert feed(reader, wire, [10, *range(65536, len(wire), 65536)], via="writable") == [payload]
        assert reader.buffered == 0
        reader = FrameReader(masked=mask, max_message=4 * MiB)
        assert feed(reader, wire) == [payload]


def test_the_buffer_grows_once_to_the_frame_size_when_the_header_arrives():
    reader = FrameReader(masked=False, max_message=8 * MiB)
    wire = b"".join(frame_parts(OP_BINARY, b"q" * (5 * MiB)))
    reader.receive_data(wire[:10])
    assert reader.next_event() is None
    with reader.writable(1) as view:
        assert len(view) >= 5 * MiB  # room for the whole frame: a recv_into can take it in big reads
    reader.receive_data(wire[10:])
    assert reader.next_event() == b"q" * (5 * MiB)


@pytest.mark.parametrize("via", ["receive_data", "writable"])
def test_the_buffer_does_not_grow_with_many_small_frames(via):
    reader = FrameReader(masked=True, max_message=MiB)
    frame = b"".join(frame_parts(OP_BINARY, bytes(range(200)), mask_key=KEY))
    wire = frame * 50_000  # ~10 MiB of frames, fed in chunks that split frames
    chunk = 65_537
    count = 0
    for i in range(0, len(wire), chunk):
        part = wire[i : i + chunk]
        if via == "receive_data":
            reader.receive_data(part)
        else:
            with reader.writable(65536) as view:
                view[: len(part)] = part
            reader.commit(len(part))
        while (event := reader.next_event()) is not None:
            assert event == bytes(range(200))
            count += 1
        assert reader.buffered < len(frame)
        assert len(reader._buf) <= INITIAL_BUFFER + chunk
    assert count == 50_000
    assert reader.buffered == 0


def test_buffered_reports_pending_bytes():
    reader = FrameReader(masked=False, max_message=MiB)
    assert reader.buffered == 0
    one, two = raw(OP_BINARY, b"a" * 300), raw(OP_TEXT, b"hello")
    reader.receive_data(one[:5])
    assert reader.buffered == 5
    assert reader.next_event() is None
    assert reader.buffered == 5  # nothing taken until a frame is whole
    reader.receive_data(one[5:] + two[:3])
    assert reader.buffered == len(one) + 3
    assert reader.next_event() == b"a" * 300
    assert reader.buffered == 3
    assert reader.next_event() is None
    with reader.writable() as view:
        view[: len(two) - 3] = two[3:]
    assert reader.buffered == 3  # not committed yet
    reader.commit(len(two) - 3)
    assert reader.buffered == len(two)
    assert reader.next_event() == "hello"
    assert reader.buffered == 0
    # a fragment that was parsed no longer counts as buffered
    reader.receive_data(raw(OP_BINARY, b"xy", fin=False))
    assert reader.next_event() is None and reader.buffered == 0


def test_writable_offers_at_least_what_is_asked():
    reader = FrameReader(masked=False, max_message=MiB)
    for ask in (1, 65536, INITIAL_BUFFER, 3 * MiB):
        with reader.writable(ask) as view:
            assert len(view) >= ask
    reader.receive_data(b"\x82")  # a pending byte is kept when the buffer moves or grows
    with reader.writable(5 * MiB) as view:
        assert len(view) >= 5 * MiB
        view[:1] = b"\x01"
    reader.commit(1)
    assert reader.next_event() is None  # the header of a 1-byte frame: its payload is missing
    reader.receive_data(b"z")
    assert reader.next_event() == b"z"


@given(st.binary(min_size=16, max_size=16))
def test_accept_token_is_wsprotos(raw):
    """The handshake's accept key equals wsproto's for any client key (and RFC 6455's own example)."""
    import base64

    from wsproto.utilities import generate_accept_token

    from kohakuriver_proto.ws_frames import accept_token

    key = base64.b64encode(raw)
    assert accept_token(key) == generate_accept_token(key)
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
