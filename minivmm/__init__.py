"""minivmm: a small, fast virtual machine monitor in Python on Linux KVM.

The public API (see README, "Python API")::

    import minivmm
    cfg = minivmm.VmConfig(kernel="guest/out/probe.elf", cmdline="probe.check=cpl3",
                           console="none")
    with minivmm.Vm(cfg) as vm:
        vm.start()
        result = vm.wait(timeout=30)

Two stacks, joined by minivmm.vm and minivmm.transport.placement (each module imports
only from its own stack, below itself, and the shared leaves: errors, config, ratelimit,
hostinfo, irq, eventloop; tests/test_layers.py checks it):

    platform   kvm (ctypes ioctls) -> memory -> x86 (loaders, vCPU set-up, tables)
               -> bus, devices/legacy -> platform, vcpu, stop
    virtio     virtio (the virtqueue engine: ring -> queue -> chain, mem, util, testing)
               -> devices (VirtioDevice and its implementations) -> transport (mmio)

The command line (cli), the Firecracker-style file (firecracker) and the console front end
(console) sit on top.

Names are imported lazily, so ``import minivmm`` (and the command line's start-up) pays
only for what is used.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

    from .config import DeviceConfig, DriveConfig, NetConfig, VmConfig
    from .devices.base import VirtioDevice
    from .errors import GuestError, HostError, InternalError, MinivmmError, UsageError
    from .guest import Guest
    from .stop import RunResult
    from .transport.testing import DeviceHarness
    from .version import __version__
    from .virtio.testing import FakeDriver
    from .vm import Vm

__all__ = [
    "DeviceConfig", "DeviceHarness", "DriveConfig", "FakeDriver", "Guest", "GuestError",
    "HostError", "InternalError", "MinivmmError", "NetConfig", "RunResult", "UsageError",
    "VirtioDevice", "Vm", "VmConfig", "__version__",
]

_WHERE = {
    "VmConfig": "config", "DeviceConfig": "config", "DriveConfig": "config", "NetConfig": "config",
    "Vm": "vm", "RunResult": "stop", "VirtioDevice": "devices.base",
    "DeviceHarness": "transport.testing", "FakeDriver": "virtio.testing",
    "MinivmmError": "errors", "UsageError": "errors", "GuestError": "errors",
    "HostError": "errors", "InternalError": "errors", "Guest": "guest",
    "__version__": "version",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'minivmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
