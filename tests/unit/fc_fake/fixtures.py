"""pytest fixtures for tests that use the fake Firecracker (``pytest_plugins = ["fc_fake.fixtures"]``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cli import write_fake_binary, write_launcher
from .helpers import logged_requests, pid_alive
from .server import ApiServer, FakeFirecracker

FAKE_ENV = (
    "FAKE_FC_MODE",
    "FAKE_FC_FAIL",
    "FAKE_FC_HANG",
    "FAKE_FC_IGNORE_CTRLALTDEL",
    "FAKE_FC_IGNORE_SIGTERM",
    "FAKE_FC_VERSION",
    "FAKE_FC_AGENT_SOCKET",
    "FAKE_FC_AGENT_DELAY",
    "FAKE_FC_AGENT_LOG",
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="svfc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_server(short_tmp: Path) -> Iterator[ApiServer]:
    server = ApiServer(short_tmp / "api.sock", FakeFirecracker("test-vm")).start()
    yield server
    server.stop()


@pytest.fixture
def fake_binary(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake ``firecracker`` executable; its requests are logged to ``<dir>/requests.jsonl``."""
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("FAKE_FC_REQUEST_LOG", str(short_tmp / "requests.jsonl"))
    for var in FAKE_ENV:
        monkeypatch.delenv(var, raising=False)
    return write_fake_binary(bin_dir)


@pytest.fixture
def fake_jailer(fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake ``jailer`` next to the fake ``firecracker``; its argv goes to ``<dir>/jailer.jsonl``."""
    monkeypatch.setenv("FAKE_JAILER_ARGV_LOG", str(short_tmp / "jailer.jsonl"))
    monkeypatch.delenv("SMARTVM_JAILER_BIN", raising=False)
    monkeypatch.delenv("FAKE_JAILER_MODE", raising=False)
    return write_launcher(fake_binary.parent, "jailer", "fc_fake.jailer")


__all__ = ["fake_binary", "fake_jailer", "fake_server", "logged_requests", "pid_alive", "short_tmp"]
