"""The SQLite files of smartvm's state (sandboxes, API keys), all opened one way.

The file lives in a private data dir and is created ``0600`` without following a symlink, so a
planted file (a symlink, another owner's file) is refused before SQLite touches it. One connection in
autocommit mode (callers run their own transactions), shared between threads behind the caller's
lock; WAL with ``synchronous=FULL``, so an acknowledged write survives a crash and another process
(``smartvm keys``) can read and write beside a running service. A store whose last writes may be lost
to a power cut (not to a crash of the process: WAL keeps those) asks for ``synchronous=NORMAL``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import check_private_file


def open_state_db(
    path: Path, what: str, setup: Callable[[sqlite3.Connection], object], *, fsync_each_commit: bool = True
) -> sqlite3.Connection:
    """``path`` (in a dir checked by ``ensure_private_dir``) opened, with ``setup`` (schema or
    migrations) run on it. A failure closes the connection again; SQLite's own errors become
    STATE_STORE_FAILED naming ``what``. Without ``fsync_each_commit`` a commit is in the WAL file
    (safe from a crash of the process) but reaches the disk only at the next checkpoint."""
    check_private_file(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a file made by an older smartvm under a looser umask
    finally:
        os.close(fd)
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if fsync_each_commit else 'NORMAL'}")
        setup(db)
        return db
    except BaseException as exc:
        if db is not None:
            db.close()
        if isinstance(exc, sqlite3.Error):
            raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"cannot open the {what} {path}: {exc}") from exc
        raise
