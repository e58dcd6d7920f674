"""The host's TSC rate in kHz, read at run time (never hard-coded).

Under TCG a guest's ``rdtsc`` returns the host's TSC, and a guest kernel that must calibrate it
against the emulated PIT sometimes hangs for good (``tsc: Unable to calibrate against PIT``). Passing
``tsc_early_khz=<host rate>`` skips that calibration. Sources, best first:

1. ``/sys/devices/system/cpu/cpu0/tsc_freq_khz`` (kernels that export it);
2. the host kernel's own log (``tsc: Refined TSC clocksource calibration`` / ``tsc: Detected``);
3. a measurement: ``rdtsc`` against CLOCK_MONOTONIC_RAW (about 150 ms).

The rate is fixed for a host boot, so what the log or the measurement gave is kept in
``<cache_root>/host-tsc.json`` with the host's boot id: later processes (every ``smartvm run`` on a
host without the sysfs file whose kernel log has moved on) read it back instead of measuring again.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

from smartvm.host.atomic_write import write_atomic
from smartvm.images.cache_paths import cache_root

SYSFS_TSC_KHZ = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
KMSG = Path("/dev/kmsg")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CACHE_NAME = "host-tsc.json"

_REFINED = re.compile(r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d{3}) MHz")
_DETECTED = re.compile(r"tsc: Detected (\d+)\.(\d{3}) MHz (?:processor|TSC)")

# rdtsc; shl rdx, 32; or rax, rdx; ret  -- returns the 64-bit TSC in rax (System V ABI).
_RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_PLAUSIBLE_KHZ = range(100_000, 10_000_000)  # 100 MHz .. 10 GHz


def khz_from_kernel_log(lines: Iterable[str]) -> int | None:
    """The TSC rate the host kernel settled on, from its log lines (a refined value wins)."""
    detected: int | None = None
    for line in lines:
        if m := _REFINED.search(line):
            return int(m.group(1)) * 1000 + int(m.group(2))
        if detected is None and (m := _DETECTED.search(line)):
            detected = int(m.group(1)) * 1000 + int(m.group(2))
    return detected


def _read_kmsg() -> list[str]:
    """Every record still in the kernel ring buffer (needs CAP_SYSLOG or dmesg_restrict=0)."""
    lines: list[str] = []
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return lines
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # a record was overwritten while reading: skip it
                    continue
                break  # EAGAIN: end of the buffer
            if not record:
                break
            lines.append(record.decode(errors="replace").split(";", 1)[-1])
    finally:
        os.close(fd)
    return lines


def _from_sysfs() -> int | None:
    try:
        value = int(SYSFS_TSC_KHZ.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value in _PLAUSIBLE_KHZ else None


def _rdtsc_function() -> tuple[Callable[[], int], mmap.mmap] | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, PermissionError):  # W^X policies refuse executable anonymous memory
        return None
    page.write(_RDTSC_CODE)
    view = ctypes.c_char.from_buffer(page)
    address = ctypes.addressof(view)
    del view  # release the buffer export so the page can be closed later
    func = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    return func, page


def measure_tsc_khz(window_s: float = 0.05) -> int | None:
    """Measure the TSC against CLOCK_MONOTONIC_RAW (x86-64 only); None if it cannot run here."""
    made = _rdtsc_function()
    if made is None:
        return None
    rdtsc, page = made
    try:
        samples = []
        for _ in range(3):
            t0, c0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), rdtsc()
            time.sleep(window_s)
            t1, c1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), rdtsc()
            samples.append((c1 - c0) * 1_000_000 // max(t1 - t0, 1))
        khz = sorted(samples)[1]
        return khz if khz in _PLAUSIBLE_KHZ else None
    finally:
        del rdtsc
        page.close()


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _from_cache(boot_id: str) -> int | None:
    """The rate an earlier process found in this host boot, if it kept one."""
    try:
        data = json.loads((cache_root() / CACHE_NAME).read_text())
        value = int(data["khz"]) if data["boot_id"] == boot_id else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value in _PLAUSIBLE_KHZ else None


def _keep(boot_id: str, khz: int) -> None:
    path = cache_root() / CACHE_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"boot_id": boot_id, "khz": khz}), mode=0o644)
    except OSError:
        pass  # a cache we cannot write only costs a measurement next time


def _found_rate() -> int | None:
    value = khz_from_kernel_log(_read_kmsg())
    if value is not None and value not in _PLAUSIBLE_KHZ:
        value = None
    return measure_tsc_khz() if value is None else value


@cache
def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz, or None when no source works (then no ``tsc_early_khz`` is passed)."""
    value = _from_sysfs()
    if value is not None:
        return value
    boot_id = _boot_id()
    if boot_id is not None and (value := _from_cache(boot_id)) is not None:
        return value
    value = _found_rate()
    if value is not None and boot_id is not None:
        _keep(boot_id, value)
    return value
