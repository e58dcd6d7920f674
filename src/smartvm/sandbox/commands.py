"""Commands in a sandbox: one-shot runs with their result, background runs with a handle.

A string runs through ``bash -l -c`` (so pipes, ``cd`` and the user's profile work), a list runs
directly. Commands run as the sandbox user (``user``, in ``/home/user``) unless told otherwise, with
the sandbox's environment plus the command's own. A non-zero exit is a result, not an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

from smartvm.agent.client import ExecResult, ExecTimeoutError, OutputCallback, ProcessInfo
from smartvm.agent.protocol import AgentOpError
from smartvm.agent.wire import E_NO_PROCESS
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.settings import DEFAULT_USER

if TYPE_CHECKING:
    from smartvm.vm import MicroVM

DEFAULT_COMMAND_TIMEOUT_S = 60.0
VMGetter = Callable[[], Awaitable["MicroVM"]]


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. ``stdout``/``stderr`` are text (bytes in ``*_bytes``, undecodable bytes
    replaced); ``*_truncated`` say that output beyond the limit was dropped."""

    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    pid: int | None = None
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def of(cls, r: ExecResult) -> CommandResult:
        return cls(
            exit_code=r.exit_code,
            stdout=r.stdout.decode(errors="replace"),
            stderr=r.stderr.decode(errors="replace"),
            duration_s=r.duration,
            pid=r.pid,
            stdout_bytes=r.stdout,
            stderr_bytes=r.stderr,
            stdout_truncated=r.stdout_truncated,
            stderr_truncated=r.stderr_truncated,
        )


def command_argv(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "the command is empty")
        return ["/bin/bash", "-l", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "a command list must be non-empty strings")
    return argv


class CommandHandle:
    """A command running in the background: it outlives this object and the manager's process."""

    def __init__(self, vm: VMGetter, pid: int) -> None:
        self._vm = vm
        self.pid = pid

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Its result once it exits (with the output the guest kept); EXEC_TIMEOUT if still running."""
        vm = await self._vm()
        return CommandResult.of(await vm.processes.wait(self.pid, timeout))

    async def kill(self, signal: int | str = "SIGKILL") -> bool:
        """Signal its process group; False when it had already exited."""
        vm = await self._vm()
        try:
            info = await vm.processes.signal(self.pid, signal)
        except AgentOpError as exc:
            if exc.agent_code == E_NO_PROCESS:  # the agent does not know this pid
                return False
            raise
        return info.running or info.signal is not None

    async def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        vm = await self._vm()
        await vm.processes.send_stdin(self.pid, data, eof=eof)

    async def close_stdin(self) -> None:
        vm = await self._vm()
        await vm.processes.close_stdin(self.pid)

    def __repr__(self) -> str:
        return f"CommandHandle(pid={self.pid})"


class Commands:
    """``sandbox.commands``: run commands, list and signal background ones."""

    def __init__(self, vm: VMGetter, envs: Callable[[], Mapping[str, str]]) -> None:
        self._vm = vm
        self._envs = envs

    def _env(self, envs: Mapping[str, str] | None) -> dict[str, str | None]:
        return {**self._envs(), **(envs or {})}

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        envs: Mapping[str, str] | None = None,
        user: str | int = DEFAULT_USER,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        envs: Mapping[str, str] | None = None,
        user: str | int = DEFAULT_USER,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        user: str | int = DEFAULT_USER,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` and return how it ended, or with ``background=True`` a :class:`CommandHandle`
        at once (see :meth:`start`; ``timeout`` and the callbacks are for foreground runs).

        ``cwd`` defaults to the user's home. On ``timeout`` the command's process group is killed
        and EXEC_TIMEOUT raised. Output callbacks see chunks as they come (and are then not kept).
        """
        if background:
            handle = await self.start(cmd, envs=envs, user=user, cwd=cwd, stdin=True)
            if stdin:
                try:
                    await handle.send_stdin(stdin)
                except BaseException:  # nobody would know its pid: do not leave it running
                    with contextlib.suppress(SmartVMError):
                        await handle.kill()
                    raise
            return handle
        vm = await self._vm()
        try:
            result = await vm.exec(
                command_argv(cmd),
                env=self._env(envs),
                user=user,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        except ExecTimeoutError as exc:
            raise SmartVMError(ErrorCode.EXEC_TIMEOUT, exc.message) from None
        return CommandResult.of(result)

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        user: str | int = DEFAULT_USER,
        cwd: str | None = None,
        stdin: bool = True,
    ) -> CommandHandle:
        """Start ``cmd`` in the background; ``stdin=True`` keeps its stdin open for ``send_stdin``."""
        vm = await self._vm()
        info = await vm.processes.start(
            command_argv(cmd), env=self._env(envs), user=user, cwd=cwd, stdin=stdin
        )
        return CommandHandle(self._vm, info.pid)

    async def list(self) -> list[ProcessInfo]:
        """Background commands the guest agent knows (running, and exited ones not yet collected)."""
        vm = await self._vm()
        return await vm.processes.list()

    def connect(self, pid: int) -> CommandHandle:
        """A handle on a background command started earlier (by this or another process)."""
        return CommandHandle(self._vm, pid)

    async def kill(self, pid: int, signal: int | str = "SIGKILL") -> bool:
        return await self.connect(pid).kill(signal)

    async def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        await self.connect(pid).send_stdin(data, eof=eof)
