"""SandboxManager: templates, sandboxes restored from them, pause to disk, snapshots, deadlines.

Layout of a data dir (one manager at a time holds ``manager.lock``)::

    sandboxes.db                 durable state (SQLite, WAL): every change is written before it is told
    vms/<sb-id>.json             records of the running sandbox VMs (they outlive the manager's process)
    templates/<name>/<key>/      ready templates (disk.img + snapshot/), see smartvm.sandbox.templates
    sandboxes/<sb-id>/disk/      the sandbox's copy-on-write layer over its template's disk.img
    sandboxes/<sb-id>/paused/    memory and device state while the sandbox is paused to disk

A running sandbox is a detached, recorded VM in its own network slot (namespace), so a crash of
the manager's process loses none: the next manager re-adopts them (:mod:`smartvm.sandbox.reconcile`).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.nat import EgressPolicy
from smartvm.host.netns import NetworkSlot, SlotPool
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.storage import clone_file
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.sandbox.cow import CowDisk, CowLayer, CowStrategy, choose_strategy, strategy_named
from smartvm.sandbox.record_cache import RecordCache
from smartvm.sandbox.sandbox import Sandbox, SandboxInfo, SandboxMetrics
from smartvm.sandbox.settings import SandboxSettings
from smartvm.sandbox.store import (
    EventRecord,
    ManagerLock,
    SandboxRecord,
    SandboxState,
    SandboxStore,
    SnapshotRecord,
    TemplateRecord,
    acquire_manager_lock,
)
from smartvm.sandbox.templates import (
    DISK_FILE,
    ROOT_DRIVE,
    SNAPSHOT_DIR,
    BuiltTemplate,
    Progress,
    TemplateSpec,
    base_template_spec,
    build_template,
)
from smartvm.sandbox.warm import WarmPool, WarmSandbox, run_once_and_park
from smartvm.snapshot import MANIFEST_NAME, Snapshot
from smartvm.vm import MicroVM, VMState

log = logging.getLogger(__name__)
S = SandboxState
_ACTIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSING, S.RESUMING, S.STOPPING})  # they hold a VM
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_RESTORE_BROKEN = frozenset(
    {
        ErrorCode.SNAPSHOT_INVALID,
        ErrorCode.SNAPSHOT_MISMATCH,
        ErrorCode.VM_EXITED,
        ErrorCode.QEMU_EXITED,
        ErrorCode.AGENT_TIMEOUT,
        ErrorCode.COW_FAILED,
    }
)


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    source_sandbox: str | None
    created_at: float
    size_bytes: int  # allocated on disk: flattened disk + memory + state


@dataclass(frozen=True)
class Capacity:
    """What the manager runs against its limits, and what the host has left."""

    active: int  # sandboxes holding a VM (not paused, stopped or failed)
    max_sandboxes: int
    memory_used_mib: int  # guest memory of the active sandboxes
    memory_limit_mib: int
    host_available_mib: int
    warm: int  # sandboxes restored ahead of time


@dataclass
class _Live:
    """What a running sandbox holds."""

    vm: MicroVM
    slot: NetworkSlot
    disk: CowDisk


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{what} name {name!r} must be 1-63 characters: lowercase letters, digits, '.', '_', '-'",
        )
    return name


def _string_map(values: Mapping[str, str] | None, what: str) -> dict[str, str]:
    out = dict(values or {})
    for k, v in out.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or "\0" in k + v:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{what} must map non-empty strings to strings")
    return out


def _reraise(exc: BaseException, what: str) -> NoReturn:
    """Raise ``exc`` from an ``except`` block: SmartVMErrors and cancellations (or Ctrl-C) as they
    are, any other exception as SANDBOX_FAILED caused by it."""
    if isinstance(exc, SmartVMError) or not isinstance(exc, Exception):
        raise exc
    raise SmartVMError(ErrorCode.SANDBOX_FAILED, f"{what}: {type(exc).__name__}: {exc}") from exc


def _host_memory_mib() -> tuple[int, int]:
    """(total, available) host memory in MiB."""
    info: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) // 1024
    return info.get("MemTotal", 0), info.get("MemAvailable", 0)


RESUMED_PREFIX = ".resumed-"  # pause files of a resumed sandbox, deleted in the background
FORK_KIND = "fork"  # a template kind: the snapshot between a sandbox and its forks
FORK_PREFIX = "fork-"
MAX_FORKS = 100


def _describe(policy: EgressPolicy) -> str:
    parts = [f"default {policy.default}"]
    parts += [
        f"{name} {', '.join(cidrs)}"
        for name, cidrs in (("allow", policy.allow), ("deny", policy.deny))
        if cidrs
    ]
    return "; ".join(parts)


def _policy(network: Mapping[str, Any]) -> EgressPolicy:
    egress = network.get("egress") or {}
    return EgressPolicy(
        egress.get("default", "allow"), tuple(egress.get("allow", ())), tuple(egress.get("deny", ()))
    )


class SandboxManager:
    """Creates and runs sandboxes on this host; one per data dir (a second gets DATA_DIR_IN_USE).

    Use ``async with SandboxManager(data_dir=DIR) as mgr:``. Closing it leaves running sandboxes
    running for the next manager (``settings.on_close``: ``keep``, ``pause`` or ``kill``).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        options: SmartVMOptions | None = None,
        settings: SandboxSettings | None = None,
    ) -> None:
        base = settings or SandboxSettings()
        if data_dir is not None:
            base = base.model_copy(update={"data_dir": Path(data_dir)})
        self.settings = base
        self.data_dir = Path(os.path.abspath(base.data_dir))
        opts = options or SmartVMOptions()
        # the VM records of sandboxes live with the rest of the sandbox state
        self.options = opts.model_copy(update={"data_dir": self.data_dir})
        self._svm = SmartVM(self.options)
        self._store: SandboxStore | None = None
        self._lock_file: ManagerLock | None = None
        self._pool: SlotPool | None = None
        self._cow: CowStrategy | None = None
        self._recs = RecordCache()
        self._live: dict[str, _Live] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._admission = asyncio.Lock()
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._templates: dict[str, tuple[BuiltTemplate, TemplateRecord]] = {}  # ready ones, by name
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._forking: set[str] = set()  # fork snapshots whose forks are being created
        self._background: set[asyncio.Task[None]] = set()  # cleanup nobody waits for (see close)
        self.engine = ""  # the engine of every sandbox VM, chosen at start()
        self._warm = WarmPool(base.warm_pool_size, self._make_warm, self._discard_warm)

    # --- lifecycle of the manager ----------------------------------------------------------------
    async def start(self) -> None:
        """Lock the data dir, open the state, re-adopt what a previous manager left, start the reaper."""
        if self._store is not None:
            return
        ensure_private_dir(self.data_dir)
        self._lock_file = acquire_manager_lock(self.data_dir)
        try:
            self._store = SandboxStore(self.data_dir)
            for sub in ("templates", "sandboxes"):
                ensure_private_dir(self.data_dir / sub)
            self._pool = SlotPool(
                self.settings.slot_pool_size,
                prefix=self.settings.slot_prefix,
                transit=self.settings.slot_transit,
                meta={"manager": str(self.data_dir)},
            )
            engine = self.engine = await self._svm.select_engine()
            if self.settings.cow_strategy is not None:
                self._cow = strategy_named(self.settings.cow_strategy, engine, self.data_dir / "sandboxes")
                status = self._cow.available()
                if not status:
                    raise SmartVMError(
                        ErrorCode.COW_UNAVAILABLE, f"copy-on-write {self._cow.name}: {status.reason}"
                    )
            else:
                self._cow = choose_strategy(engine, self.data_dir / "sandboxes")
            from smartvm.sandbox.reconcile import reconcile

            await reconcile(self)
            await self._collect_forks()  # a crash may have left a fork snapshot no one uses
            await self._pool.start()
        except BaseException:
            await self._shutdown_resources()
            raise
        self._reaper = asyncio.create_task(self._reap_forever(), name="smartvm-sandbox-reaper")

    async def close(self) -> None:
        """Stop the reaper and let go of the data dir; running sandboxes are kept (re-adopted by the
        next manager), paused or killed according to ``settings.on_close``."""
        if self._closed or self._store is None:
            self._closed = True
            return
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self._warm.close()
        mode = self.settings.on_close
        for sid in list(self._live):
            try:
                if mode == "kill":
                    await self.kill(sid)
                elif mode == "pause":
                    await self.pause(sid)
            except SmartVMError as exc:
                log.warning("sandbox %s: %s on close failed: %s", sid, mode, exc)
        for sid, live in list(self._live.items()):
            with contextlib.suppress(SmartVMError):
                await live.vm.detach()  # the VM and its record stay for the next manager
            self._live.pop(sid, None)
        self._closed = True
        await self._settle_background()
        await self._shutdown_resources()

    async def _settle_background(self) -> None:
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _shutdown_resources(self) -> None:
        """Let go of the pool, the store and the lock; slots in use stay with their sandboxes."""
        if self._pool is not None:
            await self._pool.close(keep_in_use=True)
            self._pool = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock_file is not None:
            self._lock_file.release()
            self._lock_file = None

    async def __aenter__(self) -> SandboxManager:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- helpers ------------------------------------------------------------------------------------
    @property
    def store(self) -> SandboxStore:
        if self._store is None or self._closed:
            raise SmartVMError(
                ErrorCode.INVALID_STATE, "the sandbox manager is not started (use 'async with' or start())"
            )
        return self._store

    @property
    def pool(self) -> SlotPool:
        if self._pool is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "the sandbox manager is not started")
        return self._pool

    def _sandbox_dir(self, sid: str) -> Path:
        return self.data_dir / "sandboxes" / sid

    def _lock(self, sid: str) -> asyncio.Lock:
        return self._locks.setdefault(sid, asyncio.Lock())

    def _record(self, sid: str) -> SandboxRecord:
        rec = self._recs.get(sid)
        if rec is None:
            raise SmartVMError(
                ErrorCode.SANDBOX_NOT_FOUND, f"no sandbox {sid!r} in this manager: list() shows them"
            )
        return rec

    async def _fresh(self, sid: str) -> SandboxRecord:
        rec = await self.store.call(self.store.get_sandbox, sid)
        self._recs[sid] = rec
        return rec

    async def _transition(
        self,
        sid: str,
        new: SandboxState,
        *,
        error: str | None = None,
        detail: str = "",
        changes: Mapping[str, Any] | None = None,
    ) -> None:
        self._recs[sid] = await self.store.call(
            self.store.transition, sid, new, error=error, detail=detail, changes=changes
        )

    async def _update(self, sid: str, **changes: Any) -> None:
        self._recs[sid] = await self.store.call(self.store.update_sandbox, sid, **changes)

    async def _running_vm(self, sid: str) -> MicroVM:
        """The VM of a running sandbox; SANDBOX_NOT_RUNNING (saying why) otherwise."""
        rec = self._record(sid)
        live = self._live.get(sid)
        if rec.state is S.RUNNING and live is not None and live.vm.state is VMState.RUNNING:
            return live.vm
        why = {
            S.PAUSED: "it is paused: resume it first",
            S.STOPPED: "it was killed",
            S.ERROR: f"it failed: {rec.error}",
        }.get(rec.state, f"it is {rec.state.value}")
        raise SmartVMError(ErrorCode.SANDBOX_NOT_RUNNING, f"sandbox {sid} is not running: {why}")

    # --- templates ----------------------------------------------------------------------------------
    async def build_template(self, spec: TemplateSpec, *, progress: Progress | None = None) -> TemplateRecord:
        """Build (or reuse, when its inputs are unchanged) the template ``spec``."""
        check_name(spec.name, "template")
        async with self._template_locks.setdefault(spec.name, asyncio.Lock()):
            return (await self._ensure_image_template(spec, progress or (lambda step: None)))[1]

    async def _ensure_image_template(
        self, spec: TemplateSpec, progress: Progress
    ) -> tuple[BuiltTemplate, TemplateRecord]:
        """The ready template of ``spec``, built unless one of the same inputs is complete; it
        becomes the one ``create(spec.name)`` uses."""
        engine = self.engine
        key = await asyncio.to_thread(spec.key, engine)
        directory = self.data_dir / "templates" / spec.name / key
        built = BuiltTemplate(spec.name, directory)
        try:
            old: TemplateRecord | None = await self.store.call(self.store.get_template, spec.name)
        except SmartVMError:
            old = None
        if old is not None and old.kind == "snapshot":
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"{spec.name!r} is a snapshot; pick another template name"
            )
        if old is not None and old.inputs_hash == key and old.status == "ready" and built.is_complete():
            self._templates[spec.name] = (built, old)
            return built, old
        record = TemplateRecord(
            name=spec.name,
            kernel=str(spec.kernel),
            rootfs=str(spec.rootfs),
            cpus=spec.cpus,
            memory_mib=spec.memory_mib,
            env=dict(spec.env),
            start_command=spec.start_command,
            user=spec.user,
            snapshot_dir=str(built.snapshot_dir),
            inputs_hash=key,
            status="building",
            boot_args=spec.boot_args,
            ready_command=spec.ready_command,
        )
        await self.store.call(self.store.put_template, record)
        try:
            built = await build_template(
                spec,
                directory,
                svm=self._svm,
                pool=self.pool,
                ready_timeout=self.settings.template_build_timeout_s,
                progress=progress,
            )
        except BaseException as exc:
            await self.store.call(
                self.store.put_template, dataclasses.replace(record, status="failed", error=str(exc))
            )
            raise
        record = dataclasses.replace(record, status="ready")
        await self.store.call(self.store.put_template, record)
        self._templates[spec.name] = (built, record)
        if old is not None and old.snapshot_dir and Path(old.snapshot_dir).parent != directory:
            self._remove_template_dir_if_unused(spec.name, Path(old.snapshot_dir).parent)
        return built, record

    def _remove_template_dir_if_unused(self, name: str, directory: Path) -> None:
        users = [r for _, r in self._recs.current() if r.template == name]
        if not users:
            shutil.rmtree(directory, ignore_errors=True)

    async def _template(self, name: str) -> tuple[BuiltTemplate, TemplateRecord]:
        """A ready template by name (looked up once per manager); ``base`` is built on first use."""
        cached = self._templates.get(name)
        if cached is not None:
            return cached
        async with self._template_locks.setdefault(name, asyncio.Lock()):
            cached = self._templates.get(name)  # made while this call waited for the lock
            if cached is not None:
                return cached
            if name == "base":
                return await self._ensure_image_template(await base_template_spec(), lambda step: None)
            else:
                rec = await self.store.call(self.store.get_template, name)
                if rec.status != "ready" or not rec.snapshot_dir:
                    raise SmartVMError(
                        ErrorCode.TEMPLATE_NOT_FOUND,
                        f"template {name!r} is {rec.status}, not ready: build it",
                    )
                built = BuiltTemplate(name, Path(rec.snapshot_dir).parent)
                if not built.is_complete():
                    raise SmartVMError(
                        ErrorCode.SNAPSHOT_INVALID,
                        f"the files of template {name!r} in {built.directory} are damaged or missing",
                    )
            self._templates[name] = (built, rec)
            return built, rec

    async def list_templates(self) -> builtins.list[TemplateRecord]:
        return await self.store.call(self.store.list_templates)

    # --- sandboxes ----------------------------------------------------------------------------------
    async def create(
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
        """A new running sandbox restored from ``template`` (or a snapshot of that name).

        It ends ``timeout`` seconds from now (killed, or paused with ``auto_pause``). ``internet``
        off blocks all egress; ``egress`` gives an allow/deny policy instead; ``port_forwards`` maps
        host ports to guest ports. Over a limit: SANDBOX_LIMIT_REACHED or HOST_CAPACITY at once.
        """
        store = self.store
        meta, env = _string_map(metadata, "metadata"), _string_map(envs, "envs")
        end_in = self._timeout(timeout)
        policy = egress or (EgressPolicy.allow_all() if internet else EgressPolicy.deny_all())
        forwards = {int(h): int(g) for h, g in (port_forwards or {}).items()}
        built, trec = await self._template(template)
        async with self._admission:
            self._check_capacity(trec.memory_mib)
            warm = self._warm.take(template, built.snapshot_dir)
            sid = warm.sid if warm is not None else await self._new_id()
            now = time.time()
            rec = SandboxRecord(
                id=sid,
                template=template,
                metadata=meta,
                envs={**trec.env, **env},
                cpus=trec.cpus,
                memory_mib=trec.memory_mib,
                created_at=now,
                end_at=now + end_in,
                auto_pause=auto_pause,
                engine=self.engine,
                vm_id=sid,
                network={
                    "egress": dataclasses.asdict(policy),
                    "ports": {str(h): g for h, g in forwards.items()},
                },
            )
            await store.call(store.insert_sandbox, rec)
            self._recs[sid] = rec
        async with self._lock(sid):
            try:
                if warm is not None:
                    live = await self._activate(warm, policy, forwards)
                else:
                    live = await self._launch(sid, built.snapshot_dir, built.disk, None, rec.network)
                self._live[sid] = live
                await self._transition(
                    sid,
                    S.RUNNING,
                    changes={
                        "disk_path": str(live.disk.device_path),
                        "disk_strategy": live.disk.layer.strategy,
                        "disk_layer": live.disk.layer.to_json(),
                        "network": {**rec.network, "lease": live.slot.lease_key},
                    },
                )
            except BaseException as exc:
                await self._fail(sid, exc, "create")
                _reraise(exc, f"creating sandbox {sid}")
        if trec.kind != FORK_KIND:  # a fork snapshot serves its forks only, right now
            self._warm.refill(template)
        return Sandbox(self, sid)

    async def _new_id(self) -> str:
        taken = self._warm.ids()
        while True:
            sid = await self.store.call(self.store.allocate_sandbox_id)
            if sid not in taken:
                return sid

    async def _make_warm(self, template: str) -> WarmSandbox | None:
        """A sandbox of ``template`` restored, warmed up and paused, for a later create."""
        built, trec = await self._template(template)
        if _host_memory_mib()[1] < 2 * trec.memory_mib + 512:
            return None  # leave the memory to real sandboxes
        sid = await self._new_id()
        live = await self._launch(sid, built.snapshot_dir, built.disk, None, {}, record=False)
        warm = WarmSandbox(sid, built.snapshot_dir, live)
        try:
            await run_once_and_park(live)
        except BaseException:
            await self._discard_warm(warm)
            raise
        return warm

    async def _discard_warm(self, warm: WarmSandbox) -> None:
        await self._free_live(warm.live)
        await asyncio.to_thread(shutil.rmtree, self._sandbox_dir(warm.sid), True)

    async def _free_live(self, live: _Live) -> None:
        """End the VM, destroy its slot, delete its disk layer: every step is tried, the first
        failure is raised afterwards (a failing kill must not leak the slot or the disk)."""
        first: BaseException | None = None
        for step in (
            live.vm.kill,
            lambda: self.pool.release(live.slot),
            lambda: asyncio.to_thread(live.disk.release),
        ):
            try:
                await step()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    async def _activate(self, warm: WarmSandbox, policy: EgressPolicy, forwards: Mapping[int, int]) -> _Live:
        """Hand out a warm sandbox: running again, its own network policy, fresh randomness, the
        host's clock, its hostname, and recorded (it outlives this process from now on)."""
        live = warm.live
        try:
            await live.vm.resume()
            if policy != live.slot.egress:
                await live.slot.set_egress(policy)
            for host_port, guest_port in forwards.items():
                await live.slot.forward_port(host_port, guest_port)
            agent = live.vm.agent
            await asyncio.gather(agent.reseed(hostname=warm.sid), agent.set_time())
            await live.vm.record()
        except BaseException:
            await self._discard_warm(warm)
            raise
        return live

    def _timeout(self, timeout: float | None) -> float:
        value = self.settings.default_timeout_s if timeout is None else float(timeout)
        if not 0 < value <= self.settings.max_timeout_s:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"timeout must be between 0 and {self.settings.max_timeout_s:.0f} seconds, not {timeout}",
            )
        return value

    def capacity(self) -> Capacity:
        active = [r for _, r in self._recs.current() if r.state in _ACTIVE]
        total, available = _host_memory_mib()
        return Capacity(
            active=len(active),
            max_sandboxes=self.settings.max_sandboxes,
            memory_used_mib=sum(r.memory_mib for r in active),
            memory_limit_mib=self.settings.max_memory_mib or int(total * 0.8),
            host_available_mib=available,
            warm=len(self._warm.ids()),
        )

    def _check_capacity(self, memory_mib: int) -> None:
        cap = self.capacity()
        if cap.active >= cap.max_sandboxes:
            raise SmartVMError(
                ErrorCode.SANDBOX_LIMIT_REACHED,
                f"{cap.active} sandboxes run, the limit is {cap.max_sandboxes}: "
                "kill or pause one, or raise max_sandboxes",
            )
        if cap.memory_used_mib + memory_mib > cap.memory_limit_mib:
            raise SmartVMError(
                ErrorCode.SANDBOX_LIMIT_REACHED,
                f"running sandboxes use {cap.memory_used_mib} MiB of guest memory; {memory_mib} MiB "
                f"more would pass the limit of {cap.memory_limit_mib} MiB: kill or pause one, or raise "
                "max_memory_mib",
            )
        if cap.host_available_mib < memory_mib + 256:
            raise SmartVMError(
                ErrorCode.HOST_CAPACITY,
                f"the host has {cap.host_available_mib} MiB of memory available, too little for a "
                f"{memory_mib} MiB sandbox: try again later",
            )

    async def _launch(
        self,
        sid: str,
        snapshot_dir: Path,
        base_disk: Path,
        layer: CowLayer | None,
        network: Mapping[str, Any],
        *,
        record: bool = True,
    ) -> _Live:
        """Disk, network slot and a restored, ready, recorded VM; on failure all of it is undone
        (a reopened ``layer`` is only detached: its files keep the paused sandbox's disk)."""
        assert self._cow is not None
        t_start = time.perf_counter()
        async with AsyncExitStack() as undo:
            if layer is None:  # a new sandbox: its directory goes too if this fails
                undo.callback(shutil.rmtree, self._sandbox_dir(sid), True)
            ensure_private_dir(self._sandbox_dir(sid))
            if layer is None:
                disk = await asyncio.to_thread(
                    self._cow.create, base_disk, self._sandbox_dir(sid) / "disk", sid
                )
                undo.callback(disk.release)
            else:
                strategy = strategy_named(layer.strategy, self.engine, self.data_dir / "sandboxes")
                disk = await asyncio.to_thread(strategy.reopen, layer)
                undo.callback(disk.detach)
            ports = {int(h): int(g) for h, g in dict(network.get("ports") or {}).items()}
            slot = await self.pool.acquire(egress=_policy(network), port_forwards=ports)
            undo.push_async_callback(self.pool.release, slot)
            t_restore = time.perf_counter()
            vm = await self._svm.restore_vm(
                snapshot_dir,
                vm_id=sid,
                netns=slot.netns_name,
                detachable=True,
                drive_paths={ROOT_DRIVE: disk.device_path},
            )
            undo.push_async_callback(vm.kill)
            vm.hostname = sid
            t_ready = time.perf_counter()
            await vm.wait_ready(self.settings.ready_timeout_s)  # reseed, clock, hostname
            if record:
                await vm.record()  # it outlives this process on purpose; the next manager adopts it
            log.debug(  # where a create or resume spends its time (docs/benchmarks.md, section 9)
                "sandbox %s: disk + slot %.1f ms, restore until the guest runs %.1f ms, agent + hygiene "
                "+ record %.1f ms",
                sid,
                (t_restore - t_start) * 1e3,
                (t_ready - t_restore) * 1e3,
                (time.perf_counter() - t_ready) * 1e3,
            )
            undo.pop_all()
            return _Live(vm, slot, disk)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _forget_vm(self, sid: str) -> None:
        """End the recorded VM of ``sid`` (if it is provably ours) and drop its record."""
        with contextlib.suppress(SmartVMError):
            vm = await self._svm.attach_vm(sid)
            await vm.kill()
        with contextlib.suppress(SmartVMError, OSError):
            record = self._svm.records.load(sid)
            if record is not None:
                self._svm.records.prune(record)

    async def _fail(self, sid: str, exc: BaseException, what: str) -> None:
        """Record ``sid`` as failed (with the reason) and free whatever it still holds."""
        reason = exc.message if isinstance(exc, SmartVMError) else f"{type(exc).__name__}: {exc}"
        log.warning("sandbox %s: %s failed: %s", sid, what, reason)
        try:
            await self._release_all(sid)
            await self._transition(sid, S.ERROR, error=f"{what} failed: {reason}")
        except BaseException as inner:  # keep the original error for the caller
            log.warning("sandbox %s: recording the failure failed: %s", sid, inner)

    async def _release_all(self, sid: str) -> None:
        """Free everything ``sid`` holds: VM, slot, disk layer, pause files (idempotent)."""
        live = self._live.pop(sid, None)
        rec = self._recs.get(sid)
        if live is not None:
            await self._free_live(live)
        else:
            await self._forget_vm(sid)
            lease = (rec.network.get("lease") if rec is not None else None) or None
            if lease and self._pool is not None:
                with contextlib.suppress(SmartVMError):
                    await self._pool.release(self._pool.adopt(str(lease)))
            if rec is not None and rec.disk_layer:
                with contextlib.suppress(SmartVMError, OSError, ValueError, KeyError):
                    layer = CowLayer.from_json(rec.disk_layer)
                    strategy = strategy_named(layer.strategy, self.engine, self.data_dir / "sandboxes")
                    disk = await asyncio.to_thread(strategy.reopen, layer)
                    await asyncio.to_thread(disk.release)
        await asyncio.to_thread(shutil.rmtree, self._sandbox_dir(sid), True)

    async def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox ``sandbox_id`` (any state, also stopped); SANDBOX_NOT_FOUND if unknown."""
        if sandbox_id not in self._recs:
            await self._fresh(sandbox_id)
        return Sandbox(self, sandbox_id)

    async def list(
        self,
        *,
        states: builtins.list[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> builtins.list[Sandbox]:
        """Sandboxes in ``states`` (default: all but stopped) whose metadata holds every given pair."""
        wanted = states if states is not None else [s for s in SandboxState if s is not S.STOPPED]
        recs = await self.store.call(self.store.list_sandboxes, states=wanted, metadata=metadata)
        for rec in recs:
            self._recs.setdefault(rec.id, rec)
        return [Sandbox(self, rec.id) for rec in recs]

    async def kill(self, sandbox_id: str) -> None:
        """Destroy a sandbox (running, paused or failed) and everything it holds; idempotent."""
        if sandbox_id not in self._recs:
            await self._fresh(sandbox_id)
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            if rec.state is S.STOPPED:
                return
            await self._transition(sandbox_id, S.STOPPING)
            try:
                await self._release_all(sandbox_id)
            except BaseException as exc:
                await self._transition(sandbox_id, S.ERROR, error=f"kill failed: {exc}")
                _reraise(exc, f"killing sandbox {sandbox_id}")
            await self._transition(sandbox_id, S.STOPPED)
        self._locks.pop(sandbox_id, None)
        if rec.template.startswith(FORK_PREFIX):  # the last fork takes its snapshot along
            await self._collect_forks()

    async def set_timeout(self, sandbox_id: str, seconds: float) -> None:
        """The sandbox now ends ``seconds`` from now."""
        end_in = self._timeout(seconds)
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            if rec.state in (S.STOPPED, S.ERROR):
                raise SmartVMError(
                    ErrorCode.SANDBOX_NOT_RUNNING, f"sandbox {sandbox_id} is {rec.state.value}"
                )
            await self._update(sandbox_id, end_at=time.time() + end_in)
            await self.store.call(self.store.add_event, sandbox_id, "timeout", f"{end_in:.0f}s")

    async def set_egress(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Replace what the sandbox may connect to: at once while it runs, from its resume on while
        it is paused (the policy is part of its record)."""
        if sandbox_id not in self._recs:
            await self._fresh(sandbox_id)
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            if rec.state not in (S.RUNNING, S.PAUSED):
                raise SmartVMError(
                    ErrorCode.SANDBOX_NOT_RUNNING,
                    f"sandbox {sandbox_id} is {rec.state.value}: only running or paused ones have a network",
                )
            live = self._live.get(sandbox_id)
            if live is not None:
                await live.slot.set_egress(policy)
            await self._update(sandbox_id, network={**rec.network, "egress": dataclasses.asdict(policy)})
            await self.store.call(self.store.add_event, sandbox_id, "network", _describe(policy))

    async def events(self, sandbox_id: str) -> builtins.list[EventRecord]:
        """The sandbox's event log (created, state changes with reasons, timeouts, snapshots)."""
        return await self.store.call(self.store.events, sandbox_id)

    # --- pause / resume -------------------------------------------------------------------------------
    async def pause(self, sandbox_id: str) -> None:
        """Save the sandbox's memory and processes to disk and free its VM, slot and devices (the
        slot's namespace is torn down in the background right after; close() waits for it)."""
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            if rec.state is S.PAUSED:
                raise SmartVMError(
                    ErrorCode.SANDBOX_ALREADY_PAUSED, f"sandbox {sandbox_id} is already paused"
                )
            live = self._live.get(sandbox_id)
            if rec.state is not S.RUNNING or live is None:
                raise SmartVMError(
                    ErrorCode.SANDBOX_NOT_RUNNING,
                    f"sandbox {sandbox_id} is {rec.state.value}: cannot pause it",
                )
            await self._transition(sandbox_id, S.PAUSING)
            pause_dir = self._sandbox_dir(sandbox_id) / "paused"
            try:
                # quiesce first (the agent syncs the guest's filesystems): the saved memory would do
                # without, but then the disk layer alone is no consistent filesystem should the
                # pause files ever be lost or damaged; it costs ~15 ms under TCG
                await self._save_state(live.vm, pause_dir)
            except BaseException as exc:
                shutil.rmtree(pause_dir, ignore_errors=True)
                if live.vm.state is VMState.PAUSED:
                    with contextlib.suppress(SmartVMError):
                        await live.vm.resume()
                if live.vm.state is VMState.RUNNING:
                    await self._transition(sandbox_id, S.RUNNING, detail=f"pause failed: {exc}")
                else:
                    await self._fail(sandbox_id, exc, "pause")
                _reraise(exc, f"pausing sandbox {sandbox_id}")
            # the state is saved: from here the sandbox is paused whatever else fails
            self._live.pop(sandbox_id, None)
            try:
                await live.vm.kill()
            except SmartVMError as exc:
                log.warning("sandbox %s: freeing after pause: %s", sandbox_id, exc)
            self._in_background(self._release_slot(sandbox_id, live.slot))  # ~15 ms nobody waits for
            layer = await asyncio.to_thread(live.disk.persist, live.disk.layer.layer_dir)
            network = {k: v for k, v in rec.network.items() if k != "lease"}
            await self._transition(  # one transaction (one commit) for the record and the state
                sandbox_id,
                S.PAUSED,
                changes={"pause_dir": str(pause_dir), "disk_layer": layer.to_json(), "network": network},
            )

    async def _release_slot(self, sid: str, slot: NetworkSlot) -> None:
        try:
            await self.pool.release(slot)
        except SmartVMError as exc:
            log.warning("sandbox %s: freeing after pause: %s", sid, exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run cleanup that no caller waits for; close() waits for what is still running."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _save_state(self, vm: MicroVM, directory: Path) -> Snapshot:
        """Quiesce (guest sync), pause and snapshot ``vm`` into ``directory`` without disk copies."""
        shutil.rmtree(directory, ignore_errors=True)
        try:
            await asyncio.wait_for(vm.agent.sync(), 10)
        except (SmartVMError, TimeoutError) as exc:
            log.warning("VM %s: guest sync before the snapshot failed: %s", vm.id, exc)
        if vm.state is VMState.RUNNING:
            await vm.pause()
        return await vm.create_snapshot(directory / "vm.state", directory / "memory", copy_disks=False)

    async def resume(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        """Restore a paused sandbox: a fresh slot, its disk layer, its memory; ready when this returns."""
        end_in = self._timeout(timeout)
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            if rec.state is S.RUNNING:
                raise SmartVMError(
                    ErrorCode.SANDBOX_NOT_PAUSED, f"sandbox {sandbox_id} is running, not paused"
                )
            if rec.state is not S.PAUSED or not rec.pause_dir or not rec.disk_layer:
                raise SmartVMError(
                    ErrorCode.SANDBOX_NOT_PAUSED,
                    f"sandbox {sandbox_id} is {rec.state.value}: cannot resume it",
                )
            async with self._admission:
                self._check_capacity(rec.memory_mib)
                await self._transition(sandbox_id, S.RESUMING)
            layer = CowLayer.from_json(rec.disk_layer)
            try:
                live = await self._launch(
                    sandbox_id, Path(rec.pause_dir), layer.base_image, layer, rec.network
                )
            except BaseException as exc:
                broken = isinstance(exc, SmartVMError) and exc.code in _RESTORE_BROKEN
                if broken or not isinstance(exc, SmartVMError):
                    await self._fail(sandbox_id, exc, "resume")
                else:  # e.g. no network slot now: still paused, try again later
                    await self._transition(sandbox_id, S.PAUSED, detail=f"resume failed: {exc.message}")
                _reraise(exc, f"resuming sandbox {sandbox_id}")
            self._live[sandbox_id] = live
            await self._transition(  # one transaction (one commit) for the record and the state
                sandbox_id,
                S.RUNNING,
                changes={
                    "pause_dir": None,
                    "end_at": time.time() + end_in,
                    "disk_path": str(live.disk.device_path),
                    "disk_layer": live.disk.layer.to_json(),
                    "network": {**rec.network, "lease": live.slot.lease_key},
                },
            )
            # deleting ~75 MB of memory state takes ~15 ms: renamed out of the way (the next pause
            # reuses the name) and deleted in the background
            old_state = Path(rec.pause_dir).with_name(f"{RESUMED_PREFIX}{time.monotonic_ns()}")
            try:
                os.rename(rec.pause_dir, old_state)
            except OSError:
                old_state = Path(rec.pause_dir)
            self._in_background(asyncio.to_thread(shutil.rmtree, old_state, True))

    # --- snapshots ------------------------------------------------------------------------------------
    async def snapshot(self, sandbox_id: str, name: str) -> SnapshotInfo:
        """Save a running or paused sandbox as the template ``name`` (flattened disk + memory)."""
        return await self._snapshot(sandbox_id, name, kind="snapshot")

    async def fork(
        self, sandbox_id: str, count: int = 1, *, timeout: float | None = None
    ) -> builtins.list[Sandbox | SmartVMError]:
        """``count`` new sandboxes that continue from this moment of ``sandbox_id`` (memory, processes,
        files); the source keeps running (it stops for the snapshot). Each fork succeeds or fails on
        its own: the list holds a sandbox or the error that stopped it, in order. The snapshot
        between them is not listed and goes away with the last fork."""
        if not 1 <= count <= MAX_FORKS:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"count must be 1-{MAX_FORKS}, not {count}")
        end_in = self._timeout(timeout)
        if sandbox_id not in self._recs:
            await self._fresh(sandbox_id)
        source = self._record(sandbox_id)
        name = f"{FORK_PREFIX}{sandbox_id}-{secrets.token_hex(4)}"
        self._forking.add(name)
        try:
            await self._snapshot(sandbox_id, name, kind=FORK_KIND)
            results: builtins.list[Sandbox | SmartVMError] = []
            try:
                for _ in range(count):
                    try:
                        results.append(
                            await self.create(
                                name,
                                timeout=end_in,
                                metadata=source.metadata,
                                envs=source.envs,
                                egress=_policy(source.network),
                            )
                        )
                    except SmartVMError as exc:
                        results.append(exc)
            except BaseException:  # cancelled or worse: no caller will ever learn of the forks made
                for made in results:
                    if isinstance(made, Sandbox):
                        with contextlib.suppress(SmartVMError):
                            await self.kill(made.id)
                raise
            return results
        finally:
            self._forking.discard(name)
            await self._collect_forks()  # all forks failed: the snapshot goes at once

    async def _collect_forks(self) -> None:
        """Delete fork snapshots no sandbox uses any more."""
        forks = [t.name for t in await self.list_templates() if t.kind == FORK_KIND]
        used = {r.template for _, r in self._recs.current()}
        for name in forks:
            if name not in used and name not in self._forking:
                with contextlib.suppress(SmartVMError):
                    await self.delete_snapshot(name)

    async def _snapshot(self, sandbox_id: str, name: str, *, kind: str) -> SnapshotInfo:
        check_name(name, "snapshot")
        if name == "base":
            raise SmartVMError(ErrorCode.SNAPSHOT_EXISTS, "'base' is the default template's name")
        store = self.store
        existing = {t.name for t in await store.call(store.list_templates)}
        if name in existing:
            raise SmartVMError(ErrorCode.SNAPSHOT_EXISTS, f"a template or snapshot named {name!r} exists")
        directory = self.data_dir / "templates" / name / "snap"
        work = directory.with_name(".snap.build")
        async with self._lock(sandbox_id):
            rec = self._record(sandbox_id)
            shutil.rmtree(work, ignore_errors=True)
            ensure_private_dir(work)
            try:
                if rec.state is S.RUNNING and sandbox_id in self._live:
                    await self._snapshot_running(self._live[sandbox_id], work)
                elif rec.state is S.PAUSED and rec.pause_dir and rec.disk_layer:
                    await self._snapshot_paused(rec, work)
                else:
                    raise SmartVMError(
                        ErrorCode.SANDBOX_NOT_RUNNING,
                        f"sandbox {sandbox_id} is {rec.state.value}: only running or paused ones snapshot",
                    )
                (work / DISK_FILE).chmod(0o400)
                shutil.rmtree(directory, ignore_errors=True)
                work.rename(directory)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        size = await asyncio.to_thread(_allocated_tree, directory)
        await store.call(
            store.put_template,
            TemplateRecord(
                name=name,
                kernel="",
                rootfs="",
                cpus=rec.cpus,
                memory_mib=rec.memory_mib,
                env=dict(rec.envs),
                snapshot_dir=str(directory / SNAPSHOT_DIR),
                status="ready",
                kind=kind,
            ),
        )
        snap = SnapshotRecord(name=name, source_sandbox=sandbox_id, dir=str(directory), size_bytes=size)
        await store.call(store.put_snapshot, snap)
        await store.call(store.add_event, sandbox_id, "snapshot", name)
        return SnapshotInfo(name, sandbox_id, snap.created_at, size)

    async def _snapshot_running(self, live: _Live, work: Path) -> None:
        was_running = live.vm.state is VMState.RUNNING
        try:
            await self._save_state(live.vm, work / SNAPSHOT_DIR)
            await asyncio.to_thread(live.disk.flatten, work / DISK_FILE)  # consistent: the VM is paused
        finally:
            if was_running and live.vm.state is VMState.PAUSED:
                await live.vm.resume()

    async def _snapshot_paused(self, rec: SandboxRecord, work: Path) -> None:
        source = Snapshot.load(rec.pause_dir or "")
        target = work / SNAPSHOT_DIR
        ensure_private_dir(target)
        await asyncio.to_thread(_link_files, source.directory, target)
        dataclasses.replace(source, directory=target).save()
        layer = CowLayer.from_json(rec.disk_layer or "")
        strategy = strategy_named(layer.strategy, self.engine, self.data_dir / "sandboxes")
        disk = await asyncio.to_thread(strategy.reopen, layer)
        try:
            await asyncio.to_thread(disk.flatten, work / DISK_FILE)
        finally:
            await asyncio.to_thread(disk.detach)

    async def list_snapshots(self) -> builtins.list[SnapshotInfo]:
        forks = {t.name for t in await self.list_templates() if t.kind == FORK_KIND}
        recs = [r for r in await self.store.call(self.store.list_snapshots) if r.name not in forks]
        return [
            SnapshotInfo(
                r.name, r.source_sandbox, r.created_at, await asyncio.to_thread(_allocated_tree, Path(r.dir))
            )
            for r in recs
        ]

    async def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot; SNAPSHOT_IN_USE while a sandbox created from it still exists."""
        store = self.store
        await store.call(store.get_snapshot, name)  # SNAPSHOT_NOT_FOUND when there is none
        users = await store.call(store.list_sandboxes, states=[s for s in SandboxState if s is not S.STOPPED])
        dependent = [r.id for r in users if r.template == name]
        if dependent:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_IN_USE,
                f"snapshot {name!r} is the template of {', '.join(dependent)}: kill them first",
            )
        self._templates.pop(name, None)
        await self._warm.drop(name)  # no warm sandbox of it, and no refill restoring one meanwhile
        await store.call(store.delete_template, name)
        await store.call(store.delete_snapshot, name)
        await asyncio.to_thread(shutil.rmtree, self.data_dir / "templates" / name, True)

    # --- info -----------------------------------------------------------------------------------------
    async def _info(self, sid: str) -> SandboxInfo:
        rec = await self._fresh(sid)
        disk = await asyncio.to_thread(_allocated_tree, self._sandbox_dir(sid), shared=False)
        return self._info_of(rec, disk)

    async def infos(
        self,
        *,
        states: builtins.list[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> builtins.list[SandboxInfo]:
        """``info()`` of every sandbox ``list()`` would return, with one state query and one disk
        walk for all of them (a listing of many sandboxes costs two thread hops, not two each)."""
        wanted = states if states is not None else [s for s in SandboxState if s is not S.STOPPED]
        recs = await self.store.call(self.store.list_sandboxes, states=wanted, metadata=metadata)
        dirs = [self._sandbox_dir(rec.id) for rec in recs]
        disks = await asyncio.to_thread(lambda: [_allocated_tree(d, shared=False) for d in dirs])
        return [self._info_of(rec, disk) for rec, disk in zip(recs, disks, strict=True)]

    def _info_of(self, rec: SandboxRecord, disk: int) -> SandboxInfo:
        live = self._live.get(rec.id)
        return SandboxInfo(
            id=rec.id,
            template=rec.template,
            state=rec.state,
            metadata=dict(rec.metadata),
            envs=dict(rec.envs),
            cpus=rec.cpus,
            memory_mib=rec.memory_mib,
            created_at=rec.created_at,
            end_at=rec.end_at,
            auto_pause=rec.auto_pause,
            disk_bytes=disk,
            error=rec.error,
            host_ip=live.slot.host_ip if live is not None else None,
            egress=_policy(rec.network),
        )

    async def _metrics(self, sid: str) -> SandboxMetrics:
        rec = self._record(sid)
        live = self._live.get(sid)
        cpu, rss = 0.0, 0
        if live is not None:
            info = await live.vm.get_info()
            pid = dict(info.get("engine_info") or {}).get("pid")
            if isinstance(pid, int):
                cpu, rss = await asyncio.to_thread(_process_usage, pid)
        disk = await asyncio.to_thread(_allocated_tree, self._sandbox_dir(sid), shared=False)
        return SandboxMetrics(cpu, rec.cpus, rss, rec.memory_mib, disk, time.time())

    # --- the reaper -----------------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_s)
            try:
                await self.reap()
            except Exception as exc:  # the reaper must survive anything one sandbox does
                log.warning("sandbox reaper: %s", exc)

    async def reap(self) -> builtins.list[str]:
        """One pass: end sandboxes past their end time (pause the ``auto_pause`` ones) and mark those
        whose hypervisor died as failed. Returns the ids acted on."""
        now = time.time()
        acted = []
        for sid, rec in self._recs.current():
            if rec.state is not S.RUNNING or self._lock(sid).locked():
                continue
            live = self._live.get(sid)
            try:
                if live is not None and live.vm.state is not VMState.RUNNING:
                    async with self._lock(sid):
                        await self._fail(sid, SmartVMError(ErrorCode.VM_EXITED, "the VM exited"), "run")
                elif rec.end_at <= now:
                    await (self.pause(sid) if rec.auto_pause else self.kill(sid))
                else:
                    continue
                acted.append(sid)
            except SmartVMError as exc:
                log.warning("sandbox %s: reaper: %s", sid, exc)
        return acted


def _link_files(source: Path, target: Path) -> None:
    """Every file of a pause but its manifest (state, memory, the base a diff stream needs) into
    ``target``: none is written again in place, so a hard link does (a copy across filesystems)."""
    for path in sorted(source.iterdir()):
        if path.name == MANIFEST_NAME or not path.is_file():
            continue
        try:
            os.link(path, target / path.name)
        except OSError:
            clone_file(path, target / path.name, mode=0o600)


def _allocated_tree(root: Path, *, shared: bool = True) -> int:
    """Allocated bytes under ``root``; without ``shared``, files that are also linked elsewhere (the
    template memory a paused sandbox's diff stream builds on) are not counted: not its own."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(Path(dirpath) / name, follow_symlinks=False)
                if shared or st.st_nlink == 1:
                    total += st.st_blocks * 512
    return total


def _process_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, resident * os.sysconf("SC_PAGE_SIZE")
