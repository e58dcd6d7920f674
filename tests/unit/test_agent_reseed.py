"""The reseed request and the client's once-before-the-first-request hook, against the REAL agent."""

from __future__ import annotations

import asyncio

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture  # noqa: F401

from error_support import raises_code
from smartvm.agent import AgentClient
from smartvm.errors import ErrorCode, SmartVMError


async def test_reseed_dry_run_credits_the_host_bytes(agent: AgentClient) -> None:
    res = await agent.reseed(hostname="clone-7")
    assert res.dry_run and res.credited_bits == 64 * 8 and res.hostname == "clone-7"
    res = await agent.reseed(b"x" * 16)
    assert res.credited_bits == 128 and res.hostname is None


@pytest.mark.parametrize(("entropy", "hostname"), [(b"short", None), (b"x" * 513, None), (b"x" * 64, "")])
async def test_reseed_refuses_bad_input(agent: AgentClient, entropy: bytes, hostname: str | None) -> None:
    with raises_code(ErrorCode.INVALID_ARGUMENT, match=r"random bytes|hostname"):
        await agent.reseed(entropy, hostname=hostname)


async def test_prepare_runs_once_before_concurrent_first_requests(agent_server: AgentServer) -> None:
    order: list[str] = []

    async def prepare(client: AgentClient, timeout: float) -> None:
        order.append("prepare-start")
        await client.wait_ready(timeout)
        await asyncio.sleep(0.2)  # the first requests queue up behind it
        await client.reseed()  # the hook's own requests pass the gate
        order.append("prepare-done")

    client = AgentClient(agent_server.open_stream, prepare=prepare)
    try:

        async def first(name: str) -> None:
            if name == "exec":
                await client.exec("true")
            elif name == "files":
                await client.files.stat("/")
            else:
                await client.processes.list()
            order.append(name)

        await asyncio.gather(first("exec"), first("files"), first("procs"))
        await client.ping()
        assert order[:2] == ["prepare-start", "prepare-done"]
        assert sorted(order[2:]) == ["exec", "files", "procs"]
    finally:
        await client.close()


async def test_failed_prepare_fails_the_request_and_is_retried(agent_server: AgentServer) -> None:
    calls = 0

    async def prepare(client: AgentClient, timeout: float) -> None:
        nonlocal calls
        calls += 1
        await client.wait_ready(timeout)
        if calls == 1:
            raise SmartVMError("AGENT_UNAVAILABLE", "not yet")

    client = AgentClient(agent_server.open_stream, prepare=prepare)
    try:
        with raises_code(ErrorCode.AGENT_UNAVAILABLE, match="not yet"):
            await client.ping()
        await client.ping()
        await client.ping()
        assert calls == 2
    finally:
        await client.close()
