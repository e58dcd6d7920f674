"""Directories another local user planted are refused: data dir, runtime dirs, records, downloaded binaries.

"Another user" is uid 65534 (nobody): planted directories and files are chown'ed to it, or made
group/other-writable, exactly what an unprivileged user can do under /tmp and /dev/shm.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.binary import find_firecracker
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.host.process import running_start_time
from smartvm.host.runtime import VMRuntime
from smartvm.host.sweep import hand_to_record
from smartvm.images.releases import ImageManager
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm_records import VMRecord, VMRecordStore

OTHER_UID = 65534


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("planting files owned by another user needs root")


@pytest.fixture(autouse=True)
def _no_firecracker_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the data dir can provide a firecracker binary in these tests."""
    monkeypatch.delenv("SMARTVM_FIRECRACKER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def _planted_dir(path: Path, *, uid: int = OTHER_UID, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, -1)
    path.chmod(mode)
    return path


def _refused(path: Path) -> SmartVMError:
    with pytest.raises(SmartVMError) as info:
        ensure_private_dir(path)
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY
    return info.value


def _plant_firecracker(bin_dir: Path, marker: Path, *, uid: int = OTHER_UID) -> Path:
    """``<bin_dir>/v99.0.0/{firecracker,jailer}``: scripts that leave ``marker`` when run."""
    version_dir = bin_dir / "v99.0.0"
    version_dir.mkdir(parents=True)
    for name in ("firecracker", "jailer"):
        script = version_dir / name
        script.write_text(f"#!/bin/sh\ntouch {marker}\necho Firecracker v99.0.0\n")
        script.chmod(0o755)
        os.chown(script, uid, -1)
    os.chown(version_dir, uid, -1)
    return version_dir / "firecracker"


def test_missing_levels_are_created_0700(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        target = ensure_private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    for level in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert level.stat().st_mode & 0o777 == 0o700
    ensure_private_dir(target)  # found again: fine


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    planted = _planted_dir(tmp_path / "data")
    err = _refused(planted)
    assert str(planted) in err.message and f"uid {OTHER_UID}" in err.message and "0755" in err.message
    assert "remove it" in err.message and "--data-dir" in err.message
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):  # a level below it is refused too: the parent is theirs
        ensure_private_dir(planted / "bin")
    assert not (planted / "bin").exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_a_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    err = _refused(_planted_dir(tmp_path / "data", uid=0, mode=mode))
    assert "writable by group or others" in err.message


def test_a_symlink_is_refused_even_to_our_directory(tmp_path: Path) -> None:
    ours = ensure_private_dir(tmp_path / "ours")
    link = tmp_path / "link"
    link.symlink_to(ours)
    os.chown(link, OTHER_UID, -1, follow_symlinks=False)
    assert "symlink" in _refused(link).message
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):  # the symlink as a parent: owned by another user
        ensure_private_dir(link / "x")


def test_a_sticky_world_writable_parent_is_fine(tmp_path: Path) -> None:
    """Like /tmp and /dev/shm: others cannot rename our entries there."""
    shared = _planted_dir(tmp_path / "shm", uid=0, mode=0o1777)
    assert ensure_private_dir(shared / ".smartvm" / "runtime").is_dir()
    shared.chmod(0o777)  # without the sticky bit others could swap our directory
    with raises_code(ErrorCode.UNSAFE_DIRECTORY) as info:
        ensure_private_dir(shared / ".smartvm" / "runtime")
    assert "without the sticky bit" in info.value.message


def test_runtime_root_and_runtime_dirs_are_checked(tmp_path: Path) -> None:
    root = _planted_dir(tmp_path / "runtime")
    with pytest.raises(SmartVMError) as info:
        VMRuntime.create(root, "vm1")
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY and not (root / "vm1").exists()
    # a runtime dir someone else made (e.g. renamed into place with their agent socket) is not attached
    mine = ensure_private_dir(tmp_path / "mine")
    planted = _planted_dir(mine / "vm2", mode=0o700)
    (planted / "agent.sock").touch()
    with pytest.raises(SmartVMError) as info:
        VMRuntime.existing(planted, "vm2")
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY
    assert (planted / "agent.sock").exists()  # nothing of theirs is deleted either


def _forged_record(records_dir: Path, victim: Path, pid: int) -> Path:
    record = {
        "id": victim.name,
        "engine": "qemu",
        "pid": pid,
        "pid_start_time": 1,
        "runtime_dir": str(victim),
        "started_at": time.time(),
        "config": {},
        "engine_data": {},
    }
    path = records_dir / f"{victim.name}.json"
    path.write_text(json.dumps(record))
    return path


