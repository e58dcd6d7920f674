"""move_file across filesystems (a pause dir on disk, a layer on tmpfs): copied sparse, then unlinked."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.sandbox.cow.base import allocated, move_file


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    path = Path("/dev/shm") / f"smartvm-test-move-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_move_across_filesystems_keeps_holes_and_leaves_no_temp(shm_dir: Path, tmp_path: Path) -> None:
    if os.stat(shm_dir).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the test tmp dir are one filesystem here")
    src = shm_dir / "layer.img"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"changed")
    dst = tmp_path / "layer.img"
    dst.write_bytes(b"an older layer")
    move_file(src, dst)
    assert not src.exists()
    assert os.path.getsize(dst) == 64 << 20 and allocated(dst) < 1 << 20
    with open(dst, "rb") as f:
        f.seek(1 << 20)
        assert f.read(7) == b"changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.img"]
