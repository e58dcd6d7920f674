"""Failures at every step of create, pause, resume and snapshot: a SmartVMError with a stable code,
the sandbox failed with the reason (or, where nothing was lost, back where it was), nothing leaked.
Also 20 create/kill and 10 pause/resume cycles leave nothing behind (checked by the fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guest_support import processes_mentioning

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.netns import SlotPool
from smartvm.orchestrator import SmartVM
from smartvm.sandbox import SandboxState
from smartvm.sandbox.cow.qcow2 import Qcow2Disk, Qcow2Strategy
from smartvm.vm import MicroVM


def _boom(code: ErrorCode = ErrorCode.BOOT_FAILED) -> Callable[..., Any]:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise SmartVMError(code, "injected failure")

    return fail


def _boom_sync(*args: Any, **kwargs: Any) -> Any:
    raise SmartVMError(ErrorCode.COW_FAILED, "injected failure")


def assert_freed(mgr: Any, sid: str, runtime_root: Path) -> None:
    assert sid not in mgr._live
    assert mgr.pool.in_use == []
    assert not (mgr.data_dir / "sandboxes" / sid).exists()
    assert mgr._svm.records.load(sid) is None
    assert processes_mentioning(str(runtime_root)) == []
    assert list(runtime_root.iterdir()) == []


CREATE_STEPS = [
    (Qcow2Strategy, "create", _boom_sync),
    (SlotPool, "acquire", _boom(ErrorCode.NETWORK_SETUP_FAILED)),
    (SmartVM, "restore_vm", _boom(ErrorCode.SNAPSHOT_INVALID)),
    (MicroVM, "wait_ready", _boom(ErrorCode.AGENT_TIMEOUT)),
    (MicroVM, "record", _boom(ErrorCode.INVALID_STATE)),
]


@pytest.mark.parametrize(
    ("owner", "name", "fault"), CREATE_STEPS, ids=[f"{o.__name__}.{n}" for o, n, _ in CREATE_STEPS]
)
async def test_create_failing_at_each_step_unwinds(
    sbm: Any, runtime_root: Path, monkeypatch: pytest.MonkeyPatch, owner: type, name: str, fault: Any
) -> None:
    await sbm.create("base")  # the template is built before the fault is injected
    for sbx in await sbm.list():
        await sbx.kill()
    monkeypatch.setattr(owner, name, fault)
    with pytest.raises(SmartVMError) as err:
        await sbm.create("base")
    assert err.value.code is not ErrorCode.SANDBOX_FAILED  # the real cause, not a wrapper
    (failed,) = await sbm.list()
    assert failed.state is SandboxState.ERROR
    assert "injected failure" in ((await failed.info()).error or "")
    assert_freed(sbm, failed.id, runtime_root)


async def test_pause_failing_leaves_the_sandbox_running(sbm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sbx = await sbm.create("base")
    monkeypatch.setattr(MicroVM, "create_snapshot", _boom(ErrorCode.SNAPSHOT_FAILED))
    with pytest.raises(SmartVMError) as err:
        await sbx.pause()
    assert err.value.code is ErrorCode.SNAPSHOT_FAILED
    assert sbx.state is SandboxState.RUNNING
    assert (await sbx.commands.run("echo still here")).stdout == "still here\n"
    assert not (sbm.data_dir / "sandboxes" / sbx.id / "paused").exists()


async def test_resume_of_a_corrupted_pause_snapshot_fails_and_frees(sbm: Any, runtime_root: Path) -> None:
    sbx = await sbm.create("base")
    await sbx.pause()
    state = sbm.data_dir / "sandboxes" / sbx.id / "paused" / "vm.state"
    state.write_bytes(b"garbage" * 100)
    with pytest.raises(SmartVMError) as err:
        await asyncio.wait_for(sbx.resume(), 30)
    assert err.value.code in (ErrorCode.SNAPSHOT_INVALID, ErrorCode.VM_EXITED, ErrorCode.QEMU_EXITED)
    assert sbx.state is SandboxState.ERROR
    assert_freed(sbm, sbx.id, runtime_root)


async def test_resume_of_a_truncated_pause_stream_fails_with_qemus_words(
    sbm: Any, runtime_root: Path
) -> None:
    """The pause stream carries the RAM and QEMU reads it while it starts (``-incoming fd:``): a cut
    stream (its header intact) is refused as invalid with QEMU's own message, nothing is left."""
    sbx = await sbm.create("base")
    await sbx.pause()
    state = sbm.data_dir / "sandboxes" / sbx.id / "paused" / "vm.state"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(SmartVMError) as err:
        await asyncio.wait_for(sbx.resume(), 60)
    assert err.value.code is ErrorCode.SNAPSHOT_INVALID, err.value.message
    assert "QEMU said" in err.value.message
    assert sbx.state is SandboxState.ERROR
    assert_freed(sbm, sbx.id, runtime_root)


async def test_resume_without_a_network_slot_stays_paused(sbm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sbx = await sbm.create("base")
    await sbx.files.write("keep.txt", b"k")
    await sbx.pause()
    with monkeypatch.context() as m:
        m.setattr(SlotPool, "acquire", _boom(ErrorCode.NETWORK_SETUP_FAILED))
        with pytest.raises(SmartVMError) as err:
            await sbx.resume()
    assert err.value.code is ErrorCode.NETWORK_SETUP_FAILED
    assert sbx.state is SandboxState.PAUSED  # nothing was lost: try again later
    await sbx.resume()
    assert await sbx.files.read("keep.txt") == b"k"


async def test_snapshot_failing_leaves_no_template_and_the_sandbox_running(
    sbm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sbx = await sbm.create("base")
    monkeypatch.setattr(Qcow2Disk, "flatten", _boom_sync)
    with pytest.raises(SmartVMError) as err:
        await sbx.snapshot("never")
    assert err.value.code is ErrorCode.COW_FAILED
    assert sbx.state is SandboxState.RUNNING
    assert (await sbx.commands.run("echo ok")).stdout == "ok\n"
    assert await sbm.list_snapshots() == []
    assert not (sbm.data_dir / "templates" / "never" / "snap").exists()
    assert list((sbm.data_dir / "templates" / "never").glob(".*")) == []


async def test_a_vm_that_dies_marks_its_sandbox_failed(sbm: Any, runtime_root: Path) -> None:
    sbx = await sbm.create("base")
    live = sbm._live[sbx.id]
    await live.vm.kill()  # the hypervisor is gone behind the manager's back
    for _ in range(100):
        if sbx.state is SandboxState.ERROR:
            break
        await asyncio.sleep(0.05)
    assert sbx.state is SandboxState.ERROR
    assert_freed(sbm, sbx.id, runtime_root)


async def test_many_cycles_leave_nothing_behind(sbm: Any) -> None:
    for _ in range(20):
        sbx = await sbm.create("base")
        await sbx.kill()
    sbx = await sbm.create("base")
    for i in range(10):
        await sbx.files.write("n", str(i))
        await sbx.pause()
        await sbx.resume()
    assert await sbx.files.read("n") == b"9"
    assert len(list((sbm.data_dir / "sandboxes").iterdir())) == 1
