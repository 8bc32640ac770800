"""Whether this runner can run QEMU VMs, with which accelerator, and why.

Two halves. ``gather_facts`` looks at the machine: the kvm modules in ``<sysfs>/module``, whether ``/dev/kvm``
opens read-write, ``qemu-system-x86_64 --version`` and ``qemu-img --version`` (argv, no shell, bounded), the
OVMF firmware files, the VFIO GPUs (``vfio.discover_gpus``). It blocks (two subprocesses, sysfs reads): the
runner calls it through ``trio.to_thread.run_sync``, once at start. ``decide`` is pure: facts and the
``VM_ACCEL`` setting in, a ``VmCapability`` out, every outcome explained in ``reason``.

Why ``/dev/kvm`` is not enough (DESIGN section 11): a machine can offer ``/dev/kvm`` from ``kvm_pvm``, a
paging-based hypervisor for nested use. ``KVM_CREATE_VM`` works there and QEMU reports KVM enabled, but a
stock guest kernel hangs during boot (it needs a PVM guest kernel, which distributions do not ship). So KVM
is used only where ``kvm_intel`` or ``kvm_amd`` is loaded (``<sysfs>/module/kvm_intel`` or ``kvm_amd``
exists; the kernel shows built-in modules with parameters there too) *and* ``/dev/kvm`` opens read-write.
Everywhere else the accelerator is TCG (QEMU's own translator: slower, always available).

``VM_ACCEL``: ``auto`` picks as above; ``tcg`` always uses TCG; ``kvm`` insists on KVM, and where KVM is not
usable the runner reports itself not VM-capable with the reason, never quietly falling back to TCG (a
VM that should take seconds to boot would take minutes, with nobody told why).

The runner is VM-capable when ``qemu-system-x86_64`` and ``qemu-img`` answer ``--version`` and the chosen
accelerator is usable. OVMF is not required: images that boot through BIOS need none; without it a UEFI
image cannot boot, which ``reason`` says.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from . import vfio
from .vfio import CommandRunner, VfioGpu, run_argv

__all__ = [
    "ACCEL_SETTINGS",
    "Accel",
    "ToolFact",
    "VmCapability",
    "VmFacts",
    "decide",
    "detect",
    "find_ovmf",
    "gather_facts",
    "parse_dpkg_version",
    "parse_version",
]

log = logging.getLogger("kohakuriver.runner.vm_capability")

#: The values of the ``VM_ACCEL`` setting.
ACCEL_SETTINGS = ("auto", "kvm", "tcg")

#: The kvm modules that run stock guests. Anything else providing /dev/kvm (kvm_pvm) does not.
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")

#: ``--version`` answers at once; a hung binary must not hold up the runner's start.
VERSION_TIMEOUT = 10.0

#: Where distributions put OVMF, best first: (code, vars) pairs. Debian/Ubuntu, Fedora, Arch.
OVMF_CANDIDATES = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),
)

#: QEMU's firmware descriptor directories (docs/interop/firmware.json), the admin's first.
FIRMWARE_DESCRIPTOR_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")

#: Firmware builds a plain VM should not get: secure boot with enrolled keys refuses unsigned boot loaders,
#: the confidential-computing builds need matching machine options.
_SPECIAL_FEATURES = frozenset(
    {"secure-boot", "enrolled-keys", "amd-sev", "amd-sev-es", "amd-sev-snp", "intel-tdx"}
)


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


# ---------------------------------------------------------------------------------------------------------
# Facts


@attrs.frozen
class ToolFact:
    """A binary: where it is (None = not on PATH), its version, or why asking for it failed."""

    path: str | None = None
    version: str | None = None
    error: str | None = None


@attrs.frozen(kw_only=True)
class VmFacts:
    """What ``gather_facts`` found; built by hand in the tests."""

    modules: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)  # kvm* in <sysfs>/module
    dev_kvm_present: bool = False
    dev_kvm_error: str | None = None  # why /dev/kvm did not open read-write; None when it did (or is absent)
    qemu_system: ToolFact = ToolFact()
    qemu_img: ToolFact = ToolFact()
    ovmf_code: str | None = None
    ovmf_vars: str | None = None
    ovmf_version: str | None = None
    vfio_gpus: tuple[VfioGpu, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen(kw_only=True)
class VmCapability:
    """What a runner reports about VMs."""

    capable: bool
    accel: Accel  # what VMs run (or would run) with
    reason: str  # one or more sentences joined by "; ": the accelerator's why, and what is missing
    qemu_version: str | None
    qemu_img_version: str | None
    ovmf_code: str | None
    ovmf_vars: str | None
    ovmf_version: str | None
    vfio_gpus: tuple[VfioGpu, ...]


# ---------------------------------------------------------------------------------------------------------
# The decision (pure)


def _kvm_verdict(facts: VmFacts) -> tuple[bool, str]:
    """(whether KVM can run stock guests here, why in words)."""
    hardware = [m for m in HARDWARE_KVM_MODULES if m in facts.modules]
    if hardware:
        if not facts.dev_kvm_present:
            return False, f"{hardware[0]} is loaded but /dev/kvm is missing"
        if facts.dev_kvm_error is not None:
            return (
                False,
                f"{hardware[0]} is loaded but /dev/kvm cannot be opened read-write ({facts.dev_kvm_error})",
            )
        return True, f"{hardware[0]} is loaded and /dev/kvm is usable"
    if "kvm_pvm" in facts.modules and facts.dev_kvm_present:
        return False, "/dev/kvm is kvm_pvm: stock guests hang under it"
    if facts.dev_kvm_present:
        others = sorted(m for m in facts.modules if m != "kvm")
        provider = f" (modules: {', '.join(others)})" if others else ""
        return False, f"/dev/kvm comes from neither kvm_intel nor kvm_amd{provider}"
    return False, "no kvm_intel or kvm_amd module and no /dev/kvm (no hardware virtualisation)"


def decide(facts: VmFacts, accel_setting: str = "auto") -> VmCapability:
    """The capability ``facts`` give under ``VM_ACCEL = accel_setting``."""
    if accel_setting not in ACCEL_SETTINGS:
        raise ValueError(f"VM_ACCEL must be one of {', '.join(ACCEL_SETTINGS)}, got {accel_setting!r}")
    kvm_ok, kvm_why = _kvm_verdict(facts)
    missing: list[str] = []
    for name, tool in (("qemu-system-x86_64", facts.qemu_system), ("qemu-img", facts.qemu_img)):
        if tool.path is None:
            missing.append(f"{name} not found")
        elif tool.version is None:
            missing.append(f"{name} does not work ({tool.error or 'no version'})")

    if accel_setting == "tcg":
        accel, accel_why = Accel.TCG, "VM_ACCEL is tcg; using TCG"
    elif accel_setting == "kvm":
        accel = Accel.KVM
        if kvm_ok:
            accel_why = f"VM_ACCEL is kvm: {kvm_why}; using KVM"
        else:
            # Refuse rather than fall back: the admin asked for KVM and must hear that it is not there.
            missing.append(f"VM_ACCEL is kvm but {kvm_why}")
            accel_why = ""
    elif kvm_ok:
        accel, accel_why = Accel.KVM, f"{kvm_why}; using KVM"
    else:
        accel, accel_why = Accel.TCG, f"{kvm_why}; using TCG"

    notes = [*missing]
    if accel_why:
        notes.append(accel_why)
    if facts.ovmf_code is None:
        notes.append("no OVMF firmware: only images that boot through BIOS can run")
    return VmCapability(
        capable=not missing,
        accel=accel,
        reason="; ".join(notes),
        qemu_version=facts.qemu_system.version,
        qemu_img_version=facts.qemu_img.version,
        ovmf_code=facts.ovmf_code,
        ovmf_vars=facts.ovmf_vars,
        ovmf_version=facts.ovmf_version,
        vfio_gpus=facts.vfio_gpus,
    )


_VERSION = re.compile(r"\bversion\s+(\d+(?:\.\d+)+)(\s*\([^)\n]*\))?")


def parse_version(output: str) -> str | None:
    """``"10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)"`` from ``QEMU emulator version 10.0.2 (Debian ...)`` or
    ``qemu-img version 10.0.2 (...)``; None when the output has no version."""
    match = _VERSION.search(output)
    if match is None:
        return None
    return match.group(1) + (f" {match.group(2).strip()}" if match.group(2) else "")


def parse_dpkg_version(status_text: str, package: str) -> str | None:
    """The installed version of ``package`` in a dpkg status file's text, None when not installed."""
    for stanza in status_text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line[:1].isspace():
                fields[key.strip()] = value.strip()
        if fields.get("Package") == package and "installed" in fields.get("Status", "").split():
            return fields.get("Version")
    return None


