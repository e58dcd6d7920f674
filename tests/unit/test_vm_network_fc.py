"""Networking when asked, on the fake Firecracker and real bridges, TAP devices and namespaces.

A network interface without ``host_dev_name`` gets a TAP device on the SmartVM's bridge, the next
free address and a MAC derived from it; ``create_vm(config, network=slot_or_pool)`` puts the VM on a
network slot. Firecracker must receive the filled-in interface and the kernel's ``ip=`` argument, and
everything made is removed when the VM stops or its start fails halfway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fc_fake.helpers import fake_vm_config, logged_requests, processes_running

from integration.netns_support import Env, env_fixture, requires_netns
from smartvm.config import Drive, NetworkInterface
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat
from smartvm.host.ipam import read_leases
from smartvm.host.netlink_batch import netns_path
from smartvm.host.netns import SlotPool
from smartvm.host.network import link_exists, mac_from_ip
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import VMState

pytest_plugins = ["fc_fake.fixtures"]
pytestmark = [pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


def _options(env: Env, fake_binary: Path, short_tmp: Path) -> SmartVMOptions:
    return SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=fake_binary,
        runtime_dir=short_tmp / "rt",
        data_dir=short_tmp / "data",
        bridge_name=f"{env.prefix}br",
        subnet=f"198.19.{env.side_net}.0/28",
        socket_timeout_s=2,
        stop_timeout_s=2,
    )


def _put(short_tmp: Path, path: str) -> dict[str, Any]:
    """The body of the last successful PUT to ``path`` the fake Firecracker answered."""
    found = [r for r in logged_requests(short_tmp) if r["path"] == path and r["status"] < 300]
    assert found, f"no PUT {path}"
    body: dict[str, Any] = found[-1]["body"]
    return body


def _master(link: str) -> str | None:
    path = f"/sys/class/net/{link}/master"
    return os.path.basename(os.readlink(path)) if os.path.islink(path) else None


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


async def test_an_interface_without_a_device_gets_a_tap_on_the_bridge(
    env: Env, fake_binary: Path, short_tmp: Path
) -> None:
    options = _options(env, fake_binary, short_tmp)
    net, bridge = f"198.19.{env.side_net}", options.bridge_name
    leases = short_tmp / "data" / "network" / f"bridge-{bridge}.json"
    made = env.links  # removed by the env fixture whatever happens, before its leak check
    async with SmartVM(options) as svm:
        auto = fake_vm_config(
            short_tmp, f"{env.prefix}a", network_interfaces=[NetworkInterface(iface_id="eth0")]
        )
        mine = NetworkInterface(iface_id="eth0", guest_mac="06:00:00:00:00:99")
        second = fake_vm_config(short_tmp, f"{env.prefix}b", network_interfaces=[mine])
        a, b = await svm.create_vm(auto), await svm.create_vm(second)
        await a.start()
        await b.start()
        tap_a, tap_b = (vm.config.network_interfaces[0] for vm in (a, b))
        assert tap_a.host_dev_name is not None and tap_b.host_dev_name is not None
        made += [tap_a.host_dev_name, tap_b.host_dev_name]
        assert _master(tap_a.host_dev_name) == bridge and _master(tap_b.host_dev_name) == bridge
        # the next free addresses, a MAC derived from the address (unless one was given)
        assert tap_a.guest_mac == mac_from_ip(f"{net}.2") and tap_b.guest_mac == "06:00:00:00:00:99"
        ip_a = f"ip={net}.2::{net}.1:255.255.255.240:{env.prefix}a:eth0:off"
        assert a.config.boot_source.boot_args == f"console=ttyS0 reboot=k {ip_a}"
        assert f"ip={net}.3::{net}.1:" in (b.config.boot_source.boot_args or "")
        # what Firecracker was told
        iface = _put(short_tmp, "/network-interfaces/eth0")
        assert iface["host_dev_name"] in made and iface["guest_mac"] in (tap_a.guest_mac, tap_b.guest_mac)
        assert "ip=" in _put(short_tmp, "/boot-source")["boot_args"]
        assert sorted(lease.index for lease in read_leases(leases)) == [1, 2, 3]  # bridge, a, b

        await a.stop()  # its TAP and address go with it
        assert not link_exists(tap_a.host_dev_name)
        assert sorted(lease.index for lease in read_leases(leases)) == [1, 3]

        # a start that fails halfway (its drive is missing) leaves no TAP and no lease behind
        broken = fake_vm_config(
            short_tmp, f"{env.prefix}c", network_interfaces=[NetworkInterface(iface_id="eth0")]
        )
        broken.drives.append(Drive(drive_id="gone", path_on_host=str(short_tmp / "missing.img")))
        c = await svm.create_vm(broken)
        with pytest.raises(SmartVMError) as info:
            await c.start()
        assert info.value.code == ErrorCode.STAGING_FAILED, info.value
        assert c.state is VMState.ERROR
        made_for_c = c.config.network_interfaces[0].host_dev_name
        assert made_for_c is not None and not link_exists(made_for_c)  # made, then removed again
        assert sorted(lease.index for lease in read_leases(leases)) == [1, 3]
        assert link_exists(bridge)
    # the SmartVM's cleanup removes the TAP of b, then the bridge it made and its NAT element
    assert not link_exists(tap_b.host_dev_name) and not link_exists(bridge)
    assert read_leases(leases) == []
    elements = nat.host_elements_sync()
    assert elements is None or bridge not in elements[0]


async def test_network_pool_gives_a_running_vm_a_slot_and_takes_it_back(
    env: Env, fake_binary: Path, short_tmp: Path
) -> None:
    options = _options(env, fake_binary, short_tmp)
    async with (
        SlotPool(1, prefix=env.prefix, transit=env.transit, state_dir=env.state_dir) as pool,
        SmartVM(options) as svm,
    ):
        vm = await svm.create_vm(fake_vm_config(short_tmp, f"{env.prefix}p"), network=pool)
        assert pool.in_use == []  # nothing is taken before the VM starts
        await vm.start()
        [slot] = pool.in_use
        assert vm.netns == slot.netns_name
        # the hypervisor runs in the slot's namespace, on its TAP, with the slot's addressing
        [pid] = processes_running(fake_binary)
        assert _netns_of(pid) == os.stat(netns_path(slot.netns_name)).st_ino
        assert _put(short_tmp, "/network-interfaces/eth0") == {
            "iface_id": "eth0",
            "host_dev_name": slot.tap_name,
            "guest_mac": slot.guest_mac,
        }
        expected_ip = f"ip=172.16.0.2::172.16.0.1:255.255.255.252:{env.prefix}p:eth0:off"
        assert _put(short_tmp, "/boot-source")["boot_args"].endswith(expected_ip)
        await vm.stop()
        assert pool.in_use == [] and slot.destroyed  # returned to the pool (destroyed, not reused)

        # a failed start returns the slot too
        broken = fake_vm_config(short_tmp, f"{env.prefix}q")
        broken.drives.append(Drive(drive_id="gone", path_on_host=str(short_tmp / "missing.img")))
        failing = await svm.create_vm(broken, network=pool)
        with pytest.raises(SmartVMError) as info:
            await failing.start()
        assert info.value.code == ErrorCode.STAGING_FAILED, info.value
        assert pool.in_use == []
