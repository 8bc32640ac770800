"""GPU passthrough to VMs through VFIO: discovery from sysfs, binding to ``vfio-pci`` and back, the ACS
setting, and the rule that keeps one GPU from going to a container and a VM at once.

Everything here reads and writes sysfs below a root given as a parameter (``/sys`` in production, a fake
tree in a temporary directory in the tests) and is blocking: the runner calls it through
``trio.to_thread.run_sync``. Nothing here is called at import time.

Discovery (``discover_gpus``). A GPU is a PCI device of the display class (class code ``0x03xxxx``) of any
vendor; NVIDIA (vendor ``0x10de``) is the usual case. For each one the module reads its vendor and device
ids, its current driver (the ``driver`` link), its IOMMU group (``bus/pci/devices/<addr>/iommu_group`` ->
``kernel/iommu_groups/<n>/devices/*``), the audio function beside it (same bus:slot, class ``0x0403``: the
HDMI audio of the card) and the other devices of its group. VFIO hands a whole IOMMU group to one guest:
every device of the group except PCI bridges must be bound to ``vfio-pci``. So the peers are classified:

- functions of the same card (same bus:slot: the audio function, a USB-C controller) and other GPUs of the
  group with their functions go along with the GPU (``passthrough_addresses``);
- PCI-to-PCI bridges stay with the host (the kernel allows that);
- anything else (a NIC, a disk controller, the chipset's audio) is a *blocker*: passing the group through
  would take it from the host, so the GPU is not viable.

A GPU is also not viable without an IOMMU group (IOMMU off), when it is the boot display (the host's
console), or when the ``vfio-pci`` driver is not loaded. ``problems`` says which, in words; ``viable`` is
"no problems".

GPU ids. ``gpu_id`` is the GPU's position in PCI address order among the devices returned. NVML numbers
NVIDIA GPUs in the same order, so on a node whose display devices are all NVIDIA the ids equal nvidia-smi's
indices before any GPU is bound to ``vfio-pci`` (NVML no longer sees a bound GPU and renumbers the rest; the
ids here do not move). On a node with another display device (a BMC's ASPEED VGA) pass
``vendors={NVIDIA_VENDOR}`` to keep the two numberings equal.

Binding (``bind_to_vfio`` / ``restore``). Through sysfs writes, each one logged: ``driver_override``, the
current driver's ``unbind``, ``drivers_probe``, and, if the probe did not attach the wanted driver, that
driver's ``bind``. Both are idempotent (a device already where it should be gets no write) and never raise
for a sysfs failure: the result names the file and the error. An unbind waits in the kernel until the
driver lets go of the device; a GPU a process holds open (``nvidia-persistenced``, a container) makes it
wait, which is why the scheduler never binds a GPU a container holds (``allocate_gpus``). ``bind_devices``
binds a GPU's whole group and puts back what it had done if one device fails.

ACS (``apply_acs_override``, setting ``VM_ACS_OVERRIDE``): "Disable ACS on PCI bridges at start-up". With
the setting off it does nothing at all. With it on, it clears the ACS Control register of the PCI bridges on
the path from the root complex to each GPU (not of every bridge of the machine, as the original did, and
without its undocumented writes to PLX switch registers), one ``setpci`` run per bridge, each logged as a
warning. What that does and does not do, so nobody turns it on by mistake: IOMMU groups are computed when
the kernel enumerates the devices, so clearing ACS later does not split or merge any group; it lets
peer-to-peer traffic between devices below the bridge go directly instead of up through the IOMMU. That
helps peer-to-peer between several GPUs of one VM, and it removes the isolation between GPUs below the same
bridge that were given to *different* VMs (one guest's GPU can reach the other's memory). Bridges without an
ACS capability, and bridges whose ACS is already off, are left alone (logged).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from kohakuriver_proto.errors import ValidationError

__all__ = [
    "NVIDIA_VENDOR",
    "VFIO_DRIVER",
    "AcsAction",
    "AcsOutcome",
    "CommandResult",
    "GpuAllocationError",
    "GpuGrant",
    "PciDevice",
    "SysfsChange",
    "VfioGpu",
    "allocate_gpus",
    "apply_acs_override",
    "bind_devices",
    "bind_to_vfio",
    "discover_gpus",
    "find_ext_capability",
    "read_device",
    "restore",
    "restore_devices",
    "run_argv",
    "vfio_driver_loaded",
]

log = logging.getLogger("kohakuriver.runner.vfio")

NVIDIA_VENDOR = 0x10DE
VFIO_DRIVER = "vfio-pci"

_CLASS_DISPLAY = 0x03  # base class: display controller (VGA 0x0300, 3D 0x0302, other 0x0380)
_CLASS_AUDIO = 0x0403  # base 0x04 multimedia, sub 0x03 audio device (HDA)
_CLASS_BRIDGES = (0x0604, 0x0609)  # PCI-to-PCI bridge, semi-transparent PCI-to-PCI bridge
_PCI_ADDRESS = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")  # VMD domains have 5 digits
_ACS_CAP_ID = 0x000D
_ACS_CONTROL = 6  # offset of the ACS Control register inside the capability
_EXT_CAP_START = 0x100


# ---------------------------------------------------------------------------------------------------------
# Running a command (argv, bounded, no shell)


@attrs.frozen
class CommandResult:
    returncode: int
    stdout: str = ""
    stderr: str = ""


#: How commands are run: argv in, result out. Tests pass a recorder.
CommandRunner = Callable[[Sequence[str]], CommandResult]


def run_argv(argv: Sequence[str], timeout: float = 10.0) -> CommandResult:
    """Run ``argv`` (looked up on PATH, no shell) with a time bound. A missing program is returncode 127,
    a time-out -1; neither raises."""
    program = shutil.which(argv[0])
    if program is None:
        return CommandResult(127, "", f"{argv[0]} not found")
    try:
        done = subprocess.run(
            [program, *argv[1:]],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(-1, "", f"{argv[0]} did not answer within {timeout:g} s")
    except OSError as exc:
        return CommandResult(126, "", f"{argv[0]}: {exc.strerror or exc}")
    return CommandResult(done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------------------------------------------------
# Reading sysfs


@attrs.frozen
class PciDevice:
    """One PCI function as sysfs shows it."""

    address: str  # domain:bus:slot.function, e.g. "0000:01:00.0"
    vendor_id: int
    device_id: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    driver: str | None
    iommu_group: int | None
    boot_vga: bool = False

    @property
    def slot(self) -> str:
        """domain:bus:slot, shared by the functions of one card."""
        return self.address.rsplit(".", 1)[0]

    @property
    def is_display(self) -> bool:
        return self.class_code >> 16 == _CLASS_DISPLAY

    @property
    def is_audio(self) -> bool:
        return self.class_code >> 8 == _CLASS_AUDIO

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 8 in _CLASS_BRIDGES

    def describe(self) -> str:
        ids = f"{self.vendor_id:04x}:{self.device_id:04x}"
        return f"{self.address} (class {self.class_code:#08x}, {ids}, {self.driver or 'no driver'})"


def _pci_root(sysfs_root: str | os.PathLike[str]) -> Path:
    return Path(sysfs_root) / "bus" / "pci"


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def _link_name(path: Path) -> str | None:
    """The last component of a symlink's target (a driver's or a group's name), None without the link."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def read_device(sysfs_root: str | os.PathLike[str], address: str) -> PciDevice | None:
    """The device at ``address``, or None when sysfs has no such device or its ids cannot be read."""
    path = _pci_root(sysfs_root) / "devices" / address
    try:
        vendor = _read_hex(path / "vendor")
        device = _read_hex(path / "device")
        class_code = _read_hex(path / "class")
    except (OSError, ValueError):
        return None
    group = _link_name(path / "iommu_group")
    try:
        boot_vga = (path / "boot_vga").read_text().strip() == "1"
    except OSError:
        boot_vga = False
    return PciDevice(
        address=address,
        vendor_id=vendor,
        device_id=device,
        class_code=class_code,
        driver=_link_name(path / "driver"),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        boot_vga=boot_vga,
    )


