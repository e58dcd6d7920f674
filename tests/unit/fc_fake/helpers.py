"""Small helpers for asserting on the fake Firecracker and on processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def logged_requests(short_tmp: Path) -> list[dict[str, Any]]:
    """Every request the fake executable answered, in order."""
    log = short_tmp / "requests.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_running(executable: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``executable``."""
    pids = []
    needle = str(executable).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids
