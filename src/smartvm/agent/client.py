"""Async host client for the guest agent: exec, background processes, files, health, clock.

One :class:`AgentClient` multiplexes any number of concurrent calls over one byte stream (virtio-serial
or vsock, obtained from the engine's ``open_agent_stream``). Every failure is a
:class:`~smartvm.errors.SmartVMError`; a dropped stream is reopened once, transparently, by the next call.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

from smartvm.agent import protocol as p
from smartvm.agent.host_file import HostFileWriter
from smartvm.errors import AgentBusyError, ErrorCode, SmartVMError

OpenStream = Callable[[float], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
OutputCallback = Callable[[bytes], Any]
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guest_answer(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Parse a guest answer: a malformed one is AGENT_PROTOCOL_ERROR, never a KeyError or TypeError."""

    def wrap(parse: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(parse)
        def parsed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return parse(*args, **kwargs)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SmartVMError(
                    ErrorCode.AGENT_PROTOCOL_ERROR, f"the guest agent sent a malformed {what}: {exc!r}"
                ) from None

        return parsed

    return wrap


# Fields of guest answers. The guest may say anything; these values reach API answers (E2B's int32
# and int64 fields, timestamps) and host decisions, so each is checked for its type and range here
# (a ValueError inside a @_guest_answer parser is AGENT_PROTOCOL_ERROR).
_INT32 = (1 << 31) - 1
_INT64 = (1 << 63) - 1


def _int(value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{value!r} is not an integer from {lo} to {hi}")
    return value


def _opt_int(value: Any, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, lo, hi)


def _time(value: Any) -> float:
    """Seconds (a timestamp or a duration): a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number of seconds")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _pid(value: Any) -> int | None:
    return _opt_int(value, 1, _INT32)


def _signal(value: Any) -> int | None:
    return _opt_int(value, 1, 255)


#: run once before the first request (see AgentClient); gets the client and a readiness timeout
Prepare = Callable[["AgentClient", float], Awaitable[None]]
_IN_PREPARE: contextvars.ContextVar[bool] = contextvars.ContextVar("smartvm_agent_in_prepare", default=False)

#: ops that can be re-sent safely after the stream dropped mid-call
_IDEMPOTENT = frozenset({"ping", "health", "proc_list", "file_read", "file_list", "file_stat", "sync"})

# Guest output is data from an untrusted party: nothing it sends grows host memory or disk unbounded.
#: default cap on the stdout, and on the stderr, that exec/wait keep in host memory (each stream)
DEFAULT_OUTPUT_LIMIT = 64 * 1024 * 1024
#: default cap on what Files.read returns (host memory)
DEFAULT_READ_LIMIT = 256 * 1024 * 1024
#: default cap on what Files.download writes (host disk)
DEFAULT_DOWNLOAD_LIMIT = 4 * 1024 * 1024 * 1024
#: cap on a result the agent sends as DATA frames (process and directory listings)
_RESULT_LIMIT = 64 * 1024 * 1024
#: default cap on the output received for one call but not yet taken by its consumer
DEFAULT_QUEUE_LIMIT = 64 * 1024 * 1024
_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class AgentInfo:
    """What the agent announced in its hello frame."""

    protocol: int
    agent_version: str
    pid: int
    started: float
    boot_time: float | None
    transport: str
    kernel: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    @_guest_answer("hello")
    def from_header(cls, h: dict[str, Any]) -> AgentInfo:
        return cls(
            protocol=int(h.get("protocol", 0)),
            agent_version=str(h.get("agent_version", "?")),
            pid=int(h.get("pid", 0)),
            started=float(h.get("started", 0.0)),
            boot_time=h.get("boot_time"),
            transport=str(h.get("transport", "?")),
            kernel=h.get("kernel"),
            raw=h,
        )


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command. ``exit_code`` is 128+N when killed by signal N, 124 on timeout.

    ``stdout``/``stderr`` hold at most the output limit of the call (the first bytes); the
    ``*_truncated`` flags say that more was produced and dropped. A stream consumed by a callback
    is not kept at all (its bytes are empty).
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float
    signal: int | None = None
    timed_out: bool = False
    pid: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class ExecEvent:
    """One item of an output stream: ``started`` (pid), ``stdout``/``stderr`` (data), ``exit`` (result)."""

    kind: Literal["started", "stdout", "stderr", "exit"]
    data: bytes = b""
    pid: int | None = None
    result: ExecResult | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A background process as the agent tracks it."""

    pid: int
    cmd: list[str]
    running: bool
    exit_code: int | None
    signal: int | None
    started: float
    ended: float | None
    stdin_open: bool
    meta: Any = None  # what the starter attached (Processes.run), as it gave it

    @classmethod
    @_guest_answer("process info")
    def from_header(cls, h: dict[str, Any]) -> ProcessInfo:
        ended = h.get("ended")
        return cls(
            meta=h.get("meta"),
            pid=_int(h["pid"], 1, _INT32),
            cmd=[_str(arg) for arg in h.get("cmd", [])],
            running=bool(h.get("running")),
            exit_code=_opt_int(h.get("exit_code"), -_INT32, _INT32),
            signal=_signal(h.get("signal")),
            started=_time(h.get("started", 0)),
            ended=None if ended is None else _time(ended),
            stdin_open=bool(h.get("stdin_open")),
        )


@dataclass(frozen=True)
class FileInfo:
    """A guest file's metadata (``type`` is file, dir, symlink or other; ``mode`` the permission bits)."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: str | None = None
    owner: str | None = None  # user and group names, where the op reports them (Files.entries)
    group: str | None = None

    @classmethod
    @_guest_answer("file info")
    def from_header(cls, h: dict[str, Any]) -> FileInfo:
        return cls(
            name=_str(h["name"]),
            path=_str(h["path"]),
            type=_str(h["type"]),
            size=_int(h["size"], 0, _INT64),
            mode=_int(h["mode"], 0, 0o7777),
            uid=_int(h["uid"], 0, 0xFFFFFFFF),
            gid=_int(h["gid"], 0, 0xFFFFFFFF),
            mtime=_time(h["mtime"]),
            target=_opt_str(h.get("target")),
            owner=_opt_str(h.get("owner")),
            group=_opt_str(h.get("group")),
        )


@dataclass(frozen=True)
class GuestUser:
    """A guest account (:meth:`Processes.user`)."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class FsEvent:
    """One change seen by :meth:`Files.watch`: ``name`` relative to the watched directory, ``type``
    ``start`` (first, once the watch is in place), ``create``, ``write``, ``remove``, ``rename``,
    ``chmod`` or ``overflow`` (the guest dropped events); ``entry`` with ``include_entry``."""

    name: str
    type: str
    entry: FileInfo | None = None


@dataclass(frozen=True)
class Health:
    """Guest health: uptime in seconds, load averages, memory in bytes (MemTotal, MemAvailable, ...)."""

    uptime: float
    load: tuple[float, float, float]
    memory: dict[str, int]
    time: float
    cpus: int
    background_processes: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class TimeSync:
    """Result of :meth:`AgentClient.set_time`: the guest clock before/after and the step applied."""

    applied: bool
    method: str
    target: float
    before: float
    after: float
    delta: float


@dataclass(frozen=True)
class Reseed:
    """Result of :meth:`AgentClient.reseed`."""

    credited_bits: int
    reseeded: bool  # the CRNG was reseeded at once (RNDRESEEDCRNG)
    hostname: str | None
    dry_run: bool


class ExecTimeoutError(SmartVMError):
    """EXEC_TIMEOUT with the partial result (output so far, ``timed_out=True``) attached."""

    def __init__(self, code: ErrorCode | str, message: str, result: ExecResult | None = None) -> None:
        super().__init__(code, message)
        self.result = result


class _ConnectionLost(SmartVMError):
    """AGENT_UNAVAILABLE because the stream dropped (lets idempotent calls retry once)."""


class _Overflow(SmartVMError):
    """GUEST_OUTPUT_TOO_LARGE: a consumer fell too far behind its channel; the request gets cancelled."""


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


# ------------------------------------------------------------------------------------- host-side checks
def _text(value: Any, what: str) -> str:
    """A string argument bound for the guest: NUL bytes would be cut or rejected there, so refuse here."""
    if not isinstance(value, str):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{what} must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{what} contains a NUL byte: {value!r}; remove it")
    return value


def _guest_path(path: str) -> str:
    if not _text(path, "guest path"):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "guest path is empty; give an absolute path")
    return path


def _limit(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{what} must be a non-negative number of bytes")
    return value


def _spawn_fields(
    cmd: str | Sequence[str],
    env: Mapping[str, str | None] | None,
    cwd: str | None,
    user: int | str | None,
) -> dict[str, Any]:
    """The request fields of exec/proc_start, checked on the host before anything is sent."""
    if isinstance(cmd, str):
        argv: str | list[str] = _text(cmd, "command")
    else:
        argv = [_text(arg, f"argument {i} of the command") for i, arg in enumerate(cmd)]
        if not argv:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "the command is empty; give at least a program")
    environ: dict[str, str | None] | None = None
    if env is not None:
        environ = {}
        for key, val in env.items():
            if not _text(key, "environment variable name") or "=" in key:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT, f"environment variable name {key!r} is empty or contains '='"
                )
            environ[key] = None if val is None else _text(val, f"environment variable {key}")
    if isinstance(user, str):
        _text(user, "user")
    return {
        "cmd": argv,
        "env": environ,
        "cwd": None if cwd is None else _text(cwd, "cwd"),
        "user": user,
    }