def _all_devices(sysfs_root: str | os.PathLike[str]) -> list[PciDevice]:
    try:
        names = sorted(p.name for p in (_pci_root(sysfs_root) / "devices").iterdir())
    except OSError:
        return []
    devices = (read_device(sysfs_root, name) for name in names if _PCI_ADDRESS.fullmatch(name))
    return [d for d in devices if d is not None]


def _group_members(sysfs_root: str | os.PathLike[str], group: int) -> list[str]:
    base = Path(sysfs_root) / "kernel" / "iommu_groups" / str(group) / "devices"
    try:
        return sorted(p.name for p in base.iterdir() if _PCI_ADDRESS.fullmatch(p.name))
    except OSError:
        return []


def vfio_driver_loaded(sysfs_root: str | os.PathLike[str] = "/sys") -> bool:
    """Whether the kernel has the ``vfio-pci`` driver (built in or loaded)."""
    return (_pci_root(sysfs_root) / "drivers" / VFIO_DRIVER).is_dir()


# ---------------------------------------------------------------------------------------------------------
# Discovery


@attrs.frozen
class VfioGpu:
    """A display-class device and what passing it through would take."""

    gpu_id: int
    device: PciDevice
    audio: PciDevice | None  # the HDMI/DP audio function of the same card
    peers: tuple[PciDevice, ...]  # every other device of the IOMMU group
    blockers: tuple[PciDevice, ...]  # peers that are neither bridges nor part of a GPU card
    problems: tuple[str, ...]

    @property
    def address(self) -> str:
        return self.device.address

    @property
    def viable(self) -> bool:
        return not self.problems

    @property
    def gpu_peers(self) -> tuple[str, ...]:
        """Other GPUs of the same IOMMU group: they can only go to the same VM as this one."""
        return tuple(p.address for p in self.peers if p.is_display)

    @property
    def passthrough_addresses(self) -> tuple[str, ...]:
        """What ``vfio-pci`` must own to pass this GPU through: its IOMMU group minus the bridges."""
        return tuple(sorted({self.address, *(p.address for p in self.peers if not p.is_bridge)}))


