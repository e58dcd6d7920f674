"""Pure networking logic: MACs, names, the ip= boot argument, nftables scripts, egress policy."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm import EgressPolicy, NetworkManager, TapDevice
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host import nat
from smartvm.host.ipam import Lease
from smartvm.host.netlink_batch import IpBatch
from smartvm.host.netns import GUEST_MAC, NetworkSlot, SlotPool, netns_exec_argv, slot_names, slot_store
from smartvm.host.network import kernel_ip_arg, mac_from_ip, tap_name_for


def test_mac_is_06_00_plus_the_address_bytes() -> None:
    assert mac_from_ip("172.30.0.2") == "06:00:ac:1e:00:02"
    assert mac_from_ip("10.255.1.254") == "06:00:0a:ff:01:fe"
    assert GUEST_MAC == "06:00:ac:10:00:02"
    first = int(mac_from_ip("1.2.3.4").split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


def test_kernel_ip_arg() -> None:
    tap = TapDevice("sv2-vm1", "172.30.0.2", "172.30.0.1", "255.255.255.0", "06:00:ac:1e:00:02")
    assert kernel_ip_arg(tap, "vm1") == "ip=172.30.0.2::172.30.0.1:255.255.255.0:vm1:eth0:off"
    assert tap.kernel_ip_arg("vm1") == kernel_ip_arg(tap, "vm1")
    for bad in ("", "a:b", "x" * 64, "-lead", "has space"):
        with raises_code(ErrorCode.INVALID_ARGUMENT):
            kernel_ip_arg(tap, bad)


@pytest.mark.parametrize("vm_id", ["vm-1", "VM_With.Dots", "a" * 64, "---", "x;rm -rf /", "ü"])
def test_tap_names_fit_and_are_safe(vm_id: str) -> None:
    for index in (2, 253, 65534):
        name = tap_name_for("sv", index, vm_id)
        assert len(name) <= 15
        assert name.startswith(f"sv{index}")
        assert all(c.isascii() and (c.isalnum() or c == "-") for c in name)


def test_tap_names_are_unique_per_index_even_for_similar_ids() -> None:
    names = {tap_name_for("sv", i, "same-long-vm-identifier") for i in range(2, 300)}
    assert len(names) == 298
    assert tap_name_for("svtabcd", 12345, "vm") == "svtabcd12345-vm"


def test_slot_names_fit_interface_limits() -> None:
    netns, veth = slot_names("svt1234a", 16383)
    assert len(veth) <= 15 and netns == "svt1234a-ns16383"


def test_netns_exec_argv_execs_the_engine_directly() -> None:
    argv = netns_exec_argv("sv-ns3", ["qemu-system-x86_64", "-M", "microvm"])
    assert argv == ["nsenter", "--net=/run/netns/sv-ns3", "--", "qemu-system-x86_64", "-M", "microvm"]


def test_invalid_inputs_are_rejected_with_the_field_named() -> None:
    with raises_code(ErrorCode.INVALID_ARGUMENT, match="subnet"):
        NetworkManager(subnet="not-a-net")
    with raises_code(ErrorCode.INVALID_ARGUMENT, match="too small"):
        NetworkManager(subnet="10.0.0.0/31")
    with raises_code(ErrorCode.INVALID_ARGUMENT, match="bridge_name"):
        NetworkManager(bridge_name="a-name-much-too-long")
    with raises_code(ErrorCode.INVALID_ARGUMENT, match="prefix"):
        NetworkManager(name_prefix="Bad-Prefix")
    with raises_code(ErrorCode.INVALID_ARGUMENT, match="transit"):
        SlotPool(1, transit="10.0.0.0/31")
    with pytest.raises(SmartVMError) as info:
        SlotPool(-1)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_manager_addresses_follow_the_subnet(tmp_path: Path) -> None:
    mgr = NetworkManager("svbr9", "10.9.8.0/24", state_dir=str(tmp_path))
    assert mgr.gateway_ip == "10.9.8.1" and mgr.subnet_mask == "255.255.255.0"
    assert (mgr.store.first, mgr.store.last) == (2, 254)
    device = mgr._device(7, "vm")
    assert device.guest_ip == "10.9.8.7" and device.mac == "06:00:0a:09:08:07"


def test_egress_policy_normalises_and_validates() -> None:
    policy = EgressPolicy.allow_only(["10.1.2.3", "192.168.1.77/24"])
    assert policy.default == "deny" and policy.allow == ("10.1.2.3/32", "192.168.1.0/24")
    with pytest.raises(SmartVMError) as info:
        EgressPolicy.deny_only(["example.com"])
    assert info.value.code == ErrorCode.INVALID_ARGUMENT and "egress deny" in info.value.message
    with raises_code(ErrorCode.INVALID_ARGUMENT):
        EgressPolicy("maybe")  # type: ignore[arg-type]


def test_egress_script_orders_deny_allow_default() -> None:
    script = nat.egress_script(EgressPolicy("deny", allow=("10.0.0.0/8",), deny=("10.1.0.0/16",)))
    rules = [line for line in script.splitlines() if line.startswith("add rule")]
    assert rules == [
        "add rule inet smartvm egress ip daddr @deny drop",
        "add rule inet smartvm egress ip daddr @allow accept",
        "add rule inet smartvm egress drop",
    ]
    assert script.startswith("flush set inet smartvm allow\n")  # replaces the old policy atomically
    allow_all = nat.egress_script(EgressPolicy.allow_all())  # internet yes, private ranges no
    assert [line for line in allow_all.splitlines() if line.startswith("add rule")] == [
        "add rule inet smartvm egress ip daddr @private drop"
    ]


def test_host_scripts_use_elements_not_rules() -> None:
    add = nat.host_add_script(["svv1"], {8080: ("10.200.0.2", 80)})
    assert add == (
        "flush set inet smartvm isolation_v1\n"
        'add element inet smartvm ifaces { "svv1" }\n'
        "create element inet smartvm portfwd { 8080 : 10.200.0.2 . 80 }\n"
    )
    remove = nat.host_remove_script(["svv1"], [8080])
    assert remove.splitlines() == [
        'delete element inet smartvm ifaces { "svv1" }',
        "delete element inet smartvm portfwd { 8080 }",
    ]
    table = nat.host_table_script()
    assert table.count("flush chain") == 5  # re-running never duplicates rules
    assert "add rule inet smartvm forward iifname @ifaces oifname @ifaces drop" in table
    assert "add rule inet smartvm input iifname @ifaces fib daddr type local drop" in table


def test_netns_table_translates_the_host_address() -> None:
    script = nat.netns_table_script(
        uplink="veth0", tap="tap0", host_ip="10.200.0.6", guest_ip="172.16.0.2", guest_net="172.16.0.0/30"
    )
    assert 'iifname "veth0" ip daddr 10.200.0.6 dnat ip to 172.16.0.2' in script
    assert 'oifname "veth0" ip saddr 172.16.0.0/30 snat ip to 10.200.0.6' in script
    forward = [line for line in script.splitlines() if line.startswith("add rule inet smartvm forward")]
    assert forward[:2] == [
        'add rule inet smartvm forward iifname "tap0" ip saddr != 172.16.0.2 counter drop',
        'add rule inet smartvm forward iifname "tap0" meta nfproto ipv6 drop',
    ]
    assert forward[-1] == 'add rule inet smartvm forward iifname "tap0" jump egress'


def test_ip_batch_refuses_multi_line_commands() -> None:
    batch = IpBatch(netns="ns1").add("link set lo up")
    assert batch.argv() == ["ip", "-n", "ns1", "-batch", "-"]
    assert batch.argv(force=True) == ["ip", "-n", "ns1", "-force", "-batch", "-"]
    with pytest.raises(ValueError):
        batch.add("link set lo up\nnetns del other")


def test_slot_addresses_are_disjoint_30_blocks(tmp_path: Path) -> None:
    transit = ipaddress.IPv4Network("10.200.0.0/16")
    store = slot_store(tmp_path, "sv", transit)
    assert (store.first, store.last) == (0, 16383)
    seen: set[str] = set()
    for index in (0, 1, 16383):
        lease = Lease(index, f"k{index}", 1, 1, 0.0, {})
        slot = NetworkSlot._from_lease(lease, store, "sv", transit)
        block = ipaddress.IPv4Network(f"{slot.host_side_ip}/30", strict=False)
        assert ipaddress.IPv4Address(slot.host_ip) in block and block.subnet_of(transit)
        assert {slot.host_side_ip, slot.host_ip}.isdisjoint(seen)
        seen |= {slot.host_side_ip, slot.host_ip}
        assert (slot.netns_name, slot.host_veth) == slot_names("sv", index)
    assert slot.host_ip == "10.200.255.254"
