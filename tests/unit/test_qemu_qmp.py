"""The QMP client against a real QEMU (``-machine none``: no guest, starts in milliseconds)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.qemu.qmp import QMPClient, QMPError

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svqmp", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qemu(sock_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = sock_dir / "qmp.sock"
    assert QEMU is not None
    proc = subprocess.Popen(
        [
            QEMU,
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield proc, sock
    proc.kill()
    proc.wait()


@pytest.fixture
async def client(qemu: tuple[subprocess.Popen[bytes], Path]) -> AsyncIterator[QMPClient]:
    c = await QMPClient.connect(qemu[1], timeout=10)
    yield c
    await c.close()


async def test_greeting_and_commands(client: QMPClient) -> None:
    assert client.greeting["QMP"]["version"]["qemu"]["major"] >= 7
    status = await client.execute("query-status")
    assert status["status"] in ("running", "prelaunch")
    version = await client.execute("query-version")
    assert version["qemu"] == client.greeting["QMP"]["version"]["qemu"]


async def test_concurrent_commands_get_their_own_replies(client: QMPClient) -> None:
    names = ["query-status", "query-version", "query-name", "query-kvm"] * 5
    replies = await asyncio.gather(*(client.execute(n) for n in names))
    for name, reply in zip(names, replies, strict=True):
        if name == "query-version":
            assert "qemu" in reply
        elif name == "query-kvm":
            assert "enabled" in reply
        elif name == "query-status":
            assert "status" in reply


async def test_errors_carry_the_command_and_qemus_description(client: QMPClient) -> None:
    with pytest.raises(QMPError) as err:
        await client.execute("no-such-command")
    assert err.value.code == ErrorCode.QMP_ERROR
    assert err.value.command == "no-such-command"
    assert err.value.error_class == "CommandNotFound"
    assert "no-such-command" in err.value.message and "not been found" in err.value.message
    with pytest.raises(QMPError) as err:
        await client.execute("migrate-set-parameters", {"max-bandwidth": "lots"})
    assert "max-bandwidth" in err.value.desc
    assert (await client.execute("query-status"))["status"]  # the session survives errors


async def test_events_are_queued(client: QMPClient) -> None:
    await client.execute("stop")
    event = await client.wait_event("STOP", timeout=5)
    assert event["event"] == "STOP" and "timestamp" in event
    await client.execute("cont")
    assert (await client.wait_event({"RESUME"}, timeout=5))["event"] == "RESUME"


async def test_quit_fails_waiting_commands_instead_of_hanging(
    client: QMPClient, qemu: tuple[subprocess.Popen[bytes], Path]
) -> None:
    with contextlib.suppress(SmartVMError):  # QEMU may close the socket before its reply
        await client.execute("quit")
    await asyncio.to_thread(qemu[0].wait, 10)
    with pytest.raises(SmartVMError) as err:
        await client.execute("query-status", timeout=5)
    assert err.value.code == ErrorCode.QMP_ERROR
    with raises_code(ErrorCode.QMP_ERROR):
        await client.wait_event("STOP", timeout=5)


async def test_connect_times_out_without_a_socket(sock_dir: Path) -> None:
    with pytest.raises(SmartVMError) as err:
        await QMPClient.connect(sock_dir / "missing.sock", timeout=0.3)
    assert err.value.code == ErrorCode.SOCKET_TIMEOUT


async def test_a_socket_that_is_not_qmp_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "fake.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"hello": "world"}\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    async with server:
        with pytest.raises(SmartVMError) as err:
            await QMPClient.connect(path, timeout=2)
    assert err.value.code == ErrorCode.QMP_ERROR
    assert "not a QMP greeting" in err.value.message


async def test_an_event_before_the_greeting_is_skipped(sock_dir: Path) -> None:
    """Seen once in CI: a starting QEMU's RESUME event arrived before the greeting."""
    path = sock_dir / "eventful.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\r\n')
        writer.write(b'{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}\r\n')
        await writer.drain()
        request = json.loads(await reader.readline())
        assert request["execute"] == "qmp_capabilities"
        writer.write(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\r\n")
        await writer.drain()
        await reader.read()  # until the client closes

    server = await asyncio.start_unix_server(handle, str(path))
    async with server:
        client = await QMPClient.connect(path, timeout=5)
        assert client.greeting["QMP"]["version"]["qemu"]["major"] == 7
        await client.close()


async def test_pass_fd_hands_qemu_the_descriptor(
    client: QMPClient, qemu: tuple[subprocess.Popen[bytes], Path], sock_dir: Path
) -> None:
    """Migration streams go to a descriptor QEMU gets over QMP (``getfd``), not through ``exec:cat``."""
    target = sock_dir / "stream"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        await asyncio.gather(client.pass_fd("stream", fd), client.execute("query-status"))
    finally:
        os.close(fd)
    fds = f"/proc/{qemu[0].pid}/fd"
    held = [os.readlink(f"{fds}/{n}") for n in os.listdir(fds)]
    assert str(target) in held  # QEMU holds its own copy
    await client.execute("closefd", {"fdname": "stream"})  # known to QEMU by that name
    with raises_code(ErrorCode.QMP_ERROR):
        await client.execute("closefd", {"fdname": "stream"})
