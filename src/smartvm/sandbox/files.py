"""Files in a sandbox: what the guest agent offers, with the sandbox user's conventions.

Relative paths are taken from the user's home (``/home/user``); files and directories a call
creates belong to the sandbox user unless another owner is given (the agent itself runs as root).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from smartvm.agent.client import DEFAULT_DOWNLOAD_LIMIT, DEFAULT_READ_LIMIT, FileInfo
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.settings import DEFAULT_HOME, DEFAULT_USER

if TYPE_CHECKING:
    from smartvm.vm import MicroVM

VMGetter = Callable[[], Awaitable["MicroVM"]]


def guest_path(path: str, home: str = DEFAULT_HOME) -> str:
    """An absolute, normalised guest path (relative ones are under ``home``)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"bad guest path {path!r}")
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(home, path))


class SandboxFiles:
    """``sandbox.files``: read, write, list and change guest files."""

    def __init__(self, vm: VMGetter, owner: str | int = DEFAULT_USER) -> None:
        self._vm = vm
        self._owner = owner

    async def read(self, path: str, *, max_bytes: int = DEFAULT_READ_LIMIT) -> bytes:
        vm = await self._vm()
        return await vm.files.read(guest_path(path), max_bytes=max_bytes)

    async def read_text(self, path: str, *, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding, errors="replace")

    async def read_stream(
        self, path: str, *, max_bytes: int = DEFAULT_DOWNLOAD_LIMIT
    ) -> AsyncIterator[bytes]:
        """The file's bytes in chunks as they arrive (never held whole in memory)."""
        vm = await self._vm()
        async with contextlib.aclosing(vm.files.read_stream(guest_path(path), max_bytes=max_bytes)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def write(
        self, path: str, data: bytes | str, *, mode: int | None = None, owner: str | int | None = None
    ) -> FileInfo:
        """Write ``data`` (replacing the file atomically); parent directories are created."""
        vm = await self._vm()
        target = guest_path(path)
        await vm.files.write(target, data, mode=mode, owner=self._owner if owner is None else owner)
        return await vm.files.stat(target)

    async def write_stream(
        self, path: str, chunks: AsyncIterable[bytes], *, mode: int | None = None
    ) -> FileInfo:
        """Write the bytes ``chunks`` yields (e.g. an HTTP upload) as they arrive, atomically."""
        vm = await self._vm()
        target = guest_path(path)
        await vm.files.write_stream(target, chunks, mode=mode, owner=self._owner)
        return await vm.files.stat(target)

    async def upload(self, local: str | os.PathLike[str], path: str, *, mode: int | None = None) -> FileInfo:
        """Stream a host file into the guest."""
        vm = await self._vm()
        target = guest_path(path)
        await vm.files.upload(local, target, mode=mode, owner=self._owner)
        return await vm.files.stat(target)

    async def download(self, path: str, local: str | os.PathLike[str]) -> int:
        """Stream a guest file to the host path ``local`` (decided by the caller only)."""
        vm = await self._vm()
        return await vm.files.download(guest_path(path), local)

    async def list(self, path: str = DEFAULT_HOME) -> list[FileInfo]:
        vm = await self._vm()
        return await vm.files.list(guest_path(path))

    async def stat(self, path: str) -> FileInfo:
        vm = await self._vm()
        return await vm.files.stat(guest_path(path))

    async def exists(self, path: str) -> bool:
        vm = await self._vm()
        return await vm.files.exists(guest_path(path))

    async def make_dir(self, path: str, *, mode: int = 0o755) -> FileInfo:
        vm = await self._vm()
        return await vm.files.mkdir(guest_path(path), mode=mode, owner=self._owner)

    async def remove(self, path: str, *, recursive: bool = True) -> bool:
        vm = await self._vm()
        return await vm.files.remove(guest_path(path), recursive=recursive, missing_ok=True)

    async def rename(self, src: str, dst: str) -> FileInfo:
        vm = await self._vm()
        target = guest_path(dst)
        await vm.files.rename(guest_path(src), target)
        return await vm.files.stat(target)
