"""Address (and slot number) allocation that survives restarts and is safe across processes.

A :class:`LeaseStore` is one JSON file of leases ``index -> owner``. Every change takes an
exclusive ``fcntl`` lock on a sibling ``.lock`` file, re-reads the file, and writes the new
state to ``*.part`` before renaming it over the old one, so concurrent processes never hand
out one index twice and a crash leaves the old state or the new one. A lease names its owner
process (pid plus start time, so a reused pid is not mistaken for the owner); leases of dead
owners are left alone until a sweep removes their devices and releases them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic
from smartvm.host.private_dirs import check_private_dir, ensure_private_dir

DEFAULT_DATA_DIR = Path("/tmp/.smartvm")  # SmartVMOptions.data_dir's default


def default_state_dir() -> Path:
    """Where network leases live: ``$SMARTVM_DATA_DIR/network`` (default ``/tmp/.smartvm/network``).

    A tmp location is right for leases: after a reboot every namespace and TAP is gone too.
    """
    return Path(os.environ.get("SMARTVM_DATA_DIR", str(DEFAULT_DATA_DIR))) / "network"


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


_SELF_START = process_start_time(os.getpid())


@dataclass(frozen=True)
class Lease:
    index: int
    key: str
    pid: int
    start_time: int
    created: float
    meta: dict[str, Any] = field(default_factory=dict)

    def owner_alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time


class LeaseStore:
    """Indices ``first .. last`` (inclusive) handed out to unique keys, persisted in ``path``."""

    def __init__(self, path: Path, first: int, last: int) -> None:
        if first > last:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"empty allocation range {first}..{last}")
        self.path = Path(path)
        self.first = first
        self.last = last

    # -- locking and persistence

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Lease]]:
        """Hold the lock, yield the leases; whatever the block leaves in the dict is written back."""
        try:
            ensure_private_dir(self.path.parent)  # leases steer namespace/TAP cleanup: ours only
            lock_fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"cannot open the address lease file {self.path}: {exc.strerror}; "
                "check SMARTVM_DATA_DIR is writable",
            ) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            leases = self._read()
            before = dict(leases)
            yield leases
            if leases != before:
                self._write(leases)
        finally:
            os.close(lock_fd)  # closing drops the flock

    def _read(self) -> dict[str, Lease]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise SmartVMError(
                ErrorCode.NETWORK_SETUP_FAILED,
                f"address lease file {self.path} is unreadable ({exc}); "
                "run `smartvm network sweep` or remove it when no VM is running",
            ) from exc
        return {item["key"]: Lease(**item) for item in raw.get("leases", [])}

    def _write(self, leases: dict[str, Lease]) -> None:
        ordered = sorted(leases.values(), key=lambda x: x.index)
        data = json.dumps({"version": 1, "leases": [asdict(v) for v in ordered]}, indent=1)
        # Not durable: the rename alone keeps a crashed process from leaving a torn file, and a power
        # loss also wipes every namespace and TAP a lease describes (sweep releases those leases).
        write_atomic(self.path, data)

    # -- public API

    def allocate(
        self,
        key: str,
        meta: dict[str, Any] | None = None,
        *,
        owner_pid: int | None = None,
        index: int | None = None,
    ) -> Lease:
        """The lowest free index (or exactly ``index``) for ``key``.

        Raises DUPLICATE_VM_ID if ``key`` is already leased, ADDRESS_EXHAUSTED if nothing is free.
        """
        pid = owner_pid if owner_pid is not None else os.getpid()
        start = _SELF_START if pid == os.getpid() else process_start_time(pid)
        if start is None:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"owner process {pid} does not exist")
        with self._locked() as leases:
            if key in leases:
                raise SmartVMError(
                    ErrorCode.DUPLICATE_VM_ID,
                    f"{key!r} already holds address lease {leases[key].index}; "
                    "release it first (or `smartvm network sweep` if its owner died)",
                )
            used = {lease.index for lease in leases.values()}
            candidates = [index] if index is not None else range(self.first, self.last + 1)
            index = next((i for i in candidates if i not in used), None)
            if index is None:
                raise SmartVMError(
                    ErrorCode.ADDRESS_EXHAUSTED,
                    f"all {self.last - self.first + 1} addresses in {self.path.name} "
                    "are leased; "
                    "stop VMs, run `smartvm network sweep`, or use a larger subnet",
                )
            lease = Lease(index, key, pid, start, time.time(), dict(meta or {}))
            leases[key] = lease
            return lease

    def update_meta(self, key: str, meta: dict[str, Any]) -> Lease:
        with self._locked() as leases:
            old = leases.get(key)
            if old is None:
                raise SmartVMError(ErrorCode.NETWORK_SETUP_FAILED, f"no address lease for {key!r}")
            new = Lease(old.index, old.key, old.pid, old.start_time, old.created, {**old.meta, **meta})
            leases[key] = new
            return new

    def adopt(self, key: str) -> Lease:
        """Become the owner of ``key``'s lease, left by a process that died (e.g. a crashed sandbox
        manager whose VMs outlived it). Refused while another live process owns it."""
        with self._locked() as leases:
            old = leases.get(key)
            if old is None:
                raise SmartVMError(ErrorCode.NETWORK_SETUP_FAILED, f"no address lease for {key!r}")
            if old.pid != os.getpid() and old.owner_alive():
                raise SmartVMError(
                    ErrorCode.NETWORK_SETUP_FAILED,
                    f"the lease {key!r} belongs to the running process {old.pid}; stop it first",
                )
            new = Lease(old.index, old.key, os.getpid(), _SELF_START or 0, old.created, old.meta)
            leases[key] = new
            return new

    def release(self, key: str) -> Lease | None:
        """Give the index back; releasing an unknown key is not an error (teardown is idempotent)."""
        with self._locked() as leases:
            return leases.pop(key, None)

    def get(self, key: str) -> Lease | None:
        with self._locked() as leases:
            return leases.get(key)

    def leases(self) -> list[Lease]:
        with self._locked() as leases:
            return sorted(leases.values(), key=lambda x: x.index)

    def dead_leases(self) -> list[Lease]:
        return [lease for lease in self.leases() if not lease.owner_alive()]

    def release_if_dead(self, key: str) -> bool:
        """Release ``key`` only if its owner is still dead (checked under the lock)."""
        with self._locked() as leases:
            lease = leases.get(key)
            if lease is None or lease.owner_alive():
                return False
            del leases[key]
            return True


def all_stores(state_dir: Path | None = None) -> list[Path]:
    """Every lease file under ``state_dir`` (for doctor and sweep)."""
    root = state_dir or default_state_dir()
    return sorted(root.glob("*.json")) if check_private_dir(root) else []


def read_leases(path: Path) -> list[Lease]:
    """Leases in ``path`` without knowing its range (read under the lock)."""
    return LeaseStore(path, 0, 0).leases()
