"""The full MicroVM lifecycle through SmartVM on the fake ``firecracker``, and its failure paths.

Every failure path asserts complete cleanup: no process, API socket, staged drive or runtime dir left.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fc_fake.helpers import fake_vm_config, logged_requests, processes_running

from error_support import raises_code
from smartvm import SmartVMError
from smartvm.config import Balloon, MachineConfig, MicroVMConfig, Mmds, NetworkInterface
from smartvm.errors import ErrorCode
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import VMState

pytest_plugins = ["fc_fake.fixtures"]


@pytest.fixture
async def svm(fake_binary: Path, short_tmp: Path) -> AsyncIterator[SmartVM]:
    options = SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=fake_binary,
        runtime_dir=short_tmp / "rt",
        socket_timeout_s=2,
        stop_timeout_s=2,
    )
    async with SmartVM(options) as manager:
        yield manager


def _config(tmp: Path, vm_id: str = "vm1") -> MicroVMConfig:
    return fake_vm_config(
        tmp,
        vm_id,
        machine_config=MachineConfig(vcpu_count=1, mem_size_mib=32, track_dirty_pages=True),
        network_interfaces=[NetworkInterface(iface_id="eth0", host_dev_name="tap-lc0")],
        balloon=Balloon(amount_mib=0, stats_polling_interval_s=1),
        mmds=Mmds(network_interfaces=["eth0"]),
    )


def assert_clean(tmp: Path, binary: Path) -> None:
    """Nothing of any VM survived: no process, no runtime dir (sockets, staged drives, logs)."""
    assert processes_running(binary) == []
    runtime_root = tmp / "rt"
    assert not runtime_root.exists() or list(runtime_root.iterdir()) == []
    assert (tmp / "images" / "rootfs.ext4").read_bytes() == b"pristine"  # the source is never written


def assert_all_requests_valid(tmp: Path, *expected_failures: tuple[str, str]) -> None:
    rejected = [
        r
        for r in logged_requests(tmp)
        if r["status"] >= 300 and (r["method"], r["path"]) not in expected_failures
    ]
    assert rejected == []
    assert len(logged_requests(tmp)) > 10


async def test_full_lifecycle(svm: SmartVM, fake_binary: Path, short_tmp: Path) -> None:
    vm = await svm.create_vm(_config(short_tmp))
    await vm.start()
    assert vm.state is VMState.RUNNING
    runtime_dir = vm.get_runtime_dir()
    assert runtime_dir is not None and (runtime_dir / "drives" / "rootfs.ext4").is_file()
    assert vm.console_log_path is not None and "SMARTVM_INIT_READY" in vm.console_log_path.read_text()
    info = await vm.get_info()
    assert info["engine_info"]["state"] == "Running"

    await vm.pause()
    assert vm.state is VMState.PAUSED
    await vm.resume()
    snap = short_tmp / "snap"
    full = await vm.create_snapshot(snap / "vm.state", snap / "vm.mem", pause_vm=True)
    assert vm.state is VMState.RUNNING
    assert (full.directory / "snapshot.json").is_file() and full.disks == {"rootfs": "disk-rootfs.ext4"}
    # guest RAM, state, disks and manifest are private to the user, in a private directory
    assert {p.name: p.stat().st_mode & 0o777 for p in snap.iterdir()} == dict.fromkeys(
        ["vm.state", "vm.mem", "disk-rootfs.ext4", "snapshot.json"], 0o600
    )
    assert snap.stat().st_mode & 0o777 == 0o700
    assert (runtime_dir / "drives" / "rootfs.ext4").stat().st_mode & 0o077 == 0
    await vm.pause()
    diff = await vm.create_snapshot(short_tmp / "diff" / "vm.state", short_tmp / "diff" / "vm.mem", "Diff")
    assert diff.snapshot_type == "Diff"
    await vm.resume()

    await vm.put_metadata({"latest": {"k": "v"}})
    await vm.patch_metadata({"latest": {"k2": "v2"}})
    assert await vm.get_metadata() == {"latest": {"k": "v", "k2": "v2"}}
    await vm.update_balloon(8)
    assert (await vm.get_balloon_stats())["target_mib"] == 8
    assert (await vm.get_vm_config())["balloon"]["amount_mib"] == 8

    await vm.stop()
    assert vm.state is VMState.STOPPED
    assert_clean(short_tmp, fake_binary)

    clone = await svm.create_vm(_config(short_tmp, "vm2"))
    await clone.load_snapshot(short_tmp / "snap" / "vm.state", short_tmp / "snap" / "vm.mem")
    assert clone.state is VMState.RUNNING
    with raises_code(
        ErrorCode.FIRECRACKER_API_ERROR, match="GET /mmds"
    ):  # Firecracker does not save MMDS data in snapshots
        await clone.get_metadata()
    await clone.put_metadata({"restored": True})
    restored = await svm.restore_vm(short_tmp / "snap", vm_id="vm3", resume_vm=False)
    assert restored.state is VMState.PAUSED
    await restored.resume()
    assert svm.vm_count == 2
    await svm.stop_all()
    assert_clean(short_tmp, fake_binary)
    assert_all_requests_valid(short_tmp, ("GET", "/mmds"))


async def test_invalid_calls_are_refused_before_any_request(svm: SmartVM, short_tmp: Path) -> None:
    vm = await svm.create_vm(_config(short_tmp))
    with pytest.raises(SmartVMError) as err:
        await vm.pause()
    assert err.value.code is ErrorCode.INVALID_STATE
    await vm.start()
    with pytest.raises(SmartVMError) as err:
        await vm.create_snapshot(short_tmp / "s" / "a", short_tmp / "s" / "b")  # running, no pause_vm
    assert err.value.code is ErrorCode.INVALID_STATE
    await vm.stop()


async def test_binary_missing(short_tmp: Path, fake_binary: Path) -> None:
    options = SmartVMOptions(
        engine="firecracker", firecracker_binary_path=short_tmp / "nothing", runtime_dir=short_tmp / "rt"
    )
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(_config(short_tmp))
        with pytest.raises(SmartVMError) as err:
            await vm.start()
        assert err.value.code is ErrorCode.BINARY_NOT_FOUND
        assert vm.state is VMState.ERROR
    assert_clean(short_tmp, fake_binary)


@pytest.mark.parametrize(
    ("env", "value", "code"),
    [
        ("FAKE_FC_MODE", "exit", ErrorCode.FIRECRACKER_EXITED),
        ("FAKE_FC_MODE", "nosocket", ErrorCode.SOCKET_TIMEOUT),
        ("FAKE_FC_FAIL", "PUT /network-interfaces/eth0", ErrorCode.FIRECRACKER_API_ERROR),
    ],
)
async def test_start_failures_leave_nothing_behind(
    svm: SmartVM,
    fake_binary: Path,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    value: str,
    code: ErrorCode,
) -> None:
    monkeypatch.setenv(env, value)
    vm = await svm.create_vm(_config(short_tmp))
    with pytest.raises(SmartVMError) as err:
        await vm.start()
    assert err.value.code is code
    assert vm.state is VMState.ERROR
    assert_clean(short_tmp, fake_binary)


async def test_stop_of_a_vm_whose_process_died(svm: SmartVM, fake_binary: Path, short_tmp: Path) -> None:
    vm = await svm.create_vm(_config(short_tmp))
    await vm.start()
    [pid] = processes_running(fake_binary)
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        if vm.state is VMState.STOPPED:
            break
        await asyncio.sleep(0.01)
    assert vm.state is VMState.STOPPED
    await vm.stop()
    assert_clean(short_tmp, fake_binary)
    await vm.stop()  # idempotent


def _markers(memory: Path) -> list[bytes]:
    """The fake's memory markers: the Full image at offset 0, then one page per Diff layer."""
    with memory.open("rb") as f:
        found = [f.read(18)]
        page = 1
        while f.seek(page * 4096) and (data := f.read(7)).startswith(b"\x01diff-"):
            found.append(data)
            page += 1
    return found


