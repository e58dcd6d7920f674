"""The E2B REST face without a guest: the access token store, list paging and filters, and the app in
process over a real SandboxManager (records of failed and stopped sandboxes, no VM booted), driven
over HTTP and by the official e2b SDK. Routes that need running sandboxes are tested with real
guests in tests/integration/test_e2b_sdk_service.py.
"""

from __future__ import annotations

import inspect
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from e2b_support import serve
from error_support import raises_code
from smartvm.errors import ErrorCode
from smartvm.sandbox.store import SandboxRecord, SandboxState, SandboxStore
from smartvm.service.context import ServiceContext, ServiceLimits, open_backend
from smartvm.service.e2b.rest import ServiceApp, service_app
from smartvm.service.e2b.rest.listing import decode_token, metadata_filter, page, state_filter
from smartvm.service.e2b.rest.tokens import DB_FILE, AccessTokens
from smartvm.service.keys import KeyStore

S = SandboxState


# --- the routes ---------------------------------------------------------------------------------
def test_route_dependencies_run_on_the_event_loop() -> None:
    """FastAPI runs a plain-function dependency in its thread pool: a thread hop on every request
    (a create, an info, a kill), which a busy machine makes slow. Every dependency is async."""
    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    from smartvm.service.e2b.rest.routes import router

    def calls(dependant: Dependant) -> Iterator[Any]:
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    def is_async(call: Any) -> bool:  # a function, or an object such as APIKeyHeader
        return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)

    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 10
    sync = {
        getattr(c, "__qualname__", repr(c)) for r in routes for c in calls(r.dependant) if not is_async(c)
    }
    assert sync == set()


# --- the token store ------------------------------------------------------------------------------
def test_tokens_are_random_private_and_survive_a_reopen(tmp_path: Path) -> None:
    with AccessTokens(tmp_path) as tokens:
        a, b = tokens.issue("sb-0000000a"), tokens.issue("sb-0000000b")
        assert a != b and len(a) >= 43 and tokens.issue("sb-0000000a") == a
        assert tokens.get("sb-0000000c") is None
    assert stat.S_IMODE(os.stat(tmp_path / DB_FILE).st_mode) == 0o600
    with AccessTokens(tmp_path) as tokens:
        assert tokens.get("sb-0000000a") == a and tokens.get("sb-0000000b") == b
        fresh = tokens.issue("sb-0000000a", replace=True)
        assert fresh != a
        tokens.drop("sb-0000000b")
    with AccessTokens(tmp_path) as tokens:
        assert tokens.get("sb-0000000a") == fresh and tokens.get("sb-0000000b") is None


