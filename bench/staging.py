"""Benchmark 2: staging a 1 GiB root filesystem with ~200 MB of data for a VM.

Ours (reflink or sparse-aware copy into the tmpfs runtime dir) against a plain full copy into
/dev/shm (what the original module did). Time and bytes allocated.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.common import BenchTable, Series, time_sync
from smartvm.host.storage import allocated_bytes, clone_file

GiB = 1 << 30


def _make_image(path: Path, data_mb: int) -> None:
    """A 1 GiB sparse image with ``data_mb`` MiB of data in 4 MiB runs spread over it."""
    block = os.urandom(4 << 20)
    runs = data_mb // 4
    with open(path, "wb") as f:
        f.truncate(GiB)
        for i in range(runs):
            f.seek(i * (GiB // runs))
            f.write(block)


def run(quick: bool) -> list[BenchTable]:
    n = 3 if quick else 10
    data_mb = 40 if quick else 200
    src_dir = Path(tempfile.mkdtemp(prefix="smartvm-bench-", dir="/var/tmp"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    dst = shm / f"smartvm-bench-{os.getpid()}.img"
    try:
        src = src_dir / "rootfs.ext4"
        _make_image(src, data_mb)

        def reset() -> None:
            dst.unlink(missing_ok=True)

        ours = time_sync("smartvm clone_file", lambda: clone_file(src, dst), n, setup=reset)
        ours.extra["allocated"] = f"{allocated_bytes(dst) >> 20} MiB"
        full = time_sync("full copy (shutil.copyfile)", lambda: shutil.copyfile(src, dst), n, setup=reset)
        full.extra["allocated"] = f"{allocated_bytes(dst) >> 20} MiB"
        series: list[Series] = [full, ours]
        return [
            BenchTable(
                f"Drive staging: 1 GiB image with {data_mb} MiB of data -> {shm}",
                series,
                baseline=full.label,
                notes=["source on the disk filesystem, target on tmpfs (no reflink across filesystems)"],
            )
        ]
    finally:
        dst.unlink(missing_ok=True)
        shutil.rmtree(src_dir, ignore_errors=True)
