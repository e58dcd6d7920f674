"""Shared pieces of the sandbox tests: one data dir per test session (the ``base`` template is built
once into it), a manager per test, and the check that a test left nothing on the host."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from guest_support import processes_mentioning

from smartvm.host.ipam import read_leases
from smartvm.host.netlink_batch import netns_path
from smartvm.host.netns import slot_names, slot_store
from smartvm.options import SmartVMOptions
from smartvm.sandbox.manager import SandboxManager
from smartvm.sandbox.settings import SandboxSettings


def manager_for(data_dir: Path, runtime_root: Path, **settings: object) -> SandboxManager:
    values: dict[str, object] = {"data_dir": data_dir, "slot_pool_size": 1, "warm_pool_size": 0, **settings}
    return SandboxManager(
        options=SmartVMOptions(engine="qemu", runtime_dir=runtime_root),
        settings=SandboxSettings.model_validate(values),
    )


def slots_of(data_dir: Path) -> list[str]:
    """Namespaces that exist for leases made by the manager of ``data_dir``."""
    import ipaddress

    s = SandboxSettings()
    store = slot_store(None, s.slot_prefix, ipaddress.IPv4Network(s.slot_transit))
    names = []
    for lease in read_leases(store.path) if store.path.exists() else []:
        if lease.meta.get("manager") == str(data_dir):
            names.append(slot_names(s.slot_prefix, lease.index)[0])
    return names


def namespaces_alive(names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(netns_path(n))]


def assert_no_sandbox_left(data_dir: Path, runtime_root: Path) -> None:
    """No hypervisor, runtime dir, VM record, sandbox dir, network slot or loop device survived."""
    deadline = time.monotonic() + 5
    while processes_mentioning(str(runtime_root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(runtime_root)) == [], "a sandbox VM outlived the test"
    left = sorted(str(p) for p in runtime_root.rglob("*")) if runtime_root.exists() else []
    assert left == [], f"runtime files left: {left}"
    vms = data_dir / "vms"
    assert sorted(vms.glob("*.json")) == [] if vms.exists() else True, "VM records left"
    sandboxes = data_dir / "sandboxes"
    assert [p.name for p in sandboxes.iterdir()] == [] if sandboxes.exists() else True, "sandbox dirs left"
    assert slots_of(data_dir) == [], f"network slot leases left: {slots_of(data_dir)}"
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(data_dir) not in loops, f"loop devices left: {loops}"
