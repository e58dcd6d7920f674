"""The Engine contract both hypervisor backends implement (selection and the registry: engines.py).

`MicroVM` (vm.py) owns the lifecycle state machine, the runtime dir and the undo stack; an Engine only
knows how to drive one hypervisor process for one VM. A feature an engine lacks raises
``UNSUPPORTED_BY_ENGINE`` (the defaults below), never a silent no-op.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from smartvm.config import MicroVMConfig, NetworkInterface, RateLimiter
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.process import tail
from smartvm.host.runtime import VMRuntime
from smartvm.options import SmartVMOptions
from smartvm.snapshot import Snapshot, SnapshotType

MemBackend = Literal["File", "Uffd"]


@dataclass(frozen=True)
class NetworkOverride:
    """Attach a restored VM's interface to another host device (Firecracker's network_overrides)."""

    iface_id: str
    host_dev_name: str


@dataclass(frozen=True)
class RestoreRequest:
    """Everything an engine needs to bring a VM back from a snapshot."""

    snapshot: Snapshot
    config: MicroVMConfig  # the config the restored VM runs with (drives already staged)
    resume_vm: bool = True
    enable_diff_snapshots: bool = False
    mem_backend: MemBackend = "File"
    uffd_socket: Path | None = None  # with mem_backend="Uffd": where the page-fault handler listens
    network_overrides: Sequence[NetworkOverride] = ()
    mem_path: Path | None = None  # the memory file to load when not the snapshot's own (a merged Diff chain)


class Engine(ABC):
    """One hypervisor process for one VM.

    Contract: every method that fails raises SmartVMError and leaves no process or socket behind
    if the VM is not running afterwards. ``kill`` and ``close`` are idempotent.
    """

    name: ClassVar[str]
    title: ClassVar[str]  # the hypervisor's name in messages
    supports_diff_snapshots: ClassVar[bool] = True

    def __init__(self, runtime: VMRuntime, options: SmartVMOptions) -> None:
        self.runtime = runtime
        self.options = options

    # --- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    async def boot(self, config: MicroVMConfig) -> None:
        """Start the hypervisor, configure every device from ``config`` and start the guest."""

    @abstractmethod
    async def restore(self, request: RestoreRequest) -> None:
        """Start the hypervisor and load ``request.snapshot`` instead of booting."""

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def create_snapshot(
        self,
        snapshot_dir: Path,
        state_file: str,
        mem_file: str,
        snapshot_type: SnapshotType,
        config: MicroVMConfig,
        *,
        copy_disks: bool = True,
    ) -> Snapshot:
        """Write state (and memory) files and disk copies into ``snapshot_dir``; the VM is paused.

        ``copy_disks=False`` leaves the writable disks out (the caller keeps them consistent with the
        snapshot itself, as sandboxes do with their copy-on-write layers). Returns the Snapshot
        describing the files; the caller saves the manifest.
        """

    @abstractmethod
    async def shutdown(self, timeout: float) -> None:
        """Ask the guest to power off; after ``timeout`` seconds end the process. Always reaps."""

    @abstractmethod
    async def kill(self) -> None:
        """End the hypervisor process at once and reap it. Idempotent."""

    @abstractmethod
    def is_alive(self) -> bool: ...

    async def wait_exited(self, poll_interval: float = 0.25) -> None:
        """Return once the hypervisor process has exited (engines may override with a real wait)."""
        while self.is_alive():  # noqa: ASYNC110 - a process exit has no event to wait on here
            await asyncio.sleep(poll_interval)

    def exited_error(self, what: str) -> SmartVMError:
        """The error for ``what`` failing because the hypervisor exited, saying why when known."""
        console = tail(self.runtime.console_log)
        return SmartVMError(
            ErrorCode.VM_EXITED,
            f"{what}: the {self.title} process exited. Last console output:\n{console or '(empty)'}",
        )

    @abstractmethod
    async def info(self) -> dict[str, Any]:
        """Engine-level instance info (Firecracker's GET /, or the QEMU equivalent)."""

    @abstractmethod
    async def open_agent_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connected byte stream to the guest agent (vsock on Firecracker, virtio-serial on QEMU)."""

    # --- optional features ------------------------------------------------------------------
    def _unsupported(self, what: str) -> SmartVMError:
        return SmartVMError(
            ErrorCode.UNSUPPORTED_BY_ENGINE, f"{what} is not supported by the {self.name} engine"
        )

    async def get_vm_config(self) -> dict[str, Any]:
        raise self._unsupported("get_vm_config")

    async def update_drive(self, drive_id: str, path_on_host: str) -> None:
        raise self._unsupported("update_drive")

    async def update_balloon(self, amount_mib: int) -> None:
        raise self._unsupported("update_balloon")

    async def get_balloon_stats(self) -> dict[str, Any]:
        raise self._unsupported("get_balloon_stats")

    async def put_metadata(self, data: dict[str, Any]) -> None:
        raise self._unsupported("MMDS (put_metadata)")

    async def patch_metadata(self, data: dict[str, Any]) -> None:
        raise self._unsupported("MMDS (patch_metadata)")

    async def get_metadata(self) -> Any:
        raise self._unsupported("MMDS (get_metadata)")

    async def update_network_interface(
        self, iface_id: str, rx_rate_limiter: RateLimiter | None, tx_rate_limiter: RateLimiter | None
    ) -> None:
        raise self._unsupported("update_network_interface")

    async def flush_metrics(self) -> None:
        raise self._unsupported("flush_metrics")

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release host-side resources (clients, sockets) after the process is gone."""

    # --- detach / attach (VMs that outlive the Python process that started them) ---------------
    async def detach(self) -> dict[str, Any]:
        """Stop owning the running hypervisor without stopping it: close the clients, forget the process.

        Returns JSON-serialisable data for :meth:`attach`: at least ``engine``, ``pid`` and
        ``pid_start_time`` (from /proc, so a recycled pid is never mistaken for the VM). Afterwards
        this engine is inert: ``kill``/``close`` no longer touch the process.
        """
        raise self._unsupported("detach")

    def record_data(self) -> dict[str, Any]:
        """What :meth:`detach` would return, without letting go: for a VM recorded while this
        process keeps driving it (see :meth:`MicroVM.record`)."""
        raise self._unsupported("recording a VM")

    @classmethod
    def forget_record(cls, record: dict[str, Any]) -> None:
        """Remove what a VM described by ``record`` left outside its runtime dir after its hypervisor
        died while detached (e.g. a Firecracker jail). Nothing by default."""
        return None

    @classmethod
    def attach(cls, runtime: VMRuntime, options: SmartVMOptions, record: dict[str, Any]) -> Engine:
        """An engine driving the hypervisor described by ``record`` (what :meth:`detach` returned).

        The process is not our child: ``is_alive`` checks pid + start time, ``kill`` cannot reap it
        (it has been reparented). Raises VM_NOT_FOUND when that process is gone.
        """
        raise SmartVMError(
            ErrorCode.UNSUPPORTED_BY_ENGINE, f"attach is not supported by the {cls.name} engine"
        )


def override_interfaces(
    interfaces: Sequence[NetworkInterface], overrides: Sequence[NetworkOverride]
) -> list[NetworkInterface]:
    """Apply network overrides to a config's interfaces, refusing unknown iface ids."""
    by_id = {o.iface_id: o for o in overrides}
    unknown = set(by_id) - {i.iface_id for i in interfaces}
    if unknown:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"network_overrides name unknown interfaces {sorted(unknown)}"
        )
    return [
        i.model_copy(update={"host_dev_name": by_id[i.iface_id].host_dev_name}) if i.iface_id in by_id else i
        for i in interfaces
    ]
