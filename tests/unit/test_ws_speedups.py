"""The fast masker gives exactly wsproto's results, also when a message is masked in several chunks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from wsproto import frame_protocol

from kohakuriver_net import ws_speedups


@given(st.binary(min_size=4, max_size=4), st.lists(st.binary(max_size=300), max_size=6))
def test_same_output_as_wsproto_for_any_chunking(key, chunks):
    assert ws_speedups.install()
    fast = frame_protocol.XorMaskerSimple(key)
    slow = ws_speedups.original_masker(key)
    for chunk in chunks:
        assert bytes(fast.process(chunk)) == bytes(slow.process(chunk))


def test_masking_twice_is_identity():
    assert ws_speedups.install()
    data = bytes(range(256)) * 10
    masked = frame_protocol.XorMaskerSimple(b"\x01\x02\x03\x04").process(data)
    assert bytes(frame_protocol.XorMaskerSimple(b"\x01\x02\x03\x04").process(masked)) == data
