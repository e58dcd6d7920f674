"""Shared pieces for the real-namespace tests: unique names, leak checks, fake guests and hosts.

Every test run uses its own name prefix and its own addresses (198.18.0.0/15, the range reserved
for network benchmarks), so parallel runs cannot collide; traffic only flows between namespaces
the tests create.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smartvm.host import nat
from smartvm.host.ipam import all_stores, read_leases
from smartvm.host.netlink_batch import call_in_netns
from smartvm.host.netns import GATEWAY_IP, GUEST_IP, GUEST_MAC, TAP_NAME, NetworkSlot


def _can_use_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    name = f"svprobe{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if subprocess.run(["nft", "list", "tables"], capture_output=True).returncode != 0:
        return "nftables is not usable here"
    return None


SKIP_REASON = _can_use_netns()
requires_netns = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def ip_batch(lines: list[str], netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    subprocess.run(argv, input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)


@dataclass
class Env:
    """One test's private namespace: name prefix, address ranges and state dir."""

    prefix: str
    transit: str
    side_net: int  # third octet of a 198.19.x.0/24 for test hosts and clients
    state_dir: Path
    helpers: list[str] = field(default_factory=list)  # test-made namespaces, removed before the check
    links: list[str] = field(default_factory=list)  # test-made host links, removed before the check

    def netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self.helpers.append(name)
        return name

    def side(self, host: int) -> str:
        return f"198.19.{self.side_net}.{host}"


def leftovers(prefix: str, state_dir: Path) -> list[str]:
    """Everything carrying ``prefix`` that still exists: namespaces, links, nft elements, leases."""
    found = []
    if os.path.isdir("/run/netns"):
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(prefix)]
    elements = nat.host_elements_sync()
    if elements is not None:
        found += [f"nft iface {i}" for i in elements[0] if i.startswith(prefix)]
    for path in all_stores(state_dir):
        found += [f"lease {path.name}:{lease.key}" for lease in read_leases(path)]
    return found


def _force_remove(prefix: str) -> None:
    for n in os.listdir("/sys/class/net"):
        if n.startswith(prefix):
            subprocess.run(["ip", "link", "del", n], capture_output=True)
    if os.path.isdir("/run/netns"):
        for n in os.listdir("/run/netns"):
            if n.startswith(prefix):
                subprocess.run(["ip", "netns", "del", n], capture_output=True)
    elements = nat.host_elements_sync()
    if elements is not None:
        nat.host_remove_sync([i for i in elements[0] if i.startswith(prefix)], [])


def env_fixture(tmp_path: Path) -> Iterator[Env]:
    """A unique prefix; asserts (after cleaning up anyway) that the test left nothing behind.
    Test modules wrap this in a fixture named ``env``."""
    prefix = "svt" + secrets.token_hex(2)
    e = Env(prefix, f"198.18.{random.randrange(256)}.0/24", random.randrange(256), tmp_path / "state")
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forwarding = f.read().strip()
    try:
        yield e
        for name in e.links:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        for name in e.helpers:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        left = leftovers(prefix, e.state_dir)
        assert not left, f"test left behind: {left}"
    finally:
        _force_remove(prefix)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write(forwarding)
        nat.delete_host_table_if_unused_sync()


def make_fake_guest(slot: NetworkSlot, guest_ns: str) -> None:
    """Stand in for a VM: replace the slot's TAP by a veth of the same name whose other end, in
    ``guest_ns``, has exactly what a guest booted with ``slot.kernel_ip_arg`` would have."""
    ip("netns", "add", guest_ns)
    ip_batch(
        [
            f"link del {TAP_NAME}",
            f"link add {TAP_NAME} type veth peer name eth0 netns {guest_ns}",
            f"addr add {GATEWAY_IP}/30 dev {TAP_NAME}",
            f"link set {TAP_NAME} up",
        ],
        netns=slot.netns_name,
    )
    ip_batch(
        [
            "link set lo up",
            f"link set eth0 address {GUEST_MAC}",
            f"addr add {GUEST_IP}/30 dev eth0",
            "link set eth0 up",
            f"route add default via {GATEWAY_IP}",
        ],
        netns=guest_ns,
    )


def make_side_host(env: Env, name: str, host_octet: int) -> tuple[str, str]:
    """A namespace ``name`` joined to the host by a veth; returns (host-side address, its address)."""
    host_addr, ns_addr = env.side(host_octet), env.side(host_octet + 1)
    link = f"{env.prefix}s{host_octet}"
    env.links.append(link)
    ip("netns", "add", name)
    ip_batch(
        [
            f"link add {link} type veth peer name eth0 netns {name}",
            f"addr add {host_addr}/30 dev {link}",
            f"link set {link} up",
        ]
    )
    ip_batch(
        [
            "link set lo up",
            f"addr add {ns_addr}/30 dev eth0",
            "link set eth0 up",
            f"route add default via {host_addr}",
        ],
        netns=name,
    )
    return host_addr, ns_addr


def listen_in(netns: str, port: int = 0) -> socket.socket:
    """A listening TCP socket that lives in ``netns``."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        s.setblocking(False)
        return s

    return call_in_netns(netns, make)


def socket_in(netns: str) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    return call_in_netns(netns, make)


async def serve_identity(sock: socket.socket, name: str) -> asyncio.Server:
    """Answer every connection with ``<name> <peer address>`` and close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        writer.write(f"{name} {peer}\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, sock=sock)


async def ask(host: str, port: int, *, sock: socket.socket | None = None, timeout: float = 5.0) -> str:
    """Connect (optionally from a socket made in some namespace) and read one line."""
    if sock is not None:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        return (await asyncio.wait_for(reader.readline(), timeout)).decode().strip()
    finally:
        writer.close()


async def servers_fixture() -> AsyncIterator[list[asyncio.Server]]:
    """Servers a test registers here are closed at the end (wrapped as fixture ``servers``)."""
    started: list[asyncio.Server] = []
    yield started
    for s in started:
        s.close()
        await s.wait_closed()
