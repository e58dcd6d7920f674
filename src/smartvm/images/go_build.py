"""Compiling smartvm's small Go programs (standard library only) with the host's ``go``.

Two of them: the native guest agent (``agent/native``, built into the rootfs) and ``ramdiff``
(``qemu/ramdiff``, a host tool for pause streams). Both build static, offline (``GOPROXY=off``), with
go's build cache kept in smartvm's cache so that later builds take a second or two.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError

GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def go_sources(directory: Path) -> list[Path]:
    """The files that make a program's binary (tests excluded), in a stable order."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name == "go.mod" or (p.suffix == ".go" and not p.name.endswith("_test.go"))
    )


def sources_digest(directory: Path) -> str:
    """sha256 over a program's sources (names and contents): what its cached binary is keyed by."""
    h = hashlib.sha256()
    for path in go_sources(directory):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def toolchain_identity(go: str) -> str:
    st = Path(go).resolve().stat()
    return f"{st.st_size}:{int(st.st_mtime)}"


def go_build(go: str, directory: Path, out: Path, gocache: Path, what: str) -> Path | None:
    """Compile the program in ``directory`` to ``out`` for this machine; None on an architecture go
    cannot target here. BUILD_FAILED with go's own words when it does not compile."""
    arch = GOARCH.get(os.uname().machine)
    if arch is None or not go_sources(directory):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOOS": "linux",
        "GOARCH": arch,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOCACHE": str(gocache),
        "HOME": os.environ.get("HOME", str(out.parent)),
    }
    argv = [go, "build", "-trimpath", "-ldflags=-s", "-o", str(out), "."]
    done = subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-800:]
        raise SmartVMError(ErrorCode.BUILD_FAILED, f"building {what} with {go}: {said}")
    return out


def find_go() -> str | None:
    return shutil.which("go")
