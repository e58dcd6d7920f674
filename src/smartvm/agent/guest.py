#!/usr/bin/env python3
"""smartvm guest agent: runs commands and moves files inside the guest for the host.

This file is copied into the guest root filesystem as ``/opt/smartvm/agent.py`` and run by the guest's
python3.11 with no arguments, so it is stdlib-only and imports little at start (the guest may run
under slow TCG emulation). The wire format (frames, limits, error codes) is in ``wire.py``, shared with
the host and installed next to this file as ``/opt/smartvm/wire.py``. The protocol is documented in
``docs/agent-protocol.md``.

Transports (picked at start): the virtio-serial port named ``smartvm.agent`` (QEMU engine), else
AF_VSOCK port 52 (Firecracker); ``--listen-unix PATH`` and ``--stdio`` exist for host-side tests.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING or __package__:  # imported as smartvm.agent.guest (host-side tests and tools)
    from smartvm.agent.wire import (
        AGENT_VERSION,
        AGENT_VSOCK_PORT,
        CANCEL,
        CHUNK_SIZE,
        DATA,
        E_BAD_FRAME,
        E_BAD_REQUEST,
        E_CANCELLED,
        E_CHANNEL,
        E_FILE,
        E_INTERNAL,
        E_NO_PROCESS,
        E_NOT_FOUND,
        E_SPAWN,
        E_UNKNOWN_OP,
        ERROR,
        EVENT,
        HELLO,
        MAX_HEADER_JSON,
        MAX_PAYLOAD,
        PROTOCOL_VERSION,
        REQUEST,
        RESULT,
        VIRTIO_PORT_NAME,
        Frame,
        FrameDecoder,
        FrameError,
        encode_head,
    )
else:  # the guest: wire.py is installed next to this file (sys.path[0]); same names, see wire.__all__
    from wire import *  # noqa: F403

# ------------------------------------------------------------------------------------------- agent core
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_LINGER = 2.0  # after the leader exits, how long we keep reading pipes held by its children
PIPE_SIZE = 1024 * 1024  # stdout/stderr pipes of a command, from the start (Linux default: 64 KiB)
BULK_READ = 4096  # reads of a page or more, twice in a row, mean bulk output: then pause ...
BULK_PAUSE = 0.001  # ... this long before each read, so the pipe fills instead of waking us per write
STARTED_HOLD = 0.01  # an exec's "started" event waits this long for company (output or the result)
REPLAY_BYTES = 1024 * 1024  # output kept per background process for attach(replay=True)
MAX_FINISHED_PROCS = 64
STDIN_QUEUE_LIMIT = 64 * 1024 * 1024
ANSWERED_KEPT = 64  # recently answered channel ids a session remembers (late DATA for them is dropped)
MAX_ENTRIES = 200_000  # file_entries answers at most this many entries
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2]): add bytes to the pool and credit them
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07): reseed the CRNG from the pool now
RESEED_MAX_BYTES = 512


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"smartvm-agent[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class AgentError(Exception):
    """A request failed in a way the host should hear about as an ERROR frame."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


def _os_error(exc: OSError, what: str) -> AgentError:
    import errno

    name = errno.errorcode.get(exc.errno or 0, "EIO")
    code = E_NOT_FOUND if exc.errno == errno.ENOENT else E_FILE
    return AgentError(code, f"{what}: {exc.strerror or exc} ({name})", errno=name)


class Conn:
    """One host connection: a byte stream plus the channels opened on it. ``write`` writes all of the
    given buffers, in order (a frame's head and its payload go out without being joined first)."""

    def __init__(
        self,
        read: Callable[[int], bytes | memoryview],
        write: Callable[[list[bytes]], None],
        close: Callable[[], None],
        write_lock: threading.Lock,
        transport: str,
    ) -> None:
        self.read = read
        self._write = write
        self._close = close
        self._lock = write_lock
        self.transport = transport
        self.alive = True
        self.channels: dict[int, Channel] = {}
        # The ids of the last requests answered here: the host streams a request's DATA without
        # waiting, so frames for it may arrive after its answer (a write that failed at once).
        # Those are dropped, not each answered with a bad_channel error.
        self.answered: collections.deque[int] = collections.deque(maxlen=ANSWERED_KEPT)
        self.chan_lock = threading.Lock()

    def send(
        self, ftype: int, channel: int, header: dict[str, Any] | None = None, payload: bytes = b""
    ) -> bool:
        return self.send_frames(channel, [(ftype, header, payload)])

    def send_frames(
        self, channel: int, frames: list[tuple[int, dict[str, Any] | bytes | None, bytes]]
    ) -> bool:
        """Send frames of one channel in one write (one wake-up of the host, not one per frame)."""
        parts = []
        for ftype, header, payload in frames:
            parts.append(encode_head(ftype, channel, header, len(payload)))
            if payload:
                parts.append(payload)
        with self._lock:
            if not self.alive:
                return False
            try:
                self._write(parts)
            except OSError:
                self.alive = False
                return False
        return True

    def error(self, channel: int, code: str, message: str, **extra: Any) -> None:
        self.send(ERROR, channel, {"code": code, "message": message, **extra})

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self._close()


class Channel:
    """A request in flight: its inbox (DATA frames from the host) and its cancellation."""

    def __init__(self, conn: Conn, cid: int) -> None:
        self.conn = conn
        self.id = cid
        self.inbox: queue.SimpleQueue[tuple[dict[str, Any], bytes] | None] = queue.SimpleQueue()
        self.inbox_bytes = 0
        self.cancelled = threading.Event()
        self._on_cancel: list[Callable[[], None]] = []
        self.closed = False
        self._held: list[tuple[int, dict[str, Any] | bytes | None, bytes]] = []

    def on_cancel(self, fn: Callable[[], None]) -> None:
        self._on_cancel.append(fn)
        if self.cancelled.is_set():
            fn()

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        self.inbox.put(None)
        for fn in list(self._on_cancel):
            try:
                fn()
            except Exception as exc:  # a cancel hook must never kill the reader
                _log(f"cancel hook failed: {exc!r}")

    def _send(self, ftype: int, header: dict[str, Any] | bytes | None, payload: bytes = b"") -> None:
        frames, self._held = [*self._held, (ftype, header, payload)], []
        self.conn.send_frames(self.id, frames)

    def hold_event(self, header: dict[str, Any]) -> None:
        """Queue an EVENT to go out with this channel's next frame (or at :meth:`flush`): a command
        that ends quickly then costs one write to the host for its start and its result, not two."""
        self._held.append((EVENT, header, b""))

    def flush(self) -> None:
        """Send the held frames now."""
        if self._held:
            frames, self._held = self._held, []
            self.conn.send_frames(self.id, frames)

    def data(self, stream: str, payload: bytes, eof: bool = False) -> None:
        last = max(len(payload) - 1, 0) // CHUNK_SIZE * CHUNK_SIZE
        for i in range(0, last + 1, CHUNK_SIZE):
            hdr: dict[str, Any] = {"s": stream, "eof": True} if eof and i == last else {"s": stream}
            self._send(DATA, hdr, payload[i : i + CHUNK_SIZE])

    def event(self, header: dict[str, Any]) -> None:
        self._send(EVENT, header)

    def result(self, header: dict[str, Any]) -> None:
        self._finish(RESULT, header)

    def fail(self, code: str, message: str, **extra: Any) -> None:
        self._finish(ERROR, {"code": code, "message": message, **extra})

    def _finish(self, ftype: int, header: dict[str, Any]) -> None:
        if self.closed:
            return
        self.closed = True
        self.inbox.put(None)  # a helper still waiting for DATA (an exec's stdin feeder) ends now
        with self.conn.chan_lock:
            if self.conn.channels.get(self.id) is self:
                del self.conn.channels[self.id]
                self.conn.answered.append(self.id)
        body = json.dumps(header, separators=(",", ":")).encode()
        if len(body) > MAX_HEADER_JSON:  # e.g. a huge directory listing: ship the JSON as DATA
            for i in range(0, len(body), CHUNK_SIZE):
                self._send(DATA, {"s": "result"}, body[i : i + CHUNK_SIZE])
            body = b'{"result_in_data":true}'
        self._send(ftype, body)  # encoded once

    def next_data(self) -> tuple[dict[str, Any], bytes]:
        """Block for the next DATA frame from the host; raise if the channel was cancelled or finished."""
        item = self.inbox.get()
        if item is None:
            self.inbox.put(None)
            raise AgentError(E_CANCELLED, "request cancelled")
        self.inbox_bytes -= len(item[1])
        return item


