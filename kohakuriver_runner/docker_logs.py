"""Docker's multiplexed stdout/stderr stream framing, as a sans-IO incremental decoder.

When a container (or an exec) runs without a TTY, the Engine API sends its output as frames: an 8-byte header
``[stream u8][0][0][0][size u32 big-endian]`` followed by ``size`` payload bytes. With a TTY the stream is raw
bytes and must not go through this decoder.

The decoder hands out payload bytes as soon as they arrive rather than waiting for a whole frame, so memory
stays bounded by what one ``receive_data`` call brings, whatever size a (possibly corrupt) header announces.
It never touches a socket or a clock: feed it bytes, read chunks back, call ``close()`` at end of stream.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterator

import attrs

__all__ = ["HEADER", "Chunk", "MultiplexDecoder", "StreamFormatError", "StreamType", "encode_frame"]

HEADER = struct.Struct(">BxxxI")


class StreamType(enum.IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2
    # Used by the attach/exec endpoints for errors the engine itself reports mid-stream.
    SYSTEM = 3


class StreamFormatError(ValueError):
    """The bytes are not a multiplexed Docker stream (bad header, or the stream ended inside a frame).

    The usual cause is a container created with a TTY, whose output is raw and unframed.
    """


@attrs.frozen
class Chunk:
    """A piece of one frame's payload; several chunks may come from one frame."""

    stream: StreamType
    data: bytes


def encode_frame(stream: StreamType | int, data: bytes) -> bytes:
    """One frame as the engine writes it (used by tests and fakes)."""
    return HEADER.pack(int(stream), len(data)) + bytes(data)


class MultiplexDecoder:
    """Incremental decoder: ``receive_data(bytes)`` then ``next_chunk()`` until it returns ``None``.

    Payload bytes of consecutive frames of the same stream may come out merged into one chunk; chunks of
    different streams never merge and keep their order. Zero-length frames produce nothing.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._ready: deque[Chunk] = deque()  # complete chunks, split off where the stream changed
        self._pending = bytearray()  # payload of ``self._stream`` received but not handed out yet
        self._stream = StreamType.STDOUT  # stream of the current frame (and of ``_pending``)
        self._remaining = 0  # payload bytes of the current frame not received yet
        self._closed = False

    @property
    def in_frame(self) -> bool:
        """True while the rest of a header or of a frame's payload is still expected."""
        return bool(self._header) or self._remaining > 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise RuntimeError("receive_data() after close()")
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                self._pending += view[pos : pos + take]
                self._remaining -= take
                pos += take
                continue
            take = min(HEADER.size - len(self._header), end - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == HEADER.size:
                self._start_frame(bytes(self._header))
                self._header.clear()

    def _start_frame(self, header: bytes) -> None:
        kind, size = HEADER.unpack(header)
        if header[1:4] != b"\0\0\0" or kind not in _STREAM_VALUES:
            raise StreamFormatError(f"invalid frame header {header.hex()} (a TTY stream is not multiplexed)")
        stream = StreamType(kind)
        if stream != self._stream and self._pending:
            self._ready.append(Chunk(self._stream, bytes(self._pending)))
            self._pending.clear()
        self._stream = stream
        self._remaining = size

    def next_chunk(self) -> Chunk | None:
        if self._ready:
            return self._ready.popleft()
        if self._pending:
            chunk = Chunk(self._stream, bytes(self._pending))
            self._pending.clear()
            return chunk
        return None

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk available now."""
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def close(self) -> None:
        """Declare the end of the stream; raise ``StreamFormatError`` if it ended inside a header or frame.

        Chunks already received stay available through ``next_chunk()``.
        """
        self._closed = True
        if self._header:
            raise StreamFormatError(f"stream ended inside a frame header ({len(self._header)} of 8 bytes)")
        if self._remaining:
            raise StreamFormatError(f"stream ended {self._remaining} bytes before the end of a frame")


_STREAM_VALUES = frozenset(int(s) for s in StreamType)
