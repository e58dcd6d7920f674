"""The Connect layer of the E2B envd face: connectrpc + protobuf-py against hand-written framing.

Both sides are ASGI apps called in-process (no sockets, no guest) with the same trivial handlers, so
the table shows only what the protocol layer costs per call: a unary ``SendInput`` (Connect JSON) and
a ``Start`` server stream of stdout events (``application/connect+json`` envelopes, base64 bytes).
The hand-written side is the minimum a server needs (json + struct), not a complete implementation:
no codec negotiation, compression, interceptors or error details.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from bench.common import BenchTable, Series

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CHUNK = b"x" * 4096


def _connectrpc_app(events: int) -> App:
    from protobuf import Oneof

    from smartvm.service.e2b.gen.process import process_pb as pb
    from smartvm.service.e2b.gen.process.process_connect import Process, ProcessASGIApplication

    class Handler(Process):
        async def send_input(self, request: pb.SendInputRequest, ctx: Any) -> pb.SendInputResponse:
            return pb.SendInputResponse()

        async def start(self, request: pb.StartRequest, ctx: Any) -> AsyncIterator[pb.StartResponse]:
            yield pb.StartResponse(
                event=pb.ProcessEvent(event=Oneof("start", pb.ProcessEvent.StartEvent(pid=1)))
            )
            for _ in range(events):
                data = pb.ProcessEvent.DataEvent(output=Oneof("stdout", CHUNK))
                yield pb.StartResponse(event=pb.ProcessEvent(event=Oneof("data", data)))

    app: App = ProcessASGIApplication(Handler())
    return app


def _envelope(flags: int, body: bytes) -> bytes:
    return struct.pack(">BI", flags, len(body)) + body


def _minimal_app(events: int) -> App:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["path"].endswith("/SendInput"):
            json.loads(body)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b"{}"})
            return
        json.loads(body[5:])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/connect+json")],
            }
        )
        start = json.dumps({"event": {"start": {"pid": 1}}}).encode()
        await send({"type": "http.response.body", "body": _envelope(0, start), "more_body": True})
        for _ in range(events):
            out = base64.b64encode(CHUNK).decode()
            msg_body = json.dumps({"event": {"data": {"stdout": out}}}).encode()
            await send({"type": "http.response.body", "body": _envelope(0, msg_body), "more_body": True})
        await send({"type": "http.response.body", "body": _envelope(2, b"{}"), "more_body": False})

    return app


async def _call(app: App, path: str, content_type: bytes, body: bytes) -> int:
    """One request through the ASGI app; returns the response bytes."""
    sent = False
    size = 0

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: MutableMapping[str, Any]) -> None:
        nonlocal size
        size += len(msg.get("body", b""))

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", content_type)],
        "client": ("127.0.0.1", 1),
    }
    await app(scope, receive, send)
    return size


async def run(quick: bool) -> list[BenchTable]:
    rounds = 200 if quick else 2000
    events = 16
    unary_input = {"process": {"pid": 7}, "input": {"stdin": base64.b64encode(b"hi\n").decode()}}
    unary_body = json.dumps(unary_input).encode()
    start_body = _envelope(0, json.dumps({"process": {"cmd": "/bin/true"}}).encode())
    tables = []
    for title, path, ctype, body in (
        (
            "unary SendInput (Connect JSON)",
            "/process.Process/SendInput",
            b"application/json",
            unary_body,
        ),
        (
            f"server stream Start: start + {events} x 4 KiB stdout events",
            "/process.Process/Start",
            b"application/connect+json",
            start_body,
        ),
    ):
        series = []
        for label, app in (
            ("connectrpc + protobuf-py", _connectrpc_app(events)),
            ("hand-written", _minimal_app(events)),
        ):
            s = Series(label)
            for _ in range(20):
                await _call(app, path, ctype, body)
            for _ in range(rounds):
                t0 = time.perf_counter()
                await _call(app, path, ctype, body)
                s.samples.append(time.perf_counter() - t0)
            series.append(s)
        tables.append(BenchTable(f"Connect layer, {title}", series, baseline="hand-written", unit="us"))
    return tables
