"""Sandbox network slots on real namespaces: reachability, egress policy, port forwards, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from netns_support import (
    Env,
    ask,
    env_fixture,
    ip,
    ip_batch,
    leftovers,
    listen_in,
    make_fake_guest,
    make_side_host,
    requires_netns,
    serve_identity,
    servers_fixture,
    socket_in,
)

from error_support import raises_code
from smartvm import EgressPolicy, SlotPool
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat, netns
from smartvm.host.netlink_batch import call_in_netns
from smartvm.host.netns import TAP_NAME

pytestmark = [pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


@pytest.fixture
async def servers() -> AsyncIterator[list[asyncio.Server]]:
    async for started in servers_fixture():
        yield started


GUEST_PORT = 7000


def _netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _spoof_drops(slot: netns.NetworkSlot) -> int:
    """Packets the namespace dropped for carrying a source other than the guest's address."""

    def read() -> int:
        out = subprocess.run(
            ["nft", "-j", "list", "chain", "inet", "smartvm", "forward"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for item in json.loads(out)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        raise AssertionError("no anti-spoofing counter in the namespace")

    return call_in_netns(slot.netns_name, read)


def _pool(env: Env, size: int) -> SlotPool:
    return SlotPool(size, prefix=env.prefix, transit=env.transit, state_dir=env.state_dir)


async def test_slot_shape_every_guest_sees_the_same_network(env: Env) -> None:
    async with _pool(env, 2) as pool:
        a, b = await pool.acquire(), await pool.acquire()
        assert (a.tap_name, a.guest_ip, a.guest_mac) == (b.tap_name, b.guest_ip, b.guest_mac)
        assert a.host_ip != b.host_ip and a.netns_name != b.netns_name
        assert a.kernel_ip_arg("box") == "ip=172.16.0.2::172.16.0.1:255.255.255.252:box:eth0:off"
        assert _netns_exists(a.netns_name)
        assert len(a.host_veth) <= 15
        # the TAP exists inside the namespace; an engine started with exec_argv sees it
        argv = a.exec_argv(["ip", "-d", "-j", "link", "show", TAP_NAME])
        out = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        shown, _ = await out.communicate()
        assert out.returncode == 0
        assert json.loads(shown)[0]["linkinfo"]["info_data"]["type"] == "tap"
        await pool.release(a)
        assert not _netns_exists(a.netns_name)
        assert a.destroyed


async def test_two_identical_guests_reachable_through_their_own_host_ip(
    env: Env, servers: list[asyncio.Server]
) -> None:
    async with _pool(env, 2) as pool:
        slots = [await pool.acquire(), await pool.acquire()]
        for i, slot in enumerate(slots):
            guest = env.netns(f"g{i}")
            make_fake_guest(slot, guest)
            servers.append(await serve_identity(listen_in(guest, GUEST_PORT), f"guest{i}"))
        for i, slot in enumerate(slots):
            answer = await ask(slot.host_ip, GUEST_PORT)
            name, peer = answer.split()
            assert name == f"guest{i}"
            assert peer == slot.host_side_ip  # the guest sees the host's end of the slot's link


async def test_egress_deny_blocks_and_allow_lets_through(env: Env, servers: list[asyncio.Server]) -> None:
    test_host = env.netns("th")
    _, th_addr = make_side_host(env, test_host, 1)
    servers.append(await serve_identity(listen_in(test_host, 8000), "testhost"))
    async with _pool(env, 1) as pool:
        slot = await pool.acquire(egress=EgressPolicy.deny_all())
        guest = env.netns("g0")
        make_fake_guest(slot, guest)
        with pytest.raises(TimeoutError):
            await ask(th_addr, 8000, sock=socket_in(guest), timeout=1.0)
        # the host can still reach the guest while egress is denied
        servers.append(await serve_identity(listen_in(guest, GUEST_PORT), "guest"))
        assert (await ask(slot.host_ip, GUEST_PORT)).startswith("guest ")

        await slot.set_egress(EgressPolicy.allow_only([f"{th_addr}/32"]))
        name, peer = (await ask(th_addr, 8000, sock=socket_in(guest))).split()
        assert name == "testhost" and peer == env.side(1)  # masqueraded by the host

        await slot.set_egress(EgressPolicy.deny_only([f"{th_addr}/32"]))
        with pytest.raises(TimeoutError):
            await ask(th_addr, 8000, sock=socket_in(guest), timeout=1.0)

        await slot.set_egress(EgressPolicy.allow_all())
        assert (await ask(th_addr, 8000, sock=socket_in(guest))).startswith("testhost ")

        # a guest sending from another source address is dropped, even with egress allowed
        assert _spoof_drops(slot) == 0
        ip_batch(["addr add 10.99.99.99/32 dev eth0"], netns=guest)
        spoofed = call_in_netns(guest, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with spoofed:
            spoofed.bind(("10.99.99.99", 0))
            for _ in range(3):
                spoofed.sendto(b"spoofed", (th_addr, 8000))
        for _ in range(50):
            if _spoof_drops(slot) >= 3:
                break
            await asyncio.sleep(0.05)
        assert _spoof_drops(slot) >= 3


async def test_port_forward_from_outside_and_from_the_host(env: Env, servers: list[asyncio.Server]) -> None:
    client = env.netns("cl")
    host_addr, _ = make_side_host(env, client, 5)
    host_port = random.randrange(20000, 30000)
    async with _pool(env, 1) as pool:
        slot = await pool.acquire(port_forwards={host_port: GUEST_PORT})
        guest = env.netns("g0")
        make_fake_guest(slot, guest)
        servers.append(await serve_identity(listen_in(guest, GUEST_PORT), "guest"))
        assert (await ask(host_addr, host_port, sock=socket_in(client))).startswith("guest ")
        assert (await ask(host_addr, host_port)).startswith("guest ")  # locally originated
        elements = nat.host_elements_sync()
        assert elements is not None and host_port in elements[1]
        with raises_code(ErrorCode.NETWORK_SETUP_FAILED):  # one host port forwards to one sandbox only
            await slot.forward_port(host_port, 1234)
        await slot.remove_port_forward(host_port)
        elements = nat.host_elements_sync()
        assert elements is None or host_port not in elements[1]
        with pytest.raises((TimeoutError, ConnectionRefusedError)):
            await ask(host_addr, host_port, sock=socket_in(client), timeout=1.0)


async def test_fifty_cycles_leave_nothing_behind(env: Env) -> None:
    base_port = random.randrange(30000, 40000)
    pool = _pool(env, 2)
    await pool.start()
    for i in range(50):
        slot = await pool.acquire(
            egress=EgressPolicy.deny_only(["10.0.0.0/8"]), port_forwards={base_port + i: 80}
        )
        await pool.release(slot)
    await pool.close()
    assert leftovers(env.prefix, env.state_dir) == []
    elements = nat.host_elements_sync()
    assert elements is None or not set(range(base_port, base_port + 50)) & elements[1]


def _bad_ns_lines(slot: netns.NetworkSlot) -> list[str]:
    lines = ORIGINAL_NS_LINES(slot)
    return [*lines[:3], "link set nosuchdevice up", *lines[3:]]


def _bad_nft(slot: netns.NetworkSlot, policy: EgressPolicy) -> str:
    return ORIGINAL_NS_NFT(slot, policy) + "add rule inet smartvm nosuchchain drop\n"


ORIGINAL_NS_LINES = netns._ns_lines
ORIGINAL_NS_NFT = netns._ns_nft
ORIGINAL_HOST_ADD = nat.host_add


async def _host_add_then_fail(ifaces: list[str], forwards: dict[int, tuple[str, int]] | None = None) -> None:
    await ORIGINAL_HOST_ADD(ifaces, forwards)
    raise SmartVMError(ErrorCode.NETWORK_SETUP_FAILED, "injected failure after the host step")


@pytest.mark.parametrize("step", ["namespace-batch", "namespace-nft", "host-nft"])
async def test_failure_halfway_unwinds_everything(
    env: Env, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    if step == "namespace-batch":
        monkeypatch.setattr(netns, "_ns_lines", _bad_ns_lines)
    elif step == "namespace-nft":
        monkeypatch.setattr(netns, "_ns_nft", _bad_nft)
    else:
        monkeypatch.setattr(nat, "host_add", _host_add_then_fail)
    pool = _pool(env, 3)
    with pytest.raises(SmartVMError) as info:
        await pool.start()
    assert info.value.code == ErrorCode.NETWORK_SETUP_FAILED
    if step == "namespace-batch":
        assert "nosuchdevice" in info.value.message
    assert leftovers(env.prefix, env.state_dir) == []
    await pool.close()


async def test_names_in_use_are_refused_and_left_alone(env: Env) -> None:
    squatter = env.netns("ns0")  # what slot 0 of this prefix would be called
    ip("netns", "add", squatter)
    pool = _pool(env, 1)
    with raises_code(ErrorCode.NETWORK_SETUP_FAILED) as info:
        await pool.start()
    assert squatter in info.value.message
    assert _netns_exists(squatter)
    assert leftovers(env.prefix, env.state_dir) == [f"netns {squatter}"]
    await pool.close()


async def test_exhausted_transit_releases_its_leases_and_touches_no_name(env: Env) -> None:
    squatter = env.netns("ns0")  # slot 0's name: the only slot a /30 transit network holds
    ip("netns", "add", squatter)
    pool = SlotPool(
        2, prefix=env.prefix, transit=env.transit.replace(".0/24", ".0/30"), state_dir=env.state_dir
    )
    with pytest.raises(SmartVMError) as info:
        await pool.start()
    assert info.value.code == ErrorCode.ADDRESS_EXHAUSTED
    assert _netns_exists(squatter)
    assert leftovers(env.prefix, env.state_dir) == [f"netns {squatter}"]
    await pool.close()


async def test_closing_while_a_slot_is_being_built_leaves_nothing(env: Env) -> None:
    pool = _pool(env, 0)
    acquiring = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)  # acquire() is now creating its slot
    await pool.close()
    with pytest.raises(SmartVMError) as info:
        await acquiring
    assert info.value.code == ErrorCode.INVALID_STATE
    assert leftovers(env.prefix, env.state_dir) == []


async def test_default_guest_reaches_the_internet_but_not_other_sandboxes_or_the_host(
    env: Env, servers: list[asyncio.Server]
) -> None:
    internet = env.netns("th")
    _, internet_addr = make_side_host(env, internet, 1)
    servers.append(await serve_identity(listen_in(internet, 8000), "internet"))
    async with _pool(env, 2) as pool:
        a, b = await pool.acquire(), await pool.acquire(egress=EgressPolicy.deny_all())
        guest_a, guest_b = env.netns("g0"), env.netns("g1")
        make_fake_guest(a, guest_a)
        make_fake_guest(b, guest_b)
        servers.append(await serve_identity(listen_in(guest_b, GUEST_PORT), "sandbox-b"))
        # a host service on a non-loopback host address: the slot's own transit gateway
        host_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host_sock.bind((a.host_side_ip, 0))
        host_sock.listen(4)
        host_sock.setblocking(False)
        servers.append(await serve_identity(host_sock, "host"))
        assert (await ask(internet_addr, 8000, sock=socket_in(guest_a))).startswith("internet ")
        assert (await ask(b.host_ip, GUEST_PORT)).startswith("sandbox-b ")  # the host still can
        for addr, port in ((b.host_ip, GUEST_PORT), (a.host_side_ip, host_sock.getsockname()[1])):
            with pytest.raises((TimeoutError, ConnectionRefusedError)):
                await ask(addr, port, sock=socket_in(guest_a), timeout=1.0)


async def test_an_allow_entry_opens_a_private_range(env: Env, servers: list[asyncio.Server]) -> None:
    private = env.netns("pv")
    link, host_addr, private_addr = f"{env.prefix}p", f"10.255.{env.side_net}.1", f"10.255.{env.side_net}.2"
    env.links.append(link)
    ip("netns", "add", private)
    ip_batch(
        [f"link add {link} type veth peer name eth0 netns {private}", f"addr add {host_addr}/30 dev {link}"]
    )
    ip_batch([f"link set {link} up"])
    ip_batch(
        [
            "link set lo up",
            f"addr add {private_addr}/30 dev eth0",
            "link set eth0 up",
            f"route add default via {host_addr}",
        ],
        netns=private,
    )
    servers.append(await serve_identity(listen_in(private, 8000), "private"))
    async with _pool(env, 1) as pool:
        slot = await pool.acquire()
        guest = env.netns("g0")
        make_fake_guest(slot, guest)
        with pytest.raises(TimeoutError):
            await ask(private_addr, 8000, sock=socket_in(guest), timeout=1.0)
        await slot.set_egress(EgressPolicy("allow", allow=(f"{private_addr}/32",)))
        assert (await ask(private_addr, 8000, sock=socket_in(guest))).startswith("private ")
