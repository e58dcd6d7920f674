"""Run the benchmarks and print one table each: ``python -m bench [--quick] [--only NAME ...]``.

Each benchmark module has ``run(quick) -> list[BenchTable]`` (sync or async). A benchmark whose
feature is not available on this machine prints why and is skipped; none is a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from bench.common import BenchSkipped

BENCHMARKS = [
    "cli_startup",
    "control_plane",
    "connect_framing",
    "staging",
    "network_slots",
    "boot",
    "restore",
    "exec_roundtrip",
    "agent_alternatives",
    "e2b_envd",
    "e2b_rest",
    "memory",
    "sandboxes",
    "service_load",
]


def _machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cores = len(os.sched_getaffinity(0))
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"{cpu}, {cores} cores, {mem} GiB; kernel {platform.release()}; "
        f"python {platform.python_version()}; commit {commit}; {now}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations, small inputs (what CI runs)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    # SIGTERM (a cancelled CI job) unwinds like Ctrl-C, so every benchmark's cleanup runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console(width=160)
    console.print(f"[bold]smartvm benchmarks[/] ({'quick' if args.quick else 'full'}): {_machine()}")
    failed = 0
    for name in args.only or BENCHMARKS:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                console.print(f"[yellow]{name}: not written yet, skipped[/]")
                continue
            raise
        t0 = time.perf_counter()
        try:
            result = module.run(args.quick)
            tables = asyncio.run(result) if inspect.iscoroutine(result) else result
        except KeyboardInterrupt:
            console.print(f"[red]{name}: interrupted (its VMs, processes and files were cleaned up)[/]")
            return 130
        except BenchSkipped as exc:
            console.print(f"[yellow]{name}: skipped: {exc}[/]\n")
            continue
        except Exception as exc:  # report and go on: one broken benchmark must not hide the rest
            failed += 1
            console.print(f"[red]{name}: failed: {type(exc).__name__}: {exc}[/]")
            continue
        for table in tables:
            table.render(console)
        console.print(f"  [dim]{name} took {time.perf_counter() - t0:.1f}s[/]\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
