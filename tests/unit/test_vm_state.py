"""MicroVM refuses calls that are invalid in its state before anything reaches an engine."""

from pathlib import Path

import pytest

from smartvm import BootSource, MicroVMConfig, SmartVM, SmartVMError, SmartVMOptions, VMState
from smartvm.errors import ErrorCode


@pytest.fixture
def svm(tmp_path: Path) -> SmartVM:
    return SmartVM(SmartVMOptions(engine="qemu", runtime_dir=tmp_path / "rt", data_dir=tmp_path / "data"))


def _cfg(vm_id: str = "vm-state") -> MicroVMConfig:
    return MicroVMConfig(id=vm_id, boot_source=BootSource(kernel_image_path="/nonexistent/vmlinux"))


@pytest.mark.parametrize("action", ["pause", "resume", "flush_metrics", "get_balloon_stats", "get_vm_config"])
async def test_calls_on_a_created_vm_are_invalid_state(svm: SmartVM, action: str) -> None:
    vm = await svm.create_vm(_cfg())
    with pytest.raises(SmartVMError) as exc:
        await getattr(vm, action)()
    assert exc.value.code is ErrorCode.INVALID_STATE
    assert "created" in exc.value.message


async def test_snapshot_requires_paused_vm_and_same_directory(svm: SmartVM, tmp_path: Path) -> None:
    vm = await svm.create_vm(_cfg())
    with pytest.raises(SmartVMError) as exc:
        await vm.create_snapshot(tmp_path / "s" / "vm.state", tmp_path / "s" / "vm.mem")
    assert exc.value.code is ErrorCode.INVALID_STATE
    with pytest.raises(SmartVMError) as exc:
        await vm.create_snapshot(tmp_path / "a" / "vm.state", tmp_path / "b" / "vm.mem")
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT


async def test_registry_and_duplicate_ids(svm: SmartVM) -> None:
    vm = await svm.create_vm(_cfg("vm-one"))
    assert svm.get_vm("vm-one") is vm and svm.vm_count == 1 and svm.list_vms() == [vm]
    with pytest.raises(SmartVMError) as exc:
        await svm.create_vm(_cfg("vm-one"))
    assert exc.value.code is ErrorCode.DUPLICATE_VM_ID
    await svm.stop_all()
    assert vm.state is VMState.STOPPED and svm.vm_count == 0
    await vm.stop()  # idempotent


async def test_create_vm_from_dict_validates(svm: SmartVM) -> None:
    with pytest.raises(SmartVMError) as exc:
        await svm.create_vm({"boot_source": {}})
    assert exc.value.code is ErrorCode.INVALID_CONFIG
    assert "boot_source.kernel_image_path" in exc.value.message


async def test_load_snapshot_without_manifest_on_qemu(svm: SmartVM, tmp_path: Path) -> None:
    vm = await svm.create_vm(_cfg())
    with pytest.raises(SmartVMError) as exc:
        await vm.load_snapshot(tmp_path / "vm.state", tmp_path / "vm.mem")
    assert exc.value.code is ErrorCode.SNAPSHOT_INVALID
    assert vm.state is VMState.CREATED


async def test_not_running_is_one_code(svm: SmartVM) -> None:
    """Whatever needs a running VM says INVALID_STATE when it is not (no NO_CLIENT here, VM_EXITED
    only when the hypervisor died on its own)."""
    vm = await svm.create_vm(_cfg())
    calls = {
        "exec": lambda: vm.exec("true"),
        "wait_ready": lambda: vm.wait_ready(1),
        "files": lambda: vm.files.read("/etc/hostname"),
        "processes": lambda: vm.processes.list(),
        "detach": vm.detach,
        "update_drive": lambda: vm.update_drive("rootfs", "/x"),
        "put_metadata": lambda: vm.put_metadata({}),
    }
    for name, call in calls.items():
        with pytest.raises(SmartVMError) as exc:
            await call()
        assert exc.value.code is ErrorCode.INVALID_STATE, name


@pytest.mark.parametrize("engine_name", ["firecracker", "qemu"])
async def test_not_running_is_one_code_on_every_engine(tmp_path: Path, engine_name: str) -> None:
    from smartvm.engines import engine_class
    from smartvm.host.runtime import VMRuntime

    runtime = VMRuntime.create(tmp_path / "rt", "vm-engine")
    try:
        engine = engine_class(engine_name)(runtime, SmartVMOptions(runtime_dir=tmp_path / "rt"))
        for call in (engine.pause, engine.resume, engine.get_vm_config):
            with pytest.raises(SmartVMError) as exc:
                await call()
            assert exc.value.code is ErrorCode.INVALID_STATE, call.__name__
    finally:
        runtime.remove()
