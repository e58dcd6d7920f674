"""A small asyncio client for QEMU's QMP protocol over a Unix socket.

One reader task owns the socket: replies are matched to their command by ``id`` and events go to a
queue, so commands and event waits can interleave. Every failure is a SmartVMError(QMP_ERROR) naming
the command and carrying QEMU's own ``desc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smartvm.errors import ErrorCode, SmartVMError

_LINE_LIMIT = 16 << 20  # query-* replies can be large


_EVENTS_BEFORE_GREETING = 16  # events skipped while waiting for the greeting; more is not QMP


class QMPError(SmartVMError):
    """QEMU answered a command with an error; ``error_class`` is QEMU's class (e.g. GenericError)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(ErrorCode.QMP_ERROR, f"QMP {command} failed: {desc}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.command, self.error_class, self.desc))


class QMPClient:
    """A connected, capabilities-negotiated QMP session. Use :meth:`connect`."""

    def __init__(self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self.greeting: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self._closed_reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    # --- connection ----------------------------------------------------------------------
    @classmethod
    async def connect(cls, path: Path, timeout: float = 5.0) -> QMPClient:
        """Connect (retrying while QEMU creates the socket), read the greeting, negotiate capabilities."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=_LINE_LIMIT)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise SmartVMError(
                    ErrorCode.SOCKET_TIMEOUT,
                    f"QMP socket {path} did not accept connections within {timeout:.1f}s ({last})",
                )
            await asyncio.sleep(0.002)  # QEMU creates the socket ~20 ms after it starts: do not add 10
        client = cls(path, reader, writer)
        try:
            await asyncio.wait_for(client._handshake(), max(deadline - time.monotonic(), 0.5))
        except BaseException as exc:
            await client.close()
            if isinstance(exc, TimeoutError):
                raise SmartVMError(ErrorCode.SOCKET_TIMEOUT, f"QMP greeting on {path} timed out") from exc
            raise
        return client

    async def _handshake(self) -> None:
        for _ in range(_EVENTS_BEFORE_GREETING + 1):
            line = await self._reader.readline()
            if not line:
                raise SmartVMError(ErrorCode.QMP_ERROR, f"QMP socket {self.path} closed before the greeting")
            greeting = self._decode(line)
            # an event can come first (a RESUME of a starting QEMU was seen once in CI): not ours to read
            if "event" not in greeting:
                break
        if "QMP" not in greeting:
            raise SmartVMError(ErrorCode.QMP_ERROR, f"not a QMP greeting on {self.path}: {line[:200]!r}")
        self.greeting = greeting
        self._task = asyncio.create_task(self._read_loop(), name=f"qmp-reader:{self.path}")
        await self.execute("qmp_capabilities")

    @property
    def connected(self) -> bool:
        return self._closed_reason is None and self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Close the socket and fail any command still waiting. Idempotent."""
        self._fail_pending("the QMP client was closed")
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # --- commands and events ---------------------------------------------------------------
    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = 30.0,
        *,
        fds: Sequence[int] = (),
    ) -> Any:
        """Run one QMP command and return its ``return`` value; ``fds`` go with it (SCM_RIGHTS)."""
        if self._closed_reason is not None:
            raise SmartVMError(ErrorCode.QMP_ERROR, f"QMP {command} not sent: {self._closed_reason}")
        cmd_id = f"smartvm-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments:
            message["arguments"] = arguments
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cmd_id] = (command, future)
        try:
            data = json.dumps(message).encode() + b"\n"
            if fds:
                await self._send_with_fds(data, fds)
            else:
                self._writer.write(data)
                await self._writer.drain()
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as exc:
            raise SmartVMError(
                ErrorCode.QMP_ERROR, f"QMP {command} got no reply within {timeout:.1f}s"
            ) from exc
        except (ConnectionError, OSError) as exc:
            raise SmartVMError(ErrorCode.QMP_ERROR, f"QMP {command} failed: connection lost ({exc})") from exc
        except SmartVMError as exc:
            if isinstance(exc, QMPError) or exc.code != ErrorCode.QMP_ERROR:
                raise
            raise SmartVMError(ErrorCode.QMP_ERROR, f"QMP {command} failed: {exc.message}") from exc
        finally:
            self._pending.pop(cmd_id, None)

    async def pass_fd(self, name: str, fd: int, timeout: float | None = 30.0) -> None:
        """Hand QEMU a copy of ``fd`` under ``name`` (``getfd`` with the descriptor in SCM_RIGHTS), for
        a later ``fd:name`` URI: QEMU then reads or writes the file itself, no helper process."""
        await self.execute("getfd", {"fdname": name}, timeout, fds=[fd])

    async def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send ``data`` with ``fds`` attached to its first byte: nothing may be queued before it."""
        transport = self._writer.transport
        for _ in range(1000):
            if not transport.get_write_buffer_size() or transport.is_closing():
                break
            await asyncio.sleep(0.001)
        sock = self._writer.get_extra_info("socket")
        if sock is None or transport.is_closing() or transport.get_write_buffer_size():
            raise SmartVMError(ErrorCode.QMP_ERROR, "the QMP socket is busy or gone")
        with sock.dup() as dup:  # non-blocking like it; the drained buffer has room
            socket.send_fds(dup, [data], list(fds))

    async def wait_event(self, names: str | set[str], timeout: float) -> dict[str, Any]:
        """The next event whose name is in ``names`` (earlier, other events are dropped)."""
        wanted = {names} if isinstance(names, str) else names
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SmartVMError(
                    ErrorCode.QMP_ERROR, f"no QMP event {sorted(wanted)} within {timeout:.1f}s"
                )
            if self._closed_reason is not None and self.events.empty():
                raise SmartVMError(
                    ErrorCode.QMP_ERROR, f"waiting for {sorted(wanted)}: {self._closed_reason}"
                )
            getter = asyncio.ensure_future(self.events.get())
            closed = asyncio.ensure_future(self._wait_closed())
            done, _ = await asyncio.wait(
                {getter, closed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            closed.cancel()
            if getter in done:
                event = getter.result()
                if event.get("event") in wanted:
                    return event
            else:
                getter.cancel()

    async def _wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(self._task)

    # --- reader ---------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reason = "QEMU closed the QMP connection"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = self._decode(line)
                if "event" in message:
                    self.events.put_nowait(message)
                    continue
                command, future = self._pending.get(str(message.get("id")), ("", None))
                if future is None or future.done():
                    continue
                if "error" in message:
                    err = message["error"]
                    error = QMPError(command, str(err.get("class", "")), str(err.get("desc", "")))
                    future.set_exception(error)
                else:
                    future.set_result(message.get("return"))
        except (ConnectionError, OSError) as exc:
            reason = f"QMP connection lost: {exc}"
        except SmartVMError as exc:
            reason = exc.message
        finally:
            self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for _command, future in self._pending.values():
            if not future.done():
                future.set_exception(SmartVMError(ErrorCode.QMP_ERROR, reason))

    @staticmethod
    def _decode(line: bytes) -> dict[str, Any]:
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise SmartVMError(ErrorCode.QMP_ERROR, f"malformed QMP message: {line[:200]!r}") from exc
        if not isinstance(value, dict):
            raise SmartVMError(ErrorCode.QMP_ERROR, f"unexpected QMP message: {line[:200]!r}")
        return value
