"""VM capability: the pure decision over every combination of facts and VM_ACCEL, the gatherer against
fake trees and fake binaries, and once against this machine."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from kohakuriver_runner import vm_capability
from kohakuriver_runner.vfio import CommandResult, run_argv
from kohakuriver_runner.vm_capability import (
    Accel,
    ToolFact,
    VmFacts,
    decide,
    find_ovmf,
    gather_facts,
    parse_dpkg_version,
    parse_version,
)

from .fake_sysfs import FakeSysfs

QEMU = ToolFact("/usr/bin/qemu-system-x86_64", "10.0.2 (Debian 1:10.0.2+ds-2)")
QEMU_IMG = ToolFact("/usr/bin/qemu-img", "10.0.2 (Debian 1:10.0.2+ds-2)")
OVMF = {"ovmf_code": "/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf_vars": "/usr/share/OVMF/OVMF_VARS_4M.fd"}


def facts(**changes) -> VmFacts:
    base = {
        "modules": {"kvm", "kvm_intel"},
        "dev_kvm_present": True,
        "qemu_system": QEMU,
        "qemu_img": QEMU_IMG,
        **OVMF,
    }
    return VmFacts(**{**base, **changes})


# -- the decision -----------------------------------------------------------------------------------------


def test_every_combination():
    module_sets = [
        set(c)
        for n in range(5)
        for c in itertools.combinations(["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"], n)
    ]
    dev_states = [(False, None), (True, None), (True, "Permission denied")]
    qemus = [
        QEMU,
        ToolFact(),
        ToolFact("/usr/bin/qemu-system-x86_64", None, "error while loading shared libraries"),
    ]
    imgs = [QEMU_IMG, ToolFact()]
    ovmfs = [OVMF, {"ovmf_code": None, "ovmf_vars": None}]
    seen = 0
    for modules, (present, error), qemu, img, ovmf, setting in itertools.product(
        module_sets, dev_states, qemus, imgs, ovmfs, ["auto", "kvm", "tcg"]
    ):
        f = VmFacts(
            modules=modules,
            dev_kvm_present=present,
            dev_kvm_error=error,
            qemu_system=qemu,
            qemu_img=img,
            **ovmf,
        )
        cap = decide(f, setting)
        hardware = bool(modules & {"kvm_intel", "kvm_amd"})
        kvm_usable = hardware and present and error is None
        tools_ok = qemu.version is not None and img.version is not None
        context = (modules, present, error, qemu, img, ovmf, setting, cap)

        expected_accel = {"tcg": Accel.TCG, "kvm": Accel.KVM}.get(
            setting, Accel.KVM if kvm_usable else Accel.TCG
        )
        assert cap.accel is expected_accel, context
        assert cap.capable == (tools_ok and (kvm_usable or setting != "kvm")), context
        assert cap.reason and cap.reason == cap.reason.strip(), context
        # Never a silent fallback: forced KVM that is not usable is refused, with the reason.
        if setting == "kvm" and not kvm_usable:
            assert not cap.capable and "VM_ACCEL is kvm but" in cap.reason, context
        if cap.capable:
            assert ("using KVM" if cap.accel is Accel.KVM else "using TCG") in cap.reason, context
        # The kvm_pvm case is named whenever it is what stands in the way of KVM.
        if not hardware and "kvm_pvm" in modules and present and setting != "tcg":
            assert "/dev/kvm is kvm_pvm: stock guests hang under it" in cap.reason, context
        if qemu.path is None:
            assert cap.reason.startswith("qemu-system-x86_64 not found"), context
        if img.path is None:
            assert "qemu-img not found" in cap.reason, context
        if error is not None and hardware and setting != "tcg":
            assert error in cap.reason, context
        assert ("no OVMF firmware" in cap.reason) == (ovmf["ovmf_code"] is None), context
        assert (cap.qemu_version, cap.qemu_img_version) == (qemu.version, img.version)
        assert (cap.ovmf_code, cap.ovmf_vars) == (ovmf["ovmf_code"], ovmf["ovmf_vars"])
        seen += 1
    assert seen == 16 * 3 * 3 * 2 * 2 * 3


@pytest.mark.parametrize(
    ("changes", "setting", "capable", "accel", "reason"),
    [
        ({}, "auto", True, "kvm", "kvm_intel is loaded and /dev/kvm is usable; using KVM"),
        (
            {"modules": {"kvm", "kvm_amd"}},
            "kvm",
            True,
            "kvm",
            "VM_ACCEL is kvm: kvm_amd is loaded and /dev/kvm is usable; using KVM",
        ),
        ({}, "tcg", True, "tcg", "VM_ACCEL is tcg; using TCG"),
        (
            {"modules": {"kvm", "kvm_pvm"}},
            "auto",
            True,
            "tcg",
            "/dev/kvm is kvm_pvm: stock guests hang under it; using TCG",
        ),
        (
            {"modules": {"kvm", "kvm_pvm"}},
            "kvm",
            False,
            "kvm",
            "VM_ACCEL is kvm but /dev/kvm is kvm_pvm: stock guests hang under it",
        ),
        (
            {"modules": set(), "dev_kvm_present": False},
            "auto",
            True,
            "tcg",
            "no kvm_intel or kvm_amd module and no /dev/kvm (no hardware virtualisation); using TCG",
        ),
        (
            {"dev_kvm_present": False},
            "auto",
            True,
            "tcg",
            "kvm_intel is loaded but /dev/kvm is missing; using TCG",
        ),
        (
            {"dev_kvm_error": "Permission denied"},
            "auto",
            True,
            "tcg",
            "kvm_intel is loaded but /dev/kvm cannot be opened read-write (Permission denied); using TCG",
        ),
        (
            {"modules": {"kvm", "kvm_other"}},
            "auto",
            True,
            "tcg",
            "/dev/kvm comes from neither kvm_intel nor kvm_amd (modules: kvm_other); using TCG",
        ),
        (
            {"modules": {"kvm", "kvm_pvm"}, "qemu_system": ToolFact()},
            "auto",
            False,
            "tcg",
            "qemu-system-x86_64 not found; /dev/kvm is kvm_pvm: stock guests hang under it; using TCG",
        ),
        (
            {"qemu_img": ToolFact("/usr/bin/qemu-img", None, "exit status 1")},
            "tcg",
            False,
            "tcg",
            "qemu-img does not work (exit status 1); VM_ACCEL is tcg; using TCG",
        ),
        (
            {"ovmf_code": None, "ovmf_vars": None},
            "tcg",
            True,
            "tcg",
            "VM_ACCEL is tcg; using TCG; no OVMF firmware: only images that boot through BIOS can run",
        ),
    ],
)
def test_reasons(changes, setting, capable, accel, reason):
    cap = decide(facts(**changes), setting)
    assert (cap.capable, cap.accel.value, cap.reason) == (capable, accel, reason)


def test_bad_setting():
    with pytest.raises(ValueError, match="VM_ACCEL must be one of auto, kvm, tcg, got 'hvf'"):
        decide(facts(), "hvf")


# -- parsing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "version"),
    [
        (
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"
            "Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
            "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
        ),
        (
            "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright ...\n",
            "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
        ),
        ("QEMU emulator version 8.2.0\nCopyright (c) 2003-2023\n", "8.2.0"),
        ("something else\n", None),
        ("", None),
    ],
)
def test_parse_version(output, version):
    assert parse_version(output) == version


def test_parse_dpkg_version():
    status = (
        "Package: ovmf-ia32\nStatus: install ok installed\nVersion: 1\n\n"
        "Package: ovmf\nStatus: install ok installed\nPriority: optional\n"
        "Description: UEFI firmware\n continued: not a field\nVersion: 2022.11-6+deb12u2\n\n"
        "Package: qemu-efi\nStatus: deinstall ok config-files\nVersion: 3\n"
    )
    assert parse_dpkg_version(status, "ovmf") == "2022.11-6+deb12u2"
    assert parse_dpkg_version(status, "qemu-efi") is None  # removed, config files left
    assert parse_dpkg_version(status, "absent") is None


# -- OVMF -------------------------------------------------------------------------------------------------


def descriptor(path: Path, code: Path, vars_: Path, features=(), arch="x86_64", device="flash") -> None:
    path.write_text(
        json.dumps(
            {
                "interface-types": ["uefi"],
                "mapping": {
                    "device": device,
                    "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(vars_), "format": "raw"},
                },
                "targets": [{"architecture": arch, "machines": ["pc-q35-*"]}],
                "features": list(features),
            }
        )
    )


def test_find_ovmf_from_descriptors(tmp_path):
    fw = tmp_path / "OVMF"
    fw.mkdir()
    for name in ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"):
        (fw / name).write_bytes(b"\0")
    package, admin = tmp_path / "share", tmp_path / "etc"
    package.mkdir()
    admin.mkdir()
    descriptor(
        package / "10-secure.json",
        fw / "OVMF_CODE_4M.secboot.fd",
        fw / "OVMF_VARS_4M.ms.fd",
        ["secure-boot", "enrolled-keys"],
    )
    descriptor(package / "20-arm.json", fw / "OVMF_CODE_4M.fd", fw / "OVMF_VARS_4M.fd", arch="aarch64")
    descriptor(package / "30-memory.json", fw / "OVMF_CODE_4M.fd", fw / "OVMF_VARS_4M.fd", device="memory")
    descriptor(package / "60-plain.json", fw / "OVMF_CODE_4M.fd", fw / "OVMF_VARS_4M.fd")
    (package / "05-broken.json").write_text("{not json")
    assert find_ovmf([admin, package], ()) == (str(fw / "OVMF_CODE_4M.fd"), str(fw / "OVMF_VARS_4M.fd"))
    # An admin's file of the same name hides the package's: here it turns the plain one off.
    (admin / "60-plain.json").write_text("{}")
    assert find_ovmf([admin, package], ()) == (None, None)


def test_find_ovmf_from_file_names(tmp_path):
    code, vars_ = tmp_path / "OVMF_CODE.fd", tmp_path / "OVMF_VARS.fd"
    candidates = [
        (str(tmp_path / "OVMF_CODE_4M.fd"), str(tmp_path / "OVMF_VARS_4M.fd")),
        (str(code), str(vars_)),
    ]
    assert find_ovmf([tmp_path / "none"], candidates) == (None, None)
    code.write_bytes(b"\0")
    assert find_ovmf([], candidates) == (str(code), None)
    vars_.write_bytes(b"\0")
    assert find_ovmf([], candidates) == (str(code), str(vars_))


# -- gathering --------------------------------------------------------------------------------------------


def fake_binary(path: Path, script: str) -> str:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def machine(tmp_path):
    """A fake sysfs with kvm_pvm, a /dev/kvm stand-in, fake QEMU binaries, OVMF files and a dpkg status."""
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.module("kvm")
    sysfs.module("kvm_pvm")
    sysfs.module("vfio")  # not a kvm module: ignored
    dev_kvm = tmp_path / "kvm"
    dev_kvm.write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = fake_binary(
        bin_dir / "qemu-system-x86_64", "echo 'QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)'"
    )
    img = fake_binary(bin_dir / "qemu-img", "echo 'qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)'")
    code, vars_ = tmp_path / "OVMF_CODE_4M.fd", tmp_path / "OVMF_VARS_4M.fd"
    code.write_bytes(b"\0")
    vars_.write_bytes(b"\0")
    status = tmp_path / "status"
    status.write_text("Package: ovmf\nStatus: install ok installed\nVersion: 2025.02-8\n")
    return {
        "sysfs": sysfs,
        "kwargs": {
            "sysfs_root": sysfs.root,
            "dev_kvm": str(dev_kvm),
            "qemu_system": qemu,
            "qemu_img": img,
            "descriptor_dirs": [],
            "ovmf_candidates": [(str(code), str(vars_))],
            "dpkg_status": status,
        },
    }


def test_gather_from_a_fake_machine(machine):
    sysfs = machine["sysfs"]
    sysfs.device("0000:01:00.0", 0x030200, group=4, driver="nvidia")
    found = gather_facts(**machine["kwargs"])
    assert found.modules == {"kvm", "kvm_pvm"}
    assert (found.dev_kvm_present, found.dev_kvm_error) == (True, None)
    assert found.qemu_system.version == found.qemu_img.version == "10.0.2 (Debian 1:10.0.2+ds-2)"
    assert found.ovmf_code.endswith("OVMF_CODE_4M.fd") and found.ovmf_vars.endswith("OVMF_VARS_4M.fd")
    assert found.ovmf_version == "2025.02-8"
    assert [g.address for g in found.vfio_gpus] == ["0000:01:00.0"]
    cap = decide(found)
    assert (cap.capable, cap.accel) == (True, Accel.TCG)
    assert cap.reason == "/dev/kvm is kvm_pvm: stock guests hang under it; using TCG"
    assert not cap.vfio_gpus[0].viable  # vfio-pci is not loaded in this tree

    sysfs.module("kvm_intel")
    assert decide(gather_facts(**machine["kwargs"])).accel is Accel.KVM


def test_gather_without_qemu(machine, tmp_path):
    kwargs = {
        **machine["kwargs"],
        "qemu_system": "kohakuriver-no-qemu-system",
        "dev_kvm": str(tmp_path / "no-kvm"),
    }
    found = gather_facts(**kwargs)
    assert found.qemu_system == ToolFact()
    assert found.dev_kvm_present is False
    cap = decide(found)
    assert not cap.capable
    assert cap.reason.startswith("qemu-system-x86_64 not found")
    assert cap.qemu_version is None and cap.qemu_img_version is not None


def test_gather_with_broken_binaries(machine, tmp_path):
    broken = fake_binary(
        tmp_path / "bin" / "broken", "echo 'qemu: error while loading shared libraries' >&2; exit 127"
    )
    silent = fake_binary(tmp_path / "bin" / "silent", "echo hello")
    slow = fake_binary(tmp_path / "bin" / "slow", "exec sleep 5")
    found = gather_facts(**{**machine["kwargs"], "qemu_system": broken, "qemu_img": silent})
    assert found.qemu_system.error == "qemu: error while loading shared libraries"
    assert found.qemu_img.error == "no version in its --version output"
    cap = decide(found)
    assert cap.reason.startswith(
        "qemu-system-x86_64 does not work (qemu: error while loading shared libraries); "
        "qemu-img does not work (no version in its --version output)"
    )
    bounded = gather_facts(**{**machine["kwargs"], "qemu_img": slow}, run=lambda argv: run_argv(argv, 0.3))
    assert bounded.qemu_img.error == f"{slow} did not answer within 0.3 s"


def test_gather_records_why_dev_kvm_does_not_open(machine, tmp_path):
    directory = tmp_path / "kvm-dir"  # os.open(O_RDWR) on a directory fails whoever we are
    directory.mkdir()
    found = gather_facts(**{**machine["kwargs"], "dev_kvm": str(directory)})
    assert found.dev_kvm_present and found.dev_kvm_error == "Is a directory"
    machine["sysfs"].module("kvm_amd")
    cap = decide(gather_facts(**{**machine["kwargs"], "dev_kvm": str(directory)}), "kvm")
    assert not cap.capable
    assert (
        cap.reason
        == "VM_ACCEL is kvm but kvm_amd is loaded but /dev/kvm cannot be opened read-write (Is a directory)"
    )


def test_gather_passes_argv_lists_to_the_runner(machine):
    calls = []

    def run(argv):
        calls.append(list(argv))
        return CommandResult(0, "QEMU emulator version 9.1.0\n")

    gather_facts(**machine["kwargs"], run=run)
    assert calls == [
        [machine["kwargs"]["qemu_system"], "--version"],
        [machine["kwargs"]["qemu_img"], "--version"],
    ]


def test_this_machine():
    """The real sysfs, /dev/kvm and PATH. Where /dev/kvm comes from kvm_pvm (this project's CI machines),
    VMs must run under TCG and say why."""
    cap = vm_capability.detect("auto")
    modules = {p.name for p in Path("/sys/module").iterdir()} if Path("/sys/module").is_dir() else set()
    hardware = bool(modules & {"kvm_intel", "kvm_amd"})
    if "kvm_pvm" in modules and not hardware:
        assert cap.accel is Accel.TCG
        assert "/dev/kvm is kvm_pvm: stock guests hang under it; using TCG" in cap.reason
    if shutil.which("qemu-system-x86_64") is None:
        assert not cap.capable
        assert cap.reason.startswith("qemu-system-x86_64 not found")
    else:
        assert cap.qemu_version is not None and cap.qemu_version[0].isdigit()
        if cap.accel is Accel.TCG and shutil.which("qemu-img") is not None:
            assert cap.capable, cap.reason
    forced = vm_capability.detect("kvm")
    if not hardware:
        assert not forced.capable and "VM_ACCEL is kvm but" in forced.reason
