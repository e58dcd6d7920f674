"""The E2B envd face (smartvm.service.e2b) behind a real uvicorn server, over the REAL guest agent
running on the host (the guest-side tests in tests/integration/test_e2b_envd_guest.py do the same in
a QEMU guest). Driven by the official e2b SDK and, below it, by Connect JSON over httpx."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture, pid_gone  # noqa: F401

from e2b_support import ConnectJSON, sdk_sandbox, serve
from smartvm.agent import AgentClient, FsEvent
from smartvm.service.e2b import EnvdApp, EnvdBinding, EnvdMiddleware
from smartvm.service.e2b.filesystem import WATCHER_BUFFER_BYTES

SID, TOKEN = "sb-0000e2b0", "token-of-sb-0000e2b0"
OTHER, OTHER_TOKEN = "sb-0000e2b1", "token-of-sb-0000e2b1"


@pytest.fixture
async def envd(agent: AgentClient) -> AsyncIterator[tuple[str, AgentClient]]:
    """The envd face for two sandboxes (both served by the one host agent) on a loopback port."""
    bindings = {
        SID: EnvdBinding(TOKEN, agent, env={"SANDBOX_ENV": "from-sandbox"}),
        OTHER: EnvdBinding(OTHER_TOKEN, agent),
    }
    async with serve(EnvdApp(bindings.get)) as url:
        yield url, agent


@pytest.fixture
async def rpc(envd: tuple[str, AgentClient]) -> AsyncIterator[ConnectJSON]:
    client = ConnectJSON(envd[0], SID, TOKEN)
    yield client
    await client.aclose()


# ------------------------------------------------------------------------------- routing and auth
async def test_routing_tokens_and_unknown_sandboxes(envd: tuple[str, AgentClient]) -> None:
    url, _ = envd
    ok = ConnectJSON(url, SID, TOKEN)
    wrong = ConnectJSON(url, SID, OTHER_TOKEN)  # another sandbox's token
    missing = ConnectJSON(url, "sb-ffffffff", TOKEN)
    try:
        assert (await ok.unary("process.Process/List", {})).status_code == 200
        refused = await wrong.unary("process.Process/List", {})
        assert refused.status_code == 401 and refused.json()["code"] == "unauthenticated"
        refused = await wrong.http.get("/files", params={"path": "/etc/hostname"}, headers=wrong.headers)
        assert refused.status_code == 401 and refused.json()["code"] == 401
        gone = await missing.unary("process.Process/List", {})
        assert gone.status_code == 502 and "was not found" in gone.json()["message"]
        health = await wrong.http.get("/health", headers=wrong.headers)  # no token needed, as in envd
        assert health.status_code == 204
        unnamed = await ok.http.get("/health")
        assert unnamed.status_code == 400
        by_host = await ok.http.get("/health", headers={"Host": f"49983-{SID}.e2b.local"})
        assert by_host.status_code == 204
    finally:
        for client in (ok, wrong, missing):
            await client.aclose()


async def test_sdk_exceptions_for_tokens_and_sandboxes(envd: tuple[str, AgentClient]) -> None:
    from e2b import AuthenticationException, SandboxNotRunningException

    url, _ = envd
    with pytest.raises(AuthenticationException):
        await sdk_sandbox(url, SID, OTHER_TOKEN).commands.run("true")
    with pytest.raises(AuthenticationException):
        await sdk_sandbox(url, SID, "nope").files.read("/etc/hostname")
    with pytest.raises(SandboxNotRunningException):
        await sdk_sandbox(url, "sb-ffffffff", TOKEN).commands.run("true")


async def test_middleware_shares_the_port_with_another_app(agent: AgentClient) -> None:
    async def rest(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"rest"})

    app = EnvdMiddleware(rest, {SID: EnvdBinding(TOKEN, agent)}.get)
    async with serve(app) as url:
        client = ConnectJSON(url, SID, TOKEN)
        try:
            assert (await client.http.get("/health")).text == "rest"  # no sandbox named: the REST app
            assert (await client.http.get("/health", headers=client.headers)).status_code == 204
        finally:
            await client.aclose()


# ------------------------------------------------------------------------------ Connect JSON, Start
async def test_start_stream_framing_and_events(rpc: ConnectJSON) -> None:
    body = {
        "process": {"cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; echo $SANDBOX_ENV $X; exit 3"]}
    }
    body["process"]["envs"] = {"X": "y"}
    frames = [f async for f in rpc.stream("process.Process/Start", body)]
    assert [flags for flags, _ in frames[:-1]] == [0] * (len(frames) - 1)
    assert frames[-1] == (2, {})  # end of stream, no error
    events = [msg["event"] for _, msg in frames[:-1]]
    assert "pid" in events[0]["start"]
    out = b"".join(base64.b64decode(e["data"]["stdout"]) for e in events if "stdout" in e.get("data", {}))
    err = b"".join(base64.b64decode(e["data"]["stderr"]) for e in events if "stderr" in e.get("data", {}))
    assert out == b"out\nfrom-sandbox y\n" and err == b"err\n"
    assert events[-1]["end"] == {
        "exitCode": 3,
        "exited": True,
        "status": "exit status 3",
        "error": "exit status 3",
    }


async def test_keepalive_pings_while_a_command_is_silent(rpc: ConnectJSON) -> None:
    body = {"process": {"cmd": "sleep", "args": ["1.5"]}}
    frames = [
        f async for f in rpc.stream("process.Process/Start", body, **{"Keepalive-Ping-Interval": "0.2"})
    ]
    kinds = [next(iter(msg["event"])) for _, msg in frames[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 3, kinds


async def test_connect_timeout_ends_the_stream_and_kills_the_command(rpc: ConnectJSON) -> None:
    body = {"process": {"cmd": "sleep", "args": ["300"]}}
    t0 = time.monotonic()
    frames = [f async for f in rpc.stream("process.Process/Start", body, **{"Connect-Timeout-Ms": "700"})]
    assert time.monotonic() - t0 < 30
    pid = frames[0][1]["event"]["start"]["pid"]
    flags, end = frames[-1]
    assert flags == 2 and end["error"]["code"] == "deadline_exceeded"
    assert pid_gone(pid, 30)


async def test_unsupported_pty_and_errors(rpc: ConnectJSON) -> None:
    body = {"process": {"cmd": "/bin/sh"}, "pty": {"size": {"cols": 80, "rows": 24}}}
    frames = [f async for f in rpc.stream("process.Process/Start", body)]
    assert frames == [(2, {"error": {"code": "unimplemented", "message": frames[0][1]["error"]["message"]}})]
    missing = await rpc.unary("filesystem.Filesystem/Stat", {"path": "/no/such/file"})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    not_dir = await rpc.unary("filesystem.Filesystem/ListDir", {"path": "/etc/hostname"})
    assert not_dir.json()["code"] == "invalid_argument"
    exists = await rpc.unary("filesystem.Filesystem/MakeDir", {"path": "/tmp"})
    assert exists.json()["code"] == "already_exists"
    no_proc = await rpc.unary(
        "process.Process/SendSignal", {"process": {"pid": 999999}, "signal": "SIGNAL_SIGKILL"}
    )
    assert no_proc.json()["code"] == "not_found"


async def test_smartvm_errors_before_any_stream_message_keep_their_code(rpc: ConnectJSON) -> None:
    """Handlers raise smartvm errors; unary calls and streams alike answer their Connect code."""
    empty = await rpc.unary("filesystem.Filesystem/Stat", {"path": ""})
    assert empty.json()["code"] == "invalid_argument" and "path is empty" in empty.json()["message"]
    bad_user = {"Authorization": "Basic not-base64!"}
    refused = await rpc.unary("filesystem.Filesystem/Stat", {"path": "/tmp"}, **bad_user)
    assert refused.json()["code"] == "invalid_argument"
    frames = [f async for f in rpc.stream("process.Process/Start", {"process": {"cmd": "true"}}, **bad_user)]
    assert [(flags, msg["error"]["code"]) for flags, msg in frames] == [(2, "invalid_argument")]
    frames = [f async for f in rpc.stream("filesystem.Filesystem/WatchDir", {"path": "/no/such/dir"})]
    assert [(flags, msg["error"]["code"]) for flags, msg in frames] == [(2, "not_found")]


# ------------------------------------------------------------------------------------- the SDK
async def test_sdk_commands(envd: tuple[str, AgentClient], tmp_path: Path) -> None:
    from e2b import CommandExitException

    sbx = sdk_sandbox(envd[0], SID, TOKEN)
    seen: list[str] = []
    r = await sbx.commands.run(
        "echo one; echo two >&2; echo $SANDBOX_ENV $MINE; pwd",
        envs={"MINE": "mine"},
        cwd=str(tmp_path),
        on_stdout=seen.append,
    )
    assert r.exit_code == 0 and r.stderr == "two\n"
    assert r.stdout == f"one\nfrom-sandbox mine\n{tmp_path}\n" and "".join(seen) == r.stdout
    with pytest.raises(CommandExitException) as exc:
        await sbx.commands.run("echo bad >&2; exit 7")
    assert exc.value.exit_code == 7 and exc.value.stderr == "bad\n"
    assert (await sbx.commands.run("id -un", user="nobody")).stdout == "nobody\n"

    # background: stdin, list, connect, kill
    handle = await sbx.commands.run("read a; echo got $a; read b; echo got $b", background=True, stdin=True)
    assert handle.pid in [p.pid for p in await sbx.commands.list()]
    await handle.send_stdin("1\n")
    again = await sbx.commands.connect(handle.pid)
    await sbx.commands.send_stdin(handle.pid, "2\n")
    done = await again.wait()
    assert done.exit_code == 0 and "got 2" in done.stdout
    assert handle.pid not in [p.pid for p in await sbx.commands.list()]
    sleeper = await sbx.commands.run("sleep 300", background=True)
    assert await sleeper.kill() is True
    with pytest.raises(CommandExitException) as killed:
        await sleeper.wait()
    assert killed.value.exit_code == -1 and killed.value.error == "signal: killed"
    assert await sbx.commands.kill(sleeper.pid) is False  # gone: envd answers not found

    # stdin closed: cat ends
    cat = await sbx.commands.run("cat", background=True, stdin=True)
    await cat.send_stdin("to cat")
    await cat.close_stdin()
    assert (await cat.wait()).stdout == "to cat"

    # ordered stream input
    cat = await sbx.commands.run("cat", background=True, stdin=True)
    async with sbx.commands.stream_input(cat.pid) as stream:
        for i in range(5):
            await stream.send(f"{i},")
    await sbx.commands.close_stdin(cat.pid)
    assert (await cat.wait()).stdout == "0,1,2,3,4,"


async def test_sdk_files(envd: tuple[str, AgentClient], tmp_path: Path) -> None:
    from e2b import FileType, NotFoundException

    sbx = sdk_sandbox(envd[0], SID, TOKEN)
    base = str(tmp_path)
    info = await sbx.files.write(f"{base}/a/b.txt", "text")
    assert info.path == f"{base}/a/b.txt" and info.name == "b.txt"
    await sbx.files.write(f"{base}/bytes.bin", b"\x00\xff" * 1000)
    await sbx.files.write(f"{base}/filelike.bin", io.BytesIO(b"file-like"))  # octet-stream
    await sbx.files.write(f"{base}/gz.txt", "gzipped " * 1000, gzip=True)
    many = await sbx.files.write_files(
        [{"path": f"{base}/m/{i}.txt", "data": f"file {i}"} for i in range(5)]  # one multipart request
    )
    assert [w.path for w in many] == [f"{base}/m/{i}.txt" for i in range(5)]

    assert await sbx.files.read(f"{base}/a/b.txt") == "text"
    assert await sbx.files.read(f"{base}/bytes.bin", format="bytes") == b"\x00\xff" * 1000
    assert await sbx.files.read(f"{base}/gz.txt") == "gzipped " * 1000
    stream = await sbx.files.read(f"{base}/filelike.bin", format="stream")
    assert b"".join([chunk async for chunk in stream]) == b"file-like"
    assert (await sbx.files.read(f"{base}/m/3.txt")) == "file 3"
    with pytest.raises(NotFoundException):
        await sbx.files.read(f"{base}/missing.txt")

    top = await sbx.files.list(base)
    assert sorted(e.name for e in top) == ["a", "bytes.bin", "filelike.bin", "gz.txt", "m"]
    deep = await sbx.files.list(base, depth=2)
    assert f"{base}/a/b.txt" in [e.path for e in deep]
    assert await sbx.files.exists(f"{base}/a/b.txt") and not await sbx.files.exists(f"{base}/nope")
    entry = await sbx.files.get_info(f"{base}/a/b.txt")
    assert entry.type == FileType.FILE and entry.size == 4 and entry.permissions == "-rw-r--r--"
    assert await sbx.files.make_dir(f"{base}/new/dir") is True
    assert await sbx.files.make_dir(f"{base}/new/dir") is False
    moved = await sbx.files.rename(f"{base}/a/b.txt", f"{base}/new/b.txt")
    assert moved.path == f"{base}/new/b.txt" and not await sbx.files.exists(f"{base}/a/b.txt")
    await sbx.files.remove(f"{base}/new")
    await sbx.files.remove(f"{base}/new")  # nothing there: fine, as in envd
    assert not await sbx.files.exists(f"{base}/new")


async def test_sdk_files_as_a_user(envd: tuple[str, AgentClient], tmp_path: Path) -> None:
    sbx = sdk_sandbox(envd[0], SID, TOKEN)
    os.chmod(tmp_path, 0o777)
    await sbx.files.write(f"{tmp_path}/u/owned.txt", "mine", user="nobody")
    await sbx.files.make_dir(f"{tmp_path}/u/dir", user="nobody")
    for path in (tmp_path / "u", tmp_path / "u" / "owned.txt", tmp_path / "u" / "dir"):
        assert path.stat().st_uid == 65534, path
    assert (await sbx.files.get_info(f"{tmp_path}/u/owned.txt")).owner == "nobody"


async def test_sdk_watch(envd: tuple[str, AgentClient], tmp_path: Path) -> None:
    from e2b import FilesystemEventType

    sbx = sdk_sandbox(envd[0], SID, TOKEN)
    (tmp_path / "nested").mkdir()
    events: list[tuple[str, Any]] = []
    wrote = asyncio.Event()

    def on_event(e: Any) -> None:
        events.append((e.name, e.type))
        if e.type == FilesystemEventType.WRITE and e.name == "nested/f.txt":
            wrote.set()

    handle = await sbx.files.watch_dir(str(tmp_path), on_event=on_event, recursive=True)
    await sbx.files.write(f"{tmp_path}/nested/f.txt", "watched")
    async with asyncio.timeout(30):
        await wrote.wait()
    await handle.stop()
    from e2b import NotFoundException, SandboxException

    with pytest.raises(NotFoundException):
        await sbx.files.watch_dir(f"{tmp_path}/missing", on_event=lambda e: None)
    with pytest.raises(SandboxException):
        await sbx.files.watch_dir(f"{tmp_path}/nested/f.txt", on_event=lambda e: None)


async def test_sync_sdk(envd: tuple[str, AgentClient], tmp_path: Path) -> None:
    def work() -> tuple[str, str]:
        sbx = sdk_sandbox(envd[0], SID, TOKEN, sync=True)
        sbx.files.write(f"{tmp_path}/sync.txt", "sync")
        return sbx.commands.run(f"cat {tmp_path}/sync.txt").stdout, sbx.files.read(f"{tmp_path}/sync.txt")

    assert await asyncio.to_thread(work) == ("sync", "sync")


# --------------------------------------------------------------------------- non-streaming watchers
async def test_watcher_calls(envd: tuple[str, AgentClient], rpc: ConnectJSON, tmp_path: Path) -> None:
    created = await rpc.unary("filesystem.Filesystem/CreateWatcher", {"path": str(tmp_path)})
    watcher = created.json()["watcherId"]
    (tmp_path / "w.txt").write_text("x")
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while not any(e["name"] == "w.txt" and e["type"] == "EVENT_TYPE_WRITE" for e in events):
            got = await rpc.unary("filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})
            events += got.json().get("events", [])
            await asyncio.sleep(0.05)
    other = ConnectJSON(envd[0], OTHER, OTHER_TOKEN)
    try:  # another sandbox cannot use it
        stolen = await other.unary("filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})
        assert stolen.json()["code"] == "not_found"
    finally:
        await other.aclose()
    assert (await rpc.unary("filesystem.Filesystem/RemoveWatcher", {"watcherId": watcher})).status_code == 200
    gone = await rpc.unary("filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})
    assert gone.json()["code"] == "not_found"
    missing = await rpc.unary("filesystem.Filesystem/CreateWatcher", {"path": str(tmp_path / "none")})
    assert missing.json()["code"] == "not_found"


async def test_ended_watchers_of_sandboxes_gone_are_dropped(agent: AgentClient, tmp_path: Path) -> None:
    """What the REST face's prune does for sandboxes that ended behind its back: their ended watchers
    go; a watch still running (perhaps of a sandbox newer than the list) and live sandboxes' stay."""
    app = EnvdApp({SID: EnvdBinding(TOKEN, agent), OTHER: EnvdBinding(OTHER_TOKEN, agent)}.get)
    (tmp_path / "ends").mkdir()
    async with serve(app) as url:
        rpc, other = ConnectJSON(url, SID, TOKEN), ConnectJSON(url, OTHER, OTHER_TOKEN)

        async def create(client: ConnectJSON, path: Path) -> str:
            created = await client.unary("filesystem.Filesystem/CreateWatcher", {"path": str(path)})
            return str(created.json()["watcherId"])

        async def events(client: ConnectJSON, watcher: str) -> Any:
            return await client.unary("filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})

        try:
            ending, running = await create(rpc, tmp_path / "ends"), await create(rpc, tmp_path)
            kept = await create(other, tmp_path / "ends")
            (tmp_path / "ends").rmdir()  # both watches of it end
            tasks = [app.filesystem._watchers[w].task for w in (ending, kept)]
            done, _ = await asyncio.wait([t for t in tasks if t is not None], timeout=30)
            assert len(done) == 2
            app.filesystem.drop_ended(alive={OTHER})
            assert (await events(rpc, ending)).json()["message"] == f"watcher {ending!r} not found"
            assert (await events(rpc, running)).status_code == 200
            assert (await events(other, kept)).json().get("message") != f"watcher {kept!r} not found"
        finally:
            await rpc.aclose()
            await other.aclose()


class _FloodingGuest:
    """A hostile guest: its watch sends as many events as it likes, each with a name as long as an
    agent frame allows. `flooded` is set once all are sent."""

    def __init__(self, count: int) -> None:
        self.count, self.flooded = count, asyncio.Event()
        self.files, self.processes = self, self

    async def watch(self, path: str, **options: Any) -> AsyncIterator[FsEvent]:
        yield FsEvent("", "start")
        for i in range(self.count):
            yield FsEvent(f"{i:04}-" + "x" * 200_000, "create")
        self.flooded.set()
        await asyncio.Event().wait()  # the watch stays open


async def test_a_watcher_buffers_a_bounded_number_of_bytes() -> None:
    guest = _FloodingGuest(100)  # 20 MB of names, far fewer events than the count limit
    async with serve(EnvdApp({SID: EnvdBinding(TOKEN, guest)}.get)) as url:  # type: ignore[arg-type]
        rpc = ConnectJSON(url, SID, TOKEN)
        try:
            created = await rpc.unary("filesystem.Filesystem/CreateWatcher", {"path": "/flooded"})
            watcher = created.json()["watcherId"]
            async with asyncio.timeout(60):
                await guest.flooded.wait()
            got = await rpc.unary("filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})
            names = [e["name"] for e in got.json()["events"]]
            assert 0 < len(names) < 100 and sum(map(len, names)) <= WATCHER_BUFFER_BYTES
            assert names[-1].startswith("0099-")  # the newest are kept
        finally:
            await rpc.aclose()


# --------------------------------------------------------------------------- /files streams both ways
def _wait_for_part_file(directory: Path) -> None:
    while not any(p.name.endswith(".smartvm-part") and p.stat().st_size > 0 for p in directory.iterdir()):
        time.sleep(0.02)


async def test_upload_reaches_the_guest_while_the_client_is_still_sending(
    rpc: ConnectJSON, tmp_path: Path
) -> None:
    target = tmp_path / "big.bin"
    chunk = os.urandom(1 << 20)

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        async with asyncio.timeout(30):  # the first MiB is in the guest before the second is sent
            await asyncio.to_thread(_wait_for_part_file, tmp_path)
        for _ in range(7):
            yield chunk

    r = await rpc.http.post(
        "/files",
        params={"path": str(target)},
        content=body(),
        headers={**rpc.headers, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == [{"path": str(target), "name": "big.bin", "type": "file"}]
    assert target.read_bytes() == chunk * 8


async def test_download_streams_before_the_file_ends(rpc: ConnectJSON, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got_first = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as f:
            f.write(b"first")
            f.flush()
            got_first.wait(30)  # the client has the first bytes while the "file" is still open
            f.write(b"-rest")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        async with rpc.http.stream("GET", "/files", params={"path": str(fifo)}, headers=rpc.headers) as r:
            assert r.status_code == 200
            received = b""
            async for part in r.aiter_bytes():
                received += part
                if received == b"first":
                    got_first.set()
        assert received == b"first-rest"
    finally:
        got_first.set()
        thread.join(30)


async def test_bad_uploads(rpc: ConnectJSON, tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    broken = gzip.compress(b"x" * 100_000)[:-20]
    r = await rpc.http.post(
        "/files",
        params={"path": str(target)},
        content=broken,
        headers={**rpc.headers, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 400 and "gzip" in r.json()["message"]
    assert os.listdir(tmp_path) == []  # no half-written file, no temp file
    r = await rpc.http.post("/files", headers={**rpc.headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400  # no path
    r = await rpc.http.get("/files", params={"path": str(tmp_path)}, headers=rpc.headers)
    assert r.status_code == 400  # a directory
    with contextlib.suppress(FileNotFoundError):
        target.unlink()


async def test_download_of_any_file_name(rpc: ConnectJSON, tmp_path: Path) -> None:
    """A header is Latin-1 on the wire: the name goes out RFC 6266-encoded, never as a 500."""
    for name in ("文件.txt", "naïve.txt", 'quote"back\\slash.txt'):
        (tmp_path / name).write_text(name)
        r = await rpc.http.get("/files", params={"path": str(tmp_path / name)}, headers=rpc.headers)
        assert r.status_code == 200 and r.text == name, (name, r.status_code)
        disposition = r.headers["content-disposition"]
        assert disposition.isascii() and disposition.startswith("attachment; filename=")
        charset, _, quoted = disposition.split("filename*=", 1)[1].partition("''")
        assert charset == "utf-8" and urllib.parse.unquote(quoted) == name


async def test_a_silent_stream_costs_one_task_and_ends_when_its_client_goes(
    envd: tuple[str, AgentClient], rpc: ConnectJSON
) -> None:
    """A Start stream waiting on a silent command holds one task of its own (the agent pump; no
    watcher, no per-wait task), and its client going away ends it at once: the command keeps
    running (detached, as envd does) and nothing of the stream is left."""
    _, agent = envd
    await rpc.unary("process.Process/List", {})  # the connection and the server's tasks exist now
    before = asyncio.all_tasks()
    stream = rpc.stream("process.Process/Start", {"process": {"cmd": "sleep", "args": ["300"]}})
    _, first = await anext(stream)
    pid = first["event"]["start"]["pid"]
    await asyncio.sleep(0.3)
    during = {t for t in asyncio.all_tasks() if t not in before} - {asyncio.current_task()}
    # the server's task for the request, connectrpc's disconnect monitor, the pump
    assert len(during) <= 3, sorted(t.get_coro().__qualname__ for t in during)  # type: ignore[union-attr]
    await stream.aclose()  # the client goes away
    _, pending = await asyncio.wait(during, timeout=10)
    assert not pending
    running = {p.pid: p for p in await agent.processes.list()}
    assert running[pid].running
    await agent.processes.signal(pid, "SIGKILL")
