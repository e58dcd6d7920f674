"""Query parsing and cursor paging of the E2B list routes (``GET /v2/sandboxes``, ``GET /snapshots``).

A page is cut from the whole list sorted by (start time, id); the ``x-next-token`` header holds
the position of the page's last item, so the next page starts right after it even when items
were added or removed in between (no item is shown twice, none that stayed is skipped).
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.sandbox.store import SandboxState

T = TypeVar("T")
Key = tuple[float, str]
MAX_LIMIT = 100  # E2B's paginationLimit: 1..100, default 100
NEXT_TOKEN_HEADER = "x-next-token"
_BY_E2B_STATE = {
    "running": (SandboxState.STARTING, SandboxState.RUNNING, SandboxState.RESUMING),
    "paused": (SandboxState.PAUSING, SandboxState.PAUSED),
}


def metadata_filter(query: str | None) -> dict[str, str]:
    """E2B's ``metadata`` query value (``k1=v1&k2=v2``, keys and values URL-encoded once more)."""
    if not query:
        return {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"metadata filter {query[:80]!r}: write it as key=value pairs joined by '&' (URL-encoded)",
        ) from None
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def state_filter(values: Sequence[str] | None) -> list[SandboxState]:
    """smartvm's states for E2B's ``state`` values (comma-separated or repeated); default: both."""
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()] or list(_BY_E2B_STATE)
    unknown = sorted(set(names) - set(_BY_E2B_STATE))
    if unknown:
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"state {', '.join(unknown)}: use running and/or paused"
        )
    return [s for name in dict.fromkeys(names) for s in _BY_E2B_STATE[name]]


def encode_token(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_token(token: str) -> Key:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        at, ident = raw
        if isinstance(at, int | float) and isinstance(ident, str):
            return float(at), ident
    except (ValueError, binascii.Error, TypeError):
        pass
    raise SmartVMError(
        ErrorCode.INVALID_ARGUMENT,
        "nextToken is not a token this service gave out: pass the x-next-token header of the last page",
    )


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str | None


def page(
    items: Sequence[T],
    key: Callable[[T], Key],
    *,
    limit: int = MAX_LIMIT,
    next_token: str | None = None,
    descending: bool = False,
) -> Page[T]:
    """The page of ``items`` after ``next_token``, at most ``limit`` long, in ``key`` order."""
    ordered = sorted(items, key=key, reverse=descending)
    if next_token:
        cursor = decode_token(next_token)
        ordered = [i for i in ordered if (key(i) < cursor if descending else key(i) > cursor)]
    shown = ordered[:limit]
    more = len(ordered) > limit
    return Page(shown, encode_token(key(shown[-1])) if more and shown else None)