def test_forged_records_delete_nothing(tmp_path: Path) -> None:
    victim = ensure_private_dir(tmp_path / "victim")
    (victim / "precious").write_text("root's data")
    data = tmp_path / "data"
    # 1. a records dir another user made
    records = _planted_dir(data / "vms")
    os.chown(data, 0, -1)
    _forged_record(records, victim, pid=os.getpid())
    svm = SmartVM(SmartVMOptions(data_dir=data, runtime_dir=tmp_path / "rt"))
    with pytest.raises(SmartVMError) as info:
        svm.prune_detached()
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        svm.detached_vms()  # 'smartvm ps'
    assert (victim / "precious").exists()
    # 2. our records dir, a record file another user owns (a hard link or a leftover of theirs)
    os.chown(records, 0, -1)
    records.chmod(0o700)
    planted = _forged_record(records, victim, pid=os.getpid())
    os.chown(planted, OTHER_UID, -1)
    assert svm.prune_detached() == [] and svm.detached_vms() == []
    with pytest.raises(SmartVMError) as info:  # 'smartvm stop <id>' says why it will not use it
        svm.records.load(victim.name)
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY and str(planted) in info.value.message
    assert (victim / "precious").exists() and planted.exists()


def test_a_planted_firecracker_is_never_run(tmp_path: Path) -> None:
    data = ensure_private_dir(tmp_path / "data")
    marker = tmp_path / "ran"
    _plant_firecracker(data / "bin", marker)
    options = SmartVMOptions(data_dir=data, runtime_dir=tmp_path / "rt")
    with pytest.raises(SmartVMError) as info:
        find_firecracker(options)
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY and "v99.0.0" in info.value.message
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        find_firecracker(options.model_copy(update={"firecracker_version": "v99.0.0"}))
    manager = ImageManager(data)
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        manager.has_binary("v99.0.0")
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        manager.list_versions()
    assert not marker.exists()


def test_a_planted_binary_in_our_version_dir_is_never_run(tmp_path: Path) -> None:
    data = ensure_private_dir(tmp_path / "data")
    marker = tmp_path / "ran"
    binary = _plant_firecracker(data / "bin", marker)
    os.chown(binary.parent, 0, -1)  # the directory is ours, the binary is not
    with pytest.raises(SmartVMError) as info:
        find_firecracker(SmartVMOptions(data_dir=data, runtime_dir=tmp_path / "rt"))
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY and str(binary) in info.value.message
    assert not marker.exists()


def test_our_own_downloaded_firecracker_is_found(tmp_path: Path) -> None:
    data = ensure_private_dir(tmp_path / "data")
    binary = _plant_firecracker(data / "bin", tmp_path / "ran", uid=0)
    os.chown(binary.parent, 0, -1)
    binary.parent.chmod(0o700)
    options = SmartVMOptions(data_dir=data, runtime_dir=tmp_path / "rt")
    assert find_firecracker(options) == binary
    assert ImageManager(data).list_versions() == ["v99.0.0"]


def test_planted_lease_state_is_refused(tmp_path: Path) -> None:
    """Leases name namespaces and TAPs that sweeps delete: a lease dir of another user is not read."""
    from smartvm.host.ipam import LeaseStore, all_stores

    state = _planted_dir(tmp_path / "network")
    (state / "slots.json").write_text("{}")
    with pytest.raises(SmartVMError) as info:
        all_stores(state)
    assert info.value.code is ErrorCode.UNSAFE_DIRECTORY
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        LeaseStore(state / "slots.json", 1, 4).leases()


def test_a_record_is_trusted_only_in_a_private_runtime_dir(tmp_path: Path) -> None:
    store = VMRecordStore(tmp_path / "data")
    root = ensure_private_dir(tmp_path / "rt")
    runtime = ensure_private_dir(root / "vm1")
    pid = os.getpid()
    record = VMRecord(
        id="vm1",
        engine="qemu",
        pid=pid,
        pid_start_time=running_start_time(pid) or 0,
        runtime_dir=runtime,
        started_at=time.time(),
        config={},
        engine_data={},
    )
    hand_to_record(runtime, store.path("vm1"), record.pid, record.pid_start_time)
    assert store.check(record) is None
    for level, uid, mode in [(runtime, OTHER_UID, 0o700), (runtime, 0, 0o777), (root, 0, 0o777)]:
        os.chown(level, uid, -1)
        level.chmod(mode)
        problem = store.check(record)
        assert problem is not None and str(level) in problem, (level, uid, mode)
        os.chown(level, 0, -1)
        level.chmod(0o700)
    shutil.rmtree(runtime)
    assert store.check(record) == f"its runtime dir {runtime} is missing"
