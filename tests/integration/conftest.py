"""Fixtures for real-guest tests: one kernel + rootfs per run, a SmartVM on QEMU, leak checks.

Every test gets its own short runtime root (Unix socket paths must stay under 108 bytes), and the
``svm`` fixture checks on teardown that no VM process, socket or runtime dir survived the test.
Helpers (boot_config, wait_console, ...) live in ``guest_support``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_support import assert_nothing_left

from smartvm.errors import SmartVMError
from smartvm.options import SmartVMOptions


@pytest.fixture(scope="session")
def guest_image() -> Any:
    """The default guest (kernel + busybox rootfs), built once and cached; skip if it cannot be."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    try:
        from smartvm.images.guest_image import ensure_default_guest
    except ImportError as exc:
        pytest.skip(f"smartvm.images.guest_image is not available yet: {exc}")
    try:
        return ensure_default_guest()
    except SmartVMError as exc:
        pytest.skip(f"the default guest image cannot be built here: {exc}")


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    """A short, private runtime root (``/tmp/svXXXX``); must be empty again after the test."""
    root = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def qemu_options(runtime_root: Path, tmp_path: Path) -> SmartVMOptions:
    return SmartVMOptions(engine="qemu", runtime_dir=runtime_root, data_dir=tmp_path / "data")


@pytest.fixture
async def svm(qemu_options: SmartVMOptions) -> AsyncIterator[Any]:
    """A SmartVM on the QEMU engine; every VM is killed afterwards and nothing may be left."""
    from smartvm.orchestrator import SmartVM

    smartvm = SmartVM(qemu_options)
    try:
        yield smartvm
    finally:
        for vm in smartvm.list_vms():
            await vm.kill()
        assert_nothing_left(qemu_options.runtime_dir)


@pytest.fixture(scope="session")
def sandbox_data(tmp_path_factory: pytest.TempPathFactory, guest_image: Any) -> Path:
    """One sandbox data dir per test session: the ``base`` template is built once into it."""
    return tmp_path_factory.mktemp("sandboxes")


@pytest.fixture
async def sbm(sandbox_data: Path, runtime_root: Path) -> AsyncIterator[Any]:
    """A started SandboxManager on the session's data dir; on teardown every sandbox is killed, the
    manager closed, and nothing may be left on the host."""
    from sandbox_support import assert_no_sandbox_left, manager_for

    mgr = manager_for(sandbox_data, runtime_root)
    await mgr.start()
    try:
        yield mgr
    finally:
        try:
            for sbx in await mgr.list():
                await sbx.kill()
        finally:
            await mgr.close()
        assert_no_sandbox_left(sandbox_data, runtime_root)


@pytest.fixture(scope="module")
def api(sandbox_data: Path) -> Iterator[Any]:
    """`smartvm serve` on the session's sandbox data dir for one test module (a ``Service``); at the
    end what the module left is killed, the service must stop cleanly without a traceback, and
    nothing may be left on the host."""
    from sandbox_support import assert_no_sandbox_left

    from service_support import Service

    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    service = Service(sandbox_data, runtime)
    try:
        yield service
    finally:
        try:
            code, err = service.stop()
            assert code == 0, err
            assert "Traceback" not in err, err
            assert_no_sandbox_left(sandbox_data, runtime)
        finally:
            shutil.rmtree(runtime, ignore_errors=True)
