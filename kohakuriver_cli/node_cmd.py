"""``kr node``: the cluster's machines, their capacity, what is in use, and whether they are alive; for VMs,
whether the node can run them (the accelerator, and why), its QEMU, its base images and passthrough GPUs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.targets import check_hostname

from .client import CliError
from .context import CliContext, KrGroup, json_option, pass_cli
from .output import (
    DASH,
    clean,
    fmt_age,
    fmt_size,
    fmt_time_and_age,
    info,
    items_of,
    kv_panel,
    new_table,
    plain,
    print_json,
    print_renderable,
    status_text,
)

MIB = 1 << 20


@click.group("node", cls=KrGroup)
def node() -> None:
    """Cluster nodes: list, status, remove."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _metric(value: Any, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    """A GPU/host metric; -1 or absent means unavailable."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return DASH
    return f"{value / scale:.{digits}f}{unit}"


def cores_text(record: Mapping[str, Any]) -> str:
    used, total = _int(record.get("cores_in_use")), _int(record.get("total_cores"))
    if total is None:
        return DASH
    return f"{used if used is not None else '?'}/{total}"


def memory_text(record: Mapping[str, Any]) -> str:
    reserved, total = record.get("memory_reserved_bytes"), record.get("memory_total_bytes")
    if _int(total) is None:
        return DASH
    return f"{fmt_size(reserved) if _int(reserved) is not None else '?'} / {fmt_size(total)}"


def gpus_text(record: Mapping[str, Any]) -> str:
    gpus = record.get("gpu_info") or []
    if not gpus:
        return DASH
    in_use = record.get("gpus_in_use") or []
    return f"{len(in_use)}/{len(gpus)}"


def docker_text(record: Mapping[str, Any]) -> str:
    available = record.get("docker_available")
    if available is None:
        return DASH
    return "ok" if available else "DOWN"


def vm_text(record: Mapping[str, Any]) -> str:
    """The VM column: the accelerator a VM-capable node uses (``kvm``/``tcg``), else ``-``."""
    vm = record.get("vm")
    if isinstance(vm, Mapping):
        return clean(vm.get("accel") or "yes") if vm.get("capable") else DASH
    return "yes" if record.get("vm_capable") else DASH


def node_table(nodes: Sequence[Mapping[str, Any]]):
    table = new_table(
        "HOSTNAME", "STATUS", "CORES", "MEMORY", "CPU", "GPUS", "TASKS", "DOCKER", "VM", "HEARTBEAT",
        right=("CORES", "CPU", "GPUS", "TASKS"),
    )  # fmt: skip
    for record in nodes:
        docker = docker_text(record)
        table.add_row(
            plain(record.get("hostname")),
            status_text(record.get("status")),
            plain(cores_text(record)),
            plain(memory_text(record)),
            plain(_metric(record.get("cpu_percent"), "%")),
            plain(gpus_text(record)),
            plain(
                _int(record.get("running_task_count"))
                if record.get("running_task_count") is not None
                else DASH
            ),
            plain(docker, style="bold red" if docker == "DOWN" else ""),
            plain(vm_text(record)),
            plain(fmt_age(record.get("last_heartbeat"))),
        )
    if not nodes:
        table.add_row(plain("(no nodes registered)"), *[plain("")] * 9)
    return table


def compress_ids(ids: Iterable[Any]) -> str:
    """``[0, 1, 2, 3, 8, 10, 11]`` -> ``0-3,8,10-11``."""
    values = sorted({i for i in ids if _int(i) is not None})
    if not values:
        return DASH
    parts: list[str] = []
    start = prev = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


