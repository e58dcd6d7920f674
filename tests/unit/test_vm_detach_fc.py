"""Detach and re-attach a VM on the fake ``firecracker``: the process outlives its owner, is found
again by pid + start time, and every way it ends removes its record and runtime dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fc_fake.helpers import fake_vm_config, pid_alive, processes_running

from smartvm import SmartVMError
from smartvm.errors import ErrorCode
from smartvm.host.process import HostProcess, proc_stat
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import VMState

pytest_plugins = ["fc_fake.fixtures"]


@pytest.fixture
def options(fake_binary: Path, short_tmp: Path) -> SmartVMOptions:
    return SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=fake_binary,
        runtime_dir=short_tmp / "rt",
        data_dir=short_tmp / "data",
        socket_timeout_s=2,
        stop_timeout_s=2,
    )


@pytest.fixture
async def svm(options: SmartVMOptions, fake_binary: Path) -> AsyncIterator[SmartVM]:
    async with SmartVM(options) as manager:
        yield manager
    for pid in processes_running(fake_binary):  # never leak a detached fake, even when a test fails
        os.kill(pid, signal.SIGKILL)


def _assert_clean(options: SmartVMOptions, binary: Path) -> None:
    assert processes_running(binary) == []
    assert list(options.runtime_dir.iterdir()) == [] if options.runtime_dir.exists() else True
    records = options.data_dir / "vms"
    assert not records.exists() or list(records.iterdir()) == []


async def _echo(vm_engine_stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bytes:
    reader, writer = vm_engine_stream
    writer.write(b"ping\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return line


async def test_detach_then_attach_controls_the_same_process(
    svm: SmartVM, options: SmartVMOptions, fake_binary: Path, short_tmp: Path
) -> None:
    vm = await svm.create_vm(fake_vm_config(short_tmp, "det1"), detachable=True)
    await vm.start()
    runtime_dir = vm.get_runtime_dir()
    [pid] = processes_running(fake_binary)

    record = await vm.detach()
    assert vm.state is VMState.DETACHED and svm.vm_count == 0
    assert (record.pid, record.engine, record.runtime_dir) == (pid, "firecracker", runtime_dir)
    saved = json.loads((options.data_dir / "vms" / "det1.json").read_text())
    assert saved["pid_start_time"] == proc_stat(pid)[1]  # type: ignore[index]
    assert [p.name for p in (options.data_dir / "vms").iterdir()] == ["det1.json"]  # no *.part left
    with pytest.raises(SmartVMError) as err:
        await vm.pause()
    assert err.value.code is ErrorCode.INVALID_STATE
    await svm.stop_all()  # the detached VM is not the manager's any more
    assert pid_alive(pid) and svm.detached_vms() == [record]

    again = await svm.attach_vm("det1")
    assert again.state is VMState.RUNNING and again.started_at == record.started_at
    assert (await again.get_info())["engine_info"]["state"] == "Running"
    await again.pause()
    assert again.state.value == "paused"
    assert await _echo(await again._engine_or_raise().open_agent_stream(5)) == b"ping\n"  # vsock
    paused = await again.detach()
    assert paused.state == "paused" and pid_alive(pid)

    third = await svm.attach_vm("det1")
    assert third.state is VMState.PAUSED
    await third.resume()
    await third.stop()
    assert third.state.value == "stopped" and not pid_alive(pid)
    assert svm.detached_vms() == []
    _assert_clean(options, fake_binary)


async def test_a_detached_vm_outlives_the_process_that_started_it(
    options: SmartVMOptions, fake_binary: Path, short_tmp: Path
) -> None:
    """Boot and detach in a child Python process that then exits; attach and stop from here."""
    script = (
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from fc_fake.helpers import fake_vm_config\n"
        "from smartvm.options import SmartVMOptions\n"
        "from smartvm.orchestrator import SmartVM\n"
        "from pathlib import Path\n"
        "async def main():\n"
        f"    options = SmartVMOptions.model_validate_json({options.model_dump_json()!r})\n"
        "    async with SmartVM(options) as svm:\n"
        f"        cfg = fake_vm_config(Path({str(short_tmp)!r}), 'det2')\n"
        "        vm = await svm.create_vm(cfg, detachable=True)\n"
        "        await vm.start()\n"
        "        print((await vm.detach()).pid)\n"
        "asyncio.run(main())\n"
    )
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    assert pid_alive(pid)  # the starter has exited, the VM has not

    async with SmartVM(options) as svm:
        [record] = svm.detached_vms()
        vm = await svm.attach_vm("det2")
        assert vm.state is VMState.RUNNING and record.pid == pid
        await vm.kill()
    assert not pid_alive(pid)
    _assert_clean(options, fake_binary)


async def test_a_vm_that_died_while_detached_is_pruned(
    svm: SmartVM, options: SmartVMOptions, fake_binary: Path, short_tmp: Path
) -> None:
    vm = await svm.create_vm(fake_vm_config(short_tmp, "det1"), detachable=True)
    await vm.start()
    record = await vm.detach()
    os.kill(record.pid, signal.SIGKILL)
    await HostProcess.adopt(record.pid, record.pid_start_time).wait(10)
    assert svm.detached_vms() == []
    with pytest.raises(SmartVMError) as err:
        await svm.attach_vm("det1")
    assert err.value.code is ErrorCode.VM_NOT_FOUND
    _assert_clean(options, fake_binary)
    with pytest.raises(SmartVMError) as err:
        await svm.attach_vm("det1")  # the record is gone too
    assert err.value.code is ErrorCode.VM_NOT_FOUND


async def test_a_recycled_pid_is_not_the_vm(
    svm: SmartVM, options: SmartVMOptions, fake_binary: Path, short_tmp: Path
) -> None:
    """A record whose pid now belongs to another process (other start time) is a dead VM."""
    vm = await svm.create_vm(fake_vm_config(short_tmp, "det1"), detachable=True)
    await vm.start()
    record = await vm.detach()
    forged = record.model_copy(update={"pid": os.getpid()})  # alive, but not started at that time
    svm.records.save(forged)
    assert not forged.is_alive()
    assert svm.prune_detached() == [forged]
    assert pid_alive(record.pid)  # nothing was signalled
    HostProcess.adopt(record.pid, record.pid_start_time).kill()
    await HostProcess.adopt(record.pid, record.pid_start_time).wait(10)
    _assert_clean(options, fake_binary)


async def test_watcher_of_an_attached_vm_cleans_up_when_it_exits(
    svm: SmartVM, options: SmartVMOptions, fake_binary: Path, short_tmp: Path
) -> None:
    vm = await svm.create_vm(fake_vm_config(short_tmp, "det1"), detachable=True)
    await vm.start()
    record = await vm.detach()
    again = await svm.attach_vm("det1")
    os.kill(record.pid, signal.SIGKILL)
    for _ in range(200):
        if again.state is VMState.STOPPED and again.get_runtime_dir() is None:
            break
        await asyncio.sleep(0.05)
    assert again.state is VMState.STOPPED
    _assert_clean(options, fake_binary)
