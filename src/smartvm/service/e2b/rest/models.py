"""Request and response bodies of the E2B REST face, with E2B's JSON field names (``openapi.yml``).

Requests accept what the E2B SDK 2.63.0 sends and ignore fields they do not know (newer SDKs add
some). Settings that smartvm cannot honour are refused by name with 400, never silently dropped:
see :meth:`NewSandbox.unsupported`. Times go out as RFC 3339 in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from smartvm.sandbox.store import SandboxState
from smartvm.service.backend import SandboxInfoLike, SnapshotInfoLike

CLIENT_ID = "smartvm"  # E2B's deprecated clientID (a node id there); one host here
E2BState = Literal["running", "paused"]
_STATE: dict[SandboxState, E2BState] = {
    SandboxState.STARTING: "running",
    SandboxState.RUNNING: "running",
    SandboxState.RESUMING: "running",
    SandboxState.PAUSING: "paused",
    SandboxState.PAUSED: "paused",
}
MIB = 1 << 20


def e2b_state(state: SandboxState) -> E2BState | None:
    """E2B's state of a smartvm state; None for stopping, stopped and failed (gone to E2B)."""
    return _STATE.get(state)


def rfc3339(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class _In(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class NetworkRules(_In):
    """E2B's ``SandboxNetworkConfig`` (create) and ``SandboxNetworkUpdateConfig`` (``PUT .../network``).
    Addresses and CIDR blocks become the sandbox's egress policy (``egress.egress_policy``)."""

    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")
    dns_servers: list[str] | None = Field(default=None, alias="dnsServers")  # only used with domains
    allow_internet_access: bool | None = None  # the update's form of the create's top-level flag
    allow_public_traffic: bool | None = Field(default=None, alias="allowPublicTraffic")
    egress_proxy: dict[str, Any] | None = Field(default=None, alias="egressProxy")
    rules: dict[str, Any] | None = None
    mask_request_host: str | None = Field(default=None, alias="maskRequestHost")
    https_ports: list[int] | None = Field(default=None, alias="httpsPorts")

    def unsupported(self) -> list[str]:
        found = []
        if self.egress_proxy:
            found.append("network.egressProxy (a SOCKS5 egress proxy)")
        if self.rules:
            found.append("network.rules (per-domain request transforms)")
        if self.allow_public_traffic is False or self.mask_request_host or self.https_ports:
            found.append(
                "public sandbox URL settings (smartvm has no public sandbox URLs; use port forwards)"
            )
        return found


class NewSandbox(_In):
    """``POST /v2/sandboxes``."""

    template_id: str = Field(alias="templateID", min_length=1, max_length=200)
    timeout: int | None = Field(default=None, ge=0, description="seconds; default: the service's")
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_pause_memory: bool | None = Field(default=None, alias="autoPauseMemory")
    auto_resume: dict[str, Any] | None = Field(default=None, alias="autoResume")
    allow_internet_access: bool | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    network: NetworkRules | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[Any] | None = Field(default=None, alias="volumeMounts")

    def unsupported(self) -> list[str]:
        """The settings in this request that smartvm does not implement."""
        found = []
        if self.auto_pause_memory is False:
            found.append("autoPauseMemory=false (filesystem-only pauses; smartvm's keep memory)")
        if self.auto_resume and self.auto_resume.get("enabled"):
            found.append("autoResume (resume on traffic)")
        if self.network is not None:
            found += self.network.unsupported()
        for name, value in (("mcp", self.mcp), ("iam", self.iam), ("volumeMounts", self.volume_mounts)):
            if value:
                found.append(name)
        return found


class ConnectSandbox(_In):
    """``POST /v2/sandboxes/{id}/connect``: resume a paused sandbox; a running one's end only moves later."""

    timeout: int | None = Field(default=None, ge=0)
    memory: bool | None = None


class ForkRequest(_In):
    timeout: int = Field(default=15, ge=0, description="seconds the forks live")
    count: int = Field(default=1, ge=1, le=100)


class ForkError(_Out):
    code: int
    message: str


class ForkResult(_Out):
    """One fork: ``sandbox`` when it started, ``error`` when it did not (never both)."""

    sandbox: CreatedSandbox | None = None
    error: ForkError | None = None


class TimeoutRequest(_In):
    timeout: int = Field(ge=0, description="seconds from now")


class PauseRequest(_In):
    memory: bool | None = None


class SnapshotRequest(_In):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    memory: bool | None = None


class CreatedSandbox(_Out):
    """E2B's ``Sandbox``: what create and connect answer."""

    template_id: str = Field(alias="templateID")
    sandbox_id: str = Field(alias="sandboxID")
    alias: str
    client_id: str = Field(default=CLIENT_ID, alias="clientID")
    envd_version: str = Field(alias="envdVersion")
    envd_access_token: str = Field(alias="envdAccessToken")
    traffic_access_token: str | None = Field(default=None, alias="trafficAccessToken")
    domain: str | None = None


class Lifecycle(_Out):
    auto_resume: bool = Field(default=False, alias="autoResume")
    on_timeout: Literal["kill", "pause"] = Field(alias="onTimeout")


class ListedSandbox(_Out):
    template_id: str = Field(alias="templateID")
    alias: str
    sandbox_id: str = Field(alias="sandboxID")
    client_id: str = Field(default=CLIENT_ID, alias="clientID")
    started_at: datetime = Field(alias="startedAt")
    end_at: datetime = Field(alias="endAt")
    cpu_count: int = Field(alias="cpuCount")
    memory_mb: int = Field(alias="memoryMB")
    disk_size_mb: int = Field(alias="diskSizeMB")
    metadata: dict[str, str]
    state: E2BState
    envd_version: str = Field(alias="envdVersion")

    @classmethod
    def of(
        cls, info: SandboxInfoLike, state: E2BState, envd_version: str, disk_size_mb: int
    ) -> ListedSandbox:
        return cls(
            template_id=info.template,
            alias=info.template,
            sandbox_id=info.id,
            started_at=rfc3339(info.created_at),
            end_at=rfc3339(info.end_at),
            cpu_count=info.cpus,
            memory_mb=info.memory_mib,
            disk_size_mb=disk_size_mb,
            metadata=dict(info.metadata),
            state=state,
            envd_version=envd_version,
        )


class SandboxDetail(ListedSandbox):
    envd_access_token: str | None = Field(default=None, alias="envdAccessToken")
    domain: str | None = None
    lifecycle: Lifecycle
    network: dict[str, list[str]]  # allowOut / denyOut


class SandboxMetric(_Out):
    timestamp: datetime
    timestamp_unix: int = Field(alias="timestampUnix")
    cpu_count: int = Field(alias="cpuCount")
    cpu_used_pct: float = Field(alias="cpuUsedPct")
    mem_used: int = Field(alias="memUsed")
    mem_total: int = Field(alias="memTotal")
    mem_cache: int = Field(alias="memCache")
    disk_used: int = Field(alias="diskUsed")
    disk_total: int = Field(alias="diskTotal")


class SnapshotInfo(_Out):
    snapshot_id: str = Field(alias="snapshotID")
    names: list[str]

    @classmethod
    def of(cls, snap: SnapshotInfoLike) -> SnapshotInfo:
        return cls(snapshot_id=snap.name, names=[snap.name])


class TemplateAlias(_Out):
    template_id: str = Field(alias="templateID")
    public: bool = False
