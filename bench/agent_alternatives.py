"""What a compiled guest agent would gain under TCG: issue 16 asks to "measure the alternatives before
choosing one" when the guest side is the limit under emulation.

``bench/agent_probe.c`` (built here with ``gcc -static``) answers three requests on a virtio-serial
port of its own: a ping, ``/bin/true`` with stdout and stderr piped, read to their end and the child
reaped (what the agent's exec does), and ``cat`` of a 1 MiB file with its output forwarded in frames.
The same three go through smartvm's Python agent on the same guest, in alternating blocks.

The second table restores a snapshot of that guest (a new QEMU process, whose TCG has translated
nothing yet) and times the first requests to each agent after the restore, which one goes first
alternating per restore: this is the cost a sandbox resume and a snapshot-started ``smartvm run`` pay.
The probe is a measurement, not an agent (no users, env, cwd, timeouts or multiplexing), so its rows
are a lower bound for a compiled agent; the Python rows include the protocol's real work.

A third client, a blocking socket speaking smartvm's frames to the same agent on another of its ports
(:class:`FrameClient`), splits the agent rows into the guest's part and the host client's
(:class:`~smartvm.agent.client.AgentClient`, asyncio) part.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import BenchSkipped, BenchTable, Series
from bench.guests import READY_TIMEOUT_S, engine_facts, guest, private_root, qemu_smartvm
from smartvm.agent import wire
from smartvm.host.runtime import VMRuntime
from smartvm.qemu import cmdline
from smartvm.qemu.agent_ports import AGENT_PORTS, claim_port, port_socket
from smartvm.vm import MicroVM

MiB = 1 << 20
PROBE_SOURCE = Path(__file__).with_name("agent_probe.c")
PROBE_PORT = "probe.0"
PROBE_SOCKET = "probe.sock"
PING: dict[str, Any] = {"op": "ping"}
TRUE: dict[str, Any] = {"op": "exec", "cmd": ["true"]}
FIND_PORT = (
    'for d in /sys/class/virtio-ports/*; do [ "$(cat "$d/name")" = '
    + PROBE_PORT
    + " ] && echo /dev/${d##*/}; done"
)


def _build_probe(out: Path) -> Path:
    if shutil.which("gcc") is None:
        raise BenchSkipped("gcc is not installed (apt-get install gcc libc6-dev)")
    exe = out / "agent_probe"
    built = subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(exe), str(PROBE_SOURCE)], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise BenchSkipped(f"cannot build the probe (static libc missing?): {built.stderr.strip()[:200]}")
    return exe


@contextlib.contextmanager
def _probe_port() -> Iterator[None]:
    """VMs started inside get one more virtio-serial port, ``probe.0``, on ``probe.sock`` in their
    runtime dir (the agent serves only ports named ``smartvm.agent*``)."""
    plain = cmdline.port_args

    def with_probe(runtime: VMRuntime, count: int) -> list[str]:
        args = plain(runtime, count)
        bus = f"max_ports={count + 1}"
        assert bus in args[1], args  # the virtio-serial bus gets one more port for the probe
        args[1] = args[1].replace(bus, f"max_ports={count + 2}")
        path = str(runtime.dir / PROBE_SOCKET).replace(",", ",,")
        return [
            *args,
            "-chardev",
            f"socket,id=probe,path={path},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=probe,name={PROBE_PORT}",
        ]

    cmdline.port_args = with_probe
    try:
        yield
    finally:
        cmdline.port_args = plain


class Probe:
    """The host end of the probe's port (blocking socket calls: each is a round trip)."""

    def __init__(self, vm: MicroVM) -> None:
        runtime = vm._runtime
        assert runtime is not None
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(runtime.dir / PROBE_SOCKET))

    def _exact(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            chunk = self.sock.recv(n - len(got))
            if not chunk:
                raise EOFError("the probe hung up")
            got += chunk
        return bytes(got)

    def ping(self) -> None:
        self.sock.sendall(b"p")
        assert self._exact(1) == b"P"

    def true(self) -> None:
        self.sock.sendall(b"x")
        assert self._exact(2) == b"X\x00"

    def cat(self) -> None:
        self.sock.sendall(b"c")
        total = 0
        while n := struct.unpack("<I", self._exact(4))[0]:
            assert n <= 1 << 18, n  # the probe reads at most 256 KiB at a time: anything more is garbage
            total += len(self._exact(n))
        assert self._exact(2) == b"C\x00" and total == MiB, total

    def close(self) -> None:
        self.sock.close()


class FrameClient:
    """The least a host client can do: blocking calls on one claimed agent port, one request at a time."""

    def __init__(self, vm: MicroVM) -> None:
        runtime = vm._runtime
        assert runtime is not None
        self.claim = claim_port(runtime, AGENT_PORTS)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(port_socket(runtime, self.claim.index)))
        self.decoder = wire.FrameDecoder()
        self.frames: list[wire.Frame | wire.FrameError] = []
        self.channel = 1 << 30
        self.sock.sendall(wire.encode_frame(wire.HELLO, 0))
        self._until(0, wire.HELLO)

    def _until(self, channel: int, ftype: int) -> wire.Frame:
        while True:
            for i, f in enumerate(self.frames):
                if isinstance(f, wire.Frame) and f.channel == channel and f.type in (ftype, wire.ERROR):
                    del self.frames[: i + 1]
                    assert f.type == ftype, f
                    return f
            self.frames.clear()
            data = self.sock.recv(1 << 18)
            if not data:
                raise EOFError("the agent hung up")
            self.frames += self.decoder.feed(data)

    def call(self, header: dict[str, Any]) -> wire.Frame:
        self.channel += 1
        self.sock.sendall(wire.encode_frame(wire.REQUEST, self.channel, header))
        return self._until(self.channel, wire.RESULT)

    def close(self) -> None:
        self.sock.close()
        self.claim.release()


