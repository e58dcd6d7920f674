"""One Firecracker process: spawn it, wait for its API socket, end it, always reap it.

The guest's serial console is Firecracker's stdout, so stdout goes to the VM's console log; the
VMM's own log (``--log-path``) and stderr go to the engine log, whose tail explains early exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError

_POLL_S = 0.01
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class FirecrackerCommand:
    """The command line of one Firecracker process (Firecracker's own flag names)."""

    binary: Path
    api_socket: Path | None
    vm_id: str
    log_path: Path | None = None
    level: str | None = None
    metrics_path: Path | None = None
    boot_timer: bool = False
    config_file: Path | None = None
    no_api: bool = False
    netns: str | None = None
    extra_args: Sequence[str] = field(default_factory=tuple)

    def argv(self) -> list[str]:
        args = [str(self.binary), "--id", self.vm_id]
        if self.no_api:
            if self.config_file is None:
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "--no-api needs a config file (config_file)")
            args.append("--no-api")
        elif self.api_socket is not None:
            args += ["--api-sock", str(self.api_socket)]
        if self.config_file is not None:
            args += ["--config-file", str(self.config_file)]
        if self.log_path is not None:
            args += ["--log-path", str(self.log_path)]
        if self.level is not None:
            args += ["--level", self.level]
        if self.metrics_path is not None:
            args += ["--metrics-path", str(self.metrics_path)]
        if self.boot_timer:
            args.append("--boot-timer")
        args += list(self.extra_args)
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *args]
        return args


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it is missing)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class FirecrackerProcess:
    """A spawned Firecracker. :meth:`stop` and :meth:`kill` are idempotent and always reap."""

    def __init__(self, command: FirecrackerCommand, *, console_log: Path, engine_log: Path) -> None:
        self.command = command
        self.console_log = console_log
        self.engine_log = engine_log
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def is_alive(self) -> bool:
        if self._proc is None or self._proc.returncode is not None:
            return False
        # The child watcher updates returncode lazily; ask the kernel without reaping.
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    async def start(self, socket_timeout: float) -> None:
        """Spawn and, unless ``--no-api``, wait until the API socket accepts connections."""
        if self._proc is not None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "this Firecracker process was already started")
        api_socket = self.command.api_socket
        if api_socket is not None:
            api_socket.unlink(missing_ok=True)  # Firecracker refuses to bind over a stale socket
        for log in (self.console_log, self.engine_log):
            log.touch()
        argv = self.command.argv()
        try:
            with self.console_log.open("ab") as out, self.engine_log.open("ab") as err:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
                )
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.BINARY_NOT_FOUND if isinstance(exc, FileNotFoundError | PermissionError)
                else ErrorCode.FIRECRACKER_EXITED,
                f"cannot run {argv[0]}: {exc.strerror or exc}; check firecracker_binary_path",
            ) from exc
        if api_socket is None or self.command.no_api:
            return
        try:
            await self._wait_for_socket(api_socket, socket_timeout)
        except BaseException:
            await self.kill()
            raise

    async def _wait_for_socket(self, path: Path, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None or not self.is_alive():
                code = await self._proc.wait()
                raise SmartVMError(
                    ErrorCode.FIRECRACKER_EXITED,
                    f"firecracker exited with code {code} before its API socket appeared; "
                    f"last log lines:\n{tail(self.engine_log) or '(empty log)'}",
                )
            if socket_accepts(path):
                return
            if time.monotonic() >= deadline:
                raise SmartVMError(
                    ErrorCode.SOCKET_TIMEOUT,
                    f"firecracker's API socket {path} did not appear within {timeout:g}s; "
                    f"last log lines:\n{tail(self.engine_log) or '(empty log)'}",
                )
            await asyncio.sleep(_POLL_S)

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit; its exit code, or None after ``timeout``."""
        if self._proc is None:
            return None
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            return None

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps. The exit code (None if never started)."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._signal(signal.SIGTERM)
            if await self.wait(timeout) is None:
                self._signal(signal.SIGKILL)
        code = await self._proc.wait()
        self._cleanup_socket()
        return code

    async def kill(self) -> None:
        """SIGKILL at once and reap."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._signal(signal.SIGKILL)
        await self._proc.wait()
        self._cleanup_socket()

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)

    def _cleanup_socket(self) -> None:
        if self.command.api_socket is not None:
            self.command.api_socket.unlink(missing_ok=True)


def socket_accepts(path: Path) -> bool:
    """Whether a Unix socket at ``path`` accepts a connection right now."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
