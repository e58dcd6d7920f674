"""The /v1 API with real guests: `smartvm serve` (QEMU engine) driven over HTTP and WebSocket.

One service per module on the session's sandbox data dir (the ``base`` template is built once);
each test kills what it made, and at the end nothing may be left on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from service_support import Service

pytestmark = pytest.mark.integration


def _error(res: httpx.Response, status: int, code: str) -> None:
    assert (res.status_code, res.json().get("code")) == (status, code), res.text


def test_lifecycle_over_http(api: Service) -> None:
    sb = api.create(metadata={"suite": "api"}, envs={"GREETING": "hello"})
    sid = sb["id"]
    assert sb["state"] == "running" and sb["metadata"] == {"suite": "api"} and sb["template"] == "base"
    assert [s["id"] for s in api("GET", "/v1/sandboxes", 200, params={"metadata": "suite=api"})] == [sid]
    assert api("GET", f"/v1/sandboxes/{sid}", 200)["state"] == "running"

    r = api.run(sid, "echo $GREETING; whoami; pwd")
    assert (r["exit_code"], r["stdout"]) == (0, "hello\nuser\n/home/user\n")
    assert api.run(sid, "exit 7")["exit_code"] == 7  # a failing command is a result
    missing = api.run(sid, ["/no/such/program"])  # a result saying so, as a shell would
    assert missing["exit_code"] == 127 and "/no/such/program" in missing["stderr"], missing
    _error(
        api.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "sleep 10", "timeout": 1}),
        504,
        "EXEC_TIMEOUT",
    )

    api.run(sid, "echo kept > note.txt")
    assert api("POST", f"/v1/sandboxes/{sid}/pause", 200)["state"] == "paused"
    _error(api.http.post(f"/v1/sandboxes/{sid}/pause"), 409, "SANDBOX_ALREADY_PAUSED")
    _error(api.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}), 409, "SANDBOX_NOT_RUNNING")
    assert api("POST", f"/v1/sandboxes/{sid}/resume", 200)["state"] == "running"
    _error(api.http.post(f"/v1/sandboxes/{sid}/resume"), 409, "SANDBOX_NOT_PAUSED")
    assert api.run(sid, "cat note.txt")["stdout"] == "kept\n"

    before = api("GET", f"/v1/sandboxes/{sid}", 200)["end_at"]
    moved = api("POST", f"/v1/sandboxes/{sid}/timeout", 200, json={"timeout": 3600})["end_at"]
    assert moved > before + 1000
    _error(api.http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": -1}), 422, "VALIDATION_FAILED")

    m = api("GET", f"/v1/sandboxes/{sid}/metrics", 200)
    assert m["memory_rss_bytes"] > 0 and m["cpu_seconds"] > 0 and m["disk_bytes"] > 0
    details = [e["detail"] for e in api("GET", f"/v1/sandboxes/{sid}/events", 200)]
    assert any("paused" in d for d in details) and any("timeout" in d or "3600" in d for d in details)

    assert api("DELETE", f"/v1/sandboxes/{sid}", 204).status_code == 204
    assert api("GET", f"/v1/sandboxes/{sid}", 200)["state"] == "stopped"
    api("DELETE", f"/v1/sandboxes/{sid}", 204)  # idempotent
    assert sid not in [s["id"] for s in api("GET", "/v1/sandboxes", 200)]


def test_bad_creates(api: Service) -> None:
    _error(api.http.post("/v1/sandboxes", json={"template": "no-such"}), 404, "TEMPLATE_NOT_FOUND")
    _error(api.http.post("/v1/sandboxes", json={"template": "base", "cpus": 7}), 400, "INVALID_ARGUMENT")
    _error(api.http.post("/v1/sandboxes", json={"timeout": 0}), 422, "VALIDATION_FAILED")
    names = [t["name"] for t in api("GET", "/v1/templates", 200)]
    assert "base" in names


def test_files_over_http(api: Service) -> None:
    sid = api.create()["id"]
    data = os.urandom(3 << 20)

    def chunks() -> Iterator[bytes]:
        step = 256 << 10
        for i in range(0, len(data), step):
            yield data[i : i + step]

    up = api("PUT", f"/v1/sandboxes/{sid}/files/content", 201, params={"path": "big.bin"}, content=chunks())
    assert (up["path"], up["size"]) == ("/home/user/big.bin", len(data))
    with api.http.stream("GET", f"/v1/sandboxes/{sid}/files/content", params={"path": "big.bin"}) as res:
        assert res.status_code == 200
        digest = hashlib.sha256()
        for chunk in res.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert api.run(sid, "stat -c %U big.bin")["stdout"] == "user\n"

    api("POST", f"/v1/sandboxes/{sid}/files/mkdir", 201, json={"path": "d/e"})
    moved = api("POST", f"/v1/sandboxes/{sid}/files/rename", 200, json={"src": "big.bin", "dst": "d/e/b.bin"})
    assert moved["path"] == "/home/user/d/e/b.bin"
    names = {
        f["name"]: f["type"] for f in api("GET", f"/v1/sandboxes/{sid}/files", 200, params={"path": "d/e"})
    }
    assert names == {"b.bin": "file"}
    api("DELETE", f"/v1/sandboxes/{sid}/files", 204, params={"path": "d"})
    _error(api.http.get(f"/v1/sandboxes/{sid}/files", params={"path": "d"}), 404, "GUEST_FILE_ERROR")
    _error(
        api.http.get(f"/v1/sandboxes/{sid}/files/content", params={"path": "nope"}), 404, "GUEST_FILE_ERROR"
    )
    assert not (api.data_dir / "service" / "uploads").exists()  # streamed to the guest, never spooled
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def _part_files(api: Service, sid: str, directory: str = "/home/user") -> list[str]:
    """The agent's hidden part files of writes in progress (or left behind) in ``directory``."""
    out = api.run(sid, ["find", directory, "-maxdepth", "1", "-name", "*.smartvm-part"])["stdout"]
    return out.split()