async def _install(vm: MicroVM, exe: bytes) -> None:
    await vm.files.write("/tmp/agent_probe", exe)
    await vm.exec(["sh", "-c", f"chmod 755 /tmp/agent_probe; head -c {MiB} /dev/urandom >/tmp/probe-1m"])
    dev = (await vm.exec(["sh", "-c", FIND_PORT])).stdout.decode().strip()
    if not dev:
        raise BenchSkipped("the guest has no probe port")
    await vm.exec(["sh", "-c", f"setsid /tmp/agent_probe {dev} </dev/null >/dev/null 2>&1 &"])


async def _timed(row: Series, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    result = fn()
    if asyncio.iscoroutine(result):
        await result
    row.samples.append(time.perf_counter() - t0)


async def run(quick: bool) -> list[BenchTable]:
    config = guest()
    blocks, per_block, restores = (2, 10, 4) if quick else (4, 25, 10)
    with private_root() as scratch, _probe_port(), contextlib.ExitStack() as sockets:
        exe = _build_probe(scratch)
        async with qemu_smartvm() as svm:
            vm = await svm.create_vm(config)
            await vm.start()
            await vm.wait_ready(READY_TIMEOUT_S)
            accel = (await engine_facts(vm))[1]
            await _install(vm, exe.read_bytes())
            probe = Probe(vm)
            sockets.callback(probe.close)  # also when a step below fails
            frames = FrameClient(vm)
            sockets.callback(frames.close)

            async def py_cat() -> None:
                got = await vm.exec(["cat", "/tmp/probe-1m"], max_output_bytes=2 * MiB)
                assert len(got.stdout) == MiB

            async def py_ping() -> None:
                assert vm._agent is not None
                await vm._agent.ping()

            probe.ping()
            await vm.exec(["true"])
            rows = {
                k: Series(k)
                for k in (
                    "compiled probe: ping",
                    "Python agent: ping",
                    "compiled probe: exec true",
                    "Python agent: exec true",
                    "same agent, blocking frames client: ping",
                    "same agent, blocking frames client: exec true",
                    "compiled probe: cat 1 MiB (stdout captured)",
                    "Python agent: cat 1 MiB (stdout captured)",
                )
            }
            for _ in range(blocks):
                for i in range(per_block):
                    await _timed(rows["compiled probe: ping"], probe.ping)
                    await _timed(rows["compiled probe: exec true"], probe.true)
                    if i % 3 == 0:
                        await _timed(rows["compiled probe: cat 1 MiB (stdout captured)"], probe.cat)
                for _ in range(per_block):
                    await _timed(rows["same agent, blocking frames client: ping"], lambda: frames.call(PING))
                    await _timed(
                        rows["same agent, blocking frames client: exec true"], lambda: frames.call(TRUE)
                    )
                for i in range(per_block):
                    await _timed(rows["Python agent: ping"], py_ping)
                    await _timed(rows["Python agent: exec true"], lambda: vm.exec(["true"]))
                    if i % 3 == 0:
                        await _timed(rows["Python agent: cat 1 MiB (stdout captured)"], py_cat)
            for label in (
                "compiled probe: cat 1 MiB (stdout captured)",
                "Python agent: cat 1 MiB (stdout captured)",
            ):
                rows[label].extra["throughput"] = f"{1 / rows[label].median:.1f} MiB/s"
            warm = BenchTable(
                "a running guest",
                list(rows.values()),
                baseline="Python agent: exec true",
                notes=[
                    "blocks of each side in turns; the probe's host end is a blocking socket",
                    "the frames client: a blocking socket with smartvm's frames on another port of the same "
                    "agent (the host's least cost); the agent rows go through AgentClient (asyncio)",
                ],
            )

            snapdir = scratch / "snap"
            snapdir.mkdir()
            frames.close()
            await vm.pause()
            await vm.create_snapshot(snapdir / "vm.state", snapdir / "memory")
            probe.close()
            await vm.kill()
            first = {
                k: Series(k)
                for k in (
                    "restore (QEMU start, state loaded, running)",
                    "compiled probe first: ping, then exec true",
                    "then the Python agent: hello, hygiene, exec true",
                    "Python agent first: hello, hygiene, exec true",
                    "then the compiled probe: ping, then exec true",
                )
            }
            for n in range(restores):
                t0 = time.perf_counter()
                restored = await svm.restore_vm(snapdir)
                first["restore (QEMU start, state loaded, running)"].samples.append(time.perf_counter() - t0)
                try:

                    def probe_first(restored: MicroVM = restored) -> None:
                        p = Probe(restored)
                        try:
                            p.ping()
                            p.true()
                        finally:
                            p.close()

                    async def py_first(restored: MicroVM = restored) -> None:
                        await restored.exec(["true"])

                    if n % 2 == 0:
                        await _timed(first["compiled probe first: ping, then exec true"], probe_first)
                        await _timed(first["then the Python agent: hello, hygiene, exec true"], py_first)
                    else:
                        await _timed(first["Python agent first: hello, hygiene, exec true"], py_first)
                        await _timed(first["then the compiled probe: ping, then exec true"], probe_first)
                finally:
                    await restored.kill()
            after = BenchTable(
                "the first requests after a restore (TCG translates the guest's code again)",
                list(first.values()),
                baseline="Python agent first: hello, hygiene, exec true",
                notes=[
                    "the Python agent's first request also runs the post-restore RNG reseed, clock, hostname"
                ],
            )
    for table in (warm, after):
        table.title = f"Agent alternatives, compiled probe vs the Python agent: {table.title} (QEMU, {accel})"
    return [warm, after]
