"""A network namespace per sandbox, and a pool of them made ahead of time.

Inside every slot the guest sees the same world: TAP ``tap0`` with gateway 172.16.0.1 (MAC
06:00:ac:10:00:01), guest address 172.16.0.2, MAC 06:00:ac:10:00:02. A snapshot taken in one slot
therefore restores into any other: even the gateway's entry in the guest's ARP cache stays true
(with a random TAP MAC, a resumed guest kept sending to the old slot's MAC until the entry expired).
The host reaches each sandbox through the slot's own ``host_ip`` (the namespace end of a veth pair):
the namespace DNATs ``host_ip`` to the guest and SNATs the guest's outbound traffic to ``host_ip``,
and the host masquerades it onwards. Egress policy is a chain inside the
namespace; inbound port forwards are elements of the host table's ``portfwd`` map.

Setting up N slots costs one ``ip -batch`` on the host, one ``ip -n NS -batch`` plus one in-process
nftables transaction per slot (run concurrently), and one host nftables transaction; see
``bench/network_slots.py``. Tearing down is one ``ip netns del`` batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat
from smartvm.host.ipam import Lease, LeaseStore, default_state_dir
from smartvm.host.nat import EgressPolicy
from smartvm.host.netlink_batch import IpBatch, netns_exec_argv, netns_path, setup_netns_inside
from smartvm.host.network import (
    TapDevice,
    check_prefix,
    enable_host_forwarding,
    kernel_ip_arg,
    link_exists,
    mac_from_ip,
)

log = logging.getLogger(__name__)

GUEST_IP = "172.16.0.2"
GATEWAY_IP = "172.16.0.1"
GUEST_NET = "172.16.0.0/30"
GUEST_MASK = "255.255.255.252"
GUEST_MAC = mac_from_ip(GUEST_IP)
GATEWAY_MAC = mac_from_ip(GATEWAY_IP)
TAP_NAME = "tap0"
UPLINK = "veth0"
DEFAULT_TRANSIT = "10.200.0.0/16"
DEFAULT_PREFIX = "sv"
_VETH_GONE_TIMEOUT = 1.0  # seconds the kernel gets to destroy a deleted namespace's veth


def slot_names(prefix: str, index: int) -> tuple[str, str]:
    """(namespace name, host-side veth name) of slot ``index``; the veth name fits 15 characters."""
    return f"{prefix}-ns{index}", f"{prefix}v{index}"


def _transit(transit: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(transit)
    except ValueError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"transit network {transit!r} is not an IPv4 network such as 10.200.0.0/16",
        ) from exc
    if net.prefixlen > 30:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"transit network {transit} must be /30 or larger")
    return net


def slot_store(state_dir: Path | None, prefix: str, transit: ipaddress.IPv4Network) -> LeaseStore:
    root = state_dir if state_dir is not None else default_state_dir()
    return LeaseStore(root / f"slots-{prefix}.json", 0, transit.num_addresses // 4 - 1)


@dataclass
class NetworkSlot:
    """One sandbox's namespace. Engines use ``netns_name``, ``tap_name``, ``guest_mac`` and
    ``kernel_ip_arg``; clients reach the guest at ``host_ip``."""

    index: int
    prefix: str
    netns_name: str
    host_veth: str
    host_side_ip: str
    host_ip: str
    lease_key: str
    store: LeaseStore = field(repr=False)
    egress: EgressPolicy = field(default_factory=EgressPolicy.allow_all)
    port_forwards: dict[int, int] = field(default_factory=dict)
    destroyed: bool = False

    tap_name = TAP_NAME
    guest_ip = GUEST_IP
    gateway_ip = GATEWAY_IP
    subnet_mask = GUEST_MASK
    guest_mac = GUEST_MAC

    @classmethod
    def _from_lease(
        cls, lease: Lease, store: LeaseStore, prefix: str, transit: ipaddress.IPv4Network
    ) -> NetworkSlot:
        netns_name, host_veth = slot_names(prefix, lease.index)
        base = transit.network_address + 4 * lease.index
        return cls(lease.index, prefix, netns_name, host_veth, str(base + 1), str(base + 2), lease.key, store)

    @property
    def tap(self) -> TapDevice:
        return TapDevice(TAP_NAME, GUEST_IP, GATEWAY_IP, GUEST_MASK, GUEST_MAC)

    def kernel_ip_arg(self, hostname: str) -> str:
        return kernel_ip_arg(self.tap, hostname)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return netns_exec_argv(self.netns_name, argv)

    def _check_alive(self) -> None:
        if self.destroyed:
            raise SmartVMError(ErrorCode.INVALID_STATE, f"network slot {self.netns_name} was destroyed")

    async def set_egress(self, policy: EgressPolicy) -> None:
        """Replace the egress policy atomically."""
        self._check_alive()
        await setup_netns_inside(
            self.netns_name, nat.egress_script(policy), f"egress policy for {self.netns_name}", {}
        )
        self.egress = policy

    async def forward_port(self, host_port: int, guest_port: int) -> None:
        """TCP connections to ``host_port`` on any host address (except loopback) reach ``guest_port``."""
        self._check_alive()
        for p, what in ((host_port, "host_port"), (guest_port, "guest_port")):
            if not 1 <= p <= 65535:
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{what} {p} must be 1-65535")
        self.store.update_meta(self.lease_key, {"ports": [*self.port_forwards, host_port]})
        try:
            await nat.host_add([], {host_port: (self.host_ip, guest_port)})
        except BaseException:
            self.store.update_meta(self.lease_key, {"ports": list(self.port_forwards)})
            raise
        self.port_forwards[host_port] = guest_port

    async def remove_port_forward(self, host_port: int) -> None:
        if self.port_forwards.pop(host_port, None) is None:
            return
        await nat.host_remove([], [host_port])
        self.store.update_meta(self.lease_key, {"ports": list(self.port_forwards)})

    async def destroy(self) -> None:
        """Remove the namespace, the veth pair, host NAT elements and the lease (idempotent)."""
        if self.destroyed:
            return
        await destroy_slots([self])


# -- setup steps as batch lines and scripts (module functions, so tests can inject faults)


def _host_lines(slot: NetworkSlot) -> list[str]:
    return [
        f"netns add {slot.netns_name}",
        f"link add {slot.host_veth} type veth peer name {UPLINK} netns {slot.netns_name}",
        f"addr add {slot.host_side_ip}/30 dev {slot.host_veth}",
        f"link set {slot.host_veth} up",
    ]


def _ns_lines(slot: NetworkSlot) -> list[str]:
    return [
        "link set lo up",
        f"addr add {slot.host_ip}/30 dev {UPLINK}",
        f"link set {UPLINK} up",
        f"tuntap add dev {TAP_NAME} mode tap",
        f"link set {TAP_NAME} address {GATEWAY_MAC}",
        f"addr add {GATEWAY_IP}/30 dev {TAP_NAME}",
        f"link set {TAP_NAME} up",
        f"route add default via {slot.host_side_ip}",
    ]


def _ns_nft(slot: NetworkSlot, policy: EgressPolicy) -> str:
    return nat.netns_table_script(
        uplink=UPLINK, tap=TAP_NAME, host_ip=slot.host_ip, guest_ip=GUEST_IP, guest_net=GUEST_NET
    ) + nat.egress_script(policy)


async def _setup_inside(slot: NetworkSlot, policy: EgressPolicy) -> None:
    await IpBatch(netns=slot.netns_name, lines=_ns_lines(slot)).run(f"configuring {slot.netns_name}")
    await setup_netns_inside(
        slot.netns_name, _ns_nft(slot, policy), f"nftables in {slot.netns_name}", {"net/ipv4/ip_forward": "1"}
    )


async def _gather_all(aws: list[Awaitable[object]]) -> None:
    """Wait for all (so nothing is still running when we roll back), then raise the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _names_in_use(slots: list[NetworkSlot]) -> list[str]:
    return [s.netns_name for s in slots if os.path.exists(netns_path(s.netns_name))] + [
        s.host_veth for s in slots if link_exists(s.host_veth)
    ]


