"""Copy-on-write file copies: a reflink where the filesystem allows it, else a sparse-aware copy.

Staging a 1 GiB root filesystem must not cost a full copy: FICLONE shares every block
(btrfs, xfs); the fallback copies only the data extents (SEEK_DATA/SEEK_HOLE) so holes stay holes.
The source is only ever opened read-only.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from smartvm.errors import ErrorCode, SmartVMError

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
_CHUNK = 1 << 20

CloneMethod = Literal["reflink", "sparse-copy"]


def _try_reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in (
            errno.EOPNOTSUPP,
            errno.ENOTTY,
            errno.EXDEV,
            errno.EINVAL,
            errno.ENOSYS,
            errno.EPERM,
        ):
            return False
        raise
    return True


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of every data region; the whole file if SEEK_DATA is not supported."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)]
        raise
    return extents


def _sparse_copy(src_fd: int, dst_fd: int, size: int) -> None:
    for start, end in _data_extents(src_fd, size):
        pos = start
        while pos < end:
            n = min(_CHUNK, end - pos)
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                copied = os.pwrite(dst_fd, os.pread(src_fd, n, pos), pos)
            if copied <= 0:
                raise OSError(errno.EIO, f"short copy at offset {pos}")
            pos += copied
    os.ftruncate(dst_fd, size)


def clone_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, mode: int | None = None
) -> CloneMethod:
    """Copy ``src`` to ``dst`` without writing ``src`` and without filling holes.

    ``dst`` must not exist; on any failure it is removed. Returns the method used.
    """
    src_path, dst_path = Path(src), Path(dst)
    try:
        src_fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.STAGING_FAILED, f"cannot open {src_path} for copying: {exc.strerror}"
        ) from exc
    try:
        st = os.fstat(src_fd)
        try:
            dst_fd = os.open(
                dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode or (st.st_mode & 0o777)
            )
        except OSError as exc:
            raise SmartVMError(ErrorCode.STAGING_FAILED, f"cannot create {dst_path}: {exc.strerror}") from exc
        try:
            method: CloneMethod = "reflink" if _try_reflink(src_fd, dst_fd) else "sparse-copy"
            if method == "sparse-copy":
                _sparse_copy(src_fd, dst_fd, st.st_size)
        except BaseException as exc:
            os.close(dst_fd)
            dst_path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SmartVMError(
                    ErrorCode.STAGING_FAILED,
                    f"copying {src_path} to {dst_path} failed: {exc.strerror or exc}",
                ) from exc
            raise
        os.close(dst_fd)
        return method
    finally:
        os.close(src_fd)


def allocated_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the file really occupies on disk (holes excluded)."""
    return os.stat(path).st_blocks * 512


def apply_sparse_diffs(
    base: str | os.PathLike[str], diffs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> None:
    """Write ``out`` = ``base`` with the data regions of each sparse file in ``diffs`` laid over it, in order.

    A Firecracker Diff snapshot's memory file holds only the pages dirtied since the previous
    snapshot, at their offsets, with holes elsewhere; laying a chain of them over the Full snapshot's
    memory gives the full memory at the time of the last Diff. The inputs are only read; ``out`` is
    removed again if anything fails.
    """
    clone_file(base, out)
    try:
        with open(out, "r+b") as out_f:
            for diff in diffs:
                with open(diff, "rb") as diff_f:
                    size = os.fstat(diff_f.fileno()).st_size
                    if size > os.fstat(out_f.fileno()).st_size:
                        raise SmartVMError(
                            ErrorCode.SNAPSHOT_MISMATCH,
                            f"diff memory file {diff} is larger than its base {base}: "
                            "they are not from one VM",
                        )
                    for start, end in _data_extents(diff_f.fileno(), size):
                        pos = start
                        while pos < end:
                            n = min(_CHUNK, end - pos)
                            os.pwrite(out_f.fileno(), os.pread(diff_f.fileno(), n, pos), pos)
                            pos += n
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
