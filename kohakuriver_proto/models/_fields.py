"""Field checks shared by the models: each raises ``ValidationError`` naming the field (and the element path
inside it, ``env_vars.FOO`` or ``required_gpus[2]``), never a bare ``TypeError``/``ValueError``.

Two layers use them: attrs validators (so a model built in Python is as checked as one parsed from JSON) and
the ``__attrs_post_init__`` cross-field rules of each model.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import ValidationError
from ..targets import check_hostname

INT64_MAX = (1 << 63) - 1
MAX_TEXT = 65536  # free text (messages, errors)
MAX_NAME = 128
MAX_COMMAND = 4096
MAX_ARGUMENT = 131072  # Linux MAX_ARG_STRLEN
MAX_ARGUMENTS = 4096
MAX_ENV_VARS = 1024
MAX_PATH = 4096
MAX_LIST = 4096
#: Docker refuses memory limits below 6 MiB; saying so here beats a runner error later.
MIN_MEMORY_LIMIT = 6 * 1024 * 1024

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The runner injects these (task id, tunnel URL, the per-container secret): users may not override them.
RESERVED_ENV_PREFIX = "KOHAKURIVER_"
ENV_NAME_MAX = 256
CONTAINER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
IMAGE_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}")
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")

Check = Callable[[Any, str], None]  # (value, path) -> None, raises ValidationError


def fail(path: str, message: str) -> None:
    raise ValidationError(path, message)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# -- element checks: (value, path) ---------------------------------------------------------------------------


def check_str(
    value: object, path: str, *, max_len: int = MAX_TEXT, allow_empty: bool = True, one_line: bool = False
) -> None:
    if not isinstance(value, str):
        fail(path, f"must be a string, got {_type_name(value)}")
    if "\x00" in value:
        fail(path, "must not contain NUL bytes")
    if not allow_empty and not value.strip():
        fail(path, "must not be empty")
    if len(value) > max_len:
        fail(path, f"must be at most {max_len} characters, got {len(value)}")
    if one_line and _CONTROL_RE.search(value):
        fail(path, "must be one line without control characters")


def check_int(value: object, path: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"must be an integer, got {_type_name(value)}")
    if value < minimum:
        fail(path, f"must be >= {minimum}")
    if value > maximum:
        fail(path, f"must be <= {maximum}")


def check_float(value: object, path: str, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(path, f"must be a number, got {_type_name(value)}")
    if not math.isfinite(value):
        fail(path, "must be a finite number")
    if minimum is not None and value < minimum:
        fail(path, f"must be >= {minimum}")


def check_bool(value: object, path: str) -> None:
    if not isinstance(value, bool):
        fail(path, f"must be true or false, got {_type_name(value)}")


def check_datetime(value: object, path: str) -> None:
    if not isinstance(value, dt.datetime):
        fail(path, f"must be a datetime, got {_type_name(value)}")
    if value.tzinfo is None or value.utcoffset() is None:
        fail(path, "must be timezone-aware (UTC)")


def check_enum(enum_cls: type[enum.Enum]) -> Check:
    def check(value: object, path: str) -> None:
        if not isinstance(value, enum_cls):
            choices = ", ".join(repr(m.value) for m in enum_cls)
            fail(path, f"must be one of {choices}, got {value!r}")

    return check


def check_abs_path(value: object, path: str) -> None:
    check_str(value, path, max_len=MAX_PATH, allow_empty=False, one_line=True)
    if not value.startswith("/"):
        fail(path, f"must be an absolute path, got {value[:80]!r}")
    if ".." in value.split("/"):
        fail(path, f"must not contain '..' components, got {value[:80]!r}")


def check_env_name(value: object, path: str) -> None:
    check_str(value, path, max_len=ENV_NAME_MAX)
    if not ENV_NAME_RE.fullmatch(value):
        fail(path, "invalid variable name: use letters, digits and '_', not starting with a digit")
    if value.upper().startswith(RESERVED_ENV_PREFIX):
        fail(path, f"names starting with {RESERVED_ENV_PREFIX} are reserved for KohakuRiver")


def check_container_name(value: object, path: str) -> None:
    check_str(value, path, max_len=128)
    if not CONTAINER_NAME_RE.fullmatch(value):
        fail(
            path, "must be an environment name: letters, digits, '_', '.', '-', starting with a letter/digit"
        )


def check_image_ref(value: object, path: str) -> None:
    check_str(value, path, max_len=512)
    if not IMAGE_REF_RE.fullmatch(value):
        fail(path, f"not a valid image reference: {value[:80]!r}")


def check_hostname_field(value: object, path: str) -> None:
    check_hostname(value, path)


def check_port(value: object, path: str) -> None:
    check_int(value, path, minimum=1, maximum=65535)


# -- attrs validators ----------------------------------------------------------------------------------------


def v(check: Check, **kwargs: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """An attrs validator that runs ``check(value, field_name, **kwargs)``."""

    def validator(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        check(value, attribute.name, **kwargs)

    return validator


def opt(check: Check, **kwargs: Any) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Like ``v`` but None is allowed."""

    def validator(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            check(value, attribute.name, **kwargs)

    return validator


def list_of(
    check: Check, *, max_items: int = MAX_LIST, unique: bool = False, **kwargs: Any
) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator for a list whose elements pass ``check`` (element paths ``field[i]``)."""

    def validator(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        name = attribute.name
        if not isinstance(value, list):
            fail(name, f"must be a list, got {_type_name(value)}")
        if len(value) > max_items:
            fail(name, f"must have at most {max_items} items, got {len(value)}")
        for i, item in enumerate(value):
            check(item, f"{name}[{i}]", **kwargs)
        if unique:
            seen: set[Any] = set()
            for i, item in enumerate(value):
                if item in seen:
                    fail(f"{name}[{i}]", f"duplicate value {item!r}")
                seen.add(item)

    return validator


def instances_of(cls: type) -> Callable[[Any, attrs.Attribute, Any], None]:
    """Validator for a list of model instances (each validated by its own class)."""

    def validator(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, list):
            fail(attribute.name, f"must be a list, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, cls):
                fail(f"{attribute.name}[{i}]", f"must be a {cls.__name__}, got {_type_name(item)}")

    return validator


def env_mapping(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name = attribute.name
    if not isinstance(value, dict):
        fail(name, f"must be an object of NAME: value strings, got {_type_name(value)}")
    if len(value) > MAX_ENV_VARS:
        fail(name, f"must have at most {MAX_ENV_VARS} variables, got {len(value)}")
    for key, val in value.items():
        path = f"{name}.{key}" if isinstance(key, str) else f"{name}[{key!r}]"
        check_env_name(key, path)
        check_str(val, path, max_len=MAX_ARGUMENT)
