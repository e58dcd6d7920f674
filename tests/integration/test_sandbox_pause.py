"""Pause to disk and resume, snapshots into templates, deadlines, on real QEMU guests."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.qemu.ramdiff import ramdiff_binary
from smartvm.sandbox import SandboxState

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /home/user/count; sleep 0.1; done"
# Holds 8 MiB of 'M' and 8 MiB written with 'Z' and then zeroed (pages a restore must find zero,
# whatever the template had there); on request it checks both and writes its verdict.
HOLD_MEMORY = """
import os, time
data, zero = bytearray(b'M' * (8 << 20)), bytearray(b'Z' * (8 << 20))
zero[:] = bytes(8 << 20)
open('/home/user/mem-ready', 'w').close()
while True:
    if os.path.exists('/home/user/mem-check'):
        intact = data.count(77) == len(data) and zero.count(0) == len(zero)
        open('/home/user/mem-verdict.part', 'w').write('intact' if intact else 'damaged')
        os.rename('/home/user/mem-verdict.part', '/home/user/mem-verdict')
        os.remove('/home/user/mem-check')
    time.sleep(0.05)
"""


async def _count(sbx: Any) -> int:
    """The counter's value. The loop rewrites the file in place (truncate, then write), and right after
    a resume the guest runs that code cold under TCG, so a read can land between the two: read again."""
    for _ in range(50):
        text = (await sbx.files.read_text("count")).strip()
        if text:
            return int(text)
        await asyncio.sleep(0.02)
    return 0


async def _wait_file(sbx: Any, path: str) -> None:
    for _ in range(200):
        if await sbx.files.exists(path):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


async def _memory_verdict(sbx: Any) -> str:
    await sbx.files.remove("mem-verdict")
    await sbx.files.write("mem-check", b"")
    await _wait_file(sbx, "mem-verdict")
    return str(await sbx.files.read_text("mem-verdict"))


@pytest.fixture(params=["ram-in-stream", "diff-of-template-memory"])
def any_sbm(request: pytest.FixtureRequest) -> Any:
    """Both kinds of pause: a template with RAM in its stream (runtime dir on disk: the sandbox's RAM
    is its own, the pause streams all of it) and one with a memory file (on tmpfs: the sandbox maps
    it, the pause streams only the pages that differ from it, when the ramdiff tool is there)."""
    return request.getfixturevalue("sbm" if request.param == "ram-in-stream" else "shm_sbm")


async def test_pause_resume_keeps_files_processes_and_memory(any_sbm: Any) -> None:
    sbm = any_sbm
    sbx = await sbm.create("base")
    await sbx.files.write("before.txt", b"written before the pause")
    counter = await sbx.commands.run(COUNTER, background=True)
    holder = await sbx.commands.run(["python3", "-c", HOLD_MEMORY], background=True)
    await _wait_file(sbx, "mem-ready")
    await asyncio.sleep(0.5)
    at_pause = await _count(sbx)
    assert at_pause > 0
    await sbx.pause()
    assert sbx.state is SandboxState.PAUSED
    assert (await sbx.info()).host_ip is None  # no VM, no slot while paused
    with pytest.raises(SmartVMError) as err:
        await sbx.pause()
    assert err.value.code is ErrorCode.SANDBOX_ALREADY_PAUSED
    with pytest.raises(SmartVMError) as err:
        await sbx.commands.run("true")
    assert err.value.code is ErrorCode.SANDBOX_NOT_RUNNING
    await sbx.resume()
    with pytest.raises(SmartVMError) as err:
        await sbx.resume()
    assert err.value.code is ErrorCode.SANDBOX_NOT_PAUSED
    assert await sbx.files.read("before.txt") == b"written before the pause"
    after = await _count(sbx)
    assert at_pause <= after < at_pause + 20, (at_pause, after)  # continued, not restarted from 0
    await asyncio.sleep(0.5)
    assert await _count(sbx) > after  # and still counting
    running = {p.pid: p.running for p in await sbx.commands.list()}
    assert running.get(counter.pid) and running.get(holder.pid)
    rss = await sbx.commands.run(f"grep VmRSS /proc/{holder.pid}/status")
    assert int(rss.stdout.split()[1]) >= 16 << 10  # the 16 MiB it held are still resident
    assert await _memory_verdict(sbx) == "intact"
    for _ in range(3):
        await sbx.pause()
        await sbx.resume()
    assert await _count(sbx) > after
    assert await _memory_verdict(sbx) == "intact"


def _same_file(a: Path, b: str) -> bool:
    return os.path.samefile(a, b)


def _paused(sbm: Any, sbx: Any) -> tuple[Path, dict[str, Any]]:
    paused = sbm.data_dir / "sandboxes" / sbx.id / "paused"
    return paused, json.loads((paused / "snapshot.json").read_text())["engine_data"]


async def test_a_pause_stream_carries_only_the_pages_that_differ_from_the_template(
    shm_sbm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox restored from a template maps the template's memory: its pause stream (through
    ramdiff) holds only the pages it changed, over a hard link to that memory, which the sandbox's
    disk use does not count. The resumed VM maps the template again, so its next pause is as small.
    Without the tool the whole RAM is streamed; the guest's zeroed agent-port buffers (36 MB of
    kmalloc pages) go as zero pages then, so that stream is ~46 MB, not ~79 MB."""
    if ramdiff_binary() is None:
        pytest.skip("no ramdiff tool here (it needs the go toolchain, see scripts/setup)")
    sbm = shm_sbm
    sbx = await sbm.create("base")
    await sbx.commands.run("head -c 2000000 /dev/urandom > /dev/shm/noise")
    for _ in range(2):
        await sbx.pause()
        paused, engine_data = _paused(sbm, sbx)
        assert engine_data["memory"] == "diff"
        assert _same_file(paused / "base.memory", engine_data["base_origin"])
        assert Path(engine_data["base_origin"]).parent.parent.parent.name == "base"  # the template's
        assert 2_000_000 < (paused / "vm.state").stat().st_size < 16_000_000
        assert (await sbx.info()).disk_bytes < 64 << 20  # the linked 256 MiB are the template's
        await sbx.resume()
        assert (await sbx.commands.run("md5sum /dev/shm/noise")).exit_code == 0
    monkeypatch.setenv("SMARTVM_RAMDIFF", "0")
    await sbx.pause()
    paused, engine_data = _paused(sbm, sbx)
    assert engine_data["memory"] == "stream" and not (paused / "base.memory").exists()
    assert (paused / "vm.state").stat().st_size < 60_000_000
    await sbx.resume()
    assert (await sbx.commands.run(["true"])).exit_code == 0


