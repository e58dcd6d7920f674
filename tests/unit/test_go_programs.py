"""The Go programs' own tests (``go test``), formatting and vet, in the suite where go exists: the
native guest agent (``agent/native``) and the pause-stream tool (``qemu/ramdiff``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from smartvm.images.cache_paths import cache_root
from smartvm.images.go_build import find_go
from smartvm.images.native_agent import NATIVE_DIR
from smartvm.qemu.ramdiff import RAMDIFF_DIR

GO = find_go()
pytestmark = pytest.mark.skipif(GO is None, reason="no go toolchain here (scripts/setup installs golang-go)")


def _go(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert GO is not None
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "GOCACHE": str(cache_root() / "go-build")}
    return subprocess.run([GO, *args], cwd=directory, env=env, capture_output=True, text=True, check=False)


@pytest.mark.parametrize("directory", [NATIVE_DIR, RAMDIFF_DIR], ids=["agent-native", "ramdiff"])
def test_go_test_vet_and_gofmt(directory: Path) -> None:
    tested = _go(directory, "test", "-count=1", "./...")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    vetted = _go(directory, "vet", "./...")
    assert vetted.returncode == 0, vetted.stdout + vetted.stderr
    gofmt = Path(GO or "go").resolve().parent / "gofmt"
    unformatted = subprocess.run(
        [str(gofmt), "-l", "."], cwd=directory, capture_output=True, text=True, check=True
    )
    assert unformatted.stdout == "", f"not gofmt-formatted: {unformatted.stdout}"
