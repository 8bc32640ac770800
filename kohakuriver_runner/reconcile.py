"""Start-up reconciliation: take back what a previous run of this runner left behind.

Sources of truth, in order: the Docker labels (``kohakuriver.runner=<this hostname>`` marks this runner's
containers, so two runners sharing one engine never touch each other's), then the state records.

- a running or paused container gets a waiter again (its exit will be reported as usual);
- an exited container is collected (output saved, exit code and OOM flag reported) and removed;
- a container that was created but never started is removed and its task reported failed;
- a record without a container is reported: failed with the reason (or its stored final report is sent
  again when the host never acknowledged it).

It needs Docker: without a container list, every record would look lost. The daemon runs it when the engine
first answers (and again after the engine comes back); tasks already held are skipped, so it is idempotent.
"""

from __future__ import annotations

import logging

from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import VpsBackend

from .container_spec import LABEL_RUNNER, LABEL_TASK_TYPE, task_id_from_labels
from .docker_api import DockerClient, NotFound
from .executor import TaskManager
from .state import StateStore

__all__ = ["reconcile"]

log = logging.getLogger("kohakuriver.runner.reconcile")

#: Command tasks and Docker VPS share the container naming and labels, so both are adopted the same way.
_ADOPTED_TYPES = frozenset({TaskType.COMMAND.value, TaskType.VPS.value})


async def reconcile(docker: DockerClient, store: StateStore, manager: TaskManager, hostname: str) -> None:
    containers = await docker.list_containers(labels={LABEL_RUNNER: hostname}, all=True)
    found: set[int] = set()
    for summary in containers:
        if summary.labels.get(LABEL_TASK_TYPE, TaskType.COMMAND.value) not in _ADOPTED_TYPES:
            continue  # not a container this runner version knows how to run
        task_id = task_id_from_labels(summary.labels)
        if task_id is None:
            log.warning(
                "container %s carries this runner's label but no valid task id; ignored", summary.name
            )
            continue
        found.add(task_id)
        if task_id in manager.runs:
            continue
        try:
            info = await docker.inspect(summary.id)
        except NotFound:
            found.discard(task_id)  # removed in the meantime: handled as a record without container
            continue
        await manager.adopt(info, task_id, store.get(task_id))
    for entry in store.entries():
        if entry.request is not None and entry.request.vps_backend is VpsBackend.QEMU:
            continue  # a VM's record: the VM manager adopts or reports it (no container to look for)
        if entry.task_id not in found and entry.task_id not in manager.runs:
            await manager.report_lost(entry)
