"""``kohakuriver_proto.session_opening``: how forward and terminal sessions open, and what a refusal means.

Round trips for every code through both formats, what a relay passes on, peers from before the codes and
from a newer version, and garbage: a clear ``RemoteProtocolError`` or a code-less refusal, never a crash.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import session_opening as so
from kohakuriver_proto.errors import RemoteProtocolError
from kohakuriver_proto.session_opening import (
    CLOSE_POLICY,
    CLOSE_UNAVAILABLE,
    CONNECTED,
    Connected,
    RefusalCode,
    Refused,
    Refusing,
    forward_answer,
    forward_refusal,
    refused,
    terminal_answer,
    terminal_refusal,
)

codes = st.sampled_from(list(RefusalCode))
reasons = st.text(max_size=300)
#: Well-formed code names that this version does not know: what a newer peer may send.
unknown_names = st.from_regex(r"[a-z][a-z0-9_]{0,62}", fullmatch=True).filter(
    lambda name: name not in {code.value for code in RefusalCode}
)
close_codes = st.none() | st.integers(0, 5000)
messages = st.text(max_size=200) | st.binary(max_size=200)


# -- the table -----------------------------------------------------------------------------------------------


def test_every_code_has_a_meaning_and_fits_a_close_frame():
    for code in RefusalCode:
        assert so.code_name_of(code.value) == code.value
        assert len(code.value.encode()) <= so.MAX_CLOSE_REASON
        assert code.close_code in (CLOSE_POLICY, CLOSE_UNAVAILABLE)
        assert code.retry_later == (code.close_code == CLOSE_UNAVAILABLE)
        assert code.exit_code in (1, 2, 3, 4)
        # Whatever may be served later is no "not found" / "not allowed" for a script.
        if code.retry_later:
            assert code.exit_code == 1


def test_the_readme_contract():
    expected = {
        RefusalCode.BAD_REQUEST: 2,
        RefusalCode.NOT_FOUND: 3,
        RefusalCode.NOT_RUNNING: 3,
        RefusalCode.NOT_ALLOWED: 4,
        RefusalCode.TOO_MANY: 4,
    }
    for code, exit_code in expected.items():
        assert (code.close_code, code.exit_code) == (CLOSE_POLICY, exit_code)


# -- round trips ---------------------------------------------------------------------------------------------


@given(code=codes, reason=reasons)
def test_forward_refusal_round_trips(code, reason):
    sent = forward_refusal(code, reason)
    # What a seed-protocol client sees is unchanged: "Error: <reason>", then 1008 or 1011.
    assert sent.text == f"Error: {reason}"
    assert sent.close_code == code.close_code
    answer = forward_answer(sent.text)
    assert isinstance(answer, Refusing) and answer.reason == reason.strip()
    got = answer.closed(sent.close_code, sent.close_reason)
    assert (got.code, got.code_name, got.close_code) == (code, code.value, code.close_code)
    assert (got.exit_code, got.retry_later) == (code.exit_code, code.retry_later)
    assert got.text == sent.text


@given(code=codes, reason=reasons)
def test_terminal_refusal_round_trips(code, reason):
    sent = terminal_refusal(code, reason)
    assert json.loads(sent.text) == {"error": reason, "code": code.value}
    answer = terminal_answer(sent.text)
    assert isinstance(answer, Refusing) and answer.reason == reason
    assert answer.closed(sent.close_code, sent.close_reason).code is code
    # The code is in the message itself too: a close that never came does not lose it.
    assert answer.closed(None, "").code is code


def test_openings_that_accept():
    assert forward_answer(CONNECTED) == Connected()
    assert terminal_answer('{"started":true}') == Connected()
    assert terminal_answer('{"started": true, "future": 1}') == Connected()


@given(code=codes, reason=reasons)
def test_a_relay_passes_a_refusal_on_as_it_came(code, reason):
    for sent, answer in (
        (forward_refusal(code, reason), forward_answer),
        (terminal_refusal(code, reason), terminal_answer),
    ):
        received = answer(sent.text).closed(sent.close_code, sent.close_reason)
        relayed = received.relayed()
        assert (relayed.text, relayed.close_code, relayed.close_reason) == (
            sent.text,
            sent.close_code,
            sent.close_reason,
        )


def test_a_relay_closes_a_broken_servers_refusal_as_runner_unavailable():
    for close in (None, 1000, 1006, 4000):
        relayed = forward_answer("Error: nope").closed(close, "bye").relayed()
        assert (relayed.text, relayed.close_code, relayed.close_reason) == (
            "Error: nope",
            CLOSE_UNAVAILABLE,
            "runner_unavailable",
        )
    # A refusal that carried its code is closed as that code says.
    relayed = forward_answer("Error: nope").closed(1000, "not_found").relayed()
    assert (relayed.close_code, relayed.close_reason) == (CLOSE_POLICY, "not_found")
    text = terminal_refusal(RefusalCode.NOT_FOUND, "gone").text
    relayed = terminal_answer(text).closed(None).relayed()
    assert (relayed.text, relayed.close_code, relayed.close_reason) == (text, CLOSE_POLICY, "not_found")


@given(prose=st.text(max_size=400))
def test_a_relay_passes_an_old_servers_prose_on_clipped(prose):
    relayed = forward_answer("Error: x").closed(CLOSE_POLICY, prose).relayed()
    assert relayed.close_code == CLOSE_POLICY
    assert len(relayed.close_reason.encode()) <= so.MAX_CLOSE_REASON
    assert prose.startswith(relayed.close_reason)


# -- peers from before the codes, and from after -------------------------------------------------------------


@pytest.mark.parametrize(
    ("close_code", "exit_code", "retry"),
    [(CLOSE_POLICY, 3, False), (CLOSE_UNAVAILABLE, 1, True), (None, 1, True), (1000, 1, True)],
)
def test_no_code_falls_back_to_the_close_code_never_to_words(close_code, exit_code, retry):
    for close_reason in ("", "alice (viewer) may not forward ports: token denied", "Not_Found", "not found"):
        got = forward_answer("Error: permission denied, bad token").closed(close_code, close_reason)
        assert (got.code, got.code_name) == (None, None)
        assert (got.exit_code, got.retry_later) == (exit_code, retry)


@given(name=unknown_names, close_code=st.sampled_from([CLOSE_POLICY, CLOSE_UNAVAILABLE]))
def test_an_unknown_code_from_a_newer_peer_is_kept_and_read_by_its_close_code(name, close_code):
    got = forward_answer("Error: something new").closed(close_code, name)
    assert (got.code, got.code_name) == (None, name)
    assert got.exit_code == (3 if close_code == CLOSE_POLICY else 1)
    relayed = got.relayed()  # a relay passes it on: its client may know it
    assert (relayed.close_code, relayed.close_reason) == (close_code, name)


def test_the_code_wins_over_a_mismatched_close_code_and_the_message_code_over_the_close_reason():
    got = forward_answer("Error: x").closed(CLOSE_UNAVAILABLE, "not_allowed")
    assert (got.code, got.exit_code, got.retry_later) == (RefusalCode.NOT_ALLOWED, 4, False)
    text = terminal_refusal(RefusalCode.NOT_RUNNING, "paused").text
    assert terminal_answer(text).closed(CLOSE_POLICY, "not_found").code is RefusalCode.NOT_RUNNING


def test_a_close_alone_is_a_refusal_too():
    assert refused("", CLOSE_POLICY, "not_allowed") == Refused(
        "", CLOSE_POLICY, RefusalCode.NOT_ALLOWED, "not_allowed", "not_allowed"
    )
    # An older server's prose stands in for the missing text.
    got = refused("", CLOSE_POLICY, "task 5 not found")
    assert (got.reason, got.code, got.exit_code) == ("task 5 not found", None, 3)


# -- garbage -------------------------------------------------------------------------------------------------


@given(message=messages)
def test_any_first_message_is_an_answer_or_a_clear_error(message):
    for parse in (forward_answer, terminal_answer):
        try:
            answer = parse(message)
        except RemoteProtocolError as exc:
            assert str(exc)
        else:
            assert isinstance(answer, Connected | Refusing)


@given(message=st.text(max_size=100))
def test_forward_answer_accepts_exactly_the_two_shapes(message):
    if message == CONNECTED:
        assert forward_answer(message) == Connected()
    elif message.startswith("Error:"):
        assert forward_answer(message).reason == message[6:].strip()
    else:
        with pytest.raises(RemoteProtocolError):
            forward_answer(message)


@given(
    error=st.none() | st.integers() | st.text(max_size=50) | st.lists(st.integers(), max_size=3),
    code=st.none() | st.integers() | st.text(max_size=80) | st.booleans(),
)
def test_terminal_errors_with_odd_fields_are_refusals_without_a_code(error, code):
    answer = terminal_answer(json.dumps({"error": error, "code": code}))
    assert isinstance(answer, Refusing) and answer.reason == str(error)
    got = answer.closed(CLOSE_POLICY, "")
    assert got.code is (RefusalCode(code) if code in {c.value for c in RefusalCode} else None)


@given(reason=reasons, close_code=close_codes, close_reason=st.none() | st.text(max_size=200))
def test_any_close_reads_without_a_crash(reason, close_code, close_reason):
    got = refused(reason, close_code, close_reason)
    assert got.exit_code in (1, 2, 3, 4)
    assert isinstance(got.retry_later, bool)
    relayed = got.relayed()
    assert relayed.close_code in (CLOSE_POLICY, CLOSE_UNAVAILABLE)
    assert len(relayed.close_reason.encode()) <= so.MAX_CLOSE_REASON


def test_builders_want_a_code_not_a_word():
    with pytest.raises(TypeError, match="RefusalCode"):
        forward_refusal("not_found", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reason"):
        terminal_refusal(RefusalCode.NOT_FOUND, None)  # type: ignore[arg-type]
