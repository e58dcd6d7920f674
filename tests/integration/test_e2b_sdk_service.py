"""The official e2b SDK, unchanged, against ``smartvm serve`` started by the test (QEMU guests): the REST
face creates and manages sandboxes, the envd face runs their commands and files. Configured only
through the SDK's environment variables (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY), as a user would.

One service per module on the session's sandbox data dir (the ``base`` template is built once); each
test kills what it made, and at the end nothing may be left on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox_support import assert_no_sandbox_left

from e2b_support import sdk_sandbox
from service_support import Served, make_key, start_serve
from smartvm.service.e2b.rest.tokens import AccessTokens

pytestmark = pytest.mark.integration


class Service:
    """The module's ``smartvm serve``; ``restart`` stops it (SIGTERM, sandboxes kept) and starts anew."""

    def __init__(self, data_dir: Path, runtime_dir: Path) -> None:
        self.data_dir, self.runtime_dir = data_dir, runtime_dir
        self.key = make_key(data_dir, f"e2b-{os.getpid()}-{time.monotonic_ns()}")
        self.served: Served = start_serve(data_dir, runtime_dir)

    @property
    def url(self) -> str:
        return self.served.url

    def restart(self) -> None:
        code, err = self.served.stop()
        assert code == 0, err
        self.served = start_serve(self.data_dir, self.runtime_dir)

    def kill_all(self) -> None:
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=120) as http:
            for sb in http.get("/v1/sandboxes").json():
                http.delete(f"/v1/sandboxes/{sb['id']}")


@pytest.fixture(scope="module")
def service(sandbox_data: Path) -> Iterator[Service]:
    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    svc = Service(sandbox_data, runtime)
    try:
        yield svc
    finally:
        try:
            svc.kill_all()
            code, err = svc.served.stop()
            assert code == 0, err
            assert_no_sandbox_left(sandbox_data, runtime)
        finally:
            shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def e2b_env(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_URL", service.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", service.url)
    monkeypatch.setenv("E2B_API_KEY", service.key)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_ACCESS_TOKEN", raising=False)


@pytest.fixture
async def sandbox(e2b_env: None) -> AsyncIterator[Any]:
    from e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(timeout=300, metadata={"suite": "e2b-sdk"}, envs={"CREATED_WITH": "envs"})
    try:
        yield sbx
    finally:
        await sbx.kill()


async def test_commands(sandbox: Any) -> None:
    from e2b import CommandExitException

    out: list[str] = []
    r = await sandbox.commands.run(
        "echo $CREATED_WITH $X; id -un; pwd; echo err >&2", envs={"X": "x"}, on_stdout=out.append
    )
    assert r.stdout == "envs x\nuser\n/home/user\n" and r.stderr == "err\n" and "".join(out) == r.stdout
    assert (await sandbox.commands.run("id -un", user="root")).stdout == "root\n"
    assert (await sandbox.commands.run("pwd", cwd="/tmp")).stdout == "/tmp\n"
    with pytest.raises(CommandExitException) as exc:
        await sandbox.commands.run("exit 3")
    assert exc.value.exit_code == 3
    handle = await sandbox.commands.run("cat", background=True, stdin=True)
    assert handle.pid in [p.pid for p in await sandbox.commands.list()]
    again = await sandbox.commands.connect(handle.pid)
    await handle.send_stdin("hi\n")
    await sandbox.commands.close_stdin(handle.pid)
    assert (await again.wait()).stdout == "hi\n"
    sleeper = await sandbox.commands.run("sleep 600", background=True)
    assert await sleeper.kill()
    assert (await sandbox.commands.run("python3 -c 'print(6*7)'")).stdout == "42\n"


async def test_files(sandbox: Any) -> None:
    from e2b import FilesystemEventType

    await sandbox.files.write("t.txt", "text")
    await sandbox.files.write("b.bin", b"\x00\x01")
    await sandbox.files.write("f.bin", io.BytesIO(b"file-like"))
    await sandbox.files.write_files([{"path": f"many/{i}", "data": str(i)} for i in range(4)])
    assert await sandbox.files.read("t.txt") == "text"
    assert await sandbox.files.read("b.bin", format="bytes") == b"\x00\x01"
    stream = await sandbox.files.read("f.bin", format="stream")
    assert b"".join([c async for c in stream]) == b"file-like"
    assert {e.name for e in await sandbox.files.list("/home/user", depth=2)} >= {"t.txt", "many", "0"}
    assert await sandbox.files.exists("t.txt") and not await sandbox.files.exists("nope")
    info = await sandbox.files.get_info("t.txt")
    assert info.owner == "user" and info.path == "/home/user/t.txt"
    assert await sandbox.files.make_dir("d")
    await sandbox.files.rename("d", "e")
    await sandbox.files.remove("e")
    assert not await sandbox.files.exists("e")
    seen = asyncio.Event()
    watch = await sandbox.files.watch_dir(
        "/home/user",
        on_event=lambda e: seen.set() if e.type == FilesystemEventType.WRITE and e.name == "w" else None,
    )
    await sandbox.files.write("w", "x")
    async with asyncio.timeout(60):
        await seen.wait()
    await watch.stop()


