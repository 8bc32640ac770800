"""``kr vm``: what the nodes offer for VM VPS and what they hold.

- ``kr vm images [-n NODE]``: the base images the nodes reported (any user; the host answers from its node
  facts, no runner is asked);
- ``kr vm instances [-n NODE]``: the VM instance directories on the nodes (operators), with the status of
  the VPS each belongs to and ``ORPHAN`` when the host has no VM VPS with that id there;
- ``kr vm instances remove NODE TASK_ID``: remove one (admins; refused while its VPS is active).

VM VPS themselves are created and controlled with ``kr vps`` (``kr vps create --backend qemu``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.targets import check_hostname

from .context import CliContext, KrGroup, json_option, pass_cli
from .output import (
    DASH,
    clean,
    fmt_bool,
    fmt_size,
    info,
    items_of,
    new_table,
    plain,
    print_json,
    print_renderable,
    status_text,
)
from .task_cmd import task_id_callback


@click.group("vm", cls=KrGroup)
def vm() -> None:
    """Virtual machines: base images on the nodes, VM instances (operators)."""


def _node_params(node: str | None, hint: str = "'-n' / '--node'") -> dict[str, str]:
    if node is None:
        return {}
    try:
        check_hostname(node, "node")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint=hint) from None
    return {"node": node}


_node_option = click.option("-n", "--node", metavar="NODE", help="Only this node (default: every node).")


# -- images --------------------------------------------------------------------------------------------------


def image_table(images: Sequence[Mapping[str, Any]]):
    table = new_table("NODE", "IMAGE", "SIZE", "FILE", "FORMAT", "BOOT", "FIRMWARE", right=("SIZE", "FILE"))
    for image in images:
        node = plain(image.get("node"))
        if image.get("node_status") == "offline" or image.get("vm_capable") is False:
            why = "offline" if image.get("node_status") == "offline" else "no VMs"
            node.append(f" ({why})", style="dim")
        table.add_row(
            node,
            plain(image.get("name")),
            plain(fmt_size(image.get("virtual_size_bytes"))),
            plain(fmt_size(image.get("file_size_bytes"))),
            plain(image.get("format") or DASH),
            plain("direct" if image.get("direct_boot") else "disk"),
            plain(image.get("firmware") or DASH),
        )
    if not images:
        table.add_row(plain("(no VM images)"), *[plain("")] * 6)
    return table


@vm.command("images")
@_node_option
@json_option
@pass_cli
def images_cmd(obj: CliContext, node: str | None) -> None:
    """List the VM base images of the nodes (BOOT: 'direct' = a kernel beside it, else its boot loader)."""
    answer = obj.client().get("/api/vm/images", params=_node_params(node))
    if obj.json_output:
        print_json(answer)
        return
    print_renderable(image_table(items_of(answer, "images")))


# -- instances -----------------------------------------------------------------------------------------------


def instance_table(instances: Sequence[Mapping[str, Any]]):
    table = new_table(
        "NODE", "TASK", "STATUS", "RUNNING", "PID", "TAP", "DISK", "ORPHAN", right=("PID", "DISK")
    )
    for item in instances:
        orphan = item.get("orphan")
        table.add_row(
            plain(item.get("node")),
            plain(item.get("task_id")),
            status_text(item.get("status")),
            plain(fmt_bool(item.get("running"))),
            plain(item.get("pid") if item.get("pid") is not None else DASH),
            plain(item.get("tap") or DASH),
            plain(fmt_size(item.get("disk_bytes"))),
            plain(fmt_bool(orphan), style="bold yellow" if orphan else ""),
        )
    if not instances:
        table.add_row(plain("(no VM instances)"), *[plain("")] * 7)
    return table


@vm.group("instances", cls=KrGroup, invoke_without_command=True)
@_node_option
@json_option
@pass_cli
@click.pass_context
def instances(ctx: click.Context, obj: CliContext, node: str | None) -> None:
    """List the VM instances on the nodes (operators); `remove NODE TASK_ID` deletes one (admins).

    ORPHAN: the host has no VM VPS with that id on that node (its files are left over)."""
    if ctx.invoked_subcommand is not None:
        return
    answer = obj.client().get("/api/vm/instances", params=_node_params(node))
    if obj.json_output:
        print_json(answer)
        return
    print_renderable(instance_table(items_of(answer, "instances")))
    for failed in items_of(answer, "unreachable"):
        if isinstance(failed, Mapping):
            why = clean(failed.get("message"), 200)
            info(f"warning: node {clean(failed.get('node'))} did not answer: {why}")


@instances.command("remove")
@click.argument("node", metavar="NODE")
@click.argument("task_id", callback=task_id_callback, metavar="TASK_ID")
@json_option
@pass_cli
def remove(obj: CliContext, node: str, task_id: str) -> None:
    """Delete a VM instance's files on NODE (admins; refused while its VPS is running or paused)."""
    _node_params(node, "NODE")
    answer = obj.client().delete(f"/api/vm/instances/{node}/{task_id}")
    if obj.json_output:
        print_json(answer)
        return
    info(f"VM instance {task_id} removed from {clean(node)}")


__all__ = ["vm"]
