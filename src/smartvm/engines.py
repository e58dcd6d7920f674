"""Which engines exist, and which one ``engine="auto"`` picks on this host.

Kept apart from ``engine.py`` (the contract): the engines import the contract, this module imports
the engines (on first use), so neither imports the other in a cycle.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
from typing import TYPE_CHECKING

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.options import SmartVMOptions

if TYPE_CHECKING:
    from smartvm.engine import Engine

_ENGINE_CLASSES = {
    "firecracker": ("smartvm.firecracker.engine", "FirecrackerEngine"),
    "qemu": ("smartvm.qemu.engine", "QemuEngine"),
}
ENGINE_NAMES = tuple(_ENGINE_CLASSES)


def engine_class(name: str) -> type[Engine]:
    """The Engine class for ``"firecracker"`` or ``"qemu"`` (imported on first use)."""
    try:
        module_name, attr = _ENGINE_CLASSES[name]
    except KeyError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"unknown engine {name!r}: use auto, firecracker or qemu"
        ) from exc
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SmartVMError(
            ErrorCode.ENGINE_UNAVAILABLE, f"the {name} engine is not available: {exc}"
        ) from exc
    cls: type[Engine] = getattr(module, attr)
    return cls


def _qemu_present(options: SmartVMOptions) -> bool:
    binary = options.qemu_binary_path or shutil.which("qemu-system-x86_64")
    return binary is not None and os.path.exists(binary)


def firecracker_usable(options: SmartVMOptions) -> tuple[bool, str]:
    """Whether the Firecracker engine can run a guest here, and why (not). Blocking: it may run the
    KVM probe guest for a few seconds the first time (then cached)."""
    from smartvm.firecracker.binary import find_firecracker
    from smartvm.kvm_probe import kvm_device_problem, probe_kvm

    binary = find_firecracker(options)
    if binary is None:
        return False, "no firecracker binary found (set firecracker_binary_path or SMARTVM_FIRECRACKER_BIN)"
    problem = kvm_device_problem()
    if problem is not None:
        return False, f"KVM cannot run a guest here: {problem}"
    if not _qemu_present(options):
        # the probe guest needs QEMU; without it there is no other engine to fall back to either
        return True, f"firecracker at {binary} and an accessible KVM device (no QEMU to probe it further)"
    kvm = probe_kvm(options.qemu_binary_path)
    if not kvm.usable:
        return False, f"KVM cannot run a guest here: {kvm.reason}"
    return True, f"firecracker at {binary} and a usable KVM"


def select_engine(options: SmartVMOptions) -> str:
    """Resolve ``options.engine``: ``auto`` picks Firecracker when it can run a guest, else QEMU.

    Blocking (see :func:`firecracker_usable`); async code calls :func:`choose_engine`.
    """
    if options.engine != "auto":
        return options.engine
    try:
        usable, _why = firecracker_usable(options)
    except ModuleNotFoundError:
        usable = False
    return "firecracker" if usable else "qemu"


async def choose_engine(options: SmartVMOptions) -> str:
    """:func:`select_engine` off the event loop (the KVM probe may take seconds)."""
    if options.engine != "auto":
        return options.engine
    return await asyncio.to_thread(select_engine, options)
