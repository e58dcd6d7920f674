"""QemuEngine: one ``qemu-system-x86_64 -M microvm`` process per VM, driven over QMP.

Snapshots are QEMU migration streams that QEMU writes itself into a file descriptor handed over QMP
(``getfd`` + ``fd:``) while the guest is paused (with the migration bandwidth cap lifted: the default
cap makes even an idle 256 MiB guest take 3-4x longer), plus a copy-on-write copy of every writable
disk. Guest RAM is handled one of three ways:

- runtime dir on tmpfs (the default ``/dev/shm``): RAM is a shared file in the runtime dir; with
  ``x-ignore-shared`` the stream carries only device state, and the RAM file is copied to the
  snapshot's memory file. A restore maps that file privately (copy-on-write), so clones share its
  unmodified pages. (A restored clone's own snapshots then carry RAM in the stream: see the third.)
- otherwise RAM is anonymous and travels in the stream; the snapshot has no memory file.
- a VM restored from a memory file maps it privately; its own snapshots (a sandbox's pause) stream
  RAM through ``ramdiff`` (:mod:`smartvm.qemu.ramdiff`), which leaves out the pages still equal to
  that file's, and link the file beside the stream (``base.memory``, ``"memory": "diff"``). The
  restore maps the file privately again under the stream.

A restore starts QEMU with the same device set. With RAM in the stream (a paused sandbox) QEMU gets
``-incoming fd:3``, the state file inherited, and loads it while it starts; with a memory file it
gets ``-incoming defer`` and then ``migrate-incoming`` (``fd:`` too) once QMP has set
``x-ignore-shared``, which QEMU 7.2 cannot take on its command line. If QEMU refuses the stream
(other memory size, other devices) it exits and its own message becomes a SNAPSHOT_MISMATCH error.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from smartvm.config import MicroVMConfig
from smartvm.engine import Engine, RestoreRequest
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import make_private
from smartvm.host.process import tail
from smartvm.host.runtime import VMRuntime
from smartvm.host.storage import clone_file
from smartvm.kvm_probe import engine_accel
from smartvm.options import SmartVMOptions
from smartvm.qemu.agent_ports import (
    AGENT_PORTS,
    check_port_count,
    claim_port,
    open_claimed,
    port_socket,
)
from smartvm.qemu.cmdline import (
    RAM_BACKEND_ID,
    Accel,
    LaunchSpec,
    build_argv,
    detect_disk_format,
    device_layout,
    on_tmpfs,
    ordered_drives,
)
from smartvm.qemu.host_clock import host_tsc_khz
from smartvm.qemu.process import QemuProcess, find_qemu
from smartvm.qemu.qmp import QMPClient
from smartvm.snapshot import Snapshot, SnapshotType

log = logging.getLogger(__name__)

RAM_FILE = "guest.ram"
BASE_MEMORY = "base.memory"  # a pause stream's base: a hard link to the memory file the VM maps
MAX_BANDWIDTH = 1 << 40  # bytes/s: effectively uncapped
_POLL_S = 0.005
_MIGRATION_FD = "smartvm-migration"  # the name QEMU knows the stream file by (QMP getfd)
# QEMU's own words when a migration stream does not fit the restoring machine.
_MISMATCH_HINTS = (
    "mismatch",
    "Unknown savevm section",
    "Missing section",
    "Unknown ramblock",
    "error while loading state for instance",
)
_TRUNCATED_HINT = "load of migration failed: Input/output error"
_LOAD_FAILED = "load of migration failed"  # QEMU's words when a stream it started with is refused
_INCOMING_FD = 3  # where a restoring QEMU finds the stream it loads (``-incoming fd:3``)
STATE_MAGIC = b"QEVM\x00\x00\x00\x03"  # QEMU_VM_FILE_MAGIC + QEMU_VM_FILE_VERSION: every stream starts so


def _check_boot_files(config: MicroVMConfig) -> Path:
    """The kernel path, after checking that kernel (and initrd) exist: QEMU's own error is vaguer."""
    kernel = Path(config.boot_source.kernel_image_path)
    if not kernel.is_file():
        raise SmartVMError(ErrorCode.BOOT_FAILED, f"kernel image {kernel} does not exist or is not a file")
    initrd = config.boot_source.initrd_path
    if initrd is not None and not Path(initrd).is_file():
        raise SmartVMError(ErrorCode.BOOT_FAILED, f"initrd {initrd} does not exist or is not a file")
    return kernel


class _ToolUnavailable(Exception):
    """ramdiff could not be started (a damaged build, a bad SMARTVM_RAMDIFF): pause without it."""