async def _counter(sbx: Any) -> int:
    """The background counter's value in the file ``n``, once it has written one (``echo > n``
    truncates first, so a read can see it empty for a moment)."""
    from e2b.exceptions import FileNotFoundException

    for _ in range(100):
        with contextlib.suppress(FileNotFoundException, ValueError):  # not there yet, or caught empty
            return int(await sbx.files.read("n"))
        await asyncio.sleep(0.1)
    raise AssertionError("the background counter never wrote n")


async def test_lifecycle(e2b_env: None) -> None:
    from e2b import AsyncSandbox, SandboxQuery, SandboxState

    tag = f"lifecycle-{os.getpid()}-{time.monotonic_ns()}"
    first = await AsyncSandbox.create(timeout=120, metadata={"tag": tag, "n": "1"})
    second = await AsyncSandbox.create(timeout=120, metadata={"tag": tag, "n": "2"})
    try:
        info = await first.get_info()
        assert info.metadata == {"tag": tag, "n": "1"} and info.template_id == "base"
        assert info.state == SandboxState.RUNNING and info.cpu_count >= 1 and info.memory_mb >= 128
        assert info.end_at > info.started_at

        # metadata filter and paging through the x-next-token header, one item per page
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=1)
        ids = []
        while paginator.has_next:
            page = await paginator.next_items()
            assert len(page) <= 1
            ids += [s.sandbox_id for s in page]
        assert sorted(ids) == sorted([first.sandbox_id, second.sandbox_id])
        only = await AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag, "n": "2"})).next_items()
        assert [s.sandbox_id for s in only] == [second.sandbox_id]

        before = (await first.get_info()).end_at
        await first.set_timeout(600)
        assert ((await first.get_info()).end_at - before).total_seconds() > 400

        metrics = await first.get_metrics()
        assert len(metrics) == 1 and metrics[0].cpu_count >= 1
        assert 0 < metrics[0].mem_used <= metrics[0].mem_total and metrics[0].disk_total > 0

        # a command running across pause and resume, and a file that survives
        await first.files.write("keep.txt", "kept")
        runner = await first.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > n; sleep 0.2; done", background=True
        )
        counted = await _counter(first)  # the loop has run (a login shell starts slowly under TCG)
        assert await first.pause() is True
        assert await AsyncSandbox.pause(first.sandbox_id) is False  # 409: already paused
        assert (await AsyncSandbox.get_info(first.sandbox_id)).state == SandboxState.PAUSED
        paused = AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED]))
        assert [s.sandbox_id for s in await paused.next_items()] == [first.sandbox_id]
        resumed = await AsyncSandbox.connect(first.sandbox_id)
        assert (await resumed.get_info()).state == SandboxState.RUNNING
        assert await resumed.files.read("keep.txt") == "kept"
        n1 = await _counter(resumed)
        assert n1 >= counted  # it went on from where it was, not from 0
        await asyncio.sleep(1)
        assert await _counter(resumed) > n1
        await resumed.commands.kill(runner.pid)
        again = await AsyncSandbox.connect(first.sandbox_id)  # running: 200, same token
        assert again._envd_access_token == resumed._envd_access_token

        # one sandbox's token is refused on another
        from e2b import AuthenticationException

        url = os.environ["E2B_SANDBOX_URL"]
        with pytest.raises(AuthenticationException):
            await sdk_sandbox(url, second.sandbox_id, resumed._envd_access_token).commands.run("true")

        assert await AsyncSandbox.kill(second.sandbox_id) is True
        assert await AsyncSandbox.kill(second.sandbox_id) is False
    finally:
        for sbx in (first, second):
            await AsyncSandbox.kill(sbx.sandbox_id)


