"""Building the native guest agent (``src/smartvm/agent/native``, Go) on the host.

The rootfs build compiles it with the host's ``go`` (Debian's golang-go, standard library only) into
a static binary installed as ``/opt/smartvm/agent-native``; ``run-agent`` prefers it to the Python
agent, which it runs as its child for the ops it does not implement. Without ``go`` (or with
``SMARTVM_NATIVE_AGENT=0``) the image carries the Python agent alone, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from smartvm.images.go_build import find_go, go_build, go_sources, sources_digest, toolchain_identity

NATIVE_DIR = Path(__file__).resolve().parent.parent / "agent" / "native"
NATIVE_IN_GUEST = "opt/smartvm/agent-native"


def go_tool() -> str | None:
    """The host's go command, or None when the native agent is off or cannot be built here."""
    if os.environ.get("SMARTVM_NATIVE_AGENT", "1") == "0":
        return None
    return find_go()


def native_sources() -> list[Path]:
    """The files that make the binary (tests excluded), in a stable order."""
    return go_sources(NATIVE_DIR)


def native_identity() -> str:
    """What enters the rootfs cache key: the sources' sha256 and the toolchain, or why there is none."""
    go = go_tool()
    if go is None or not native_sources():
        return "no-native-agent"
    return f"native-agent={sources_digest(NATIVE_DIR)}:{toolchain_identity(go)}"


def build_native_agent(out: Path, *, gocache: Path | None = None) -> Path | None:
    """Compile the static binary (for this machine's architecture, the guests' too) to ``out``;
    None when there is no go toolchain (or it is off). ``gocache`` keeps go's build cache (default:
    next to ``out``): the first build compiles the runtime, later ones take a second or two."""
    go = go_tool()
    if go is None:
        return None
    return go_build(go, NATIVE_DIR, out, gocache or out.parent / ".gocache", "the native guest agent")
