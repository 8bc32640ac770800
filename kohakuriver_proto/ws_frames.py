"""A sans-IO WebSocket frame codec (RFC 6455, no extensions) for the tunnel's data path.

Why not wsproto here: every tunnel byte crosses the runner and ``kr forward``, and wsproto (through
hypercorn or trio-websocket) copies each frame several times and runs a stack of Python layers per
message; that made those two processes the ceiling of a forward's throughput. This codec does the same
job with one copy per payload byte and a handful of operations per frame:

- ``FrameReader`` owns its receive buffer. The I/O layer reads straight into ``writable()`` (``recv_into``)
  and calls ``commit(n)``; ``next_event()`` then returns whole messages. The payload of an unmasked frame
  is copied out of the buffer once; a masked one is unmasked by the ``unmask`` function, which produces the
  copy (the I/O layer passes a C implementation; the default here is portable Python).
- ``frame_parts`` returns a frame as a list of buffers (header, payload) for a vectored write, so the
  payload is never concatenated with its header.

wsproto still does the opening handshakes; this module starts after the 101. The rules enforced are the
RFC's for a peer that negotiated nothing: RSV bits zero, known opcodes, minimal length encoding, control
frames final and at most 125 bytes, client frames masked and server frames not, continuation only inside a
fragmented message, text valid UTF-8, close codes in the ranges a peer may send. A violation raises
``WebSocketProtocolError`` carrying the close code to answer with (1002, 1007 or 1009).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

from .errors import RemoteProtocolError

__all__ = [
    "CLOSE_NORMAL",
    "CLOSE_NO_STATUS",
    "Close",
    "FrameReader",
    "Ping",
    "Pong",
    "WebSocketProtocolError",
    "accept_token",
    "close_payload",
    "frame_parts",
    "python_unmask",
]

#: RFC 6455 section 1.3: appended to the client's Sec-WebSocket-Key before hashing.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value a server answers to the client's ``Sec-WebSocket-Key`` ``key``
    (its base64 text as sent). Servers build their 101 with it; clients check the 101 against it."""
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())


OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

FIN = 0x80
RSV_BITS = 0x70
MASK_BIT = 0x80
MAX_CONTROL_PAYLOAD = 125

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
#: Not sent on the wire: what a close frame without a payload means (RFC 6455 section 7.1.5).
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
#: Codes a peer may put in a close frame (RFC 6455 section 7.4 and the IANA registry); 3000-4999 are for
#: libraries and applications.
_SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_CLOSE_CODE = struct.Struct(">H")

#: The reader's buffer starts at this size and grows to hold the largest frame it meets.
INITIAL_BUFFER = 1 << 20

Unmask = Callable[[memoryview, bytes], bytes]


