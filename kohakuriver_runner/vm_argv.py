"""QEMU's command line for a VM VPS: a validated ``VmLaunch`` in, an argv list out. Pure: no I/O.

``qemu_argv(launch)`` is the only place that knows QEMU's option syntax. The runner passes the list to
``vm_process.launch`` (no shell ever sees it), so shell metacharacters in a path mean nothing. What does
mean something is QEMU's own option syntax: ``-blockdev``, ``-fsdev``, ``-chardev``, ``-netdev``,
``-device`` and ``-name`` take ``key=value,key=value`` strings, where a comma in a value would end it and
start a new option. QEMU reads a doubled comma as a literal one, so every value that goes inside such a
string is escaped that way (``_opt``); values that QEMU takes whole (``-pidfile``, ``-kernel``, ``-initrd``,
``-append``) are passed as they are. Checked against QEMU 10 with a directory whose name holds commas
(``tests/integration/test_vm_disk.py``, ``test_vm_process.py``).

Decisions:

- ``-nodefaults -no-user-config``: no default NIC, CD-ROM, floppy, monitor or serial port, and no config
  file from ``/etc/qemu`` changing the machine behind the runner's back. ``-display none``; the serial
  console goes to a file (``-chardev file`` + ``-serial chardev:``), QMP to a Unix socket (``-chardev socket``
  + ``-mon mode=control``: the same as ``-qmp unix:...`` but in the syntax where commas can be escaped).
- The disk is two ``-blockdev`` nodes, ``disk0-file`` (the file) and ``disk0`` (qcow2 on it; its backing
  chain opens from the image header) behind a ``virtio-blk-pci`` device with ``bootindex=1``. QMP's internal
  snapshot commands name the disk by the format node's name, ``DISK_NODE`` (``"disk0"``): with ``-blockdev``
  there is no drive name, and the device id (``disk0-dev``) is refused ("Cannot find device=... nor
  node-name=..."), measured with QEMU 10. ``discard=unmap`` lets a guest's TRIM shrink the overlay.
- The seed ISO is a read-only raw node on a second ``virtio-blk-pci``; cloud-init finds it by its label.
- Network: a tap the runner made (``script=no,downscript=no``: QEMU runs no helper scripts), ``vhost=off``
  unless the caller says ``/dev/vhost-net`` is there; ``virtio-net-pci`` with the VM's fixed MAC.
- 9p shares: ``-fsdev local`` with ``security_model=none`` (the guest's chown/chmod failures are ignored;
  the files keep the host's owners), ``multidevs=remap`` (a shared tree spanning file systems would give
  the guest colliding inode numbers; QEMU warns otherwise), ``readonly=on`` where asked.
- GPUs: each ``vfio-pci`` device sits on its own ``pcie-root-port`` (as libvirt does on q35): GPU drivers
  expect a PCIe link, which a device on the root complex itself does not have.
- UEFI: OVMF's code (read-only) and a per-instance copy of its variable store as the machine's
  ``pflash0``/``pflash1``. The caller copies the vars file; the shared template is never written.
- ``extra`` is appended as it is: for the runner's own options (tests add ``-S``), never for anything a
  user sent.
- Never ``-daemonize``: the runner supervises QEMU as a process (``vm_process``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NoReturn

import attrs

from kohakuriver_proto.errors import ValidationError

__all__ = [
    "ACCELS",
    "DISK_DEVICE",
    "DISK_NODE",
    "FIRMWARES",
    "SEED_NODE",
    "Share",
    "VmLaunch",
    "qemu_argv",
]

ACCELS = ("kvm", "tcg")
FIRMWARES = ("bios", "uefi")

#: The qcow2 node of the VM's disk: the name QMP's block commands take (``blockdev-snapshot-internal-sync``).
DISK_NODE = "disk0"
#: The virtio-blk device that shows ``DISK_NODE`` to the guest (its qdev id).
DISK_DEVICE = "disk0-dev"
SEED_NODE = "seed0"

#: A Unix socket path must fit ``sun_path`` (108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
#: x86's ``COMMAND_LINE_SIZE`` is 2048 bytes including the NUL.
MAX_CMDLINE = 2047
MAX_CORES = 1024
MIN_MEMORY_MB = 16

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}")  # vm_seed's mount tag rule
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ is 16 with the NUL
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _fail(field: str, message: str) -> NoReturn:
    raise ValidationError(field, message)


def _opt(value: str) -> str:
    """A value inside QEMU's ``key=value,...`` syntax: a comma is written twice, which QEMU reads as one."""
    return value.replace(",", ",,")


def _to_path(value: str | os.PathLike[str]) -> Path:
    return Path(value)