def test_a_token_survives_the_service_being_killed_right_after_it_was_told(tmp_path: Path) -> None:
    """The store skips the fsync per commit, not the write: a SIGKILL of the process that printed
    the token (the service answering the create) must not lose it."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from smartvm.service.e2b.rest.tokens import AccessTokens\n"
        "tokens = AccessTokens(Path(sys.argv[1]))\n"
        "print(tokens.issue('sb-0000000a'), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    told = done.stdout.strip()
    assert len(told) >= 43
    with AccessTokens(tmp_path) as tokens:
        assert tokens.get("sb-0000000a") == told


def test_tokens_of_sandboxes_that_ended_are_pruned_but_not_newer_ones(tmp_path: Path) -> None:
    with AccessTokens(tmp_path) as tokens:
        for sid in ("sb-0000000a", "sb-0000000b", "sb-0000000c"):
            tokens.issue(sid)
        cut = time.time()
        newer = tokens.issue("sb-0000000d")  # made after the list of live sandboxes was taken
        assert tokens.keep_only({"sb-0000000a"}, issued_before=cut) == 2
        assert [tokens.get(s) is not None for s in ("sb-0000000a", "sb-0000000b", "sb-0000000c")] == [
            True,
            False,
            False,
        ]
        assert tokens.get("sb-0000000d") == newer
    with AccessTokens(tmp_path) as tokens:
        assert tokens.get("sb-0000000b") is None and tokens.get("sb-0000000d") == newer


def test_token_store_refuses_a_planted_file(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / DB_FILE).symlink_to(tmp_path / "elsewhere")
    with raises_code(ErrorCode.UNSAFE_DIRECTORY):
        AccessTokens(tmp_path)


# --- paging and filters ---------------------------------------------------------------------------
def _walk(items: list[tuple[float, str]], limit: int, descending: bool = False) -> list[list[str]]:
    pages, token = [], None
    while True:
        p = page(items, lambda i: i, limit=limit, next_token=token, descending=descending)
        pages.append([i[1] for i in p.items])
        if p.next_token is None:
            return pages
        token = p.next_token


def test_pages_cover_every_item_once_in_order() -> None:
    items = [(1.0, "c"), (1.0, "a"), (0.5, "z"), (2.0, "b"), (1.0, "b")]
    assert _walk(items, 2) == [["z", "a"], ["b", "c"], ["b"]]
    assert _walk(items, 2, descending=True) == [["b", "c"], ["b", "a"], ["z"]]
    assert _walk(items, 5) == [["z", "a", "b", "c", "b"]]
    assert _walk([], 3) == [[]]


def test_a_page_starts_after_the_last_item_shown_even_when_the_list_changed() -> None:
    items = [(1.0, "a"), (2.0, "b"), (3.0, "c"), (4.0, "d")]
    first = page(items, lambda i: i, limit=2)
    assert first.next_token is not None
    changed = [(2.0, "b"), (2.5, "new"), (3.0, "c"), (4.0, "d")]  # "a" went, "new" came
    assert [i[1] for i in page(changed, lambda i: i, limit=9, next_token=first.next_token).items] == [
        "new",
        "c",
        "d",
    ]


def test_a_token_not_given_out_is_refused() -> None:
    for bad in ("garbage", "e30", "WzEsIDJd"):  # not base64 JSON, {}, [1, 2]
        with raises_code(ErrorCode.INVALID_ARGUMENT):
            decode_token(bad)


def test_metadata_filter_reads_what_the_sdk_sends() -> None:
    wanted = {"tag": "a b&c=d", "ünï": "x/y", "empty": ""}
    # the SDK's encoding (e2b/sandbox_async/paginator.py): quote keys and values, then urlencode
    sent = urllib.parse.urlencode({urllib.parse.quote(k): urllib.parse.quote(v) for k, v in wanted.items()})
    assert metadata_filter(sent) == wanted
    assert metadata_filter(None) == {} and metadata_filter("") == {}
    with raises_code(ErrorCode.INVALID_ARGUMENT):
        metadata_filter("no-equals-sign")


def test_state_filter() -> None:
    both = state_filter(None)
    assert set(both) == {S.STARTING, S.RUNNING, S.RESUMING, S.PAUSING, S.PAUSED}
    assert state_filter(["paused"]) == [S.PAUSING, S.PAUSED]
    assert set(state_filter(["running,paused"])) == set(both) == set(state_filter(["running", "paused"]))
    with raises_code(ErrorCode.INVALID_ARGUMENT):
        state_filter(["running,stopped"])


# --- the app in process ---------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A failed sandbox and a stopped one, left by an earlier manager (reconcile keeps both)."""
    data = tmp_path / "data"
    with SandboxStore(data) as store:
        for sid in ("sb-0000000e", "sb-0000000f"):
            store.insert_sandbox(SandboxRecord(id=sid, template="base", metadata={"team": "a"}))
        store.transition("sb-0000000e", S.ERROR, error="the test made it so")
        store.transition("sb-0000000f", S.STOPPING)
        store.transition("sb-0000000f", S.STOPPED)
    return data


@pytest.fixture
def key(data_dir: Path) -> str:
    with KeyStore(data_dir) as store:
        return store.create("test")[0]


def _app(data_dir: Path, tmp_path: Path) -> ServiceApp:
    backend = open_backend(data_dir, engine="qemu", runtime_dir=tmp_path / "run", slot_pool_size=0)
    limits = ServiceLimits(max_json_bytes=4096)
    return service_app(ServiceContext(data_dir=data_dir, backend=backend, limits=limits))


