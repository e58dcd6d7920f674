"""Readiness on the Firecracker engine, against the fake ``firecracker`` whose vsock leads to the REAL
guest agent (running on the host) and refuses connections for a while, like a booting guest: after
start() or a restore, the first request of any kind (exec, files, processes) waits for the agent,
and after a restore the guest's RNG and clock are fixed before it goes out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agent_harness import AgentServer
from fc_fake.helpers import fake_vm_config

from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import MicroVM

pytest_plugins = ["fc_fake.fixtures"]
BOOT_DELAY_S = 1.0


@pytest.fixture
def agent_server() -> Iterator[AgentServer]:
    server = AgentServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def svm(
    fake_binary: Path, short_tmp: Path, agent_server: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SmartVM]:
    monkeypatch.setenv("FAKE_FC_AGENT_SOCKET", str(agent_server.sock))
    monkeypatch.setenv("FAKE_FC_AGENT_DELAY", str(BOOT_DELAY_S))
    monkeypatch.setenv("FAKE_FC_AGENT_LOG", str(short_tmp / "to-agent.bin"))
    options = SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=fake_binary,
        runtime_dir=short_tmp / "rt",
        data_dir=short_tmp / "data",
        socket_timeout_s=2,
        stop_timeout_s=2,
    )
    async with SmartVM(options) as manager:
        yield manager


async def _first_request(vm: MicroVM, kind: str, target: Path) -> None:
    if kind == "files":
        assert await vm.files.write(str(target), b"first") == 5
    elif kind == "processes":
        info = await vm.processes.start(["sh", "-c", f"echo first > {target}"])
        assert (await vm.processes.wait(info.pid, 10)).exit_code == 0
    else:
        assert (await vm.exec(["sh", "-c", f"echo first > {target}"], ready_timeout=10)).exit_code == 0
    assert target.read_bytes().startswith(b"first")  # noqa: ASYNC240 - a tiny file, in a test


@pytest.mark.parametrize("kind", ["files", "processes", "exec"])
async def test_first_request_after_start_waits_for_the_agent(
    svm: SmartVM, short_tmp: Path, tmp_path: Path, kind: str
) -> None:
    vm = await svm.create_vm(fake_vm_config(short_tmp, "vm-ready"))
    await vm.start()
    await _first_request(vm, kind, tmp_path / "out.txt")  # the guest refuses connections for a second
    await vm.stop()


@pytest.mark.parametrize("kind", ["files", "processes", "exec"])
async def test_first_request_after_restore_waits_and_fixes_rng_and_clock_first(
    svm: SmartVM, short_tmp: Path, tmp_path: Path, kind: str
) -> None:
    vm = await svm.create_vm(fake_vm_config(short_tmp, "vm-origin"))
    await vm.start()
    snap = short_tmp / "snap"
    await vm.create_snapshot(snap / "vm.state", snap / "vm.mem", pause_vm=True)
    await vm.stop()
    sent = short_tmp / "to-agent.bin"
    sent.unlink(missing_ok=True)

    clone = await svm.restore_vm(snap, vm_id="vm-clone")
    await _first_request(clone, kind, tmp_path / "out.txt")
    data = sent.read_bytes()
    first_op = {"files": b"file_write", "processes": b"proc_start", "exec": b"exec"}[kind]
    assert max(data.index(b"reseed"), data.index(b"set_time")) < data.index(first_op)
    await clone.stop()
