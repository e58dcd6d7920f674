"""The blocking sandbox twin from a plain script (no event loop of its own)."""

from __future__ import annotations

from pathlib import Path

from sandbox_support import assert_no_sandbox_left

from smartvm.options import SmartVMOptions
from smartvm.sandbox import blocking
from smartvm.sandbox.commands import CommandHandle, Commands
from smartvm.sandbox.files import SandboxFiles
from smartvm.sandbox.manager import SandboxManager as AsyncManager
from smartvm.sandbox.sandbox import Sandbox as AsyncSandbox
from smartvm.sandbox.settings import SandboxSettings
from smartvm.sync import SandboxManager
from twin_support import twin_mismatches


def test_the_blocking_twin_has_every_public_call() -> None:
    exempt = {
        "store": "the async SQLite store itself",
        "pool": "the async network slot pool itself",
        "read_stream": "an async iterator; sync code uses read or download",
        "write_stream": "takes an async iterable; sync code uses write or upload",
        "running_vm": "the async MicroVM itself, for the service's async faces",
    }
    pairs = [
        (AsyncManager, blocking.SandboxManager),
        (AsyncSandbox, blocking.Sandbox),
        (Commands, blocking.Commands),
        (CommandHandle, blocking.CommandHandle),
        (SandboxFiles, blocking.Files),
    ]
    for aio, sync in pairs:
        assert twin_mismatches(aio, sync, exempt=exempt) == []


def test_blocking_script(sandbox_data: Path, runtime_root: Path) -> None:
    settings = SandboxSettings(data_dir=sandbox_data, slot_pool_size=0)
    with SandboxManager(
        options=SmartVMOptions(engine="qemu", runtime_dir=runtime_root), settings=settings
    ) as mgr:
        sbx = mgr.create("base", timeout=60)
        assert sbx.commands.run("echo $((6*7))").stdout == "42\n"
        sbx.files.write("a.txt", "x")
        assert sbx.files.read("a.txt") == b"x"
        handle = sbx.commands.run("sleep 30", background=True)
        sbx.pause()
        sbx.resume()
        assert handle.kill() is True
        assert [s.id for s in mgr.list()] == [sbx.id]
        sbx.kill()
    assert_no_sandbox_left(sandbox_data, runtime_root)
