"""The guest agent inside a real busybox guest under QEMU, over the virtio-serial port.

One boot serves several checks (TCG boots are the expensive part); unit tests cover the agent's
logic on the host, this covers the transport, init's respawn and the guest's own tools.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import pytest
from guest_support import boot_config, open_console, wait_stopped

from smartvm.agent import AgentClient, ExecEvent, ExecTimeoutError
from smartvm.errors import ErrorCode, SmartVMError

pytestmark = pytest.mark.integration

READY_TIMEOUT = 120.0


async def test_agent_over_virtio_serial(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    agent: AgentClient = vm.agent
    info = await agent.wait_ready(READY_TIMEOUT)
    assert info.transport == "virtio-serial" and info.boot_time

    # exec, exit codes, the guest kernel
    r = await agent.exec(["uname", "-r"])
    assert r.exit_code == 0 and r.stdout_text.strip() == info.kernel
    assert (await agent.exec("exit 7")).exit_code == 7

    # timers: the TSC stays the clock source and high-resolution timers are on (under TCG they were
    # not: periodic 4 ms ticks without ARAT, and refined-jiffies when boot ran on a loaded host)
    clock = await agent.files.read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    assert clock == b"tsc\n"
    timers = (await agent.exec(["grep", "-c", "hres_active *: 1", "/proc/timer_list"])).stdout_text
    assert timers.strip() == "1"  # one CPU

    # streaming: the second line is only printed after the host saw the first
    seen: list[ExecEvent] = []
    async for ev in agent.exec_stream(
        "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second", timeout=60
    ):
        seen.append(ev)
        if ev.data == b"first\n":
            await agent.files.write("/tmp/go", b"")
    assert b"".join(e.data for e in seen if e.kind == "stdout") == b"first\nsecond\n"

    # ten at once, on one stream
    results = await asyncio.gather(*(agent.exec(f"seq 1 {500 + i}; echo done {i} >&2") for i in range(10)))
    for i, res in enumerate(results):
        assert res.stdout_text.split() == [str(n) for n in range(1, 501 + i)]
        assert res.stderr == f"done {i}\n".encode()

    # 10 MiB byte-identical, unicode and binary output
    data = os.urandom(10 * 1024 * 1024)
    await agent.files.write("/tmp/big.bin", data, mode=0o640)
    assert (await agent.files.stat("/tmp/big.bin")).mode == 0o640
    digest = (await agent.exec(["sha256sum", "/tmp/big.bin"])).stdout_text.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    assert await agent.files.read("/tmp/big.bin") == data
    text = "héllo ✓ 日本語\n"
    assert (await agent.exec(["printf", "%s", text])).stdout_text == text
    assert (await agent.exec("printf '\\000\\377\\200'")).stdout == b"\x00\xff\x80"

    # timeout kills the whole process group
    with pytest.raises(ExecTimeoutError) as exc:
        await agent.exec("sleep 1000 & sleep 1001", timeout=2)
    assert exc.value.code == ErrorCode.EXEC_TIMEOUT
    left = await agent.exec("ps -o pid,args | grep '[s]leep 100' || true")
    assert left.stdout == b"", left.stdout_text

    # background process survives a reconnect; clock fix-up applies
    proc = await agent.processes.start("echo bg; read x; echo got $x", stdin=True)
    await agent.close()
    again = await agent.exec(["echo", "reconnected"])
    assert again.stdout == b"reconnected\n"
    await agent.processes.send_stdin(proc.pid, b"it\n", eof=True)
    done = await agent.processes.wait(proc.pid, timeout=60)
    assert done.stdout == b"bg\ngot it\n"
    fixed = await agent.set_time(time.time() + 30.0)
    assert fixed.applied and fixed.method in ("clock_settime", "date")
    guest_now = float((await agent.exec("date +%s")).stdout)
    assert guest_now >= time.time() + 20
    await agent.set_time()
    health = await agent.health()
    assert health.uptime > 0 and health.memory["MemTotal"] > 0

    # a bad request is answered and the agent keeps serving; then the guest powers itself off
    with pytest.raises(SmartVMError) as bad:
        await agent.files.read("/no/such/file")
    assert bad.value.code == ErrorCode.GUEST_FILE_ERROR
    with open_console(vm) as console:
        await agent.shutdown()
        await wait_stopped(vm, 120)
        assert "Power down" in console.read().decode(errors="replace")
