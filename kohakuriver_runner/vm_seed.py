"""The cloud-init NoCloud seed of a VM VPS: a typed ``SeedRequest`` in, the three seed files and the ISO out.

``build_seed(request)`` is pure (no I/O, no clock): it returns ``SeedFiles`` (``meta-data``, ``user-data``,
``network-config``). ``build_seed_iso(files)`` packs them into the ISO that QEMU attaches read-only
(volume id ``cidata``, Rock Ridge and Joliet names, made in memory with pycdlib); it is CPU-bound and
blocking, so the runner calls it through ``trio.to_thread``.

What the guest gets, and why:

- Identity. ``local-hostname`` is ``vps-<id>``, as for a Docker VPS. The ``instance-id`` is
  ``kohakuriver-vps-<id>-<digest of user-data and network-config>``: cloud-init runs its once-per-instance
  modules (users, keys, files, commands) again exactly when the seed's content changed (a new agent secret,
  other DNS servers), and not on a plain restart of the same VM. Everything it writes is idempotent
  (files are overwritten, keys merged, units re-enabled), so a re-run is safe.
- Accounts. ``kohaku`` (sudo without password, bash) and ``root``; every password is locked and
  ``ssh_pwauth`` is false, so no mode ever allows a password login (the upstream VM turned password SSH on
  always). The key modes mean what they mean for a Docker VPS (``vps_spec``): ``upload``/``generate`` put
  the user's key on both accounts; ``none`` puts no user key anywhere; ``disabled`` starts no sshd at all.
- The management key is the runner's own SSH access to the VM as root, the way it reaches into a Docker
  VPS with ``docker exec``: terminals (``kr connect``, ``kr terminal exec``) and file operations. It is on
  root's account in every mode with an sshd (``none`` included: the user has no key, the runner still has
  its way in) and nowhere with ``disabled``, which has no sshd to present it to; terminals into such a VM go
  through the guest agent.
- Host key. The VPS's pinned Ed25519 host key (``vps_files.HostKeyStore``, the key ``kr ssh`` checks) is
  given as ``ssh_keys``; ``ssh_deletekeys`` removes the image's own keys (shared by every VM of that image)
  and cloud-init makes no others where ``ssh_keys`` are given, so the VM presents exactly the pinned key.
  sshd's options are the Docker VPS's (``vps_spec.sshd_argv``) in a drop-in read before Debian's own
  config, with ``HostKey`` naming that one key.
- ``disabled``: ``/etc/ssh/sshd_not_to_be_run`` (Debian's ``ssh.service`` and ``ssh.socket`` have it as a
  condition, and cloud-init writes files before ``sshd.service`` starts), and the units are masked too.
- Network: a version 2 config matched by the NIC's MAC (renamed ``eth0``), static address, default route,
  and the DNS servers the caller passes (the runner's resolver; never a hard-coded public resolver, and
  never a loopback address, which would be the guest's own).
- 9p shares: one systemd ``.mount`` unit each (cloud-init's ``mounts`` module ignores anything that is not
  a block device, and appending to fstab would duplicate lines on a re-run).
- Guest agent: its settings in an environment file (0600, named as the tunnel client reads them, so the
  tunnel client can be the agent) and a systemd unit that starts the binary at the given path.
- ``locale: C.UTF-8``: the default ``en_US.UTF-8`` is not generated in a minimal Debian and fails
  cloud-init's locale module.

Why JSON: cloud-config is YAML and YAML 1.2 is a superset of JSON; cloud-init reads these files with
PyYAML (YAML 1.1), which reads this JSON identically because it is written with ``": "``/``", "`` separators
and every string is checked to hold only characters YAML 1.1 reads as themselves (no control characters,
no NEL/LS/PS line breaks, no BOM or non-characters; ``_check_text``). No YAML library is a dependency,
and no user string is ever concatenated into YAML. Files that are not YAML (units, the sshd drop-in, the
environment file) are built from values restricted to character sets that their formats read literally.
Commands are argv lists, never shell strings.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import re
import urllib.parse
from typing import Any, NoReturn

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import SshKeyMode, check_ssh_public_key

from .vps_spec import sshd_argv

__all__ = [
    "AGENT_ENV_PATH",
    "AGENT_UNIT",
    "MOUNT_OPTIONS",
    "SSHD_DROP_IN",
    "USER",
    "GuestAgent",
    "GuestMount",
    "GuestNetwork",
    "SeedFiles",
    "SeedRequest",
    "build_seed",
    "build_seed_iso",
    "meta_data_document",
    "mount_unit_name",
    "network_config_document",
    "read_seed_iso",
    "user_data_document",
    "vm_hostname",
]

USER = "kohaku"
SUDO_RULE = "ALL=(ALL) NOPASSWD:ALL"
#: Read before Debian's own ``sshd_config`` (its ``Include`` comes first, and the first value wins).
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/10-kohakuriver.conf"
#: Where cloud-init's ssh module writes an ``ed25519_private`` entry of ``ssh_keys``.
GUEST_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
SSHD_NOT_TO_BE_RUN = "/etc/ssh/sshd_not_to_be_run"
SSH_UNITS = ("ssh.service", "ssh.socket")
AGENT_ENV_PATH = "/etc/kohakuriver/agent.env"
AGENT_UNIT = "kohakuriver-agent.service"
UNIT_DIR = "/etc/systemd/system"
GUEST_NIC = "eth0"
#: 9p over virtio with 512 KiB messages (the default 8 KiB makes large reads crawl).
MOUNT_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288"
#: cloud-init's growpart and resize_rootfs make a disk larger than the base image usable at first boot.
GROWPART = {"mode": "auto", "devices": ["/"]}

# Characters PyYAML (YAML 1.1) would not read back as themselves inside a double-quoted scalar: C0/C1
# controls and DEL (refused or folded), NEL/LS/PS (line breaks), the BOM, surrogates, non-characters.
_UNSAFE_TEXT_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")
_HOSTNAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}")
_PATH_PART_RE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
# Values of the agent's environment file and unit: no quotes, backslashes, '$', '%', '#', ';' or
# whitespace, so systemd's EnvironmentFile= and ExecStart= parsers read them literally.
_URL_RE = re.compile(r"[A-Za-z0-9._~:/?@!&()*+,=\[\]-]{1,2048}")
_SECRET_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
_AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ARG_RE = re.compile(r"[A-Za-z0-9._/=:,+@-]{1,1024}")
MAX_DNS_SERVERS = 8
MAX_MOUNTS = 16
MAX_AGENT_ARGS = 64


def _fail(field: str, message: str) -> NoReturn:
    raise ValidationError(field, message)


def _check_text(value: object, field: str, *, max_len: int = 16384) -> str:
    if not isinstance(value, str):
        _fail(field, f"must be a string, got {type(value).__name__}")
    if not value:
        _fail(field, "must not be empty")
    if len(value) > max_len:
        _fail(field, f"must be at most {max_len} characters")
    bad = _UNSAFE_TEXT_RE.search(value)
    if bad:
        _fail(field, f"must not contain control or line-break characters (found U+{ord(bad.group()):04X})")
    return value


def _check_pattern(value: object, field: str, pattern: re.Pattern[str], what: str) -> str:
    text = _check_text(value, field)
    if not pattern.fullmatch(text):
        _fail(field, f"{what}, got {text[:80]!r}")
    return text


def _check_guest_path(value: object, field: str) -> str:
    text = _check_text(value, field, max_len=1024)
    parts = text.split("/")
    if not text.startswith("/") or text == "/":
        _fail(field, f"must be an absolute path below /, got {text[:80]!r}")
    for part in parts[1:]:
        if part in ("", ".", "..") or not _PATH_PART_RE.fullmatch(part):
            _fail(
                field,
                "must be a clean absolute path of letters, digits, '_', '.' and '-' "
                f"(no empty, '.' or '..' components), got {text[:80]!r}",
            )
    return text


def _normalized_key(value: object, field: str) -> str:
    """An OpenSSH public key line (checked as kohakuriver_proto checks it), spaces normalized."""
    check_ssh_public_key(value, field)
    text = _check_text(value, field)  # also no C1 controls or Unicode line breaks in the comment
    return " ".join(text.strip().split(None, 2))


def vm_hostname(task_id: int) -> str:
    """A VM VPS's hostname: ``vps-<id>``, as a Docker VPS's."""
    return f"vps-{int(task_id)}"


# -- the request --------------------------------------------------------------------------------------------


def _hostname(_inst: Any, _attr: attrs.Attribute, value: object) -> None:
    _check_pattern(
        value,
        "hostname",
        _HOSTNAME_RE,
        "must be one DNS label (a-z, 0-9, '-', at most 63, no '-' at the ends)",
    )


def _interface(value: str, field: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    _check_text(value, field, max_len=64)
    if "/" not in value:
        _fail(field, f"must be an address with its prefix length, like 10.200.0.10/24, got {value[:64]!r}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        _fail(field, f"not an IP address with prefix: {exc}")


def _address(value: object, field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = _check_text(value, field, max_len=64)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        _fail(field, f"not an IP address: {text[:64]!r}")


@attrs.frozen
class GuestNetwork:
    """The guest NIC's static configuration. ``address`` has its prefix (``10.200.0.10/24``); ``mac`` is
    the one QEMU gives the NIC (matched by cloud-init, so the guest's interface name does not matter);
    ``dns_servers`` come from the runner's resolver (the caller reads it)."""

    address: str
    gateway: str
    mac: str
    dns_servers: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        iface = _interface(self.address, "network.address")
        net = iface.network
        if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified:
            _fail("network.address", f"{iface.ip} cannot be a VM's address")
        if net.num_addresses > 2 and iface.ip in (net.network_address, net.broadcast_address):
            _fail("network.address", f"{iface.ip} is the network or broadcast address of {net}")
        gateway = _address(self.gateway, "network.gateway")
        if gateway.version != iface.version:
            _fail("network.gateway", f"must be an IPv{iface.version} address like network.address")
        if gateway not in net:
            _fail("network.gateway", f"{gateway} is not on the VM's network {net}")
        if gateway == iface.ip:
            _fail("network.gateway", "must differ from the VM's own address")
        mac = _check_text(self.mac, "network.mac", max_len=17)
        if not _MAC_RE.fullmatch(mac):
            _fail("network.mac", f"must be six lower-case hex pairs separated by ':', got {mac[:40]!r}")
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            _fail("network.mac", f"{mac} is not a unicast address")
        if len(self.dns_servers) > MAX_DNS_SERVERS:
            _fail("network.dns_servers", f"at most {MAX_DNS_SERVERS} servers")
        seen = set()
        for i, server in enumerate(self.dns_servers):
            field = f"network.dns_servers[{i}]"
            ip = _address(server, field)
            if ip.is_loopback:
                _fail(
                    field,
                    f"{ip} is a loopback resolver: inside the VM it is the guest itself; pass the servers "
                    "the runner's resolver forwards to",
                )
            if ip.version != iface.version:
                _fail(
                    field, f"the VM has only an IPv{iface.version} address: pass IPv{iface.version} servers"
                )
            if ip.is_unspecified or ip.is_multicast:
                _fail(field, f"{ip} is not a DNS server address")
            if ip in seen:
                _fail(field, f"{ip} is listed twice")
            seen.add(ip)

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.address)


