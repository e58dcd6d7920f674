"""The ``ramdiff`` host tool (``qemu/ramdiff``, Go): pause streams that carry only changed pages.

A sandbox restored from a template maps the template's memory file copy-on-write. Its pause stream
goes through ``ramdiff``, which leaves out every page equal to the file's, and its resume maps the
file again under that stream: ~1 MB instead of ~45 MB for an idle 256 MiB guest, a faster load, and
a resumed QEMU that shares the template's pages instead of holding its own copy of all of them.

The binary is built once per source version into smartvm's cache (``scripts/setup`` and every
template build do it); a pause never builds it. Without it (no ``go``, ``SMARTVM_RAMDIFF=0``) pauses
stream the whole RAM, as before. ``SMARTVM_RAMDIFF=/path`` names another binary (tests).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from smartvm.images.cache_paths import cache_root
from smartvm.images.go_build import find_go, go_build, sources_digest

log = logging.getLogger(__name__)

RAMDIFF_DIR = Path(__file__).resolve().parent / "ramdiff"
ENV = "SMARTVM_RAMDIFF"


@functools.cache  # once per process: a pause should not hash sources
def _digest() -> str:
    return sources_digest(RAMDIFF_DIR)[:16]


def _cached_path() -> Path:
    return cache_root() / "bin" / f"ramdiff-{_digest()}"


def ramdiff_binary() -> Path | None:
    """The tool a pause runs its stream through, or None (pauses then carry the whole RAM)."""
    chosen = os.environ.get(ENV, "")
    if chosen == "0":
        return None
    if chosen:
        return Path(chosen)
    path = _cached_path()
    return path if os.access(path, os.X_OK) else None


def build_ramdiff() -> Path | None:
    """Build the tool into the cache unless it is there; None without ``go`` (or when turned off).
    The binary appears whole (built aside, then renamed): a pause never runs half a file. Builds of
    other source versions are removed."""
    if os.environ.get(ENV, "") == "0":
        return None
    path = _cached_path()
    if not os.access(path, os.X_OK) and not _build(path):
        return None
    for old in path.parent.glob("ramdiff-*"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _build(path: Path) -> bool:
    go = find_go()
    if go is None:
        return False
    import tempfile  # only here: the CLI imports this module on every run

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ramdiff-") as tmp:
        built = go_build(go, RAMDIFF_DIR, Path(tmp) / "ramdiff", cache_root() / "go-build", "ramdiff")
        if built is None:
            return False
        built.rename(path)
    log.info("built %s", path)
    return True


if __name__ == "__main__":  # ``python -m smartvm.qemu.ramdiff``: what scripts/setup runs
    print(build_ramdiff() or "ramdiff: not built (no go toolchain, or SMARTVM_RAMDIFF=0)")
