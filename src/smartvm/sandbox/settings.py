"""SandboxSettings: where a sandbox manager keeps its state and how much it may run at once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.cow.base import StrategyName

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_USER = "user"
DEFAULT_HOME = "/home/user"
SLOT_PREFIX = "sb"
SLOT_TRANSIT = "10.201.0.0/16"  # not the 10.200/16 of plain slot pools: each prefix has its own leases


class SandboxSettings(BaseModel):
    """The knobs of one :class:`~smartvm.sandbox.manager.SandboxManager` (one per data dir)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(default=Path("/var/lib/smartvm"), description="state, templates and disks")
    max_sandboxes: int = Field(default=64, ge=1, description="live (not stopped) sandboxes at most")
    max_memory_mib: int | None = Field(
        default=None, ge=64, description="guest memory of running sandboxes at most; None: 80% of the host's"
    )
    default_timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    max_timeout_s: float = Field(default=24 * 3600.0, gt=0)
    reaper_interval_s: float = Field(default=1.0, gt=0)
    ready_timeout_s: float = Field(default=30.0, gt=0, description="for the guest agent after a restore")
    template_build_timeout_s: float = Field(default=300.0, gt=0)
    slot_pool_size: int = Field(default=2, ge=0, description="network slots kept ready")
    warm_pool_size: int = Field(
        default=1, ge=0, description="sandboxes per template restored ahead of time (paused) for fast creates"
    )
    slot_prefix: str = Field(default=SLOT_PREFIX, min_length=1, max_length=6)
    slot_transit: str = SLOT_TRANSIT
    cow_strategy: StrategyName | None = Field(default=None, description="None: the best available")
    on_close: Literal["keep", "pause", "kill"] = Field(
        default="keep", description="what closing the manager does to running sandboxes"
    )


def sandbox_settings(**values: object) -> SandboxSettings:
    """SandboxSettings(**values), with bad values as INVALID_CONFIG naming the field."""
    try:
        return SandboxSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise SmartVMError(ErrorCode.INVALID_CONFIG, f"sandbox setting {where}: {first['msg']}") from None
