"""Finding the firecracker binary, reading its version, the doctor check, and metrics parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.binary import (
    check_firecracker_binary,
    find_firecracker,
    firecracker_version,
    require_firecracker,
)
from smartvm.firecracker.metrics import latest_metrics, parse_metrics, read_metrics
from smartvm.options import SmartVMOptions

pytest_plugins = ["fc_fake.fixtures"]


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho 'Firecracker v9.9.9'\n")
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def _no_ambient_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SMARTVM_FIRECRACKER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _exe(data / "bin" / "v1.9.0" / "firecracker")
    newest = _exe(data / "bin" / "v1.10.1" / "firecracker")
    (data / "bin" / "v1.11.0").mkdir()  # incomplete download: no binary
    assert find_firecracker(SmartVMOptions(data_dir=data)) == newest
    assert find_firecracker(SmartVMOptions(data_dir=data, firecracker_version="1.9.0")) == (
        data / "bin" / "v1.9.0" / "firecracker"
    )
    on_path = _exe(tmp_path / "empty-path" / "firecracker")
    assert find_firecracker(SmartVMOptions(data_dir=data)) == on_path
    env = _exe(tmp_path / "env" / "firecracker")
    monkeypatch.setenv("SMARTVM_FIRECRACKER_BIN", str(env))
    assert find_firecracker(SmartVMOptions(data_dir=data)) == env
    explicit = _exe(tmp_path / "explicit" / "firecracker")
    assert find_firecracker(SmartVMOptions(data_dir=data, firecracker_binary_path=explicit)) == explicit


def test_missing_binary_says_how_to_fix(tmp_path: Path) -> None:
    options = SmartVMOptions(data_dir=tmp_path, firecracker_binary_path=tmp_path / "nope")
    assert find_firecracker(options) is None
    with pytest.raises(SmartVMError) as err:
        require_firecracker(options)
    assert err.value.code is ErrorCode.BINARY_NOT_FOUND
    assert "nope is not an executable file" in err.value.message


def test_version_and_doctor_check(fake_binary: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert firecracker_version(fake_binary) == "v1.17.0-dev"
    monkeypatch.setenv("SMARTVM_FIRECRACKER_BIN", str(fake_binary))
    result = check_firecracker_binary()
    assert result.ok and str(fake_binary) in result.detail and "v1.17.0-dev" in result.detail
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho nonsense\n")
    broken.chmod(0o755)
    with raises_code(ErrorCode.BINARY_NOT_FOUND, match="did not report a Firecracker version"):
        firecracker_version(broken)
    monkeypatch.setenv("SMARTVM_FIRECRACKER_BIN", str(broken))
    assert not check_firecracker_binary().ok
    monkeypatch.delenv("SMARTVM_FIRECRACKER_BIN")
    missing = check_firecracker_binary()
    assert not missing.ok and "SMARTVM_FIRECRACKER_BIN" in missing.fix


def test_metrics_lines(tmp_path: Path) -> None:
    text = '{"a": 1}\n\n{"a": 2, "vcpu": {"exit_io_in": 3}}\n{"a": 3, "trunc'
    assert parse_metrics(text) == [{"a": 1}, {"a": 2, "vcpu": {"exit_io_in": 3}}]
    path = tmp_path / "metrics.json"
    assert read_metrics(path) == [] and latest_metrics(path) is None
    path.write_text(text)
    assert latest_metrics(path) == {"a": 2, "vcpu": {"exit_io_in": 3}}
