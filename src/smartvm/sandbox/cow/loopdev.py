"""A reference-counted registry of loop devices: one shared read-only device per base image.

State lives in ``<state_dir>/loops.json`` (written atomically under an flock), so a restarted
manager can :meth:`LoopRegistry.reconcile` it with the sandboxes it still knows and
:meth:`LoopRegistry.sweep` loop devices over our files that nothing references. References are
holder ids (sandbox ids), not a bare count, so acquiring or releasing twice is harmless.
Only devices whose backing file is a registered base or lies under an owned root are ever detached.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic

STATE_FILE = "loops.json"


def _losetup(*args: str) -> str:
    try:
        res = subprocess.run(["losetup", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise SmartVMError(ErrorCode.LOOP_DEVICE_FAILED, "losetup is missing: apt-get install mount") from exc
    if res.returncode != 0:
        raise SmartVMError(
            ErrorCode.LOOP_DEVICE_FAILED,
            f"losetup {' '.join(args)} failed: {res.stderr.strip()} (root is needed for loop devices)",
        )
    return res.stdout


def attached_loops() -> dict[str, Path]:
    """Every loop device on the host -> its backing file (``(deleted)`` suffix stripped)."""
    out = _losetup("--json", "--list")
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    found: dict[str, Path] = {}
    for d in devices:
        back = str(d.get("back-file") or "").removesuffix(" (deleted)")
        if back:
            found[str(d["name"])] = Path(back)
    return found


def attach_loop(path: Path, *, read_only: bool) -> str:
    return _losetup("--find", "--show", *(["--read-only"] if read_only else []), str(path)).strip()


def detach_loop(device: str) -> None:
    _losetup("--detach", device)


class LoopRegistry:
    def __init__(self, state_dir: Path, owned_roots: Iterable[Path] = ()) -> None:
        self.state_dir = state_dir
        self.owned_roots = [Path(r).resolve() for r in owned_roots]
        self._lock = threading.Lock()

    @contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """Load, let the caller change, and atomically write the state, under a thread+file lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / STATE_FILE
        with self._lock, open(self.state_dir / f"{STATE_FILE}.lock", "a") as lockf:
            fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
            state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
            state.setdefault("bases", {})
            state.setdefault("private", {})
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                write_atomic(path, json.dumps(state, sort_keys=True, indent=1), durable=True)

    def acquire(self, base_image: Path, holder: str) -> str:
        """The shared read-only loop device of ``base_image``, attached on first use."""
        key = str(base_image.resolve())
        with self._state() as state:
            entry = state["bases"].get(key)
            if entry is not None and attached_loops().get(entry["device"]) != Path(key):
                entry = None  # the device went away (host reboot) or now backs something else
            if entry is None:
                entry = {"device": attach_loop(Path(key), read_only=True), "holders": []}
                state["bases"][key] = entry
            if holder not in entry["holders"]:
                entry["holders"].append(holder)
            return str(entry["device"])

    def release(self, base_image: Path, holder: str) -> None:
        """Drop ``holder``'s reference; the device is detached when nobody holds it."""
        key = str(base_image.resolve())
        with self._state() as state:
            entry = state["bases"].get(key)
            if entry is None:
                return
            if holder in entry["holders"]:
                entry["holders"].remove(holder)
            if not entry["holders"]:
                self._detach_if_ours(entry["device"], Path(key))
                del state["bases"][key]

    def attach_private(self, path: Path, holder: str) -> str:
        """A writable loop device over ``holder``'s own file (a CoW store), recorded so that
        :meth:`sweep` leaves it alone; reused if it is still attached."""
        key = str(path.resolve())
        with self._state() as state:
            entry = state["private"].get(holder)
            if (
                entry is not None
                and entry["file"] == key
                and attached_loops().get(entry["device"]) == Path(key)
            ):
                return str(entry["device"])
            if entry is not None:
                self._detach_if_ours(entry["device"], Path(entry["file"]))
            device = attach_loop(Path(key), read_only=False)
            state["private"][holder] = {"device": device, "file": key}
            return device

    def detach_private(self, holder: str) -> None:
        """Detach ``holder``'s private loop device, if any. Idempotent."""
        with self._state() as state:
            entry = state["private"].pop(holder, None)
            if entry is not None:
                self._detach_if_ours(entry["device"], Path(entry["file"]))

    def private_device(self, holder: str) -> str | None:
        with self._state() as state:
            entry = state["private"].get(holder)
            return str(entry["device"]) if entry else None

    def holders(self, base_image: Path) -> list[str]:
        with self._state() as state:
            entry = state["bases"].get(str(base_image.resolve()))
            return list(entry["holders"]) if entry else []

    def reconcile(self, live_holders: Iterable[str]) -> None:
        """After a restart: forget references of holders that no longer exist, detach what is unused."""
        live = set(live_holders)
        with self._state() as state:
            for key, entry in list(state["bases"].items()):
                entry["holders"] = [h for h in entry["holders"] if h in live]
                if not entry["holders"]:
                    self._detach_if_ours(entry["device"], Path(key))
                    del state["bases"][key]
            for holder, entry in list(state["private"].items()):
                if holder not in live:
                    self._detach_if_ours(entry["device"], Path(entry["file"]))
                    del state["private"][holder]

    def sweep(self) -> list[str]:
        """Detach loop devices over our files (registered bases, files under owned roots) that
        the registry does not reference. Returns the devices detached."""
        swept: list[str] = []
        with self._state() as state:
            referenced = {e["device"] for e in state["bases"].values()}
            referenced |= {e["device"] for e in state["private"].values()}
            bases = {Path(k) for k in state["bases"]}
            for device, backing in attached_loops().items():
                if device in referenced:
                    continue
                if backing in bases or self._owned(backing):
                    detach_loop(device)
                    swept.append(device)
        return swept

    def _owned(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in self.owned_roots)

    @staticmethod
    def _detach_if_ours(device: str, backing: Path) -> None:
        if attached_loops().get(device) == backing:
            detach_loop(device)


def sectors(path_or_device: str | os.PathLike[str]) -> int:
    """Size in 512-byte sectors of a file or block device."""
    fd = os.open(path_or_device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)
