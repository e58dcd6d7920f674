"""Building the native guest agent (``src/smartvm/agent/native``, Go) on the host.

The rootfs build compiles it with the host's ``go`` (Debian's golang-go, standard library only) into
a static binary installed as ``/opt/smartvm/agent-native``; ``run-agent`` prefers it to the Python
agent, which it runs as its child for the ops it does not implement. Without ``go`` (or with
``SMARTVM_NATIVE_AGENT=0``) the image carries the Python agent alone, as before.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError

NATIVE_DIR = Path(__file__).resolve().parent.parent / "agent" / "native"
NATIVE_IN_GUEST = "opt/smartvm/agent-native"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def go_tool() -> str | None:
    """The host's go command, or None when the native agent is off or cannot be built here."""
    if os.environ.get("SMARTVM_NATIVE_AGENT", "1") == "0":
        return None
    return shutil.which("go")


def native_sources() -> list[Path]:
    """The files that make the binary (tests excluded), in a stable order."""
    if not NATIVE_DIR.is_dir():
        return []
    return sorted(
        p
        for p in NATIVE_DIR.iterdir()
        if p.name == "go.mod" or (p.suffix == ".go" and not p.name.endswith("_test.go"))
    )


def native_identity() -> str:
    """What enters the rootfs cache key: the sources' sha256 and the toolchain, or why there is none."""
    go = go_tool()
    sources = native_sources()
    if go is None or not sources:
        return "no-native-agent"
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    st = Path(go).resolve().stat()
    return f"native-agent={h.hexdigest()}:{st.st_size}:{int(st.st_mtime)}"


def build_native_agent(out: Path, *, gocache: Path | None = None) -> Path | None:
    """Compile the static binary (for this machine's architecture, the guests' too) to ``out``;
    None when there is no go toolchain (or it is off). ``gocache`` keeps go's build cache (default:
    next to ``out``): the first build compiles the runtime, later ones take a second or two."""
    go = go_tool()
    if go is None or not native_sources():
        return None
    arch = _GOARCH.get(os.uname().machine)
    if arch is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = gocache or out.parent / ".gocache"
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOOS": "linux",
        "GOARCH": arch,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOCACHE": str(cache),
        "HOME": os.environ.get("HOME", str(out.parent)),
    }
    argv = [go, "build", "-trimpath", "-ldflags=-s", "-o", str(out), "."]
    done = subprocess.run(argv, cwd=NATIVE_DIR, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-800:]
        raise SmartVMError(ErrorCode.BUILD_FAILED, f"building the native guest agent with {go}: {said}")
    return out
