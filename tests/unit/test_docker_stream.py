"""Docker's multiplexed stdout/stderr stream: the sans-IO decoder fed bytes split every possible way, and the
client's streaming calls (logs, pull, wait) over a fake engine. The real engine is in tests/integration."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_runner.docker_api import (
    BadRequest,
    Conflict,
    ContainerSpec,
    DockerClient,
    DockerError,
    DockerUnavailable,
    NotFound,
    PortBinding,
    parse_time,
    split_image_ref,
)
from kohakuriver_runner.docker_logs import (
    Chunk,
    MultiplexDecoder,
    StreamFormatError,
    StreamType,
    encode_frame,
)

frames_strategy = st.lists(
    st.tuples(st.sampled_from([StreamType.STDOUT, StreamType.STDERR]), st.binary(max_size=64)), max_size=12
)


def decode_all(pieces: list[bytes]) -> list[Chunk]:
    decoder = MultiplexDecoder()
    out: list[Chunk] = []
    for piece in pieces:
        decoder.receive_data(piece)
        out.extend(decoder.chunks())
    decoder.close()
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def expected_runs(frames: list[tuple[StreamType, bytes]]) -> list[tuple[StreamType, bytes]]:
    """Per-stream runs: consecutive frames of one stream concatenated, empty frames gone."""
    runs: list[tuple[StreamType, bytes]] = []
    for stream, data in frames:
        if not data:
            continue
        if runs and runs[-1][0] == stream:
            runs[-1] = (stream, runs[-1][1] + data)
        else:
            runs.append((stream, data))
    return runs


def merge(chunks: list[Chunk]) -> list[tuple[StreamType, bytes]]:
    return expected_runs([(c.stream, c.data) for c in chunks])


def test_two_frames_in_one_piece():
    wire = encode_frame(StreamType.STDOUT, b"hi\n") + encode_frame(StreamType.STDERR, b"oops\n")
    assert decode_all([wire]) == [Chunk(StreamType.STDOUT, b"hi\n"), Chunk(StreamType.STDERR, b"oops\n")]


def test_header_layout_matches_the_engine():
    assert encode_frame(StreamType.STDERR, b"abc") == b"\x02\x00\x00\x00\x00\x00\x00\x03abc"


def test_byte_at_a_time():
    wire = encode_frame(StreamType.STDOUT, b"hello") + encode_frame(StreamType.STDOUT, b" world")
    chunks = decode_all([wire[i : i + 1] for i in range(len(wire))])
    assert merge(chunks) == [(StreamType.STDOUT, b"hello world")]


def test_payload_is_handed_out_before_the_frame_is_complete():
    decoder = MultiplexDecoder()
    decoder.receive_data(encode_frame(StreamType.STDERR, b"0123456789")[:12])
    assert decoder.next_chunk() == Chunk(StreamType.STDERR, b"0123")
    assert decoder.next_chunk() is None
    assert decoder.in_frame
    decoder.receive_data(b"456789")
    assert decoder.next_chunk() == Chunk(StreamType.STDERR, b"456789")
    assert not decoder.in_frame
    decoder.close()


def test_empty_frames_produce_nothing():
    wire = encode_frame(StreamType.STDOUT, b"") + encode_frame(StreamType.STDERR, b"")
    assert decode_all([wire]) == []


def test_huge_announced_size_does_not_buffer():
    decoder = MultiplexDecoder()
    decoder.receive_data(b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"x" * 10)
    assert decoder.next_chunk() == Chunk(StreamType.STDOUT, b"x" * 10)
    with pytest.raises(StreamFormatError, match="before the end of a frame"):
        decoder.close()


@pytest.mark.parametrize(
    "header",
    [
        b"\x05\x00\x00\x00\x00\x00\x00\x01",  # unknown stream type
        b"\x01\x00\x01\x00\x00\x00\x00\x01",  # padding not zero
        b"hello wo",  # a TTY stream fed to the decoder by mistake
    ],
)
def test_bad_header_is_rejected(header: bytes):
    decoder = MultiplexDecoder()
    with pytest.raises(StreamFormatError):
        decoder.receive_data(header + b"x")


def test_truncated_header_at_close():
    decoder = MultiplexDecoder()
    decoder.receive_data(b"\x01\x00\x00")
    with pytest.raises(StreamFormatError, match="inside a frame header"):
        decoder.close()


def test_receive_after_close_is_a_local_error():
    decoder = MultiplexDecoder()
    decoder.close()
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"")


def test_stdin_and_system_streams_are_accepted():
    wire = encode_frame(StreamType.SYSTEM, b"engine says") + encode_frame(StreamType.STDIN, b"echo")
    assert decode_all([wire]) == [Chunk(StreamType.SYSTEM, b"engine says"), Chunk(StreamType.STDIN, b"echo")]


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_chunking_gives_the_same_streams(frames, cuts):
    wire = b"".join(encode_frame(s, d) for s, d in frames)
    chunks = decode_all(split_at(wire, cuts))
    assert all(c.data for c in chunks)
    # Chunks never mix streams, keep order, and together are exactly the payloads.
    assert merge(chunks) == expected_runs(frames)
    for stream in (StreamType.STDOUT, StreamType.STDERR):
        assert b"".join(c.data for c in chunks if c.stream == stream) == b"".join(
            d for s, d in frames if s == stream
        )


@given(frames=frames_strategy)
def test_every_single_split_point(frames):
    wire = b"".join(encode_frame(s, d) for s, d in frames)
    want = expected_runs(frames)
    for i in range(len(wire) + 1):
        assert merge(decode_all([wire[:i], wire[i:]])) == want


@given(frames=frames_strategy.filter(bool), data=st.data())
def test_stream_cut_short_is_reported(frames, data):
    wire = b"".join(encode_frame(s, d) for s, d in frames)
    cut = data.draw(st.integers(min_value=1, max_value=len(wire) - 1)) if len(wire) > 1 else 0
    # Frame boundaries are the only places a stream may legally end.
    boundaries, pos = {0}, 0
    for _s, d in frames:
        pos += 8 + len(d)
        boundaries.add(pos)
    decoder = MultiplexDecoder()
    decoder.receive_data(wire[:cut])
    list(decoder.chunks())
    if cut in boundaries:
        decoder.close()
    else:
        with pytest.raises(StreamFormatError):
            decoder.close()


# -- the client's streaming calls over a fake engine (httpx.MockTransport, no Docker needed) ----------------


def fake_docker(handler) -> DockerClient:
    return DockerClient("/nonexistent.sock", transport=httpx.MockTransport(handler))


async def chunked(pieces: list[bytes]):
    for piece in pieces:
        yield piece


async def test_logs_are_demultiplexed_across_odd_chunks():
    wire = encode_frame(StreamType.STDOUT, b"out1\n") + encode_frame(StreamType.STDERR, b"err1\n")
    wire += encode_frame(StreamType.STDOUT, b"out2\n")

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1.41/containers/c1/logs"
        assert request.url.params["follow"] == "true"
        assert request.url.params["tail"] == "all"
        return httpx.Response(200, content=chunked([wire[:3], wire[3:11], wire[11:]]))

    async with fake_docker(handler) as docker:
        got = [item async for item in docker.logs("c1", follow=True, tty=False)]
    assert merge([Chunk(s, d) for s, d in got]) == [
        (StreamType.STDOUT, b"out1\n"),
        (StreamType.STDERR, b"err1\n"),
        (StreamType.STDOUT, b"out2\n"),
    ]


async def test_tty_logs_pass_through_and_tty_is_looked_up():
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/json"):
            return httpx.Response(200, json={"Id": "c1", "Config": {"Tty": True}, "State": {}})
        return httpx.Response(200, content=b"raw tty bytes\r\n")

    async with fake_docker(handler) as docker:
        got = [item async for item in docker.logs("c1")]
    assert got == [(StreamType.STDOUT, b"raw tty bytes\r\n")]


async def test_truncated_log_stream_is_a_docker_error():
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=encode_frame(StreamType.STDOUT, b"complete")[:-3])

    async with fake_docker(handler) as docker:
        with pytest.raises(DockerError, match="malformed output stream"):
            async for _ in docker.logs("c1", tty=False):
                pass


@pytest.mark.parametrize(
    ("status", "error"), [(404, NotFound), (409, Conflict), (400, BadRequest), (500, DockerError)]
)
async def test_http_errors_map_to_types_with_the_engine_message(status, error):
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"message": "No such container: c1"})

    async with fake_docker(handler) as docker:
        with pytest.raises(error) as info:
            await docker.inspect("c1")
    assert info.value.status == status
    assert info.value.message == "No such container: c1"


async def test_pull_reports_progress_and_raises_an_in_stream_error():
    lines = [
        {"status": "Pulling from library/x", "id": "latest"},
        {"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "id": "abc"},
        {"errorDetail": {"message": "unexpected EOF"}, "error": "unexpected EOF"},
    ]
    body = b"".join(json.dumps(line).encode() + b"\r\n" for line in lines)

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["fromImage"] == "registry.local:5000/team/x"
        assert request.url.params["tag"] == "v2"
        return httpx.Response(200, content=chunked([body[:20], body[20:]]))

    seen = []

    async def progress(event):
        seen.append(event["status"])

    async with fake_docker(handler) as docker:
        with pytest.raises(DockerError, match="unexpected EOF") as info:
            await docker.pull_image("registry.local:5000/team/x:v2", progress=progress)
    assert info.value.status is None
    assert seen == ["Pulling from library/x", "Downloading"]


async def test_wait_survives_an_engine_restart(autojump_clock):
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if len(calls) == 2:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return httpx.Response(200, json={"StatusCode": 137, "Error": None})

    async with fake_docker(handler) as docker:
        assert await docker.wait("c1") == 137
    assert calls == ["/v1.41/containers/c1/wait"] * 3


async def test_wait_without_reconnect_reports_unavailable():
    async def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 2] No such file or directory")

    async with fake_docker(handler) as docker:
        with pytest.raises(DockerUnavailable):
            await docker.wait("c1", reconnect=False)


def test_create_body_for_a_gpu_task():
    spec = ContainerSpec(
        name="kohakuriver-task-1",
        image="kohakuriver/busybox:latest",
        cmd=["python", "train.py", "--lr", 0.1],
        entrypoint=[],
        env={"A": "1"},
        cpuset_cpus=[0, 1, 2],
        cpuset_mems=[0],
        memory_bytes=1 << 30,
        gpu_ids=[2, 3],
        network="kohakuriver-net",
        ipv4_address="172.30.0.9",
        ports={22: PortBinding("0.0.0.0", 2222)},
        restart_policy="unless-stopped",
    )
    body = spec.to_api()
    host = body["HostConfig"]
    assert body["Cmd"] == ["python", "train.py", "--lr", "0.1"]
    assert body["Entrypoint"] == [""]
    assert body["Env"] == ["A=1"]
    assert body["ExposedPorts"] == {"22/tcp": {}}
    assert host["PortBindings"] == {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "2222"}]}
    assert (host["CpusetCpus"], host["CpusetMems"]) == ("0,1,2", "0")
    assert host["Memory"] == host["MemorySwap"] == 1 << 30
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["2", "3"], "Capabilities": [["gpu"]]}
    ]
    assert host["Init"] is True
    assert host["AutoRemove"] is False
    assert host["RestartPolicy"] == {"Name": "unless-stopped", "MaximumRetryCount": 0}
    assert body["NetworkingConfig"] == {
        "EndpointsConfig": {"kohakuriver-net": {"IPAMConfig": {"IPv4Address": "172.30.0.9"}}}
    }


@pytest.mark.parametrize(
    "kwargs",
    [{"env": {"A=B": "1"}}, {"memory_bytes": 0}, {"ipv4_address": "10.0.0.2"}, {"nano_cpus": -1}],
)
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        ContainerSpec(name="x", image="y", **kwargs)


@pytest.mark.parametrize(
    ("ref", "split"),
    [
        ("busybox", ("busybox", "latest")),
        ("kohakuriver/debian:bookworm", ("kohakuriver/debian", "bookworm")),
        ("registry.local:5000/team/x", ("registry.local:5000/team/x", "latest")),
        ("registry.local:5000/team/x:v2", ("registry.local:5000/team/x", "v2")),
        ("x@sha256:" + "a" * 64, ("x@sha256:" + "a" * 64, "")),
    ],
)
def test_split_image_ref(ref, split):
    assert split_image_ref(ref) == split


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:20:30.123456789Z", datetime(2024, 5, 1, 10, 20, 30, 123456, tzinfo=UTC)),
        ("2024-05-01T10:20:30Z", datetime(2024, 5, 1, 10, 20, 30, tzinfo=UTC)),
        ("2024-05-01T12:20:30.5+02:00", datetime(2024, 5, 1, 10, 20, 30, 500000, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text) == expected
