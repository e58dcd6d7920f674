"""Clones of one snapshot share no RNG state, and whatever their first request is (exec, files or
processes) it sees the host's clock: the post-restore hygiene runs once, before any request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config

pytestmark = pytest.mark.integration

CLONES = 5
SNAPSHOT_AGE_S = 300.0  # the guest clock is set this far back before the snapshot: an "old" snapshot
TOLERANCE_S = 10.0  # far below the age, generous for a loaded machine
# Linux 6.1 reseeds its CRNG every uptime/2 s during the first 2 minutes of uptime, then at the first
# read 60 s after the last reseed: a template past both, whose CRNG was just reseeded, makes clones
# that share their RNG state for a minute (as real templates do).
TEMPLATE_UPTIME_S = 125.0
RANDOM = "import os; print(os.urandom(16).hex()); print(open('/dev/urandom', 'rb').read(16).hex())"


async def _first_request_clock(clone: Any, first: str) -> float:
    """The guest's wall clock as seen by a first request of kind ``first``."""
    if first == "files":
        await clone.files.write("/tmp/now", b"x")
        return float((await clone.files.stat("/tmp/now")).mtime)
    if first == "processes":
        proc = await clone.processes.start(["date", "+%s"])
        return float((await clone.processes.wait(proc.pid, timeout=30)).stdout_text.strip())
    # all three at once: the hygiene must still run exactly once, before every one of them
    _, _, result = await asyncio.gather(
        clone.files.write("/tmp/now", b"x"),
        clone.processes.list(),
        clone.exec(["date", "+%s"], timeout=30),
    )
    return min(float(result.stdout_text.strip()), float((await clone.files.stat("/tmp/now")).mtime))


async def test_clones_get_own_randomness_and_the_clock_first(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    # no virtio-rng: it feeds fresh host bytes into each clone's pool, which hides the shared state
    vm = await svm.create_vm(boot_config(guest_image, entropy=None))
    await vm.start()
    await vm.wait_ready(120)
    uptime = float((await vm.files.read_text("/proc/uptime")).split()[0])
    await asyncio.sleep(max(0.0, TEMPLATE_UPTIME_S - uptime))
    await vm.exec(["head", "-c", "16", "/dev/urandom"], timeout=30)  # the CRNG's last reseed: now
    await vm.agent.set_time(time.time() - SNAPSHOT_AGE_S)  # as if the snapshot were 5 minutes old
    snapdir = tmp_path / "snap"
    await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
    await vm.kill()

    urandom: set[str] = set()
    dev_urandom: set[str] = set()
    for i in range(CLONES):
        clone = await svm.restore_vm(snapdir, vm_id=f"clone{i}")
        try:
            first = ("files", "processes", "all")[i % 3]
            host_before = time.time()
            guest_now = await _first_request_clock(clone, first)
            assert guest_now > host_before - TOLERANCE_S, (
                f"first request via {first}: guest clock {host_before - guest_now:.0f}s behind the host"
            )
            result = await clone.exec(["python3", "-c", RANDOM], timeout=60)
            assert result.exit_code == 0, result
            py_value, dev_value = result.stdout_text.split()
            urandom.add(py_value)
            dev_urandom.add(dev_value)
        finally:
            await clone.kill()
    assert len(urandom) == CLONES, f"os.urandom(16) repeated across clones: {sorted(urandom)}"
    assert len(dev_urandom) == CLONES, f"/dev/urandom repeated across clones: {sorted(dev_urandom)}"


async def test_a_clone_detached_before_any_request_still_gets_the_clock(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)
    await vm.agent.set_time(time.time() - SNAPSHOT_AGE_S)
    snapdir = tmp_path / "snap"
    await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem", pause_vm=True)
    await vm.kill()

    clone = await svm.restore_vm(snapdir, vm_id="detached-clone", detachable=True)
    await clone.detach()  # whoever attaches does not know it was restored
    attached = await svm.attach_vm("detached-clone")
    try:
        host_before = time.time()
        guest_now = await _first_request_clock(attached, "files")
        assert guest_now > host_before - TOLERANCE_S, f"guest clock {host_before - guest_now:.0f}s behind"
    finally:
        await attached.kill()