@attrs.frozen
class GuestMount:
    """A 9p share QEMU exports under ``tag``, mounted at ``guest_path`` in the VM."""

    tag: str
    guest_path: str
    read_only: bool = False

    def __attrs_post_init__(self) -> None:
        _check_pattern(
            self.tag,
            "mount.tag",
            _TAG_RE,
            "must be 1-31 letters, digits, '_', '.', '-' (not starting with . or -)",
        )
        _check_guest_path(self.guest_path, "mount.guest_path")
        if not isinstance(self.read_only, bool):
            _fail("mount.read_only", "must be a boolean")


@attrs.frozen
class GuestAgent:
    """How the guest agent is started. ``binary`` is its path inside the image, ``args`` extra arguments;
    ``runner_url`` where it connects, ``name`` the name the runner knows the VM by, ``secret`` its per-VM
    secret (all three land in ``AGENT_ENV_PATH``, mode 0600, under the tunnel client's variable names)."""

    binary: str
    runner_url: str
    name: str
    secret: str = attrs.field(repr=False)
    args: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        _check_guest_path(self.binary, "agent.binary")
        url = _check_pattern(
            self.runner_url,
            "agent.runner_url",
            _URL_RE,
            "must be a URL without spaces, quotes, backslashes, '$', '%', '#' or ';'",
        )
        try:
            parts = urllib.parse.urlsplit(url)
            _ = parts.port  # raises on a bad port
        except ValueError as exc:
            _fail("agent.runner_url", f"not a URL: {exc}")
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            _fail("agent.runner_url", f"must be an http(s) or ws(s) URL with a host, got {url[:80]!r}")
        _check_pattern(
            self.name, "agent.name", _AGENT_NAME_RE, "must be letters, digits, '_', '.', '-', up to 128"
        )
        if not isinstance(self.secret, str) or not _SECRET_RE.fullmatch(self.secret):
            # Never echo the secret in the message.
            _fail("agent.secret", "must be 16-512 characters of letters, digits and ._~+/=-")
        if len(self.args) > MAX_AGENT_ARGS:
            _fail("agent.args", f"at most {MAX_AGENT_ARGS} arguments")
        for i, arg in enumerate(self.args):
            _check_pattern(arg, f"agent.args[{i}]", _ARG_RE, "must be letters, digits and ._/=:,+@-")


