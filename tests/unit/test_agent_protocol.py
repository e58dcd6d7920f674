"""Framing, the hello frame, transports and robustness of the REAL guest agent against bad input."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from agent_harness import (  # noqa: F401
    GUEST_PY,
    PYTHON,
    WIRE_PY,
    AgentServer,
    agent_fixture,
    agent_server_fixture,
    pid_gone,
)

from smartvm.agent import AgentClient, protocol
from smartvm.agent import guest as g
from smartvm.agent.protocol import (
    DATA,
    E_CHANNEL,
    E_FILE,
    ERROR,
    HELLO,
    MAX_PAYLOAD,
    REQUEST,
    RESULT,
    Frame,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from smartvm.errors import ErrorCode, SmartVMError


# ---------------------------------------------------------------------------------------------- codec
def test_roundtrip_fed_one_byte_at_a_time() -> None:
    expected = [
        Frame(REQUEST, 7, {"op": "ping", "x": "é"}, b""),
        Frame(DATA, 7, {"s": "f"}, b"\0\xff" * 9),
        Frame(HELLO, 0, {}, b""),
    ]
    frames = [encode_frame(f.type, f.channel, f.header, f.payload) for f in expected]
    dec = FrameDecoder()
    out: list[Frame | FrameError] = []
    for byte in b"".join(frames):
        out += dec.feed(bytes([byte]))
    assert out == expected


def test_binary_payload_is_not_base64_bloated() -> None:
    payload = bytes(range(256)) * 1024
    frame = encode_frame(DATA, 1, {"s": "file"}, payload)
    assert len(frame) < len(payload) + 64


def test_garbage_is_reported_once_then_resynchronised() -> None:
    dec = FrameDecoder()
    out = dec.feed(b"garbage" * 100 + encode_frame(RESULT, 3, {"ok": True}))
    assert [type(x) for x in out] == [FrameError, Frame]
    assert isinstance(out[0], FrameError) and out[0].code == protocol.E_BAD_MAGIC
    assert out[1] == Frame(RESULT, 3, {"ok": True}, b"")


def test_oversized_frame_is_skipped_without_buffering() -> None:
    dec = FrameDecoder(max_payload=1024)
    big = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, DATA, 0, 5, 0, 5000)
    out = dec.feed(big + b"x" * 3000)
    assert out == [FrameError(protocol.E_TOO_LARGE, out[0].message, 5)] and "exceeds" in out[0].message
    out = dec.feed(b"x" * 2000 + encode_frame(RESULT, 5))
    assert out == [Frame(RESULT, 5, {}, b"")]


def test_bad_json_and_wrong_version_are_errors_for_their_channel() -> None:
    dec = FrameDecoder()
    bad_json = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, REQUEST, 0, 9, 3, 0) + b"{x]"
    not_object = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, REQUEST, 0, 10, 2, 0) + b"[]"
    future = encode_frame(REQUEST, 11, {"op": "ping"}, version=9)
    out = dec.feed(bad_json + not_object + future + encode_frame(HELLO, 0))
    assert [(type(x).__name__, x.channel) for x in out] == [
        ("FrameError", 9),
        ("FrameError", 10),
        ("FrameError", 11),
        ("Frame", 0),
    ]
    codes = [x.code for x in out[:3] if isinstance(x, FrameError)]
    assert codes == [protocol.E_BAD_JSON, protocol.E_BAD_JSON, protocol.E_VERSION]


def test_encode_refuses_oversized_frames() -> None:
    with pytest.raises(ValueError, match="too large"):
        encode_frame(DATA, 1, None, b"x" * (MAX_PAYLOAD + 1))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_wire_module_is_stdlib_only_and_the_agent_imports_nothing_else_of_smartvm() -> None:
    wire = _imports(WIRE_PY)
    assert {m.split(".")[0] for m in wire} - {"__future__"} <= set(sys.stdlib_module_names), wire
    agent = _imports(GUEST_PY) - {"wire", "smartvm.agent.wire"}
    assert {m.split(".")[0] for m in agent} - {"__future__"} <= set(sys.stdlib_module_names), agent


def test_agent_runs_from_its_guest_layout_without_smartvm(tmp_path: Path) -> None:
    """In the guest, agent.py and wire.py sit side by side in /opt/smartvm and smartvm is not installed."""
    shutil.copy(GUEST_PY, tmp_path / "agent.py")
    shutil.copy(WIRE_PY, tmp_path / "wire.py")
    code = (  # like run-agent, with smartvm made unimportable
        "import sys; sys.modules['smartvm'] = None; sys.path[0] = sys.argv[1]; import agent; "
        "sys.exit(agent.main(['--version']))"
    )
    out = subprocess.run([PYTHON, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip() == f"smartvm-agent {protocol.AGENT_VERSION} protocol {protocol.PROTOCOL_VERSION}"
    )


def test_host_protocol_does_not_load_the_guest_program() -> None:
    code = "import sys, smartvm.agent.client; print('smartvm.agent.guest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_flag() -> None:
    out = subprocess.run([PYTHON, str(GUEST_PY), "--version"], capture_output=True, text=True, check=True)
    assert f"protocol {protocol.PROTOCOL_VERSION}" in out.stdout


# ------------------------------------------------------------------------------------ against the agent
class RawConn:
    """A bare stream to the agent, for sending bytes no well-behaved client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.dec, self.pending = reader, writer, FrameDecoder(), []  # type: ignore[var-annotated]

    async def next(self) -> Frame | FrameError:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), 30)
            assert data, "agent closed the connection"
            self.pending += self.dec.feed(data)
        return self.pending.pop(0)  # type: ignore[no-any-return]

    async def next_on(self, channel: int) -> Frame:
        while True:
            item = await self.next()
            if isinstance(item, Frame) and item.channel == channel:
                return item

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def ping(self, channel: int) -> None:
        await self.send(encode_frame(REQUEST, channel, {"op": "ping"}))
        assert (await self.next_on(channel)).type == RESULT


