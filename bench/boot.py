"""Benchmark 4: ``smartvm run -- true`` end to end against the raw QEMU command line.

The raw row runs ``qemu-system-x86_64`` with the argv the QEMU engine's own builder
(:func:`smartvm.qemu.cmdline.build_argv`) makes for the same config (same kernel, rootfs, memory,
devices, accelerator), and does the least a caller must to reach the same point: wait until the
guest agent answers a hello on its virtio-serial port, then kill QEMU and reap it (the disks are
throwaway copies, so ``smartvm run`` does not wait for a guest poweroff either). ``smartvm run``
does that plus everything a user gets: Python start-up, image cache check, runtime dir,
copy-on-write staging, the agent handshake, running ``true`` and cleaning up. The in-process row is
the same through the library (no interpreter start-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchTable, Series
from bench.guests import READY_TIMEOUT_S, guest, private_root, qemu_smartvm
from smartvm.agent.protocol import HELLO, FrameDecoder, encode_frame
from smartvm.config import MicroVMConfig
from smartvm.host.runtime import VMRuntime
from smartvm.kvm_probe import engine_accel
from smartvm.qemu.cmdline import LaunchSpec, build_argv, detect_disk_format, on_tmpfs
from smartvm.qemu.engine import RAM_FILE
from smartvm.qemu.host_clock import host_tsc_khz

RAW = "raw qemu-system-x86_64 (same argv)"
CLI = "smartvm run --engine qemu -- true"
LIB = "SmartVM API in-process (create, start, exec true, kill)"


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


async def cli_run(root: Path) -> float:
    argv = [
        sys.executable,
        "-m",
        "smartvm.cli",
        "run",
        "--engine",
        "qemu",
        "--runtime-dir",
        str(root / "cli"),
        "--",
        "true",
    ]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
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


async def run(quick: bool) -> list[BenchTable]:
    n = 1 if quick else 10
    config = await asyncio.to_thread(guest)
    raw, cli, lib = Series(RAW), Series(CLI), Series(LIB)
    with private_root() as root:
        probe = VMRuntime.create(root / "probe", "probe")
        _argv, accel = raw_argv(config, probe)
        probe.remove()
        if not quick:
            await cli_run(root)  # warm the page cache and the guest image check, untimed
        for i in range(n):  # interleaved, so background load hits all three alike
            raw.samples.append(await raw_boot(config, root, i))
            cli.samples.append(await cli_run(root))
            lib.samples.append(await library_run(config))
    mib = config.machine_config.mem_size_mib
    return [
        BenchTable(
            f"Boot to a command and back: 1 vCPU, {mib} MiB, busybox guest, {accel}",
            [raw, lib, cli],
            baseline=RAW,
            unit="s",
            notes=[
                "the same point: the guest agent answered (raw: a hello on its virtio-serial port; smartvm: "
                "the handshake + running `true`), then QEMU was killed and reaped, its runtime dir removed",
                "raw: argv from smartvm.qemu.cmdline.build_argv for the same config; its rootfs copy is made "
                "before the timing, smartvm stages its copy inside it",
                "smartvm run also pays Python start-up and imports, the image cache check and cleanup",
            ],
        )
    ]
