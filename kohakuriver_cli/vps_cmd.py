"""``kr vps``: create long-lived machines (VPS), list and show them, stop/restart/pause/resume, snapshots,
and ``connect`` (the same as ``kr ssh ID``).

Two backends: ``docker`` (a container; ``--image``/``--container``, ``--privileged``, ``--mount``) and
``qemu`` (a VM booted from a base image of the node: ``--vm-image NAME``, ``--disk SIZE``, ``-m`` as the
VM's memory). An option of the other backend is a usage error naming it, before anything is sent.

SSH key modes of ``kr vps create`` (the seed's, exactly):

- default: upload the user's own public key (``~/.ssh/id_ed25519.pub``, ``id_ecdsa.pub``, ``id_rsa.pub``);
  with none of them the command refuses and names the alternatives;
- ``--gen-ssh-key``: a fresh Ed25519 pair made here; only the public key leaves this machine (mode
  ``generate``); once the host accepted the VPS the private key is written 0600 to
  ``~/.ssh/kohakuriver_<id>`` (or ``--key-out-file``), where ``kr ssh`` finds it;
- ``--public-key-file PATH`` / ``--public-key-string KEY``: that key (mode ``upload``);
- ``--no-ssh-key``: sshd runs, no key is injected (mode ``none``: the image's own accounts decide; never a
  passwordless root login);
- ``--no-ssh``: no sshd at all (mode ``disabled``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import click

from kohakuriver_proto import converter
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskStatus
from kohakuriver_proto.models import SshKeyMode, VpsBackend, VpsSpec, check_ssh_public_key

from .client import CliError, HostClient
from .context import CliContext, KrGroup, json_option, pass_cli
from .output import (
    DASH,
    clean,
    fmt_age,
    fmt_duration,
    fmt_size,
    info,
    items_of,
    new_table,
    plain,
    print_json,
    print_renderable,
    status_text,
    stderr_console,
)
from .task_cmd import (
    EXIT_INTERRUPTED,
    FINAL_STATUSES,
    _control,
    check_mounts,
    check_targets,
    parse_gpus,
    parse_memory,
    show_record,
    spec_error,
    task_id_callback,
    task_rows,
    wait_for_tasks,
)

#: Stop (a snapshot first) and snapshot calls wait for ``docker commit`` on the node: the host allows its
#: runner minutes, so the CLI must wait at least as long.
SLOW_CALL_TIMEOUT = 330.0
#: ``--wait`` ends when the VPS runs (or ended: then with exit code 1).
READY = frozenset({TaskStatus.RUNNING.value, TaskStatus.PAUSED.value})
EXIT_VPS_ENDED = 1

_FIELD_OPTIONS = {
    "target": "'-t' / '--target'",
    "required_cores": "'-c' / '--cores'",
    "required_memory_bytes": "'-m' / '--memory'",
    "required_gpus": "'--gpus'",
    "registry_image": "'--image'",
    "container_name": "'--container'",
    "additional_mounts": "'--mount'",
    "name": "'--name'",
    "ssh_public_key": "'--public-key-string' / '--public-key-file'",
    "vps_backend": "'--backend'",
    "vm_image": "'--vm-image'",
    "vm_disk_size": "'--disk'",
    "memory_mb": "'-m' / '--memory'",
    "ip_token": "'--ip-token'",
}
MIB = 1 << 20
#: The smallest VM the models accept (``VpsSpec.memory_mb``).
MIN_VM_MEMORY_MB = 64
_KEY_OPTIONS = "--gen-ssh-key, --public-key-file, --public-key-string, --no-ssh-key"


@click.group("vps", cls=KrGroup)
def vps() -> None:
    """Long-lived machines (VPS): create, list, status, stop, restart, snapshots, connect."""


# -- SSH key modes -------------------------------------------------------------------------------------------


@attrs.frozen
class KeyChoice:
    """What ``kr vps create`` sends: a mode and its public key; ``private_key`` only for ``generate`` (it
    never leaves this machine); ``source`` says where the public key came from, for the message."""

    mode: SshKeyMode
    public_key: str | None = None
    private_key: bytes | None = attrs.field(default=None, repr=False)
    source: str | None = None


def choose_key(
    *,
    ssh: bool = True,
    gen_key: bool = False,
    public_key_file: str | None = None,
    public_key_string: str | None = None,
    no_key: bool = False,
    key_out_file: str | None = None,
    find_default: Callable[[], tuple[Path, str] | None] | None = None,
    generate: Callable[[], tuple[bytes, str]] | None = None,
) -> KeyChoice:
    """The key mode the options ask for; ``click.UsageError``/``BadParameter`` when they contradict."""
    from . import ssh_keys  # only ``create`` needs the crypto imports

    chosen = [
        name
        for name, on in (
            ("--gen-ssh-key", gen_key),
            ("--public-key-file", public_key_file is not None),
            ("--public-key-string", public_key_string is not None),
            ("--no-ssh-key", no_key),
        )
        if on
    ]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one of {_KEY_OPTIONS}, not {' and '.join(chosen)}")
    if key_out_file is not None and not gen_key:
        raise click.UsageError(
            "--key-out-file is where --gen-ssh-key saves the private key: use them together"
        )
    if not ssh:
        if chosen:
            raise click.UsageError(f"--no-ssh starts no SSH server: {chosen[0]} makes no sense with it")
        return KeyChoice(SshKeyMode.DISABLED)
    if no_key:
        return KeyChoice(SshKeyMode.NONE)
    if gen_key:
        private, public = (generate or ssh_keys.generate_ed25519)()
        return KeyChoice(SshKeyMode.GENERATE, public, private, "generated")
    if public_key_file is not None:
        try:
            key = ssh_keys.read_public_key(public_key_file)
        except ssh_keys.SshKeyError as exc:
            raise click.BadParameter(str(exc), param_hint="'--public-key-file'") from None
        return KeyChoice(SshKeyMode.UPLOAD, key, source=str(Path(public_key_file).expanduser()))
    if public_key_string is not None:
        key = public_key_string.strip()
        try:
            check_ssh_public_key(key, "--public-key-string")
        except ValidationError as exc:
            raise click.BadParameter(exc.message, param_hint="'--public-key-string'") from None
        return KeyChoice(SshKeyMode.UPLOAD, key, source="--public-key-string")
    try:
        found = (find_default or ssh_keys.default_public_key)()
    except ssh_keys.SshKeyError as exc:
        raise click.UsageError(f"{exc}; or choose a key with one of {_KEY_OPTIONS}") from None
    if found is None:
        names = ", ".join(ssh_keys.DEFAULT_PUBLIC_KEY_NAMES)
        raise click.UsageError(
            f"no SSH public key found in ~/.ssh ({names}): use --gen-ssh-key to make a key pair for this "
            "VPS, --public-key-file PATH, or --no-ssh-key (no key; the image's own logins)"
        )
    path, key = found
    return KeyChoice(SshKeyMode.UPLOAD, key, source=str(path))


# -- the create request --------------------------------------------------------------------------------------


def vm_memory_mb(text: str | None) -> int | None:
    """``-m 4G`` of a VM -> MiB (``kohakuriver_proto.units``; rounded down to whole MiB); None = the node's
    default. A VM cannot run without memory, so ``0`` is refused rather than meaning "no limit"."""
    if text is None:
        return None
    from kohakuriver_proto.units import parse_size

    try:
        size = parse_size(text, "--memory")
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="'-m' / '--memory'") from None
    if size // MIB < MIN_VM_MEMORY_MB:
        raise click.BadParameter(
            f"a VM needs at least {MIN_VM_MEMORY_MB} MiB, got {clean(text, 40)!r} "
            "(leave -m out for the node's default)",
            param_hint="'-m' / '--memory'",
        )
    return size // MIB


def _backend_options(
    qemu: bool, *, image: str | None, container: str | None, privileged: bool, mounts: Sequence[str],
    vm_image: str | None, disk: str | None,
) -> None:  # fmt: skip
    """A usage error for the first option of the other backend (and for a VM without an image)."""
    if qemu:
        docker_only = {
            "--image": image is not None,
            "--container": container is not None,
            "--privileged": privileged,
            "--mount": bool(mounts),
        }
        used = [name for name, on in docker_only.items() if on]
        if used:
            raise click.UsageError(
                f"{used[0]} is for a Docker VPS; a VM (--backend qemu) boots a base image: --vm-image NAME"
            )
        if vm_image is None:
            raise click.UsageError("--backend qemu needs --vm-image NAME (`kr vm images` lists them)")
        return
    vm_only = {"--vm-image": vm_image is not None, "--disk": disk is not None}
    used = [name for name, on in vm_only.items() if on]
    if used:
        raise click.UsageError(f"{used[0]} is for a VM: add --backend qemu")


def build_vps_spec(
    *,
    target: str | None = None,
    cores: int = 1,
    memory: str | None = None,
    gpus: str | None = None,
    image: str | None = None,
    container: str | None = None,
    name: str | None = None,
    privileged: bool = False,
    mounts: Sequence[str] = (),
    key: KeyChoice = KeyChoice(SshKeyMode.DISABLED),
    backend: str = "docker",
    vm_image: str | None = None,
    disk: str | None = None,
    ip_token: str | None = None,
) -> VpsSpec:
    """The ``VpsSpec`` of ``kr vps create``; ``click.BadParameter`` naming the option if invalid, and
    ``click.UsageError`` for an option of the other backend.

    ``VpsSpec`` carries a key only in mode ``upload``; a generated key is validated that way and sent with
    mode ``generate`` by ``create_body``. For a VM, ``memory`` is its memory (``memory_mb``).
    """
    qemu = backend == "qemu"
    _backend_options(
        qemu,
        image=image,
        container=container,
        privileged=privileged,
        mounts=mounts,
        vm_image=vm_image,
        disk=disk,
    )
    check_targets([] if target is None else [target.strip()])
    check_mounts(mounts)
    mode = SshKeyMode.UPLOAD if key.mode is SshKeyMode.GENERATE else key.mode
    resources: dict[str, Any]
    if qemu:
        resources = {"memory_mb": vm_memory_mb(memory), "vm_image": vm_image, "vm_disk_size": disk}
    else:
        resources = {"required_memory_bytes": parse_memory(memory)}
    try:
        return VpsSpec(
            name=name,
            required_cores=cores,
            required_gpus=parse_gpus(gpus),
            target=None if target is None else target.strip(),
            registry_image=image,
            container_name=container,
            privileged=privileged,
            additional_mounts=list(mounts),
            ssh_key_mode=mode,
            ssh_public_key=key.public_key,
            vps_backend=VpsBackend.QEMU if qemu else VpsBackend.DOCKER,
            ip_token=ip_token,
            **resources,
        )
    except ValidationError as exc:
        raise spec_error(exc, _FIELD_OPTIONS) from None


def create_body(spec: VpsSpec, key: KeyChoice) -> dict[str, Any]:
    """The JSON of ``POST /api/vps/create``."""
    body = converter.unstructure(spec)
    body["ssh_key_mode"] = key.mode.value
    return body


def check_key_destination(path: Path) -> None:
    """Refuse before the VPS exists if the private key could not be saved afterwards."""
    if path.exists():
        raise click.BadParameter(
            f"{path} already exists: not overwriting a key", param_hint="'--key-out-file'"
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise click.BadParameter(f"{path.parent} is not a directory", param_hint="'--key-out-file'")


def connect_hint(task_id: str, key_path: Path | None) -> str:
    hint = f"connect: kr vps connect {task_id}  (same as: kr ssh {task_id})"
    if key_path is not None and key_path.name != f"kohakuriver_{task_id}":
        hint += f"\n         kr ssh {task_id} --key {key_path}"
    return hint


def wait_until_ready(client: HostClient, task_id: str) -> dict[str, Any]:
    """Wait until the VPS runs (or ended); its record. The host's long poll tells the moment it changes."""
    (record,) = wait_for_tasks(
        client, [task_id], until=lambda r: r.get("status") in READY or r.get("status") in FINAL_STATUSES
    )
    return record


