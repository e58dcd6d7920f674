"""The agent's fast exec path: children started by posix_spawn where it can, and a quick command's
"started" event sent together with its result (one write, one wake-up of the host)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture  # noqa: F401

from smartvm.agent import AgentClient, ExecTimeoutError, wire
from smartvm.agent import guest as g


def spec(cmd: list[str] | str, **req: object) -> dict[str, object]:
    return g._spawn_spec({"cmd": cmd, **req})


def read_all(spawned: g._Spawned) -> tuple[bytes, bytes, int]:
    out, err = spawned.stdout.read(), spawned.stderr.read()
    spawned.stdout.close()
    spawned.stderr.close()
    return out, err, spawned.wait()


def test_posix_spawn_runs_the_command_like_popen() -> None:
    # own session, stdin from /dev/null, SIGPIPE/SIGXFSZ back to default (Python ignores them)
    script = 'echo $$ $(cut -d" " -f6 /proc/$$/stat); cat; grep SigIgn /proc/self/status; echo e >&2; exit 3'
    child = g._posix_spawn(spec(script, cwd=os.getcwd()), keep_stdin=False)
    assert isinstance(child, g._Spawned) and child.stdin is None
    out, err, rc = read_all(child)
    pid_sid, sig_ign = out.decode().splitlines()
    assert pid_sid.split() == [str(child.pid)] * 2
    ignored = int(sig_ign.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    assert (err, rc, child.wait()) == (b"e\n", 3, 3)  # wait() again: the same code


def test_posix_spawn_stdin_env_path_and_signals() -> None:
    child = g._posix_spawn(spec(["cat"], cwd=os.getcwd()), keep_stdin=True)
    assert child is not None and child.stdin is not None
    child.stdin.write(b"\x00data\xff" * 5_000)  # less than a pipe: nobody reads yet
    child.stdin.close()
    assert read_all(child) == (b"\x00data\xff" * 5_000, b"", 0)
    child = g._posix_spawn(spec(["env"], cwd=os.getcwd(), env={"ONLY": "1"}), keep_stdin=False)
    assert child is not None and b"ONLY=1\n" in read_all(child)[0]
    child = g._posix_spawn(spec(["sleep", "30"], cwd=os.getcwd()), keep_stdin=False)
    assert child is not None
    os.killpg(child.pid, signal.SIGKILL)
    assert read_all(child)[2] == -signal.SIGKILL


def test_posix_spawn_declines_what_it_cannot_do(tmp_path: Path) -> None:
    # another cwd (it cannot chdir), another user, a program not found: Popen does these (and its errors)
    assert g._posix_spawn(spec(["true"], cwd=str(tmp_path)), keep_stdin=False) is None
    assert g._posix_spawn(spec(["true"], cwd=os.getcwd(), user=os.getuid()), keep_stdin=False) is None
    assert g._posix_spawn(spec(["no-such-program-x"], cwd=os.getcwd()), keep_stdin=False) is None
    script = tmp_path / "script"
    script.write_bytes(b"\x00\x01not a program")
    script.chmod(stat.S_IRWXU)
    assert g._posix_spawn(spec([str(script)], cwd=os.getcwd()), keep_stdin=False) is None
    assert os.listdir(f"/proc/{os.getpid()}/fd") == os.listdir(f"/proc/{os.getpid()}/fd")  # no fd leak
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        g._posix_spawn(spec([str(script)], cwd=os.getcwd()), keep_stdin=True)
    assert set(os.listdir("/proc/self/fd")) == before


async def test_exec_in_the_agents_cwd_keeps_every_behaviour(agent: AgentClient, tmp_path: Path) -> None:
    here = os.getcwd()  # the agent's working directory (the harness starts it here)
    r = await agent.exec("echo out; echo err >&2; pwd; exit 7", cwd=here)
    assert (r.exit_code, r.stdout_text, r.stderr_text) == (7, f"out\n{here}\n", "err\n")
    assert (await agent.exec(["cat"], stdin=b"abc" * 100_000, cwd=here)).stdout == b"abc" * 100_000
    missing = await agent.exec(["no-such-program-x"], cwd=here)
    assert missing.exit_code == 127 and b"command not found" in missing.stderr
    script = tmp_path / "not-a-program"
    script.write_bytes(b"\x00\x01")
    script.chmod(stat.S_IRWXU)
    assert (await agent.exec([str(script)], cwd=here)).exit_code == 126
    with pytest.raises(ExecTimeoutError) as exc:  # the whole group is killed on timeout
        await agent.exec("sleep 30", cwd=here, timeout=0.5)
    assert exc.value.result.timed_out and exc.value.result.exit_code == 124


def _frames(data: bytes, decoder: wire.FrameDecoder) -> list[wire.Frame]:
    frames = decoder.feed(data)
    assert all(isinstance(f, wire.Frame) for f in frames)
    return frames  # type: ignore[return-value]


async def _raw_stream(
    server: AgentServer,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.FrameDecoder]:
    client = server.client()  # waits until the agent listens
    await client.wait_ready(30)
    await client.close()
    reader, writer = await asyncio.open_unix_connection(str(server.sock))
    decoder = wire.FrameDecoder()
    hello = _frames(await reader.read(65536), decoder)
    assert [f.type for f in hello] == [wire.HELLO]
    return reader, writer, decoder


async def test_a_quick_commands_start_and_result_arrive_in_one_write(agent_server: AgentServer) -> None:
    reader, writer, decoder = await _raw_stream(agent_server)
    try:
        for channel in (1, 2, 3):
            writer.write(wire.encode_frame(wire.REQUEST, channel, {"op": "exec", "cmd": ["true"]}))
            await writer.drain()
            first = _frames(await asyncio.wait_for(reader.read(65536), 30), decoder)
            assert [(f.type, f.channel) for f in first] == [(wire.EVENT, channel), (wire.RESULT, channel)]
            assert first[0].header["event"] == "started" and first[1].header["exit_code"] == 0
    finally:
        writer.close()


async def test_a_silent_command_is_announced_before_it_ends(agent_server: AgentServer) -> None:
    reader, writer, decoder = await _raw_stream(agent_server)
    try:
        writer.write(wire.encode_frame(wire.REQUEST, 1, {"op": "exec", "cmd": ["sleep", "30"]}))
        await writer.drain()
        started = _frames(await asyncio.wait_for(reader.read(65536), 20), decoder)
        assert [f.type for f in started] == [wire.EVENT] and started[0].header["event"] == "started"
        pid = started[0].header["pid"]
        os.kill(pid, signal.SIGKILL)
        rest = _frames(await asyncio.wait_for(reader.read(65536), 30), decoder)
        assert [f.type for f in rest] == [wire.RESULT] and rest[0].header["signal"] == signal.SIGKILL
    finally:
        writer.close()


@pytest.mark.parametrize("relative", ["sub/file.txt", "file.txt"])
def test_relative_paths_stay_relative_to_where_the_agent_started(
    relative: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(g, "_START_DIR", "/srv/start")
    assert g._path({"path": relative}) == f"/srv/start/{relative}"
    assert g._path({"path": "/abs/x"}) == "/abs/x"
    assert g._spawn_spec({"cmd": ["true"], "cwd": "rel"})["cwd"] == "/srv/start/rel"
    monkeypatch.setattr(g, "_START_DIR", None)
    assert g._path({"path": relative}) == relative


async def test_output_pipes_are_large_from_the_start(agent: AgentClient, tmp_path: Path) -> None:
    # a fast writer can hand over a whole MiB before the agent's first read (posix_spawn and Popen)
    probe = [sys.executable, "-c", "import fcntl; print(fcntl.fcntl(1, 1032), fcntl.fcntl(2, 1032))"]
    for cwd in (os.getcwd(), str(tmp_path)):
        r = await agent.exec(probe, cwd=cwd)  # 1032: F_GETPIPE_SZ
        assert r.stdout_text.split() == [str(g.PIPE_SIZE)] * 2, r.stderr_text
