"""Declarative settings for the host and runner configuration files.

A configuration file is trusted, admin-written Python (DESIGN section 7): module-level UPPER_CASE names are
settings. This module is pure: it receives the file's *source text* and its filename, never touches the file
system, and hands back a frozen attrs object whose attributes are the setting names.

- ``Setting(name, type, default, doc, check=None)``: one setting. Supported types: ``str``, ``int``,
  ``float`` (an int is accepted and converted), ``bool`` (never an int, and an int is never a bool),
  ``list[X]`` of those scalars (stored as a tuple, so the config object is really immutable) and any
  ``enum.Enum`` such as ``LogLevel`` (the member or its value/name as a string, case-insensitive). ``check``
  is a callable that raises ``ValueError("<why>")`` for an impossible value; ``secret=True`` hides the value
  in ``repr`` and ``to_dict()``.
- ``Section(title, settings)``: settings are grouped for the template; ``CrossCheck`` states a rule over
  several settings (a gateway inside its subnet, ...).
- ``Schema``: the sections, the cross checks and the generated config class (``schema.config_class``).
  Constructing that class, directly, through ``attrs.evolve`` or via ``load_settings``, always validates.
- ``load_settings(schema, source_text, filename)``: execute the source, take its UPPER_CASE names, validate.
  Every problem (unknown name, with a difflib "did you mean"; wrong type; impossible value; failing cross
  check) is collected and raised as one ``SettingsError``.
- ``render_template(schema)``: a commented Python template with every setting that loads back to the defaults.

Legacy files of the original project start with ``from kohakuengine import Config`` and
``from kohakuriver.models.enums import LogLevel`` and end with ``def config_gen(): ...``. Neither package
exists here, so the namespace the file runs in has an ``__import__`` that serves those module names from
small in-memory shims (``Config.from_globals()`` returns the caller's UPPER_CASE globals, ``LogLevel`` is the
enum below) and delegates every other import to the real machinery. The shims are used even if the real
packages happen to be installed, so loading never runs third-party code. Lower-case names such as
``config_gen`` and CamelCase names such as ``Config`` are not settings and are ignored, as are names that
start with an underscore (use them for helpers: ``_BASE = "/data"``).
"""

from __future__ import annotations

import builtins
import difflib
import enum
import ipaddress
import re
import sys
import textwrap
import types
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import attrs

from .errors import ValidationError

__all__ = [
    "ConfigBase",
    "CrossCheck",
    "LogLevel",
    "OverlaySubnet",
    "Schema",
    "Section",
    "Setting",
    "SettingsError",
    "SettingsProblem",
    "load_settings",
    "parse_overlay_subnet",
    "render_template",
]

Check = Callable[[Any], None]


class LogLevel(enum.StrEnum):
    """Logging verbosity. ``FULL`` is more verbose than ``DEBUG`` (per-frame and per-request detail)."""

    FULL = "full"
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def logging_level(self) -> int:
        """The numeric level for the ``logging`` module (``FULL`` is 5, below ``DEBUG``)."""
        return {"full": 5, "debug": 10, "info": 20, "warning": 30, "error": 40}[self.value]


# ----------------------------------------------------------------------------------------------------------
# Errors


@attrs.frozen
class SettingsProblem:
    """One problem; ``setting`` is None for a problem with the file itself (syntax error, missing file)."""

    setting: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.message}" if self.setting else self.message


class SettingsError(ValidationError):
    """A configuration was rejected. ``problems`` lists every problem found, ``source`` names the file.

    ``field`` (from ``ValidationError``) is the first offending setting, or the source when the problem is
    the file itself; ``message`` and ``str()`` give the whole report: one line for one problem, a list for
    several.
    """

    def __init__(self, problems: Sequence[SettingsProblem], source: str) -> None:
        if not problems:
            raise ValueError("SettingsError needs at least one problem")
        self.problems = tuple(problems)
        self.source = source
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            text = f"{source}: {len(self.problems)} problems:\n{lines}"
        first = self.problems[0]
        super().__init__(first.setting or source, text)
        self.args = (text,)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------------------
# Schema


