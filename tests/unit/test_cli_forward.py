"""``kr forward``: argument handling, the session URL, exit codes of refusals, backoff, stderr rate limiting,
and the writer queue's bound. The sockets and the WebSocket are tested with real processes in
``tests/integration/test_cli_forward.py``."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from click.testing import CliRunner

from kohakuriver_cli.client import EXIT_ERROR, EXIT_FORBIDDEN, EXIT_NOT_FOUND, EXIT_USAGE, CliError
from kohakuriver_cli.forward_cmd import forward_url
from kohakuriver_cli.forward_session import (
    Backoff,
    Fatal,
    ForwardService,
    ForwardSpec,
    Outbox,
    RepeatFilter,
    Unavailable,
    close_error,
    format_address,
    forwarding_line,
    refusal_error,
)
from kohakuriver_cli.main import cli
from kohakuriver_proto.session_opening import RefusalCode, forward_refusal, refused


def spec(**kw) -> ForwardSpec:
    fields = dict(
        task_id="42", remote_port=8080, proto="tcp", local_host="127.0.0.1", local_port=0,
        url="ws://127.0.0.1:1/ws/forward/42/8080?proto=tcp",
    )  # fmt: skip
    fields.update(kw)
    return ForwardSpec(**fields)


# -- the URL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("http://h:8000", "ws://h:8000/ws/forward/42/8080?proto=tcp"),
        ("https://h", "wss://h/ws/forward/42/8080?proto=tcp"),
        ("HTTPS://h:8443/", "wss://h:8443/ws/forward/42/8080?proto=tcp"),
        ("http://h:8000/kr/", "ws://h:8000/kr/ws/forward/42/8080?proto=tcp"),
        ("http://[::1]:8000", "ws://[::1]:8000/ws/forward/42/8080?proto=tcp"),
    ],
)
def test_forward_url(host: str, expected: str) -> None:
    assert forward_url(host, "42", 8080, "tcp") == expected


def test_forward_url_udp_and_bad_scheme() -> None:
    assert forward_url("http://h", "1", 53, "udp").endswith("/ws/forward/1/53?proto=udp")
    with pytest.raises(CliError) as err:
        forward_url("ftp://h", "1", 53, "tcp")
    assert err.value.exit_code == EXIT_USAGE


# -- command line --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["forward", "12;rm", "80"], "invalid task id"),
        (["forward", "../1", "80"], "invalid task id"),
        (["forward", "1", "0"], "REMOTE_PORT"),
        (["forward", "1", "70000"], "REMOTE_PORT"),
        (["forward", "1", "80", "--local-port", "-1"], "--local-port"),
        (["forward", "1", "80", "--proto", "sctp"], "--proto"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], message: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_host_url_is_a_usage_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["--host", "ftp://h", "forward", "1", "80"])
    assert result.exit_code == EXIT_USAGE
    assert "invalid host URL" in result.output


def test_help_names_the_options() -> None:
    result = CliRunner().invoke(cli, ["forward", "--help"])
    assert result.exit_code == 0
    for option in ("--local-port", "--local-host", "--proto", "TASK_ID", "REMOTE_PORT"):
        assert option in result.output


# -- what the server's answers mean --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusal_code", "reason", "exit_code"),
    [
        (RefusalCode.NOT_FOUND, "task 5 not found", EXIT_NOT_FOUND),
        (RefusalCode.NOT_RUNNING, "task 5 is not running (completed)", EXIT_NOT_FOUND),
        (RefusalCode.NOT_ALLOWED, "not allowed to reach task 5", EXIT_FORBIDDEN),
        (RefusalCode.NOT_ALLOWED, "bob (viewer) may not forward ports of task 5", EXIT_FORBIDDEN),
        (RefusalCode.TOO_MANY, "bob has 64 forward sessions open already; close one first", EXIT_FORBIDDEN),
        (RefusalCode.NOT_RUNNING, "task 5 is paused", EXIT_NOT_FOUND),
        (RefusalCode.NOT_FOUND, "", EXIT_NOT_FOUND),
        (RefusalCode.BAD_REQUEST, "port must be 1..65535, got '0'", EXIT_USAGE),
        # The words do not matter, the code does: these once read as "not allowed" from their words.
        (RefusalCode.NOT_FOUND, "task token-7 not found", EXIT_NOT_FOUND),
        (RefusalCode.NOT_RUNNING, "Permission denied: task 5 is not running", EXIT_NOT_FOUND),
        (RefusalCode.NOT_ALLOWED, "task 5 not found", EXIT_FORBIDDEN),
    ],
)
def test_refusal_exit_code_follows_the_code(refusal_code: RefusalCode, reason: str, exit_code: int) -> None:
    sent = forward_refusal(refusal_code, reason)
    end = close_error(sent.close_code, sent.close_reason)
    assert isinstance(end, Fatal) and end.exit_code == exit_code
    end = refusal_error(refused(reason, sent.close_code, sent.close_reason))
    assert isinstance(end, Fatal) and end.exit_code == exit_code
    assert reason in end.message


def test_refusals_that_may_be_served_later_are_retried() -> None:
    for code in RefusalCode:
        sent = forward_refusal(code, "task token denied")  # words that once meant "not allowed"
        end = refusal_error(refused("task token denied", sent.close_code, sent.close_reason))
        assert isinstance(end, Unavailable) == code.retry_later, code


def test_a_refusal_without_a_code_is_read_by_its_close_code_alone() -> None:
    # An older host (prose in the close reason) or a newer one (a code this version does not know).
    for close_reason in ("not allowed: token denied", "quota_exceeded", ""):
        end = refusal_error(refused("may not: permission denied", 1008, close_reason))
        assert isinstance(end, Fatal) and end.exit_code == EXIT_NOT_FOUND, close_reason
        assert isinstance(refusal_error(refused("denied", 1011, close_reason)), Unavailable)


def test_close_codes() -> None:
    refused = close_error(1008, "task 5 not found\nsecond line")
    assert isinstance(refused, Fatal)
    assert refused.exit_code == EXIT_NOT_FOUND
    assert refused.message == "the host refused the forward: task 5 not found second line"
    unavailable = close_error(1011, "tunnel not connected")
    assert isinstance(unavailable, Unavailable) and "tunnel not connected" in unavailable.message
    assert not unavailable.unreachable
    assert isinstance(close_error(1006, None), Unavailable)
    assert isinstance(close_error(None, None), Unavailable)
    assert "code 1001" in close_error(1001, "going away").message
    assert Fatal("x").exit_code == EXIT_ERROR


def test_forwarding_line() -> None:
    assert format_address("127.0.0.1", 80) == "127.0.0.1:80"
    assert format_address("::1", 80) == "[::1]:80"
    line = forwarding_line("127.0.0.1:9000", spec(proto="udp", remote_port=53))
    assert line == "Forwarding 127.0.0.1:9000 -> task 42 port 53/udp"


# -- backoff and rate limiting -------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_stays_bounded() -> None:
    low = Backoff(first=0.2, maximum=5.0, rng=lambda: 0.0)
    high = Backoff(first=0.2, maximum=5.0, rng=lambda: 1.0)
    lows = [low.next() for _ in range(12)]
    highs = [high.next() for _ in range(12)]
    assert highs[:6] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert lows[:4] == pytest.approx([0.2, 0.2, 0.4, 0.8])  # jitter: the upper half of each step
    assert all(0.2 <= d <= 5.0 for d in lows + highs)
    assert highs[-1] == 5.0
    high.reset()
    assert high.next() == pytest.approx(0.2)
    real = Backoff()
    assert all(0.2 <= real.next() <= 5.0 for _ in range(100))


def test_repeat_filter_prints_identical_messages_once_per_interval() -> None:
    f = RepeatFilter(interval=5.0)
    assert f.check("refused", 0.0) == "refused"
    assert [f.check("refused", t) for t in (0.1, 1.0, 4.9)] == [None, None, None]
    assert f.check("other", 1.0) == "other"  # distinct messages are independent
    assert f.check("refused", 5.0) == "refused (repeated 3 more times)"
    assert f.check("refused", 5.1) is None
    assert f.check("refused", 20.0) == "refused (repeated 1 more times)"


def test_repeat_filter_memory_is_bounded() -> None:
    f = RepeatFilter(interval=5.0, max_entries=8)
    for i, now in zip(range(100), itertools.count(0.0, 0.01), strict=False):
        assert f.check(f"message {i}", now) == f"message {i}"
    assert len(f._last) <= 8


# -- the writer queue ----------------------------------------------------------------------------------------


async def test_outbox_keeps_order_and_signals_room() -> None:
    box = Outbox(limit=10)
    box.put(b"12345")
    box.put(b"67890")  # at the limit: readers must wait
    assert box.queued == 10
    waited = trio.Event()

    async def reader_of_local_socket() -> None:
        await box.wait_room()
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader_of_local_socket)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()
        assert await box.get(max_bytes=1) == [b"12345"]  # at least one message, even over max_bytes
        await trio.testing.wait_all_tasks_blocked()
        assert waited.is_set()
    box.put(b"x" * 100)  # put never blocks, even far beyond the limit (the WebSocket reader uses it)
    box.put(b"y")
    assert await box.get(max_bytes=105) == [b"67890", b"x" * 100]  # a write's worth, in order
    assert await box.get() == [b"y"]
    assert box.queued == 0
    with trio.move_on_after(0.05) as scope:
        await box.get()
    assert scope.cancelled_caught


async def test_a_connection_without_session_gives_up_after_the_wait() -> None:
    service = ForwardService(spec())
    start = trio.current_time()
    assert await service.wait_session(0.05) is None
    assert trio.current_time() - start >= 0.05
