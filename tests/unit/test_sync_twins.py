"""The blocking twins in ``smartvm.sync`` match their async originals name for name and type for type."""

from __future__ import annotations

import pytest

from smartvm import sync
from smartvm.agent.client import Files, Processes
from smartvm.orchestrator import SmartVM
from smartvm.vm import MicroVM
from twin_support import twin_mismatches

PAIRS = [
    (SmartVM, sync.SmartVM, {}),
    (
        MicroVM,
        sync.MicroVM,
        {"agent": "the async AgentClient itself; sync code uses files, processes and exec"},
    ),
    (Files, sync.Files, {"write_stream": "takes an async iterable; sync code uses write or upload"}),
    (Processes, sync.Processes, {}),
]


@pytest.mark.parametrize(("async_cls", "sync_cls", "exempt"), PAIRS, ids=lambda x: getattr(x, "__name__", ""))
def test_sync_twin_is_complete_and_typed(async_cls: type, sync_cls: type, exempt: dict[str, str]) -> None:
    assert twin_mismatches(async_cls, sync_cls, exempt=exempt) == []


def test_the_comparison_catches_drift() -> None:
    """The helper itself: a missing member, another default and an async twin are each reported."""

    class Async:
        async def run(self, x: int = 1) -> str:
            return ""

        async def gone(self) -> None: ...

        @property
        def size(self) -> int:
            return 0

    class Twin:
        async def run(self, x: int = 2) -> str:
            return ""

        def size(self) -> int:
            return 0

    problems = twin_mismatches(Async, Twin)
    assert any("Twin.gone is missing" in p for p in problems)
    assert any("Twin.run parameters" in p for p in problems)
    assert any("Twin.run is async" in p for p in problems)
    assert any("Twin.size must be a property" in p for p in problems)


def test_guest_config_has_a_blocking_twin() -> None:
    import inspect

    from smartvm.guests import guest_config

    assert inspect.iscoroutinefunction(guest_config)
    assert not inspect.iscoroutinefunction(sync.guest_config)
    assert inspect.signature(guest_config).parameters == inspect.signature(sync.guest_config).parameters