def discover_gpus(
    sysfs_root: str | os.PathLike[str] = "/sys", *, vendors: Collection[int] | None = None
) -> tuple[VfioGpu, ...]:
    """Every display-class PCI device (of ``vendors`` only, if given), in PCI address order."""
    devices = _all_devices(sysfs_root)
    by_address = {d.address: d for d in devices}
    display = [d for d in devices if d.is_display and (vendors is None or d.vendor_id in vendors)]
    # A display device left out by ``vendors`` is not the runner's to give away: in a group it blocks.
    gpu_slots = {d.slot for d in display}
    vfio_loaded = vfio_driver_loaded(sysfs_root)
    gpus = []
    for gpu_id, device in enumerate(display):
        audio = next((d for d in devices if d.slot == device.slot and d.is_audio), None)
        peers: list[PciDevice] = []
        if device.iommu_group is not None:
            for address in _group_members(sysfs_root, device.iommu_group):
                if address == device.address:
                    continue
                peer = by_address.get(address) or read_device(sysfs_root, address)
                if peer is not None:
                    peers.append(peer)
        blockers = tuple(p for p in peers if not p.is_bridge and p.slot not in gpu_slots)
        problems = _problems(device, blockers, vfio_loaded)
        gpus.append(VfioGpu(gpu_id, device, audio, tuple(peers), blockers, problems))
    return tuple(gpus)


def _problems(device: PciDevice, blockers: Sequence[PciDevice], vfio_loaded: bool) -> tuple[str, ...]:
    problems = []
    if device.iommu_group is None:
        problems.append("no IOMMU group: the IOMMU is off (boot with intel_iommu=on or amd_iommu=on)")
    for blocker in blockers:
        problems.append(
            f"IOMMU group {device.iommu_group} also holds {blocker.describe()}, which is not part of a GPU: "
            "passing the group through would take it from the host"
        )
    if device.boot_vga:
        problems.append("it is the boot display (the host's console)")
    if not vfio_loaded:
        problems.append(f"the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci)")
    return tuple(problems)


# ---------------------------------------------------------------------------------------------------------
# Binding


#: How sysfs is written: (path, text). Tests pass a fake kernel that records and acts on the writes.
SysfsWriter = Callable[[Path, str], None]


