"""`smartvm sandbox` against a real `smartvm serve` with real guests (QEMU engine): every verb end to
end, exit codes passed through, and the service's errors printed with their code."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service_support import Service

pytestmark = pytest.mark.integration
NOT_GIVEN = "not given"


def _env(api: Service, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SMARTVM_URL", "SMARTVM_API_KEY")}
    env["SMARTVM_URL"] = api.url
    if key != NOT_GIVEN:
        env["SMARTVM_API_KEY"] = key
    return env


def _cli(api: Service, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "smartvm.cli", "sandbox", *args]
    env = _env(api, api.key if key is None else key)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def _failed(res: subprocess.CompletedProcess[str], code: str, *words: str) -> None:
    """Exit 2 with ``error CODE: message`` on stderr (rich may wrap it: compare without line breaks)."""
    text = " ".join(res.stderr.split())
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"error {code}: " in text, text
    for word in words:
        assert word in text, text
    assert "Traceback" not in res.stderr


def test_create_exec_cp_pause_resume_snapshot_kill(api: Service, tmp_path: Path) -> None:
    made = _ok(_cli(api, "create", "--timeout", "600", "--metadata", "suite=cli", "-m", "k=v"))
    sid = made.strip().splitlines()[-1]
    assert re.fullmatch(r"sb-[0-9a-f]{8}", sid), made
    listed = json.loads(_ok(_cli(api, "list", "--metadata", "suite=cli", "--json")))
    assert [(s["id"], s["state"], s["metadata"]) for s in listed] == [
        (sid, "running", {"suite": "cli", "k": "v"})
    ]
    assert sid in _ok(_cli(api, "list"))

    # exec: stdout and stderr apart, the command's exit code passed through
    ran = _cli(api, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "out\n", "err\n")
    missing = _cli(api, "exec", sid, "--", "/no/such/program")
    assert missing.returncode == 127 and "/no/such/program" in missing.stderr
    timed_out = _cli(api, "exec", "--timeout", "1", sid, "--", "sleep", "30")
    assert timed_out.returncode == 124 and "EXEC_TIMEOUT" in timed_out.stderr
    # ... streamed: the first line is out while the command still runs
    cmd = [
        sys.executable,
        "-m",
        "smartvm.cli",
        "sandbox",
        "exec",
        sid,
        "--",
        "sh",
        "-c",
        "echo first; sleep 8",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env(api, api.key)) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "first\n"
        assert proc.poll() is None, "the output came only after the command ended"
        assert proc.wait(60) == 0

    # cp both ways, streamed; relative guest paths are under /home/user
    data = os.urandom(3 << 20)
    (tmp_path / "data.bin").write_bytes(data)
    _ok(_cli(api, "cp", str(tmp_path / "data.bin"), f"{sid}:up/data.bin"))
    digest = _ok(_cli(api, "exec", sid, "--", "sha256sum", "/home/user/up/data.bin")).split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    _ok(_cli(api, "cp", str(tmp_path / "data.bin"), f"{sid}:/tmp/"))  # into a directory
    _ok(_cli(api, "exec", sid, "--", "cmp", "/tmp/data.bin", "up/data.bin"))
    (tmp_path / "back").mkdir()
    _ok(_cli(api, "cp", f"{sid}:up/data.bin", str(tmp_path / "back") + "/"))
    _ok(_cli(api, "cp", f"{sid}:/tmp/data.bin", str(tmp_path / "copy.bin")))
    assert (tmp_path / "back" / "data.bin").read_bytes() == data == (tmp_path / "copy.bin").read_bytes()
    _failed(_cli(api, "cp", f"{sid}:nope.txt", str(tmp_path / "nope.txt")), "GUEST_FILE_ERROR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "copy.bin", "data.bin"]  # no partial file

    # pause and resume; a paused sandbox refuses exec with the service's error
    _ok(_cli(api, "exec", sid, "--", "sh", "-c", "echo kept > note.txt"))
    _ok(_cli(api, "pause", sid))
    _failed(_cli(api, "exec", sid, "--", "true"), "SANDBOX_NOT_RUNNING", "resume it first")
    _failed(_cli(api, "pause", sid), "SANDBOX_ALREADY_PAUSED")
    _ok(_cli(api, "resume", sid))
    assert _ok(_cli(api, "exec", sid, "--", "cat", "note.txt")) == "kept\n"

    # snapshot, and a sandbox from it
    assert _ok(_cli(api, "snapshot", sid, "cli-snap")).strip().splitlines()[-1] == "cli-snap"
    clone = _ok(_cli(api, "create", "--template", "cli-snap")).strip().splitlines()[-1]
    assert _ok(_cli(api, "exec", clone, "--", "cat", "note.txt")) == "kept\n"

    # egress rules, and a fork that keeps them
    out = _ok(_cli(api, "egress", sid, "--default", "deny", "--allow", "192.0.2.1/32"))
    assert out.strip() == f"{sid} egress: default deny; allow 192.0.2.1/32; deny -"
    forked = _ok(_cli(api, "fork", sid, "--count", "2")).split()
    assert len(forked) == 2 and sid not in forked
    for fork in forked:
        assert _ok(_cli(api, "exec", fork, "--", "cat", "note.txt")) == "kept\n"
        assert api("GET", f"/v1/sandboxes/{fork}", 200)["egress"]["default"] == "deny"
        _ok(_cli(api, "kill", fork))

    _ok(_cli(api, "kill", clone))
    _ok(_cli(api, "kill", sid))
    assert api("GET", f"/v1/sandboxes/{sid}", 200)["state"] == "stopped"
    api("DELETE", "/v1/snapshots/cli-snap", 204)


def test_errors_print_the_service_code_and_message_and_exit_2(api: Service) -> None:
    _failed(_cli(api, "list", key="svm_" + "A" * 51), "UNAUTHORIZED", "not valid")
    _failed(_cli(api, "exec", "sb-00000000", "--", "true", key="wrong"), "UNAUTHORIZED", "not valid")
    _failed(_cli(api, "list", key=NOT_GIVEN), "UNAUTHORIZED", "SMARTVM_API_KEY")
    _failed(_cli(api, "kill", "sb-0000dead"), "SANDBOX_NOT_FOUND", "sb-0000dead")
    _failed(_cli(api, "pause", "sb-0000dead"), "SANDBOX_NOT_FOUND")
    _failed(_cli(api, "exec", "sb-0000dead", "--", "true"), "SANDBOX_NOT_FOUND")
    _failed(_cli(api, "resume", "not-an-id"), "INVALID_ARGUMENT", "wrong shape")
    _failed(_cli(api, "create", "--template", "no-such"), "TEMPLATE_NOT_FOUND")
    _failed(_cli(api, "create", "--metadata", "novalue"), "INVALID_ARGUMENT", "key=value")
    _failed(_cli(api, "cp", "a", "b"), "INVALID_ARGUMENT", "SANDBOX_ID:path")
    _failed(_cli(api, "list", "--url", "http://127.0.0.1:1"), "SERVICE_UNAVAILABLE", "smartvm serve")
    no_cmd = _cli(api, "exec", "sb-0000dead")
    _failed(no_cmd, "INVALID_ARGUMENT", "after --")
    assert api("GET", "/v1/sandboxes", 200) == []  # and the service keeps serving