def node_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    available = record.get("available_cores")
    cores = cores_text(record) + (f" in use (free {available})" if _int(available) is not None else "")
    used, percent = record.get("memory_used_bytes"), record.get("memory_percent")
    host_memory = DASH
    if _int(used) is not None:
        host_memory = f"{fmt_size(used)} used on the host ({_metric(percent, '%', digits=1)})"
    temps = [
        _metric(record.get("current_avg_temp"), " °C", digits=1),
        _metric(record.get("current_max_temp"), " °C", digits=1),
    ]
    docker = docker_text(record)
    if docker == "DOWN" and record.get("docker_error"):
        docker = f"DOWN: {clean(record['docker_error'], 200)}"
    return [
        ("Status", status_text(record.get("status"))),
        ("URL", clean(record.get("url"))),
        ("Version", clean(record.get("runner_version") or DASH)),
        ("Cores", cores),
        ("CPU", _metric(record.get("cpu_percent"), "%", digits=1)),
        ("Memory", f"{memory_text(record)} reserved by tasks"),
        ("Host memory", host_memory),
        ("Temperature", DASH if temps == [DASH, DASH] else f"avg {temps[0]}, max {temps[1]}"),
        ("GPUs", gpus_text(record) + " in use" if record.get("gpu_info") else DASH),
        ("Tasks", clean(record.get("running_task_count", DASH))),
        ("Docker", plain(docker, style="bold red" if docker.startswith("DOWN") else "")),
        ("Heartbeat", fmt_time_and_age(record.get("last_heartbeat"))),
    ]


def vm_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The VM section of ``kr node status``: capable or not, the accelerator and why, the tools' versions."""
    vm = record.get("vm")
    if not isinstance(vm, Mapping):
        return [
            ("Capable", "no (the runner reports no VM support)" if not record.get("vm_capable") else "yes")
        ]
    capable = bool(vm.get("capable"))
    rows: list[tuple[str, Any]] = [
        ("Capable", plain("yes" if capable else "no", style="green" if capable else "bold red")),
        ("Accelerator", clean(vm.get("accel"))),
        ("Why", clean(vm.get("reason") or DASH, 500)),
        ("QEMU", clean(vm.get("qemu_version") or "not found")),
        ("qemu-img", clean(vm.get("qemu_img_version") or "not found")),
        ("OVMF", clean(vm.get("ovmf_version") or "not found (BIOS images only)")),
    ]
    if _int(vm.get("default_memory_mb")) is not None:
        rows.append(("Default memory", fmt_size(vm["default_memory_mb"] * MIB)))
    return rows


def vm_image_table(vm: Any):
    images = vm.get("images") if isinstance(vm, Mapping) else None
    if not isinstance(images, list) or not images:
        return None
    table = new_table("VM IMAGE", "SIZE", "FILE", "BOOT", "FIRMWARE", right=("SIZE", "FILE"))
    for image in images:
        if not isinstance(image, Mapping):
            continue
        table.add_row(
            plain(image.get("name")),
            plain(fmt_size(image.get("virtual_size_bytes"))),
            plain(fmt_size(image.get("file_size_bytes"))),
            plain("direct" if image.get("direct_boot") else "disk"),
            plain(image.get("firmware") or DASH),
        )
    return table


def vfio_table(vm: Any, in_use: Iterable[Any]):
    gpus = vm.get("vfio_gpus") if isinstance(vm, Mapping) else None
    if not isinstance(gpus, list) or not gpus:
        return None
    busy = {i for i in in_use if _int(i) is not None}
    table = new_table("VFIO GPU", "ADDRESS", "GROUP", "DRIVER", "PASSTHROUGH", right=("VFIO GPU", "GROUP"))
    for gpu in gpus:
        if not isinstance(gpu, Mapping):
            continue
        if gpu.get("viable"):
            verdict = plain("in use" if gpu.get("gpu_id") in busy else "viable", style="green")
        else:
            problems = gpu.get("problems") or []
            why = "; ".join(clean(p, 200) for p in problems if isinstance(p, str)) or "not viable"
            verdict = plain(f"no: {why}", style="yellow")
        group = gpu.get("iommu_group")
        table.add_row(
            plain(gpu.get("gpu_id")),
            plain(gpu.get("address") or DASH),
            plain(group if group is not None else DASH),
            plain(gpu.get("driver") or DASH),
            verdict,
        )
    return table


