"""MicroVM: the lifecycle state machine over one engine.

Every step of start/restore that allocates something (runtime dir, staged drives, the hypervisor
process) registers its undo on an AsyncExitStack, so a failure anywhere unwinds everything, and
stop/kill run the same undo. Calls that are invalid in the current state raise INVALID_STATE before
anything is sent to the hypervisor.

A running VM can be detached (:meth:`MicroVM.detach`): the hypervisor keeps running without an owner,
found again through its record in ``<data_dir>/vms`` (see vm_records.py), and a new MicroVM takes
it over with :meth:`MicroVM.attach` (``SmartVM.attach_vm``); stopping it then also removes the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from smartvm.config import MicroVMConfig, RateLimiter
from smartvm.engine import Engine, MemBackend, NetworkOverride, RestoreRequest, override_interfaces
from smartvm.engines import engine_class
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.process import detachable as spawn_detachable
from smartvm.host.process import tail
from smartvm.host.runtime import VMRuntime
from smartvm.host.storage import apply_sparse_diffs
from smartvm.host.sweep import clear_partial, note_partial
from smartvm.options import SmartVMOptions
from smartvm.snapshot import MANIFEST_NAME, Snapshot, SnapshotType
from smartvm.vm_network import require_host_devices

if TYPE_CHECKING:
    from smartvm.agent.client import AgentClient, ExecResult, Files, OutputCallback, Processes
    from smartvm.vm_network import VMNetwork
    from smartvm.vm_records import VMRecord

log = logging.getLogger(__name__)
T = TypeVar("T")
DETACH_HYGIENE_TIMEOUT_S = 15.0
# Makes a drive's file inside the VM's runtime dir (given), e.g. a copy-on-write layer; its path.
DriveLayer = Callable[[Path], Path]


class VMState(StrEnum):
    CREATED = "created"
    CONFIGURING = "configuring"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"
    DETACHED = "detached"  # still running, owned by no MicroVM: see detach()/attach()


_LIVE = (VMState.RUNNING, VMState.PAUSED)


class MicroVM:
    """One microVM. Create it through :meth:`SmartVM.create_vm`, then :meth:`start` it."""

    def __init__(
        self,
        config: MicroVMConfig,
        options: SmartVMOptions,
        engine_name: str,
        *,
        netns: str | None = None,
        on_stopped: Callable[[MicroVM], None] | None = None,
        detachable: bool = False,
        network: VMNetwork | None = None,
    ) -> None:
        self.config = config
        # made when the VM starts (TAP devices on a bridge, or a slot), undone when it stops
        self._network = network
        # decided at creation: only a detachable VM's hypervisor may outlive this process (else it gets
        # the parent-death signal, see host/process.py)
        self.detachable = detachable
        self.options = options
        self.engine_name = engine_name
        self.netns = netns
        self._state = VMState.CREATED
        self._engine: Engine | None = None
        self._runtime: VMRuntime | None = None
        self._undo = AsyncExitStack()
        self._on_stopped = on_stopped
        self._agent: AgentClient | None = None
        # set after a restore: the guest's clock and RNG state are as old as the snapshot (and its RNG
        # state is shared with every other clone); the agent's prepare hook fixes both once
        self._restored = False
        self.hostname: str | None = None  # given to the guest after a restore, when set
        self._last_snapshot: Snapshot | None = None  # the base of the next Diff snapshot
        self._watcher: asyncio.Task[None] | None = None
        self.exit_console: str | None = None  # console tail kept when the hypervisor exited on its own
        # why the hypervisor exited, for a request that was waiting for the agent meanwhile (the
        # teardown closes the agent client under it: it must learn the cause, not "client closed")
        self._agent_exit_error: SmartVMError | None = None
        self._lock = asyncio.Lock()
        self._started_at: float | None = None  # Unix time the hypervisor was launched

    # --- identity and state ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.config.id

    @property
    def state(self) -> VMState:
        """The lifecycle state; a live VM whose hypervisor died reports ``stopped``."""
        if self._state in _LIVE and self._engine is not None and not self._engine.is_alive():
            return VMState.STOPPED
        return self._state

    @property
    def console_log_path(self) -> Path | None:
        return self._runtime.console_log if self._runtime else None

    def get_runtime_dir(self) -> Path | None:
        return self._runtime.dir if self._runtime else None

    @property
    def started_at(self) -> float | None:
        """Unix time the hypervisor was launched (kept across detach/attach)."""
        return self._started_at

    def _require(self, action: str, *states: VMState) -> None:
        current = self.state
        if current not in states:
            console = self._exit_console_now()
            if console is not None:
                hypervisor = engine_class(self.engine_name).title
                raise SmartVMError(
                    ErrorCode.VM_EXITED,
                    f"cannot {action} VM {self.id!r}: its hypervisor ({hypervisor}) exited on its own "
                    f"(guest powered off, crashed or was killed). Last console output:\n{console}",
                )
            allowed = ", ".join(s.value for s in states)
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                f"cannot {action} VM {self.id!r} while it is {current.value}; it must be {allowed}",
            )

    def _exit_console_now(self) -> str | None:
        """The console tail if the hypervisor exited on its own, whether or not the watcher has
        cleaned up yet (so the error does not depend on that race); None otherwise."""
        if self.exit_console is not None and self._state is VMState.STOPPED:
            return self.exit_console
        if self._state in _LIVE and self._engine is not None and not self._engine.is_alive():
            return tail(self._runtime.console_log) if self._runtime else ""
        return None

    def _engine_or_raise(self) -> Engine:
        if self._engine is None:
            raise SmartVMError(
                ErrorCode.INVALID_STATE, f"VM {self.id!r} has no running hypervisor; start it first"
            )
        return self._engine

    # --- start / restore -------------------------------------------------------------------------
    async def start(self) -> None:
        """Boot the VM: runtime dir, staged drives, hypervisor, guest."""
        async with self._lock:
            self._require("start", VMState.CREATED)
            await self._launch(lambda engine, config: engine.boot(config), self.config, network=self._network)

    async def load_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        *,
        resume_vm: bool = True,
        enable_diff_snapshots: bool = False,
        mem_backend: MemBackend = "File",
        network_overrides: Sequence[NetworkOverride] | None = None,
    ) -> None:
        """Bring this (not yet booted) VM up from a snapshot instead of booting it.

        The VM keeps its own configuration; the snapshot's disks replace its writable drives.
        A snapshot made with a different memory size or device set fails with SNAPSHOT_MISMATCH.
        """
        if mem_backend not in ("File", "Uffd"):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"mem_backend must be 'File' or 'Uffd', not {mem_backend!r}"
            )
        uffd = Path(mem_file_path) if mem_backend == "Uffd" else None
        snapshot = _snapshot_for(
            Path(snapshot_path), None if uffd else Path(mem_file_path), self.engine_name, self.config
        )
        await self.restore_from(
            snapshot,
            resume_vm=resume_vm,
            enable_diff_snapshots=enable_diff_snapshots,
            mem_backend=mem_backend,
            uffd_socket=uffd,
            network_overrides=network_overrides or (),
        )

    async def restore_from(
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
        """Bring this VM up from ``snapshot``; ``drive_layers``: see :meth:`SmartVM.restore_vm`."""
        async with self._lock:
            self._require("load a snapshot into", VMState.CREATED)
            if snapshot.engine != self.engine_name:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_MISMATCH,
                    f"snapshot in {snapshot.directory} was made by the {snapshot.engine} engine; "
                    f"this VM uses {self.engine_name}",
                )
            drives = [
                d.model_copy(update={"path_on_host": str(snapshot.disk_path(d.drive_id)), "ephemeral": True})
                if d.drive_id in snapshot.disks
                else d
                for d in self.config.drives
            ]
            config = self.config.model_copy(
                update={
                    "drives": drives,
                    "network_interfaces": override_interfaces(
                        self.config.network_interfaces, network_overrides
                    ),
                }
            )

            chain = snapshot.chain() if mem_backend == "File" else [snapshot]

            async def restore(engine: Engine, staged: MicroVMConfig) -> None:
                await engine.restore(
                    RestoreRequest(
                        snapshot=snapshot,
                        config=staged,
                        resume_vm=resume_vm,
                        enable_diff_snapshots=enable_diff_snapshots,
                        mem_backend=mem_backend,
                        uffd_socket=uffd_socket,
                        network_overrides=tuple(network_overrides),
                        mem_path=await _merged_memory(chain, engine.runtime.dir),
                    )
                )

            self._restored = True  # before the VM can be used: no request may go out before the hygiene
            await self._launch(restore, config, paused=not resume_vm, layers=drive_layers)
            self._last_snapshot = snapshot

    async def _launch(
        self,
        run: Callable[[Engine, MicroVMConfig], Any],
        config: MicroVMConfig,
        *,
        paused: bool = False,
        network: VMNetwork | None = None,
        layers: Mapping[str, DriveLayer] | None = None,
    ) -> None:
        self._state = VMState.CONFIGURING
        try:
            async with AsyncExitStack() as stack:
                if network is not None:  # the VM's config (and snapshots of it) name what was made
                    attached = await network.attach(self.id, config, stack)
                    config = self.config = attached.config
                    self.netns = attached.netns or self.netns
                require_host_devices(config)
                runtime = VMRuntime.create(self.options.runtime_dir, self.id, netns=self.netns)
                stack.callback(runtime.remove)
                if layers:
                    config = _with_layers(config, runtime.dir, layers)
                staged = runtime.stage_drives(
                    config, ephemeral_writable=self.options.ephemeral_writable_drives
                )
                engine = engine_class(self.engine_name)(runtime, self.options)
                stack.push_async_callback(engine.close)
                stack.push_async_callback(engine.kill)
                with spawn_detachable(self.detachable):
                    await run(engine, staged)
                self._runtime, self._engine = runtime, engine
                self._started_at = time.time()
                self._undo = stack.pop_all()
        except BaseException:
            self._state = VMState.ERROR
            raise
        self._state = VMState.PAUSED if paused else VMState.RUNNING
        self._watcher = asyncio.create_task(self._watch(engine), name=f"smartvm-watch-{self.id}")

    async def _watch(self, engine: Engine) -> None:
        """Clean up as soon as the hypervisor exits on its own (guest poweroff, panic, killed)."""
        await engine.wait_exited()
        async with self._lock:
            if self._engine is engine:
                log.info("VM %s: hypervisor exited; cleaning up", self.id)
                self.exit_console = tail(self._runtime.console_log) if self._runtime else ""
                self._agent_exit_error = engine.exited_error("waiting for the guest agent failed")
                await self._teardown()

    # --- detach / attach --------------------------------------------------------------------------
    async def detach(self) -> VMRecord:
        """Let the running VM outlive this object (and this process).

        The engine lets go of the hypervisor without stopping it and a record is written atomically to
        ``<data_dir>/vms/<id>.json``; :meth:`SmartVM.attach_vm` takes the VM over again. This object is
        ``detached`` afterwards and can do nothing more.
        """
        from smartvm.vm_records import VMRecordStore

        async with self._lock:
            self._require("detach", *_LIVE)
            if not self.detachable:
                raise SmartVMError(
                    ErrorCode.INVALID_STATE,
                    f"VM {self.id!r} was not created detachable: its hypervisor dies with this process; "
                    "create it with create_vm(..., detachable=True) to detach it",
                )
            engine, runtime = self._engine_or_raise(), self._runtime
            assert runtime is not None
            store = VMRecordStore(self.options.data_dir)
            other = store.load(self.id)
            if other is not None and other.runtime_dir != runtime.dir and other.is_alive():
                raise SmartVMError(
                    ErrorCode.DUPLICATE_VM_ID,
                    f"a detached VM with id {self.id!r} already runs (pid {other.pid}); stop it first",
                )
            if self._restored and self._state is VMState.RUNNING:
                # whoever attaches later does not know it was restored: do the hygiene now
                try:
                    await self.agent.prepare(DETACH_HYGIENE_TIMEOUT_S)
                except SmartVMError as exc:
                    log.warning("VM %s: post-restore reseed/clock before detach failed: %s", self.id, exc)
            watcher, self._watcher = self._watcher, None
            if watcher is not None:
                watcher.cancel()
            if self._agent is not None:
                await self._agent.close()
                self._agent = None
            data = await engine.detach()
            try:
                record = self._record_of(data, runtime.dir)
                store.save(record)
            except BaseException:
                # without a record nobody could find the VM again: end it rather than leak it
                adopted = engine_class(self.engine_name).attach(runtime, self.options, data)
                await adopted.kill()
                await adopted.close()
                await self._teardown()
                raise
            self._undo.pop_all()  # the runtime dir and the process now belong to the record
            self._engine = None
            self._runtime = None
            self._state = VMState.DETACHED
            if self._on_stopped is not None:
                self._on_stopped(self)
            return record

    def _record_of(self, data: dict[str, Any], runtime_dir: Path) -> VMRecord:
        from smartvm.vm_records import VMRecord

        return VMRecord(
            id=self.id,
            engine=self.engine_name,
            pid=int(data["pid"]),
            pid_start_time=int(data["pid_start_time"]),
            state="paused" if self._state is VMState.PAUSED else "running",
            runtime_dir=runtime_dir,
            netns=self.netns,
            started_at=self._started_at or time.time(),
            config=self.config.model_dump(mode="json"),
            engine_data=data,
        )

    async def record(self) -> VMRecord:
        """Write this VM's detached-VM record now and go on driving it: if this process dies, the
        VM runs on and :meth:`SmartVM.attach_vm` takes it over (stop or kill remove the record).
        Cheaper than :meth:`detach` + attach: the connections to the VM stay open."""
        from smartvm.vm_records import VMRecordStore

        async with self._lock:
            self._require("record", *_LIVE)
            if not self.detachable:
                raise SmartVMError(
                    ErrorCode.INVALID_STATE,
                    f"VM {self.id!r} was not created detachable; create it with detachable=True",
                )
            engine, runtime = self._engine_or_raise(), self._runtime
            assert runtime is not None
            store = VMRecordStore(self.options.data_dir)
            record = self._record_of(engine.record_data(), runtime.dir)
            store.save(record)
            undo = AsyncExitStack()  # stop/kill: the VM and its runtime dir go first, then the record
            undo.callback(store.remove, self.id)
            undo.push_async_callback(self._undo.aclose)
            self._undo = undo
            return record

    async def attach(self, record: VMRecord) -> None:
        """Take over the detached VM described by ``record`` (this MicroVM must be new).

        Stopping or killing the VM afterwards, or its hypervisor exiting, removes the record and the
        runtime dir. Raises VM_NOT_FOUND when the hypervisor of the record is gone.
        """
        from smartvm.vm_records import VMRecordStore

        async with self._lock:
            self._require("attach", VMState.CREATED)
            if record.id != self.id or record.engine != self.engine_name:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"record of {record.id!r} ({record.engine}) does not describe VM {self.id!r} "
                    f"({self.engine_name})",
                )
            runtime = VMRuntime.existing(record.runtime_dir, self.id, netns=record.netns)
            engine = engine_class(record.engine).attach(runtime, self.options, record.engine_data)
            store = VMRecordStore(self.options.data_dir)
            undo = AsyncExitStack()
            undo.callback(store.remove, self.id)
            undo.callback(runtime.remove)
            undo.push_async_callback(engine.close)
            undo.push_async_callback(engine.kill)
            self._runtime, self._engine, self._undo = runtime, engine, undo
            self._started_at = record.started_at
            self._state = VMState.PAUSED if record.state == "paused" else VMState.RUNNING
            self._watcher = asyncio.create_task(self._watch(engine), name=f"smartvm-watch-{self.id}")

    # --- pause / resume / stop ------------------------------------------------------------------
    async def pause(self) -> None:
        async with self._lock:
            self._require("pause", VMState.RUNNING)
            await self._engine_or_raise().pause()
            self._state = VMState.PAUSED

    async def resume(self) -> None:
        async with self._lock:
            self._require("resume", VMState.PAUSED)
            await self._engine_or_raise().resume()
            self._state = VMState.RUNNING

    async def stop(self, timeout: float | None = None) -> None:
        """Ask the guest to power off, end the hypervisor after ``timeout``, and clean up. Idempotent."""
        async with self._lock:
            if self._state in _LIVE and self._engine is not None and self._engine.is_alive():
                try:
                    await self._engine.shutdown(self.options.stop_timeout_s if timeout is None else timeout)
                except SmartVMError as exc:
                    log.warning("graceful stop of %s failed, killing it: %s", self.id, exc)
            await self._teardown()

    async def kill(self) -> None:
        """End the hypervisor at once and clean up. Idempotent."""
        async with self._lock:
            await self._teardown()

    async def _teardown(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        try:
            await self._undo.aclose()
        finally:
            self._engine = None
            self._runtime = None
            if self._state is not VMState.STOPPED:
                self._state = VMState.STOPPED
                if self._on_stopped is not None:
                    self._on_stopped(self)

    # --- snapshots ---------------------------------------------------------------------------
    async def create_snapshot(
        self,
        snapshot_path: str | Path,
        mem_file_path: str | Path,
        snapshot_type: SnapshotType = "Full",
        *,
        pause_vm: bool = False,
        copy_disks: bool = True,
    ) -> Snapshot:
        """Snapshot a paused VM into the directory of ``snapshot_path``.

        With ``pause_vm=True`` a running VM is paused for the snapshot and resumed afterwards.
        ``copy_disks=False`` leaves the writable disks out: a restore then uses the drives its VM
        config names, which must hold exactly what the disks held at the snapshot.
        Both files must be in the same directory (the snapshot directory).
        """
        snapshot_path, mem_file_path = Path(snapshot_path), Path(mem_file_path)
        if snapshot_type not in ("Full", "Diff"):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"snapshot_type must be 'Full' or 'Diff', not {snapshot_type!r}"
            )
        if snapshot_path.parent.resolve() != mem_file_path.parent.resolve():
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                "snapshot_path and mem_file_path must be in the same directory (the snapshot directory)",
            )
        async with self._lock:
            states = (VMState.PAUSED, VMState.RUNNING) if pause_vm else (VMState.PAUSED,)
            self._require("snapshot (pass pause_vm=True to pause it around the snapshot)", *states)
            engine = self._engine_or_raise()
            base = self._diff_base(snapshot_path.parent) if snapshot_type == "Diff" else None
            was_running = self._state is VMState.RUNNING
            if was_running:
                await engine.pause()
                self._state = VMState.PAUSED
            made: Path | None = None
            try:
                made = _make_dirs(snapshot_path.parent)
                if self._runtime is not None:  # if this process dies now, a sweep removes the parts
                    note_partial(self._runtime.dir, snapshot_path.parent, made)
                snapshot = await engine.create_snapshot(
                    snapshot_path.parent,
                    snapshot_path.name,
                    mem_file_path.name,
                    snapshot_type,
                    self.config,
                    copy_disks=copy_disks,
                )
                if base is not None:
                    snapshot = dataclasses.replace(snapshot, base=str(base.directory.resolve()))
                snapshot.save()
                self._last_snapshot = snapshot
            except BaseException:
                if made is not None:  # a directory only this snapshot used: leave no half of it behind
                    shutil.rmtree(made, ignore_errors=True)
                raise
            finally:
                if self._runtime is not None:
                    clear_partial(self._runtime.dir)
                if was_running and engine.is_alive():
                    await engine.resume()
                    self._state = VMState.RUNNING
            return snapshot

    def _diff_base(self, snapshot_dir: Path) -> Snapshot:
        """The snapshot a Diff snapshot into ``snapshot_dir`` is laid over (checked before any request)."""
        engine = self._engine_or_raise()
        if not engine.supports_diff_snapshots:
            raise SmartVMError(
                ErrorCode.UNSUPPORTED_BY_ENGINE,
                f"Diff snapshots are not supported by the {engine.name} engine; take a Full snapshot",
            )
        base = self._last_snapshot
        if base is None:
            raise SmartVMError(
                ErrorCode.INVALID_STATE,
                f"VM {self.id!r} has no earlier snapshot: a Diff snapshot holds only the memory changed "
                "since the VM's previous snapshot (or since it was restored); take a Full snapshot first",
            )
        if base.directory.resolve() == snapshot_dir.resolve():
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"a Diff snapshot needs its own directory: {snapshot_dir} holds its base snapshot",
            )
        return base

    # --- guest agent ---------------------------------------------------------------------------
    @property
    def agent(self) -> AgentClient:
        """The client of the guest agent (one multiplexed connection, opened on first use). Its first
        request of any kind waits for the guest agent and, after a restore, for :meth:`_prepare_agent`."""
        if self._agent is None:
            from smartvm.agent.client import AgentClient

            self._agent = AgentClient(self._engine_or_raise().open_agent_stream, prepare=self._prepare_agent)
        return self._agent

    async def _prepare_agent(self, agent: AgentClient, timeout: float) -> None:
        """Run once before the first request: wait for the agent (failing at once if the hypervisor
        dies meanwhile) and, after a restore, reseed the guest RNG from the host and set its clock, so
        clones of one snapshot share no random state and no caller sees the snapshot's time."""
        engine = self._engine_or_raise()
        await _unless_exited(engine, agent.wait_ready(timeout), "waiting for the guest agent")
        if self._restored:
            both = asyncio.gather(agent.reseed(hostname=self.hostname), agent.set_time())  # pipelined
            await _unless_exited(engine, both, "reseeding the guest RNG and setting its clock")
            self._restored = False

    async def _ready_agent(self, timeout: float) -> AgentClient:
        self._require("talk to the agent of", VMState.RUNNING)
        agent = self.agent
        try:
            await agent.prepare(timeout)
        except SmartVMError:
            if self._agent_exit_error is not None:
                raise self._agent_exit_error from None
            raise
        return agent

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the guest agent answers (and, after a restore, reseed its RNG and set its clock)."""
        await self._ready_agent(timeout)

    async def exec(
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
        """Run a command in the guest once its agent is ready (waiting up to ``ready_timeout``); see
        :meth:`AgentClient.exec` for the options (``max_output_bytes=None``: the client's default)."""
        agent = await self._ready_agent(ready_timeout)
        limit = {} if max_output_bytes is None else {"max_output_bytes": max_output_bytes}
        return await agent.exec(
            cmd,
            env=env,
            cwd=cwd,
            user=user,
            stdin=stdin,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            **limit,
        )

    @property
    def files(self) -> Files:
        """Guest files: ``await vm.files.write(path, data)``, ``read``, ``list``, ``stat``, ..."""
        self._require("use the files of", VMState.RUNNING)
        return self.agent.files

    @property
    def processes(self) -> Processes:
        """Background processes in the guest: ``start``, ``list``, ``send_stdin``, ``signal``, ``wait``."""
        self._require("use the processes of", VMState.RUNNING)
        return self.agent.processes

    # --- info and device updates ---------------------------------------------------------------
    async def get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "engine": self.engine_name,
            "runtime_dir": str(self.get_runtime_dir()) if self._runtime else None,
            "console_log": str(self.console_log_path) if self._runtime else None,
        }
        if self._engine is not None and self._engine.is_alive():
            info["engine_info"] = await self._engine.info()
        return info

    async def get_vm_config(self) -> dict[str, Any]:
        self._require("read the config of", *_LIVE)
        return await self._engine_or_raise().get_vm_config()

    async def update_drive(self, drive_id: str, path_on_host: str) -> None:
        self._require("update a drive of", *_LIVE)
        if drive_id not in {d.drive_id for d in self.config.drives}:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"VM {self.id!r} has no drive {drive_id!r}")
        await self._engine_or_raise().update_drive(drive_id, path_on_host)

    async def update_balloon(self, amount_mib: int) -> None:
        self._require("update the balloon of", *_LIVE)
        if self.config.balloon is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, f"VM {self.id!r} was configured without a balloon")
        await self._engine_or_raise().update_balloon(amount_mib)

    async def get_balloon_stats(self) -> dict[str, Any]:
        self._require("read balloon statistics of", *_LIVE)
        return await self._engine_or_raise().get_balloon_stats()

    async def put_metadata(self, data: dict[str, Any]) -> None:
        self._require("set metadata of", *_LIVE)
        await self._engine_or_raise().put_metadata(data)

    async def patch_metadata(self, data: dict[str, Any]) -> None:
        self._require("update metadata of", *_LIVE)
        await self._engine_or_raise().patch_metadata(data)

    async def get_metadata(self) -> Any:
        self._require("read metadata of", *_LIVE)
        return await self._engine_or_raise().get_metadata()

    async def update_network_interface(
        self,
        iface_id: str,
        *,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._require("update a network interface of", *_LIVE)
        if iface_id not in {n.iface_id for n in self.config.network_interfaces}:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"VM {self.id!r} has no network interface {iface_id!r}"
            )
        await self._engine_or_raise().update_network_interface(iface_id, rx_rate_limiter, tx_rate_limiter)

    async def flush_metrics(self) -> None:
        self._require("flush metrics of", *_LIVE)
        await self._engine_or_raise().flush_metrics()

    # --- context manager ---------------------------------------------------------------------
    async def __aenter__(self) -> MicroVM:
        if self._state is VMState.CREATED:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"MicroVM(id={self.id!r}, engine={self.engine_name!r}, state={self.state.value!r})"


