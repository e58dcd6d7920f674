"""API keys of the service, stored hashed in ``<data_dir>/api_keys.db`` (SQLite, beside the sandbox state).

A key is ``svm_`` + 8 public id characters (48 random bits) + 43 secret characters (256 random
bits, both from :func:`secrets.token_urlsafe`). The store keeps the public prefix (``svm_`` + id, to
find the row and to show in ``keys list``) and the SHA-256 of the whole key, never the key itself.
A fast hash is enough here: salted slow hashes (bcrypt, scrypt) protect low-entropy passwords
against guessing, and nobody can guess 256 random bits, so the SHA-256 in a stolen database reveals
nothing usable while a check costs microseconds per request. The stored hash is compared with
:func:`hmac.compare_digest`, and an unknown prefix is compared against a dummy hash, so response
time tells nothing about a near miss.

Revoking marks the row (kept for the audit trail) and takes effect on the next request: every check
reads the database, so ``smartvm keys revoke`` in another process needs no restart of the service.
``last_used_at`` is written at most once per :data:`LAST_USED_RESOLUTION_S` per key, so that a busy
client does not turn every request into a synchronous disk write.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.state_db import open_state_db

DB_FILE = "api_keys.db"
KEY_PREFIX = "svm_"
ID_CHARS = 8
LAST_USED_RESOLUTION_S = 60.0
_KEY = re.compile(rf"^{KEY_PREFIX}[A-Za-z0-9_-]{{{ID_CHARS}}}[A-Za-z0-9_-]{{43}}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    prefix TEXT PRIMARY KEY, name TEXT NOT NULL, key_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL, last_used_at REAL, revoked_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_name ON api_keys(name) WHERE revoked_at IS NULL;
"""


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key (never the key itself)."""

    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + ID_CHARS]


class KeyStore:
    """The API keys of one data dir. Thread-safe: one connection behind a lock."""

    def __init__(self, data_dir: Path) -> None:
        self.path = ensure_private_dir(Path(data_dir)) / DB_FILE
        self._lock = threading.Lock()
        self._last_written: dict[str, float] = {}
        self._db = open_state_db(self.path, "API key store", lambda db: db.executescript(_SCHEMA))

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.IntegrityError as exc:
                raise SmartVMError(
                    ErrorCode.INVALID_ARGUMENT, f"an active API key is already named like that: {exc}"
                ) from exc
            except sqlite3.Error as exc:
                raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"API key store {self.path}: {exc}") from exc

    def create(self, name: str | None = None) -> tuple[str, ApiKey]:
        """A new key and its record. The key is returned once and cannot be recovered later."""
        for _ in range(10):
            key = KEY_PREFIX + secrets.token_urlsafe(6) + secrets.token_urlsafe(32)  # 8 + 43 characters
            if not self._run("SELECT 1 FROM api_keys WHERE prefix = ?", (key_prefix(key),)):
                break
        else:  # pragma: no cover - 48 random bits of id collide ten times in a row
            raise SmartVMError(ErrorCode.STATE_STORE_FAILED, "could not find a free API key id")
        prefix = key_prefix(key)
        label = name if name is not None else f"key-{prefix[len(KEY_PREFIX) :]}"
        if not _NAME.match(label):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"key name {label!r}: use 1-64 letters, digits, '.', '_' or '-' (a letter or digit first)",
            )
        now = time.time()
        self._run(
            "INSERT INTO api_keys (prefix, name, key_sha256, created_at) VALUES (?, ?, ?, ?)",
            (prefix, label, hash_key(key), now),
        )
        return key, ApiKey(label, prefix, now, None, None)

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        return [_record(r) for r in self._run(sql + " ORDER BY created_at")]

    def revoke(self, name_or_prefix: str) -> ApiKey:
        """Revoke the active key with this name or prefix; API_KEY_NOT_FOUND when there is none."""
        rows = self._run(
            "SELECT * FROM api_keys WHERE revoked_at IS NULL AND (name = ? OR prefix = ?)",
            (name_or_prefix, name_or_prefix),
        )
        if not rows:
            raise SmartVMError(
                ErrorCode.API_KEY_NOT_FOUND,
                f"no active API key named {name_or_prefix!r}: `smartvm keys list` shows names and prefixes",
            )
        now = time.time()
        self._run("UPDATE api_keys SET revoked_at = ? WHERE prefix = ?", (now, rows[0]["prefix"]))
        return _record(rows[0], revoked_at=now)

    def verify(self, key: str | None) -> ApiKey | None:
        """The active key record matching ``key``, else None (missing, malformed, unknown or revoked)."""
        if not key or not _KEY.match(key):
            return None
        rows = self._run("SELECT * FROM api_keys WHERE prefix = ?", (key_prefix(key),))
        stored = rows[0]["key_sha256"] if rows else _DUMMY_HASH
        matches = hmac.compare_digest(stored, hash_key(key))
        if not rows or not matches or rows[0]["revoked_at"] is not None:
            return None
        rec = _record(rows[0])
        self._touch(rec.prefix)
        return rec

    def writes_on_verify(self, key: str | None) -> bool:
        """Whether :meth:`verify` of ``key`` now may write (its last use is due): an event loop runs
        such a check in a thread and every other one inline (a read costs microseconds)."""
        if not key or not _KEY.match(key):
            return False
        return time.time() - self._last_written.get(key_prefix(key), 0.0) >= LAST_USED_RESOLUTION_S

    def _touch(self, prefix: str) -> None:
        now = time.time()
        if now - self._last_written.get(prefix, 0.0) < LAST_USED_RESOLUTION_S:
            return
        self._last_written[prefix] = now
        self._run("UPDATE api_keys SET last_used_at = ? WHERE prefix = ?", (now, prefix))


def _record(row: sqlite3.Row, revoked_at: float | None = None) -> ApiKey:
    return ApiKey(
        name=row["name"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=revoked_at if revoked_at is not None else row["revoked_at"],
    )
