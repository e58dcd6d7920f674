"""Several host clients talk to one guest agent at once (QEMU: one virtio-serial port each)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config

from smartvm.agent.client import AgentClient
from smartvm.errors import AgentBusyError, ErrorCode
from smartvm.qemu.agent_ports import AGENT_PORTS
from smartvm.qemu.engine import QemuEngine

pytestmark = pytest.mark.integration


def client_of(vm: Any) -> AgentClient:
    """Another client of the VM's agent, like a second process attached to it would have."""
    return AgentClient(vm._engine_or_raise().open_agent_stream, connect_timeout=30)


async def test_every_port_serves_a_client_and_one_more_is_refused_at_once(svm: Any, guest_image: Any) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)  # the VM's own client holds one port
    others = [client_of(vm) for _ in range(AGENT_PORTS - 1)]
    try:
        long = asyncio.ensure_future(vm.exec(["sleep", "3"], timeout=60))
        results = await asyncio.gather(*(c.exec(["echo", str(i)], timeout=60) for i, c in enumerate(others)))
        assert [r.stdout_text for r in results] == [f"{i}\n" for i in range(len(others))]
        assert not long.done(), "the short commands waited for the long one"

        t0 = time.monotonic()
        extra = client_of(vm)
        with pytest.raises(AgentBusyError) as busy:
            await extra.ping()
        assert busy.value.code == ErrorCode.AGENT_UNAVAILABLE
        assert f"all {AGENT_PORTS} agent channels" in busy.value.message
        assert time.monotonic() - t0 < 5, "an all-busy VM must fail at once, not wait for a timeout"

        await others.pop().close()  # closing a client frees its port for the next one
        assert (await extra.exec(["echo", "freed"], timeout=60)).stdout == b"freed\n"
        others.append(extra)
        assert (await long).exit_code == 0
    finally:
        for c in others:
            await c.close()


async def test_a_snapshot_from_before_multi_port_restores_with_its_single_port(
    svm: Any, guest_image: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest without ``agent_ports`` is from a one-port VM: the restore must rebuild that device
    set (QEMU refuses a virtio-serial bus with other ports), and then has that one channel."""
    monkeypatch.setattr(QemuEngine, "agent_ports", 1)  # boot as older versions did
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)
    await vm.files.write("/tmp/marker", b"old-snapshot")
    snapdir = tmp_path / "snap"
    await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
    await vm.kill()
    monkeypatch.undo()
    manifest = snapdir / "snapshot.json"
    data = json.loads(manifest.read_text())
    assert data["engine_data"]["layout"].pop("agent_ports") == 1
    manifest.write_text(json.dumps(data))  # exactly what older versions wrote

    clone = await svm.restore_vm(snapdir)
    assert (await clone.exec(["cat", "/tmp/marker"], timeout=60)).stdout == b"old-snapshot"
    with pytest.raises(AgentBusyError):
        await client_of(clone).ping()
    await clone.kill()
