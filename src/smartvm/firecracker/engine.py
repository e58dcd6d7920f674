"""The Firecracker engine: a MicroVMConfig becomes API calls on one Firecracker process.

Boot order follows Firecracker's docs: boot-source, machine-config, drives, network interfaces,
vsock, balloon, MMDS, logger, metrics, entropy, then InstanceStart. The guest agent is reached over
vsock; when the config has no vsock device one is added at ``runtime.vsock_socket`` (CID 3).

Restoring: Firecracker reopens every drive at the path recorded in the snapshot state, but that path
was the original VM's staged copy (usually gone). :meth:`restore` puts a temporary symlink there to
this VM's staged copy, loads the snapshot paused, patches each drive to its real path, removes the
symlinks and only then resumes; the guest never runs on the old paths. The vsock socket moves to
this VM's runtime dir with ``vsock_override`` (Firecracker >= 1.17); older releases re-create it at the
recorded path. A bare state/memory pair without ``snapshot.json`` records no paths and is loaded as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import Any

from smartvm.agent.protocol import AGENT_VSOCK_PORT
from smartvm.config import MicroVMConfig, RateLimiter, Vsock
from smartvm.engine import Engine, RestoreRequest
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.api import FirecrackerAPI
from smartvm.firecracker.binary import require_firecracker
from smartvm.firecracker.process import FirecrackerCommand, FirecrackerProcess, socket_accepts, tail
from smartvm.firecracker.vsock import connect_vsock
from smartvm.host.runtime import VMRuntime, sanitize_id
from smartvm.host.storage import clone_file
from smartvm.options import SmartVMOptions
from smartvm.snapshot import Snapshot, SnapshotType

DEFAULT_GUEST_CID = 3
_DYING_GRACE_S = 1.0
_VERSION_RE = re.compile(r"(\d+)\.(\d+)")
# /snapshot/load learned ``vsock_override`` in 1.17 (unreleased as of 1.17.0-dev).
_VSOCK_OVERRIDE_SINCE = (1, 17)


class FirecrackerEngine(Engine):
    """Drives one Firecracker process for one VM."""

    name = "firecracker"

    def __init__(self, runtime: VMRuntime, options: SmartVMOptions) -> None:
        super().__init__(runtime, options)
        self._process: FirecrackerProcess | None = None
        self._api: FirecrackerAPI | None = None
        self._config: MicroVMConfig | None = None
        self._vsock_path: Path | None = None
        self._vsock_dirs: list[Path] = []  # created for a restored vsock socket; removed on close
        self._dirty_tracking = False

    # --- process -----------------------------------------------------------------------------
    @property
    def api(self) -> FirecrackerAPI:
        if self._api is None or not self.is_alive():
            raise SmartVMError(
                ErrorCode.NO_CLIENT, f"VM {self.runtime.vm_id!r} has no running Firecracker process"
            )
        return self._api

    @property
    def process(self) -> FirecrackerProcess | None:
        return self._process

    async def _spawn(self) -> FirecrackerAPI:
        if self._process is not None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "this engine already started a Firecracker process")
        command = FirecrackerCommand(
            binary=require_firecracker(self.options),
            api_socket=self.runtime.api_socket,
            vm_id=sanitize_id(self.runtime.vm_id),
            netns=self.runtime.netns,
        )
        self._process = FirecrackerProcess(
            command, console_log=self.runtime.console_log, engine_log=self.runtime.engine_log
        )
        await self._process.start(self.options.socket_timeout_s)
        self._api = FirecrackerAPI(self.runtime.api_socket)
        return self._api

    async def _undo_start(self) -> None:
        """After a failed boot/restore: nothing may be left behind."""
        await self.kill()
        await self.close()

    async def _explain(self, exc: SmartVMError) -> SmartVMError:
        """A request failed: if the process died meanwhile, say so with its log."""
        if exc.code not in (ErrorCode.FIRECRACKER_API_ERROR, ErrorCode.NO_CLIENT):
            return exc
        if self._process is not None and self._process.returncode is None:
            # A broken connection usually means the process is dying: give it a moment to be reaped.
            await self._process.wait(_DYING_GRACE_S if exc.code is ErrorCode.NO_CLIENT else 0)
        if self._process is not None and self._process.returncode is not None:
            return SmartVMError(
                ErrorCode.FIRECRACKER_EXITED,
                f"firecracker exited with code {self._process.returncode} ({exc.message}); last log lines:\n"
                f"{tail(self.runtime.engine_log) or tail(self.runtime.console_log) or '(empty log)'}",
            )
        return exc

    # --- boot ----------------------------------------------------------------------------------
    async def boot(self, config: MicroVMConfig) -> None:
        self._config = config
        self._dirty_tracking = bool(config.machine_config.track_dirty_pages)
        try:
            api = await self._spawn()
            await self._configure(api, config)
            await api.actions.put(action_type="InstanceStart")
        except SmartVMError as exc:
            err = await self._explain(exc)
            await self._undo_start()
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            await self._undo_start()
            raise

    def _vsock_for(self, config: MicroVMConfig) -> Vsock:
        return config.vsock or Vsock(guest_cid=DEFAULT_GUEST_CID, uds_path=str(self.runtime.vsock_socket))

    async def _configure(self, api: FirecrackerAPI, config: MicroVMConfig) -> None:
        await api.boot.put(**config.boot_source.api_body())
        await api.machine_config.put(**config.machine_config.api_body())
        for drive in config.drives:
            await api.drives.put(**drive.api_body())
        for iface in config.network_interfaces:
            await api.network_interfaces.put(**iface.api_body())
        vsock = self._vsock_for(config)
        self._vsock_path = _prepare_host_files(config, Path(vsock.uds_path))
        await api.vsock.put(**vsock.api_body())
        if config.balloon is not None:
            await api.balloon.put(**config.balloon.api_body())
        if config.mmds is not None:
            await api.mmds_config.put(**config.mmds.api_body())
        if config.logger is not None:
            await api.logger.put(**config.logger.api_body())
        if config.metrics is not None:
            await api.metrics.put(**config.metrics.api_body())
        if config.entropy is not None:
            await api.entropy.put(**config.entropy.api_body())

    # --- restore --------------------------------------------------------------------------------
    async def restore(self, request: RestoreRequest) -> None:
        snapshot = request.snapshot
        self._config = request.config
        self._dirty_tracking = request.enable_diff_snapshots
        body = self._load_body(request)
        links: list[Path] = []
        made_dirs: list[Path] = []
        try:
            api = await self._spawn()
            body.update(await self._vsock_for_restore(api, snapshot))
            links = _link_old_drive_paths(snapshot, request.config, made_dirs)
            await api.snapshot_load.put(**body, resume_vm=False)
            recorded = snapshot.engine_data.get("drive_paths", {})
            for drive in request.config.drives:
                if recorded.get(drive.drive_id) not in (None, drive.path_on_host):
                    await api.drives.patch(drive_id=drive.drive_id, path_on_host=drive.path_on_host)
            if request.resume_vm:
                await api.vm.patch(state="Resumed")
        except SmartVMError as exc:
            err = await self._explain(exc)
            await self._undo_start()
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            await self._undo_start()
            raise
        finally:
            _remove_links(links, made_dirs)

    def _load_body(self, request: RestoreRequest) -> dict[str, Any]:
        snapshot = request.snapshot
        if snapshot.engine != self.name:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_MISMATCH,
                f"snapshot {snapshot.directory} was made by the {snapshot.engine} engine",
            )
        if request.mem_backend == "Uffd":
            if request.uffd_socket is None:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT, "mem_backend='Uffd' needs the page-fault handler's socket"
                )
            backend = {"backend_type": "Uffd", "backend_path": str(request.uffd_socket)}
        else:
            if snapshot.mem_path is None:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID, f"snapshot {snapshot.directory} has no memory file"
                )
            backend = {"backend_type": "File", "backend_path": str(snapshot.mem_path)}
        body: dict[str, Any] = {"snapshot_path": str(snapshot.state_path), "mem_backend": backend}
        if request.enable_diff_snapshots:
            body["track_dirty_pages"] = True
        if request.network_overrides:
            body["network_overrides"] = [
                {"iface_id": o.iface_id, "host_dev_name": o.host_dev_name} for o in request.network_overrides
            ]
        return body

    async def _vsock_for_restore(self, api: FirecrackerAPI, snapshot: Snapshot) -> dict[str, Any]:
        """Where the restored vsock device listens: our runtime dir when Firecracker can override it,
        else the path recorded in the snapshot (its directory is created if needed)."""
        recorded = snapshot.engine_data.get("vsock_uds_path")
        if not recorded:
            return {}
        ours = self.runtime.vsock_socket
        if _version_tuple(await api.version.get()) >= _VSOCK_OVERRIDE_SINCE:
            ours.unlink(missing_ok=True)
            self._vsock_path = ours
            return {"vsock_override": {"uds_path": str(ours)}}
        self._vsock_path = _prepare_old_vsock_path(Path(recorded), self._vsock_dirs)
        return {}

    # --- running VM -------------------------------------------------------------------------------
    async def pause(self) -> None:
        await self.api.vm.patch(state="Paused")

    async def resume(self) -> None:
        await self.api.vm.patch(state="Resumed")

    async def create_snapshot(
        self, snapshot_dir: Path, state_file: str, mem_file: str, snapshot_type: SnapshotType,
        config: MicroVMConfig,
    ) -> Snapshot:
        running = self._config or config
        if snapshot_type == "Diff" and not self._dirty_tracking:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_FAILED,
                "a Diff snapshot needs dirty page tracking: boot the VM with "
                "machine_config.track_dirty_pages=True (or load it with enable_diff_snapshots=True), "
                "or take a Full snapshot",
            )
        api = self.api
        await api.snapshot_create.put(
            snapshot_type=snapshot_type,
            snapshot_path=str(snapshot_dir / state_file),
            mem_file_path=str(snapshot_dir / mem_file),
        )
        disks = _copy_writable_disks(running, snapshot_dir)
        return Snapshot(
            directory=snapshot_dir,
            engine=self.name,
            snapshot_type=snapshot_type,
            state_file=state_file,
            mem_file=mem_file,
            config=config.model_dump(mode="json"),
            disks=disks,
            engine_data={
                "drive_paths": {d.drive_id: d.path_on_host for d in running.drives},
                "vsock_uds_path": str(self._vsock_path) if self._vsock_path else None,
                "firecracker_version": await self._version(api),
            },
        )

    async def _version(self, api: FirecrackerAPI) -> str | None:
        answer = await api.version.get()
        return str(answer.get("firecracker_version")) if isinstance(answer, dict) else None

    async def shutdown(self, timeout: float) -> None:
        """SendCtrlAltDel (with ``reboot=k`` Firecracker exits), then SIGTERM and SIGKILL."""
        process = self._process
        if process is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        if self.is_alive() and self._api is not None:
            with contextlib.suppress(SmartVMError):
                await self._api.actions.put(action_type="SendCtrlAltDel")
            await process.wait(max(0.0, deadline - asyncio.get_running_loop().time()))
        await process.stop(timeout=max(1.0, timeout / 2))
        await self.close()

    async def kill(self) -> None:
        if self._process is not None:
            await self._process.kill()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None
        if self._vsock_path is not None and not self.is_alive():
            self._vsock_path.unlink(missing_ok=True)
            _remove_links([], self._vsock_dirs)
            self._vsock_dirs.clear()

    async def info(self) -> dict[str, Any]:
        answer = await self.api.describe_instance.get()
        return dict(answer) if isinstance(answer, dict) else {"answer": answer}

    async def open_agent_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self._vsock_path or (Path(self._config.vsock.uds_path) if self._config and self._config.vsock
                                    else self.runtime.vsock_socket)
        return await connect_vsock(path, AGENT_VSOCK_PORT, timeout)

    # --- optional features ---------------------------------------------------------------------------
    async def get_vm_config(self) -> dict[str, Any]:
        answer = await self.api.vm_config.get()
        return dict(answer) if isinstance(answer, dict) else {}

    async def update_drive(self, drive_id: str, path_on_host: str) -> None:
        await self.api.drives.patch(drive_id=drive_id, path_on_host=path_on_host)

    async def update_balloon(self, amount_mib: int) -> None:
        await self.api.balloon.patch(amount_mib=amount_mib)

    async def get_balloon_stats(self) -> dict[str, Any]:
        answer = await self.api.balloon_stats.get()
        return dict(answer) if isinstance(answer, dict) else {}

    async def put_metadata(self, data: dict[str, Any]) -> None:
        await self.api.mmds.put(data)

    async def patch_metadata(self, data: dict[str, Any]) -> None:
        await self.api.mmds.patch(data)

    async def get_metadata(self) -> Any:
        return await self.api.mmds.get()

    async def update_network_interface(
        self, iface_id: str, rx_rate_limiter: RateLimiter | None, tx_rate_limiter: RateLimiter | None
    ) -> None:
        await self.api.network_interfaces.patch(
            iface_id=iface_id,
            rx_rate_limiter=rx_rate_limiter.api_body() if rx_rate_limiter else None,
            tx_rate_limiter=tx_rate_limiter.api_body() if tx_rate_limiter else None,
        )

    async def flush_metrics(self) -> None:
        await self.api.actions.put(action_type="FlushMetrics")


def _prepare_host_files(config: MicroVMConfig, vsock_path: Path) -> Path:
    """Files Firecracker expects before configuration: log and metrics files exist (it opens, never
    creates them) and no stale vsock socket (it binds that path)."""
    _remove_stale_socket(vsock_path)
    if config.logger is not None and config.logger.log_path:
        Path(config.logger.log_path).touch()
    if config.metrics is not None:
        Path(config.metrics.metrics_path).touch()
    return vsock_path


def _prepare_old_vsock_path(path: Path, made_dirs: list[Path]) -> Path:
    _remove_stale_socket(
        path,
        hint=" (Firecracker before 1.17 cannot move the vsock socket of a restored VM: "
        "stop the original VM first or use a newer Firecracker)",
    )
    _make_parents(path.parent, made_dirs)
    return path


def _remove_stale_socket(path: Path, hint: str = "") -> None:
    """Remove a leftover socket file; one that still accepts connections belongs to a live VM."""
    if socket_accepts(path):
        raise SmartVMError(
            ErrorCode.INVALID_STATE, f"vsock socket {path} is in use by another running VM{hint}"
        )
    path.unlink(missing_ok=True)


def _copy_writable_disks(config: MicroVMConfig, snapshot_dir: Path) -> dict[str, str]:
    """Consistent (the guest is paused) copy-on-write copies of every writable drive, by drive id."""
    disks: dict[str, str] = {}
    for drive in config.drives:
        if drive.is_read_only:
            continue
        name = f"disk-{sanitize_id(drive.drive_id)}{Path(drive.path_on_host).suffix}"
        target = snapshot_dir / name
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)
        clone_file(drive.path_on_host, part)
        os.replace(part, target)
        disks[drive.drive_id] = name
    return disks


def _version_tuple(answer: Any) -> tuple[int, int]:
    text = str(answer.get("firecracker_version", "")) if isinstance(answer, dict) else ""
    m = _VERSION_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _make_parents(directory: Path, made: list[Path]) -> None:
    """mkdir -p, remembering which directories this call created (to remove them afterwards)."""
    missing = []
    for parent in [directory, *directory.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        made.append(path)


def _link_old_drive_paths(snapshot: Snapshot, config: MicroVMConfig, made_dirs: list[Path]) -> list[Path]:
    """Symlink each drive path recorded in the snapshot that no longer exists to this VM's drive."""
    recorded: dict[str, str] = snapshot.engine_data.get("drive_paths", {})
    links = []
    for drive in config.drives:
        old = recorded.get(drive.drive_id)
        if old is None or old == drive.path_on_host or os.path.lexists(old):
            continue
        _make_parents(Path(old).parent, made_dirs)
        Path(old).symlink_to(drive.path_on_host)
        links.append(Path(old))
    return links


def _remove_links(links: list[Path], made_dirs: list[Path]) -> None:
    for link in links:
        link.unlink(missing_ok=True)
    for directory in reversed(made_dirs):
        with contextlib.suppress(OSError):
            directory.rmdir()
