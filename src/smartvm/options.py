"""SmartVMOptions: the knobs of one SmartVM instance, shared by the orchestrator and the engines.

Bad values fail at construction with ``SmartVMError(INVALID_CONFIG)`` naming the field.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, field_validator

from smartvm.validation import Model

EngineName = Literal["auto", "firecracker", "qemu"]
Arch = Literal["x86_64", "aarch64"]


def default_runtime_dir() -> Path:
    """tmpfs when there is one: staged drives and sockets then live in memory."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        return shm / ".smartvm" / "runtime"
    return Path(tempfile.gettempdir()) / ".smartvm" / "runtime"


_CGROUP_KEY = re.compile(r"^[a-z0-9_]+\.[a-z0-9_.]+$")
RESOURCE_LIMITS = ("fsize", "no-file")  # the only names the jailer accepts for --resource-limit


class JailerOptions(Model):
    """Run Firecracker under its jailer (opt-in: ``SmartVMOptions.jailer``).

    The jailer chroots Firecracker into ``<chroot_base_dir>/firecracker/<vm id>/root`` and drops to
    ``uid``/``gid``; smartvm hard-links the kernel, initrd, drives and log/metrics files into that root
    (copies them when the jail is on another filesystem) and removes the jail when the VM ends.
    Files Firecracker writes are handed to ``uid``/``gid`` with ``chown``: staged (ephemeral) drives
    are private copies, but a writable drive with ``ephemeral=False`` and the logger/metrics files are
    *your* files hard-linked into the jail, so their owner on the host changes too. Those must be on the
    filesystem of ``chroot_base_dir`` (a copy would lose Firecracker's writes); anything else is copied
    when it cannot be linked, so keep ``runtime_dir`` (the staged drives) on that filesystem too.

    ``daemonize`` makes the jailer call ``setsid()`` and point Firecracker's stdio at /dev/null, so the
    guest console is not captured in ``console.log`` then. With ``new_pid_ns`` the jailer forks
    Firecracker into a new PID namespace and exits; smartvm adopts Firecracker from the pid file.
    The jailer needs root (it chroots, mknods and changes owners).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid: int = Field(ge=0, description="the user Firecracker runs as")
    gid: int = Field(ge=0, description="the group Firecracker runs as")
    chroot_base_dir: Path = Path("/srv/jailer")
    cgroups: dict[str, str] = Field(default_factory=dict, description="e.g. {'cpu.max': '50000 100000'}")
    cgroup_version: Literal[1, 2] | None = None
    parent_cgroup: str | None = None
    resource_limits: dict[str, int] = Field(default_factory=dict, description="e.g. {'no-file': 1024}")
    daemonize: bool = False
    new_pid_ns: bool = False

    @field_validator("cgroups")
    @classmethod
    def _cgroup_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _CGROUP_KEY.match(key):
                raise ValueError(f"cgroup key {key!r} must look like 'cpu.max' (<controller>.<file>)")
            if not value or "=" in value:
                raise ValueError(f"cgroup {key!r} needs a non-empty value without '='")
        return v

    @field_validator("resource_limits")
    @classmethod
    def _limits(cls, v: dict[str, int]) -> dict[str, int]:
        for key, limit in v.items():
            if key not in RESOURCE_LIMITS:
                raise ValueError(f"resource limit {key!r} is not one of {', '.join(RESOURCE_LIMITS)}")
            if limit < 0:
                raise ValueError(f"resource limit {key!r} must be non-negative")
        return v

    @field_validator("parent_cgroup")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        if v is not None and any(part in ("", ".", "..") for part in v.split("/")):
            raise ValueError(f"parent_cgroup {v!r} must be a relative cgroup path without '.' or '..'")
        return v


_BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


class SmartVMOptions(Model):
    """Every knob of one :class:`~smartvm.orchestrator.SmartVM`; each one is read (see docs/porting.md).

    ``bridge_name`` and ``subnet`` configure ``SmartVM.network_manager`` (the bridge VMs get TAP
    devices on); ``base_image_*`` and ``max_stored_base_images`` configure
    ``SmartVM.base_image_manager``; ``release_base_url``, ``ci_bucket_url`` and
    ``allow_unverified_firecracker`` both image managers. A bad value raises
    ``SmartVMError(INVALID_CONFIG)`` naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Path("/tmp/.smartvm")
    runtime_dir: Path = Field(default_factory=default_runtime_dir)
    ephemeral_writable_drives: bool = True
    firecracker_version: str | None = Field(default=None, description="None means the latest release")
    arch: Arch = "x86_64"
    firecracker_binary_path: Path | None = None
    jailer_binary_path: Path | None = None
    jailer: JailerOptions | None = Field(default=None, description="None: run Firecracker without its jailer")
    bridge_name: str = Field(default="svbr0", max_length=15)
    subnet: str = Field(default="172.30.0.0/24", description="IPv4 network of the bridge, /1 to /30")
    base_image_cache_dir: Path | None = Field(default=None, description="None: <data_dir>/base-images")
    max_stored_base_images: int = 2
    base_image_manifest_url: str | None = None
    base_image_manifest_path: Path | None = None
    release_base_url: str | None = None
    allow_unverified_firecracker: bool = Field(
        default=False, description="install a Firecracker release that publishes no sha256 (insecure)"
    )
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

    @field_validator("bridge_name")
    @classmethod
    def _bridge_name(cls, v: str) -> str:
        if not _BRIDGE_RE.match(v):
            raise ValueError(f"bridge_name {v!r} must be 1-15 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        try:
            net = ipaddress.IPv4Network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"subnet {v!r} is not an IPv4 network such as 172.30.0.0/24 ({exc})") from None
        if not 1 <= net.prefixlen <= 30:
            raise ValueError(f"subnet {v!r} needs a prefix length of 1 to 30 (room for a gateway and guests)")
        return str(net)

    @field_validator("base_image_manifest_url")
    @classmethod
    def _manifest_url(cls, v: str | None) -> str | None:
        if v is not None and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).netloc):
            raise ValueError(f"base_image_manifest_url {v!r} must be an http(s) URL")
        return v

    @field_validator("max_stored_base_images")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("max_stored_base_images must be a positive integer")
        return v
