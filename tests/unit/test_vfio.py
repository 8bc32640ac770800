"""VFIO GPU discovery, binding to vfio-pci and back, VM_ACS_OVERRIDE and the container/VM GPU rule, against
fake sysfs trees (tests/unit/fake_sysfs.py): no machine running these tests has a GPU to pass through."""

from __future__ import annotations

import errno
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_runner import vfio
from kohakuriver_runner.vfio import (
    AcsOutcome,
    CommandResult,
    GpuAllocationError,
    allocate_gpus,
    apply_acs_override,
    bind_devices,
    bind_to_vfio,
    discover_gpus,
    find_ext_capability,
    restore,
    run_argv,
)

from .fake_sysfs import FakeSysfs, acs_config

VGA, GPU_3D, AUDIO, BRIDGE, NIC, USB = 0x030000, 0x030200, 0x040300, 0x060400, 0x020000, 0x0C0330
AMD, ASPEED = 0x1002, 0x1A03

GPU = "0000:01:00.0"
GPU_AUDIO = "0000:01:00.1"
ROOT_PORT = "0000:00:01.0"


@pytest.fixture
def fake(tmp_path):
    return FakeSysfs(tmp_path)


def one_gpu(fake: FakeSysfs, *, vfio_loaded: bool = True) -> None:
    """A root port and an NVIDIA card (GPU + HDMI audio) in one IOMMU group, driven by nvidia."""
    fake.device(ROOT_PORT, BRIDGE, 0x8086, 0x1901, group=1, driver="pcieport")
    fake.device(GPU, VGA, parent=ROOT_PORT, group=1, driver="nvidia", boot_vga=False)
    fake.device(GPU_AUDIO, AUDIO, device=0x1AEF, parent=ROOT_PORT, group=1, driver="snd_hda_intel")
    if vfio_loaded:
        fake.driver("vfio-pci")


# -- discovery --------------------------------------------------------------------------------------------


def test_one_gpu_with_its_audio_function(fake):
    one_gpu(fake)
    fake.device("0000:00:1f.3", AUDIO, 0x8086, 0xA348, group=9, driver="snd_hda_intel")  # chipset audio
    (gpu,) = discover_gpus(fake.root)
    assert gpu.gpu_id == 0
    assert gpu.address == GPU
    assert (gpu.device.vendor_id, gpu.device.device_id) == (vfio.NVIDIA_VENDOR, 0x2204)
    assert gpu.device.driver == "nvidia"
    assert gpu.device.iommu_group == 1
    assert gpu.audio is not None and gpu.audio.address == GPU_AUDIO  # not the chipset's audio
    assert [p.address for p in gpu.peers] == [ROOT_PORT, GPU_AUDIO]
    assert gpu.blockers == ()
    assert gpu.viable and gpu.problems == ()
    assert gpu.passthrough_addresses == (GPU, GPU_AUDIO)  # the bridge stays with the host
    assert gpu.gpu_peers == ()


def test_a_device_of_the_group_that_is_not_part_of_a_gpu_blocks_it(fake):
    one_gpu(fake)
    fake.device("0000:00:1f.6", NIC, 0x8086, 0x15BC, group=1, driver="e1000e")
    (gpu,) = discover_gpus(fake.root)
    assert not gpu.viable
    assert [b.address for b in gpu.blockers] == ["0000:00:1f.6"]
    (problem,) = gpu.problems
    assert "IOMMU group 1 also holds 0000:00:1f.6 (class 0x020000, 8086:15bc, e1000e)" in problem
    assert "take it from the host" in problem


def test_other_functions_of_the_card_go_along(fake):
    one_gpu(fake)
    fake.device("0000:01:00.2", USB, device=0x1AD6, parent=ROOT_PORT, group=1, driver="xhci_hcd")
    (gpu,) = discover_gpus(fake.root)
    assert gpu.viable
    assert gpu.passthrough_addresses == (GPU, GPU_AUDIO, "0000:01:00.2")


