"""The queue in front of one tunnel WebSocket's writer: interactive frames ahead of bulk data.

Flow control lets every connection have a whole window (megabytes) in flight, and on the runner much of it
waits in the queue of the WebSocket that leads on (the next process is the slower one). In a single FIFO a
keystroke or a 64-byte reply of one connection would wait behind all of another connection's bulk data
(measured in ``bench/tunnel.py``: about 20 ms at 8 MiB windows). So the queue has two lanes, and the writer
empties the express lane first:

- express: frames that may overtake anything (WINDOW credit, PING/PONG, HELLO: their order relative to
  DATA does not matter), and small frames of a connection that has nothing in the bulk lane;
- bulk: everything else, in order.

A connection's own frames never change order: once one of its frames is in the bulk lane, its later ones
(a small DATA, its CLOSE) follow it there until the bulk lane no longer holds any of its frames. Frames
that do not parse as tunnel frames (text, or anything shorter than a header) go to the bulk lane under one
shared key, so they keep their order too.

Sans-IO: the daemon pushes, pops and writes; nothing here waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

from .frames import HEADER, HEADER_SIZE, MsgType

__all__ = ["EXPRESS_MAX", "WriteLanes", "lane_of"]

#: DATA (or other ordered) frames up to this size, header included, may take the express lane.
EXPRESS_MAX = 16 * 1024 + HEADER_SIZE

_OVERTAKERS = frozenset({int(MsgType.WINDOW), int(MsgType.PING), int(MsgType.PONG), int(MsgType.HELLO)})
_UNPARSED = object()  # the order key of everything that is not a tunnel frame


def lane_of(frame: bytes | bytearray | memoryview | str) -> tuple[Hashable | None, bool]:
    """``(key, small)`` for a frame on its way to a WebSocket: ``key`` names the connection whose order it
    is part of (None: it may overtake anything), ``small`` whether it is short enough for the express lane.
    """
    if isinstance(frame, str) or len(frame) < HEADER_SIZE:
        return _UNPARSED, False
    kind, _proto, client_id, _port = HEADER.unpack_from(frame)
    if kind in _OVERTAKERS:
        return None, True
    return client_id, len(frame) <= EXPRESS_MAX


class WriteLanes:
    """Items waiting for one writer, in two lanes. ``push`` files an item under its ``key``/``small`` (see
    ``lane_of``); ``popleft`` returns the express lane's first item, else the bulk lane's."""

    __slots__ = ("_bulk", "_express", "_in_bulk")

    def __init__(self) -> None:
        self._express: deque[Any] = deque()
        self._bulk: deque[tuple[Any, Hashable]] = deque()
        self._in_bulk: dict[Hashable, int] = {}

    def push(self, item: Any, key: Hashable | None, small: bool) -> None:
        in_bulk = self._in_bulk
        if key is None or (small and key not in in_bulk):
            self._express.append(item)
            return
        self._bulk.append((item, key))
        in_bulk[key] = in_bulk.get(key, 0) + 1

    def push_last(self, item: Any) -> None:
        """An item that must come after everything pushed so far (a close marker)."""
        self._bulk.append((item, _UNPARSED))
        self._in_bulk[_UNPARSED] = self._in_bulk.get(_UNPARSED, 0) + 1
        # Whatever is in the express lane now was pushed before it and is written first anyway.

    def first(self) -> Any:
        """The item ``popleft`` would return (the queue must not be empty)."""
        return self._express[0] if self._express else self._bulk[0][0]

    def popleft(self) -> Any:
        if self._express:
            return self._express.popleft()
        item, key = self._bulk.popleft()
        in_bulk = self._in_bulk
        left = in_bulk[key] - 1
        if left:
            in_bulk[key] = left
        else:
            del in_bulk[key]
        return item

    def __len__(self) -> int:
        return len(self._express) + len(self._bulk)

    def __bool__(self) -> bool:
        return bool(self._express or self._bulk)
