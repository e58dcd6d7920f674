"""The kernel builder's pure parts: fragment parsing, survival check, tool and source errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.kernel_build import (
    DEFAULT_SOURCE,
    build_kernel,
    dropped_options,
    fragment_text,
    kernel_cache_key,
    parse_config,
    source_key,
)


def test_parse_config_reads_set_and_unset_options() -> None:
    text = '# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=12\n'
    assert parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "12"}


def test_dropped_options_lists_what_did_not_survive() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=1\n"
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=4\n"
    assert dropped_options(fragment, final) == ["CONFIG_B=y (got n)", "CONFIG_D=1 (got 4)"]
    assert dropped_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=1\n") == []
    enabled_c = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\nCONFIG_D=1\n"
    assert dropped_options(fragment, enabled_c) == ["CONFIG_C=n (got y)"]


def test_fragment_covers_the_guest_contract() -> None:
    options = parse_config(fragment_text())
    for name in (
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_ACPI",
        "CONFIG_ACPI_BUTTON",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_BALLOON",
        "CONFIG_HW_RANDOM_VIRTIO",
        "CONFIG_SERIAL_8250_CONSOLE",
        "CONFIG_EXT4_FS",
        "CONFIG_SQUASHFS",
        "CONFIG_DEVTMPFS_MOUNT",
        "CONFIG_TMPFS",
        "CONFIG_IP_PNP",
        "CONFIG_UNIX",
        "CONFIG_INET",
        "CONFIG_INPUT_EVDEV",
        "CONFIG_KEYBOARD_ATKBD",
        "CONFIG_SERIO_I8042",
        "CONFIG_PVH",
    ):
        assert options.get(name) == "y", name
    assert options["CONFIG_MODULES"] == "n"


def test_cache_key_depends_on_the_source(tmp_path: Path) -> None:
    other = tmp_path / "linux.tar.xz"
    other.write_bytes(b"not really a kernel")
    key = kernel_cache_key(other)
    assert key == kernel_cache_key(other)
    assert key != kernel_cache_key(DEFAULT_SOURCE)
    other.write_bytes(b"another kernel, another size")
    assert kernel_cache_key(other) != key


def test_missing_tool_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "linux.tar.xz"
    source.write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(SmartVMError) as info:
        build_kernel(source, cache_dir=tmp_path / "cache", progress=False)
    assert info.value.code == ErrorCode.BUILD_TOOL_MISSING
    assert "apt-get install make" in info.value.message
    assert not (tmp_path / "cache" / "kernels").exists()


def test_missing_source_is_an_argument_error(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        build_kernel(tmp_path / "nope.tar.xz", cache_dir=tmp_path, progress=False)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert "nope.tar.xz" in info.value.message


def test_broken_source_fails_with_the_log(tmp_path: Path) -> None:
    source = tmp_path / "linux.tar.xz"
    source.write_bytes(b"this is not a tarball")
    with pytest.raises(SmartVMError) as info:
        build_kernel(source, cache_dir=tmp_path / "cache", progress=False)
    assert info.value.code == ErrorCode.BUILD_FAILED
    log = tmp_path / "cache" / "logs" / f"kernel-{kernel_cache_key(source)}.log"
    assert str(log) in info.value.message and log.is_file()
    assert list((tmp_path / "cache" / "kernel-src").iterdir()) == []
    assert not (tmp_path / "cache" / "kernels").exists()


def test_source_is_extracted_once_and_a_failed_configure_publishes_nothing(tmp_path: Path) -> None:
    tree = tmp_path / "tree" / "linux-9.9"
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("tinyconfig:\n\t@echo no kconfig in this tree >&2; exit 7\n")
    source = tmp_path / "linux-9.9.tar"
    with tarfile.open(source, "w") as tar:
        tar.add(tree, arcname="linux-9.9")
    cache = tmp_path / "cache"
    with pytest.raises(SmartVMError) as info:
        build_kernel(source, cache_dir=cache, progress=False)
    assert info.value.code == ErrorCode.BUILD_FAILED
    assert "make tinyconfig" in info.value.message and "no kconfig in this tree" in info.value.message
    extracted = cache / "kernel-src" / source_key(source)
    assert (extracted / "linux-9.9" / "Makefile").is_file()
    assert [p.name for p in (cache / "kernel-src").iterdir()] == [extracted.name]
    assert not (cache / "kernels").exists() or list((cache / "kernels").iterdir()) == []
