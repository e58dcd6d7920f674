"""The service app in process over a real SandboxManager (no guest booted): auth, the error mapping,
limits, list filters, metrics, the page. Routes that need running sandboxes are tested with real
guests in tests/integration/test_service_api.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import SandboxRecord, SandboxState, SandboxStore
from smartvm.service.app import create_app
from smartvm.service.context import ServiceContext, ServiceLimits, open_backend
from smartvm.service.http_errors import STATUS_OF_CODE
from smartvm.service.keys import KeyStore
from smartvm.service.routes import native_routers

# A route per error code, so the mapping is checked through the real handlers.
failing = APIRouter()


@failing.get("/fail/{code}")
async def fail(code: str) -> None:
    if code == "bug":
        raise RuntimeError("secret host detail /etc/shadow")
    raise SmartVMError(ErrorCode(code), f"failed with {code}")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Records of sandboxes that a previous manager left failed or stopped (reconcile keeps them)."""
    data = tmp_path / "data"
    with SandboxStore(data) as store:
        for sid, meta in (
            ("sb-00000001", {"team": "a"}),
            ("sb-00000002", {"team": "b"}),
            ("sb-00000003", {}),
        ):
            store.insert_sandbox(SandboxRecord(id=sid, template="base", metadata=meta))
            store.transition(sid, SandboxState.ERROR, error="the test made it so")
        store.transition("sb-00000003", SandboxState.STOPPING)
        store.transition("sb-00000003", SandboxState.STOPPED)
    return data


@pytest.fixture
def key(data_dir: Path) -> str:
    with KeyStore(data_dir) as store:
        return store.create("test")[0]


@pytest.fixture
def client(data_dir: Path, key: str, tmp_path: Path) -> Iterator[TestClient]:
    backend = open_backend(data_dir, engine="qemu", runtime_dir=tmp_path / "run", slot_pool_size=0)
    ctx = ServiceContext(
        data_dir=data_dir,
        backend=backend,
        limits=ServiceLimits(max_json_bytes=4096, max_upload_bytes=8192),
    )
    app = create_app(ctx, routers=[*native_routers(), failing])
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["X-API-Key"] = key
        yield c


def _error(res: object, status: int, code: str) -> dict[str, str]:
    from httpx import Response

    assert isinstance(res, Response)
    assert res.status_code == status, res.text
    body = res.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert body["message"]
    return body  # type: ignore[no-any-return]


