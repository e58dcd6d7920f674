"""smartvm: Firecracker microVMs from Python, with a QEMU microvm engine where Firecracker cannot run."""

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
]