def write_sysfs(path: Path, text: str) -> None:
    """One ``write()`` of ``text``, as sysfs attributes want it; the file must exist (no O_CREAT)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@attrs.frozen
class SysfsChange:
    """What ``bind_to_vfio`` / ``restore`` did to one device."""

    address: str
    driver_before: str | None
    driver_after: str | None
    writes: tuple[str, ...] = ()  # "<path relative to the sysfs root> <- <text>", in order
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Writes:
    """Logs and remembers each write; turns an OSError into a named error."""

    def __init__(self, root: Path, write: SysfsWriter) -> None:
        self.root = root
        self.write_fn = write
        self.done: list[str] = []

    def __call__(self, path: Path, text: str) -> str | None:
        shown = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
        log.info("vfio: writing %r to %s", text.strip() or "(empty)", shown)
        try:
            self.write_fn(path, text)
        except OSError as exc:
            log.warning("vfio: writing %r to %s failed: %s", text.strip(), shown, exc.strerror or exc)
            return f"writing {text.strip()!r} to {shown} failed: {exc.strerror or exc}"
        self.done.append(f"{shown} <- {text.strip()}")
        return None


def _driver(root: Path, address: str) -> str | None:
    return _link_name(_pci_root(root) / "devices" / address / "driver")


def _override(root: Path, address: str) -> str | None:
    try:
        value = (_pci_root(root) / "devices" / address / "driver_override").read_text().strip()
    except OSError:
        return None
    return None if value in ("", "(null)") else value


def bind_to_vfio(
    address: str, sysfs_root: str | os.PathLike[str] = "/sys", *, write: SysfsWriter = write_sysfs
) -> SysfsChange:
    """Give ``address`` to ``vfio-pci``; ``driver_before`` is what ``restore`` needs later."""
    root = Path(sysfs_root)
    pci = _pci_root(root)
    device_dir = pci / "devices" / address
    before = _driver(root, address)
    if not device_dir.is_dir():
        return SysfsChange(address, None, None, error=f"no PCI device {address}")
    if before == VFIO_DRIVER and _override(root, address) == VFIO_DRIVER:
        return SysfsChange(address, before, before)
    if not vfio_driver_loaded(root):
        return SysfsChange(
            address, before, before, error=f"the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci)"
        )
    writes = _Writes(root, write)

    def result(error: str | None = None) -> SysfsChange:
        return SysfsChange(address, before, _driver(root, address), tuple(writes.done), error)

    # The override first: once it is set, whatever probes the device next (our drivers_probe, a hotplug,
    # the old driver's module being reloaded) can only attach vfio-pci.
    if _override(root, address) != VFIO_DRIVER and (
        error := writes(device_dir / "driver_override", VFIO_DRIVER)
    ):
        return result(error)
    if before not in (None, VFIO_DRIVER) and (error := writes(device_dir / "driver" / "unbind", address)):
        return result(error)
    if _driver(root, address) != VFIO_DRIVER:
        if error := writes(pci / "drivers_probe", address):
            return result(error)
        if _driver(root, address) != VFIO_DRIVER and (
            error := writes(pci / "drivers" / VFIO_DRIVER / "bind", address)
        ):
            return result(error)
    now = _driver(root, address)
    if now != VFIO_DRIVER:
        return result(
            f"{address} is bound to {now or 'no driver'} after drivers_probe and bind, not {VFIO_DRIVER}"
        )
    log.info("vfio: %s is bound to %s (was %s)", address, VFIO_DRIVER, before or "unbound")
    return result()


def restore(
    address: str,
    original_driver: str | None,
    sysfs_root: str | os.PathLike[str] = "/sys",
    *,
    write: SysfsWriter = write_sysfs,
) -> SysfsChange:
    """Give ``address`` back to ``original_driver`` (None: leave it without a driver) and clear the
    override, so the next probe picks the device's own driver again."""
    root = Path(sysfs_root)
    pci = _pci_root(root)
    device_dir = pci / "devices" / address
    before = _driver(root, address)
    if not device_dir.is_dir():
        return SysfsChange(address, None, None, error=f"no PCI device {address}")
    if before == original_driver and _override(root, address) is None:
        return SysfsChange(address, before, before)
    writes = _Writes(root, write)

    def result(error: str | None = None) -> SysfsChange:
        return SysfsChange(address, before, _driver(root, address), tuple(writes.done), error)

    # An empty write clears driver_override (the kernel takes a lone newline as "none").
    if _override(root, address) is not None and (error := writes(device_dir / "driver_override", "\n")):
        return result(error)
    if (
        before is not None
        and before != original_driver
        and (error := writes(device_dir / "driver" / "unbind", address))
    ):
        return result(error)
    if original_driver is None:
        return result()
    if _driver(root, address) != original_driver:
        if error := writes(pci / "drivers_probe", address):
            return result(error)
        if _driver(root, address) != original_driver:
            bind_file = pci / "drivers" / original_driver / "bind"
            if not bind_file.parent.is_dir():
                return result(f"driver {original_driver} is not loaded; {address} is left without a driver")
            if error := writes(bind_file, address):
                return result(error)
    now = _driver(root, address)
    if now != original_driver:
        return result(
            f"{address} is bound to {now or 'no driver'} after drivers_probe and bind, not {original_driver}"
        )
    log.info("vfio: %s is back on %s", address, original_driver)
    return result()


