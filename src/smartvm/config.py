"""Engine-neutral microVM configuration.

Field names follow Firecracker's API (``firecracker.yaml``) so a model's :meth:`api_body` is the
request body as is. Fields that are ours alone (``MicroVMConfig.id``, ``Drive.ephemeral``) are
listed in ``_local_fields`` and never reach Firecracker. Bad values fail at construction (and
assignment) with ``SmartVMError(INVALID_CONFIG)`` naming the field, which is also a ``ValueError``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from smartvm.validation import Model

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_MMDS_IP_RE = re.compile(
    r"^169\.254\.([1-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-4])\."
    r"([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$"
)


def _check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


class ApiModel(Model):
    """Base of every config model: strict fields, and a body for Firecracker's API."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
    _local_fields: ClassVar[frozenset[str]] = frozenset()

    def api_body(self) -> dict[str, Any]:
        """The Firecracker request body: unset fields and our own fields left out."""
        body: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self._local_fields:
                continue
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, ApiModel):
                value = value.api_body()
            elif isinstance(value, list):
                value = [v.api_body() if isinstance(v, ApiModel) else v for v in value]
            body[name] = value
        return body


class TokenBucket(ApiModel):
    """A token bucket: ``size`` tokens refilled every ``refill_time`` ms."""

    size: int = Field(ge=0)
    refill_time: int = Field(ge=0, description="milliseconds to refill the bucket")
    one_time_burst: int | None = Field(default=None, ge=0)


class RateLimiter(ApiModel):
    """Independent bytes/s (``bandwidth``) and ops/s (``ops``) limits."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


def has_boot_arg(words: Iterable[str], key: str) -> bool:
    """Whether kernel arguments ``words`` set ``key`` (``key`` alone or ``key=...``)."""
    return any(w == key or w.startswith(f"{key}=") for w in words)


def with_boot_arg(args: str, arg: str) -> str:
    """``args`` plus ``arg`` (``key=value``) unless they set that key already: the user's value wins."""
    return args if has_boot_arg(args.split(), arg.split("=", 1)[0]) else f"{args} {arg}"


class BootSource(ApiModel):
    kernel_image_path: str = Field(min_length=1)
    boot_args: str | None = None
    initrd_path: str | None = None


CpuTemplateName = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]


class MachineConfig(ApiModel):
    vcpu_count: int = Field(default=1, ge=1, le=32)
    mem_size_mib: int = Field(default=256, ge=16)
    smt: bool | None = None
    cpu_template: CpuTemplateName | None = None
    track_dirty_pages: bool | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None

    @model_validator(mode="after")
    def _vcpus_with_smt(self) -> MachineConfig:
        if self.smt and self.vcpu_count > 1 and self.vcpu_count % 2:
            raise ValueError("vcpu_count must be 1 or an even number when smt is enabled")
        return self


class Drive(ApiModel):
    """A virtio-blk drive. ``ephemeral`` is ours: stage a private copy-on-write copy for this VM.

    ``ephemeral=None`` means: writable drives are staged (unless the SmartVM option
    ``ephemeral_writable_drives`` is off), read-only drives are used in place.
    """

    _local_fields: ClassVar[frozenset[str]] = frozenset({"ephemeral"})

    drive_id: str
    path_on_host: str = Field(min_length=1)
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    ephemeral: bool | None = None

    @field_validator("drive_id")
    @classmethod
    def _drive_id(cls, v: str) -> str:
        return _check_id(v, "drive_id")


class NetworkInterface(ApiModel):
    """A virtio-net device. Without ``host_dev_name``, ``SmartVM.create_vm`` gives it a TAP device
    (on its bridge, or on the slot passed as ``network=``) and a MAC when none is set."""

    iface_id: str
    host_dev_name: str | None = Field(default=None, min_length=1, max_length=15)
    guest_mac: str | None = None
    mtu: int | None = Field(default=None, ge=68, le=65535)
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None

    @field_validator("iface_id")
    @classmethod
    def _iface_id(cls, v: str) -> str:
        return _check_id(v, "iface_id")

    @field_validator("guest_mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None and not _MAC_RE.match(v):
            raise ValueError(f"guest_mac {v!r} must look like 06:00:ac:1e:00:02")
        return v


class Vsock(ApiModel):
    guest_cid: int = Field(ge=3)
    uds_path: str = Field(min_length=1)


class Balloon(ApiModel):
    amount_mib: int = Field(ge=0)
    deflate_on_oom: bool = True
    stats_polling_interval_s: int | None = Field(default=None, ge=0)
    free_page_hinting: bool | None = None
    free_page_reporting: bool | None = None


class Mmds(ApiModel):
    """MMDS configuration (``PUT /mmds/config``)."""

    version: Literal["V1", "V2"] = "V2"
    network_interfaces: list[str] = Field(min_length=1)
    ipv4_address: str | None = None
    imds_compat: bool | None = None

    @field_validator("ipv4_address")
    @classmethod
    def _link_local(cls, v: str | None) -> str | None:
        if v is not None and not _MMDS_IP_RE.match(v):
            raise ValueError(f"ipv4_address {v!r} must be a link-local address in 169.254.0.0/16")
        return v


LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off"]


class Logger(ApiModel):
    log_path: str | None = None
    level: LogLevel | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None


class Metrics(ApiModel):
    metrics_path: str = Field(min_length=1)


class Entropy(ApiModel):
    rate_limiter: RateLimiter | None = None


def new_vm_id() -> str:
    """A fresh VM id like ``vm-1a2b3c4d5e6f``."""
    return f"vm-{uuid.uuid4().hex[:12]}"


class MicroVMConfig(ApiModel):
    """Everything needed to boot one microVM, on either engine."""

    _local_fields: ClassVar[frozenset[str]] = frozenset({"id"})

    id: str = Field(default_factory=new_vm_id)
    boot_source: BootSource
    machine_config: MachineConfig = Field(default_factory=MachineConfig)
    drives: list[Drive] = Field(default_factory=list)
    network_interfaces: list[NetworkInterface] = Field(default_factory=list)
    vsock: Vsock | None = None
    balloon: Balloon | None = None
    mmds: Mmds | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None
    entropy: Entropy | None = None

    @field_validator("id")
    @classmethod
    def _vm_id(cls, v: str) -> str:
        return _check_id(v, "id")

    @model_validator(mode="after")
    def _consistent(self) -> MicroVMConfig:
        drive_ids = [d.drive_id for d in self.drives]
        if len(drive_ids) != len(set(drive_ids)):
            raise ValueError(f"drive_id values must be unique, got {drive_ids}")
        if sum(1 for d in self.drives if d.is_root_device) > 1:
            raise ValueError("at most one drive may have is_root_device=True")
        iface_ids = [n.iface_id for n in self.network_interfaces]
        if len(iface_ids) != len(set(iface_ids)):
            raise ValueError(f"iface_id values must be unique, got {iface_ids}")
        if self.mmds is not None:
            unknown = set(self.mmds.network_interfaces) - set(iface_ids)
            if unknown:
                raise ValueError(f"mmds.network_interfaces names unknown interfaces {sorted(unknown)}")
        return self

    def root_drive(self) -> Drive | None:
        return next((d for d in self.drives if d.is_root_device), None)


def parse_config(data: dict[str, Any]) -> MicroVMConfig:
    """Build a :class:`MicroVMConfig` from plain data (bad values: SmartVMError INVALID_CONFIG)."""
    return MicroVMConfig.model_validate(data)
