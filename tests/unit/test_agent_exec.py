"""exec through AgentClient against the REAL guest agent running on the host."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import signal
from pathlib import Path

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture, pid_gone  # noqa: F401

from smartvm.agent import AgentClient, ExecEvent, ExecTimeoutError
from smartvm.errors import ErrorCode, SmartVMError


async def test_argv_and_shell_string(agent: AgentClient) -> None:
    r = await agent.exec(["printf", "%s|", "a b", "c"])
    assert (r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out) == (0, b"a b|c|", b"", None, False)
    r = await agent.exec("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout_text, r.stderr_text) == (7, "out\n", "err\n")
    assert r.duration >= 0 and r.pid is not None and not r.ok


async def test_env_cwd_stdin_and_user(agent: AgentClient, tmp_path: Path) -> None:
    r = await agent.exec('echo "$GREETING $HOME"; pwd', env={"GREETING": "hi"}, cwd=str(tmp_path))
    assert r.stdout_text == f"hi {pwd.getpwuid(os.getuid()).pw_dir}\n{tmp_path}\n"
    r = await agent.exec(["env"], env={"PATH": None, "ONLY": "1"})
    assert "ONLY=1" in r.stdout_text.splitlines() and "PATH=" not in r.stdout_text
    r = await agent.exec(["cat"], stdin=b"\x00binary\xff" * 100_000)
    assert r.stdout == b"\x00binary\xff" * 100_000
    r = await agent.exec(["cat"])  # no stdin: /dev/null, not a hang
    assert r.stdout == b""
    if os.getuid() == 0:
        r = await agent.exec("id -u; id -G; echo $HOME", user="nobody")
        uid, groups, home = r.stdout_text.split("\n")[:3]
        assert uid == "65534" and "0" not in groups.split() and home
        assert (await agent.exec(["id", "-u"], user=65534)).stdout == b"65534\n"


async def test_unicode_and_binary_output_intact(agent: AgentClient) -> None:
    text = "héllo wörld ✓ 日本語 🚀\n"
    assert (await agent.exec(["printf", "%s", text])).stdout_text == text
    r = await agent.exec("head -c 256 /dev/zero | tr '\\0' '\\377'; printf '\\000\\001\\200'")
    assert r.stdout == b"\xff" * 256 + b"\x00\x01\x80"
    big = await agent.exec("head -c 1048576 /dev/urandom | tee /tmp/.svagent-rand | sha256sum")
    assert big.stdout.endswith(b"  -\n")
    data = await agent.exec(["cat", "/tmp/.svagent-rand"])
    assert len(data.stdout) == 1048576
    assert hashlib.sha256(data.stdout).hexdigest() == big.stdout_text.split()[0]
    os.unlink("/tmp/.svagent-rand")


async def test_exit_codes_and_signals(agent: AgentClient) -> None:
    for code in (0, 1, 42, 255):
        assert (await agent.exec(f"exit {code}")).exit_code == code
    r = await agent.exec("kill -TERM $$")
    assert (r.signal, r.exit_code) == (signal.SIGTERM, 128 + signal.SIGTERM)
    r = await agent.exec(["sh", "-c", "kill -9 $$"])
    assert (r.signal, r.exit_code) == (9, 137)


async def test_missing_program_is_127_and_bad_cwd_is_an_error(agent: AgentClient) -> None:
    r = await agent.exec(["/no/such/program", "x"])
    assert r.exit_code == 127 and b"not found" in r.stderr
    r = await agent.exec(["/etc/hostname"])  # not executable
    assert r.exit_code == 126
    with pytest.raises(SmartVMError) as exc:
        await agent.exec(["true"], cwd="/no/such/dir")
    assert exc.value.code == ErrorCode.AGENT_ERROR and "/no/such/dir" in exc.value.message


async def test_output_streams_before_the_command_ends(agent: AgentClient, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    script = f"echo first; while [ ! -e {flag} ]; do sleep 0.02; done; echo second"
    seen: list[ExecEvent] = []
    async for ev in agent.exec_stream(script, timeout=60):
        seen.append(ev)
        if ev.kind == "stdout" and ev.data == b"first\n":
            flag.touch()  # the command cannot finish before we got its first line
    kinds = [e.kind for e in seen]
    assert kinds[0] == "started" and kinds[-1] == "exit"
    assert b"".join(e.data for e in seen if e.kind == "stdout") == b"first\nsecond\n"
    final = seen[-1].result
    assert final is not None and final.exit_code == 0 and not final.timed_out


async def test_callbacks_get_chunks_as_they_arrive(agent: AgentClient, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    got: list[bytes] = []

    async def on_out(data: bytes) -> None:
        got.append(data)
        flag.touch()

    errs: list[bytes] = []
    r = await agent.exec(
        f"echo one; echo e >&2; while [ ! -e {flag} ]; do sleep 0.02; done; echo two",
        on_stdout=on_out,
        on_stderr=errs.append,
        timeout=60,
    )
    assert b"".join(got) == b"one\ntwo\n" and errs == [b"e\n"]
    assert r.stdout == r.stderr == b""  # consumed by the callbacks, so not kept as well


async def test_ten_commands_at_once(agent: AgentClient) -> None:
    async def one(i: int) -> None:
        r = await agent.exec(f"for j in $(seq 1 2000); do echo {i}-$j; done; echo err{i} >&2; exit {i}")
        assert r.exit_code == i and r.stderr == f"err{i}\n".encode()
        assert r.stdout_text.splitlines() == [f"{i}-{j}" for j in range(1, 2001)]

    await asyncio.gather(*(one(i) for i in range(10)))


async def test_separate_connections_run_at_the_same_time(agent_server: AgentServer) -> None:
    """The socket transports (vsock on Firecracker, unix here: one accept loop) serve every connection
    on its own thread, so separate clients (separate CLI processes) never wait for each other."""
    first, second = agent_server.client(), agent_server.client()
    try:
        await first.wait_ready(30)
        await second.wait_ready(30)
        long = asyncio.ensure_future(first.exec(["sleep", "3"]))
        assert (await second.exec(["echo", "second"])).stdout == b"second\n"
        assert not long.done()
        assert (await long).exit_code == 0
    finally:
        await first.close()
        await second.close()


async def test_timeout_kills_the_whole_process_group(agent: AgentClient) -> None:
    with pytest.raises(ExecTimeoutError) as exc:
        await agent.exec("sleep 300 & echo $!; echo $$; sleep 301", timeout=1)
    assert exc.value.code == ErrorCode.EXEC_TIMEOUT
    result = exc.value.result
    assert result is not None and result.timed_out and result.exit_code == 124 and result.signal == 9
    pids = [int(x) for x in result.stdout.split()]
    assert len(pids) == 2
    assert all(pid_gone(pid) for pid in pids), "something survived the timeout"


async def test_leaving_the_stream_early_kills_the_command(agent: AgentClient) -> None:
    pids: list[int] = []
    stream = agent.exec_stream("sleep 300 & echo $!; sleep 301")
    async for ev in stream:
        if ev.kind == "stdout":
            pids.append(int(ev.data))
            break
    await stream.aclose()
    assert pids and pid_gone(pids[0])
    assert (await agent.exec("echo still serving")).exit_code == 0


async def test_cancelled_task_kills_the_command(agent: AgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(agent.exec(f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 300"))
    for _ in range(1000):
        if pidfile.exists():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pid_gone(pid)


async def test_failing_callback_kills_the_command_at_once(agent: AgentClient) -> None:
    pids: list[int] = []

    def on_out(data: bytes) -> None:
        pids.append(int(data))
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed") as info:
        await agent.exec("echo $$; exec sleep 300", on_stdout=on_out)
    # the command ends while the failure (and the frames it references) is still alive
    assert info.value is not None and pids and pid_gone(pids[0])
    assert agent._conn is not None and agent._conn.channels == {}


async def test_request_too_large_for_a_frame_leaves_no_channel_behind(agent: AgentClient) -> None:
    with pytest.raises(SmartVMError) as info:
        await agent.exec(["echo", "x" * (1 << 20)])
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert agent._conn is not None and agent._conn.channels == {}
    assert (await agent.exec(["echo", "still serving"])).exit_code == 0


async def test_crashing_command_does_not_take_the_agent_down(agent: AgentClient) -> None:
    r = await agent.exec(["sh", "-c", "kill -SEGV $$"])
    assert r.signal == signal.SIGSEGV
    r = await agent.exec("python3 -c 'import os; os.abort()' 2>/dev/null; exit 3")
    assert r.exit_code == 3
    assert (await agent.exec(["echo", "alive"])).stdout == b"alive\n"
