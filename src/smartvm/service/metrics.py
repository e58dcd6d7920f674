"""Prometheus metrics of one service: sandboxes by state, operation latency, errors by code, capacity.

Each service has its own registry (not prometheus_client's global one), so two apps in one process
(tests) never share or clash on series. Sandbox counts and capacity are read from the backend when
``/metrics`` is scraped; latencies and errors are recorded as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from smartvm.sandbox.store import SandboxState

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPERATIONS = ("create", "pause", "resume", "kill", "snapshot", "exec")
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sandboxes = Gauge("smartvm_sandboxes", "Sandboxes by state", ["state"], registry=self.registry)
        self.latency = Histogram(
            "smartvm_operation_seconds",
            "Duration of successful sandbox operations",
            ["operation"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "smartvm_errors", "Error answers by error code", ["code"], registry=self.registry
        )
        self.sandboxes_left = Gauge(
            "smartvm_capacity_sandboxes_left",
            "Sandboxes the host takes before the limit (-1: no limit)",
            registry=self.registry,
        )
        self.memory_left = Gauge(
            "smartvm_capacity_memory_mib_left",
            "Guest memory the host takes before the limit, MiB (-1: no limit)",
            registry=self.registry,
        )
        for op in OPERATIONS:
            self.latency.labels(op)
        for state in SandboxState:
            self.sandboxes.labels(state.value).set(0)

    def count_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Observe the duration of the block when it succeeds."""
        t0 = time.perf_counter()
        yield
        self.latency.labels(operation).observe(time.perf_counter() - t0)

    def render(
        self, by_state: Mapping[str, int], sandboxes_left: int | None, memory_mib_left: int | None
    ) -> bytes:
        for state in SandboxState:
            self.sandboxes.labels(state.value).set(by_state.get(state.value, 0))
        self.sandboxes_left.set(-1 if sandboxes_left is None else sandboxes_left)
        self.memory_left.set(-1 if memory_mib_left is None else memory_mib_left)
        return generate_latest(self.registry)
