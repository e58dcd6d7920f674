"""How a VM gets its network when it starts: TAP devices on the SmartVM's bridge, or one network slot.

As in the original SmartVM, a network interface without ``host_dev_name`` gets a TAP device on the
bridge of ``SmartVM.network_manager``, the next free address and a MAC derived from it
(:class:`BridgeNetwork`). ``create_vm(config, network=slot_or_pool)`` instead puts the VM into one
network slot (its own namespace; :class:`SlotNetwork`, or :class:`PoolNetwork` taking a slot from a
``SlotPool`` for as long as the VM runs). Either way the interface's TAP name and MAC, and the
kernel's ``ip=`` argument for the first interface, are filled in; nothing is built by hand.

An attachment runs when the VM starts and registers its undo on the VM's undo stack, so stopping
the VM, or a start that fails halfway, removes the TAP device or returns the slot.
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

from smartvm.config import MicroVMConfig, NetworkInterface, has_boot_arg
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.netns import TAP_NAME, NetworkSlot, SlotPool
from smartvm.host.network import NetworkManager, TapDevice, kernel_ip_arg


@dataclass(frozen=True)
class Attached:
    """The VM's configuration with its network filled in, and the namespace it runs in (or None)."""

    config: MicroVMConfig
    netns: str | None


class VMNetwork(Protocol):
    """Where a VM's network comes from; ``managed`` when smartvm owns (and must undo) what it makes."""

    @property
    def managed(self) -> bool: ...

    def check(self, config: MicroVMConfig) -> None:
        """Refuse a configuration this network cannot serve (before anything is made)."""

    async def attach(self, vm_id: str, config: MicroVMConfig, undo: AsyncExitStack) -> Attached:
        """Make the VM's network; the undo of everything made goes onto ``undo``."""


def needs_taps(config: MicroVMConfig) -> bool:
    """Whether some interface has no ``host_dev_name`` (smartvm is to make its TAP device)."""
    return any(iface.host_dev_name is None for iface in config.network_interfaces)


def require_host_devices(config: MicroVMConfig) -> None:
    """INVALID_CONFIG when an interface still has no TAP device when the VM is about to boot."""
    missing = [iface.iface_id for iface in config.network_interfaces if iface.host_dev_name is None]
    if missing:
        raise SmartVMError(
            ErrorCode.INVALID_CONFIG,
            f"network interface(s) {', '.join(missing)} have no host_dev_name: create the VM with "
            "SmartVM.create_vm (it makes a TAP device on its bridge, or pass network=slot_or_pool), "
            "or name an existing TAP device",
        )


def guest_hostname(vm_id: str) -> str:
    """The VM id as a hostname for the kernel's ``ip=`` argument (letters, digits and ``-``)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", vm_id)[:63]


def _with_device(
    config: MicroVMConfig, index: int, tap: TapDevice, vm_id: str, *, ip_arg: bool
) -> MicroVMConfig:
    """Interface ``index`` on ``tap`` (its MAC unless one is set); with ``ip_arg``, the kernel's
    ``ip=`` argument too, unless the boot arguments already carry one."""
    ifaces = list(config.network_interfaces)
    iface = ifaces[index]
    ifaces[index] = iface.model_copy(
        update={"host_dev_name": tap.tap_name, "guest_mac": iface.guest_mac or tap.mac}
    )
    update: dict[str, object] = {"network_interfaces": ifaces}
    args = config.boot_source.boot_args or ""
    if ip_arg and not has_boot_arg(args.split(), "ip"):
        joined = f"{args} {kernel_ip_arg(tap, guest_hostname(vm_id))}".strip()
        update["boot_source"] = config.boot_source.model_copy(update={"boot_args": joined})
    return config.model_copy(update=update)


class BridgeNetwork:
    """A TAP device on the bridge of ``manager`` for every interface without ``host_dev_name``."""

    managed = True

    def __init__(self, manager: NetworkManager) -> None:
        self.manager = manager

    def check(self, config: MicroVMConfig) -> None:
        pass

    async def attach(self, vm_id: str, config: MicroVMConfig, undo: AsyncExitStack) -> Attached:
        for index, iface in enumerate(config.network_interfaces):
            if iface.host_dev_name is not None:
                continue
            tap = await self.manager.create_tap(f"{vm_id}/{iface.iface_id}")
            undo.push_async_callback(self.manager.remove_tap, tap.tap_name)
            # the kernel's ip= argument configures eth0: the first interface only
            config = _with_device(config, index, tap, vm_id, ip_arg=index == 0)
        return Attached(config, None)


class SlotNetwork:
    """The VM runs in ``slot``'s namespace on its TAP device (the caller owns the slot)."""

    managed = False

    def __init__(self, slot: NetworkSlot) -> None:
        self.slot = slot

    def check(self, config: MicroVMConfig) -> None:
        check_slot_config(config)

    async def attach(self, vm_id: str, config: MicroVMConfig, undo: AsyncExitStack) -> Attached:
        return Attached(on_slot(self.slot, vm_id, config), self.slot.netns_name)


class PoolNetwork:
    """A slot from ``pool`` for as long as the VM runs (released when it stops)."""

    managed = True

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool

    def check(self, config: MicroVMConfig) -> None:
        check_slot_config(config)

    async def attach(self, vm_id: str, config: MicroVMConfig, undo: AsyncExitStack) -> Attached:
        slot = await self.pool.acquire()
        undo.push_async_callback(self.pool.release, slot)
        return Attached(on_slot(slot, vm_id, config), slot.netns_name)


def check_slot_config(config: MicroVMConfig) -> None:
    """A VM on a slot has at most one interface, on the slot's TAP device (the same in every slot)."""
    ifaces = config.network_interfaces
    if len(ifaces) > 1 or any(i.host_dev_name not in (None, TAP_NAME) for i in ifaces):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"a network slot has one TAP device ({TAP_NAME}): give a VM on a slot at most one network "
            "interface, without host_dev_name",
        )


def on_slot(slot: NetworkSlot, vm_id: str, config: MicroVMConfig) -> MicroVMConfig:
    """``config`` with its one interface (``eth0`` when it has none) on ``slot``'s TAP device."""
    if not config.network_interfaces:
        config = config.model_copy(update={"network_interfaces": [NetworkInterface(iface_id="eth0")]})
    return _with_device(config, 0, slot.tap, vm_id, ip_arg=True)


def network_for(target: NetworkSlot | SlotPool) -> VMNetwork:
    """The :class:`VMNetwork` for ``create_vm(..., network=target)``."""
    if isinstance(target, NetworkSlot):
        return SlotNetwork(target)
    if isinstance(target, SlotPool):
        return PoolNetwork(target)
    raise SmartVMError(
        ErrorCode.INVALID_ARGUMENT,
        f"network must be a NetworkSlot or a SlotPool, not {type(target).__name__}",
    )
