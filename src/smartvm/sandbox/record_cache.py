"""The manager's in-memory copy of sandbox records, bounded for a long-running service.

Every record that is not ``stopped`` stays (the reaper, capacity and reconcile walk them). Stopped
sandboxes are history: SQLite keeps them, and only the most recent ``ended_kept`` stay in memory so
that a handle's ``state`` right after ``kill()`` needs no I/O. Without the bound, a service that
creates and kills sandboxes all day would hold every record it ever made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from smartvm.sandbox.store import SandboxRecord, SandboxState

ENDED_KEPT = 256


class RecordCache:
    def __init__(self, ended_kept: int = ENDED_KEPT) -> None:
        self._current: dict[str, SandboxRecord] = {}
        self._ended: OrderedDict[str, SandboxRecord] = OrderedDict()
        self._ended_kept = ended_kept

    def __setitem__(self, sid: str, rec: SandboxRecord) -> None:
        if rec.state is SandboxState.STOPPED:
            self._current.pop(sid, None)
            self._ended[sid] = rec
            self._ended.move_to_end(sid)
            while len(self._ended) > self._ended_kept:
                self._ended.popitem(last=False)
        else:
            self._ended.pop(sid, None)
            self._current[sid] = rec

    def get(self, sid: str) -> SandboxRecord | None:
        return self._current.get(sid) or self._ended.get(sid)

    def __contains__(self, sid: object) -> bool:
        return sid in self._current or sid in self._ended

    def setdefault(self, sid: str, rec: SandboxRecord) -> SandboxRecord:
        found = self.get(sid)
        if found is None:
            self[sid] = rec
            return rec
        return found

    def current(self) -> Iterator[tuple[str, SandboxRecord]]:
        """(id, record) of every sandbox that is not stopped, safe to use while records change."""
        return iter(list(self._current.items()))

    def __len__(self) -> int:
        return len(self._current) + len(self._ended)