class _CappedBuffer:
    """Keeps the first ``limit`` bytes of a stream and notes whether more arrived."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def _too_large(what: str, limit: int, fix: str) -> SmartVMError:
    return SmartVMError(
        ErrorCode.GUEST_OUTPUT_TOO_LARGE, f"{what} is larger than {limit} bytes and was stopped there; {fix}"
    )


# ------------------------------------------------------------------------------------------- connection
def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Channel:
    def __init__(self, conn: _Connection, cid: int, op: str) -> None:
        self.conn = conn
        self.id = cid
        self.op = op
        # The inbox: frames (or the failure) the reader routed here, and the one waiter for them. A plain
        # deque and a future, not asyncio.Queue + wait_for: no task and fewer loop hops per frame.
        self.queue: collections.deque[p.Frame | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False
        self.answered = False  # a RESULT/ERROR (or a failure) is queued: stop sending DATA
        self.queued = 0  # payload bytes received but not yet taken by get()
        self.overflowed = False

    async def get(self, deadline: float | None) -> p.Frame:
        """Next frame for this channel; RESULT/ERROR finish it. Raises on error, drop or deadline."""
        if not self.queue:  # what already arrived is delivered even past the deadline
            await self._wait(deadline)
        item = self.queue.popleft()
        if isinstance(item, BaseException):
            self.finished = not isinstance(item, _Overflow)  # an overflow still needs a CANCEL
            raise item
        self.queued -= len(item.payload)
        if item.type == p.ERROR:
            self.finished = True
            raise p.error_from_frame(self.op, item.header)
        if item.type == p.RESULT:
            self.finished = True
        return item

    async def _wait(self, deadline: float | None) -> None:
        """Until something is queued; AGENT_TIMEOUT at the deadline (a slow consumer is no hung guest)."""
        timer: asyncio.TimerHandle | None = None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    timer = waiter.get_loop().call_later(remaining, _wake, waiter)
            if timer is not None or deadline is None:
                await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if not self.queue:
            raise SmartVMError(
                ErrorCode.AGENT_TIMEOUT,
                f"guest agent did not answer {self.op} in time; the guest may be overloaded "
                "or hung (check the console log)",
            )

    def put(self, item: p.Frame | BaseException) -> None:
        self.queue.append(item)
        waiter = self._waiter
        if waiter is not None:
            _wake(waiter)

    async def send_data(self, stream: str, data: bytes, eof: bool) -> None:
        """Send `data` as DATA frames of at most CHUNK_SIZE bytes; the last one carries `eof`."""
        view = memoryview(data)
        last = max(len(view) - 1, 0) // p.CHUNK_SIZE * p.CHUNK_SIZE
        for i in range(0, last + 1, p.CHUNK_SIZE):
            if self.answered:  # the agent already answered (an error): stop sending
                return
            hdr: dict[str, Any] = {"s": stream, "eof": True} if eof and i == last else {"s": stream}
            await self.conn.send(p.DATA, self.id, hdr, bytes(view[i : i + p.CHUNK_SIZE]))


class _Receiver(asyncio.Protocol):
    """Takes the stream's transport over: bytes are decoded and routed to their channels as they
    arrive, so an answer wakes its caller in one loop hop (no reader task, no StreamReader buffer).
    The stream's own protocol still gets flow control and the close: it wakes ``drain`` and
    ``wait_closed`` and may hold resources (a QEMU port claim is released when the connection ends)."""

    def __init__(self, conn: _Connection, inner: asyncio.BaseProtocol) -> None:
        self._conn = conn
        self._inner = inner
        self._decoder = p.FrameDecoder()

    def data_received(self, data: bytes) -> None:
        dispatch = self._conn.dispatch
        for item in self._decoder.feed(data):
            dispatch(item)

    def eof_received(self) -> bool:
        self._conn.lost("guest agent closed the connection")
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._conn.lost(
                "guest agent closed the connection"
                if exc is None
                else f"connection to the guest agent failed: {exc}"
            )
        finally:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Connection:
    """One open stream to the agent, routing frames to channels by id (see :class:`_Receiver`)."""

    def __init__(self, writer: asyncio.StreamWriter, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self.queue_limit = queue_limit
        self.writer = writer
        self.channels: dict[int, _Channel] = {}
        self.info: AgentInfo | None = None
        self.ready: asyncio.Future[AgentInfo] = asyncio.get_running_loop().create_future()
        self.closed = False
        # Random start: a virtio-serial reconnect can deliver frames of the previous session's channels.
        self._next_id = random.randrange(1, 1 << 31)
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def attach(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queue_limit: int
    ) -> _Connection:
        """Route what arrives on an opened stream from now on; what its reader holds already goes first."""
        conn = cls(writer, queue_limit)
        transport = writer.transport
        inner = transport.get_protocol()
        receiver = _Receiver(conn, inner)
        if not isinstance(inner, asyncio.StreamReaderProtocol):  # e.g. a pipe pair: read the reader
            conn._pump = asyncio.create_task(conn._read_loop(reader, receiver))
            return conn
        transport.set_protocol(receiver)
        reader.feed_eof()  # nothing more reaches the reader: take what it buffered, without waiting
        try:
            early = await reader.read()
        except (ConnectionError, OSError) as exc:
            conn.lost(f"connection to the guest agent failed: {exc}")
            return conn
        if early:
            receiver.data_received(early)
        if transport.is_closing():
            conn.lost("guest agent closed the connection")
        return conn

    async def _read_loop(self, reader: asyncio.StreamReader, receiver: _Receiver) -> None:
        """For a reader that is not fed by the writer's transport (two pipes)."""
        reason = "guest agent closed the connection"
        try:
            while data := await reader.read(_READ_SIZE):
                receiver.data_received(data)
        except (ConnectionError, OSError) as exc:
            reason = f"connection to the guest agent failed: {exc}"
        finally:
            self.lost(reason)

    async def send(
        self, ftype: int, cid: int, header: dict[str, Any] | None = None, payload: bytes = b""
    ) -> None:
        if self.closed:
            raise _ConnectionLost(ErrorCode.AGENT_UNAVAILABLE, "connection to the guest agent is closed")
        writer = self.writer
        try:
            writer.write(p.encode_frame(ftype, cid, header, payload))
            transport = writer.transport  # drain only when it has work: buffered bytes or a close to see
            if transport.get_write_buffer_size() or transport.is_closing():
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            self.lost(f"write failed: {exc}")
            raise _ConnectionLost(
                ErrorCode.AGENT_UNAVAILABLE, f"connection to the guest agent dropped ({exc})"
            ) from None
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"request too large for one frame: {exc}"
            ) from None

    def open_channel(self, op: str) -> _Channel:
        self._next_id = self._next_id % 0xFFFFFFFE + 1
        ch = _Channel(self, self._next_id, op)
        self.channels[ch.id] = ch
        return ch

    async def finish_channel(self, ch: _Channel) -> None:
        self.channels.pop(ch.id, None)
        if not ch.finished and not self.closed:
            with contextlib.suppress(SmartVMError):
                await self.send(p.CANCEL, ch.id)

    async def wait_hello(self, timeout: float) -> AgentInfo:
        """Ask for a hello until one arrives (the first may have been lost in a reconnect)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.send(p.HELLO, 0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SmartVMError(ErrorCode.AGENT_TIMEOUT, "guest agent did not say hello in time")
            try:
                return await asyncio.wait_for(asyncio.shield(self.ready), min(1.0, remaining))
            except TimeoutError:
                continue

    def dispatch(self, item: p.Frame | p.FrameError) -> None:
        if isinstance(item, p.FrameError):
            ch = self.channels.get(item.channel) if self.ready.done() else None
            if ch is not None:
                ch.answered = True
                ch.put(
                    SmartVMError(
                        ErrorCode.AGENT_PROTOCOL_ERROR, f"bad frame from the guest agent: {item.message}"
                    )
                )
            return
        if item.type == p.HELLO:
            try:
                info = AgentInfo.from_header(item.header)
            except SmartVMError as exc:
                if not self.ready.done():
                    self.ready.set_exception(exc)
                return
            if not self.ready.done():
                if info.protocol != p.PROTOCOL_VERSION:
                    self.ready.set_exception(
                        SmartVMError(
                            ErrorCode.AGENT_PROTOCOL_ERROR,
                            f"guest agent speaks protocol {info.protocol}, this host {p.PROTOCOL_VERSION}; "
                            "rebuild the guest image so its agent matches this smartvm",
                        )
                    )
                    return
                self.info = info
                self.ready.set_result(info)
            elif self.info is not None and (info.pid, info.started) != (self.info.pid, self.info.started):
                self.info = info  # the agent restarted: everything in flight is gone
                self._fail_all(
                    _ConnectionLost(
                        ErrorCode.AGENT_UNAVAILABLE, "guest agent restarted while the request was running"
                    )
                )
            return
        if not self.ready.done():
            return  # stale frames from an earlier session
        ch = self.channels.get(item.channel)
        if ch is not None and not ch.overflowed:
            ch.answered = ch.answered or item.type in (p.RESULT, p.ERROR)
            ch.queued += len(item.payload)
            if ch.queued > self.queue_limit:  # never buffer without bound for a slow consumer
                ch.overflowed = ch.answered = True
                overflow = _Overflow(
                    ErrorCode.GUEST_OUTPUT_TOO_LARGE,
                    f"{ch.op}: the guest sent more than {self.queue_limit} bytes that were not consumed "
                    "yet; consume the output faster (or raise max_queued_bytes), the request was cancelled",
                )
                ch.queue.clear()  # the request fails: free what it would never read
                ch.put(overflow)
                return
            ch.put(item)

    def _fail_all(self, exc: BaseException) -> None:
        for ch in list(self.channels.values()):
            ch.answered = True
            ch.put(exc)
        self.channels.clear()

    def lost(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        err = _ConnectionLost(ErrorCode.AGENT_UNAVAILABLE, f"{reason}; is the guest still running?")
        if not self.ready.done():
            self.ready.set_exception(err)
            self.ready.exception()  # mark retrieved
        self._fail_all(err)
        self.writer.close()

    async def close(self) -> None:
        self.lost("client closed the connection")
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# ----------------------------------------------------------------------------------------------- client
class AgentClient:
    """Talks to the guest agent. Safe for many concurrent calls; use as ``async with``."""

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        exec_grace: float = 15.0,
        max_queued_bytes: int = DEFAULT_QUEUE_LIMIT,
        prepare: Prepare | None = None,
        prepare_timeout: float = 60.0,
    ) -> None:
        """``prepare`` runs once before the first request of any kind goes out (e.g. wait for the
        guest and, after a restore, reseed its RNG and set its clock); see :meth:`prepare`."""
        self._open_stream = open_stream
        self._prepare_hook = prepare
        self._prepare_timeout = prepare_timeout
        self._prepare_task: asyncio.Task[None] | None = None
        self._prepared = prepare is None
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._exec_grace = exec_grace
        self._max_queued_bytes = _limit(max_queued_bytes, "max_queued_bytes")
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self.processes = Processes(self)
        self.files = Files(self)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def info(self) -> AgentInfo | None:
        """The hello of the current connection, if connected."""
        return self._conn.info if self._conn is not None else None

    # --- connection management
    async def _connect(self, timeout: float) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(self._open_stream(timeout), timeout)
        except TimeoutError:
            raise SmartVMError(ErrorCode.AGENT_TIMEOUT, "could not open the agent stream in time") from None
        except OSError as exc:
            raise SmartVMError(ErrorCode.AGENT_UNAVAILABLE, f"cannot open the agent stream: {exc}") from None
        conn = await _Connection.attach(reader, writer, self._max_queued_bytes)
        try:
            await conn.wait_hello(timeout)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def wait_ready(self, timeout: float = 60.0) -> AgentInfo:
        """Connect (retrying while the guest boots) until the agent says hello, else AGENT_TIMEOUT."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        async with self._lock:
            if self._conn is not None and not self._conn.closed and self._conn.info is not None:
                return self._conn.info
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    self._conn = await self._connect(remaining)
                    assert self._conn.info is not None
                    return self._conn.info
                except SmartVMError as exc:
                    if exc.code == ErrorCode.AGENT_PROTOCOL_ERROR or isinstance(exc, AgentBusyError):
                        raise
                    last = exc
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        raise SmartVMError(
            ErrorCode.AGENT_TIMEOUT,
            f"guest agent not ready after {timeout:.0f}s (last error: {last}); check that the "
            "image contains the agent and read the guest console log",
        )

    async def prepare(self, timeout: float | None = None) -> None:
        """Run the ``prepare`` hook unless it has succeeded already. Concurrent callers share one run;
        a failed run fails its callers and is retried by the next call. Requests made by the hook itself
        do not wait for it."""
        if self._prepared or _IN_PREPARE.get():
            return
        task = self._prepare_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._run_prepare(timeout or self._prepare_timeout))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._prepare_task = task
        try:
            await asyncio.shield(task)  # a cancelled caller does not cancel the run the others wait for
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):  # close() ended it
                raise SmartVMError(
                    ErrorCode.AGENT_UNAVAILABLE, "the agent client was closed while waiting for the guest"
                ) from None
            raise

    async def _run_prepare(self, timeout: float) -> None:
        _IN_PREPARE.set(True)  # this task's own context: the hook's requests pass the gate
        assert self._prepare_hook is not None
        await self._prepare_hook(self, timeout)
        self._prepared = True

    async def _ensure(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.writer.is_closing():
            return conn  # the common case, without taking the lock
        async with self._lock:
            if self._conn is not None and not self._conn.closed and not self._conn.writer.is_closing():
                return self._conn
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            try:
                self._conn = await self._connect(self._connect_timeout)
            except AgentBusyError:
                raise
            except SmartVMError as exc:
                raise SmartVMError(
                    ErrorCode.AGENT_UNAVAILABLE, f"guest agent is not reachable: {exc.message}"
                ) from None
            return self._conn

    @contextlib.asynccontextmanager
    async def _channel(
        self, op: str, fields: dict[str, Any], payload: bytes = b""
    ) -> AsyncIterator[_Channel]:
        header = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
        await self.prepare()
        for attempt in range(2):
            conn = await self._ensure()
            ch = conn.open_channel(op)
            try:
                await conn.send(p.REQUEST, ch.id, header, payload)
            except BaseException as exc:
                conn.channels.pop(ch.id, None)
                if isinstance(exc, _ConnectionLost) and not attempt:
                    continue  # the request never left: safe to send it again on a fresh stream
                raise
            try:
                yield ch
            finally:
                await conn.finish_channel(ch)
            return

    async def _call(
        self, op: str, payload: bytes = b"", timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """One request, one RESULT (retried once on a dropped stream when the op is idempotent)."""
        for attempt in range(2):
            try:
                deadline = time.monotonic() + (timeout or self._request_timeout)
                async with self._channel(op, fields, payload) as ch:
                    big = bytearray()
                    while True:
                        frame = await ch.get(deadline)
                        if frame.type == p.DATA and frame.header.get("s") == "result":
                            big += frame.payload
                            if len(big) > _RESULT_LIMIT:
                                raise _too_large(f"the result of {op}", _RESULT_LIMIT, "ask for less")
                        elif frame.type == p.RESULT:
                            if frame.header.get("result_in_data"):
                                return _json_object(bytes(big), op)
                            return frame.header
            except _ConnectionLost:
                if attempt or op not in _IDEMPOTENT:
                    raise
        raise AssertionError("unreachable")

    # --- exec
    async def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output_bytes: int = DEFAULT_OUTPUT_LIMIT,
    ) -> ExecResult:
        """Run `cmd` (argv list, or a string for /bin/sh -c) and collect its output.

        Callbacks (sync or async) see output chunks as they arrive; a stream with a callback is not
        also kept (its bytes in the result are empty). A kept stream holds at most `max_output_bytes`
        (the first ones; ``stdout_truncated``/``stderr_truncated`` tell that more was dropped), the
        command runs on regardless. On timeout the process group is killed and ExecTimeoutError
        (EXEC_TIMEOUT) is raised with the partial result attached.
        """
        _limit(max_output_bytes, "max_output_bytes")
        out, err = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)
        result: ExecResult | None = None
        events = self.exec_stream(cmd, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        async with contextlib.aclosing(events):  # a failing callback cancels the command right away
            async for ev in events:
                if ev.kind == "stdout":
                    if on_stdout is None:
                        out.add(ev.data)
                    else:
                        await _maybe_await(on_stdout(ev.data))
                elif ev.kind == "stderr":
                    if on_stderr is None:
                        err.add(ev.data)
                    else:
                        await _maybe_await(on_stderr(ev.data))
                elif ev.kind == "exit":
                    result = ev.result
        assert result is not None
        full = dataclasses.replace(
            result,
            stdout=bytes(out.data),
            stderr=bytes(err.data),
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )
        if full.timed_out:
            raise ExecTimeoutError(
                ErrorCode.EXEC_TIMEOUT,
                f"command timed out after {timeout}s and was killed (process group)",
                full,
            )
        return full

    async def exec_stream(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[ExecEvent, None]:
        """Run `cmd`, yielding ``started``, ``stdout``/``stderr`` chunks and a final ``exit`` event.

        The exit event's result has empty stdout/stderr (they were streamed) and ``timed_out`` set
        instead of raising. Leaving the loop early cancels the command (its process group is killed).
        With a `timeout`, the command counts as timed out also when the guest does not report the
        kill within the client's ``exec_grace`` (an overloaded or stalled guest): the host's clock decides.
        """
        fields = _spawn_fields(cmd, env, cwd, user)
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < 1e9):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"timeout {timeout!r}: give a positive number of seconds"
            )
        fields.update(timeout=timeout, stdin=True if stdin is not None else None)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout + self._exec_grace
        pid: int | None = None
        async with self._channel("exec", fields) as ch:
            if stdin is not None:
                await ch.send_data("stdin", stdin, eof=True)
            while True:
                try:
                    frame = await ch.get(deadline)
                except SmartVMError as exc:
                    if deadline is None or exc.code is not ErrorCode.AGENT_TIMEOUT:
                        raise
                    # Leaving the channel cancels the command; the guest kills its process group.
                    duration = time.monotonic() - started
                    yield ExecEvent("exit", result=ExecResult(124, b"", b"", duration, None, True, pid))
                    return
                if frame.type == p.DATA:
                    stream = frame.header.get("s")
                    if stream in ("stdout", "stderr") and frame.payload:
                        yield ExecEvent(stream, frame.payload)
                elif frame.type == p.EVENT and frame.header.get("event") == "started":
                    started_event = _started(frame.header)
                    pid = started_event.pid
                    yield started_event
                elif frame.type == p.RESULT:
                    yield ExecEvent("exit", result=_result(frame.header))
                    return

    # --- misc
    async def ping(self) -> float:
        """Round trip to the agent in seconds."""
        t0 = time.monotonic()
        await self._call("ping")
        return time.monotonic() - t0

    async def health(self) -> Health:
        h = await self._call("health")
        load = [float(x) for x in h.get("load", [0, 0, 0])] + [0.0, 0.0, 0.0]
        return Health(
            uptime=float(h["uptime"]),
            load=(load[0], load[1], load[2]),
            memory={str(k): int(v) for k, v in h.get("memory", {}).items()},
            time=float(h["time"]),
            cpus=int(h.get("cpus", 1)),
            background_processes=int(h.get("background_processes", 0)),
            raw=h,
        )

    async def sync(self) -> None:
        """Flush the guest's filesystems (before a snapshot)."""
        await self._call("sync")

    async def set_time(self, when: float | None = None) -> TimeSync:
        """Step the guest clock to `when` (default: the host's clock now), e.g. after a snapshot restore."""
        h = await self._call("set_time", time=time.time() if when is None else when)
        return TimeSync(
            applied=bool(h["applied"]),
            method=str(h["method"]),
            target=float(h["target"]),
            before=float(h["before"]),
            after=float(h["after"]),
            delta=float(h["delta"]),
        )

    async def reseed(self, entropy: bytes | None = None, *, hostname: str | None = None) -> Reseed:
        """Mix ``entropy`` (default: 64 bytes of the host's ``os.urandom``) into the guest kernel's RNG
        and reseed it at once, e.g. after a restore: clones of one snapshot share RNG state until then.
        ``hostname`` also sets the guest's hostname."""
        data = os.urandom(64) if entropy is None else entropy
        h = await self._call("reseed", data, hostname=hostname)
        return Reseed(
            credited_bits=int(h["credited_bits"]),
            reseeded=bool(h["reseeded"]),
            hostname=h.get("hostname"),
            dry_run=bool(h.get("dry_run", False)),
        )

    async def shutdown(self, action: Literal["poweroff", "reboot"] = "poweroff") -> None:
        """Ask the guest to power off (or reboot) cleanly; returns once the agent accepted."""
        await self._call("shutdown", action=action, timeout=10.0)
        await self.close()

    async def close(self) -> None:
        """Close the stream (idempotent). Background processes keep running in the guest."""
        task, self._prepare_task = self._prepare_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _json_object(raw: bytes, op: str) -> dict[str, Any]:
    """A large RESULT body the agent sent as DATA frames."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise SmartVMError(ErrorCode.AGENT_PROTOCOL_ERROR, f"{op}: result is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SmartVMError(ErrorCode.AGENT_PROTOCOL_ERROR, f"{op}: result is not a JSON object")
    return value


def _entries(h: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The list under `key` of a guest answer (a listing), checked to be a list of objects."""
    value = h.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise SmartVMError(ErrorCode.AGENT_PROTOCOL_ERROR, f"the guest agent sent a malformed {key} list")
    return value


