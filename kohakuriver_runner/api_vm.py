"""VM endpoints of the runner API (the host proxies them for ``kr vm``).

- ``GET /api/vm/images``: ``{"images": [VmImageInfo...]}``, the base images in ``VM_IMAGES_DIR``.
- ``GET /api/vm/instances``: ``{"instances": [{task_id, path, disk_bytes, running, pid, tap}]}``, every
  instance directory under ``VM_INSTANCES_DIR`` (the disk of a stopped VPS stays there for its restart;
  the host tells which ones no VPS owns any more).
- ``DELETE /api/vm/instances/{task_id}``: remove an instance's files; 409 while this runner holds the VM,
  404 when there is no such instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response
from quart_trio import QuartTrio

from kohakuriver_proto.converter import unstructure

from .api_common import ApiFailure, json_response, manager_errors, path_task_id

if TYPE_CHECKING:
    from .daemon import Runtime

__all__ = ["register"]


def register(app: QuartTrio, runtime: Runtime) -> None:
    def vms():
        if runtime.manager.vms is None:
            raise ApiFailure(503, "unavailable", "this runner does not run VMs")
        return runtime.manager.vms

    @app.get("/api/vm/images")
    async def images() -> Response:
        found = await vms().images()
        return json_response({"images": [unstructure(i.to_info()) for i in found]})

    @app.get("/api/vm/instances")
    async def instances() -> Response:
        return json_response({"instances": await vms().instances()})

    @app.delete("/api/vm/instances/<task_id>")
    async def remove_instance(task_id: str) -> Response:
        tid = path_task_id(task_id)
        with manager_errors():
            await vms().remove_instance(tid)
        return json_response({"removed": str(tid)})