def _instance(value: object, cls: type, field: str) -> None:
    if not isinstance(value, cls):
        _fail(field, f"must be a {cls.__name__}, got {type(value).__name__}")


def _network(_inst: Any, _attr: attrs.Attribute, value: object) -> None:
    _instance(value, GuestNetwork, "network")


def _key_mode(_inst: Any, _attr: attrs.Attribute, value: object) -> None:
    if not isinstance(value, SshKeyMode):
        _fail("ssh_key_mode", f"must be one of {', '.join(m.value for m in SshKeyMode)}")


@attrs.frozen
class SeedRequest:
    """Everything a VM VPS's seed says. ``host_key`` is the VPS's Ed25519 private host key in OpenSSH
    format (``vps_files.HostKeyStore``); required when the key mode has an sshd."""

    hostname: str = attrs.field(validator=_hostname)
    ssh_key_mode: SshKeyMode = attrs.field(validator=_key_mode)
    network: GuestNetwork = attrs.field(validator=_network)
    management_public_key: str
    ssh_public_key: str | None = None
    host_key: bytes | None = attrs.field(default=None, repr=False)
    mounts: tuple[GuestMount, ...] = attrs.field(default=(), converter=tuple)
    agent: GuestAgent | None = None

    def __attrs_post_init__(self) -> None:
        keyed = self.ssh_key_mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE)
        if keyed and self.ssh_public_key is None:
            _fail("ssh_public_key", f"required with ssh_key_mode {self.ssh_key_mode.value!r}")
        if not keyed and self.ssh_public_key is not None:
            _fail(
                "ssh_public_key",
                f"only used with ssh_key_mode 'upload' or 'generate', not {self.ssh_key_mode.value!r}",
            )
        if self.ssh_public_key is not None:
            _normalized_key(self.ssh_public_key, "ssh_public_key")
        _normalized_key(self.management_public_key, "management_public_key")
        if self.host_key is None:
            if self.ssh_key_mode is not SshKeyMode.DISABLED:
                _fail("host_key", f"required with ssh_key_mode {self.ssh_key_mode.value!r} (the VM's sshd)")
        else:
            _host_key_pair(self.host_key)
        if len(self.mounts) > MAX_MOUNTS:
            _fail("mounts", f"at most {MAX_MOUNTS} mounts")
        tags: set[str] = set()
        paths: set[str] = set()
        for i, mount in enumerate(self.mounts):
            _instance(mount, GuestMount, f"mounts[{i}]")
            if mount.tag in tags:
                _fail(f"mounts[{i}].tag", f"{mount.tag!r} is used twice")
            if mount.guest_path in paths:
                _fail(f"mounts[{i}].guest_path", f"{mount.guest_path!r} is used twice")
            tags.add(mount.tag)
            paths.add(mount.guest_path)
        if self.agent is not None:
            _instance(self.agent, GuestAgent, "agent")

    @property
    def ssh_enabled(self) -> bool:
        return self.ssh_key_mode is not SshKeyMode.DISABLED


