"""Benchmark 4: ``smartvm run -- true`` end to end against the raw QEMU command line.

The raw row runs ``qemu-system-x86_64`` with the argv the QEMU engine's own builder
(:func:`smartvm.qemu.cmdline.build_argv`) makes for the same config (same kernel, rootfs, memory,
devices, accelerator), and does the least a caller must to reach the same point: wait until the
guest agent answers a hello on its virtio-serial port, then kill QEMU and reap it (the disks are
throwaway copies, so ``smartvm run`` does not wait for a guest poweroff either). ``smartvm run``
does that plus everything a user gets: Python start-up, image cache check, runtime dir,
copy-on-write disk, the agent handshake, running ``true`` and cleaning up. By default it restores
the cached snapshot of the ready guest (made by the first run, which is timed once and reported in
a note); ``--cold`` boots like the raw row. The in-process rows are the same through the library
(no interpreter start-up). The snapshot cache is private to the benchmark (``SMARTVM_CACHE_DIR``,
with links to the real kernel and root filesystem) and removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import BenchTable, Series, compile_smartvm
from bench.guests import READY_TIMEOUT_S, guest, private_root, qemu_smartvm
from smartvm.agent.protocol import HELLO, FrameDecoder, encode_frame
from smartvm.config import MicroVMConfig, new_vm_id
from smartvm.host.runtime import VMRuntime
from smartvm.images.cache_paths import CACHE_DIR_ENV, cache_root
from smartvm.images.guest_image import ensure_default_guest
from smartvm.kvm_probe import engine_accel
from smartvm.qemu.cmdline import LaunchSpec, build_argv, detect_disk_format, on_tmpfs
from smartvm.qemu.engine import RAM_FILE
from smartvm.qemu.host_clock import host_tsc_khz
from smartvm.sandbox.run_snapshots import spec_for, start_from_snapshot
from smartvm.sandbox.templates import TemplateSpec

RAW = "raw qemu-system-x86_64 (same argv), cold boot"
CLI = "smartvm run --engine qemu -- true (from the cached snapshot)"
CLI_COLD = "smartvm run --cold --engine qemu -- true"
LIB = "SmartVM API in-process, cold (create, start, exec true, kill)"
LIB_WARM = "SmartVM API in-process, from the cached snapshot (restore, exec true, kill)"
SMARTVM = [sys.executable, "-m", "smartvm.cli"]


def raw_argv(config: MicroVMConfig, runtime: VMRuntime) -> tuple[list[str], str]:
    """The argv the QEMU engine would run for ``config`` (as its ``boot`` builds it), and the accel."""
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    accel, _why = engine_accel("auto", binary, Path(config.boot_source.kernel_image_path))
    spec = LaunchSpec(
        binary=binary,
        accel="kvm" if accel == "kvm" else "tcg",
        tsc_khz=host_tsc_khz() if accel == "tcg" else None,
        drive_formats={d.drive_id: detect_disk_format(d.path_on_host) for d in config.drives},
        ram_file=runtime.dir / RAM_FILE if on_tmpfs(runtime.dir) else None,
    )
    return build_argv(config, runtime, spec), spec.accel


async def _agent_hello(path: Path, deadline: float) -> None:
    """Ask the agent for a hello every 50 ms until one arrives (the port may not be open yet)."""
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not create the agent socket") from None
            await asyncio.sleep(0.005)
    decoder = FrameDecoder()
    try:
        while time.monotonic() < deadline:
            writer.write(encode_frame(HELLO, 0))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                while True:
                    data = await asyncio.wait_for(reader.read(65536), 0.05)
                    if not data:
                        raise ConnectionError("QEMU closed the agent socket")
                    if any(getattr(f, "type", None) == HELLO for f in decoder.feed(data)):
                        return
        raise TimeoutError("the guest agent did not answer")
    finally:
        writer.close()


async def raw_boot(config: MicroVMConfig, root: Path, i: int) -> float:
    """One raw boot to 'agent answers', then kill; seconds (staging the rootfs is not timed)."""
    runtime = VMRuntime.create(root / "raw", f"raw-{i}")
    try:
        staged = runtime.stage_drives(config, ephemeral_writable=True)
        argv, _accel = raw_argv(staged, runtime)
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            await _agent_hello(runtime.agent_socket, time.monotonic() + READY_TIMEOUT_S)
            proc.kill()
            await proc.wait()
            return time.perf_counter() - t0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        runtime.remove()


@contextlib.contextmanager
def private_cache() -> Iterator[Path]:
    """A throwaway smartvm cache (on disk, like ``~/.cache``) linking the real kernels and root
    filesystems, so the benchmark's run snapshots never touch the user's cache."""
    real = cache_root()
    cache = Path(tempfile.mkdtemp(prefix="smartvm-bench-cache-"))
    try:
        for name in ("kernels", "rootfs"):
            (cache / name).symlink_to(real / name)
        yield cache
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # removes the links, not what they point at


async def cli_run(root: Path, cache: Path, *, cold: bool) -> float:
    argv = [*SMARTVM, "run", "--engine", "qemu", "--runtime-dir", str(root / "cli")]
    argv += ["--cold", "--", "true"] if cold else ["--", "true"]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, CACHE_DIR_ENV: str(cache)},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT_S + 30)
    finally:
        if proc.returncode is None:
            proc.kill()  # SIGKILL: its VM is then killed by private_root's sweep
            await proc.wait()
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"smartvm run failed ({proc.returncode}): {(err or out).decode()[-500:]}")
    return took


async def library_run(config: MicroVMConfig) -> float:
    async with qemu_smartvm() as svm:
        t0 = time.perf_counter()
        vm = await svm.create_vm(config)
        await vm.start()
        result = await vm.exec(["true"], ready_timeout=READY_TIMEOUT_S, timeout=30)
        await vm.kill()
        took = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"true exited with {result.exit_code} in the guest")
    return took


async def library_restore(spec: TemplateSpec, cache: Path) -> float:
    async with qemu_smartvm() as svm:
        t0 = time.perf_counter()
        vm_id = new_vm_id()
        vm = await start_from_snapshot(
            spec, svm=svm, vm_id=vm_id, hostname=vm_id, ready_timeout=READY_TIMEOUT_S, cache=cache
        )
        result = await vm.exec(["true"], timeout=30)
        await vm.kill()
        took = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"true exited with {result.exit_code} in the guest")
    return took


async def run(quick: bool) -> list[BenchTable]:
    n = 1 if quick else 10
    config = await asyncio.to_thread(guest)
    raw, cli, cli_cold = Series(RAW), Series(CLI), Series(CLI_COLD)
    lib, lib_warm = Series(LIB), Series(LIB_WARM)
    image = await asyncio.to_thread(ensure_default_guest)  # what guest() booted
    shape = config.machine_config
    spec = spec_for(image, cpus=shape.vcpu_count, memory_mib=shape.mem_size_mib)
    with private_root() as root, private_cache() as cache:
        probe = VMRuntime.create(root / "probe", "probe")
        _argv, accel = raw_argv(config, probe)
        probe.remove()
        compile_smartvm()  # `smartvm run` processes load bytecode, as from an installed package
        first = await cli_run(root, cache, cold=False)  # makes the snapshot (untimed in the table)
        if not quick:
            await cli_run(root, cache, cold=True)  # warm the page cache, untimed
        for i in range(n):  # interleaved, so background load hits all rows alike
            raw.samples.append(await raw_boot(config, root, i))
            cli.samples.append(await cli_run(root, cache, cold=False))
            cli_cold.samples.append(await cli_run(root, cache, cold=True))
            lib.samples.append(await library_run(config))
            lib_warm.samples.append(await library_restore(spec, cache))
    mib = config.machine_config.mem_size_mib
    return [
        BenchTable(
            f"Boot to a command and back: 1 vCPU, {mib} MiB, busybox guest, {accel}",
            [raw, cli, cli_cold, lib, lib_warm],
            baseline=RAW,
            unit="s",
            notes=[
                "the same point: the guest agent answered (raw: a hello on its virtio-serial port; smartvm: "
                "the handshake + running `true`), then QEMU was killed and reaped, its runtime dir removed",
                "raw: argv from smartvm.qemu.cmdline.build_argv for the same config; its rootfs copy is made "
                "before the timing; smartvm --cold stages its copy inside it, a restore makes a qcow2 layer",
                "from the cached snapshot: restore + RNG reseed, clock and hostname before the first request",
                f"the first `smartvm run` (boots the guest once, makes that snapshot) took {first:.2f} s",
                "smartvm run also pays Python start-up and imports, the image cache check and cleanup",
            ],
        )
    ]
