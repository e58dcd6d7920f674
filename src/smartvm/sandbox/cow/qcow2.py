"""qcow2 overlays for the QEMU engine: a tiny file naming the base as its read-only backing file.

QEMU detects the format from the file's magic (``qemu.cmdline.detect_disk_format``) and opens the
backing file itself, read-only. The layer must be given to the VM with ``ephemeral=False`` so it is
used in place, not staged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from smartvm.qemu.cmdline import detect_disk_format
from smartvm.sandbox.cow.base import (
    Availability,
    CowDisk,
    CowLayer,
    CowStrategy,
    DiskFormat,
    cow_error,
    need_tool,
    write_flat,
)

OVERLAY_FILE = "rootfs.qcow2"


def _qemu_img(*args: str) -> str:
    tool = need_tool("qemu-img")
    if tool is None:
        raise cow_error("qemu-img is missing: apt-get install qemu-utils")
    res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise cow_error(f"qemu-img {args[0]} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def create_overlay_args(base: Path, base_format: DiskFormat, overlay: Path) -> list[str]:
    """The ``qemu-img`` arguments for an overlay over ``base`` (pure, unit-tested)."""
    return ["create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", base_format, str(overlay)]


class Qcow2Disk(CowDisk):
    @property
    def device_path(self) -> Path:
        return self.layer.paths()[0]

    @property
    def disk_format(self) -> DiskFormat:
        return "qcow2"

    def flatten(self, dest: Path) -> Path:
        return write_flat(
            dest,
            lambda tmp: _qemu_img(
                # -U: the (paused) VM may still hold the image's write lock
                "convert",
                "-q",
                "-U",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "-S",
                "4k",
                str(self.device_path),
                str(tmp),
            ),
        )


class Qcow2Strategy(CowStrategy):
    name = "qcow2"

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def available(self) -> Availability:
        if self.engine != "qemu":
            return Availability(False, f"qcow2 overlays need the qemu engine (engine is {self.engine})")
        if need_tool("qemu-img") is None:
            return Availability(False, "qemu-img is missing (apt-get install qemu-utils)")
        return Availability(True)

    def create(self, base_image: Path, sandbox_dir: Path, sandbox_id: str) -> CowDisk:
        sandbox_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        overlay = sandbox_dir / OVERLAY_FILE
        base_format = detect_disk_format(base_image)
        try:
            _qemu_img(*create_overlay_args(base_image, base_format, overlay))
        except BaseException:
            overlay.unlink(missing_ok=True)
            raise
        if base_format == "raw":  # the overlay is as large as its base: no second qemu-img run
            size = base_image.stat().st_size
        else:
            size = int(json.loads(_qemu_img("info", "--output=json", str(overlay)))["virtual-size"])
        return Qcow2Disk(CowLayer("qcow2", sandbox_id, base_image, sandbox_dir, (OVERLAY_FILE,), size))

    def reopen(self, layer: CowLayer) -> CowDisk:
        for path in (layer.paths()[0], layer.base_image):
            if not path.is_file():
                raise cow_error(f"{path} (disk of {layer.sandbox_id}) is missing")
        return Qcow2Disk(layer)
