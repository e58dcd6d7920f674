"""NetworkManager on the real host: bridge, TAP devices, leases that survive a restart, cleanup."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_support import Env, env_fixture, ip, leftovers, requires_netns

from smartvm import NetworkManager
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat

pytestmark = [pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


def _exists(link: str) -> bool:
    return os.path.exists(f"/sys/class/net/{link}")


def _master(link: str) -> str | None:
    path = f"/sys/class/net/{link}/master"
    return os.path.basename(os.readlink(path)) if os.path.islink(path) else None


def _manager(env: Env) -> NetworkManager:
    return NetworkManager(
        f"{env.prefix}br", f"198.19.{env.side_net}.0/28", state_dir=env.state_dir, name_prefix=env.prefix
    )


def _addresses(link: str) -> str:
    return subprocess.run(["ip", "-br", "addr", "show", link], capture_output=True, text=True).stdout


async def test_taps_get_leased_addresses_on_the_bridge_and_survive_a_restart(env: Env) -> None:
    net = f"198.19.{env.side_net}"
    bridge = f"{env.prefix}br"
    first = _manager(env)
    taps = [await first.create_tap(f"vm-{i}") for i in range(3)]
    assert [t.guest_ip for t in taps] == [f"{net}.2", f"{net}.3", f"{net}.4"]
    assert f"{net}.1/28" in _addresses(bridge)
    for t in taps:
        assert len(t.tap_name) <= 15 and t.tap_name.startswith(env.prefix)
        assert _master(t.tap_name) == bridge
        assert t.gateway_ip == f"{net}.1" and t.subnet_mask == "255.255.255.240"
        assert t.mac == "06:00:c6:13:" + ":".join(f"{int(x):02x}" for x in t.guest_ip.split(".")[2:])
    elements = nat.host_elements_sync()
    assert elements is not None and bridge in elements[0]

    second = _manager(env)  # a restarted process sees the leases on disk
    tap = await second.create_tap("vm-x")
    assert tap.guest_ip == f"{net}.5"
    with pytest.raises(SmartVMError) as info:
        await second.create_tap("vm-0")
    assert info.value.code == ErrorCode.DUPLICATE_VM_ID

    await first.remove_tap(taps[1].tap_name)
    assert not _exists(taps[1].tap_name)
    assert (await second.create_tap("vm-y")).guest_ip == f"{net}.3"  # the freed address is reused

    await first.cleanup()  # the bridge stays: `second` still has live VMs on it
    assert all(not _exists(t.tap_name) for t in taps)
    assert _exists(bridge)
    await second.cleanup()
    assert leftovers(env.prefix, env.state_dir) == []


async def test_exhaustion_and_rollback(env: Env) -> None:
    mgr = NetworkManager(
        f"{env.prefix}br", f"198.19.{env.side_net}.0/29", state_dir=env.state_dir, name_prefix=env.prefix
    )
    for i in range(5):  # a /29 has .2 - .6 for guests
        await mgr.create_tap(f"vm{i}")
    with pytest.raises(SmartVMError) as info:
        await mgr.create_tap("one-too-many")
    assert info.value.code == ErrorCode.ADDRESS_EXHAUSTED
    await mgr.cleanup()
    assert leftovers(env.prefix, env.state_dir) == []


async def test_cleanup_leaves_what_it_did_not_create(env: Env) -> None:
    bridge, foreign = f"{env.prefix}br", f"{env.prefix}foreign"
    env.links += [foreign, bridge]
    ip("link", "add", bridge, "type", "bridge")
    ip("tuntap", "add", "dev", foreign, "mode", "tap")
    ip("link", "set", foreign, "master", bridge)
    mgr = _manager(env)
    tap = await mgr.create_tap("vm-1")
    assert _master(tap.tap_name) == bridge
    gateway = f"{mgr.gateway_ip}/28"
    assert gateway in _addresses(bridge)  # the guests' gateway had to be added
    await mgr.cleanup()
    assert not _exists(tap.tap_name)
    assert _exists(bridge) and _master(foreign) == bridge
    assert gateway not in _addresses(bridge)  # ... and is taken away again

    ip("addr", "add", gateway, "dev", bridge)  # an address that was there before stays
    mgr = _manager(env)
    await mgr.create_tap("vm-2")
    await mgr.cleanup()
    assert gateway in _addresses(bridge)
    elements = nat.host_elements_sync()
    assert elements is None or bridge not in elements[0]


async def test_twenty_cycles_leave_nothing_behind(env: Env) -> None:
    mgr = _manager(env)
    for i in range(20):
        tap = await mgr.create_tap(f"cycle-{i}")
        await mgr.remove_tap(tap.tap_name)
    await mgr.cleanup()
    assert leftovers(env.prefix, env.state_dir) == []


async def test_failed_tap_creation_releases_its_address(env: Env) -> None:
    mgr = _manager(env)
    taken = f"{env.prefix}2-vm1"  # the name vm1's TAP would get: its creation must fail
    env.links.append(taken)
    ip("link", "add", taken, "type", "bridge")
    with pytest.raises(SmartVMError) as info:
        await mgr.create_tap("vm1")
    assert info.value.code == ErrorCode.NETWORK_SETUP_FAILED
    assert mgr.store.get("vm1") is None and mgr.taps == []
    assert _exists(taken)  # not ours: left alone
    tap = await mgr.create_tap("vm2")
    assert tap.guest_ip.endswith(".2")  # the address came back
    await mgr.cleanup()
