"""The blocking twins of files and processes against the REAL guest agent running on the host:
plain values and plain iterators, never a coroutine or async generator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import AgentServer

from smartvm import sync
from smartvm.agent import AgentClient
from smartvm.errors import ErrorCode, SmartVMError


@pytest.fixture
def client() -> Iterator[AgentClient]:
    server = AgentServer()
    agent = server.client()
    try:
        sync._Loop.run(agent.wait_ready(30))
        yield agent
    finally:
        sync._Loop.run(agent.close())
        server.stop()


def test_blocking_files_and_processes(client: AgentClient, tmp_path: Path) -> None:
    files, processes = sync.Files(client.files), sync.Processes(client.processes)
    target = str(tmp_path / "hello.txt")
    assert files.write(target, b"hi from sync") == 12
    assert files.read(target) == b"hi from sync" and files.exists(target)
    assert [f.name for f in files.list(str(tmp_path))] == ["hello.txt"]

    proc = processes.start(["sh", "-c", "echo one; sleep 0.2; echo two"])
    events = list(processes.attach(proc.pid))  # an ordinary iterator, fetched on smartvm's loop
    assert b"".join(e.data for e in events if e.kind == "stdout") == b"one\ntwo\n"
    assert events[-1].kind == "exit" and events[-1].result is not None and events[-1].result.exit_code == 0

    slow = processes.start(["sh", "-c", "echo first; exec sleep 30"])
    for event in processes.attach(slow.pid):  # leaving early closes the stream on the loop
        if event.kind == "stdout":
            break
    assert any(p.pid == slow.pid and p.running for p in processes.list())  # the process keeps running
    processes.signal(slow.pid, "SIGKILL")
    assert processes.wait(slow.pid, 10).exit_code != 0


def test_a_blocking_call_from_the_loop_thread_is_refused() -> None:
    async def nested() -> None:
        async def inner() -> None: ...

        sync._Loop.run(inner())  # would wait for the loop it blocks

    with pytest.raises(SmartVMError) as err:
        sync._Loop.run(nested())
    assert err.value.code is ErrorCode.INVALID_STATE
