"""A template's memory file on tmpfs has its holes filled at build time (real tmpfs, real mappings)."""

from __future__ import annotations

import mmap
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


def test_off_tmpfs_the_holes_go_to_the_page_cache_not_the_disk(tmp_path: Path) -> None:
    """On a disk filesystem the holes become clean page-cache pages (what the first pause would
    fault in), and no disk block is allocated; a missing file is no error."""
    memory = tmp_path / "memory"
    _sparse(memory, 8 << 20, 0)
    before = os.stat(memory).st_blocks
    pages = (8 << 20) // mmap.PAGESIZE
    assert _cached_pages(memory) < pages  # the holes are not in the page cache yet
    fill_memory_holes(memory)
    assert os.stat(memory).st_blocks == before
    assert _cached_pages(memory) == pages
    fill_memory_holes(tmp_path / "missing")  # no error


def _cached_pages(path: Path) -> int:
    """How many pages of a file are in the page cache (mincore(2) over a private mapping of it, which
    faults nothing in by itself)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        pages = (len(view) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(view)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(view)), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del anchor  # the mapping cannot close while a ctypes object points into it
    return sum(v & 1 for v in vec)
