"""Records of detached VMs: ``<data_dir>/vms/<id>.json``, one per VM that runs without an owner.

A record says how to find the VM again (engine, pid + start time, runtime dir, what the engine needs
to re-attach). It is written atomically when a VM is detached and removed when the VM is stopped
through any path; a record whose process is gone is pruned (with its runtime dir) by whoever finds it.

A record is only trusted (:meth:`VMRecord.problem`) when it names the runtime dir smartvm made for
its id under the runtime root and that dir's owner file (written by smartvm when it detached the VM)
names this record and its process (pid + start time). An untrusted record is dropped
without killing or deleting anything else: it may have been planted to steer us.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic
from smartvm.host.private_dirs import check_private_dir, check_private_file, ensure_private_dir
from smartvm.host.process import running_start_time
from smartvm.host.runtime import sanitize_id
from smartvm.host.sweep import hand_to_record, hypervisor_of, owner_of
from smartvm.validation import Model

log = logging.getLogger(__name__)

RECORDS_DIR = "vms"


def _alive(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    return isinstance(pid, int) and running_start_time(pid) == owner.get("start_time")


class VMRecord(Model):
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
        """Whether the hypervisor process of this record still runs (pid and start time match); trust
        the record first (:meth:`problem`)."""
        return running_start_time(self.pid) == self.pid_start_time

    def problem(self, record_path: Path) -> str | None:
        """Why this record (read from ``record_path``) does not describe a VM smartvm started, or None.

        Its runtime dir must be named after the VM id inside a directory only this user can write
        (so nobody else could have made it), be a real directory of this user, and hold the owner file
        smartvm wrote when it detached the VM, naming this record and its pid + start time.
        """
        path = Path(os.path.abspath(self.runtime_dir))
        if path.name != sanitize_id(self.id):
            return f"its runtime dir {path} is not named after the VM id"
        try:  # both levels private: only this user could have made the dir
            if not (check_private_dir(path.parent) and check_private_dir(path)):
                return f"its runtime dir {path} is missing"
        except SmartVMError as exc:
            return exc.message
        owner = owner_of(self.runtime_dir) or {}
        if (
            "record" not in owner
            and _alive(owner)
            and hypervisor_of(self.runtime_dir)
            == (
                self.pid,
                self.pid_start_time,
            )
        ):
            return None  # being detached right now: the record is written before the owner file
        if (owner.get("record"), owner.get("pid"), owner.get("start_time")) != (
            str(record_path),
            self.pid,
            self.pid_start_time,
        ):
            return f"{self.runtime_dir}/owner.json does not name this record and pid {self.pid}"
        return None

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
        write_atomic(target, record.model_dump_json(indent=2), durable=True)
        hand_to_record(record.runtime_dir, target, record.pid, record.pid_start_time)
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
            data = json.loads(raw)
        except ValueError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG, f"VM record {path} is not JSON ({exc}); remove it by hand"
            ) from exc
        try:
            return VMRecord.model_validate(data)
        except SmartVMError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG, f"VM record {path} is damaged ({exc.message}); remove it by hand"
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

    def check(self, record: VMRecord) -> str | None:
        """:meth:`VMRecord.problem` for a record of this store."""
        return record.problem(self.path(record.id))

    def owns(self, record_path: Path, runtime_dir: Path) -> bool:
        """Whether the record at ``record_path`` (read now) is trusted, alive and owns ``runtime_dir``."""
        if record_path.parent != self.dir:
            return False
        try:
            record = self._read(record_path)
        except SmartVMError:
            return False
        return (
            record is not None
            and os.path.abspath(record.runtime_dir) == os.path.abspath(runtime_dir)
            and self.check(record) is None
            and record.is_alive()
        )

    def prune(self, record: VMRecord) -> None:
        """Forget a VM whose hypervisor is gone: what its engine left behind, its runtime dir, its record."""
        from smartvm.engines import engine_class

        with contextlib.suppress(SmartVMError):  # a record of an engine this build does not know
            engine_class(record.engine).forget_record(record.engine_data)
        record.remove_runtime_dir()
        self.remove(record.id)
