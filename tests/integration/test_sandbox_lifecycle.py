"""Sandboxes on real QEMU guests: create from ``base``, commands, files, kill, limits, one manager
per data dir."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import manager_for

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox import SandboxState


async def test_create_exec_as_user_files_round_trip_and_kill(sbm: Any) -> None:
    sbx = await sbm.create("base", timeout=60, metadata={"k": "v"}, envs={"GREETING": "hi"})
    assert sbx.id.startswith("sb-") and len(sbx.id) == 11
    assert sbx.state is SandboxState.RUNNING
    r = await sbx.commands.run("echo $GREETING; whoami; pwd; hostname; python3 -c 'print(6*7)'")
    assert (r.exit_code, r.stdout.split()) == (0, ["hi", "user", "/home/user", sbx.id, "42"])
    root = await sbx.commands.run(["id", "-u"], user="root")
    assert root.stdout.strip() == "0"
    failed = await sbx.commands.run("echo oops >&2; exit 3")
    assert (failed.exit_code, failed.stderr) == (3, "oops\n")  # a non-zero exit is a result
    data = bytes(range(256)) * 1000
    info = await sbx.files.write("sub/dir/f.bin", data)
    assert (info.path, info.uid, info.size) == ("/home/user/sub/dir/f.bin", 1000, len(data))
    assert await sbx.files.read("/home/user/sub/dir/f.bin") == data
    owner = await sbx.commands.run("stat -c %U sub sub/dir sub/dir/f.bin")
    assert owner.stdout.split() == ["user", "user", "user"]
    assert [f.name for f in await sbx.files.list("sub/dir")] == ["f.bin"]
    await sbx.files.rename("sub/dir/f.bin", "g.bin")
    assert await sbx.files.exists("/home/user/g.bin") and not await sbx.files.exists("sub/dir/f.bin")
    details = await sbx.info()
    assert (details.template, details.metadata, details.cpus, details.memory_mib) == (
        "base",
        {"k": "v"},
        1,
        256,
    )
    assert 0 < details.disk_bytes < 64 << 20 and details.end_at > details.created_at
    assert [s.id for s in await sbm.list(metadata={"k": "v"})] == [sbx.id]
    [listed] = await sbm.infos(metadata={"k": "v"})  # the batched info of a listing: the same facts
    assert dataclasses.replace(listed, disk_bytes=0) == dataclasses.replace(details, disk_bytes=0)
    assert listed.disk_bytes > 0
    assert await sbm.list(metadata={"k": "other"}) == []
    await sbx.kill()
    assert sbx.state is SandboxState.STOPPED
    with pytest.raises(SmartVMError) as err:
        await sbx.commands.run("true")
    assert err.value.code is ErrorCode.SANDBOX_NOT_RUNNING
    await sbx.kill()  # idempotent
    assert [e.kind for e in await sbm.events(sbx.id)][:1] == ["created"]


async def test_background_command_handle(sbm: Any) -> None:
    sbx = await sbm.create("base")
    h = await sbx.commands.run("read line; echo got $line; touch marker; sleep 100", background=True)
    await h.send_stdin("hello\n")
    assert h.pid in [p.pid for p in await sbx.commands.list()]
    for _ in range(100):
        if await sbx.files.exists("marker"):
            break
        await asyncio.sleep(0.1)
    assert await h.kill() is True
    result = await h.wait(10)
    assert "got hello" in result.stdout and result.exit_code != 0
    done = await sbx.commands.run("echo quick", background=True)
    assert (await done.wait(10)).stdout == "quick\n"


async def test_a_second_manager_on_one_data_dir_is_refused(
    sbm: Any, sandbox_data: Path, runtime_root: Path
) -> None:
    other = manager_for(sandbox_data, runtime_root)
    with pytest.raises(SmartVMError) as err:
        await other.start()
    assert err.value.code is ErrorCode.DATA_DIR_IN_USE
    assert len(await sbm.list()) == 0  # the first one is untouched


async def test_limits_refuse_at_once(sandbox_data: Path, runtime_root: Path) -> None:
    mgr = manager_for(sandbox_data, runtime_root, max_sandboxes=1)
    async with mgr:
        first = await mgr.create("base")
        with pytest.raises(SmartVMError) as err:
            await asyncio.wait_for(mgr.create("base"), 5)
        assert err.value.code is ErrorCode.SANDBOX_LIMIT_REACHED
        await first.kill()
    mgr = manager_for(sandbox_data, runtime_root, max_memory_mib=128)
    async with mgr:
        with pytest.raises(SmartVMError) as err:
            await mgr.create("base")
        assert err.value.code is ErrorCode.SANDBOX_LIMIT_REACHED
        assert await mgr.list() == []


async def test_bad_input_is_refused_before_anything_starts(sbm: Any) -> None:
    for kwargs, code in [
        ({"timeout": -1}, ErrorCode.INVALID_ARGUMENT),
        ({"metadata": {"k": 1}}, ErrorCode.INVALID_ARGUMENT),
        ({"envs": {"": "x"}}, ErrorCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(SmartVMError) as err:
            await sbm.create("base", **kwargs)
        assert err.value.code is code
    with pytest.raises(SmartVMError) as err:
        await sbm.create("no-such-template")
    assert err.value.code is ErrorCode.TEMPLATE_NOT_FOUND
    with pytest.raises(SmartVMError) as err:
        await sbm.get("sb-00000000")
    assert err.value.code is ErrorCode.SANDBOX_NOT_FOUND
    assert await sbm.list() == []


async def _warm_ready(mgr: Any) -> None:
    for _ in range(600):
        if mgr._warm.ids():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no warm sandbox was made")


async def test_sandboxes_from_the_warm_pool_are_fresh_and_their_own(
    sandbox_data: Path, runtime_root: Path
) -> None:
    import time

    from sandbox_support import assert_no_sandbox_left

    from smartvm.host.nat import EgressPolicy

    mgr = manager_for(sandbox_data, runtime_root, warm_pool_size=1)
    async with mgr:
        first = await mgr.create("base")
        seen = []
        for kwargs in ({}, {"internet": False}):
            await _warm_ready(mgr)
            warm_id = next(iter(mgr._warm.ids()))
            sbx = await mgr.create("base", **kwargs)
            assert sbx.id == warm_id  # it came from the pool
            out = await sbx.commands.run(
                "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"
            )
            name, rand, clock = out.stdout.split()
            assert name == sbx.id and abs(int(clock) - time.time()) < 5
            seen.append(rand)
            live = mgr._live[sbx.id]
            expected = EgressPolicy.deny_all() if kwargs else EgressPolicy.allow_all()
            assert live.slot.egress == expected
            assert mgr._svm.records.load(sbx.id) is not None  # recorded: it outlives the manager
        assert seen[0] != seen[1]
        for sbx in await mgr.list():
            await sbx.kill()
        del first
    assert_no_sandbox_left(sandbox_data, runtime_root)  # the warm sandbox went with the manager


async def test_streamed_writes_and_reads_keep_every_byte(sbm: Any) -> None:
    sbx = await sbm.create("base")
    data = bytes(range(256)) * 12289  # ~3 MiB, in chunks of awkward sizes

    async def chunks() -> Any:
        for i in range(0, len(data), 100_003):
            yield data[i : i + 100_003]

    info = await sbx.files.write_stream("streamed.bin", chunks())
    assert (info.size, info.uid) == (len(data), 1000)
    back = b"".join([c async for c in sbx.files.read_stream("streamed.bin")])
    assert back == data
