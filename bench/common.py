"""Shared benchmark plumbing: timing samples, and tables of median, p95 and ratio."""

from __future__ import annotations

import compileall
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table


def compile_smartvm() -> None:
    """Write the bytecode of smartvm's modules, as installing a package does, before timing new
    ``smartvm`` processes: an editable checkout run with ``PYTHONDONTWRITEBYTECODE`` set would
    otherwise compile every module in every process (about 0.1 s of a warm ``smartvm run``)."""
    import smartvm

    compileall.compile_dir(Path(smartvm.__file__).parent, quiet=1)


class BenchSkipped(Exception):
    """Raised by a benchmark whose feature is not available here; the runner prints the reason."""


@dataclass
class Series:
    """Samples (seconds, or bytes with ``unit="MiB"``) of one measured thing; ``extra`` holds more
    columns (bytes, RSS...)."""

    label: str
    samples: list[float] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class BenchTable:
    """One printed table. ``baseline`` names the series the ratio column compares against."""

    title: str
    series: list[Series]
    baseline: str | None = None
    unit: str = "ms"
    notes: list[str] = field(default_factory=list)

    def ratio(self, s: Series) -> str:
        if self.baseline is None:
            return ""
        base = next(b for b in self.series if b.label == self.baseline)
        if s is base:
            return "1.00x"
        return f"{s.median / base.median:.2f}x" if base.median else "n/a"

    def render(self, console: Console) -> None:
        scale = {"ms": 1e3, "us": 1e6, "s": 1.0, "MiB": 1 / (1 << 20)}[self.unit]
        table = Table(title=self.title, title_justify="left")
        table.add_column("what")
        table.add_column("n", justify="right")
        table.add_column(f"median ({self.unit})", justify="right")
        table.add_column(f"p95 ({self.unit})", justify="right")
        if self.baseline:
            table.add_column(f"vs {self.baseline}", justify="right")
        extra_cols = sorted({k for s in self.series for k in s.extra})
        for col in extra_cols:
            table.add_column(col, justify="right")
        for s in self.series:
            row = [s.label, str(len(s.samples)), f"{s.median * scale:.2f}", f"{s.p95 * scale:.2f}"]
            if self.baseline:
                row.append(self.ratio(s))
            row += [s.extra.get(c, "") for c in extra_cols]
            table.add_row(*row)
        console.print(table)
        for note in self.notes:
            console.print(f"  [dim]{note}[/]")


def time_sync(
    label: str, fn: Callable[[], object], n: int, setup: Callable[[], object] | None = None
) -> Series:
    series = Series(label)
    for _ in range(n):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        series.samples.append(time.perf_counter() - t0)
    return series


async def time_async(
    label: str,
    fn: Callable[[], Awaitable[object]],
    n: int,
    setup: Callable[[], Awaitable[object]] | None = None,
) -> Series:
    series = Series(label)
    for _ in range(n):
        if setup is not None:
            await setup()
        t0 = time.perf_counter()
        await fn()
        series.samples.append(time.perf_counter() - t0)
    return series