# -- create --------------------------------------------------------------------------------------------------


@vps.command("create")
@click.option(
    "--backend",
    type=click.Choice(["docker", "qemu"]),
    default="docker",
    show_default=True,
    help="A container (docker) or a virtual machine (qemu).",
)
@click.option("-t", "--target", metavar="NODE[:NUMA][::GPUS]", help="Where: a node, NUMA node, GPU ids.")
@click.option("-c", "--cores", type=click.IntRange(0, 65536), default=1, show_default=True, help="CPU cores.")
@click.option(
    "-m",
    "--memory",
    metavar="SIZE",
    help="Memory limit: 512M, 4G (x1024), 4GB (x1000); 0 = none. A VM's memory (default: the node's).",
)
@click.option("--gpus", metavar="IDS", help="GPU ids on the target node, e.g. 0,1 (needs -t).")
@click.option("--image", metavar="IMAGE", help="Image: a registry image (pulled) or one the node has.")
@click.option("--container", metavar="ENV", help="KohakuRiver environment (container tarball).")
@click.option("--vm-image", metavar="NAME", help="VM base image on the node (qemu; `kr vm images`).")
@click.option("--disk", metavar="SIZE", help="VM disk size, e.g. 50G (qemu; default: the node's).")
@click.option("--name", help="A name to recognise the VPS by.")
@click.option("--ssh/--no-ssh", "ssh", default=True, show_default=True, help="Run an SSH server in it.")
@click.option("--gen-ssh-key", "gen_key", is_flag=True, help="Generate an Ed25519 key pair for it here.")
@click.option("--key-out-file", metavar="PATH", help="Where --gen-ssh-key saves the private key.")
@click.option("--public-key-file", metavar="PATH", help="Inject this public key.")
@click.option("--public-key-string", metavar="KEY", help="Inject this public key ('ssh-ed25519 AAAA...').")
@click.option("--no-ssh-key", "no_key", is_flag=True, help="Inject no key (the image's own logins).")
@click.option("--privileged", is_flag=True, help="Run the container privileged (operators).")
@click.option(
    "--mount", "mounts", multiple=True, metavar="SRC:DST[:ro]", help="Extra bind mount (operators)."
)
@click.option(
    "--ip-token", metavar="TOKEN",
    help="Give it the overlay address `kr overlay reserve` reserved (it runs on that node).",
)  # fmt: skip
@click.option("-w", "--wait", is_flag=True, help="Wait until it runs (exit 1 if it ends instead).")
@json_option
@pass_cli
@click.pass_context
def create(
    ctx: click.Context,
    obj: CliContext,
    backend: str,
    target: str | None,
    cores: int,
    memory: str | None,
    gpus: str | None,
    image: str | None,
    container: str | None,
    vm_image: str | None,
    disk: str | None,
    name: str | None,
    ssh: bool,
    gen_key: bool,
    key_out_file: str | None,
    public_key_file: str | None,
    public_key_string: str | None,
    no_key: bool,
    privileged: bool,
    mounts: tuple[str, ...],
    ip_token: str | None,
    wait: bool,
) -> None:
    """Create a VPS. Prints its id on stdout, so `ID=$(kr vps create ...)` works.

    A container by default; `--backend qemu --vm-image NAME [--disk 50G] [-c CORES] [-m 4G]` makes a VM.
    By default your ~/.ssh/id_*.pub key is injected; see --gen-ssh-key, --public-key-file,
    --public-key-string, --no-ssh-key and --no-ssh for the other key modes.
    """
    # Options of the other backend are refused before a key pair is made or a file is looked at.
    _backend_options(
        backend == "qemu",
        image=image,
        container=container,
        privileged=privileged,
        mounts=mounts,
        vm_image=vm_image,
        disk=disk,
    )
    key = choose_key(
        ssh=ssh,
        gen_key=gen_key,
        public_key_file=public_key_file,
        public_key_string=public_key_string,
        no_key=no_key,
        key_out_file=key_out_file,
    )
    out_path = Path(key_out_file).expanduser() if key_out_file else None
    if out_path is not None:
        check_key_destination(out_path)
    spec = build_vps_spec(
        target=target,
        cores=cores,
        memory=memory,
        gpus=gpus,
        image=image,
        container=container,
        name=name,
        privileged=privileged,
        mounts=mounts,
        key=key,
        backend=backend,
        vm_image=vm_image,
        disk=disk,
        ip_token=ip_token,
    )
    client = obj.client()
    answer = client.post("/api/vps/create", json=create_body(spec, key))
    task_id = str(answer.get("task_id") or "") if isinstance(answer, dict) else ""
    if not task_id.isdigit():
        raise CliError("the host accepted the VPS but returned no task id")
    saved = save_generated_key(key, task_id, out_path)
    if obj.json_output:
        print_json(answer)
    else:
        click.echo(task_id)
        if isinstance(answer.get("message"), str):
            info(clean(answer["message"], 300))
    sys.stdout.flush()
    if key.mode is SshKeyMode.UPLOAD:
        info(f"ssh key: {clean(key.source)}")
    elif key.mode is SshKeyMode.NONE:
        info("ssh key: none injected (the image's own accounts decide who logs in)")
    if saved is not None:
        info(f"private key saved to {saved} (mode 0600); the host never saw it")
    if key.mode is not SshKeyMode.DISABLED:
        info(connect_hint(task_id, saved))
    if wait:
        try:
            record = _wait(client, task_id)
        except KeyboardInterrupt:
            info("stopped waiting; the VPS is still being created (`kr vps status ID`)")
            ctx.exit(EXIT_INTERRUPTED)
        if record.get("status") not in READY:
            error = record.get("error_message") or record.get("status_message") or ""
            info(f"VPS {task_id} {clean(record.get('status'))}" + (f": {clean(error, 300)}" if error else ""))
            ctx.exit(EXIT_VPS_ENDED)
        port, address = record.get("ssh_port"), record.get("vm_ip")
        overlay_ip = record.get("overlay_ip")
        info(
            f"VPS {task_id} is running on {clean(record.get('assigned_node'))}"
            + (f", ssh port {port}" if port else "")
            + (f", VM address {clean(address)}" if address else "")
            + (f", overlay address {clean(overlay_ip)}" if overlay_ip else "")
        )


