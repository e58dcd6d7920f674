"""Host side of Firecracker's vsock: connect to the device's Unix socket and ask for a guest port.

Firecracker forwards a host connection to guest port N after the line ``CONNECT N\\n`` and confirms
with ``OK <host port>\\n``; if nothing listens in the guest it closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError

_MAX_REPLY = 64


async def connect_vsock(
    uds_path: str | Path, port: int, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream connected to guest vsock ``port``, or AGENT_UNAVAILABLE saying what Firecracker answered."""
    path = str(uds_path)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    except (OSError, TimeoutError) as exc:
        raise SmartVMError(
            ErrorCode.AGENT_UNAVAILABLE,
            f"cannot connect to the vsock socket {path}: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}; is the VM running with a vsock device?",
        ) from exc
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError as exc:
        await _close(writer)
        raise SmartVMError(
            ErrorCode.AGENT_UNAVAILABLE,
            f"no answer to 'CONNECT {port}' on {path} within {timeout:g}s",
        ) from exc
    except OSError as exc:
        await _close(writer)
        raise SmartVMError(
            ErrorCode.AGENT_UNAVAILABLE, f"vsock handshake on {path} failed: {exc.strerror or exc}"
        ) from exc
    text = reply[:_MAX_REPLY].decode(errors="replace").strip()
    parts = text.split()
    if len(parts) != 2 or parts[0] != "OK" or not parts[1].isdigit():
        await _close(writer)
        answer = repr(text) if text else "nothing (connection closed)"
        raise SmartVMError(
            ErrorCode.AGENT_UNAVAILABLE,
            f"guest vsock port {port} refused the connection: Firecracker answered {answer}; "
            "is the guest agent listening?",
        )
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