@pytest.fixture
def client(data_dir: Path, key: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(_app(data_dir, tmp_path), raise_server_exceptions=False) as c:
        c.headers["X-API-KEY"] = key
        yield c


def _e2b_error(res: Any, status: int, *words: str) -> None:
    assert res.status_code == status, res.text
    body = res.json()
    assert body["code"] == status and isinstance(body["message"], str), body
    for word in words:
        assert word in body["message"], body


def test_every_route_needs_the_api_key(client: TestClient) -> None:
    routes = [
        ("GET", "/v2/sandboxes"),
        ("POST", "/v2/sandboxes"),
        ("GET", "/sandboxes/sb-0000000e"),
        ("DELETE", "/sandboxes/sb-0000000e"),
        ("POST", "/sandboxes/sb-0000000e/timeout"),
        ("POST", "/sandboxes/sb-0000000e/pause"),
        ("POST", "/v2/sandboxes/sb-0000000e/connect"),
        ("GET", "/sandboxes/sb-0000000e/metrics"),
        ("POST", "/sandboxes/sb-0000000e/snapshots"),
        ("GET", "/snapshots"),
        ("DELETE", "/templates/x"),
        ("GET", "/templates/aliases/base"),
    ]
    for method, path in routes:
        _e2b_error(client.request(method, path, headers={"X-API-KEY": ""}), 401, "missing API key")
        _e2b_error(client.request(method, path, headers={"X-API-KEY": "svm_nope"}), 401, "not valid")


def test_failed_stopped_unknown_and_malformed_sandboxes_are_404(client: TestClient) -> None:
    _e2b_error(client.get("/sandboxes/sb-0000000e"), 404, "failed", "the test made it so", "kill it")
    _e2b_error(client.get("/sandboxes/sb-0000000f"), 404, "killed")
    _e2b_error(client.get("/sandboxes/sb-00000009"), 404)
    _e2b_error(client.get("/sandboxes/not-an-id"), 404, "ids look like")
    _e2b_error(client.post("/sandboxes/sb-0000000e/pause"), 404)
    _e2b_error(client.post("/v2/sandboxes/sb-0000000f/connect", json={}), 404)
    _e2b_error(client.delete("/sandboxes/sb-0000000f"), 404)
    assert client.get("/v2/sandboxes").json() == []  # E2B has no failed or stopped sandboxes
    # a failed sandbox can still be killed (it frees what it holds); then it is gone
    assert client.delete("/sandboxes/sb-0000000e").status_code == 204
    _e2b_error(client.delete("/sandboxes/sb-0000000e"), 404)


def test_bad_requests_are_400_in_e2b_shape(client: TestClient) -> None:
    _e2b_error(client.post("/v2/sandboxes", json={"timeout": 3}), 400, "templateID")
    _e2b_error(client.post("/v2/sandboxes", content=b"{", headers={"content-type": "application/json"}), 400)
    _e2b_error(client.get("/v2/sandboxes", params={"limit": 0}), 400, "limit")
    _e2b_error(client.get("/v2/sandboxes", params={"limit": 101}), 400, "limit")
    _e2b_error(client.get("/v2/sandboxes", params={"state": "stopped"}), 400, "running and/or paused")
    _e2b_error(client.get("/v2/sandboxes", params={"nextToken": "nope"}), 400, "x-next-token")
    _e2b_error(client.get("/snapshots", params={"nextToken": "nope"}), 400, "x-next-token")
    _e2b_error(client.post("/sandboxes/sb-0000000e/timeout", json={"timeout": -1}), 400, "timeout")
    big = client.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"k": "v" * 5000}})
    assert big.status_code == 413 and "larger than 4096 bytes" in big.json()["message"]  # the SDK reads it


def test_settings_smartvm_cannot_honour_are_refused_by_name(client: TestClient) -> None:
    unsupported = {
        "autoResume": {"enabled": True},
        "autoPauseMemory": False,
        "network": {"egressProxy": {"address": "127.0.0.1:1080"}},
        "mcp": {"x": {}},
        "volumeMounts": [{"name": "v", "path": "/v"}],
    }
    for field, value in unsupported.items():
        res = client.post("/v2/sandboxes", json={"templateID": "base", field: value})
        _e2b_error(res, 400, "not supported by smartvm", field)
    _e2b_error(client.post("/v2/sandboxes", json={"templateID": "no-such"}), 404, "no-such")
    _e2b_error(client.post("/sandboxes/sb-0000000e/pause", json={"memory": False}), 400, "filesystem only")


