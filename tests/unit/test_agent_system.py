"""Health, sync, clock fix-up and shutdown requests against the REAL agent (dry-run: host untouched)."""

from __future__ import annotations

import time

import pytest
from agent_harness import agent_fixture, agent_server_fixture  # noqa: F401

from smartvm.agent import AgentClient
from smartvm.errors import ErrorCode, SmartVMError


async def test_health(agent: AgentClient) -> None:
    h = await agent.health()
    assert h.uptime > 0 and h.memory["MemTotal"] > h.memory["MemAvailable"] > 0
    assert len(h.load) == 3 and h.cpus >= 1 and abs(h.time - time.time()) < 3600


async def test_set_time_dry_run_computes_the_step(agent: AgentClient) -> None:
    future = time.time() + 86_400.5
    res = await agent.set_time(future)
    assert not res.applied and res.method == "dry-run"
    assert res.target == future and res.delta == pytest.approx(future - res.before)
    assert res.delta > 86_000
    res = await agent.set_time()  # defaults to the host clock now
    assert abs(res.delta) < 60


async def test_sync_ping_and_shutdown_dry_run(agent: AgentClient) -> None:
    await agent.sync()
    assert await agent.ping() >= 0
    await agent.shutdown()  # dry-run agent: accepted, nothing powers off, client closed
    assert agent.info is None
    assert (await agent.exec("echo back")).stdout == b"back\n"  # reconnects on demand


async def test_invalid_shutdown_action(agent: AgentClient) -> None:
    with pytest.raises(SmartVMError) as exc:
        await agent.shutdown("explode")  # type: ignore[arg-type]
    assert exc.value.code == ErrorCode.INVALID_ARGUMENT
