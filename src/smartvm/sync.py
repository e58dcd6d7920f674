"""Blocking twins of SmartVM and MicroVM for scripts: the async core runs on one background loop."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from smartvm.config import MicroVMConfig, RateLimiter
from smartvm.engine import MemBackend, NetworkOverride
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM as AsyncSmartVM
from smartvm.snapshot import Snapshot, SnapshotType
from smartvm.vm import MicroVM as AsyncMicroVM
from smartvm.vm import VMState

if TYPE_CHECKING:
    from smartvm.agent.client import ExecResult
    from smartvm.vm_records import VMRecord

T = TypeVar("T")


class _Loop:
    """One daemon thread running an event loop shared by every sync object."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T]) -> T:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="smartvm-sync", daemon=True).start()
                cls._loop = loop
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, cls._loop)
        return future.result()


class _Blocking:
    """A blocking view of an async helper object (``vm.files``, ``vm.processes``): each coroutine
    method runs on the shared loop; everything else passes through."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return _Loop.run(attr(*args, **kwargs))

        return call


class MicroVM:
    """Blocking wrapper of :class:`smartvm.vm.MicroVM`."""

    def __init__(self, vm: AsyncMicroVM) -> None:
        self.aio = vm

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def state(self) -> VMState:
        return self.aio.state

    @property
    def console_log_path(self) -> Path | None:
        return self.aio.console_log_path

    def get_runtime_dir(self) -> Path | None:
        return self.aio.get_runtime_dir()

    def start(self) -> None:
        _Loop.run(self.aio.start())

    def pause(self) -> None:
        _Loop.run(self.aio.pause())

    def resume(self) -> None:
        _Loop.run(self.aio.resume())

    def stop(self, timeout: float | None = None) -> None:
        _Loop.run(self.aio.stop(timeout))

    def kill(self) -> None:
        _Loop.run(self.aio.kill())

    def detach(self) -> VMRecord:
        return _Loop.run(self.aio.detach())

    def wait_ready(self, timeout: float = 30.0) -> None:
        _Loop.run(self.aio.wait_ready(timeout))

    def exec(self, cmd: str | Sequence[str], *, ready_timeout: float = 30.0, **kwargs: Any) -> ExecResult:
        return _Loop.run(self.aio.exec(cmd, ready_timeout=ready_timeout, **kwargs))

    @property
    def files(self) -> Any:
        """Blocking ``files.write/read/list/stat/mkdir/remove/rename``."""
        return _Blocking(self.aio.files)

    @property
    def processes(self) -> Any:
        """Blocking ``processes.start/list/send_stdin/signal/wait``."""
        return _Blocking(self.aio.processes)

    def create_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        snapshot_type: SnapshotType = "Full",
        *,
        pause_vm: bool = False,
    ) -> Snapshot:
        return _Loop.run(
            self.aio.create_snapshot(snapshot_path, mem_file_path, snapshot_type, pause_vm=pause_vm)
        )

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
        self.stop()


class SmartVM:
    """Blocking wrapper of :class:`smartvm.orchestrator.SmartVM`."""

    def __init__(self, options: SmartVMOptions | None = None) -> None:
        self.aio = AsyncSmartVM(options)

    @property
    def options(self) -> SmartVMOptions:
        return self.aio.options

    @property
    def vm_count(self) -> int:
        return self.aio.vm_count

    def ensure_binary(self) -> Path:
        return _Loop.run(self.aio.ensure_binary())

    def create_vm(
        self, config: MicroVMConfig | dict[str, Any], *, netns: str | None = None, detachable: bool = False
    ) -> MicroVM:
        return MicroVM(_Loop.run(self.aio.create_vm(config, netns=netns, detachable=detachable)))

    def restore_vm(
        self,
        snapshot_dir: str | Path,
        *,
        vm_id: str | None = None,
        resume_vm: bool = True,
        network_overrides: Sequence[NetworkOverride] = (),
        netns: str | None = None,
        detachable: bool = False,
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
                )
            )
        )

    def attach_vm(self, vm_id: str) -> MicroVM:
        return MicroVM(_Loop.run(self.aio.attach_vm(vm_id)))

    def detached_vms(self) -> list[VMRecord]:
        return self.aio.detached_vms()

    def prune_detached(self) -> list[VMRecord]:
        return self.aio.prune_detached()

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
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def __getattr__(name: str) -> Any:
    """``SandboxManager`` and ``Sandbox``: the blocking sandbox API (imported on first use)."""
    if name in ("SandboxManager", "Sandbox"):
        from smartvm.sandbox import blocking

        return getattr(blocking, name)
    raise AttributeError(name)