@pytest.fixture
async def raw(agent_server: AgentServer) -> RawConn:
    client = agent_server.client()
    await client.wait_ready(30)  # the server is up
    await client.close()
    conn = RawConn(*await agent_server.open_stream(10))
    hello = await conn.next()
    assert isinstance(hello, Frame) and hello.type == HELLO
    return conn


async def test_hello_announces_version_pid_boot_time(raw: RawConn, agent_server: AgentServer) -> None:
    await raw.send(encode_frame(HELLO, 0))
    hello = await raw.next()
    assert isinstance(hello, Frame) and hello.type == HELLO and hello.channel == 0
    h = hello.header
    assert h["protocol"] == protocol.PROTOCOL_VERSION and h["agent_version"] == protocol.AGENT_VERSION
    assert h["pid"] == agent_server.proc.pid and h["boot_time"] > 0 and h["transport"] == "unix"


async def test_garbage_gets_an_error_and_the_agent_keeps_serving(raw: RawConn) -> None:
    await raw.send(b"\x00this is not a frame\xff" * 50)
    err = await raw.next()
    assert isinstance(err, Frame) and err.type == ERROR and err.header["code"] == protocol.E_BAD_MAGIC
    await raw.ping(1)


async def test_oversized_request_gets_an_error_and_the_agent_keeps_serving(raw: RawConn) -> None:
    head = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, REQUEST, 0, 4, 2, MAX_PAYLOAD + 10)
    await raw.send(head + b"{}" + b"z" * (MAX_PAYLOAD + 10))
    err = await raw.next_on(4)
    assert err.type == ERROR and err.header["code"] == protocol.E_TOO_LARGE
    await raw.ping(5)


async def test_oversized_data_aborts_only_its_request(raw: RawConn, tmp_path: Path) -> None:
    await raw.send(encode_frame(REQUEST, 3, {"op": "file_write", "path": str(tmp_path / "f")}))
    head = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, DATA, 0, 3, 0, MAX_PAYLOAD + 1)
    await raw.send(head + b"q" * (MAX_PAYLOAD + 1))
    err = await raw.next_on(3)
    assert err.type == ERROR and err.header["code"] == protocol.E_TOO_LARGE
    await raw.ping(6)
    assert os.listdir(tmp_path) == []  # the half-written temp file is gone