async def test_a_refused_ramdiff_pauses_with_the_whole_ram(
    shm_sbm: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tool refuses a stream it does not know (another QEMU's format), or cannot run at all: the
    pause takes the whole RAM instead and the sandbox resumes as it was."""
    broken = tmp_path / "not-a-program"
    broken.write_bytes(b"\x7fELF damaged")
    broken.chmod(0o755)
    monkeypatch.setenv("SMARTVM_RAMDIFF", str(broken))
    sbx = await shm_sbm.create("base")
    with caplog.at_level("WARNING", logger="smartvm.qemu.engine"):
        await sbx.pause()
    assert f"pausing with the whole RAM: cannot run {broken}" in caplog.text  # it was tried
    assert _paused(shm_sbm, sbx)[1]["memory"] == "stream"
    await sbx.resume()
    assert (await sbx.commands.run(["true"])).exit_code == 0
    await sbx.kill()

    refusing = tmp_path / "ramdiff"
    ran = tmp_path / "ran"
    refusing.write_text(
        f'#!/bin/sh\necho "$@" > {ran}\nhead -c 64 >/dev/null\n'
        "echo 'unsupported migration stream' >&2\nexit 2\n"
    )
    refusing.chmod(0o755)
    monkeypatch.setenv("SMARTVM_RAMDIFF", str(refusing))
    sbx = await shm_sbm.create("base")
    await sbx.files.write("kept.txt", b"across a refused diff")
    await sbx.pause()
    assert "-base" in ran.read_text() and "-pid" in ran.read_text()  # it was asked, and refused
    paused, engine_data = _paused(shm_sbm, sbx)
    assert engine_data["memory"] == "stream"
    assert sorted(p.name for p in paused.iterdir()) == ["snapshot.json", "vm.state"]
    await sbx.resume()
    assert await sbx.files.read("kept.txt") == b"across a refused diff"


async def test_a_snapshot_of_a_diff_paused_sandbox_stands_on_its_own(shm_sbm: Any) -> None:
    """The snapshot links the pause's files, the base included: sandboxes made from it, paused and
    resumed in turn, have the source's memory and files after the source is gone."""
    sbx = await shm_sbm.create("base")
    await sbx.files.write("f.txt", b"from the source")
    await sbx.commands.run("echo in-memory > /dev/shm/m")
    await sbx.pause()
    await sbx.snapshot("diff-snap")
    await sbx.kill()
    clone = await shm_sbm.create("diff-snap")
    for _ in range(2):
        assert await clone.files.read("f.txt") == b"from the source"
        assert (await clone.commands.run("cat /dev/shm/m")).stdout == "in-memory\n"
        await clone.pause()
        diff = _paused(shm_sbm, clone)[1]["memory"] == "diff"
        assert diff == (ramdiff_binary() is not None)  # over the snapshot's own link to the base
        await clone.resume()
    await clone.kill()
    await shm_sbm.delete_snapshot("diff-snap")


async def test_a_diff_pause_without_its_base_fails_to_resume_clearly(shm_sbm: Any) -> None:
    if ramdiff_binary() is None:
        pytest.skip("no ramdiff tool here (it needs the go toolchain, see scripts/setup)")
    sbm = shm_sbm
    sbx = await sbm.create("base")
    await sbx.pause()
    paused, engine_data = _paused(sbm, sbx)
    assert engine_data["memory"] == "diff"
    (paused / "base.memory").unlink()
    with pytest.raises(SmartVMError) as err:
        await sbx.resume()
    assert err.value.code is ErrorCode.SNAPSHOT_INVALID
    assert "base.memory" in err.value.message and "missing" in err.value.message
    assert sbx.state is SandboxState.ERROR


async def test_two_sandboxes_from_one_snapshot_get_their_own_randomness(sbm: Any) -> None:
    sbx = await sbm.create("base")
    read = ["python3", "-c", "import os, random; print(os.urandom(16).hex(), random.random())"]
    await sbx.snapshot("rng-snap")
    try:
        clones = [await sbm.create("rng-snap") for _ in range(2)]
        outs = [(await c.commands.run(read)).stdout for c in clones]
        urandom = [(await c.commands.run(["head", "-c", "16", "/dev/urandom"])).stdout_bytes for c in clones]
        assert outs[0] != outs[1] and urandom[0] != urandom[1]
        for c in clones:  # pause/resume: also fresh after a resume
            await c.pause()
            await c.resume()
        again = [(await c.commands.run(read)).stdout for c in clones]
        assert again[0] != again[1]
        for c in clones:
            await c.kill()
    finally:
        await sbm.delete_snapshot("rng-snap")


async def test_snapshot_of_a_running_sandbox_gives_independent_sandboxes(sbm: Any) -> None:
    src = await sbm.create("base")
    await src.files.write("shared.txt", b"from the source")
    await src.commands.run("echo kept-in-memory > /dev/shm/m")
    snap = await src.snapshot("indep-snap")
    assert snap.name == "indep-snap" and snap.size_bytes > 0
    assert src.state is SandboxState.RUNNING  # a snapshot does not stop its source
    assert (await src.commands.run("cat shared.txt")).stdout == "from the source"
    a, b = await sbm.create("indep-snap"), await sbm.create("indep-snap")
    for sbx in (a, b):
        assert await sbx.files.read("shared.txt") == b"from the source"
        assert (await sbx.commands.run("cat /dev/shm/m")).stdout == "kept-in-memory\n"
    await a.files.write("shared.txt", b"changed in a")
    await a.files.write("only-a.txt", b"a")
    assert await b.files.read("shared.txt") == b"from the source"
    assert not await b.files.exists("only-a.txt")
    assert await src.files.read("shared.txt") == b"from the source"
    assert [s.name for s in await sbm.list_snapshots()] == ["indep-snap"]
    with pytest.raises(SmartVMError) as err:
        await sbm.delete_snapshot("indep-snap")
    assert err.value.code is ErrorCode.SNAPSHOT_IN_USE
    with pytest.raises(SmartVMError) as err:
        await src.snapshot("indep-snap")
    assert err.value.code is ErrorCode.SNAPSHOT_EXISTS
    await a.kill()
    await b.kill()
    await src.pause()
    paused_snap = await src.snapshot("from-paused")  # a paused sandbox snapshots too
    c = await sbm.create("from-paused")
    assert await c.files.read("shared.txt") == b"from the source"
    await c.kill()
    await sbm.delete_snapshot("indep-snap")
    await sbm.delete_snapshot(paused_snap.name)
    assert await sbm.list_snapshots() == []
    with pytest.raises(SmartVMError) as err:
        await sbm.create("indep-snap")
    assert err.value.code is ErrorCode.TEMPLATE_NOT_FOUND


async def test_fork_continues_processes_in_independent_sandboxes_and_cleans_up(sbm: Any) -> None:
    src = await sbm.create("base", metadata={"team": "forks"}, envs={"FROM": "source"})
    await src.files.write("f.txt", b"before the fork")
    await src.commands.run(COUNTER, background=True)
    await _wait_file(src, "count")
    forks = await src.fork(2, timeout=60)
    assert src.state is SandboxState.RUNNING and len(forks) == 2
    a, b = forks
    assert not isinstance(a, SmartVMError) and not isinstance(b, SmartVMError)
    assert len({src.id, a.id, b.id}) == 3
    for fork in (a, b):
        assert await fork.files.read("f.txt") == b"before the fork"
        assert (await fork.commands.run("echo $FROM")).stdout == "source\n"
        assert fork.metadata == {"team": "forks"}
        first = await _count(fork)
        await asyncio.sleep(0.5)
        assert await _count(fork) > first > 0  # the counter process runs on in the fork
    await a.files.write("f.txt", b"changed in a")
    assert await b.files.read("f.txt") == await src.files.read("f.txt") == b"before the fork"
    assert await sbm.list_snapshots() == []  # the snapshot between them is not the user's
    fork_templates = [t.name for t in await sbm.list_templates() if t.kind == "fork"]
    assert len(fork_templates) == 1
    await a.kill()
    await sbm.reap()
    assert [t.name for t in await sbm.list_templates() if t.kind == "fork"] == fork_templates  # b uses it
    await b.kill()
    await sbm.reap()
    assert [t for t in await sbm.list_templates() if t.kind == "fork"] == []
    assert not (sbm.data_dir / "templates" / fork_templates[0]).exists()
    with pytest.raises(SmartVMError) as err:
        await src.fork(0)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    await src.kill()


async def test_timeouts_kill_or_pause_and_set_timeout_extends(sbm: Any) -> None:
    doomed = await sbm.create("base", timeout=1)
    sleeper = await sbm.create("base", timeout=1, auto_pause=True)
    extended = await sbm.create("base", timeout=1)
    await extended.set_timeout(60)
    for _ in range(200):  # the manager's own reaper acts (every second)
        if (doomed.state, sleeper.state) == (SandboxState.STOPPED, SandboxState.PAUSED):
            break
        await asyncio.sleep(0.05)
    assert doomed.state is SandboxState.STOPPED
    assert sleeper.state is SandboxState.PAUSED
    assert extended.state is SandboxState.RUNNING
    await sleeper.resume(timeout=60)
    assert (await sleeper.commands.run("echo awake")).stdout == "awake\n"
