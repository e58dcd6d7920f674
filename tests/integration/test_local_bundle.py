"""Locally built guests enter the base image cache as bundles, like downloaded ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smartvm.images.base_images import BaseImageManager
from smartvm.images.guest_image import register_guest_bundle

pytestmark = pytest.mark.integration


def test_built_guest_registers_as_local_bundle(guest_image: Any, tmp_path: Path) -> None:
    bundle = register_guest_bundle(guest_image, kind="busybox", bundle_cache_dir=tmp_path)
    assert bundle.source == "local" and bundle.bundle_id.startswith("local-busybox-ext4-")
    assert bundle.rootfs_path.read_bytes()[1080:1082] == b"\x53\xef"  # ext4 superblock magic
    manifest = json.loads((bundle.directory / "manifest.json").read_text())
    assert manifest["schemaVersion"] == 1 and manifest["rootfsType"] == "ext4"
    listed = BaseImageManager(tmp_path, 2).list_cached_bundles()
    assert [b.bundle_id for b in listed] == [bundle.bundle_id]
    again = register_guest_bundle(guest_image, kind="busybox", bundle_cache_dir=tmp_path)
    assert again.bundle_id == bundle.bundle_id and again.directory == bundle.directory


def test_images_build_prints_bundle_dir(guest_image: Any, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "images", "build", "--bundle-cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    bundle_dir = Path(res.stdout.strip().splitlines()[-1])
    assert bundle_dir.parent == tmp_path and (bundle_dir / "manifest.json").is_file()
