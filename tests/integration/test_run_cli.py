"""The main job end to end: `smartvm run -- CMD` boots a real guest (QEMU here), runs CMD, stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SMARTVM = [sys.executable, "-m", "smartvm.cli"]


def _run(runtime_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(runtime_dir), *args],
        capture_output=True,
        timeout=timeout,
    )


def _engine_processes(runtime_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(runtime_dir) in line and "qemu" in line]


def _assert_nothing_left(runtime_dir: Path) -> None:
    assert _engine_processes(runtime_dir) == []
    leftovers = list(runtime_dir.iterdir()) if runtime_dir.exists() else []
    assert leftovers == [], f"runtime dirs left behind: {leftovers}"


def test_uname_prints_guest_kernel(guest_image: object, tmp_path: Path) -> None:
    res = _run(tmp_path, "--", "uname", "-a")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"Linux" in res.stdout and b" 6.1." in res.stdout
    assert os.uname().release.encode() not in res.stdout  # the guest's kernel, not the host's
    _assert_nothing_left(tmp_path)


def test_exit_code_passes_through(guest_image: object, tmp_path: Path) -> None:
    res = _run(tmp_path, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert res.returncode == 7, res.stderr.decode(errors="replace")
    assert res.stdout == b"out\n"
    assert b"err\n" in res.stderr
    _assert_nothing_left(tmp_path)


def test_timeout_exits_124_and_leaves_nothing(guest_image: object, tmp_path: Path) -> None:
    res = _run(tmp_path, "--timeout", "2", "--", "sleep", "60")
    assert res.returncode == 124, res.stderr.decode(errors="replace")
    _assert_nothing_left(tmp_path)


def test_missing_command_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run([*SMARTVM, "run", "--engine", "qemu"], capture_output=True, timeout=60)
    assert res.returncode == 2
    assert b"INVALID_ARGUMENT" in res.stderr and b"smartvm run -- uname -a" in res.stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_vm_cleanly(guest_image: object, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            *SMARTVM,
            "run",
            "--engine",
            "qemu",
            "--runtime-dir",
            str(tmp_path),
            "--",
            "sh",
            "-c",
            "echo started; sleep 60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "SMARTVM_TRACEBACK_ON_SIGUSR1": "1"},
        # as from a terminal: a suite started in the background of a non-interactive shell runs
        # with SIGINT ignored, which its children inherit (and Python then keeps ignoring it)
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"  # the command runs in the guest
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say where it hangs: every thread's stack
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            stacks = proc.communicate()[1].decode(errors="replace")
            raise AssertionError(f"smartvm run ignored Ctrl-C; its threads:\n{stacks}") from None
        assert code == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_nothing_left(tmp_path)
