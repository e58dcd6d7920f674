"""Runs the REAL guest agent (src/smartvm/agent/guest.py) on the host for the agent unit tests.

The agent is started with Debian's python3.11 (the interpreter the guest image ships) when present,
listening on a Unix socket, with ``--dry-run-system`` so clock and power requests never touch the host.

Every test that takes the ``agent_server``/``agent`` fixtures runs twice where the host has ``go``:
against guest.py and against the native agent (src/smartvm/agent/native, built once per session),
which relays the ops it does not implement to guest.py: the agent unit tests are its contract.
``SMARTVM_TEST_NATIVE_AGENT=1`` runs the native agent only (and fails without ``go``), ``=0`` guest.py
only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import smartvm.agent
from smartvm.agent import AgentClient

GUEST_PY = Path(smartvm.agent.__file__).with_name("guest.py")  # the program the guest runs
WIRE_PY = GUEST_PY.with_name("wire.py")  # shipped next to it
PYTHON = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else sys.executable
NATIVE = os.environ.get("SMARTVM_TEST_NATIVE_AGENT") == "1"
AGENTS = (
    ["native"]
    if NATIVE
    else ["python"]
    if os.environ.get("SMARTVM_TEST_NATIVE_AGENT") == "0" or shutil.which("go") is None
    else ["python", "native"]
)


def native_binary() -> Path | None:
    """The native agent built from the sources (once per session); None without a go toolchain."""
    from smartvm.images.native_agent import build_native_agent

    return build_native_agent(Path(tempfile.gettempdir()) / f"smartvm-test-agent-native-{os.getuid()}")


def _agent_argv(sock: Path, native: bool) -> list[str]:
    if not native:
        return [PYTHON, str(GUEST_PY), "--listen-unix", str(sock), "--dry-run-system"]
    binary = native_binary()
    assert binary is not None, (
        "SMARTVM_TEST_NATIVE_AGENT=1 needs the go toolchain (apt-get install golang-go)"
    )
    return [
        str(binary),
        "--listen-unix",
        str(sock),
        "--dry-run-system",
        "--python",
        PYTHON,
        "--python-agent",
        str(GUEST_PY),
    ]


class AgentServer:
    """One agent process on a Unix socket; `streams` records every stream handed to a client."""

    def __init__(self, native: bool = NATIVE) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="svagent-", dir="/tmp"))  # short: sun_path is 108 bytes
        self.sock = self.dir / "agent.sock"
        self.native = native
        argv = _agent_argv(self.sock, native)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.writers: list[asyncio.StreamWriter] = []

    async def open_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.sock)), timeout)
        self.writers.append(writer)
        return reader, writer

    def client(self, **kwargs: float) -> AgentClient:
        return AgentClient(self.open_stream, **kwargs)

    def stop(self) -> None:
        """Stop the agent and remove its directory; no agent process may survive."""
        try:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        assert self.proc.returncode is not None


async def _kill_background(client: AgentClient) -> None:
    for proc in await client.processes.list():
        if proc.running:
            await client.processes.signal(proc.pid, "SIGKILL")


@pytest.fixture(name="agent_server", params=AGENTS)
async def agent_server_fixture(request: pytest.FixtureRequest) -> AsyncIterator[AgentServer]:
    server = AgentServer(native=request.param == "native")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="agent")
async def agent_fixture(agent_server: AgentServer) -> AsyncIterator[AgentClient]:
    client = agent_server.client()
    await client.wait_ready(30)
    try:
        yield client
    finally:
        await _kill_background(client)
        await client.close()


def pid_gone(pid: int, wait: float = 10.0) -> bool:
    """True once `pid` no longer exists (or is a zombie). Bounded wait, not a timing assertion."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False
