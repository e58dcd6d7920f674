"""nftables rules: one table owned by smartvm on the host, and one inside each sandbox namespace.

Both are written as whole ``nft -f -`` transactions, so a change applies completely or not at all.
Per-VM state on the host lives in named sets and maps (``ifaces``, ``portfwd``), never in rules:
adding or removing a VM is one ``add element``/``delete element`` and needs no rule handles,
so several processes can share the table and each removes exactly what it added.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.netlink_batch import nft_apply_sync, nft_run, run_sync

TABLE = "smartvm"
FAMILY = "inet"
# an empty set that exists only in tables with the isolation rules: an older table lacks it, so
# host_add_sync's element transaction fails and the whole table is rebuilt with the current rules
ISOLATION_MARKER = "isolation_v1"


def host_table_script() -> str:
    """The host table: masquerade traffic leaving smartvm interfaces, DNAT forwarded host ports,
    and isolate guests: nothing from a smartvm interface reaches another smartvm interface (another
    sandbox) or opens a connection to any of the host's own addresses (replies to connections the
    host opened still pass; port forwards are DNATed before routing, so they are not local).

    ``add`` is idempotent for tables, chains, sets and maps; the chains are flushed and refilled
    in the same transaction so running this again never duplicates a rule.
    """
    t = f"{FAMILY} {TABLE}"
    dnat = "dnat ip to tcp dport map @portfwd"
    return f"""add table {t}
add set {t} ifaces {{ type ifname; }}
add map {t} portfwd {{ type inet_service : ipv4_addr . inet_service; }}
add chain {t} prerouting {{ type nat hook prerouting priority dstnat; }}
add chain {t} output {{ type nat hook output priority -100; }}
add chain {t} postrouting {{ type nat hook postrouting priority srcnat; }}
add chain {t} forward {{ type filter hook forward priority filter; }}
add chain {t} input {{ type filter hook input priority filter; }}
add set {t} {ISOLATION_MARKER} {{ type ifname; }}
flush chain {t} prerouting
flush chain {t} output
flush chain {t} postrouting
flush chain {t} forward
flush chain {t} input
add rule {t} prerouting meta nfproto ipv4 fib daddr type local {dnat}
add rule {t} output meta nfproto ipv4 fib daddr type local ip daddr != 127.0.0.0/8 {dnat}
add rule {t} postrouting iifname @ifaces oifname != @ifaces masquerade
add rule {t} forward iifname @ifaces oifname @ifaces drop
add rule {t} forward iifname @ifaces accept
add rule {t} forward oifname @ifaces ct state established,related accept
add rule {t} forward oifname @ifaces ct status dnat accept
add rule {t} input iifname @ifaces ct state established,related accept
add rule {t} input iifname @ifaces fib daddr type local drop
"""


def host_add_script(ifaces: list[str], forwards: dict[int, tuple[str, int]]) -> str:
    """Register interfaces for masquerading and host ports to forward (``port -> (ip, port)``)."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"flush set {t} {ISOLATION_MARKER}"]
    if ifaces:
        lines.append(f"add element {t} ifaces {{ {', '.join(_quote(i) for i in ifaces)} }}")
    if forwards:
        elems = ", ".join(f"{hp} : {ip} . {gp}" for hp, (ip, gp) in sorted(forwards.items()))
        lines.append(f"create element {t} portfwd {{ {elems} }}")
    return "".join(line + "\n" for line in lines) if len(lines) > 1 else ""


