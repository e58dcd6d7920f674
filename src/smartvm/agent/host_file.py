"""Host files written from guest data, without letting the guest choose anything about them.

The guest decides only the bytes. The path comes from the caller; the temp file is a fresh,
unpredictable name in the destination's directory, created ``O_EXCL | O_NOFOLLOW`` with mode 0600
(a planted file or symlink there is never opened or followed); the final mode is set with ``fchmod``
on the open descriptor (never by path, so never through a symlink) and never carries setuid, setgid
or sticky bits; then the temp file is renamed over the destination (a symlink there is replaced,
not followed). Any failure removes the temp file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from types import TracebackType

from smartvm.errors import ErrorCode, SmartVMError

#: permission bits a file written from guest data may carry: no setuid, setgid or sticky bit
PERMISSION_BITS = 0o777


def host_file_error(path: str | os.PathLike[str], exc: OSError) -> SmartVMError:
    """HOST_FILE_ERROR for a failed host write, naming the file and the usual fixes."""
    return SmartVMError(
        ErrorCode.HOST_FILE_ERROR,
        f"cannot write {os.fspath(path)} on the host: {exc.strerror or exc}; check that its directory "
        "exists, is writable and has free space",
    )


class HostFileWriter:
    """Writes ``dest`` atomically: ``write`` the bytes, then ``commit(mode)``; leaving early discards.

    Use as a context manager: an exception (or a missing ``commit``) removes the temp file.
    """

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        if self.dest.name in ("", ".", ".."):
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{self.dest} does not name a file")
        self.size = 0
        self._dir_fd = -1
        self._fd = -1
        self._tmp = f".{self.dest.name[:64]}.{secrets.token_hex(8)}.part"
        self._created = False  # only a temp file this writer created is ever removed

    def __enter__(self) -> HostFileWriter:
        try:
            self._dir_fd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(self._tmp, flags, 0o600, dir_fd=self._dir_fd)
            self._created = True
        except OSError as exc:
            self._close()
            raise host_file_error(self.dest, exc) from None
        return self

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise host_file_error(self.dest, exc) from None
        self.size += len(data)

    def commit(self, mode: int) -> None:
        """Flush, set ``mode`` (special bits dropped) on the descriptor, rename over ``dest``."""
        try:
            os.fchmod(self._fd, mode & PERMISSION_BITS)
            os.fsync(self._fd)
            os.rename(self._tmp, self.dest.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            raise host_file_error(self.dest, exc) from None
        self._created = False  # renamed: nothing left to remove

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            if self._created:
                self._created = False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp, dir_fd=self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = -1
