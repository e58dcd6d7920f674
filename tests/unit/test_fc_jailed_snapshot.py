"""Snapshots, restores and detach/attach of jailed VMs on the fake jailer and Firecracker."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fc_fake.helpers import logged_requests, processes_rooted_in, text, vsock_ping
from jailed_support import assert_no_jail_left, fc_paths, jail_root, jailed_options, vm_config

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.jailed import remove_recorded_jail
from smartvm.host.process import HostProcess
from smartvm.orchestrator import SmartVM
from smartvm.vm import VMState

pytest_plugins = ["fc_fake.fixtures"]


@pytest.fixture
async def svm(fake_jailer: Path, short_tmp: Path) -> AsyncIterator[SmartVM]:
    async with SmartVM(jailed_options(short_tmp)) as manager:
        yield manager


@pytest.mark.parametrize("version", ["1.17.0-dev", "1.16.1"])  # with and without vsock_override
async def test_snapshot_in_one_jail_restores_in_another(
    svm: SmartVM, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setenv("FAKE_FC_VERSION", version)
    first = await svm.create_vm(vm_config(short_tmp))
    await first.start()
    root = jail_root(svm.options)
    (root / "drives" / "rootfs.ext4").write_bytes(b"written by the guest")
    snap = short_tmp / "snap"
    snapshot = await first.create_snapshot(snap / "vm.state", snap / "vm.mem", pause_vm=True)

    # Firecracker wrote in its jail; the files were moved out to the snapshot dir and are ours again
    create = next(r for r in logged_requests(short_tmp) if r["path"] == "/snapshot/create")
    assert (create["body"]["snapshot_path"], create["body"]["mem_file_path"]) == (
        "/snapshot/vm.state",
        "/snapshot/vm.mem",
    )
    for name in ("vm.state", "vm.mem", "disk-rootfs.ext4", "snapshot.json"):
        assert (snap / name).is_file() and (snap / name).stat().st_uid == os.geteuid(), name
    assert not list(snap.glob("*.part")) and not (root / "snapshot").exists()
    assert snapshot.disk_path("rootfs").read_bytes() == b"written by the guest"
    saved = json.loads((snap / "snapshot.json").read_text())["engine_data"]
    assert saved["drive_paths"] == {"rootfs": "/drives/rootfs.ext4", "data": "/drives/data.img"}
    assert saved["vsock_uds_path"] == "/run/vsock.sock" and saved["jailed"] is True
    await first.stop()
    assert not root.exists()

    restored = await svm.restore_vm(snap, vm_id="vm2")
    assert restored.state is VMState.RUNNING
    load = next(r for r in logged_requests(short_tmp) if r["path"] == "/snapshot/load")
    assert load["body"]["snapshot_path"] == "/restore/vm.state"
    assert load["body"]["mem_backend"] == {"backend_type": "File", "backend_path": "/restore/vm.mem"}
    if version.startswith("1.17"):
        assert load["body"]["vsock_override"] == {"uds_path": "/run/vsock.sock"}
    else:
        assert "vsock_override" not in load["body"]  # re-created at the recorded path: in the new jail
    # drives are where the snapshot says, inside the new jail: nothing needed patching
    assert not [r for r in logged_requests(short_tmp) if r["method"] == "PATCH" and "/drives/" in r["path"]]
    new_root = jail_root(svm.options, "vm2")
    assert (new_root / "drives" / "rootfs.ext4").read_bytes() == b"written by the guest"
    # snapshot files are 0600 and stay the user's: the jail (another uid) gets its own copy
    in_jail, original = (new_root / "restore" / "vm.mem").stat(), (snap / "vm.mem").stat()
    assert in_jail.st_ino != original.st_ino and in_jail.st_uid != original.st_uid == os.geteuid()
    assert original.st_mode & 0o077 == 0
    assert await vsock_ping(restored._engine_or_raise()) == b"ping\n"
    assert [r for r in logged_requests(short_tmp) if r["status"] >= 300] == []
    assert not [p for p in fc_paths(short_tmp) if p.startswith(str(short_tmp))]
    await restored.stop()
    assert_no_jail_left(svm.options, fake_binary)
    assert (snap / "vm.mem").is_file()  # the snapshot survives its restored VM


async def test_detach_and_attach_keep_the_jail_until_the_vm_stops(
    svm: SmartVM, fake_binary: Path, short_tmp: Path
) -> None:
    vm = await svm.create_vm(vm_config(short_tmp), detachable=True)
    await vm.start()
    root = jail_root(svm.options)
    [pid] = processes_rooted_in(short_tmp / "jail")
    record = await vm.detach()
    assert record.engine_data["jail"]["jail_dir"] == str(root.parent)
    assert root.is_dir() and processes_rooted_in(short_tmp / "jail") == [pid]

    async with SmartVM(jailed_options(short_tmp).model_copy(update={"jailer": None})) as other:
        again = await other.attach_vm("vm1")  # a manager without jailer options: the record has it all
        assert again.state is VMState.RUNNING and await vsock_ping(again._engine_or_raise()) == b"ping\n"
        new_data = short_tmp / "images" / "new.img"
        new_data.write_bytes(b"new")
        await again.update_drive("data", str(new_data))
        assert (root / "drives" / "data-1.img").stat().st_ino == new_data.stat().st_ino
        await again.pause()
        snapshot = await again.create_snapshot(short_tmp / "s" / "st", short_tmp / "s" / "mem")
        assert snapshot.engine_data["drive_paths"]["data"] == "/drives/data-1.img"
        await again.resume()
        third = await again.detach()
        assert third.engine_data["jail"] == record.engine_data["jail"]

    async with SmartVM(jailed_options(short_tmp)) as last:
        final = await last.attach_vm("vm1")
        await final.update_drive("data", str(new_data))  # after a re-attach: still a fresh name
        assert (root / "drives" / "data-2.img").stat().st_ino == new_data.stat().st_ino
        await final.stop()
    assert_no_jail_left(svm.options, fake_binary)


async def test_a_failed_restore_leaves_no_jail(
    svm: SmartVM, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await svm.create_vm(vm_config(short_tmp))
    await first.start()
    await first.create_snapshot(short_tmp / "snap" / "vm.state", short_tmp / "snap" / "vm.mem", pause_vm=True)
    await first.stop()
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /snapshot/load")
    with pytest.raises(SmartVMError) as err:
        await svm.restore_vm(short_tmp / "snap", vm_id="vm2")
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
    assert_no_jail_left(svm.options, fake_binary)


async def test_pruning_a_vm_that_died_while_detached_removes_its_jail(
    svm: SmartVM, fake_binary: Path, short_tmp: Path
) -> None:
    """Pruning a dead record removes its runtime dir and its jail; a record naming another directory
    as its jail is ignored."""
    vm = await svm.create_vm(vm_config(short_tmp), detachable=True)
    await vm.start()
    record = await vm.detach()
    HostProcess.adopt(record.pid, record.pid_start_time).kill()
    await HostProcess.adopt(record.pid, record.pid_start_time).wait(10)
    forged = {**record.engine_data["jail"], "jail_dir": str(short_tmp)}
    remove_recorded_jail({"jail": forged})
    assert text(short_tmp / "images" / "data.img") == "data"  # nothing of ours was touched
    assert jail_root(svm.options).is_dir()
    assert svm.prune_detached() == [record]
    assert_no_jail_left(svm.options, fake_binary)


async def test_a_failed_snapshot_leaves_nothing_in_the_jail(
    svm: SmartVM, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Firecracker wrote before failing (up to a whole memory file) must not stay in the jail."""
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /snapshot/create")
    vm = await svm.create_vm(vm_config(short_tmp))
    await vm.start()
    snap = short_tmp / "snap"
    with pytest.raises(SmartVMError) as err:
        await vm.create_snapshot(snap / "vm.state", snap / "vm.mem", pause_vm=True)
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
    assert not (jail_root(svm.options) / "snapshot").exists() and not snap.exists()
    assert vm.state is VMState.RUNNING
    await vm.stop()
    assert_no_jail_left(svm.options, fake_binary)
