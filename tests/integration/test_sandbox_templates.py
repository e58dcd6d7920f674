"""Custom templates: built once (start and ready commands run before the snapshot), cached by their
inputs, and a template that cannot be built fails cleanly."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import manager_for

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox import SandboxState
from smartvm.sandbox.templates import base_template_spec


async def test_a_custom_template_runs_its_start_command_before_the_snapshot(sbm: Any) -> None:
    base = await base_template_spec()
    spec = dataclasses.replace(
        base,
        name="web",
        env={"WHO": "template"},
        start_command="mkdir -p /tmp/www && echo $WHO > /tmp/www/index.html && httpd -f -p 8080 -h /tmp/www",
        ready_command="wget -q -O - http://127.0.0.1:8080/",
    )
    steps: list[str] = []
    record = await sbm.build_template(spec, progress=steps.append)
    assert record.status == "ready" and "snapshotting" in steps
    again = await sbm.build_template(spec)  # unchanged inputs: the same build, no boot
    assert again.snapshot_dir == record.snapshot_dir
    sbx = await sbm.create("web")
    page = await sbx.commands.run("wget -q -O - http://127.0.0.1:8080/")
    assert page.stdout == "template\n"  # the server started in the template runs in the sandbox
    assert (await sbx.commands.run("echo $WHO")).stdout == "template\n"
    assert "web" in [t.name for t in await sbm.list_templates()]
    await sbx.kill()


async def test_a_template_that_cannot_be_built_fails_and_leaves_nothing(sbm: Any, runtime_root: Path) -> None:
    base = await base_template_spec()
    never = dataclasses.replace(base, name="never-ready", ready_command="exit 1")
    manager = sbm
    manager.settings = manager.settings.model_copy(update={"template_build_timeout_s": 3.0})
    with pytest.raises(SmartVMError) as err:
        await manager.build_template(never)
    assert err.value.code is ErrorCode.TEMPLATE_BUILD_FAILED
    missing = dataclasses.replace(base, name="no-rootfs", rootfs=Path("/nonexistent/rootfs.ext4"))
    with pytest.raises(SmartVMError) as err:
        await manager.build_template(missing)
    assert err.value.code is ErrorCode.TEMPLATE_BUILD_FAILED
    records = {t.name: t.status for t in await manager.list_templates()}
    assert records["never-ready"] == "failed"
    with pytest.raises(SmartVMError) as err:
        await manager.create("never-ready")
    assert err.value.code is ErrorCode.TEMPLATE_NOT_FOUND
    templates = manager.data_dir / "templates"
    assert [p for p in templates.rglob("*") if "never-ready" in str(p) and p.is_file()] == []
    assert list(runtime_root.iterdir()) == []  # noqa: ASYNC240
    assert manager.pool.in_use == []


async def test_closing_with_on_close_pause_pauses_running_sandboxes(
    sandbox_data: Path, runtime_root: Path
) -> None:
    async with manager_for(sandbox_data, runtime_root, on_close="pause") as mgr:
        sbx = await mgr.create("base")
        await sbx.files.write("x", b"1")
    async with manager_for(sandbox_data, runtime_root) as mgr:
        again = await mgr.get(sbx.id)
        assert again.state is SandboxState.PAUSED
        await again.resume()
        assert await again.files.read("x") == b"1"
        await again.kill()


async def test_a_rebuilt_template_is_the_one_new_sandboxes_get(sbm: Any) -> None:
    base = await base_template_spec()
    for version in ("one", "two"):
        spec = dataclasses.replace(base, name="versioned", start_command=f"echo {version} > /tmp/version")
        await sbm.build_template(spec)
        sbx = await sbm.create("versioned")
        assert await sbx.files.read("/tmp/version") == f"{version}\n".encode()
        await sbx.kill()
