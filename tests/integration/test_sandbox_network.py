"""Networking per sandbox on real guests: internet on or off, egress allow/deny lists, the other
sandboxes and the host's own addresses always out of reach, inbound port forwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_support import (
    Env,
    ask,
    env_fixture,
    listen_in,
    make_side_host,
    requires_netns,
    serve_identity,
    servers_fixture,
    socket_in,
)

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.nat import EgressPolicy

pytestmark = [pytest.mark.integration, pytest.mark.network, requires_netns]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from env_fixture(tmp_path)


@pytest.fixture
async def servers() -> AsyncIterator[list[asyncio.Server]]:
    async for started in servers_fixture():
        yield started


LISTENER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"sandbox-b\\n")
    c.close()
"""


async def _fetch(sbx: Any, addr: str, port: int) -> str:
    r = await sbx.commands.run(f"nc -w 2 {addr} {port} </dev/null", timeout=20)
    return r.stdout


async def test_egress_policies_isolation_and_port_forward(
    sbm: Any, env: Env, servers: list[asyncio.Server]
) -> None:
    test_host, client = env.netns("th"), env.netns("cl")
    _, th_addr = make_side_host(env, test_host, 1)
    cl_host_addr, _ = make_side_host(env, client, 5)
    servers.append(await serve_identity(listen_in(test_host, 8000), "testhost"))
    host_port = 20000 + os.getpid() % 10000
    online = await sbm.create("base", port_forwards={host_port: 1234})
    offline = await sbm.create("base", internet=False)
    denied = await sbm.create("base", egress=EgressPolicy.deny_only([f"{th_addr}/32"]))
    assert (await _fetch(online, th_addr, 8000)).startswith("testhost ")
    assert "testhost" not in await _fetch(offline, th_addr, 8000)
    # the network is IPv4 only: no IPv6 on eth0 (no address detection, router solicitation or
    # multicast report timers waking the guest after each restore), loopback keeps ::1
    r = await online.commands.run(["cat", "/proc/net/if_inet6", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"])
    *addresses, eth0_off = r.stdout.strip().split("\n")
    assert eth0_off == "1" and [a.split()[-1] for a in addresses] == ["lo"]
    assert "testhost" not in await _fetch(denied, th_addr, 8000)

    # never another sandbox, never the host's own addresses (a server on all host addresses)
    other_ip = (await offline.info()).host_ip
    assert other_ip is not None
    await offline.commands.run(["python3", "-c", LISTENER], background=True, user="root")
    for _ in range(100):  # the host itself reaches sandbox B: the listener works
        try:
            assert (await ask(other_ip, 7777, timeout=1)) == "sandbox-b"
            break
        except OSError:
            await asyncio.sleep(0.1)
    assert "sandbox-b" not in await _fetch(online, other_ip, 7777)
    host_server = await serve_identity(_host_listener(), "host")
    servers.append(host_server)
    port = host_server.sockets[0].getsockname()[1]
    assert (await ask(cl_host_addr, port, sock=socket_in(client))).startswith("host ")  # it works
    assert "host" not in await _fetch(online, cl_host_addr, port)
    assert "host" not in await _fetch(online, "169.254.169.254", 80)

    # inbound: a host port reaches the guest's port
    await online.commands.run(
        "mkdir -p /tmp/www && echo forwarded > /tmp/www/index.html && httpd -p 1234 -h /tmp/www", user="root"
    )
    sock = socket_in(client)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, (cl_host_addr, host_port)), 10)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    writer.close()
    assert response.split("\r\n\r\n", 1)[1].strip() == "forwarded"
    for sbx in (online, offline, denied):
        await sbx.kill()


def _host_listener() -> Any:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


async def test_set_egress_applies_at_once_and_survives_pause(
    sbm: Any, env: Env, servers: list[asyncio.Server]
) -> None:
    test_host = env.netns("th")
    _, th_addr = make_side_host(env, test_host, 1)
    servers.append(await serve_identity(listen_in(test_host, 8000), "testhost"))
    sbx = await sbm.create("base")
    assert (await _fetch(sbx, th_addr, 8000)).startswith("testhost ")
    await sbx.pause()
    await sbx.resume()  # another slot, the same gateway (its MAC too: the guest's ARP cache holds it)
    assert (await _fetch(sbx, th_addr, 8000)).startswith("testhost ")
    await sbx.set_egress(EgressPolicy.deny_only([f"{th_addr}/32"]))
    assert "testhost" not in await _fetch(sbx, th_addr, 8000)
    await sbx.pause()
    await sbx.resume()  # a fresh slot: the policy comes from the sandbox's record
    assert "testhost" not in await _fetch(sbx, th_addr, 8000)
    await sbx.pause()
    await sbx.set_egress(EgressPolicy.allow_only([f"{th_addr}/32"]))  # paused: applied at resume
    await sbx.resume()
    assert (await _fetch(sbx, th_addr, 8000)).startswith("testhost ")
    assert [e.detail for e in await sbm.events(sbx.id) if e.kind == "network"] == [
        f"default allow; deny {th_addr}/32",
        f"default deny; allow {th_addr}/32",
    ]
    await sbx.kill()
    with pytest.raises(SmartVMError) as err:
        await sbx.set_egress(EgressPolicy.allow_all())
    assert err.value.code is ErrorCode.SANDBOX_NOT_RUNNING
