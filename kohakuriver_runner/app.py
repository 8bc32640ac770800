"""The runner's HTTP API: a quart-trio app served by hypercorn inside the daemon's nursery.

Every endpoint, HTTP and WebSocket, requires ``Authorization: Bearer <cluster token>`` (compared in constant
time); a runner without a CLUSTER_TOKEN refuses everything rather than run unauthenticated. The one exception
is ``/ws/tunnel/{container}``: tunnel clients inside containers never see the cluster token and present their
container's own secret instead (checked in ``api_ws``/``tunnel_server``). Every error is the JSON body of
``docs/http-api.md`` (``{"error", "message", "field"}``), including 404/405 of unknown routes and crashes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import ApiError

from . import api_tasks, api_terminal, api_vm, api_vps, api_ws
from .api_common import ApiFailure, cluster_token_problem, error_response, json_response

if TYPE_CHECKING:
    from .daemon import Runtime

__all__ = ["create_app"]

log = logging.getLogger("kohakuriver.runner.api")

#: An ExecuteRequest can legitimately be large (argv up to Linux's limits) but not unbounded.
MAX_BODY = 8 * 1024 * 1024

_HTTP_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    503: "unavailable",
}


def create_app(runtime: Runtime) -> QuartTrio:
    """The app for ``runtime`` (the daemon's ``Runtime``: config, manager, store, docker, ...)."""

    # ``__name__`` (a module with a file), not the package: an editable install can make the package a
    # namespace without ``__file__``, and Quart then cannot find its root path.
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    token = (runtime.config.CLUSTER_TOKEN or "").encode()

    def check_cluster_token(header: str) -> Response | None:
        problem = cluster_token_problem(token, header)
        return None if problem is None else error_response(401, "unauthorized", problem)

    @app.before_request
    async def authenticate() -> Response | None:
        return check_cluster_token(request.headers.get("Authorization", ""))

    @app.before_websocket
    async def authenticate_websocket() -> Response | None:
        if websocket.path.startswith(api_ws.TUNNEL_PREFIX):
            return None  # the container secret, checked by the route itself
        return check_cluster_token(websocket.headers.get("Authorization", ""))

    @app.errorhandler(ApiFailure)
    async def api_failure(exc: ApiFailure) -> Response:
        return error_response(exc.status, exc.error, exc.message, exc.field)

    @app.errorhandler(ValidationError)
    async def invalid(exc: ValidationError) -> Response:
        api = ApiError.from_validation(exc)
        return json_response(api, 400)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return error_response(status, _HTTP_CODES.get(status, "internal"), exc.description or exc.name)

    @app.errorhandler(Exception)
    async def crash(exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", f"internal runner error: {type(exc).__name__}: {exc}")

    api_tasks.register(app, runtime)
    api_vps.register(app, runtime)
    api_vm.register(app, runtime)
    api_ws.register(app, runtime)
    api_terminal.register(app, runtime)
    return app
