"""Copy-on-write root disks for sandboxes: one interface, four strategies, the best one chosen.

Best first: ``dm-snapshot`` (block-level, needs device-mapper), ``reflink`` (btrfs/xfs),
``qcow2`` (QEMU engine only), ``sparse-copy`` (always works, copies the base's data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smartvm.sandbox.cow.base import Availability, CowDisk, CowLayer, CowStrategy, StrategyName
from smartvm.sandbox.cow.dm import DmSnapshotStrategy
from smartvm.sandbox.cow.files import FileCopyStrategy
from smartvm.sandbox.cow.loopdev import LoopRegistry
from smartvm.sandbox.cow.qcow2 import Qcow2Strategy

__all__ = [
    "Availability",
    "CowDisk",
    "CowLayer",
    "CowReport",
    "CowStrategy",
    "LoopRegistry",
    "choose_strategy",
    "report",
    "strategies",
    "strategy_named",
]


def strategies(engine: str, directory: Path, registry: LoopRegistry | None = None) -> list[CowStrategy]:
    """Every strategy for ``engine`` with layers in ``directory``, best first."""
    reg = registry or LoopRegistry(directory / "loops", owned_roots=[directory])
    return [
        DmSnapshotStrategy(reg),
        FileCopyStrategy("reflink", directory),
        Qcow2Strategy(engine),
        FileCopyStrategy("sparse-copy", directory),
    ]


@dataclass(frozen=True)
class CowReport:
    chosen: StrategyName
    skipped: tuple[tuple[StrategyName, str], ...]  # better strategies and why they are unavailable

    def line(self) -> str:
        why = "; ".join(f"{name}: {reason}" for name, reason in self.skipped)
        return f"{self.chosen}" + (f" ({why})" if why else "")


def report(engine: str, directory: Path, registry: LoopRegistry | None = None) -> CowReport:
    skipped: list[tuple[StrategyName, str]] = []
    for strategy in strategies(engine, directory, registry):
        status = strategy.available()
        if status:
            return CowReport(strategy.name, tuple(skipped))
        skipped.append((strategy.name, status.reason))
    raise AssertionError("sparse-copy is always available")  # pragma: no cover


def choose_strategy(
    engine: str, directory: Path, registry: LoopRegistry | None = None, *, files_only: bool = False
) -> CowStrategy:
    """The best strategy available for ``engine`` with layers in ``directory``. ``files_only``: only
    strategies whose layer is nothing but files (no loop or device-mapper devices), so that removing
    its directory removes the layer, also when the process that made it was killed."""
    for strategy in strategies(engine, directory, registry):
        if files_only and strategy.holds_host_devices:
            continue
        if strategy.available():
            return strategy
    raise AssertionError("sparse-copy is always available")  # pragma: no cover


def strategy_named(
    name: StrategyName, engine: str, directory: Path, registry: LoopRegistry | None = None
) -> CowStrategy:
    """The strategy a stored :class:`CowLayer` names, to ``reopen`` it."""
    for strategy in strategies(engine, directory, registry):
        if strategy.name == name:
            return strategy
    raise KeyError(name)
