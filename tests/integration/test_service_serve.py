"""`smartvm serve` as a process: ready URL, /health, keys managed while it runs, clean stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sandbox_support import assert_no_sandbox_left, slots_of

from service_support import make_key, serve_command, serving, start_serve


def _port_closed(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((parts.hostname or "", parts.port or 0)) != 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_stops_cleanly_on_a_signal(tmp_path: Path, runtime_root: Path, sig: int) -> None:
    key = make_key(tmp_path)
    served = start_serve(tmp_path, runtime_root)
    assert served.url.startswith("http://127.0.0.1:")
    try:
        assert httpx.get(f"{served.url}/health", timeout=10).json() == {"status": "ok"}
        res = httpx.get(f"{served.url}/v1/sandboxes", headers={"X-API-Key": key}, timeout=10)
        assert (res.status_code, res.json()) == (200, [])
    finally:
        t0 = time.monotonic()
        code, err = served.stop(sig)
    assert code == 0, err
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in err
    assert _port_closed(served.url)
    assert slots_of(tmp_path) == [], "network slots of the stopped service were left"
    # the data dir is free again: a new service starts on it
    with serving(tmp_path, runtime_root) as again:
        assert httpx.get(f"{again.url}/health", timeout=10).status_code == 200


def test_keys_created_and_revoked_while_it_runs(tmp_path: Path, runtime_root: Path) -> None:
    with serving(tmp_path, runtime_root) as served:
        url = f"{served.url}/v1/sandboxes"
        assert httpx.get(url, timeout=10).status_code == 401
        create = [sys.executable, "-m", "smartvm.cli", "keys", "create", "--name", "late"]
        create += ["--data-dir", str(tmp_path)]
        made = subprocess.run(create, capture_output=True, text=True, timeout=60)
        key = made.stdout.strip().splitlines()[-1]
        assert httpx.get(url, headers={"X-API-Key": key}, timeout=10).status_code == 200
        revoke = [sys.executable, "-m", "smartvm.cli", "keys", "revoke", "late", "--data-dir", str(tmp_path)]
        assert subprocess.run(revoke, capture_output=True, timeout=60).returncode == 0
        res = httpx.get(url, headers={"X-API-Key": key}, timeout=10)
        assert res.status_code == 401 and res.json()["code"] == "UNAUTHORIZED"
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200


def test_a_second_service_on_the_same_data_dir_is_refused(tmp_path: Path, runtime_root: Path) -> None:
    with serving(tmp_path, runtime_root):
        res = subprocess.run(
            serve_command(tmp_path, runtime_root, "--port", "0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 2
    assert "DATA_DIR_IN_USE" in res.stderr and "Traceback" not in res.stderr


def test_a_taken_port_is_a_clear_error(tmp_path: Path, runtime_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            serve_command(tmp_path, runtime_root, "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr


def test_a_request_in_flight_finishes_before_the_stop(tmp_path: Path, runtime_root: Path) -> None:
    """SIGTERM while a request body is still arriving: the client gets its answer, then exit 0."""
    key = make_key(tmp_path)
    served = start_serve(tmp_path, runtime_root)
    try:

        def slow_body() -> Iterator[bytes]:
            yield b'{"template": "base", "timeout": -1, '
            served.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            yield b'"metadata": {"k": "v"}}'

        res = httpx.post(
            f"{served.url}/v1/sandboxes",
            headers={"X-API-Key": key, "Content-Type": "application/json"},
            content=slow_body(),
            timeout=30,
        )
        assert res.status_code == 422 and res.json()["code"] == "VALIDATION_FAILED"
    finally:
        code, err = served.stop()
    assert code == 0, err


@pytest.mark.integration
def test_max_sandboxes_refuses_creates_at_once_with_429(sandbox_data: Path, runtime_root: Path) -> None:
    key = make_key(sandbox_data, f"limit-{time.monotonic_ns()}")
    with serving(sandbox_data, runtime_root, "--max-sandboxes", "1") as served:
        http = httpx.Client(base_url=served.url, headers={"X-API-Key": key}, timeout=180)
        first = http.post("/v1/sandboxes", json={"timeout": 600})
        assert first.status_code == 201, first.text
        t0 = time.monotonic()
        over = http.post("/v1/sandboxes", json={"timeout": 600})
        took = time.monotonic() - t0
        assert (over.status_code, over.json()["code"]) == (429, "SANDBOX_LIMIT_REACHED"), over.text
        assert "the limit is 1" in over.json()["message"]
        assert took < 5, f"the refusal took {took:.1f}s: it must not wait for capacity"
        assert http.delete(f"/v1/sandboxes/{first.json()['id']}").status_code == 204
        again = http.post("/v1/sandboxes", json={"timeout": 600})  # room again
        assert again.status_code == 201, again.text
        assert http.delete(f"/v1/sandboxes/{again.json()['id']}").status_code == 204
        http.close()
    assert_no_sandbox_left(sandbox_data, runtime_root)
