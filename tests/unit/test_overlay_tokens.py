"""IP reservation tokens: round trip, tampering, expiry, wrong keys and garbage (only ValidationError)."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto import overlay as ov
from kohakuriver_proto.models.overlay import check_ip_token

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,250}[A-Za-z0-9])?", fullmatch=True)
claims = st.builds(
    ov.ReservationClaim,
    ip=st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    node=hostnames,
    runner_id=st.integers(1, ov.MAX_RUNNER_ID),
    expires_at=st.integers(0, 2**34),
    nonce=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
)
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"


def refusal(token: object, key: bytes = KEY, now: float = 0) -> str:
    with pytest.raises(ValidationError) as info:
        ov.verify_reservation(key, token, now)  # type: ignore[arg-type]
    assert info.value.field == "ip_token"
    return info.value.message


@given(claims)
def test_round_trip(claim):
    token = ov.sign_reservation(KEY, claim)
    assert ov.verify_reservation(KEY, token, claim.expires_at - 0.5) == claim
    check_ip_token(token)  # the models accept every token the host signs (longest hostnames too)
    assert token.isascii() and "=" not in token and " " not in token


@given(claims, st.data())
@settings(max_examples=300)
def test_any_single_character_change_is_refused(claim, data):
    token = ov.sign_reservation(KEY, claim)
    i = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from(TOKEN_CHARS).filter(lambda c: c != token[i]))
    message = refusal(token[:i] + replacement + token[i + 1 :], now=claim.expires_at - 1)
    assert message.startswith(("malformed token", "forged token"))


@given(claims, st.data())
def test_cut_or_extended_tokens_are_refused(claim, data):
    token = ov.sign_reservation(KEY, claim)
    cut = data.draw(st.integers(0, len(token) - 1))
    refusal(token[:cut], now=claim.expires_at - 1)
    refusal(token + data.draw(st.sampled_from(TOKEN_CHARS)), now=claim.expires_at - 1)
    refusal(token[1:], now=claim.expires_at - 1)


def test_the_last_signature_character_must_be_canonical():
    # 32 bytes in 43 characters leave 2 unused bits: a different last character can decode to the same MAC.
    claim = ov.ReservationClaim("10.128.64.5", "node1", 1, 2000, "n")
    token = ov.sign_reservation(KEY, claim)
    payload, mac = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(mac[-1])
    sibling = alphabet[index ^ 1]  # flips an unused bit only
    assert base64.urlsafe_b64decode(mac[:-1] + sibling + "=") == base64.urlsafe_b64decode(mac + "=")
    assert "malformed" in refusal(f"{payload}.{mac[:-1]}{sibling}", now=1000)


@given(claims)
def test_expiry_boundary(claim):
    token = ov.sign_reservation(KEY, claim)
    assert ov.verify_reservation(KEY, token, claim.expires_at - 0.001) == claim
    for now in (claim.expires_at, claim.expires_at + 0.001, claim.expires_at + 10**6):
        message = refusal(token, now=now)
        assert message.startswith("expired token") and claim.ip in message


def test_expired_message_says_when():
    token = ov.sign_reservation(KEY, ov.ReservationClaim("10.128.64.5", "node1", 1, 1_700_000_000, "n"))
    assert refusal(token, now=1_800_000_000) == (
        "expired token: the reservation of 10.128.64.5 on node1 ended at 2023-11-14T22:13:20Z"
    )


@given(claims)
@settings(max_examples=50)
def test_wrong_key_is_refused_as_forged(claim):
    token = ov.sign_reservation(KEY, claim)
    assert refusal(token, key=OTHER_KEY, now=claim.expires_at - 1).startswith("forged token")


def test_short_keys_are_a_programming_error():
    claim = ov.ReservationClaim("10.128.64.5", "node1", 1, 2000, "n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ov.sign_reservation(b"short", claim)
    with pytest.raises(ValueError):
        ov.verify_reservation(b"", ov.sign_reservation(KEY, claim), 0)


@given(
    st.text(max_size=200)
    | st.text(TOKEN_CHARS, max_size=200)
    | st.binary(max_size=50)
    | st.none()
    | st.integers()
)
@settings(max_examples=300)
def test_garbage_only_ever_raises_validation_error(garbage):
    refusal(garbage)


def _signed(payload: bytes) -> str:
    """A token whose signature is right but whose payload the host never wrote."""
    text = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    mac = base64.urlsafe_b64encode(ov._mac(KEY, text)).rstrip(b"=").decode()
    return f"{text}.{mac}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=12,
)
GOOD = {"v": 1, "ip": "10.128.64.5", "node": "node1", "runner_id": 1, "expires_at": 2000, "nonce": "n"}


@given(st.binary(min_size=1, max_size=100) | json_values.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=200)
def test_signed_garbage_only_ever_raises_validation_error(payload):
    assert refusal(_signed(payload)).startswith("malformed token")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"v": 2}, "version 2"),
        ({"v": True}, "version True"),
        ({"ip": "10.128.064.5"}, "ip: must be an IPv4 address"),
        ({"ip": "host"}, "ip: must be an IPv4 address"),
        ({"node": "-x"}, "node"),
        ({"runner_id": 0}, "runner_id"),
        ({"expires_at": 1.5}, "expires_at"),
        ({"nonce": ""}, "nonce"),
        ({"extra": 1}, "unexpected payload fields"),
    ],
)
def test_signed_but_wrong_payloads_are_malformed(change, fragment):
    body = {**GOOD, **change}
    message = refusal(_signed(json.dumps(body).encode()))
    assert message.startswith("malformed token") and fragment in message


def test_signed_payload_missing_a_field_is_malformed():
    body = dict(GOOD)
    del body["nonce"]
    assert "unexpected payload fields" in refusal(_signed(json.dumps(body).encode()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ip", "10.0.0.256"),
        ("node", ""),
        ("runner_id", 65536),
        ("expires_at", -1),
        ("nonce", "a b"),
        ("nonce", "x" * 65),
    ],
)
def test_claims_are_validated_on_construction(field, value):
    good = {"ip": "10.128.64.5", "node": "node1", "runner_id": 1, "expires_at": 2000, "nonce": "n"}
    with pytest.raises(ValidationError) as info:
        ov.ReservationClaim(**{**good, field: value})
    assert info.value.field == field
