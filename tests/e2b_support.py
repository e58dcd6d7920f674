"""Helpers for tests of the E2B envd face: a real uvicorn server on a loopback port, the official SDK's
sandbox object pointed at it without the REST API, and a Connect JSON client built on httpx."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn

from smartvm.service.e2b import ENVD_PORT, ENVD_VERSION


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) in this event loop; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="auto")
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def sdk_sandbox(url: str, sandbox_id: str, token: str | None, *, sync: bool = False) -> Any:
    """The SDK's sandbox object for `sandbox_id`, built as ``Sandbox.connect`` builds it but without the
    REST call: every envd request goes to `url` with the sandbox headers the SDK sends."""
    from e2b import AsyncSandbox, Sandbox
    from e2b.connection_config import ConnectionConfig
    from packaging.version import Version

    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    if token is not None:
        headers["X-Access-Token"] = token
    config = ConnectionConfig(sandbox_url=url, api_key="e2b_unused", extra_sandbox_headers=headers)
    cls = Sandbox if sync else AsyncSandbox
    return cls(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=Version(ENVD_VERSION),
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=config,
    )


class ConnectJSON:
    """A minimal Connect client speaking JSON (what the SDK speaks), for checks below the SDK."""

    def __init__(self, url: str, sandbox_id: str, token: str | None) -> None:
        self.headers = {"E2b-Sandbox-Id": sandbox_id}
        if token is not None:
            self.headers["X-Access-Token"] = token
        self.http = httpx.AsyncClient(base_url=url, timeout=120)

    async def unary(self, method: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.http.post(
            f"/{method}",
            content=json.dumps(body),
            headers={**self.headers, "Content-Type": "application/json", **headers},
        )

    async def stream(
        self, method: str, body: dict[str, Any], **headers: str
    ) -> AsyncIterator[tuple[int, Any]]:
        """(flags, message) of each envelope of a server stream; the last one has flags 0x02."""
        payload = json.dumps(body).encode()
        request = self.http.build_request(
            "POST",
            f"/{method}",
            content=struct.pack(">BI", 0, len(payload)) + payload,
            headers={**self.headers, "Content-Type": "application/connect+json", **headers},
        )
        response = await self.http.send(request, stream=True)
        try:
            assert response.status_code == 200, (response.status_code, await response.aread())
            assert response.headers["content-type"] == "application/connect+json"
            buf = b""
            async for chunk in response.aiter_raw():
                buf += chunk
                while len(buf) >= 5:
                    flags, size = struct.unpack(">BI", buf[:5])
                    if len(buf) < 5 + size:
                        break
                    yield flags, json.loads(buf[5 : 5 + size])
                    buf = buf[5 + size :]
            assert buf == b"", "the stream ended inside an envelope"
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
