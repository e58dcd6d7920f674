"""Uploads over the size limit with a real guest: the service app in process (a small upload limit)
over the real SandboxManager. A streamed body is cut off with 413 as it passes the limit, the guest
keeps the old file and no part file, and the service goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from smartvm.service.app import create_app
from smartvm.service.context import ServiceContext, ServiceLimits
from smartvm.service.manager_backend import ManagerBackend

pytestmark = pytest.mark.integration
LIMIT = 1 << 20


async def test_an_upload_over_the_limit_is_413_and_leaves_the_guest_file_as_it_was(sbm: Any) -> None:
    ctx = ServiceContext(
        data_dir=sbm.data_dir, backend=ManagerBackend(sbm), limits=ServiceLimits(max_upload_bytes=LIMIT)
    )
    await ctx.open()  # the manager is started already: this opens the key store
    key, _ = ctx.key_store.create("uploads")
    transport = httpx.ASGITransport(app=create_app(ctx))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://service", headers={"X-API-Key": key}, timeout=120
        ) as http:
            sbx = await sbm.create("base")
            await sbx.files.write("kept.txt", b"original\n")
            url = f"/v1/sandboxes/{sbx.id}/files/content"
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                nonlocal sent
                for _ in range(8):  # 2 MiB in 256 KiB chunks, no Content-Length
                    sent += 256 << 10
                    yield b"x" * (256 << 10)
                    await asyncio.sleep(0)

            res = await http.put(url, params={"path": "kept.txt"}, content=body())
            assert (res.status_code, res.json()["code"]) == (413, "REQUEST_TOO_LARGE"), res.text
            assert sent <= LIMIT + (256 << 10)  # cut off as it passed the limit, not read to the end
            declared = await http.put(
                url, params={"path": "kept.txt"}, content=b"y" * (LIMIT + 1)
            )  # a declared length over the limit is refused before the body is read
            assert (declared.status_code, declared.json()["code"]) == (413, "REQUEST_TOO_LARGE")

            for _ in range(50):  # the guest drops the part file when the write is cancelled
                left = await sbx.commands.run(["find", "/home/user", "-name", "*.smartvm-part"])
                if not left.stdout:
                    break
                await asyncio.sleep(0.2)
            assert left.stdout == ""
            assert await sbx.files.read("kept.txt") == b"original\n"
            ok = await http.put(url, params={"path": "kept.txt"}, content=b"z" * LIMIT)
            assert (ok.status_code, ok.json()["size"]) == (201, LIMIT)  # at the limit: written
            metrics = (await http.get("/metrics")).text
            assert 'smartvm_errors_total{code="REQUEST_TOO_LARGE"} 2.0' in metrics
            assert 'smartvm_streams_open{kind="upload"} 0.0' in metrics
    finally:
        assert ctx.keys is not None
        ctx.keys.close()  # the sbm fixture closes the manager
