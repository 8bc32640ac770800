"""QEMU's argv from ``vm_argv``: what a full and a minimal launch give, accelerators, UEFI, escaping of QEMU's
option syntax, and the refusals. That QEMU itself accepts these argv lists is checked against a real QEMU in
``tests/integration/test_vm_disk.py`` and ``test_vm_process.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto.errors import ValidationError
from kohakuriver_runner.vm_argv import DISK_NODE, Share, VmLaunch, qemu_argv

INST = Path("/srv/kr/vms/42")


def minimal(**overrides) -> VmLaunch:
    fields = {
        "name": "vps-42",
        "accel": "tcg",
        "cores": 2,
        "memory_mb": 1024,
        "disk": INST / "disk.qcow2",
        "qmp_socket": INST / "qmp.sock",
        "serial_log": INST / "serial.log",
        "pidfile": INST / "qemu.pid",
    }
    fields.update(overrides)
    return VmLaunch(**fields)


def full(**overrides) -> VmLaunch:
    fields = {
        "seed_iso": INST / "seed.iso",
        "tap": "krtap42",
        "mac": "52:54:00:00:00:2A",
        "shares": [
            ("kr-shared", "/srv/kr/shared", False),
            Share(tag="kr-agent", host_path=INST, readonly=True),
        ],
        "vfio_devices": ["0000:01:00.0", "0000:01:00.1"],
        "kernel": "/srv/images/debian-12.vmlinuz",
        "initrd": "/srv/images/debian-12.initrd",
        "cmdline": "root=LABEL=kr-root ro console=ttyS0,115200n8",
    }
    fields.update(overrides)
    return minimal(**fields)


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_minimal_launch():
    argv = qemu_argv(minimal())
    assert argv == [
        "qemu-system-x86_64",
        "-name",
        "guest=vps-42",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1024",
        "-blockdev",
        f"driver=file,node-name={DISK_NODE}-file,filename=/srv/kr/vms/42/disk.qcow2,discard=unmap",
        "-blockdev",
        f"driver=qcow2,node-name={DISK_NODE},file={DISK_NODE}-file,discard=unmap",
        "-device",
        f"virtio-blk-pci,drive={DISK_NODE},id=disk0-dev,bootindex=1",
        "-device",
        "virtio-rng-pci,id=rng0",
        "-chardev",
        "file,id=serial0,path=/srv/kr/vms/42/serial.log",
        "-serial",
        "chardev:serial0",
        "-chardev",
        "socket,id=qmp,path=/srv/kr/vms/42/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-pidfile",
        "/srv/kr/vms/42/qemu.pid",
    ]
    assert "-daemonize" not in argv
    assert "-netdev" not in argv and "-kernel" not in argv and "-fsdev" not in argv


def test_full_launch():
    argv = qemu_argv(full(), qemu="/opt/qemu/bin/qemu-system-x86_64")
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert option(argv, "-blockdev")[2:] == [
        "driver=file,node-name=seed0-file,filename=/srv/kr/vms/42/seed.iso,read-only=on",
        "driver=raw,node-name=seed0,file=seed0-file,read-only=on",
    ]
    assert option(argv, "-netdev") == ["tap,id=net0,ifname=krtap42,script=no,downscript=no,vhost=off"]
    devices = option(argv, "-device")
    assert "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:2a,id=net0-dev" in devices  # MAC lower-cased
    assert "virtio-blk-pci,drive=seed0,id=seed0-dev" in devices
    assert option(argv, "-fsdev") == [
        "local,id=fs0,path=/srv/kr/shared,security_model=none,multidevs=remap",
        "local,id=fs1,path=/srv/kr/vms/42,security_model=none,multidevs=remap,readonly=on",
    ]
    assert "virtio-9p-pci,fsdev=fs0,mount_tag=kr-shared" in devices
    assert "virtio-9p-pci,fsdev=fs1,mount_tag=kr-agent" in devices
    # each GPU function behind its own PCIe root port
    assert [d for d in devices if d.startswith(("pcie-root-port", "vfio-pci"))] == [
        "pcie-root-port,id=gpu-port0,chassis=1,slot=1",
        "vfio-pci,host=0000:01:00.0,bus=gpu-port0,id=gpu0",
        "pcie-root-port,id=gpu-port1,chassis=2,slot=2",
        "vfio-pci,host=0000:01:00.1,bus=gpu-port1,id=gpu1",
    ]
    assert option(argv, "-kernel") == ["/srv/images/debian-12.vmlinuz"]
    assert option(argv, "-initrd") == ["/srv/images/debian-12.initrd"]
    # -append takes the whole line as one argument: the comma in console=ttyS0,115200n8 is not doubled
    assert option(argv, "-append") == ["root=LABEL=kr-root ro console=ttyS0,115200n8"]


def test_vhost_on_when_asked():
    assert "vhost=on" in option(qemu_argv(full(vhost=True)), "-netdev")[0]


def test_kvm_and_tcg():
    kvm = qemu_argv(minimal(accel="kvm"))
    assert option(kvm, "-accel") == ["kvm"] and option(kvm, "-cpu") == ["host"]
    tcg = qemu_argv(minimal(accel="tcg"))
    assert option(tcg, "-accel") == ["tcg,thread=multi"] and option(tcg, "-cpu") == ["max"]
    with pytest.raises(ValidationError) as info:
        minimal(accel="hvf")
    assert info.value.field == "accel"


def test_uefi_pflash():
    argv = qemu_argv(
        minimal(firmware="uefi", ovmf_code="/usr/share/OVMF/OVMF_CODE_4M.fd", ovmf_vars=INST / "OVMF_VARS.fd")
    )
    assert option(argv, "-machine") == ["q35,pflash0=ovmf-code,pflash1=ovmf-vars"]
    blockdevs = option(argv, "-blockdev")
    assert (
        "driver=file,node-name=ovmf-code,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,read-only=on" in blockdevs
    )
    assert "driver=file,node-name=ovmf-vars,filename=/srv/kr/vms/42/OVMF_VARS.fd" in blockdevs
    assert option(qemu_argv(minimal()), "-machine") == ["q35"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"firmware": "uefi"}, "ovmf_code"),
        ({"firmware": "uefi", "ovmf_code": "/x/code.fd"}, "ovmf_code"),
        ({"ovmf_code": "/x/code.fd", "ovmf_vars": "/x/vars.fd"}, "ovmf_code"),
        ({"firmware": "coreboot"}, "firmware"),
    ],
)
def test_firmware_refusals(fields, field):
    with pytest.raises(ValidationError) as info:
        minimal(**fields)
    assert info.value.field == field


def test_commas_are_doubled_inside_option_strings():
    odd = Path("/srv/kr/vms/a,b/42,x")
    launch = full(
        disk=odd / "d,isk.qcow2",
        seed_iso=odd / "seed.iso",
        qmp_socket=odd / "q.sock",
        serial_log=odd / "serial,log",
        pidfile=odd / "p,id",
        shares=[("kr-shared", odd / "sh,are", True)],
        kernel=odd / "vmlinuz",
        initrd=odd / "initrd",
        firmware="uefi",
        ovmf_code=odd / "code,fd",
        ovmf_vars=odd / "vars,fd",
    )
    argv = qemu_argv(launch)
    blockdevs = option(argv, "-blockdev")
    assert (
        "driver=file,node-name=disk0-file,filename=/srv/kr/vms/a,,b/42,,x/d,,isk.qcow2,discard=unmap"
        in blockdevs
    )
    assert (
        "driver=file,node-name=seed0-file,filename=/srv/kr/vms/a,,b/42,,x/seed.iso,read-only=on" in blockdevs
    )
    assert (
        "driver=file,node-name=ovmf-code,filename=/srv/kr/vms/a,,b/42,,x/code,,fd,read-only=on" in blockdevs
    )
    assert "driver=file,node-name=ovmf-vars,filename=/srv/kr/vms/a,,b/42,,x/vars,,fd" in blockdevs
    assert option(argv, "-fsdev") == [
        "local,id=fs0,path=/srv/kr/vms/a,,b/42,,x/sh,,are,security_model=none,multidevs=remap,readonly=on"
    ]
    chardevs = option(argv, "-chardev")
    assert chardevs == [
        "file,id=serial0,path=/srv/kr/vms/a,,b/42,,x/serial,,log",
        "socket,id=qmp,path=/srv/kr/vms/a,,b/42,,x/q.sock,server=on,wait=off",
    ]
    # options QEMU takes whole are passed as they are
    assert option(argv, "-pidfile") == ["/srv/kr/vms/a,b/42,x/p,id"]
    assert option(argv, "-kernel") == ["/srv/kr/vms/a,b/42,x/vmlinuz"]
    assert option(argv, "-initrd") == ["/srv/kr/vms/a,b/42,x/initrd"]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40))
def test_any_path_text_is_one_argument_and_splits_back(text):
    # Shell metacharacters, quotes, spaces, '=' and ',' in a path: argv has no shell, so the only syntax that
    # matters is QEMU's, and undoing the comma doubling gives the path back exactly.
    disk = Path("/srv", text.replace("/", "_"), "disk.qcow2")
    argv = qemu_argv(minimal(disk=disk))
    [file_node] = [b for b in option(argv, "-blockdev") if b.startswith("driver=file,node-name=disk0-file,")]
    value = file_node.removeprefix("driver=file,node-name=disk0-file,filename=").removesuffix(
        ",discard=unmap"
    )
    # a single comma never survives inside the value: every one is part of a ",," pair
    assert "," not in value.replace(",,", "")
    assert value.replace(",,", ",") == str(disk)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"disk": "disk.qcow2"}, "disk"),  # relative
        ({"pidfile": "/srv/kr/\x00pid"}, "pidfile"),
        ({"serial_log": "/srv/kr/serial\nlog"}, "serial_log"),
        ({"qmp_socket": "/" + "s" * 120}, "qmp_socket"),  # longer than sun_path
        ({"name": "-vps"}, "name"),
        ({"name": "vps,42"}, "name"),
        ({"cores": 0}, "cores"),
        ({"cores": True}, "cores"),
        ({"memory_mb": 8}, "memory_mb"),
        ({"tap": "krtap42"}, "mac"),  # a tap without a MAC
        ({"tap": "kr tap", "mac": "52:54:00:00:00:01"}, "tap"),
        ({"tap": "a" * 16, "mac": "52:54:00:00:00:01"}, "tap"),
        ({"tap": "krtap", "mac": "52:54:00:00:00"}, "mac"),
        ({"tap": "krtap", "mac": "01:54:00:00:00:01"}, "mac"),  # multicast
        ({"shares": [("bad tag", "/srv/x", False)]}, "shares[0].tag"),
        ({"shares": [("t", "rel/x", False)]}, "shares[0].host_path"),
        ({"shares": [("t", "/a", False), ("t", "/b", True)]}, "shares[1].tag"),
        ({"shares": [("t", "/a")]}, "shares[0]"),
        ({"vfio_devices": ["01:00.0"]}, "vfio_devices[0]"),
        ({"vfio_devices": ["0000:01:00.0,x-foo=1"]}, "vfio_devices[0]"),
        ({"vfio_devices": ["0000:01:00.0", "0000:01:00.0"]}, "vfio_devices"),
        ({"initrd": "/srv/initrd"}, "kernel"),
        ({"cmdline": "quiet"}, "kernel"),
        ({"kernel": "/srv/k", "cmdline": "a\nb"}, "cmdline"),
        ({"kernel": "/srv/k", "cmdline": "x" * 2048}, "cmdline"),
        ({"extra": ["-S", "a\x00b"]}, "extra[1]"),
    ],
)
def test_refusals(fields, field):
    with pytest.raises(ValidationError) as info:
        minimal(**fields)
    assert info.value.field == field


def test_extra_goes_last_as_given():
    argv = qemu_argv(minimal(extra=["-S", "-msg", "timestamp=on"]))
    assert argv[-3:] == ["-S", "-msg", "timestamp=on"]
