"""The snapshot manifest round-trips, and refuses missing files and paths outside its directory."""

import json
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm import BootSource, MicroVMConfig, SmartVMError, Snapshot
from smartvm.errors import ErrorCode


def _snap(tmp_path: Path, **kw: object) -> Snapshot:
    (tmp_path / "vm.state").write_bytes(b"s")
    (tmp_path / "disk-rootfs.img").write_bytes(b"d")
    cfg = MicroVMConfig(id="vm-a", boot_source=BootSource(kernel_image_path="/k"))
    args: dict[str, object] = dict(
        directory=tmp_path,
        engine="qemu",
        snapshot_type="Full",
        state_file="vm.state",
        mem_file=None,
        config=cfg.model_dump(mode="json"),
        disks={"rootfs": "disk-rootfs.img"},
    )
    args.update(kw)
    return Snapshot(**args)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    snap = _snap(tmp_path)
    snap.save()
    loaded = Snapshot.load(tmp_path)
    assert loaded == snap
    assert loaded.vm_config().id == "vm-a"
    assert loaded.disk_path("rootfs") == (tmp_path / "disk-rootfs.img").resolve()


def test_missing_manifest_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as exc:
        Snapshot.load(tmp_path)
    assert exc.value.code is ErrorCode.SNAPSHOT_INVALID
    _snap(tmp_path).save()
    (tmp_path / "disk-rootfs.img").unlink()
    with raises_code(ErrorCode.SNAPSHOT_INVALID, match="missing"):
        Snapshot.load(tmp_path)


def test_paths_outside_directory_refused(tmp_path: Path) -> None:
    _snap(tmp_path, state_file="../../etc/passwd").save()
    with pytest.raises(SmartVMError) as exc:
        Snapshot.load(tmp_path)
    assert exc.value.code is ErrorCode.UNSAFE_PATH


def test_unknown_version_and_malformed(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_text(json.dumps({"manifest_version": 99}))
    with raises_code(ErrorCode.SNAPSHOT_INVALID, match="manifest_version"):
        Snapshot.load(tmp_path)
    (tmp_path / "snapshot.json").write_text(json.dumps({"manifest_version": 1, "bogus": 1}))
    with raises_code(ErrorCode.INVALID_CONFIG, match="malformed"):
        Snapshot.load(tmp_path)


def test_bad_manifest_values_name_the_field(tmp_path: Path) -> None:
    """A hand-edited or damaged manifest fails with INVALID_CONFIG naming the field (also a ValueError)."""
    _snap(tmp_path).save()
    good = json.loads((tmp_path / "snapshot.json").read_text())
    for field, value in (
        ("snapshot_type", "Weird"),
        ("state_file", 7),
        ("disks", {"rootfs": None}),
        ("created_at", "yesterday"),
    ):
        (tmp_path / "snapshot.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(ValueError, match=field) as exc:
            Snapshot.load(tmp_path)
        assert isinstance(exc.value, SmartVMError) and exc.value.code is ErrorCode.INVALID_CONFIG
    (tmp_path / "snapshot.json").write_text(json.dumps({**good, "bogus": 1}))
    with pytest.raises(SmartVMError, match="bogus") as exc2:
        Snapshot.load(tmp_path)
    assert exc2.value.code is ErrorCode.INVALID_CONFIG
    config = {**good["config"], "machine_config": {"vcpu_count": 99}}
    (tmp_path / "snapshot.json").write_text(json.dumps({**good, "config": config}))
    with pytest.raises(SmartVMError, match=r"machine_config\.vcpu_count") as exc3:
        Snapshot.load(tmp_path).vm_config()
    assert exc3.value.code is ErrorCode.INVALID_CONFIG