def test_two_gpus_sharing_a_group_are_peers(fake):
    fake.device(ROOT_PORT, BRIDGE, group=1, driver="pcieport")
    fake.device("0000:02:00.0", GPU_3D, parent=ROOT_PORT, group=1, driver="nvidia")
    fake.device("0000:03:00.0", GPU_3D, parent=ROOT_PORT, group=1, driver="nvidia")
    fake.driver("vfio-pci")
    a, b = discover_gpus(fake.root)
    assert (a.gpu_id, b.gpu_id) == (0, 1)
    assert a.gpu_peers == ("0000:03:00.0",) and b.gpu_peers == ("0000:02:00.0",)
    assert a.viable and b.viable
    assert a.passthrough_addresses == b.passthrough_addresses == ("0000:02:00.0", "0000:03:00.0")


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("no_group", "no IOMMU group: the IOMMU is off"),
        ("boot_vga", "boot display"),
        ("no_vfio", "vfio-pci driver is not loaded"),
    ],
)
def test_not_viable(fake, setup, words):
    fake.device(
        GPU, VGA, group=None if setup == "no_group" else 3, driver="nvidia", boot_vga=setup == "boot_vga"
    )
    if setup != "no_vfio":
        fake.driver("vfio-pci")
    (gpu,) = discover_gpus(fake.root)
    assert not gpu.viable
    assert len(gpu.problems) == 1 and words in gpu.problems[0]


def test_any_vendor_and_a_vendor_filter(fake):
    fake.device("0000:02:00.0", VGA, ASPEED, 0x2000, group=2, driver="ast", boot_vga=True)  # a BMC's display
    fake.device("0000:41:00.0", VGA, AMD, 0x73BF, group=5, driver="amdgpu")
    fake.device("0000:81:00.0", GPU_3D, group=7, driver="nvidia")
    fake.device("0000:41:00.1", BRIDGE, AMD, group=6)  # not display: never a GPU
    fake.driver("vfio-pci")
    every = discover_gpus(fake.root)
    assert [(g.gpu_id, g.address, g.viable) for g in every] == [
        (0, "0000:02:00.0", False),
        (1, "0000:41:00.0", True),
        (2, "0000:81:00.0", True),
    ]
    nvidia = discover_gpus(fake.root, vendors={vfio.NVIDIA_VENDOR})
    assert [(g.gpu_id, g.address) for g in nvidia] == [(0, "0000:81:00.0")]


def test_a_gpu_left_out_by_the_vendor_filter_blocks_its_group(fake):
    fake.device("0000:41:00.0", VGA, AMD, 0x73BF, group=5, driver="amdgpu")
    fake.device("0000:42:00.0", GPU_3D, group=5, driver="nvidia")
    fake.driver("vfio-pci")
    assert all(g.viable for g in discover_gpus(fake.root))
    (nvidia,) = discover_gpus(fake.root, vendors={vfio.NVIDIA_VENDOR})
    assert [b.address for b in nvidia.blockers] == ["0000:41:00.0"]


def test_no_pci_bus(tmp_path):
    assert discover_gpus(tmp_path) == ()
    assert discover_gpus(tmp_path / "absent") == ()


def test_this_machine_does_not_crash():
    # No GPUs here (and usually no IOMMU); the real sysfs must still read cleanly.
    for gpu in discover_gpus("/sys"):
        assert gpu.device.is_display


# -- binding ---------------------------------------------------------------------------------------------


