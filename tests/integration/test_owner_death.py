"""No VM outlives its owner by accident: killed smartvm processes leave nothing a later command
cannot clean, and forged records steer nothing (issue 11)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_support import processes_mentioning

from smartvm.host.process import running_start_time

pytestmark = pytest.mark.integration

SMARTVM = [sys.executable, "-m", "smartvm.cli"]


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "rt"
    yield root
    for pid in processes_mentioning(str(root)):  # a failed test must not leak its VMs
        os.kill(pid, signal.SIGKILL)


def _wait_for_hypervisor(proc: subprocess.Popen[bytes], root: Path, timeout: float = 60) -> int:
    """The pid of the QEMU serving a VM under ``root`` once it runs (found by its runtime dir)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        pids = [p for p in processes_mentioning(str(root)) if p != proc.pid]  # not smartvm itself
        if pids:
            time.sleep(1.0)  # let it get past spawning (into boot)
            return pids[0]
        time.sleep(0.05)
    raise AssertionError("QEMU did not start")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _empty(root: Path) -> bool:
    return not root.exists() or list(root.iterdir()) == []


def _run(root: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(root), "--", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_of_run_takes_qemu_along_and_the_next_command_sweeps(guest_image: object, rt: Path) -> None:
    proc = _run(rt, "sleep", "60")
    qemu = _wait_for_hypervisor(proc, rt)
    proc.kill()
    proc.wait()
    assert _gone_within(qemu, 5), "QEMU outlived the smartvm run that was SIGKILLed"
    assert not _empty(rt)  # the dead owner could not clean up ...
    res = subprocess.run(
        [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(rt), "--", "true"], capture_output=True
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert _empty(rt)  # ... the next command swept it


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_unwind_like_ctrl_c(guest_image: object, rt: Path, sig: signal.Signals) -> None:
    proc = _run(rt, "sleep", "60")
    qemu = _wait_for_hypervisor(proc, rt)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 128 + sig
    assert _gone_within(qemu, 5)
    assert _empty(rt)


def test_start_killed_mid_boot_leaves_the_id_reusable(guest_image: object, tmp_path: Path, rt: Path) -> None:
    data = tmp_path / "data"
    # --cold: killed mid-boot (a start restored from a snapshot is ready long before the kill below;
    # a start killed while it makes that snapshot is tested in test_run_snapshots.py)
    argv = [*SMARTVM, "start", "--engine", "qemu", "--cold", "--id", "same", "--data-dir", str(data),
            "--runtime-dir", str(rt)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = _wait_for_hypervisor(proc, rt)
    proc.kill()
    proc.wait()
    res = subprocess.run(argv, capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert _gone_within(first, 5), "the half-started VM's QEMU was not ended by the sweep"
    stop = subprocess.run(
        [*SMARTVM, "stop", "--data-dir", str(data), "same"], capture_output=True, timeout=60
    )
    assert stop.returncode == 0, stop.stderr.decode(errors="replace")
    assert _empty(rt)
    assert processes_mentioning(str(rt)) == []


def _forge(data: Path, vm_id: str, pid: int, runtime_dir: Path) -> None:
    records = data / "vms"
    records.mkdir(parents=True, exist_ok=True)
    start = running_start_time(pid) or 1  # a dead pid: any start time
    record = {
        "id": vm_id,
        "engine": "qemu",
        "pid": pid,
        "pid_start_time": start,
        "runtime_dir": str(runtime_dir),
        "started_at": time.time(),
        "config": {"id": vm_id, "boot_source": {"kernel_image_path": "/boot/vmlinuz"}},
        "engine_data": {
            "engine": "qemu",
            "pid": pid,
            "pid_start_time": start,
            "qmp_socket": str(runtime_dir / "qmp.sock"),
            "agent_socket": str(runtime_dir / "agent.sock"),
        },
    }
    (records / f"{vm_id}.json").write_text(json.dumps(record))


def test_forged_records_kill_and_delete_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    victim_dir = tmp_path / "elsewhere" / "victim"
    victim_dir.mkdir(parents=True)
    (victim_dir / "precious").write_text("keep me")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        _forge(data, "victim", dead.pid, victim_dir)  # "exited": ps would prune its runtime dir
        ps = subprocess.run([*SMARTVM, "ps", "--data-dir", str(data)], capture_output=True, timeout=60)
        assert ps.returncode == 0, ps.stderr.decode(errors="replace")
        assert (victim_dir / "precious").read_text() == "keep me"

        _forge(data, "victim", sleeper.pid, victim_dir)  # "running": stop would end its process
        stop = subprocess.run(
            [*SMARTVM, "stop", "--all", "--data-dir", str(data)], capture_output=True, timeout=60
        )
        assert sleeper.poll() is None, "stop --all killed a process smartvm never started"
        assert (victim_dir / "precious").read_text() == "keep me"
        assert not (data / "vms" / "victim.json").exists(), stop.stderr.decode(errors="replace")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigkill_during_create_snapshot_leaves_no_paused_qemu(
    guest_image: object, tmp_path: Path, rt: Path
) -> None:
    snap = tmp_path / "snap"
    script = f"""
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from guest_support import boot_config
from smartvm import SmartVM, SmartVMOptions
from smartvm.images.guest_image import ensure_default_guest

async def main():
    async with SmartVM(SmartVMOptions(engine="qemu", runtime_dir=Path({str(rt)!r}))) as svm:
        vm = await svm.create_vm(boot_config(ensure_default_guest()))
        await vm.start()
        await vm.pause()
        print("paused", flush=True)
        sys.stdin.readline()
        await vm.create_snapshot(Path({str(snap)!r}) / "vm.state", Path({str(snap)!r}) / "vm.mem")

asyncio.run(main())
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    qemu = _wait_for_hypervisor(proc, rt)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"paused\n"
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while not list(snap.glob("*.part")):  # the snapshot is being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else b""
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert _gone_within(qemu, 5), "a paused QEMU outlived the process that was snapshotting it"
    res = subprocess.run(
        [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(rt), "--", "true"], capture_output=True
    )
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert _empty(rt) and not snap.exists(), "the sweep left the partial snapshot behind"