def save_generated_key(key: KeyChoice, task_id: str, out_path: Path | None) -> Path | None:
    """Write a generated private key 0600 (``~/.ssh/kohakuriver_<id>`` unless ``--key-out-file``)."""
    if key.private_key is None:
        return None
    from . import ssh_keys

    path = out_path or ssh_keys.default_private_key_path(task_id)
    try:
        return ssh_keys.write_private_key(path, key.private_key)
    except ssh_keys.SshKeyError as exc:
        raise CliError(
            f"VPS {task_id} was created, but its private key could not be saved: {exc}. "
            f"Nobody holds that key: `kr task kill {task_id}` and create it again"
        ) from None


def _wait(client: HostClient, task_id: str) -> dict[str, Any]:
    console = stderr_console()
    if console.is_terminal:
        with console.status(f"waiting for VPS {task_id} to start"):
            return wait_until_ready(client, task_id)
    return wait_until_ready(client, task_id)


# -- list / status -------------------------------------------------------------------------------------------

_STATUS_CHOICE = click.Choice([s.value for s in TaskStatus], case_sensitive=False)


def vps_table(records: Sequence[Mapping[str, Any]]):
    table = new_table(
        "ID", "NAME", "STATUS", "NODE", "SSH PORT", "SSH KEY", "CORES", "MEM", "CREATED", right=("CORES",)
    )
    for record in records:
        table.add_row(
            plain(record.get("task_id")),
            plain(record.get("name") or DASH, 30),
            status_text(record.get("status")),
            plain(record.get("assigned_node") or DASH),
            plain(record.get("ssh_port") or DASH),
            plain(record.get("ssh_key_mode") or DASH),
            plain(record.get("required_cores", DASH)),
            plain(fmt_size(record.get("required_memory_bytes"))),
            plain(fmt_age(record.get("submitted_at"))),
        )
    if not records:
        table.add_row(plain("(no VPS)"), *[plain("")] * 8)
    return table


