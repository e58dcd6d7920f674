"""Prometheus metrics of one service: sandboxes by state, operation latency, errors by code, capacity,
and the streams (exec sockets, uploads, downloads) in progress.

Each service has its own registry (not prometheus_client's global one), so two apps in one process
(tests) never share or clash on series. Sandbox counts and capacity are read from the backend when
``/metrics`` is scraped; latencies, errors and streams are recorded as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from smartvm.sandbox.store import SandboxState

if TYPE_CHECKING:
    from smartvm.sandbox.manager import Capacity

CONTENT_TYPE = CONTENT_TYPE_LATEST
OPERATIONS = ("create", "pause", "resume", "kill", "snapshot", "exec")
STREAMS = ("exec", "upload", "download")
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
        self.streams = Gauge(
            "smartvm_streams_open",
            "Exec sockets, uploads and downloads in progress (a gone client's stream ends at once)",
            ["kind"],
            registry=self.registry,
        )

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"smartvm_{name}", doc, registry=self.registry)

        self.sandboxes_left = gauge("capacity_sandboxes_left", "Sandboxes the service takes before its limit")
        self.memory_left = gauge(
            "capacity_memory_mib_left",
            "Guest memory (MiB) a create may still use: under the limit and what the host has available",
        )
        self.sandboxes_max = gauge("capacity_sandboxes_max", "The limit of live sandboxes (--max-sandboxes)")
        self.memory_used = gauge("capacity_memory_used_mib", "Guest memory of the active sandboxes, MiB")
        self.memory_limit = gauge("capacity_memory_limit_mib", "The limit of guest memory, MiB")
        self.host_available = gauge("host_memory_available_mib", "The host's available memory, MiB")
        self.warm = gauge("sandboxes_warm", "Sandboxes restored ahead of time for fast creates")
        for op in OPERATIONS:
            self.latency.labels(op)
        for kind in STREAMS:
            self.streams.labels(kind)
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

    @contextmanager
    def stream(self, kind: str) -> Iterator[None]:
        """Count the block as a stream of ``kind`` in progress until it ends, however it ends."""
        with self.streams.labels(kind).track_inprogress():
            yield

    def render(self, by_state: Mapping[str, int], capacity: Capacity) -> bytes:
        for state in SandboxState:
            self.sandboxes.labels(state.value).set(by_state.get(state.value, 0))
        c = capacity
        self.sandboxes_left.set(max(0, c.max_sandboxes - c.active))
        self.memory_left.set(max(0, min(c.memory_limit_mib - c.memory_used_mib, c.host_available_mib)))
        self.sandboxes_max.set(c.max_sandboxes)
        self.memory_used.set(c.memory_used_mib)
        self.memory_limit.set(c.memory_limit_mib)
        self.host_available.set(c.host_available_mib)
        self.warm.set(c.warm)
        return generate_latest(self.registry)
