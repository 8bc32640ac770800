"""``kr init``: write configuration templates and systemd units.

- ``kr init config --host/--runner [--output-dir DIR] [--force]`` writes ``host_config.py`` /
  ``runner_config.py`` (mode 0600: they may hold secrets) from the settings schemas, so the template always
  lists every setting with its current default.
- ``kr init service --host/--runner/--all`` renders ``kohakuriver-host.service`` /
  ``kohakuriver-runner.service``: printed, written to ``--output-dir``, or with ``--install`` copied to
  /etc/systemd/system followed by ``systemctl daemon-reload``. Files are copied with ``shutil`` and
  ``systemctl`` runs as an argument vector: no shell is involved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from kohakuriver_host.config import HOST_SCHEMA
from kohakuriver_net import paths
from kohakuriver_proto.settings import render_template
from kohakuriver_runner.config import RUNNER_SCHEMA

SYSTEMD_DIR = Path("/etc/systemd/system")
HOST_UNIT = "kohakuriver-host.service"
RUNNER_UNIT = "kohakuriver-runner.service"
STOP_TIMEOUT_SECONDS = 30
# PATH for the daemons: the venv first (kr itself), then the usual system directories (docker, qemu, ssh...).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@click.group("init")
def init() -> None:
    """Create configuration files and systemd services."""


# ----------------------------------------------------------------------------------------------------------
# kr init config


def _write_private(path: Path, text: str, *, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


@init.command("config")
@click.option("--host", "want_host", is_flag=True, help="Write host_config.py.")
@click.option("--runner", "want_runner", is_flag=True, help="Write runner_config.py.")
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write to (default: ~/.kohakuriver, or $KOHAKURIVER_HOME).",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init_config(want_host: bool, want_runner: bool, output_dir: Path | None, force: bool) -> None:
    """Write commented configuration templates with every setting at its default."""
    if not (want_host or want_runner):
        raise click.UsageError("choose what to write: --host, --runner, or both")
    directory = (output_dir or paths.kohakuriver_home()).expanduser()
    targets = []
    if want_host:
        targets.append((directory / paths.HOST_CONFIG_NAME, render_template(HOST_SCHEMA), "kr host"))
    if want_runner:
        targets.append((directory / paths.RUNNER_CONFIG_NAME, render_template(RUNNER_SCHEMA), "kr runner"))
    existing = [str(path) for path, _, _ in targets if path.exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(existing)} already exists; use --force to overwrite")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, text, _ in targets:
            _write_private(path, text, overwrite=force)
    except OSError as exc:
        raise click.ClickException(f"cannot write to {directory}: {exc.strerror or exc}") from None
    default_dir = directory.resolve() == paths.kohakuriver_home().expanduser().resolve()
    for path, _, command in targets:
        start = command if default_dir else f"{command} --config {path}"
        click.echo(f"wrote {path} (edit it, then start with `{start}`)")


# ----------------------------------------------------------------------------------------------------------
# kr init service


def _systemd_arg(value: str) -> str:
    """Quote one ExecStart argument for systemd (not a shell): escape specifiers, variables and quotes."""
    if any(c in value for c in "\n\r\0"):
        raise click.ClickException(
            f"path {value!r} contains a line break or NUL; systemd units cannot hold it"
        )
    value = value.replace("%", "%%").replace("$", "$$")
    if value and not any(c.isspace() or c in "\"'\\;" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _systemd_value(value: str) -> str:
    """A value for a plain key (WorkingDirectory=...): only specifiers need escaping, no quoting."""
    if any(c in value for c in "\n\r\0"):
        raise click.ClickException(
            f"path {value!r} contains a line break or NUL; systemd units cannot hold it"
        )
    return value.replace("%", "%%")


def render_unit(
    *,
    role: str,
    kr_path: Path,
    config_path: Path,
    working_dir: Path,
    environment: dict[str, str],
) -> str:
    """The systemd unit text for ``role`` "host" or "runner"."""
    exec_start = " ".join(_systemd_arg(a) for a in (str(kr_path), role, "--config", str(config_path)))
    env_lines = [f"Environment={_systemd_arg(f'{k}={v}')}" for k, v in sorted(environment.items())]
    if role == "host":
        description = "KohakuRiver host (API, SSH proxy, scheduler)"
        after = "network-online.target"
        wants = "network-online.target"
        kill_lines = ["KillMode=mixed"]
    else:
        description = "KohakuRiver runner (tasks and VPS on this node)"
        after = "network-online.target docker.service"
        wants = "network-online.target docker.service"
        # Only the runner process is signalled: QEMU VMs it started keep running across a runner restart so
        # the restarted runner can adopt them (containers belong to dockerd and are unaffected anyway).
        kill_lines = ["KillMode=process"]
    lines = [
        "# Generated by `kr init service`.",
        "[Unit]",
        f"Description={description}",
        f"After={after}",
        f"Wants={wants}",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_systemd_value(str(working_dir))}",
        f"ExecStart={exec_start}",
        *env_lines,
        "Restart=on-failure",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        *kill_lines,
        f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def _kr_next_to(python: Path) -> Path:
    """The ``kr`` console script installed beside ``python`` (the same virtual environment)."""
    python = python.expanduser()
    if not python.is_absolute():
        found = shutil.which(str(python))
        if found is None:
            raise click.ClickException(f"python interpreter {python} not found")
        python = Path(found)
    # Do not resolve symlinks: a venv's bin/python links to the base interpreter, kr lives in the venv.
    kr = python.absolute().parent / "kr"
    if not kr.is_file():
        raise click.ClickException(
            f"no `kr` next to {python}; pass --python-path of the virtualenv kohakuriver is installed in"
        )
    return kr


@init.command("service")
@click.option("--host", "want_host", is_flag=True, help="Generate kohakuriver-host.service.")
@click.option("--runner", "want_runner", is_flag=True, help="Generate kohakuriver-runner.service.")
@click.option("--all", "want_all", is_flag=True, help="Generate both.")
@click.option(
    "--host-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Host config file (default: ~/.kohakuriver/host_config.py).",
)
@click.option(
    "--runner-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Runner config file (default: ~/.kohakuriver/runner_config.py).",
)
@click.option(
    "--working-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="WorkingDirectory of the services (default: ~/.kohakuriver).",
)
@click.option(
    "--python-path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Python of the virtual environment kohakuriver is installed in (default: this one).",
)
@click.option(
    "--output-dir",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the unit files here instead of printing them.",
)
@click.option(
    "--install/--no-install",
    default=False,
    help="Copy the units to /etc/systemd/system and run `systemctl daemon-reload` (needs root).",
)
def init_service(
    want_host: bool,
    want_runner: bool,
    want_all: bool,
    host_config: Path | None,
    runner_config: Path | None,
    working_dir: Path | None,
    python_path: Path | None,
    output_dir: Path | None,
    install: bool,
) -> None:
    """Generate systemd services for the host and/or the runner."""
    want_host = want_host or want_all
    want_runner = want_runner or want_all
    if not (want_host or want_runner):
        raise click.UsageError("choose what to generate: --host, --runner, or --all")
    if install and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise click.ClickException(
            f"installing into {SYSTEMD_DIR} needs root: run with sudo, or use --output-dir and copy the files"
        )
    kr = _kr_next_to(python_path or Path(sys.executable))
    workdir = (working_dir or paths.kohakuriver_home()).expanduser().absolute()
    environment = {"PATH": f"{kr.parent}:{SYSTEM_PATH}", "PYTHONUNBUFFERED": "1"}
    if os.environ.get(paths.HOME_ENV):
        environment[paths.HOME_ENV] = str(paths.kohakuriver_home().absolute())

    units: list[tuple[str, str]] = []
    roles = [("host", HOST_UNIT, host_config, paths.default_host_config_path())] if want_host else []
    if want_runner:
        roles.append(("runner", RUNNER_UNIT, runner_config, paths.default_runner_config_path()))
    for role, unit_name, given, default in roles:
        config = (given or default).expanduser().absolute()
        if not config.is_file():
            message = f"{config} does not exist; create it with `kr init config --{role}`"
            if install:
                raise click.ClickException(message)
            click.echo(f"warning: {message}", err=True)
        text = render_unit(
            role=role, kr_path=kr, config_path=config, working_dir=workdir, environment=environment
        )
        units.append((unit_name, text))

    if output_dir is not None:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            for unit_name, text in units:
                (output_dir / unit_name).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write to {output_dir}: {exc.strerror or exc}") from None
        for unit_name, _ in units:
            click.echo(f"wrote {output_dir / unit_name}")
        if not install:
            files = " ".join(str(output_dir / u) for u, _ in units)
            click.echo(f"install with: sudo cp {files} {SYSTEMD_DIR}/ && sudo systemctl daemon-reload")
    if install:
        _install(units)
    elif output_dir is None:
        for i, (unit_name, text) in enumerate(units):
            if i:
                click.echo("")
            click.echo(f"# ---- {unit_name} ----")
            click.echo(text, nl=False)


def _install(units: list[tuple[str, str]]) -> None:
    if not SYSTEMD_DIR.is_dir():
        raise click.ClickException(f"{SYSTEMD_DIR} does not exist: is this a systemd machine?")
    try:
        for unit_name, text in units:
            # Write beside the target, then rename: systemd never sees a half-written unit.
            tmp = SYSTEMD_DIR / f".{unit_name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o644)
            shutil.move(tmp, SYSTEMD_DIR / unit_name)
    except OSError as exc:
        raise click.ClickException(f"cannot install into {SYSTEMD_DIR}: {exc.strerror or exc}") from None
    for unit_name, _ in units:
        click.echo(f"installed {SYSTEMD_DIR / unit_name}")
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise click.ClickException("systemctl not found; run `systemctl daemon-reload` yourself")
    try:
        result = subprocess.run(
            [systemctl, "daemon-reload"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise click.ClickException(f"systemctl daemon-reload failed: {exc}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise click.ClickException(
            f"systemctl daemon-reload failed: {detail[-1] if detail else result.returncode}"
        )
    names = " ".join(u for u, _ in units)
    click.echo(f"reloaded systemd; start with: sudo systemctl enable --now {names}")