class WebSocketProtocolError(RemoteProtocolError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Ping:
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is Ping and other.payload == self.payload

    def __repr__(self) -> str:
        return f"Ping({self.payload!r})"


class Pong:
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is Pong and other.payload == self.payload

    def __repr__(self) -> str:
        return f"Pong({self.payload!r})"


class Close:
    """The peer's close frame: ``code`` (1005 when it carried none) and ``reason``."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return type(other) is Close and (other.code, other.reason) == (self.code, self.reason)

    def __repr__(self) -> str:
        return f"Close({self.code}, {self.reason!r})"


#: What ``FrameReader.next_event`` returns: a binary message (bytes), a text message (str), a control frame,
#: or None when it needs more bytes.
Event = bytes | str | Ping | Pong | Close | None


def python_unmask(data: memoryview, key: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``key`` (portable; the I/O layer passes a C version)."""
    n = len(data)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(n, "little")


def frame_header(opcode: int, length: int, *, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """The header of one frame (with the masking key appended when ``mask_key`` is given)."""
    first = (FIN if fin else 0) | opcode
    mask = MASK_BIT if mask_key is not None else 0
    if length < 126:
        head = bytes((first, mask | length))
    elif length <= 0xFFFF:
        head = bytes((first, mask | 126)) + _U16.pack(length)
    else:
        head = bytes((first, mask | 127)) + _U64.pack(length)
    return head if mask_key is None else head + mask_key


def frame_parts(
    opcode: int,
    payload: bytes | bytearray | memoryview,
    *,
    mask_key: bytes | None = None,
    unmask: Unmask = python_unmask,
) -> list[bytes | bytearray | memoryview]:
    """One final frame as buffers for a vectored write: ``[header, payload]``. A client passes a fresh random
    4-byte ``mask_key`` per frame (this module has no randomness of its own) and the payload is masked with
    it; XOR is its own inverse, so the ``unmask`` function masks too."""
    if mask_key is None:
        return [frame_header(opcode, len(payload)), payload]
    return [frame_header(opcode, len(payload), mask_key=mask_key), unmask(memoryview(payload), mask_key)]


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload; the reason is cut (at a character boundary) to fit a control frame."""
    data = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return _CLOSE_CODE.pack(code) + data


class FrameReader:
    """Parses frames out of its own buffer and returns whole messages and control frames.

    ``masked``: whether the peer's frames must be masked (True on a server, False on a client).
    ``max_message``: largest message accepted (bytes, after reassembly); more is a 1009 error.
    """

    __slots__ = (
        "_buf",
        "_end",
        "_fragment_text",
        "_fragments",
        "_fragments_size",
        "_masked",
        "_max",
        "_missing",
        "_start",
        "_unmask",
    )  # fmt: skip

    def __init__(self, *, masked: bool, max_message: int, unmask: Unmask = python_unmask) -> None:
        self._masked = masked
        self._max = max_message
        self._unmask = unmask
        self._buf = bytearray(INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._fragment_text = False
        self._missing = 2

    # -- filling the buffer --------------------------------------------------------------------------------

    def writable(self, at_least: int = 65536) -> memoryview:
        """Free space at the end of the buffer (at least ``at_least`` bytes) for ``recv_into``. Release the
        view (``with reader.writable() as view:``) before calling ``commit``: a buffer with a view on it
        cannot grow."""
        buf = self._buf
        if len(buf) - self._end < at_least:
            pending = self._end - self._start
            if self._start:  # move the unparsed rest to the front
                buf[:pending] = buf[self._start : self._end]
                self._start, self._end = 0, pending
            if len(buf) - pending < at_least:
                buf.extend(bytes(at_least - (len(buf) - pending)))
        return memoryview(buf)[self._end :]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of the last ``writable()`` view."""
        self._end += n

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (for callers that already hold the bytes, e.g. what followed a handshake)."""
        n = len(data)
        self.writable(n)[:n] = data
        self._end += n

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned."""
        return self._end - self._start

    @property
    def missing(self) -> int:
        """After ``next_event`` returned None: how many more bytes it needs, at least, before it can return
        anything (the rest of the frame being received, or of its header). The I/O layer may sleep until that
        many have arrived (``SO_RCVLOWAT``) instead of waking for every segment of a large frame."""
        return self._missing

    # -- parsing -------------------------------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next message or control frame, or None until more bytes arrive."""
        while True:
            start, end = self._start, self._end
            if end - start < 2:
                self._missing = 2 - (end - start)
                return None
            buf = self._buf
            first, second = buf[start], buf[start + 1]
            if first & RSV_BITS:
                raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            opcode = first & 0x0F
            if bool(second & MASK_BIT) is not self._masked:
                which = "unmasked client" if self._masked else "masked server"
                raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, f"{which} frame")
            length = second & 0x7F
            pos = start + 2
            if length == 126:
                if end - pos < 2:
                    self._missing = pos + 2 - end
                    return None
                (length,) = _U16.unpack_from(buf, pos)
                pos += 2
                if length < 126:
                    raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "payload length not minimally encoded")
            elif length == 127:
                if end - pos < 8:
                    self._missing = pos + 8 - end
                    return None
                (length,) = _U64.unpack_from(buf, pos)
                pos += 8
                if length <= 0xFFFF or length >> 63:
                    raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "payload length not minimally encoded")
            fin = bool(first & FIN)
            if opcode in _CONTROL_OPCODES:
                if not fin or length > MAX_CONTROL_PAYLOAD:
                    raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented or long control frame")
            elif opcode not in _DATA_OPCODES:
                raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            elif length + self._fragments_size > self._max:
                raise WebSocketProtocolError(CLOSE_TOO_BIG, f"message larger than {self._max} bytes")
            key = None
            if self._masked:
                if end - pos < 4:
                    self._missing = pos + 4 - end
                    return None
                key = bytes(buf[pos : pos + 4])
                pos += 4
            if end - pos < length:
                # Make room for the whole frame at once rather than in read-sized steps.
                if len(buf) - start < pos - start + length:
                    self.writable(pos - start + length - (end - start))
                self._missing = pos + length - end
                return None
            stop = pos + length
            self._start = stop
            with memoryview(buf) as view, view[pos:stop] as part:
                payload = bytes(part) if key is None else self._unmask(part, key)
            if stop == end:
                self._start = self._end = 0
            if opcode in _CONTROL_OPCODES:
                return _control(opcode, payload)
            event = self._data(opcode, fin, payload)
            if event is not None:
                return event

    def _data(self, opcode: int, fin: bool, payload: bytes) -> bytes | str | None:
        fragments = self._fragments
        if opcode == OP_CONTINUATION:
            if fragments is None:
                raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame outside a message")
            fragments.append(payload)
            self._fragments_size += len(payload)
            if not fin:
                return None
            data = b"".join(fragments)
            text = self._fragment_text
            self._fragments = None
            self._fragments_size = 0
        else:
            if fragments is not None:
                raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if not fin:
                self._fragments = [payload]
                self._fragments_size = len(payload)
                self._fragment_text = opcode == OP_TEXT
                return None
            data = payload
            text = opcode == OP_TEXT
        if not text:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketProtocolError(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None


def _control(opcode: int, payload: bytes) -> Ping | Pong | Close:
    if opcode == OP_PING:
        return Ping(payload)
    if opcode == OP_PONG:
        return Pong(payload)
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
    (code,) = _CLOSE_CODE.unpack_from(payload)
    if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
        raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketProtocolError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
    return Close(code, reason)
