"""The VM a template is built from: its guest kernel zeroes allocations (so that a pause stream does
not carry the agent ports' empty receive buffers), unless the template's own boot args say otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartvm.sandbox.templates import vm_config_for


@pytest.mark.parametrize(
    ("boot_args", "expected"),
    [
        ("console=ttyS0 reboot=k panic=1", ["init_on_alloc=1"]),
        ("console=ttyS0 init_on_alloc=0", ["init_on_alloc=0"]),
    ],
)
def test_template_guests_zero_their_allocations(tmp_path: Path, boot_args: str, expected: list[str]) -> None:
    config = vm_config_for(
        vm_id="tpl-test",
        kernel=tmp_path / "vmlinux",
        boot_args=boot_args,
        cpus=1,
        memory_mib=256,
        disk=tmp_path / "disk.img",
        slot=None,
    )
    args = (config.boot_source.boot_args or "").split()
    assert [a for a in args if a.startswith("init_on_alloc")] == expected
    assert args[: len(boot_args.split())] == boot_args.split()  # the template's own args come first
