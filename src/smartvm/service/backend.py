"""What the routes need from the sandbox layer: a few protocols cut from ``SandboxManager``'s surface.

Routes are thin translations: they call these methods and turn results into response models. The
sandbox handle protocols match :class:`smartvm.sandbox.Sandbox` as it is (``sbx.commands``,
``sbx.files``, ``pause``, ``resume``, ...); :class:`SandboxBackend` adds what a long-running service
needs around the manager (start, close, capacity, template builds by name), so that the service
holds one adapter object and nothing else.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from smartvm.agent.client import FileInfo, ProcessInfo
from smartvm.errors import SmartVMError
from smartvm.host.nat import EgressPolicy
from smartvm.sandbox.store import EventRecord, SandboxState, TemplateRecord

if TYPE_CHECKING:
    from smartvm.sandbox.manager import Capacity
    from smartvm.vm import MicroVM

OnExit = Literal["keep", "pause", "kill"]
OutputCallback = Callable[[bytes], Awaitable[None] | None]


class CommandResultLike(Protocol):
    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def stdout_truncated(self) -> bool: ...
    @property
    def stderr_truncated(self) -> bool: ...


class CommandHandleLike(Protocol):
    @property
    def pid(self) -> int: ...


class SandboxCommands(Protocol):
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = ...,
        user: str | int = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: bytes | None = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
    ) -> CommandResultLike: ...

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = ...,
        user: str | int = ...,
        cwd: str | None = ...,
        stdin: bool = ...,
    ) -> CommandHandleLike: ...

    async def list(self) -> list[ProcessInfo]: ...
    async def kill(self, pid: int, signal: int | str = ...) -> bool: ...
    async def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = ...) -> None: ...


class SandboxFiles(Protocol):
    def read_stream(self, path: str) -> AsyncIterator[bytes]: ...
    async def write_stream(self, path: str, chunks: AsyncIterable[bytes]) -> FileInfo: ...
    async def list(self, path: str = ...) -> list[FileInfo]: ...
    async def make_dir(self, path: str) -> FileInfo: ...
    async def remove(self, path: str) -> bool: ...
    async def rename(self, src: str, dst: str) -> FileInfo: ...


class SandboxInfoLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def state(self) -> SandboxState: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...
    @property
    def cpus(self) -> int: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def created_at(self) -> float: ...
    @property
    def end_at(self) -> float: ...
    @property
    def auto_pause(self) -> bool: ...
    @property
    def disk_bytes(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def egress(self) -> EgressPolicy: ...


class SandboxMetricsLike(Protocol):
    @property
    def cpu_seconds(self) -> float: ...
    @property
    def cpu_count(self) -> int: ...
    @property
    def memory_rss_bytes(self) -> int: ...
    @property
    def memory_mib(self) -> int: ...
    @property
    def disk_bytes(self) -> int: ...
    @property
    def timestamp(self) -> float: ...


class SnapshotInfoLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def source_sandbox(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def size_bytes(self) -> int: ...


class SandboxHandle(Protocol):
    """One sandbox, as ``smartvm.sandbox.Sandbox`` offers it."""

    @property
    def id(self) -> str: ...
    @property
    def state(self) -> SandboxState:
        """As of the manager's last change (no I/O)."""

    @property
    def template(self) -> str: ...

    @property
    def envs(self) -> Mapping[str, str]: ...
    @property
    def commands(self) -> SandboxCommands: ...
    @property
    def files(self) -> SandboxFiles: ...
    async def running_vm(self) -> MicroVM: ...
    async def info(self) -> SandboxInfoLike: ...
    async def metrics(self) -> SandboxMetricsLike: ...
    async def pause(self) -> None: ...
    async def resume(self, *, timeout: float | None = ...) -> None: ...
    async def set_timeout(self, seconds: float) -> None: ...
    async def set_egress(self, policy: EgressPolicy) -> None: ...
    async def fork(
        self, count: int = ..., *, timeout: float | None = ...
    ) -> Sequence[SandboxHandle | SmartVMError]: ...
    async def snapshot(self, name: str) -> SnapshotInfoLike: ...
    async def kill(self) -> None: ...


@dataclass(frozen=True)
class TemplateBuild:
    """A template to build by name over the API (the backend picks kernel and root filesystem)."""

    name: str
    cpus: int = 1
    memory_mib: int = 256
    envs: Mapping[str, str] | None = None
    start_command: str | None = None
    ready_command: str | None = None


class SandboxBackend(Protocol):
    """The one object the service holds: the sandbox manager plus its lifetime in the service."""

    async def start(self) -> None:
        """Open the state and reconcile; the service answers /health with 200 only after this."""

    async def close(self) -> None:
        """Let go of the data dir; running sandboxes are kept, paused or killed (``on_exit``)."""

    async def create(
        self,
        template: str,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        auto_pause: bool = False,
        cpus: int | None = None,
        memory_mib: int | None = None,
        internet: bool = True,
        egress: EgressPolicy | None = None,
    ) -> SandboxHandle: ...

    async def get(self, sandbox_id: str) -> SandboxHandle: ...

    async def list(
        self, *, states: Sequence[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxHandle]: ...

    async def infos(
        self, *, states: Sequence[SandboxState] | None = None, metadata: Mapping[str, str] | None = None
    ) -> builtins.list[SandboxInfoLike]:
        """``info()`` of what ``list`` finds, gathered at once (listings of many sandboxes)."""

    async def count_by_state(self) -> dict[str, int]:
        """Sandboxes by state value, stopped ones too (for /metrics: no handle is made)."""

    async def events(self, sandbox_id: str) -> builtins.list[EventRecord]: ...
    async def list_snapshots(self) -> builtins.list[SnapshotInfoLike]: ...
    async def delete_snapshot(self, name: str) -> None: ...
    async def list_templates(self) -> builtins.list[TemplateRecord]: ...
    async def build_template(self, build: TemplateBuild) -> TemplateRecord: ...
    def capacity(self) -> Capacity:
        """Sandboxes and guest memory in use against the limits, and the host's memory left."""
