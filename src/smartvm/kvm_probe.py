"""Can KVM actually run a guest here? Probed once, with a hard time limit, and cached.

``/dev/kvm`` being present proves little: on nested hosts a KVM guest may die with ``KVM internal
error`` (QEMU then sits paused forever) or spin at 100% CPU for minutes. So the probe runs a real
guest under ``qemu-system-x86_64 -M microvm -accel kvm`` and kills it after a few seconds:

- with the guest kernel, when one is already built: it must reach its ``Kernel panic`` on the
  missing root device (``panic=-1`` + ``-no-reboot`` then end QEMU). This catches failures that
  appear only in 64-bit mode (this machine fails on a ``lock cmpxchg16b`` in early boot);
- otherwise a 16-byte real-mode payload that writes to ``isa-debug-exit``: weaker, so the cache
  key records which payload was used and a later probe with a kernel replaces it.

The answer is cached in memory and in ``<cache_root>/kvm-probe.json``, keyed by the host kernel
release, the QEMU binary (path, size, mtime) and the payload.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from smartvm.doctor import CheckResult, register_check
from smartvm.host.atomic_write import write_atomic
from smartvm.images.cache_paths import cache_root

KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT_S = 4.0
CACHE_NAME = "kvm-probe.json"
_DEBUG_EXIT_OK = (0x31 << 1) | 1  # isa-debug-exit turns the byte 0x31 into exit code 99
# At the reset vector (F000:FFF0): mov al, 0x31; out 0xf4, al; hlt; jmp $-1
_RESET_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_BIOS_SIZE = 64 * 1024
_CACHE_ENTRIES = 16

_lock = threading.Lock()
_memory: dict[str, KvmProbe] = {}


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    payload: str = ""  # "kernel" or "reset-vector"
    seconds: float = 0.0


def _qemu_binary(binary: str | os.PathLike[str] | None) -> str | None:
    if binary is not None:
        return str(binary)
    return shutil.which("qemu-system-x86_64")


def _default_kernel() -> Path | None:
    """The newest guest kernel already in the cache (never builds one: the probe must stay fast)."""
    try:
        built = [p for p in (cache_root() / "kernels").glob("*/vmlinux") if p.is_file()]
    except OSError:
        return None
    return max(built, key=lambda p: p.stat().st_mtime, default=None)


def _cache_key(binary: str, kernel: Path | None) -> str:
    st = os.stat(binary)
    payload = "reset-vector"
    if kernel is not None:
        kst = kernel.stat()
        payload = f"kernel:{kernel}:{kst.st_size}:{int(kst.st_mtime)}"
    return f"{platform.release()}|{os.path.realpath(binary)}:{st.st_size}:{int(st.st_mtime)}|{payload}"


def _read_cache(key: str) -> KvmProbe | None:
    try:
        data = json.loads((cache_root() / CACHE_NAME).read_text())
        entry = data[key]
        return KvmProbe(
            bool(entry["usable"]),
            str(entry["reason"]),
            str(entry.get("payload", "")),
            float(entry.get("seconds", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, result: KvmProbe) -> None:
    path = cache_root() / CACHE_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = {**asdict(result), "at": time.time()}
        if len(data) > _CACHE_ENTRIES:  # keys name kernel files, some of them temporary: keep the newest
            newest = sorted(data, key=lambda k: data[k].get("at", 0) if isinstance(data[k], dict) else 0)
            data = {k: data[k] for k in newest[-_CACHE_ENTRIES:]}
        write_atomic(path, json.dumps(data, indent=1), mode=0o644)
    except OSError:
        pass  # a cache we cannot write only costs a re-probe


def _run_bounded(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run ``argv`` in its own process group; kill the group at ``timeout``. (rc or None, out, err)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace")


def _internal_error(stderr: str) -> str | None:
    markers = ("kvm internal error", "kvm run failed", "failed to initialize kvm")
    for line in stderr.splitlines():
        if any(m in line.lower() for m in markers):
            return line.strip()
    return None


def run_probe(binary: str, kernel: Path | None, timeout: float = PROBE_TIMEOUT_S) -> KvmProbe:
    """Run one probe guest under KVM (no caching)."""
    base = [
        binary,
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="smartvm-kvm-probe-") as tmp:
        if kernel is not None:
            payload = "kernel"
            argv = [
                *base,
                "-kernel",
                str(kernel),
                "-serial",
                "stdio",
                "-append",
                "console=ttyS0 panic=-1 root=/dev/smartvm-probe-none",
            ]
        else:
            payload = "reset-vector"
            bios = Path(tmp) / "probe.bin"
            image = bytearray(b"\xf4" * _BIOS_SIZE)
            image[-16 : -16 + len(_RESET_CODE)] = _RESET_CODE
            bios.write_bytes(bytes(image))
            argv = [*base, "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        rc, out, err = _run_bounded(argv, timeout)
    took = time.monotonic() - start
    failure = _internal_error(err)
    if failure:
        return KvmProbe(False, f"the probe guest failed under KVM: {failure}", payload, took)
    if rc is None:
        return KvmProbe(
            False,
            f"the probe guest did not finish within {timeout:.0f}s under KVM "
            "(KVM hangs or is far too slow here)",
            payload,
            took,
        )
    ok = ("Kernel panic" in out) if kernel is not None else rc == _DEBUG_EXIT_OK
    if not ok:
        detail = (err.strip().splitlines() or [f"exit code {rc}"])[-1]
        return KvmProbe(False, f"the probe guest did not run under KVM: {detail}", payload, took)
    return KvmProbe(True, f"a probe guest ({payload}) ran under KVM in {took:.2f}s", payload, took)


def kvm_device_problem() -> str | None:
    """Why ``/dev/kvm`` cannot be used at all by this user, or None."""
    if not KVM_DEVICE.exists():
        return f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    return None


def probe_kvm(
    binary: str | os.PathLike[str] | None = None, kernel: Path | None = None, *, refresh: bool = False
) -> KvmProbe:
    """Whether QEMU can run a guest on KVM here (cached; at most a few seconds when not cached)."""
    problem = kvm_device_problem()
    if problem is not None:
        return KvmProbe(False, problem)
    qemu = _qemu_binary(binary)
    if qemu is None or not os.path.exists(qemu):
        return KvmProbe(False, "qemu-system-x86_64 not found, so KVM could not be probed")
    if kernel is None:
        kernel = _default_kernel()
    key = _cache_key(qemu, kernel)
    with _lock:
        if not refresh:
            cached = _memory.get(key) or _read_cache(key)
            if cached is not None:
                _memory[key] = cached
                return cached
        result = run_probe(qemu, kernel)
        _memory[key] = result
        _write_cache(key, result)
        return result


def engine_accel(
    requested: str, binary: str | os.PathLike[str] | None = None, kernel: Path | None = None
) -> tuple[str, str]:
    """The accelerator the QEMU engine uses for ``qemu_accel=requested``, and why.

    The engine passes the VM's own kernel, so ``auto`` is decided by the strongest probe.
    """
    if requested == "tcg":
        return "tcg", "qemu_accel='tcg' was requested"
    if requested == "kvm":
        return "kvm", "qemu_accel='kvm' was requested"
    probe = probe_kvm(binary, kernel)
    if probe.usable:
        return "kvm", probe.reason
    return "tcg", f"KVM is not usable: {probe.reason}"


@register_check
def check_kvm_guest() -> CheckResult:
    accel, why = engine_accel("auto")
    if accel == "kvm":
        return CheckResult("kvm guest", True, f"the QEMU engine will use KVM: {why}")
    return CheckResult(
        "kvm guest",
        True,
        f"the QEMU engine will use TCG (emulation, slower): {why}",
        "nothing to do for QEMU; Firecracker needs a KVM that can run guests",
    )
