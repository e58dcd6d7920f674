"""Records of detached VMs: ``<data_dir>/vms/<id>.json``, one per VM that runs without an owner.

A record says how to find the VM again (engine, pid + start time, runtime dir, what the engine needs
to re-attach). It is written atomically when a VM is detached and removed when the VM is stopped
through any path; a record whose process is gone is pruned (with its runtime dir) by whoever finds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import check_private_dir, check_private_file, ensure_private_dir
from smartvm.host.process import running_start_time
from smartvm.host.runtime import sanitize_id

log = logging.getLogger(__name__)

RECORDS_DIR = "vms"


class VMRecord(BaseModel):
    """How to find a detached VM again."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1] = 1
    id: str
    engine: str
    pid: int
    pid_start_time: int
    state: Literal["running", "paused"] = "running"
    runtime_dir: Path
    netns: str | None = None
    started_at: float  # Unix time the VM was launched
    config: dict[str, Any]  # the MicroVMConfig the VM was created with (JSON)
    engine_data: dict[str, Any]  # what Engine.detach() returned

    def is_alive(self) -> bool:
        """Whether the hypervisor process of this record still runs (pid and start time match)."""
        return running_start_time(self.pid) == self.pid_start_time

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def remove_runtime_dir(self) -> None:
        """Delete the VM's runtime dir; only a directory named after the VM id is ever touched."""
        if self.runtime_dir.name == sanitize_id(self.id) and self.runtime_dir.is_dir():
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


class VMRecordStore:
    """The records under ``<data_dir>/vms``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / RECORDS_DIR

    def path(self, vm_id: str) -> Path:
        return self.dir / f"{sanitize_id(vm_id)}.json"

    def save(self, record: VMRecord) -> Path:
        """Write ``record`` atomically (temp file in the same directory, fsync, rename)."""
        ensure_private_dir(self.dir)
        target = self.path(record.id)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record.model_dump_json(indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    def load(self, vm_id: str) -> VMRecord | None:
        """The record of ``vm_id``, or None. A damaged record is an error that says where it is."""
        return self._read(self.path(vm_id))

    def _read(self, path: Path) -> VMRecord | None:
        try:
            if not check_private_file(path):  # a record another user planted is refused
                return None
            raw = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return VMRecord.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise SmartVMError(
                ErrorCode.INVALID_STATE, f"VM record {path} is damaged ({exc}); remove it by hand"
            ) from exc

    def remove(self, vm_id: str) -> None:
        self.path(vm_id).unlink(missing_ok=True)

    def records(self) -> list[VMRecord]:
        """Every readable record, by id (damaged ones are skipped with a warning)."""
        if not check_private_dir(self.dir):
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = self._read(path)
            except SmartVMError as exc:
                log.warning("%s", exc.message)
                continue
            if record is not None:
                found.append(record)
        return found

    def prune(self, record: VMRecord) -> None:
        """Forget a VM whose hypervisor is gone: what its engine left behind, its runtime dir, its record."""
        from smartvm.engine import engine_class

        with contextlib.suppress(SmartVMError):  # a record of an engine this build does not know
            engine_class(record.engine).forget_record(record.engine_data)
        record.remove_runtime_dir()
        self.remove(record.id)