def _host_key_pair(private: object) -> tuple[str, str]:
    """(private key text, ``ssh-ed25519 AAAA...``) of an unencrypted OpenSSH Ed25519 private key."""
    if not isinstance(private, bytes):
        _fail("host_key", "must be bytes (an OpenSSH private key)")
    try:
        key = serialization.load_ssh_private_key(private, password=None)
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm) as exc:
        _fail("host_key", f"not an unencrypted OpenSSH private key: {exc}")
    if not isinstance(key, Ed25519PrivateKey):
        _fail("host_key", f"must be an Ed25519 key, got {type(key).__name__}")
    try:
        text = private.decode("ascii")
    except UnicodeDecodeError:
        _fail("host_key", "must be ASCII (PEM)")
    _check_text(text.replace("\n", ""), "host_key")  # no CR or other control characters around the PEM
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return text, public.decode()


# -- the documents ------------------------------------------------------------------------------------------


@attrs.frozen
class SeedFiles:
    """The three NoCloud files, as written into the ISO."""

    meta_data: bytes
    user_data: bytes
    network_config: bytes

    def as_dict(self) -> dict[str, bytes]:
        return {
            "meta-data": self.meta_data,
            "user-data": self.user_data,
            "network-config": self.network_config,
        }


def mount_unit_name(path: str) -> str:
    """The name systemd requires for the mount unit of ``path`` (``systemd-escape --path --suffix=mount``)
    for the characters ``GuestMount`` allows."""
    out = []
    for i, char in enumerate(path.strip("/")):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_" or (char == "." and i > 0)):
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out) + ".mount"


