"""Large outputs and files keep their exact bytes through the agent (virtio-serial, real guest).

The agent path batches (port reads of many buffers, big pipe reads, pauses for bulk output) and
writes a frame's head and payload separately; a lost, doubled or reordered piece would show here.
Random data (every byte value) so that no chunk looks like another.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config

pytestmark = pytest.mark.integration

MiB = 1 << 20


async def test_large_outputs_and_files_are_byte_exact(svm: Any, guest_image: Any, tmp_path: Path) -> None:
    vm = await svm.create_vm(boot_config(guest_image))
    await vm.start()
    await vm.wait_ready(120)
    blob = os.urandom(20 * MiB) + bytes(range(256))
    assert len(set(blob)) == 256

    assert await vm.files.write("/tmp/big", blob) == len(blob)
    sha = (await vm.exec(["sha256sum", "/tmp/big"], timeout=120)).stdout_text.split()[0]
    assert sha == hashlib.sha256(blob).hexdigest()  # the write arrived intact

    out = await vm.exec(["cat", "/tmp/big"], timeout=120)
    assert (out.exit_code, len(out.stdout), out.stdout_truncated) == (0, len(blob), False)
    assert out.stdout == blob

    # both streams at once, one of them in many small writes (busybox head copies 4 KiB at a time)
    both = await vm.exec(["sh", "-c", "cat /tmp/big & head -c 3000000 /tmp/big >&2; wait"], timeout=120)
    assert both.stdout == blob and both.stderr == blob[:3_000_000]

    piped = await vm.exec(["cat"], stdin=blob[: 5 * MiB], timeout=120)  # host -> guest stdin
    assert piped.stdout == blob[: 5 * MiB]

    assert await vm.files.read("/tmp/big") == blob
    local = tmp_path / "big"
    assert await vm.files.download("/tmp/big", local) == len(blob)
    assert local.read_bytes() == blob
    await vm.kill()
