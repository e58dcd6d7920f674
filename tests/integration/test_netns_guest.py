"""Real QEMU guests on sandbox slots: each answers ping and TCP through its own host address, also
when two of them are restored from one snapshot (same guest address and MAC in every slot)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config, wait_console
from netns_support import (
    Env,
    env_fixture,
    listen_in,
    make_side_host,
    requires_netns,
    serve_identity,
    servers_fixture,
    socket_in,
)

from smartvm import SlotPool
from smartvm.config import MicroVMConfig
from smartvm.host.netns import EgressPolicy

pytestmark = [pytest.mark.integration, pytest.mark.network, requires_netns]

HTTP_PORT = 7000
READY = "SVNET-READY"
# A tiny init: the kernel's ip= argument configures eth0 (and the hostname) before it runs.
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox --install -s /bin
mkdir -p /www
hostname > /www/index.html
httpd -p {HTTP_PORT} -h /www
echo {READY} $(cat /sys/class/net/eth0/address)
while true; do sleep 1000; done
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


@pytest.fixture
async def servers() -> AsyncIterator[list[asyncio.Server]]:
    async for started in servers_fixture():
        yield started


@pytest.fixture(scope="session")
def net_guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(kernel, ext4 root filesystem with busybox and the init above); skip if the kernel is not built."""
    from smartvm.images.cache_paths import cache_root
    from smartvm.images.kernel_build import kernel_cache_key

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    kernel = cache_root() / "kernels" / kernel_cache_key() / "vmlinux"
    if not kernel.is_file():
        pytest.skip(f"guest kernel not built ({kernel}); run `smartvm images build-kernel` (scripts/setup)")
    busybox = shutil.which("busybox")
    if busybox is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs busybox-static and e2fsprogs")
    root = tmp_path_factory.mktemp("netguest")
    tree = root / "tree"
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (tree / d).mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    (tree / "init").write_text(INIT)
    (tree / "init").chmod(0o755)
    image = root / "root.ext4"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image)], check=True)
    return kernel, image


def guest_config(guest: tuple[Path, Path], hostname: str) -> MicroVMConfig:
    """A VM without a network interface: ``create_vm(config, network=slot)`` adds it, with the slot's
    TAP device and MAC and the kernel's ``ip=`` argument (the VM id is the guest's hostname)."""
    kernel, image = guest
    return MicroVMConfig.model_validate(
        {
            "id": hostname,
            "boot_source": {
                "kernel_image_path": str(kernel),
                "boot_args": "console=ttyS0 reboot=k panic=1 init=/init",
            },
            "machine_config": {"vcpu_count": 1, "mem_size_mib": 128},
            "drives": [{"drive_id": "rootfs", "path_on_host": str(image), "is_root_device": True}],
        }
    )


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(address: str, timeout: float = 10.0) -> bool:
    """One ICMP echo exchange with ``address`` (raw socket; we are root), retried until ``timeout``."""
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            payload = b"smartvm-ping"
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
            s.sendto(packet, (address, 0))
            try:
                while True:
                    data, (src, _) = s.recvfrom(1500)
                    icmp = data[(data[0] & 0x0F) * 4 :]
                    kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                    if src == address and kind == 0 and rid == ident and rseq == seq:
                        return True
            except TimeoutError:
                continue
    return False


