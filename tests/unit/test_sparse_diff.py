"""Laying a sparse Diff memory file over its base gives the full memory, and never writes the inputs."""

import os
from pathlib import Path

import pytest

from smartvm import SmartVMError
from smartvm.errors import ErrorCode
from smartvm.host.storage import apply_sparse_diffs

PAGE = 4096


def test_diff_pages_replace_base_pages_and_holes_keep_base(tmp_path: Path) -> None:
    base, diff, out = tmp_path / "base.mem", tmp_path / "diff.mem", tmp_path / "out.mem"
    base_bytes = os.urandom(64 * PAGE)
    base.write_bytes(base_bytes)
    dirty = {3: os.urandom(PAGE), 40: os.urandom(PAGE), 41: os.urandom(PAGE)}
    with open(diff, "wb") as f:
        f.truncate(64 * PAGE)  # a sparse file: holes where pages were not dirtied
        for page, data in dirty.items():
            f.seek(page * PAGE)
            f.write(data)
    base_mtime, diff_mtime = base.stat().st_mtime_ns, diff.stat().st_mtime_ns
    apply_sparse_diffs(base, [diff], out)
    merged = out.read_bytes()
    expected = bytearray(base_bytes)
    for page, data in dirty.items():
        expected[page * PAGE : (page + 1) * PAGE] = data
    assert merged == bytes(expected)
    assert base.stat().st_mtime_ns == base_mtime and diff.stat().st_mtime_ns == diff_mtime


def test_diff_larger_than_base_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    base, diff, out = tmp_path / "base.mem", tmp_path / "diff.mem", tmp_path / "out.mem"
    base.write_bytes(b"\1" * PAGE)
    diff.write_bytes(b"\2" * 2 * PAGE)
    with pytest.raises(SmartVMError) as exc:
        apply_sparse_diffs(base, [diff], out)
    assert exc.value.code is ErrorCode.SNAPSHOT_MISMATCH
    assert not out.exists()


def test_a_chain_of_diffs_applies_in_order_later_pages_win(tmp_path: Path) -> None:
    base, d1, d2, out = (tmp_path / n for n in ("base.mem", "d1.mem", "d2.mem", "out.mem"))
    base.write_bytes(b"\0" * 8 * PAGE)
    for path, pages in ((d1, {1: b"\1", 2: b"\1"}), (d2, {2: b"\2", 5: b"\2"})):
        with open(path, "wb") as f:
            f.truncate(8 * PAGE)
            for page, fill in pages.items():
                f.seek(page * PAGE)
                f.write(fill * PAGE)
    apply_sparse_diffs(base, [d1, d2], out)
    merged = out.read_bytes()
    assert [merged[p * PAGE] for p in range(8)] == [0, 1, 2, 0, 0, 2, 0, 0]
