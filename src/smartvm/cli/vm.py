"""``smartvm run``: start a microVM, run one command in it through the guest agent, stop it.

The VM is restored from a cached snapshot of the ready guest (made by the first run of that guest
and shape, see ``smartvm.sandbox.run_snapshots``), or booted with ``--cold``; both give the same
output. The command's stdout/stderr pass through as they come, and smartvm exits with the command's
exit code (124 when it outlives ``--timeout``). Ctrl-C, SIGTERM and SIGHUP stop the VM cleanly (exit
codes 130, 143, 129). The commands for VMs that keep running (start, exec, cp, ps, stop) live in
``cli/detached.py``; what both use is in ``cli/common.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

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
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.guests import GuestKind, start_guest
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM


async def run_command(
    argv: list[str],
    *,
    options: SmartVMOptions,
    kind: GuestKind,
    cpus: int,
    memory_mib: int,
    timeout: float | None,
    boot_timeout: float,
    cold: bool = False,
) -> int:
    """Start a VM (:func:`smartvm.guests.start_guest`), run ``argv`` with output passed through,
    end the VM; the command's exit code.

    The VM is killed, not powered off: its only writable disk is a throwaway copy-on-write layer in
    its runtime dir, so a clean guest shutdown would protect nothing and cost about 2 s (TCG).
    """
    async with SmartVM(options) as svm:
        vm = await start_guest(
            svm,
            kind,
            cpus=cpus,
            memory_mib=memory_mib,
            cold=cold,
            ready_timeout=boot_timeout,
            progress=first_start_note(),
        )
        try:
            return await exec_passthrough(vm, argv, timeout=timeout, ready_timeout=boot_timeout)
        finally:
            await asyncio.shield(vm.kill())


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run(
        ctx: typer.Context,
        engine: Annotated[str, typer.Option(help="auto, firecracker or qemu")] = "auto",
        image: Annotated[str, typer.Option(help="guest image: busybox (default) or debian")] = "busybox",
        cpus: Annotated[int, typer.Option(min=1, max=32)] = 1,
        memory: Annotated[int, typer.Option(min=64, help="guest memory in MiB")] = 256,
        timeout: Annotated[float | None, typer.Option(min=0.1, help="seconds the command may run")] = None,
        boot_timeout: Annotated[float, typer.Option(help="seconds to wait for the guest agent")] = 60.0,
        runtime_dir: Annotated[Path | None, typer.Option(help="where per-VM runtime dirs go")] = None,
        cold: Annotated[bool, typer.Option("--cold", help=COLD_HELP)] = False,
    ) -> None:
        """Start a microVM, run CMD in it, stop it; exit with CMD's exit code: smartvm run -- uname -a

        The VM is restored from a cached snapshot of the ready guest (made by its first run); --cold boots.
        """
        argv = list(ctx.args)
        if not argv:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, "give the command after --, e.g. smartvm run -- uname -a"
            )
        kind = check_choices(engine, image)
        opts: dict[str, object] = {"engine": engine}
        if runtime_dir is not None:
            opts["runtime_dir"] = runtime_dir
        options = SmartVMOptions.model_validate(opts)
        try:
            code = run_unwinding(
                run_command(
                    argv,
                    options=options,
                    kind=kind,
                    cpus=cpus,
                    memory_mib=memory,
                    timeout=timeout,
                    boot_timeout=boot_timeout,
                    cold=cold,
                )
            )
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except Terminated as exc:
            code = exc.exit_code
        raise typer.Exit(code)
