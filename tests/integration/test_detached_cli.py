"""VMs that outlive the command that started them: `smartvm start`, `exec`, `cp`, `ps`, `stop` on QEMU.

Every CLI call is its own process, so each step really re-attaches to the VM through its record.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guest_support import processes_mentioning

pytestmark = pytest.mark.integration

SMARTVM = [sys.executable, "-m", "smartvm.cli"]


@dataclass
class Dirs:
    data: Path
    runtime: Path

    def cli(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        argv = [*SMARTVM, command, "--data-dir", str(self.data), *args]  # options before any `--`
        return subprocess.run(argv, capture_output=True, timeout=timeout)

    def start(self, vm_id: str) -> str:
        res = subprocess.run(
            [*SMARTVM, "start", "--engine", "qemu", "--id", vm_id,
             "--data-dir", str(self.data), "--runtime-dir", str(self.runtime)],
            capture_output=True, timeout=180,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return res.stdout.decode().splitlines()[-1]

    def ps(self) -> list[dict[str, Any]]:
        res = self.cli("ps", "--json")
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        rows: list[dict[str, Any]] = json.loads(res.stdout)
        return rows

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + 10
        while processes_mentioning(str(self.runtime)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_mentioning(str(self.runtime)) == [], "a VM process outlived its VM"
        assert list(self.runtime.iterdir()) == [] if self.runtime.exists() else True
        records = self.data / "vms"
        assert list(records.iterdir()) == [] if records.exists() else True


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[Dirs]:
    d = Dirs(data=tmp_path / "data", runtime=tmp_path / "rt")
    yield d
    for pid in processes_mentioning(str(d.runtime)):  # a failed test must not leak its VMs
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_start_exec_cp_stop(guest_image: object, dirs: Dirs, tmp_path: Path) -> None:
    vm = dirs.start("box1")
    assert vm == "box1"
    [row] = dirs.ps()
    assert (row["id"], row["engine"], row["state"]) == ("box1", "qemu", "running")
    assert _alive(row["pid"]) and Path(row["runtime_dir"]).is_dir()

    res = dirs.cli("exec", vm, "--", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), res.stderr
    res = dirs.cli("exec", vm, "--", "sh", "-c", "echo oops >&2; exit 3")
    assert res.returncode == 3 and b"oops\n" in res.stderr
    res = dirs.cli("exec", vm, "--timeout", "1", "--", "sleep", "60")
    assert res.returncode == 124, res.stderr

    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(300_000) + bytes(range(256)))
    blob.chmod(0o750)
    assert dirs.cli("cp", str(blob), f"{vm}:/tmp/in.bin").returncode == 0
    res = dirs.cli("exec", vm, "--", "stat", "-c", "%a %s", "/tmp/in.bin")
    assert res.stdout.split() == [b"750", str(blob.stat().st_size).encode()], res.stderr
    back = tmp_path / "back.bin"
    res = dirs.cli("cp", f"{vm}:/tmp/in.bin", str(back))
    assert res.returncode == 0, res.stderr
    assert back.read_bytes() == blob.read_bytes() and back.stat().st_mode & 0o777 == 0o750
    res = dirs.cli("cp", "nowhere", "alsonowhere")
    assert res.returncode == 2 and b"INVALID_ARGUMENT" in res.stderr

    res = dirs.cli("stop", vm)
    assert res.returncode == 0, res.stderr
    assert not _alive(row["pid"])
    assert dirs.ps() == []
    table = dirs.cli("ps")
    assert (table.returncode, table.stdout) == (0, b"") and b"no VMs" in table.stderr
    dirs.assert_nothing_left()


def test_a_vm_killed_from_outside_is_pruned(guest_image: object, dirs: Dirs) -> None:
    dirs.start("doomed")
    dirs.start("keeper")
    by_id = {r["id"]: r for r in dirs.ps()}
    assert set(by_id) == {"doomed", "keeper"}
    doomed = by_id["doomed"]
    os.kill(doomed["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(doomed["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)

    rows = {r["id"]: r["state"] for r in dirs.ps()}
    assert rows == {"doomed": "exited", "keeper": "running"}  # reported once ...
    assert [r["id"] for r in dirs.ps()] == ["keeper"]  # ... then forgotten
    assert not Path(doomed["runtime_dir"]).exists()
    res = dirs.cli("exec", "doomed", "--", "true")
    assert res.returncode == 2 and b"VM_NOT_FOUND" in res.stderr

    res = dirs.cli("stop", "--all")
    assert res.returncode == 0 and res.stdout.split() == [b"keeper"], res.stderr
    assert dirs.ps() == []
    dirs.assert_nothing_left()


def test_stop_of_an_unknown_vm(dirs: Dirs) -> None:
    res = dirs.cli("stop", "no-such-vm")
    assert res.returncode == 2
    assert b"VM_NOT_FOUND" in res.stderr


def test_a_second_exec_and_cp_run_while_one_exec_runs(
    guest_image: object, dirs: Dirs, tmp_path: Path
) -> None:
    """Each CLI process gets its own agent channel (QEMU: one of several virtio-serial ports), so a
    long `exec` does not block the next `exec` or `cp` of the same detached VM."""
    vm = dirs.start("busy")
    argv = [*SMARTVM, "exec", "--data-dir", str(dirs.data), vm, "--", "sh", "-c", "echo started; sleep 5"]
    long = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert long.stdout is not None
        assert long.stdout.readline() == b"started\n"  # the long exec holds its channel now
        blob = tmp_path / "blob.bin"
        blob.write_bytes(bytes(range(256)) * 1000)
        t0 = time.monotonic()
        res = dirs.cli("exec", vm, "--", "echo", "second", timeout=60)
        assert (res.returncode, res.stdout) == (0, b"second\n"), res.stderr
        res = dirs.cli("cp", str(blob), f"{vm}:/tmp/blob.bin", timeout=60)
        assert res.returncode == 0, res.stderr
        took = time.monotonic() - t0
        assert long.poll() is None, f"the second exec and cp took {took:.1f}s: they waited for the first"
        assert long.wait(timeout=60) == 0, long.stderr.read() if long.stderr else b""
    finally:
        if long.poll() is None:
            long.kill()
        long.wait()
    res = dirs.cli("exec", vm, "--", "md5sum", "/tmp/blob.bin", timeout=60)
    assert res.stdout.split()[0].decode() == hashlib.md5(blob.read_bytes()).hexdigest(), res.stderr
    assert dirs.cli("stop", vm).returncode == 0
    dirs.assert_nothing_left()