def test_templates_and_snapshots_without_sandboxes(client: TestClient) -> None:
    assert client.get("/templates/aliases/base").json() == {"templateID": "base", "public": False}
    _e2b_error(client.get("/templates/aliases/nope"), 404, "nope")
    res = client.get("/snapshots")
    assert res.status_code == 200 and res.json() == [] and "x-next-token" not in res.headers
    _e2b_error(client.delete("/templates/nope"), 404)


def test_the_native_face_and_its_error_shape_stay(client: TestClient) -> None:
    res = client.get("/v1/sandboxes/sb-00000009", headers={"X-API-Key": client.headers["X-API-KEY"]})
    assert res.status_code == 404 and res.json()["code"] == "SANDBOX_NOT_FOUND"
    assert client.get("/health").json() == {"status": "ok"}


def test_envd_requests_go_to_the_envd_face_before_the_body_limit(client: TestClient) -> None:
    """A request naming a sandbox is envd's: a failed or unknown sandbox is "not found" (502, what the
    SDK reads as not running), and an upload larger than the JSON limit is not refused with 413."""
    for sid in ("sb-0000000e", "sb-0000000f", "sb-00000009"):
        res = client.get("/files", params={"path": "x"}, headers={"E2b-Sandbox-Id": sid})
        assert res.status_code == 502 and "was not found" in res.json()["message"], res.text
    # the SDK's own addressing without E2B_SANDBOX_URL: https://49983-<id>.<E2B_DOMAIN> (through TLS)
    res = client.get("/files", params={"path": "x"}, headers={"Host": "49983-sb-00000009.sandbox.example"})
    assert res.status_code == 502 and "sb-00000009 was not found" in res.json()["message"], res.text
    upload = client.post(
        "/files",
        params={"path": "x"},
        content=b"x" * 10_000,
        headers={"E2b-Sandbox-Id": "sb-00000009", "content-type": "application/octet-stream"},
    )
    assert upload.status_code == 502, upload.text


# --- the official SDK against the app (no guest) --------------------------------------------------
@pytest.fixture
async def e2b_url(
    data_dir: Path, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    async with serve(_app(data_dir, tmp_path)) as url:
        for name, value in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", key)):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        yield url


async def test_the_sdk_reads_our_errors_as_its_exceptions(e2b_url: str) -> None:
    from e2b import AsyncSandbox, AuthenticationException, SandboxException, SandboxNotFoundException

    with pytest.raises(AuthenticationException):
        await AsyncSandbox.list(api_key="svm_wrong").next_items()
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info("sb-0000000e")
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect("sb-00000009")
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.set_timeout("sb-0000000f", 60)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_metrics("sb-00000009")
    with pytest.raises(SandboxException, match="no-such"):
        await AsyncSandbox.create("no-such")
    paginator = AsyncSandbox.list()
    assert await paginator.next_items() == [] and not paginator.has_next
    assert await AsyncSandbox.list_snapshots().next_items() == []
    assert await AsyncSandbox.kill("sb-0000000e") is True  # a failed sandbox is killed once
    assert await AsyncSandbox.kill("sb-0000000e") is False
    assert await AsyncSandbox.delete_snapshot("nope") is False


async def test_prune_drops_what_the_faces_hold_for_sandboxes_gone(data_dir: Path, tmp_path: Path) -> None:
    """Sandboxes that ended behind the face's back (sb-0000000f, stopped) lose their token and their
    CPU sample; a live one (sb-0000000e: failed, still to be killed) keeps both."""
    app = _app(data_dir, tmp_path)
    async with serve(app):
        face = app.face
        for sid in ("sb-0000000e", "sb-0000000f"):
            face.tokens.issue(sid)
            assert (
                face.cpu_percent(sid, SimpleNamespace(timestamp=100.0, cpu_seconds=10.0, cpu_count=1), 0.0)
                == 10
            )
        await face.prune()
        assert face.tokens.get("sb-0000000e") is not None and face.tokens.get("sb-0000000f") is None
        later = SimpleNamespace(timestamp=110.0, cpu_seconds=20.0, cpu_count=1)
        assert face.cpu_percent("sb-0000000e", later, 0.0) == 100  # since the kept sample
        assert face.cpu_percent("sb-0000000f", later, 0.0) == round(100 * 20 / 110, 2)  # since start
