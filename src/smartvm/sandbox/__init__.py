"""Sandboxes: microVMs restored from template snapshots, with their own network slot, copy-on-write
disk, deadline and durable record (``from smartvm.sandbox import SandboxManager``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smartvm.sandbox.commands import CommandHandle, CommandResult
    from smartvm.sandbox.manager import SandboxManager, SnapshotInfo
    from smartvm.sandbox.sandbox import Sandbox, SandboxInfo, SandboxMetrics
    from smartvm.sandbox.settings import SandboxSettings
    from smartvm.sandbox.store import SandboxState
    from smartvm.sandbox.templates import TemplateSpec

__all__ = [
    "CommandHandle",
    "CommandResult",
    "Sandbox",
    "SandboxInfo",
    "SandboxManager",
    "SandboxMetrics",
    "SandboxSettings",
    "SandboxState",
    "SnapshotInfo",
    "TemplateSpec",
]

_WHERE = {
    "CommandHandle": "commands",
    "CommandResult": "commands",
    "SandboxManager": "manager",
    "SnapshotInfo": "manager",
    "Sandbox": "sandbox",
    "SandboxInfo": "sandbox",
    "SandboxMetrics": "sandbox",
    "SandboxSettings": "settings",
    "SandboxState": "store",
    "TemplateSpec": "templates",
}


def __getattr__(name: str) -> Any:
    """Import on first use: ``import smartvm.sandbox`` stays cheap for the CLI."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"smartvm.sandbox.{_WHERE[name]}"), name)
    raise AttributeError(name)
