"""Firecracker's metrics file: one JSON object per line, appended at every flush (and each minute).

A reader may see the last line half-written; it is skipped, never an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """Every complete metrics object in ``text``, oldest first."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(value, dict):
            out.append(value)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The metrics objects in the file at ``path`` ([] when it does not exist yet)."""
    try:
        return parse_metrics(Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return []


def latest_metrics(path: str | Path) -> dict[str, Any] | None:
    """The most recent flush, or None."""
    entries = read_metrics(path)
    return entries[-1] if entries else None