def _write_file(path: str, content: str, permissions: str) -> dict[str, Any]:
    return {"path": path, "content": content, "owner": "root:root", "permissions": permissions}


def _sshd_drop_in() -> str:
    # The Docker VPS's options (one place says what a VPS's sshd accepts), in sshd_config syntax.
    argv = sshd_argv()
    options = [argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-o"]
    lines = ["# KohakuRiver VPS: public keys only, the VPS's pinned host key.", f"HostKey {GUEST_HOST_KEY}"]
    lines += [f"{name} {value}" for name, value in options]
    return "\n".join(lines) + "\n"


def _mount_unit(mount: GuestMount) -> str:
    options = MOUNT_OPTIONS + (",ro" if mount.read_only else "")
    return (
        "[Unit]\n"
        f"Description=KohakuRiver share {mount.tag}\n"
        "[Mount]\n"
        f"What={mount.tag}\n"
        f"Where={mount.guest_path}\n"
        "Type=9p\n"
        f"Options={options}\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def _agent_env(agent: GuestAgent) -> str:
    return (
        f"KOHAKURIVER_TUNNEL_URL={agent.runner_url}\n"
        f"KOHAKURIVER_CONTAINER_ID={agent.name}\n"
        f"KOHAKURIVER_TUNNEL_TOKEN={agent.secret}\n"
    )


def _agent_unit(agent: GuestAgent) -> str:
    exec_start = " ".join((agent.binary, *agent.args))
    binary_dir = agent.binary.rsplit("/", 1)[0] or "/"
    return (
        "[Unit]\n"
        "Description=KohakuRiver guest agent\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        # The runner may share the binary over 9p: start once that share is mounted.
        f"RequiresMountsFor={binary_dir}\n"
        # Never give up restarting (systemd's default stops after 5 starts in 10 s).
        "StartLimitIntervalSec=0\n"
        "[Service]\n"
        f"EnvironmentFile={AGENT_ENV_PATH}\n"
        f"ExecStart={exec_start}\n"
        # It reconnects by itself; a crash must not leave the VM without heartbeats.
        "Restart=always\n"
        "RestartSec=2\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def user_data_document(request: SeedRequest) -> dict[str, Any]:
    """The ``#cloud-config`` user-data as a structure (``build_seed`` serializes it)."""
    user_keys = (
        [] if request.ssh_public_key is None else [_normalized_key(request.ssh_public_key, "ssh_public_key")]
    )
    root_keys = list(user_keys)
    if request.ssh_enabled:
        root_keys.append(_normalized_key(request.management_public_key, "management_public_key"))
    kohaku: dict[str, Any] = {
        "name": USER,
        "gecos": "KohakuRiver VPS user",
        "shell": "/bin/bash",
        "sudo": SUDO_RULE,
        "lock_passwd": True,
    }
    if user_keys:
        kohaku["ssh_authorized_keys"] = user_keys
    root: dict[str, Any] = {"name": "root", "lock_passwd": True}
    if root_keys:
        root["ssh_authorized_keys"] = root_keys

    doc: dict[str, Any] = {
        "hostname": request.hostname,
        "preserve_hostname": False,
        "manage_etc_hosts": True,
        "locale": "C.UTF-8",
        "users": [kohaku, root],
        "disable_root": False,  # else root's keys get a "login as ..." command prefix
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        # Only used where no ssh_keys are given (``disabled`` without a host key), and then only a cheap
        # type; an existing key file (ours) is never regenerated.
        "ssh_genkeytypes": ["ed25519"],
    }
    if request.host_key is not None:
        private, public = _host_key_pair(request.host_key)
        doc["ssh_keys"] = {"ed25519_private": private, "ed25519_public": public}
    doc["resize_rootfs"] = True
    doc["growpart"] = {"mode": GROWPART["mode"], "devices": list(GROWPART["devices"])}

    files: list[dict[str, Any]] = []
    commands: list[list[str]] = []
    if request.ssh_enabled:
        files.append(_write_file(SSHD_DROP_IN, _sshd_drop_in(), "0644"))
    else:
        files.append(_write_file(SSHD_NOT_TO_BE_RUN, "KohakuRiver: this VPS has SSH disabled.\n", "0644"))
        commands.append(["systemctl", "mask", "--now", *SSH_UNITS])
    units: list[str] = []
    for mount in request.mounts:
        unit = mount_unit_name(mount.guest_path)
        files.append(_write_file(f"{UNIT_DIR}/{unit}", _mount_unit(mount), "0644"))
        units.append(unit)
    if request.agent is not None:
        files.append(_write_file(AGENT_ENV_PATH, _agent_env(request.agent), "0600"))
        files.append(_write_file(f"{UNIT_DIR}/{AGENT_UNIT}", _agent_unit(request.agent), "0644"))
    if units or request.agent is not None:
        commands.append(["systemctl", "daemon-reload"])
    if units:
        commands.append(["systemctl", "enable", "--now", *units])
    if request.agent is not None:
        # Separate from the mounts: a share that fails to mount must not keep the agent from starting.
        commands.append(["systemctl", "enable", "--now", AGENT_UNIT])
    doc["write_files"] = files
    if commands:
        doc["runcmd"] = commands
    return doc


def network_config_document(network: GuestNetwork) -> dict[str, Any]:
    """NoCloud ``network-config``, version 2: one ethernet matched by MAC, static, default route."""
    iface = network.interface
    default = "0.0.0.0/0" if iface.version == 4 else "::/0"
    nic: dict[str, Any] = {
        "match": {"macaddress": network.mac},
        # cloud-init renames the NIC with this MAC before the network is up; without it, its networkd
        # renderer still writes Name=eth0 into the match, which a guest with predictable names never has.
        "set-name": GUEST_NIC,
        "addresses": [str(iface)],
        "routes": [{"to": default, "via": str(ipaddress.ip_address(network.gateway))}],
    }
    if network.dns_servers:
        nic["nameservers"] = {"addresses": [str(ipaddress.ip_address(s)) for s in network.dns_servers]}
    return {"version": 2, "ethernets": {GUEST_NIC: nic}}


def meta_data_document(hostname: str, instance_id: str) -> dict[str, str]:
    return {"instance-id": instance_id, "local-hostname": hostname}


def _dump(doc: Any) -> bytes:
    # ensure_ascii=False: JSON's \uXXXX surrogate pairs for characters beyond the BMP would reach PyYAML as
    # two lone surrogates; raw UTF-8 reads back as itself (``_check_text`` keeps out what would not).
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def build_seed(request: SeedRequest) -> SeedFiles:
    """The three NoCloud files for ``request`` (pure, deterministic)."""
    user_data = b"#cloud-config\n" + _dump(user_data_document(request))
    network_config = _dump(network_config_document(request.network))
    digest = hashlib.sha256(user_data + b"\0" + network_config).hexdigest()[:16]
    instance_id = f"kohakuriver-{request.hostname}-{digest}"
    meta_data = _dump(meta_data_document(request.hostname, instance_id))
    return SeedFiles(meta_data=meta_data, user_data=user_data, network_config=network_config)


# -- the ISO ------------------------------------------------------------------------------------------------

#: NoCloud's volume label; cloud-init looks for it in either case.
VOLUME_ID = "cidata"
# ISO 9660 level 1 names (8.3, upper case) for readers without extensions; Linux reads the Rock Ridge names.
_ISO_NAMES = {"meta-data": "METADATA.;1", "user-data": "USERDATA.;1", "network-config": "NETCONF.;1"}


def build_seed_iso(files: SeedFiles) -> bytes:
    """The seed as an ISO 9660 image with Rock Ridge and Joliet names, volume id ``cidata`` (blocking)."""
    import pycdlib  # here, not at the top: 65 ms of imports only the code that makes a VM pays

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for name, data in files.as_dict().items():
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path=f"/{_ISO_NAMES[name]}",
                rr_name=name,
                joliet_path=f"/{name}",
                file_mode=0o100444,
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def read_seed_iso(image: bytes) -> tuple[str, dict[str, bytes]]:
    """(volume id, {Rock Ridge name: content}) of a seed ISO: for tests and for checking an instance's
    seed after a runner restart (blocking)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        volume = iso.pvd.volume_identifier.decode().rstrip()
        found: dict[str, bytes] = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            found[name] = out.getvalue()
    finally:
        iso.close()
    return volume, found
