"""FirecrackerEngine end to end on the fake ``firecracker`` executable (real processes and sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fc_fake.helpers import fake_vm_config, logged_requests, pid_alive, read_until

from smartvm.config import (
    Balloon,
    Entropy,
    Logger,
    MachineConfig,
    Metrics,
    MicroVMConfig,
    Mmds,
    NetworkInterface,
    RateLimiter,
    TokenBucket,
)
from smartvm.engine import NetworkOverride, RestoreRequest
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.engine import FirecrackerEngine
from smartvm.firecracker.metrics import read_metrics
from smartvm.host.runtime import VMRuntime
from smartvm.options import SmartVMOptions

pytest_plugins = ["fc_fake.fixtures"]


def _engine(tmp: Path, binary: Path, vm_id: str = "vm1") -> FirecrackerEngine:
    options = SmartVMOptions(firecracker_binary_path=binary, runtime_dir=tmp / "rt", socket_timeout_s=10)
    return FirecrackerEngine(VMRuntime.create(options.runtime_dir, vm_id), options)


def _config(tmp: Path, *, track_dirty_pages: bool | None = None, full: bool = False) -> MicroVMConfig:
    extra: dict[str, object] = {}
    if full:
        extra = {
            "network_interfaces": [NetworkInterface(iface_id="eth0", host_dev_name="tap-test0")],
            "balloon": Balloon(amount_mib=16, stats_polling_interval_s=1),
            "mmds": Mmds(network_interfaces=["eth0"]),
            "logger": Logger(log_path=str(tmp / "fc.log"), level="Info"),
            "metrics": Metrics(metrics_path=str(tmp / "metrics.json")),
            "entropy": Entropy(),
        }
    machine = MachineConfig(vcpu_count=2, mem_size_mib=64, track_dirty_pages=track_dirty_pages)
    return fake_vm_config(tmp, data_drive=True, machine_config=machine, **extra)


def _staged(engine: FirecrackerEngine, config: MicroVMConfig) -> MicroVMConfig:
    return engine.runtime.stage_drives(config, ephemeral_writable=True)


def _all_valid(tmp: Path) -> None:
    bad = [r for r in logged_requests(tmp) if r["status"] >= 300]
    assert bad == []


async def test_boot_configures_every_device_in_order(fake_binary: Path, short_tmp: Path) -> None:
    engine = _engine(short_tmp, fake_binary)
    config = _staged(engine, _config(short_tmp, full=True))
    await engine.boot(config)
    try:
        assert engine.is_alive()
        await read_until(engine.runtime.console_log, "SMARTVM_INIT_READY")
        sent = [(r["method"], r["path"]) for r in logged_requests(short_tmp)]
        assert sent == [
            ("PUT", "/boot-source"),
            ("PUT", "/machine-config"),
            ("PUT", "/drives/rootfs"),
            ("PUT", "/drives/data"),
            ("PUT", "/network-interfaces/eth0"),
            ("PUT", "/vsock"),
            ("PUT", "/balloon"),
            ("PUT", "/mmds/config"),
            ("PUT", "/logger"),
            ("PUT", "/metrics"),
            ("PUT", "/entropy"),
            ("PUT", "/actions"),
        ]
        _all_valid(short_tmp)
        vm_config = await engine.get_vm_config()
        assert vm_config["vsock"] == {"guest_cid": 3, "uds_path": str(engine.runtime.vsock_socket)}
        assert vm_config["drives"][0]["path_on_host"] == str(engine.runtime.staged["rootfs"])
        assert "ephemeral" not in vm_config["drives"][0]
        assert (await engine.info())["state"] == "Running"
    finally:
        await engine.kill()
        await engine.close()


async def test_running_vm_operations(fake_binary: Path, short_tmp: Path) -> None:
    engine = _engine(short_tmp, fake_binary)
    await engine.boot(_staged(engine, _config(short_tmp, full=True)))
    try:
        await engine.put_metadata({"latest": {"meta-data": {"a": 1, "b": 2}}})
        await engine.patch_metadata({"latest": {"meta-data": {"b": None}}})
        assert await engine.get_metadata() == {"latest": {"meta-data": {"a": 1}}}
        await engine.update_balloon(32)
        assert (await engine.get_balloon_stats())["target_mib"] == 32
        limiter = RateLimiter(bandwidth=TokenBucket(size=1000, refill_time=100))
        await engine.update_network_interface("eth0", limiter, None)
        iface = (await engine.get_vm_config())["network-interfaces"][0]
        assert iface["rx_rate_limiter"] == limiter.api_body()
        await engine.flush_metrics()
        assert read_metrics(short_tmp / "metrics.json")[-1]["api_server"]
        new_data = short_tmp / "images" / "other.img"
        new_data.write_bytes(b"x")
        await engine.update_drive("data", str(new_data))
        reader, writer = await engine.open_agent_stream(timeout=5)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"  # the fake's vsock echoes
        writer.close()
        await engine.pause()
        assert (await engine.info())["state"] == "Paused"
        await engine.resume()
        _all_valid(short_tmp)
        with pytest.raises(SmartVMError) as err:
            await engine.update_drive("nope", str(new_data))
        assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
        assert "PATCH /drives/nope" in err.value.message
    finally:
        await engine.kill()
        await engine.close()


async def test_snapshot_and_restore_into_another_vm(fake_binary: Path, short_tmp: Path) -> None:
    first = _engine(short_tmp, fake_binary, "first")
    config = _config(short_tmp, track_dirty_pages=True)
    await first.boot(_staged(first, config))
    first.runtime.staged["rootfs"].write_bytes(b"written by the guest")
    await first.pause()
    snap_dir = short_tmp / "snap"
    snap_dir.mkdir()
    snapshot = await first.create_snapshot(snap_dir, "vm.state", "vm.mem", "Full", config)
    assert snapshot.engine == "firecracker" and snapshot.disks == {"rootfs": "disk-rootfs.ext4"}
    assert snapshot.disk_path("rootfs").read_bytes() == b"written by the guest"
    assert snapshot.state_path.is_file() and snapshot.mem_path is not None and snapshot.mem_path.is_file()
    assert not list(snap_dir.glob("*.part"))
    (short_tmp / "diff1").mkdir()  # a Diff's memory file holds only dirtied pages: never over its base
    diff = await first.create_snapshot(short_tmp / "diff1", "vm.state", "vm.mem", "Diff", config)
    assert diff.snapshot_type == "Diff"
    await first.shutdown(timeout=5)
    first.runtime.remove()  # the original staged disks are gone, as after a real stop
    assert not first.is_alive()

    second = _engine(short_tmp, fake_binary, "second")
    drives = [
        d.model_copy(update={"path_on_host": str(snapshot.disk_path(d.drive_id))})
        if d.drive_id in snapshot.disks
        else d
        for d in config.drives
    ]
    restored = config.model_copy(update={"drives": drives})
    restored = _staged(second, restored)
    await second.restore(RestoreRequest(snapshot=snapshot, config=restored, enable_diff_snapshots=True))
    try:
        vm_config = await second.get_vm_config()
        rootfs = next(d for d in vm_config["drives"] if d["drive_id"] == "rootfs")
        assert rootfs["path_on_host"] == str(second.runtime.staged["rootfs"])
        assert (await second.info())["state"] == "Running"
        assert not first.runtime.dir.exists()  # the temporary symlinks (and their dirs) are gone
        load = next(r for r in logged_requests(short_tmp) if r["path"] == "/snapshot/load")
        assert load["body"]["mem_backend"] == {"backend_type": "File", "backend_path": str(snapshot.mem_path)}
        assert load["body"]["resume_vm"] is False and load["body"]["track_dirty_pages"] is True
        await second.pause()
        (short_tmp / "diff2").mkdir()
        # dirty page tracking came with the load (enable_diff_snapshots)
        await second.create_snapshot(short_tmp / "diff2", "s", "m", "Diff", config)
        _all_valid(short_tmp)
    finally:
        await second.kill()
        await second.close()


async def test_restore_can_stay_paused_and_override_networks(fake_binary: Path, short_tmp: Path) -> None:
    first = _engine(short_tmp, fake_binary, "first")
    config = _config(short_tmp, full=True)
    await first.boot(_staged(first, config))
    await first.pause()
    snapshot = await first.create_snapshot(short_tmp, "s.state", "s.mem", "Full", config)
    await first.kill()
    await first.close()
    second = _engine(short_tmp, fake_binary, "second")
    request = RestoreRequest(
        snapshot=snapshot,
        config=_staged(second, config),
        resume_vm=False,
        network_overrides=(NetworkOverride("eth0", "tap-new"),),
    )
    await second.restore(request)
    try:
        assert (await second.info())["state"] == "Paused"
        assert (await second.get_vm_config())["network-interfaces"][0]["host_dev_name"] == "tap-new"
        _reader, writer = await second.open_agent_stream(timeout=5)  # vsock moved to this VM's runtime dir
        writer.close()
        _all_valid(short_tmp)
    finally:
        await second.kill()
        await second.close()


async def test_diff_snapshot_without_dirty_tracking_is_refused_before_any_request(
    fake_binary: Path, short_tmp: Path
) -> None:
    engine = _engine(short_tmp, fake_binary)
    config = _config(short_tmp)
    await engine.boot(_staged(engine, config))
    try:
        await engine.pause()
        before = len(logged_requests(short_tmp))
        with pytest.raises(SmartVMError) as err:
            await engine.create_snapshot(short_tmp, "s", "m", "Diff", config)
        assert err.value.code is ErrorCode.SNAPSHOT_FAILED
        assert "track_dirty_pages" in err.value.message
        assert len(logged_requests(short_tmp)) == before
    finally:
        await engine.kill()
        await engine.close()


async def test_shutdown_via_ctrl_alt_del(fake_binary: Path, short_tmp: Path) -> None:
    engine = _engine(short_tmp, fake_binary)
    await engine.boot(_staged(engine, _config(short_tmp)))
    assert engine.process is not None
    pid = engine.process.pid
    await engine.shutdown(timeout=5)
    assert engine.process.returncode == 0  # it exited by itself, like reboot=k
    assert pid is not None and not pid_alive(pid)
    assert not engine.runtime.api_socket.exists() and not engine.runtime.vsock_socket.exists()
    assert "reboot: Restarting system" in engine.runtime.console_log.read_text()
    with pytest.raises(SmartVMError) as err:
        await engine.pause()
    assert err.value.code is ErrorCode.INVALID_STATE  # "not running" is one code on every engine


async def test_shutdown_falls_back_to_signals(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_IGNORE_CTRLALTDEL", "1")
    engine = _engine(short_tmp, fake_binary)
    await engine.boot(_staged(engine, _config(short_tmp)))
    assert engine.process is not None
    await engine.shutdown(timeout=0.3)
    assert engine.process.returncode == -15


async def test_400_in_the_middle_of_configuration_leaves_nothing(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /drives/data")
    engine = _engine(short_tmp, fake_binary)
    with pytest.raises(SmartVMError) as err:
        await engine.boot(_staged(engine, _config(short_tmp)))
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
    assert "PUT /drives/data" in err.value.message and "fake failure injected" in err.value.message
    assert engine.process is not None and engine.process.pid is not None
    assert not pid_alive(engine.process.pid) and not engine.is_alive()
    assert not engine.runtime.api_socket.exists()


async def test_a_process_that_dies_mid_boot_is_reported_as_exited(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_HANG", "PUT /machine-config")
    engine = _engine(short_tmp, fake_binary)
    boot = asyncio.create_task(engine.boot(_staged(engine, _config(short_tmp))))
    for _ in range(500):
        if any(r["path"] == "/boot-source" for r in logged_requests(short_tmp)):
            break
        await asyncio.sleep(0.01)
    assert engine.process is not None and engine.process.pid is not None
    engine.process._proc.kill()  # type: ignore[union-attr]  # the VMM crashes while configuring
    with pytest.raises(SmartVMError) as err:
        await boot
    assert err.value.code is ErrorCode.FIRECRACKER_EXITED
    assert "Running Firecracker" in err.value.message  # the log tail
    assert not engine.runtime.api_socket.exists()


async def test_missing_binary(short_tmp: Path) -> None:
    engine = _engine(short_tmp, short_tmp / "no-such-firecracker")
    with pytest.raises(SmartVMError) as err:
        await engine.boot(_config(short_tmp))
    assert err.value.code is ErrorCode.BINARY_NOT_FOUND
    assert not engine.is_alive()


async def test_restore_on_a_release_without_vsock_override(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_VERSION", "1.16.1")
    first = _engine(short_tmp, fake_binary, "first")
    config = _config(short_tmp)
    await first.boot(_staged(first, config))
    await first.pause()
    snapshot = await first.create_snapshot(short_tmp, "s.state", "s.mem", "Full", config)
    assert snapshot.engine_data["firecracker_version"] == "1.16.1"
    early = _engine(short_tmp, fake_binary, "early")
    with pytest.raises(SmartVMError) as err:  # the original still listens on the recorded vsock path
        await early.restore(RestoreRequest(snapshot=snapshot, config=_staged(early, config)))
    assert err.value.code is ErrorCode.INVALID_STATE and "before 1.17" in err.value.message
    assert not early.is_alive() and first.runtime.vsock_socket.is_socket()
    await first.kill()
    await first.close()
    first.runtime.remove()
    second = _engine(short_tmp, fake_binary, "second")
    await second.restore(RestoreRequest(snapshot=snapshot, config=_staged(second, config)))
    try:
        load = next(r for r in logged_requests(short_tmp) if r["path"] == "/snapshot/load")
        assert "vsock_override" not in load["body"]
        _reader, writer = await second.open_agent_stream(timeout=5)  # at the recorded path, recreated
        writer.close()
        assert first.runtime.vsock_socket.is_socket()
        _all_valid(short_tmp)
    finally:
        await second.kill()
        await second.close()
    assert not first.runtime.dir.exists()  # the recreated directory went with the VM