def _is_list_type(tp: Any) -> bool:
    return typing.get_origin(tp) is list and len(typing.get_args(tp)) == 1


_SCALARS = (str, int, float, bool)


def _type_name(tp: Any) -> str:
    if _is_list_type(tp):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return tp.__name__


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


class _TypeProblem(Exception):
    pass


def _coerce_scalar(tp: Any, value: Any) -> Any:
    if tp is bool:
        if type(value) is bool:
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return str(value)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            for member in tp:
                if value.lower() in (str(member.value).lower(), member.name.lower()):
                    return member
        choices = ", ".join(repr(str(m.value)) for m in tp)
        raise _TypeProblem(f"expected {tp.__name__} (one of {choices}), got {_describe(value)}")
    raise _TypeProblem(f"expected {_type_name(tp)}, got {_describe(value)}")


def _coerce(tp: Any, value: Any) -> Any:
    if _is_list_type(tp):
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _TypeProblem(f"expected {_type_name(tp)}, got {_describe(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_coerce_scalar(item_type, item))
            except _TypeProblem:
                raise _TypeProblem(
                    f"expected {_type_name(tp)}, but element {i} is {_describe(item)}"
                ) from None
        return tuple(out)
    return _coerce_scalar(tp, value)


def _supported_type(tp: Any) -> bool:
    if _is_list_type(tp):
        return _supported_type(typing.get_args(tp)[0]) and not _is_list_type(typing.get_args(tp)[0])
    return tp in _SCALARS or (isinstance(tp, type) and issubclass(tp, enum.Enum))


_UPPER_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


@attrs.frozen
class Setting:
    """One setting: name, type, default, a one-paragraph doc, and an optional check of impossible values."""

    name: str
    type: Any
    default: Any
    doc: str
    check: Check | None = None
    secret: bool = attrs.field(default=False, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if not _UPPER_NAME.fullmatch(self.name):
            raise ValueError(f"setting name {self.name!r} is not UPPER_CASE")
        if not _supported_type(self.type):
            raise ValueError(f"setting {self.name}: unsupported type {self.type!r}")

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


@attrs.frozen
class Section:
    title: str
    settings: tuple[Setting, ...] = attrs.field(converter=tuple)
    doc: str = ""


@attrs.frozen
class CrossCheck:
    """A rule over several settings. ``fn(values)`` yields ``(setting, message)`` pairs for violations.

    It runs only when every setting in ``needs`` passed its own type and value checks, so ``fn`` may assume
    well-typed, individually valid values.
    """

    needs: tuple[str, ...] = attrs.field(converter=tuple)
    fn: Callable[[Mapping[str, Any]], Iterable[tuple[str, str]]]


class ConfigBase:
    """Base of every generated config class: validation on construction, and ``to_dict``.

    Attributes are the UPPER_CASE setting names; lower-case attributes of subclasses are derived helpers.
    """

    __slots__ = ()
    __schema__: ClassVar[Schema]

    def __attrs_post_init__(self) -> None:
        values = {name: getattr(self, name) for name in self.__schema__.names}
        checked = self.__schema__.validate(values, source=type(self).__name__)
        for name, value in checked.items():
            if value is not values[name]:
                object.__setattr__(self, name, value)

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Setting name -> value in schema order; secrets are ``"***"`` (when set) unless ``redact=False``."""
        out = {}
        for setting in self.__schema__.settings.values():
            value = getattr(self, setting.name)
            if redact and setting.secret and value:
                value = "***"
            elif isinstance(value, tuple):
                value = list(value)
            out[setting.name] = value
        return out


def _secret_repr(value: Any) -> str:
    return "'***'" if value else repr(value)


class Schema:
    """A named group of sections, the cross checks over them, and the generated frozen config class."""

    def __init__(
        self,
        *,
        class_name: str,
        title: str,
        filename: str,
        sections: Sequence[Section],
        cross_checks: Sequence[CrossCheck] = (),
        base: type[ConfigBase] = ConfigBase,
        module: str | None = None,
        intro: str = "",
    ) -> None:
        self.class_name = class_name
        self.title = title
        self.filename = filename
        self.sections = tuple(sections)
        self.cross_checks = tuple(cross_checks)
        self.intro = intro
        self.settings: dict[str, Setting] = {}
        for section in self.sections:
            for setting in section.settings:
                if setting.name in self.settings:
                    raise ValueError(f"setting {setting.name} is declared twice")
                self.settings[setting.name] = setting
        self.names = tuple(self.settings)
        for cross in self.cross_checks:
            unknown = [n for n in cross.needs if n not in self.settings]
            if unknown:
                raise ValueError(f"cross check needs unknown settings {unknown}")
        if not issubclass(base, ConfigBase):
            raise TypeError("base must derive from ConfigBase")
        fields = {
            s.name: attrs.field(default=s.default, repr=_secret_repr if s.secret else True)
            for s in self.settings.values()
        }
        cls = attrs.make_class(class_name, fields, bases=(base,), frozen=True, slots=True)
        cls.__schema__ = self
        cls.__module__ = module or base.__module__
        cls.__qualname__ = class_name
        self.config_class: type[Any] = cls
        # A schema whose defaults do not pass its own checks is a programming error: fail at import time.
        self.defaults()

    def defaults(self) -> Any:
        """The config object with every setting at its default."""
        return self.config_class()

    def build(self, values: Mapping[str, Any], *, source: str = "<settings>") -> Any:
        """The config object from a mapping of overrides (validated like a file; unknown names rejected)."""
        problems = self._unknown_problems(values)
        known = {k: v for k, v in values.items() if k in self.settings}
        try:
            checked = self.validate({**self._default_values(), **known}, source=source)
        except SettingsError as exc:
            raise SettingsError([*exc.problems, *problems], source) from None
        if problems:
            raise SettingsError(problems, source)
        return self.config_class(**checked)

    def validate(self, values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
        """Type-check, coerce and check a complete mapping; returns the coerced values or raises."""
        problems: list[SettingsProblem] = []
        out: dict[str, Any] = {}
        bad: set[str] = set()
        for name, setting in self.settings.items():
            value = values[name]
            try:
                value = _coerce(setting.type, value)
            except _TypeProblem as exc:
                problems.append(SettingsProblem(name, str(exc)))
                bad.add(name)
                continue
            if setting.check is not None:
                try:
                    setting.check(value)
                except ValueError as exc:
                    problems.append(SettingsProblem(name, str(exc)))
                    bad.add(name)
                    continue
            out[name] = value
        for cross in self.cross_checks:
            if bad.intersection(cross.needs):
                continue
            for name, message in cross.fn(out):
                problems.append(SettingsProblem(name, message))
        if problems:
            raise SettingsError(problems, source)
        return out

    def suggest(self, name: str) -> str | None:
        matches = difflib.get_close_matches(name, self.names, n=1, cutoff=0.6)
        return matches[0] if matches else None

    def _unknown_problems(self, values: Iterable[str]) -> list[SettingsProblem]:
        problems = []
        for name in values:
            if name in self.settings:
                continue
            hint = self.suggest(name)
            message = "unknown setting" + (f" (did you mean {hint}?)" if hint else "")
            problems.append(SettingsProblem(name, message))
        return problems

    def _default_values(self) -> dict[str, Any]:
        return {name: s.default for name, s in self.settings.items()}


# ----------------------------------------------------------------------------------------------------------
# Loading


def _legacy_shims() -> dict[str, types.ModuleType]:
    class Config:
        """Stand-in for ``kohakuengine.Config``; only ``from_globals`` is meaningful here."""

        @staticmethod
        def from_globals() -> dict[str, Any]:
            caller = sys._getframe(1).f_globals
            return {k: v for k, v in caller.items() if _UPPER_NAME.fullmatch(k)}

    engine = types.ModuleType("kohakuengine", "shim of kohakuengine for legacy config files")
    engine.Config = Config  # type: ignore[attr-defined]
    top = types.ModuleType("kohakuriver", "shim of the original package for legacy config files")
    models = types.ModuleType("kohakuriver.models")
    enums = types.ModuleType("kohakuriver.models.enums")
    enums.LogLevel = LogLevel  # type: ignore[attr-defined]
    top.models = models  # type: ignore[attr-defined]
    models.enums = enums  # type: ignore[attr-defined]
    return {
        "kohakuengine": engine,
        "kohakuriver": top,
        "kohakuriver.models": models,
        "kohakuriver.models.enums": enums,
    }


def _namespace(filename: str) -> dict[str, Any]:
    shims = _legacy_shims()
    real_import = builtins.__import__

    def shim_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in shims:
            return shims[name] if fromlist else shims[name.split(".")[0]]
        return real_import(name, globals, locals, fromlist, level)

    namespace_builtins = dict(vars(builtins))
    namespace_builtins["__import__"] = shim_import
    return {"__builtins__": namespace_builtins, "__name__": "__kohakuriver_config__", "__file__": filename}


def _error_line(exc: BaseException, filename: str) -> int | None:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_settings(schema: Schema, source_text: str, filename: str) -> Any:
    """Execute ``source_text`` (the content of ``filename``) and validate its UPPER_CASE names."""
    try:
        code = compile(source_text, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}: " if exc.lineno else ""
        raise SettingsError([SettingsProblem(None, f"{where}syntax error: {exc.msg}")], filename) from None
    except ValueError as exc:  # e.g. NUL bytes in the source
        raise SettingsError([SettingsProblem(None, f"not a Python source file: {exc}")], filename) from None
    namespace = _namespace(filename)
    try:
        exec(code, namespace)
    except (Exception, SystemExit) as exc:
        line = _error_line(exc, filename)
        where = f"line {line}: " if line else ""
        message = f"{where}the file raised {type(exc).__name__}: {exc}"
        raise SettingsError([SettingsProblem(None, message)], filename) from None
    values = {k: v for k, v in namespace.items() if _UPPER_NAME.fullmatch(k)}
    return schema.build(values, source=filename)


# ----------------------------------------------------------------------------------------------------------
# Template


def _literal(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, str):
        text = repr(value)
        if text.startswith("'") and '"' not in value:
            text = '"' + text[1:-1] + '"'
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def _comment(text: str, width: int = 110) -> list[str]:
    lines = []
    for paragraph in text.strip().split("\n\n"):
        lines.extend(textwrap.wrap(" ".join(paragraph.split()), width - 2, break_on_hyphens=False) or [""])
        lines.append("")
    return [f"# {line}".rstrip() for line in lines[:-1]]


def render_template(schema: Schema, config: Any = None) -> str:
    """A commented Python config file with every setting (at ``config``'s values, else the defaults)."""
    rule = "# " + "-" * 106
    out = [f"# {schema.title} ({schema.filename})", "#"]
    if schema.intro:
        out += _comment(schema.intro)
        out.append("#")
    out += _comment(
        "Trusted Python, executed at start-up. Module-level UPPER_CASE names are settings; each one below "
        "is set to its default, so deleting a line changes nothing. Unknown names, wrong types and "
        "impossible values are rejected at start-up with a message naming the setting. Names starting "
        "with an underscore are yours (helpers, shared prefixes) and are ignored."
    )
    enums = sorted(
        {
            s.type
            for s in schema.settings.values()
            if isinstance(s.type, type) and issubclass(s.type, enum.Enum)
        },
        key=lambda t: t.__name__,
    )
    out.append("")
    for enum_type in enums:
        out.append(f"from {enum_type.__module__} import {enum_type.__name__}")
    for section in schema.sections:
        out += ["", "", rule, f"# {section.title}", rule]
        if section.doc:
            out += _comment(section.doc)
        for setting in section.settings:
            value = setting.default if config is None else getattr(config, setting.name)
            out.append("")
            out += _comment(setting.doc)
            out.append(f"{setting.name}: {setting.type_name} = {_literal(value)}")
    return "\n".join(out).lstrip("\n") + "\n"


# ----------------------------------------------------------------------------------------------------------
# Reusable checks. Each raises ValueError with a message that reads after "<SETTING>: ".


def optional(check: Check) -> Check:
    """Empty string (or empty list) means "not set / derived"; anything else must pass ``check``."""

    def wrapped(value: Any) -> None:
        if value not in ("", ()):
            check(value)

    return wrapped


def port(value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port number between 1 and 65535, got {value}")


def positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {value}")


def non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")


def fraction(value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"must be a fraction with 0 < x <= 1, got {value}")


def non_empty(value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty")


def ip_address(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"must be an IP address, got {value!r}") from None


def ip_network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"must be a network in CIDR form like 172.30.0.0/16, got {value!r} ({exc})"
        ) from None


_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?")


def reachable_address(value: str) -> None:
    """A host name or IP address other peers can connect to (so not 0.0.0.0 / ::)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        if not _DNS_NAME.fullmatch(value):
            raise ValueError(f"must be a host name or an IP address, got {value!r}") from None
        return
    if address.is_unspecified:
        raise ValueError(f"{value} is a bind-all address, not one that peers can connect to")


_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def node_name(value: str) -> None:
    if not _HOSTNAME.fullmatch(value):
        raise ValueError(
            f"must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit, got {value!r}"
        )


def http_url(value: str) -> None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"must be an http:// or https:// URL like http://10.0.0.5:8001, got {value!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port: {value!r}") from None


def absolute_path(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")


_DOCKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")


def docker_name(value: str) -> None:
    if not _DOCKER_NAME.fullmatch(value):
        raise ValueError(
            f"must be a Docker name (letters, digits, '_', '.', '-', at least 2 characters), got {value!r}"
        )


def interface_name(value: str) -> None:
    if not (1 <= len(value) <= 15) or value in (".", "..") or any(c in value for c in "/: \t\n"):
        raise ValueError(
            f"must be a network interface name of 1-15 characters without '/', ':' or spaces, got {value!r}"
        )


_DISK_SIZE = re.compile(r"[1-9][0-9]*(?:\.[0-9]+)?[KMGTPEkmgtpe]?")


def disk_size(value: str) -> None:
    if not _DISK_SIZE.fullmatch(value):
        raise ValueError(f"must be a size like 500G, 20480M or 1T, got {value!r}")


def token(value: str) -> None:
    """A shared secret: at least 16 characters, no whitespace (it travels in HTTP headers)."""
    if len(value) < 16 or any(c.isspace() for c in value) or not value.isprintable():
        raise ValueError(
            'must be at least 16 printable characters without whitespace (or "" for the default)'
        )


def mounts(value: Sequence[str]) -> None:
    """Bind mounts as ``"host_path:container_path[:ro|rw]"``, both paths absolute."""
    for i, mount in enumerate(value):
        parts = mount.split(":")
        problem = None
        if len(parts) not in (2, 3) or not all(parts[:2]):
            problem = 'must look like "/host/path:/container/path" with an optional ":ro" or ":rw"'
        elif not parts[0].startswith("/"):
            problem = "the host path must be absolute"
        elif not parts[1].startswith("/"):
            problem = "the container path must be absolute"
        elif len(parts) == 3 and parts[2] not in ("ro", "rw"):
            problem = f"the mode must be 'ro' or 'rw', not {parts[2]!r}"
        if problem:
            raise ValueError(f"element {i} {mount!r}: {problem}")


# ----------------------------------------------------------------------------------------------------------
# Overlay subnet: BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS


@attrs.frozen
class OverlaySubnet:
    """The overlay address plan: ``network`` (BASE/TOTAL_PREFIX) split into one subnet per runner."""

    network: ipaddress.IPv4Network
    node_bits: int
    subnet_bits: int

    @property
    def max_runners(self) -> int:
        """Runner ids are 1 .. 2**node_bits - 1 (0 is the host)."""
        return 2**self.node_bits - 1

    @property
    def runner_prefix(self) -> int:
        return 32 - self.subnet_bits


def parse_overlay_subnet(text: str) -> OverlaySubnet:
    """Parse ``BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS``; raises ``ValueError`` naming what is wrong."""
    parts = text.split("/")
    if len(parts) != 4:
        raise ValueError(
            f"must look like BASE/TOTAL_PREFIX/NODE_BITS/SUBNET_BITS (10.128.0.0/12/6/14), got {text!r}"
        )
    base, *numbers = parts
    try:
        total, node, subnet = (int(n) for n in numbers)
    except ValueError:
        raise ValueError(f"TOTAL_PREFIX, NODE_BITS and SUBNET_BITS must be integers, got {text!r}") from None
    try:
        address = ipaddress.IPv4Address(base)
    except ValueError:
        raise ValueError(f"BASE must be an IPv4 address, got {base!r}") from None
    if total + node + subnet != 32:
        raise ValueError(
            f"TOTAL_PREFIX + NODE_BITS + SUBNET_BITS must be 32, got {total}+{node}+{subnet} in {text!r}"
        )
    if not 1 <= total <= 24:
        raise ValueError(f"TOTAL_PREFIX must be between 1 and 24, got {total}")
    if not 1 <= node <= 16:
        raise ValueError(f"NODE_BITS must be between 1 and 16, got {node}")
    if subnet < 8:
        raise ValueError(f"SUBNET_BITS must be at least 8, got {subnet}")
    try:
        network = ipaddress.IPv4Network(f"{address}/{total}", strict=True)
    except ValueError:
        raise ValueError(f"BASE {base} has host bits set for a /{total} network") from None
    return OverlaySubnet(network, node, subnet)


def overlay_subnet(value: str) -> None:
    parse_overlay_subnet(value)


def mtu(value: int) -> None:
    if not 576 <= value <= 9216:
        raise ValueError(f"must be an MTU between 576 and 9216, got {value}")


VXLAN_MAX_ID = 2**24 - 1


def vxlan_id(value: int) -> None:
    if not 1 <= value <= VXLAN_MAX_ID:
        raise ValueError(f"must be a VXLAN id between 1 and {VXLAN_MAX_ID}, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Reusable cross checks


def gateway_in_subnet(subnet_name: str, gateway_name: str) -> CrossCheck:
    def fn(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        network = ipaddress.ip_network(values[subnet_name])
        gateway = ipaddress.ip_address(values[gateway_name])
        if gateway.version != network.version or gateway not in network:
            yield gateway_name, f"{gateway} is not inside {subnet_name} {network}"
        elif network.num_addresses > 2 and gateway in (network.network_address, network.broadcast_address):
            yield gateway_name, f"{gateway} is the network or broadcast address of {subnet_name} {network}"

    return CrossCheck((subnet_name, gateway_name), fn)


def tls_pair(cert_name: str, key_name: str) -> CrossCheck:
    def fn(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        if bool(values[cert_name]) != bool(values[key_name]):
            missing = key_name if values[cert_name] else cert_name
            yield missing, f"{cert_name} and {key_name} must be set together (TLS needs both)"

    return CrossCheck((cert_name, key_name), fn)


def vxlan_ids_fit(id_name: str, subnet_name: str) -> CrossCheck:
    def fn(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        plan = parse_overlay_subnet(values[subnet_name])
        highest = values[id_name] + plan.max_runners
        if highest > VXLAN_MAX_ID:
            yield (
                id_name,
                (
                    f"{values[id_name]} + {plan.max_runners} runners (from {subnet_name}) exceeds the "
                    "largest "
                    f"VXLAN id {VXLAN_MAX_ID}"
                ),
            )

    return CrossCheck((id_name, subnet_name), fn)


def distinct_ports(*names: str) -> CrossCheck:
    def fn(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        seen: dict[int, str] = {}
        for name in names:
            if values[name] in seen:
                yield name, f"{values[name]} is already used by {seen[values[name]]}"
            else:
                seen[values[name]] = name

    return CrossCheck(names, fn)


def networks_disjoint(a: str, b: str, when: str | None = None) -> CrossCheck:
    """Subnets ``a`` and ``b`` must not overlap (only checked when bool setting ``when`` is true)."""

    def network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        if value.count("/") == 3:
            return parse_overlay_subnet(value).network
        return ipaddress.ip_network(value)

    def fn(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        if when is not None and not values[when]:
            return
        na, nb = network(values[a]), network(values[b])
        if na.version == nb.version and na.overlaps(nb):
            yield b, f"{nb} overlaps {a} {na}"

    return CrossCheck((a, b) + ((when,) if when else ()), fn)
