"""envd's ``filesystem.Filesystem`` service over smartvm's guest agent.

Paths are absolute or relative to the acting user's home (envd's rule). Directories made for a user
belong to that user. Watches run in the guest (inotify); the non-streaming watcher calls keep a watch
running here and buffer its events until ``GetWatcherEvents`` takes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import uuid
from collections import deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt import Timestamp

from smartvm.agent import AgentOpError, FileInfo, FsEvent
from smartvm.errors import SmartVMError
from smartvm.service.e2b import binding as b
from smartvm.service.e2b.errors import to_connect
from smartvm.service.e2b.gen.filesystem import filesystem_pb as pb
from smartvm.service.e2b.gen.filesystem.filesystem_connect import Filesystem
from smartvm.service.e2b.streams import deadline_of, keepalive_interval, user_of, with_keepalive

_TYPES = {"file": pb.FileType.FILE, "dir": pb.FileType.DIRECTORY, "symlink": pb.FileType.SYMLINK}
_EVENTS = {
    "create": pb.EventType.CREATE,
    "write": pb.EventType.WRITE,
    "remove": pb.EventType.REMOVE,
    "rename": pb.EventType.RENAME,
    "chmod": pb.EventType.CHMOD,
}
_TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
#: what a non-streaming watcher keeps until it is fetched: at most this many events, and this many
#: bytes of them (the guest chooses the length of names); the oldest are dropped past either
WATCHER_BUFFER = 8192
WATCHER_BUFFER_BYTES = 4 << 20
#: non-streaming watchers per sandbox
MAX_WATCHERS = 256


def entry_info(info: FileInfo) -> pb.EntryInfo:
    """envd's EntryInfo: permission bits in ``mode``, Go's FileMode string in ``permissions``."""
    perms = stat.filemode(_TYPE_BITS.get(info.type, 0) | (info.mode & 0o7777))
    if info.type == "symlink":
        perms = "L" + perms[1:]
    elif info.type not in _TYPE_BITS:
        perms = "?" + perms[1:]
    seconds = int(info.mtime)
    out = pb.EntryInfo(
        name=info.name,
        type=_TYPES.get(info.type, pb.FileType.UNSPECIFIED),
        path=info.path,
        size=info.size,
        mode=info.mode & 0o777,
        permissions=perms,
        owner=info.owner if info.owner is not None else str(info.uid),
        group=info.group if info.group is not None else str(info.gid),
        modified_time=Timestamp(seconds=seconds, nanos=int((info.mtime - seconds) * 1e9)),
    )
    if info.target is not None:
        out.symlink_target = info.target
    return out


def fs_event(event: FsEvent) -> pb.FilesystemEvent | None:
    kind = _EVENTS.get(event.type)
    if kind is None:  # "start", "overflow": nothing envd would report
        return None
    out = pb.FilesystemEvent(name=event.name, type=kind)
    if event.entry is not None:
        out.entry = entry_info(event.entry)
    return out


async def _path(ctx: RequestContext[Any, Any], path: str) -> tuple[str, str | None]:
    """The absolute path a request means, and the user it acts as."""
    user = user_of(ctx)
    return await b.absolute(user, path), user


@dataclass
class _Watcher:
    sandbox: str  # the sandbox it watches: watcher ids are only valid for their own sandbox
    task: asyncio.Task[None] | None = None
    events: deque[tuple[pb.FilesystemEvent, int]] = field(default_factory=deque)  # with their sizes
    size: int = 0  # bytes in `events`
    error: ConnectError | None = None

    def add(self, event: pb.FilesystemEvent) -> None:
        size = len(event.to_binary())
        self.events.append((event, size))
        self.size += size
        while len(self.events) > WATCHER_BUFFER or self.size > WATCHER_BUFFER_BYTES:
            self.size -= self.events.popleft()[1]

    def take(self) -> list[pb.FilesystemEvent]:
        events = [event for event, _ in self.events]
        self.events.clear()
        self.size = 0
        return events


class FilesystemService(Filesystem):
    """Handlers of ``filesystem.Filesystem``; the sandbox comes from the request (binding.current()),
    and smartvm errors become Connect errors in the app's interceptor."""

    def __init__(self) -> None:
        self._watchers: dict[str, _Watcher] = {}

    async def stat(self, request: pb.StatRequest, ctx: RequestContext[Any, Any], /) -> pb.StatResponse:
        path, _ = await _path(ctx, request.path)
        entry, _ = await b.current().target.files.entries(path)
        return pb.StatResponse(entry=entry_info(entry))

    async def list_dir(
        self, request: pb.ListDirRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.ListDirResponse:
        path, _ = await _path(ctx, request.path)
        _, entries = await b.current().target.files.entries(path, depth=request.depth or 1)
        return pb.ListDirResponse(entries=[entry_info(e) for e in entries])

    async def make_dir(
        self, request: pb.MakeDirRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.MakeDirResponse:
        path, user = await _path(ctx, request.path)
        try:
            created, info = await b.current().target.files.prepare(path, kind="dir", user=user)
        except AgentOpError as exc:
            if exc.errno == "EEXIST":
                raise ConnectError(Code.INVALID_ARGUMENT, f"{path} exists and is not a directory") from None
            raise
        if not created:
            raise ConnectError(Code.ALREADY_EXISTS, f"directory {path} already exists")
        return pb.MakeDirResponse(entry=entry_info(info))

    async def move(self, request: pb.MoveRequest, ctx: RequestContext[Any, Any], /) -> pb.MoveResponse:
        source, _ = await _path(ctx, request.source)
        destination, _ = await _path(ctx, request.destination)
        files = b.current().target.files
        await files.rename(source, destination)
        entry, _ = await files.entries(destination)
        return pb.MoveResponse(entry=entry_info(entry))

    async def remove(self, request: pb.RemoveRequest, ctx: RequestContext[Any, Any], /) -> pb.RemoveResponse:
        path, _ = await _path(ctx, request.path)
        # envd removes like os.RemoveAll: whole trees, and nothing there is fine
        await b.current().target.files.remove(path, recursive=True, missing_ok=True)
        return pb.RemoveResponse()

    async def watch_dir(
        self, request: pb.WatchDirRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pb.WatchDirResponse]:
        path, _ = await _path(ctx, request.path)
        events = b.current().target.files.watch(
            path,
            recursive=request.recursive,
            include_entry=request.include_entry,
            allow_network_mounts=request.allow_network_mounts,
        )
        async for ev in with_keepalive(events, keepalive_interval(ctx), deadline_of(ctx)):
            if ev is None:
                keepalive: Oneof[Literal["keepalive"], pb.WatchDirResponse.KeepAlive] = Oneof(
                    "keepalive", pb.WatchDirResponse.KeepAlive()
                )
                yield pb.WatchDirResponse(event=keepalive)
            elif ev.type == "start":
                start: Oneof[Literal["start"], pb.WatchDirResponse.StartEvent] = Oneof(
                    "start", pb.WatchDirResponse.StartEvent()
                )
                yield pb.WatchDirResponse(event=start)
            elif (event := fs_event(ev)) is not None:
                changed: Oneof[Literal["filesystem"], pb.FilesystemEvent] = Oneof("filesystem", event)
                yield pb.WatchDirResponse(event=changed)

    async def create_watcher(
        self, request: pb.CreateWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.CreateWatcherResponse:
        path, _ = await _path(ctx, request.path)
        target = b.current().target
        sandbox = b.current_request().sandbox_id
        if sum(1 for w in self._watchers.values() if w.sandbox == sandbox) >= MAX_WATCHERS:
            raise ConnectError(Code.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} watchers are open; remove some")
        events = target.files.watch(
            path,
            recursive=request.recursive,
            include_entry=request.include_entry,
            allow_network_mounts=request.allow_network_mounts,
        )
        watcher = _Watcher(sandbox)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                async for ev in events:
                    if ev.type == "start" and not started.done():
                        started.set_result(None)
                    elif (event := fs_event(ev)) is not None:
                        watcher.add(event)
                watcher.error = ConnectError(Code.NOT_FOUND, f"{path} was removed; the watcher ended")
            except SmartVMError as exc:
                watcher.error = to_connect(exc)
            finally:
                await events.aclose()
                if not started.done():
                    started.set_exception(watcher.error or ConnectError(Code.INTERNAL, "the watch ended"))

        watcher.task = asyncio.create_task(run())
        try:
            await started
        except BaseException:
            await _stop(watcher)
            raise
        watcher_id = uuid.uuid4().hex
        self._watchers[watcher_id] = watcher
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _watcher(self, watcher_id: str) -> _Watcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None or watcher.sandbox != b.current_request().sandbox_id:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found")
        return watcher

    async def get_watcher_events(
        self, request: pb.GetWatcherEventsRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.GetWatcherEventsResponse:
        watcher = self._watcher(request.watcher_id)
        events = watcher.take()
        if not events and watcher.error is not None:
            self._watchers.pop(request.watcher_id, None)
            raise watcher.error
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, request: pb.RemoveWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> pb.RemoveWatcherResponse:
        watcher = self._watcher(request.watcher_id)
        self._watchers.pop(request.watcher_id, None)
        await _stop(watcher)
        return pb.RemoveWatcherResponse()

    async def close(self) -> None:
        """Stop every watcher (the service is shutting down)."""
        watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:
            await _stop(watcher)

    def drop_ended(self, alive: Collection[str]) -> None:
        """Forget the ended watchers of sandboxes not in `alive` (gone without the face seeing it:
        killed over /v1, timed out); a watch still running may be of a sandbox started since `alive`
        was listed, so it stays."""
        for watcher_id, watcher in list(self._watchers.items()):
            if watcher.sandbox not in alive and watcher.task is not None and watcher.task.done():
                del self._watchers[watcher_id]

    async def forget(self, sandbox_id: str) -> None:
        """Stop the watchers of one sandbox (it is gone)."""
        for watcher_id, watcher in list(self._watchers.items()):
            if watcher.sandbox == sandbox_id:
                self._watchers.pop(watcher_id, None)
                await _stop(watcher)


async def _stop(watcher: _Watcher) -> None:
    if watcher.task is not None:
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task
