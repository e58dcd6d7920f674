"""The QEMU process of one VM: spawn (inside the VM's network namespace when it has one), watch, reap.

QEMU's stdout and stderr go to the engine log; errors quote its tail and the tail of the guest
console, because that is where a failed boot or a guest panic explains itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import BinaryIO

from smartvm.errors import ErrorCode, SmartVMError

TAIL_BYTES = 4096


def tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a text file (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    if size > limit and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.strip()


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # closed by the caller once QEMU holds its own descriptor


class QemuProcess:
    """One running ``qemu-system-*`` process and its logs."""

    def __init__(self, proc: asyncio.subprocess.Process, engine_log: Path, console_log: Path) -> None:
        self.proc = proc
        self.engine_log = engine_log
        self.console_log = console_log

    @classmethod
    async def spawn(cls, argv: list[str], *, engine_log: Path, console_log: Path,
                    netns: str | None = None) -> QemuProcess:
        """Start QEMU. With ``netns`` it runs inside that network namespace (``ip netns exec``
        execs QEMU in place, so the pid we hold is QEMU's)."""
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        with _open_log(engine_log) as log:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.BINARY_NOT_FOUND if isinstance(exc, FileNotFoundError)
                    else ErrorCode.BOOT_FAILED,
                    f"cannot start {argv[0]}: {exc.strerror or exc}",
                ) from exc
        return cls(proc, engine_log, console_log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if QEMU still runs after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout)
        except TimeoutError:
            return None

    async def kill(self) -> None:
        """SIGKILL and reap. Idempotent."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    def describe_exit(self, what: str) -> str:
        """A message for ``what`` failing because QEMU ended, with both logs' tails."""
        code = self.proc.returncode
        status = "still running" if code is None else (
            f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        )
        parts = [f"{what}: QEMU {status}"]
        engine = tail(self.engine_log, 2048)
        if engine:
            parts.append(f"QEMU said:\n{engine}")
        console = tail(self.console_log)
        parts.append(f"guest console (last lines):\n{console}" if console else "the guest console is empty")
        return "\n".join(parts)

    def exited_error(self, what: str, code: ErrorCode = ErrorCode.QEMU_EXITED) -> SmartVMError:
        return SmartVMError(code, self.describe_exit(what))
