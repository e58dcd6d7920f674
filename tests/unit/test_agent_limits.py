"""A guest gains nothing on the host through the agent client: paths, modes, sizes, timeouts.

Most tests run the REAL guest agent on the host (agent_harness); the hostile-name test uses a small
fake agent that lies the way a guest whose root replaced the agent can.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from agent_harness import AgentServer, agent_fixture, agent_server_fixture  # noqa: F401

from mount_helpers import tiny_tmpfs
from smartvm.agent import AgentClient, ExecTimeoutError
from smartvm.agent import protocol as p
from smartvm.cli.detached import copy_file, plan_copy
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.vm import MicroVM


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _vm(client: AgentClient) -> MicroVM:
    """What copy_file needs of a VM: its files and id."""
    return cast(MicroVM, SimpleNamespace(files=client.files, id="vm1"))


# ------------------------------------------------------------------------------------ hostile agent
class HostileAgent:
    """Speaks the agent protocol and lies: file_stat names the file ``name``, modes carry setuid."""

    def __init__(self, name: str, *, malformed: bool = False) -> None:
        self.name = name
        self.malformed = malformed
        self.dir = Path(tempfile.mkdtemp(prefix="svhostile-", dir="/tmp"))
        self.sock = self.dir / "agent.sock"
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> HostileAgent:
        self.server = await asyncio.start_unix_server(self._serve, str(self.sock))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for entry in self.dir.iterdir():
            entry.unlink()
        self.dir.rmdir()

    async def open_stream(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.sock))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = p.FrameDecoder()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    assert isinstance(frame, p.Frame)
                    writer.write(self._answer(frame))
                await writer.drain()
        writer.close()

    def _answer(self, frame: p.Frame) -> bytes:
        if frame.type == p.HELLO:
            hello = {"protocol": p.PROTOCOL_VERSION, "pid": 1, "started": 1.0, "transport": "unix"}
            return p.encode_frame(p.HELLO, 0, hello)
        op, cid = frame.header.get("op"), frame.channel
        if self.malformed:
            return self._malformed(str(op), cid)
        if op == "file_stat":
            info = {"name": self.name, "path": self.name, "type": "file", "size": 5, "mode": 0o6777}
            return p.encode_frame(p.RESULT, cid, {**info, "uid": 0, "gid": 0, "mtime": 0.0})
        if op == "file_read":
            return (
                p.encode_frame(p.EVENT, cid, {"event": "open", "size": 5, "mode": 0o6777})
                + p.encode_frame(p.DATA, cid, {"s": "file"}, b"owned")
                + p.encode_frame(p.RESULT, cid, {"size": 5})
            )
        return b""  # CANCEL and the rest: no answer

    @staticmethod
    def _malformed(op: str, cid: int) -> bytes:
        """Answers of the right shape with values no agent would send (wrong types, out of range)."""
        entry = {"name": "f", "path": "/f", "type": "file", "size": 1, "mode": 0o644, "uid": 0, "gid": 0}
        bad = {
            "file_stat": {"name": "x"},
            "file_list": {"entries": "nope"},
            "proc_list": {"processes": [{"pid": "not a number"}]},
            "file_entries": {"entry": {**entry, "mtime": float("inf")}},
            "file_prepare": {**entry, "size": -1, "mtime": 0.0, "created": True},
            "user_info": {"name": "u", "uid": -1, "gid": 0, "home": "/"},
        }
        if op in bad:
            return p.encode_frame(p.RESULT, cid, bad[op])
        done = p.encode_frame(p.RESULT, cid, {"exit_code": 0, "pid": 5, "path": "/"})
        if op in ("exec", "proc_run"):  # a started event with a pid that is no pid
            return p.encode_frame(p.EVENT, cid, {"event": "started", "pid": "1; rm -rf /"}) + done
        if op == "file_watch":
            fs = {"event": "fs", "events": [{"name": 7, "type": "write"}]}
            return (
                p.encode_frame(p.EVENT, cid, {"event": "started"}) + p.encode_frame(p.EVENT, cid, fs) + done
            )
        return p.encode_frame(p.RESULT, cid, {"exit_code": "x"})


@pytest.mark.parametrize("hostile", ["../escape", "ABSOLUTE", "..", "/"])
async def test_cp_names_the_host_file_from_the_users_path_not_the_guests(
    tmp_path: Path, hostile: str
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "absolute-escape")
    async with HostileAgent(hostile) as fake:
        client = AgentClient(fake.open_stream)
        try:
            plan = plan_copy("vm1:/var/log/report.txt", str(dest))
            assert await copy_file(_vm(client), plan) == 5
        finally:
            await client.close()
    assert sorted(os.listdir(tmp_path)) == ["dest"]
    assert os.listdir(dest) == ["report.txt"]
    written = dest / "report.txt"
    assert written.read_bytes() == b"owned"
    assert stat.S_IMODE(written.stat().st_mode) == 0o777  # the guest's mode, without setuid/setgid


@pytest.mark.parametrize("guest_path", ["vm1:/", "vm1:/tmp/..", "vm1:/tmp/.", "vm1:/etc/hostname"])
async def test_cp_refuses_a_guest_path_without_a_file_name(tmp_path: Path, guest_path: str) -> None:
    dst = str(tmp_path) if guest_path != "vm1:/etc/hostname" else f"{tmp_path}/missing-dir/"
    async with HostileAgent("x") as fake:
        client = AgentClient(fake.open_stream)
        try:
            with pytest.raises(SmartVMError) as err:
                await copy_file(_vm(client), plan_copy(guest_path, dst))
        finally:
            await client.close()
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ modes and symlinks
async def test_cp_never_copies_setuid_setgid_or_sticky_bits(agent: AgentClient, tmp_path: Path) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(guest / "tool", 0o7755)
    host = tmp_path / "host"
    host.mkdir()
    await copy_file(_vm(agent), plan_copy(f"vm1:{guest}/tool", str(host)))
    assert stat.S_IMODE((host / "tool").stat().st_mode) == 0o755
    await copy_file(_vm(agent), plan_copy(f"vm1:{guest}/tool", str(host / "renamed")))
    assert stat.S_IMODE((host / "renamed").stat().st_mode) == 0o755


async def test_download_follows_no_planted_symlink(agent: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "guest.txt"
    src.write_bytes(b"from the guest")
    os.chmod(src, 0o640)
    victim, victim2 = tmp_path / "victim", tmp_path / "victim2"
    victim.write_bytes(b"precious")
    victim2.write_bytes(b"precious too")
    os.chmod(victim2, 0o600)
    out = tmp_path / "out"
    out.mkdir()
    (out / "f.part").symlink_to(victim)  # the old fixed temp name
    (out / "f").symlink_to(victim2)  # a symlink at the destination is replaced, not written through
    assert await agent.files.download(str(src), out / "f", keep_mode=True) == len(b"from the guest")
    assert victim.read_bytes() == b"precious" and victim2.read_bytes() == b"precious too"
    assert stat.S_IMODE(victim2.stat().st_mode) == 0o600
    assert not (out / "f").is_symlink() and (out / "f").read_bytes() == b"from the guest"
    assert stat.S_IMODE((out / "f").stat().st_mode) == 0o640
    assert sorted(os.listdir(out)) == ["f", "f.part"]  # no temp file of ours left


# ----------------------------------------------------------------------------------------- limits
async def test_download_and_read_stop_at_their_limit(agent: AgentClient, tmp_path: Path) -> None:
    endless = tmp_path / "endless"
    endless.symlink_to("/dev/zero")
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    with pytest.raises(SmartVMError) as err:
        await agent.files.download(str(endless), out / "zero", max_bytes=1024 * 1024)
    assert err.value.code is ErrorCode.GUEST_OUTPUT_TOO_LARGE and "max_bytes" in err.value.message
    assert time.monotonic() - t0 < 10
    assert os.listdir(out) == []
    with pytest.raises(SmartVMError) as err:
        await agent.files.read(str(endless), max_bytes=100_000)
    assert err.value.code is ErrorCode.GUEST_OUTPUT_TOO_LARGE
    assert await agent.files.read(str(endless), length=1000, max_bytes=1000) == b"\0" * 1000
    # exactly at the limit is fine, and the client still works after the cancelled reads
    (tmp_path / "small").write_bytes(b"x" * 4096)
    assert await agent.files.download(str(tmp_path / "small"), out / "small", max_bytes=4096) == 4096
    assert await agent.files.read(str(tmp_path / "small"), max_bytes=4096) == b"x" * 4096


async def test_streamed_output_is_not_kept_and_kept_output_is_capped(agent: AgentClient) -> None:
    flood = 16 * 1024 * 1024
    seen = 0

    def count(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)

    r = await agent.exec(f"head -c {flood} /dev/zero >&2; echo done", on_stderr=count)
    assert seen == flood and r.stderr == b"" and not r.stderr_truncated
    assert r.stdout == b"done\n" and not r.stdout_truncated
    r = await agent.exec(f"head -c {flood} /dev/zero; echo err >&2", max_output_bytes=1000)
    assert r.stdout == b"\0" * 1000 and r.stdout_truncated
    assert r.stderr == b"err\n" and not r.stderr_truncated and r.exit_code == 0


async def test_process_wait_caps_its_output(agent: AgentClient) -> None:
    proc = await agent.processes.start("head -c 100000 /dev/zero; echo tail >&2")
    r = await agent.processes.wait(proc.pid, timeout=30, max_output_bytes=10)
    assert r.stdout == b"\0" * 10 and r.stdout_truncated
    assert r.stderr == b"tail\n" and not r.stderr_truncated


# -------------------------------------------------------------------------------------- bad input
async def _no_stream(timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    raise AssertionError("nothing may be sent for a bad argument")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.exec(["echo", "a\0b"]),
        lambda c: c.exec("echo a\0b"),
        lambda c: c.exec(["env"], env={"K\0": "v"}),
        lambda c: c.exec(["env"], env={"K": "v\0"}),
        lambda c: c.exec(["env"], env={"A=B": "v"}),
        lambda c: c.exec(["pwd"], cwd="/tmp\0/x"),
        lambda c: c.exec(["id"], user="root\0"),
        lambda c: c.exec(["true"], timeout=float("inf")),
        lambda c: c.processes.start(["sleep", "1\0"]),
        lambda c: c.files.write("/tmp/a\0b", b"x"),
        lambda c: c.files.read("/etc/\0passwd"),
        lambda c: c.files.download("/etc/\0passwd", "/tmp/never-written"),
        lambda c: c.files.stat("/\0"),
        lambda c: c.files.exists("/\0"),
        lambda c: c.files.list("/\0"),
        lambda c: c.files.mkdir("/tmp/\0"),
        lambda c: c.files.remove("/tmp/\0"),
        lambda c: c.files.rename("/tmp/a", "/tmp/\0"),
    ],
)
async def test_nul_bytes_and_bad_arguments_are_refused_on_the_host(call: Any) -> None:
    client = AgentClient(_no_stream)
    with pytest.raises(SmartVMError) as err:
        await call(client)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT, err.value
    assert not _exists("/tmp/never-written")


# ---------------------------------------------------------------------------------------- timeouts
@pytest.fixture(name="slow_agent")
async def slow_agent_fixture(agent_server: AgentServer) -> AsyncIterator[AgentClient]:
    client = agent_server.client(exec_grace=0.5)
    await client.wait_ready(30)
    try:
        yield client
    finally:
        agent_server.proc.send_signal(signal.SIGCONT)
        await client.close()


async def test_exec_timeout_is_a_timeout_even_when_the_guest_stalls(
    slow_agent: AgentClient, agent_server: AgentServer
) -> None:
    """The host's clock decides: a guest that cannot report the kill in time still yields EXEC_TIMEOUT."""
    events = slow_agent.exec_stream(["sleep", "30"], timeout=0.5)
    async with contextlib.aclosing(events):
        async for ev in events:
            if ev.kind == "started":
                agent_server.proc.send_signal(signal.SIGSTOP)  # the agent (the "guest") stalls
            elif ev.kind == "exit":
                assert ev.result is not None and ev.result.timed_out and ev.result.exit_code == 124
    agent_server.proc.send_signal(signal.SIGCONT)
    t0 = time.monotonic()
    with _stalled(agent_server, after=0.2), pytest.raises(ExecTimeoutError) as err:
        await slow_agent.exec(["sleep", "30"], timeout=0.5)
    assert err.value.code is ErrorCode.EXEC_TIMEOUT
    assert err.value.result is not None and err.value.result.timed_out
    assert time.monotonic() - t0 < 10
    assert (await slow_agent.exec(["echo", "alive"])).stdout == b"alive\n"


