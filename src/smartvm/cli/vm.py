"""``smartvm run``: start a microVM, run one command in it through the guest agent, stop it.

The VM is restored from a cached snapshot of the ready guest (made by the first run of that guest
and shape, see ``smartvm.sandbox.run_snapshots``), or booted with ``--cold``; both give the same
output. The command's stdout/stderr pass through as they come, and smartvm exits with the command's
exit code (124 when it outlives ``--timeout``). Ctrl-C, SIGTERM and SIGHUP stop the VM cleanly (exit
codes 130, 143, 129). The commands for VMs that
keep running (start, exec, cp, ps, stop) live in ``cli/detached.py`` and reuse the pieces here.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

from smartvm.config import BootSource, Drive, Entropy, MachineConfig, MicroVMConfig, new_vm_id
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM

if TYPE_CHECKING:
    from smartvm.images.guest_image import GuestImage
    from smartvm.vm import MicroVM

EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
COLD_HELP = (
    "boot the guest instead of restoring the cached snapshot of it (made by the first start of each "
    "guest and shape, rebuilt when the kernel, root filesystem or shape change)"
)

ImageKind = Literal["busybox", "debian"]
T = TypeVar("T")
_UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived; the work was cancelled and its cleanup has run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def run_unwinding(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` where SIGTERM/SIGHUP cancel the work like Ctrl-C does (finally blocks stop the
    VM and remove its runtime dir) and then raise :class:`Terminated` instead of dying on the spot."""
    received: list[int] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for sig in _UNWIND_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await coro
        finally:
            for sig in _UNWIND_SIGNALS:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if received:
            raise Terminated(received[0]) from None
        raise


def guest_config(kind: ImageKind, *, cpus: int, memory_mib: int) -> MicroVMConfig:
    """A VM config booting the default guest image of ``kind`` (built and cached on first use)."""
    from smartvm.images.guest_image import ensure_default_guest

    return image_config(ensure_default_guest(kind=kind), cpus=cpus, memory_mib=memory_mib)


def image_config(
    image: GuestImage, *, cpus: int, memory_mib: int, hostname: str | None = None
) -> MicroVMConfig:
    """A VM config booting ``image`` (the guest's hostname set at boot, when given)."""
    boot_args = image.boot_args if hostname is None else f"{image.boot_args} smartvm.hostname={hostname}"
    return MicroVMConfig(
        boot_source=BootSource(kernel_image_path=str(image.kernel_path), boot_args=boot_args),
        machine_config=MachineConfig(vcpu_count=cpus, mem_size_mib=memory_mib),
        # virtio-rng: without it the guest's entropy pool starts empty and the agent's Python blocks
        # in getrandom() at start-up (measured under TCG: agent ready after 3.4 s without, 2.0 s with)
        entropy=Entropy(),
        drives=[
            Drive(
                drive_id="rootfs",
                path_on_host=str(image.rootfs_path),
                is_root_device=True,
                is_read_only=image.rootfs_type == "squashfs",
            )
        ],
    )


def _write(stream: int) -> Callable[[bytes], None]:
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    return write


async def exec_passthrough(
    vm: MicroVM, argv: list[str], *, timeout: float | None, ready_timeout: float
) -> int:
    """Run ``argv`` in ``vm`` with stdout/stderr passed through; its exit code (124 on timeout)."""
    try:
        result = await vm.exec(
            argv,
            ready_timeout=ready_timeout,
            timeout=timeout,
            on_stdout=_write(1),
            on_stderr=_write(2),
        )
    except SmartVMError as exc:
        if exc.code is ErrorCode.EXEC_TIMEOUT:
            return EXIT_TIMEOUT
        raise
    return EXIT_TIMEOUT if result.timed_out else result.exit_code


def check_choices(engine: str, image: str) -> None:
    """Reject an unknown --engine or --image with the accepted values."""
    if engine not in ("auto", "firecracker", "qemu"):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"--engine must be auto, firecracker or qemu, not {engine}"
        )
    if image not in ("busybox", "debian"):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"--image must be busybox or debian, not {image}")


async def start_vm(
    svm: SmartVM,
    kind: ImageKind,
    *,
    cpus: int,
    memory_mib: int,
    vm_id: str,
    cold: bool,
    detachable: bool,
    boot_timeout: float,
) -> MicroVM:
    """A running VM of the default guest ``kind`` whose agent answers, with hostname ``vm_id``:
    restored from the cached snapshot of that guest and shape (made first if there is none), or
    booted when ``cold``. Nothing is left running if a step fails."""
    from smartvm.images.guest_image import ensure_default_guest

    image = await asyncio.to_thread(ensure_default_guest, kind=kind)
    if not cold:
        from smartvm.sandbox.run_snapshots import spec_for, start_from_snapshot

        return await start_from_snapshot(
            spec_for(image, cpus=cpus, memory_mib=memory_mib),
            svm=svm,
            vm_id=vm_id,
            hostname=vm_id,
            ready_timeout=boot_timeout,
            detachable=detachable,
            progress=_first_start_note(),
        )
    config = image_config(image, cpus=cpus, memory_mib=memory_mib, hostname=vm_id)
    vm = await svm.create_vm(config.model_copy(update={"id": vm_id}), detachable=detachable)
    try:
        await vm.start()
        await vm.wait_ready(boot_timeout)
    except BaseException:
        await asyncio.shield(vm.kill())
        raise
    return vm


def _first_start_note() -> Callable[[str], None]:
    """Say once, on a terminal, why the first start of a guest takes longer (output stays the same
    otherwise: scripts see what a cold boot prints)."""
    said: list[bool] = []

    def note(step: str) -> None:
        if not said and sys.stderr.isatty():
            said.append(True)
            sys.stderr.write(
                "smartvm: first start of this guest and shape: booting it once to keep a ready "
                "snapshot (later starts restore it; --cold always boots)\n"
            )
            sys.stderr.flush()

    return note


async def run_command(
    argv: list[str],
    *,
    options: SmartVMOptions,
    kind: ImageKind,
    cpus: int,
    memory_mib: int,
    timeout: float | None,
    boot_timeout: float,
    cold: bool = False,
) -> int:
    """Start a VM (:func:`start_vm`), run ``argv`` with output passed through, end the VM; the
    command's exit code.

    The VM is killed, not powered off: its only writable disk is a throwaway copy-on-write layer in
    its runtime dir, so a clean guest shutdown would protect nothing and cost about 2 s (TCG).
    """
    async with SmartVM(options) as svm:
        vm = await start_vm(
            svm,
            kind,
            cpus=cpus,
            memory_mib=memory_mib,
            vm_id=new_vm_id(),
            cold=cold,
            detachable=False,
            boot_timeout=boot_timeout,
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
        check_choices(engine, image)
        opts: dict[str, object] = {"engine": engine}
        if runtime_dir is not None:
            opts["runtime_dir"] = runtime_dir
        options = SmartVMOptions.model_validate(opts)
        try:
            code = run_unwinding(
                run_command(
                    argv,
                    options=options,
                    kind=image,  # type: ignore[arg-type]
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

    from smartvm.cli import detached

    detached.register(app)
