"""Build plumbing: logged commands, failure messages with the log tail, no leaked processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.build_steps import BuildLog, digest, require_tool


def test_failed_command_reports_exit_status_log_path_and_tail(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "x.log"
    with BuildLog(log_path) as log, raises_code(ErrorCode.BUILD_FAILED) as info:
        log.run(["sh", "-c", "echo first; echo the-real-problem >&2; exit 3"], "step one")
    err = info.value
    assert err.code == ErrorCode.BUILD_FAILED
    assert "step one (exit status 3)" in err.message
    assert str(log_path) in err.message
    assert "the-real-problem" in err.message
    assert "the-real-problem" in log_path.read_text()


def test_lines_reach_the_callback_and_the_log(tmp_path: Path) -> None:
    seen: list[str] = []
    with BuildLog(tmp_path / "x.log") as log:
        log.run(["printf", "a\\nb\\n"], "printing", on_line=seen.append)
    assert seen == ["a", "b"]
    assert "a\nb\n" in (tmp_path / "x.log").read_text()


def test_interrupted_command_leaves_no_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"

    def stop(line: str) -> None:
        raise KeyboardInterrupt

    script = f"sleep 300 & echo $! > {pid_file}; echo started; wait"
    with BuildLog(tmp_path / "x.log") as log, pytest.raises(KeyboardInterrupt):
        log.run(["sh", "-c", script], "long step", on_line=stop)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the background child of the build command survived"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def test_missing_tool_names_the_package() -> None:
    with pytest.raises(SmartVMError) as info:
        require_tool("smartvm-no-such-tool", "smartvm-pkg")
    assert info.value.code == ErrorCode.BUILD_TOOL_MISSING
    assert "apt-get install smartvm-pkg" in info.value.message


def test_digest_separates_parts() -> None:
    assert digest("ab", "c") != digest("a", "bc")
    assert digest("ab", "c") == digest("ab", "c")
    assert len(digest("x")) == 16
