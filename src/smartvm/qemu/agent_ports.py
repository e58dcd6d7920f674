"""The QEMU engine's agent channel: several virtio-serial ports, each serving one host client.

A virtio-serial port's chardev socket serves one host connection at a time: QEMU accepts the next one
only after the current one closes, so a second client of the same port would wait silently (a second
``smartvm exec`` on a detached VM hung for as long as the first ran). A VM therefore gets
:data:`AGENT_PORTS` ports, the guest agent serves all of them, and a host client claims a free one by a
non-blocking ``flock`` on that port's lock file in the runtime dir. The claim lasts as long as the
client's connection; the kernel drops it when the holding process dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import weakref
from pathlib import Path

from smartvm.errors import AgentBusyError, ErrorCode, SmartVMError
from smartvm.host.runtime import VMRuntime

#: virtio-serial name of port 0 (what agents older than multi-port serve); port N is ``smartvm.agent.N``.
#: The guest's ``wire.VIRTIO_PORT_NAME`` (a unit test keeps them equal; engines do not import the agent).
AGENT_PORT_NAME = "smartvm.agent"
#: agent ports per VM: how many host clients (CLI processes, library clients) can talk to it at once
AGENT_PORTS = 8
#: what a VM started, detached or snapshotted before multi-port had (one port, ``max_ports=2``)
LEGACY_AGENT_PORTS = 1
MAX_AGENT_PORTS = 31  # port 0 of the virtio-serial bus is reserved; max_ports counts it
_READ_LIMIT = 1 << 20  # StreamReader buffer: below it asyncio keeps reading the socket


def port_name(index: int) -> str:
    return AGENT_PORT_NAME if index == 0 else f"{AGENT_PORT_NAME}.{index}"


def port_socket(runtime: VMRuntime, index: int) -> Path:
    """The host-side chardev socket of port ``index`` (port 0 keeps the historical ``agent.sock``)."""
    return runtime.agent_socket if index == 0 else runtime.dir / f"agent.{index}.sock"


def _lock_path(runtime: VMRuntime, index: int) -> Path:
    return runtime.dir / f"agent.{index}.lock"


def check_port_count(value: object, where: str, code: ErrorCode) -> int:
    """A port count read from a snapshot manifest or a VM record (absent: the legacy single port)."""
    if value is None:
        return LEGACY_AGENT_PORTS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AGENT_PORTS:
        raise SmartVMError(
            code,
            f"{where} says the VM has {value!r} agent ports; expected 1 to {MAX_AGENT_PORTS}",
        )
    return value


def port_args(runtime: VMRuntime, count: int) -> list[str]:
    """The QEMU options for the virtio-serial bus and its ``count`` agent ports (in port order)."""
    args = ["-device", f"virtio-serial-device,id=vser0,max_ports={count + 1}"]
    for index in range(count):
        chardev = "agent" if index == 0 else f"agent{index}"
        path = str(port_socket(runtime, index)).replace(",", ",,")
        args += [
            "-chardev",
            f"socket,id={chardev},path={path},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={chardev},name={port_name(index)}",
        ]
    return args


class PortClaim:
    """The exclusive use of one agent port by this process, until :meth:`release` (or garbage
    collection, or the process's death)."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._release = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        self._release()

    @property
    def held(self) -> bool:
        return self._release.alive


def claim_port(runtime: VMRuntime, count: int) -> PortClaim:
    """Claim the first free port of ``count``; AgentBusyError (AGENT_UNAVAILABLE) when all are held."""
    for index in range(count):
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(_lock_path(runtime, index), flags, 0o600)
        except OSError as exc:
            raise AgentBusyError(
                ErrorCode.AGENT_UNAVAILABLE,
                f"cannot open the agent port lock {_lock_path(runtime, index)}: {exc.strerror}; "
                "is the VM still running?",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        return PortClaim(index, fd)
    raise AgentBusyError(
        ErrorCode.AGENT_UNAVAILABLE,
        f"all {count} agent channels of VM {runtime.vm_id!r} are in use by other clients (other "
        "`smartvm exec`/`cp` commands or programs attached to it); wait until one of them ends and retry",
    )


class _ClaimedProtocol(asyncio.StreamReaderProtocol):
    """Releases the port claim once the connection is really closed, so the next holder's connection
    is the one QEMU accepts."""

    def __init__(self, reader: asyncio.StreamReader, claim: PortClaim) -> None:
        super().__init__(reader)
        self._claim = claim

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._claim.release()


async def open_claimed(path: Path, claim: PortClaim) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a port's socket; the claim is released when the connection is lost or closed."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
    protocol = _ClaimedProtocol(reader, claim)
    transport, _ = await loop.create_unix_connection(lambda: protocol, str(path))
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
