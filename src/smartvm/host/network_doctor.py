"""``smartvm network doctor`` checks and ``smartvm network sweep``.

What smartvm creates is findable: every TAP, slot and bridge holds a lease in the state dir
naming its owner process. A leftover is a smartvm-named namespace or link that no live lease
claims. ``sweep()`` removes the devices of leases whose owner died and releases those leases;
with ``orphans=True`` it also removes unclaimed smartvm-named devices (only safe when no other
smartvm process uses a different state dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from smartvm.doctor import CheckResult, register_check
from smartvm.host import nat
from smartvm.host.ipam import Lease, LeaseStore, all_stores, default_state_dir
from smartvm.host.netlink_batch import NETNS_RUN_DIR, IpBatch, netns_path, run_sync
from smartvm.host.netns import slot_names
from smartvm.host.network import link_exists, undo_bridge_lines

_NETNS_RE = re.compile(r"^sv[a-z0-9]{0,6}-ns\d+$")
_VETH_RE = re.compile(r"^sv[a-z0-9]{0,6}v\d+$")
_TAP_RE = re.compile(r"^sv[a-z0-9]{0,6}\d+(-[a-z0-9]*)?$")


@dataclass
class Inventory:
    """smartvm-named devices on this host, and which of them live leases claim."""

    namespaces: set[str] = field(default_factory=set)
    links: dict[str, str] = field(default_factory=dict)  # name -> kind (veth, tun, bridge)
    claimed: set[str] = field(default_factory=set)
    claimed_ports: set[int] = field(default_factory=set)
    live_leases: int = 0
    dead: list[tuple[Path, Lease]] = field(default_factory=list)

    @property
    def leftover_namespaces(self) -> list[str]:
        return sorted(n for n in self.namespaces if n not in self.claimed)

    @property
    def leftover_links(self) -> list[str]:
        return sorted(n for n in self.links if n not in self.claimed)


def lease_devices(lease: Lease) -> tuple[list[str], list[str], list[int]]:
    """(namespaces, links, host ports) a lease stands for."""
    kind = lease.meta.get("kind")
    ports = [int(p) for p in lease.meta.get("ports", [])]
    if kind == "slot":
        netns, veth = slot_names(str(lease.meta["prefix"]), lease.index)
        return [netns], [veth], ports
    if kind == "tap" and "tap" in lease.meta:
        return [], [str(lease.meta["tap"])], ports
    if kind == "bridge":
        return [], [str(lease.meta["bridge"])], ports
    return [], [], ports


def _links() -> dict[str, str]:
    res = run_sync(["ip", "-d", "-j", "link", "show"])
    if res.returncode != 0:
        return {}
    out = {}
    for link in json.loads(res.stdout or "[]"):
        name = link.get("ifname", "")
        kind = link.get("linkinfo", {}).get("info_kind", "")
        if (kind == "veth" and _VETH_RE.match(name)) or (kind == "tun" and _TAP_RE.match(name)):
            out[name] = kind
    return out


def inventory(state_dir: Path | None = None) -> Inventory:
    inv = Inventory()
    if os.path.isdir(NETNS_RUN_DIR):
        inv.namespaces = {n for n in os.listdir(NETNS_RUN_DIR) if _NETNS_RE.match(n)}
    inv.links = _links()
    for path in all_stores(state_dir):
        for lease in LeaseStore(path, 0, 0).leases():
            if lease.owner_alive():
                inv.live_leases += 1
                namespaces, links, ports = lease_devices(lease)
                inv.claimed.update(namespaces, links)
                inv.claimed_ports.update(ports)
            else:
                inv.dead.append((path, lease))
    return inv


@dataclass
class SweepReport:
    released_leases: list[str] = field(default_factory=list)
    removed_namespaces: list[str] = field(default_factory=list)
    removed_links: list[str] = field(default_factory=list)
    removed_ports: list[int] = field(default_factory=list)
    removed_table: bool = False


def sweep(state_dir: Path | None = None, *, orphans: bool = False) -> SweepReport:
    """Remove the devices and NAT elements of VMs whose owner process died, and release their leases."""
    inv = inventory(state_dir)
    report = SweepReport()
    namespaces: list[str] = []
    links: list[str] = []
    ports: list[int] = []
    bridge_undo: list[str] = []
    dead_by_store: dict[Path, list[Lease]] = {}
    for path, lease in inv.dead:
        dead_by_store.setdefault(path, []).append(lease)
    for path, dead in dead_by_store.items():
        store = LeaseStore(path, 0, 0)
        live_taps = any(lease.owner_alive() and lease.meta.get("kind") == "tap" for lease in store.leases())
        for lease in dead:
            if lease.meta.get("kind") == "bridge" and live_taps:
                continue  # the bridge's creator died, but other VMs still use it
            n, lk, p = lease_devices(lease)
            if lease.meta.get("kind") == "bridge":
                lk = []  # undone below: a bridge smartvm did not create must survive
                bridge_undo += undo_bridge_lines(lease.meta)
            if store.release_if_dead(lease.key):
                namespaces += [x for x in n if x not in inv.claimed]
                links += [x for x in lk if x not in inv.claimed]
                ports += [x for x in p if x not in inv.claimed_ports]
                report.released_leases.append(f"{path.name}:{lease.key}")
    if orphans:
        namespaces += inv.leftover_namespaces
        links += inv.leftover_links
        elements = nat.host_elements_sync()
        if elements is not None:
            ports += sorted(elements[1] - inv.claimed_ports)
    links = sorted(set(links))
    namespaces = sorted(set(namespaces))
    batch = IpBatch(
        lines=[f"link del {x}" for x in links] + [f"netns del {x}" for x in namespaces] + bridge_undo
    )
    batch.run_sync("sweeping", force=True)
    bridges = [line.split()[2] for line in bridge_undo if line.startswith("link del ")]
    report.removed_links = [x for x in links + bridges if not link_exists(x)]
    report.removed_namespaces = [x for x in namespaces if not os.path.exists(netns_path(x))]
    elements = nat.host_elements_sync()
    if elements is not None:
        stale_ifaces = sorted(i for i in elements[0] if not link_exists(i))
        ports = sorted(set(ports) & elements[1])
        nat.host_remove_sync(stale_ifaces, ports)
        report.removed_ports = ports
        report.removed_table = nat.delete_host_table_if_unused_sync()
    return report


@register_check
def check_ip_forwarding() -> CheckResult:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            on = f.read().strip() == "1"
    except OSError as exc:
        return CheckResult("ip forwarding", False, f"cannot read net.ipv4.ip_forward: {exc.strerror}")
    if on:
        return CheckResult("ip forwarding", True, "net.ipv4.ip_forward=1")
    return CheckResult(
        "ip forwarding",
        False,
        "net.ipv4.ip_forward=0: guests cannot reach beyond the host",
        "sysctl -w net.ipv4.ip_forward=1 (SlotPool does this itself unless enable_ip_forward=False)",
    )


@register_check
def check_nftables() -> CheckResult:
    if shutil.which("nft") is None:
        return CheckResult("nftables", False, "the 'nft' command is missing", "apt-get install nftables")
    res = run_sync(["nft", "list", "tables"])
    if res.returncode != 0:
        return CheckResult(
            "nftables",
            False,
            f"nft cannot list tables: {res.stderr.strip()}",
            "run as root (CAP_NET_ADMIN); check the nf_tables kernel module",
        )
    version = run_sync(["nft", "--version"]).stdout.strip()
    return CheckResult("nftables", True, version or "available")


@register_check
def check_network_leftovers() -> CheckResult:
    inv = inventory()
    problems = []
    if inv.leftover_namespaces:
        problems.append(f"namespaces {', '.join(inv.leftover_namespaces)}")
    if inv.leftover_links:
        problems.append(f"links {', '.join(inv.leftover_links)}")
    if inv.dead:
        problems.append(f"{len(inv.dead)} leases of dead processes")
    elements = nat.host_elements_sync()
    if elements is not None and inv.live_leases == 0:
        problems.append(f"nftables table {nat.FAMILY} {nat.TABLE} with no live VM")
    if not problems:
        return CheckResult(
            "network leftovers", True, f"none ({inv.live_leases} live leases in {default_state_dir()})"
        )
    return CheckResult(
        "network leftovers",
        False,
        "; ".join(problems),
        "smartvm network sweep (add --orphans for devices no lease claims)",
    )
