"""Process control end to end with the fake ``firecracker`` executable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fc_fake.helpers import pid_alive

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.api import FirecrackerAPI
from smartvm.firecracker.process import FirecrackerCommand, FirecrackerProcess

pytest_plugins = ["fc_fake.fixtures"]


def _process(binary: Path, tmp: Path, **kw: object) -> FirecrackerProcess:
    command = FirecrackerCommand(binary=binary, api_socket=tmp / "fc.sock", vm_id="vm1", **kw)  # type: ignore[arg-type]
    return FirecrackerProcess(command, console_log=tmp / "console.log", engine_log=tmp / "engine.log")


def test_argv_uses_firecrackers_flags() -> None:
    cmd = FirecrackerCommand(
        binary=Path("/bin/fc"),
        api_socket=Path("/r/fc.sock"),
        vm_id="vm1",
        log_path=Path("/r/fc.log"),
        level="Debug",
        metrics_path=Path("/r/m.json"),
        boot_timer=True,
        netns="ns1",
    )
    assert cmd.argv() == [
        "nsenter",
        "--net=/run/netns/ns1",
        "--",
        "/bin/fc",
        "--id",
        "vm1",
        "--api-sock",
        "/r/fc.sock",
        "--log-path",
        "/r/fc.log",
        "--level",
        "Debug",
        "--metrics-path",
        "/r/m.json",
        "--boot-timer",
    ]
    no_api = FirecrackerCommand(
        binary=Path("/bin/fc"), api_socket=None, vm_id="v", config_file=Path("/c.json"), no_api=True
    )
    assert no_api.argv() == ["/bin/fc", "--id", "v", "--no-api", "--config-file", "/c.json"]
    with pytest.raises(SmartVMError) as err:
        FirecrackerCommand(binary=Path("/bin/fc"), api_socket=None, vm_id="v", no_api=True).argv()
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


async def test_start_serves_the_api_and_stop_reaps(fake_binary: Path, short_tmp: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_tmp / "fc.sock"))  # a stale socket from an earlier run
    stale.close()
    proc = _process(fake_binary, short_tmp)
    await proc.start(socket_timeout=10)
    assert proc.is_alive() and proc.pid is not None
    async with FirecrackerAPI(short_tmp / "fc.sock") as api:
        assert (await api.describe_instance.get())["id"] == "vm1"
    pid = proc.pid
    code = await proc.stop(timeout=5)
    assert code == -signal.SIGTERM
    assert not proc.is_alive() and not pid_alive(pid)
    assert not (short_tmp / "fc.sock").exists()
    assert "Running Firecracker" in (short_tmp / "engine.log").read_text()
    assert await proc.stop(timeout=1) == code  # idempotent


async def test_early_exit_reports_code_and_log_tail(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_MODE", "exit")
    proc = _process(fake_binary, short_tmp)
    with pytest.raises(SmartVMError) as err:
        await proc.start(socket_timeout=10)
    assert err.value.code is ErrorCode.FIRECRACKER_EXITED
    assert "code 1" in err.value.message
    assert "fake firecracker was told to fail" in err.value.message
    assert proc.returncode == 1


async def test_socket_that_never_appears_times_out_and_kills(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_MODE", "nosocket")
    proc = _process(fake_binary, short_tmp)
    with pytest.raises(SmartVMError) as err:
        await proc.start(socket_timeout=1.5)
    assert err.value.code is ErrorCode.SOCKET_TIMEOUT
    assert "fc.sock" in err.value.message
    assert proc.pid is not None and not pid_alive(proc.pid)
    assert proc.returncode == -signal.SIGKILL


async def test_missing_binary(short_tmp: Path) -> None:
    proc = _process(short_tmp / "nope" / "firecracker", short_tmp)
    with pytest.raises(SmartVMError) as err:
        await proc.start(socket_timeout=1)
    assert err.value.code is ErrorCode.BINARY_NOT_FOUND
    assert proc.pid is None
    await proc.kill()  # nothing to do, no error


async def test_stop_escalates_to_sigkill(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_IGNORE_SIGTERM", "1")
    proc = _process(fake_binary, short_tmp)
    await proc.start(socket_timeout=10)
    assert await proc.stop(timeout=0.5) == -signal.SIGKILL
    assert proc.pid is not None and not pid_alive(proc.pid)


async def test_no_api_boots_from_a_config_file_and_console_goes_to_the_log(
    fake_binary: Path, short_tmp: Path
) -> None:
    config = short_tmp / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            }
        )
    )
    proc = _process(fake_binary, short_tmp, config_file=config, no_api=True)
    await proc.start(socket_timeout=5)
    for _ in range(500):
        if "SMARTVM_INIT_READY" in (short_tmp / "console.log").read_text():
            break
        await proc.wait(0.01)
    assert "SMARTVM_INIT_READY" in (short_tmp / "console.log").read_text()
    assert not (short_tmp / "fc.sock").exists()
    await proc.kill()
    assert not proc.is_alive()


async def test_bad_config_file_is_an_early_exit(fake_binary: Path, short_tmp: Path) -> None:
    config = short_tmp / "vm.json"
    config.write_text(json.dumps({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}}))
    proc = _process(fake_binary, short_tmp, config_file=config)
    with pytest.raises(SmartVMError) as err:
        await proc.start(socket_timeout=10)
    assert err.value.code is ErrorCode.FIRECRACKER_EXITED
    assert "bogus" in err.value.message


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace, deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"svfc{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.network
async def test_starts_inside_the_network_namespace(fake_binary: Path, short_tmp: Path, netns: str) -> None:
    proc = _process(fake_binary, short_tmp, netns=netns)
    await proc.start(socket_timeout=10)
    assert proc.pid is not None
    try:
        inside = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
        assert inside == os.stat(f"/run/netns/{netns}").st_ino
        assert inside != os.stat("/proc/self/ns/net").st_ino
    finally:
        await proc.kill()
    assert not pid_alive(proc.pid)