def host_remove_script(ifaces: list[str], host_ports: list[int]) -> str:
    """Lines removing elements one by one (run with ``delete`` per line, tolerant of absence)."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"delete element {t} ifaces {{ {_quote(i)} }}" for i in ifaces]
    lines += [f"delete element {t} portfwd {{ {p} }}" for p in host_ports]
    return "".join(line + "\n" for line in lines)


def _quote(name: str) -> str:
    return f'"{name}"'


@contextlib.contextmanager
def table_lock() -> Iterator[None]:
    """Serialise changes to the shared host table between processes, so a table that looks unused
    is never deleted while another process is adding its elements."""
    base = "/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    fd = os.open(os.path.join(base, "smartvm-nft.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def host_add_sync(ifaces: list[str], forwards: dict[int, tuple[str, int]] | None = None) -> None:
    """Add the elements; create the table first only when it is missing (the common case skips
    rebuilding the chains)."""
    elements = host_add_script(ifaces, forwards or {})
    what = "adding smartvm nftables elements"
    try:
        with table_lock():
            if not elements or nft_run(elements).returncode != 0:
                nft_apply_sync(host_table_script() + elements, what)
    except SmartVMError as exc:
        if "File exists" in exc.message and forwards:
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"a host port in {sorted(forwards)} is already forwarded by smartvm; pick another host port",
            ) from exc
        raise


async def host_add(ifaces: list[str], forwards: dict[int, tuple[str, int]] | None = None) -> None:
    await asyncio.to_thread(host_add_sync, ifaces, forwards)


def host_remove_sync(ifaces: list[str], host_ports: list[int]) -> None:
    """Remove elements; ones already gone (or a missing table) are not an error."""
    script = host_remove_script(ifaces, host_ports)
    if not script:
        return
    with table_lock():
        if nft_run(script).returncode == 0:
            return
        for line in script.splitlines():  # something was gone already: remove the rest one by one
            nft_run(line)


async def host_remove(ifaces: list[str], host_ports: list[int]) -> None:
    await asyncio.to_thread(host_remove_sync, ifaces, host_ports)


def delete_host_table_if_unused_sync() -> bool:
    """Delete the host table when no interface or port forward is registered in it."""
    with table_lock():
        elements = host_elements_sync()
        if elements is None or elements[0] or elements[1]:
            return False
        return delete_host_table_sync()


def host_elements_sync() -> tuple[set[str], set[int]] | None:
    """(interfaces, forwarded host ports) in the host table, or None if the table does not exist."""
    res = run_sync(["nft", "-j", "list", "table", FAMILY, TABLE])
    if res.returncode != 0:
        return None
    ifaces: set[str] = set()
    ports: set[int] = set()
    for item in json.loads(res.stdout).get("nftables", []):
        for kind in ("set", "map"):
            obj = item.get(kind)
            if not obj:
                continue
            for elem in obj.get("elem", []):
                if obj["name"] == "ifaces" and isinstance(elem, str):
                    ifaces.add(elem)
                elif obj["name"] == "portfwd" and isinstance(elem, list) and isinstance(elem[0], int):
                    ports.add(elem[0])
    return ifaces, ports


def delete_host_table_sync() -> bool:
    """Remove the whole host table (sweep when no smartvm VM is alive). True if it existed."""
    return run_sync(["nft", "delete", "table", FAMILY, TABLE]).returncode == 0


# ---- inside a sandbox namespace -------------------------------------------------------------

EgressMode = Literal["allow", "deny"]
# never reachable under the default policy unless an ``allow`` entry opens them: other sandboxes'
# transit addresses, the host's networks, link-local (cloud metadata), carrier-grade NAT, loopback
PRIVATE_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
)


def _cidrs(values: list[str], what: str) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.IPv4Network(v, strict=False)))
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what} entry {v!r} is not an IPv4 address or CIDR (such as 10.0.0.0/8)",
            ) from exc
    return out


@dataclass(frozen=True)
class EgressPolicy:
    """What a guest may connect to. ``deny`` CIDRs are always dropped, ``allow`` CIDRs always
    accepted, private and link-local ranges (``PRIVATE_RANGES``) are dropped under ``allow``,
    everything else follows ``default``. Replies to connections the host opened
    are always let through, so ``deny_all()`` still lets the host talk to the guest."""

    default: EgressMode = "allow"
    allow: tuple[str, ...] = field(default_factory=tuple)
    deny: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.default not in ("allow", "deny"):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"egress default {self.default!r} must be 'allow' or 'deny'"
            )
        object.__setattr__(self, "allow", tuple(_cidrs(list(self.allow), "egress allow")))
        object.__setattr__(self, "deny", tuple(_cidrs(list(self.deny), "egress deny")))

    @classmethod
    def allow_all(cls) -> EgressPolicy:
        return cls("allow")

    @classmethod
    def deny_all(cls) -> EgressPolicy:
        return cls("deny")

    @classmethod
    def allow_only(cls, cidrs: list[str]) -> EgressPolicy:
        return cls("deny", allow=tuple(cidrs))

    @classmethod
    def deny_only(cls, cidrs: list[str]) -> EgressPolicy:
        return cls("allow", deny=tuple(cidrs))


def netns_table_script(*, uplink: str, tap: str, host_ip: str, guest_ip: str, guest_net: str) -> str:
    """The table inside one sandbox namespace: the host's address for the sandbox is DNATed to
    the guest, the guest's traffic leaves SNATed to that address, egress goes through ``egress``.
    A guest cannot get around the policy by spoofing its source address or by using IPv6."""
    t = f"{FAMILY} {TABLE}"
    return f"""add table {t}
add set {t} allow {{ type ipv4_addr; flags interval; auto-merge; }}
add set {t} deny {{ type ipv4_addr; flags interval; auto-merge; }}
add set {t} private {{ type ipv4_addr; flags interval; }}
flush set {t} private
add element {t} private {{ {", ".join(PRIVATE_RANGES)} }}
add chain {t} prerouting {{ type nat hook prerouting priority dstnat; }}
add chain {t} postrouting {{ type nat hook postrouting priority srcnat; }}
add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {t} egress
flush chain {t} prerouting
flush chain {t} postrouting
flush chain {t} forward
add rule {t} prerouting iifname {_quote(uplink)} ip daddr {host_ip} dnat ip to {guest_ip}
add rule {t} postrouting oifname {_quote(uplink)} ip saddr {guest_net} snat ip to {host_ip}
add rule {t} forward iifname {_quote(tap)} ip saddr != {guest_ip} counter drop
add rule {t} forward iifname {_quote(tap)} meta nfproto ipv6 drop
add rule {t} forward ct state established,related accept
add rule {t} forward iifname {_quote(tap)} jump egress
"""


def egress_script(policy: EgressPolicy) -> str:
    """Replace the egress sets and chain (atomic: the old policy holds until the new one is in)."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"flush set {t} allow", f"flush set {t} deny", f"flush chain {t} egress"]
    if policy.deny:
        lines.append(f"add element {t} deny {{ {', '.join(policy.deny)} }}")
        lines.append(f"add rule {t} egress ip daddr @deny drop")
    if policy.allow:
        lines.append(f"add element {t} allow {{ {', '.join(policy.allow)} }}")
        lines.append(f"add rule {t} egress ip daddr @allow accept")
    if policy.default == "deny":
        lines.append(f"add rule {t} egress drop")
    else:
        lines.append(f"add rule {t} egress ip daddr @private drop")
    return "".join(line + "\n" for line in lines)
