"""The agent ops the E2B envd face needs (proc_run, user_info, file_entries, file_prepare, file_watch),
through AgentClient against the REAL guest agent running on the host (as root, like in the guest)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture, pid_gone  # noqa: F401

from smartvm.agent import AgentClient, AgentOpError, ExecEvent, FsEvent
from smartvm.errors import ErrorCode, SmartVMError


async def _collect(events: object) -> list[ExecEvent]:
    out: list[ExecEvent] = []
    async for ev in events:  # type: ignore[attr-defined]
        out.append(ev)
    return out


# ------------------------------------------------------------------------------------------- proc_run
async def test_run_streams_output_until_exit_and_is_listed(agent: AgentClient) -> None:
    events = await _collect(
        agent.processes.run("echo out; echo err >&2; exit 5", env={"X": "1"}, meta={"tag": "t1"})
    )
    assert events[0].kind == "started" and events[0].pid
    assert b"".join(e.data for e in events if e.kind == "stdout") == b"out\n"
    assert b"".join(e.data for e in events if e.kind == "stderr") == b"err\n"
    end = events[-1]
    assert end.kind == "exit" and end.result is not None and end.result.exit_code == 5
    listed = {p.pid: p for p in await agent.processes.list()}
    assert listed[events[0].pid].meta == {"tag": "t1"} and not listed[events[0].pid].running


async def test_run_detaches_on_early_exit_and_process_keeps_running(agent: AgentClient) -> None:
    stream = agent.processes.run("echo ready; read line; exit $line", stdin=True)
    first = await anext(stream)
    assert first.kind == "started" and first.pid
    assert (await anext(stream)).data == b"ready\n"
    await stream.aclose()  # detach only
    running = {p.pid: p for p in await agent.processes.list()}[first.pid]
    assert running.running and running.stdin_open
    await agent.processes.send_stdin(first.pid, b"7\n")
    assert (await agent.processes.wait(first.pid, timeout=60)).exit_code == 7


async def test_run_timeout_kills_the_process_group_even_when_detached(agent: AgentClient) -> None:
    stream = agent.processes.run("sleep 1000 & echo $!; wait", timeout=1.0)
    started = await anext(stream)
    child = int((await anext(stream)).data)
    await stream.aclose()
    assert started.pid is not None
    assert pid_gone(started.pid, 30) and pid_gone(child, 30)
    info = {p.pid: p for p in await agent.processes.list()}[started.pid]
    assert info.signal == signal.SIGKILL


async def test_run_reports_timed_out_to_an_attached_caller(agent: AgentClient) -> None:
    events = await _collect(agent.processes.run(["sleep", "1000"], timeout=0.5))
    assert events[-1].result is not None and events[-1].result.timed_out
    assert events[-1].result.signal == signal.SIGKILL


async def test_run_starts_no_thread_of_its_own(agent: AgentClient, agent_server: AgentServer) -> None:
    """proc_run pumps on its request's worker like exec (a thread start costs about 1 ms under TCG,
    on every E2B command): while either runs, the agent has the same number of threads."""
    if agent_server.native:
        pytest.skip("counts the Python agent's threads; the native agent's are Go's")

    def threads() -> int:
        return len(os.listdir(f"/proc/{agent_server.proc.pid}/task"))

    await asyncio.gather(*(agent.ping() for _ in range(4)))  # idle workers for both requests below
    counts = []
    for events in (
        agent.exec_stream(["sleep", "1"], timeout=30),
        agent.processes.run(["sleep", "1"], timeout=30),
    ):
        async with contextlib.aclosing(events):
            async for ev in events:
                if ev.kind == "started":
                    await asyncio.sleep(0.4)  # the old pump and timer threads started right after this
                    counts.append(threads())
        assert ev.kind == "exit" and ev.result is not None and ev.result.exit_code == 0
    assert counts[1] == counts[0]


async def test_run_missing_program_is_exit_127(agent: AgentClient) -> None:
    events = await _collect(agent.processes.run(["/no/such/program"]))
    assert [e.kind for e in events] == ["stderr", "exit"]
    assert events[-1].result is not None and events[-1].result.exit_code == 127


async def test_run_as_user(agent: AgentClient) -> None:
    events = await _collect(agent.processes.run(["id", "-u"], user="nobody"))
    assert b"".join(e.data for e in events if e.kind == "stdout") == b"65534\n"


# ------------------------------------------------------------------------------------------ user_info
async def test_user_info(agent: AgentClient) -> None:
    root = await agent.processes.user()
    assert (root.name, root.uid, root.home) == ("root", 0, "/root")
    nobody = await agent.processes.user("nobody")
    assert (nobody.uid, nobody.gid) == (65534, 65534)
    with pytest.raises(SmartVMError) as exc:
        await agent.processes.user("no-such-user-here")
    assert exc.value.code == ErrorCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------------------- file_entries
async def test_entries_depth_and_owner_names(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "b" / "deep" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b" / "c.txt").write_text("x")
    (tmp_path / "b" / "deep" / "deeper" / "d.txt").write_text("x")
    os.symlink("a.txt", tmp_path / "link")
    os.chown(tmp_path / "a.txt", 65534, 65534)

    top, none = await agent.files.entries(str(tmp_path / "a.txt"))
    assert none == [] and top.type == "file" and top.size == 5
    assert (top.owner, top.group) == ("nobody", "nogroup")
    link, _ = await agent.files.entries(str(tmp_path / "link"))
    assert link.type == "symlink" and link.target == "a.txt"

    _, level1 = await agent.files.entries(str(tmp_path), depth=1)
    assert [e.name for e in level1] == ["a.txt", "b", "link"]
    _, level2 = await agent.files.entries(str(tmp_path), depth=2)
    assert [str(Path(e.path).relative_to(tmp_path)) for e in level2] == [
        "a.txt",
        "b",
        "b/c.txt",
        "b/deep",
        "link",
    ]
    _, level9 = await agent.files.entries(str(tmp_path), depth=9)
    assert "b/deep/deeper/d.txt" in [str(Path(e.path).relative_to(tmp_path)) for e in level9]

    with pytest.raises(AgentOpError) as exc:
        await agent.files.entries(str(tmp_path / "a.txt"), depth=1)
    assert exc.value.errno == "ENOTDIR"
    with pytest.raises(AgentOpError) as exc:
        await agent.files.entries(str(tmp_path / "missing"))
    assert exc.value.errno == "ENOENT" and exc.value.code == ErrorCode.GUEST_FILE_ERROR


# --------------------------------------------------------------------------------------- file_prepare
async def test_prepare_creates_owned_parents_and_file_and_write_keeps_owner(
    agent: AgentClient, tmp_path: Path
) -> None:
    (tmp_path / "home").mkdir()
    target = tmp_path / "home" / "x" / "y" / "f.txt"
    created, info = await agent.files.prepare(str(target), user="nobody")
    assert created and info.type == "file" and info.size == 0
    for path in (tmp_path / "home" / "x", tmp_path / "home" / "x" / "y", target):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), path
    assert (tmp_path / "home").stat().st_uid == 0  # existing parents are not touched
    await agent.files.write(str(target), b"content")
    assert target.read_bytes() == b"content" and target.stat().st_uid == 65534

    again, _ = await agent.files.prepare(str(target), user="nobody")
    assert not again and target.read_bytes() == b"content"

    created_dir, dir_info = await agent.files.prepare(str(tmp_path / "home" / "d1" / "d2"), kind="dir")
    assert created_dir and dir_info.type == "dir"
    exists, _ = await agent.files.prepare(str(tmp_path / "home" / "d1" / "d2"), kind="dir")
    assert not exists
    with pytest.raises(AgentOpError) as exc:
        await agent.files.prepare(str(target), kind="dir")
    assert exc.value.errno == "EEXIST"
    with pytest.raises(AgentOpError) as exc:
        await agent.files.prepare(str(target / "under-a-file"))
    assert exc.value.errno == "ENOTDIR"


# ----------------------------------------------------------------------------------------- file_watch
async def _next_events(events: object, want: set[tuple[str, str]], timeout: float = 30) -> list[FsEvent]:
    """Read events until every (name, type) in `want` was seen; returns all read."""
    seen: list[FsEvent] = []
    async with asyncio.timeout(timeout):
        while not want <= {(e.name, e.type) for e in seen}:
            seen.append(await anext(events))  # type: ignore[call-overload]
    return seen


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_watch_reports_changes_and_stops_cleanly(
    agent: AgentClient, agent_server: AgentServer, tmp_path: Path
) -> None:
    (tmp_path / "old.txt").write_text("x")
    baseline = _open_fds(agent_server.proc.pid)
    events = agent.files.watch(str(tmp_path))
    assert await anext(events) == FsEvent("", "start")
    await agent.files.write(str(tmp_path / "new.txt"), b"atomic")  # temp file + rename in the agent
    seen = await _next_events(events, {("new.txt", "write")})
    assert not any(e.name.endswith(".smartvm-part") for e in seen)
    (tmp_path / "shell.txt").write_text("y")
    os.chmod(tmp_path / "shell.txt", 0o600)
    os.rename(tmp_path / "old.txt", tmp_path / "renamed.txt")
    (tmp_path / "renamed.txt").unlink()
    await _next_events(
        events,
        {
            ("shell.txt", "create"),
            ("shell.txt", "write"),
            ("shell.txt", "chmod"),
            ("old.txt", "rename"),
            ("renamed.txt", "create"),
            ("renamed.txt", "remove"),
        },
    )
    await events.aclose()
    await agent.ping()  # the CANCEL went out first; the watch's inotify fd and pipe are closed
    for _ in range(100):
        if _open_fds(agent_server.proc.pid) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert _open_fds(agent_server.proc.pid) <= baseline


async def test_watch_recursive_follows_new_directories(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    events = agent.files.watch(str(tmp_path), recursive=True, include_entry=True)
    try:
        assert (await anext(events)).type == "start"
        (tmp_path / "sub" / "a.txt").write_text("a")
        seen = await _next_events(events, {("sub/a.txt", "write")})
        entry = next(e.entry for e in seen if e.name == "sub/a.txt")
        assert entry is not None and entry.type == "file" and entry.owner == "root"
        (tmp_path / "new" / "deeper").mkdir(parents=True)
        await asyncio.sleep(0.5)  # the agent adds the new directories' watches as it sees them
        (tmp_path / "new" / "deeper" / "b.txt").write_text("b")
        await _next_events(events, {("new", "create"), ("new/deeper/b.txt", "write")})
    finally:
        await events.aclose()


async def test_watch_not_recursive_ignores_subdirectories(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    events = agent.files.watch(str(tmp_path))
    try:
        assert (await anext(events)).type == "start"
        (tmp_path / "sub" / "a.txt").write_text("a")
        (tmp_path / "top.txt").write_text("t")
        seen = await _next_events(events, {("top.txt", "write")})
        assert not any(e.name.startswith("sub/") for e in seen)
    finally:
        await events.aclose()


async def test_watch_errors(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for path, errno in ((tmp_path / "missing", "ENOENT"), (tmp_path / "f", "ENOTDIR")):
        events = agent.files.watch(str(path))
        with pytest.raises(AgentOpError) as exc:
            await anext(events)
        assert exc.value.errno == errno
        with contextlib.suppress(StopAsyncIteration):
            await events.aclose()


async def test_watch_ends_when_the_directory_is_removed(agent: AgentClient, tmp_path: Path) -> None:
    watched = tmp_path / "w"
    watched.mkdir()
    events = agent.files.watch(str(watched))
    assert (await anext(events)).type == "start"
    watched.rmdir()
    async with asyncio.timeout(30):
        rest = [e async for e in events]
    assert ("", "remove") in {(e.name, e.type) for e in rest}
