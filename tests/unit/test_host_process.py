"""HostProcess: spawned children are reaped with their exit code, adopted processes are known by pid +
start time, and only released (detached) children outlive the Python process that spawned them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smartvm.host.process import HostProcess, detachable, proc_stat, running_start_time, tail


async def test_child_exit_code_and_signal(tmp_path: Path) -> None:
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = HostProcess.spawn(["sh", "-c", "echo out; exit 7"], stdout=log, stderr=log)
        sleeper = HostProcess.spawn(["sleep", "60"], stdout=log, stderr=log)
    finally:
        os.close(log)
    assert await done.wait(10) and done.returncode == 7 and not done.is_alive()
    assert (tmp_path / "log").read_text() == "out\n"
    assert sleeper.is_alive() and not await sleeper.wait(0.05)
    assert os.getsid(sleeper.pid) == sleeper.pid  # its own session: Ctrl-C in a terminal does not reach it
    sleeper.kill()
    assert await sleeper.wait(10) and sleeper.returncode == -signal.SIGKILL
    sleeper.kill()  # a no-op once it is gone


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("source_is_target", [False, True])
async def test_passed_descriptors_reach_the_child(
    tmp_path: Path, detached: bool, source_is_target: bool
) -> None:
    """``pass_fds`` gives the child an open file under the number asked for (a restoring QEMU reads
    its stream from fd 3), by both spawners, also when the source already has that number."""
    (tmp_path / "state").write_bytes(b"stream")
    source = os.open(tmp_path / "state", os.O_RDONLY | os.O_CLOEXEC)
    target = source if source_is_target else 7
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with detachable(detached):
            proc = HostProcess.spawn(
                ["cat", f"/proc/self/fd/{target}"], stdout=log, stderr=log, pass_fds={target: source}
            )
    finally:
        os.close(log)
        os.close(source)
    assert await proc.wait(10)
    assert (tmp_path / "log").read_bytes() == b"stream"
    assert proc.returncode == 0


async def test_adopted_process_is_identified_by_start_time() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        start = running_start_time(proc.pid)
        assert start is not None
        assert not HostProcess.adopt(proc.pid, start + 1).is_alive()  # same pid, other process
        adopted = HostProcess.adopt(proc.pid, start)
        assert adopted.is_alive() and adopted.returncode is None
        adopted.terminate()
        assert await adopted.wait(10)
        assert await proc.wait() == -signal.SIGTERM
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_missing_program_raises() -> None:
    with pytest.raises(FileNotFoundError):
        HostProcess.spawn(["/nonexistent/qemu"], stdout=1, stderr=2)


@pytest.mark.parametrize("release", [False, True])
def test_only_released_children_outlive_the_python_process(release: bool) -> None:
    script = (
        "import os\n"
        "from smartvm.host.process import HostProcess, detachable\n"
        "null = os.open(os.devnull, os.O_WRONLY)\n"
        f"with detachable({release}):\n"
        "    p = HostProcess.spawn(['sleep', '60'], stdout=null, stderr=null)\n"
        f"{'p.release()' if release else ''}\n"
        "print(p.pid, p.start_time, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pid, start = (int(x) for x in out.stdout.split())
    adopted = HostProcess.adopt(pid, start)
    try:
        assert adopted.is_alive() is release
    finally:
        adopted.kill()
        asyncio.run(adopted.wait(10))
    stat = proc_stat(pid)
    assert stat is None or stat[1] != start or stat[0] == "Z"


def test_one_log_tail_for_every_log(tmp_path: Path) -> None:
    """Hypervisor, console and build logs share one tail reader: bytes bound, then whole last lines."""
    log = tmp_path / "engine.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail(log, 64).splitlines()[0].startswith("line ")  # starts at a whole line
    assert tail(log, 64 * 1024, lines=3) == "line 997\nline 998\nline 999"
    assert tail(tmp_path / "missing.log", lines=3) == "" and tail(None) == ""
