"""The runtime-dir sweep removes only what a dead owner left, and kills only processes it can prove
it started (pid + start time + a command line naming the dir)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from smartvm.host.process import running_start_time
from smartvm.host.sweep import HYPERVISOR_FILE, OWNER_FILE, claim, sweep


def _never(record: Path, runtime_dir: Path) -> bool:
    return False


def _dead_owner(path: Path) -> None:
    (path / OWNER_FILE).write_text(json.dumps({"pid": 1, "start_time": -1}))


def test_a_dir_whose_owner_lives_is_kept(tmp_path: Path) -> None:
    vm = tmp_path / "vm1"
    vm.mkdir()
    claim(vm)
    assert sweep(tmp_path, set(), _never) == [] and vm.is_dir()


def test_an_orphan_dir_goes_with_its_own_hypervisor(tmp_path: Path) -> None:
    vm = tmp_path / "vm1"
    vm.mkdir()
    _dead_owner(vm)
    naps = "import time; time.sleep(300)"
    hyp = subprocess.Popen([sys.executable, "-c", naps, str(vm / "qmp.sock")])  # names its runtime dir
    try:
        for _ in range(500):  # until the child has exec'd (before that it has the parent's cmdline)
            if str(vm).encode() in Path(f"/proc/{hyp.pid}/cmdline").read_bytes():
                break
            time.sleep(0.01)
        start = running_start_time(hyp.pid)
        (vm / HYPERVISOR_FILE).write_text(json.dumps({"pid": hyp.pid, "start_time": start}))
        assert sweep(tmp_path, set(), _never) == [vm] and not vm.exists()
        assert hyp.wait(timeout=5) == -9
    finally:
        hyp.kill()
        hyp.wait()


def test_an_unrelated_process_named_by_a_dir_is_never_killed(tmp_path: Path) -> None:
    vm = tmp_path / "vm1"
    vm.mkdir()
    _dead_owner(vm)
    other = subprocess.Popen(["sleep", "300"])  # right pid and start time, but not ours
    try:
        start = running_start_time(other.pid)
        (vm / HYPERVISOR_FILE).write_text(json.dumps({"pid": other.pid, "start_time": start}))
        assert sweep(tmp_path, set(), _never) == [vm]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_dir_of_an_older_smartvm_without_owner_file_is_left_alone(tmp_path: Path) -> None:
    vm = tmp_path / "vm1"
    vm.mkdir()
    (vm / "console.log").write_text("x")
    assert sweep(tmp_path, set(), _never) == [] and vm.is_dir()
