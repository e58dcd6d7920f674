"""What only the native agent (src/smartvm/agent/native) does: its HELLO matches the Python agent's,
it renumbers the channels it relays to its Python child (two connections may use the same channel
id), and a dead Python child fails the requests it had and is restarted for the next one.

The rest of its behaviour is the agent unit suite, run against it with SMARTVM_TEST_NATIVE_AGENT=1.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import AgentServer, native_binary, pid_gone

from smartvm.agent import wire
from smartvm.agent.guest import Agent
from smartvm.errors import SmartVMError


@pytest.fixture(name="native")
async def native_fixture() -> AsyncIterator[AgentServer]:
    if native_binary() is None:
        pytest.skip("no go toolchain (apt-get install golang-go)")
    server = AgentServer(native=True)
    try:
        yield server
    finally:
        server.stop()


async def _connect(server: AgentServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw stream to the agent, once it listens (it starts in the background)."""
    for _ in range(200):
        if server.sock.exists():
            return await server.open_stream(10)
        await asyncio.sleep(0.05)
    raise AssertionError("the native agent did not listen")


class _Transport:
    transport = "unix"


async def _frames(reader: asyncio.StreamReader, want: int) -> list[wire.Frame]:
    """Read frames until `want` RESULT/ERROR frames on channels > 0 arrived."""
    dec = wire.FrameDecoder()
    got: list[wire.Frame] = []
    while sum(1 for f in got if f.type in (wire.RESULT, wire.ERROR) and f.channel) < want:
        data = await asyncio.wait_for(reader.read(65536), 30)
        assert data, "the agent closed the connection"
        got += [f for f in dec.feed(data) if isinstance(f, wire.Frame)]
    return got


async def test_hello_is_the_python_agents_plus_impl(native: AgentServer) -> None:
    reader, writer = await _connect(native)
    hello = (await _frames_until_hello(reader)).header
    python = Agent(dry_run_system=True).hello(_Transport())  # type: ignore[arg-type]
    assert set(hello) == set(python) | {"impl"} and hello["impl"] == "native"
    assert hello["ops"] == python["ops"]
    for key in ("protocol", "agent_version", "transport", "max_payload", "max_header", "kernel", "machine"):
        assert hello[key] == python[key], key
    writer.close()


async def _frames_until_hello(reader: asyncio.StreamReader) -> wire.Frame:
    dec = wire.FrameDecoder()
    while True:
        data = await asyncio.wait_for(reader.read(65536), 30)
        assert data
        for f in dec.feed(data):
            if isinstance(f, wire.Frame) and f.type == wire.HELLO:
                return f


async def test_relayed_channels_of_two_connections_do_not_collide(
    native: AgentServer, tmp_path: Path
) -> None:
    """Both connections relay a file_read on channel 5 at once; each gets its own file back."""
    streams = [await _connect(native) for _ in range(2)]
    for i, (_, writer) in enumerate(streams):
        path = tmp_path / f"f{i}"
        path.write_bytes(f"content {i}\n".encode() * 1000)
        writer.write(wire.encode_frame(wire.REQUEST, 5, {"op": "file_read", "path": str(path)}))
    for i, (reader, writer) in enumerate(streams):
        frames = await _frames(reader, 1)
        data = b"".join(f.payload for f in frames if f.type == wire.DATA and f.channel == 5)
        assert frames[-1].type == wire.RESULT and frames[-1].channel == 5, frames[-1]
        assert data == f"content {i}\n".encode() * 1000
        writer.close()


async def _replies(
    server: AgentServer, requests: list[dict[str, Any]], payload: bytes = b""
) -> list[list[tuple[int, dict[str, Any], int]]]:
    """Each request's frames (type, header, payload size), sent one at a time on a raw stream."""
    reader, writer = await _connect(server)
    await _frames_until_hello(reader)
    out = []
    for i, req in enumerate(requests, start=1):
        writer.write(wire.encode_frame(wire.REQUEST, i, req, payload))
        frames = await _frames(reader, 1)
        out.append([(f.type, f.header, len(f.payload)) for f in frames if f.channel == i])
    writer.close()
    return out


