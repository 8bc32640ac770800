"""Frames: vectors, round trips, and arbitrary bytes only ever raising the library's error."""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import ProtocolError, RemoteProtocolError, frames
from kohakuriver_proto.frames import Frame, MsgType, Proto, UnknownFrame

VECTORS = json.loads((pathlib.Path(__file__).parent.parent / "vectors" / "tunnel_frames.json").read_text())


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors_decode_and_encode(vec):
    raw = bytes.fromhex(vec["hex"])
    frame = frames.decode(raw)
    assert isinstance(frame, Frame)
    assert frame.type == vec["type"] and frame.type.name == vec["type_name"]
    assert frame.proto == vec["proto"]
    assert frame.client_id == vec["client_id"]
    assert frame.port == vec["port"]
    assert bytes(frame.payload) == bytes.fromhex(vec["payload_hex"])
    assert frame.encode() == raw


@pytest.mark.parametrize("vec", VECTORS["unknown_type"], ids=lambda v: v["name"])
def test_unknown_types_decode_to_ignorable_value(vec):
    frame = frames.decode(bytes.fromhex(vec["hex"]))
    assert isinstance(frame, UnknownFrame)
    assert frame.type_code == vec["type"]


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_raise_remote_error(vec):
    with pytest.raises(RemoteProtocolError):
        frames.decode(bytes.fromhex(vec["hex"]))


def test_hello_and_window_payloads():
    hello = frames.decode(frames.encode_hello(1, 12345))
    assert frames.parse_hello(hello) == (1, 12345)
    win = frames.decode(frames.encode_window(9, 4096))
    assert win.client_id == 9 and frames.parse_window(win) == 4096
    with pytest.raises(RemoteProtocolError):
        frames.parse_window(frames.decode(frames.encode(MsgType.WINDOW, 9, b"\x00")))
    with pytest.raises(RemoteProtocolError):
        frames.parse_hello(frames.decode(frames.encode(MsgType.HELLO, 0, b"\x00")))


def test_decode_does_not_copy_payload():
    raw = bytearray(frames.encode(MsgType.DATA, 1, b"abcdef"))
    frame = frames.decode(raw)
    raw[-1] = ord("Z")  # the payload is a view: it sees the change
    assert bytes(frame.payload) == b"abcdeZ"


def test_encode_rejects_out_of_range_fields():
    with pytest.raises(ValueError):
        frames.encode(MsgType.DATA, -1)
    with pytest.raises(ValueError):
        frames.encode(MsgType.DATA, 2**32)
    with pytest.raises(ValueError):
        frames.encode(MsgType.CONNECT, 1, port=70000)


def test_rewrite_client_id_keeps_everything_else():
    raw = frames.encode(MsgType.DATA, 1, b"payload", proto=Proto.UDP, port=7)
    out = frames.decode(frames.rewrite_client_id(raw, 0xDEADBEEF))
    assert (out.type, out.proto, out.client_id, out.port, bytes(out.payload)) == (
        MsgType.DATA,
        Proto.UDP,
        0xDEADBEEF,
        7,
        b"payload",
    )


def test_proto_parse():
    assert Proto.parse("tcp") is Proto.TCP and Proto.parse("UDP") is Proto.UDP
    with pytest.raises(ValueError):
        Proto.parse("sctp")


@given(
    st.sampled_from(list(MsgType)),
    st.sampled_from(list(Proto)),
    st.integers(0, frames.MAX_CLIENT_ID),
    st.integers(0, frames.MAX_PORT),
    st.binary(max_size=2048),
)
def test_round_trip_every_type(msg_type, proto, client_id, port, payload):
    raw = frames.encode(msg_type, client_id, payload, proto=proto, port=port)
    frame = frames.decode(raw)
    assert frame == Frame(msg_type, proto, client_id, port, memoryview(payload))
    assert frames.decode(memoryview(raw)).encode() == raw


@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_protocol_error(data):
    try:
        frame = frames.decode(data)
    except ProtocolError:
        return
    assert isinstance(frame, Frame | UnknownFrame)
