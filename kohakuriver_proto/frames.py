"""The tunnel frame: one binary WebSocket message = ``>BBIH`` header + payload.

Header fields: message type (u8), proto (u8), client id (u32), port (u16), all big-endian; the payload is
the rest of the message. There is no length field: the WebSocket message boundary delimits the frame.

Encoding copies the payload exactly once (into the outgoing ``bytes``); decoding from ``bytes`` or
``memoryview`` never copies it, the returned payload is a ``memoryview`` slice of the input. Callers that
keep a payload beyond the lifetime of the input buffer must copy it themselves.
"""

from __future__ import annotations

import enum
import struct

import attrs

from .errors import RemoteProtocolError

HEADER = struct.Struct(">BBIH")
HEADER_SIZE = HEADER.size  # 8
MAX_CLIENT_ID = 0xFFFF_FFFF
MAX_PORT = 0xFFFF

HELLO_PAYLOAD = struct.Struct(">II")
WINDOW_PAYLOAD = struct.Struct(">I")
_CLIENT_ID = struct.Struct(">I")

#: HELLO feature bit 0: per-connection flow control with WINDOW credits.
FEATURE_FLOW_CONTROL = 0x1
#: Features this library implements; a peer announcing others has them ignored.
SUPPORTED_FEATURES = FEATURE_FLOW_CONTROL
#: The initial per-connection window our peers announce in HELLO (bytes of DATA payload in flight per
#: direction). DESIGN names 256 KiB as the default, but a connection moves at most window / round trip, and
#: through the whole forward chain the round trip includes every socket buffer on the way: 256 KiB capped a
#: stream near 75-95 MiB/s; on two shared cores 2 MiB (OpenSSH's channel window) reached 290-330 MiB/s and
#: 8 MiB 365-435 MiB/s with less CPU per byte (bench/tunnel.py). Over a network with a real round trip the
#: larger window matters more (8 MiB / 30 ms = 267 MiB/s). The costs: a stalled reader holds up to this much
#: in each process, and interactive round trips sharing a tunnel with a bulk transfer wait behind more of
#: it (p99 13 -> 35-52 ms in the bench; the writers' express lanes, ``write_lanes.py``, brought it back to
#: 26-37 ms). Equal on both sides of the runner, so it passes credit through instead of buffering.
DEFAULT_WINDOW = 8 * 1024 * 1024


class MsgType(enum.IntEnum):
    CONNECT = 0x01
    CONNECTED = 0x02
    DATA = 0x03
    CLOSE = 0x04
    ERROR = 0x05
    PING = 0x06
    PONG = 0x07
    # Negotiated extensions (DESIGN section 4).
    HELLO = 0x08
    WINDOW = 0x09


class Proto(enum.IntEnum):
    TCP = 0x00
    UDP = 0x01

    @classmethod
    def parse(cls, text: str) -> Proto:
        """``"tcp"``/``"udp"`` (as in ``?proto=``) to a ``Proto``; anything else raises ``ValueError``."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"proto must be 'tcp' or 'udp', not {text!r}") from None


@attrs.frozen
class Frame:
    """A decoded frame of a known message type."""

    type: MsgType
    proto: Proto
    client_id: int
    port: int
    payload: bytes | memoryview = b""

    def encode(self) -> bytes:
        return encode(self.type, self.client_id, self.payload, proto=self.proto, port=self.port)


@attrs.frozen
class UnknownFrame:
    """A frame whose message type this version does not know. Receivers ignore it (DESIGN section 4)."""

    type_code: int
    proto_code: int
    client_id: int
    port: int
    payload: bytes | memoryview = b""


def encode(
    type: MsgType,
    client_id: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    proto: Proto = Proto.TCP,
    port: int = 0,
) -> bytes:
    """Build one frame. The payload is copied once, into the result."""
    if not 0 <= client_id <= MAX_CLIENT_ID:
        raise ValueError(f"client_id out of range: {client_id}")
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"port out of range: {port}")
    header = HEADER.pack(type, proto, client_id, port)
    if not payload:
        return header
    return b"".join((header, payload))


def decode(data: bytes | bytearray | memoryview) -> Frame | UnknownFrame:
    """Parse one frame. Raises ``RemoteProtocolError`` for a short frame or an unknown proto.

    The payload of the result is a zero-copy ``memoryview`` into ``data``.
    """
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"frame too short: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    type_code, proto_code, client_id, port = HEADER.unpack_from(data)
    view = memoryview(data)[HEADER_SIZE:]
    try:
        msg_type = MsgType(type_code)
    except ValueError:
        return UnknownFrame(type_code, proto_code, client_id, port, view)
    try:
        proto = Proto(proto_code)
    except ValueError:
        raise RemoteProtocolError(f"unknown proto 0x{proto_code:02x} in {msg_type.name} frame") from None
    return Frame(msg_type, proto, client_id, port, view)


# -- helpers for the extension payloads ------------------------------------------------------------------


def encode_hello(features: int = SUPPORTED_FEATURES, window: int = DEFAULT_WINDOW) -> bytes:
    return encode(MsgType.HELLO, 0, HELLO_PAYLOAD.pack(features, window))


def parse_hello(frame: Frame) -> tuple[int, int]:
    """Return ``(features, initial_window)`` of a HELLO frame."""
    if len(frame.payload) < HELLO_PAYLOAD.size:
        raise RemoteProtocolError(
            f"HELLO payload must be {HELLO_PAYLOAD.size} bytes, got {len(frame.payload)}"
        )
    features, window = HELLO_PAYLOAD.unpack_from(frame.payload)
    return features, window


def encode_window(client_id: int, credit: int, proto: Proto = Proto.TCP) -> bytes:
    return encode(MsgType.WINDOW, client_id, WINDOW_PAYLOAD.pack(credit), proto=proto)


def parse_window(frame: Frame) -> int:
    """Return the credit (bytes) a WINDOW frame returns."""
    if len(frame.payload) != WINDOW_PAYLOAD.size:
        raise RemoteProtocolError(
            f"WINDOW payload must be {WINDOW_PAYLOAD.size} bytes, got {len(frame.payload)}"
        )
    (credit,) = WINDOW_PAYLOAD.unpack_from(frame.payload)
    return credit


def parse_error_reason(frame: Frame) -> str:
    """The UTF-8 reason of an ERROR frame; undecodable bytes are replaced rather than raising."""
    return bytes(frame.payload).decode("utf-8", errors="replace")


def rewrite_client_id(data: bytes | bytearray | memoryview, client_id: int) -> bytearray:
    """Return a copy of ``data`` with its client id replaced (one copy of the payload, none for the header).

    Used by the runner to translate ids between a user session and the container tunnel.
    """
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"frame too short: {len(data)} bytes")
    buf = bytearray(data)
    _CLIENT_ID.pack_into(buf, 2, client_id)
    return buf
