"""One way to replace a small file atomically: a crash leaves the old content or the new, never a mix.

The temp file is a fresh, unpredictable name next to the target, created ``O_EXCL | O_NOFOLLOW``
with ``mode`` (so a planted file or symlink is never written through), then renamed over the target.
``durable=True`` also fsyncs the file before the rename and the directory after it (records that must
survive a power loss).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o600, durable: bool = False) -> Path:
    """Replace ``path`` with ``data``; the temp file is removed on any failure."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path
