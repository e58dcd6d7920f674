"""Snapshot-started VMs for ``smartvm run`` and ``smartvm start``: templates cached by their inputs.

The first start of a guest (kernel, root filesystem with its agent, boot arguments, vCPUs, memory,
engine, hypervisor binary, runtime dirs on tmpfs or not) builds a template with
:func:`build_template` (boot once, ready agent, snapshot without disk copies) into
``<cache>/run-snapshots/<key>/``. Every later start restores it with its own copy-on-write layer
over the template's ``disk.img``, made inside the VM's runtime dir, so the layer goes with the VM
(also when its process is killed: the sweep removes the dir). The restored guest's first agent
request reseeds its RNG from the host and sets its clock and hostname (``MicroVM._prepare_agent``),
so no two VMs share random state.

An entry is used only while its seal (written after the build: size and mtime of every file, the
sha256 of the small ones) still matches; a damaged entry, or one whose restore the hypervisor
refuses, is thrown away and built again.
Builds and evictions hold one cache lock (so of two first runs one builds and the other waits, then
both restore); using an intact entry takes no lock. The :data:`KEEP` most recently used entries stay,
and an entry whose files a running VM has open is never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.atomic_write import write_atomic
from smartvm.host.private_dirs import ensure_private_dir
from smartvm.images.build_steps import cache_lock, digest, file_identity, remove_stale
from smartvm.images.cache_paths import cache_root
from smartvm.orchestrator import SmartVM
from smartvm.qemu.cmdline import on_tmpfs
from smartvm.sandbox.cow import choose_strategy
from smartvm.sandbox.templates import ROOT_DRIVE, BuiltTemplate, TemplateSpec, build_template
from smartvm.vm import MicroVM

if TYPE_CHECKING:
    from smartvm.images.guest_image import GuestImage

log = logging.getLogger(__name__)

RUN_SNAPSHOTS = "run-snapshots"
KEEP = 3  # entries kept (about 100 MiB each for the default guest)
SEAL_FILE = "seal.json"
SEAL_FORMAT = 1
_LOCK = "run-snapshots"
_LOCK_POLL_S = 0.05
_HASHED_MAX_BYTES = 1 << 20
# A restore failing so means the entry is damaged (or another hypervisor's): build it again, once.
# (A hypervisor that dies right after loading the state counts: a state it cannot run is damaged.)
_DAMAGED = frozenset(
    {ErrorCode.SNAPSHOT_INVALID, ErrorCode.SNAPSHOT_MISMATCH, ErrorCode.QEMU_EXITED, ErrorCode.VM_EXITED}
)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunSnapshot:
    """A checked cache entry: its template and the id of the build that made it."""

    template: BuiltTemplate
    build_id: str


def spec_for(image: GuestImage, *, cpus: int, memory_mib: int) -> TemplateSpec:
    """The template of ``image`` in a shape. Its warm-up runs as root, as ``smartvm run`` commands
    do (an image need not have the sandboxes' unprivileged account: the Debian one has none)."""
    return TemplateSpec(
        name="run",
        kernel=image.kernel_path,
        rootfs=image.rootfs_path,
        boot_args=image.boot_args,
        cpus=cpus,
        memory_mib=memory_mib,
        user="root",
    )


def snapshots_dir(cache: Path | None = None) -> Path:
    """Where the entries live: ``<cache>/run-snapshots``."""
    return (cache or cache_root()) / RUN_SNAPSHOTS


def entry_key(spec: TemplateSpec, engine: str, hypervisor: Path, runtime_dir: Path) -> str:
    """The entry of ``spec``: its template key, the hypervisor binary (a new QEMU may not load an old
    QEMU's device state) and whether runtime dirs are on tmpfs (QEMU then keeps guest RAM in a file
    of its own, which restores faster than RAM inside the state stream)."""
    return digest(spec.key(engine), file_identity(hypervisor), str(on_tmpfs(runtime_dir)))


def check_entry(directory: Path) -> RunSnapshot:
    """The entry in ``directory`` if it is complete and unchanged since it was sealed, else
    SNAPSHOT_INVALID saying what is wrong."""
    try:
        seal = json.loads((directory / SEAL_FILE).read_text())
    except FileNotFoundError as exc:
        raise _invalid(directory, "it has no seal (its build did not finish)") from exc
    except (OSError, ValueError) as exc:
        raise _invalid(directory, f"its seal cannot be read: {exc}") from exc
    if not isinstance(seal, dict) or seal.get("format") != SEAL_FORMAT or not seal.get("build_id"):
        raise _invalid(directory, "its seal is malformed")
    try:
        now, sealed = _file_identities(directory), seal.get("files")
    except OSError as exc:  # e.g. discarded by another process while we looked
        raise _invalid(directory, f"its files cannot be read: {exc}") from exc
    if now != sealed:
        sealed = sealed if isinstance(sealed, dict) else {}
        changed = sorted(name for name in set(now) | set(sealed) if now.get(name) != sealed.get(name))
        raise _invalid(directory, f"files changed since it was made: {', '.join(changed)}")
    template = BuiltTemplate("run", directory)
    template.load()  # manifest, disk and state file present and readable
    return RunSnapshot(template, str(seal["build_id"]))


def _invalid(directory: Path, why: str) -> SmartVMError:
    return SmartVMError(ErrorCode.SNAPSHOT_INVALID, f"cached run snapshot {directory}: {why}")


def _file_identities(directory: Path) -> dict[str, list[int | str]]:
    """Size and mtime of every file of an entry except its seal (changed by any write or truncation),
    and the sha256 of the small ones (manifest; the device state when guest RAM is a separate file).
    Hashing the large ones (guest RAM, disk) would cost more than the restore itself."""
    found: dict[str, list[int | str]] = {}
    for path in directory.rglob("*"):
        st = path.lstat()
        if path.name == SEAL_FILE or stat.S_ISDIR(st.st_mode):
            continue
        ident: list[int | str] = [st.st_size, st.st_mtime_ns]
        if st.st_size <= _HASHED_MAX_BYTES and stat.S_ISREG(st.st_mode):
            ident.append(hashlib.sha256(path.read_bytes()).hexdigest())
        found[str(path.relative_to(directory))] = ident
    return found


def seal(template: BuiltTemplate) -> RunSnapshot:
    """Make a freshly built template an entry: record what its files are now."""
    build_id = secrets.token_hex(8)
    seal = {"format": SEAL_FORMAT, "build_id": build_id, "files": _file_identities(template.directory)}
    write_atomic(template.directory / SEAL_FILE, json.dumps(seal, indent=1, sort_keys=True))
    return RunSnapshot(template, build_id)


def _usable(directory: Path) -> RunSnapshot | None:
    if not directory.is_dir():
        return None
    try:
        return check_entry(directory)
    except SmartVMError as exc:
        log.info("%s", exc.message)
        return None


def _discard(directory: Path) -> None:
    """Remove an entry: renamed away first, so a reader sees all of it or nothing."""
    trash = directory.with_name(f".{directory.name}.trash-{secrets.token_hex(4)}")
    try:
        directory.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _clear_for_build(directory: Path) -> None:
    """Remove what processes killed while building or removing entries left, and the entry in
    ``directory`` (damaged, or its restore failed). Call it holding the cache lock."""
    for leftover in (".*.trash-*", ".*.build"):
        remove_stale(directory.parent, leftover)
    if directory.exists():
        log.info("throwing away the run snapshot %s and building it again", directory)
        _discard(directory)


def _open_by_a_process(directory: Path) -> bool:
    """Whether any process has a file of ``directory`` open (a VM restored from it still runs)."""
    prefix = f"{directory.resolve()}/"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                if os.readlink(fd_dir / name).startswith(prefix):
                    return True
    return False


def evict(root: Path, *, keep: int = KEEP, current: Path | None = None) -> list[Path]:
    """Remove all but the ``keep`` most recently used entries (``current`` always stays), skipping
    entries in use; the entries removed. Call it holding the cache lock."""
    entries = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    entries.sort(key=lambda p: (p == current, p.stat().st_mtime), reverse=True)
    removed = []
    for path in entries[keep:]:
        if path != current and not _open_by_a_process(path):
            _discard(path)
            removed.append(path)
    return removed


@contextlib.asynccontextmanager
async def locked_cache(cache: Path) -> AsyncIterator[None]:
    """The cache lock, waited for without blocking the event loop (Ctrl-C and SIGTERM still work)."""
    with contextlib.ExitStack() as held:
        while True:
            try:
                held.enter_context(cache_lock(_LOCK, cache, wait=False))
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_S)
        yield


