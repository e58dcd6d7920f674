"""Config models: bad values fail naming the field; api bodies carry only Firecracker's fields."""

import pytest

from error_support import raises_code
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
    with raises_code(ErrorCode.INVALID_CONFIG, "vcpu_count"):
        MachineConfig(vcpu_count=vcpus)


def test_smt_requires_even_vcpus() -> None:
    with raises_code(ErrorCode.INVALID_CONFIG, "even"):
        MachineConfig(vcpu_count=3, smt=True)
    assert MachineConfig(vcpu_count=4, smt=True).vcpu_count == 4


def test_vsock_cid_at_least_three() -> None:
    with raises_code(ErrorCode.INVALID_CONFIG, "guest_cid"):
        Vsock(guest_cid=2, uds_path="/tmp/v.sock")


def test_unknown_field_rejected() -> None:
    with raises_code(ErrorCode.INVALID_CONFIG, "vcpus"):
        MachineConfig.model_validate({"vcpus": 2})


def test_duplicate_drive_ids_and_two_roots_rejected() -> None:
    boot = BootSource(kernel_image_path="/k")
    with raises_code(ErrorCode.INVALID_CONFIG, "unique"):
        MicroVMConfig(boot_source=boot, drives=[Drive(drive_id="a", path_on_host="/x")] * 2)
    with raises_code(ErrorCode.INVALID_CONFIG, "at most one"):
        MicroVMConfig(
            boot_source=boot,
            drives=[
                Drive(drive_id="a", path_on_host="/x", is_root_device=True),
                Drive(drive_id="b", path_on_host="/y", is_root_device=True),
            ],
        )


def test_mmds_must_name_known_interfaces_and_link_local_ip() -> None:
    boot = BootSource(kernel_image_path="/k")
    with raises_code(ErrorCode.INVALID_CONFIG, "unknown interfaces"):
        MicroVMConfig(boot_source=boot, mmds=Mmds(network_interfaces=["eth9"]))
    with raises_code(ErrorCode.INVALID_CONFIG, "link-local"):
        Mmds(network_interfaces=["eth0"], ipv4_address="10.0.0.1")


def test_bad_mac_and_id() -> None:
    with raises_code(ErrorCode.INVALID_CONFIG, "guest_mac"):
        NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="zz")
    with raises_code(ErrorCode.INVALID_CONFIG, "id"):
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


def test_bad_values_are_smartvm_errors_and_value_errors() -> None:
    """Every config and options model: INVALID_CONFIG naming the field, catchable as ValueError too."""
    from smartvm import JailerOptions, SmartVMOptions

    cases = [
        (lambda: MicroVMConfig(boot_source={"kernel_image_path": ""}), "boot_source.kernel_image_path"),
        (lambda: MicroVMConfig.model_validate({"boot_source": {}}), "boot_source.kernel_image_path"),
        (lambda: SmartVMOptions(stop_timeout_s=0), "stop_timeout_s"),
        (lambda: SmartVMOptions.model_validate({"engine": "vmware"}), "engine"),
        (lambda: SmartVMOptions.model_validate_json('{"max_stored_base_images": 0}'), "max_stored_base"),
        (lambda: JailerOptions(uid=-1, gid=0), "uid"),
    ]
    for make, field in cases:
        with raises_code(ErrorCode.INVALID_CONFIG, field) as info:
            make()
        assert isinstance(info.value, ValueError)
    config = MicroVMConfig(boot_source=BootSource(kernel_image_path="/k"))
    with pytest.raises(ValueError, match="machine_config"):  # assignment is validated too
        config.machine_config = "big"  # type: ignore[assignment]
