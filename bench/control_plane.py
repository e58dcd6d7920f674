"""Benchmark 1: control-plane overhead of our Firecracker API client.

Our async :class:`~smartvm.firecracker.api.FirecrackerAPI` (h11 on an asyncio Unix stream) against the
PyPI package ``firecracker-python`` (its ``Api(socket_file)`` client: requests + requests-unixsocket),
both against the same spec-validating fake Firecracker in its own process on a Unix socket. Single calls
(PUT /machine-config, GET /) and the full configure + InstanceStart sequence (a fresh fake per sequence,
started outside the timing; ours pipelines the configuration like the engine does, theirs sends one call
after the other). After each sequence the fake's request log is checked: every request validated (2xx),
and both clients sent the same methods, paths and bodies.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BenchTable, Series, time_async, time_sync
from bench.fc_fake_process import FakeFirecrackerProcess
from smartvm.firecracker.api import FirecrackerAPI

OURS = "smartvm FirecrackerAPI (h11, async)"
THEIRS = "firecracker-python Api (requests)"


def _load_firecracker_python() -> Any:
    """``firecracker.api`` without the package ``__init__``, which imports docker and paramiko, probes
    /usr/local/bin/firecracker and may create /var/lib/firecracker: none of that is the API client."""
    if "firecracker.api" in sys.modules:
        return sys.modules["firecracker.api"]
    spec = importlib.util.find_spec("firecracker")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = types.ModuleType("firecracker")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("firecracker", package)
    return importlib.import_module("firecracker.api")


Step = tuple[str, dict[str, Any]]


def _sequence_bodies(workdir: Path) -> list[Step]:
    """(resource, body) of the configure + InstanceStart sequence that boots one VM."""
    kernel, rootfs = workdir / "vmlinux", workdir / "rootfs.ext4"
    for f in (kernel, rootfs):
        f.touch()
    return [
        ("boot", {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 reboot=k panic=1"}),
        ("machine_config", {"vcpu_count": 2, "mem_size_mib": 256}),
        (
            "drives",
            {
                "drive_id": "rootfs",
                "path_on_host": str(rootfs),
                "is_root_device": True,
                "is_read_only": False,
            },
        ),
        (
            "network_interfaces",
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"},
        ),
        ("vsock", {"guest_cid": 3, "uds_path": str(workdir / "v.sock")}),
        ("actions", {"action_type": "InstanceStart"}),
    ]


# firecracker-python names some resources differently.
_THEIR_NAMES = {"drives": "drive", "network_interfaces": "network"}


def _check(fake: FakeFirecrackerProcess, who: str, expected: int) -> list[tuple[str, str, Any]]:
    log = fake.requests()
    bad = [r for r in log if r["status"] >= 300]
    if bad or len(log) != expected:
        raise RuntimeError(
            f"{who}: the fake answered {len(log)} requests (expected {expected}); rejected: {bad[:3]}"
        )
    return [(r["method"], r["path"], r["body"]) for r in log]


async def _ours_sequence(socket_path: Path, steps: list[Step]) -> tuple[float, float]:
    """(client construction, request sequence) in seconds; closing the client is not timed."""
    t0 = time.perf_counter()
    api = FirecrackerAPI(socket_path)
    t1 = time.perf_counter()
    try:
        # What the engine does: the configuration pipelined in one round trip, then InstanceStart.
        *configure, (start, start_body) = steps
        await api.send_all([getattr(api, resource).put_call(**body) for resource, body in configure])
        await getattr(api, start).put(**start_body)
        return t1 - t0, time.perf_counter() - t1
    finally:
        await api.close()


def _their_sequence(fc_api: Any, socket_path: Path, steps: list[Step]) -> tuple[float, float]:
    t0 = time.perf_counter()
    api = fc_api.Api(str(socket_path))
    t1 = time.perf_counter()
    try:
        for resource, body in steps:
            getattr(api, _THEIR_NAMES.get(resource, resource)).put(**body)
        return t1 - t0, time.perf_counter() - t1
    finally:
        api.close()


def run_sequences(n: int, workdir: Path, fc_api: Any) -> list[BenchTable]:
    """Two tables: the request sequence alone, and client construction + sequence (what one VM pays)."""
    steps = _sequence_bodies(workdir)
    clients: list[tuple[str, Callable[[Path], tuple[float, float]]]] = [
        (OURS, lambda sock: asyncio.run(_ours_sequence(sock, steps))),
    ]
    if fc_api is not None:
        clients.insert(0, (THEIRS, lambda sock: _their_sequence(fc_api, sock, steps)))
    seq_only: list[Series] = []
    per_vm: list[Series] = []
    sent: dict[str, list[tuple[str, str, Any]]] = {}
    fake = FakeFirecrackerProcess(workdir)
    try:
        for label, sequence in clients:
            requests_only, with_client = Series(label), Series(label)
            for _ in range(n):
                fake.start()
                construct, requests = sequence(fake.socket_path)
                sent[label] = _check(fake, label, len(steps))
                fake.stop()
                requests_only.samples.append(requests)
                with_client.samples.append(construct + requests)
            seq_only.append(requests_only)
            per_vm.append(with_client)
    finally:
        fake.stop()
    notes = ["a fresh fake Firecracker process per sequence, started outside the timing"]
    if fc_api is not None:
        same = sent[OURS] == sent[THEIRS]
        notes.append(
            "both clients' requests validated against the spec (all 2xx) and were "
            + ("identical (method, path, body)" if same else f"DIFFERENT: {sent}")
        )
    else:
        notes.append("firecracker-python is not installed (pip install -e '.[dev]'): no comparison")
    baseline = THEIRS if fc_api is not None else None
    what = "boot-source, machine-config, drive, network-interface, vsock, InstanceStart"
    return [
        BenchTable(
            f"Control plane: {what} (client made before timing; includes connecting)",
            seq_only,
            baseline=baseline,
            notes=notes,
        ),
        BenchTable(
            "Control plane per VM: construct the client + the same sequence",
            per_vm,
            baseline=baseline,
            notes=["ours: configuration pipelined on one connection, then InstanceStart"],
        ),
    ]


def run_single_calls(n: int, workdir: Path, fc_api: Any) -> list[BenchTable]:
    """PUT /machine-config and GET /, ``n`` times each on one kept-alive connection per client."""
    body = {"vcpu_count": 2, "mem_size_mib": 256}
    puts: list[Series] = []
    gets: list[Series] = []
    with FakeFirecrackerProcess(workdir) as fake:
        if fc_api is not None:
            api = fc_api.Api(str(fake.socket_path))
            try:
                api.version.get()  # connect outside the timing
                puts.append(time_sync(THEIRS, lambda: api.machine_config.put(**body), n))
                gets.append(time_sync(THEIRS, api.describe.get, n))
            finally:
                api.close()

        async def ours() -> None:
            async with FirecrackerAPI(fake.socket_path) as api:
                await api.version.get()
                puts.append(await time_async(OURS, lambda: api.machine_config.put(**body), n))
                gets.append(await time_async(OURS, api.describe_instance.get, n))

        asyncio.run(ours())
        _check(fake, "single calls", (2 * n + 1) * len(puts))
    baseline = THEIRS if fc_api is not None else None
    note = "fake Firecracker (tests/unit/fc_fake, validates every request) in its own process, Unix socket"
    return [
        BenchTable(
            f"Control plane: one {what} on a kept-alive connection", series, baseline=baseline, notes=[note]
        )
        for what, series in (("PUT /machine-config", puts), ("GET /", gets))
    ]


def run(quick: bool) -> list[BenchTable]:
    fc_api = _load_firecracker_python()
    workdir = Path(tempfile.mkdtemp(prefix="svb-", dir="/tmp"))  # short: Unix socket paths < 108 bytes
    try:
        return run_single_calls(50 if quick else 1000, workdir, fc_api) + run_sequences(
            5 if quick else 30, workdir, fc_api
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