@pytest.mark.parametrize(
    ("frame", "channel", "code"),
    [
        (protocol.HEADER.pack(protocol.MAGIC, 1, REQUEST, 0, 2, 5, 0) + b"{nope", 2, protocol.E_BAD_JSON),
        (encode_frame(REQUEST, 2, {"op": "launch_missiles"}), 2, protocol.E_UNKNOWN_OP),
        (encode_frame(REQUEST, 2, {"nop": 1}), 2, protocol.E_UNKNOWN_OP),
        (encode_frame(REQUEST, 0, {"op": "ping"}), 0, protocol.E_CHANNEL),
        (encode_frame(DATA, 2, {"s": "stdin"}, b"x"), 2, protocol.E_CHANNEL),
        (encode_frame(99, 2, {}), 2, protocol.E_BAD_FRAME),
        (encode_frame(REQUEST, 2, {"op": "ping"}, version=2), 2, protocol.E_VERSION),
        (encode_frame(REQUEST, 2, {"op": "exec", "cmd": 42}), 2, protocol.E_BAD_REQUEST),
        (encode_frame(REQUEST, 2, {"op": "exec", "cmd": ["id"], "timeout": "x"}), 2, protocol.E_BAD_REQUEST),
        (encode_frame(REQUEST, 2, {"op": "file_read", "path": 3}), 2, protocol.E_BAD_REQUEST),
        (encode_frame(REQUEST, 2, {"op": "set_time", "time": "noon"}), 2, protocol.E_BAD_REQUEST),
        (encode_frame(REQUEST, 2, {"op": "proc_signal", "pid": 1}), 2, protocol.E_NO_PROCESS),
    ],
)
async def test_bad_requests_get_error_frames(raw: RawConn, frame: bytes, channel: int, code: str) -> None:
    await raw.send(frame)
    err = await raw.next_on(channel)
    assert err.type == ERROR and err.header["code"] == code, err.header
    await raw.ping(8)


async def test_client_maps_agent_errors_to_stable_codes(agent: AgentClient) -> None:
    with pytest.raises(SmartVMError) as exc:
        await agent._call("no_such_op")
    assert exc.value.code == ErrorCode.AGENT_PROTOCOL_ERROR and "no_such_op" in exc.value.message
    with pytest.raises(SmartVMError) as exc:
        await agent.exec("true", user="no-such-user-here")
    assert exc.value.code == ErrorCode.INVALID_ARGUMENT