def _with_layers(config: MicroVMConfig, runtime_dir: Path, layers: Mapping[str, DriveLayer]) -> MicroVMConfig:
    """``config`` with each drive of ``layers`` on the file its function made in ``runtime_dir``."""
    paths: dict[str, str] = {}
    for drive_id, make in layers.items():
        path = Path(make(runtime_dir))
        if not path.resolve().is_relative_to(runtime_dir.resolve()):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"the layer of drive {drive_id!r} is {path}, outside the VM's runtime dir {runtime_dir}: "
                "it would outlive the VM; make it inside the directory the function is given",
            )
        paths[drive_id] = str(path)
    drives = [
        d.model_copy(update={"path_on_host": paths[d.drive_id], "ephemeral": False})
        if d.drive_id in paths
        else d
        for d in config.drives
    ]
    return config.model_copy(update={"drives": drives})


async def _unless_exited(engine: Engine, work: Awaitable[T], what: str) -> T:
    """``work``, unless the hypervisor exits first: then fail at once with the reason (not after a
    timeout spent retrying a dead VM)."""
    job = asyncio.ensure_future(work)
    exited = asyncio.ensure_future(engine.wait_exited(0.05))
    try:
        await asyncio.wait({job, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
    if job.done() and not job.cancelled():
        if job.exception() is None:
            return job.result()
        # a lost agent connection is often the hypervisor dying: give it a moment to finish, so
        # the error names the cause (a full tmpfs, a signal) rather than the dropped connection
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.wait_exited(0.02), _EXIT_GRACE_S)
        if engine.is_alive():
            return job.result()
    raise engine.exited_error(f"{what} failed")


_EXIT_GRACE_S = 0.5  # how long a failed agent call waits for a dying hypervisor to be gone


def _snapshot_for(
    snapshot_path: Path, mem_file_path: Path | None, engine_name: str, config: MicroVMConfig
) -> Snapshot:
    """The snapshot at ``snapshot_path``: its manifest when there is one, else a bare Firecracker pair
    (``mem_file_path`` is None when the memory comes from a UFFD handler)."""
    directory = snapshot_path.parent
    if (directory / MANIFEST_NAME).exists():
        return Snapshot.load(directory)
    if engine_name != "firecracker":
        raise SmartVMError(
            ErrorCode.SNAPSHOT_INVALID,
            f"{directory} has no {MANIFEST_NAME}; create snapshots with create_snapshot()",
        )
    if mem_file_path is not None and mem_file_path.parent.resolve() != directory.resolve():
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, "snapshot_path and mem_file_path must be in the same directory"
        )
    for path in (snapshot_path, mem_file_path):
        if path is not None and not path.is_file():
            raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"snapshot file {path} does not exist")
    return Snapshot(
        directory=directory,
        engine="firecracker",
        snapshot_type="Full",
        state_file=snapshot_path.name,
        mem_file=mem_file_path.name if mem_file_path else None,
        config=config.model_dump(mode="json"),
    )


async def _merged_memory(chain: list[Snapshot], runtime_dir: Path) -> Path | None:
    """For a Diff snapshot, its full memory (the chain's layers merged into the runtime dir), else None."""
    if len(chain) < 2:
        return None
    layers = [s.mem_path for s in chain]
    files = [layer for layer in layers if layer is not None]
    if len(files) != len(layers):
        raise SmartVMError(
            ErrorCode.SNAPSHOT_INVALID, f"a snapshot in the chain of {chain[-1].directory} has no memory file"
        )
    merged = runtime_dir / "memory.merged"
    await asyncio.to_thread(apply_sparse_diffs, files[0], files[1:], merged)
    return merged


def _make_dirs(directory: Path) -> Path | None:
    """``mkdir -p directory``; returns the topmost directory it created (None when it existed)."""
    top = None
    for path in [directory, *directory.parents]:
        if path.exists():
            break
        top = path
    ensure_private_dir(directory)  # snapshots hold guest RAM: created 0700, refused if planted
    return top