async def http_get(address: str, timeout: float = 10.0) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, HTTP_PORT), timeout)
    try:
        writer.write(f"GET / HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        await writer.drain()
        response = (await asyncio.wait_for(reader.read(), timeout)).decode(errors="replace")
    finally:
        writer.close()
    assert response.startswith("HTTP/1."), response
    return response.split("\r\n\r\n", 1)[1].strip()


async def test_guests_on_slots_answer_ping_and_tcp_through_their_own_host_ip(
    svm: Any, net_guest: tuple[Path, Path], env: Env
) -> None:
    async with SlotPool(2, prefix=env.prefix, transit=env.transit, state_dir=env.state_dir) as pool:
        slots = [await pool.acquire(), await pool.acquire()]
        vms = []
        for i, slot in enumerate(slots):
            vm = await svm.create_vm(guest_config(net_guest, f"guest{i}"), network=slot)
            await vm.start()
            vms.append(vm)
        for vm, slot in zip(vms, slots, strict=True):
            # the whole line: output can stop mid-line when READY alone has arrived
            console = await wait_console(vm, f"{READY} {slot.guest_mac}", timeout=120)
            assert f"{READY} {slot.guest_mac}" in console
        for i, slot in enumerate(slots):
            assert await asyncio.to_thread(ping, slot.host_ip), f"guest {i} did not answer ping"
            assert await http_get(slot.host_ip) == f"guest{i}"
        for vm in vms:
            await vm.kill()


async def test_two_clones_of_one_snapshot_run_at_once_in_their_own_slots(
    svm: Any, net_guest: tuple[Path, Path], env: Env, tmp_path: Path
) -> None:
    async with SlotPool(3, prefix=env.prefix, transit=env.transit, state_dir=env.state_dir) as pool:
        origin = await pool.acquire()
        vm = await svm.create_vm(guest_config(net_guest, "clone"), network=origin)
        await vm.start()
        await wait_console(vm, READY, timeout=120)
        assert await http_get(origin.host_ip) == "clone"
        await vm.pause()
        snapdir = tmp_path / "snap"
        await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem")
        await vm.kill()
        await pool.release(origin)

        slots = [await pool.acquire(), await pool.acquire()]
        clones = await asyncio.gather(*(svm.restore_vm(snapdir, netns=s.netns_name) for s in slots))
        assert clones[0].id != clones[1].id
        for slot in slots:
            assert await http_get(slot.host_ip) == "clone"  # same guest, same address: own host address
            assert await asyncio.to_thread(ping, slot.host_ip)
        for clone in clones:
            await clone.kill()


async def test_real_guest_egress_policy_and_port_forward(
    svm: Any, guest_image: Any, env: Env, servers: list[asyncio.Server]
) -> None:
    """The agent-equipped default guest, on a slot: egress deny blocks its connection to a test host in
    another namespace, allow lets it through; a server in the guest is reached through a host port."""
    test_host, client = env.netns("th"), env.netns("cl")
    _, th_addr = make_side_host(env, test_host, 1)
    cl_host_addr, _ = make_side_host(env, client, 5)
    servers.append(await serve_identity(listen_in(test_host, 8000), "testhost"))
    host_port = 20000 + os.getpid() % 10000
    async with SlotPool(1, prefix=env.prefix, transit=env.transit, state_dir=env.state_dir) as pool:
        slot = await pool.acquire(egress=EgressPolicy.deny_all(), port_forwards={host_port: 1234})
        vm = await svm.create_vm(boot_config(guest_image, vm_id="egress"), network=slot)
        await vm.start()
        try:
            await vm.wait_ready(120)
            denied = await vm.exec(f"nc -w 2 {th_addr} 8000", timeout=20)
            assert "testhost" not in denied.stdout_text
            await slot.set_egress(EgressPolicy.allow_all())
            allowed = await vm.exec(f"nc -w 5 {th_addr} 8000", timeout=20)
            assert allowed.stdout_text.startswith("testhost "), allowed
            await slot.set_egress(EgressPolicy.deny_only([f"{th_addr}/32"]))
            denied_again = await vm.exec(f"nc -w 2 {th_addr} 8000", timeout=20)
            assert "testhost" not in denied_again.stdout_text

            started = await vm.exec(
                "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && httpd -p 1234 -h /tmp/www"
            )
            assert started.exit_code == 0, started
            sock = socket_in(client)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (cl_host_addr, host_port)), 10)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            response = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
            writer.close()
            assert response.split("\r\n\r\n", 1)[1].strip() == "forwarded"
        finally:
            await vm.kill()
