"""Async client for Firecracker's HTTP API over its Unix socket.

Shaped like Firecracker's own test framework: one small :class:`Resource` per endpoint, so call
sites read like the API docs (``await api.machine_config.put(vcpu_count=2, mem_size_mib=256)``).
Arguments left as ``None`` are dropped; a non-2xx answer raises ``FIRECRACKER_API_ERROR`` carrying
the method, the path and Firecracker's ``fault_message``. One :class:`httpx.AsyncClient` per VM keeps
the connection open between calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from smartvm.errors import ErrorCode, SmartVMError

DEFAULT_TIMEOUT_S = 30.0


class Resource:
    """One endpoint. ``id_field`` names the body field that also forms the last path segment."""

    def __init__(self, api: FirecrackerAPI, path: str, id_field: str | None = None) -> None:
        self._api = api
        self.path = path
        self.id_field = id_field

    def _target(self, body: dict[str, Any]) -> str:
        if self.id_field is None:
            return self.path
        resource_id = body.get(self.id_field)
        if not isinstance(resource_id, str) or not resource_id:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{self.path}: the body needs a non-empty string {self.id_field!r}",
            )
        return f"{self.path}/{quote(resource_id, safe='')}"

    @staticmethod
    def _body(data: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
        body = dict(data or {})
        body.update(fields)
        return {k: v for k, v in body.items() if v is not None}

    async def get(self) -> Any:
        return await self._api.request("GET", self.path)

    async def put(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Any:
        """PUT the body built from ``data`` (for free-form bodies like MMDS) and keyword fields."""
        body = self._body(data, fields)
        return await self._api.request("PUT", self._target(body), body)

    async def patch(self, data: dict[str, Any] | None = None, /, **fields: Any) -> Any:
        body = self._body(data, fields)
        return await self._api.request("PATCH", self._target(body), body)


class FirecrackerAPI:
    """The API of one Firecracker process. Use as an async context manager or call :meth:`close`."""

    def __init__(self, socket_path: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.AsyncClient(
            # verify=False: no TLS over a Unix socket, and building an SSL context costs ~27 ms per client
            transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path), verify=False),
            base_url="http://localhost",
            timeout=timeout,
        )
        self.describe_instance = Resource(self, "/")
        self.actions = Resource(self, "/actions")
        self.balloon = Resource(self, "/balloon")
        self.balloon_stats = Resource(self, "/balloon/statistics")
        self.balloon_hinting_start = Resource(self, "/balloon/hinting/start")
        self.balloon_hinting_status = Resource(self, "/balloon/hinting/status")
        self.balloon_hinting_stop = Resource(self, "/balloon/hinting/stop")
        self.boot = Resource(self, "/boot-source")
        self.cpu_config = Resource(self, "/cpu-config")
        self.drives = Resource(self, "/drives", "drive_id")
        self.pmem = Resource(self, "/pmem", "id")
        self.logger = Resource(self, "/logger")
        self.machine_config = Resource(self, "/machine-config")
        self.metrics = Resource(self, "/metrics")
        self.mmds = Resource(self, "/mmds")
        self.mmds_config = Resource(self, "/mmds/config")
        self.entropy = Resource(self, "/entropy")
        self.serial = Resource(self, "/serial")
        self.memory_hotplug = Resource(self, "/hotplug/memory")
        self.network_interfaces = Resource(self, "/network-interfaces", "iface_id")
        self.snapshot_create = Resource(self, "/snapshot/create")
        self.snapshot_load = Resource(self, "/snapshot/load")
        self.version = Resource(self, "/version")
        self.vm = Resource(self, "/vm")
        self.vm_config = Resource(self, "/vm/config")
        self.vsock = Resource(self, "/vsock")

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer, or None for 204."""
        try:
            if body is None:
                response = await self._client.request(method, path)
            else:
                response = await self._client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise SmartVMError(
                ErrorCode.FIRECRACKER_API_ERROR,
                f"{method} {path}: Firecracker did not answer in time ({type(exc).__name__}); "
                "the process may be stuck, check its log",
            ) from exc
        except httpx.TransportError as exc:
            raise SmartVMError(
                ErrorCode.NO_CLIENT,
                f"{method} {path}: cannot reach the Firecracker API at {self.socket_path}: "
                f"{str(exc) or type(exc).__name__}; is the process running?",
            ) from exc
        if response.is_success:
            return _decode(response)
        raise SmartVMError(
            ErrorCode.FIRECRACKER_API_ERROR,
            f"{method} {path} failed with HTTP {response.status_code}: {_fault_message(response)}",
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FirecrackerAPI:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _decode(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def _fault_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        return response.text.strip() or "(no body)"
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return str(data["fault_message"])
    return json.dumps(data)