async def ensure_run_snapshot(
    spec: TemplateSpec,
    *,
    svm: SmartVM,
    ready_timeout: float,
    cache: Path | None = None,
    progress: Progress = lambda step: None,
    failed_build: str | None = None,
) -> RunSnapshot:
    """The intact entry of ``spec``, built first when it is missing or damaged (or is the build
    ``failed_build``, whose restore failed). TEMPLATE_BUILD_FAILED when building fails."""
    cache = cache or cache_root()
    root = snapshots_dir(cache)
    directory = root / entry_key(
        spec, await svm.select_engine(), await svm.ensure_binary(), svm.options.runtime_dir
    )
    if failed_build is None:
        found = _usable(directory)
        if found is not None:
            with contextlib.suppress(OSError):
                os.utime(directory)  # most recently used: evicted last
            return found
    try:
        return await _build_entry(spec, svm, cache, directory, ready_timeout, progress, failed_build)
    except OSError as exc:  # the cache is not writable, or full
        raise SmartVMError(
            ErrorCode.TEMPLATE_BUILD_FAILED,
            f"cannot keep the snapshot of this guest in {root}: {exc.strerror or exc}; free space there, "
            "point SMARTVM_CACHE_DIR at a writable directory, or boot without a snapshot (--cold)",
        ) from exc


