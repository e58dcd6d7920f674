"""The built kernel + busybox rootfs boot under raw QEMU microvm (no engine code): the init
marker appears, a smartvm.exec_b64 script runs, the agent port is visible, and QMP
system_powerdown powers the guest off so QEMU exits by itself."""

from __future__ import annotations

import base64
import json
import selectors
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from smartvm.host.storage import clone_file
from smartvm.images.guest_image import ensure_default_guest
from smartvm.qemu.host_clock import host_tsc_khz

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
]

SCRIPT = "echo exec-ran-$((6*7)); cat /sys/class/virtio-ports/*/name; hostname\n"


class Console:
    """Bounded reads of QEMU's serial output (stdout)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._out = proc.stdout
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out, selectors.EVENT_READ)
        self.text = ""

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                return False
            chunk = self._out.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                return needle in self.text
            self.text += chunk.decode(errors="replace")
        return True


def qmp(path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        stream.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": cmd}).encode() + b"\n")
            stream.flush()
            reply = json.loads(stream.readline())
            while "event" in reply:  # events may come before the reply
                reply = json.loads(stream.readline())
            assert "return" in reply, reply


def test_boot_exec_and_powerdown(tmp_path: Path) -> None:
    guest = ensure_default_guest(progress=False)
    rootfs = tmp_path / "rootfs.ext4"
    clone_file(guest.rootfs_path, rootfs)
    qmp_sock = tmp_path / "qmp.sock"
    script = base64.b64encode(SCRIPT.encode()).decode()
    # Without it the kernel calibrates the TSC against the PIT, which under a loaded TCG can take minutes.
    khz = host_tsc_khz()
    clock = f" tsc_early_khz={khz}" if khz else ""
    cmd = [
        "qemu-system-x86_64",
        "-M",
        "microvm,acpi=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(guest.kernel_path),
        "-append",
        f"{guest.boot_args}{clock} quiet smartvm.hostname=boottest smartvm.exec_b64={script}",
        "-drive",
        f"id=root,file={rootfs},format=raw,if=none",
        "-device",
        "virtio-blk-device,drive=root",
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=agent,path={tmp_path / 'agent.sock'},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=smartvm.agent",
        "-qmp",
        f"unix:{qmp_sock},server=on,wait=off",
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        console = Console(proc)
        assert console.wait_for("SMARTVM_INIT_READY", 60), console.text
        assert console.wait_for("boottest", 30), console.text
        assert "exec-ran-42" in console.text
        assert "smartvm.agent" in console.text
        qmp(qmp_sock, "system_powerdown")
        assert proc.wait(timeout=60) == 0
        console.wait_for("reboot: Power down", 5)
        assert "reboot: Power down" in console.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
