"""Reconcile at start: make the state store and the host agree again after the last manager ended.

A manager may have been closed (its sandboxes kept running) or killed at any point. For each
sandbox the store does not list as stopped:

- its VM still runs: re-adopted (VM record, network slot lease, disk layer) and running again,
  also when it was killed halfway through a pause or resume;
- it is paused: kept, when its pause files and disk layer are there (else failed);
- its VM is gone: failed, with the reason, and everything it held freed (a sandbox caught in the
  middle of a resume goes back to paused: its pause files are still complete).

Then what nobody claims is swept: VM records of dead hypervisors, runtime dirs whose owner is gone,
network slots of this data dir whose owner died, sandbox directories without a live sandbox and
template builds that never finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from typing import TYPE_CHECKING

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.cow import CowLayer, strategy_named
from smartvm.sandbox.store import SandboxRecord, SandboxState
from smartvm.snapshot import Snapshot
from smartvm.vm import VMState

if TYPE_CHECKING:
    from smartvm.sandbox.manager import SandboxManager

log = logging.getLogger(__name__)
S = SandboxState


async def reconcile(mgr: SandboxManager) -> None:
    store = mgr.store
    recs = await store.call(store.list_sandboxes, states=[s for s in SandboxState if s is not S.STOPPED])
    for rec in recs:
        mgr._recs[rec.id] = rec
        try:
            if rec.state is S.PAUSED:
                await _check_paused(mgr, rec)
            elif rec.state is S.ERROR:
                await mgr._release_all(rec.id)
            else:
                await _adopt(mgr, rec)
        except SmartVMError as exc:
            await mgr._fail(rec.id, exc, "reconcile")
    keep = {
        str(r.network.get("lease"))
        for _, r in mgr._recs.current()
        if r.network.get("lease") and r.id in mgr._live
    }
    await asyncio.to_thread(mgr._svm.prune_detached)
    swept = await mgr.pool.sweep_dead(keep, {"manager": str(mgr.data_dir)})
    if swept:
        log.info("removed %d network slot(s) left by an earlier manager", swept)
    await asyncio.to_thread(_sweep_dirs, mgr)


async def _adopt(mgr: SandboxManager, rec: SandboxRecord) -> None:
    from smartvm.sandbox.manager import _Live, _policy

    try:
        vm = await mgr._svm.attach_vm(rec.id)
    except SmartVMError as exc:
        if (
            rec.state is S.RESUMING
            and rec.pause_dir
            and await asyncio.to_thread(os.path.isdir, rec.pause_dir)
        ):
            await _release_network(mgr, rec)
            await mgr._transition(rec.id, S.PAUSED, detail="the resume was interrupted")
            return
        if rec.state is S.STOPPING:
            await mgr._release_all(rec.id)
            await mgr._transition(rec.id, S.STOPPED)
            return
        raise SmartVMError(ErrorCode.VM_EXITED, f"its VM is gone ({exc.message})") from None
    if rec.state in (S.STARTING, S.STOPPING):  # a create or kill that never finished: finish the kill
        await vm.kill()
        await mgr._release_all(rec.id)
        if rec.state is S.STOPPING:
            await mgr._transition(rec.id, S.STOPPED)
        else:
            await mgr._transition(rec.id, S.ERROR, error="the manager ended while the sandbox was created")
        return
    if vm.state is VMState.PAUSED:  # killed in the middle of a pause: the VM is still whole
        await vm.resume()
    lease = rec.network.get("lease")
    if not lease or not rec.disk_layer:
        await vm.kill()
        raise SmartVMError(ErrorCode.SANDBOX_FAILED, "its record names no network slot or disk layer")
    try:
        slot = mgr.pool.adopt(str(lease), egress=_policy(rec.network))
        slot.port_forwards = {int(h): int(g) for h, g in dict(rec.network.get("ports") or {}).items()}
        layer = CowLayer.from_json(rec.disk_layer)
        strategy = strategy_named(layer.strategy, mgr.engine, mgr.data_dir / "sandboxes")
        disk = await asyncio.to_thread(strategy.reopen, layer)
    except BaseException:
        await vm.kill()
        raise
    mgr._live[rec.id] = _Live(vm, slot, disk)
    if rec.pause_dir:
        shutil.rmtree(rec.pause_dir, ignore_errors=True)
        await mgr._update(rec.id, pause_dir=None)
    if rec.state is not S.RUNNING:
        await mgr._transition(rec.id, S.RUNNING, detail="re-adopted after a manager restart")
    else:
        await mgr.store.call(mgr.store.add_event, rec.id, "adopted", "re-adopted after a manager restart")


async def _check_paused(mgr: SandboxManager, rec: SandboxRecord) -> None:
    if not rec.pause_dir or not rec.disk_layer:
        raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, "its pause record names no state or disk")
    Snapshot.load(rec.pause_dir).check_files()
    layer = CowLayer.from_json(rec.disk_layer)
    for path in layer.paths():
        if not path.exists():
            raise SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"its disk layer {path} is missing")


async def _release_network(mgr: SandboxManager, rec: SandboxRecord) -> None:
    lease = rec.network.get("lease")
    if lease:
        with contextlib.suppress(SmartVMError):
            await mgr.pool.release(mgr.pool.adopt(str(lease)))
        await mgr._update(rec.id, network={k: v for k, v in rec.network.items() if k != "lease"})


def _sweep_dirs(mgr: SandboxManager) -> None:
    """Sandbox dirs no live or paused sandbox owns, pause files whose background deletion a crash cut
    short, and unfinished template builds."""
    from smartvm.sandbox.manager import RESUMED_PREFIX

    wanted = {sid for sid, r in mgr._recs.current() if r.state is not S.ERROR}
    root = mgr.data_dir / "sandboxes"
    for path in root.iterdir() if root.is_dir() else []:
        if not path.is_dir() or path.is_symlink() or not path.name.startswith("sb-"):
            continue
        if path.name not in wanted:
            log.info("removing %s: no sandbox owns it", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        for old in path.glob(f"{RESUMED_PREFIX}*"):
            shutil.rmtree(old, ignore_errors=True)
    templates = mgr.data_dir / "templates"
    for build in templates.glob("*/.*.build") if templates.is_dir() else []:
        shutil.rmtree(build, ignore_errors=True)
