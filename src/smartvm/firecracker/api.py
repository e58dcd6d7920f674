"""Async client for Firecracker's HTTP API over its Unix socket.

Shaped like Firecracker's own test framework: one small :class:`Resource` per endpoint, so call
sites read like the API docs (``await api.machine_config.put(vcpu_count=2, mem_size_mib=256)``).
Arguments left as ``None`` are dropped; a non-2xx answer raises ``FIRECRACKER_API_ERROR`` carrying
the method, the path and Firecracker's ``fault_message``.

Underneath: h11 (the HTTP/1.1 state machine httpx itself uses) on one asyncio Unix stream, kept
alive between calls. :meth:`FirecrackerAPI.send_all` pipelines independent calls on that
connection (Firecracker answers one connection's requests in order), so a whole pre-boot
configuration costs one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import h11

from smartvm.errors import ErrorCode, SmartVMError

DEFAULT_TIMEOUT_S = 30.0
_READ_CHUNK = 65536
# Not safe to send twice: a second InstanceStart or SendCtrlAltDel is a different request.
_NOT_RETRIED = {("PUT", "/actions")}


class Call(NamedTuple):
    """One request, built by :meth:`Resource.put_call` / :meth:`Resource.patch_call` for
    :meth:`FirecrackerAPI.send_all`."""

    method: str
    path: str
    body: Any = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


class Resource:
    """One endpoint. ``id_field`` names the body field that also forms the last path segment."""

    def __init__(self, api: FirecrackerAPI, path: str, id_field: str | None = None) -> None:
        self._api = api
        self.path = path
        self.id_field = id_field

    def _target(self, body: dict[str, Any]) -> str:
        if self.id_field is None:
            return self.path
        resource_id = body.get(self.id_field)
        if not isinstance(resource_id, str) or not resource_id:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{self.path}: the body needs a non-empty string {self.id_field!r}",
            )
        return f"{self.path}/{quote(resource_id, safe='')}"

    def _call(self, method: str, data: dict[str, Any] | None, fields: dict[str, Any]) -> Call:
        body = dict(data or {})
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        return Call(method, self._target(body), body)

    def put_call(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Call:
        """The PUT that :meth:`put` would send, to batch with :meth:`FirecrackerAPI.send_all`."""
        return self._call("PUT", data, fields)

    def patch_call(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Call:
        return self._call("PATCH", data, fields)

    async def get(self) -> Any:
        return await self._api.request("GET", self.path)

    async def put(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Any:
        """PUT the body built from ``data`` (for free-form bodies like MMDS) and keyword fields."""
        return await self._api.call(self.put_call(data, **fields))

    async def patch(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Any:
        return await self._api.call(self.patch_call(data, **fields))


class _Closed(Exception):
    """The connection ended; ``answered_nothing``: not one byte of the pending response arrived."""

    def __init__(self, reason: str, *, answered_nothing: bool) -> None:
        super().__init__(reason)
        self.answered_nothing = answered_nothing


class _Answer(NamedTuple):
    status: int
    content: bytes


class _Connection:
    """One kept-alive stream; each exchange gets its own h11 state machine, so requests can be
    written ahead of their answers (pipelining), and bytes read past one answer go to the next."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used = False  # an exchange completed on it: a close now may be an idle close
        self._unread = b""

    def usable(self) -> bool:
        """False once the peer closed it (or sent unasked bytes): checked before each reuse, so an
        idle connection Firecracker dropped is replaced before anything is sent on it."""
        if self.reader.at_eof() or self.writer.is_closing():
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    async def send(self, exchanges: list[h11.Connection], calls: Sequence[Call]) -> None:
        data = b"".join(_serialize(ex, call) for ex, call in zip(exchanges, calls, strict=True))
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:  # the peer closed before reading: nothing was answered
            raise _Closed(str(exc) or type(exc).__name__, answered_nothing=True) from exc

    async def receive(self, ex: h11.Connection) -> tuple[_Answer, bool]:
        """The next answer, and whether the connection stays open after it."""
        received = bool(self._unread)
        if self._unread:
            ex.receive_data(self._unread)
            self._unread = b""
        status, chunks = 0, []
        while True:
            try:
                event = ex.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Closed(f"bad or cut HTTP answer: {exc}", answered_nothing=False) from exc
            if event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(_READ_CHUNK)
                except OSError as exc:
                    raise _Closed(str(exc), answered_nothing=not received) from exc
                if not data and not received:
                    raise _Closed("the connection was closed", answered_nothing=True)
                received = True
                ex.receive_data(data)  # b"" is the end of the stream: h11 reports a cut answer
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _Closed("the connection was closed", answered_nothing=status == 0)
        self._unread = ex.trailing_data[0]
        self.used = True
        keep = ex.our_state is h11.DONE and ex.their_state is h11.DONE
        return _Answer(status, b"".join(chunks)), keep

    def close(self) -> None:
        self.writer.close()


def _serialize(ex: h11.Connection, call: Call) -> bytes:
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    if call.body is None:
        return (ex.send(h11.Request(method=call.method, target=call.path, headers=headers)) or b"") + (
            ex.send(h11.EndOfMessage()) or b""
        )
    payload = json.dumps(call.body, separators=(",", ":")).encode()
    headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    return b"".join(
        ex.send(event) or b""
        for event in (
            h11.Request(method=call.method, target=call.path, headers=headers),
            h11.Data(data=payload),
            h11.EndOfMessage(),
        )
    )


