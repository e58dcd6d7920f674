"""Bridge and TAP devices for VMs on one host subnet (the original SmartVM NetworkManager's model).

The bridge takes the subnet's first host address and is the guests' gateway; every VM gets a TAP
device on the bridge and the next free address, with a MAC derived from that address
(``06:00:`` + the four address bytes), so the guest's ``ip=`` boot argument and its MAC always
agree. Addresses are leased in a :class:`~smartvm.host.ipam.LeaseStore`, so they survive restarts
and are never handed out twice, also across processes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat
from smartvm.host.ipam import LeaseStore, default_state_dir
from smartvm.host.netlink_batch import IpBatch, run

log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
IFNAMSIZ = 15


@dataclass(frozen=True)
class TapDevice:
    """What an engine needs to attach a guest: the TAP name and the guest's addressing."""

    tap_name: str
    guest_ip: str
    gateway_ip: str
    subnet_mask: str
    mac: str

    def kernel_ip_arg(self, hostname: str) -> str:
        return kernel_ip_arg(self, hostname)


def mac_from_ip(ip: str) -> str:
    """``06:00:`` followed by the address bytes: locally administered, unicast, unique per address."""
    packed = ipaddress.IPv4Address(ip).packed
    return "06:00:" + ":".join(f"{b:02x}" for b in packed)


def kernel_ip_arg(tap: TapDevice, hostname: str) -> str:
    """The kernel's static ``ip=`` argument: ``ip=<guest>::<gateway>:<mask>:<hostname>:eth0:off``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", hostname):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"hostname {hostname!r} must be 1-63 letters, digits or '-', starting with a letter or digit",
        )
    return f"ip={tap.guest_ip}::{tap.gateway_ip}:{tap.subnet_mask}:{hostname}:eth0:off"


def tap_name_for(prefix: str, index: int, vm_id: str) -> str:
    """A TAP name of at most 15 characters: the prefix, the (unique) lease index, then as much of
    the VM id as fits, reduced to ``[a-z0-9]`` so no id can inject odd characters."""
    head = f"{prefix}{index}"
    if len(head) > IFNAMSIZ:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"TAP name prefix {prefix!r} is too long")
    safe = re.sub(r"[^a-z0-9]", "", vm_id.lower())
    return f"{head}-{safe}"[:IFNAMSIZ] if safe and len(head) < IFNAMSIZ - 1 else head


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"name prefix {prefix!r} must be 1-8 lowercase letters or digits, starting with a letter",
        )
    return prefix


def enable_host_forwarding() -> bool:
    """Turn on IPv4 forwarding on the host (guests need it to reach anything but the host).
    Returns True if it had to be changed. It is left on: other VMs may depend on it."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == "1":
            return False
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.NETWORK_PERMISSION_DENIED,
            f"cannot enable IP forwarding ({exc.strerror}); run as root or `sysctl -w net.ipv4.ip_forward=1`",
        ) from exc
    log.info("enabled net.ipv4.ip_forward for VM networking")
    return True


def undo_bridge_lines(meta: dict[str, Any]) -> list[str]:
    """``ip`` lines undoing what a ``bridge`` lease records: delete the bridge smartvm created,
    or only remove the gateway address smartvm added to someone else's bridge."""
    name = str(meta["bridge"])
    if meta.get("created"):
        return [f"link del {name}"]
    if meta.get("added_addr"):
        return [f"addr del {meta['added_addr']} dev {name}"]
    return []


async def _has_address(link: str, address: str) -> bool:
    result = await run(["ip", "-j", "addr", "show", "dev", link])
    if result.returncode != 0:
        return False
    return any(
        a.get("local") == address
        for item in json.loads(result.stdout or "[]")
        for a in item.get("addr_info", [])
    )


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


