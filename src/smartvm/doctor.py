"""Host readiness checks for ``smartvm doctor``: each says ok or what is wrong and how to fix it.

Other modules contribute checks with :func:`register_check`; the CLI runs them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""


CheckFn = Callable[[], CheckResult]
_CHECKS: list[CheckFn] = []


def register_check(fn: CheckFn) -> CheckFn:
    """Add a check to ``smartvm doctor`` (used as a decorator)."""
    _CHECKS.append(fn)
    return fn


def run_checks() -> list[CheckResult]:
    _load_contributed_checks()
    results = []
    for fn in _CHECKS:
        try:
            results.append(fn())
        except Exception as exc:  # a broken check must not hide the others
            results.append(CheckResult(fn.__name__, False, f"check crashed: {exc}", "report this as a bug"))
    return results


def _load_contributed_checks() -> None:
    """Import the modules that register checks of their own (engines, networking)."""
    import importlib

    for module in ("smartvm.kvm_probe", "smartvm.host.network_doctor", "smartvm.firecracker.binary"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


@register_check
def check_kvm_device() -> CheckResult:
    path = "/dev/kvm"
    if not os.path.exists(path):
        return CheckResult(
            "kvm device",
            False,
            f"{path} does not exist",
            "enable virtualization (nested KVM on cloud hosts) or use engine='qemu' (TCG)",
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return CheckResult(
            "kvm device",
            False,
            f"{path} is not readable and writable by this user",
            "add the user to the 'kvm' group or run as root",
        )
    return CheckResult(
        "kvm device", True, f"{path} is accessible (whether a guest runs on it: see 'kvm guest')"
    )


@register_check
def check_qemu() -> CheckResult:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return CheckResult(
            "qemu", False, "qemu-system-x86_64 not found", "apt-get install qemu-system-x86 qemu-utils"
        )
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    return CheckResult("qemu", True, f"{qemu}: {out.splitlines()[0] if out else 'unknown version'}")


@register_check
def check_shm() -> CheckResult:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return CheckResult(
            "/dev/shm",
            False,
            "/dev/shm is not a directory",
            "runtime dirs fall back to the temp dir; mount tmpfs on /dev/shm for speed",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=shm) as f:
            f.write(b"x")
    except OSError as exc:
        return CheckResult(
            "/dev/shm",
            False,
            f"cannot write to /dev/shm: {exc.strerror}",
            "make /dev/shm writable (mode 1777)",
        )
    free = shutil.disk_usage(shm).free // (1 << 20)
    return CheckResult("/dev/shm", True, f"writable, {free} MiB free")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@register_check
def check_tap() -> CheckResult:
    if shutil.which("ip") is None:
        return CheckResult("tap devices", False, "the 'ip' command is missing", "apt-get install iproute2")
    name = f"svdoc{uuid.uuid4().hex[:6]}"
    res = _ip("tuntap", "add", "dev", name, "mode", "tap")
    if res.returncode != 0:
        return CheckResult(
            "tap devices",
            False,
            f"cannot create a TAP device: {res.stderr.strip()}",
            "run as root or grant CAP_NET_ADMIN; check that /dev/net/tun exists",
        )
    _ip("link", "del", name)
    return CheckResult("tap devices", True, "can create and remove TAP devices")


@register_check
def check_netns() -> CheckResult:
    if shutil.which("ip") is None:
        return CheckResult(
            "network namespaces", False, "the 'ip' command is missing", "apt-get install iproute2"
        )
    name = f"svdoc{uuid.uuid4().hex[:6]}"
    res = _ip("netns", "add", name)
    if res.returncode != 0:
        return CheckResult(
            "network namespaces",
            False,
            f"cannot create a namespace: {res.stderr.strip()}",
            "run as root (CAP_SYS_ADMIN) to use per-sandbox namespaces",
        )
    _ip("netns", "del", name)
    return CheckResult("network namespaces", True, "can create and remove network namespaces")


@register_check
def check_cow_disks() -> CheckResult:
    """Which copy-on-write strategy sandboxes get here, and why the better ones are out."""
    from smartvm.engines import select_engine
    from smartvm.options import SmartVMOptions
    from smartvm.sandbox.cow import report

    options = SmartVMOptions()
    directory = options.data_dir
    while not directory.exists():  # probe where the data dir will be, without creating it
        directory = directory.parent
    rep = report(select_engine(options), directory)
    ok = rep.chosen != "sparse-copy"
    fix = "" if ok else "put the data dir on btrfs/xfs (reflinks) or use the qemu engine (qcow2 overlays)"
    return CheckResult("copy-on-write disks", ok, rep.line(), fix)


@register_check
def check_pause_streams() -> CheckResult:
    """Whether a sandbox pause writes only the pages that differ from its template (ramdiff)."""
    from smartvm.qemu.ramdiff import ENV, ramdiff_binary

    tool = ramdiff_binary()
    if tool is not None:
        return CheckResult("pause streams", True, f"only pages changed since the template ({tool})")
    return CheckResult(
        "pause streams",
        False,
        f"pauses write the whole guest RAM: the ramdiff tool is not built (or {ENV}=0)",
        "install golang-go and run `python -m smartvm.qemu.ramdiff` (scripts/setup does both)",
    )
