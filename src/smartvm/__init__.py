"""smartvm: Firecracker microVMs from Python, with a QEMU microvm engine where Firecracker cannot run.

The public names are imported on first use (module ``__getattr__``): ``import smartvm`` and the
``smartvm --version`` command stay cheap, without pydantic and the engines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smartvm.config import (
        Balloon,
        BootSource,
        Drive,
        Entropy,
        Logger,
        MachineConfig,
        Metrics,
        MicroVMConfig,
        Mmds,
        NetworkInterface,
        RateLimiter,
        TokenBucket,
        Vsock,
    )
    from smartvm.engine import NetworkOverride
    from smartvm.errors import ErrorCode, SmartVMError
    from smartvm.guests import guest_config
    from smartvm.host.nat import EgressPolicy
    from smartvm.host.netns import NetworkSlot, SlotPool
    from smartvm.host.network import NetworkManager, TapDevice
    from smartvm.images.base_images import BaseImageBundle, BaseImageManager
    from smartvm.images.releases import ImageManager
    from smartvm.options import JailerOptions, SmartVMOptions
    from smartvm.orchestrator import SmartVM
    from smartvm.snapshot import Snapshot
    from smartvm.vm import MicroVM, VMState

__version__ = "0.1.0"

# Public name -> the module defining it.
_LAZY = {
    **dict.fromkeys(
        (
            "Balloon",
            "BootSource",
            "Drive",
            "Entropy",
            "Logger",
            "MachineConfig",
            "Metrics",
            "MicroVMConfig",
            "Mmds",
            "NetworkInterface",
            "RateLimiter",
            "TokenBucket",
            "Vsock",
        ),
        "smartvm.config",
    ),
    "NetworkOverride": "smartvm.engine",
    "ErrorCode": "smartvm.errors",
    "SmartVMError": "smartvm.errors",
    "guest_config": "smartvm.guests",
    "EgressPolicy": "smartvm.host.nat",
    "NetworkSlot": "smartvm.host.netns",
    "SlotPool": "smartvm.host.netns",
    "NetworkManager": "smartvm.host.network",
    "TapDevice": "smartvm.host.network",
    "BaseImageBundle": "smartvm.images.base_images",
    "BaseImageManager": "smartvm.images.base_images",
    "ImageManager": "smartvm.images.releases",
    "JailerOptions": "smartvm.options",
    "SmartVMOptions": "smartvm.options",
    "SmartVM": "smartvm.orchestrator",
    "Snapshot": "smartvm.snapshot",
    "MicroVM": "smartvm.vm",
    "VMState": "smartvm.vm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Balloon",
    "BaseImageBundle",
    "BaseImageManager",
    "BootSource",
    "Drive",
    "EgressPolicy",
    "Entropy",
    "ErrorCode",
    "ImageManager",
    "JailerOptions",
    "Logger",
    "MachineConfig",
    "Metrics",
    "MicroVM",
    "MicroVMConfig",
    "Mmds",
    "NetworkInterface",
    "NetworkManager",
    "NetworkOverride",
    "NetworkSlot",
    "RateLimiter",
    "SlotPool",
    "SmartVM",
    "SmartVMError",
    "SmartVMOptions",
    "Snapshot",
    "TapDevice",
    "TokenBucket",
    "VMState",
    "Vsock",
    "__version__",
    "guest_config",
]
