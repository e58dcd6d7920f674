"""The guest kernel: built once per machine (scripts/setup), a cache hit afterwards, never rebuilt here."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.build_steps import BuildLog
from smartvm.images.cache_paths import cache_root
from smartvm.images.kernel_build import (
    DEFAULT_SOURCE,
    build_kernel,
    configure_kernel,
    dropped_options,
    fragment_text,
    source_key,
)

pytestmark = pytest.mark.integration

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, ET_EXEC, EM_X86_64 = 2, 1, 2, 62


@pytest.fixture(scope="module")
def vmlinux() -> Path:
    # In CI scripts/setup built it already, so this is a cache hit; on a fresh machine it builds once.
    return build_kernel(progress=False)


def test_vmlinux_is_an_x86_64_elf_executable(vmlinux: Path) -> None:
    header = vmlinux.read_bytes()[:20]
    assert header[:4] == ELF_MAGIC
    assert header[4] == ELFCLASS64 and header[5] == ELFDATA2LSB
    assert int.from_bytes(header[16:18], "little") == ET_EXEC
    assert int.from_bytes(header[18:20], "little") == EM_X86_64


def test_every_fragment_option_is_in_the_built_config(vmlinux: Path) -> None:
    config = vmlinux.parent / "config"
    assert dropped_options(fragment_text(), config.read_text()) == []


def test_second_call_is_a_cache_hit(vmlinux: Path) -> None:
    before = vmlinux.stat()
    again = build_kernel(progress=False)
    after = again.stat()
    assert again == vmlinux
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_an_option_kconfig_drops_fails_the_configure_step(tmp_path: Path) -> None:
    """Runs the real tinyconfig + merge + olddefconfig (seconds) on the cached source tree."""
    src_dir = cache_root() / "kernel-src" / source_key(DEFAULT_SOURCE)
    trees = sorted(src_dir.glob("*/Makefile"))
    if not trees:
        pytest.skip(f"the kernel source is not extracted in the cache ({src_dir}); build the kernel first")
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    wanted = fragment_text() + "CONFIG_USB_STORAGE=y\n"  # needs USB, which nothing enables
    with BuildLog(tmp_path / "configure.log") as log, pytest.raises(SmartVMError) as info:
        configure_kernel(trees[0].parent, build_dir, wanted, log)
    assert info.value.code == ErrorCode.BUILD_FAILED
    assert "CONFIG_USB_STORAGE=y (got n)" in info.value.message
    # everything else of the fragment did survive: it is the only option listed
    assert "1 option(s)" in info.value.message
