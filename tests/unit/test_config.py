"""Config models: bad values fail naming the field; api bodies carry only Firecracker's fields."""

import pytest
from pydantic import ValidationError

from smartvm import (
    BootSource,
    Drive,
    MachineConfig,
    MicroVMConfig,
    Mmds,
    NetworkInterface,
    SmartVMError,
    Vsock,
)
from smartvm.config import RateLimiter, TokenBucket, parse_config
from smartvm.errors import ErrorCode


def test_api_body_drops_unset_and_local_fields() -> None:
    drive = Drive(drive_id="rootfs", path_on_host="/img", is_root_device=True, ephemeral=False)
    assert drive.api_body() == {
        "drive_id": "rootfs",
        "path_on_host": "/img",
        "is_root_device": True,
        "is_read_only": False,
    }


def test_nested_rate_limiter_body() -> None:
    iface = NetworkInterface(
        iface_id="eth0",
        host_dev_name="tap0",
        rx_rate_limiter=RateLimiter(bandwidth=TokenBucket(size=1000, refill_time=100)),
    )
    assert iface.api_body()["rx_rate_limiter"] == {"bandwidth": {"size": 1000, "refill_time": 100}}


@pytest.mark.parametrize("vcpus", [0, 33])
def test_vcpu_count_bounds(vcpus: int) -> None:
    with pytest.raises(ValidationError, match="vcpu_count"):
        MachineConfig(vcpu_count=vcpus)


def test_smt_requires_even_vcpus() -> None:
    with pytest.raises(ValidationError, match="even"):
        MachineConfig(vcpu_count=3, smt=True)
    assert MachineConfig(vcpu_count=4, smt=True).vcpu_count == 4


def test_vsock_cid_at_least_three() -> None:
    with pytest.raises(ValidationError, match="guest_cid"):
        Vsock(guest_cid=2, uds_path="/tmp/v.sock")


def test_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError, match="vcpus"):
        MachineConfig.model_validate({"vcpus": 2})


def test_duplicate_drive_ids_and_two_roots_rejected() -> None:
    boot = BootSource(kernel_image_path="/k")
    with pytest.raises(ValidationError, match="unique"):
        MicroVMConfig(boot_source=boot, drives=[Drive(drive_id="a", path_on_host="/x")] * 2)
    with pytest.raises(ValidationError, match="at most one"):
        MicroVMConfig(
            boot_source=boot,
            drives=[
                Drive(drive_id="a", path_on_host="/x", is_root_device=True),
                Drive(drive_id="b", path_on_host="/y", is_root_device=True),
            ],
        )


def test_mmds_must_name_known_interfaces_and_link_local_ip() -> None:
    boot = BootSource(kernel_image_path="/k")
    with pytest.raises(ValidationError, match="unknown interfaces"):
        MicroVMConfig(boot_source=boot, mmds=Mmds(network_interfaces=["eth9"]))
    with pytest.raises(ValidationError, match="link-local"):
        Mmds(network_interfaces=["eth0"], ipv4_address="10.0.0.1")


def test_bad_mac_and_id() -> None:
    with pytest.raises(ValidationError, match="guest_mac"):
        NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="zz")
    with pytest.raises(ValidationError, match="id"):
        MicroVMConfig(id="../escape", boot_source=BootSource(kernel_image_path="/k"))


def test_config_body_excludes_id_and_defaults_get_fresh_ids() -> None:
    a = MicroVMConfig(boot_source=BootSource(kernel_image_path="/k"))
    b = MicroVMConfig(boot_source=BootSource(kernel_image_path="/k"))
    assert a.id != b.id and a.id.startswith("vm-")
    assert "id" not in a.api_body()


def test_parse_config_wraps_errors_with_field_path() -> None:
    with pytest.raises(SmartVMError) as exc:
        parse_config({"boot_source": {"kernel_image_path": "/k"}, "machine_config": {"vcpu_count": 64}})
    assert exc.value.code is ErrorCode.INVALID_CONFIG
    assert "machine_config.vcpu_count" in exc.value.message
