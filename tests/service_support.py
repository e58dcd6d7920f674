"""`smartvm serve` as a real subprocess on a free loopback port, for service tests.

``--port 0`` lets the kernel pick the port and the service prints the URL it got once it is ready,
so there is no race over free ports. Stopping sends SIGTERM and waits; a process that does not stop
is killed and the test fails.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from smartvm.service.keys import KeyStore


def make_key(data_dir: Path, name: str = "test") -> str:
    with KeyStore(data_dir) as store:
        return store.create(name)[0]


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    stdout: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send ``sig`` and wait; returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"smartvm serve did not stop within {timeout}s after signal {sig}") from None
        return self.proc.returncode, err


def serve_command(data_dir: Path, runtime_dir: Path, *args: str) -> list[str]:
    """``smartvm serve`` on the QEMU engine with a test's own data and runtime dirs."""
    return [
        *(sys.executable, "-m", "smartvm.cli", "serve", "--engine", "qemu"),
        *("--data-dir", str(data_dir), "--runtime-dir", str(runtime_dir), *args),
    ]


def start_serve(data_dir: Path, runtime_dir: Path, *args: str, timeout: float = 60.0) -> Served:
    """Start ``smartvm serve --port 0`` and wait for its URL; raise with its stderr if it exits first."""
    cmd = serve_command(data_dir, runtime_dir, "--port", "0", *args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("http://"):
                return Served(proc, line.strip(), lines)
    finally:
        sel.close()
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"smartvm serve printed no URL (exit {proc.returncode}): {err[-2000:]}")


@contextmanager
def serving(data_dir: Path, runtime_dir: Path, *args: str) -> Iterator[Served]:
    served = start_serve(data_dir, runtime_dir, *args)
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            served.stop()


CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SMARTVM_TEST_ARTIFACTS") or REPO / "test-artifacts")


def chromium_or_skip() -> Path:
    """Debian's chromium (installed by scripts/setup): Playwright drives it, it downloads no browser."""
    import pytest

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (scripts/setup does)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
    return CHROMIUM


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"
