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

With ``options.jailer`` Firecracker runs chrooted (see :mod:`smartvm.firecracker.jailed`): it is sent a
copy of the config with in-jail paths (``_sent``; the user's config is untouched), snapshots are written
in the jail and moved out, and the jail directory goes when the process is gone (:meth:`close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from smartvm.agent.protocol import AGENT_VSOCK_PORT
from smartvm.config import MicroVMConfig, RateLimiter, Vsock
from smartvm.engine import Engine, RestoreRequest
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.api import FirecrackerAPI
from smartvm.firecracker.binary import require_firecracker
from smartvm.firecracker.jailed import VSOCK_IN_JAIL, VMJail, open_jail, remove_recorded_jail
from smartvm.firecracker.process import LOG_TAIL_LINES, FirecrackerCommand, FirecrackerProcess, socket_accepts
from smartvm.firecracker.vsock import connect_vsock
from smartvm.host.private_dirs import make_private
from smartvm.host.process import tail
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
    title = "Firecracker"

    def __init__(self, runtime: VMRuntime, options: SmartVMOptions) -> None:
        super().__init__(runtime, options)
        self._process: FirecrackerProcess | None = None
        self._api: FirecrackerAPI | None = None
        self._config: MicroVMConfig | None = None
        self._sent: MicroVMConfig | None = None  # the config as Firecracker knows it (in-jail paths)
        self._jail: VMJail | None = None
        self._vsock_path: Path | None = None  # host path of the vsock socket
        self._vsock_dirs: list[Path] = []  # created for a restored vsock socket; removed on close
        self._dirty_tracking = False

    # --- process -----------------------------------------------------------------------------
    @property
    def api(self) -> FirecrackerAPI:
        if self._api is None or not self.is_alive():
            raise SmartVMError(
                ErrorCode.INVALID_STATE, f"VM {self.runtime.vm_id!r} has no running Firecracker process"
            )
        return self._api

    @property
    def process(self) -> FirecrackerProcess | None:
        return self._process

    def _open_jail(self) -> None:
        """With ``options.jailer``: create this VM's jail (before anything is linked or spawned)."""
        if self.options.jailer is not None and self._jail is None:
            self._jail = open_jail(self.options, self.runtime, require_firecracker(self.options))

    async def _spawn(self) -> FirecrackerAPI:
        if self._process is not None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "this engine already started a Firecracker process")
        jail = self._jail.jail if self._jail else None
        command = FirecrackerCommand(
            binary=require_firecracker(self.options),
            api_socket=jail.api_socket if jail else self.runtime.api_socket,
            vm_id=sanitize_id(self.runtime.vm_id),
            netns=None if jail else self.runtime.netns,
            jail=jail,
        )
        self._process = FirecrackerProcess(
            command, console_log=self.runtime.console_log, engine_log=self.runtime.engine_log
        )
        await self._process.start(self.options.socket_timeout_s)
        assert command.api_socket is not None
        self._api = FirecrackerAPI(command.api_socket)
        return self._api

    def _fc_path(self, host: Path) -> str:
        """A host path as the running Firecracker sees it."""
        return self._jail.jail.jail_path(host) if self._jail else str(host)

    def _host_path(self, fc_path: str) -> Path:
        """A path Firecracker was given, as a host path."""
        return self._jail.host_path(fc_path) if self._jail else Path(fc_path)

    async def _undo_start(self) -> None:
        """After a failed boot/restore: nothing may be left behind."""
        await self.kill()
        await self.close()

    async def _explain(self, exc: SmartVMError) -> SmartVMError:
        """A request failed: if the process died meanwhile, say so with its log."""
        if exc.code not in (ErrorCode.FIRECRACKER_API_ERROR, ErrorCode.NO_CLIENT):
            return exc
        if self._process is not None and self._process.is_alive():
            # A broken connection usually means the process is dying: give it a moment to be reaped.
            await self._process.wait_exited(_DYING_GRACE_S if exc.code is ErrorCode.NO_CLIENT else 0)
        if self._process is not None and not self._process.is_alive():
            code = self._process.returncode
            logs = (self.runtime.engine_log, self.runtime.console_log)
            last = next((t for log in logs if (t := tail(log, 16384, lines=LOG_TAIL_LINES))), "(empty log)")
            return SmartVMError(
                ErrorCode.FIRECRACKER_EXITED,
                f"firecracker exited{'' if code is None else f' with code {code}'} ({exc.message}); "
                f"last log lines:\n{last}",
            )
        return exc

    @contextlib.asynccontextmanager
    async def _starting(self) -> AsyncIterator[None]:
        """Around a boot or restore: a failure leaves nothing behind, and a request that failed
        because Firecracker died is reported as its exit, with its log."""
        try:
            yield
        except SmartVMError as exc:
            err = await self._explain(exc)
            await self._undo_start()
            if err is exc:
                raise
            raise err from exc
        except BaseException:
            await self._undo_start()
            raise

    # --- boot ----------------------------------------------------------------------------------
    async def boot(self, config: MicroVMConfig) -> None:
        self._config = config
        self._dirty_tracking = bool(config.machine_config.track_dirty_pages)
        async with self._starting():
            self._open_jail()
            sent = self._firecracker_config(config)
            api = await self._spawn()
            await self._configure(api, sent)
            await api.actions.put(action_type="InstanceStart")

    def _vsock_for(self, config: MicroVMConfig) -> Vsock:
        return config.vsock or Vsock(guest_cid=DEFAULT_GUEST_CID, uds_path=str(self.runtime.vsock_socket))

    def _firecracker_config(self, config: MicroVMConfig) -> MicroVMConfig:
        """What Firecracker is sent: always with a vsock device; jailed, every file linked into the jail."""
        vsock = self._vsock_for(config)
        if self._jail is None:
            self._vsock_path = _prepare_host_files(config, Path(vsock.uds_path))
            self._sent = config.model_copy(update={"vsock": vsock})
        else:
            self._sent = self._jail.boot_config(config, vsock)
            self._vsock_path = self._jail.host_path(VSOCK_IN_JAIL)
        return self._sent

    async def _configure(self, api: FirecrackerAPI, config: MicroVMConfig) -> None:
        """All pre-boot configuration pipelined in one round trip (the caller sends InstanceStart)."""
        optional = (
            (api.vsock, config.vsock),
            (api.balloon, config.balloon),
            (api.mmds_config, config.mmds),
            (api.logger, config.logger),
            (api.metrics, config.metrics),
            (api.entropy, config.entropy),
        )
        await api.send_all(
            [
                api.boot.put_call(**config.boot_source.api_body()),
                api.machine_config.put_call(**config.machine_config.api_body()),
                *(api.drives.put_call(**drive.api_body()) for drive in config.drives),
                *(api.network_interfaces.put_call(**i.api_body()) for i in config.network_interfaces),
                *(resource.put_call(**part.api_body()) for resource, part in optional if part is not None),
            ]
        )

    # --- restore --------------------------------------------------------------------------------
    async def restore(self, request: RestoreRequest) -> None:
        self._config = request.config
        self._dirty_tracking = request.enable_diff_snapshots
        body = self._load_body(request)
        links: list[Path] = []
        made_dirs: list[Path] = []
        try:
            async with self._starting():
                await self._load(request, body, links, made_dirs)
        finally:
            _remove_links(links, made_dirs)

    async def _load(
        self, request: RestoreRequest, body: dict[str, Any], links: list[Path], made_dirs: list[Path]
    ) -> None:
        """Spawn, load the snapshot paused, re-point the drives, resume; symlinks made for
        Firecracker to find the recorded drive paths go into ``links`` (removed by the caller)."""
        snapshot = request.snapshot
        recorded: dict[str, str] = snapshot.engine_data.get("drive_paths", {})
        self._open_jail()
        self._sent = request.config
        if self._jail is not None:  # drives go where the snapshot says, inside the jail
            self._sent = request.config.model_copy(
                update={"drives": self._jail.drives(request.config.drives, at=recorded)}
            )
            body = self._jail.restore_body(body)
        api = await self._spawn()
        body.update(await self._vsock_for_restore(api, snapshot))
        if self._jail is None:
            links.extend(_link_old_drive_paths(snapshot, request.config, made_dirs))
        await api.snapshot_load.put(**body, resume_vm=False)
        for drive in self._sent.drives:
            if recorded.get(drive.drive_id) not in (None, drive.path_on_host):
                await api.drives.patch(drive_id=drive.drive_id, path_on_host=drive.path_on_host)
        if request.resume_vm:
            await api.vm.patch(state="Resumed")

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
            mem_path = request.mem_path or snapshot.mem_path  # a Diff chain comes merged
            if mem_path is None:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID, f"snapshot {snapshot.directory} has no memory file"
                )
            backend = {"backend_type": "File", "backend_path": str(mem_path)}
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
        ours = self._jail.host_path(VSOCK_IN_JAIL) if self._jail else self.runtime.vsock_socket
        if _version_tuple(await api.version.get()) >= _VSOCK_OVERRIDE_SINCE:
            ours.unlink(missing_ok=True)
            self._vsock_path = ours
            return {"vsock_override": {"uds_path": self._fc_path(ours)}}
        if self._jail is not None:  # the recorded path, but inside this VM's own jail
            self._vsock_path = self._jail.old_vsock_path(recorded)
            return {}
        self._vsock_path = _prepare_old_vsock_path(Path(recorded), self._vsock_dirs)
        return {}

    # --- running VM -------------------------------------------------------------------------------
    async def pause(self) -> None:
        await self.api.vm.patch(state="Paused")

    async def resume(self) -> None:
        await self.api.vm.patch(state="Resumed")

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
        sent = self._sent or self._config or config
        if snapshot_type == "Diff" and not self._dirty_tracking:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_FAILED,
                "a Diff snapshot needs dirty page tracking: boot the VM with "
                "machine_config.track_dirty_pages=True (or load it with enable_diff_snapshots=True), "
                "or take a Full snapshot",
            )
        api = self.api
        if self._jail is None:
            state_at, mem_at = str(snapshot_dir / state_file), str(snapshot_dir / mem_file)
        else:  # Firecracker can only write inside its jail: the files are moved out afterwards
            state_at, mem_at = self._jail.snapshot_targets(state_file, mem_file)
        try:
            await api.snapshot_create.put(
                snapshot_type=snapshot_type, snapshot_path=state_at, mem_file_path=mem_at
            )
        except BaseException:
            if self._jail is not None:  # no partial memory file stays in the jail
                self._jail.discard_snapshot()
            raise
        if self._jail is not None:
            self._jail.collect_snapshot(snapshot_dir, (state_file, mem_file))
        disks = _copy_writable_disks(sent, snapshot_dir, self._host_path) if copy_disks else {}
        for name in (state_file, mem_file, *disks.values()):
            make_private(snapshot_dir / name)  # guest RAM and disks: 0600
        return Snapshot(
            directory=snapshot_dir,
            engine=self.name,
            snapshot_type=snapshot_type,
            state_file=state_file,
            mem_file=mem_file,
            config=config.model_dump(mode="json"),
            disks=disks,
            engine_data={
                "drive_paths": {d.drive_id: d.path_on_host for d in sent.drives},
                "vsock_uds_path": self._fc_path(self._vsock_path) if self._vsock_path else None,
                "firecracker_version": await self._version(api),
                "jailed": self._jail is not None,
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
            await process.wait_exited(max(0.0, deadline - asyncio.get_running_loop().time()))
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
        if self._jail is not None and not self.is_alive():
            self._jail.cleanup()
            self._jail = None

    # --- detach / attach -------------------------------------------------------------------------
    async def detach(self) -> dict[str, Any]:
        data = self.record_data()
        if self._api is not None:
            await self._api.close()
            self._api = None
        assert self._process is not None
        self._process.detach()
        self._process = None
        # they belong to the running VM, not to us now
        self._vsock_path, self._vsock_dirs, self._jail = None, [], None
        return data

    def record_data(self) -> dict[str, Any]:
        process = self._process
        if process is None or not process.is_alive() or process.pid is None:
            raise SmartVMError(
                ErrorCode.INVALID_STATE, f"VM {self.runtime.vm_id!r} has no running Firecracker to record"
            )
        return {
            "engine": self.name,
            "pid": process.pid,
            "pid_start_time": process.start_time,
            "api_socket": str(process.command.api_socket) if process.command.api_socket else None,
            "vsock_uds_path": str(self._vsock_path) if self._vsock_path else None,
            "vsock_dirs": [str(d) for d in self._vsock_dirs],
            "dirty_tracking": self._dirty_tracking,
            "config": self._config.model_dump(mode="json") if self._config else None,
            "firecracker_config": self._sent.model_dump(mode="json") if self._sent else None,
            "jail": self._jail.record() if self._jail else None,
        }

    @classmethod
    def forget_record(cls, record: dict[str, Any]) -> None:
        remove_recorded_jail(record)

    @classmethod
    def attach(cls, runtime: VMRuntime, options: SmartVMOptions, record: dict[str, Any]) -> FirecrackerEngine:
        engine = cls(runtime, options)
        api_socket = Path(record["api_socket"]) if record.get("api_socket") else runtime.api_socket
        jail = VMJail.from_record(record["jail"], runtime.drives_dir) if record.get("jail") else None
        command = FirecrackerCommand(
            binary=Path(options.firecracker_binary_path or "firecracker"),
            api_socket=api_socket,
            vm_id=sanitize_id(runtime.vm_id),
            netns=None if jail else runtime.netns,
            jail=jail.jail if jail else None,
        )
        process = FirecrackerProcess.adopt(
            command,
            int(record["pid"]),
            int(record["pid_start_time"]),
            console_log=runtime.console_log,
            engine_log=runtime.engine_log,
        )
        if not process.is_alive():
            raise SmartVMError(
                ErrorCode.VM_NOT_FOUND,
                f"the Firecracker process (pid {record['pid']}) of VM {runtime.vm_id!r} is gone",
            )
        engine._process = process
        engine._jail = jail
        engine._api = FirecrackerAPI(api_socket)
        engine._vsock_path = Path(record["vsock_uds_path"]) if record.get("vsock_uds_path") else None
        engine._vsock_dirs = [Path(d) for d in record.get("vsock_dirs") or []]
        engine._dirty_tracking = bool(record.get("dirty_tracking"))
        config = record.get("config")
        engine._config = MicroVMConfig.model_validate(config) if config else None
        sent = record.get("firecracker_config")
        engine._sent = MicroVMConfig.model_validate(sent) if sent else engine._config
        return engine

    async def info(self) -> dict[str, Any]:
        answer = await self.api.describe_instance.get()
        return dict(answer) if isinstance(answer, dict) else {"answer": answer}

    async def open_agent_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self._vsock_path or (
            Path(self._config.vsock.uds_path)
            if self._config and self._config.vsock
            else self.runtime.vsock_socket
        )
        return await connect_vsock(path, AGENT_VSOCK_PORT, timeout)

    # --- optional features ---------------------------------------------------------------------------
    async def get_vm_config(self) -> dict[str, Any]:
        answer = await self.api.vm_config.get()
        return dict(answer) if isinstance(answer, dict) else {}

    async def update_drive(self, drive_id: str, path_on_host: str) -> None:
        api = self.api
        drives = self._sent.drives if self._sent else []
        drive = next((d for d in drives if d.drive_id == drive_id), None)
        read_only = drive is not None and drive.is_read_only
        fc_path = path_on_host
        if self._jail is not None:  # a jailed Firecracker can only open what is linked into its jail
            fc_path = self._jail.update_drive(drive_id, path_on_host, read_only=read_only)
        try:
            await api.drives.patch(drive_id=drive_id, path_on_host=fc_path)
        except BaseException:
            if self._jail is not None:
                self._jail.forget(fc_path)
            raise
        if self._sent is not None and drive is not None:
            updated = [d.model_copy(update={"path_on_host": fc_path}) if d is drive else d for d in drives]
            self._sent = self._sent.model_copy(update={"drives": updated})

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


def _copy_writable_disks(
    config: MicroVMConfig, snapshot_dir: Path, host_path: Callable[[str], Path]
) -> dict[str, str]:
    """Consistent (the guest is paused) copy-on-write copies of every writable drive, by drive id.

    ``config`` has Firecracker's paths; ``host_path`` maps them to the host (they differ in a jail).
    """
    disks: dict[str, str] = {}
    for drive in config.drives:
        if drive.is_read_only:
            continue
        name = f"disk-{sanitize_id(drive.drive_id)}{Path(drive.path_on_host).suffix}"
        target = snapshot_dir / name
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)
        clone_file(host_path(drive.path_on_host), part)
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