@vps.command("list")
@click.option("-s", "--status", "statuses", multiple=True, type=_STATUS_CHOICE, metavar="STATUS",
              help="Only this status (repeatable).")  # fmt: skip
@click.option("-a", "--all-users", is_flag=True, help="Every user's VPS (operators and admins).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids.")
@json_option
@pass_cli
def list_cmd(obj: CliContext, statuses: tuple[str, ...], all_users: bool, quiet: bool) -> None:
    """List your VPS, newest first."""
    params: dict[str, str] = {"limit": "1000"}
    if statuses:
        params["status"] = ",".join(dict.fromkeys(s.lower() for s in statuses))
    if all_users:
        params["all"] = "1"
    answer = obj.client().get("/api/vps", params=params)
    records = items_of(answer, "vps")
    if obj.json_output:
        print_json(answer)
    elif quiet:
        for record in records:
            click.echo(clean(record.get("task_id")))
    else:
        print_renderable(vps_table(records))


#: rich styles of the guest agent's states.
AGENT_STYLES = {"healthy": "green", "waiting": "yellow", "unhealthy": "bold red"}


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None


def _used(total: Any, free: Any) -> str | None:
    """``1.2 GiB / 4 GiB used`` from a total and what is free (None when either is unknown)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (total, free)):
        return None
    return f"{fmt_size(max(total - free, 0))} / {fmt_size(total)} used"


def agent_text(health: Any) -> Any:
    """The guest agent of a VM: its state, heartbeat age, load, memory and disk, its message."""
    from rich.text import Text

    if not isinstance(health, Mapping) or not health.get("agent"):
        return Text("no report yet", style="dim")
    state = clean(health.get("agent"))
    text = Text(state, style=AGENT_STYLES.get(state, ""))
    parts = []
    if health.get("last_heartbeat_at"):
        parts.append(f"last heartbeat {fmt_age(health['last_heartbeat_at'])}")
    if _number(health.get("load1")) is not None:
        parts.append(f"load {health['load1']:.2f}")
    memory = _used(health.get("memory_total_bytes"), health.get("memory_available_bytes"))
    if memory:
        parts.append(f"memory {memory}")
    disk = _used(health.get("disk_total_bytes"), health.get("disk_free_bytes"))
    if disk:
        parts.append(f"disk {disk}")
    if _number(health.get("uptime_seconds")) is not None:
        parts.append(f"up {fmt_duration(health['uptime_seconds'])}")
    if health.get("message"):
        parts.append(clean(health["message"], 200))
    if parts:
        text.append("  " + ", ".join(parts))
    return text


def vm_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The rows only a VM VPS has: image, disk, address, guest agent."""
    disk = record.get("vm_disk_size")
    rows: list[tuple[str, Any]] = [
        ("VM image", clean(record.get("vm_image"))),
        ("Disk", clean(disk) if disk else "the node's default"),
        ("IP", clean(record.get("vm_ip"))),
    ]
    if record.get("status") in READY or record.get("vm_health"):
        rows.append(("Agent", agent_text(record.get("vm_health"))))
    return rows


