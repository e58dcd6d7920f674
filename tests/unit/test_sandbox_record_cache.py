"""The manager's record cache: every current sandbox stays, stopped ones are bounded, and a handle
still knows the state of a sandbox whose record the manager let go."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode
from smartvm.sandbox import SandboxManager
from smartvm.sandbox.record_cache import RecordCache
from smartvm.sandbox.sandbox import Sandbox
from smartvm.sandbox.store import SandboxRecord, SandboxState, new_sandbox_id

S = SandboxState


def _rec(state: SandboxState) -> SandboxRecord:
    return dataclasses.replace(SandboxRecord(new_sandbox_id(), "base"), state=state)


def test_current_records_stay_and_stopped_ones_are_bounded() -> None:
    cache = RecordCache(ended_kept=3)
    running = [_rec(S.RUNNING) for _ in range(5)]
    for rec in running:
        cache[rec.id] = rec
    stopped = [_rec(S.STOPPED) for _ in range(5)]
    for rec in stopped:
        cache[rec.id] = rec
    assert [sid for sid, _ in cache.current()] == [r.id for r in running]  # none evicted
    assert [r.id for r in stopped if r.id in cache] == [r.id for r in stopped[2:]]  # the newest 3
    assert len(cache) == 8
    # a sandbox that stops leaves the current ones; one kept stopped record is the oldest again
    cache[running[0].id] = dataclasses.replace(running[0], state=S.STOPPED)
    assert running[0].id not in {sid for sid, _ in cache.current()}
    assert stopped[2].id not in cache and cache.get(running[0].id) is not None
    assert cache.setdefault(running[1].id, _rec(S.ERROR)).state is S.RUNNING  # the cached one wins


def test_a_handle_keeps_the_last_state_it_saw(tmp_path: Path) -> None:
    mgr = SandboxManager(data_dir=tmp_path / "data")  # never started: only its cache is used
    rec = _rec(S.RUNNING)
    mgr._recs[rec.id] = rec
    handle = Sandbox(mgr, rec.id)
    assert handle.state is S.RUNNING
    mgr._recs[rec.id] = dataclasses.replace(rec, state=S.STOPPED)
    assert handle.state is S.STOPPED
    for _ in range(300):  # more stopped sandboxes than the cache keeps
        other = _rec(S.STOPPED)
        mgr._recs[other.id] = other
    assert rec.id not in mgr._recs
    assert handle.state is S.STOPPED
    with raises_code(ErrorCode.SANDBOX_NOT_FOUND):
        _ = Sandbox(mgr, rec.id).state  # a new handle must ask the manager (``get`` reads the store)


@pytest.mark.parametrize("state", [S.ERROR, S.PAUSED])
def test_failed_and_paused_records_are_current(state: SandboxState) -> None:
    cache = RecordCache(ended_kept=0)
    rec = _rec(state)
    cache[rec.id] = rec
    assert dict(cache.current()) == {rec.id: rec}