def bind_devices(
    addresses: Iterable[str], sysfs_root: str | os.PathLike[str] = "/sys", *, write: SysfsWriter = write_sysfs
) -> tuple[list[SysfsChange], str | None]:
    """Bind every address (a GPU's ``passthrough_addresses``) or none: when one fails, the ones already
    changed are restored. Returns the changes (``driver_before`` of each is what ``restore`` needs) and the
    error, None on success."""
    changes: list[SysfsChange] = []
    for address in addresses:
        change = bind_to_vfio(address, sysfs_root, write=write)
        changes.append(change)
        if not change.ok:
            for done in reversed(changes[:-1]):
                if done.driver_before != VFIO_DRIVER:
                    restore(done.address, done.driver_before, sysfs_root, write=write)
            return changes, change.error
    return changes, None


def restore_devices(
    originals: Mapping[str, str | None],
    sysfs_root: str | os.PathLike[str] = "/sys",
    *,
    write: SysfsWriter = write_sysfs,
) -> list[SysfsChange]:
    """``restore`` each address to its original driver; one failure does not stop the others."""
    return [restore(address, driver, sysfs_root, write=write) for address, driver in originals.items()]


# ---------------------------------------------------------------------------------------------------------
# ACS


def find_ext_capability(config: bytes, cap_id: int) -> int | None:
    """Offset of the PCIe extended capability ``cap_id`` in a device's config space, None when absent.

    Only meaningful for a full 4 KiB config space: sysfs shows a non-root reader the first 64 bytes.
    """
    offset = _EXT_CAP_START
    seen: set[int] = set()
    while _EXT_CAP_START <= offset <= len(config) - 4 and offset not in seen:
        seen.add(offset)
        header = int.from_bytes(config[offset : offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            return None
        if header & 0xFFFF == cap_id:
            return offset
        offset = (header >> 20) & 0xFFC
    return None


class AcsOutcome(enum.StrEnum):
    DISABLED = "disabled"
    ALREADY_OFF = "already off"
    NO_ACS = "no ACS capability"
    UNREADABLE = "config space unreadable"
    FAILED = "failed"


@attrs.frozen
class AcsAction:
    """What ``apply_acs_override`` did to one bridge."""

    bridge: str
    gpus: tuple[str, ...]  # the GPUs below it
    outcome: AcsOutcome
    detail: str = ""


def _upstream_bridges(sysfs_root: Path, address: str) -> list[str]:
    """The PCI functions on the path from the root complex to ``address`` (its parents in sysfs)."""
    try:
        real = Path(os.path.realpath(_pci_root(sysfs_root) / "devices" / address))
    except OSError:
        return []
    return [part for part in real.parts[:-1] if _PCI_ADDRESS.fullmatch(part)]


def apply_acs_override(
    enabled: bool,
    sysfs_root: str | os.PathLike[str] = "/sys",
    *,
    run: CommandRunner = run_argv,
) -> list[AcsAction]:
    """``VM_ACS_OVERRIDE``: clear ACS Control on the bridges above each GPU (see the module docstring for
    what that weakens). Off: nothing is read, run or written."""
    if not enabled:
        return []
    root = Path(sysfs_root)
    below: dict[str, list[str]] = {}
    for gpu in discover_gpus(root):
        for address in _upstream_bridges(root, gpu.address):
            below.setdefault(address, []).append(gpu.address)
    actions = []
    for bridge, gpus in sorted(below.items()):
        device = read_device(root, bridge)
        if device is None or not device.is_bridge:
            continue
        action = _clear_acs(root, bridge, tuple(gpus), run)
        level = logging.WARNING if action.outcome is AcsOutcome.DISABLED else logging.INFO
        log.log(
            level,
            "VM_ACS_OVERRIDE: bridge %s above %s: %s%s",
            bridge,
            ", ".join(gpus),
            action.outcome.value,
            f" ({action.detail})" if action.detail else "",
        )
        actions.append(action)
    if not actions:
        log.info("VM_ACS_OVERRIDE: no PCI bridge above a GPU; nothing changed")
    return actions


def _clear_acs(root: Path, bridge: str, gpus: tuple[str, ...], run: CommandRunner) -> AcsAction:
    try:
        config = (_pci_root(root) / "devices" / bridge / "config").read_bytes()
    except OSError as exc:
        return AcsAction(bridge, gpus, AcsOutcome.UNREADABLE, str(exc.strerror or exc))
    if len(config) < _EXT_CAP_START + 4:
        return AcsAction(
            bridge,
            gpus,
            AcsOutcome.UNREADABLE,
            f"only {len(config)} bytes readable (the runner is not root?)",
        )
    offset = find_ext_capability(config, _ACS_CAP_ID)
    if offset is None:
        return AcsAction(bridge, gpus, AcsOutcome.NO_ACS)
    register = offset + _ACS_CONTROL
    control = int.from_bytes(config[register : register + 2], "little")
    if control == 0:
        return AcsAction(bridge, gpus, AcsOutcome.ALREADY_OFF)
    argv = ["setpci", "-s", bridge, f"{register:#x}.w=0000"]
    done = run(argv)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        return AcsAction(bridge, gpus, AcsOutcome.FAILED, f"{' '.join(argv)}: {why}")
    return AcsAction(bridge, gpus, AcsOutcome.DISABLED, f"ACS Control at {register:#x} was {control:#06x}")


# ---------------------------------------------------------------------------------------------------------
# Allocation: one GPU, one owner kind


class GpuAllocationError(ValidationError):
    """A GPU request the node cannot grant; ``field`` is the request's GPU field."""


@attrs.frozen
class GpuGrant:
    gpu_ids: tuple[int, ...]
    bind_addresses: tuple[str, ...]  # for a VM: what vfio-pci must own; empty for a container


def allocate_gpus(
    kind: str,
    requested: Iterable[int],
    vfio_gpus: Sequence[VfioGpu],
    *,
    held_by_containers: Collection[int] = (),
    held_by_vms: Collection[int] = (),
    field: str = "required_gpus",
) -> GpuGrant:
    """Check a GPU request of ``kind`` ("container" or "vm") against what is held. Pure.

    A GPU held by a VM never goes to a container, and a GPU held by a container or another VM never goes to
    a VM. A VM also needs each GPU discovered and viable, and asks for the GPUs that share an IOMMU group
    together (they can only be passed through together). Raises ``GpuAllocationError`` naming the GPU and
    the reason; returns the ids and, for a VM, the PCI addresses to bind.
    """
    if kind not in ("container", "vm"):
        raise ValueError(f"kind must be 'container' or 'vm', got {kind!r}")
    wanted = sorted(set(requested))
    vm_held = set(held_by_vms)
    if kind == "container":
        taken = [i for i in wanted if i in vm_held]
        if taken:
            raise GpuAllocationError(field, f"GPU {_ids(taken)} passed through to a VM")
        return GpuGrant(tuple(wanted), ())
    container_held = set(held_by_containers)
    by_id = {gpu.gpu_id: gpu for gpu in vfio_gpus}
    by_address = {gpu.address: gpu for gpu in vfio_gpus}
    problems = []
    for gpu_id in wanted:
        gpu = by_id.get(gpu_id)
        if gpu is None:
            problems.append(f"GPU {gpu_id} is not a GPU of this node (its GPUs: {_ids(sorted(by_id))})")
        elif gpu_id in container_held:
            problems.append(f"GPU {gpu_id} is in use by a container")
        elif gpu_id in vm_held:
            problems.append(f"GPU {gpu_id} is in use by another VM")
        elif not gpu.viable:
            problems.append(f"GPU {gpu_id} cannot be passed through: {'; '.join(gpu.problems)}")
        else:
            mates = sorted(by_address[a].gpu_id for a in gpu.gpu_peers if a in by_address)
            missing = [m for m in mates if m not in wanted]
            if missing:
                problems.append(
                    f"GPU {gpu_id} shares IOMMU group {gpu.device.iommu_group} with GPU {_ids(missing)}: "
                    "ask for them together"
                )
    if problems:
        raise GpuAllocationError(field, "; ".join(problems))
    addresses = sorted({a for gpu_id in wanted for a in by_id[gpu_id].passthrough_addresses})
    return GpuGrant(tuple(wanted), tuple(addresses))


def _ids(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in ids) or "none"