@contextlib.contextmanager
def _stalled(server: AgentServer, after: float) -> Iterator[None]:
    """SIGSTOP the agent `after` seconds from now (once the request is in flight); SIGCONT on exit."""
    stopper = subprocess.Popen(["sh", "-c", f"sleep {after}; kill -STOP {server.proc.pid}"])
    try:
        yield
    finally:
        stopper.wait()
        server.proc.send_signal(signal.SIGCONT)


# ------------------------------------------------------------------------------------ host write errors


def _remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


async def test_host_write_errors_are_clear_and_leave_nothing(agent: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1024 * 1024))
    with pytest.raises(SmartVMError) as err:
        await agent.files.download(str(src), tmp_path / "no-such-dir" / "big")
    assert err.value.code is ErrorCode.HOST_FILE_ERROR and "no-such-dir" in err.value.message
    with tiny_tmpfs(tmp_path / "full") as full:
        with pytest.raises(SmartVMError) as err:
            await copy_file(_vm(agent), plan_copy(f"vm1:{src}", str(full)))
        assert err.value.code is ErrorCode.HOST_FILE_ERROR and "space" in err.value.message
        assert os.listdir(full) == []
        _remount_read_only(full)
        with pytest.raises(SmartVMError) as err:
            await copy_file(_vm(agent), plan_copy(f"vm1:{src}", str(full / "x")))
        assert err.value.code is ErrorCode.HOST_FILE_ERROR and "read-only" in err.value.message.lower()
    assert (await agent.exec(["echo", "ok"])).stdout == b"ok\n"  # the cancelled read left the agent fine


