"""SmartVMOptions: the knobs of one SmartVM instance, shared by the orchestrator and the engines."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EngineName = Literal["auto", "firecracker", "qemu"]
Arch = Literal["x86_64", "aarch64"]


def default_runtime_dir() -> Path:
    """tmpfs when there is one: staged drives and sockets then live in memory."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        return shm / ".smartvm" / "runtime"
    return Path(tempfile.gettempdir()) / ".smartvm" / "runtime"


class SmartVMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Path("/tmp/.smartvm")
    runtime_dir: Path = Field(default_factory=default_runtime_dir)
    ephemeral_writable_drives: bool = True
    firecracker_version: str | None = Field(default=None, description="None means the latest release")
    arch: Arch = "x86_64"
    firecracker_binary_path: Path | None = None
    jailer_binary_path: Path | None = None
    bridge_name: str = Field(default="svbr0", max_length=15)
    subnet: str = "172.30.0.0/24"
    base_image_cache_dir: Path | None = None
    max_stored_base_images: int = 2
    base_image_manifest_url: str | None = None
    base_image_manifest_path: Path | None = None
    release_base_url: str | None = None
    ci_bucket_url: str | None = None
    engine: EngineName = "auto"
    qemu_binary_path: Path | None = None
    qemu_accel: Literal["auto", "kvm", "tcg"] = "auto"
    stop_timeout_s: float = Field(default=5.0, gt=0)
    socket_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("firecracker_version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import re

        if not re.fullmatch(r"v?\d+\.\d+\.\d+", v):
            raise ValueError(f"firecracker_version {v!r} must look like v1.15.1")
        return v if v.startswith("v") else f"v{v}"

    @field_validator("max_stored_base_images")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_stored_base_images must be a positive integer")
        return v