def test_bind_to_vfio_and_restore(fake):
    one_gpu(fake)
    change = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert change.ok, change.error
    assert (change.driver_before, change.driver_after) == ("nvidia", "vfio-pci")
    assert fake.writes == [
        (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
        (f"bus/pci/devices/{GPU}/driver/unbind", GPU),
        ("bus/pci/drivers_probe", GPU),
    ]
    assert change.writes == tuple(f"{path} <- {text}" for path, text in fake.writes)
    assert fake.current_driver(GPU) == "vfio-pci" and fake.override(GPU) == "vfio-pci"

    fake.writes.clear()
    again = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert again.ok and again.writes == () and fake.writes == []  # idempotent

    back = restore(GPU, change.driver_before, fake.root, write=fake.kernel_write)
    assert back.ok, back.error
    assert (back.driver_before, back.driver_after) == ("vfio-pci", "nvidia")
    assert fake.writes == [
        (f"bus/pci/devices/{GPU}/driver_override", "\n"),
        (f"bus/pci/devices/{GPU}/driver/unbind", GPU),
        ("bus/pci/drivers_probe", GPU),
    ]
    assert fake.override(GPU) == "(null)"

    fake.writes.clear()
    assert restore(GPU, "nvidia", fake.root, write=fake.kernel_write).writes == ()
    assert fake.writes == []


def test_bind_logs_each_write(fake, caplog):
    one_gpu(fake)
    with caplog.at_level(logging.INFO, logger="kohakuriver.runner.vfio"):
        bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    written = [r.getMessage() for r in caplog.records if "writing" in r.getMessage()]
    assert written == [
        f"vfio: writing 'vfio-pci' to bus/pci/devices/{GPU}/driver_override",
        f"vfio: writing '{GPU}' to bus/pci/devices/{GPU}/driver/unbind",
        f"vfio: writing '{GPU}' to bus/pci/drivers_probe",
    ]


def test_bind_falls_back_to_the_drivers_bind_file(fake):
    one_gpu(fake)
    # A probe that attaches nothing (it ignores the override and the device's own driver is not loaded):
    # the driver's own bind file is the way left.
    fake.probe_ignores_override = True
    fake.own_driver[GPU] = "not-loaded"
    change = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert change.ok, change.error
    assert fake.writes[-1] == ("bus/pci/drivers/vfio-pci/bind", GPU)
    assert fake.current_driver(GPU) == "vfio-pci"


def test_an_unbound_device_is_bound_without_an_unbind(fake):
    fake.device(GPU, VGA, group=1)
    fake.driver("vfio-pci")
    change = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert change.ok and change.driver_before is None
    assert [path for path, _ in fake.writes] == [
        f"bus/pci/devices/{GPU}/driver_override",
        "bus/pci/drivers_probe",
    ]


def test_bind_errors_are_named_not_raised(fake):
    one_gpu(fake, vfio_loaded=False)
    change = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert change.error == "the vfio-pci driver is not loaded (modprobe vfio-pci)"
    assert fake.writes == [] and fake.current_driver(GPU) == "nvidia"

    assert (
        bind_to_vfio("0000:09:00.0", fake.root, write=fake.kernel_write).error == "no PCI device 0000:09:00.0"
    )

    fake.driver("vfio-pci")
    fake.fail(f"bus/pci/devices/{GPU}/driver/unbind", errno.EBUSY)
    busy = bind_to_vfio(GPU, fake.root, write=fake.kernel_write)
    assert not busy.ok
    assert (
        busy.error
        == f"writing '{GPU}' to bus/pci/devices/{GPU}/driver/unbind failed: Device or resource busy"
    )
    assert busy.driver_after == "nvidia"
    assert busy.writes == (f"bus/pci/devices/{GPU}/driver_override <- vfio-pci",)


def test_bind_with_plain_files_writes_them_and_says_the_driver_did_not_change(fake):
    """The default writer: each attribute gets the text; a tree with no kernel behind it does not rebind,
    which the result says instead of claiming success."""
    one_gpu(fake)
    change = bind_to_vfio(GPU, fake.root)
    assert change.error == f"{GPU} is bound to nvidia after drivers_probe and bind, not vfio-pci"
    assert fake.override(GPU) == "vfio-pci"
    assert (fake.pci / "drivers" / "nvidia" / "unbind").read_text() == GPU
    assert (fake.pci / "drivers_probe").read_text() == GPU
    assert (fake.pci / "drivers" / "vfio-pci" / "bind").read_text() == GPU


def test_restore_without_an_original_driver_leaves_the_device_unbound(fake):
    fake.device(GPU, VGA, group=1)
    fake.driver("vfio-pci")
    assert bind_to_vfio(GPU, fake.root, write=fake.kernel_write).ok
    fake.writes.clear()
    back = restore(GPU, None, fake.root, write=fake.kernel_write)
    assert back.ok and back.driver_after is None
    assert [path for path, _ in fake.writes] == [
        f"bus/pci/devices/{GPU}/driver_override",
        f"bus/pci/devices/{GPU}/driver/unbind",
    ]


def test_restore_to_a_driver_that_is_gone(fake):
    one_gpu(fake)
    assert bind_to_vfio(GPU, fake.root, write=fake.kernel_write).ok
    (fake.pci / "drivers" / "nvidia" / "bind").unlink()
    (fake.pci / "drivers" / "nvidia" / "unbind").unlink()
    (fake.pci / "drivers" / "nvidia").rmdir()
    back = restore(GPU, "nvidia", fake.root, write=fake.kernel_write)
    assert back.error == f"driver nvidia is not loaded; {GPU} is left without a driver"


def test_bind_devices_binds_a_whole_group_or_nothing(fake):
    one_gpu(fake)
    (gpu,) = discover_gpus(fake.root)
    changes, error = bind_devices(gpu.passthrough_addresses, fake.root, write=fake.kernel_write)
    assert error is None
    assert {c.address: c.driver_before for c in changes} == {GPU: "nvidia", GPU_AUDIO: "snd_hda_intel"}
    assert fake.current_driver(GPU) == fake.current_driver(GPU_AUDIO) == "vfio-pci"
    restored = vfio.restore_devices(
        {c.address: c.driver_before for c in changes}, fake.root, write=fake.kernel_write
    )
    assert all(c.ok for c in restored)
    assert (fake.current_driver(GPU), fake.current_driver(GPU_AUDIO)) == ("nvidia", "snd_hda_intel")

    fake.fail(f"bus/pci/devices/{GPU_AUDIO}/driver/unbind", errno.EBUSY)
    changes, error = bind_devices(gpu.passthrough_addresses, fake.root, write=fake.kernel_write)
    assert error is not None and "Device or resource busy" in error
    assert fake.current_driver(GPU) == "nvidia" and fake.override(GPU) == "(null)"  # rolled back
    assert fake.current_driver(GPU_AUDIO) == "snd_hda_intel"


# -- ACS --------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, answer: CommandResult | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answer = answer or CommandResult(0)

    def __call__(self, argv):
        self.calls.append(list(argv))
        return self.answer


def acs_tree(fake: FakeSysfs) -> None:
    """Root port (ACS on) -> switch upstream port (no ACS) -> downstream port (ACS on) -> GPU; a second root
    port whose ACS is already off -> GPU; a third root port (ACS on) above a NIC only."""
    fake.device(ROOT_PORT, BRIDGE, group=1, config=acs_config(0x001D))
    fake.device("0000:01:00.0", BRIDGE, 0x10B5, 0x8747, parent=ROOT_PORT, group=2, config=acs_config(None))
    fake.device(
        "0000:02:08.0", BRIDGE, 0x10B5, 0x8747, parent="0000:01:00.0", group=3, config=acs_config(0x001D)
    )
    fake.device("0000:03:00.0", GPU_3D, parent="0000:02:08.0", group=4, driver="nvidia")
    fake.device("0000:00:02.0", BRIDGE, group=5, config=acs_config(0))
    fake.device("0000:04:00.0", GPU_3D, parent="0000:00:02.0", group=6, driver="nvidia")
    fake.device("0000:00:03.0", BRIDGE, group=7, config=acs_config(0x001D))
    fake.device("0000:05:00.0", NIC, 0x8086, parent="0000:00:03.0", group=8, driver="ixgbe")


def test_acs_override_off_does_nothing(fake, caplog):
    acs_tree(fake)
    run = Recorder()
    with caplog.at_level(logging.DEBUG, logger="kohakuriver.runner.vfio"):
        assert apply_acs_override(False, fake.root, run=run) == []
    assert run.calls == [] and caplog.records == []


def test_acs_override_touches_only_the_bridges_above_gpus(fake, caplog):
    acs_tree(fake)
    run = Recorder()
    with caplog.at_level(logging.INFO, logger="kohakuriver.runner.vfio"):
        actions = apply_acs_override(True, fake.root, run=run)
    assert [(a.bridge, a.gpus, a.outcome) for a in actions] == [
        (ROOT_PORT, ("0000:03:00.0",), AcsOutcome.DISABLED),
        ("0000:00:02.0", ("0000:04:00.0",), AcsOutcome.ALREADY_OFF),
        ("0000:01:00.0", ("0000:03:00.0",), AcsOutcome.NO_ACS),
        ("0000:02:08.0", ("0000:03:00.0",), AcsOutcome.DISABLED),
    ]
    assert run.calls == [
        ["setpci", "-s", ROOT_PORT, "0x146.w=0000"],
        ["setpci", "-s", "0000:02:08.0", "0x146.w=0000"],
    ]
    # The NIC's root port is never touched; each bridge is logged, the two weakened ones as warnings.
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert all("0000:00:03.0" not in m for _, m in messages)
    warnings = [m for level, m in messages if level == logging.WARNING]
    assert warnings == [
        f"VM_ACS_OVERRIDE: bridge {ROOT_PORT} above 0000:03:00.0: disabled (ACS Control at 0x146 was 0x001d)",
        "VM_ACS_OVERRIDE: bridge 0000:02:08.0 above 0000:03:00.0: disabled (ACS Control at 0x146 was 0x001d)",
    ]
    assert len(messages) == 4


def test_acs_override_failures_are_reported(fake):
    acs_tree(fake)
    run = Recorder(CommandResult(127, "", "setpci not found"))
    failed = [a for a in apply_acs_override(True, fake.root, run=run) if a.outcome is AcsOutcome.FAILED]
    assert [a.bridge for a in failed] == [ROOT_PORT, "0000:02:08.0"]
    assert failed[0].detail == f"setpci -s {ROOT_PORT} 0x146.w=0000: setpci not found"


def test_acs_override_needs_the_extended_config_space(fake):
    fake.device(ROOT_PORT, BRIDGE, group=1, config=acs_config(0x001D, length=64))  # a non-root reader's view
    fake.device(GPU, VGA, parent=ROOT_PORT, group=2)
    run = Recorder()
    (action,) = apply_acs_override(True, fake.root, run=run)
    assert action.outcome is AcsOutcome.UNREADABLE and "only 64 bytes" in action.detail
    assert run.calls == []


def test_acs_override_without_gpus(fake, caplog):
    fake.device(ROOT_PORT, BRIDGE, group=1, config=acs_config(0x001D))
    with caplog.at_level(logging.INFO, logger="kohakuriver.runner.vfio"):
        assert apply_acs_override(True, fake.root, run=Recorder()) == []
    assert "no PCI bridge above a GPU" in caplog.text


def test_find_ext_capability():
    assert find_ext_capability(acs_config(0x1D), 0x000D) == 0x140
    assert find_ext_capability(acs_config(0x1D), 0x0001) == 0x100
    assert find_ext_capability(acs_config(None), 0x000D) is None
    assert find_ext_capability(bytes(4096), 0x000D) is None
    assert find_ext_capability(acs_config(0x1D, length=64), 0x000D) is None
    looping = bytearray(4096)
    looping[0x100:0x104] = (0x0001 | (0x100 << 20)).to_bytes(4, "little")  # next points to itself
    assert find_ext_capability(bytes(looping), 0x000D) is None


@given(st.binary(min_size=0, max_size=4096))
def test_find_ext_capability_never_fails(config):
    offset = find_ext_capability(config, 0x000D)
    assert offset is None or (0x100 <= offset <= len(config) - 4 and offset % 4 == 0)


def test_run_argv_is_bounded_and_names_a_missing_program():
    assert run_argv(["true"]).returncode == 0
    missing = run_argv(["kohakuriver-no-such-program"])
    assert (missing.returncode, missing.stderr) == (127, "kohakuriver-no-such-program not found")
    slow = run_argv(["sleep", "5"], timeout=0.2)
    assert slow.returncode == -1 and "did not answer within 0.2 s" in slow.stderr


# -- allocation -------------------------------------------------------------------------------------------


def two_plus_one(fake: FakeSysfs) -> tuple[vfio.VfioGpu, ...]:
    """GPUs 0 and 1 share IOMMU group 1; GPU 2 is alone in group 2; GPU 3 has a NIC in its group."""
    fake.device(ROOT_PORT, BRIDGE, group=1)
    fake.device("0000:01:00.0", GPU_3D, parent=ROOT_PORT, group=1, driver="nvidia")
    fake.device("0000:01:00.1", AUDIO, parent=ROOT_PORT, group=1, driver="snd_hda_intel")
    fake.device("0000:02:00.0", GPU_3D, parent=ROOT_PORT, group=1, driver="nvidia")
    fake.device("0000:41:00.0", GPU_3D, group=2, driver="nvidia")
    fake.device("0000:81:00.0", GPU_3D, group=3, driver="nvidia")
    fake.device("0000:80:1f.6", NIC, 0x8086, group=3, driver="ixgbe")
    fake.driver("vfio-pci")
    return discover_gpus(fake.root)


def test_a_vm_gets_free_viable_gpus_with_their_group(fake):
    gpus = two_plus_one(fake)
    grant = allocate_gpus("vm", [2], gpus)
    assert grant.gpu_ids == (2,) and grant.bind_addresses == ("0000:41:00.0",)
    both = allocate_gpus("vm", [1, 0], gpus, held_by_containers={2})
    assert both.gpu_ids == (0, 1)
    assert both.bind_addresses == ("0000:01:00.0", "0000:01:00.1", "0000:02:00.0")


@pytest.mark.parametrize(
    ("requested", "containers", "vms", "words"),
    [
        ([2], {2}, set(), "GPU 2 is in use by a container"),
        ([2], set(), {2}, "GPU 2 is in use by another VM"),
        ([7], set(), set(), "GPU 7 is not a GPU of this node (its GPUs: 0,1,2,3)"),
        ([3], set(), set(), "GPU 3 cannot be passed through: IOMMU group 3 also holds 0000:80:1f.6"),
        ([0], set(), set(), "GPU 0 shares IOMMU group 1 with GPU 1: ask for them together"),
        ([0, 1], {1}, set(), "GPU 1 is in use by a container"),
    ],
)
def test_a_vm_is_refused(fake, requested, containers, vms, words):
    gpus = two_plus_one(fake)
    with pytest.raises(GpuAllocationError) as info:
        allocate_gpus("vm", requested, gpus, held_by_containers=containers, held_by_vms=vms)
    assert info.value.field == "required_gpus"
    assert words in info.value.message


def test_a_container_never_gets_a_vms_gpu(fake):
    gpus = two_plus_one(fake)
    assert allocate_gpus("container", [0, 2], gpus, held_by_vms={1}).gpu_ids == (0, 2)
    with pytest.raises(GpuAllocationError, match=r"required_gpus: GPU 1,3 passed through to a VM"):
        allocate_gpus("container", [1, 3], gpus, held_by_vms={1, 3})
    with pytest.raises(ValueError, match="kind"):
        allocate_gpus("pod", [0], gpus)


@pytest.fixture(scope="module")
def four_gpus(tmp_path_factory):
    return two_plus_one(FakeSysfs(tmp_path_factory.mktemp("sysfs")))


@given(
    st.sampled_from(["container", "vm"]),
    st.sets(st.integers(0, 4)),
    st.sets(st.integers(0, 4)),
    st.sets(st.integers(0, 4)),
)
def test_no_gpu_goes_to_a_container_and_a_vm(four_gpus, kind, requested, containers, vms):
    gpus = four_gpus
    try:
        grant = allocate_gpus(kind, requested, gpus, held_by_containers=containers, held_by_vms=vms)
    except GpuAllocationError:
        return
    granted = set(grant.gpu_ids)
    assert granted == requested
    assert not granted & vms
    if kind == "vm":
        assert not granted & containers
        assert all(gpus[i].viable for i in granted)