def test_health_needs_no_key_and_the_api_does(client: TestClient) -> None:
    assert client.get("/health", headers={"X-API-Key": ""}).json() == {"status": "ok"}
    res = client.get("/v1/sandboxes", headers={"X-API-Key": ""})
    _error(res, 401, "UNAUTHORIZED")
    assert res.headers["www-authenticate"] == "ApiKey"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/sandboxes",
        "/v1/sandboxes/sb-00000001",
        "/v1/sandboxes/sb-00000001/events",
        "/v1/sandboxes/sb-99999999",
        "/v1/snapshots",
        "/v1/templates",
        "/metrics",
    ],
)
@pytest.mark.parametrize("sent", [None, "", "wrong", "svm_" + "A" * 51])
def test_a_missing_or_wrong_key_is_401_and_leaks_nothing(
    client: TestClient, path: str, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-API-Key": sent}
    client.headers.pop("X-API-Key")
    body = _error(client.get(path, headers=headers), 401, "UNAUTHORIZED")
    text = json.dumps(body)
    assert "sb-" not in text and "base" not in text and "team" not in text


def test_the_e2b_spelling_of_the_header_works_too(client: TestClient, key: str) -> None:
    client.headers.pop("X-API-Key")
    assert client.get("/v1/sandboxes", headers={"X-API-KEY": key}).status_code == 200


def test_a_revoked_key_is_refused_on_the_next_request(client: TestClient, data_dir: Path) -> None:
    assert client.get("/v1/sandboxes").status_code == 200
    with KeyStore(data_dir) as store:
        store.revoke("test")
    _error(client.get("/v1/sandboxes"), 401, "UNAUTHORIZED")


def test_list_filters_by_state_and_metadata(client: TestClient) -> None:
    def ids(**params: object) -> list[str]:
        res = client.get("/v1/sandboxes", params=params)
        assert res.status_code == 200, res.text
        return [s["id"] for s in res.json()]

    assert ids() == ["sb-00000001", "sb-00000002"]  # stopped ones only on request
    assert ids(state="stopped") == ["sb-00000003"]
    assert ids(state=["stopped", "error"]) == ["sb-00000001", "sb-00000002", "sb-00000003"]
    assert ids(state="running") == []
    assert ids(metadata="team=b") == ["sb-00000002"]
    assert ids(metadata="team=a", state=["error", "stopped"]) == ["sb-00000001"]
    _error(client.get("/v1/sandboxes", params={"state": "asleep"}), 422, "VALIDATION_FAILED")
    _error(client.get("/v1/sandboxes", params={"metadata": "no-equals"}), 400, "INVALID_ARGUMENT")


def test_get_and_events_of_one_sandbox(client: TestClient) -> None:
    got = client.get("/v1/sandboxes/sb-00000002").json()
    assert (got["id"], got["state"], got["metadata"]) == ("sb-00000002", "error", {"team": "b"})
    assert got["error"] == "the test made it so"
    events = client.get("/v1/sandboxes/sb-00000002/events").json()
    assert [e["kind"] for e in events] == ["created", "state"]
    assert "the test made it so" in events[1]["detail"]
    _error(client.get("/v1/sandboxes/sb-99999999/events"), 404, "SANDBOX_NOT_FOUND")


def test_bad_ids_and_unknown_sandboxes(client: TestClient) -> None:
    for bad in ("bad", "sb-XYZ", "sb-123456789", "SB-00000001"):
        _error(client.get(f"/v1/sandboxes/{bad}"), 400, "INVALID_ARGUMENT")
    _error(client.get("/v1/sandboxes/sb-99999999"), 404, "SANDBOX_NOT_FOUND")
    _error(client.post("/v1/sandboxes/sb-99999999/pause"), 404, "SANDBOX_NOT_FOUND")
    # a sandbox in the wrong state for the call
    _error(client.post("/v1/sandboxes/sb-00000001/exec", json={"cmd": "true"}), 409, "SANDBOX_NOT_RUNNING")
    _error(client.post("/v1/sandboxes/sb-00000003/timeout", json={"timeout": 5}), 409, "SANDBOX_NOT_RUNNING")
    _error(
        client.put("/v1/sandboxes/sb-00000003/egress", json={"default": "deny"}), 409, "SANDBOX_NOT_RUNNING"
    )
    _error(client.post("/v1/sandboxes/sb-00000003/fork", json={"count": 1}), 409, "SANDBOX_NOT_RUNNING")
    _error(client.put("/v1/sandboxes/sb-99999999/egress", json={}), 404, "SANDBOX_NOT_FOUND")


def test_bad_bodies(client: TestClient) -> None:
    post = client.post
    res = post("/v1/sandboxes", content=b"{nope", headers={"Content-Type": "application/json"})
    _error(res, 400, "INVALID_ARGUMENT")
    _error(post("/v1/sandboxes", json={"timeout": -5}), 422, "VALIDATION_FAILED")
    body = _error(post("/v1/sandboxes", json={"template": "Bad Name!"}), 422, "VALIDATION_FAILED")
    assert "template" in body["message"]
    _error(post("/v1/sandboxes", json={"bogus": 1}), 422, "VALIDATION_FAILED")
    _error(post("/v1/sandboxes", json={"metadata": {"k": 1}}), 422, "VALIDATION_FAILED")
    _error(post("/v1/sandboxes", json={"egress": {"allow": ["not-a-cidr"]}}), 400, "INVALID_ARGUMENT")
    _error(post("/v1/sandboxes", json={"egress": {"default": "maybe"}}), 422, "VALIDATION_FAILED")
    _error(post("/v1/sandboxes/sb-00000001/fork", json={"count": 0}), 422, "VALIDATION_FAILED")
    # valid input reaches the manager
    _error(post("/v1/sandboxes", json={"template": "nope"}), 404, "TEMPLATE_NOT_FOUND")
    _error(post("/v1/snapshots/nope", json={}), 405, "ROUTE_NOT_FOUND")
    _error(client.delete("/v1/snapshots/nope"), 404, "SNAPSHOT_NOT_FOUND")


def test_oversized_bodies_are_413_declared_or_streamed(client: TestClient) -> None:
    big = {"template": "base", "metadata": {"k": "v" * 4000}, "envs": {"a": "b" * 4000}}
    _error(client.post("/v1/sandboxes", json=big), 413, "REQUEST_TOO_LARGE")

    def chunks() -> Iterator[bytes]:
        yield b'{"template": "base", "metadata": {"k": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    res = client.post("/v1/sandboxes", content=chunks(), headers={"Content-Type": "application/json"})
    _error(res, 413, "REQUEST_TOO_LARGE")
    assert client.get("/health").status_code == 200  # and the service keeps serving


@pytest.mark.parametrize("code", sorted(STATUS_OF_CODE.keys() & {c.value for c in ErrorCode}))
def test_each_error_code_has_its_status(client: TestClient, code: str) -> None:
    _error(client.get(f"/fail/{code}"), STATUS_OF_CODE[code], code)


def test_the_lifecycle_codes_map_to_409_429_and_503() -> None:
    assert STATUS_OF_CODE["INVALID_SANDBOX_TRANSITION"] == 409
    assert STATUS_OF_CODE["SANDBOX_ALREADY_PAUSED"] == STATUS_OF_CODE["SANDBOX_NOT_PAUSED"] == 409
    assert STATUS_OF_CODE["SANDBOX_LIMIT_REACHED"] == 429
    assert STATUS_OF_CODE["HOST_CAPACITY"] == 503


def test_unmapped_codes_are_500_and_bugs_leak_nothing(client: TestClient) -> None:
    _error(client.get("/fail/BOOT_FAILED"), 500, "BOOT_FAILED")
    body = _error(client.get("/fail/bug"), 500, "INTERNAL_ERROR")
    assert "shadow" not in json.dumps(body)


def test_unknown_routes_are_json_404(client: TestClient) -> None:
    _error(client.get("/v1/nothing-here"), 404, "ROUTE_NOT_FOUND")


def test_errors_are_counted_in_the_metrics(client: TestClient) -> None:
    client.get("/v1/sandboxes/sb-99999999")
    client.get("/v1/sandboxes/sb-99999999")
    text = client.get("/metrics").text
    assert 'smartvm_errors_total{code="SANDBOX_NOT_FOUND"} 2.0' in text
    assert 'smartvm_sandboxes{state="error"} 2.0' in text
    assert 'smartvm_sandboxes{state="stopped"} 1.0' in text
    assert 'smartvm_sandboxes{state="running"} 0.0' in text
    assert "smartvm_operation_seconds_bucket" in text


def _gauges(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(r"^(smartvm_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
    }


def test_metrics_show_capacity_left_and_the_streams_in_progress(client: TestClient) -> None:
    big = b"x" * 5000  # over the 4096-byte JSON limit, declared: answered by the middleware
    res = client.post("/v1/sandboxes", content=big, headers={"Content-Type": "application/json"})
    _error(res, 413, "REQUEST_TOO_LARGE")
    g = _gauges(client.get("/metrics").text)
    assert g['smartvm_errors_total{code="REQUEST_TOO_LARGE"}'] == 1.0
    assert g["smartvm_capacity_sandboxes_max"] == 64.0  # SandboxSettings' default
    assert g["smartvm_capacity_sandboxes_left"] == 64.0  # failed sandboxes hold no VM
    assert g["smartvm_capacity_memory_used_mib"] == 0.0
    assert g["smartvm_host_memory_available_mib"] > 0
    assert 0 < g["smartvm_capacity_memory_mib_left"] <= g["smartvm_capacity_memory_limit_mib"]
    assert g["smartvm_sandboxes_warm"] == 0.0
    for kind in ("exec", "upload", "download"):
        assert g[f'smartvm_streams_open{{kind="{kind}"}}'] == 0.0
    for op in ("create", "pause", "resume"):
        assert f'smartvm_operation_seconds_count{{operation="{op}"}} 0.0' in client.get("/metrics").text


def test_the_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(client: TestClient) -> None:
    client.headers.pop("X-API-Key")
    page = client.get("/test")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    texts = [page.text]
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert asset.startswith("/test/"), asset
        res = client.get(asset)
        assert res.status_code == 200, asset
        texts.append(res.text)
    assert len(texts) == 3  # the page, its script and its style
    for text in texts:
        assert not re.search(r"(https?:)?//[A-Za-z0-9]", text), "an external URL"
        assert "@import" not in text
    assert "sessionStorage" in "".join(texts) and "X-API-Key" in "".join(texts)
    assert "<script>" not in page.text and " on" + "click=" not in page.text  # nothing inline (CSP)


def test_openapi_docs_describe_the_key(client: TestClient) -> None:
    client.headers.pop("X-API-Key")
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    for path in ("/v1/sandboxes", "/v1/sandboxes/{sandbox_id}/exec", "/v1/snapshots", "/v1/templates"):
        assert path in spec["paths"], path


def test_the_exec_socket_checks_the_key(client: TestClient, key: str) -> None:
    client.headers.pop("X-API-Key")
    with client.websocket_connect("/v1/sandboxes/sb-00000001/exec/stream") as ws:
        msg = ws.receive_json()
        assert (msg["type"], msg["code"]) == ("error", "UNAUTHORIZED")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401
    # a browser sends the key as a subprotocol; the service answers with "smartvm"
    with client.websocket_connect(
        "/v1/sandboxes/sb-00000001/exec/stream", subprotocols=["smartvm", f"key.{key}"]
    ) as ws:
        assert ws.accepted_subprotocol == "smartvm"
        ws.send_json({"cmd": "echo hi"})
        msgs = [ws.receive_json(), ws.receive_json()]  # past the key check: the sandbox failed earlier
        assert msgs[0] == {"type": "start"}
        assert (msgs[1]["type"], msgs[1]["code"]) == ("error", "SANDBOX_NOT_RUNNING")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4409
    for bad in ("{nope", '{"cmd": []}'):  # malformed JSON, an invalid request
        with client.websocket_connect(
            "/v1/sandboxes/sb-00000001/exec/stream", headers={"X-API-Key": key}
        ) as ws:
            ws.send_text(bad)
            msg = ws.receive_json()
            assert (msg["type"], msg["code"]) == ("error", "VALIDATION_FAILED") and msg["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4422
    with client.websocket_connect("/v1/sandboxes/nope/exec/stream", headers={"X-API-Key": key}) as ws:
        msg = ws.receive_json()
        assert msg["code"] == "INVALID_ARGUMENT"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4400


async def test_connections_to_the_bound_socket_have_tcp_nodelay() -> None:
    """Else every response written in two parts waits 40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from smartvm.service.server import bind

    sock = bind("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)  # as uvicorn serves it
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 10) != 0
        writer.close()