async def test_stdio_transport() -> None:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        str(GUEST_PY),
        "--stdio",
        "--dry-run-system",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    opened = 0

    async def open_stream(timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal opened
        opened += 1
        assert proc.stdout is not None and proc.stdin is not None
        return proc.stdout, proc.stdin

    client = AgentClient(open_stream)
    try:
        info = await client.wait_ready(30)
        assert info.transport == "stdio"
        assert (await client.exec(["echo", "over stdio"])).stdout == b"over stdio\n"
    finally:
        await client.close()
        assert await asyncio.wait_for(proc.wait(), 30) == 0  # EOF on stdin ends the agent
    assert opened == 1


async def test_dropped_stream_is_reopened_once(agent_server: AgentServer) -> None:
    client = agent_server.client()
    try:
        await client.wait_ready(30)
        assert (await client.exec("echo one")).stdout == b"one\n"
        agent_server.writers[-1].transport.abort()  # the virtio-serial host side went away
        await asyncio.sleep(0)
        assert (await client.exec("echo two")).stdout == b"two\n"
        assert len(agent_server.writers) == 2
    finally:
        await client.close()


async def test_unreachable_agent_raises_timeout() -> None:
    async def never(timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise ConnectionRefusedError("nobody home")

    client = AgentClient(never)
    with pytest.raises(SmartVMError) as exc:
        await client.wait_ready(0.5)
    assert exc.value.code == ErrorCode.AGENT_TIMEOUT and "nobody home" in exc.value.message
    with pytest.raises(SmartVMError) as exc:
        await client.health()
    assert exc.value.code == ErrorCode.AGENT_UNAVAILABLE


async def _answer_every_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake agent's loop: every REQUEST gets a RESULT {"time": 5.0}, until the client hangs up."""
    dec = FrameDecoder()
    while data := await reader.read(65536):
        for f in dec.feed(data):
            if isinstance(f, Frame) and f.type == REQUEST:
                writer.write(encode_frame(RESULT, f.channel, {"time": 5.0}))
    writer.close()


async def test_stale_bytes_before_hello_are_ignored(tmp_path: Path) -> None:
    """A virtio-serial reconnect can deliver the tail of an old frame first: the client resyncs."""
    hello = {
        "protocol": protocol.PROTOCOL_VERSION,
        "agent_version": "x",
        "pid": 1,
        "started": 1.0,
        "boot_time": 1.0,
        "transport": "fake",
    }

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"old payload tail" + encode_frame(RESULT, 77, {"stale": True})[:10])
        writer.write(encode_frame(HELLO, 0, hello))
        await _answer_every_request(reader, writer)

    server = await asyncio.start_unix_server(serve, str(tmp_path / "s"))
    client = AgentClient(lambda t: asyncio.open_unix_connection(str(tmp_path / "s")))
    try:
        info = await client.wait_ready(10)
        assert info.transport == "fake"
        assert (await client._call("ping"))["time"] == 5.0
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_bytes_that_arrived_before_the_client_took_the_stream_are_not_lost(tmp_path: Path) -> None:
    """The client reads the stream's transport directly once it has it: what the stream's reader
    buffered before (here the agent's only hello) is decoded first, not dropped."""
    hello = {"protocol": protocol.PROTOCOL_VERSION, "pid": 1, "started": 1.0, "transport": "early"}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_frame(HELLO, 0, hello))  # said once, at connect; HELLO requests go unanswered
        await _answer_every_request(reader, writer)

    async def open_late(timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s"))
        await asyncio.sleep(0.3)  # the hello is in the reader's buffer by now
        return reader, writer

    server = await asyncio.start_unix_server(serve, str(tmp_path / "s"))
    client = AgentClient(open_late)
    try:
        assert (await client.wait_ready(0.9)).transport == "early"  # a lost hello: re-asked after 1 s
        assert (await client._call("ping"))["time"] == 5.0
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def test_frame_header_layout_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "agent-protocol.md").read_text()
    assert protocol.MAGIC.decode() in doc and str(protocol.HEADER_SIZE) in doc
    for name in protocol.FRAME_TYPES.values():
        assert name.upper() in doc
    assert json.dumps(protocol.AGENT_VSOCK_PORT) in doc
    assert struct.calcsize(protocol.HEADER.format) == protocol.HEADER_SIZE


async def test_host_hello_starts_a_new_session_and_cancels_the_old_one(raw: RawConn) -> None:
    """On virtio-serial a fast reconnect may not read as EOF: the new host's HELLO still resets."""
    await raw.send(encode_frame(REQUEST, 9, {"op": "exec", "cmd": "echo $$; exec sleep 300"}))
    while True:
        item = await raw.next_on(9)
        if item.type == DATA:
            pid = int(item.payload)
            break
    await raw.send(encode_frame(HELLO, 0))
    while (await raw.next()).type != HELLO:  # type: ignore[union-attr]
        pass
    assert pid_gone(pid)
    await raw.send(encode_frame(REQUEST, 9, {"op": "ping"}))  # the old channel id is free again
    assert (await raw.next_on(9)).type == RESULT


def _recording_conn() -> tuple[g.Conn, list[Frame]]:
    """A guest Conn that decodes and keeps what it writes."""
    written: list[Frame] = []
    dec = FrameDecoder()

    def write(parts: list[bytes]) -> None:
        for item in dec.feed(b"".join(parts)):
            assert isinstance(item, Frame)
            written.append(item)

    return g.Conn(lambda n: b"", write, lambda: None, threading.Lock(), "test"), written


def _answer(conn: g.Conn, cid: int) -> None:
    ch = g.Channel(conn, cid)
    conn.channels[cid] = ch
    ch.fail(E_FILE, "no")


