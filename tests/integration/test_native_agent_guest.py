"""The native guest agent (agent/native, Go) in a real busybox guest: it answers the hot ops itself,
relays the others to the Python agent it runs as its child, and steps aside for the Python agent
when the kernel command line says ``smartvm.agent=python`` (the image without go works the same way).

The protocol itself is checked by the agent unit tests, which run against the native agent with
``SMARTVM_TEST_NATIVE_AGENT=1``; this covers what only a guest has (virtio-serial ports, init, the
child process, the image build).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from guest_support import boot_config

from smartvm.agent import AgentClient

pytestmark = pytest.mark.integration

READY_TIMEOUT = 120.0


def _has_native(guest_image: Any) -> None:
    from smartvm.images.native_agent import go_tool

    if go_tool() is None:
        pytest.skip("no go toolchain: the image carries the Python agent only (apt-get install golang-go)")


async def test_native_agent_serves_and_relays(svm: Any, guest_image: Any) -> None:
    _has_native(guest_image)
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    agent: AgentClient = vm.agent
    info = await agent.wait_ready(READY_TIMEOUT)
    assert info.raw.get("impl") == "native" and info.transport == "virtio-serial"
    assert "file_write" in info.raw["ops"] and "exec" in info.raw["ops"]

    # native exec; the agent itself is the Go binary, its Python part a child of it
    r = await agent.exec(["cat", f"/proc/{info.pid}/cmdline"])
    assert r.stdout.split(b"\0")[0] == b"/opt/smartvm/agent-native"
    children = await agent.exec(
        f"for s in /proc/[0-9]*/status; do grep -q '^PPid:[[:space:]]*{info.pid}$' $s 2>/dev/null"
        " && tr '\\0' ' ' < ${s%status}cmdline && echo; done"
    )
    assert "--serve-fd 3 --work-in-home" in children.stdout_text, children.stdout_text

    # relayed files both ways; a (native) background process with stdin, listing
    await agent.files.write("/tmp/relay.txt", b"relayed\n" * 1000)
    assert await agent.files.read("/tmp/relay.txt") == b"relayed\n" * 1000
    proc = await agent.processes.start("read x; echo got $x", stdin=True)
    await agent.processes.send_stdin(proc.pid, b"it\n", eof=True)
    done = await agent.processes.wait(proc.pid, timeout=60)
    assert done.stdout == b"got it\n"
    assert (await agent.health()).background_processes == 0

    # cancelling a native exec kills its process group
    events = agent.exec_stream("echo up; sleep 1000 & sleep 1001", timeout=120)
    async for ev in events:
        if ev.kind == "stdout":
            break
    await events.aclose()
    for _ in range(100):
        left = await agent.exec("ps -o args | grep '[s]leep 100' || true")
        if not left.stdout:
            break
        await asyncio.sleep(0.1)
    assert left.stdout == b"", left.stdout_text
    await vm.stop()


async def test_python_agent_when_asked(svm: Any, guest_image: Any) -> None:
    """``smartvm.agent=python`` on the kernel command line: run-agent starts the Python agent."""
    vm = await svm.create_vm(boot_config(guest_image, "smartvm.agent=python"))
    await vm.start()
    agent: AgentClient = vm.agent
    info = await agent.wait_ready(READY_TIMEOUT)
    assert "impl" not in info.raw
    r = await agent.exec(["cat", f"/proc/{info.pid}/cmdline"])
    assert r.stdout.startswith(b"/usr/bin/python3\0")
    assert await agent.files.read("/proc/sys/kernel/ostype") == b"Linux\n"
    await vm.stop()