def test_an_upload_reaches_the_guest_while_its_body_is_still_arriving(api: Service) -> None:
    sid = api.create()["id"]
    chunk = os.urandom(256 << 10)  # the agent client sends whole frames of up to 256 KiB
    seen: list[str] = []

    def body() -> Iterator[bytes]:
        for _ in range(4):  # 1 MiB: the guest has had a frame or more
            yield chunk
        deadline = time.monotonic() + 20  # the upload holds here until the guest shows the part file
        while not seen and time.monotonic() < deadline:
            seen.extend(_part_files(api, sid))
            time.sleep(0.2)
        for _ in range(4):
            yield chunk

    up = api("PUT", f"/v1/sandboxes/{sid}/files/content", 201, params={"path": "s.bin"}, content=body())
    assert up["size"] == 8 * len(chunk)
    assert seen, "no byte reached the guest before the whole body had arrived"
    assert _part_files(api, sid) == []
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def _raw_request(api: Service, method: str, path: str, length: int | None, body: bytes) -> socket.socket:
    """A bare HTTP/1.1 request on a new connection (so a test can walk away mid-stream)."""
    parts = urlsplit(api.url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {api.key}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _open_in_guest(api: Service, sid: str, path: str) -> bool:
    """Whether a guest process (the agent serving a read) has ``path`` open."""
    out = api.run(sid, "ls -l /proc/[0-9]*/fd/ 2>/dev/null", user="root")["stdout"]
    return any(line.endswith(f" -> {path}") for line in out.splitlines())


def _streams_closed(api: Service) -> bool:
    m = api.metrics()
    return all(m[f'smartvm_streams_open{{kind="{k}"}}'] == 0 for k in ("exec", "upload", "download"))


def _eventually(check: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_a_client_gone_mid_upload_or_mid_download_leaves_nothing_behind(api: Service) -> None:
    sid = api.create()["id"]
    # big.bin is sparse and far larger than a 30 s wait can stream: only a read that ends with the
    # connection lets the check below pass
    assert api.run(sid, "echo original > kept.txt; truncate -s 2G big.bin")["exit_code"] == 0
    # an upload of 8 MiB over kept.txt that stops after 1 MiB: the connection goes
    path = f"/v1/sandboxes/{sid}/files/content?path=kept.txt"
    sock = _raw_request(api, "PUT", path, 8 << 20, os.urandom(1 << 20))
    _eventually(lambda: _part_files(api, sid) != [], "the upload never reached the guest")
    sock.close()
    _eventually(lambda: _part_files(api, sid) == [], "the part file of a gone upload was left in the guest")
    assert api.run(sid, "cat kept.txt")["stdout"] == "original\n"  # the target is as it was
    # a download of 2 GiB read for 64 KiB: the guest read ends with the connection
    path = f"/v1/sandboxes/{sid}/files/content?path=big.bin"
    sock = _raw_request(api, "GET", path, None, b"")
    got = 0
    while got < 64 << 10:
        got += len(sock.recv(65536))
    assert api.metrics()['smartvm_streams_open{kind="download"}'] == 1
    assert _open_in_guest(api, sid, "/home/user/big.bin")
    sock.close()
    _eventually(lambda: _streams_closed(api), "a stream of a gone client is still open in the service")
    _eventually(lambda: not _open_in_guest(api, sid, "/home/user/big.bin"), "the guest still reads the file")
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def test_metrics_count_operations_errors_and_sandboxes_by_state(api: Service) -> None:
    before = api.metrics()
    sid = api.create()["id"]
    api("POST", f"/v1/sandboxes/{sid}/pause", 200)
    paused = api.metrics()
    assert paused['smartvm_sandboxes{state="paused"}'] >= 1
    api.http.post(f"/v1/sandboxes/{sid}/pause")  # 409
    api("POST", f"/v1/sandboxes/{sid}/resume", 200)
    api("DELETE", f"/v1/sandboxes/{sid}", 204)
    after = api.metrics()
    for op in ("create", "pause", "resume", "kill"):
        key = f'smartvm_operation_seconds_count{{operation="{op}"}}'
        assert after[key] == before[key] + 1, op
    key = 'smartvm_errors_total{code="SANDBOX_ALREADY_PAUSED"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["smartvm_capacity_sandboxes_left"] == after["smartvm_capacity_sandboxes_max"] - sum(
        after[f'smartvm_sandboxes{{state="{s}"}}']
        for s in ("starting", "running", "pausing", "resuming", "stopping")
    )


def _ws_url(api: Service, sid: str) -> str:
    return api.served.url.replace("http://", "ws://") + f"/v1/sandboxes/{sid}/exec/stream"


def test_exec_streams_over_a_websocket_and_a_gone_client_kills_the_command(api: Service) -> None:
    from websockets.sync.client import connect

    sid = api.create()["id"]
    with connect(_ws_url(api, sid), additional_headers={"X-API-Key": api.key}, open_timeout=30) as ws:
        ws.send(json.dumps({"cmd": "echo out; echo err >&2; sleep 0.2; echo more; exit 3"}))
        events = [json.loads(m) for m in ws]  # until the service closes
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "exit"
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "out\nmore\n"
    assert "".join(e["data"] for e in events if e["type"] == "stderr") == "err\n"
    assert events[-1]["exit_code"] == 3

    with connect(_ws_url(api, sid), subprotocols=["smartvm", f"key.{api.key}"], open_timeout=30) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"cmd": "echo $$ > /tmp/ws.pid; echo go; sleep 300"}))
        while json.loads(ws.recv(timeout=60)).get("data") != "go\n":
            pass
    # the client left: the command's process group must die in the guest
    deadline = time.monotonic() + 30
    while api.run(sid, "kill -0 $(cat /tmp/ws.pid) 2>/dev/null")["exit_code"] == 0:
        assert time.monotonic() < deadline, "the command outlived its WebSocket client"
        time.sleep(0.5)
    _eventually(lambda: _streams_closed(api), "the exec stream of a gone client is still open")
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def test_background_processes(api: Service) -> None:
    sid = api.create()["id"]
    cat = api("POST", f"/v1/sandboxes/{sid}/exec", 200, json={"cmd": "cat > in.txt", "background": True})
    api(
        "POST",
        f"/v1/sandboxes/{sid}/processes/{cat['pid']}/stdin",
        204,
        json={"data": "piped\n", "eof": True},
    )
    sleeper = api("POST", f"/v1/sandboxes/{sid}/exec", 200, json={"cmd": "sleep 300", "background": True})
    procs = {p["pid"]: p for p in api("GET", f"/v1/sandboxes/{sid}/processes", 200)}
    assert procs[sleeper["pid"]]["running"]
    killed = api("DELETE", f"/v1/sandboxes/{sid}/processes/{sleeper['pid']}", 200)
    assert killed == {"pid": sleeper["pid"], "signalled": True}
    deadline = time.monotonic() + 30
    while api.run(sid, "cat in.txt")["stdout"] != "piped\n":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    procs = {p["pid"]: p for p in api("GET", f"/v1/sandboxes/{sid}/processes", 200)}
    assert not procs[sleeper["pid"]]["running"]
    res = api.http.delete(f"/v1/sandboxes/{sid}/processes/{sleeper['pid']}", params={"signal": "SIGBOGUS"})
    _error(res, 422, "VALIDATION_FAILED")
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def test_snapshots_over_http(api: Service) -> None:
    sid = api.create()["id"]
    api.run(sid, "echo from-the-source > mark.txt")
    snap = api("POST", f"/v1/sandboxes/{sid}/snapshots", 201, json={"name": "api-snap"})
    assert snap["name"] == "api-snap" and snap["source_sandbox"] == sid
    listed = {s["name"]: s for s in api("GET", "/v1/snapshots", 200)}
    assert listed["api-snap"]["size_bytes"] > 0
    clone = api.create(template="api-snap")["id"]
    assert api.run(clone, "cat mark.txt")["stdout"] == "from-the-source\n"
    _error(api.http.delete("/v1/snapshots/api-snap"), 409, "SNAPSHOT_IN_USE")
    api("DELETE", f"/v1/sandboxes/{clone}", 204)
    api("DELETE", "/v1/snapshots/api-snap", 204)
    _error(api.http.delete("/v1/snapshots/api-snap"), 404, "SNAPSHOT_NOT_FOUND")
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def test_egress_and_fork_over_http(api: Service) -> None:
    sid = api.create()["id"]
    assert api("GET", f"/v1/sandboxes/{sid}", 200)["egress"] == {"default": "allow", "allow": [], "deny": []}
    policy = {"default": "deny", "allow": ["192.0.2.0/24"], "deny": []}
    assert api("PUT", f"/v1/sandboxes/{sid}/egress", 200, json=policy)["egress"] == policy
    api.run(sid, "echo before-the-fork > mark.txt")
    forks = api("POST", f"/v1/sandboxes/{sid}/fork", 201, json={"count": 2, "timeout": 60})
    assert [set(f) for f in forks] == [{"sandbox"}, {"sandbox"}]
    for fork in forks:
        fid = fork["sandbox"]["id"]
        assert fid != sid and fork["sandbox"]["egress"] == policy  # the source's rules come along
        assert api.run(fid, "cat mark.txt")["stdout"] == "before-the-fork\n"
        api("DELETE", f"/v1/sandboxes/{fid}", 204)
    assert api("GET", "/v1/snapshots", 200) == []  # the fork's snapshot is not listed
    api("DELETE", f"/v1/sandboxes/{sid}", 204)


def test_sigkill_and_restart_keep_running_and_paused_sandboxes(api: Service) -> None:
    running = api.create()["id"]
    paused = api.create()["id"]
    api.run(running, "echo alive > r.txt")
    api.run(paused, "echo asleep > p.txt")
    api("POST", f"/v1/sandboxes/{paused}/pause", 200)
    api.restart()
    assert api("GET", f"/v1/sandboxes/{running}", 200)["state"] == "running"
    assert api("GET", f"/v1/sandboxes/{paused}", 200)["state"] == "paused"
    assert api.run(running, "cat r.txt")["stdout"] == "alive\n"
    api("POST", f"/v1/sandboxes/{paused}/resume", 200)
    assert api.run(paused, "cat p.txt")["stdout"] == "asleep\n"
    api("DELETE", f"/v1/sandboxes/{running}", 204)
    api("DELETE", f"/v1/sandboxes/{paused}", 204)