def _diff_base(snapshot: Snapshot, mem_bytes: int) -> Path | None:
    """The file a "diff" stream's pages go over (None for other snapshots): the snapshot's own link,
    or the path it was linked from while that is still the same file (a VM mapping that path can
    link it again when it is paused; the snapshot's link goes with the snapshot)."""
    if snapshot.engine_data.get("memory") != "diff":
        return None
    name = snapshot.engine_data.get("base_memory")
    link = snapshot.directory / name if isinstance(name, str) and name == BASE_MEMORY else None
    try:
        st = link.stat() if link is not None else None
    except OSError:
        st = None
    if link is None or st is None or st.st_size != mem_bytes:
        raise SmartVMError(
            ErrorCode.SNAPSHOT_INVALID,
            f"{snapshot.directory} holds only the memory pages that differ from {BASE_MEMORY}, and that "
            f"file is {'missing' if st is None else f'{st.st_size} bytes, not {mem_bytes}'}: the snapshot "
            "cannot be restored without it",
        )
    origin = snapshot.engine_data.get("base_origin")
    if isinstance(origin, str) and origin:
        with contextlib.suppress(OSError):
            other = os.stat(origin)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return Path(origin)
    return link


def _free_mib(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return int(st.f_bavail * st.f_frsize >> 20)


class QemuEngine(Engine):
    name: ClassVar[str] = "qemu"
    title: ClassVar[str] = "QEMU"
    supports_diff_snapshots: ClassVar[bool] = False
    #: virtio-serial agent ports of a booted VM (one per concurrent host client); restores keep the
    #: snapshot's count, whatever this says
    agent_ports: ClassVar[int] = AGENT_PORTS

    def __init__(self, runtime: VMRuntime, options: SmartVMOptions) -> None:
        super().__init__(runtime, options)
        self._process: QemuProcess | None = None
        self._qmp: QMPClient | None = None
        self._config: MicroVMConfig | None = None
        self._accel: Accel = "tcg"
        self._accel_reason = ""
        self._formats: dict[str, str] = {}
        self._shared_ram: Path | None = None  # the guest RAM file when it is shared (share=on)
        self._private_ram: Path | None = None  # the file a restored VM's RAM maps copy-on-write
        self._free_at_launch_mib: int | None = None  # free space of the runtime dir's filesystem
        self._agent_ports = self.agent_ports  # virtio-serial agent ports of the running QEMU

    # --- start ---------------------------------------------------------------------------------
    async def _choose_accel(self, binary: str, kernel: Path, snapshot_accel: object = None) -> None:
        """KVM or TCG: a restore keeps the snapshot's accelerator; else options + the (cached) probe."""
        if snapshot_accel in ("kvm", "tcg") and self.options.qemu_accel in ("auto", snapshot_accel):
            self._accel = "kvm" if snapshot_accel == "kvm" else "tcg"
            self._accel_reason = "the snapshot was taken with it"
            return
        # the probe may run a guest for a few seconds: keep the event loop free
        chosen, self._accel_reason = await asyncio.to_thread(
            engine_accel, self.options.qemu_accel, binary, kernel
        )
        self._accel = "kvm" if chosen == "kvm" else "tcg"

    async def _launch_spec(
        self,
        config: MicroVMConfig,
        *,
        incoming: bool,
        snapshot_accel: object = None,
        ram_file: Path | None = None,
        ram_shared: bool = True,
        agent_ports: int,
    ) -> LaunchSpec:
        """Check the files the guest needs, pick the accelerator, detect disk formats."""
        binary = str(find_qemu(self.options))
        kernel = _check_boot_files(config)
        formats = {d.drive_id: detect_disk_format(d.path_on_host) for d in config.drives}
        self._formats = dict(formats)
        await self._choose_accel(binary, kernel, snapshot_accel)
        return LaunchSpec(
            binary=binary,
            accel=self._accel,
            tsc_khz=host_tsc_khz() if self._accel == "tcg" else None,
            drive_formats=formats,
            incoming=incoming,
            ram_file=ram_file,
            ram_shared=ram_shared,
            agent_ports=agent_ports,
        )

    async def _start(
        self,
        config: MicroVMConfig,
        spec: LaunchSpec,
        *,
        paused: bool,
        what: str,
        pass_fds: Mapping[int, int] | None = None,
    ) -> None:
        """Spawn QEMU and connect QMP; on any failure nothing is left running."""
        argv = build_argv(config, self.runtime, spec)
        self._agent_ports = spec.agent_ports
        if paused:
            argv.append("-S")
        self._config = config
        self._free_at_launch_mib = _free_mib(self.runtime.dir)
        self._process = await QemuProcess.spawn(
            argv,
            engine_log=self.runtime.engine_log,
            console_log=self.runtime.console_log,
            netns=self.runtime.netns,
            pass_fds=pass_fds,
        )
        try:
            self._qmp = await self._connect_qmp(what)
        except BaseException:
            await self.kill()
            raise

    async def _connect_qmp(self, what: str) -> QMPClient:
        process = self._require_process()
        connect = asyncio.ensure_future(
            QMPClient.connect(self.runtime.qmp_socket, self.options.socket_timeout_s)
        )
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the connection attempt goes too, its error retrieved
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise
        finally:
            exited.cancel()
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            return connect.result()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            await process.wait(1.0)
            raise self._exited(what, ErrorCode.BOOT_FAILED)
        exc = connect.exception()
        # QEMU opens the QMP socket before it loads the kernel: a QMP failure is often QEMU exiting
        if await process.wait(2.0):
            raise self._exited(what, ErrorCode.BOOT_FAILED) from exc
        raise exc or SmartVMError(ErrorCode.QMP_ERROR, "QMP connection was cancelled")

    async def boot(self, config: MicroVMConfig) -> None:
        # Guest RAM in a shared file on tmpfs: snapshots then skip RAM in the migration stream
        # (x-ignore-shared) and copy the file instead. Off tmpfs it would be disk-backed RAM.
        self._shared_ram = self.runtime.dir / RAM_FILE if on_tmpfs(self.runtime.dir) else None
        spec = await self._launch_spec(
            config, incoming=False, ram_file=self._shared_ram, agent_ports=self.agent_ports
        )
        await self._start(config, spec, paused=False, what="booting the guest failed")
        try:
            await self._apply_balloon(config)
        except BaseException:
            await self.kill()
            raise

    async def _apply_balloon(self, config: MicroVMConfig) -> None:
        balloon = config.balloon
        if balloon is None:
            return
        if balloon.amount_mib:
            await self.update_balloon(balloon.amount_mib)
        if balloon.stats_polling_interval_s:
            await self._execute(
                "qom-set",
                {
                    "path": "/machine/peripheral/balloon0",
                    "property": "guest-stats-polling-interval",
                    "value": balloon.stats_polling_interval_s,
                },
            )

    # --- helpers ---------------------------------------------------------------------------------
    def exited_error(self, what: str) -> SmartVMError:
        return self._exited(what, ErrorCode.QEMU_EXITED)

    def _exited(self, what: str, code: ErrorCode) -> SmartVMError:
        """QEMU's exit as an error with both logs' tails; SIGBUS is explained (a full runtime tmpfs)."""
        process = self._require_process()
        message = process.describe_exit(what)
        if process.returncode == -signal.SIGBUS:
            message = f"{self._sigbus_cause()}\n{message}"
        return SmartVMError(code, message)

    def _sigbus_cause(self) -> str:
        """Why QEMU got SIGBUS: guest RAM (and staged drives) live in the runtime dir; when its
        filesystem is full, the next guest page QEMU touches there cannot be allocated."""
        need = self._config.machine_config.mem_size_mib if self._config else 0
        try:
            st = os.statvfs(self.runtime.dir)
            space = f"{st.f_bavail * st.f_frsize >> 20} MiB free of {st.f_blocks * st.f_frsize >> 20} MiB"
        except OSError as exc:
            space = f"free space unknown: {exc.strerror}"
        return (
            f"QEMU was killed by SIGBUS: the filesystem of the runtime dir {self.runtime.dir} is full "
            f"({space} now; it had {self._free_at_launch_mib} MiB free at launch, and the guest RAM file "
            f"{RAM_FILE} alone needs up to {need} MiB). Free space there (other VMs' RAM lives there "
            "too), give the VM less memory, or use a larger runtime_dir."
        )

    def _require_process(self) -> QemuProcess:
        if self._process is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "QEMU is not running for this VM")
        return self._process

    async def _execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = 30.0,
        *,
        fds: Sequence[int] = (),
    ) -> Any:
        """A QMP command (with ``fds`` attached); if QEMU died, the error says so with the console tail."""
        process = self._require_process()
        if not process.is_alive():
            await process.wait(0)
            raise self.exited_error(f"QMP {command} not possible")
        try:
            if self._qmp is None:  # an adopted QEMU: connect on first use, so exec/cp never hold QMP
                self._qmp = await QMPClient.connect(self.runtime.qmp_socket, self.options.socket_timeout_s)
            return await self._qmp.execute(command, arguments, timeout, fds=fds)
        except SmartVMError:
            if await process.wait(0.2):
                raise self.exited_error(f"QMP {command} failed") from None
            raise

    async def _status(self) -> str:
        status: dict[str, Any] = await self._execute("query-status")
        return str(status.get("status", "unknown"))

    # --- pause / resume ----------------------------------------------------------------------------
    async def pause(self) -> None:
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    # --- snapshots -----------------------------------------------------------------------------------
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
        if snapshot_type != "Full":
            raise self._unsupported(f"{snapshot_type} snapshots")
        running = self._config
        if running is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "QEMU is not running for this VM")
        status = await self._status()
        if status not in ("paused", "postmigrate"):
            raise SmartVMError(
                ErrorCode.INVALID_STATE, f"the VM must be paused to snapshot it (it is {status})"
            )
        # Everything is written as *.part first and renamed at the end: a failure leaves any
        # earlier snapshot in this directory untouched.
        parts: dict[Path, Path] = {}

        def part_for(name: str) -> Path:
            final = snapshot_dir / name
            parts[final] = final.with_name(f"{name}.part")
            parts[final].unlink(missing_ok=True)
            return parts[final]

        disks: dict[str, str] = {}
        shared_ram = self._shared_ram
        memory = "file" if shared_ram is not None else "stream"
        try:
            if shared_ram is None and await self._save_diff(part_for(state_file), part_for(BASE_MEMORY)):
                memory = "diff"
            else:
                parts.pop(snapshot_dir / BASE_MEMORY, None)  # never linked, or unlinked again
                await self._migrate_to(part_for(state_file), ignore_shared=shared_ram is not None)
            # guest RAM and disks can be gigabytes: copy them off the event loop (other VMs use it)
            if shared_ram is not None:
                await asyncio.to_thread(clone_file, shared_ram, part_for(mem_file))
            for drive in ordered_drives(running):
                if drive.is_read_only or not copy_disks:
                    continue  # used in place by the restore, like at boot
                disks[drive.drive_id] = f"{drive.drive_id}.disk"
                await asyncio.to_thread(clone_file, drive.path_on_host, part_for(disks[drive.drive_id]))
            for final, part in parts.items():
                if final.name != BASE_MEMORY:  # a link to a file others map: not ours to chmod
                    make_private(part)  # guest RAM and disks: 0600
                part.rename(final)
        except BaseException:
            for part in parts.values():
                part.unlink(missing_ok=True)
            raise
        return Snapshot(
            directory=snapshot_dir,
            engine=self.name,
            snapshot_type="Full",
            state_file=state_file,
            mem_file=mem_file if shared_ram is not None else None,  # else RAM is in the stream
            config=config.model_dump(mode="json"),
            disks=disks,
            engine_data={
                "accel": self._accel,
                "memory": memory,  # "file", "stream" (all RAM) or "diff" (pages unlike BASE_MEMORY's)
                "layout": device_layout(running, self._agent_ports),
                # where the base came from: a restore maps that path when it is still the same file,
                # so that the VM's own later pauses can link it again
                **(
                    {"base_memory": BASE_MEMORY, "base_origin": str(self._private_ram)}
                    if memory == "diff"
                    else {}
                ),
                "drive_formats": {k: v for k, v in self._formats.items() if k in disks},
                "qemu_version": (self._qmp.greeting.get("QMP", {}).get("version", {}) if self._qmp else {}),
            },
        )

    async def _set_capabilities(self, *, ignore_shared: bool) -> None:
        """``x-ignore-shared`` as asked; ``events`` on, so that the end of a migration wakes
        :meth:`_wait_migration` at once."""
        caps = {"x-ignore-shared": ignore_shared, "events": True}
        await self._execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )

    async def _save_diff(self, part: Path, link: Path) -> bool:
        """Write the stream through ``ramdiff`` against the file this VM's RAM maps (linked as ``link``,
        the same inode, so the restore maps exactly the pages compared). False when there is no such
        file or tool, or the tool refused the stream: the caller then writes the whole RAM."""
        from smartvm.qemu.ramdiff import ramdiff_binary  # only pauses need it, not every QEMU start

        tool = ramdiff_binary()
        source = self._private_ram
        if tool is None or source is None:
            return False
        try:
            os.link(source, link)
        except OSError as exc:  # gone, or on another filesystem than the snapshot
            log.info("pausing with the whole RAM: cannot link %s: %s", source, exc.strerror)
            return False
        try:
            refused = await self._migrate_through(part, tool, link)
        except _ToolUnavailable as exc:
            refused = str(exc)
        if refused is None:
            return True
        log.warning("pausing with the whole RAM: %s", refused)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        return False

    async def _prepare_outgoing(self, *, ignore_shared: bool) -> None:
        await self._set_capabilities(ignore_shared=ignore_shared)
        await self._execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})

    async def _migrate_to(self, part: Path, *, ignore_shared: bool) -> None:
        """Write the migration stream of the paused guest to ``part`` (without RAM when it is shared)."""
        await self._prepare_outgoing(ignore_shared=ignore_shared)
        await self._pass_file(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ErrorCode.SNAPSHOT_FAILED)
        await self._run_migration()

    async def _migrate_through(self, part: Path, tool: Path, base: Path) -> str | None:
        """Write the stream of the paused guest through ``tool`` (ramdiff against ``base``) to
        ``part``. The tool's refusal is returned, not raised: the guest stays paused, as after any
        failed migration, and the caller streams the whole RAM instead."""
        await self._prepare_outgoing(ignore_shared=False)
        process = await self._pass_filter(part, tool, base)
        try:
            await self._run_migration()
            failed = None
        except SmartVMError as exc:  # the tool's refusal breaks QEMU's pipe: its words say why
            failed = exc
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        try:  # QEMU closes its end when the migration is cleaned up: the tool sees EOF and exits
            said = (await asyncio.wait_for(process.communicate(), 30.0))[1].decode(errors="replace").strip()
        except TimeoutError:
            process.kill()
            await process.wait()
            said = "no end of stream within 30 s"
        if process.returncode != 0:
            return f"{tool.name} exited with {process.returncode}: {said or 'no message'}"
        if failed is not None:
            raise failed
        log.debug("%s", said)
        return None

    async def _pass_filter(self, part: Path, tool: Path, base: Path) -> asyncio.subprocess.Process:
        """Start ``tool`` writing ``part`` and hand QEMU the write end of a pipe into it."""
        read, write = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # fewer wake-ups for both sides; a default pipe works too
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 1 << 20)
            out = self._open_state(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, ErrorCode.SNAPSHOT_FAILED)
            try:
                process = await asyncio.create_subprocess_exec(
                    str(tool),
                    "-base",
                    str(base),
                    "-block",
                    RAM_BACKEND_ID,
                    "-pid",  # pages this QEMU never wrote are the base's: not even compared
                    str(self._require_process().pid),
                    stdin=read,
                    stdout=out,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                raise _ToolUnavailable(f"cannot run {tool}: {exc.strerror or exc}") from exc
            finally:
                os.close(out)  # the tool holds its own copy
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        try:
            await self._execute("getfd", {"fdname": _MIGRATION_FD}, fds=[write])
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        finally:
            os.close(write)  # QEMU holds its own copy: the tool sees the end of the stream with QEMU's
        return process

    async def _run_migration(self) -> None:
        """Migrate into the descriptor QEMU holds as ``_MIGRATION_FD`` and wait until it is done."""
        await self._execute("migrate", {"uri": f"fd:{_MIGRATION_FD}"})
        try:
            info = await self._wait_migration("writing the snapshot state", ErrorCode.SNAPSHOT_FAILED)
        except BaseException:
            # a timed-out or cancelled snapshot must not keep streaming into a file that is deleted
            with contextlib.suppress(SmartVMError):
                await self._execute("migrate_cancel", timeout=5.0)
                await self._wait_finalized()
            raise
        if info.get("status") != "completed":
            # a failed migration also leaves finish-migrate only a moment later: a caller that
            # resumes its VM after this error must find it paused, not "not finalized yet"
            with contextlib.suppress(SmartVMError):
                await self._wait_finalized()
            raise SmartVMError(
                ErrorCode.SNAPSHOT_FAILED,
                f"QEMU could not write the snapshot state: {info.get('error-desc', info)}",
            )
        await self._wait_finalized()

    async def _wait_finalized(self, timeout: float = 10.0) -> None:
        """Return once QEMU's run state has left ``finish-migrate``. The migration thread reports
        ``completed`` or ``failed`` (and sends the event) before the main loop finalizes the
        migration, and a ``cont`` in between fails with "Migration is not finalized yet": seen under
        load when a snapshot taken with ``pause_vm`` resumed its VM at once, and when a snapshot
        failed half-way and its VM was resumed. Usually one ``query-status``."""
        deadline = time.monotonic() + timeout
        while await self._status() == "finish-migrate":
            if time.monotonic() > deadline:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_FAILED, f"QEMU did not finalize the snapshot within {timeout:.0f}s"
                )
            await asyncio.sleep(_POLL_S / 5)

    async def _pass_file(self, path: Path, flags: int, code: ErrorCode) -> None:
        """Open ``path`` and hand QEMU the descriptor as ``fd:{_MIGRATION_FD}``: it reads or writes the
        stream itself (``exec:cat`` cost a process and a pipe copy of every byte)."""
        fd = self._open_state(path, flags, code)
        try:
            await self._execute("getfd", {"fdname": _MIGRATION_FD}, fds=[fd])
        finally:
            os.close(fd)  # QEMU holds its own copy now

    @staticmethod
    def _open_state(path: Path, flags: int, code: ErrorCode) -> int:
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SmartVMError(code, f"cannot open the snapshot state {path}: {exc.strerror}") from exc

    async def _wait_migration(self, what: str, code: ErrorCode, timeout: float = 300.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until the migration ends (completed, failed or cancelled)."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = await self._execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise SmartVMError(code, f"{what} did not finish within {timeout:.0f}s")
            if self._qmp is None:
                await asyncio.sleep(_POLL_S)
                continue
            with contextlib.suppress(SmartVMError):  # QEMU's MIGRATION event, else poll again soon
                await self._qmp.wait_event("MIGRATION", _POLL_S * 4)

    async def restore(self, request: RestoreRequest) -> None:
        snapshot = request.snapshot
        if snapshot.snapshot_type != "Full":
            raise self._unsupported(f"{snapshot.snapshot_type} snapshots")
        if request.enable_diff_snapshots:
            raise self._unsupported("diff snapshots (enable_diff_snapshots)")
        if request.mem_backend != "File":
            raise self._unsupported(f"mem_backend={request.mem_backend!r}")
        config = request.config
        ports = self._check_layout(snapshot, config)
        mem_bytes = config.machine_config.mem_size_mib << 20
        snapshot.check_files(state_magic=STATE_MAGIC, mem_bytes=mem_bytes if snapshot.mem_file else None)
        # A memory file is mapped privately (copy-on-write): clones share its unmodified pages. So is
        # the base of a "diff" stream, which then sets the pages that differ.
        memory = snapshot.mem_path or _diff_base(snapshot, mem_bytes)
        spec = await self._launch_spec(
            config,
            incoming=True,
            ram_file=memory,
            ram_shared=False,
            snapshot_accel=snapshot.engine_data.get("accel"),
            agent_ports=ports,
        )
        self._private_ram = memory
        what = f"restoring {snapshot.state_path}"
        in_stream = snapshot.mem_path is None  # the stream carries RAM (all of it, or a diff)
        if in_stream:
            await self._start_loading(config, spec, snapshot.state_path, paused=not request.resume_vm)
        else:  # QEMU 7.2 has no command line switch for x-ignore-shared: QMP sets it first
            await self._start(config, spec, paused=not request.resume_vm, what=what)
        try:
            if in_stream:
                await self._wait_incoming(what)
            else:
                await self._migrate_from(snapshot.state_path, ignore_shared=True)
            await self._apply_balloon_stats(config)
            if request.resume_vm:  # the stream says "paused" (snapshots are taken paused)
                await self._execute("cont")
        except BaseException:
            await self.kill()
            raise

    def _check_layout(self, snapshot: Snapshot, config: MicroVMConfig) -> int:
        """Refuse device sets QEMU would misread; memory size is left to QEMU's own check. Returns the
        snapshot's agent port count: the restoring QEMU must have exactly its virtio-serial ports."""
        saved = snapshot.engine_data.get("layout")
        if not isinstance(saved, dict):
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID,
                f"{snapshot.directory} has no QEMU device layout; it was not made by this engine",
            )
        where = f"the manifest of {snapshot.directory}"
        ports = check_port_count(saved.get("agent_ports"), where, ErrorCode.SNAPSHOT_INVALID)
        wanted = device_layout(config, ports)
        # With RAM in the stream QEMU checks the memory size itself (its message is the error);
        # a memory file must be checked here, before QEMU maps it.
        whole_stream = snapshot.mem_file is None and snapshot.engine_data.get("memory") != "diff"
        skip = {"agent_ports"} | ({"mem_size_mib"} if whole_stream else set())
        diffs = [
            f"{key}: snapshot has {saved.get(key)!r}, restore has {value!r}"
            for key, value in wanted.items()
            if key not in skip and saved.get(key) != value
        ]
        if diffs:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_MISMATCH,
                "mismatch between the snapshot and the restoring VM: "
                + "; ".join(diffs)
                + "; restore with the snapshot's memory size and devices",
            )
        return ports

    async def _start_loading(
        self, config: MicroVMConfig, spec: LaunchSpec, state_path: Path, *, paused: bool
    ) -> None:
        """Start QEMU loading ``state_path`` at once (``-incoming fd:``, the file inherited): no QMP
        round trips before the load, and the load overlaps QEMU's start and the QMP handshake."""
        what = f"restoring {state_path}"
        state = self._open_state(state_path, os.O_RDONLY, ErrorCode.SNAPSHOT_INVALID)
        try:
            spec = replace(spec, incoming_fd=_INCOMING_FD)
            await self._start(config, spec, paused=paused, what=what, pass_fds={_INCOMING_FD: state})
        except SmartVMError as exc:
            process = self._process
            if process is not None and _LOAD_FAILED in tail(process.engine_log, 2048):
                raise self._incoming_error(what, process) from exc
            raise
        finally:
            os.close(state)  # QEMU holds its own copy

    async def _migrate_from(self, state_path: Path, *, ignore_shared: bool) -> None:
        """Load ``state_path`` into a QEMU started with ``-incoming defer``."""
        what = f"restoring {state_path}"
        process = self._require_process()
        try:
            await self._set_capabilities(ignore_shared=ignore_shared)
            await self._pass_file(state_path, os.O_RDONLY, ErrorCode.SNAPSHOT_INVALID)
            await self._execute("migrate-incoming", {"uri": f"fd:{_MIGRATION_FD}"})
        except SmartVMError as exc:
            if process.is_alive():
                raise
            raise self._incoming_error(what, process) from exc
        await self._wait_incoming(what)

    async def _wait_incoming(self, what: str) -> None:
        """Wait until QEMU has loaded the stream it was started with."""
        process = self._require_process()
        try:
            info = await self._wait_migration(what, ErrorCode.SNAPSHOT_INVALID)
        except SmartVMError as exc:
            if process.is_alive():
                raise
            raise self._incoming_error(what, process) from exc
        if info.get("status") != "completed":
            await process.wait(2.0)
            raise self._incoming_error(what, process, str(info.get("error-desc", "")))

    @staticmethod
    def _incoming_error(what: str, process: QemuProcess, desc: str = "") -> SmartVMError:
        said = tail(process.engine_log, 2048) or desc or "no message"
        # A stream that ends early fails in whatever section it was cut in, with an I/O error: damage,
        # not a mismatch (a section that does not fit the machine fails with "Invalid argument").
        truncated = _TRUNCATED_HINT in said
        mismatch = not truncated and any(h in said for h in _MISMATCH_HINTS)
        code = ErrorCode.SNAPSHOT_MISMATCH if mismatch else ErrorCode.SNAPSHOT_INVALID
        hint = (
            "restore with the snapshot's memory size and devices"
            if code == ErrorCode.SNAPSHOT_MISMATCH
            else "the state file may be damaged or from another QEMU version"
        )
        return SmartVMError(code, f"{what} failed: QEMU said: {said}\n({hint})")

    async def _apply_balloon_stats(self, config: MicroVMConfig) -> None:
        if config.balloon is not None and config.balloon.stats_polling_interval_s:
            await self._execute(
                "qom-set",
                {
                    "path": "/machine/peripheral/balloon0",
                    "property": "guest-stats-polling-interval",
                    "value": config.balloon.stats_polling_interval_s,
                },
            )

    # --- stop ----------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.is_alive():
            try:
                if await self._status() == "running":
                    await self._execute("system_powerdown")
                    await process.wait(timeout)
                if process.is_alive():
                    with contextlib.suppress(SmartVMError):
                        await self._execute("quit", timeout=2.0)
                    await process.wait(2.0)
            except SmartVMError:
                pass  # QEMU is gone or not answering: the kill below settles it
        await self.kill()

    async def kill(self) -> None:
        if self._process is not None:
            await self._process.kill()
        await self.close()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    async def close(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None

    # --- detach / attach -------------------------------------------------------------------------------
    async def detach(self) -> dict[str, Any]:
        data = self.record_data()
        await self.close()
        self._require_process().proc.release()
        self._process = None
        return data

    def record_data(self) -> dict[str, Any]:
        process = self._require_process()
        if not process.is_alive():
            raise process.exited_error("cannot record the VM", ErrorCode.INVALID_STATE)
        return {
            "engine": self.name,
            "pid": process.pid,
            "pid_start_time": process.start_time,
            "qmp_socket": str(self.runtime.qmp_socket),
            "agent_socket": str(self.runtime.agent_socket),
            "agent_ports": self._agent_ports,
            "accel": self._accel,
            "accel_reason": self._accel_reason,
            "shared_ram": str(self._shared_ram) if self._shared_ram else None,
            "private_ram": str(self._private_ram) if self._private_ram else None,
            "drive_formats": dict(self._formats),
            "config": self._config.model_dump(mode="json") if self._config else None,
        }

    @classmethod
    def attach(cls, runtime: VMRuntime, options: SmartVMOptions, record: dict[str, Any]) -> QemuEngine:
        engine = cls(runtime, options)
        process = QemuProcess.adopt(
            int(record["pid"]),
            int(record["pid_start_time"]),
            engine_log=runtime.engine_log,
            console_log=runtime.console_log,
        )
        if not process.is_alive():
            raise SmartVMError(
                ErrorCode.VM_NOT_FOUND,
                f"the QEMU process (pid {process.pid}) of VM {runtime.vm_id!r} is gone",
            )
        engine._process = process
        engine._accel = "kvm" if record.get("accel") == "kvm" else "tcg"
        engine._accel_reason = str(record.get("accel_reason", ""))
        engine._shared_ram = Path(record["shared_ram"]) if record.get("shared_ram") else None
        engine._private_ram = Path(record["private_ram"]) if record.get("private_ram") else None
        engine._formats = {str(k): str(v) for k, v in dict(record.get("drive_formats") or {}).items()}
        where = f"the record of VM {runtime.vm_id!r}"
        engine._agent_ports = check_port_count(record.get("agent_ports"), where, ErrorCode.INVALID_CONFIG)
        config = record.get("config")
        engine._config = MicroVMConfig.model_validate(config) if config else None
        return engine

    # --- info ------------------------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        process = self._require_process()
        status: dict[str, Any] = await self._execute("query-status")
        version: dict[str, Any] = await self._execute("query-version")
        return {
            "engine": self.name,
            "pid": process.pid,
            "state": status.get("status"),
            "running": status.get("running"),
            "accel": self._accel,
            "accel_reason": self._accel_reason,
            "qemu_version": version.get("qemu"),
        }

    async def get_vm_config(self) -> dict[str, Any]:
        if self._config is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "QEMU is not running for this VM")
        return self._config.model_dump(mode="json")

    # --- balloon ----------------------------------------------------------------------------------------
    def _need_balloon(self) -> MicroVMConfig:
        if self._config is None or self._config.balloon is None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "this VM was configured without a balloon")
        return self._config

    async def update_balloon(self, amount_mib: int) -> None:
        config = self._need_balloon()
        mem = config.machine_config.mem_size_mib
        if not 0 <= amount_mib < mem:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"balloon amount_mib must be between 0 and {mem - 1}, not {amount_mib}",
            )
        await self._execute("balloon", {"value": (mem - amount_mib) << 20})

    async def get_balloon_stats(self) -> dict[str, Any]:
        config = self._need_balloon()
        actual: dict[str, Any] = await self._execute("query-balloon")
        stats: dict[str, Any] = await self._execute(
            "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
        )
        actual_mib = int(actual.get("actual", 0)) >> 20
        return {
            "actual_mib": actual_mib,
            "amount_mib": config.machine_config.mem_size_mib - actual_mib,
            "stats": stats.get("stats", {}),
            "last_update": stats.get("last-update"),
        }

    # --- agent channel ----------------------------------------------------------------------------------
    async def open_agent_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the host socket of a free virtio-serial agent port (QEMU serves one client per
        port); the port stays claimed until the stream is closed. AgentBusyError when none is free."""
        process = self._require_process()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        claim = claim_port(self.runtime, self._agent_ports)
        path = port_socket(self.runtime, claim.index)
        try:
            while True:
                if not process.is_alive():
                    await process.wait(0)
                    raise process.exited_error("the guest agent channel is gone", ErrorCode.AGENT_UNAVAILABLE)
                try:
                    return await open_claimed(path, claim)
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    last = exc
                if time.monotonic() >= deadline:
                    raise SmartVMError(
                        ErrorCode.AGENT_TIMEOUT,
                        f"agent socket {path} did not accept a connection within {timeout:.1f}s ({last})",
                    )
                await asyncio.sleep(0.02)
        except BaseException:
            claim.release()
            raise
