"""VMs that keep running between commands: ``smartvm start``, ``exec``, ``cp``, ``ps``, ``stop``.

``start`` boots a VM, waits for its agent and detaches it: the hypervisor runs on without this
process, tracked by a record in ``<data-dir>/vms``. Every other command attaches to it through that
record, does its work and detaches again (``stop`` ends it, removing record and runtime dir).
Records whose hypervisor has gone are pruned, with their runtime dirs, by ``ps``, ``stop`` and attach.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from smartvm.cli.common import (
    COLD_HELP,
    EXIT_INTERRUPTED,
    Terminated,
    check_choices,
    exec_passthrough,
    first_start_note,
    run_unwinding,
)
from smartvm.cli.copy_plan import CopyPlan, local_target, split_copy
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.guests import GuestKind, start_guest
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import MicroVM, VMState
from smartvm.vm_records import VMRecord

T = TypeVar("T")

_VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_REMOTE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):(/.*)")

DataDir = Annotated[Path | None, typer.Option(help="where records of running VMs are kept")]


def _options(data_dir: Path | None, runtime_dir: Path | None = None, engine: str = "auto") -> SmartVMOptions:
    opts: dict[str, object] = {"engine": engine}
    if data_dir is not None:
        opts["data_dir"] = data_dir
    if runtime_dir is not None:
        opts["runtime_dir"] = runtime_dir
    return SmartVMOptions.model_validate(opts)


# --- start -------------------------------------------------------------------------------------------
async def start_detached(
    options: SmartVMOptions,
    *,
    kind: GuestKind,
    cpus: int,
    memory_mib: int,
    vm_id: str | None,
    boot_timeout: float,
    cold: bool = False,
) -> VMRecord:
    """Start a VM (restored from the cached snapshot of the guest, or booted when ``cold``), wait
    for its agent, detach it; nothing is left running if any step fails."""
    from smartvm.config import new_vm_id

    if vm_id is not None and not _VM_ID.fullmatch(vm_id):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"--id {vm_id!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    vm_id = vm_id or new_vm_id()
    async with SmartVM(options) as svm:
        svm.prune_detached()
        if svm.records.load(vm_id) is not None:
            raise SmartVMError(
                ErrorCode.DUPLICATE_VM_ID, f"VM {vm_id!r} is already running; pick another --id"
            )
        vm = await start_guest(
            svm,
            kind,
            cpus=cpus,
            memory_mib=memory_mib,
            vm_id=vm_id,
            cold=cold,
            detachable=True,
            ready_timeout=boot_timeout,
            progress=first_start_note(),
        )
        try:
            return await vm.detach()
        except BaseException:
            await asyncio.shield(vm.stop())
            raise


# --- attach for one job --------------------------------------------------------------------------------
async def with_attached(options: SmartVMOptions, vm_id: str, job: Callable[[MicroVM], Awaitable[T]]) -> T:
    """Attach to ``vm_id``, run ``job``, detach again (unless the job ended the VM)."""
    async with SmartVM(options) as svm:
        vm = await svm.attach_vm(vm_id)
        try:
            return await job(vm)
        finally:
            if vm.state in (VMState.RUNNING, VMState.PAUSED):
                await asyncio.shield(vm.detach())


# --- cp ------------------------------------------------------------------------------------------------
def plan_copy(src: str, dst: str) -> CopyPlan:
    """Which side of ``smartvm cp SRC DST`` is the guest (``VM_ID:/absolute/path``)."""
    usage = (
        "VM_ID:/absolute/path, e.g. smartvm cp ./data.csv vm1:/tmp/data.csv "
        "or smartvm cp vm1:/etc/os-release ."
    )
    return split_copy(src, dst, _REMOTE, usage)


async def copy_file(vm: MicroVM, plan: CopyPlan) -> int:
    """Copy one regular file between host and guest, keeping its permission bits; the bytes copied.

    The host path comes from the user's arguments alone, never from the guest's answers: into a host
    directory, the file is named after the last component of the guest path the user gave. The host
    file never gets setuid, setgid or sticky bits (see :meth:`Files.download`).
    """
    files = vm.files
    if plan.upload:
        if not plan.local.is_file():
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{plan.local} is not a regular file (copying directories is not supported)",
            )
        target = plan.guest_path
        if target.endswith("/") or (await files.exists(target) and (await files.stat(target)).type == "dir"):
            target = target.rstrip("/") + "/" + plan.local.name
        return await files.upload(plan.local, target)
    local = local_target(plan, plan.guest_path)
    info = await files.stat(plan.guest_path)
    if info.type != "file":
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{plan.guest_path} in VM {vm.id!r} is a {info.type}, not a regular file "
            "(copying directories is not supported)",
        )
    return await files.download(plan.guest_path, local, keep_mode=True)


# --- ps / stop -----------------------------------------------------------------------------------------
def _uptime(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ps_rows(svm: SmartVM) -> list[dict[str, Any]]:
    """One row per detached VM; VMs whose hypervisor is gone are reported once as exited and pruned."""
    rows = [_row(r, "exited") for r in svm.prune_detached()]
    rows += [_row(r, r.state) for r in svm.detached_vms()]
    return sorted(rows, key=lambda row: str(row["id"]))


def _row(record: VMRecord, state: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "engine": record.engine,
        "state": state,
        "pid": record.pid,
        "uptime_s": round(record.uptime, 1),
        "runtime_dir": str(record.runtime_dir),
    }


async def stop_vms(options: SmartVMOptions, vm_ids: list[str], timeout: float) -> list[str]:
    """Stop each VM (in parallel): graceful, killed after ``timeout``; the ids stopped.

    A VM whose hypervisor had already exited has its record pruned and counts as stopped.
    """
    async with SmartVM(options) as svm:
        gone = {r.id for r in svm.prune_detached()}

        async def stop_one(vm_id: str) -> str:
            if vm_id in gone:
                return vm_id
            vm = await svm.attach_vm(vm_id)
            await vm.stop(timeout)
            return vm_id

        results = await asyncio.gather(*(stop_one(i) for i in vm_ids), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return [r for r in results if isinstance(r, str)]


# --- commands ------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    @app.command()
    def start(
        engine: Annotated[str, typer.Option(help="auto, firecracker or qemu")] = "auto",
        image: Annotated[str, typer.Option(help="guest image: busybox (default) or debian")] = "busybox",
        cpus: Annotated[int, typer.Option(min=1, max=32)] = 1,
        memory: Annotated[int, typer.Option(min=64, help="guest memory in MiB")] = 256,
        vm_id: Annotated[str | None, typer.Option("--id", help="the VM id (default: a fresh vm-...)")] = None,
        boot_timeout: Annotated[float, typer.Option(help="seconds to wait for the guest agent")] = 60.0,
        data_dir: DataDir = None,
        runtime_dir: Annotated[Path | None, typer.Option(help="where per-VM runtime dirs go")] = None,
        cold: Annotated[bool, typer.Option("--cold", help=COLD_HELP)] = False,
    ) -> None:
        """Start a microVM that keeps running (use exec, cp, ps, stop); prints its id as the last line.

        Restored from the cached snapshot of the ready guest, like smartvm run; --cold boots it.
        """
        kind = check_choices(engine, image)
        options = _options(data_dir, runtime_dir, engine)
        try:
            record = run_unwinding(
                start_detached(
                    options,
                    kind=kind,
                    cpus=cpus,
                    memory_mib=memory,
                    vm_id=vm_id,
                    boot_timeout=boot_timeout,
                    cold=cold,
                )
            )
        except Terminated as exc:
            raise typer.Exit(exc.exit_code) from None
        typer.echo(record.id)

    @app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def exec_(
        ctx: typer.Context,
        vm_id: Annotated[str, typer.Argument(help="a VM started with smartvm start")],
        timeout: Annotated[float | None, typer.Option(min=0.1, help="seconds the command may run")] = None,
        ready_timeout: Annotated[float, typer.Option(help="seconds to wait for the guest agent")] = 30.0,
        data_dir: DataDir = None,
    ) -> None:
        """Run CMD in a running VM; exit with CMD's exit code (124 on timeout): smartvm exec VM -- ls /"""
        argv = list(ctx.args)
        if not argv:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"give the command after --, e.g. smartvm exec {vm_id} -- uname -a",
            )
        options = _options(data_dir)

        async def job(vm: MicroVM) -> int:
            return await exec_passthrough(vm, argv, timeout=timeout, ready_timeout=ready_timeout)

        try:
            code = run_unwinding(with_attached(options, vm_id, job))
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except Terminated as exc:
            code = exc.exit_code
        raise typer.Exit(code)

    @app.command()
    def cp(
        src: Annotated[str, typer.Argument(help="a host path or VM_ID:/guest/path")],
        dst: Annotated[str, typer.Argument(help="a host path or VM_ID:/guest/path")],
        data_dir: DataDir = None,
    ) -> None:
        """Copy a file into or out of a running VM, keeping its mode: smartvm cp ./f vm1:/tmp/f"""
        plan = plan_copy(src, dst)

        async def job(vm: MicroVM) -> int:
            return await copy_file(vm, plan)

        size = asyncio.run(with_attached(_options(data_dir), plan.vm_id, job))
        print(f"copied {size} bytes", file=sys.stderr)

    @app.command()
    def ps(
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
        data_dir: DataDir = None,
    ) -> None:
        """List VMs started with smartvm start (VMs that exited are shown once, then forgotten)."""
        rows = ps_rows(SmartVM(_options(data_dir)))
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo("no VMs started with smartvm start are running", err=True)
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None)
        for column in ("id", "engine", "state", "pid", "uptime", "runtime dir"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["id"],
                row["engine"],
                row["state"],
                str(row["pid"]),
                _uptime(row["uptime_s"]),
                row["runtime_dir"],
            )
        Console(width=200).print(table)

    @app.command()
    def stop(
        vm_id: Annotated[str | None, typer.Argument(help="the VM to stop")] = None,
        all_vms: Annotated[
            bool, typer.Option("--all", help="stop every VM started with smartvm start")
        ] = False,
        timeout: Annotated[
            float, typer.Option(min=0, help="seconds for a clean poweroff before kill")
        ] = 10.0,
        data_dir: DataDir = None,
    ) -> None:
        """Stop a VM started with smartvm start (clean poweroff, then kill); removes its runtime dir."""
        if (vm_id is None) == (not all_vms):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "give a VM id or --all (not both)")
        options = _options(data_dir)
        if all_vms:
            svm = SmartVM(options)
            ids = [r.id for r in svm.records.records()]
        else:
            assert vm_id is not None
            ids = [vm_id]
        for stopped in asyncio.run(stop_vms(options, ids, timeout)):
            typer.echo(stopped)