async def create_slots(
    count: int,
    *,
    store: LeaseStore,
    prefix: str,
    transit: ipaddress.IPv4Network,
    egress: EgressPolicy | None = None,
    meta: dict[str, str] | None = None,
) -> list[NetworkSlot]:
    """Create ``count`` slots; on any failure everything created so far is removed again.

    ``meta`` is kept in each slot's lease (e.g. which sandbox manager made it)."""
    policy = egress or EgressPolicy.allow_all()
    slots: list[NetworkSlot] = []
    try:  # nothing is touched until every name is known to be free: undoing means releasing leases
        for _ in range(count):
            lease = store.allocate(
                f"{prefix}:{uuid.uuid4().hex[:12]}",
                {**(meta or {}), "kind": "slot", "prefix": prefix, "transit": str(transit)},
            )
            slots.append(NetworkSlot._from_lease(lease, store, prefix, transit))
        taken = _names_in_use(slots)
        if taken:  # not ours: the teardown below must never remove them
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"{', '.join(taken)} already exist(s); run `smartvm network sweep --orphans` "
                "if they are leftovers, or use another prefix",
            )
    except BaseException:
        for s in slots:
            store.release(s.lease_key)
        raise
    if not slots:
        return []
    try:
        await IpBatch(lines=[line for s in slots for line in _host_lines(s)]).run("creating slot namespaces")
        # independent from here on: each namespace's own steps, and the host's NAT elements
        await _gather_all(
            [*(_setup_inside(s, policy) for s in slots), nat.host_add([s.host_veth for s in slots])]
        )
        for s in slots:
            s.egress = policy
    except BaseException:
        await destroy_slots(slots)
        raise
    return slots