# ---------------------------------------------------------------------------------------------------------
# Gathering (blocking)


def _kvm_modules(sysfs_root: Path) -> frozenset[str]:
    try:
        return frozenset(p.name for p in (sysfs_root / "module").iterdir() if p.name.startswith("kvm"))
    except OSError:
        return frozenset()


def _probe_dev_kvm(path: str) -> tuple[bool, str | None]:
    """(present, why it did not open read-write). Opening checks what QEMU will need: permission, a driver."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except OSError as exc:
        return True, exc.strerror or str(exc)
    os.close(fd)
    return True, None


def _tool(name: str, run: CommandRunner) -> ToolFact:
    path = shutil.which(name)
    if path is None:
        return ToolFact()
    done = run([path, "--version"])
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return ToolFact(path, None, why[-1] if why else f"exit status {done.returncode}")
    version = parse_version(done.stdout)
    return ToolFact(path, version, None if version else "no version in its --version output")


def find_ovmf(
    descriptor_dirs: Iterable[str | os.PathLike[str]] = FIRMWARE_DESCRIPTOR_DIRS,
    candidates: Sequence[tuple[str, str]] = OVMF_CANDIDATES,
) -> tuple[str | None, str | None]:
    """(code, vars) of a plain x86_64 UEFI firmware: from QEMU's firmware descriptors first (the package
    says what it ships), else the usual file names. (None, None) when there is none."""
    descriptors: dict[str, Path] = {}
    for directory in descriptor_dirs:  # an admin's descriptor hides the package's of the same name
        try:
            for path in Path(directory).glob("*.json"):
                descriptors.setdefault(path.name, path)
        except OSError:
            continue
    for name in sorted(descriptors):
        found = _plain_uefi_descriptor(descriptors[name])
        if found is not None:
            return found
    for code, vars_ in candidates:
        if os.path.isfile(code):
            return code, vars_ if os.path.isfile(vars_) else None
    return None, None


def _plain_uefi_descriptor(path: Path) -> tuple[str, str | None] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "uefi" not in doc.get("interface-types", []):
        return None
    if _SPECIAL_FEATURES & set(doc.get("features", [])):
        return None
    targets = doc.get("targets", [])
    if not any(isinstance(t, dict) and t.get("architecture") == "x86_64" for t in targets):
        return None
    mapping = doc.get("mapping", {})
    if (
        not isinstance(mapping, dict)
        or mapping.get("device") != "flash"
        or mapping.get("mode", "split") != "split"
    ):
        return None
    code = (mapping.get("executable") or {}).get("filename")
    vars_ = (mapping.get("nvram-template") or {}).get("filename")
    if not isinstance(code, str) or not os.path.isfile(code):
        return None
    return code, vars_ if isinstance(vars_, str) and os.path.isfile(vars_) else None


def gather_facts(
    *,
    sysfs_root: str | os.PathLike[str] = "/sys",
    dev_kvm: str = "/dev/kvm",
    qemu_system: str = "qemu-system-x86_64",
    qemu_img: str = "qemu-img",
    descriptor_dirs: Iterable[str | os.PathLike[str]] = FIRMWARE_DESCRIPTOR_DIRS,
    ovmf_candidates: Sequence[tuple[str, str]] = OVMF_CANDIDATES,
    dpkg_status: str | os.PathLike[str] = "/var/lib/dpkg/status",
    gpu_vendors: Iterable[int] | None = None,
    run: CommandRunner | None = None,
) -> VmFacts:
    """Look at this machine (blocking: call it in a thread). Binaries are names looked up on PATH or paths."""
    runner = run or (lambda argv: run_argv(argv, VERSION_TIMEOUT))
    root = Path(sysfs_root)
    present, error = _probe_dev_kvm(dev_kvm)
    code, vars_ = find_ovmf(descriptor_dirs, ovmf_candidates)
    ovmf_version = None
    if code is not None:
        # Not a dpkg system (no status file): the firmware's path is all there is to show.
        with contextlib.suppress(OSError):
            ovmf_version = parse_dpkg_version(Path(dpkg_status).read_text(errors="replace"), "ovmf")
    return VmFacts(
        modules=_kvm_modules(root),
        dev_kvm_present=present,
        dev_kvm_error=error,
        qemu_system=_tool(qemu_system, runner),
        qemu_img=_tool(qemu_img, runner),
        ovmf_code=code,
        ovmf_vars=vars_,
        ovmf_version=ovmf_version,
        vfio_gpus=vfio.discover_gpus(root, vendors=None if gpu_vendors is None else frozenset(gpu_vendors)),
    )


def detect(accel_setting: str = "auto", **gather: object) -> VmCapability:
    """``decide(gather_facts(**gather), accel_setting)``, logged once (blocking: call it in a thread)."""
    capability = decide(gather_facts(**gather), accel_setting)  # type: ignore[arg-type]
    log.info(
        "VMs: %s, accelerator %s (%s)",
        "capable" if capability.capable else "not capable",
        capability.accel.value,
        capability.reason,
    )
    return capability
