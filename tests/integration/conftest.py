"""Fixtures for real-guest tests: one kernel + rootfs per run, a SmartVM on QEMU, leak checks.

Every test gets its own short runtime root (Unix socket paths must stay under 108 bytes), and the
``svm`` fixture checks on teardown that no VM process, socket or runtime dir survived the test.
Helpers (boot_config, wait_console, ...) live in ``guest_support``.
"""

from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def _started_manager(data_dir: Path, runtime_root: Path) -> AsyncIterator[Any]:
    """A started SandboxManager; at the end every sandbox is killed, the manager closed, and nothing
    may be left on the host."""
    from sandbox_support import assert_no_sandbox_left, manager_for

    mgr = manager_for(data_dir, runtime_root)
    await mgr.start()
    try:
        yield mgr
    finally:
        try:
            for sbx in await mgr.list():
                await sbx.kill()
        finally:
            await mgr.close()
        assert_no_sandbox_left(data_dir, runtime_root)


@pytest.fixture
async def sbm(sandbox_data: Path, runtime_root: Path) -> AsyncIterator[Any]:
    """A started SandboxManager on the session's data dir (see ``_started_manager``)."""
    async with _started_manager(sandbox_data, runtime_root) as mgr:
        yield mgr


@pytest.fixture(scope="session")
def shm_sandbox_data(tmp_path_factory: pytest.TempPathFactory, guest_image: Any) -> Path:
    """A second session data dir, for managers whose runtime dir is on tmpfs (see ``shm_sbm``)."""
    return tmp_path_factory.mktemp("shm-sandboxes")


@pytest.fixture
async def shm_sbm(shm_sandbox_data: Path) -> AsyncIterator[Any]:
    """Like ``sbm``, with the runtime dir on tmpfs as by default (``/dev/shm``): templates then keep
    the guest RAM in a memory file that their sandboxes map copy-on-write, and pauses write only the
    pages that differ from it. (``sbm``'s runtime dir is on disk: its templates carry RAM in the
    stream.)"""
    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/dev/shm"))
    try:
        async with _started_manager(shm_sandbox_data, runtime) as mgr:
            yield mgr
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


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
