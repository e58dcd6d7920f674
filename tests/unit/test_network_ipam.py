"""Address leases: persistence across restarts, no double allocation across processes, dead owners."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.ipam import LeaseStore, process_start_time, read_leases


def test_lowest_free_index_release_and_reuse(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "a.json", 2, 6)
    assert [store.allocate(f"vm{i}").index for i in range(3)] == [2, 3, 4]
    assert store.release("vm1") is not None
    assert store.release("vm1") is None  # idempotent
    assert store.allocate("vm9").index == 3
    assert store.allocate("fixed", index=6).index == 6
    with pytest.raises(SmartVMError) as info:
        store.allocate("clash", index=6)
    assert info.value.code == ErrorCode.ADDRESS_EXHAUSTED


def test_duplicate_key_and_exhaustion(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "a.json", 0, 1)
    store.allocate("a")
    with pytest.raises(SmartVMError) as dup:
        store.allocate("a")
    assert dup.value.code == ErrorCode.DUPLICATE_VM_ID
    store.allocate("b")
    with pytest.raises(SmartVMError) as full:
        store.allocate("c")
    assert full.value.code == ErrorCode.ADDRESS_EXHAUSTED
    assert "sweep" in full.value.message


def test_leases_survive_a_restart_and_keep_meta(tmp_path: Path) -> None:
    path = tmp_path / "state" / "bridge.json"
    LeaseStore(path, 2, 10).allocate("vm-a", {"tap": "sv2-vma"})
    restarted = LeaseStore(path, 2, 10)
    lease = restarted.get("vm-a")
    assert lease is not None and lease.index == 2 and lease.meta == {"tap": "sv2-vma"}
    assert restarted.allocate("vm-b").index == 3
    assert restarted.update_meta("vm-b", {"ports": [1, 2]}).meta == {"ports": [1, 2]}
    assert [x.key for x in read_leases(path)] == ["vm-a", "vm-b"]
    assert not list(path.parent.glob("*.part"))  # written atomically, nothing half-written left
    assert json.loads(path.read_text())["version"] == 1


def test_unreadable_state_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("{not json")
    with pytest.raises(SmartVMError) as info:
        LeaseStore(path, 0, 9).allocate("x")
    assert info.value.code == ErrorCode.NETWORK_SETUP_FAILED
    assert path.read_text() == "{not json"


def test_concurrent_allocation_across_processes_never_shares_an_index(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    go = tmp_path / "go"
    worker = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from smartvm.host.ipam import LeaseStore
        store = LeaseStore(Path({str(path)!r}), 0, 99)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        got = [store.allocate(f"{{sys.argv[1]}}-{{i}}").index for i in range(25)]
        print(" ".join(map(str, got)))
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", worker, f"p{n}"], stdout=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    indices = [int(x) for out in outputs for x in out.split()]
    assert len(indices) == 100 and sorted(indices) == list(range(100))
    leases = read_leases(path)
    assert len(leases) == 100 and len({lease.index for lease in leases}) == 100
    with raises_code(ErrorCode.ADDRESS_EXHAUSTED):
        LeaseStore(path, 0, 99).allocate("one-more")


def test_leases_of_dead_owners_are_kept_until_released_by_a_sweep(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "a.json", 0, 9)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.allocate("theirs", owner_pid=child.pid)
        mine = store.allocate("mine")
        assert mine.owner_alive()
        assert store.dead_leases() == []
        assert not store.release_if_dead("theirs")
    finally:
        child.kill()
        child.wait()
    assert process_start_time(child.pid) is None
    assert [x.key for x in store.dead_leases()] == ["theirs"]
    assert store.allocate("next").index == 2  # a dead owner's index is not silently reused
    assert store.release_if_dead("theirs")
    assert not store.release_if_dead("mine")
    assert store.allocate("again").index == 0


def test_owner_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        LeaseStore(tmp_path / "a.json", 0, 9).allocate("x", owner_pid=2**22 + 12345)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT


def test_lease_writes_never_go_through_a_planted_temp_file(tmp_path: Path) -> None:
    """The lease file is replaced through a fresh temp file (host/atomic_write.py), never a fixed
    ``.part`` name that a stale file or symlink could occupy."""
    path = tmp_path / "state" / "bridge.json"
    LeaseStore(path, 2, 10).allocate("vm-a")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (path.parent / "bridge.json.part").symlink_to(victim)
    LeaseStore(path, 2, 10).allocate("vm-b")
    assert victim.read_text() == "untouched"
    assert [x.key for x in read_leases(path)] == ["vm-a", "vm-b"]
