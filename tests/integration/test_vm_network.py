"""A real guest whose network interface names no TAP device: SmartVM puts one on its bridge.

The guest gets the bridge's next free address through the kernel's ``ip=`` argument and a MAC
derived from that address: the host reaches a server in the guest at that address, and the guest's
MAC is what the host sees. (The guest cannot open connections to host addresses: smartvm's host
table drops them, see the README's network isolation defaults.)
Stopping the VM and cleaning up the SmartVM leave no TAP, bridge, NAT element or lease behind.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_support import assert_nothing_left, boot_config, wait_console
from netns_support import Env, env_fixture, requires_netns

from smartvm.host.ipam import read_leases
from smartvm.host.network import link_exists, mac_from_ip
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM

pytestmark = [pytest.mark.integration, pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


def _neighbours(link: str) -> str:
    return subprocess.run(["ip", "neigh", "show", "dev", link], capture_output=True, text=True).stdout


async def _http_get(address: str, port: int, timeout: float) -> str:
    """The body of ``GET /`` from ``address``, retried until the server answers (``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 2)
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        try:
            writer.write(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            await writer.drain()
            response = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
        finally:
            writer.close()
        return response.split("\r\n\r\n", 1)[-1].strip()


async def test_a_guest_gets_a_tap_address_and_mac_on_the_bridge(
    guest_image: Any, qemu_options: SmartVMOptions, env: Env
) -> None:
    net = f"198.19.{env.side_net}"
    options = qemu_options.model_copy(update={"bridge_name": f"{env.prefix}br", "subnet": f"{net}.0/28"})
    serve = "mkdir -p /tmp/www && echo guest-on-bridge > /tmp/www/index.html && httpd -p 8080 -h /tmp/www"
    config = boot_config(
        guest_image, exec_script=serve, vm_id=f"{env.prefix}g", network_interfaces=[{"iface_id": "eth0"}]
    )
    svm = SmartVM(options)
    try:
        vm = await svm.create_vm(config)
        await vm.start()
        tap = vm.config.network_interfaces[0].host_dev_name
        assert tap is not None
        env.links.append(tap)
        assert f"ip={net}.2::{net}.1:255.255.255.240:{env.prefix}g:eth0:off" in (
            vm.config.boot_source.boot_args or ""
        )
        await wait_console(vm, "SMARTVM_INIT_READY", timeout=120)
        assert await _http_get(f"{net}.2", 8080, timeout=60) == "guest-on-bridge"
        assert mac_from_ip(f"{net}.2") in _neighbours(options.bridge_name)  # the derived MAC on the wire
        await vm.stop()
        assert not link_exists(tap)
    finally:
        await svm.cleanup()
    assert not link_exists(options.bridge_name)
    assert read_leases(options.data_dir / "network" / f"bridge-{options.bridge_name}.json") == []
    assert_nothing_left(options.runtime_dir)
