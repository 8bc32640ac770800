"""The host's quart-trio application: the endpoint blueprints and one error mapping for all of them.

Every error answer is JSON ``{"error", "message", "field"}``:

| raised | status | error |
| --- | --- | --- |
| ``ApiProblem`` | its own | its own |
| ``ValidationError`` (a model refused the body) | 422 (400 for a body that is not JSON) | ``invalid`` |
| ``auth.Unauthorized`` / ``auth.Forbidden`` | 401 / 403 | ``unauthorized`` / ``forbidden`` |
| werkzeug ``HTTPException`` (unknown route, wrong method, body too large) | its code | by code |
| anything else | 500 | ``internal`` (logged with its traceback; the message says nothing more) |

A WebSocket refused before ``accept`` gets the same JSON as an HTTP answer to its upgrade request.
"""

from __future__ import annotations

import logging

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from kohakuriver_proto.errors import ValidationError

from . import (
    api_auth,
    api_forward,
    api_nodes,
    api_overlay,
    api_runner,
    api_tasks,
    api_terminal,
    api_vm,
    api_vps,
    auth,
)
from .api_common import EXTENSION_KEY, ApiProblem, error_body, json_response
from .context import HostContext

log = logging.getLogger("kohakuriver.host.api")

#: Largest request body: a heartbeat of a runner with thousands of tasks fits, a runaway upload does not.
MAX_BODY_BYTES = 8 * 1024 * 1024

_HTTP_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "invalid",
    422: "invalid",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
}


def create_app(host: HostContext | None) -> QuartTrio:
    """The application serving ``host`` (None builds the routes only, e.g. to list them in tests)."""
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # Log tails stream for as long as the runner sends; hypercorn's own timeouts bound idle connections.
    app.config["RESPONSE_TIMEOUT"] = None
    app.extensions[EXTENSION_KEY] = host
    modules = (
        api_nodes,
        api_auth,
        api_tasks,
        api_vps,
        api_vm,
        api_overlay,
        api_runner,
        api_forward,
        api_terminal,
    )
    for module in modules:
        app.register_blueprint(module.bp)

    @app.errorhandler(ApiProblem)
    async def _problem(exc: ApiProblem) -> Response:
        return json_response(error_body(exc.error, exc.message, exc.field), exc.status)

    @app.errorhandler(ValidationError)
    async def _invalid(exc: ValidationError) -> Response:
        status = 400 if exc.field == "body" and exc.message.startswith("invalid JSON") else 422
        return json_response(error_body("invalid", str(exc)[:4096], exc.field or None), status)

    @app.errorhandler(auth.Unauthorized)
    async def _unauthorized(exc: auth.Unauthorized) -> Response:
        return json_response(
            error_body("unauthorized", str(exc)), 401, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.errorhandler(auth.Forbidden)
    async def _forbidden(exc: auth.Forbidden) -> Response:
        return json_response(error_body("forbidden", str(exc)), 403)

    @app.errorhandler(HTTPException)
    async def _http(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = exc.description or exc.name
        response = json_response(
            error_body(_HTTP_CODES.get(code, "internal" if code >= 500 else "invalid"), message), code
        )
        if code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        if code == 413:
            # The rest of the body was never read: the connection cannot carry another request.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        log.exception("unhandled error in a request handler")
        return json_response(error_body("internal", "internal error (the host logged the details)"), 500)

    return app
