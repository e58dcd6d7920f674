"""Snapshots of real guests under QEMU: restore continues the guest, clones are isolated, mismatches fail.

Each test runs twice: with the runtime dir on disk (guest RAM travels in the migration stream) and
on tmpfs (guest RAM is a shared file; the snapshot copies it and clones map it copy-on-write).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guest_support import boot_config, console_text, wait_console

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.qemu.cmdline import on_tmpfs

pytestmark = pytest.mark.integration

DATA_SECTORS = 2048  # 1 MiB raw data disk, found in the guest by its size
# Counts on the console and writes the same count to the raw data disk (no filesystem, so the host
# can read what the guest wrote from the image file directly).
COUNTER_WITH_DISK = f"""
dev=
for d in /sys/block/vd*; do [ "$(cat $d/size)" = {DATA_SECTORS} ] && dev=/dev/${{d##*/}}; done
echo "DATA DEV $dev"
i=0
while true; do
  echo "TICK $i"
  printf 'TICK %08d\\n' $i | dd of=$dev conv=fsync,notrunc 2>/dev/null
  i=$((i+1))
  sleep 0.2
done
"""


@pytest.fixture(params=["stream", "file"], ids=["ram-in-stream", "ram-file"])
def runtime_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Overrides conftest's: on tmpfs the engine keeps guest RAM in a shared file."""
    base = "/dev/shm" if request.param == "file" else "/tmp"
    if request.param == "file" and not on_tmpfs(Path(base)):
        pytest.skip("/dev/shm is not a tmpfs here")
    root = Path(tempfile.mkdtemp(prefix="sv", dir=base))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^TICK (\d+)\r?$", text, re.M)]


def make_data_disk(path: Path) -> dict[str, Any]:
    path.write_bytes(b"\0" * DATA_SECTORS * 512)
    return {"drive_id": "data", "path_on_host": str(path)}


def disk_tick(image: Path) -> int | None:
    """The count the guest last wrote to a data disk image."""
    m = re.match(rb"TICK (\d{8})\n", image.read_bytes()[:16])
    return int(m.group(1)) if m else None


def staged_data_disk(vm: Any) -> Path:
    found = sorted((Path(vm.get_runtime_dir()) / "drives").glob("data*"))
    assert len(found) == 1, found
    return found[0]


async def snapshot_counter_vm(svm: Any, guest: Any, tmp_path: Path, *, at_tick: int = 5) -> tuple[Path, int]:
    """Boot a counting guest, snapshot it paused at ``at_tick`` or later, stop it; (snapshot dir, tick)."""
    data_disk = make_data_disk(tmp_path / "data.img")
    vm = await svm.create_vm(boot_config(guest, exec_script=COUNTER_WITH_DISK, extra_drives=[data_disk]))
    await vm.start()
    await wait_console(vm, f"TICK {at_tick}")
    await vm.pause()
    last = ticks(console_text(vm))[-1]
    snapdir = tmp_path / "snap"
    snapshot = await vm.create_snapshot(snapdir / "vm.state", snapdir / "vm.mem")
    assert snapshot.engine == "qemu"
    assert "data" in snapshot.disks
    memory = ["vm.mem"] if on_tmpfs(svm.options.runtime_dir) else []
    assert snapshot.mem_file == (memory[0] if memory else None)
    assert sorted(p.name for p in snapdir.iterdir()) == sorted(
        ["vm.state", "snapshot.json", *memory, *snapshot.disks.values()]
    )  # and no *.part left
    assert {p.stat().st_mode & 0o777 for p in snapdir.iterdir()} == {0o600}  # guest RAM and disks
    assert snapdir.stat().st_mode & 0o777 == 0o700
    with pytest.raises(SmartVMError) as diff:
        await vm.create_snapshot(tmp_path / "diff" / "vm.state", tmp_path / "diff" / "vm.mem", "Diff")
    assert diff.value.code == ErrorCode.UNSUPPORTED_BY_ENGINE
    await vm.resume()  # the source runs on after its snapshot
    await wait_console(vm, f"TICK {last + 2}", timeout=30)
    # a snapshot that fails half-way (the data disk vanished under QEMU) leaves no directory behind
    staged = staged_data_disk(vm)
    hidden = staged.with_name("hidden.img")
    staged.rename(hidden)
    with raises_code(ErrorCode.SNAPSHOT_FAILED):
        await vm.create_snapshot(tmp_path / "half" / "vm.state", tmp_path / "half" / "vm.mem", pause_vm=True)
    assert not (tmp_path / "half").exists()
    hidden.rename(staged)
    await vm.stop()
    return snapdir, last


async def test_restored_clones_continue_the_counter_with_separate_disks(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    snapdir, last = await snapshot_counter_vm(svm, guest_image, tmp_path)
    snapshot_disk = snapdir / "data.disk"
    at_snapshot = disk_tick(snapshot_disk)
    assert at_snapshot is not None and at_snapshot <= last

    a, b = await asyncio.gather(svm.restore_vm(snapdir), svm.restore_vm(snapdir))
    assert a.id != b.id
    for clone in (a, b):
        await wait_console(clone, f"TICK {last + 1}", timeout=30)
        # the restored guest continues from the snapshot's count, not from 0
        assert ticks(console_text(clone))[0] == last + 1
        assert "DATA DEV" not in console_text(clone)  # no second boot: the script was not restarted
    await b.pause()
    b_count = ticks(console_text(b))[-1]
    await wait_console(a, f"TICK {b_count + 4}", timeout=30)
    await a.pause()

    a_disk, b_disk = staged_data_disk(a), staged_data_disk(b)
    assert a_disk != b_disk
    a_wrote, b_wrote = disk_tick(a_disk), disk_tick(b_disk)
    assert a_wrote is not None and b_wrote is not None
    assert a_wrote >= b_count + 3  # a's later writes ...
    assert b_wrote <= b_count  # ... are not on b's disk
    assert disk_tick(snapshot_disk) == at_snapshot  # ... nor on the snapshot's
    await a.stop()
    await b.stop()


async def test_restore_with_other_memory_size_fails_clearly(
    svm: Any, guest_image: Any, tmp_path: Path
) -> None:
    snapdir, _ = await snapshot_counter_vm(svm, guest_image, tmp_path, at_tick=1)
    config = boot_config(
        guest_image,
        exec_script=COUNTER_WITH_DISK,
        mem_size_mib=384,
        extra_drives=[make_data_disk(tmp_path / "other.img")],
    )
    vm = await svm.create_vm(config)
    with pytest.raises(SmartVMError) as err:
        await asyncio.wait_for(vm.load_snapshot(snapdir / "vm.state", snapdir / "vm.mem"), 60)
    assert err.value.code == ErrorCode.SNAPSHOT_MISMATCH
    assert "mismatch" in err.value.message.lower()
    assert vm.state.value == "error"
    assert vm.get_runtime_dir() is None
    # a damaged state file is refused as invalid, also without hanging
    state = snapdir / "vm.state"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(SmartVMError) as err:
        await asyncio.wait_for(svm.restore_vm(snapdir), 60)
    assert err.value.code == ErrorCode.SNAPSHOT_INVALID, err.value.message
    assert "QEMU said" in err.value.message
