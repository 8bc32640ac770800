"""The error body every REST endpoint returns: ``{"error": "not_found", "message": "...", "field": null}``.

The HTTP status code is not repeated in the body. ``error`` is a stable machine code (scripts branch on it),
``message`` a one-line human text, ``field`` the offending request field for ``invalid``.
"""

from __future__ import annotations

import attrs

from ..errors import ValidationError
from ._fields import ERROR_CODE_RE, check_str, fail, opt, v

#: The codes the daemons use, with the HTTP status each goes with.
ERROR_CODES: dict[str, int] = {
    "invalid": 400,  # request body/query failed validation (``field`` says where)
    "unauthorized": 401,  # no or bad API token
    "forbidden": 403,  # authenticated, but the role or ownership does not allow it
    "not_found": 404,
    "conflict": 409,  # e.g. illegal status transition, name taken
    "unavailable": 503,  # runner/node unreachable, Docker down
    "internal": 500,
}


def _check_code(value: object, path: str) -> None:
    check_str(value, path, max_len=64)
    if not ERROR_CODE_RE.fullmatch(value):
        fail(path, "must be a lower_snake_case code like 'not_found'")


@attrs.frozen(kw_only=True)
class ApiError:
    error: str = attrs.field(validator=v(_check_code))
    message: str = attrs.field(validator=v(check_str, max_len=4096))
    field: str | None = attrs.field(default=None, validator=opt(check_str, max_len=512, one_line=True))

    @classmethod
    def from_validation(cls, exc: ValidationError) -> ApiError:
        return cls(error="invalid", message=str(exc)[:4096], field=exc.field[:512] or None)

    @property
    def http_status(self) -> int:
        return ERROR_CODES.get(self.error, 400)


__all__ = ["ERROR_CODES", "ApiError"]
