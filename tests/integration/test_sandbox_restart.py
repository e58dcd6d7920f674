"""The process holding a SandboxManager is SIGKILLed with sandboxes running and paused: a new
manager on the same data dir re-adopts the running ones, resumes the paused ones, leaks nothing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import assert_no_sandbox_left, manager_for

from smartvm.host.process import running_start_time
from smartvm.qemu.ramdiff import ramdiff_binary
from smartvm.sandbox import SandboxState

HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    sys.path.insert(0, sys.argv[3])
    from sandbox_support import manager_for
    from pathlib import Path

    async def main():
        mgr = manager_for(Path(sys.argv[1]), Path(sys.argv[2]), warm_pool_size=1)
        await mgr.start()
        running = await mgr.create("base", timeout=600)
        await running.files.write("note.txt", b"survives the crash")
        counter = await running.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > count; sleep 0.1; done", background=True
        )
        paused = await mgr.create("base", timeout=600)
        await paused.files.write("note.txt", b"paused before the crash")
        await paused.pause()
        for _ in range(600):  # a warm sandbox exists when the process dies: it must be swept
            if mgr._warm.ids():
                break
            await asyncio.sleep(0.05)
        print(json.dumps({"running": running.id, "paused": paused.id, "pid": counter.pid}), flush=True)
        await asyncio.sleep(1000)  # SIGKILLed here

    asyncio.run(main())
    """
)


@pytest.fixture(params=["runtime-on-disk", "runtime-on-tmpfs"])
def dirs(
    request: pytest.FixtureRequest, sandbox_data: Path, runtime_root: Path, shm_sandbox_data: Path
) -> Iterator[tuple[Path, Path]]:
    """(data dir, runtime root): on disk, templates carry RAM in their streams; on tmpfs (the default)
    they have a memory file, and pauses of their sandboxes write only the pages that differ from it."""
    if request.param == "runtime-on-disk":
        yield sandbox_data, runtime_root
        return
    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/dev/shm"))
    try:
        yield shm_sandbox_data, runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _pause_kind(data_dir: Path, sid: str) -> str:
    manifest = json.loads((data_dir / "sandboxes" / sid / "paused" / "snapshot.json").read_text())
    return str(manifest["engine_data"]["memory"])


async def test_sigkilled_manager_loses_no_sandbox(dirs: tuple[Path, Path]) -> None:
    sandbox_data, runtime_root = dirs
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen(  # noqa: ASYNC220 - the manager's process, killed below
        [sys.executable, "-c", HOLDER, str(sandbox_data), str(runtime_root), tests_dir],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # pause files of an earlier resume whose background deletion the crash cut short
    cut_short = sandbox_data / "sandboxes" / ids["running"] / ".resumed-1"
    cut_short.mkdir()
    (cut_short / "vm.state").write_bytes(b"old")
    mgr = manager_for(sandbox_data, runtime_root)
    try:
        await mgr.start()
        assert not cut_short.exists()
        running, paused = await mgr.get(ids["running"]), await mgr.get(ids["paused"])
        assert (running.state, paused.state) == (SandboxState.RUNNING, SandboxState.PAUSED)
        assert await running.files.read("note.txt") == b"survives the crash"
        assert (await running.commands.run("echo alive")).stdout == "alive\n"
        assert ids["pid"] in [p.pid for p in await running.commands.list() if p.running]
        await paused.resume()
        assert await paused.files.read("note.txt") == b"paused before the crash"
        # the adopted VM pauses like one this process started (diff pauses: its record names the
        # memory file it maps) and its processes keep running across
        await running.pause()
        on_tmpfs = runtime_root.parent == Path("/dev/shm")
        assert _pause_kind(sandbox_data, running.id) == (
            "diff" if on_tmpfs and ramdiff_binary() else "stream"
        )
        await running.resume()
        assert ids["pid"] in [p.pid for p in await running.commands.list() if p.running]
        # a second restart, this time after a clean close: everything is adopted again
        await mgr.close()
        mgr = manager_for(sandbox_data, runtime_root)
        await mgr.start()
        states = {s.id: s.state for s in await mgr.list()}
        assert states == {ids["running"]: SandboxState.RUNNING, ids["paused"]: SandboxState.RUNNING}
        for sbx in await mgr.list():
            assert (await sbx.commands.run("true")).exit_code == 0
            await sbx.kill()
    finally:
        for sbx in await mgr.list():
            await sbx.kill()
        await mgr.close()
    assert_no_sandbox_left(sandbox_data, runtime_root)


async def test_a_sandbox_whose_vm_died_while_no_manager_ran_is_failed_and_freed(
    sandbox_data: Path, runtime_root: Path
) -> None:
    mgr = manager_for(sandbox_data, runtime_root)
    async with mgr:
        sbx = await mgr.create("base")
        record: Any = mgr._svm.records.load(sbx.id)
        assert record is not None
    os.kill(record.pid, signal.SIGKILL)  # the VM dies while no manager watches
    for _ in range(200):  # dead, not dying: a process that is still exiting counts as running
        if running_start_time(record.pid) is None:
            break
        await asyncio.sleep(0.05)
    mgr = manager_for(sandbox_data, runtime_root)
    async with mgr:
        again = await mgr.get(sbx.id)
        assert again.state is SandboxState.ERROR
        assert "VM is gone" in ((await again.info()).error or "")
        await again.kill()
    assert_no_sandbox_left(sandbox_data, runtime_root)
