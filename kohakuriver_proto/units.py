"""Memory and disk sizes: ``512M``, ``4G``, ``1.5G``, ``4GiB``, ``2GB``, ``1024`` -> bytes, and back.

The convention (chosen for what Docker and qemu-img users type):

- a bare number is bytes (a whole number);
- ``K``, ``M``, ``G``, ``T``, ``P``, with or without ``i``/``iB`` (``4G``, ``4Gi``, ``4GiB``), are **binary**
  (powers of 1024), as in ``docker run --memory 4g`` and ``qemu-img create ... 50G``;
- ``KB``, ``MB``, ``GB``, ``TB``, ``PB`` are **decimal** (powers of 1000), as the SI prefixes say.
  (Docker reads ``4gb`` as 4 GiB; here it is 4 * 10**9 bytes, 7 % less. Use ``4G`` for Docker's meaning.)
- letters are case-insensitive, ``B`` alone means bytes, spaces between number and unit are allowed;
- a fraction is allowed with a unit (``1.5G``) and rounds down to whole bytes.

Output (``format_size``) always uses binary units with an ``iB`` suffix, so it is never ambiguous.
"""

from __future__ import annotations

import re

from .errors import ValidationError

MAX_SIZE = (1 << 63) - 1

_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")
_HINT = "expected a size like 512M, 4G, 1.5GiB, 2GB or a number of bytes"
_UNITS_OUT = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def unit_multiplier(unit: str) -> int | None:
    """Bytes per ``unit`` (``""``/``B`` = 1), or None if the unit is unknown."""
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if len(u) == 1 and u in _BINARY:
        return _BINARY[u]
    if len(u) == 2 and u[1] == "i" and u[0] in _BINARY:
        return _BINARY[u[0]]
    if len(u) == 3 and u[1:] == "ib" and u[0] in _BINARY:
        return _BINARY[u[0]]
    if len(u) == 2 and u[1] == "b" and u[0] in _DECIMAL:
        return _DECIMAL[u[0]]
    return None


def parse_size(value: str | int, field: str = "size") -> int:
    """A size in bytes from text (see the module doc) or a non-negative int; ``ValidationError`` otherwise."""
    if isinstance(value, bool):
        raise ValidationError(field, f"{_HINT}, got a boolean")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise ValidationError(field, f"must be between 0 and {MAX_SIZE} bytes, got {value}")
        return value
    if not isinstance(value, str):
        raise ValidationError(field, f"{_HINT}, got {type(value).__name__}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValidationError(field, f"{_HINT}, got {value[:40]!r}")
    number, unit = match.groups()
    multiplier = unit_multiplier(unit)
    if multiplier is None:
        raise ValidationError(
            field, f"unknown unit {unit!r} in {value[:40]!r}: use K, M, G, T (x1024) or KB, MB, GB, TB"
        )
    # Exact integer arithmetic on the decimal digits, not the fractions module: importing it costs every
    # `kr` that shows a size 7-10 ms. Digits past the 60th cannot change the result: a multiplier is at
    # most 2**50 or 10**15, and the multiples of 1/multiplier have at most 50 decimals.
    whole, _, decimals = number.partition(".")
    whole, decimals = whole.lstrip("0"), decimals.rstrip("0")[:60]
    if len(whole) > 25:  # far beyond MAX_SIZE whatever the unit; also keeps int() bounded
        raise ValidationError(field, f"size too large: {value[:40]!r}")
    scale = 10 ** len(decimals)
    scaled = int(whole or "0") * scale + int(decimals or "0")
    if multiplier == 1 and scale != 1:
        raise ValidationError(field, f"a number of bytes must be whole, got {value[:40]!r}")
    result = scaled * multiplier // scale  # rounds down
    if result > MAX_SIZE:
        raise ValidationError(field, f"size too large: {value[:40]!r}")
    return result


def format_size(n: int, *, exact: bool = False, precision: int = 1) -> str:
    """Bytes for humans, binary units: ``512 MiB``, ``1.5 GiB``, ``1023 B``.

    With ``exact=True`` the result is the largest unit that divides ``n`` (``1536 MiB``), so that
    ``parse_size(format_size(n, exact=True)) == n``. Otherwise the value is rounded to ``precision``
    decimals and trailing zeros are dropped.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"size must be a non-negative int, got {n!r}")
    index = 0
    if exact:
        while index + 1 < len(_UNITS_OUT) and n and n % (1 << (10 * (index + 1))) == 0:
            index += 1
        return f"{n >> (10 * index)} {_UNITS_OUT[index]}"
    while index + 1 < len(_UNITS_OUT) and n >= 1 << (10 * (index + 1)):
        index += 1
    if index == 0:
        return f"{n} B"
    text = f"{n / (1 << (10 * index)):.{precision}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {_UNITS_OUT[index]}"
