"""Who owns a runtime dir, and the sweep that removes the dirs (and hypervisors) whose owner is gone.

Each runtime dir holds ``owner.json``: the process that created it (pid + start time), or, once the VM
is detached, the record file that owns it. ``hypervisor.json`` names the hypervisor spawned for it. A
sweep removes a dir only when its owner is dead, and kills its hypervisor only when that process is
provably ours: same pid, same start time, and a command line that references the dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smartvm.host.atomic_write import write_atomic
from smartvm.host.process import HostProcess, running_start_time

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
HYPERVISOR_FILE = "hypervisor.json"
PARTIAL_FILE = "partial-snapshot.json"  # a snapshot being written: where, and what this VM created
_MANIFEST = "snapshot.json"
# An empty dir without an owner file younger than this may be between its mkdir and claim().
_UNCLAIMED_GRACE_S = 60.0


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data))


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def claim(runtime_dir: Path) -> None:
    """Record this process as the owner of ``runtime_dir`` (written right after the mkdir)."""
    pid = os.getpid()
    write_json_atomic(runtime_dir / OWNER_FILE, {"pid": pid, "start_time": running_start_time(pid)})


def hand_to_record(runtime_dir: Path, record_path: Path, pid: int, start_time: int) -> None:
    """The dir now belongs to a detached VM's record (whose hypervisor is ``pid``), not to the process
    that created it. Written after the record, so the dir is never without a live owner."""
    if runtime_dir.is_dir() and not runtime_dir.is_symlink():
        write_json_atomic(
            runtime_dir / OWNER_FILE, {"record": str(record_path), "pid": pid, "start_time": start_time}
        )


def owner_of(runtime_dir: Path) -> dict[str, Any] | None:
    return read_json(runtime_dir / OWNER_FILE)


def note_hypervisor(runtime_dir: Path, proc: HostProcess) -> None:
    """Remember the hypervisor of ``runtime_dir`` so that a sweep can end it if its owner dies."""
    write_json_atomic(runtime_dir / HYPERVISOR_FILE, {"pid": proc.pid, "start_time": proc.start_time})


def note_partial(runtime_dir: Path, snapshot_dir: Path, made: Path | None) -> None:
    """A snapshot of this VM is being written to ``snapshot_dir`` (``made``: the top dir created for it)."""
    write_json_atomic(
        runtime_dir / PARTIAL_FILE, {"dir": str(snapshot_dir), "made": str(made) if made else None}
    )


def clear_partial(runtime_dir: Path) -> None:
    (runtime_dir / PARTIAL_FILE).unlink(missing_ok=True)


def _remove_partial_snapshot(runtime_dir: Path) -> None:
    """Undo what a snapshot interrupted by its owner's death left: ``*.part`` files, and the dirs made
    for it unless a finished snapshot (its manifest) is in them."""
    data = read_json(runtime_dir / PARTIAL_FILE)
    if data is None or not isinstance(data.get("dir"), str):
        return
    snapshot_dir = Path(data["dir"])
    with contextlib.suppress(OSError):
        for part in snapshot_dir.glob("*.part"):
            if part.is_file() and not part.is_symlink():
                part.unlink()
    made = data.get("made")
    if isinstance(made, str) and not (snapshot_dir / _MANIFEST).exists():
        log.info("removing the unfinished snapshot dir %s", made)
        shutil.rmtree(made, ignore_errors=True)


def references(pid: int, runtime_dir: Path) -> bool:
    """Whether the command line of ``pid`` names ``runtime_dir`` (or a path inside it)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    root = str(runtime_dir)
    return any(arg == root or root + "/" in arg for arg in raw.decode(errors="replace").split("\0"))


def is_our_process(pid: int, start_time: int, runtime_dir: Path) -> bool:
    """Pid and start time match a running process whose command line references ``runtime_dir``."""
    return running_start_time(pid) == start_time and references(pid, runtime_dir)


def hypervisor_of(runtime_dir: Path) -> tuple[int, int] | None:
    data = read_json(runtime_dir / HYPERVISOR_FILE)
    if data is None or not isinstance(data.get("pid"), int) or not isinstance(data.get("start_time"), int):
        return None
    return data["pid"], data["start_time"]


RecordCheck = Callable[[Path, Path], bool]


def _owner_alive(runtime_dir: Path, record_owns: RecordCheck) -> bool:
    data = owner_of(runtime_dir)
    if data is None:
        return True  # made by an older smartvm, or between mkdir and claim(): see _remove_unclaimed
    pid, start = data.get("pid"), data.get("start_time")
    if "record" in data and record_owns(Path(str(data["record"])), runtime_dir):
        return True
    # Otherwise (also for a record of another data dir: another SmartVM or sandbox manager sharing
    # this runtime root) the dir lives while its process does: this file was written by smartvm in
    # a private dir, so its pid + start time can be trusted.
    return isinstance(pid, int) and start is not None and running_start_time(pid) == start


def _remove_unclaimed(runtime_dir: Path) -> bool:
    """An owner killed between mkdir and claim() leaves an empty dir without owner file: rmdir it
    once old enough (a dir with content and no owner file is an older smartvm's: left alone)."""
    if owner_of(runtime_dir) is not None:
        return False
    with contextlib.suppress(OSError):
        if time.time() - runtime_dir.stat().st_mtime > _UNCLAIMED_GRACE_S:
            runtime_dir.rmdir()  # fails unless empty
            return True
    return False


def sweep(runtime_root: Path, live_record_dirs: set[Path], record_owns: RecordCheck) -> list[Path]:
    """Remove the runtime dirs under ``runtime_root`` whose owner is gone; the dirs removed.

    ``live_record_dirs``: dirs named by records whose process still runs (never touched);
    ``record_owns(record_file, dir)``: whether that record, read now, is valid, alive and owns dir.
    """
    removed: list[Path] = []
    try:
        entries = list(runtime_root.iterdir())
    except OSError:
        return removed
    for path in entries:
        if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
            continue
        if path in live_record_dirs:
            continue
        if _remove_unclaimed(path):
            removed.append(path)
            continue
        if _owner_alive(path, record_owns):
            continue
        hypervisor = hypervisor_of(path)
        if hypervisor is not None and is_our_process(*hypervisor, path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                fd = os.pidfd_open(hypervisor[0])
                try:
                    if is_our_process(*hypervisor, path):  # the pidfd pins the process we checked
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)
        _remove_partial_snapshot(path)
        log.info("removing runtime dir %s: its owner is gone", path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
