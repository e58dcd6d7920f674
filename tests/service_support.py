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
from typing import Any

import httpx

from smartvm.service.keys import KeyStore

LONG = 180.0  # a create builds the base template the first time, under TCG on a shared machine


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


class Service:
    """A `smartvm serve` of a test module with its key and an HTTP client; ``restart`` SIGKILLs it
    and starts a new one on the same dirs."""

    def __init__(self, data_dir: Path, runtime_dir: Path) -> None:
        self.data_dir, self.runtime_dir = data_dir, runtime_dir
        self.key = make_key(data_dir, f"api-{os.getpid()}-{time.monotonic_ns()}")
        self.served: Served = start_serve(data_dir, runtime_dir)
        self.http = httpx.Client(base_url=self.served.url, headers={"X-API-Key": self.key}, timeout=LONG)

    @property
    def url(self) -> str:
        return self.served.url

    def restart(self) -> None:
        self.served.proc.send_signal(signal.SIGKILL)
        self.served.proc.wait(30)
        self.served = start_serve(self.data_dir, self.runtime_dir)
        self.http.base_url = httpx.URL(self.served.url)

    def __call__(self, method: str, path: str, status: int, **kwargs: Any) -> Any:
        res = self.http.request(method, path, **kwargs)
        assert res.status_code == status, f"{method} {path}: {res.status_code} {res.text}"
        if res.headers.get("content-type", "").startswith("application/json"):
            return res.json()
        return res

    def create(self, **body: Any) -> dict[str, Any]:
        sb: dict[str, Any] = self("POST", "/v1/sandboxes", 201, json={"timeout": 600, **body})
        return sb

    def run(self, sid: str, cmd: str | list[str], **body: Any) -> dict[str, Any]:
        out: dict[str, Any] = self("POST", f"/v1/sandboxes/{sid}/exec", 200, json={"cmd": cmd, **body})
        return out

    def metrics(self) -> dict[str, float]:
        """The service's metrics by series (``name{labels}``)."""
        import re

        text = self("GET", "/metrics", 200).text
        found = re.findall(r"^(smartvm_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
        return {name: float(value) for name, value in found}

    def stop(self) -> tuple[int, str]:
        """Kill what the module left running and stop the service; its exit code and stderr."""
        for sb in self.http.get("/v1/sandboxes").json():
            self.http.delete(f"/v1/sandboxes/{sb['id']}")
        self.http.close()
        return self.served.stop()


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
