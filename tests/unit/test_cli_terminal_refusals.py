"""``kr connect`` / ``kr terminal exec``: a refusal's exit code follows its code, never its words.

The client side of ``terminal_cmd`` against a stand-in server on a real loopback WebSocket that answers the
start request the way the host does (``{"error", "code"}`` and a close whose reason is the code), or the
way a host from before the codes did (prose in the close reason).
"""

from __future__ import annotations

import trio
import trio_websocket

from kohakuriver_cli.terminal_cmd import SessionSpec, _session
from kohakuriver_proto.session_opening import RefusalCode, terminal_refusal
from kohakuriver_proto.terminal import StartRequest, encode_error


async def _refused_with(text: str, close_code: int, close_reason: str):
    """The ``SessionEnd`` of a session the server refuses with ``text`` and that close."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the start request
        await ws.send_message(text)
        await ws.aclose(close_code, close_reason)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
        spec = SessionSpec(
            url=f"ws://127.0.0.1:{server.port}/ws/terminal/5",
            token=None,
            request=StartRequest(tty=False, command=["true"]),
            local_tty=False,
            forward_stdin=False,
        )
        with trio.fail_after(10):
            end = await _session(spec)
        nursery.cancel_scope.cancel()
    return end


async def test_the_exit_code_follows_the_code_not_the_words():
    cases = [
        # Words that once read as "not allowed" (exit 4): the code says not found.
        (RefusalCode.NOT_FOUND, "task 5 not found: token denied, permission", 3),
        # Words that once read as "not found" (exit 3): the code says not allowed, or too many.
        (RefusalCode.NOT_ALLOWED, "task 5 not found", 4),
        (RefusalCode.TOO_MANY, "bob has 32 terminals open already; close one first", 4),
        (RefusalCode.BAD_REQUEST, "bad start request: command: must be a list", 2),
        (RefusalCode.NOT_RUNNING, "task 5 is paused", 3),
        (RefusalCode.NODE_OFFLINE, "node n1 is offline", 1),
    ]
    for code, reason, exit_code in cases:
        sent = terminal_refusal(code, reason)
        end = await _refused_with(sent.text, sent.close_code, sent.close_reason)
        assert (end.exit_code, end.message) == (exit_code, reason), code


async def test_a_host_from_before_the_codes_is_read_by_the_close_code_alone():
    for reason in ("alice (viewer) may not open terminals in task 5", "task 5 not found"):
        end = await _refused_with(encode_error(reason), 1008, reason)
        assert (end.exit_code, end.message) == (3, reason)
    end = await _refused_with(encode_error("node n1 is offline"), 1011, "node n1 is offline")
    assert end.exit_code == 1
