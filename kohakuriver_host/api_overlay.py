"""Overlay network endpoints: the host's view, reserving an address, releasing a reservation.

- ``GET /api/overlay`` (also ``/api/overlay/status``), viewers and up: ``models.OverlayStatus``: the mode,
  the plan, the host's overlay address, every runner (id, subnet, the host's link to it, underlay address,
  whether it is online with its link in place, last heartbeat) and the live reservations: all of them for
  operators, one's own for everyone else (a token is what lets a task use the address).
- ``POST /api/overlay/reserve``, users and up: ``models.ReserveRequest`` -> ``models.IpReservation`` (201).
  Users reserve for their own tasks; operators may hand the token to someone else (the token is the
  right to use the address).
- ``DELETE /api/overlay/reservations/{token or address}``, users and up: with the token, whoever holds it;
  with the address, its owner or an operator. A reservation in use is released when its task ends (409).

The logic is ``overlay_service``'s; with the overlay off the status says ``enabled: false`` and the others
answer 409.
"""

from __future__ import annotations

from quart import Blueprint, Response

from kohakuriver_proto.converter import structure, unstructure
from kohakuriver_proto.models.overlay import OverlayStatus, ReserveRequest

from .api_common import ApiProblem, ctx, json_body, json_response, require
from .auth import Role
from .overlay_service import OverlayService

bp = Blueprint("overlay", __name__)

#: A token is under 1 KiB; anything longer in the path is not one.
_MAX_PATH_ARG = 1024


def _service() -> OverlayService:
    service = ctx().overlay
    if service is None:
        raise ApiProblem(409, "conflict", "the overlay network is off on this host (OVERLAY_ENABLED)")
    return service


@bp.get("/api/overlay")
@bp.get("/api/overlay/status")
async def status() -> Response:
    who = await require(Role.VIEWER)
    service = ctx().overlay
    view = OverlayStatus(enabled=False) if service is None else await service.status(who)
    return json_response(unstructure(view))


@bp.post("/api/overlay/reserve")
async def reserve() -> Response:
    who = await require(Role.USER)
    request = structure(await json_body(), ReserveRequest)  # ValidationError -> 422 naming the field
    return json_response(unstructure(await _service().reserve(who, request)), 201)


@bp.delete("/api/overlay/reservations/<what>")
async def release(what: str) -> Response:
    who = await require(Role.USER)
    if len(what) > _MAX_PATH_ARG:
        raise ApiProblem(404, "not_found", "no such reservation")
    return json_response(await _service().release(who, what))
