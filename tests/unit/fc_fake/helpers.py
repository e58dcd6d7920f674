"""Small helpers for asserting on the fake Firecracker and on processes."""

from __future__ import annotations

import asyncio
import json
from os import readlink as os_readlink
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


def jailer_invocations(short_tmp: Path) -> list[dict[str, Any]]:
    """Every command line the fake jailer was started with (``FAKE_JAILER_ARGV_LOG``)."""
    log = short_tmp / "jailer.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def processes_rooted_in(directory: Path) -> list[int]:
    """Pids of live processes whose root directory (chroot) is ``directory`` or below it."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            root = Path(os_readlink(proc / "root"))
        except OSError:
            continue
        if root.is_relative_to(directory) and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def text(path: str | Path) -> str:
    """A file's text ('' when missing): /proc entries and logs, from async tests."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""


async def read_until(path: Path, wanted: str) -> str:
    """Poll a log file until ``wanted`` appears in it (5 s at most); its text."""
    for _ in range(500):
        content = text(path)
        if wanted in content:
            return content
        await asyncio.sleep(0.01)
    raise AssertionError(f"{wanted!r} never appeared in {path}")


async def vsock_ping(engine: Any) -> bytes:
    """Send one line through the fake's vsock echo server, via the engine's agent stream."""
    reader, writer = await engine.open_agent_stream(timeout=5)
    writer.write(b"ping\n")
    line: bytes = await reader.readline()
    writer.close()
    return line
