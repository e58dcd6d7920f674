"""Server-stream plumbing shared by Process and Filesystem: keepalive ticks, deadlines, the user.

envd sends a keepalive event when a stream has been quiet for ``Keepalive-Ping-Interval`` seconds
(so proxies and clients do not drop a long, silent command), and ends a stream at its
``Connect-Timeout-Ms`` deadline with ``deadline_exceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from smartvm.service.e2b import binding as b

T = TypeVar("T")

KEEPALIVE_HEADER = "keepalive-ping-interval"
DEFAULT_KEEPALIVE = 50.0  # seconds; the SDK asks for 50
MIN_KEEPALIVE = 0.05


def keepalive_interval(ctx: RequestContext[Any, Any]) -> float:
    raw = ctx.request_headers.get(KEEPALIVE_HEADER)
    try:
        return max(MIN_KEEPALIVE, float(raw)) if raw else DEFAULT_KEEPALIVE
    except ValueError:
        raise ConnectError(Code.INVALID_ARGUMENT, f"{KEEPALIVE_HEADER} {raw!r} is not a number") from None


def deadline_of(ctx: RequestContext[Any, Any]) -> float | None:
    """The request's Connect-Timeout-Ms as a time.monotonic() deadline."""
    remaining = ctx.timeout_ms
    return None if remaining is None else time.monotonic() + remaining / 1000


def timeout_s(ctx: RequestContext[Any, Any]) -> float | None:
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining / 1000, 0.001)


def user_of(ctx: RequestContext[Any, Any]) -> str | None:
    return b.request_user(ctx.request_headers, b.current())


async def with_keepalive(
    source: AsyncGenerator[T, None], interval: float, deadline: float | None
) -> AsyncIterator[T | None]:
    """Items of `source`, with None after every `interval` seconds without one; DEADLINE_EXCEEDED at
    `deadline`, CANCELED as soon as the client goes away (even while nothing is sent). `source` runs
    in its own task (a timed-out wait must not cancel it mid-step) and is closed when this generator
    ends, however it ends. Per stream that is one task: items already queued are taken without a
    wait, a wait arms one timer, and the client's going away is a callback."""
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=16)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((True, item))
            await queue.put((False, None))
        except Exception as exc:  # delivered to the reader, raised there
            await queue.put((False, exc))
        finally:
            await source.aclose()

    def client_gone() -> None:
        task.cancel()
        while queue.full():  # the reader is not running now: make room for the last word
            queue.get_nowait()
        queue.put_nowait((False, ConnectError(Code.CANCELED, "the client went away")))

    task = asyncio.create_task(pump())
    unsubscribe = b.current_request().gone.subscribe(client_gone)
    try:
        while True:
            wait = interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "the request's Connect-Timeout-Ms passed")
            if queue.empty():
                try:
                    async with asyncio.timeout(wait):
                        more, item = await queue.get()
                except TimeoutError:
                    if deadline is None or time.monotonic() < deadline:
                        yield None
                    continue
            else:
                more, item = queue.get_nowait()
            if not more:
                if isinstance(item, BaseException):
                    raise item
                return
            yield item
    finally:
        unsubscribe()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
