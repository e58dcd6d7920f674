"""Hypervisor processes that can outlive the Python process that started them.

asyncio's subprocess transport kills its child when the transport is closed or collected, so a VM
started that way can never be handed over. A :class:`HostProcess` is spawned with ``posix_spawn``
in its own session, reaped with ``waitpid`` and waited on with a pidfd; nothing kills it implicitly.

A process is identified by pid *and* start time (``/proc/<pid>/stat`` field 22), so a record of a
VM whose pid was recycled by an unrelated process is never mistaken for the VM. A process adopted
from a record is not our child: it cannot be reaped here and its exit code is unknown.

Dying with the owner: unless the VM may be detached (:func:`detachable`), the child is forked with
the kernel's parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL, which survives ``exec`` of
``ip netns exec`` and then of the hypervisor), so a SIGKILLed owner never leaves a hypervisor behind.
``posix_spawn`` cannot set it, hence fork + exec. The signal fires when the *thread* that forked
exits, so spawn from the event-loop thread, never from a worker thread.

Safety net: a child that was not handed over with :meth:`HostProcess.release` is killed when the
Python process exits normally (as asyncio's transport would have done), so a forgotten ``stop()``
never leaves an orphan hypervisor behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import ctypes
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

_POLL_S = 0.05
TAIL_BYTES = 4096
# Signals Python ignores for itself that a spawned program must get back at their defaults.
_RESET_SIGNALS = tuple(s for s in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None)) if s is not None)


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

# True while creating VMs that may be detached (``smartvm start``): their hypervisor must outlive us.
_DETACHABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("smartvm_detachable", default=False)


@contextlib.contextmanager
def detachable(value: bool = True) -> Iterator[None]:
    """Hypervisors spawned inside this block (and tasks it starts) survive the death of this process."""
    token = _DETACHABLE.set(value)
    try:
        yield
    finally:
        _DETACHABLE.reset(token)


_OWNED: dict[int, HostProcess] = {}  # children not released yet, by pid
_RELEASED: set[int] = set()  # released children of this process, not reaped yet


@atexit.register
def _kill_owned() -> None:
    for proc in list(_OWNED.values()):
        if proc.spawner != os.getpid():  # a forked copy of this process: not its children
            continue
        proc.kill()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, 0)
    _OWNED.clear()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start_time)`` of ``pid`` from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()  # the command name may contain spaces and parentheses
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def running_start_time(pid: int) -> int | None:
    """The start time of ``pid`` if it is running (not a zombie), else None."""
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X", "x"):
        return None
    return stat[1]


def tail(path: Path | None, limit: int = TAIL_BYTES, *, lines: int | None = None) -> str:
    """The end of a log (hypervisor, console, build): its last ``limit`` bytes from the first whole
    line, at most its last ``lines`` lines ("" when there is no such file). The one log tail reader."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    if size > limit and "\n" in text:
        text = text.split("\n", 1)[1]
    text = text.strip()
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


def _posix_spawn(
    argv: Sequence[str], *, stdout: int, stderr: int, new_session: bool, pass_fds: Mapping[int, int]
) -> int:
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    sources: dict[int, int] = {}
    try:
        for target, src in pass_fds.items():
            # a source that already has its target number is duplicated first: dup2(fd, fd) would
            # keep its close-on-exec flag
            sources[target] = os.dup(src) if src == target else src
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                *((os.POSIX_SPAWN_DUP2, src, target) for target, src in sources.items()),
            ],
            setsid=new_session,
            setsigdef=_RESET_SIGNALS,
        )
    finally:
        os.close(null)
        for target, src in sources.items():
            if src != pass_fds[target]:
                os.close(src)


