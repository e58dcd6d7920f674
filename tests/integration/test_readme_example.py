"""The library example of the README runs as written (only its directories moved into the test's own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guest_support import assert_nothing_left

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def library_example() -> str:
    text = README.read_text()
    section = text[text.index("## The library") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's library section has no python example"
    return match.group(1)


def test_the_example_imports_nothing_from_the_cli() -> None:
    assert "smartvm.cli" not in library_example()


def test_the_readme_library_example_runs(guest_image: Any, runtime_root: Path, tmp_path: Path) -> None:
    code = library_example()
    options = f'SmartVMOptions(engine="auto", runtime_dir={str(runtime_root)!r}, data_dir={str(tmp_path)!r})'
    for old, new in (('SmartVMOptions(engine="auto")', options), ('"/tmp/snap', f'"{tmp_path}/snap')):
        assert old in code, f"the README example changed: update this test ({old!r} not found)"
        code = code.replace(old, new)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "hi"  # the clone has the file written before the snapshot
    assert re.match(r"\d+\.\d+", lines[0])  # uname -r
    assert_nothing_left(runtime_root)
