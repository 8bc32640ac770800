"""WriteLanes: interactive frames go ahead of bulk data, and no connection's frames ever change order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto.frames import MsgType, encode, encode_hello, encode_window
from kohakuriver_proto.write_lanes import EXPRESS_MAX, WriteLanes, lane_of

BIG = b"x" * EXPRESS_MAX  # payload + header > EXPRESS_MAX


def test_lane_of_frames():
    assert lane_of(encode_window(7, 4096)) == (None, True)
    assert lane_of(encode(MsgType.PING, 0)) == (None, True)
    assert lane_of(encode_hello()) == (None, True)
    assert lane_of(encode(MsgType.DATA, 7, b"ls\n")) == (7, True)
    assert lane_of(encode(MsgType.CLOSE, 7)) == (7, True)
    assert lane_of(encode(MsgType.DATA, 7, BIG)) == (7, False)
    # not tunnel frames: one shared key, never express
    text_key, small = lane_of("CONNECTED")
    assert not small and lane_of(b"\x03") == (text_key, False)


def test_a_small_reply_overtakes_another_connections_bulk_data():
    lanes = WriteLanes()
    for n in range(3):
        lanes.push(f"bulk{n}", *lane_of(encode(MsgType.DATA, 1, BIG)))
    lanes.push("reply", *lane_of(encode(MsgType.DATA, 2, b"pong")))
    lanes.push("credit", *lane_of(encode_window(1, 1 << 20)))
    assert [lanes.popleft() for _ in range(len(lanes))] == ["reply", "credit", "bulk0", "bulk1", "bulk2"]
    assert not lanes


def test_a_connection_with_bulk_queued_keeps_its_small_frames_and_close_behind_it():
    lanes = WriteLanes()
    lanes.push("big", *lane_of(encode(MsgType.DATA, 1, BIG)))
    lanes.push("tail", *lane_of(encode(MsgType.DATA, 1, b"end")))
    lanes.push("close", *lane_of(encode(MsgType.CLOSE, 1)))
    assert lanes.first() == "big"
    assert [lanes.popleft() for _ in range(3)] == ["big", "tail", "close"]
    # once its bulk is out, the connection's small frames are express again
    lanes.push("other-bulk", *lane_of(encode(MsgType.DATA, 2, BIG)))
    lanes.push("small", *lane_of(encode(MsgType.DATA, 1, b"a")))
    assert lanes.popleft() == "small"


def test_push_last_comes_after_everything_pushed_before_it():
    lanes = WriteLanes()
    lanes.push("bulk", *lane_of(encode(MsgType.DATA, 1, BIG)))
    lanes.push("small", *lane_of(encode(MsgType.DATA, 2, b"a")))
    lanes.push_last("marker")
    assert [lanes.popleft() for _ in range(3)] == ["small", "bulk", "marker"]


# one operation: push a frame (connection, kind, size) or pop
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.integers(1, 4),
            st.sampled_from(["data", "close", "window"]),
            st.sampled_from([0, 5, EXPRESS_MAX - 8, EXPRESS_MAX]),
        ),
        st.just(("pop",)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_per_connection_order_is_kept_and_overtakers_never_wait_behind_bulk(operations):
    lanes = WriteLanes()
    pushed: dict[int, list[int]] = {}
    popped: dict[int, list[int]] = {}
    bulk_waiting: set[int] = set()  # serials of bulk-lane items not yet popped
    express_serials: set[int] = set()
    serial = 0
    out = []

    def pop():
        item = lanes.popleft()
        kind, cid, n = item
        out.append(item)
        if kind != "window":
            popped.setdefault(cid, []).append(n)
        if n in express_serials:
            express_serials.discard(n)
        else:
            # a bulk item leaves only when no express item is waiting
            assert not express_serials
            bulk_waiting.discard(n)

    for op in operations:
        if op[0] == "pop":
            if lanes:
                pop()
            continue
        _, cid, kind, size = op
        serial += 1
        frame = (
            encode_window(cid, 1)
            if kind == "window"
            else encode(MsgType.DATA if kind == "data" else MsgType.CLOSE, cid, b"x" * size)
        )
        key, small = lane_of(frame)
        in_bulk_before = len(lanes)
        lanes.push((kind, cid, serial), key, small)
        assert len(lanes) == in_bulk_before + 1
        if kind != "window":
            pushed.setdefault(cid, []).append(serial)
        # which lane did it take? express items are popped before any bulk item
        is_express = key is None or (small and not any(s in bulk_waiting for s in _serials_of(cid, pushed)))
        (express_serials if is_express else bulk_waiting).add(serial)
    while lanes:
        pop()
    assert popped == pushed  # every connection's frames, all of them, in push order
    assert len(out) == serial


def _serials_of(cid: int, pushed: dict[int, list[int]]) -> list[int]:
    return pushed.get(cid, [])[:-1]  # the ones pushed before the current frame
