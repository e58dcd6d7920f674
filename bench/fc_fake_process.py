"""The spec-validating fake Firecracker (tests/unit/fc_fake) as a separate process, like the real one.

A separate process keeps the server off the benchmark's interpreter (no shared GIL), and a fresh
process per VM gives a fresh state machine (InstanceStart is once per VM). Every request it answers
is logged so a benchmark can check that what a client sent validated.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from fc_fake.cli import write_fake_binary  # type: ignore[import-not-found]  # noqa: E402


class FakeFirecrackerProcess:
    """Start the fake ``firecracker`` on ``<workdir>/api.sock``; stop it on exit (also on errors)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket_path = workdir / "api.sock"
        self.log_path = workdir / "requests.jsonl"
        self._binary = write_fake_binary(workdir)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeFirecrackerProcess:
        for leftover in (self.socket_path, self.log_path, self.workdir / "v.sock"):
            leftover.unlink(missing_ok=True)
        env = {**os.environ, "FAKE_FC_REQUEST_LOG": str(self.log_path)}
        for var in ("FAKE_FC_MODE", "FAKE_FC_FAIL", "FAKE_FC_HANG", "FAKE_FC_VERSION"):
            env.pop(var, None)
        self._proc = subprocess.Popen(
            [str(self._binary), "--api-sock", str(self.socket_path), "--id", "bench"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 10
        while not self._warm_up():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake firecracker did not serve its API socket")
            time.sleep(0.005)
        self.log_path.unlink(missing_ok=True)
        return self

    def _warm_up(self) -> bool:
        """One request outside the timing (the fake parses the OpenAPI spec lazily on the first
        one); False while the socket is not listening yet."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                return False
            s.sendall(b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while s.recv(65536):
                pass
        return True

    def requests(self) -> list[dict[str, Any]]:
        """Every request answered since start (method, path, body, status, fault)."""
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait()
        for leftover in (self.socket_path, self.workdir / "v.sock"):
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> FakeFirecrackerProcess:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
