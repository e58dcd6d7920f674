"""envd access tokens: one random token per sandbox, in ``<data_dir>/e2b_tokens.db`` (SQLite).

Every envd request of the E2B SDK carries its sandbox's token (``X-Access-Token``) and the envd face
refuses any other, so the token is what keeps one sandbox's client out of another sandbox. A token
is issued when the sandbox is created over the E2B API, or at its first envd use when it was
created some other way (``/v1``, a script), so no sandbox is ever reachable without one. The token
is stored itself, not a hash: ``connect`` hands it out again, also after a restart of the service.
Lookups are served from memory (every envd request makes one); writes go to the store first.

The store does not fsync every commit (SQLite WAL, ``synchronous=NORMAL``): a token survives a crash
of the service, and only a power cut can lose the newest ones. That costs nobody access: the cut
also ends every running sandbox, and a paused one is reached again through ``connect``, which issues
a new token to a sandbox that has none. In exchange a token is stored in ~20 µs instead of ~0.4 ms
(an fsync), which the E2B ``Sandbox.create()`` answer waits for.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Collection
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.state_db import open_state_db

DB_FILE = "e2b_tokens.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS envd_tokens (
    sandbox_id TEXT PRIMARY KEY, token TEXT NOT NULL, created_at REAL NOT NULL
);
"""


def new_token() -> str:
    """256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


class AccessTokens:
    """The envd access tokens of one data dir. Thread-safe: one connection behind a lock."""

    def __init__(self, data_dir: Path) -> None:
        directory = ensure_private_dir(Path(data_dir))
        self.path = directory / DB_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = open_state_db(
            self.path, "envd token store", lambda db: db.executescript(_SCHEMA), fsync_each_commit=False
        )
        try:
            rows = self._db.execute("SELECT sandbox_id, token, created_at FROM envd_tokens").fetchall()
        except sqlite3.Error as exc:
            self._db.close()
            raise SmartVMError(
                ErrorCode.STATE_STORE_FAILED, f"cannot read the envd token store {self.path}: {exc}"
            ) from exc
        self._tokens: dict[str, str] = {sid: token for sid, token, _ in rows}
        self._issued: dict[str, float] = {sid: at for sid, _, at in rows}

    def __enter__(self) -> AccessTokens:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        if self._db is None:
            raise SmartVMError(ErrorCode.SERVICE_UNAVAILABLE, "the service is stopping: retry")
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"envd token store {self.path}: {exc}") from exc

    def get(self, sandbox_id: str) -> str | None:
        """The sandbox's token, if it has one (from memory: no I/O)."""
        return self._tokens.get(sandbox_id)

    def issue(self, sandbox_id: str, *, replace: bool = False) -> str:
        """The sandbox's token, made and stored first if it has none (or ``replace``)."""
        with self._lock:
            known = self._tokens.get(sandbox_id)
            if known is not None and not replace:
                return known
            token, now = new_token(), time.time()
            self._write(
                "INSERT OR REPLACE INTO envd_tokens (sandbox_id, token, created_at) VALUES (?, ?, ?)",
                (sandbox_id, token, now),
            )
            self._tokens[sandbox_id] = token
            self._issued[sandbox_id] = now
            return token

    def drop(self, sandbox_id: str) -> None:
        """Forget the token of a sandbox that is gone."""
        with self._lock:
            if self._tokens.pop(sandbox_id, None) is not None:
                self._issued.pop(sandbox_id, None)
                self._write("DELETE FROM envd_tokens WHERE sandbox_id = ?", (sandbox_id,))

    def keep_only(self, sandbox_ids: Collection[str], issued_before: float) -> int:
        """Forget the tokens issued before ``issued_before`` of sandboxes not in ``sandbox_ids`` (those
        that exist, as listed at that time: a token issued since is kept). Returns how many went."""
        with self._lock:
            gone = [sid for sid, at in self._issued.items() if at < issued_before and sid not in sandbox_ids]
            for sid in gone:
                self._write("DELETE FROM envd_tokens WHERE sandbox_id = ?", (sid,))
                self._tokens.pop(sid, None)
                self._issued.pop(sid, None)
            return len(gone)
