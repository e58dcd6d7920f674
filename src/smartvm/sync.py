"""Blocking twins of SmartVM, MicroVM, ``vm.files`` and ``vm.processes`` for scripts.

The async core runs on one background event loop shared by every sync object; each twin method
runs its async original there and waits. Names, parameters and return types match the async side
(a unit test compares them), with a twin class wherever the async side returns an async object and
an ordinary iterator where it returns an async generator. Calling a twin from inside a callback that
runs on that loop (e.g. ``on_stdout``) would wait for itself: it raises INVALID_STATE instead.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from smartvm.agent.client import DEFAULT_DOWNLOAD_LIMIT, DEFAULT_OUTPUT_LIMIT, DEFAULT_READ_LIMIT
from smartvm.agent.client import Files as AsyncFiles
from smartvm.agent.client import Processes as AsyncProcesses
from smartvm.config import MicroVMConfig, RateLimiter
from smartvm.engine import MemBackend, NetworkOverride
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.guests import GuestKind, build_guest_config
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM as AsyncSmartVM
from smartvm.snapshot import Snapshot, SnapshotType
from smartvm.vm import DriveLayer, VMState
from smartvm.vm import MicroVM as AsyncMicroVM

if TYPE_CHECKING:
    import os

    from smartvm.agent.client import (
        ExecEvent,
        ExecResult,
        FileInfo,
        FsEvent,
        GuestUser,
        OutputCallback,
        ProcessInfo,
    )
    from smartvm.host.netns import NetworkSlot, SlotPool
    from smartvm.host.network import NetworkManager
    from smartvm.images.base_images import BaseImageBundle, BaseImageManager, Preset
    from smartvm.images.releases import ImageManager
    from smartvm.vm_records import VMRecord, VMRecordStore

T = TypeVar("T")


class _Loop:
    """One daemon thread running an event loop shared by every sync object."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T]) -> T:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                cls._thread = threading.Thread(target=loop.run_forever, name="smartvm-sync", daemon=True)
                cls._thread.start()
                cls._loop = loop
        if threading.current_thread() is cls._thread:
            coro.close()
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                "a blocking smartvm.sync call from a callback running on smartvm's own event loop would "
                "wait for itself; collect the data in the callback and act on it after the call returns",
            )
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, cls._loop)
        return future.result()


async def _next(agen: AsyncGenerator[T, None]) -> T:
    return await agen.__anext__()


def _iterate(agen: AsyncGenerator[T, None]) -> Iterator[T]:
    """An ordinary iterator over ``agen``: each item is fetched on the shared loop; leaving the loop
    early closes ``agen`` there too (cancelling what it streams)."""
    try:
        while True:
            try:
                item = _Loop.run(_next(agen))
            except StopAsyncIteration:
                return
            yield item
    finally:
        _Loop.run(agen.aclose())


def guest_config(
    kind: GuestKind = "busybox", *, cpus: int = 1, memory_mib: int = 256, vm_id: str | None = None
) -> MicroVMConfig:
    """Blocking :func:`smartvm.guest_config`: a config booting the default guest image of ``kind``."""
    return build_guest_config(kind, cpus=cpus, memory_mib=memory_mib, vm_id=vm_id)


