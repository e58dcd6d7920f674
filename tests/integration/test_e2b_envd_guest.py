"""The E2B envd face in front of a real QEMU guest: the official e2b SDK (async and sync) and Connect
JSON, through a real uvicorn server on a loopback port, to smartvm's agent inside the guest.

One boot serves every check (TCG boots are the expensive part). The busybox guest gets what the SDK
assumes of E2B's ``base`` template first: ``/bin/bash`` (busybox sh behind a script) and a user ``user`` with
home ``/home/user``, the sandbox's default user.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import time
from typing import Any

import pytest
from guest_support import boot_config

from e2b_support import ConnectJSON, sdk_sandbox, serve
from smartvm.service.e2b import EnvdApp, EnvdBinding

pytestmark = pytest.mark.integration

READY_TIMEOUT = 120.0
SID, TOKEN = "sb-00e2b0e2", "guest-token"

SETUP = """
set -e
[ -e /bin/bash ] || { printf '#!/bin/sh\nexec /bin/sh "$@"\n' > /bin/bash; chmod 755 /bin/bash; }
grep -q '^user:' /etc/passwd || {
  echo 'user:x:1000:1000:user:/home/user:/bin/sh' >> /etc/passwd
  echo 'user:x:1000:' >> /etc/group
}
mkdir -p /home/user && chown 1000:1000 /home/user
"""


async def _guest(svm: Any, guest_image: Any) -> Any:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(READY_TIMEOUT)
    done = await vm.exec(["/bin/sh", "-c", SETUP])
    assert done.exit_code == 0, done.stderr_text
    return vm


async def test_sdk_against_a_guest(svm: Any, guest_image: Any) -> None:
    from e2b import CommandExitException, FilesystemEventType, NotFoundException

    vm = await _guest(svm, guest_image)
    binding = EnvdBinding(TOKEN, vm, default_user="user", env={"SANDBOX_VAR": "sbx"})
    async with serve(EnvdApp({SID: binding}.get)) as url:
        sbx = sdk_sandbox(url, SID, TOKEN)

        # commands: the default user and home, sandbox and command envs, cwd, another user
        r = await sbx.commands.run("id -un; echo $HOME; pwd; echo $SANDBOX_VAR $X", envs={"X": "x"})
        assert r.stdout == "user\n/home/user\n/home/user\nsbx x\n"
        assert (await sbx.commands.run("id -un", user="root")).stdout == "root\n"
        assert (await sbx.commands.run("pwd", cwd="/tmp")).stdout == "/tmp\n"
        with pytest.raises(CommandExitException) as exc:
            await sbx.commands.run("echo oops >&2; exit 4")
        assert exc.value.exit_code == 4 and exc.value.stderr == "oops\n"

        # streamed output: the host sees the first line before the command goes on
        seen: list[str] = []
        go = asyncio.Event()

        def on_stdout(line: str) -> None:
            seen.append(line)
            go.set()

        handle = await sbx.commands.run(
            "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second",
            background=True,
            on_stdout=on_stdout,
        )
        async with asyncio.timeout(60):
            await go.wait()
        assert "".join(seen) == "first\n"
        await sbx.files.write("/tmp/go", "")
        assert (await handle.wait()).stdout == "first\nsecond\n"

        # background: list, connect, stdin, kill
        cat = await sbx.commands.run("cat", background=True, stdin=True)
        assert cat.pid in [p.pid for p in await sbx.commands.list()]
        attached = await sbx.commands.connect(cat.pid)
        await sbx.commands.send_stdin(cat.pid, "fed\n")
        await sbx.commands.close_stdin(cat.pid)
        assert (await attached.wait()).stdout == "fed\n"
        sleeper = await sbx.commands.run("sleep 600", background=True)
        assert await sleeper.kill()
        with pytest.raises(CommandExitException):
            await sleeper.wait()

        # files: relative paths are in the user's home and belong to the user
        await sbx.files.write("notes/a.txt", "hello")
        entry = await sbx.files.get_info("/home/user/notes/a.txt")
        assert (entry.owner, entry.group, entry.size) == ("user", "user", 5)
        assert (await sbx.files.get_info("notes")).owner == "user"
        assert await sbx.files.read("notes/a.txt") == "hello"
        data = os.urandom(10 * 1024 * 1024)
        await sbx.files.write("/tmp/big.bin", io.BytesIO(data))  # octet-stream, streamed
        digest = (await vm.exec(["sha256sum", "/tmp/big.bin"])).stdout_text.split()[0]
        assert digest == hashlib.sha256(data).hexdigest()
        assert await sbx.files.read("/tmp/big.bin", format="bytes") == data
        await sbx.files.write_files([{"path": f"multi/{i}.txt", "data": str(i)} for i in range(3)])
        names = [e.path for e in await sbx.files.list("/home/user", depth=2)]
        assert {"/home/user/notes/a.txt", "/home/user/multi/2.txt"} <= set(names)
        assert await sbx.files.make_dir("made") and not await sbx.files.make_dir("made")
        await sbx.files.rename("made", "renamed")
        assert await sbx.files.exists("renamed") and not await sbx.files.exists("made")
        await sbx.files.remove("renamed")
        assert not await sbx.files.exists("renamed")
        with pytest.raises(NotFoundException):
            await sbx.files.read("/no/such/file")

        # watch: inotify in the guest, the agent's atomic write reported as a write
        wrote = asyncio.Event()

        def on_event(e: Any) -> None:
            if e.type == FilesystemEventType.WRITE and e.name == "deep/w.txt":
                wrote.set()

        await sbx.files.make_dir("watched/deep")
        watch = await sbx.files.watch_dir("watched", on_event=on_event, recursive=True)
        await sbx.files.write("watched/deep/w.txt", "w")
        async with asyncio.timeout(60):
            await wrote.wait()
        await watch.stop()

        # the sync SDK, from a thread
        def sync_round() -> str:
            blocking = sdk_sandbox(url, SID, TOKEN, sync=True)
            blocking.files.write("sync.txt", "sync")
            return str(blocking.commands.run("cat sync.txt").stdout)

        assert await asyncio.to_thread(sync_round) == "sync"


async def test_connect_json_against_a_guest(svm: Any, guest_image: Any) -> None:
    """Below the SDK: envelopes, keepalives during a silent command, and Connect-Timeout-Ms that
    ends the stream and kills the command in the guest."""
    vm = await _guest(svm, guest_image)
    async with serve(EnvdApp({SID: EnvdBinding(TOKEN, vm)}.get)) as url:
        rpc = ConnectJSON(url, SID, TOKEN)
        try:
            body = {"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 2; echo done"]}}
            frames = [
                f
                async for f in rpc.stream("process.Process/Start", body, **{"Keepalive-Ping-Interval": "0.5"})
            ]
            kinds = [next(iter(m["event"])) for _, m in frames[:-1]]
            assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("keepalive") >= 2, kinds
            out = [m["event"]["data"]["stdout"] for _, m in frames[:-1] if "data" in m["event"]]
            assert base64.b64decode("".join(out)) == b"done\n"
            assert frames[-1] == (2, {})

            t0 = time.monotonic()
            body = {"process": {"cmd": "sleep", "args": ["600"]}}
            frames = [
                f async for f in rpc.stream("process.Process/Start", body, **{"Connect-Timeout-Ms": "1500"})
            ]
            assert frames[-1][1]["error"]["code"] == "deadline_exceeded" and time.monotonic() - t0 < 60
            pid = frames[0][1]["event"]["start"]["pid"]
            gone = await vm.exec(f"while kill -0 {pid} 2>/dev/null; do sleep 0.1; done", timeout=60)
            assert gone.exit_code == 0  # the guest killed it at the deadline

            wrong = ConnectJSON(url, SID, "not-the-token")
            try:
                assert (await wrong.unary("process.Process/List", {})).status_code == 401
            finally:
                await wrong.aclose()
        finally:
            await rpc.aclose()
