"""Benchmark: start-up of the ``smartvm`` command and of its imports, as separate processes.

``smartvm --version`` (the installed entry point), ``python -m smartvm.cli --version``, ``import
smartvm.cli.main``, building the typer app for ``run`` (what ``smartvm run`` imports before it
boots anything) and for every command (help), next to a bare ``python -c pass`` that sets the floor.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import BenchTable, compile_smartvm, time_sync

PYTHON = sys.executable
BARE = "python -c pass"


def _cases() -> list[tuple[str, list[str]]]:
    entry = shutil.which("smartvm", path=str(Path(PYTHON).parent))
    cases = [
        (BARE, [PYTHON, "-c", "pass"]),
        ("python -m smartvm.cli --version", [PYTHON, "-m", "smartvm.cli", "--version"]),
        ('python -c "import smartvm.cli.main"', [PYTHON, "-c", "import smartvm.cli.main"]),
        (
            "the app for `smartvm run`",
            [PYTHON, "-c", "from smartvm.cli.main import build_app; build_app('run')"],
        ),
        ("the app with every command", [PYTHON, "-c", "from smartvm.cli.main import build_app; build_app()"]),
    ]
    if entry is not None:
        cases.insert(1, ("smartvm --version", [entry, "--version"]))
    return cases


def run(quick: bool) -> list[BenchTable]:
    n = 5 if quick else 30
    compile_smartvm()
    series = [
        time_sync(label, lambda argv=argv: subprocess.run(argv, check=True, capture_output=True), n)
        for label, argv in _cases()
    ]
    return [
        BenchTable(
            "CLI start-up: wall time of a fresh process",
            series,
            baseline=BARE,
            notes=["each a new interpreter (bytecode cached); the ratio is against an empty python"],
        )
    ]