async def destroy_slots(slots: list[NetworkSlot]) -> None:
    """Tear slots down; also fine for half-built or already removed slots.

    Deleting the namespaces lets the kernel destroy all their devices (and the host ends of the
    veth pairs) in one sweep, several times faster than deleting each veth (each deletion waits
    for an RCU grace period). We wait until the host ends are gone before releasing the leases, so
    a reused slot number never meets a dying veth; if a namespace is kept alive by a process still
    inside it, its veth is deleted explicitly.
    """
    if not slots:
        return
    ports = [p for s in slots for p in s.port_forwards]
    await _gather_all(
        [
            IpBatch(lines=[f"netns del {s.netns_name}" for s in slots]).run("removing slots", force=True),
            nat.host_remove([s.host_veth for s in slots], ports),
        ]
    )
    deadline = time.monotonic() + _VETH_GONE_TIMEOUT
    remaining = [s.host_veth for s in slots if link_exists(s.host_veth)]
    while remaining and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
        remaining = [v for v in remaining if link_exists(v)]
    if remaining:
        await IpBatch(lines=[f"link del {v}" for v in remaining]).run("removing slot links", force=True)
    for s in slots:
        s.store.release(s.lease_key)
        s.port_forwards.clear()
        s.destroyed = True


class SlotPool:
    """``size`` slots kept ready so ``acquire()`` costs only applying the sandbox's policy.

    Released slots are destroyed, not reused (no conntrack or neighbour state crosses sandboxes),
    and the pool refills in the background with one batched setup.
    """

    def __init__(
        self,
        size: int = 4,
        *,
        prefix: str = DEFAULT_PREFIX,
        transit: str = DEFAULT_TRANSIT,
        state_dir: Path | str | None = None,
        enable_ip_forward: bool = True,
        meta: dict[str, str] | None = None,
    ) -> None:
        if size < 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"pool size {size} must be 0 or more")
        self.size = size
        self.prefix = check_prefix(prefix)
        self.transit = _transit(transit)
        self.store = slot_store(Path(state_dir) if state_dir is not None else None, self.prefix, self.transit)
        self.enable_ip_forward = enable_ip_forward
        self.meta = dict(meta or {})
        self._ready: list[NetworkSlot] = []
        self._in_use: dict[str, NetworkSlot] = {}
        self._refill_task: asyncio.Task[None] | None = None
        self._closed = False
        self._started = False

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def in_use(self) -> list[NetworkSlot]:
        return list(self._in_use.values())

    async def _create(self, count: int) -> list[NetworkSlot]:
        if not self._started:
            if self.enable_ip_forward:
                enable_host_forwarding()
            self._started = True
        slots = await create_slots(
            count, store=self.store, prefix=self.prefix, transit=self.transit, meta=self.meta
        )
        if self._closed:  # closed while they were being built: close() could not see them
            await destroy_slots(slots)
            self._check_open()
        return slots

    async def start(self) -> None:
        """Fill the pool (one batched setup for all slots)."""
        self._check_open()
        self._ready += await self._create(self.size - len(self._ready))

    async def acquire(
        self, *, egress: EgressPolicy | None = None, port_forwards: dict[int, int] | None = None
    ) -> NetworkSlot:
        """A ready slot with ``egress`` applied and ``host port -> guest port`` forwards added."""
        self._check_open()
        slot = self._ready.pop(0) if self._ready else (await self._create(1))[0]
        self._in_use[slot.netns_name] = slot
        try:
            if egress is not None and egress != slot.egress:
                await slot.set_egress(egress)
            for host_port, guest_port in (port_forwards or {}).items():
                await slot.forward_port(host_port, guest_port)
        except BaseException:
            await self.release(slot)
            raise
        self._schedule_refill()
        return slot

    def adopt(self, lease_key: str, *, egress: EgressPolicy | None = None) -> NetworkSlot:
        """Take over a slot handed out earlier by a pool of a process that is gone (its namespace
        and devices still exist, a VM of that process still runs in it). ``egress`` is the policy
        the slot was given (kept as it is, not applied again)."""
        self._check_open()
        lease = self.store.adopt(lease_key)
        slot = NetworkSlot._from_lease(lease, self.store, self.prefix, self.transit)
        if not os.path.exists(netns_path(slot.netns_name)):
            self.store.release(lease_key)
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED, f"the namespace {slot.netns_name} of slot {lease_key} is gone"
            )
        slot.egress = egress or EgressPolicy.allow_all()
        self._in_use[slot.netns_name] = slot
        return slot

    async def sweep_dead(self, keep: set[str], match: dict[str, str]) -> int:
        """Destroy the slots whose lease owner died, whose lease meta has every ``match`` item and
        whose lease key is not in ``keep`` (what a crashed owner left); the number destroyed."""
        dead = [
            lease
            for lease in self.store.dead_leases()
            if lease.key not in keep and all(lease.meta.get(k) == v for k, v in match.items())
        ]
        slots = [NetworkSlot._from_lease(lease, self.store, self.prefix, self.transit) for lease in dead]
        await destroy_slots(slots)
        return len(slots)

    async def release(self, slot: NetworkSlot) -> None:
        """Destroy a slot handed out by :meth:`acquire` (idempotent)."""
        self._in_use.pop(slot.netns_name, None)
        await slot.destroy()
        if not self._closed:
            self._schedule_refill()

    def _schedule_refill(self) -> None:
        if self._closed or (self._refill_task is not None and not self._refill_task.done()):
            return
        if len(self._ready) < self.size:
            self._refill_task = asyncio.get_running_loop().create_task(self._refill())

    async def _refill(self) -> None:
        try:
            self._ready += await self._create(self.size - len(self._ready))
        except SmartVMError as exc:  # acquire() still works: it creates a slot itself
            log.warning("refilling the network slot pool failed: %s", exc)

    async def close(self, *, keep_in_use: bool = False) -> None:
        """Destroy every slot of this pool (ready and handed out, unless ``keep_in_use``: VMs that
        outlive this process still use them) and the host table if unused."""
        self._closed = True
        if self._refill_task is not None:
            self._refill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill_task
        slots, self._ready = self._ready + ([] if keep_in_use else list(self._in_use.values())), []
        self._in_use.clear()
        await destroy_slots(slots)
        await asyncio.to_thread(nat.delete_host_table_if_unused_sync)

    def _check_open(self) -> None:
        if self._closed:
            raise SmartVMError(ErrorCode.INVALID_STATE, "the slot pool is closed")

    async def __aenter__(self) -> SlotPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