async def test_errors(e2b_env: None) -> None:
    from e2b import (
        AsyncSandbox,
        AuthenticationException,
        NotFoundException,
        SandboxException,
        SandboxNotFoundException,
    )

    with pytest.raises(AuthenticationException):
        await AsyncSandbox.list(api_key="svm_wrong").next_items()
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key="svm_wrong")
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect("sb-00000000")
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info("sb-00000000")
    with pytest.raises(NotFoundException):
        await AsyncSandbox.pause("not-an-id")
    assert await AsyncSandbox.kill("sb-00000000") is False
    with pytest.raises(SandboxException, match="no template"):
        await AsyncSandbox.create("no-such-template")
    with pytest.raises(SandboxException, match="not supported by smartvm"):
        await AsyncSandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})


async def test_snapshots(sandbox: Any, e2b_env: None) -> None:
    from e2b import AsyncSandbox

    await sandbox.files.write("snap.txt", "in the snapshot")
    snap = await sandbox.create_snapshot()
    assert snap.snapshot_id.startswith(sandbox.sandbox_id) and snap.names == [snap.snapshot_id]
    listed = [s.snapshot_id for s in await sandbox.list_snapshots().next_items()]
    assert listed == [snap.snapshot_id]
    clone = await AsyncSandbox.create(snap.snapshot_id, timeout=120)
    try:
        assert await clone.files.read("snap.txt") == "in the snapshot"
        assert (await clone.get_info()).template_id == snap.snapshot_id
    finally:
        await clone.kill()
    assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is True
    assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is False


def test_the_v1_routes_older_sdks_use(service: Service) -> None:
    with httpx.Client(base_url=service.url, headers={"X-API-KEY": service.key}, timeout=120) as http:
        res = http.post("/sandboxes", json={"templateID": "base", "timeout": 60, "metadata": {"v1": "yes"}})
        assert res.status_code == 201, res.text
        sid = res.json()["sandboxID"]
        try:
            listed = http.get("/sandboxes", params={"metadata": "v1=yes"}).json()
            assert [s["sandboxID"] for s in listed] == [sid]
            metrics = http.get("/sandboxes/metrics", params={"sandbox_ids": f"{sid},sb-00000000"}).json()
            assert list(metrics["sandboxes"]) == [sid] and metrics["sandboxes"][sid]["cpuCount"] == 1
            end = http.get(f"/sandboxes/{sid}").json()["endAt"]
            assert http.post(f"/sandboxes/{sid}/refreshes", json={"duration": 600}).status_code == 204
            assert http.get(f"/sandboxes/{sid}").json()["endAt"] > end
            assert http.post(f"/sandboxes/{sid}/resume", json={}).status_code == 409  # it runs
            assert http.post(f"/sandboxes/{sid}/pause").status_code == 204
            assert http.get("/sandboxes", params={"metadata": "v1=yes"}).json() == []  # running ones only
            res = http.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
            assert res.status_code == 201 and res.json()["sandboxID"] == sid, res.text
            assert http.post(f"/sandboxes/{sid}/connect", json={"timeout": 60}).status_code == 200
            assert http.post("/sandboxes/sb-00000000/refreshes", json={}).status_code == 404
        finally:
            assert http.delete(f"/sandboxes/{sid}").status_code == 204


async def test_fork(sandbox: Any, e2b_env: None) -> None:
    from e2b import AsyncSandbox, SandboxNotFoundException

    await sandbox.files.write("fork.txt", "from the parent")
    forks = await sandbox.fork(count=2, timeout=60)
    try:
        assert all(isinstance(f, AsyncSandbox) for f in forks), forks
        assert len({sandbox.sandbox_id, *(f.sandbox_id for f in forks)}) == 3
        for fork in forks:
            assert await fork.files.read("fork.txt") == "from the parent"
            assert (await fork.commands.run("whoami")).stdout == "user\n"  # its own envd token works
        await forks[0].files.write("fork.txt", "changed")
        assert await forks[1].files.read("fork.txt") == "from the parent"
        assert await sandbox.is_running()
    finally:
        for fork in forks:
            if isinstance(fork, AsyncSandbox):
                await fork.kill()
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.fork("sb-00000000")


