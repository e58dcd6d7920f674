"""A template's memory file on tmpfs has its holes filled at build time (real tmpfs, real mappings)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.sandbox.templates import fill_memory_holes

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm tmpfs")


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmem", dir=SHM))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _sparse(path: Path, size: int, data_at: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(data_at)
        f.write(b"\x01" * 4096)


def test_holes_are_filled_so_the_first_pause_does_not_pay_for_them(shm_dir: Path) -> None:
    memory = shm_dir / "memory"
    _sparse(memory, 8 << 20, 4 << 20)
    assert os.stat(memory).st_blocks * 512 < 1 << 20  # sparse: one page written
    fill_memory_holes(memory)
    assert os.stat(memory).st_blocks * 512 == 8 << 20  # every page allocated (tmpfs)
    with open(memory, "rb") as f:
        data = f.read()
    assert data[4 << 20 : (4 << 20) + 4096] == b"\x01" * 4096
    assert data.count(0) == len(data) - 4096  # content unchanged


def test_files_off_tmpfs_and_missing_files_are_left_alone(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    _sparse(memory, 8 << 20, 0)
    before = os.stat(memory).st_blocks
    fill_memory_holes(memory)
    assert os.stat(memory).st_blocks == before
    fill_memory_holes(tmp_path / "missing")  # no error