def numa_table(topology: Any):
    if not isinstance(topology, Mapping) or not topology:
        return None
    table = new_table("NUMA", "CORES", "MEMORY", right=("NUMA",))

    def key(item: tuple[Any, Any]) -> tuple[int, str]:
        text = str(item[0])
        return (int(text), text) if text.isdigit() else (1 << 30, text)

    for numa_id, numa in sorted(topology.items(), key=key):
        numa = numa if isinstance(numa, Mapping) else {}
        table.add_row(
            plain(numa_id),
            plain(compress_ids(numa.get("cores") or [])),
            plain(fmt_size(numa.get("memory_bytes"))),
        )
    return table


def gpu_table(gpus: Any, in_use: Iterable[Any]):
    if not isinstance(gpus, list) or not gpus:
        return None
    busy = {i for i in in_use if _int(i) is not None}
    table = new_table(
        "GPU", "NAME", "TASK", "UTIL", "MEMORY", "TEMP", "POWER", right=("GPU", "UTIL", "TEMP", "POWER")
    )
    for gpu in gpus:
        if not isinstance(gpu, Mapping):
            continue
        used, total = gpu.get("memory_used_mib"), gpu.get("memory_total_mib")
        memory = DASH
        if _int(total) is not None and total >= 0:
            used_text = fmt_size(used * MIB) if _int(used) is not None and used >= 0 else "?"
            memory = f"{used_text} / {fmt_size(total * MIB)}"
        power = _metric(gpu.get("power_usage_mw"), " W", scale=1000)
        limit = _metric(gpu.get("power_limit_mw"), " W", scale=1000)
        name = clean(gpu.get("name") or DASH, 40) + (" (vfio)" if gpu.get("vfio_bound") else "")
        table.add_row(
            plain(gpu.get("gpu_id")),
            plain(name),
            plain(
                "in use" if gpu.get("gpu_id") in busy else "free",
                style="yellow" if gpu.get("gpu_id") in busy else "green",
            ),
            plain(_metric(gpu.get("gpu_utilization"), "%")),
            plain(memory),
            plain(_metric(gpu.get("temperature"), " °C")),
            plain(power if limit == DASH else f"{power} / {limit}"),
        )
    return table


@node.command("list")
@json_option
@pass_cli
def list_nodes(obj: CliContext) -> None:
    """List the nodes, their usage and liveness."""
    answer = obj.client().get("/api/nodes")
    if obj.json_output:
        print_json(answer)
        return
    print_renderable(node_table(items_of(answer, "nodes", "items")))


@node.command("status")
@click.argument("hostname")
@json_option
@pass_cli
def status_cmd(obj: CliContext, hostname: str) -> None:
    """Show one node: capacity, usage, NUMA layout, GPUs, and what it can do with VMs."""
    try:
        check_hostname(hostname, "HOSTNAME")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="'HOSTNAME'") from None
    record = obj.client().get(f"/api/nodes/{hostname}")
    if obj.json_output:
        print_json(record)
        return
    if not isinstance(record, dict):
        raise CliError(f"the host returned something that is not a node for {hostname}")
    parts: list[Any] = [kv_panel(f"node {hostname}", node_rows(record))]
    numa = numa_table(record.get("numa_topology"))
    if numa is not None:
        parts.extend(["", numa])
    gpus = gpu_table(record.get("gpu_info"), record.get("gpus_in_use") or [])
    if gpus is not None:
        parts.extend(["", gpus])
    parts.extend(["", kv_panel("VM", vm_rows(record))])
    for table in (
        vm_image_table(record.get("vm")),
        vfio_table(record.get("vm"), record.get("gpus_in_use") or []),
    ):
        if table is not None:
            parts.extend(["", table])
    from rich.console import Group

    print_renderable(Group(*parts))


@node.command("remove")
@click.argument("hostname", metavar="HOSTNAME")
@json_option
@pass_cli
def remove(obj: CliContext, hostname: str) -> None:
    """Forget a node that is gone (admins; it must be offline with no active task). Frees its overlay
    runner id; its ended tasks keep its name. A runner started again on it simply registers anew."""
    try:
        check_hostname(hostname, "HOSTNAME")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="'HOSTNAME'") from None
    answer = obj.client().delete(f"/api/nodes/{hostname}")
    if obj.json_output:
        print_json(answer)
        return
    message = answer.get("message") if isinstance(answer, dict) else None
    info(clean(message) if message else f"node {clean(hostname)} removed")
