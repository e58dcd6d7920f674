"""Request and response bodies of the ``/v1`` API (pydantic: bad input fails naming the field)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from smartvm.host.nat import EgressPolicy
from smartvm.sandbox.store import SandboxState

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SANDBOX_ID_PATTERN = r"^sb-[0-9a-f]{8}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="lowercase letters, digits, '.', '_', '-'")]
StringMap = dict[Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(max_length=4096)]]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="seconds")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """A response body read from the sandbox layer's object of the same field names."""

    @classmethod
    def of(cls, source: object) -> Self:
        return cls.model_validate(source, from_attributes=True)


class ErrorOut(BaseModel):
    code: str
    message: str


class ForkOut(_Out):
    """One fork: the sandbox when it started, the error when it did not."""

    sandbox: SandboxOut | None = None
    error: ErrorOut | None = None


class CreateSandboxIn(_In):
    template: Name = "base"
    timeout: Seconds | None = Field(default=None, description="seconds until the sandbox ends")
    metadata: StringMap = Field(default_factory=dict)
    envs: StringMap = Field(default_factory=dict)
    auto_pause: bool = Field(default=False, description="pause instead of kill at the end time")
    cpus: Annotated[int, Field(ge=1, le=64)] | None = None
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] | None = None
    internet: bool = True
    egress: EgressIn | None = Field(default=None, description="an egress policy (instead of `internet`)")


class EgressIn(_In):
    """What the sandbox may connect to: ``deny`` CIDRs never, ``allow`` CIDRs always, the rest as
    ``default`` says."""

    default: Literal["allow", "deny"] = "allow"
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)

    def policy(self) -> EgressPolicy:
        return EgressPolicy(self.default, tuple(self.allow), tuple(self.deny))


class ForkIn(_In):
    count: Annotated[int, Field(ge=1, le=100)] = 1
    timeout: Seconds | None = Field(default=None, description="seconds until the forks end")


class EgressOut(_Out):
    """What the sandbox may connect to: ``deny`` CIDRs never, ``allow`` CIDRs always, the rest as
    ``default`` says (private and link-local ranges only when allowed by CIDR)."""

    default: Literal["allow", "deny"]
    allow: list[str]
    deny: list[str]


class SandboxOut(_Out):
    id: str
    template: str
    state: SandboxState
    metadata: dict[str, str]
    cpus: int
    memory_mib: int
    created_at: float
    end_at: float
    auto_pause: bool
    disk_bytes: int
    error: str | None
    egress: EgressOut


class TimeoutIn(_In):
    timeout: Seconds


class ResumeIn(_In):
    timeout: Seconds | None = None


class ExecIn(_In):
    cmd: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="a string runs through bash -l -c, a list runs directly"
    )
    envs: StringMap = Field(default_factory=dict)
    cwd: str | None = None
    user: str | int | None = Field(default=None, description="default: the sandbox user")
    timeout: Seconds | None = 60.0
    stdin: str | None = None
    background: bool = Field(default=False, description="start it and return its pid at once")


class ExecOut(_Out):
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class BackgroundOut(BaseModel):
    pid: int


class ProcessOut(_Out):
    pid: int
    cmd: list[str]
    running: bool
    exit_code: int | None
    signal: int | None
    started: float
    ended: float | None
    stdin_open: bool


class StdinIn(_In):
    data: str = ""
    eof: bool = False


class KilledOut(BaseModel):
    pid: int
    signalled: bool = Field(description="false when the process had already exited")


class FileOut(_Out):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float
    target: str | None = None


GuestPath = Annotated[str, Field(min_length=1, max_length=4096)]


class PathIn(_In):
    path: GuestPath


class RenameIn(_In):
    src: GuestPath
    dst: GuestPath


class SnapshotIn(_In):
    name: Name


class SnapshotOut(_Out):
    name: str
    source_sandbox: str | None
    created_at: float
    size_bytes: int


class TemplateIn(_In):
    name: Name
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Field(ge=64, le=1 << 20)] = 256
    envs: StringMap = Field(default_factory=dict)
    start_command: str | None = None
    ready_command: str | None = None


class TemplateOut(_Out):
    name: str
    cpus: int
    memory_mib: int
    status: str
    created_at: float


class MetricsOut(_Out):
    cpu_seconds: float
    cpu_count: int
    memory_rss_bytes: int
    memory_mib: int
    disk_bytes: int
    timestamp: float


class EventOut(_Out):
    time: float
    kind: str
    detail: str


# What every protected route may answer besides its own body (shown in /docs).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": why}
    for status, why in (
        (400, "bad input"),
        (401, "missing or invalid API key"),
        (404, "no such sandbox, snapshot, template or file"),
        (409, "wrong state"),
        (413, "too large"),
        (422, "validation failed"),
        (429, "over a limit"),
        (503, "host out of capacity"),
    )
}
