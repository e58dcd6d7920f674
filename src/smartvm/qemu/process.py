"""The QEMU process of one VM: spawn (inside the VM's network namespace when it has one), watch, reap,
or adopt one started earlier.

QEMU's stdout and stderr go to the engine log; errors quote its tail and the tail of the guest
console, because that is where a failed boot or a guest panic explains itself.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.netlink_batch import netns_exec_argv
from smartvm.host.process import HostProcess, tail
from smartvm.host.sweep import note_hypervisor
from smartvm.options import SmartVMOptions


def find_qemu(options: SmartVMOptions) -> Path:
    """The QEMU binary: ``options.qemu_binary_path``, else ``qemu-system-x86_64`` on PATH."""
    binary = options.qemu_binary_path or shutil.which("qemu-system-x86_64")
    if binary is None or not Path(binary).exists():
        raise SmartVMError(
            ErrorCode.BINARY_NOT_FOUND,
            "qemu-system-x86_64 not found: apt-get install qemu-system-x86 or set qemu_binary_path",
        )
    return Path(binary)


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")  # closed by the caller once QEMU holds its own descriptor


class QemuProcess:
    """One running ``qemu-system-*`` process and its logs.

    The process is a :class:`HostProcess`: nothing kills it implicitly, so a VM can be detached
    (:meth:`detach`) and adopted again later by pid + start time (:meth:`adopt`).
    """

    def __init__(self, proc: HostProcess, engine_log: Path, console_log: Path) -> None:
        self.proc = proc
        self.engine_log = engine_log
        self.console_log = console_log

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        engine_log: Path,
        console_log: Path,
        netns: str | None = None,
        pass_fds: Mapping[int, int] | None = None,
    ) -> QemuProcess:
        """Start QEMU. With ``netns`` it runs inside that network namespace (entered in place, so the
        pid we hold is QEMU's)."""
        if netns is not None:
            argv = netns_exec_argv(netns, argv)
        with _open_log(engine_log) as log:
            try:
                proc = HostProcess.spawn(argv, stdout=log.fileno(), stderr=log.fileno(), pass_fds=pass_fds)
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.BINARY_NOT_FOUND
                    if isinstance(exc, FileNotFoundError)
                    else ErrorCode.BOOT_FAILED,
                    f"cannot start {argv[0]}: {exc.strerror or exc}",
                ) from exc
        try:
            note_hypervisor(engine_log.parent, proc)  # the engine log lives in the VM's runtime dir
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        return cls(proc, engine_log, console_log)

    @classmethod
    def adopt(cls, pid: int, start_time: int, *, engine_log: Path, console_log: Path) -> QemuProcess:
        """A QEMU started earlier (possibly by another process), found by pid + start time."""
        return cls(HostProcess.adopt(pid, start_time), engine_log, console_log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def start_time(self) -> int:
        return self.proc.start_time

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    @property
    def returncode(self) -> int | None:
        """QEMU's exit code (None while it runs, or when it is not our child)."""
        return self.proc.returncode

    async def wait(self, timeout: float | None = None) -> bool:
        """Whether QEMU has exited within ``timeout`` seconds (reaped when it is our child)."""
        return await self.proc.wait(timeout)

    async def kill(self) -> None:
        """SIGKILL and wait until it is gone (reaped when it is our child). Idempotent."""
        self.proc.kill()
        await self.proc.wait()

    def describe_exit(self, what: str) -> str:
        """A message for ``what`` failing because QEMU ended, with both logs' tails."""
        code = self.proc.returncode
        if self.proc.is_alive():
            status = "still running"
        elif code is None:
            status = "exited"
        else:
            status = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        parts = [f"{what}: QEMU {status}"]
        engine = tail(self.engine_log, 2048)
        if engine:
            parts.append(f"QEMU said:\n{engine}")
        console = tail(self.console_log)
        parts.append(f"guest console (last lines):\n{console}" if console else "the guest console is empty")
        return "\n".join(parts)

    def exited_error(self, what: str, code: ErrorCode = ErrorCode.QEMU_EXITED) -> SmartVMError:
        return SmartVMError(code, self.describe_exit(what))