class Files:
    """Blocking twin of ``vm.files`` (:class:`smartvm.agent.client.Files`)."""

    def __init__(self, files: AsyncFiles) -> None:
        self.aio = files

    def write(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int | None = None,
        append: bool = False,
        parents: bool = True,
        owner: int | str | None = None,
    ) -> int:
        return _Loop.run(self.aio.write(path, data, mode=mode, append=append, parents=parents, owner=owner))

    def upload(
        self,
        local: str | os.PathLike[str],
        path: str,
        *,
        mode: int | None = None,
        parents: bool = True,
        owner: int | str | None = None,
    ) -> int:
        return _Loop.run(self.aio.upload(local, path, mode=mode, parents=parents, owner=owner))

    def read(
        self, path: str, *, offset: int = 0, length: int | None = None, max_bytes: int = DEFAULT_READ_LIMIT
    ) -> bytes:
        return _Loop.run(self.aio.read(path, offset=offset, length=length, max_bytes=max_bytes))

    def read_text(self, path: str, encoding: str = "utf-8", *, max_bytes: int = DEFAULT_READ_LIMIT) -> str:
        return _Loop.run(self.aio.read_text(path, encoding, max_bytes=max_bytes))

    def download(
        self,
        path: str,
        local: str | os.PathLike[str],
        *,
        mode: int | None = None,
        keep_mode: bool = False,
        max_bytes: int = DEFAULT_DOWNLOAD_LIMIT,
    ) -> int:
        return _Loop.run(self.aio.download(path, local, mode=mode, keep_mode=keep_mode, max_bytes=max_bytes))

    def stat(self, path: str, *, follow: bool = True) -> FileInfo:
        return _Loop.run(self.aio.stat(path, follow=follow))

    def exists(self, path: str) -> bool:
        return _Loop.run(self.aio.exists(path))

    def mkdir(
        self,
        path: str,
        *,
        parents: bool = True,
        mode: int = 0o755,
        exist_ok: bool = True,
        owner: int | str | None = None,
    ) -> FileInfo:
        return _Loop.run(self.aio.mkdir(path, parents=parents, mode=mode, exist_ok=exist_ok, owner=owner))

    def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> bool:
        return _Loop.run(self.aio.remove(path, recursive=recursive, missing_ok=missing_ok))

    def rename(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        _Loop.run(self.aio.rename(src, dst, overwrite=overwrite))

    def read_stream(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        max_bytes: int = DEFAULT_DOWNLOAD_LIMIT,
    ) -> Iterator[bytes]:
        """The chunks of ``path`` as an ordinary iterator (see the async ``read_stream``)."""
        return _iterate(self.aio.read_stream(path, offset=offset, length=length, max_bytes=max_bytes))

    def entries(self, path: str, *, depth: int = 0) -> tuple[FileInfo, builtins.list[FileInfo]]:
        return _Loop.run(self.aio.entries(path, depth=depth))

    def prepare(
        self, path: str, *, kind: Literal["file", "dir"] = "file", user: int | str | None = None
    ) -> tuple[bool, FileInfo]:
        return _Loop.run(self.aio.prepare(path, kind=kind, user=user))

    def watch(
        self,
        path: str,
        *,
        recursive: bool = False,
        include_entry: bool = False,
        allow_network_mounts: bool = False,
    ) -> Iterator[FsEvent]:
        """Changes under ``path`` as an ordinary iterator (see the async ``watch``)."""
        return _iterate(
            self.aio.watch(
                path,
                recursive=recursive,
                include_entry=include_entry,
                allow_network_mounts=allow_network_mounts,
            )
        )

    def list(self, path: str) -> list[FileInfo]:  # last: inside the class body ``list`` is this method
        return _Loop.run(self.aio.list(path))


class Processes:
    """Blocking twin of ``vm.processes`` (:class:`smartvm.agent.client.Processes`)."""

    def __init__(self, processes: AsyncProcesses) -> None:
        self.aio = processes

    def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bool = False,
        replay_bytes: int | None = None,
    ) -> ProcessInfo:
        return _Loop.run(
            self.aio.start(cmd, env=env, cwd=cwd, user=user, stdin=stdin, replay_bytes=replay_bytes)
        )

    def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        _Loop.run(self.aio.send_stdin(pid, data, eof=eof))

    def close_stdin(self, pid: int) -> None:
        _Loop.run(self.aio.close_stdin(pid))

    def signal(self, pid: int, sig: int | str = "SIGTERM", *, group: bool = True) -> ProcessInfo:
        return _Loop.run(self.aio.signal(pid, sig, group=group))

    def attach(self, pid: int, *, replay: bool = True, timeout: float | None = None) -> Iterator[ExecEvent]:
        """The process's output events as an ordinary iterator (see the async ``attach``)."""
        return _iterate(self.aio.attach(pid, replay=replay, timeout=timeout))

    def wait(
        self, pid: int, timeout: float | None = None, *, max_output_bytes: int = DEFAULT_OUTPUT_LIMIT
    ) -> ExecResult:
        return _Loop.run(self.aio.wait(pid, timeout, max_output_bytes=max_output_bytes))

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        meta: Any = None,
    ) -> Iterator[ExecEvent]:
        """The events of a background run as an ordinary iterator (see the async ``run``)."""
        return _iterate(
            self.aio.run(cmd, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout, meta=meta)
        )

    def user(self, user: int | str | None = None) -> GuestUser:
        return _Loop.run(self.aio.user(user))

    def list(self) -> list[ProcessInfo]:  # last: inside the class body ``list`` is this method
        return _Loop.run(self.aio.list())


