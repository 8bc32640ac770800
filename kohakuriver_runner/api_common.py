"""What every endpoint module of the runner shares: the error type, JSON answers, the cluster-token check,
task ids in paths, and the mapping of the ``TaskManager``'s exceptions to statuses.

Errors: handlers raise ``ApiFailure`` (or ``ValidationError``) and ``app.py`` turns each into the JSON body
of ``docs/http-api.md`` (``{"error", "message", "field"}``) with its status, so no endpoint builds an error
body by hand. This module sits below ``app.py`` and the ``api_*`` modules: they import it, it imports none
of them.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from quart import Response

from kohakuriver_proto.converter import dumps, structure
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import ApiError, TaskControl
from kohakuriver_proto.snowflake import SnowflakeId

from .docker_api import DockerError, DockerUnavailable
from .executor import BackendFailure, RestoreUnsupported, TaskConflict, TaskNotFound

__all__ = [
    "ApiFailure",
    "cluster_token_problem",
    "control_answer",
    "error_response",
    "json_response",
    "manager_errors",
    "path_task_id",
]


class ApiFailure(Exception):
    """Raised by handlers: becomes an error response with this status and code."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field


def json_response(model: Any, status: int = 200) -> Response:
    return Response(dumps(model), status=status, mimetype="application/json")


def error_response(status: int, error: str, message: str, field: str | None = None) -> Response:
    body = ApiError(error=error, message=message[:4096], field=field)
    return json_response(body, status)


def cluster_token_problem(token: bytes, header: str) -> str | None:
    """Why ``header`` (an ``Authorization`` value) does not carry the cluster token; None when it does."""
    if not token:
        return "this runner has no CLUSTER_TOKEN configured"
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
        return "missing or wrong cluster token"
    return None


def path_task_id(text: str) -> int:
    """The ``{task_id}`` of a route path as an id; ``ApiFailure`` 400 for anything but a decimal id."""
    try:
        return structure(text, SnowflakeId)
    except ValidationError:
        raise ApiFailure(
            400, "invalid", f"task id must be a decimal id, got {text[:40]!r}", "task_id"
        ) from None


@contextmanager
def manager_errors(*not_found: type[Exception]) -> Iterator[None]:
    """Map the ``TaskManager``'s exceptions to API failures: 404 for an unknown task (or one of
    ``not_found``), 409 wrong state, 503 Docker unavailable, 502 another Docker failure."""
    try:
        yield
    except (TaskNotFound, *not_found) as exc:
        raise ApiFailure(404, "not_found", str(exc)) from None
    except TaskConflict as exc:
        raise ApiFailure(409, "conflict", str(exc)) from None
    except RestoreUnsupported as exc:
        raise ApiFailure(501, "not_implemented", str(exc)) from None
    except BackendFailure as exc:
        raise ApiFailure(502, "vm_error", str(exc)) from None
    except DockerUnavailable as exc:
        raise ApiFailure(503, "unavailable", f"Docker is not available: {exc}") from None
    except DockerError as exc:
        raise ApiFailure(502, "docker_error", f"Docker refused: {exc}") from None


async def control_answer(action: Callable[[int], Awaitable[TaskControl]], task_id: int) -> Response:
    """Run a task control of the manager (kill, pause, stop_vps, ...); answer with its ``TaskControl``."""
    with manager_errors():
        result = await action(task_id)
    return json_response(result)
