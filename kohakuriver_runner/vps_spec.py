"""What a Docker VPS's container looks like: a command task's ``ContainerSpec`` turned into a machine.

Pure: it starts from the spec ``container_spec.build_container_spec`` made for the request (same name, labels,
resources and mounts, so adoption after a runner restart works exactly as for command tasks), changes only
what makes it a VPS, and injects the tunnel client with the same ``container_spec.with_tunnel``:

- the main process. With SSH (key modes ``upload``/``generate``/``none``) it is the image's own sshd in the
  foreground with options given on its command line, which win over whatever the image's sshd_config says:
  public keys only, no passwords, no empty passwords, root by key only, and the runner's per-VPS host key.
  There is no shell and no setup script: the files sshd needs are uploaded before start (``vps_files``).
  Mode ``none`` injects no key, so nobody can log in over SSH until a key is added by other means; it is
  never a passwordless login. With the tunnel client injected, it wraps sshd (``--exec --``) as it wraps
  a command.
- Mode ``disabled``: no sshd and no port. The main process is a keep-alive: the tunnel client itself in the
  foreground when it is injected (it needs nothing from the image), else ``sleep`` from the image.
- port 22 published on ``RUNNER_BIND_IP:<ssh port>`` (the runner chose the port, ``ssh_ports``), recorded in
  a label too so that the port can be recovered from the container alone.
- sshd runs as root whatever ``RUNNER_USER`` says (it must switch users); the hostname is ``vps-<id>``.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from kohakuriver_proto.models import ExecuteRequest, SshKeyMode

from .container_spec import TUNNEL_CLIENT_TARGET, TunnelInjection, with_tunnel
from .docker_api import ContainerSpec, PortBinding
from .vps_files import HOST_KEY_PATH, SSHD

__all__ = [
    "KEEPALIVE",
    "LABEL_SSH_PORT",
    "SSHD",
    "build_vps_spec",
    "key_mode",
    "ssh_enabled",
    "ssh_port_from_labels",
    "sshd_argv",
]

LABEL_SSH_PORT = "kohakuriver.ssh_port"
#: The keep-alive of a VPS without SSH and without tunnel client (the largest sleep every ``sleep`` takes).
KEEPALIVE = ("sleep", "2147483647")
SSH_CONTAINER_PORT = 22


def key_mode(request: ExecuteRequest) -> SshKeyMode:
    return request.ssh_key_mode or SshKeyMode.DISABLED


def ssh_enabled(request: ExecuteRequest) -> bool:
    return key_mode(request) is not SshKeyMode.DISABLED


def sshd_argv() -> tuple[str, ...]:
    """sshd in the foreground, logging to stderr (the VPS's output), keys only whatever the image says."""
    options = (
        "AuthenticationMethods=publickey",
        "PubkeyAuthentication=yes",
        "PasswordAuthentication=no",
        "KbdInteractiveAuthentication=no",
        "PermitEmptyPasswords=no",
        "PermitRootLogin=prohibit-password",
    )
    argv = [SSHD, "-D", "-e"]
    for option in options:
        argv += ["-o", option]
    return (*argv, "-h", HOST_KEY_PATH)


def ssh_port_from_labels(labels: Mapping[str, str]) -> int | None:
    text = labels.get(LABEL_SSH_PORT, "")
    if text.isascii() and text.isdigit() and 0 < int(text) <= 65535:
        return int(text)
    return None


def build_vps_spec(
    base: ContainerSpec,
    request: ExecuteRequest,
    *,
    ssh_port: int | None,
    bind_ip: str,
    tunnel: TunnelInjection | None = None,
) -> ContainerSpec:
    """The VPS container for ``request``; ``base`` is ``build_container_spec``'s spec for it, built without
    the tunnel (``tunnel`` is injected here, around the VPS's own main process).

    ``ssh_port`` is required when SSH is enabled and ignored otherwise.
    """
    labels = dict(base.labels)
    ports: dict[int | str, PortBinding] = {}
    if ssh_enabled(request):
        if ssh_port is None:
            raise ValueError("a VPS with SSH needs an SSH port")
        cmd: tuple[str, ...] = sshd_argv()
        ports[SSH_CONTAINER_PORT] = PortBinding(host_ip=bind_ip, host_port=ssh_port)
        labels[LABEL_SSH_PORT] = str(ssh_port)
    else:
        cmd = KEEPALIVE
    spec = attrs.evolve(
        base,
        entrypoint=(),
        cmd=cmd,
        ports=ports,
        labels=labels,
        user=None,
        hostname=f"vps-{int(request.task_id)}",
    )
    if tunnel is None:
        return spec
    # The tunnel client's --exec mode starts itself and then execs sshd; without SSH the client itself,
    # in the foreground, is the keep-alive.
    spec = with_tunnel(spec, tunnel)
    if not ssh_enabled(request):
        spec = attrs.evolve(spec, entrypoint=(TUNNEL_CLIENT_TARGET,), cmd=())
    return spec
