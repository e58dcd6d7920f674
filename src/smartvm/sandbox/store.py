"""Durable sandbox state in SQLite: templates, sandboxes, snapshots and an event log.

Concurrency: one ``sqlite3`` connection per store, opened with ``check_same_thread=False`` and
guarded by a ``threading.Lock``; every public method takes the lock, runs one transaction and
commits before it returns (``synchronous=FULL`` in WAL mode, so an acknowledged change survives a
crash). Async code calls the methods through :meth:`SandboxStore.call` (``asyncio.to_thread``):
the event loop never blocks on disk, and the lock serialises the worker threads. One connection
keeps transactions simple; the manager's write rate (a few per sandbox operation) is far below
what it can do.

One manager per data dir: :func:`acquire_manager_lock` holds an ``flock`` on
``<data_dir>/manager.lock`` for the manager's lifetime; a second holder gets DATA_DIR_IN_USE.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.state_db import open_state_db

DB_FILE = "sandboxes.db"
LOCK_FILE = "manager.lock"
P = ParamSpec("P")
T = TypeVar("T")


class SandboxState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


S = SandboxState
# Allowed moves. Any state may go to ERROR; STOPPED is final.
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.STARTING: frozenset({S.RUNNING, S.STOPPING}),
    S.RUNNING: frozenset({S.PAUSING, S.STOPPING}),
    S.PAUSING: frozenset({S.PAUSED, S.RUNNING, S.STOPPING}),
    S.PAUSED: frozenset({S.RESUMING, S.STOPPING}),
    S.RESUMING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
    S.ERROR: frozenset({S.STOPPING}),
}


def can_transition(old: SandboxState, new: SandboxState) -> bool:
    return new in TRANSITIONS[old] or (new is S.ERROR and old is not S.STOPPED)


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    kernel: str
    rootfs: str
    cpus: int = 1
    memory_mib: int = 256
    env: Mapping[str, str] = field(default_factory=dict)
    start_command: str | None = None
    user: str = "user"
    snapshot_dir: str | None = None
    inputs_hash: str = ""
    status: str = "pending"  # pending, building, ready, failed
    created_at: float = field(default_factory=time.time)
    kind: str = "image"  # image: built from kernel + rootfs; snapshot: taken from a sandbox
    boot_args: str = ""
    ready_command: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    template: str
    state: SandboxState = S.STARTING
    error: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    envs: Mapping[str, str] = field(default_factory=dict)
    cpus: int = 1
    memory_mib: int = 256
    created_at: float = field(default_factory=time.time)
    end_at: float = 0.0
    auto_pause: bool = False
    engine: str = ""
    vm_id: str | None = None
    network_slot: int | None = None
    disk_path: str | None = None
    disk_strategy: str | None = None
    disk_layer: str | None = None  # CowLayer.to_json(), to reopen the disk after a pause/restart
    pause_dir: str | None = None
    network: Mapping[str, Any] = field(default_factory=dict)  # slot lease key, egress, port forwards


@dataclass(frozen=True)
class SnapshotRecord:
    name: str
    source_sandbox: str | None
    dir: str
    size_bytes: int = 0
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EventRecord:
    sandbox_id: str
    time: float
    kind: str
    detail: str


_JSON_FIELDS = {"env", "metadata", "envs", "network"}

# Each entry moves the schema one version up; never edit a shipped one, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE templates (
        name TEXT PRIMARY KEY, kernel TEXT NOT NULL, rootfs TEXT NOT NULL,
        cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL, env TEXT NOT NULL,
        start_command TEXT, user TEXT NOT NULL, snapshot_dir TEXT, inputs_hash TEXT NOT NULL,
        status TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY, template TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
        metadata TEXT NOT NULL, envs TEXT NOT NULL, cpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL,
        created_at REAL NOT NULL, end_at REAL NOT NULL, auto_pause INTEGER NOT NULL, engine TEXT NOT NULL,
        vm_id TEXT, network_slot INTEGER, disk_path TEXT, disk_strategy TEXT, disk_layer TEXT,
        pause_dir TEXT
    );
    CREATE INDEX sandboxes_state ON sandboxes(state);
    CREATE TABLE snapshots (
        name TEXT PRIMARY KEY, source_sandbox TEXT, dir TEXT NOT NULL, size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, sandbox_id TEXT NOT NULL, time REAL NOT NULL,
        kind TEXT NOT NULL, detail TEXT NOT NULL
    );
    CREATE INDEX events_sandbox ON events(sandbox_id, seq);
    """,
    """
    ALTER TABLE templates ADD COLUMN kind TEXT NOT NULL DEFAULT 'image';
    ALTER TABLE templates ADD COLUMN boot_args TEXT NOT NULL DEFAULT '';
    ALTER TABLE templates ADD COLUMN ready_command TEXT;
    ALTER TABLE templates ADD COLUMN error TEXT;
    ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT '{}';
    """,
]


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(4)


