"""A damaged detached-VM record fails with INVALID_CONFIG naming the field (also a ValueError)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.vm_records import VMRecordStore


def _plant(store: VMRecordStore, vm_id: str, text: str) -> None:
    ensure_private_dir(store.dir)
    fd = os.open(store.path(vm_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def test_damaged_record_names_the_field(tmp_path: Path) -> None:
    store = VMRecordStore(tmp_path / "data")
    record = {
        "id": "vm1",
        "engine": "qemu",
        "pid": "not-a-pid",
        "pid_start_time": 1,
        "runtime_dir": str(tmp_path / "rt" / "vm1"),
        "started_at": 0.0,
        "config": {},
        "engine_data": {},
    }
    _plant(store, "vm1", json.dumps(record))
    with pytest.raises(ValueError, match="pid") as exc:
        store.load("vm1")
    assert isinstance(exc.value, SmartVMError) and exc.value.code is ErrorCode.INVALID_CONFIG
    assert str(store.path("vm1")) in exc.value.message
    _plant(store, "vm2", "{not json")
    with pytest.raises(SmartVMError) as exc2:
        store.load("vm2")
    assert exc2.value.code is ErrorCode.INVALID_CONFIG
    assert store.records() == []  # listing skips damaged records (with a warning)
