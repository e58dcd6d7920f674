"""What the ``run`` command (cli/vm.py) and the commands for running VMs (cli/detached.py) share:
signal-safe ``asyncio.run``, output pass-through of a guest command, checks of common options, and
the ``--cold`` option with the note a first snapshot-start prints.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.guests import GUEST_KINDS, GuestKind

if TYPE_CHECKING:
    from smartvm.vm import MicroVM

EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
COLD_HELP = (
    "boot the guest instead of restoring the cached snapshot of it (made by the first start of each "
    "guest and shape, rebuilt when the kernel, root filesystem or shape change)"
)

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


def check_choices(engine: str, image: str) -> GuestKind:
    """Reject an unknown --engine or --image with the accepted values; the guest kind."""
    if engine not in ("auto", "firecracker", "qemu"):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"--engine must be auto, firecracker or qemu, not {engine}"
        )
    if image not in GUEST_KINDS:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"--image must be {' or '.join(GUEST_KINDS)}, not {image}"
        )
    return cast(GuestKind, image)


def first_start_note() -> Callable[[str], None]:
    """A ``progress`` for :func:`smartvm.guests.start_guest` that says once, on a terminal, why the
    first start of a guest takes longer (output stays the same otherwise: scripts see what a cold
    boot prints)."""
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