async def test_diff_snapshot_chain_restores_with_its_layers_merged(
    svm: SmartVM, fake_binary: Path, short_tmp: Path
) -> None:
    vm = await svm.create_vm(_config(short_tmp))
    await vm.start()
    sent = len(logged_requests(short_tmp))
    with pytest.raises(SmartVMError) as no_base:
        await vm.create_snapshot(short_tmp / "d0" / "s", short_tmp / "d0" / "m", "Diff", pause_vm=True)
    assert no_base.value.code is ErrorCode.INVALID_STATE and "Full snapshot first" in no_base.value.message
    # refused before any request
    assert len(logged_requests(short_tmp)) == sent and vm.state is VMState.RUNNING

    full = await vm.create_snapshot(short_tmp / "full" / "s", short_tmp / "full" / "m", pause_vm=True)
    d1 = await vm.create_snapshot(short_tmp / "d1" / "s", short_tmp / "d1" / "m", "Diff", pause_vm=True)
    d2 = await vm.create_snapshot(short_tmp / "d2" / "s", short_tmp / "d2" / "m", "Diff", pause_vm=True)
    assert (full.base, d1.base, d2.base) == (None, str(full.directory.resolve()), str(d1.directory.resolve()))
    with pytest.raises(SmartVMError) as same_dir:
        await vm.create_snapshot(short_tmp / "d2" / "s", short_tmp / "d2" / "m", "Diff", pause_vm=True)
    assert same_dir.value.code is ErrorCode.INVALID_ARGUMENT
    await vm.stop()
    assert d2.mem_path is not None and _markers(d2.mem_path)[0] == bytes(18)  # a bare layer: a hole at 0

    clone = await svm.create_vm(_config(short_tmp, "clone"))
    await clone.load_snapshot(d2.state_path, d2.mem_path, enable_diff_snapshots=True)
    runtime = clone.get_runtime_dir()
    assert runtime is not None
    merged = runtime / "memory.merged"
    assert _markers(merged) == [b"\x00fake-guest-memory", b"\x01diff-1", b"\x01diff-2"]
    load = [r for r in logged_requests(short_tmp) if r["path"] == "/snapshot/load"][-1]
    assert load["body"]["mem_backend"]["backend_path"] == str(merged)
    # the restored VM's next Diff is laid over the snapshot it came from
    await clone.pause()
    d3 = await clone.create_snapshot(short_tmp / "d3" / "s", short_tmp / "d3" / "m", "Diff")
    assert d3.base == str(d2.directory.resolve())
    await clone.stop()
    assert not merged.exists()

    again = await svm.restore_vm(d3.directory, vm_id="again")
    runtime = again.get_runtime_dir()
    assert runtime is not None
    assert _markers(runtime / "memory.merged")[1:] == [b"\x01diff-1", b"\x01diff-2", b"\x01diff-3"]
    await again.stop()

    (d1.directory / "snapshot.json").unlink()  # a broken chain: nothing starts, nothing is left
    with pytest.raises(SmartVMError) as broken:
        await svm.restore_vm(d3.directory, vm_id="broken")
    assert broken.value.code is ErrorCode.SNAPSHOT_INVALID and str(d1.directory) in broken.value.message
    assert_clean(short_tmp, fake_binary)
    assert_all_requests_valid(short_tmp)