class FirecrackerAPI:
    """The API of one Firecracker process. Use as an async context manager or call :meth:`close`.

    Calls share one connection, one at a time. If Firecracker closed the kept-alive connection
    between calls, a call that is safe to repeat (everything but ``PUT /actions``) is sent again
    on a new connection; any other broken connection is ``NO_CLIENT``.
    """

    def __init__(self, socket_path: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self.describe_instance = Resource(self, "/")
        self.actions = Resource(self, "/actions")
        self.balloon = Resource(self, "/balloon")
        self.balloon_stats = Resource(self, "/balloon/statistics")
        self.balloon_hinting_start = Resource(self, "/balloon/hinting/start")
        self.balloon_hinting_status = Resource(self, "/balloon/hinting/status")
        self.balloon_hinting_stop = Resource(self, "/balloon/hinting/stop")
        self.boot = Resource(self, "/boot-source")
        self.cpu_config = Resource(self, "/cpu-config")
        self.drives = Resource(self, "/drives", "drive_id")
        self.pmem = Resource(self, "/pmem", "id")
        self.logger = Resource(self, "/logger")
        self.machine_config = Resource(self, "/machine-config")
        self.metrics = Resource(self, "/metrics")
        self.mmds = Resource(self, "/mmds")
        self.mmds_config = Resource(self, "/mmds/config")
        self.entropy = Resource(self, "/entropy")
        self.serial = Resource(self, "/serial")
        self.memory_hotplug = Resource(self, "/hotplug/memory")
        self.network_interfaces = Resource(self, "/network-interfaces", "iface_id")
        self.snapshot_create = Resource(self, "/snapshot/create")
        self.snapshot_load = Resource(self, "/snapshot/load")
        self.version = Resource(self, "/version")
        self.vm = Resource(self, "/vm")
        self.vm_config = Resource(self, "/vm/config")
        self.vsock = Resource(self, "/vsock")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer, or None for 204."""
        return await self.call(Call(method, path, body))

    async def call(self, call: Call) -> Any:
        return (await self.send_all([call]))[0]

    async def send_all(self, calls: Sequence[Call]) -> list[Any]:
        """Send ``calls`` pipelined on one connection and return their decoded answers in order.

        Firecracker runs them in order, but every call runs even if an earlier one failed: batch only
        calls that need no earlier answer (pre-boot configuration), and send ``InstanceStart`` after.
        The first failed call raises ``FIRECRACKER_API_ERROR`` naming it, once all were answered.
        """
        answers: list[_Answer] = []
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._exchange(calls, answers)
            except TimeoutError as exc:
                self._drop()
                call = calls[len(answers)]
                raise SmartVMError(
                    ErrorCode.FIRECRACKER_API_ERROR,
                    f"{call}: Firecracker did not answer in {self.timeout:g}s; "
                    "the process may be stuck, check its log",
                ) from exc
        failed = next(
            ((c, a) for c, a in zip(calls, answers, strict=True) if not 200 <= a.status < 300), None
        )
        if failed is not None:
            call, answer = failed
            raise SmartVMError(
                ErrorCode.FIRECRACKER_API_ERROR,
                f"{call} failed with HTTP {answer.status}: {_fault_message(answer.content)}",
            )
        return [_decode(a) for a in answers]

    async def _exchange(self, calls: Sequence[Call], answers: list[_Answer]) -> None:
        """Append the answer of each call to ``answers``, (re)connecting as needed."""
        retried = False
        while len(answers) < len(calls):
            pending = calls[len(answers) :]
            conn = await self._connection(pending[0])
            reused, first = conn.used, len(answers)
            exchanges = [h11.Connection(h11.CLIENT) for _ in pending]
            try:
                await conn.send(exchanges, pending)
                for ex in exchanges:
                    answer, keep = await conn.receive(ex)
                    answers.append(answer)
                    if not keep:  # the rest, if any, go on a new connection
                        self._drop()
                        break
            except _Closed as exc:
                self._drop()
                idle_close = exc.answered_nothing and reused and len(answers) == first
                if idle_close and not retried and _repeatable(pending):
                    retried = True  # Firecracker closed the idle connection: send again
                    continue
                raise SmartVMError(
                    ErrorCode.NO_CLIENT,
                    f"{calls[len(answers)]}: the Firecracker API connection at {self.socket_path} broke: "
                    f"{exc}; is the process running?",
                ) from exc
            except BaseException:  # cancelled mid-exchange: an answer may still come on this stream
                self._drop()
                raise

    async def _connection(self, call: Call) -> _Connection:
        if self._conn is not None and not self._conn.usable():
            self._drop()
        if self._conn is None:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.NO_CLIENT,
                    f"{call}: cannot reach the Firecracker API at {self.socket_path}: "
                    f"{exc.strerror or exc}; is the process running?",
                ) from exc
            self._conn = _Connection(reader, writer)
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(OSError):  # already broken: nothing left to release
                await conn.writer.wait_closed()

    async def __aenter__(self) -> FirecrackerAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _repeatable(calls: Sequence[Call]) -> bool:
    return all((c.method, c.path) not in _NOT_RETRIED for c in calls)


def _decode(answer: _Answer) -> Any:
    if answer.status == 204 or not answer.content:
        return None
    try:
        return json.loads(answer.content)
    except ValueError:
        return answer.content.decode(errors="replace")


def _fault_message(content: bytes) -> str:
    try:
        data = json.loads(content)
    except ValueError:
        return content.decode(errors="replace").strip() or "(no body)"
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return json.dumps(data)