def _to_row(rec: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for f in fields(rec):
        v = getattr(rec, f.name)
        row[f.name] = json.dumps(dict(v), sort_keys=True) if f.name in _JSON_FIELDS else v
        if isinstance(v, bool):
            row[f.name] = int(v)
        elif isinstance(v, StrEnum):
            row[f.name] = v.value
    return row


def _from_row(cls: type[T], row: sqlite3.Row) -> T:
    values: dict[str, Any] = {}
    present = set(row.keys())
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in present:
            continue
        v = row[f.name]
        if f.name in _JSON_FIELDS:
            v = json.loads(v)
        elif f.name == "auto_pause":
            v = bool(v)
        elif f.name == "state":
            v = SandboxState(v)
        values[f.name] = v
    return cls(**values)


def _not_found(code: ErrorCode, what: str, name: str) -> SmartVMError:
    return SmartVMError(code, f"no {what} named {name!r}: list them to see which exist")


class SandboxStore:
    """The SQLite store under ``<data_dir>/sandboxes.db``. Close it (or use ``with``) when done."""

    def __init__(self, data_dir: Path) -> None:
        self.path = ensure_private_dir(Path(data_dir)) / DB_FILE
        self._lock = threading.Lock()
        self._db = open_state_db(self.path, "sandbox store", self._migrate)

    def __enter__(self) -> SandboxStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store method in a worker thread (``await store.call(store.get_sandbox, sid)``)."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise SmartVMError(
                ErrorCode.STATE_STORE_FAILED,
                f"{self.path} has schema version {version}, newer than this smartvm knows "
                f"({len(MIGRATIONS)}): upgrade smartvm or use another data dir",
            )
        for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
            db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {i}; COMMIT;")

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one immediate transaction, committed before returning."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"sandbox store {self.path}: {exc}") from exc

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, tuple(args)))
            except sqlite3.Error as exc:
                raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"sandbox store {self.path}: {exc}") from exc

    @staticmethod
    def _upsert(db: sqlite3.Connection, table: str, key: str, row: Mapping[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        updates = ", ".join(f"{c}=excluded.{c}" for c in row if c != key)
        db.execute(
            f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT({key}) DO UPDATE SET {updates}", row
        )

    @staticmethod
    def _event(db: sqlite3.Connection, sandbox_id: str, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO events (sandbox_id, time, kind, detail) VALUES (?, ?, ?, ?)",
            (sandbox_id, time.time(), kind, detail),
        )

    # templates
    def put_template(self, rec: TemplateRecord) -> None:
        self._tx(lambda db: self._upsert(db, "templates", "name", _to_row(rec)))

    def get_template(self, name: str) -> TemplateRecord:
        rows = self._query("SELECT * FROM templates WHERE name = ?", (name,))
        if not rows:
            raise _not_found(ErrorCode.TEMPLATE_NOT_FOUND, "template", name)
        return _from_row(TemplateRecord, rows[0])

    def list_templates(self) -> list[TemplateRecord]:
        return [_from_row(TemplateRecord, r) for r in self._query("SELECT * FROM templates ORDER BY name")]

    def delete_template(self, name: str) -> None:
        self._tx(lambda db: db.execute("DELETE FROM templates WHERE name = ?", (name,)))

    # sandboxes
    def insert_sandbox(self, rec: SandboxRecord) -> None:
        """Record a new sandbox (refused if the id exists) with a ``created`` event."""

        def run(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (rec.id,)).fetchone():
                raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"sandbox {rec.id} already exists")
            row = _to_row(rec)
            db.execute(
                f"INSERT INTO sandboxes ({', '.join(row)}) VALUES ({', '.join(':' + c for c in row)})", row
            )
            self._event(db, rec.id, "created", f"template={rec.template} state={rec.state}")

        self._tx(run)

    def allocate_sandbox_id(self) -> str:
        """A fresh ``sb-xxxxxxxx`` not used by any sandbox in the store (past or present)."""
        for _ in range(100):
            sid = new_sandbox_id()
            if not self._query("SELECT 1 FROM sandboxes WHERE id = ?", (sid,)):
                return sid
        raise SmartVMError(
            ErrorCode.STATE_STORE_FAILED, "could not find a free sandbox id"
        )  # pragma: no cover

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        rows = self._query("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,))
        if not rows:
            raise _not_found(ErrorCode.SANDBOX_NOT_FOUND, "sandbox", sandbox_id)
        return _from_row(SandboxRecord, rows[0])

    def update_sandbox(self, sandbox_id: str, **changes: Any) -> SandboxRecord:
        """Change fields other than ``state`` (use :meth:`transition` for that)."""
        if "state" in changes or "id" in changes:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "use transition() to change a sandbox's state")

        def run(db: sqlite3.Connection) -> SandboxRecord:
            row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            if row is None:
                raise _not_found(ErrorCode.SANDBOX_NOT_FOUND, "sandbox", sandbox_id)
            return self._apply_changes(db, _from_row(SandboxRecord, row), changes)

        return self._tx(run)

    def _apply_changes(
        self, db: sqlite3.Connection, old: SandboxRecord, changes: dict[str, Any]
    ) -> SandboxRecord:
        if "state" in changes or "id" in changes:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, "use transition() to change a sandbox's state")
        try:
            new = SandboxRecord(**{**{f.name: getattr(old, f.name) for f in fields(old)}, **changes})
        except TypeError as exc:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"bad sandbox field: {exc}") from exc
        self._upsert(db, "sandboxes", "id", _to_row(new))
        return new

    def transition(
        self,
        sandbox_id: str,
        new: SandboxState,
        *,
        expect: SandboxState | Iterable[SandboxState] | None = None,
        error: str | None = None,
        detail: str = "",
        changes: Mapping[str, Any] | None = None,
    ) -> SandboxRecord:
        """Move a sandbox to ``new`` and log a ``state`` event, in one transaction (with ``changes``
        to other fields, as :meth:`update_sandbox` makes them).

        ``expect`` (a state or several) guards against a concurrent change; an illegal move raises
        INVALID_SANDBOX_TRANSITION and changes nothing. ``error`` is recorded with ERROR.
        """
        new = SandboxState(new)
        wanted = {expect} if isinstance(expect, SandboxState) else set(expect) if expect is not None else None

        def run(db: sqlite3.Connection) -> SandboxRecord:
            row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            if row is None:
                raise _not_found(ErrorCode.SANDBOX_NOT_FOUND, "sandbox", sandbox_id)
            old = SandboxState(row["state"])
            if (wanted is not None and old not in wanted) or not can_transition(old, new):
                raise SmartVMError(
                    ErrorCode.INVALID_SANDBOX_TRANSITION,
                    f"sandbox {sandbox_id} is {old}, it cannot become {new}",
                )
            reason = error if new is S.ERROR else None
            if changes:
                self._apply_changes(db, _from_row(SandboxRecord, row), dict(changes))
            db.execute(
                "UPDATE sandboxes SET state = ?, error = ? WHERE id = ?", (new.value, reason, sandbox_id)
            )
            self._event(
                db,
                sandbox_id,
                "state",
                f"{old} -> {new}" + (f": {detail or reason}" if detail or reason else ""),
            )
            return _from_row(
                SandboxRecord, db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            )

        return self._tx(run)

    def list_sandboxes(
        self,
        *,
        states: Iterable[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[SandboxRecord]:
        """Sandboxes in any of ``states`` whose metadata contains every ``metadata`` pair, oldest first."""
        sql, args = "SELECT * FROM sandboxes", []
        if states is not None:
            chosen = [SandboxState(s).value for s in states]
            if not chosen:
                return []
            sql += f" WHERE state IN ({', '.join('?' * len(chosen))})"
            args += chosen
        recs = [_from_row(SandboxRecord, r) for r in self._query(sql + " ORDER BY created_at, id", args)]
        want = dict(metadata or {})
        return [r for r in recs if all(r.metadata.get(k) == v for k, v in want.items())]

    def count_by_state(self) -> dict[str, int]:
        """How many sandboxes are in each state (by value; stopped ones too), without reading them."""
        rows = self._query("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox (its events stay, for the audit trail)."""

        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            self._event(db, sandbox_id, "deleted", "")

        self._tx(run)

    def add_event(self, sandbox_id: str, kind: str, detail: str = "") -> None:
        self._tx(lambda db: self._event(db, sandbox_id, kind, detail))

    def events(self, sandbox_id: str) -> list[EventRecord]:
        rows = self._query(
            "SELECT sandbox_id, time, kind, detail FROM events WHERE sandbox_id = ? ORDER BY seq",
            (sandbox_id,),
        )
        return [_from_row(EventRecord, r) for r in rows]

    # snapshots
    def put_snapshot(self, rec: SnapshotRecord) -> None:
        self._tx(lambda db: self._upsert(db, "snapshots", "name", _to_row(rec)))

    def get_snapshot(self, name: str) -> SnapshotRecord:
        rows = self._query("SELECT * FROM snapshots WHERE name = ?", (name,))
        if not rows:
            raise _not_found(ErrorCode.SNAPSHOT_NOT_FOUND, "snapshot", name)
        return _from_row(SnapshotRecord, rows[0])

    def list_snapshots(self) -> list[SnapshotRecord]:
        return [
            _from_row(SnapshotRecord, r) for r in self._query("SELECT * FROM snapshots ORDER BY created_at")
        ]

    def delete_snapshot(self, name: str) -> None:
        self._tx(lambda db: db.execute("DELETE FROM snapshots WHERE name = ?", (name,)))


class ManagerLock:
    """An exclusive ``flock`` on ``<data_dir>/manager.lock``; released by :meth:`release` or exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

    def __enter__(self) -> ManagerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_manager_lock(data_dir: Path) -> ManagerLock:
    """Become the one manager of ``data_dir``, or raise DATA_DIR_IN_USE naming the holder's pid."""
    path = ensure_private_dir(Path(data_dir)) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise SmartVMError(ErrorCode.STATE_STORE_FAILED, f"cannot lock {path}: {exc.strerror}") from exc
        raise SmartVMError(
            ErrorCode.DATA_DIR_IN_USE,
            f"data dir {data_dir} is in use by another sandbox manager (pid {holder}): "
            "stop it or use another data dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return ManagerLock(path, fd)
