"""The loop device registry on real loop devices: shared base devices, refcounts, reconcile, sweep.

Only loop devices over files in this test's tmp_path are ever detached."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartvm.sandbox.cow.loopdev import LoopRegistry, attach_loop, attached_loops, detach_loop


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    yield tmp_path
    for dev, backing in attached_loops().items():  # whatever a failing test left, ours only
        if tmp_path in backing.parents:
            detach_loop(dev)


def image(path: Path, size: int = 8 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_shared_base_refcounted(work: Path) -> None:
    base = image(work / "base.img")
    reg = LoopRegistry(work / "state", owned_roots=[work])
    dev = reg.acquire(base, "sb-1")
    assert attached_loops()[dev] == base
    assert reg.acquire(base, "sb-2") == dev  # one device per base
    assert reg.acquire(base, "sb-2") == dev  # acquiring twice is one reference
    assert reg.holders(base) == ["sb-1", "sb-2"]
    # a restarted process reads the same refcounts
    assert LoopRegistry(work / "state").holders(base) == ["sb-1", "sb-2"]
    reg.release(base, "sb-1")
    assert dev in attached_loops()
    reg.release(base, "sb-2")
    assert dev not in attached_loops()
    assert reg.holders(base) == []
    reg.release(base, "sb-2")  # idempotent


def test_device_gone_is_reattached(work: Path) -> None:
    base = image(work / "base.img")
    reg = LoopRegistry(work / "state")
    dev = reg.acquire(base, "sb-1")
    detach_loop(dev)  # as after a host reboot
    dev2 = reg.acquire(base, "sb-2")
    assert attached_loops()[dev2] == base
    reg.release(base, "sb-1")
    reg.release(base, "sb-2")
    assert base not in attached_loops().values()


def test_reconcile_drops_dead_holders(work: Path) -> None:
    b1, b2 = image(work / "b1.img"), image(work / "b2.img")
    reg = LoopRegistry(work / "state")
    d1 = reg.acquire(b1, "sb-live")
    reg.acquire(b1, "sb-dead")
    d2 = reg.acquire(b2, "sb-dead")
    LoopRegistry(work / "state").reconcile({"sb-live"})
    assert reg.holders(b1) == ["sb-live"] and reg.holders(b2) == []
    loops = attached_loops()
    assert d1 in loops and d2 not in loops
    reg.release(b1, "sb-live")


def test_sweep_detaches_only_unreferenced_devices_over_our_files(work: Path) -> None:
    ours, foreign_dir = work / "data", work / "elsewhere"
    ours.mkdir()
    foreign_dir.mkdir()
    base = image(ours / "base.img")
    reg = LoopRegistry(work / "state", owned_roots=[ours])
    kept = reg.acquire(base, "sb-1")
    leaked = attach_loop(image(ours / "sb-2.cow"), read_only=False)  # a crash left this behind
    foreign = attach_loop(image(foreign_dir / "other.img"), read_only=True)  # not under our roots
    try:
        assert reg.sweep() == [leaked]
        loops = attached_loops()
        assert kept in loops and foreign in loops and leaked not in loops
    finally:
        detach_loop(foreign)
        reg.release(base, "sb-1")


def test_private_devices_survive_sweep_until_their_holder_is_gone(work: Path) -> None:
    cow = image(work / "sb-1.cow")
    reg = LoopRegistry(work / "state", owned_roots=[work])
    dev = reg.attach_private(cow, "sb-1")
    assert reg.attach_private(cow, "sb-1") == dev  # re-attach after a restart reuses it
    assert reg.sweep() == []
    assert attached_loops()[dev] == cow
    LoopRegistry(work / "state", owned_roots=[work]).reconcile(set())  # sb-1 is gone
    assert dev not in attached_loops() and reg.private_device("sb-1") is None
    reg.detach_private("sb-1")  # idempotent


def test_state_write_never_follows_a_planted_temp_file(work: Path) -> None:
    """The state is replaced through a fresh temp name opened O_NOFOLLOW: a symlink planted at a
    predictable temp name is neither written through nor renamed into place."""
    state = work / "state"
    state.mkdir(mode=0o700)
    (state / "loops.json").write_text(
        '{"bases": {}, "private": {"gone": {"device": "/dev/nope", "file": "/x"}}}'
    )
    victim = work / "victim"
    victim.write_text("keep me")
    (state / ".loops.json.part").symlink_to(victim)
    LoopRegistry(state, owned_roots=[work]).reconcile([])  # forgets "gone": the state changes
    assert victim.read_text() == "keep me"
    assert not (state / "loops.json").is_symlink()
    assert LoopRegistry(state).private_device("gone") is None
