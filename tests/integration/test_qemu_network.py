"""A guest under QEMU inside a network namespace reaches the host end of its TAP."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from guest_support import boot_config, wait_console
from netns_support import SKIP_REASON

pytestmark = [
    pytest.mark.integration,
    pytest.mark.network,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
]

HOST_IP, GUEST_IP = "10.200.0.1", "10.200.0.2"
PING = f"ping -c 3 -W 2 {HOST_IP} >/dev/null 2>&1 && echo PING-OK || echo PING-FAILED"


@pytest.fixture
def netns_with_tap() -> Iterator[tuple[str, str]]:
    name = f"svq{secrets.token_hex(3)}"
    tap = "tap0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
            ["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap],
            ["ip", "link", "set", tap, "up"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, capture_output=True)
        yield name, tap
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def neighbours(netns: str, dev: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "ip", "neigh", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


async def test_guest_in_a_namespace_reaches_its_tap(
    svm: Any, guest_image: Any, netns_with_tap: tuple[str, str]
) -> None:
    netns, tap = netns_with_tap
    config = boot_config(
        guest_image,
        extra_boot_args=f"ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off",
        exec_script=PING,
        network_interfaces=[{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": "06:00:0a:c8:00:02"}],
    )
    vm = await svm.create_vm(config, netns=netns)
    await vm.start()
    console = await wait_console(vm, "PING-", timeout=60)
    assert "PING-OK" in console, console[-2000:]
    assert "06:00:0a:c8:00:02" in neighbours(netns, tap)  # the MAC from the config reached the wire
    await vm.stop()