async def _full_chunks(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """`chunks` regrouped into CHUNK_SIZE pieces (the last one shorter): few, full frames."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        while len(buf) >= p.CHUNK_SIZE:
            yield bytes(buf[: p.CHUNK_SIZE])
            del buf[: p.CHUNK_SIZE]
    if buf:
        yield bytes(buf)


@_guest_answer("user")
def _guest_user(h: dict[str, Any]) -> GuestUser:
    return GuestUser(
        name=_str(h["name"]),
        uid=_int(h["uid"], 0, 0xFFFFFFFF),
        gid=_int(h["gid"], 0, 0xFFFFFFFF),
        home=_str(h["home"]),
    )


@_guest_answer("file event")
def _fs_event(h: dict[str, Any]) -> FsEvent:
    entry = h.get("entry")
    return FsEvent(
        name=_str(h["name"]),
        type=_str(h["type"]),
        entry=FileInfo.from_header(entry) if isinstance(entry, dict) else None,
    )


@_guest_answer("exec result")
def _result(h: dict[str, Any]) -> ExecResult:
    code = _opt_int(h.get("exit_code"), -_INT32, _INT32)
    return ExecResult(
        exit_code=code if code is not None else -1,
        stdout=b"",
        stderr=b"",
        duration=_time(h.get("duration") or 0.0),
        signal=_signal(h.get("signal")),
        timed_out=bool(h.get("timed_out")),
        pid=_pid(h.get("pid")),
    )


@_guest_answer("started event")
def _started(h: dict[str, Any]) -> ExecEvent:
    return ExecEvent("started", pid=_pid(h.get("pid")))


class Processes:
    """Background processes: they outlive the call (and the connection) that started them."""

    def __init__(self, client: AgentClient) -> None:
        self._c = client

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bool = False,
        replay_bytes: int | None = None,
    ) -> ProcessInfo:
        """Start `cmd` in the background; `stdin=True` keeps a pipe open for :meth:`send_stdin`."""
        fields = _spawn_fields(cmd, env, cwd, user)
        h = await self._c._call("proc_start", **fields, stdin=stdin or None, replay_bytes=replay_bytes)
        if h.get("pid") is None:  # the program does not exist: the agent answered like a shell would
            raise SmartVMError(ErrorCode.AGENT_ERROR, f"cannot start {cmd!r}: exit code {h.get('exit_code')}")
        return ProcessInfo.from_header(h)

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: int | str | None = None,
        stdin: bool = False,
        timeout: float | None = None,
        meta: Any = None,
    ) -> AsyncGenerator[ExecEvent, None]:
        """Start `cmd` in the background and stream ``started``, ``stdout``/``stderr`` and ``exit``.

        Unlike :meth:`AgentClient.exec_stream`, leaving the loop early only detaches: the process keeps
        running (listed, and reachable with :meth:`attach`, :meth:`send_stdin`, :meth:`signal`) until
        it exits or `timeout` seconds kill its process group. `meta` (JSON) is kept with the process
        and returned by :meth:`list` as ``ProcessInfo.meta``. A program that does not exist ends with
        an ``exit`` event (code 127) and no ``started``.
        """
        fields = _spawn_fields(cmd, env, cwd, user)
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < 1e9):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT, f"timeout {timeout!r}: give a positive number of seconds"
            )
        fields.update(stdin=stdin or None, timeout=timeout, meta=meta)
        async with self._c._channel("proc_run", fields) as ch:
            while True:
                frame = await ch.get(None)
                if frame.type == p.DATA:
                    stream = frame.header.get("s")
                    if stream in ("stdout", "stderr") and frame.payload:
                        yield ExecEvent(stream, frame.payload)
                elif frame.type == p.EVENT and frame.header.get("event") == "started":
                    yield _started(frame.header)
                elif frame.type == p.RESULT:
                    result = _result(frame.header)
                    yield ExecEvent("exit", pid=result.pid, result=result)
                    return

    async def user(self, user: int | str | None = None) -> GuestUser:
        """The guest account `user` (a name or uid; None: the agent's own), e.g. for its home directory."""
        if isinstance(user, str):
            _text(user, "user")
        h = await self._c._call("user_info", user=user)
        return _guest_user(h)

    async def list(self) -> list[ProcessInfo]:
        h = await self._c._call("proc_list")
        return [ProcessInfo.from_header(x) for x in _entries(h, "processes")]

    async def send_stdin(self, pid: int, data: bytes | str, *, eof: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        chunks = [raw[i : i + p.CHUNK_SIZE] for i in range(0, len(raw), p.CHUNK_SIZE)] or [b""]
        for i, chunk in enumerate(chunks):
            await self._c._call("proc_stdin", chunk, pid=pid, eof=eof and i == len(chunks) - 1)

    async def close_stdin(self, pid: int) -> None:
        await self.send_stdin(pid, b"", eof=True)

    async def signal(self, pid: int, sig: int | str = "SIGTERM", *, group: bool = True) -> ProcessInfo:
        """Send `sig` to the process (its whole process group unless ``group=False``)."""
        return ProcessInfo.from_header(await self._c._call("proc_signal", pid=pid, signal=sig, group=group))

    async def attach(
        self, pid: int, *, replay: bool = True, timeout: float | None = None
    ) -> AsyncGenerator[ExecEvent, None]:
        """Stream the process's output (first what was buffered, if `replay`) until it exits.

        Ends with an ``exit`` event, or without one when `timeout` elapsed first (the process keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout + self._c._exec_grace
        async with self._c._channel("proc_attach", {"pid": pid, "replay": replay, "timeout": timeout}) as ch:
            while True:
                frame = await ch.get(deadline)
                if frame.type == p.DATA and frame.header.get("s") in ("stdout", "stderr") and frame.payload:
                    yield ExecEvent(frame.header["s"], frame.payload)
                elif frame.type == p.RESULT:
                    if not frame.header.get("running"):
                        yield ExecEvent(
                            "exit", pid=pid, result=dataclasses.replace(_result(frame.header), pid=pid)
                        )
                    return

    async def wait(
        self, pid: int, timeout: float | None = None, *, max_output_bytes: int = DEFAULT_OUTPUT_LIMIT
    ) -> ExecResult:
        """Wait for exit; the result carries the output the agent buffered. EXEC_TIMEOUT if still running.

        Each stream keeps at most `max_output_bytes` (the first ones; see ``*_truncated``).
        """
        _limit(max_output_bytes, "max_output_bytes")
        out, err = _CappedBuffer(max_output_bytes), _CappedBuffer(max_output_bytes)

        def result(r: ExecResult) -> ExecResult:
            return dataclasses.replace(
                r,
                stdout=bytes(out.data),
                stderr=bytes(err.data),
                stdout_truncated=out.truncated,
                stderr_truncated=err.truncated,
            )

        events = self.attach(pid, replay=True, timeout=timeout)
        async with contextlib.aclosing(events):
            async for ev in events:
                if ev.kind == "stdout":
                    out.add(ev.data)
                elif ev.kind == "stderr":
                    err.add(ev.data)
                elif ev.kind == "exit" and ev.result is not None:
                    return result(ev.result)
        raise ExecTimeoutError(
            ErrorCode.EXEC_TIMEOUT,
            f"process {pid} still running after {timeout}s",
            result(ExecResult(-1, b"", b"", timeout or 0.0, None, True, pid)),
        )


class Files:
    """Guest files. Large files move in CHUNK_SIZE frames, never base64; writes are atomic in the guest.

    What the guest sends back is data only: host paths come from the caller, host modes never carry
    special bits, and reads stop at a size limit (GUEST_OUTPUT_TOO_LARGE).
    """

    def __init__(self, client: AgentClient) -> None:
        self._c = client

    async def write(
        self,
        path: str,
        data: bytes | str,
        *,
        mode: int | None = None,
        append: bool = False,
        parents: bool = True,
        owner: int | str | None = None,
    ) -> int:
        """Write `data` to `path` (replacing it atomically unless `append`); returns the size written.

        `owner` (a guest user name or uid) owns a file this creates and the parent dirs it makes."""
        raw = data.encode() if isinstance(data, str) else data
        chunks = [raw[i : i + p.CHUNK_SIZE] for i in range(0, len(raw), p.CHUNK_SIZE)]
        return await self._write_chunks(path, chunks, mode=mode, append=append, parents=parents, owner=owner)

    async def upload(
        self,
        local: str | os.PathLike[str],
        path: str,
        *,
        mode: int | None = None,
        parents: bool = True,
        owner: int | str | None = None,
    ) -> int:
        """Stream the host file `local` to `path` (mode defaults to the local file's permissions)."""
        _guest_path(path)
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.HOST_FILE_ERROR,
                f"cannot read {os.fspath(local)} on the host: {exc.strerror or exc}",
            ) from None
        try:
            st = os.fstat(fd)

            def chunks() -> Iterable[bytes]:
                while chunk := os.read(fd, p.CHUNK_SIZE):
                    yield chunk

            perms = st.st_mode & 0o7777 if mode is None else mode
            return await self._write_chunks(
                path, chunks(), mode=perms, append=False, parents=parents, owner=owner
            )
        finally:
            os.close(fd)

    async def write_stream(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int | None = None,
        parents: bool = True,
        owner: int | str | None = None,
    ) -> int:
        """Write what `chunks` yields to `path` as it arrives (replacing it atomically when the last
        chunk is in; a failure leaves the old file), e.g. an HTTP upload; returns the size written.
        Chunks of any size are fine: they go out in full frames."""
        return await self._write_chunks(path, chunks, mode=mode, append=False, parents=parents, owner=owner)

    async def _write_chunks(
        self,
        path: str,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        *,
        mode: int | None,
        append: bool,
        parents: bool,
        owner: int | str | None = None,
    ) -> int:
        _guest_path(path)
        it = _full_chunks(_as_async(chunks))
        first = await anext(it, b"")
        nxt = await anext(it, None)
        fields = {
            "path": path,
            "mode": mode,
            "append": append or None,
            "parents": parents,
            "eof": True if nxt is None else None,
            "owner": owner,
        }
        async with self._c._channel("file_write", fields, first) as ch:
            while nxt is not None:
                cur, nxt = nxt, await anext(it, None)
                await ch.send_data("file", cur, eof=nxt is None)
            deadline = time.monotonic() + self._c._request_timeout
            while True:
                frame = await ch.get(deadline)
                if frame.type == p.RESULT:
                    return int(frame.header.get("size", 0))

    def read_stream(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        max_bytes: int = DEFAULT_DOWNLOAD_LIMIT,
    ) -> AsyncGenerator[bytes, None]:
        """The chunks of `path` as they come; GUEST_OUTPUT_TOO_LARGE past `max_bytes`. Close the
        generator (``contextlib.aclosing``) to stop the read early."""
        return self._read_stream(path, offset, length, max_bytes)

    async def _read_stream(
        self, path: str, offset: int, length: int | None, limit: int, opened: dict[str, Any] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The chunks of `path`; more than `limit` bytes raise GUEST_OUTPUT_TOO_LARGE (and cancel the read).

        The agent is asked for at most ``limit + 1`` bytes, so an endless file stops in the guest too;
        the count is kept here as well, whatever the guest sends. `opened` receives the agent's ``open``
        event (the guest file's size and mode at open time).
        """
        _guest_path(path)
        _limit(limit, "max_bytes")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "offset must be a non-negative integer")
        want = limit + 1 if length is None else min(_limit(length, "length"), limit + 1)
        received = 0
        fields = {"path": path, "offset": offset or None, "length": want}
        async with self._c._channel("file_read", fields) as ch:
            while True:
                frame = await ch.get(time.monotonic() + self._c._request_timeout)  # per-chunk inactivity
                if frame.type == p.DATA:
                    received += len(frame.payload)
                    if received > limit:
                        raise _too_large(
                            f"guest file {path}", limit, "pass a larger max_bytes if you expect it"
                        )
                    yield frame.payload
                elif frame.type == p.EVENT and frame.header.get("event") == "open" and opened is not None:
                    opened.update(frame.header)
                elif frame.type == p.RESULT:
                    return

    async def read(
        self, path: str, *, offset: int = 0, length: int | None = None, max_bytes: int = DEFAULT_READ_LIMIT
    ) -> bytes:
        """The bytes of `path` (from `offset`, at most `length`); GUEST_OUTPUT_TOO_LARGE past `max_bytes`."""
        buf = bytearray()
        chunks = self._read_stream(path, offset, length, max_bytes)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                buf += chunk
        return bytes(buf)

    async def read_text(
        self, path: str, encoding: str = "utf-8", *, max_bytes: int = DEFAULT_READ_LIMIT
    ) -> str:
        return (await self.read(path, max_bytes=max_bytes)).decode(encoding)

    async def download(
        self,
        path: str,
        local: str | os.PathLike[str],
        *,
        mode: int | None = None,
        keep_mode: bool = False,
        max_bytes: int = DEFAULT_DOWNLOAD_LIMIT,
    ) -> int:
        """Stream `path` into the host file `local` atomically; the size written.

        `local` is used as given (a symlink there is replaced, not followed). The host file gets
        `mode`, or with `keep_mode` the guest file's permission bits, else 0644; never setuid, setgid
        or sticky bits. More than `max_bytes` raise GUEST_OUTPUT_TOO_LARGE; a host write failure
        raises HOST_FILE_ERROR; either way `local` is untouched and no temp file is left.
        """
        opened: dict[str, Any] = {}
        chunks = self._read_stream(path, 0, None, max_bytes, opened)
        with HostFileWriter(local) as out:
            async with contextlib.aclosing(chunks):  # a failed local write ends the guest read now
                async for chunk in chunks:
                    out.write(chunk)
            guest_mode = opened.get("mode")
            if mode is None:
                mode = guest_mode if keep_mode and isinstance(guest_mode, int) else 0o644
            out.commit(mode)
            return out.size

    async def list(self, path: str) -> list[FileInfo]:
        h = await self._c._call("file_list", path=_guest_path(path))
        return [FileInfo.from_header(e) for e in _entries(h, "entries")]

    async def stat(self, path: str, *, follow: bool = True) -> FileInfo:
        return FileInfo.from_header(await self._c._call("file_stat", path=_guest_path(path), follow=follow))

    async def exists(self, path: str) -> bool:
        h = await self._c._call("file_stat", path=_guest_path(path), missing_ok=True)
        return bool(h.get("exists"))

    async def mkdir(
        self,
        path: str,
        *,
        parents: bool = True,
        mode: int = 0o755,
        exist_ok: bool = True,
        owner: int | str | None = None,
    ) -> FileInfo:
        """Make a directory (with its parents); `owner` owns the directories this creates."""
        return FileInfo.from_header(
            await self._c._call(
                "file_mkdir",
                path=_guest_path(path),
                parents=parents,
                mode=mode,
                exist_ok=exist_ok,
                owner=owner,
            )
        )

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> bool:
        """Remove a file, symlink or (empty, or with `recursive`) directory; returns whether it existed."""
        h = await self._c._call(
            "file_remove", path=_guest_path(path), recursive=recursive or None, missing_ok=missing_ok or None
        )
        return bool(h.get("removed"))

    async def rename(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        await self._c._call("file_rename", src=_guest_path(src), dst=_guest_path(dst), overwrite=overwrite)

    async def entries(self, path: str, *, depth: int = 0) -> tuple[FileInfo, builtins.list[FileInfo]]:
        """`path` itself (a final symlink not followed) and, with `depth` > 0, the tree below it down to
        `depth` levels (depth first, in name order), with ``owner``/``group`` names filled in."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "depth must be a non-negative integer")
        h = await self._c._call("file_entries", path=_guest_path(path), depth=depth)
        top = h.get("entry")
        if not isinstance(top, dict):
            raise SmartVMError(ErrorCode.AGENT_PROTOCOL_ERROR, "file_entries: the answer has no entry")
        return FileInfo.from_header(top), [FileInfo.from_header(e) for e in _entries(h, "entries")]

    async def prepare(
        self, path: str, *, kind: Literal["file", "dir"] = "file", user: int | str | None = None
    ) -> tuple[bool, FileInfo]:
        """Create the directory or empty file `path` and its missing parents, owned by `user`; returns
        whether `path` was created. A following :meth:`write` keeps that owner (writing as a user)."""
        if isinstance(user, str):
            _text(user, "user")
        h = await self._c._call("file_prepare", path=_guest_path(path), kind=kind, user=user)
        return bool(h.get("created")), FileInfo.from_header(h)

    async def watch(
        self,
        path: str,
        *,
        recursive: bool = False,
        include_entry: bool = False,
        allow_network_mounts: bool = False,
    ) -> AsyncGenerator[FsEvent, None]:
        """Changes under the directory `path` as they happen (inotify in the guest), first a ``start``
        event once the watch is in place. Ends when the directory is gone; leaving the loop stops it."""
        fields = {
            "path": _guest_path(path),
            "recursive": recursive or None,
            "include_entry": include_entry or None,
            "allow_network_mounts": allow_network_mounts or None,
        }
        async with self._c._channel("file_watch", fields) as ch:
            while True:
                frame = await ch.get(None)
                if frame.type == p.RESULT:
                    return
                if frame.type != p.EVENT:
                    continue
                if frame.header.get("event") == "started":
                    yield FsEvent("", "start")
                elif frame.header.get("event") == "fs":
                    for event in _entries(frame.header, "events"):
                        yield _fs_event(event)


async def _as_async(chunks: Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