async def test_native_file_read_answers_as_the_python_agent(native: AgentServer, tmp_path: Path) -> None:
    """file_read is native: every answer (events, chunks, results, errors) equals guest.py's."""
    (tmp_path / "f").write_bytes(os.urandom(600 * 1024))
    (tmp_path / "f").chmod(0o640)
    (tmp_path / "locked").write_text("x")
    (tmp_path / "locked").chmod(0)
    requests: list[dict[str, Any]] = [
        {"op": "file_read", "path": str(tmp_path / "f")},
        {"op": "file_read", "path": str(tmp_path / "f"), "offset": 1000, "length": 300000},
        {"op": "file_read", "path": str(tmp_path / "f"), "offset": 10**9},
        {"op": "file_read", "path": str(tmp_path / "missing")},
        {"op": "file_read", "path": str(tmp_path)},
        {"op": "file_read", "path": str(tmp_path / "f" / "under")},
        {"op": "file_read", "path": ""},
        {"op": "file_read", "path": str(tmp_path / "f"), "offset": -1},
        {"op": "file_read", "path": str(tmp_path / "f"), "length": 1.5},
    ]
    if os.getuid() != 0:
        requests.append({"op": "file_read", "path": str(tmp_path / "locked")})
    python = AgentServer(native=False)
    try:
        expected = await _replies(python, requests)
    finally:
        python.stop()
    assert await _replies(native, requests) == expected


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


async def test_native_file_write_answers_as_the_python_agent(native: AgentServer, tmp_path: Path) -> None:
    """file_write is native: answers and the files it leaves equal guest.py's, case by case."""
    root = tmp_path / "w"

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        (root / "old").write_text("old")
        (root / "old").chmod(0o604)
        (root / "adir").mkdir()
        (root / "afile").write_text("x")

    def write(path: str, **fields: Any) -> dict[str, Any]:
        return {"op": "file_write", "path": path, "eof": True, **fields}

    requests = [
        write(str(root / "new")),
        write(str(root / "old")),
        write(str(root / "old"), append=True),
        write(str(root / "moded"), mode=0o640),
        write(str(root / "deep" / "er" / "f")),
        write(str(root / "nodir" / "f"), parents=False),
        write(str(root / "afile" / "under")),
        write(str(root / "adir")),
        write(str(root / "bad"), mode=0o17777),
        write(str(root / "bad"), mode="644"),
        write(""),
    ]
    results = []
    for server in (AgentServer(native=False), native):
        setup()
        try:
            results.append((await _replies(server, requests, b"payload\n"), _tree(root)))
        finally:
            if server is not native:
                server.stop()
    for got, want in zip(results[1][0], results[0][0], strict=True):
        assert got == want
    assert results[1][1] == results[0][1]


_TIMES = ("started", "ended", "duration", "time")