def _fork_exec(
    argv: Sequence[str], *, stdout: int, stderr: int, new_session: bool, pass_fds: Mapping[int, int]
) -> int:
    """fork + exec with SIGKILL as parent-death signal; exec errors come back through a pipe."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    env = dict(os.environ)
    args = list(argv)
    parent = os.getpid()
    try:
        pid = os.fork()
        if pid == 0:  # child: only simple calls until exec
            try:
                os.dup2(null, 0)
                os.dup2(stdout, 1)
                os.dup2(stderr, 2)
                for target, src in pass_fds.items():
                    if src == target:
                        os.set_inheritable(target, True)
                    else:
                        os.dup2(src, target)
                if new_session:
                    os.setsid()
                for sig in _RESET_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
                if os.getppid() != parent:  # the owner died before prctl: the signal will never come
                    os._exit(127)
                os.execvpe(args[0], args, env)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.write(err_w, f"{exc.errno or 0}:{exc.strerror or exc}".encode())
            finally:
                os._exit(127)
        os.close(err_w)
        err_w = -1
        report = b""
        while chunk := os.read(err_r, 512):
            report += chunk
    finally:
        os.close(null)
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
    if report:
        os.waitpid(pid, 0)
        errno_text, _, message = report.decode(errors="replace").partition(":")
        raise OSError(int(errno_text or 0), message)  # maps errno to its subclass (FileNotFoundError)
    return pid


class HostProcess:
    """One hypervisor process: spawned here (our child) or adopted by pid + start time."""

    def __init__(self, pid: int, start_time: int, *, child: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        self.is_child = child
        self.spawner = os.getpid()
        self.returncode: int | None = None  # known only for our own children
        self._exited = False

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stdout: int,
        stderr: int,
        new_session: bool = True,
        pass_fds: Mapping[int, int] | None = None,
    ) -> HostProcess:
        """Start ``argv`` (PATH is searched) in a new session, stdin from /dev/null; ``pass_fds`` maps
        a descriptor number in the child to the open descriptor here that it gets (others close).

        ``new_session=False`` is for programs that call ``setsid()`` themselves (a daemonizing
        jailer): that fails for a process that already leads a session.
        Raises OSError like ``subprocess`` does (FileNotFoundError for a missing program).
        """
        if any(target < 3 for target in pass_fds or {}):
            raise ValueError(f"pass_fds targets must be 3 or more (0-2 are set here): {pass_fds}")
        spawner = _posix_spawn if _DETACHABLE.get() else _fork_exec
        pid = spawner(argv, stdout=stdout, stderr=stderr, new_session=new_session, pass_fds=pass_fds or {})
        stat = proc_stat(pid)
        proc = cls(pid, stat[1] if stat else 0, child=True)
        _OWNED[pid] = proc
        return proc

    def release(self) -> None:
        """Hand the process over (detach): it is no longer killed when this Python process exits."""
        if _OWNED.pop(self.pid, None) is not None:
            _RELEASED.add(self.pid)

    @classmethod
    def adopt(cls, pid: int, start_time: int, *, owned: bool = False) -> HostProcess:
        """The process ``pid`` started at ``start_time`` (it may have exited already: see is_alive).

        ``owned=True``: this Python process is responsible for it (e.g. Firecracker forked by a jailer
        we spawned), so the exit safety net kills it unless it is released (:meth:`release`).
        """
        proc = cls(pid, start_time, child=False)
        if owned:
            _OWNED[pid] = proc
        return proc

    # --- state ---------------------------------------------------------------------------------
    def _check(self) -> bool:
        """Whether the process has exited; reaps it when it is our child (or our detached child)."""
        if self._exited:
            return True
        if self.is_child:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone, code unknown
                self._exited = True
                _OWNED.pop(self.pid, None)
                return True
            if pid == 0:
                return False
            self.returncode = os.waitstatus_to_exitcode(status)
            self._exited = True
            _OWNED.pop(self.pid, None)
            return True
        stat = proc_stat(self.pid)
        if stat is None or stat[1] != self.start_time:
            self._exited = True
            if _OWNED.get(self.pid) is self:
                del _OWNED[self.pid]
        elif stat[0] in ("Z", "X", "x"):
            self._exited = True
            if _OWNED.get(self.pid) is self:
                del _OWNED[self.pid]
            if self.pid in _RELEASED:  # detached by this very process: still our child, reap it
                _RELEASED.discard(self.pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, os.WNOHANG)
        return self._exited

    def is_alive(self) -> bool:
        return not self._check()

    # --- signals -----------------------------------------------------------------------------------
    def send_signal(self, sig: int) -> None:
        """Signal the process; a no-op once it has exited (a recycled pid is never signalled)."""
        if self._check():
            return
        if self.is_child:  # not reaped yet, so the pid cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            return
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._exited = True
            return
        except OSError:  # no pidfds: check the identity right before the signal
            if not self._check():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            return
        try:
            if not self._check():  # the pidfd now pins the process we identified
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
        finally:
            os.close(fd)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # --- waiting -----------------------------------------------------------------------------------
    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the process exits; True if it did, False if it still runs after ``timeout``."""
        if self._check():
            return True
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return self._check() or True
        except OSError:
            return await self._poll(timeout)
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(fd, readable.set)
        try:
            if not self._check():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(readable.wait(), timeout)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self._check()

    async def _poll(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not self._check():
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def __repr__(self) -> str:
        kind = "child" if self.is_child else "adopted"
        return f"HostProcess(pid={self.pid}, {kind}, alive={self.is_alive()})"