def vps_rows(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``kr task status`` rows plus the VPS's own (SSH, backend, a VM's image, disk, address and agent),
    without the empty Command row."""
    rows = [(k, v) for k, v in task_rows(record) if k != "Command"]
    ssh = clean(record.get("ssh_key_mode"))
    if record.get("ssh_key_mode") == SshKeyMode.DISABLED.value:
        ssh = "disabled (no SSH server)"
    backend = record.get("vps_backend")
    extra = [("Backend", clean(backend))]
    if backend == VpsBackend.QEMU.value:
        rows = [(k, v) for k, v in rows if k != "Image"]  # a VM has no container image: its own row says
        extra += vm_rows(record)
    extra.append(("SSH key mode", ssh))
    if record.get("ssh_port") and record.get("status") in READY:
        task_id = clean(record.get("task_id"))
        extra.append(("Connect", f"kr vps connect {task_id}  (kr ssh {task_id})"))
    at = next((i for i, (k, _) in enumerate(rows) if k == "Type"), 0) + 1
    return rows[:at] + extra + rows[at:]


@vps.command("status")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@json_option
@pass_cli
def status_cmd(obj: CliContext, task_id: str) -> None:
    """Show one VPS."""
    show_record(obj, f"/api/vps/{task_id}", "VPS", task_id, vps_rows)


# -- control -------------------------------------------------------------------------------------------------


def _ids_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("task_ids", nargs=-1, required=True, callback=task_id_callback, metavar="ID...")(f)


@vps.command("stop")
@_ids_argument
@json_option
@pass_cli
def stop(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Stop VPS (the node snapshots them first when it is configured to); `restart` brings one back."""
    obj.timeout = max(obj.timeout, SLOW_CALL_TIMEOUT)
    _control(obj, task_ids, "/api/vps/{id}/stop", "stopped")


