"""64-bit snowflake ids: 41-bit milliseconds since ``EPOCH_MS``, 10-bit instance, 12-bit sequence.

The generator reads no clock: the caller passes ``now_ms`` to each ``next_id`` call, or gives the constructor
a clock callable. Ids are strictly increasing per generator even when the clock jumps backwards or more
than 4096 ids are asked for in one millisecond: the generator keeps a *logical* timestamp that never goes
backwards. A clock behind it is ignored (the id borrows the last timestamp and bumps the sequence), and a
full sequence advances the logical timestamp by one millisecond. Nothing waits, so ``next_id`` is wait-free;
the price is that under a sustained overload or after a backwards jump the embedded timestamp runs slightly
ahead of real time until the clock catches up. A clock before the epoch behaves like one stuck at the epoch.

Ids are below 2**63 (the sign bit stays clear, SQLite INTEGER holds them) and travel as decimal strings in
JSON, because JavaScript numbers lose precision above 2**53.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NewType

from .errors import LocalProtocolError, ValidationError

#: A task (or batch) id. A plain ``int`` at run time; the converter writes it as a decimal string.
SnowflakeId = NewType("SnowflakeId", int)

#: 2025-01-01T00:00:00Z in Unix milliseconds. 41 bits of milliseconds last until 2094.
EPOCH_MS = 1_735_689_600_000
TIMESTAMP_BITS = 41
INSTANCE_BITS = 10
SEQUENCE_BITS = 12
MAX_INSTANCE = (1 << INSTANCE_BITS) - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
MAX_TIMESTAMP = (1 << TIMESTAMP_BITS) - 1
MAX_ID = (1 << 63) - 1
_INSTANCE_SHIFT = SEQUENCE_BITS
_TIMESTAMP_SHIFT = SEQUENCE_BITS + INSTANCE_BITS


class SnowflakeGenerator:
    """Strictly increasing ids for one ``instance`` (0..1023; give each id-issuing process its own).

    ``last_id`` seeds the generator after a restart (for example the largest id in the store), so ids stay
    increasing across restarts even if the clock went backwards while the process was down.
    """

    def __init__(
        self,
        instance: int = 0,
        *,
        clock: Callable[[], int] | None = None,
        epoch_ms: int = EPOCH_MS,
        last_id: int | None = None,
    ) -> None:
        if not 0 <= instance <= MAX_INSTANCE:
            raise ValueError(f"instance must be in 0..{MAX_INSTANCE}, got {instance}")
        self.instance = instance
        self.epoch_ms = epoch_ms
        self._clock = clock
        self._last_ts = -1  # logical milliseconds since the epoch of the last id
        self._seq = MAX_SEQUENCE
        if last_id is not None:
            self._last_ts = last_id >> _TIMESTAMP_SHIFT
            # Same instance: continue its sequence. Another instance's id: treat the sequence as exhausted,
            # so the next id moves to the next millisecond and sorts above ``last_id``.
            same = instance_of(last_id) == instance
            self._seq = last_id & MAX_SEQUENCE if same else MAX_SEQUENCE

    def next_id(self, now_ms: int | None = None) -> int:
        if now_ms is None:
            if self._clock is None:
                raise LocalProtocolError("next_id() needs now_ms when the generator has no clock")
            now_ms = self._clock()
        ts = now_ms - self.epoch_ms
        if ts > self._last_ts:
            self._last_ts = ts
            self._seq = 0
        elif self._seq < MAX_SEQUENCE:
            self._seq += 1  # same millisecond, or the clock went backwards: borrow the last timestamp
        else:
            self._last_ts += 1  # sequence exhausted: advance the logical clock instead of waiting
            self._seq = 0
        if self._last_ts > MAX_TIMESTAMP:
            raise LocalProtocolError("snowflake timestamp space exhausted (41 bits of milliseconds)")
        return (self._last_ts << _TIMESTAMP_SHIFT) | (self.instance << _INSTANCE_SHIFT) | self._seq


def timestamp_ms(snowflake: int, epoch_ms: int = EPOCH_MS) -> int:
    """Unix milliseconds embedded in an id (logical time: may run slightly ahead, see the module doc)."""
    return (snowflake >> _TIMESTAMP_SHIFT) + epoch_ms


def instance_of(snowflake: int) -> int:
    return (snowflake >> _INSTANCE_SHIFT) & MAX_INSTANCE


def parse_id(value: str | int, field: str = "id") -> int:
    """A snowflake id from a decimal string (as JSON and URLs carry it) or an int.

    Only ASCII digits, at most 19 of them, no sign, no spaces, value below 2**63; anything else raises
    ``ValidationError`` naming ``field``.
    """
    if isinstance(value, bool):
        raise ValidationError(field, "must be a decimal id, not a boolean")
    if isinstance(value, int):
        if not 0 <= value <= MAX_ID:
            raise ValidationError(field, f"id out of range: {value}")
        return value
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a decimal id string, got {type(value).__name__}")
    if not value or len(value) > 19 or not (value.isascii() and value.isdigit()):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValidationError(field, f"must be a decimal id (digits only), got {shown!r}")
    n = int(value)
    if n > MAX_ID:
        raise ValidationError(field, f"id out of range: {value}")
    return n


def format_id(snowflake: int) -> str:
    return str(snowflake)
