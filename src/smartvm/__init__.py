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
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.snapshot import Snapshot
from smartvm.vm import MicroVM, VMState

__version__ = "0.1.0"

__all__ = [
    "Balloon",
    "BootSource",
    "Drive",
    "Entropy",
    "ErrorCode",
    "Logger",
    "MachineConfig",
    "Metrics",
    "MicroVM",
    "MicroVMConfig",
    "Mmds",
    "NetworkInterface",
    "NetworkOverride",
    "RateLimiter",
    "SmartVM",
    "SmartVMError",
    "SmartVMOptions",
    "Snapshot",
    "TokenBucket",
    "VMState",
    "Vsock",
    "__version__",
]
