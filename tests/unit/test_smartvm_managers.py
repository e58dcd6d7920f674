"""SmartVM owns its managers, built from SmartVMOptions: every option is read, and validated."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import FakeRemote, kernel_bytes, rootfs_bytes, serving, sha256_hex

from smartvm.config import BootSource, MicroVMConfig, NetworkInterface
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.ipam import LeaseStore
from smartvm.host.netns import NetworkSlot
from smartvm.options import SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import MicroVM, VMState

# Where each option of SmartVMOptions ends up. A new option must be added here (and wired).
MANAGER_OPTIONS = {
    "data_dir",
    "arch",
    "release_base_url",
    "ci_bucket_url",
    "allow_unverified_firecracker",
    "base_image_cache_dir",
    "max_stored_base_images",
    "base_image_manifest_url",
    "base_image_manifest_path",
    "bridge_name",
    "subnet",
}
# read by the engines, the VM runtime and binary lookup (tested with them)
ENGINE_OPTIONS = {
    "runtime_dir",
    "ephemeral_writable_drives",
    "firecracker_version",
    "firecracker_binary_path",
    "jailer_binary_path",
    "jailer",
    "engine",
    "qemu_binary_path",
    "qemu_accel",
    "stop_timeout_s",
    "socket_timeout_s",
}


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with serving() as server:
        yield server


def test_every_option_has_a_reader() -> None:
    assert set(SmartVMOptions.model_fields) == MANAGER_OPTIONS | ENGINE_OPTIONS


def test_managers_are_built_from_the_options(tmp_path: Path) -> None:
    options = SmartVMOptions(
        data_dir=tmp_path / "data",
        arch="aarch64",
        release_base_url="http://releases.test/fc",
        ci_bucket_url="http://bucket.test/ci",
        allow_unverified_firecracker=True,
        base_image_cache_dir=tmp_path / "bundles",
        max_stored_base_images=5,
        base_image_manifest_url="http://images.test/manifest.json",
        base_image_manifest_path=tmp_path / "manifest.json",
        bridge_name="svtestbr0",
        subnet="10.99.7.0/24",
    )
    svm = SmartVM(options)
    images = svm.image_manager
    assert images is svm.image_manager  # one per SmartVM
    assert (images.data_dir, images.arch, images.allow_unverified) == (tmp_path / "data", "aarch64", True)
    assert (images.release_base_url, images.ci_bucket_url) == (
        "http://releases.test/fc",
        "http://bucket.test/ci",
    )
    bundles = svm.base_image_manager
    assert bundles is svm.base_image_manager
    assert (bundles.get_cache_dir(), bundles.get_max_stored_base_images()) == (tmp_path / "bundles", 5)
    assert (bundles.arch, bundles.ci_bucket_url, bundles.release_base_url) == (
        "aarch64",
        "http://bucket.test/ci",
        "http://releases.test/fc",
    )
    assert (bundles.manifest_url, bundles.manifest_path) == (
        "http://images.test/manifest.json",
        tmp_path / "manifest.json",
    )
    network = svm.network_manager
    assert network is svm.network_manager
    assert (network.bridge_name, network.network) == ("svtestbr0", ipaddress.IPv4Network("10.99.7.0/24"))
    assert network.gateway_ip == "10.99.7.1"
    assert network.store.path == tmp_path / "data" / "network" / "bridge-svtestbr0.json"
    assert not (tmp_path / "data").exists()  # building the managers touches nothing


def test_default_base_image_cache_is_in_the_data_dir(tmp_path: Path) -> None:
    svm = SmartVM(SmartVMOptions(data_dir=tmp_path / "d"))
    assert svm.base_image_manager.get_cache_dir() == tmp_path / "d" / "base-images"
    assert svm.base_image_manager.get_max_stored_base_images() == 2
    assert svm.image_manager.arch == "x86_64"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subnet", "garbage"),
        ("subnet", "172.30.0.0/31"),
        ("subnet", "2001:db8::/64"),
        ("bridge_name", "a-bridge-name-too-long"),
        ("bridge_name", "br 0"),
        ("max_stored_base_images", 0),
        ("base_image_manifest_url", "file:///etc/passwd"),
        ("base_image_manifest_url", "not a url"),
        ("arch", "riscv64"),
    ],
)
def test_bad_options_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(SmartVMError) as info:
        SmartVMOptions(**{field: value})
    assert info.value.code == ErrorCode.INVALID_CONFIG
    assert field in info.value.message


def test_subnet_is_normalised() -> None:
    assert SmartVMOptions(subnet="10.1.2.3/24").subnet == "10.1.2.0/24"


def _hosted(remote: FakeRemote, bundle_id: str) -> str:
    kernel, rootfs = kernel_bytes(bundle_id), rootfs_bytes(bundle_id)
    remote.add(f"/{bundle_id}/vmlinux", kernel)
    remote.add(f"/{bundle_id}/rootfs.ext4", rootfs)
    doc = {
        "schemaVersion": 1,
        "bundleId": bundle_id,
        "arch": "x86_64",
        "firecrackerVersion": "v1.15.1",
        "rootfsType": "ext4",
        "kernel": {"url": "vmlinux", "sha256": sha256_hex(kernel)},
        "rootfs": {"url": "rootfs.ext4", "sha256": sha256_hex(rootfs), "sizeBytes": len(rootfs)},
    }
    return remote.add(f"/{bundle_id}/manifest.json", json.dumps(doc))


async def test_ensure_base_image_uses_the_manifest_cache_and_limit_options(
    remote: FakeRemote, tmp_path: Path
) -> None:
    first = _hosted(remote, "first-bundle")
    second = _hosted(remote, "second-bundle")
    options = SmartVMOptions(
        data_dir=tmp_path / "data",
        base_image_cache_dir=tmp_path / "bundles",
        max_stored_base_images=1,
        base_image_manifest_url=first,
    )
    svm = SmartVM(options)
    bundle = await svm.ensure_base_image()  # the manifest option means the hosted source
    assert bundle.bundle_id == "first-bundle" and bundle.preset == "hosted"
    assert bundle.bundle_dir == tmp_path / "bundles" / "first-bundle"
    other = await svm.ensure_base_image(manifest_url=second)
    assert other.bundle_dir.is_dir() and not bundle.bundle_dir.exists()  # the limit of 1 evicted it
    (tmp_path / "vmlinux").write_bytes(b"local kernel")
    (tmp_path / "rootfs.ext4").write_bytes(b"local rootfs")
    local = json.loads(remote.routes["/first-bundle/manifest.json"].body)
    local.update(bundleId="local-bundle", kernel={"path": "vmlinux"}, rootfs={"path": "rootfs.ext4"})
    path = tmp_path / "local.json"
    path.write_text(json.dumps(local))
    by_path = SmartVM(options.model_copy(update={"base_image_manifest_path": path}))
    assert (await by_path.ensure_base_image("lts")).bundle_id == "local-bundle"  # the path wins


# --- create_vm(..., network=...) arguments -------------------------------------------------------------


def _config(tmp_path: Path, *ifaces: NetworkInterface, vm_id: str = "vm1") -> MicroVMConfig:
    return MicroVMConfig(
        id=vm_id,
        boot_source=BootSource(kernel_image_path=str(tmp_path / "vmlinux"), boot_args="console=ttyS0"),
        network_interfaces=list(ifaces),
    )


def _slot(tmp_path: Path) -> NetworkSlot:
    store = LeaseStore(tmp_path / "slots.json", 0, 3)
    return NetworkSlot(0, "svx", "svx-ns0", "svxv0", "10.0.0.1", "10.0.0.2", "svx:k", store)


async def test_network_argument_errors(tmp_path: Path) -> None:
    svm = SmartVM(SmartVMOptions(engine="qemu", data_dir=tmp_path / "data", runtime_dir=tmp_path / "rt"))
    slot = _slot(tmp_path)
    cases: list[tuple[dict[str, Any], MicroVMConfig, str]] = [
        ({"network": slot, "netns": "other"}, _config(tmp_path), "not both"),
        ({"network": object()}, _config(tmp_path), "NetworkSlot or a SlotPool"),
        (
            {"network": slot},
            _config(tmp_path, NetworkInterface(iface_id="a"), NetworkInterface(iface_id="b")),
            "at most one network interface",
        ),
        ({"network": slot}, _config(tmp_path, NetworkInterface(iface_id="a", host_dev_name="tapx")), "tap0"),
        ({"detachable": True}, _config(tmp_path, NetworkInterface(iface_id="eth0")), "detachable"),
    ]
    for kwargs, config, words in cases:
        with pytest.raises(SmartVMError) as info:
            await svm.create_vm(config, **kwargs)
        assert info.value.code == ErrorCode.INVALID_ARGUMENT, kwargs
        assert words in info.value.message
    assert svm.list_vms() == []
    assert "network_manager" not in svm.__dict__ or not svm.network_manager.in_use
    # a slot the caller owns may carry a detachable VM; nothing is made before it starts
    vm = await svm.create_vm(_config(tmp_path), network=slot, detachable=True)
    assert vm.config.network_interfaces == [] and vm.state is VMState.CREATED
    await vm.stop()


async def test_an_interface_without_a_device_is_refused_at_start_outside_smartvm(tmp_path: Path) -> None:
    options = SmartVMOptions(engine="qemu", data_dir=tmp_path / "data", runtime_dir=tmp_path / "rt")
    vm = MicroVM(_config(tmp_path, NetworkInterface(iface_id="eth0")), options, "qemu")
    with pytest.raises(SmartVMError) as info:
        await vm.start()
    assert info.value.code == ErrorCode.INVALID_CONFIG and "eth0" in info.value.message
    assert vm.state is VMState.ERROR
    assert not (tmp_path / "rt").exists() or list((tmp_path / "rt").iterdir()) == []