async def _build_entry(
    spec: TemplateSpec,
    svm: SmartVM,
    cache: Path,
    directory: Path,
    ready_timeout: float,
    progress: Progress,
    failed_build: str | None,
) -> RunSnapshot:
    async with locked_cache(cache):
        root = ensure_private_dir(directory.parent)
        found = _usable(directory)
        if found is not None and found.build_id != failed_build:
            return found  # built (again) by another process while we waited
        _clear_for_build(directory)
        template = await build_template(
            spec, directory, svm=svm, pool=None, ready_timeout=ready_timeout, progress=progress
        )
        made = seal(template)
        evict(root, current=directory)
        return made


async def start_from_snapshot(
    spec: TemplateSpec,
    *,
    svm: SmartVM,
    vm_id: str,
    hostname: str,
    ready_timeout: float,
    detachable: bool = False,
    cache: Path | None = None,
    progress: Progress = lambda step: None,
) -> MicroVM:
    """A running VM of ``spec`` whose agent answers, restored from its cached snapshot (built first
    when missing or damaged) with its own copy-on-write disk; nothing is left behind on failure."""
    failed: str | None = None
    while True:
        snap = await ensure_run_snapshot(
            spec, svm=svm, ready_timeout=ready_timeout, cache=cache, progress=progress, failed_build=failed
        )
        try:
            return await _restore(snap, svm, vm_id, hostname, ready_timeout, detachable)
        except SmartVMError as exc:
            if exc.code not in _DAMAGED or failed is not None:
                raise
            log.info("restoring %s failed (%s); building it again", snap.template.directory, exc.message)
            failed = snap.build_id


async def _restore(
    snap: RunSnapshot, svm: SmartVM, vm_id: str, hostname: str, ready_timeout: float, detachable: bool
) -> MicroVM:
    root = ensure_private_dir(svm.options.runtime_dir)
    strategy = choose_strategy(await svm.select_engine(), root, files_only=True)
    base = snap.template.disk

    def layer(runtime_dir: Path) -> Path:
        return strategy.create(base, runtime_dir / "disk", vm_id).device_path

    vm = await svm.restore_vm(
        snap.template.snapshot_dir, vm_id=vm_id, detachable=detachable, drive_layers={ROOT_DRIVE: layer}
    )
    try:
        vm.hostname = hostname
        await vm.wait_ready(ready_timeout)  # reseed the RNG, set the clock and hostname
    except BaseException:
        await asyncio.shield(vm.kill())
        raise
    return vm