class MicroVM:
    """Blocking twin of :class:`smartvm.vm.MicroVM`."""

    def __init__(self, vm: AsyncMicroVM) -> None:
        self.aio = vm

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def config(self) -> MicroVMConfig:
        return self.aio.config

    @property
    def engine_name(self) -> str:
        return self.aio.engine_name

    @property
    def state(self) -> VMState:
        return self.aio.state

    @property
    def console_log_path(self) -> Path | None:
        return self.aio.console_log_path

    @property
    def started_at(self) -> float | None:
        return self.aio.started_at

    @property
    def files(self) -> Files:
        """Blocking guest files: ``vm.files.write(path, data)``, ``read``, ``list``, ``stat``, ..."""
        return Files(self.aio.files)

    @property
    def processes(self) -> Processes:
        """Blocking background processes: ``start``, ``list``, ``send_stdin``, ``signal``, ``wait``."""
        return Processes(self.aio.processes)

    def get_runtime_dir(self) -> Path | None:
        return self.aio.get_runtime_dir()

    def start(self) -> None:
        _Loop.run(self.aio.start())

    def load_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        *,
        resume_vm: bool = True,
        enable_diff_snapshots: bool = False,
        mem_backend: MemBackend = "File",
        network_overrides: Sequence[NetworkOverride] | None = None,
    ) -> None:
        _Loop.run(
            self.aio.load_snapshot(
                snapshot_path,
                mem_file_path,
                resume_vm=resume_vm,
                enable_diff_snapshots=enable_diff_snapshots,
                mem_backend=mem_backend,
                network_overrides=network_overrides,
            )
        )

    def restore_from(
        self,
        snapshot: Snapshot,
        *,
        resume_vm: bool = True,
        enable_diff_snapshots: bool = False,
        mem_backend: MemBackend = "File",
        uffd_socket: Path | None = None,
        network_overrides: Sequence[NetworkOverride] = (),
        drive_layers: Mapping[str, DriveLayer] | None = None,
    ) -> None:
        _Loop.run(
            self.aio.restore_from(
                snapshot,
                resume_vm=resume_vm,
                enable_diff_snapshots=enable_diff_snapshots,
                mem_backend=mem_backend,
                uffd_socket=uffd_socket,
                network_overrides=network_overrides,
                drive_layers=drive_layers,
            )
        )

    def detach(self) -> VMRecord:
        return _Loop.run(self.aio.detach())

    def attach(self, record: VMRecord) -> None:
        _Loop.run(self.aio.attach(record))

    def pause(self) -> None:
        _Loop.run(self.aio.pause())

    def resume(self) -> None:
        _Loop.run(self.aio.resume())

    def stop(self, timeout: float | None = None) -> None:
        _Loop.run(self.aio.stop(timeout))

    def kill(self) -> None:
        _Loop.run(self.aio.kill())

    def create_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        snapshot_type: SnapshotType = "Full",
        *,
        pause_vm: bool = False,
        copy_disks: bool = True,
    ) -> Snapshot:
        return _Loop.run(
            self.aio.create_snapshot(
                snapshot_path, mem_file_path, snapshot_type, pause_vm=pause_vm, copy_disks=copy_disks
            )
        )

    def record(self) -> VMRecord:
        return _Loop.run(self.aio.record())

    def wait_ready(self, timeout: float = 30.0) -> None:
        _Loop.run(self.aio.wait_ready(timeout))

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        ready_timeout: float = 30.0,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int | None = None,
    ) -> ExecResult:
        """Run a command in the guest; callbacks run on smartvm's loop thread (see the module doc)."""
        return _Loop.run(
            self.aio.exec(
                cmd,
                ready_timeout=ready_timeout,
                env=env,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                max_output_bytes=max_output_bytes,
            )
        )

    def get_info(self) -> dict[str, Any]:
        return _Loop.run(self.aio.get_info())

    def get_vm_config(self) -> dict[str, Any]:
        return _Loop.run(self.aio.get_vm_config())

    def update_drive(self, drive_id: str, path_on_host: str) -> None:
        _Loop.run(self.aio.update_drive(drive_id, path_on_host))

    def update_balloon(self, amount_mib: int) -> None:
        _Loop.run(self.aio.update_balloon(amount_mib))

    def get_balloon_stats(self) -> dict[str, Any]:
        return _Loop.run(self.aio.get_balloon_stats())

    def put_metadata(self, data: dict[str, Any]) -> None:
        _Loop.run(self.aio.put_metadata(data))

    def patch_metadata(self, data: dict[str, Any]) -> None:
        _Loop.run(self.aio.patch_metadata(data))

    def get_metadata(self) -> Any:
        return _Loop.run(self.aio.get_metadata())

    def update_network_interface(
        self,
        iface_id: str,
        *,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        _Loop.run(
            self.aio.update_network_interface(
                iface_id, rx_rate_limiter=rx_rate_limiter, tx_rate_limiter=tx_rate_limiter
            )
        )

    def flush_metrics(self) -> None:
        _Loop.run(self.aio.flush_metrics())

    def __enter__(self) -> MicroVM:
        _Loop.run(self.aio.__aenter__())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _Loop.run(self.aio.__aexit__(exc_type, exc, tb))

    def __repr__(self) -> str:
        return repr(self.aio)


class SmartVM:
    """Blocking twin of :class:`smartvm.orchestrator.SmartVM`."""

    def __init__(self, options: SmartVMOptions | None = None) -> None:
        self.aio = AsyncSmartVM(options)

    @property
    def options(self) -> SmartVMOptions:
        return self.aio.options

    @property
    def vm_count(self) -> int:
        return self.aio.vm_count

    @property
    def records(self) -> VMRecordStore:
        return self.aio.records

    def select_engine(self) -> str:
        return _Loop.run(self.aio.select_engine())

    def ensure_binary(self) -> Path:
        return _Loop.run(self.aio.ensure_binary())

    @property
    def image_manager(self) -> ImageManager:
        return self.aio.image_manager

    @property
    def base_image_manager(self) -> BaseImageManager:
        return self.aio.base_image_manager

    @property
    def network_manager(self) -> NetworkManager:
        return self.aio.network_manager

    def ensure_base_image(
        self,
        preset: Preset = "latest",
        arch: str | None = None,
        force_download: bool = False,
        manifest_url: str | None = None,
        manifest_path: Path | None = None,
    ) -> BaseImageBundle:
        return _Loop.run(
            self.aio.ensure_base_image(preset, arch, force_download, manifest_url, manifest_path)
        )

    def create_vm(
        self,
        config: MicroVMConfig | dict[str, Any],
        *,
        netns: str | None = None,
        detachable: bool = False,
        network: NetworkSlot | SlotPool | None = None,
    ) -> MicroVM:
        return MicroVM(
            _Loop.run(self.aio.create_vm(config, netns=netns, detachable=detachable, network=network))
        )

    def restore_vm(
        self,
        snapshot_dir: str | Path,
        *,
        vm_id: str | None = None,
        resume_vm: bool = True,
        network_overrides: Sequence[NetworkOverride] = (),
        netns: str | None = None,
        detachable: bool = False,
        drive_paths: Mapping[str, str | Path] | None = None,
        drive_layers: Mapping[str, DriveLayer] | None = None,
    ) -> MicroVM:
        return MicroVM(
            _Loop.run(
                self.aio.restore_vm(
                    snapshot_dir,
                    vm_id=vm_id,
                    resume_vm=resume_vm,
                    network_overrides=network_overrides,
                    netns=netns,
                    detachable=detachable,
                    drive_paths=drive_paths,
                    drive_layers=drive_layers,
                )
            )
        )

    def attach_vm(self, vm_id: str) -> MicroVM:
        return MicroVM(_Loop.run(self.aio.attach_vm(vm_id)))

    def detached_vms(self) -> list[VMRecord]:
        return self.aio.detached_vms()

    def prune_detached(self) -> list[VMRecord]:
        return self.aio.prune_detached()

    def sweep(self) -> list[Path]:
        return self.aio.sweep()

    def get_vm(self, vm_id: str) -> MicroVM | None:
        vm = self.aio.get_vm(vm_id)
        return MicroVM(vm) if vm else None

    def list_vms(self) -> list[MicroVM]:
        return [MicroVM(vm) for vm in self.aio.list_vms()]

    def stop_all(self) -> None:
        _Loop.run(self.aio.stop_all())

    def cleanup(self) -> None:
        _Loop.run(self.aio.cleanup())

    def get_runtime_dir(self) -> Path:
        return self.aio.get_runtime_dir()

    def __enter__(self) -> SmartVM:
        _Loop.run(self.aio.__aenter__())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _Loop.run(self.aio.__aexit__(exc_type, exc, tb))


def __getattr__(name: str) -> Any:
    """``SandboxManager`` and ``Sandbox``: the blocking sandbox API (imported on first use)."""
    if name in ("SandboxManager", "Sandbox"):
        from smartvm.sandbox import blocking

        return getattr(blocking, name)
    raise AttributeError(name)