def _normal(frames: list[wire.Frame], pid: int | None) -> list[Any]:
    """Frames of one request with what differs between runs masked: the pid and the times; DATA
    payloads joined per stream (how a stream's output splits into frames depends on timing)."""

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (type(v).__name__ if k in _TIMES else mask(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, str) and pid is not None:
            return value.replace(str(pid), "PID")
        return "PID" if pid is not None and value == pid else value

    streams: dict[str, bytes] = {}
    out: list[Any] = []
    for f in frames:
        if f.type == wire.DATA:
            streams[f.header["s"]] = streams.get(f.header["s"], b"") + f.payload
        else:
            out.append((f.type, mask(f.header)))
    return [sorted(streams.items()), *out]


async def _process_story(server: AgentServer) -> list[Any]:
    """One scripted life of background processes; each step's answer, normalized."""
    reader, writer = await _connect(server)
    await _frames_until_hello(reader)
    pid: int | None = None
    answers = []
    script = "echo out; echo err >&2; read line; echo got $line; exit 3"
    steps: list[tuple[dict[str, Any], bytes]] = [
        ({"op": "proc_start", "cmd": ["sh", "-c", script], "stdin": True, "meta": {"k": [1, "v"]}}, b""),
        ({"op": "proc_stdin", "eof": True}, b"hello\n"),
        ({"op": "proc_attach"}, b""),
        ({"op": "proc_list"}, b""),
        ({"op": "proc_stdin"}, b"late"),
        ({"op": "proc_signal", "signal": "SIGBOGUS"}, b""),
        ({"op": "proc_signal", "signal": 1.5}, b""),
        ({"op": "proc_signal", "signal": "term"}, b""),
        ({"op": "proc_attach", "pid": 99999999}, b""),
        ({"op": "proc_stdin", "pid": "12"}, b""),
        ({"op": "proc_start", "cmd": ["true"], "replay_bytes": -1}, b""),
        ({"op": "proc_run", "cmd": ["true"], "timeout": 0}, b""),
        ({"op": "proc_run", "cmd": ["no-such-program-here"]}, b""),
        ({"op": "proc_run", "cmd": ["sh", "-c", "echo a; sleep 5"], "timeout": 0.3}, b""),
        ({"op": "proc_start", "cmd": ["sleep", "30"], "replay_bytes": 0}, b""),
        ({"op": "proc_signal", "signal": "sigusr1", "group": False}, b""),
        ({"op": "proc_attach", "replay": False}, b""),
    ]
    for channel, (req, payload) in enumerate(steps, start=1):
        if "pid" not in req and req["op"] not in ("proc_start", "proc_run", "proc_list"):
            req = {**req, "pid": pid}
        writer.write(wire.encode_frame(wire.REQUEST, channel, req, payload))
        frames = [f for f in await _frames(reader, 1) if f.channel == channel]
        final = frames[-1]
        if final.type == wire.RESULT and req["op"] in ("proc_start", "proc_run"):
            pid = final.header.get("pid", pid)
        answers.append(_normal(frames, pid))
    writer.close()
    return answers


async def test_native_processes_answer_as_the_python_agent(native: AgentServer) -> None:
    """proc_* are native: a scripted life of processes (stdin, replay, exit code, errors, timeout,
    signals) gets the same answers from both agents, pids and times aside."""
    python = AgentServer(native=False)
    try:
        expected = await _process_story(python)
    finally:
        python.stop()
    got = await _process_story(native)
    for step, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert mine == theirs, f"step {step}"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid:
                out.append(int(entry))
    return out


async def test_a_dead_python_child_is_replaced(native: AgentServer, tmp_path: Path) -> None:
    client = native.client()
    await client.wait_ready(30)
    try:
        (tmp_path / "x").write_text("x")
        assert (await client.files.stat(str(tmp_path / "x"))).size == 1  # relayed: the child runs
        children = _children(native.proc.pid)
        assert len(children) == 1
        watch = asyncio.ensure_future(_consume(client.files.watch(str(tmp_path))))
        await asyncio.sleep(0.5)
        os.kill(children[0], signal.SIGKILL)
        assert pid_gone(children[0])
        with pytest.raises(SmartVMError):  # the relayed request it was serving fails, not hangs
            await asyncio.wait_for(watch, 30)
        assert (await client.files.stat(str(tmp_path / "x"))).size == 1  # a new child serves
        assert (await client.exec(["true"])).exit_code == 0  # native ops never depended on it
    finally:
        await client.close()


async def _consume(events: Any) -> None:
    async for _ in events:
        pass


def test_frame_header_layout() -> None:
    """The Go codec's header layout is wire.HEADER (checked here so a change to one shows)."""
    assert wire.HEADER.format == "!4sBBHIII" and wire.HEADER_SIZE == 20 == struct.calcsize("!4sBBHIII")
