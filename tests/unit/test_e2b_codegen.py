"""The committed E2B envd code (smartvm/service/e2b/gen/) is what scripts/gen-e2b-proto makes from the
committed .proto files, and those are verbatim copies of the specs in ../shared/e2b/."""

from __future__ import annotations

import filecmp
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "smartvm" / "service" / "e2b"
SPEC_DIR = Path(os.environ.get("SMARTVM_E2B_SPEC_DIR", "/work/shared/e2b"))
if not SPEC_DIR.is_dir():
    SPEC_DIR = ROOT.parent / "shared" / "e2b"


@pytest.mark.parametrize("name", ["process", "filesystem"])
def test_proto_files_are_the_shared_specs(name: str) -> None:
    spec = SPEC_DIR / f"{name}.proto"
    if not spec.exists():
        pytest.skip(f"the E2B specs are not at {SPEC_DIR} (set SMARTVM_E2B_SPEC_DIR)")
    assert (PKG / "proto" / name / f"{name}.proto").read_bytes() == spec.read_bytes()


def test_generated_code_is_current(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-e2b-proto"), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    committed = PKG / "gen"
    fresh = sorted(p.relative_to(out) for p in out.rglob("*.py"))
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*.py"))
    stale = [str(rel) for rel in fresh if not filecmp.cmp(out / rel, committed / rel, shallow=False)]
    assert stale == [], f"run scripts/gen-e2b-proto: {stale} differ from what it generates"