# ------------------------------------------------------------------------------------------- processes
def _str_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AgentError(E_BAD_REQUEST, f"{field} must be a non-empty list of strings")
    return value


class GuestUser(NamedTuple):
    """A guest account as commands and file ownership need it."""

    uid: int
    gid: int
    name: str
    home: str
    groups: list[int]


def _lookup_user(user: Any) -> GuestUser:
    """`user` (a uid, a numeric string or a name) from the guest's passwd; None is the agent's own user.
    An unknown uid is still usable (no name, home ``/``); an unknown name is a bad request."""
    import pwd

    try:
        if user is None:
            uid = os.getuid()
            if uid == 0:
                return GuestUser(0, 0, "root", "/root", [])
            pw = pwd.getpwuid(uid)
            return GuestUser(uid, pw.pw_gid, pw.pw_name, pw.pw_dir, [])
        if (isinstance(user, int) and not isinstance(user, bool)) or (
            isinstance(user, str) and user.isascii() and user.isdigit()
        ):
            uid = int(user)
            try:
                pw = pwd.getpwuid(uid)
            except KeyError:
                return GuestUser(uid, uid, str(uid), "/", [])
        elif isinstance(user, str):
            pw = pwd.getpwnam(user)
        else:
            raise AgentError(E_BAD_REQUEST, "user must be a uid (int) or a user name (str)")
    except KeyError:
        if user is None:
            return GuestUser(os.getuid(), os.getgid(), str(os.getuid()), "/", [])
        raise AgentError(E_BAD_REQUEST, f"unknown user {user!r} in the guest") from None
    return GuestUser(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir, os.getgrouplist(pw.pw_name, pw.pw_gid))


def _spawn_spec(req: dict[str, Any]) -> dict[str, Any]:
    """Turn an exec/proc_start request into Popen keyword arguments (validating every field)."""
    cmd = req.get("cmd")
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else _str_list(cmd, "cmd")
    kwargs: dict[str, Any] = {"args": argv}
    user = req.get("user")
    account = _lookup_user(user)
    home, uname = account.home, account.name
    if user is not None:
        kwargs.update(user=account.uid, group=account.gid, extra_groups=account.groups)
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": home,
        "USER": uname,
        "LOGNAME": uname,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }
    extra = req.get("env") or {}
    if not isinstance(extra, dict):
        raise AgentError(E_BAD_REQUEST, "env must be an object of strings")
    for key, val in extra.items():
        if val is None:
            env.pop(key, None)
        elif isinstance(val, str) and "=" not in key and "\0" not in key + val:
            env[key] = val
        else:
            raise AgentError(E_BAD_REQUEST, f"env entry {key!r} must map a name to a string")
    kwargs["env"] = env
    cwd = req.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise AgentError(E_BAD_REQUEST, "cwd must be a string")
    kwargs["cwd"] = _anchored(cwd) if cwd else (home if os.path.isdir(home) else "/")
    return kwargs


def _grow_pipe(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError, AttributeError):  # F_SETPIPE_SZ: Linux, Python 3.10+
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


class _Spawned:
    """The part of a ``subprocess.Popen`` that :class:`Proc` uses, for a child started by
    :func:`_posix_spawn`."""

    def __init__(self, pid: int, stdin: Any, stdout: Any, stderr: Any) -> None:
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def wait(self) -> int:
        """Reap the child (once; later calls return the same code): -N if signal N ended it."""
        with self._lock:
            if self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:  # reaped elsewhere: the status is lost (as Popen does)
                    self.returncode = 0
            return self.returncode


