"""A real guest (busybox under QEMU) tries to reach the host through smartvm's tools, and gains nothing.

Setuid files arrive without their special bits, endless files and output floods stay bounded, host
write failures are clear errors, and ``exec --timeout`` exits 124 even when the guest stalls.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config
from test_detached_cli import SMARTVM, Dirs, dirs  # noqa: F401

from mount_helpers import tiny_tmpfs
from smartvm.cli.detached import copy_file, plan_copy
from smartvm.errors import ErrorCode, SmartVMError

pytestmark = pytest.mark.integration

READY_TIMEOUT = 120.0


def _listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path))


async def test_guest_files_and_output_reach_the_host_only_as_bounded_data(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(READY_TIMEOUT)
    setup = "printf '#!/bin/sh\\n' > /tmp/tool && chmod 6755 /tmp/tool && ln -s /dev/zero /tmp/endless"
    assert (await vm.exec(setup)).exit_code == 0

    # a setuid/setgid guest file arrives as a plain 0755 file, named from the user's path
    host = tmp_path / "host"
    host.mkdir()
    assert await copy_file(vm, plan_copy(f"{vm.id}:/tmp/tool", str(host))) == len("#!/bin/sh\n")
    assert _listdir(host) == ["tool"]
    assert stat.S_IMODE((host / "tool").stat().st_mode) == 0o755

    # an endless guest file stops at the limit, quickly, leaving nothing on the host
    t0 = time.monotonic()
    with pytest.raises(SmartVMError) as err:
        await vm.files.download("/tmp/endless", host / "endless", max_bytes=512 * 1024)
    assert err.value.code is ErrorCode.GUEST_OUTPUT_TOO_LARGE
    assert time.monotonic() - t0 < 30
    with pytest.raises(SmartVMError) as err:
        await vm.files.read("/tmp/endless", max_bytes=64 * 1024)
    assert err.value.code is ErrorCode.GUEST_OUTPUT_TOO_LARGE
    assert _listdir(host) == ["tool"]

    # a stderr flood consumed by a callback is not also kept; kept output is capped and flagged
    flood = 4 * 1024 * 1024
    seen = 0

    def count(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)

    r = await vm.exec(f"head -c {flood} /dev/zero >&2", on_stderr=count, timeout=120)
    assert seen == flood and r.stderr == b"" and r.exit_code == 0
    r = await vm.exec(f"head -c {flood} /dev/zero", max_output_bytes=4096, timeout=120)
    assert r.stdout == b"\0" * 4096 and r.stdout_truncated and r.exit_code == 0

    # a full host disk is a clear error and leaves no partial file
    assert (await vm.exec("head -c 1048576 /dev/urandom > /tmp/big")).exit_code == 0
    with tiny_tmpfs(tmp_path / "full") as full:
        with pytest.raises(SmartVMError) as err:
            await copy_file(vm, plan_copy(f"{vm.id}:/tmp/big", str(full)))
        assert err.value.code is ErrorCode.HOST_FILE_ERROR
        assert _listdir(full) == []
    assert (await vm.exec(["echo", "still fine"])).stdout == b"still fine\n"


def test_cli_cp_write_error_and_exec_timeout_of_a_stalled_guest(
    guest_image: object,
    dirs: Dirs,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    vm = dirs.start("hostile")
    [row] = dirs.ps()
    try:
        res = dirs.cli("exec", vm, "--", "sh", "-c", "head -c 1048576 /dev/urandom > /tmp/big")
        assert res.returncode == 0, res.stderr
        with tiny_tmpfs(tmp_path / "full") as full:
            res = dirs.cli("cp", f"{vm}:/tmp/big", str(full))
            assert res.returncode == 2 and b"HOST_FILE_ERROR" in res.stderr, res.stderr
            assert b"Traceback" not in res.stderr
            assert _listdir(full) == []

        # the guest stalls (QEMU stopped) after the command started: still exit 124, not an agent error
        argv = [*SMARTVM, "exec", "--data-dir", str(dirs.data), "--timeout", "3", vm]
        proc = subprocess.Popen(
            [*argv, "--", "sh", "-c", "echo started; sleep 60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
            os.kill(row["pid"], signal.SIGSTOP)
            _, err = proc.communicate(timeout=90)
        finally:
            os.kill(row["pid"], signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 124, err
        res = dirs.cli("exec", vm, "--", "echo", "alive")
        assert (res.returncode, res.stdout) == (0, b"alive\n"), res.stderr
    finally:
        res = dirs.cli("stop", vm)
    assert res.returncode == 0, res.stderr
    dirs.assert_nothing_left()