def _data(cid: int) -> Frame:
    return Frame(DATA, cid, {"s": "file"}, b"late")


def test_data_after_the_answer_is_dropped_and_only_for_recent_answers() -> None:
    """Else each late frame gets a bad_channel error, which can even reach the host before the
    answer itself (a failed file write read as a protocol error)."""
    conn, written = _recording_conn()
    agent = g.Agent(dry_run_system=True)
    for cid in range(1, g.ANSWERED_KEPT + 2):
        _answer(conn, cid)
    written.clear()
    for cid in (0, 1, g.ANSWERED_KEPT, g.ANSWERED_KEPT + 1, g.ANSWERED_KEPT + 2):
        agent.dispatch(conn, _data(cid))
    # 0 is never a request, 1 was answered longest ago, the last one never opened
    assert [(f.channel, f.header["code"]) for f in written] == [
        (0, E_CHANNEL),
        (1, E_CHANNEL),
        (g.ANSWERED_KEPT + 2, E_CHANNEL),
    ]


def test_data_queued_on_a_finished_channel_is_dropped() -> None:
    conn, written = _recording_conn()
    ch = g.Channel(conn, 7)
    conn.channels[7] = ch
    ch.closed = True  # answered, its id not yet forgotten
    g.Agent(dry_run_system=True).dispatch(conn, _data(7))
    assert written == [] and ch.inbox.empty()


async def test_a_failed_write_answers_once_however_much_data_follows(raw: RawConn, tmp_path: Path) -> None:
    """The host streams a write's data without waiting: the agent's one answer is the file error,
    and the DATA that arrives after it is dropped, not answered."""
    (tmp_path / "file").write_text("x")
    target = str(tmp_path / "file" / "under-a-file")
    frames = [encode_frame(REQUEST, 9, {"op": "file_write", "path": target}, b"x" * 65536)]
    frames += [encode_frame(DATA, 9, {"s": "file"}, b"x" * 65536) for _ in range(31)]
    frames.append(encode_frame(DATA, 9, {"s": "file", "eof": True}, b"x"))
    await raw.send(b"".join(frames))
    await raw.send(encode_frame(REQUEST, 10, {"op": "ping"}))
    answers, pinged = [], False
    while not (pinged and answers):  # a bad_channel error would go out before the ping is read
        item = await raw.next()
        assert isinstance(item, Frame)
        if item.channel == 10:
            pinged = True
        else:
            answers.append((item.type, item.header.get("code")))
    assert answers == [(ERROR, E_FILE)]


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_an_exec_that_ends_before_its_stdin_leaves_no_thread_behind(
    raw: RawConn, agent_server: AgentServer
) -> None:
    """The client stops sending stdin once the command has answered (it may never send the eof): the
    agent's stdin feeder of that exec must end with it, not wait for more data forever."""
    await raw.ping(1)
    before = _threads(agent_server.proc.pid)
    for cid in range(10, 30):
        await raw.send(encode_frame(REQUEST, cid, {"op": "exec", "cmd": ["true"], "stdin": True}))
        while (await raw.next_on(cid)).type != RESULT:
            pass
    await raw.ping(2)
    # finished requests leave at most the idle workers the agent keeps (8), not one thread per exec
    assert _threads(agent_server.proc.pid) - before <= 8


@pytest.mark.parametrize(
    ("cmdline", "count"),
    [
        ("console=ttyS0 smartvm.agent_ports=8 quiet\n", 8),
        ("smartvm.agent_ports=1", 1),
        ("console=ttyS0", 0),
        ("smartvm.agent_ports=x smartvm.agent_ports=-2 smartvm.agent_ports=", 0),
        ("smartvm.agent_ports=\u00b2", 0),  # a digit to str.isdigit, not to int()
    ],
)
def test_the_agent_reads_how_many_ports_the_host_made(cmdline: str, count: int) -> None:
    """With the count the agent stops looking for more ports once it serves them all (the native
    agent's twin: TestAnnouncedPortCount)."""
    assert g.announced_ports(cmdline) == count