class NetworkManager:
    """TAP devices on one bridge, with leased addresses. Create the bridge lazily, remove only
    what this manager created (the bridge too, once no live VM of any process uses it)."""

    def __init__(
        self,
        bridge_name: str = "svbr0",
        subnet: str = "172.30.0.0/24",
        *,
        state_dir: Path | str | None = None,
        name_prefix: str = "sv",
        masquerade: bool = True,
        enable_ip_forward: bool = True,
    ) -> None:
        if not _NAME_RE.match(bridge_name):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"bridge_name {bridge_name!r} must be 1-15 letters, digits, '.', '_' or '-'",
            )
        try:
            self.network = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"subnet {subnet!r} is not an IPv4 network such as 172.30.0.0/24: {exc}",
            ) from exc
        if self.network.num_addresses < 4:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"subnet {subnet} is too small; use /30 or larger")
        self.bridge_name = bridge_name
        self.prefix = check_prefix(name_prefix)
        self.masquerade = masquerade
        self.enable_ip_forward = enable_ip_forward
        self.gateway_ip = str(self.network.network_address + 1)
        self.subnet_mask = str(self.network.netmask)
        root = Path(state_dir) if state_dir is not None else default_state_dir()
        self.store = LeaseStore(root / f"bridge-{bridge_name}.json", 2, self.network.num_addresses - 2)
        self._taps: dict[str, str] = {}  # tap name -> vm id (lease key)
        self._bridge_ready = False
        self._lock = asyncio.Lock()

    @property
    def _bridge_key(self) -> str:
        return f"bridge:{self.bridge_name}"

    async def ensure_bridge(self) -> None:
        """Create the bridge with the gateway address if missing; make sure it is up and addressed.

        What we change is recorded in the ``bridge:<name>`` lease (created the bridge, or only
        added the gateway address to an existing one), so cleanup and sweep undo exactly that.
        """
        async with self._lock:
            if self._bridge_ready and link_exists(self.bridge_name):
                return
            cidr = f"{self.gateway_ip}/{self.network.prefixlen}"
            configure = [f"addr replace {cidr} dev {self.bridge_name}", f"link set {self.bridge_name} up"]
            if link_exists(self.bridge_name):
                if not await _has_address(self.bridge_name, self.gateway_ip):
                    self._record_bridge_change({"created": False, "added_addr": cidr})
                await IpBatch(lines=configure).run(f"configuring bridge {self.bridge_name}")
            else:
                self._record_bridge_change({"created": True})
                try:
                    await IpBatch(lines=[f"link add {self.bridge_name} type bridge", *configure]).run(
                        f"creating bridge {self.bridge_name}"
                    )
                except SmartVMError:
                    if not link_exists(self.bridge_name):
                        raise
                    # another process created it between our check and our batch: just configure it
                    await IpBatch(lines=configure).run(f"configuring bridge {self.bridge_name}")
            if self.masquerade:
                await nat.host_add([self.bridge_name])
            if self.enable_ip_forward:
                enable_host_forwarding()
            self._bridge_ready = True

    def _record_bridge_change(self, change: dict[str, object]) -> None:
        """Take the bridge lease (index 1, the gateway) unless some process already holds it."""
        if self.store.get(self._bridge_key) is not None:
            return
        try:
            self.store.allocate(
                self._bridge_key, {"kind": "bridge", "bridge": self.bridge_name, **change}, index=1
            )
        except SmartVMError as exc:
            if exc.code not in (ErrorCode.DUPLICATE_VM_ID, ErrorCode.ADDRESS_EXHAUSTED):
                raise

    async def create_tap(self, vm_id: str) -> TapDevice:
        """Lease the next free address and put a TAP for ``vm_id`` on the bridge (undone on failure)."""
        await self.ensure_bridge()
        lease = self.store.allocate(vm_id, {"kind": "tap", "bridge": self.bridge_name})
        tap = self._device(lease.index, vm_id)
        if link_exists(tap.tap_name):  # not ours: never touch it, not even to roll back
            self.store.release(vm_id)
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"a network device named {tap.tap_name} already exists; remove it or run "
                "`smartvm network sweep --orphans` if it is a leftover",
            )
        self.store.update_meta(vm_id, {"tap": tap.tap_name})
        try:
            await (
                IpBatch()
                .extend(
                    [
                        f"tuntap add dev {tap.tap_name} mode tap",
                        f"link set {tap.tap_name} master {self.bridge_name}",
                        f"link set {tap.tap_name} up",
                    ]
                )
                .run(f"creating TAP {tap.tap_name} for {vm_id}")
            )
        except BaseException:
            await IpBatch(lines=[f"link del {tap.tap_name}"]).run("rollback", force=True)
            self.store.release(vm_id)
            raise
        self._taps[tap.tap_name] = vm_id
        return tap

    def _device(self, index: int, vm_id: str) -> TapDevice:
        guest_ip = str(self.network.network_address + index)
        return TapDevice(
            tap_name_for(self.prefix, index, vm_id),
            guest_ip,
            self.gateway_ip,
            self.subnet_mask,
            mac_from_ip(guest_ip),
        )

    async def remove_tap(self, tap_name: str) -> None:
        """Delete the TAP and release its address. Unknown names are ignored (idempotent)."""
        vm_id = self._taps.pop(tap_name, None)
        if vm_id is None:
            return
        await IpBatch(lines=[f"link del {tap_name}"]).run("removing TAP", force=True)
        self.store.release(vm_id)

    @property
    def taps(self) -> list[str]:
        return sorted(self._taps)

    @property
    def in_use(self) -> bool:
        """Whether this manager set up its bridge or holds TAP devices (so :meth:`cleanup` has work)."""
        return self._bridge_ready or bool(self._taps)

    async def cleanup(self) -> None:
        """Remove every TAP this manager created. Once no live VM of any process leases an address
        on the bridge, also remove the bridge's NAT element, and the bridge itself if smartvm
        created it (a bridge that existed before is left in place)."""
        for tap in list(self._taps):
            await self.remove_tap(tap)
        leases = self.store.leases()
        if any(lease.owner_alive() for lease in leases if lease.key != self._bridge_key):
            return
        if self.masquerade:
            await nat.host_remove([self.bridge_name], [])
        bridge_lease = next((lease for lease in leases if lease.key == self._bridge_key), None)
        if bridge_lease is not None:
            await IpBatch(lines=undo_bridge_lines(bridge_lease.meta)).run("removing bridge", force=True)
            self.store.release(self._bridge_key)
        await asyncio.to_thread(nat.delete_host_table_if_unused_sync)
        self._bridge_ready = False
