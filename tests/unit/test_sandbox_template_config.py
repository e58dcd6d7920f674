"""The VM a template is built from: its guest kernel zeroes allocations (so that a pause stream does
not carry the agent ports' empty receive buffers) and, on a sandbox network (IPv4 only), its guest
turns IPv6 off on eth0, unless the template's own boot args say otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartvm.sandbox.templates import vm_config_for


def _boot_args(tmp_path: Path, boot_args: str, slot: object = None) -> list[str]:
    """The kernel arguments of the VM a 256 MiB template with ``boot_args`` is built from."""
    config = vm_config_for(
        vm_id="tpl-test",
        kernel=tmp_path / "vmlinux",
        boot_args=boot_args,
        cpus=1,
        memory_mib=256,
        disk=tmp_path / "disk.img",
        slot=slot,  # type: ignore[arg-type]
    )
    return (config.boot_source.boot_args or "").split()


@pytest.mark.parametrize(
    ("boot_args", "expected"),
    [
        ("console=ttyS0 reboot=k panic=1", ["init_on_alloc=1"]),
        ("console=ttyS0 init_on_alloc=0", ["init_on_alloc=0"]),
    ],
)
def test_template_guests_zero_their_allocations(tmp_path: Path, boot_args: str, expected: list[str]) -> None:
    args = _boot_args(tmp_path, boot_args)
    assert [a for a in args if a.startswith("init_on_alloc")] == expected
    assert args[: len(boot_args.split())] == boot_args.split()  # the template's own args come first


class _Slot:
    """What vm_config_for takes from a network slot."""

    tap_name = "svm-tap0"
    guest_mac = "06:00:0a:00:00:02"

    def kernel_ip_arg(self, hostname: str) -> str:
        return f"ip=10.0.0.2::10.0.0.1:255.255.255.252:{hostname}:eth0:off"


@pytest.mark.parametrize(
    ("boot_args", "slot", "expected"),
    [
        ("console=ttyS0", _Slot(), ["smartvm.ipv6=off"]),
        ("console=ttyS0 smartvm.ipv6=on", _Slot(), ["smartvm.ipv6=on"]),
        ("console=ttyS0", None, []),  # no network, no eth0
    ],
)
def test_sandbox_guests_have_no_ipv6_on_their_ipv4_only_network(
    tmp_path: Path, boot_args: str, slot: _Slot | None, expected: list[str]
) -> None:
    args = _boot_args(tmp_path, boot_args, slot)
    assert [a for a in args if a.startswith("smartvm.ipv6")] == expected
