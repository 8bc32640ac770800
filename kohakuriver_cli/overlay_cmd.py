"""``kr overlay``: the VXLAN overlay network that gives containers and VMs on different nodes addresses they
reach each other by.

- ``kr overlay status``: the host's view (mode, plan, its own overlay address; per runner its id, subnet,
  the host's link to it, underlay address, whether it is online with its link in place, last heartbeat),
  the reservations the caller may see (operators: all), and the overlay address of each active task the
  caller may see;
- ``kr overlay reserve -n NODE [--ip A] [--ttl S]``: reserve an address on NODE; the token alone goes to
  stdout (``TOKEN=$(kr overlay reserve -n n1)``), then ``kr task submit --ip-token "$TOKEN" ...`` or
  ``kr vps create --ip-token ...`` gives the task that address;
- ``kr overlay release TOKEN|IP``: give a reservation back before it expires (by address: its owner or an
  operator). One in use is released when its task ends.
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
    fmt_age,
    fmt_bool,
    fmt_time,
    info,
    items_of,
    kv_panel,
    new_table,
    plain,
    print_json,
    print_renderable,
    status_text,
)

#: Statuses whose tasks hold an overlay address (``kohakuriver_proto.lifecycle.ACTIVE``).
ACTIVE_STATUSES = ("pending", "assigning", "running", "paused")
MIN_TTL, MAX_TTL = 60, 1800  # ``models.overlay.MIN/MAX_RESERVATION_TTL`` (the host checks them too)
TASKS_SHOWN = 1000


@click.group("overlay", cls=KrGroup)
def overlay() -> None:
    """The overlay network: status, reserve and release addresses."""


# -- status --------------------------------------------------------------------------------------------------


def runner_table(runners: Sequence[Mapping[str, Any]]):
    table = new_table("ID", "NODE", "SUBNET", "LINK", "UNDERLAY", "ACTIVE", "LAST SEEN", right=("ID",))
    for runner in runners:
        active = runner.get("active")
        table.add_row(
            plain(runner.get("runner_id")),
            plain(runner.get("hostname")),
            plain(runner.get("subnet")),
            plain(runner.get("link")),
            plain(runner.get("underlay_address")),
            plain(fmt_bool(active), style="" if active else "bold yellow"),
            plain(fmt_age(runner.get("last_seen")) if runner.get("last_seen") else DASH),
        )
    if not runners:
        table.add_row(plain("(no runners on the overlay yet)"), *[plain("")] * 6)
    return table


def reservation_table(reservations: Sequence[Mapping[str, Any]]):
    table = new_table("IP", "NODE", "EXPIRES", "USED BY")
    for item in reservations:
        used_by = item.get("used_by")
        table.add_row(
            plain(item.get("ip")),
            plain(item.get("node")),
            plain("when the task ends" if used_by else fmt_time(item.get("expires_at"))),
            plain(used_by if used_by else DASH),
        )
    return table


def address_table(tasks: Sequence[Mapping[str, Any]]):
    table = new_table("TASK", "TYPE", "NAME", "NODE", "STATUS", "OVERLAY IP")
    for task in tasks:
        table.add_row(
            plain(task.get("task_id")),
            plain(task.get("task_type")),
            plain(task.get("name"), 30),
            plain(task.get("assigned_node")),
            status_text(task.get("status")),
            plain(task.get("overlay_ip")),
        )
    return table


def overlay_rows(view: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("Mode", clean(view.get("mode"))),
        ("Subnet", clean(view.get("subnet"))),
        ("Host address", clean(view.get("host_overlay_address"))),
    ]


@overlay.command("status")
@json_option
@pass_cli
def status_cmd(obj: CliContext) -> None:
    """Show the overlay: runners and their subnets, reservations, the addresses of active tasks."""
    client = obj.client()
    view = client.get("/api/overlay")
    if obj.json_output:
        print_json(view)
        return
    if not isinstance(view, Mapping) or not view.get("enabled"):
        info("the overlay network is off on this host (OVERLAY_ENABLED)")
        return
    print_renderable(kv_panel("overlay network", overlay_rows(view)))
    print_renderable(runner_table(items_of(view, "runners")))
    reservations = items_of(view, "reservations")
    if reservations:
        print_renderable(reservation_table(reservations))
    params = {"status": ",".join(ACTIVE_STATUSES), "limit": str(TASKS_SHOWN)}
    tasks = [t for t in items_of(client.get("/api/tasks", params=params), "tasks") if t.get("overlay_ip")]
    if tasks:
        print_renderable(address_table(tasks))


# -- reserve / release ---------------------------------------------------------------------------------------


def _check_node(node: str) -> None:
    try:
        check_hostname(node, "node")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="'-n' / '--node'") from None


def _check_ip(ip: str | None) -> None:
    if ip is None:
        return
    from kohakuriver_proto.models.overlay import check_ipv4

    try:
        check_ipv4(ip, "ip")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="'--ip'") from None


@overlay.command("reserve")
@click.option("-n", "--node", required=True, metavar="NODE", help="The node whose address to reserve.")
@click.option("--ip", metavar="ADDRESS", help="This address (default: a free one of the node's subnet).")
@click.option(
    "--ttl", type=click.IntRange(MIN_TTL, MAX_TTL), default=300, show_default=True, metavar="SECONDS",
    help="How long it is held for a task to use it.",
)  # fmt: skip
@json_option
@pass_cli
def reserve(obj: CliContext, node: str, ip: str | None, ttl: int) -> None:
    """Reserve an overlay address on NODE. Prints the token alone on stdout: pass it as --ip-token to
    `kr task submit` or `kr vps create` (on that node) before the TTL runs out; the task keeps the address
    until it ends."""
    _check_node(node)
    _check_ip(ip)
    body: dict[str, Any] = {"node": node, "ttl_seconds": ttl}
    if ip is not None:
        body["ip"] = ip
    answer = obj.client().post("/api/overlay/reserve", json=body)
    if obj.json_output:
        print_json(answer)
        return
    if not isinstance(answer, Mapping) or not isinstance(answer.get("token"), str):
        from .client import CliError

        raise CliError("the host answered the reservation without a token")
    click.echo(answer["token"])
    until = fmt_time(answer.get("expires_at"))
    info(f"reserved {clean(answer.get('ip'))} on {clean(answer.get('node'))} until {until}")


@overlay.command("release")
@click.argument("what", metavar="TOKEN|IP")
@json_option
@pass_cli
def release(obj: CliContext, what: str) -> None:
    """Release a reservation, named by its token or its address (refused while a task uses it: it is
    released when that task ends)."""
    if not what or "/" in what or len(what) > 1024:
        raise click.BadParameter("give a reservation token or an IPv4 address", param_hint="'TOKEN|IP'")
    answer = obj.client().delete(f"/api/overlay/reservations/{what}")
    if obj.json_output:
        print_json(answer)
        return
    message = answer.get("message") if isinstance(answer, Mapping) else None
    info(clean(message) if message else f"released {clean(what, 40)}")


__all__ = ["overlay"]