async def test_network_rules(sandbox: Any, e2b_env: None) -> None:
    from e2b import AsyncSandbox, SandboxException

    assert (await sandbox.get_info()).network == {"allow_out": [], "deny_out": []}  # everything allowed
    await sandbox.update_network({"deny_out": ["198.51.100.0/24"], "allow_out": ["198.51.100.7"]})
    rules = (await sandbox.get_info()).network
    assert rules["allow_out"] == ["198.51.100.7/32"]
    denied = [ipaddress.ip_network(n) for n in rules["deny_out"]]  # the /24 without the allowed one
    assert sum(n.num_addresses for n in denied) == 255
    assert not any(ipaddress.ip_address("198.51.100.7") in n for n in denied)
    await sandbox.update_network({"allow_internet_access": False})
    assert (await sandbox.get_info()).network == {"allow_out": [], "deny_out": ["0.0.0.0/0"]}
    with pytest.raises(SandboxException, match="domain"):
        await sandbox.update_network({"allow_out": ["example.com"]})
    closed = await AsyncSandbox.create(network={"deny_out": ["0.0.0.0/0"], "allow_out": ["192.0.2.1"]})
    try:
        rules = (await closed.get_info()).network
        assert rules == {"allow_out": ["192.0.2.1/32"], "deny_out": ["0.0.0.0/0"]}
        assert (await closed.commands.run("echo up")).stdout == "up\n"
    finally:
        await closed.kill()
    with pytest.raises(SandboxException, match="egressProxy"):
        await AsyncSandbox.create(network={"egress_proxy": {"address": "127.0.0.1:1080"}})


def test_sync_client(e2b_env: None) -> None:
    from e2b import Sandbox, SandboxQuery, SandboxState

    sbx = Sandbox.create(timeout=120, metadata={"client": "sync"}, lifecycle={"on_timeout": "pause"})
    try:
        sbx.files.write("s.txt", "sync")
        assert sbx.commands.run("cat s.txt").stdout == "sync"
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id and info.lifecycle == {
            "on_timeout": "pause",
            "auto_resume": False,
        }
        sbx.set_timeout(300)
        assert sbx.get_metrics()[0].mem_total > 0
        found = Sandbox.list(query=SandboxQuery(metadata={"client": "sync"})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
        assert sbx.pause() is True and Sandbox.pause(sbx.sandbox_id) is False
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.get_info().state == SandboxState.RUNNING
        assert resumed.commands.run("cat s.txt").stdout == "sync"
    finally:
        assert sbx.kill()
        assert not Sandbox.kill(sbx.sandbox_id)


async def test_token_survives_restart(service: Service, e2b_env: None) -> None:
    """A sandbox's envd token is stored: after a restart of the service the SDK object made before it
    still reaches the sandbox, and a wrong token is still refused. The token of a sandbox that ended
    behind the E2B face's back (killed over /v1) goes with the first token issued after the start."""
    from e2b import AsyncSandbox, AuthenticationException

    sbx = await AsyncSandbox.create(timeout=300)
    ended = await AsyncSandbox.create(timeout=300)
    later = None
    try:
        token = sbx._envd_access_token
        assert token and len(token) >= 32
        async with httpx.AsyncClient(base_url=service.url, headers={"X-API-Key": service.key}) as http:
            assert (await http.delete(f"/v1/sandboxes/{ended.sandbox_id}")).status_code == 204
        service.restart()
        after = sdk_sandbox(service.url, sbx.sandbox_id, token)
        assert (await after.commands.run("echo still")).stdout == "still\n"
        with pytest.raises(AuthenticationException):
            await sdk_sandbox(service.url, sbx.sandbox_id, "wrong-token").commands.run("true")
        conn = {"api_url": service.url, "sandbox_url": service.url}
        assert (await AsyncSandbox.connect(sbx.sandbox_id, **conn))._envd_access_token == token

        later = await AsyncSandbox.create(timeout=300, **conn)  # issues a token: prunes first
        with AccessTokens(service.data_dir) as tokens:
            assert tokens.get(ended.sandbox_id) is None
            assert tokens.get(sbx.sandbox_id) == token
            assert tokens.get(later.sandbox_id) == later._envd_access_token
    finally:
        for one in (sbx, ended, later):
            if one is not None:
                await AsyncSandbox.kill(one.sandbox_id, api_url=service.url)


def test_the_readme_example_runs(service: Service) -> None:
    """The README's "Use the E2B SDK" example, as written, with only the three variables set."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Use the E2B SDK") :]
    exports = re.findall(r"^export (E2B_\w+)=", section, re.M)
    assert exports == ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the README's E2B section has no python example"
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(E2B_API_URL=service.url, E2B_SANDBOX_URL=service.url, E2B_API_KEY=service.key)
    res = subprocess.run(
        [sys.executable, "-c", code.group(1)], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "42\n\nkept\n"