@vps.command("restart")
@_ids_argument
@json_option
@pass_cli
def restart(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Restart VPS: a running one restarts in place; a stopped one is re-created on its node (newest
    snapshot, same SSH key)."""
    obj.timeout = max(obj.timeout, SLOW_CALL_TIMEOUT)
    _control(obj, task_ids, "/api/vps/{id}/restart", "restarting")


@vps.command("pause")
@_ids_argument
@json_option
@pass_cli
def pause(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Pause running VPS (processes frozen, resources kept)."""
    _control(obj, task_ids, "/api/vps/{id}/pause", "paused")


@vps.command("resume")
@_ids_argument
@json_option
@pass_cli
def resume(obj: CliContext, task_ids: tuple[str, ...]) -> None:
    """Resume paused VPS."""
    _control(obj, task_ids, "/api/vps/{id}/resume", "resumed")


# -- snapshots -----------------------------------------------------------------------------------------------


@vps.group("snapshot", cls=KrGroup)
def snapshot() -> None:
    """Snapshots of a VPS (kept on its node): create, list, delete, restore."""


def _timestamp_callback(_ctx: click.Context, _param: click.Parameter, timestamp: str) -> str:
    """A snapshot's TIMESTAMP argument: the digits after ':' in its tag."""
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise click.BadParameter(
            f"not a snapshot timestamp: {clean(timestamp, 40)!r}", param_hint="TIMESTAMP"
        )
    return timestamp


def snapshot_table(snapshots: Sequence[Mapping[str, Any]]):
    table = new_table("TIMESTAMP", "TAG", "CREATED", "SIZE", right=("SIZE",))
    for snap in snapshots:
        tag = str(snap.get("tag") or "")
        table.add_row(
            plain(tag.rpartition(":")[2] or DASH),
            plain(tag or DASH),
            plain(fmt_age(snap.get("created_at"))),
            plain(fmt_size(snap.get("size_bytes"))),
        )
    if not snapshots:
        table.add_row(plain("(no snapshots)"), plain(""), plain(""), plain(""))
    return table


@snapshot.command("list")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@json_option
@pass_cli
def snapshot_list(obj: CliContext, task_id: str) -> None:
    """List a VPS's snapshots, newest first."""
    answer = obj.client().get(f"/api/vps/{task_id}/snapshots")
    if obj.json_output:
        print_json(answer)
    else:
        print_renderable(snapshot_table(items_of(answer, "snapshots")))


@snapshot.command("create")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@json_option
@pass_cli
def snapshot_create(obj: CliContext, task_id: str) -> None:
    """Snapshot a running VPS now (it is paused for the moment of the commit)."""
    obj.timeout = max(obj.timeout, SLOW_CALL_TIMEOUT)
    answer = obj.client().post(f"/api/vps/{task_id}/snapshots")
    if obj.json_output:
        print_json(answer)
        return
    tag = answer.get("tag") if isinstance(answer, dict) else None
    click.echo(clean(tag))


@snapshot.command("delete")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@click.argument("timestamp", metavar="TIMESTAMP", callback=_timestamp_callback)
@json_option
@pass_cli
def snapshot_delete(obj: CliContext, task_id: str, timestamp: str) -> None:
    """Delete one snapshot (TIMESTAMP: the number after ':' in its tag, see `snapshot list`)."""
    obj.timeout = max(obj.timeout, SLOW_CALL_TIMEOUT)
    answer = obj.client().delete(f"/api/vps/{task_id}/snapshots/{timestamp}")
    if obj.json_output:
        print_json(answer)
    else:
        info(f"snapshot {timestamp} of VPS {task_id} deleted")


@snapshot.command("restore")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@click.argument("timestamp", metavar="TIMESTAMP", callback=_timestamp_callback)
@json_option
@pass_cli
def snapshot_restore(obj: CliContext, task_id: str, timestamp: str) -> None:
    """Put a VPS back to a snapshot (TIMESTAMP: see `snapshot list`); what changed since is lost."""
    obj.timeout = max(obj.timeout, SLOW_CALL_TIMEOUT)
    answer = obj.client().post(f"/api/vps/{task_id}/snapshots/{timestamp}/restore")
    if obj.json_output:
        print_json(answer)
        return
    message = answer.get("message") if isinstance(answer, dict) else None
    info(clean(message, 300) if message else f"VPS {task_id} restored to snapshot {timestamp}")


# -- connect -------------------------------------------------------------------------------------------------


@vps.command("connect")
@click.argument("task_id", callback=task_id_callback, metavar="ID")
@click.option(
    "-i", "--key", metavar="PATH", help="Private key (default: ~/.ssh/kohakuriver_<id>, then ssh's)."
)
@click.option("-u", "--user", default="root", show_default=True, help="Remote user.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")
@pass_cli
@click.pass_context
def connect(
    ctx: click.Context, obj: CliContext, task_id: str, key: str | None, user: str, command: tuple[str, ...]
) -> None:
    """SSH into a VPS through the host's SSH proxy (the same as `kr ssh ID`)."""
    from .ssh_cmd import ssh_to_task

    code = ssh_to_task(
        obj, int(task_id), key=key, user=user, proxy_port=None, local_port=None, command=list(command)
    )
    ctx.exit(code)


__all__ = ["KeyChoice", "build_vps_spec", "choose_key", "create_body", "vps"]
