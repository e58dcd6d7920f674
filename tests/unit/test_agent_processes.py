"""Background processes through AgentClient against the REAL guest agent running on the host."""

from __future__ import annotations

import signal

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture, pid_gone  # noqa: F401

from error_support import raises_code
from smartvm.agent import AgentClient, ExecTimeoutError
from smartvm.errors import ErrorCode, SmartVMError


async def test_start_send_stdin_and_wait(agent: AgentClient) -> None:
    proc = await agent.processes.start("echo hello; cat; echo bye >&2; exit 3", stdin=True)
    assert proc.running and proc.stdin_open and proc.pid > 0
    await agent.processes.send_stdin(proc.pid, "line one\n")
    await agent.processes.send_stdin(proc.pid, b"\x00\xff" * 200_000, eof=True)
    result = await agent.processes.wait(proc.pid, timeout=60)
    assert result.exit_code == 3 and result.stderr == b"bye\n"
    assert result.stdout == b"hello\nline one\n" + b"\x00\xff" * 200_000
    listed = {p.pid: p for p in await agent.processes.list()}
    assert not listed[proc.pid].running and listed[proc.pid].exit_code == 3


async def test_signal_and_list(agent: AgentClient) -> None:
    proc = await agent.processes.start(["sleep", "300"])
    assert any(p.pid == proc.pid and p.running for p in await agent.processes.list())
    with pytest.raises(ExecTimeoutError) as exc:
        await agent.processes.wait(proc.pid, timeout=0.2)
    assert exc.value.code == ErrorCode.EXEC_TIMEOUT
    await agent.processes.signal(proc.pid, "SIGTERM")
    result = await agent.processes.wait(proc.pid, timeout=60)
    assert result.signal == signal.SIGTERM and result.exit_code == 128 + signal.SIGTERM
    assert pid_gone(proc.pid)


async def test_reattach_from_another_connection_replays_output(agent_server: AgentServer) -> None:
    first = agent_server.client()
    await first.wait_ready(30)
    proc = await first.processes.start("echo early; read line; echo got $line", stdin=True)
    events = first.processes.attach(proc.pid)
    async for ev in events:
        assert ev.kind == "stdout" and ev.data == b"early\n"
        break
    await events.aclose()  # type: ignore[attr-defined]
    await first.close()  # the process outlives the connection

    second = agent_server.client()
    try:
        await second.wait_ready(30)
        await second.processes.send_stdin(proc.pid, b"it\n")
        out = b""
        exit_code = None
        async for ev in second.processes.attach(proc.pid, replay=True):
            if ev.kind == "stdout":
                out += ev.data
            elif ev.kind == "exit" and ev.result is not None:
                exit_code = ev.result.exit_code
        assert out == b"early\ngot it\n" and exit_code == 0
        live = [ev async for ev in second.processes.attach(proc.pid, replay=False)]
        assert [ev.kind for ev in live] == ["exit"]  # already finished: no replay, just the status
    finally:
        await second.close()


async def test_unknown_pid_and_bad_signal(agent: AgentClient) -> None:
    with pytest.raises(SmartVMError) as exc:
        await agent.processes.signal(999_999_999, "SIGTERM")
    assert exc.value.code == ErrorCode.AGENT_ERROR and "no background process" in exc.value.message
    proc = await agent.processes.start(["sleep", "300"])
    with pytest.raises(SmartVMError) as exc:
        await agent.processes.signal(proc.pid, "SIGNOPE")
    assert exc.value.code == ErrorCode.INVALID_ARGUMENT
    with raises_code(ErrorCode.AGENT_ERROR):
        await agent.processes.start(["/no/such/binary"])