def _to_optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _check_path(field: str, value: Path | None) -> None:
    if value is None:
        return
    text = str(value)
    if not value.is_absolute():
        _fail(field, f"must be an absolute path, got {text[:80]!r}")
    # No shell is involved, but NUL cannot be in an argv string and a control character in a path the
    # runner made is a bug somewhere; refusing it keeps the log lines and QEMU's messages readable.
    if _CONTROL_RE.search(text):
        _fail(field, f"must not hold control characters, got {text[:80]!r}")


def _validate_path(instance: object, attribute: attrs.Attribute, value: Path | None) -> None:
    _check_path(attribute.name, value)


@attrs.frozen(kw_only=True)
class Share:
    """A host directory QEMU exports over virtio-9p under ``tag`` (the guest mounts it by that tag)."""

    tag: str
    host_path: Path = attrs.field(converter=_to_path)
    readonly: bool = False

    def check(self, field: str) -> None:
        if not isinstance(self.tag, str) or not _TAG_RE.fullmatch(self.tag):
            _fail(f"{field}.tag", "must be 1-31 letters, digits, '_', '.', '-' (not starting with . or -)")
        _check_path(f"{field}.host_path", self.host_path)
        if not isinstance(self.readonly, bool):
            _fail(f"{field}.readonly", "must be a boolean")


def _to_shares(value: object) -> tuple[Share, ...]:
    """Shares as ``Share`` objects or ``(tag, host_path, readonly)`` tuples."""
    shares = []
    for index, item in enumerate(value):  # type: ignore[call-overload]
        if isinstance(item, Share):
            shares.append(item)
            continue
        try:
            tag, host_path, readonly = item
        except (TypeError, ValueError):
            _fail(f"shares[{index}]", "must be a Share or a (tag, host_path, readonly) tuple")
        shares.append(Share(tag=tag, host_path=host_path, readonly=readonly))
    return tuple(shares)


