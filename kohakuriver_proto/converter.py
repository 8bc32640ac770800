"""THE converter: every model goes to and from JSON through here, nowhere else.

Conventions (a contract with the CLI, the dashboard and scripts):

- snowflake ids (``SnowflakeId``) are **decimal strings** in JSON (JavaScript loses precision above 2**53);
  an int is accepted on input too. NUMA ids (``NumaId``) are object keys, hence strings as well.
- enums are their string values (``"running"``, ``"vps"``).
- datetimes are **ISO-8601 UTC strings** with a ``Z`` suffix and microseconds when non-zero
  (``"2025-04-10T08:30:00.250000Z"``): readable in logs and ``--json`` output, parsed by
  ``datetime.fromisoformat`` and JavaScript's ``Date``. On input any ISO-8601 string *with* an offset (it is
  converted to UTC) or a Unix timestamp in seconds (int/float) is accepted; a naive time is refused.
- primitives are strict: an int field takes a JSON integer (not ``true``, not ``1.5``, not ``"1"``), a float
  field takes any finite number, strings never contain NUL, lists must be lists (a string is not a list of
  characters), objects must be objects.
- request specs (``CommandTaskSpec``, ``VpsSpec``) refuse unknown keys (a typo such as ``required_core``
  must not be silently ignored); everything a peer daemon sends (records, heartbeats, reports) ignores
  unknown keys so that a newer runner can talk to an older host.
- every failure is one ``ValidationError(field, message)`` whose ``field`` is the path of the first problem
  (``required_cores``, ``env_vars.FOO``, ``gpu_info[1].temperature``, ``body`` for the top level); the list of
  all problems is on the exception as ``.errors`` (``[(field, message), ...]``).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from .errors import ValidationError
from .models import CommandTaskSpec, NumaId, ReserveRequest, VpsSpec
from .snowflake import MAX_ID, SnowflakeId

T = TypeVar("T")
ROOT = "body"

#: Classes that refuse unknown keys (user-facing requests).
STRICT_CLASSES: frozenset[type] = frozenset({CommandTaskSpec, VpsSpec, ReserveRequest})


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


# -- primitive hooks -----------------------------------------------------------------------------------------


def _structure_str(value: Any, _t: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_json_type(value)}")
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


def _structure_int(value: Any, _t: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {_json_type(value)}")
    return value


def _structure_float(value: Any, _t: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {_json_type(value)}")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _structure_bool(value: Any, _t: type) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_json_type(value)}")
    return value


def _decimal_id(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"must be a {what} (decimal string), got boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and 0 < len(value) <= 19 and value.isascii() and value.isdigit():
        n = int(value)
    else:
        shown = repr(value[:40]) if isinstance(value, str) else _json_type(value)
        raise ValueError(f"must be a {what} (decimal string), got {shown}")
    if not 0 <= n <= maximum:
        raise ValueError(f"{what} out of range: {n}")
    return n


def _structure_snowflake(value: Any, _t: type) -> int:
    return _decimal_id(value, "decimal id", MAX_ID)


def _structure_numa_id(value: Any, _t: type) -> int:
    return _decimal_id(value, "NUMA node id", 1023)


def _structure_datetime(value: Any, _t: type) -> dt.datetime:
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"must be an ISO-8601 time like 2025-04-10T08:30:00Z, got {value[:40]!r}"
            ) from None
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise ValueError("must include a timezone (e.g. a trailing 'Z' for UTC)")
        return parsed.astimezone(dt.UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"timestamp out of range: {value}") from None
    raise ValueError(f"must be an ISO-8601 time string, got {_json_type(value)}")


def _unstructure_datetime(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _unstructure_enum(member: enum.Enum) -> Any:
    return member.value


def _structure_enum(value: Any, t: type[enum.Enum]) -> enum.Enum:
    for member in t:
        if type(value) is type(member.value) and value == member.value:
            return member
        if value is member:
            return member
    choices = ", ".join(repr(m.value) for m in t)
    shown = repr(value[:40]) if isinstance(value, str) else _json_type(value)
    raise ValueError(f"must be one of {choices}, got {shown}")


# -- containers: strict about their JSON type, with cattrs notes so errors carry the element path ------------


def _structure_list_factory(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], list[Any]]:
    (item_type,) = get_args(t) or (Any,)
    item_hook = conv.get_structure_hook(item_type)

    def structure_list(value: Any, _t: Any) -> list[Any]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be an array, got {_json_type(value)}")
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                out.append(item_hook(item, item_type))
            except Exception as exc:
                exc.add_note(IterableValidationNote(f"Structuring {t} @ index {i}", i, item_type))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {t!r}", errors, t)
        return out

    return structure_list


def _structure_dict_factory(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], dict[Any, Any]]:
    key_type, value_type = get_args(t) or (Any, Any)
    key_hook = conv.get_structure_hook(key_type)
    value_hook = conv.get_structure_hook(value_type)

    def structure_dict(value: Any, _t: Any) -> dict[Any, Any]:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be an object, got {_json_type(value)}")
        out, errors = {}, []
        for raw_key, raw_value in value.items():
            try:
                key = key_hook(raw_key, key_type)
                out[key] = value_hook(raw_value, value_type)
            except Exception as exc:
                exc.add_note(
                    IterableValidationNote(f"Structuring {t} @ key {raw_key!r}", str(raw_key), value_type)
                )
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {t!r}", errors, t)
        return out

    return structure_dict


def _attrs_factory(cl: type, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    fn = make_dict_structure_fn(cl, conv, _cattrs_forbid_extra_keys=cl in STRICT_CLASSES)

    def structure_object(value: Any, t: Any) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be an object, got {_json_type(value)}")
        return fn(value, t)

    return structure_object


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=True)
    # cattrs consults class-based (singledispatch) hooks first, by MRO: registering str/int/float/bool
    # replaces its coercing defaults (``str(1)``, ``int("1")``, bool via int), and registering the enum base
    # classes makes a StrEnum match its enum hook before the str one.
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)
    for base in (enum.Enum, enum.StrEnum, enum.IntEnum):
        conv.register_structure_hook(base, _structure_enum)
        conv.register_unstructure_hook(base, _unstructure_enum)
    # Predicate hooks (the rest): registered later wins.
    conv.register_structure_hook_factory(attrs.has, _attrs_factory)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is list, _structure_list_factory)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is dict, _structure_dict_factory)
    conv.register_structure_hook(dt.datetime, _structure_datetime)
    conv.register_unstructure_hook(dt.datetime, _unstructure_datetime)
    conv.register_structure_hook(SnowflakeId, _structure_snowflake)
    conv.register_unstructure_hook(SnowflakeId, str)
    conv.register_structure_hook(NumaId, _structure_numa_id)
    conv.register_unstructure_hook(NumaId, str)
    return conv


#: The one converter. Prefer the functions below, which add the error translation.
converter = _make_converter()


# -- errors --------------------------------------------------------------------------------------------------


def _join(path: str, field: str) -> str:
    if not path:
        return field
    if not field:
        return path
    return path + field if field.startswith("[") else f"{path}.{field}"


def _note_of(exc: BaseException) -> AttributeValidationNote | IterableValidationNote | None:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote | IterableValidationNote):
            return note
    return None


def _flatten(exc: BaseException, path: str) -> list[tuple[str, str]]:
    """Every input problem under ``exc`` as ``(field path, message)``; re-raises programming errors."""
    if isinstance(exc, BaseValidationError):
        problems: list[tuple[str, str]] = []
        for sub in exc.exceptions:
            note = _note_of(sub)
            if isinstance(note, AttributeValidationNote):
                sub_path = _join(path, note.name)
            elif isinstance(note, IterableValidationNote):
                sub_path = _join(path, f"[{note.index}]" if isinstance(note.index, int) else str(note.index))
            else:
                sub_path = path
            problems.extend(_flatten(sub, sub_path))
        return problems
    if isinstance(exc, ValidationError):
        return [(_join(path, exc.field), exc.message)]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [(_join(path, key), "unknown field") for key in sorted(exc.extra_fields)]
    if isinstance(exc, KeyError):
        return [(path, "is required")]
    if isinstance(exc, ValueError | TypeError):
        return [(path, str(exc))]
    raise exc


def _raise_validation(exc: Exception) -> None:
    problems = _flatten(exc, "") or [("", str(exc))]
    problems = [(field or ROOT, message) for field, message in problems]
    err = ValidationError(*problems[0])
    err.errors = problems  # type: ignore[attr-defined]
    raise err from None


# -- the API -------------------------------------------------------------------------------------------------


def structure(data: Any, cls: type[T]) -> T:
    """Build a ``cls`` (a model, or e.g. ``list[TaskRecord]``) from JSON-shaped data.

    Raises ``ValidationError`` naming the field path of the first problem (``.errors`` has them all).
    """
    try:
        return converter.structure(data, cls)
    except (BaseValidationError, ValidationError, ValueError, TypeError, KeyError) as exc:
        _raise_validation(exc)
        raise  # unreachable


def unstructure(obj: Any) -> Any:
    """JSON-shaped data (dicts, lists, str, int, float, bool, None) for a model or a list of models."""
    return converter.unstructure(obj)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def loads(text: str | bytes, cls: type[T]) -> T:
    """Parse JSON text and structure it; malformed JSON is a ``ValidationError`` on ``body`` too."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(ROOT, f"invalid JSON: {exc}") from None
    return structure(data, cls)


def dumps(obj: Any) -> str:
    """Compact JSON text for a model (``ensure_ascii=False``: encode as UTF-8 for the wire)."""
    return json.dumps(unstructure(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


__all__ = ["STRICT_CLASSES", "converter", "dumps", "loads", "structure", "unstructure"]