def _executable(name: str, path: str) -> str | None:
    """Where ``name`` would be executed from with this PATH (None: not found as an executable)."""
    for directory in [""] if "/" in name else path.split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _posix_spawn(spec: dict[str, Any], keep_stdin: bool) -> _Spawned | None:
    """Start the child with ``os.posix_spawn`` (vfork and exec, no Python code in between), when it
    can do all that ``spec`` asks: the agent's own user, a cwd that is the agent's working directory
    (posix_spawn cannot chdir). About 1 ms less than ``subprocess.Popen`` under TCG, most of an exec
    of a short command. None: it cannot (or it failed; Popen then reports the error as usual)."""
    if "user" in spec or not hasattr(os, "posix_spawn"):
        return None
    try:
        if not os.path.samestat(os.stat(spec["cwd"]), os.stat(".")):
            return None
    except OSError:
        return None
    env: dict[str, str] = spec["env"]
    exe = _executable(spec["args"][0], env.get("PATH", os.defpath))
    if exe is None:
        return None
    fds = [*os.pipe(), *os.pipe(), *(os.pipe() if keep_stdin else ())]  # all close-on-exec
    out_r, out_w, err_r, err_w = fds[:4]
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    if keep_stdin:
        actions.insert(0, (os.POSIX_SPAWN_DUP2, fds[4], 0))
    else:
        actions.insert(0, (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    try:
        if min(fds) <= 2:  # dup2 onto itself would keep close-on-exec
            raise OSError("standard fds are not open")
        pid = os.posix_spawn(
            exe,
            spec["args"],
            env,
            file_actions=actions,
            setsid=True,  # its own session and process group, as start_new_session
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # what Python ignores; Popen restores them too
        )
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    for fd in (out_w, err_w, *fds[4:5]):
        os.close(fd)
    stdin = open(fds[5], "wb") if keep_stdin else None  # noqa: SIM115 (owned by the process)
    return _Spawned(pid, stdin, open(out_r, "rb", buffering=0), open(err_r, "rb", buffering=0))


class Proc:
    """A child process in its own session/process group, with its output pumped to sinks.

    Foreground execs attach their sink before the pump starts; background processes also keep a
    replay buffer so a later attach sees earlier output.
    """

    def __init__(self, req: dict[str, Any], *, keep_stdin: bool, replay_bytes: int) -> None:
        import subprocess

        spec = _spawn_spec(req)
        self.argv: list[str] = spec["args"]
        self.started = time.time()
        self._t0 = time.monotonic()
        self.popen: Any = _posix_spawn(spec, keep_stdin) or subprocess.Popen(
            **spec,
            stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # every fd the agent opens is non-inheritable (PEP 446; inherited ones are marked so at
            # start), so there is nothing to close, and closing every possible fd in the child costs
            # about 7 ms per spawn under TCG
            close_fds=False,
        )
        self.pid = self.popen.pid
        for pipe in (self.popen.stdout, self.popen.stderr):  # bulk output then comes in large reads
            if pipe is not None:
                _grow_pipe(pipe.fileno())
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.ended: float | None = None
        self.duration = 0.0
        self.done = threading.Event()
        self.stdin_lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._sinks: tuple[Callable[[str, bytes], None], ...] = ()
        self._on_done: list[Callable[[], None]] = []
        self._replay_limit = replay_bytes
        self._replay: list[tuple[str, bytes]] = []
        self._replay_size = 0
        self.dropped = 0
        self.meta: Any = req.get("meta")  # opaque host data (proc_run), returned as is by info()

    def attach(self, sink: Callable[[str, bytes], None], replay: bool) -> None:
        with self._emit_lock:
            if replay:
                for stream, data in self._replay:
                    sink(stream, data)
            self._sinks = (*self._sinks, sink)

    def detach(self, sink: Callable[[str, bytes], None]) -> None:
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    def on_done(self, fn: Callable[[], None]) -> None:
        with self._emit_lock:
            if not self.done.is_set():
                self._on_done.append(fn)
                return
        fn()

    def _emit(self, stream: str, data: bytes) -> None:
        with self._emit_lock:
            if self._replay_limit:
                self._replay.append((stream, data))
                self._replay_size += len(data)
                while self._replay_size > self._replay_limit and len(self._replay) > 1:
                    self._replay_size -= len(self._replay[0][1])
                    self.dropped += len(self._replay.pop(0)[1])
            for sink in self._sinks:
                try:
                    sink(stream, data)
                except Exception as exc:
                    _log(f"output sink failed: {exc!r}")

    def start_pump(self) -> None:
        """Pump the output on a thread of its own (background processes, which outlive the request)."""
        threading.Thread(target=self.pump, name=f"pump-{self.pid}", daemon=True).start()

    def pump(
        self, deadline: float | None = None, quiet: tuple[float, Callable[[], None]] | None = None
    ) -> bool:
        """Move the output to the sinks until the process has exited and its pipes are closed (or
        EXIT_LINGER after its exit, if children hold them); then reap it and run the done hooks.

        At ``deadline`` (monotonic) the process group is killed; returns whether that happened. The
        exit is seen through a pidfd in the same poll (no waiter thread, where the kernel has it).
        Bulk output is read in large gulps from the enlarged pipes: after two reads of a page or more
        in a row the pump pauses briefly before each read, so a writer producing small writes fills
        the pipe instead of waking the pump (and sending a frame) for each one. ``quiet`` is (seconds, hook):
        the hook runs once that long after the start, unless the process has ended by then.
        """
        import select

        poll = select.poll()  # one syscall per wait, no selector objects: cheap under TCG
        streams = {}
        for name, pipe in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            assert pipe is not None
            streams[pipe.fileno()] = name
            poll.register(pipe.fileno(), select.POLLIN)
        exit_fd, waiter = self._exit_notifier()
        poll.register(exit_fd, select.POLLIN)
        linger: float | None = None
        killed = False
        bulk = 0
        hook_at, hook = (time.monotonic() + quiet[0], quiet[1]) if quiet else (None, None)
        try:
            while streams:
                if hook_at is not None and time.monotonic() >= hook_at:
                    assert hook is not None
                    hook_at = None
                    hook()
                ends = [t for t in (linger, None if killed else deadline, hook_at) if t is not None]
                timeout = max(0.0, min(ends) - time.monotonic()) * 1000 if ends else None
                events = poll.poll(timeout)
                now = time.monotonic()
                if deadline is not None and not killed and now >= deadline:  # also while lingering
                    killed = True
                    self.kill_group()
                if not events and linger is not None and now >= linger:
                    break
                got = 0
                for fd, _ in events:
                    if fd == exit_fd:
                        poll.unregister(exit_fd)
                        linger = now + EXIT_LINGER
                        continue
                    try:
                        data = os.read(fd, CHUNK_SIZE)
                    except OSError:
                        data = b""
                    if data:
                        got = max(got, len(data))
                        self._emit(streams[fd], data)
                    else:
                        poll.unregister(fd)
                        del streams[fd]
                bulk = bulk + 1 if got >= BULK_READ else 0
                if bulk >= 2 and streams and got < CHUNK_SIZE:
                    time.sleep(BULK_PAUSE)  # we drained the pipe: let the writer fill it for a moment
        finally:
            for pipe in (self.popen.stdout, self.popen.stderr):
                if pipe is not None:
                    pipe.close()
            rc = self.popen.wait()
            if waiter is not None:
                waiter.join()
            os.close(exit_fd)
            self.duration = time.monotonic() - self._t0
            self.ended = time.time()
            if rc < 0:
                self.signal, self.exit_code = -rc, 128 - rc
            else:
                self.exit_code = rc
            with self._emit_lock:
                self.done.set()
                hooks, self._on_done = self._on_done, []
            for fn in hooks:
                fn()
        return killed

    def _exit_notifier(self) -> tuple[int, threading.Thread | None]:
        """An fd that becomes readable when the process exits: its pidfd, else a pipe a thread writes."""
        try:
            return os.pidfd_open(self.pid), None
        except (AttributeError, OSError):
            pass
        wake_r, wake_w = os.pipe()

        def waiter() -> None:
            self.popen.wait()
            os.write(wake_w, b"x")
            os.close(wake_w)

        thread = threading.Thread(target=waiter, name=f"wait-{self.pid}", daemon=True)
        thread.start()
        return wake_r, thread

    def kill_group(self, sig: int = 9) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def write_stdin(self, data: bytes, eof: bool) -> None:
        with self.stdin_lock:
            pipe = self.popen.stdin
            if pipe is None or pipe.closed:
                if data:
                    raise AgentError(E_BAD_REQUEST, f"stdin of process {self.pid} is closed")
                return
            try:
                if data:
                    pipe.write(data)
                    pipe.flush()
                if eof:
                    pipe.close()
            except (BrokenPipeError, ValueError, OSError):
                with contextlib.suppress(OSError):
                    pipe.close()

    def info(self) -> dict[str, Any]:
        stdin = self.popen.stdin
        return {
            "pid": self.pid,
            "cmd": self.argv,
            "running": not self.done.is_set(),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "started": self.started,
            "ended": self.ended,
            "duration": self.duration if self.done.is_set() else None,
            "stdin_open": stdin is not None and not stdin.closed,
            "dropped": self.dropped,
            "meta": self.meta,
        }


def _spawn(req: dict[str, Any], ch: Channel, *, keep_stdin: bool, replay_bytes: int) -> Proc | None:
    """Start a process; a missing/unrunnable program becomes exit 127/126 like a shell does."""
    try:
        return Proc(req, keep_stdin=keep_stdin, replay_bytes=replay_bytes)
    except AgentError:
        raise
    except OSError as exc:
        import errno

        cmd = req.get("cmd")
        prog = cmd[0] if isinstance(cmd, list) and cmd else str(cmd)
        if exc.filename == prog and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
            code = 127 if exc.errno == errno.ENOENT else 126
            what = "command not found" if code == 127 else (exc.strerror or "cannot execute")
            ch.data("stderr", f"smartvm-agent: {prog}: {what}\n".encode())
            ch.result({"exit_code": code, "signal": None, "timed_out": False, "duration": 0.0, "pid": None})
            return None
        raise AgentError(
            E_SPAWN,
            f"cannot start {prog!r}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""),
        ) from None


# ------------------------------------------------------------------------------------------------ agent
class Workers:
    """Threads that run requests. An idle one is reused (starting a thread costs about 1 ms under TCG);
    when none is idle a new one starts, so a request never waits for another one to finish."""

    def __init__(self, keep_idle: int = 8) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._keep_idle = keep_idle

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
        threading.Thread(target=self._work, args=(fn, args), name="worker", daemon=True).start()

    def _work(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        while True:
            try:
                fn(*args)
            except BaseException as exc:  # a job must not end its worker silently
                _log(f"worker job failed: {exc!r}")
            with self._lock:
                if self._idle >= self._keep_idle:
                    return
                self._idle += 1
            fn, args = self._jobs.get()


class Agent:
    """Dispatches requests to handlers, each on a worker thread; background processes are shared."""

    def __init__(self, dry_run_system: bool = False) -> None:
        self.dry_run_system = dry_run_system
        self.started = time.time()
        self.procs: dict[int, Proc] = {}
        self.procs_lock = threading.Lock()
        self.workers = Workers()
        self.handlers: dict[str, Callable[[Channel, dict[str, Any], bytes], None]] = {
            "ping": self.op_ping,
            "exec": self.op_exec,
            "proc_start": self.op_proc_start,
            "proc_list": self.op_proc_list,
            "proc_stdin": self.op_proc_stdin,
            "proc_signal": self.op_proc_signal,
            "proc_attach": self.op_proc_attach,
            "file_write": self.op_file_write,
            "file_read": self.op_file_read,
            "file_list": self.op_file_list,
            "file_stat": self.op_file_stat,
            "file_mkdir": self.op_file_mkdir,
            "file_remove": self.op_file_remove,
            "file_rename": self.op_file_rename,
            "health": self.op_health,
            "sync": self.op_sync,
            "set_time": self.op_set_time,
            "reseed": self.op_reseed,
            "shutdown": self.op_shutdown,
            "proc_run": self.op_proc_run,
            "user_info": self.op_user_info,
            "file_entries": self.op_file_entries,
            "file_prepare": self.op_file_prepare,
            "file_watch": self.op_file_watch,
        }

    # --- connection loop
    def hello(self, conn: Conn) -> dict[str, Any]:
        info: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "pid": os.getpid(),
            "started": self.started,
            "boot_time": _boot_time(),
            "transport": conn.transport,
            "max_payload": MAX_PAYLOAD,
            "max_header": MAX_HEADER_JSON,
            "ops": sorted(self.handlers),
        }
        try:
            u = os.uname()
            info.update(kernel=u.release, hostname=u.nodename, machine=u.machine)
        except OSError:
            pass
        return info

    def serve(self, conn: Conn) -> int:
        """Serve one connection until EOF; returns the number of bytes read."""
        decoder = FrameDecoder()
        total = 0
        try:
            if not conn.send(HELLO, 0, self.hello(conn)):
                return 0
            while True:
                try:
                    data = conn.read(CHUNK_SIZE)
                except InterruptedError:
                    continue
                except OSError:
                    break
                if not data or not conn.alive:  # EOF, or a write failed: the session is over
                    break
                total += len(data)
                for item in decoder.feed(data):
                    try:
                        self.dispatch(conn, item)
                    except Exception as exc:  # never let one frame kill the connection
                        _log(f"dispatch failed: {exc!r}")
                        conn.error(item.channel, E_INTERNAL, f"agent bug: {exc!r}")
        finally:
            conn.alive = False
            with conn.chan_lock:
                channels = list(conn.channels.values())
                conn.channels.clear()
            for ch in channels:
                ch.cancel()
        return total

    def dispatch(self, conn: Conn, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            conn.error(item.channel, item.code, item.message)
            with conn.chan_lock:
                ch = conn.channels.get(item.channel)
            if ch is not None:  # a broken frame in the middle of a request aborts that request
                ch.cancel()
                ch.fail(item.code, item.message)
            return
        ftype, cid, hdr, payload = item
        if ftype == HELLO:
            # A host HELLO starts a new session on this stream. On virtio-serial a quick reconnect can
            # hide the disconnect from us, so whatever the previous host left running is cancelled here.
            with conn.chan_lock:
                stale = list(conn.channels.values())
                conn.channels.clear()
            for old in stale:
                old.closed = True
                old.cancel()
            conn.send(HELLO, 0, self.hello(conn))
        elif ftype == REQUEST:
            op = hdr.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if cid == 0:
                conn.error(0, E_CHANNEL, "requests need a channel id > 0")
                return
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                conn.error(cid, E_UNKNOWN_OP, f"unknown op {op!r}; known ops: {known}")
                return
            ch = Channel(conn, cid)
            with conn.chan_lock:
                if cid in conn.channels:
                    conn.error(cid, E_CHANNEL, f"channel {cid} is already in use")
                    return
                conn.channels[cid] = ch
            self.workers.submit(self._run, handler, ch, hdr, payload)
        elif ftype in (DATA, CANCEL):
            with conn.chan_lock:
                ch = conn.channels.get(cid)
                late = ch is None and cid in conn.answered
            if ch is None:
                if ftype == DATA and not late:
                    conn.error(cid, E_CHANNEL, f"no open request on channel {cid}")
                return
            if ftype == CANCEL:
                ch.cancel()
            elif ch.closed:
                pass  # answered: nothing reads the inbox any more
            elif ch.inbox_bytes + len(payload) > STDIN_QUEUE_LIMIT:
                ch.cancel()
                ch.fail(E_BAD_REQUEST, "too much data queued on this channel; send less at once")
            else:
                ch.inbox_bytes += len(payload)
                ch.inbox.put((hdr, payload))
        else:
            conn.error(cid, E_BAD_FRAME, f"frame type {ftype} is not accepted by the agent")

    def _run(
        self,
        handler: Callable[[Channel, dict[str, Any], bytes], None],
        ch: Channel,
        hdr: dict[str, Any],
        payload: bytes,
    ) -> None:
        try:
            handler(ch, hdr, payload)
        except AgentError as exc:
            ch.fail(exc.code, exc.message, **exc.extra)
        except OSError as exc:
            ch.fail(*_split(_os_error(exc, str(hdr.get("path") or hdr.get("op")))))
        except Exception as exc:
            _log(f"op {hdr.get('op')} crashed: {exc!r}")
            ch.fail(E_INTERNAL, f"agent error in {hdr.get('op')}: {exc!r}")
        finally:
            if not ch.closed:
                ch.fail(E_INTERNAL, f"op {hdr.get('op')} ended without a result")

    # --- simple ops
    def op_ping(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        ch.result({"time": time.time()})

    def op_health(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        mem: dict[str, int] = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in (
                        "MemTotal",
                        "MemFree",
                        "MemAvailable",
                        "Buffers",
                        "Cached",
                        "SwapTotal",
                        "SwapFree",
                    ):
                        mem[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            uptime = -1.0
        with self.procs_lock:
            running = sum(1 for p in self.procs.values() if not p.done.is_set())
        ch.result(
            {
                "uptime": uptime,
                "load": list(os.getloadavg()),
                "memory": mem,
                "time": time.time(),
                "agent_pid": os.getpid(),
                "agent_uptime": time.time() - self.started,
                "background_processes": running,
                "cpus": os.cpu_count() or 1,
            }
        )

    def op_sync(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        t0 = time.monotonic()
        os.sync()
        ch.result({"duration": time.monotonic() - t0})

    def op_set_time(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        target = req.get("time")
        if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
            raise AgentError(E_BAD_REQUEST, "time must be a positive number of seconds since the epoch")
        before = time.time()
        method = "dry-run"
        if not self.dry_run_system:
            try:
                time.clock_settime_ns(time.CLOCK_REALTIME, int(target * 1e9))
                method = "clock_settime"
            except (OSError, AttributeError):
                import subprocess

                rc = subprocess.run(
                    ["date", "-s", f"@{int(target)}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                ).returncode
                if rc != 0:
                    raise AgentError(
                        E_INTERNAL, "cannot set the guest clock (clock_settime and date -s both failed)"
                    ) from None
                method = "date"
        ch.result(
            {
                "applied": method != "dry-run",
                "method": method,
                "target": target,
                "before": before,
                "after": time.time(),
                "delta": target - before,
            }
        )

    def op_reseed(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        """Mix host entropy (the payload) into the kernel pool and reseed the CRNG at once: clones of
        one snapshot would otherwise share their RNG state. Optionally set the hostname."""
        hostname = req.get("hostname")
        if hostname is not None and (
            not isinstance(hostname, str) or not 0 < len(hostname.encode()) <= 64 or "\0" in hostname
        ):
            raise AgentError(E_BAD_REQUEST, "hostname must be a string of 1 to 64 bytes without NUL")
        if not 16 <= len(payload) <= RESEED_MAX_BYTES:
            raise AgentError(E_BAD_REQUEST, f"send 16 to {RESEED_MAX_BYTES} random bytes as the payload")
        reseeded = False
        if not self.dry_run_system:
            import fcntl

            fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
            try:
                info = struct.pack("ii", len(payload) * 8, len(payload)) + payload  # struct rand_pool_info
                fcntl.ioctl(fd, RNDADDENTROPY, info)
                try:
                    fcntl.ioctl(fd, RNDRESEEDCRNG)
                    reseeded = True
                except OSError as exc:  # ENODATA: the CRNG is not initialised yet (it is after the add)
                    _log(f"RNDRESEEDCRNG failed: {exc}")
            finally:
                os.close(fd)
            if hostname is not None:
                import socket

                socket.sethostname(hostname)
        ch.result(
            {
                "credited_bits": len(payload) * 8,
                "reseeded": reseeded,
                "hostname": hostname,
                "dry_run": self.dry_run_system,
            }
        )

    def op_shutdown(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        action = req.get("action", "poweroff")
        if action not in ("poweroff", "reboot"):
            raise AgentError(E_BAD_REQUEST, "action must be 'poweroff' or 'reboot'")
        ch.result({"action": action, "dry_run": self.dry_run_system})
        if self.dry_run_system:
            return

        def later() -> None:
            time.sleep(0.2)  # let the result reach the host first
            os.sync()
            import subprocess

            try:
                done = subprocess.run([action], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if done.returncode == 0:
                    return
            except OSError:
                pass
            import ctypes

            cmd = 0x4321FEDC if action == "poweroff" else 0x01234567  # LINUX_REBOOT_CMD_*
            ctypes.CDLL(None, use_errno=True).reboot(cmd)

        threading.Thread(target=later, daemon=True).start()

    # --- processes
    def op_exec(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        timeout = req.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise AgentError(E_BAD_REQUEST, "timeout must be a positive number of seconds")
        want_stdin = bool(req.get("stdin"))
        proc = _spawn(req, ch, keep_stdin=want_stdin, replay_bytes=0)
        if proc is None:
            return
        proc.attach(ch.data, replay=False)
        ch.on_cancel(proc.kill_group)  # the pump below then ends with the process
        # "started" goes out with the first output, the result, or after STARTED_HOLD of silence
        ch.hold_event({"event": "started", "pid": proc.pid})
        if want_stdin:
            self.workers.submit(self._feed_stdin, ch, proc)
        deadline = None if timeout is None else time.monotonic() + timeout
        killed = proc.pump(deadline, quiet=(STARTED_HOLD, ch.flush))
        timed_out = killed and not ch.cancelled.is_set()
        res = {
            "exit_code": 124 if timed_out else proc.exit_code,
            "signal": proc.signal,
            "timed_out": timed_out,
            "duration": proc.duration,
            "pid": proc.pid,
        }
        if ch.cancelled.is_set() and not timed_out:
            res["cancelled"] = True
        ch.result(res)

    def _feed_stdin(self, ch: Channel, proc: Proc) -> None:
        try:
            while True:
                hdr, data = ch.next_data()
                proc.write_stdin(data, bool(hdr.get("eof")))
                if hdr.get("eof"):
                    return
        except AgentError:
            proc.write_stdin(b"", True)

    def _proc(self, req: dict[str, Any]) -> Proc:
        pid = req.get("pid")
        with self.procs_lock:
            proc = self.procs.get(pid) if isinstance(pid, int) else None
        if proc is None:
            raise AgentError(E_NO_PROCESS, f"no background process with pid {pid!r}")
        return proc

    def op_proc_start(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        replay = req.get("replay_bytes", REPLAY_BYTES)
        if not isinstance(replay, int) or replay < 0:
            raise AgentError(E_BAD_REQUEST, "replay_bytes must be a non-negative integer")
        proc = _spawn(req, ch, keep_stdin=bool(req.get("stdin")), replay_bytes=replay)
        if proc is None:
            return
        proc.start_pump()
        self._register(proc)
        ch.result(proc.info())

    def _register(self, proc: Proc) -> None:
        """Track a background process; only the newest MAX_FINISHED_PROCS finished ones are kept."""
        with self.procs_lock:
            self.procs[proc.pid] = proc
            finished = [p for p in self.procs.values() if p.done.is_set()]
            for old in finished[: max(0, len(finished) - MAX_FINISHED_PROCS)]:
                del self.procs[old.pid]

    def op_proc_list(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        with self.procs_lock:
            procs = list(self.procs.values())
        ch.result({"processes": [p.info() for p in procs]})

    def op_proc_stdin(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        proc = self._proc(req)
        proc.write_stdin(payload, bool(req.get("eof")))
        ch.result({"written": len(payload)})

    def op_proc_signal(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        import signal as _signal

        proc = self._proc(req)
        sig = req.get("signal", "SIGTERM")
        try:
            signum = int(sig) if isinstance(sig, int) else int(_signal.Signals[str(sig).upper()])
        except (KeyError, ValueError):
            raise AgentError(E_BAD_REQUEST, f"unknown signal {sig!r}") from None
        if not proc.done.is_set():
            try:
                if req.get("group", True):
                    os.killpg(proc.pid, signum)
                else:
                    os.kill(proc.pid, signum)
            except ProcessLookupError:
                pass
        ch.result(proc.info())

    def op_proc_attach(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        proc = self._proc(req)
        wake = threading.Event()
        ch.on_cancel(wake.set)
        proc.attach(ch.data, replay=bool(req.get("replay", True)))
        proc.on_done(wake.set)
        timeout = req.get("timeout")
        wake.wait(timeout if isinstance(timeout, (int, float)) else None)
        proc.detach(ch.data)
        info = proc.info()
        if ch.cancelled.is_set():
            info["detached"] = True
        ch.result(info)

    # --- files
    def op_file_write(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        mode = req.get("mode")
        if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise AgentError(E_BAD_REQUEST, "mode must be an integer permission like 0o644")
        owner = _owner(req)
        if req.get("parents", True):
            parent = os.path.dirname(path)
            if parent:
                _makedirs(parent, 0o755, owner, target=False)
        append = bool(req.get("append"))
        try:
            st: os.stat_result | None = os.stat(path)
        except OSError:
            st = None
        if append:
            target, tmp = path, None
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        else:
            target = path
            tmp = os.path.join(
                os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}-{ch.id}.smartvm-part"
            )
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        size = 0
        ok = False
        try:
            chunk, eof = payload, bool(req.get("eof"))
            while True:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(chunk)
                if eof:
                    break
                hdr, chunk = ch.next_data()
                eof = bool(hdr.get("eof"))
            if mode is not None:
                os.fchmod(fd, mode)
            elif tmp is not None:
                os.fchmod(fd, (st.st_mode & 0o7777) if st is not None else 0o644)
            if st is not None and tmp is not None and os.getuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            elif st is None and owner is not None:
                os.fchown(fd, *owner)
            os.close(fd)
            fd = -1
            if tmp is not None:
                os.replace(tmp, target)
            ok = True
        except OSError as exc:
            raise _os_error(exc, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if not ok and tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        ch.result({"path": path, "size": size})

    def op_file_read(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        offset = req.get("offset", 0)
        length = req.get("length")
        if (
            not isinstance(offset, int)
            or offset < 0
            or (length is not None and (not isinstance(length, int) or length < 0))
        ):
            raise AgentError(E_BAD_REQUEST, "offset/length must be non-negative integers")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_error(exc, path) from None
        sent = 0
        try:
            st = os.fstat(fd)
            import stat as _stat

            if _stat.S_ISDIR(st.st_mode):
                raise AgentError(E_FILE, f"{path}: is a directory (EISDIR)", errno="EISDIR")
            ch.event({"event": "open", "size": st.st_size, "mode": st.st_mode & 0o7777})
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            remaining = length
            while not ch.cancelled.is_set():
                want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
                data = os.read(fd, want) if want else b""
                if not data:
                    break
                ch.conn.send(DATA, ch.id, {"s": "file"}, data)
                sent += len(data)
                if remaining is not None:
                    remaining -= len(data)
        except OSError as exc:
            raise _os_error(exc, path) from None
        finally:
            os.close(fd)
        ch.result({"path": path, "size": sent})

    def op_file_list(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        entries = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    try:
                        entries.append(_stat_info(entry.path, entry.stat(follow_symlinks=False)))
                    except OSError:
                        continue
        except OSError as exc:
            raise _os_error(exc, path) from None
        entries.sort(key=lambda e: str(e["name"]))
        ch.result({"path": path, "entries": entries})

    def op_file_stat(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        try:
            st = os.stat(path) if req.get("follow", True) else os.lstat(path)
        except FileNotFoundError:
            if req.get("missing_ok"):
                ch.result({"exists": False, "path": path})
                return
            raise AgentError(
                E_NOT_FOUND, f"{path}: no such file or directory (ENOENT)", errno="ENOENT"
            ) from None
        except OSError as exc:
            raise _os_error(exc, path) from None
        ch.result({"exists": True, **_stat_info(path, st)})

    def op_file_mkdir(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        mode = req.get("mode", 0o755)
        if not isinstance(mode, int):
            raise AgentError(E_BAD_REQUEST, "mode must be an integer")
        owner = _owner(req)
        if req.get("parents", True):
            if not _makedirs(path, mode, owner) and not req.get("exist_ok", True):
                raise AgentError(E_FILE, f"{path}: already exists (EEXIST)", errno="EEXIST")
        else:
            try:
                os.mkdir(path, mode)
                if owner is not None:
                    os.chown(path, *owner)
            except OSError as exc:
                raise _os_error(exc, path) from None
        ch.result(_stat_info(path, os.stat(path)))

    def op_file_remove(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        path = _path(req)
        import stat as _stat

        try:
            st = os.lstat(path)
            if _stat.S_ISDIR(st.st_mode):
                if req.get("recursive"):
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            if not req.get("missing_ok"):
                raise AgentError(
                    E_NOT_FOUND, f"{path}: no such file or directory (ENOENT)", errno="ENOENT"
                ) from None
            ch.result({"path": path, "removed": False})
            return
        except OSError as exc:
            raise _os_error(exc, path) from None
        ch.result({"path": path, "removed": True})

    def op_file_rename(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        src, dst = _path(req, "src"), _path(req, "dst")
        try:
            if not req.get("overwrite", True) and os.path.lexists(dst):
                raise AgentError(E_FILE, f"{dst}: already exists (EEXIST)", errno="EEXIST")
            os.replace(src, dst)
        except OSError as exc:
            raise _os_error(exc, f"{src} -> {dst}") from None
        ch.result({"src": src, "dst": dst})

    # --- envd-style ops: a process streamed until it exits, users, trees of entries, watches
    def op_proc_run(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        """Start a background process and stream its output on this channel until it exits.

        Unlike exec, leaving the channel (CANCEL) only detaches: the process keeps running, stays in
        proc_list and can be attached, fed and signalled. `timeout` kills its process group whether
        or not anyone is attached (E2B envd's Start semantics). The output is pumped on this worker,
        as exec's is (no pump or timer thread to start: each costs about 1 ms under TCG); a CANCEL
        is answered from another worker while the pump goes on.
        """
        timeout = req.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise AgentError(E_BAD_REQUEST, "timeout must be a positive number of seconds")
        replay = req.get("replay_bytes", 0)
        if not isinstance(replay, int) or replay < 0:
            raise AgentError(E_BAD_REQUEST, "replay_bytes must be a non-negative integer")
        proc = _spawn(req, ch, keep_stdin=bool(req.get("stdin")), replay_bytes=replay)
        if proc is None:
            return
        answered = threading.Lock()

        def answer(timed_out: bool) -> None:
            if not answered.acquire(blocking=False):
                return
            proc.detach(ch.data)
            info = proc.info()
            info["timed_out"] = timed_out
            if ch.cancelled.is_set():
                info["detached"] = True
            ch.result(info)

        proc.attach(ch.data, replay=False)
        self._register(proc)
        ch.event({"event": "started", "pid": proc.pid})
        ch.on_cancel(lambda: self.workers.submit(answer, False))
        answer(proc.pump(None if timeout is None else time.monotonic() + timeout))

    def op_user_info(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        account = _lookup_user(req.get("user"))
        ch.result({"uid": account.uid, "gid": account.gid, "name": account.name, "home": account.home})

    def op_file_entries(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        """The entry at `path` (not following a final symlink) and, with `depth` > 0, the tree below it
        (a symlink to a directory is listed through), depth first in name order, with owner and group
        names: what envd's Stat and ListDir answer."""
        import stat as _stat

        path = _path(req)
        depth = req.get("depth", 0)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise AgentError(E_BAD_REQUEST, "depth must be a non-negative integer")
        names = _OwnerNames()
        try:
            top = names.entry(path, os.lstat(path))
        except OSError as exc:
            raise _os_error(exc, path) from None
        if not depth:
            ch.result({"entry": top})
            return
        try:
            if not _stat.S_ISDIR(os.stat(path).st_mode):
                raise AgentError(E_FILE, f"{path}: not a directory (ENOTDIR)", errno="ENOTDIR")
        except OSError as exc:
            raise _os_error(exc, path) from None
        entries: list[dict[str, Any]] = []

        def walk(directory: str, level: int) -> None:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
            for child in children:
                if ch.cancelled.is_set():
                    raise AgentError(E_CANCELLED, "request cancelled")
                try:
                    st = child.stat(follow_symlinks=False)
                except OSError:
                    continue
                if len(entries) >= MAX_ENTRIES:
                    raise AgentError(
                        E_BAD_REQUEST,
                        f"{path} has more than {MAX_ENTRIES} entries; list with a smaller depth",
                    )
                entries.append(names.entry(child.path, st))
                if level < depth and _stat.S_ISDIR(st.st_mode):
                    with contextlib.suppress(OSError):  # unreadable subdirectory: listed, not entered
                        walk(child.path, level + 1)

        try:
            walk(path, 1)
        except OSError as exc:
            raise _os_error(exc, path) from None
        ch.result({"entry": top, "entries": entries})

    def op_file_prepare(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        """Create a directory (`kind` "dir") or an empty file (`kind` "file") and the missing parent
        directories, each owned by `user`; an existing one is left as it is (``created`` false).

        This is how the host writes as a user: a following file_write replaces the file atomically and
        keeps the owner and mode of the file it replaces.
        """
        import stat as _stat

        path = os.path.normpath(_path(req))
        kind = req.get("kind", "file")
        if kind not in ("file", "dir"):
            raise AgentError(E_BAD_REQUEST, "kind must be 'file' or 'dir'")
        owner = _owner(req, "user")
        if kind == "dir":
            created = _makedirs(path, 0o755, owner)
        else:
            created = False
            _makedirs(os.path.dirname(path) or ".", 0o755, owner, target=False)
        try:
            if kind == "file":
                st = os.stat(path) if os.path.lexists(path) else None
                if st is not None and _stat.S_ISDIR(st.st_mode):
                    raise AgentError(E_FILE, f"{path}: is a directory (EISDIR)", errno="EISDIR")
                if st is None:
                    with contextlib.suppress(FileExistsError):
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                        try:
                            if owner is not None:
                                os.fchown(fd, *owner)
                        finally:
                            os.close(fd)
                        created = True
            info = _stat_info(path, os.stat(path))
        except OSError as exc:
            raise _os_error(exc, path) from None
        ch.result({"created": created, **info})

    def op_file_watch(self, ch: Channel, req: dict[str, Any], payload: bytes) -> None:
        """Watch the directory `path` (with `recursive`, its whole tree, new subdirectories included)
        with inotify until CANCEL. EVENT ``started`` once the watch is in place, then EVENT ``fs`` with
        ``events``: ``[{"name": path relative to the watched dir, "type": create|write|remove|rename|chmod,
        "entry"?: with include_entry}]``. The agent's own atomic writes (a part file renamed over the
        target) show as one ``write`` of the target; the part files themselves are not reported."""
        path = _path(req)
        try:
            import stat as _stat

            if not _stat.S_ISDIR(os.stat(path).st_mode):
                raise AgentError(E_FILE, f"{path}: not a directory (ENOTDIR)", errno="ENOTDIR")
        except OSError as exc:
            raise _os_error(exc, path) from None
        if not req.get("allow_network_mounts") and _on_network_mount(path):
            raise AgentError(
                E_BAD_REQUEST, f"{path} is on a network filesystem; watching it needs allow_network_mounts"
            )
        watcher = _Watcher(path, bool(req.get("recursive")), bool(req.get("include_entry")))
        try:
            ch.on_cancel(watcher.wake)
            ch.event({"event": "started"})
            watcher.run(lambda events: ch.event({"event": "fs", "events": events}))
        finally:
            watcher.close()
        ch.result({"path": path, "ended": "cancelled" if ch.cancelled.is_set() else "removed"})


def _owner(req: dict[str, Any], field: str = "owner") -> tuple[int, int] | None:
    """(uid, gid) that new files and directories of this request get (`field`: a user name or uid,
    looked up like a command's ``user``); None when the request does not say."""
    who = req.get(field)
    if who is None:
        return None
    account = _lookup_user(who)
    return account.uid, account.gid


def _makedirs(path: str, mode: int, owner: tuple[int, int] | None, *, target: bool = True) -> bool:
    """``mkdir -p``; the directories it creates belong to ``owner`` when given. Returns whether `path`
    itself was created. Something else than a directory in the way is ENOTDIR, or EEXIST when it is
    `path` and `path` is the request's target (not the parent of a file); nothing is created then."""
    missing: list[str] = []
    cur = os.path.abspath(path)
    while not os.path.isdir(cur) and cur not in missing:
        missing.append(cur)
        cur = os.path.dirname(cur)
    created = False
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if os.path.isdir(d):  # made meanwhile: fine
                continue
            errno = "EEXIST" if target and d == missing[0] else "ENOTDIR"
            raise AgentError(E_FILE, f"{d}: exists and is not a directory ({errno})", errno=errno) from None
        except OSError as exc:
            raise _os_error(exc, d) from None
        created = d == missing[0]
        if owner is not None:
            try:
                os.chown(d, *owner)
            except OSError as exc:
                raise _os_error(exc, d) from None
    return created


def _split(err: AgentError) -> tuple[str, str]:
    return err.code, err.message


def _path(req: dict[str, Any], field: str = "path") -> str:
    value = req.get(field)
    if not isinstance(value, str) or not value or "\0" in value:
        raise AgentError(E_BAD_REQUEST, f"{field} must be a non-empty path string")
    return _anchored(value)


_START_DIR: str | None = None  # where the agent started, if it then moved to its home


def _anchored(path: str) -> str:
    """A relative path of a request means what it did before the agent moved to its home (see
    _work_in_home): relative to the directory the agent started in."""
    return path if _START_DIR is None or os.path.isabs(path) else os.path.join(_START_DIR, path)


def _work_in_home() -> None:
    """Make the agent's working directory its user's home, where commands run by default: a command
    whose cwd is the agent's own can start through posix_spawn (see _posix_spawn)."""
    global _START_DIR
    home = _lookup_user(None).home
    with contextlib.suppress(OSError):
        start = os.getcwd()
        os.chdir(home)
        _START_DIR = start


def _stat_info(path: str, st: os.stat_result) -> dict[str, Any]:
    import stat as _stat

    kind = (
        "dir"
        if _stat.S_ISDIR(st.st_mode)
        else "file"
        if _stat.S_ISREG(st.st_mode)
        else "symlink"
        if _stat.S_ISLNK(st.st_mode)
        else "other"
    )
    info: dict[str, Any] = {
        "name": os.path.basename(path.rstrip("/")) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": st.st_mode & 0o7777,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
    }
    if kind == "symlink":
        with contextlib.suppress(OSError):
            info["target"] = os.readlink(path)
    return info


class _OwnerNames:
    """Entry dicts with owner and group names, each uid/gid looked up once per request."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def entry(self, path: str, st: os.stat_result) -> dict[str, Any]:
        import grp
        import pwd

        if st.st_uid not in self._users:
            try:
                self._users[st.st_uid] = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                self._users[st.st_uid] = str(st.st_uid)
        if st.st_gid not in self._groups:
            try:
                self._groups[st.st_gid] = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                self._groups[st.st_gid] = str(st.st_gid)
        return {**_stat_info(path, st), "owner": self._users[st.st_uid], "group": self._groups[st.st_gid]}


# statfs f_type of network and FUSE filesystems (linux/magic.h): inotify misses changes made elsewhere
NETWORK_FS_MAGIC = frozenset({0x6969, 0xFF534D42, 0x517B, 0xFE534D42, 0x65735546})


def _on_network_mount(path: str) -> bool:
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs (120 bytes on x86_64/aarch64); f_type first
    if ctypes.CDLL(None, use_errno=True).statfs(path.encode(), buf) != 0:
        return False
    return struct.unpack_from("l", buf.raw)[0] in NETWORK_FS_MAGIC


# inotify (linux/inotify.h)
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
WATCH_MASK |= IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
INOTIFY_EVENT = struct.Struct("iIII")
# fsnotify's names for inotify bits, as E2B envd reports them
WATCH_TYPES = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "rename"),
    (IN_ATTRIB, "chmod"),
    (IN_MODIFY, "write"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
)


def _is_part_file(name: str) -> bool:
    """A temporary file of file_write (``.NAME.<pid>-<channel>.smartvm-part``)."""
    return name.startswith(".") and name.endswith(".smartvm-part")


class _Watcher:
    """inotify watches on one directory (or tree) and the events they produce, as relative names."""

    def __init__(self, root: str, recursive: bool, include_entry: bool) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root ("" = root)
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            self.close()
            raise _os_error(OSError(err, os.strerror(err)), root)
        try:
            self._add("")
        except BaseException:
            self.close()
            raise

    def _add(self, rel: str) -> None:
        """Watch `rel` (and with `recursive` every directory below it)."""
        import ctypes

        full = os.path.join(self.root, rel) if rel else self.root
        wd = self._libc.inotify_add_watch(self.fd, full.encode(), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if rel:  # a subdirectory that vanished or cannot be read: watch the rest
                return
            raise _os_error(OSError(err, os.strerror(err)), full)
        self.dirs[wd] = rel
        if self.recursive:
            with contextlib.suppress(OSError), os.scandir(full) as it:
                subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
            for name in subdirs:
                self._add(os.path.join(rel, name) if rel else name)

    def wake(self) -> None:
        """Make run() return (from another thread)."""
        with self._lock:
            if not self._closed:
                os.write(self._wake_w, b"x")

    def run(self, emit: Callable[[list[dict[str, Any]]], None]) -> None:
        """Read events until woken or the watched directory is gone; each read is one `emit`."""
        import select

        moved_parts: dict[int, bool] = {}  # rename cookie -> the source was a part file
        while self.dirs:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = os.read(self.fd, 256 * 1024)
            except BlockingIOError:
                continue
            events: list[dict[str, Any]] = []
            for wd, mask, cookie, name in self._parse(data):
                rel_dir = self.dirs.get(wd)
                if mask & IN_IGNORED:
                    self.dirs.pop(wd, None)
                    continue
                if rel_dir is None:
                    continue
                if mask & IN_Q_OVERFLOW:
                    events.append({"name": "", "type": "overflow"})
                    continue
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and rel_dir:
                    continue  # its parent reports the same change by name
                rel = os.path.join(rel_dir, name) if name else rel_dir
                if _is_part_file(name):
                    if mask & IN_MOVED_FROM:
                        moved_parts[cookie] = True
                    continue
                kinds = [kind for bits, kind in WATCH_TYPES if mask & bits]
                if mask & IN_MOVED_TO and moved_parts.pop(cookie, False):
                    kinds = ["write"]  # file_write's atomic replace: the content of `rel` changed
                if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self._add(rel)
                entry = self._entry(rel) if self.include_entry and kinds else None
                for kind in kinds:
                    event: dict[str, Any] = {"name": rel, "type": kind}
                    if entry is not None:
                        event["entry"] = entry
                    events.append(event)
            if len(moved_parts) > 1024:  # renames whose other half never came
                moved_parts.clear()
            if events:
                emit(events)

    @staticmethod
    def _parse(data: bytes) -> list[tuple[int, int, int, str]]:
        out = []
        offset = 0
        while offset + INOTIFY_EVENT.size <= len(data):
            wd, mask, cookie, length = INOTIFY_EVENT.unpack_from(data, offset)
            raw = data[offset + INOTIFY_EVENT.size : offset + INOTIFY_EVENT.size + length]
            name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            out.append((wd, mask, cookie, name))
            offset += INOTIFY_EVENT.size + length
        return out

    def _entry(self, rel: str) -> dict[str, Any] | None:
        full = os.path.join(self.root, rel) if rel else self.root
        try:
            return _OwnerNames().entry(full, os.lstat(full))
        except OSError:
            return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.fd >= 0:
            os.close(self.fd)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# ------------------------------------------------------------------------------------------- transports
def _written(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes (a partial gathered write) from ``views``."""
    while n:
        if n >= len(views[0]):
            n -= len(views.pop(0))
        else:
            views[0], n = views[0][n:], 0
    while views and not views[0]:
        views.pop(0)


def _write_all(fd: int, parts: list[bytes], wait: Callable[[], None] | None = None) -> None:
    """Write every buffer to ``fd``, in order, with as few writev calls as it takes. On a non-blocking
    fd, ``wait`` is called when it would block."""
    views = [memoryview(p) for p in parts]
    while views:
        try:
            _written(views, os.writev(fd, views))
        except BlockingIOError:
            if wait is None:
                raise
            wait()


def _fd_writer(fd: int) -> Callable[[list[bytes]], None]:
    return lambda parts: _write_all(fd, parts)


def _port_writer(fd: int) -> Callable[[list[bytes]], None]:
    """Writes of one session on the non-blocking virtio-serial port.

    The session's first write (its hello) is made blocking: it waits until a host connects, which
    poll cannot (a port without a host always polls as hung up). Later writes wait for queue room
    with poll; a hang-up then means the host left, and the write fails (the session ends).
    """
    import select

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    first = True

    def wait() -> None:
        if any(ev & select.POLLHUP for _, ev in poller.poll()):
            raise BrokenPipeError("the host closed the virtio-serial port")

    def write(parts: list[bytes]) -> None:
        nonlocal first
        if first:
            first = False
            os.set_blocking(fd, True)
            try:
                _write_all(fd, parts)
            finally:
                os.set_blocking(fd, False)
            return
        _write_all(fd, parts, wait)

    return write


def _socket_writer(sock: Any) -> Callable[[list[bytes]], None]:
    def write(parts: list[bytes]) -> None:
        views = [memoryview(p) for p in parts]
        while views:
            _written(views, sock.sendmsg(views))

    return write


class _PortReader:
    """Reads of the virtio-serial port, many of its buffers per call.

    One read() of a port returns at most one of the guest's receive buffers (a page), so moving
    10 MiB to the guest took 2560 reads, each a round through Python under TCG. The port is made
    non-blocking and read with readv into page-sized views of one buffer: the kernel fills them
    from consecutive port buffers and stops at the first that is not full (or at "would block").
    """

    PAGES = 64

    def __init__(self, fd: int) -> None:
        import select

        self.fd = fd
        self._buf = bytearray(self.PAGES * 4096)
        whole = memoryview(self._buf)
        self._views = [whole[i : i + 4096] for i in range(0, len(self._buf), 4096)]
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, _n: int) -> memoryview:
        while True:
            try:
                n = os.readv(self.fd, self._views)
            except BlockingIOError:
                self._poll.poll()  # data, or POLLHUP when the host is gone (then readv returns 0)
                continue
            return memoryview(self._buf)[:n]


def serve_stdio(agent: Agent) -> None:
    conn = Conn(lambda n: os.read(0, n), _fd_writer(1), lambda: None, threading.Lock(), "stdio")
    agent.serve(conn)


def serve_fd(agent: Agent, fd: int) -> None:
    """Serve one connection on an inherited stream socket: the native agent (agent/native) runs this
    agent as its child on a socketpair and relays to it the ops it does not implement itself."""
    import socket

    sock = socket.socket(fileno=fd)
    conn = Conn(sock.recv, _socket_writer(sock), sock.close, threading.Lock(), "proxy")
    try:
        agent.serve(conn)
    finally:
        conn.close()


def _serve_socket(agent: Agent, sock: Any, transport: str) -> None:
    """Accept connections forever; each one is served on its own thread."""

    def run(client: Any) -> None:
        conn = Conn(client.recv, _socket_writer(client), client.close, threading.Lock(), transport)
        try:
            agent.serve(conn)
        finally:
            conn.close()

    while True:
        try:
            client, _ = sock.accept()
        except InterruptedError:
            continue
        except OSError as exc:
            _log(f"accept failed: {exc}")
            time.sleep(0.5)
            continue
        threading.Thread(target=run, args=(client,), daemon=True).start()


def serve_unix(agent: Agent, path: str) -> None:
    import socket

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    _serve_socket(agent, sock, "unix")


def open_vsock(port: int) -> Any:
    import socket

    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    return sock


def announced_ports(cmdline: str | None = None) -> int:
    """How many agent ports the host made (``smartvm.agent_ports=N`` on the kernel command line; 0:
    not said)."""
    if cmdline is None:
        try:
            with open("/proc/cmdline") as f:
                cmdline = f.read()
        except OSError:
            return 0
    count = 0
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == "smartvm.agent_ports" and value.isascii() and value.isdigit() and int(value) > 0:
            count = int(value)
    return count


def find_virtio_ports(name: str = VIRTIO_PORT_NAME, sysfs: str = "/sys/class/virtio-ports") -> dict[str, str]:
    """Port name -> /dev node of the agent's virtio-serial ports: `name` and `name.N` (the QEMU engine
    gives a VM several, one per concurrent host client; there is no udev symlink in the guest)."""
    found: dict[str, str] = {}
    try:
        ports = sorted(os.listdir(sysfs))
    except OSError:
        return found
    for port in ports:
        try:
            with open(os.path.join(sysfs, port, "name")) as f:
                got = f.read().strip()
        except OSError:
            continue
        suffix = got[len(name) + 1 :] if got.startswith(name + ".") else ""
        if got == name or suffix.isdigit():
            found[got] = "/dev/" + port
    return found


def _serve_virtio_forever(agent: Agent, dev: str) -> None:
    while True:
        try:
            serve_virtio(agent, dev)
        except OSError as exc:
            _log(f"virtio-serial port {dev} failed: {exc}; retrying")
            time.sleep(0.5)


def serve_virtio(agent: Agent, dev: str) -> None:
    """Serve the port forever. A host disconnect reads as EOF; the next session starts clean.

    While no host is connected, the session's first write (its hello) waits, so the hello goes out
    exactly when a host connects. Both sessions share one write lock so frames
    never interleave. The port is non-blocking: reads take many port buffers at once (see
    _PortReader), and a write does not wait for the host to acknowledge each piece.
    """
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    lock = threading.Lock()
    reader = _PortReader(fd)
    backoff = 0.05
    while True:
        conn = Conn(reader.read, _port_writer(fd), lambda: None, lock, "virtio-serial")
        t0 = time.monotonic()
        got = agent.serve(conn)
        if not got and time.monotonic() - t0 < 0.5:
            time.sleep(backoff)  # host not really there: do not spin
            backoff = min(backoff * 2, 1.0)
        else:
            backoff = 0.05


def _no_inherited_fds() -> None:
    """Mark fds this process inherited (beyond 0-2) close-on-exec, like every fd it opens itself: then
    commands can be spawned without closing all fds in the child (see Proc)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = os.environ.get("SMARTVM_AGENT_DRY_RUN") == "1"
    mode, value, home = "auto", "", False
    while args:
        arg = args.pop(0)
        if arg == "--version":
            print(f"smartvm-agent {AGENT_VERSION} protocol {PROTOCOL_VERSION}")
            return 0
        if arg == "--dry-run-system":
            dry = True
        elif arg == "--stdio":
            mode = "stdio"
        elif arg in ("--listen-unix", "--vsock-port", "--virtio-port", "--serve-fd") and args:
            mode, value = arg[2:], args.pop(0)
        elif arg == "--work-in-home":
            home = True
        else:
            sys.stderr.write(
                "usage: agent.py [--stdio | --listen-unix PATH | --vsock-port N | "
                "--virtio-port NAME | --serve-fd FD [--work-in-home]] [--dry-run-system] [--version]\n"
            )
            return 2
    _no_inherited_fds()
    agent = Agent(dry_run_system=dry)
    if mode not in ("stdio", "listen-unix", "serve-fd") or home:  # in the guest (not tests, local use)
        _work_in_home()
    if mode == "stdio":
        serve_stdio(agent)
        return 0
    if mode == "serve-fd":
        serve_fd(agent, int(value))
        return 0
    if mode == "listen-unix":
        serve_unix(agent, value)
        return 0
    if mode == "vsock-port":
        _serve_socket(agent, open_vsock(int(value)), "vsock")
        return 0
    name = value if mode == "virtio-port" else VIRTIO_PORT_NAME
    expected = announced_ports() or sys.maxsize
    warned = False
    served: dict[str, threading.Thread] = {}
    found_at: float | None = None
    while True:
        for port, dev in find_virtio_ports(name).items():
            if port not in served or not served[port].is_alive():
                served[port] = threading.Thread(
                    target=_serve_virtio_forever, args=(agent, dev), name=f"port-{port}", daemon=True
                )
                served[port].start()
        if served:
            # the ports appear together at driver probe; a late one is still picked up for a while,
            # unless the host said how many there are (then a guest restored from a snapshot taken
            # in those first seconds does not look again every second)
            found_at = found_at or time.monotonic()
            early = time.monotonic() - found_at < 10 and len(served) < expected
            time.sleep(1.0 if early else 60.0)
            continue
        if mode == "auto":
            try:
                sock = open_vsock(AGENT_VSOCK_PORT)
            except (OSError, AttributeError) as exc:
                if not warned:
                    _log(f"no virtio-serial port {name!r} and no vsock ({exc}); waiting")
                    warned = True
            else:
                _serve_socket(agent, sock, "vsock")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