@attrs.frozen(kw_only=True)
class VmLaunch:
    """Everything QEMU needs to run one VM. Paths are absolute; ``ValidationError(field, ...)`` otherwise."""

    name: str
    accel: str
    cores: int
    memory_mb: int
    disk: Path = attrs.field(converter=_to_path, validator=_validate_path)
    qmp_socket: Path = attrs.field(converter=_to_path, validator=_validate_path)
    serial_log: Path = attrs.field(converter=_to_path, validator=_validate_path)
    pidfile: Path = attrs.field(converter=_to_path, validator=_validate_path)
    seed_iso: Path | None = attrs.field(default=None, converter=_to_optional_path, validator=_validate_path)
    tap: str | None = None
    mac: str | None = attrs.field(default=None, converter=lambda m: m.lower() if isinstance(m, str) else m)
    vhost: bool = False
    shares: tuple[Share, ...] = attrs.field(default=(), converter=_to_shares)
    vfio_devices: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    kernel: Path | None = attrs.field(default=None, converter=_to_optional_path, validator=_validate_path)
    initrd: Path | None = attrs.field(default=None, converter=_to_optional_path, validator=_validate_path)
    cmdline: str | None = None
    firmware: str = "bios"
    ovmf_code: Path | None = attrs.field(default=None, converter=_to_optional_path, validator=_validate_path)
    ovmf_vars: Path | None = attrs.field(default=None, converter=_to_optional_path, validator=_validate_path)
    extra: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            _fail("name", "must be 1-128 letters, digits, '_', '.', '-', starting with a letter or digit")
        if self.accel not in ACCELS:
            _fail("accel", f"must be one of {', '.join(ACCELS)}, got {self.accel!r}")
        for field, value, low, high in (
            ("cores", self.cores, 1, MAX_CORES),
            ("memory_mb", self.memory_mb, MIN_MEMORY_MB, 1 << 30),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                _fail(field, f"must be a whole number from {low} to {high}, got {value!r}")
        if len(os.fsencode(self.qmp_socket)) > MAX_SOCKET_PATH:
            _fail("qmp_socket", f"a Unix socket path has at most {MAX_SOCKET_PATH} bytes")
        if (self.tap is None) != (self.mac is None):
            _fail("mac", "a NIC needs both a tap and a MAC address")
        if self.tap is not None and (not isinstance(self.tap, str) or not _IFNAME_RE.fullmatch(self.tap)):
            _fail("tap", f"must be an interface name (1-15 letters, digits, '_', '.', '-'), got {self.tap!r}")
        if self.mac is not None:
            if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
                _fail("mac", f"must be six hex octets separated by ':', got {self.mac!r}")
            if int(self.mac[:2], 16) & 1:
                _fail("mac", f"must be a unicast address (even first octet), got {self.mac!r}")
        if not isinstance(self.vhost, bool):
            _fail("vhost", "must be a boolean")
        tags = set()
        for index, share in enumerate(self.shares):
            share.check(f"shares[{index}]")
            if share.tag in tags:
                _fail(f"shares[{index}].tag", f"{share.tag!r} is used twice")
            tags.add(share.tag)
        for index, address in enumerate(self.vfio_devices):
            if not isinstance(address, str) or not _PCI_RE.fullmatch(address):
                _fail(f"vfio_devices[{index}]", f"must be a PCI address like 0000:01:00.0, got {address!r}")
        if len(set(self.vfio_devices)) != len(self.vfio_devices):
            _fail("vfio_devices", "a device is listed twice")
        self._check_boot()
        for index, arg in enumerate(self.extra):
            if not isinstance(arg, str) or "\x00" in arg:
                _fail(f"extra[{index}]", "must be a string without NUL")

    def _check_boot(self) -> None:
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            _fail("kernel", "an initrd or a kernel command line needs a kernel")
        if self.cmdline is not None:
            if not isinstance(self.cmdline, str) or "\x00" in self.cmdline or "\n" in self.cmdline:
                _fail("cmdline", "must be one line of text")
            if len(self.cmdline.encode()) > MAX_CMDLINE:
                _fail("cmdline", f"a kernel command line has at most {MAX_CMDLINE} bytes")
        if self.firmware not in FIRMWARES:
            _fail("firmware", f"must be one of {', '.join(FIRMWARES)}, got {self.firmware!r}")
        if self.firmware == "uefi":
            if self.ovmf_code is None or self.ovmf_vars is None:
                _fail("ovmf_code", "UEFI needs OVMF's code and a per-instance copy of its variable store")
        elif self.ovmf_code is not None or self.ovmf_vars is not None:
            _fail("ovmf_code", "OVMF files are for firmware 'uefi' only")


def qemu_argv(launch: VmLaunch, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The whole command line (``qemu`` first) that runs ``launch`` in the foreground."""
    machine = "q35"
    if launch.firmware == "uefi":
        machine += ",pflash0=ovmf-code,pflash1=ovmf-vars"
    if launch.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    argv = [
        qemu,
        "-name",
        f"guest={_opt(launch.name)}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        machine,
        *accel,
        "-smp",
        str(launch.cores),
        "-m",
        str(launch.memory_mb),
    ]
    if launch.firmware == "uefi":
        assert launch.ovmf_code is not None and launch.ovmf_vars is not None
        argv += [
            "-blockdev",
            f"driver=file,node-name=ovmf-code,filename={_opt(str(launch.ovmf_code))},read-only=on",
            "-blockdev",
            f"driver=file,node-name=ovmf-vars,filename={_opt(str(launch.ovmf_vars))}",
        ]
    argv += [
        "-blockdev",
        f"driver=file,node-name={DISK_NODE}-file,filename={_opt(str(launch.disk))},discard=unmap",
        "-blockdev",
        f"driver=qcow2,node-name={DISK_NODE},file={DISK_NODE}-file,discard=unmap",
        "-device",
        f"virtio-blk-pci,drive={DISK_NODE},id={DISK_DEVICE},bootindex=1",
    ]
    if launch.seed_iso is not None:
        argv += [
            "-blockdev",
            f"driver=file,node-name={SEED_NODE}-file,filename={_opt(str(launch.seed_iso))},read-only=on",
            "-blockdev",
            f"driver=raw,node-name={SEED_NODE},file={SEED_NODE}-file,read-only=on",
            "-device",
            f"virtio-blk-pci,drive={SEED_NODE},id={SEED_NODE}-dev",
        ]
    if launch.tap is not None:
        vhost = "on" if launch.vhost else "off"
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={launch.tap},script=no,downscript=no,vhost={vhost}",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={launch.mac},id=net0-dev",
        ]
    argv += ["-device", "virtio-rng-pci,id=rng0"]
    for index, share in enumerate(launch.shares):
        fsdev = f"local,id=fs{index},path={_opt(str(share.host_path))},security_model=none,multidevs=remap"
        if share.readonly:
            fsdev += ",readonly=on"
        argv += ["-fsdev", fsdev, "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={share.tag}"]
    for index, address in enumerate(launch.vfio_devices):
        port = f"gpu-port{index}"
        argv += [
            "-device",
            f"pcie-root-port,id={port},chassis={index + 1},slot={index + 1}",
            "-device",
            f"vfio-pci,host={address},bus={port},id=gpu{index}",
        ]
    if launch.kernel is not None:
        argv += ["-kernel", str(launch.kernel)]
        if launch.initrd is not None:
            argv += ["-initrd", str(launch.initrd)]
        if launch.cmdline is not None:
            argv += ["-append", launch.cmdline]
    argv += [
        "-chardev",
        f"file,id=serial0,path={_opt(str(launch.serial_log))}",
        "-serial",
        "chardev:serial0",
        "-chardev",
        f"socket,id=qmp,path={_opt(str(launch.qmp_socket))},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-pidfile",
        str(launch.pidfile),
        *launch.extra,
    ]
    return argv
