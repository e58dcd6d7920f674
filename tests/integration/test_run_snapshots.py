"""Snapshot-started `smartvm run` / `smartvm start` on real guests (QEMU): the first run of a guest
keeps a snapshot of the ready VM in the cache, later runs restore it (issue 16).

Every test works on a private cache (``SMARTVM_CACHE_DIR``) holding the session's kernel and a copy
of its root filesystem, and a private runtime root on tmpfs (as in normal use: guest RAM is then a
separate memory file in the snapshot). ``TMP_MTIME`` tells restored guests from booted ones: the
template's warm-up wrote and removed a file in the guest's tmpfs ``/tmp`` just before the snapshot,
so every guest restored from it shows that moment as ``/tmp``'s mtime, to the nanosecond, and a
booted guest the moment it mounted ``/tmp``. (Counting forks since boot does not: kernel worker
threads come and go with timing, and the warm-up forks only a few processes.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guest_support import processes_mentioning

from smartvm.host.storage import clone_file

pytestmark = pytest.mark.integration

SMARTVM = [sys.executable, "-m", "smartvm.cli"]
TMP_MTIME = "stat -c %y /tmp"  # the warm-up's last write in a restored guest, its boot in a booted one
Done = subprocess.CompletedProcess[bytes]


@dataclass
class Env:
    cache: Path
    rt: Path

    @property
    def rootfs(self) -> Path:
        return next((self.cache / "rootfs").glob("*/rootfs.ext4"))

    def run(self, *cmd: str, cold: bool = False, rt: Path | None = None) -> Done:
        argv = self.argv(*cmd, cold=cold, rt=rt)
        return subprocess.run(argv, capture_output=True, timeout=600, env=self.env())

    def argv(self, *cmd: str, cold: bool = False, rt: Path | None = None) -> list[str]:
        flags = ["--cold"] if cold else []
        return [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(rt or self.rt), *flags, "--", *cmd]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SMARTVM_CACHE_DIR": str(self.cache)}

    def out(self, *cmd: str, cold: bool = False, rt: Path | None = None) -> str:
        res = self.run(*cmd, cold=cold, rt=rt)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res.stdout.decode()

    def entries(self) -> list[Path]:
        """Everything in the run-snapshot cache (hidden build or trash dirs included)."""
        root = self.cache / "run-snapshots"
        return sorted(root.iterdir()) if root.exists() else []

    def entry(self) -> Path:
        [entry] = self.entries()
        return entry

    def assert_nothing_running(self) -> None:
        deadline = time.monotonic() + 10
        while processes_mentioning(str(self.rt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(str(self.rt)) == [], "a VM process outlived its run"
        assert not self.rt.exists() or list(self.rt.iterdir()) == [], list(self.rt.rglob("*"))


def _build_id(entry: Path) -> str:
    return str(json.loads((entry / "seal.json").read_text())["build_id"])


@pytest.fixture
def env(tmp_path: Path, guest_image: Any) -> Iterator[Env]:
    cache = tmp_path / "cache"
    kernel = cache / "kernels" / guest_image.kernel_path.parent.name
    kernel.mkdir(parents=True)
    (kernel / "vmlinux").symlink_to(guest_image.kernel_path)  # only read
    rootfs = cache / "rootfs" / guest_image.rootfs_path.parent.name
    rootfs.mkdir(parents=True)
    clone_file(guest_image.rootfs_path, rootfs / "rootfs.ext4")  # a copy: tests change it
    rt = Path(tempfile.mkdtemp(prefix="svsnap", dir="/dev/shm"))
    try:
        yield Env(cache, rt)
    finally:
        for pid in processes_mentioning(str(rt)):  # a failed test must not leak its VMs
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(rt, ignore_errors=True)


def test_output_and_exit_code_are_those_of_a_cold_boot(env: Env) -> None:
    script = "echo out; echo err >&2; seq 1 200000 | md5sum; ls /; id -un; pwd; exit 7"
    cold = env.run("sh", "-c", script, cold=True)
    assert not env.entries(), "--cold made a snapshot"
    first = env.run("sh", "-c", script)  # makes the snapshot, then restores it
    warm = env.run("sh", "-c", script)
    for res in (cold, first, warm):
        assert res.returncode == 7, res.stderr.decode(errors="replace")
        assert (res.stdout, res.stderr) == (cold.stdout, cold.stderr)
    assert b"out\n" in cold.stdout and cold.stderr == b"err\n"

    build = _build_id(env.entry())  # one entry, no build or trash dirs
    cold = env.out("sh", "-c", TMP_MTIME, cold=True)
    warm = {env.out("sh", "-c", TMP_MTIME) for _ in range(2)}
    assert len(warm) == 1 and cold not in warm, f"/tmp changed at {warm} (warm), {cold} (cold): booted"
    assert _build_id(env.entry()) == build
    env.assert_nothing_running()


def test_each_restored_run_gets_fresh_randomness_the_host_time_and_its_own_hostname(env: Env) -> None:
    env.out("true")  # makes the snapshot
    time.sleep(5)  # a restored guest that keeps the snapshot's clock is now 5 s behind
    script = (
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
        "python3 -c 'import random, time; print(random.getrandbits(64)); print(time.time())'; hostname"
    )
    seen = []
    for _ in range(2):
        before = time.time()
        urandom, rand, guest_time, hostname = env.out("sh", "-c", script).split()
        after = time.time()
        assert before - 1.0 <= float(guest_time) <= after + 1.0, (before, guest_time, after)
        assert re.fullmatch(r"vm-[0-9a-f]{12}", hostname), hostname
        seen.append((urandom, rand, hostname))
    (u1, r1, h1), (u2, r2, h2) = seen
    assert u1 != u2, "two runs restored from one snapshot read the same /dev/urandom bytes"
    assert r1 != r2, "two runs restored from one snapshot got the same Python random seed"
    assert h1 != h2
    assert re.fullmatch(r"vm-[0-9a-f]{12}\n", env.out("hostname", cold=True))  # as a cold boot names it
    env.assert_nothing_running()


def test_changing_the_rootfs_rebuilds_the_snapshot(env: Env, tmp_path: Path) -> None:
    assert env.out("sh", "-c", "cat /marker 2>/dev/null || echo none") == "none\n"
    old = env.entry()
    marker = tmp_path / "marker"
    marker.write_text("new rootfs\n")
    subprocess.run(["debugfs", "-w", "-R", f"write {marker} marker", str(env.rootfs)], check=True,
                   capture_output=True)  # fmt: skip
    assert env.out("cat", "/marker") == "new rootfs\n"
    assert len(env.entries()) == 2 and old in env.entries()  # a new entry; the old one is kept (bounded)
    assert env.out("cat", "/marker") == "new rootfs\n"
    assert len(env.entries()) == 2
    env.assert_nothing_running()


def test_two_concurrent_first_runs_both_succeed_and_leave_one_snapshot(env: Env) -> None:
    pipe = subprocess.PIPE
    argvs = [env.argv("echo", f"run{i}") for i in range(2)]
    procs = [subprocess.Popen(argv, env=env.env(), stdout=pipe, stderr=pipe) for argv in argvs]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=600)
        assert (proc.returncode, out) == (0, f"run{i}\n".encode()), err.decode(errors="replace")
    entry = env.entry()  # exactly one, and no build or trash dirs
    assert (entry / "seal.json").is_file()
    assert env.out("echo", "again") == "again\n"
    assert env.entries() == [entry] and _build_id(entry) == _build_id(env.entry())
    env.assert_nothing_running()


def _keep_mtime(path: Path, damage: Any) -> None:
    st = path.stat()
    damage(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGES = {
    "truncated memory file": lambda e: os.truncate(e / "snapshot" / "memory", 4096),
    "truncated state file": lambda e: os.truncate(e / "snapshot" / "vm.state", 100),
    "missing disk.img": lambda e: (e / "disk.img").unlink(),
    "garbage manifest": lambda e: (e / "snapshot" / "snapshot.json").write_text("{garbage"),
    "state bytes changed, size and mtime kept": lambda e: _keep_mtime(
        e / "snapshot" / "vm.state", lambda p: p.write_bytes(b"\xff" * p.stat().st_size)
    ),
    "no seal (killed before it was written)": lambda e: (e / "seal.json").unlink(),
}


def test_a_damaged_snapshot_is_detected_thrown_away_and_rebuilt(env: Env) -> None:
    assert env.out("echo", "ok") == "ok\n"
    for what, damage in DAMAGES.items():
        entry = env.entry()
        build = _build_id(entry)
        damage(entry)
        res = env.run("sh", "-c", "echo ok; cat /etc/hostname")
        assert (res.returncode, res.stdout) == (0, b"ok\nsmartvm\n"), f"{what}: {res.stderr!r}"
        assert env.entries() == [entry], f"{what}: left {env.entries()}"
        assert _build_id(entry) != build, f"{what}: the damaged snapshot was used, not rebuilt"
    env.assert_nothing_running()


def test_a_snapshot_the_hypervisor_refuses_is_rebuilt(env: Env, tmp_path: Path) -> None:
    """Damage the seal cannot see (guest RAM inside a large state stream, size and mtime kept) is
    found by the failed restore; the entry is then rebuilt and the run succeeds."""
    disk_rt = tmp_path / "rt"  # not tmpfs: guest RAM travels inside the state stream
    assert env.out("echo", "ok", rt=disk_rt) == "ok\n"
    entry = env.entry()
    build = _build_id(entry)
    state = entry / "snapshot" / "vm.state"
    assert not (entry / "snapshot" / "memory").exists() and state.stat().st_size > 8 << 20

    def scribble(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"\xff" * (4 << 20))

    _keep_mtime(state, scribble)
    assert env.out("echo", "ok", rt=disk_rt) == "ok\n"
    assert env.entries() == [entry] and _build_id(entry) != build
    assert processes_mentioning(str(disk_rt)) == [] and not disk_rt.exists()  # emptied and removed


def test_sigkill_of_a_restored_run_takes_its_vm_and_disk_along(env: Env) -> None:
    env.out("true")  # makes the snapshot
    proc = subprocess.Popen(env.argv("sh", "-c", "echo started; sleep 60"), env=env.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    [qemu] = [pid for pid in processes_mentioning(str(env.rt)) if pid != proc.pid]
    layers = list(env.rt.glob("*/disk/rootfs.qcow2"))
    assert len(layers) == 1, list(env.rt.rglob("*"))  # its copy-on-write disk is in its runtime dir
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while qemu in processes_mentioning(str(env.rt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu not in processes_mentioning(str(env.rt)), "QEMU outlived the smartvm run that was SIGKILLed"
    assert env.out("true") == ""  # the next run sweeps what the killed one left
    env.assert_nothing_running()
    assert len(env.entries()) == 1


def test_start_restores_the_snapshot_and_start_cold_boots(env: Env, tmp_path: Path) -> None:
    data = tmp_path / "data"

    def cli(*args: str) -> str:
        res = subprocess.run([*SMARTVM, *args], capture_output=True, timeout=600, env=env.env())
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res.stdout.decode()

    assert env.out("true") == ""  # makes the snapshot
    dirs = ("--data-dir", str(data), "--runtime-dir", str(env.rt))
    assert cli("start", "--engine", "qemu", "--id", "box1", *dirs).splitlines()[-1] == "box1"
    assert list(env.rt.glob("box1/disk/rootfs.qcow2"))  # restored, with its disk in its runtime dir
    assert cli("start", "--engine", "qemu", "--cold", "--id", "box2", *dirs).splitlines()[-1] == "box2"
    assert not list(env.rt.glob("box2/disk/*")) and list(env.rt.glob("box2/drives/rootfs.ext4"))  # booted
    for box in ("box1", "box2"):
        assert cli("exec", "--data-dir", str(data), box, "--", "hostname") == f"{box}\n"
    cli("stop", "--data-dir", str(data), "--all")
    env.assert_nothing_running()


def _snapshot_vms(env: Env) -> list[int]:
    """The processes of the VM a snapshot is being made of. Not just any process naming the runtime
    dir: a child the starter forks shows the starter's own command line until it execs."""
    return sorted(set(processes_mentioning(str(env.rt))) & set(processes_mentioning("tpl-run")))


def test_start_killed_while_it_makes_the_snapshot_leaves_nothing_and_the_id_reusable(
    env: Env, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    argv = [*SMARTVM, "start", "--engine", "qemu", "--id", "same", "--data-dir", str(data),
            "--runtime-dir", str(env.rt)]  # fmt: skip
    proc = subprocess.Popen(argv, env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (builders := _snapshot_vms(env)):  # the VM being snapshotted
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    [builder] = builders
    proc.kill()
    proc.wait()
    res = subprocess.run(argv, env=env.env(), capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert builder not in processes_mentioning(str(env.rt)), "the half-built snapshot's VM survived"
    assert [p.name for p in env.entries()] == [env.entry().name]  # the interrupted build left nothing
    stop = [*SMARTVM, "stop", "--data-dir", str(data), "same"]
    res = subprocess.run(stop, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    env.assert_nothing_running()
