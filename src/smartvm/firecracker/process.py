"""One Firecracker process: spawn it (directly or through the jailer), wait for its API socket, end
it, always reap it.

The guest's serial console is Firecracker's stdout, so stdout goes to the VM's console log; the
VMM's own log (``--log-path``) and stderr go to the engine log, whose tail explains early exits.
Under a jailer with ``--new-pid-ns`` the process we spawn is only the jailer: it forks Firecracker,
writes its pid into the jail and exits, and from then on Firecracker is adopted by pid + start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.jailer import API_SOCKET_IN_JAIL, Jail
from smartvm.host.netlink_batch import netns_exec_argv
from smartvm.host.process import HostProcess, running_start_time, tail

_POLL_S = 0.01
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class FirecrackerCommand:
    """The command line of one Firecracker process (Firecracker's own flag names).

    With ``jail`` the command is the jailer's: Firecracker's flags go after ``--``, ``--api-sock`` is
    the socket inside the jail (``api_socket`` is its host path, which we wait for), ``--id`` is left
    to the jailer (Firecracker refuses a flag given twice) and ``netns`` must be None (the jail's
    config carries it). ``log_path``, ``metrics_path`` and ``config_file`` are then paths in the jail.
    """

    binary: Path
    api_socket: Path | None
    vm_id: str
    log_path: Path | None = None
    level: str | None = None
    metrics_path: Path | None = None
    boot_timer: bool = False
    config_file: Path | None = None
    no_api: bool = False
    netns: str | None = None
    extra_args: Sequence[str] = field(default_factory=tuple)
    jail: Jail | None = None

    def argv(self) -> list[str]:
        args = [str(self.binary)] if self.jail else [str(self.binary), "--id", self.vm_id]
        if self.no_api:
            if self.config_file is None:
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "--no-api needs a config file (config_file)")
            args.append("--no-api")
        elif self.api_socket is not None:
            args += ["--api-sock", API_SOCKET_IN_JAIL if self.jail else str(self.api_socket)]
        if self.config_file is not None:
            args += ["--config-file", str(self.config_file)]
        if self.log_path is not None:
            args += ["--log-path", str(self.log_path)]
        if self.level is not None:
            args += ["--level", self.level]
        if self.metrics_path is not None:
            args += ["--metrics-path", str(self.metrics_path)]
        if self.boot_timer:
            args.append("--boot-timer")
        args += list(self.extra_args)
        if self.jail is not None:
            if self.netns:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT, "a jailed Firecracker joins its netns through the jailer"
                )
            return self.jail.argv(args[1:])
        if self.netns:
            return netns_exec_argv(self.netns, args)
        return args


class FirecrackerProcess:
    """A spawned Firecracker. :meth:`stop` and :meth:`kill` are idempotent and always reap.

    The process is a :class:`HostProcess` (nothing kills it implicitly), so it can be detached and
    adopted again by pid + start time (:meth:`adopt`); an adopted one cannot be reaped here and its
    exit code is unknown.
    """

    def __init__(self, command: FirecrackerCommand, *, console_log: Path, engine_log: Path) -> None:
        self.command = command
        self.console_log = console_log
        self.engine_log = engine_log
        self._proc: HostProcess | None = None

    @classmethod
    def adopt(
        cls, command: FirecrackerCommand, pid: int, start_time: int, *, console_log: Path, engine_log: Path
    ) -> FirecrackerProcess:
        """A Firecracker started earlier (possibly by another process), found by pid + start time."""
        process = cls(command, console_log=console_log, engine_log=engine_log)
        process._proc = HostProcess.adopt(pid, start_time)
        return process

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def start_time(self) -> int | None:
        return self._proc.start_time if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    async def start(self, socket_timeout: float) -> None:
        """Spawn and, unless ``--no-api``, wait until the API socket accepts connections."""
        if self._proc is not None:
            raise SmartVMError(ErrorCode.INVALID_STATE, "this Firecracker process was already started")
        api_socket = self.command.api_socket
        if api_socket is not None:
            api_socket.unlink(missing_ok=True)  # Firecracker refuses to bind over a stale socket
        for log in (self.console_log, self.engine_log):
            log.touch()
        argv = self.command.argv()
        jail = self.command.jail
        try:
            with self.console_log.open("ab") as out, self.engine_log.open("ab") as err:
                self._proc = HostProcess.spawn(
                    argv,
                    stdout=out.fileno(),
                    stderr=err.fileno(),
                    new_session=not (jail and jail.config.daemonize),  # it calls setsid() itself
                )
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.BINARY_NOT_FOUND
                if isinstance(exc, FileNotFoundError | PermissionError)
                else ErrorCode.FIRECRACKER_EXITED,
                f"cannot run {argv[0]}: {exc.strerror or exc}; "
                f"check {'jailer_binary_path' if jail else 'firecracker_binary_path'}",
            ) from exc
        deadline = time.monotonic() + socket_timeout
        try:
            if jail is not None and jail.config.new_pid_ns:
                await self._adopt_from_pid_file(jail, deadline, socket_timeout)
            if api_socket is None or self.command.no_api:
                return
            await self._wait_for_socket(api_socket, deadline, socket_timeout)
        except BaseException:
            self._kill_jailer_group()
            await self.kill()
            raise

    async def _adopt_from_pid_file(self, jail: Jail, deadline: float, timeout: float) -> None:
        """Swap the jailer (our child, exiting) for the Firecracker it forked, named in the pid file."""
        jailer = self._proc
        assert jailer is not None
        while (pid := _read_pid(jail.pid_file)) is None:
            if _exited_unreaped(jailer.pid) is not False:
                if (pid := _read_pid(jail.pid_file)) is not None:  # written just before it exited
                    break
                # it may have forked Firecracker before failing (the real jailer does when it cannot
                # write the pid file): end its group while the unreaped jailer still pins the group id
                self._kill_jailer_group()
                await jailer.wait()
                raise SmartVMError(
                    ErrorCode.JAILER_FAILED,
                    f"the jailer exited with code {jailer.returncode} before writing Firecracker's pid to "
                    f"{jail.pid_file}; {self._log_tail()}",
                )
            if time.monotonic() >= deadline:
                raise SmartVMError(
                    ErrorCode.SOCKET_TIMEOUT,
                    f"the jailer did not write Firecracker's pid to {jail.pid_file} within {timeout:g}s; "
                    f"{self._log_tail()}",
                )
            await asyncio.sleep(_POLL_S)
        start_time = running_start_time(pid)
        if not await jailer.wait(max(0.1, deadline - time.monotonic())):
            jailer.kill()  # its work is done once the pid file is written
            await jailer.wait()
        if start_time is None:
            raise SmartVMError(
                ErrorCode.FIRECRACKER_EXITED,
                f"firecracker (pid {pid}, from {jail.pid_file}) exited before its API socket appeared; "
                f"{self._log_tail()}",
            )
        self._proc = HostProcess.adopt(pid, start_time, owned=True)

    def _kill_jailer_group(self) -> None:
        """A jailer that failed half-way may have forked already: end its whole process group.

        Only while the jailer is unreaped, running or a zombie (its pid, hence its group id, cannot
        have been reused), and only when it leads its own group (never ours).
        """
        proc = self._proc
        if (
            proc is None
            or not proc.is_child
            or self.command.jail is None
            or _exited_unreaped(proc.pid) is None
        ):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid != os.getpgrp():
                os.killpg(proc.pid, signal.SIGKILL)

    async def _wait_for_socket(self, path: Path, deadline: float, timeout: float) -> None:
        assert self._proc is not None
        while True:
            if not self.is_alive():
                await self._proc.wait()
                code = self._proc.returncode
                who = "the jailer (or the firecracker it started)" if self.command.jail else "firecracker"
                raise SmartVMError(
                    ErrorCode.FIRECRACKER_EXITED,
                    f"{who} exited{'' if code is None else f' with code {code}'} before its API "
                    f"socket appeared; {self._log_tail()}",
                )
            if socket_accepts(path):
                return
            if time.monotonic() >= deadline:
                raise SmartVMError(
                    ErrorCode.SOCKET_TIMEOUT,
                    f"firecracker's API socket {path} did not appear within {timeout:g}s; {self._log_tail()}",
                )
            await asyncio.sleep(_POLL_S)

    def _log_tail(self) -> str:
        """The end of an error message that explains an early exit."""
        return f"last log lines:\n{tail(self.engine_log, 16384, lines=LOG_TAIL_LINES) or '(empty log)'}"

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit; its exit code, or None after ``timeout``."""
        if self._proc is None:
            return None
        await self._proc.wait(timeout)
        return self._proc.returncode

    async def wait_exited(self, timeout: float | None = None) -> bool:
        """Whether the process has exited within ``timeout`` (also when its exit code is unknown)."""
        return self._proc is None or await self._proc.wait(timeout)

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps. The exit code (None if never started)."""
        if self._proc is None:
            return None
        if self._proc.is_alive():
            self._proc.terminate()
            if not await self._proc.wait(timeout):
                self._proc.kill()
        await self._proc.wait()
        self._cleanup_socket()
        return self._proc.returncode

    async def kill(self) -> None:
        """SIGKILL at once and reap."""
        if self._proc is None:
            return
        self._proc.kill()
        await self._proc.wait()
        self._cleanup_socket()

    def detach(self) -> HostProcess | None:
        """Forget the process without touching it; it keeps running. Returns it (None if never started)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.release()
        return proc

    def _cleanup_socket(self) -> None:
        if self.command.api_socket is not None:
            self.command.api_socket.unlink(missing_ok=True)


def _exited_unreaped(pid: int) -> bool | None:
    """Of our child ``pid``: False while it runs, True once it has exited, None once it was reaped.

    It is never reaped here, so while this is not None the pid (and its process group id) stays ours.
    """
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return None


def _read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None while it is missing or not completely written."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def socket_accepts(path: Path) -> bool:
    """Whether a Unix socket at ``path`` accepts a connection right now."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
