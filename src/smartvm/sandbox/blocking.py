"""Blocking twins of the sandbox API for scripts (``from smartvm.sync import SandboxManager``).

Every call runs the async method on smartvm.sync's shared background loop, where the manager's
reaper also keeps running between calls.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, overload

from smartvm.agent.client import FileInfo, OutputCallback, ProcessInfo
from smartvm.errors import SmartVMError
from smartvm.host.nat import EgressPolicy
from smartvm.options import SmartVMOptions
from smartvm.sandbox import commands as _commands
from smartvm.sandbox import files as _files
from smartvm.sandbox import manager as _manager
from smartvm.sandbox import sandbox as _sandbox
from smartvm.sandbox.commands import DEFAULT_COMMAND_TIMEOUT_S, CommandResult
from smartvm.sandbox.manager import Capacity, SnapshotInfo
from smartvm.sandbox.sandbox import SandboxInfo, SandboxMetrics
from smartvm.sandbox.settings import DEFAULT_HOME, DEFAULT_USER, SandboxSettings
from smartvm.sandbox.store import EventRecord, SandboxState, TemplateRecord
from smartvm.sandbox.templates import Progress, TemplateSpec
from smartvm.sync import _Loop


class CommandHandle:
    """Blocking twin of :class:`smartvm.sandbox.commands.CommandHandle`."""

    def __init__(self, aio: _commands.CommandHandle) -> None:
        self.aio = aio
        self.pid = aio.pid

    def wait(self, timeout: float | None = None) -> CommandResult:
        return _Loop.run(self.aio.wait(timeout))

    def kill(self, signal: int | str = "SIGKILL") -> bool:
        return _Loop.run(self.aio.kill(signal))

    def send_stdin(self, data: bytes | str, *, eof: bool = False) -> None:
        _Loop.run(self.aio.send_stdin(data, eof=eof))

    def close_stdin(self) -> None:
        _Loop.run(self.aio.close_stdin())


class Commands:
    """Blocking twin of :class:`smartvm.sandbox.commands.Commands`."""

    def __init__(self, aio: _commands.Commands) -> None:
        self.aio = aio

    @overload
    def run(
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
    def run(
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

    def run(
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
        if background:
            return self.start(cmd, envs=envs, user=user, cwd=cwd)
        return _Loop.run(
            self.aio.run(
                cmd,
                envs=envs,
                user=user,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )

    def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        user: str | int = DEFAULT_USER,
        cwd: str | None = None,
        stdin: bool = True,
    ) -> CommandHandle:
        return CommandHandle(_Loop.run(self.aio.start(cmd, envs=envs, user=user, cwd=cwd, stdin=stdin)))

    def connect(self, pid: int) -> CommandHandle:
        return CommandHandle(self.aio.connect(pid))

    def kill(self, pid: int, signal: int | str = "SIGKILL") -> bool:
        return _Loop.run(self.aio.kill(pid, signal))

    def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        _Loop.run(self.aio.send_stdin(pid, data, eof=eof))

    def list(self) -> list[ProcessInfo]:  # last: inside the class body ``list`` is this method
        return _Loop.run(self.aio.list())


class Files:
    """Blocking twin of :class:`smartvm.sandbox.files.SandboxFiles`."""

    def __init__(self, aio: _files.SandboxFiles) -> None:
        self.aio = aio

    def read(self, path: str, *, max_bytes: int = 256 << 20) -> bytes:
        return _Loop.run(self.aio.read(path, max_bytes=max_bytes))

    def read_text(self, path: str, *, encoding: str = "utf-8") -> str:
        return _Loop.run(self.aio.read_text(path, encoding=encoding))

    def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, owner: str | int | None = None
    ) -> FileInfo:
        return _Loop.run(self.aio.write(path, data, mode=mode, owner=owner))

    def upload(self, local: str | os.PathLike[str], path: str, *, mode: int | None = None) -> FileInfo:
        return _Loop.run(self.aio.upload(local, path, mode=mode))

    def download(self, path: str, local: str | os.PathLike[str]) -> int:
        return _Loop.run(self.aio.download(path, local))

    def stat(self, path: str) -> FileInfo:
        return _Loop.run(self.aio.stat(path))

    def exists(self, path: str) -> bool:
        return _Loop.run(self.aio.exists(path))

    def make_dir(self, path: str, *, mode: int = 0o755) -> FileInfo:
        return _Loop.run(self.aio.make_dir(path, mode=mode))

    def remove(self, path: str, *, recursive: bool = True) -> bool:
        return _Loop.run(self.aio.remove(path, recursive=recursive))

    def rename(self, src: str, dst: str) -> FileInfo:
        return _Loop.run(self.aio.rename(src, dst))

    def list(self, path: str = DEFAULT_HOME) -> list[FileInfo]:  # last: ``list`` is this method below
        return _Loop.run(self.aio.list(path))


class Sandbox:
    """Blocking twin of :class:`smartvm.sandbox.sandbox.Sandbox`."""

    def __init__(self, aio: _sandbox.Sandbox) -> None:
        self.aio = aio
        self.id = aio.id
        self.commands = Commands(aio.commands)
        self.files = Files(aio.files)

    @property
    def state(self) -> SandboxState:
        return self.aio.state

    @property
    def template(self) -> str:
        return self.aio.template

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.aio.metadata

    @property
    def envs(self) -> Mapping[str, str]:
        return self.aio.envs

    def info(self) -> SandboxInfo:
        return _Loop.run(self.aio.info())

    def metrics(self) -> SandboxMetrics:
        return _Loop.run(self.aio.metrics())

    def pause(self) -> None:
        _Loop.run(self.aio.pause())

    def resume(self, *, timeout: float | None = None) -> None:
        _Loop.run(self.aio.resume(timeout=timeout))

    def set_timeout(self, seconds: float) -> None:
        _Loop.run(self.aio.set_timeout(seconds))

    def set_egress(self, policy: EgressPolicy) -> None:
        _Loop.run(self.aio.set_egress(policy))

    def fork(self, count: int = 1, *, timeout: float | None = None) -> list[Sandbox | SmartVMError]:
        return [
            r if isinstance(r, SmartVMError) else Sandbox(r)
            for r in _Loop.run(self.aio.fork(count, timeout=timeout))
        ]

    def snapshot(self, name: str) -> SnapshotInfo:
        return _Loop.run(self.aio.snapshot(name))

    def kill(self) -> None:
        _Loop.run(self.aio.kill())

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, state={self.state.value!r}) [blocking]"


class SandboxManager:
    """Blocking twin of :class:`smartvm.sandbox.manager.SandboxManager` (``with`` it)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        options: SmartVMOptions | None = None,
        settings: SandboxSettings | None = None,
    ) -> None:
        self.aio = _manager.SandboxManager(data_dir, options=options, settings=settings)

    @property
    def data_dir(self) -> Path:
        return self.aio.data_dir

    def start(self) -> None:
        _Loop.run(self.aio.start())

    def close(self) -> None:
        _Loop.run(self.aio.close())

    def __enter__(self) -> SandboxManager:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def create(
        self,
        template: str = "base",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        auto_pause: bool = False,
        internet: bool = True,
        egress: EgressPolicy | None = None,
        port_forwards: Mapping[int, int] | None = None,
    ) -> Sandbox:
        return Sandbox(
            _Loop.run(
                self.aio.create(
                    template,
                    timeout=timeout,
                    metadata=metadata,
                    envs=envs,
                    auto_pause=auto_pause,
                    internet=internet,
                    egress=egress,
                    port_forwards=port_forwards,
                )
            )
        )

    def get(self, sandbox_id: str) -> Sandbox:
        return Sandbox(_Loop.run(self.aio.get(sandbox_id)))

    def list(
        self, *, states: builtins.list[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[Sandbox]:
        return [Sandbox(s) for s in _Loop.run(self.aio.list(states=states, metadata=metadata))]

    def infos(
        self, *, states: builtins.list[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxInfo]:
        return _Loop.run(self.aio.infos(states=states, metadata=metadata))

    def kill(self, sandbox_id: str) -> None:
        _Loop.run(self.aio.kill(sandbox_id))

    def pause(self, sandbox_id: str) -> None:
        _Loop.run(self.aio.pause(sandbox_id))

    def resume(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        _Loop.run(self.aio.resume(sandbox_id, timeout=timeout))

    def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        _Loop.run(self.aio.set_timeout(sandbox_id, seconds))

    def set_egress(self, sandbox_id: str, policy: EgressPolicy) -> None:
        _Loop.run(self.aio.set_egress(sandbox_id, policy))

    def fork(
        self, sandbox_id: str, count: int = 1, *, timeout: float | None = None
    ) -> builtins.list[Sandbox | SmartVMError]:
        return [
            r if isinstance(r, SmartVMError) else Sandbox(r)
            for r in _Loop.run(self.aio.fork(sandbox_id, count, timeout=timeout))
        ]

    def snapshot(self, sandbox_id: str, name: str) -> SnapshotInfo:
        return _Loop.run(self.aio.snapshot(sandbox_id, name))

    def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        return _Loop.run(self.aio.list_snapshots())

    def delete_snapshot(self, name: str) -> None:
        _Loop.run(self.aio.delete_snapshot(name))

    def list_templates(self) -> builtins.list[TemplateRecord]:
        return _Loop.run(self.aio.list_templates())

    def build_template(self, spec: TemplateSpec, *, progress: Progress | None = None) -> TemplateRecord:
        return _Loop.run(self.aio.build_template(spec, progress=progress))

    def events(self, sandbox_id: str) -> builtins.list[EventRecord]:
        return _Loop.run(self.aio.events(sandbox_id))

    def capacity(self) -> Capacity:
        return self.aio.capacity()

    def reap(self) -> builtins.list[str]:
        return _Loop.run(self.aio.reap())
