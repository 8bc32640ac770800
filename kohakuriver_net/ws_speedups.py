"""Fast WebSocket masking for wsproto (used by hypercorn on the server side and trio-websocket as client).

Every client-to-server WebSocket frame is XOR-masked (RFC 6455 section 5.3) and every server unmasks it.
wsproto does this in pure Python at about 0.25 GB/s, which caps each hop of the `kr forward` chain near
2 Gbit/s. The `websockets` package ships the same operation as a C function (tens of GB/s); we swap it into
wsproto's masker class. The swap is process-wide and idempotent; without the C extension nothing changes.
"""

from __future__ import annotations

import logging

from kohakuriver_proto.ws_frames import python_unmask

try:
    from websockets.speedups import apply_mask  # type: ignore[import-not-found]
except ImportError:  # no C extension for this platform: stay correct, just slower
    apply_mask = None

log = logging.getLogger(__name__)
_installed = False
#: wsproto's own masker, kept for tests that compare against it.
original_masker: type | None = None


def install() -> bool:
    """Replace wsproto's pure-Python masker with a C one. Returns whether the fast path is active."""
    global _installed, original_masker
    if _installed:
        return True
    if apply_mask is None:
        log.info("websockets.speedups is unavailable; WebSocket masking stays in pure Python")
        return False
    from wsproto import frame_protocol

    class FastXorMasker:
        """Drop-in for ``wsproto.frame_protocol.XorMaskerSimple``: same rotating-key semantics."""

        __slots__ = ("_key",)

        def __init__(self, masking_key: bytes | bytearray) -> None:
            self._key = bytes(masking_key)

        def process(self, data: bytes | bytearray) -> bytes | bytearray:
            # bytes, not bytearray as the pure-Python masker returns: every caller in wsproto only
            # concatenates or copies the result, and converting would copy each frame once more.
            if not data:
                return data
            out = apply_mask(data, self._key)
            # A message may arrive in several chunks: the next chunk continues with the next key byte.
            rotation = len(data) % 4
            if rotation:
                self._key = self._key[rotation:] + self._key[:rotation]
            return out

    original_masker = frame_protocol.XorMaskerSimple
    frame_protocol.XorMaskerSimple = FastXorMasker  # type: ignore[misc]
    _installed = True
    return True


#: XOR a payload with a 4-byte masking key, in C when the extension is there (``kohakuriver_net.websocket``
#: and ``kohakuriver_proto.ws_frames`` take it as their ``unmask``).
unmask = apply_mask or python_unmask
