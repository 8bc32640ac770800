"""A fake sysfs tree in a temporary directory, for the VFIO and VM-capability tests (no GPU on CI machines).

The layout is the kernel's, reduced to what ``kohakuriver_runner.vfio`` reads and writes:

    devices/pci0000:00/<bridge>/<device>/{class,vendor,device,config,boot_vga,driver_override}
    devices/.../<device>/iommu_group -> kernel/iommu_groups/<n>
    devices/.../<device>/driver -> bus/pci/drivers/<name>
    bus/pci/devices/<address> -> devices/pci0000:00/.../<address>
    bus/pci/drivers/<name>/{bind,unbind}, bus/pci/drivers_probe
    kernel/iommu_groups/<n>/devices/<address> -> the device
    module/<name>/

``FakeSysfs.kernel_write`` is a ``vfio.SysfsWriter`` that records each write and acts on it the way the
kernel does (unbind drops the driver link, drivers_probe attaches the override or the device's own driver,
bind attaches the named driver); ``fail`` makes one file's writes fail with an errno.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def acs_config(control: int | None, *, length: int = 4096) -> bytes:
    """A bridge's config space: an AER capability at 0x100, then (if ``control`` is not None) an ACS
    capability at 0x140 whose Control register holds ``control``."""
    config = bytearray(length)
    next_aer = 0x140 if control is not None else 0
    config[0x100:0x104] = (0x0001 | (1 << 16) | (next_aer << 20)).to_bytes(4, "little")
    if control is not None:
        config[0x140:0x144] = (0x000D | (1 << 16)).to_bytes(4, "little")
        config[0x144:0x146] = (0x005F).to_bytes(2, "little")  # capability register
        config[0x146:0x148] = control.to_bytes(2, "little")
    return bytes(config[:length])


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pci = root / "bus" / "pci"
        (self.pci / "devices").mkdir(parents=True)
        (self.pci / "drivers").mkdir(parents=True)
        (self.pci / "drivers_probe").write_text("")
        (root / "kernel" / "iommu_groups").mkdir(parents=True)
        (root / "module").mkdir(parents=True)
        self.host_bridge = root / "devices" / "pci0000:00"
        self.host_bridge.mkdir(parents=True)
        self.writes: list[tuple[str, str]] = []
        self.own_driver: dict[str, str] = {}  # what drivers_probe attaches without an override
        self.failures: dict[str, int] = {}
        self.probe_ignores_override = False

    # -- building ------------------------------------------------------------------------------------

    def module(self, name: str) -> None:
        (self.root / "module" / name).mkdir(exist_ok=True)

    def driver(self, name: str) -> Path:
        path = self.pci / "drivers" / name
        path.mkdir(exist_ok=True)
        for attr in ("bind", "unbind"):
            if not (path / attr).exists():
                (path / attr).write_text("")
        return path

    def device(
        self,
        address: str,
        class_code: int,
        vendor: int = 0x10DE,
        device: int = 0x2204,
        *,
        parent: str | None = None,
        group: int | None = None,
        driver: str | None = None,
        boot_vga: bool | None = None,
        config: bytes | None = None,
    ) -> Path:
        base = self.real_path(parent) if parent else self.host_bridge
        path = base / address
        path.mkdir()
        (path / "class").write_text(f"{class_code:#08x}\n")
        (path / "vendor").write_text(f"{vendor:#06x}\n")
        (path / "device").write_text(f"{device:#06x}\n")
        (path / "driver_override").write_text("(null)\n")
        (path / "config").write_bytes(config if config is not None else bytes(64))
        if boot_vga is not None:
            (path / "boot_vga").write_text("1\n" if boot_vga else "0\n")
        (self.pci / "devices" / address).symlink_to(path)
        if group is not None:
            group_dir = self.root / "kernel" / "iommu_groups" / str(group) / "devices"
            group_dir.mkdir(parents=True, exist_ok=True)
            (group_dir / address).symlink_to(path)
            (path / "iommu_group").symlink_to(group_dir.parent)
        if driver is not None:
            self.own_driver.setdefault(address, driver)
            self.attach(address, driver)
        return path

    def real_path(self, address: str) -> Path:
        return Path(os.path.realpath(self.pci / "devices" / address))

    # -- the state a test checks ---------------------------------------------------------------------------

    def current_driver(self, address: str) -> str | None:
        link = self.real_path(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def override(self, address: str) -> str:
        return (self.real_path(address) / "driver_override").read_text().strip()

    def attach(self, address: str, driver: str) -> None:
        self.driver(driver)
        link = self.real_path(address) / "driver"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(self.pci / "drivers" / driver)

    def fail(self, relative: str, code: int) -> None:
        """Writes to ``relative`` (a path below the root, as the test names it) fail with ``code``."""
        self.failures[relative] = code

    # -- the fake kernel -------------------------------------------------------------------------------

    def kernel_write(self, path: Path, text: str) -> None:
        relative = str(path.relative_to(self.root))
        self.writes.append((relative, text))
        if relative in self.failures:
            code = self.failures[relative]
            raise OSError(code, os.strerror(code))
        real = Path(os.path.realpath(path))
        value = text.strip()
        if real.name == "driver_override":
            real.write_text((value or "(null)") + "\n")
        elif real.name == "unbind":
            if self.current_driver(value) != real.parent.name:
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            (self.real_path(value) / "driver").unlink()
        elif real.name == "drivers_probe":
            if self.current_driver(value) is not None:
                return
            override = self.override(value)
            wanted = self.own_driver.get(value)
            if override != "(null)" and not self.probe_ignores_override:
                wanted = override
            if wanted and (self.pci / "drivers" / wanted).is_dir():
                self.attach(value, wanted)
        elif real.name == "bind":
            if self.current_driver(value) is not None:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            override = self.override(value)
            if override not in ("(null)", real.parent.name):
                raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
            self.attach(value, real.parent.name)
        else:
            raise OSError(errno.EACCES, f"the fake kernel has no attribute {relative}")
