"""The host side of Firecracker's vsock handshake, against real Unix-socket peers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.vsock import connect_vsock

pytest_plugins = ["fc_fake.fixtures"]

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(path: Path, peer: Peer) -> AsyncIterator[list[bytes]]:
    """A Unix-socket server that records the first line each client sends."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        try:
            await peer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


async def firecracker_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"OK 1073741824\n")
    while data := await reader.read(1024):
        writer.write(data.upper())
        await writer.drain()


async def test_handshake_then_bytes_flow(short_tmp: Path) -> None:
    path = short_tmp / "v.sock"
    async with serve(path, firecracker_like) as seen:
        reader, writer = await connect_vsock(path, 52, timeout=5)
        writer.write(b"hello\n")
        assert await reader.readline() == b"HELLO\n"
        writer.close()
        await writer.wait_closed()
    assert seen == [b"CONNECT 52\n"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(b"", "nothing (connection closed)"), (b"FAILURE port 52 not listening\n", "FAILURE port 52")],
)
async def test_refused_connection_says_what_firecracker_answered(
    short_tmp: Path, answer: bytes, expected: str
) -> None:
    async def refuse(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)

    path = short_tmp / "v.sock"
    async with serve(path, refuse):
        with pytest.raises(SmartVMError) as err:
            await connect_vsock(path, 52, timeout=5)
    assert err.value.code is ErrorCode.AGENT_UNAVAILABLE
    assert expected in err.value.message


async def test_hanging_peer_times_out(short_tmp: Path) -> None:
    async def hang(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        await reader.read()

    path = short_tmp / "v.sock"
    async with serve(path, hang):
        with pytest.raises(SmartVMError) as err:
            await connect_vsock(path, 52, timeout=0.3)
    assert err.value.code is ErrorCode.AGENT_UNAVAILABLE
    assert "no answer" in err.value.message


async def test_missing_socket(short_tmp: Path) -> None:
    with pytest.raises(SmartVMError) as err:
        await connect_vsock(short_tmp / "none.sock", 52, timeout=1)
    assert err.value.code is ErrorCode.AGENT_UNAVAILABLE
    assert "none.sock" in err.value.message
