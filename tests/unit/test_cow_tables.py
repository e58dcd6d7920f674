"""Pure parts of the copy-on-write layer: dm tables, qcow2 arguments, layer records, the choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.cow import CowLayer, LoopRegistry, choose_strategy, report, strategies
from smartvm.sandbox.cow.base import Availability, CowStrategy
from smartvm.sandbox.cow.dm import cow_file_bytes, dm_name, snapshot_table
from smartvm.sandbox.cow.qcow2 import create_overlay_args


def test_snapshot_table() -> None:
    assert snapshot_table(524288, "/dev/loop0", "/dev/loop1") == "0 524288 snapshot /dev/loop0 /dev/loop1 P 8"
    assert snapshot_table(8, "7:0", "7:1", persistent=False, chunk_sectors=16) == "0 8 snapshot 7:0 7:1 N 16"
    for bad in (
        lambda: snapshot_table(0, "/dev/loop0", "/dev/loop1"),
        lambda: snapshot_table(8, "/dev/loop0", "/dev/loop1", chunk_sectors=12),
        lambda: snapshot_table(8, "/dev/lo op0", "/dev/loop1"),
        lambda: snapshot_table(8, "/dev/loop0", ""),
    ):
        with pytest.raises(SmartVMError) as err:
            bad()
        assert err.value.code == ErrorCode.COW_FAILED


def test_dm_name_and_cow_size() -> None:
    assert dm_name("sb-0123abcd") == "smartvm-sb-0123abcd"
    with raises_code(ErrorCode.COW_FAILED):
        dm_name("sb/../x")
    base = 256 << 20
    assert cow_file_bytes(base) >= base + base // 256 + 4096


def test_qcow2_args(tmp_path: Path) -> None:
    args = create_overlay_args(tmp_path / "base.img", "raw", tmp_path / "o.qcow2")
    assert args == [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(tmp_path / "base.img"),
        "-F",
        "raw",
        str(tmp_path / "o.qcow2"),
    ]


def test_layer_round_trip(tmp_path: Path) -> None:
    layer = CowLayer(
        "qcow2", "sb-00000001", tmp_path / "b", tmp_path / "l", ("rootfs.qcow2",), 42, {"k": "v"}
    )
    assert CowLayer.from_json(layer.to_json()) == layer
    assert layer.paths() == [tmp_path / "l" / "rootfs.qcow2"]


def test_choice_order_and_report(tmp_path: Path) -> None:
    names = [s.name for s in strategies("qemu", tmp_path)]
    assert names == ["dm-snapshot", "reflink", "qcow2", "sparse-copy"]
    rep = report("firecracker", tmp_path)
    chosen = choose_strategy("firecracker", tmp_path)
    assert chosen.name == rep.chosen
    assert chosen.name != "qcow2"  # firecracker cannot open qcow2
    skipped = dict(rep.skipped)
    if not Path("/dev/mapper/control").exists():
        assert "device-mapper" in skipped["dm-snapshot"]
        assert rep.line().startswith(rep.chosen) and "dm-snapshot:" in rep.line()
    if "qcow2" in skipped:
        assert "qemu engine" in skipped["qcow2"]


def test_choice_takes_first_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dm and reflink unavailable (tmp_path on ext4/tmpfs), qemu gets qcow2."""
    import smartvm.sandbox.cow as cow

    real = cow.strategies

    def fake(engine: str, directory: Path, registry: LoopRegistry | None = None) -> list[CowStrategy]:
        out = real(engine, directory, registry)
        for s in out[:2]:
            monkeypatch.setattr(s, "available", lambda: Availability(False, "not here"))
        return out

    monkeypatch.setattr(cow, "strategies", fake)
    assert cow.choose_strategy("qemu", tmp_path).name == "qcow2"
    assert cow.choose_strategy("firecracker", tmp_path).name == "sparse-copy"
    assert cow.report("qemu", tmp_path).line() == "qcow2 (dm-snapshot: not here; reflink: not here)"


def test_doctor_reports_the_strategy() -> None:
    from smartvm.doctor import run_checks

    (line,) = [r for r in run_checks() if r.name == "copy-on-write disks"]
    assert line.detail.split(" ")[0] in ("dm-snapshot", "reflink", "qcow2", "sparse-copy")
    if not Path("/dev/mapper/control").exists():
        assert "dm-snapshot: the kernel has no device-mapper" in line.detail
