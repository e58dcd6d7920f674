"""Snapshots as frozen values that save and load themselves.

A snapshot directory holds the engine's state file(s), a consistent copy of every writable disk and
``snapshot.json`` (this manifest), so :meth:`SmartVM.restore_vm` can rebuild the VM from the
directory alone, on the engine that made it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from smartvm.config import MicroVMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic

MANIFEST_NAME = "snapshot.json"
MANIFEST_VERSION = 1
SnapshotType = Literal["Full", "Diff"]


def _inside(directory: Path, name: str) -> Path:
    """A path named in a manifest, refused if it would leave the snapshot directory."""
    path = (directory / name).resolve()
    if path.parent != directory.resolve():
        raise SmartVMError(ErrorCode.UNSAFE_PATH, f"snapshot manifest names {name!r}, outside {directory}")
    return path


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\x00" not in value


def _is_str_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_name(v) for k, v in value.items())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot directory contains. File names are relative to ``directory``."""

    directory: Path
    engine: str
    snapshot_type: SnapshotType
    state_file: str
    mem_file: str | None
    config: dict[str, Any]
    disks: dict[str, str] = field(default_factory=dict)
    engine_data: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    base: str | None = None  # a Diff snapshot: the directory of the snapshot its memory is laid over

    def __post_init__(self) -> None:
        """Bad values (e.g. from a hand-edited manifest) fail here, naming the field."""
        for name, ok, wanted in (
            ("engine", isinstance(self.engine, str) and bool(self.engine), "an engine name"),
            ("snapshot_type", self.snapshot_type in ("Full", "Diff"), "'Full' or 'Diff'"),
            ("state_file", _is_name(self.state_file), "a file name"),
            ("mem_file", self.mem_file is None or _is_name(self.mem_file), "a file name or null"),
            ("config", isinstance(self.config, dict), "an object (a MicroVMConfig)"),
            ("disks", _is_str_map(self.disks), "an object of drive id -> file name"),
            ("engine_data", isinstance(self.engine_data, dict), "an object"),
            ("created_at", _is_number(self.created_at), "a Unix time"),
            ("base", self.base is None or _is_name(self.base), "a directory or null"),
        ):
            if not ok:
                raise SmartVMError(
                    ErrorCode.INVALID_CONFIG,
                    f"snapshot field {name!r} must be {wanted}, not {getattr(self, name)!r}",
                )

    @property
    def state_path(self) -> Path:
        return _inside(self.directory, self.state_file)

    @property
    def mem_path(self) -> Path | None:
        return _inside(self.directory, self.mem_file) if self.mem_file else None

    def disk_path(self, drive_id: str) -> Path:
        return _inside(self.directory, self.disks[drive_id])

    def chain(self) -> list[Snapshot]:
        """The snapshots whose memory files make up this one's memory: the Full one first, this last."""
        chain: list[Snapshot] = [self]
        seen = {self.directory.resolve()}
        while chain[0].snapshot_type == "Diff":
            diff = chain[0]
            if diff.base is None:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID,
                    f"Diff snapshot {diff.directory} does not name its base snapshot; it cannot be restored "
                    "on its own (restore it with the Full snapshot's memory laid under it)",
                )
            base_dir = Path(diff.base)
            if base_dir.resolve() in seen:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID, f"snapshot chain of {self.directory} is a loop"
                )
            try:
                base = Snapshot.load(base_dir)
            except SmartVMError as exc:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID,
                    f"Diff snapshot {diff.directory} needs its base snapshot {base_dir}: {exc.message}; "
                    "keep every snapshot of a Diff chain until its last Diff is no longer needed",
                ) from exc
            if base.engine != self.engine:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_MISMATCH, f"base snapshot {base_dir} was made by another engine"
                )
            seen.add(base_dir.resolve())
            chain.insert(0, base)
        return chain

    def check_files(self, *, state_magic: bytes = b"", mem_bytes: int | None = None) -> None:
        """Refuse damaged files before a hypervisor is started on them (it would hang or "restore" a
        guest that never answers): an empty or foreign state file, a memory file of the wrong size."""
        state = self.state_path
        try:
            with open(state, "rb") as f:
                head = f.read(max(len(state_magic), 1))
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID, f"cannot read snapshot state {state}: {exc}"
            ) from exc
        if not head:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID,
                f"snapshot state file {state} is empty (truncated): take the snapshot again",
            )
        if not head.startswith(state_magic):
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID,
                f"snapshot state file {state} does not start with the {self.engine} state header "
                f"({state_magic!r}, found {head!r}): it is damaged or not a snapshot of this engine",
            )
        mem = self.mem_path
        if mem is not None and mem_bytes is not None:
            size = mem.stat().st_size
            if size != mem_bytes:
                raise SmartVMError(
                    ErrorCode.SNAPSHOT_INVALID,
                    f"snapshot memory file {mem} has {size} bytes but the VM's memory is {mem_bytes} bytes "
                    f"({mem_bytes >> 20} MiB): the file is truncated or belongs to another snapshot",
                )

    def vm_config(self) -> MicroVMConfig:
        """The config of the snapshotted VM (INVALID_CONFIG naming the field when it is damaged)."""
        try:
            return MicroVMConfig.model_validate(self.config)
        except SmartVMError as exc:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG, f"snapshot in {self.directory}: field 'config': {exc.message}"
            ) from exc

    def save(self) -> Path:
        """Write ``snapshot.json`` atomically."""
        data = asdict(self)
        data.pop("directory")
        data["manifest_version"] = MANIFEST_VERSION
        target = self.directory / MANIFEST_NAME
        return write_atomic(target, json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Snapshot:
        directory = Path(directory)
        manifest = directory / MANIFEST_NAME
        try:
            data = json.loads(manifest.read_text())
        except FileNotFoundError as exc:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID,
                f"{directory} is not a snapshot directory: {MANIFEST_NAME} is missing",
            ) from exc
        except (OSError, ValueError) as exc:
            raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"cannot read {manifest}: {exc}") from exc
        if not isinstance(data, dict) or data.pop("manifest_version", None) != MANIFEST_VERSION:
            raise SmartVMError(
                ErrorCode.SNAPSHOT_INVALID,
                f"{manifest} has an unknown manifest_version (expected {MANIFEST_VERSION})",
            )
        names = {f.name for f in fields(cls)} - {"directory"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown, missing = set(data) - names, required - {"directory"} - set(data)
        if unknown or missing:
            raise SmartVMError(
                ErrorCode.INVALID_CONFIG,
                f"{manifest} is malformed: "
                + "; ".join(
                    f"{what} field(s) {', '.join(map(repr, sorted(keys)))}"
                    for what, keys in (("unknown", unknown), ("missing", missing))
                    if keys
                ),
            )
        try:
            snap = cls(directory=directory, **data)
        except SmartVMError as exc:
            raise SmartVMError(exc.code, f"{manifest}: {exc.message}") from exc
        for path in [snap.state_path, snap.mem_path, *(snap.disk_path(d) for d in snap.disks)]:
            if path is not None and not path.exists():
                raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"snapshot file {path} is missing")
        return snap