async def test_a_slow_consumer_does_not_make_the_host_buffer_without_bound(agent_server: AgentServer) -> None:
    client = agent_server.client()
    client_small = AgentClient(agent_server.open_stream, max_queued_bytes=1024 * 1024)
    try:
        await client_small.wait_ready(30)
        events = client_small.exec_stream("head -c 200000000 /dev/zero", timeout=60)
        got = 0
        with pytest.raises(SmartVMError) as err:
            async with contextlib.aclosing(events):
                async for ev in events:
                    got += len(ev.data)
                    await asyncio.sleep(0.2)  # a consumer slower than the guest
        assert err.value.code is ErrorCode.GUEST_OUTPUT_TOO_LARGE
        assert got < 2 * 1024 * 1024
        assert (await client_small.exec(["echo", "ok"])).stdout == b"ok\n"  # the command was cancelled
        assert not [p for p in await client.processes.list() if p.running]
    finally:
        await client_small.close()
        await client.close()


async def test_malformed_guest_answers_are_protocol_errors() -> None:
    async with HostileAgent("x", malformed=True) as fake:
        client = AgentClient(fake.open_stream)
        try:

            async def drain(events: AsyncIterator[Any]) -> None:
                async with contextlib.aclosing(events):  # type: ignore[type-var]
                    async for _ in events:
                        pass

            for call in (
                client.files.stat("/x"),
                client.files.list("/"),
                client.processes.list(),
                client.exec(["true"]),
                client.files.entries("/f"),
                client.files.prepare("/f"),
                client.processes.user("u"),
                drain(client.processes.run(["true"])),
                drain(client.files.watch("/")),
                client.processes.signal(1),
            ):
                with pytest.raises(SmartVMError) as err:
                    await call
                assert err.value.code is ErrorCode.AGENT_PROTOCOL_ERROR, err.value
        finally:
            await client.close()
