"""Pause streams as a diff against the template's memory: choosing the tool, and finding the base a
"diff" snapshot is restored over (the stream format itself is tested in Go, test_go_programs.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.go_build import find_go
from smartvm.qemu import ramdiff
from smartvm.qemu.engine import BASE_MEMORY, _diff_base
from smartvm.snapshot import Snapshot

MEM = 4 << 20


def _snapshot(directory: Path, **engine_data: Any) -> Snapshot:
    return Snapshot(
        directory=directory, engine="qemu", snapshot_type="Full", state_file="vm.state", mem_file=None,
        config={}, engine_data=engine_data,
    )  # fmt: skip


def _file(path: Path, size: int = MEM) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_whole_ram_stream_has_no_base(tmp_path: Path) -> None:
    assert _diff_base(_snapshot(tmp_path, memory="stream"), MEM) is None
    assert _diff_base(_snapshot(tmp_path), MEM) is None


def test_the_base_is_the_origin_while_it_is_the_same_file(tmp_path: Path) -> None:
    origin = _file(tmp_path / "templates" / "t" / "memory")
    snap_dir = tmp_path / "paused"
    snap_dir.mkdir()
    os.link(origin, snap_dir / BASE_MEMORY)
    snap = _snapshot(snap_dir, memory="diff", base_memory=BASE_MEMORY, base_origin=str(origin))
    assert _diff_base(snap, MEM) == origin  # a path the resumed VM can link again at its next pause
    origin.unlink()
    _file(origin)  # rebuilt: another file at the same path
    assert _diff_base(snap, MEM) == snap_dir / BASE_MEMORY
    origin.unlink()
    assert _diff_base(snap, MEM) == snap_dir / BASE_MEMORY


@pytest.mark.parametrize("damage", ["missing", "short", "foreign name"])
def test_a_diff_without_its_base_is_refused(tmp_path: Path, damage: str) -> None:
    name = "../elsewhere" if damage == "foreign name" else BASE_MEMORY
    if damage == "short":
        _file(tmp_path / BASE_MEMORY, MEM // 2)
    snap = _snapshot(tmp_path, memory="diff", base_memory=name, base_origin="")
    with pytest.raises(SmartVMError) as err:
        _diff_base(snap, MEM)
    assert err.value.code is ErrorCode.SNAPSHOT_INVALID
    assert BASE_MEMORY in err.value.message and "cannot be restored" in err.value.message
    assert ("2097152 bytes" in err.value.message) == (damage == "short")


def test_the_tool_is_chosen_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SMARTVM_RAMDIFF", raising=False)
    assert ramdiff.ramdiff_binary() is None  # not built: a pause never builds it
    monkeypatch.setenv("SMARTVM_RAMDIFF", "0")
    assert ramdiff.ramdiff_binary() is None and ramdiff.build_ramdiff() is None
    monkeypatch.setenv("SMARTVM_RAMDIFF", "/opt/other/ramdiff")
    assert ramdiff.ramdiff_binary() == Path("/opt/other/ramdiff")


@pytest.mark.skipif(find_go() is None, reason="no go toolchain here (scripts/setup installs golang-go)")
def test_build_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SMARTVM_RAMDIFF", raising=False)
    _file(tmp_path / "bin" / "ramdiff-0123456789abcdef", 1)  # a build of older sources: replaced
    built = ramdiff.build_ramdiff()
    assert built is not None and os.access(built, os.X_OK) and ramdiff.ramdiff_binary() == built
    assert built.parent == tmp_path / "bin" and [p.name for p in built.parent.iterdir()] == [built.name]
    before = built.stat().st_mtime_ns
    assert ramdiff.build_ramdiff() == built and built.stat().st_mtime_ns == before


def test_doctor_says_whether_pauses_write_only_changed_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smartvm.doctor import run_checks

    monkeypatch.setenv("SMARTVM_RAMDIFF", "0")
    (line,) = [r for r in run_checks() if r.name == "pause streams"]
    assert not line.ok and "whole guest RAM" in line.detail and "golang-go" in line.fix
    tool = _file(tmp_path / "ramdiff", 1)
    monkeypatch.setenv("SMARTVM_RAMDIFF", str(tool))
    (line,) = [r for r in run_checks() if r.name == "pause streams"]
    assert line.ok and str(tool) in line.detail


@pytest.mark.skipif(find_go() is None, reason="no go toolchain here (scripts/setup installs golang-go)")
def test_a_tool_that_cannot_be_built_never_fails_a_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pauses work without ramdiff, so a template build only warns when it cannot build it (here:
    the cache is a file, not a directory)."""
    from smartvm.sandbox.templates import _ensure_ramdiff

    monkeypatch.setenv("SMARTVM_CACHE_DIR", str(_file(tmp_path / "not-a-dir", 1)))
    monkeypatch.delenv("SMARTVM_RAMDIFF", raising=False)
    with pytest.raises(OSError):
        ramdiff.build_ramdiff()
    with caplog.at_level("WARNING"):
        _ensure_ramdiff()
    assert "pauses will carry the whole guest RAM" in caplog.text
