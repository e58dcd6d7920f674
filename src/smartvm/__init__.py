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
from smartvm.errors import ErrorCode, SmartVMError

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
    "MicroVMConfig",
    "Mmds",
    "NetworkInterface",
    "RateLimiter",
    "SmartVMError",
    "TokenBucket",
    "Vsock",
    "__version__",
]
