"""The sandbox store on real SQLite files: CRUD, transitions + events, filters, lock, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import (
    MIGRATIONS,
    SandboxRecord,
    SandboxState,
    SandboxStore,
    SnapshotRecord,
    TemplateRecord,
    acquire_manager_lock,
    new_sandbox_id,
)

S = SandboxState


@pytest.fixture
def store(tmp_path: Path) -> SandboxStore:
    s = SandboxStore(tmp_path / "data")
    yield s  # type: ignore[misc]
    s.close()


def test_data_dir_private_and_schema_versioned(tmp_path: Path) -> None:
    with SandboxStore(tmp_path / "data") as s:
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert s.path.stat().st_mode & 0o777 == 0o600
    db = sqlite3.connect(tmp_path / "data" / "sandboxes.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(SmartVMError) as err:
        SandboxStore(tmp_path / "data")
    assert err.value.code == ErrorCode.STATE_STORE_FAILED and "newer" in err.value.message


def _open_fds_to(path: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == str(path):
                found.append(fd.name)
        except OSError:
            continue
    return found


def test_a_store_that_fails_to_open_keeps_no_connection(tmp_path: Path) -> None:
    SandboxStore(tmp_path / "data").close()
    db_file = tmp_path / "data" / "sandboxes.db"
    db = sqlite3.connect(db_file)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(SmartVMError) as err:
        SandboxStore(tmp_path / "data")
    assert err.value.code == ErrorCode.STATE_STORE_FAILED
    assert _open_fds_to(db_file) == []  # also while the error (and its frames) is still held


def test_a_planted_store_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.db"
    elsewhere.write_bytes(b"")
    elsewhere.chmod(0o644)
    (data / "sandboxes.db").symlink_to(elsewhere)
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        SandboxStore(data)
    assert elsewhere.read_bytes() == b"" and elsewhere.stat().st_mode & 0o777 == 0o644


def test_ids() -> None:
    ids = {new_sandbox_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 11 and i.startswith("sb-") and int(i[3:], 16) >= 0 and i == i.lower() for i in ids)


def test_template_and_snapshot_crud(store: SandboxStore) -> None:
    t = TemplateRecord("base", "/k", "/r", cpus=2, env={"A": "1"}, start_command="true", inputs_hash="h")
    store.put_template(t)
    assert store.get_template("base") == t
    store.put_template(TemplateRecord("base", "/k", "/r", status="ready", created_at=t.created_at))
    assert store.get_template("base").status == "ready"
    assert [x.name for x in store.list_templates()] == ["base"]
    store.delete_template("base")
    with pytest.raises(SmartVMError) as err:
        store.get_template("base")
    assert err.value.code == ErrorCode.TEMPLATE_NOT_FOUND
    snap = SnapshotRecord("s1", "sb-00000001", "/snap", 1234)
    store.put_snapshot(snap)
    assert store.get_snapshot("s1") == snap and store.list_snapshots() == [snap]
    store.delete_snapshot("s1")
    assert store.list_snapshots() == []
    with pytest.raises(SmartVMError) as err:
        store.get_snapshot("s1")
    assert err.value.code == ErrorCode.SNAPSHOT_NOT_FOUND


def test_sandbox_crud_transitions_and_events(store: SandboxStore, tmp_path: Path) -> None:
    sid = store.allocate_sandbox_id()
    rec = SandboxRecord(sid, "base", metadata={"k": "v"}, envs={"A": "1"}, end_at=5.0, auto_pause=True)
    store.insert_sandbox(rec)
    assert store.get_sandbox(sid) == rec
    with raises_code(ErrorCode.INVALID_ARGUMENT):
        store.insert_sandbox(rec)
    store.transition(sid, S.RUNNING, expect=S.STARTING)
    updated = store.update_sandbox(sid, vm_id="vm1", network_slot=3, end_at=9.0)
    assert updated.vm_id == "vm1" and updated.state is S.RUNNING
    with pytest.raises(SmartVMError) as err:
        store.transition(sid, S.RESUMING)  # running -> resuming is not a move
    assert err.value.code == ErrorCode.INVALID_SANDBOX_TRANSITION
    with raises_code(ErrorCode.INVALID_SANDBOX_TRANSITION):
        store.transition(sid, S.PAUSING, expect=S.PAUSED)  # stale expectation
    store.transition(sid, S.PAUSING)
    store.transition(sid, S.PAUSED)
    store.transition(sid, S.ERROR, error="disk full")
    assert store.get_sandbox(sid).error == "disk full"
    kinds = [(e.kind, e.detail) for e in store.events(sid)]
    assert kinds[0][0] == "created"
    assert [d for k, d in kinds if k == "state"] == [
        "starting -> running",
        "running -> pausing",
        "pausing -> paused",
        "paused -> error: disk full",
    ]
    # a second connection (a new process after a restart) sees all of it
    with SandboxStore(tmp_path / "data") as other:
        assert other.get_sandbox(sid).state is S.ERROR and other.get_sandbox(sid).vm_id == "vm1"
    store.delete_sandbox(sid)
    with pytest.raises(SmartVMError) as err:
        store.get_sandbox(sid)
    assert err.value.code == ErrorCode.SANDBOX_NOT_FOUND


def test_list_filters(store: SandboxStore) -> None:
    a, b, c = (store.allocate_sandbox_id() for _ in range(3))
    store.insert_sandbox(SandboxRecord(a, "base", metadata={"team": "x", "env": "ci"}, created_at=1))
    store.insert_sandbox(SandboxRecord(b, "base", metadata={"team": "x"}, created_at=2))
    store.insert_sandbox(SandboxRecord(c, "other", metadata={"team": "y"}, created_at=3))
    store.transition(b, S.RUNNING)
    assert [r.id for r in store.list_sandboxes()] == [a, b, c]
    assert [r.id for r in store.list_sandboxes(states=[S.RUNNING])] == [b]
    assert [r.id for r in store.list_sandboxes(metadata={"team": "x"})] == [a, b]
    assert [r.id for r in store.list_sandboxes(metadata={"team": "x", "env": "ci"})] == [a]
    assert store.list_sandboxes(states=[S.STARTING], metadata={"team": "y"})[0].id == c
    assert store.list_sandboxes(states=[]) == []
    assert store.count_by_state() == {"starting": 2, "running": 1}


async def test_async_call(store: SandboxStore) -> None:
    sid = await store.call(store.allocate_sandbox_id)
    await store.call(store.insert_sandbox, SandboxRecord(sid, "base"))
    rec = await store.call(store.transition, sid, S.RUNNING)
    assert rec.state is S.RUNNING


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from smartvm.sandbox.store import acquire_manager_lock
lock = acquire_manager_lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_manager_lock_refused_from_second_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(SmartVMError) as err:
            acquire_manager_lock(data)
        assert err.value.code == ErrorCode.DATA_DIR_IN_USE
        assert f"pid {proc.pid}" in err.value.message
    finally:
        proc.kill()
        proc.wait()
    # the holder died: the lock is free again, but a second holder in this process is refused
    with acquire_manager_lock(data), raises_code(ErrorCode.DATA_DIR_IN_USE):
        acquire_manager_lock(data)
    acquire_manager_lock(data).release()


_WRITER = """
import sys
from pathlib import Path
from smartvm.sandbox.store import SandboxRecord, SandboxStore
store = SandboxStore(Path(sys.argv[1]))
i = 0
while True:
    sid = f"sb-{i:08x}"
    store.insert_sandbox(SandboxRecord(sid, "base", metadata={"pad": "x" * 4000}))
    store.transition(sid, "running")
    if i == 20:
        print("writing", flush=True)
    i += 1
"""


def test_sigkill_mid_write_leaves_readable_db(tmp_path: Path) -> None:
    data = tmp_path / "data"
    SandboxStore(data).close()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(data)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with SandboxStore(data) as store:
        recs = store.list_sandboxes()
        assert len(recs) > 20
        # every acknowledged insert+transition pair is whole; at most the last one is half done
        assert sum(1 for r in recs if r.state is S.STARTING) <= 1
        for r in recs:
            assert r.metadata == {"pad": "x" * 4000}
    db = sqlite3.connect(data / "sandboxes.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
