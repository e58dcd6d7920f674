"""MicroVMConfig -> ``qemu-system-x86_64 -M microvm`` argv (pure, apart from :func:`detect_disk_format`).

Every config field either becomes QEMU options or raises UNSUPPORTED_BY_ENGINE: nothing is dropped
silently. Device order is stable (root drive first, so it is ``/dev/vda``), because a restore must
rebuild exactly the device set the snapshot was taken with.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from smartvm.config import Drive, MicroVMConfig, RateLimiter, TokenBucket, has_boot_arg
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.runtime import VMRuntime
from smartvm.qemu.agent_ports import AGENT_PORTS, port_args

Accel = Literal["kvm", "tcg"]
DiskFormat = Literal["raw", "qcow2"]

DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
# Measured on TCG: skip crypto self-tests and loop setup, and do not print every boot line to a
# slow emulated UART (about 1.4 s -> 1.0 s to init). ``tsc=reliable``: the guest's TSC is the host's
# (TCG reads the host TSC), but with no HPET or PM timer on microvm the kernel checks it against
# jiffies, and on a loaded host delayed ticks made it declare the TSC unstable during boot and fall
# back to refined-jiffies: a 4 ms clock and no high-resolution timers for the VM's whole life.
TCG_BOOT_ARGS = ("cryptomgr.notests=1", "max_loop=1", "quiet", "tsc=reliable")
# Under TCG: QEMU's default model plus ARAT ("the APIC timer keeps running in deep C-states"), which TCG
# emulates. Without it the guest kernel flags its only clock event device (the LAPIC timer) as stopping
# in C3 and, with no broadcast device on microvm, never leaves periodic 4 ms ticks: no high-resolution
# timers (a 1 ms sleep took 4 ms), no tickless idle (250 wake-ups a second in every idle guest).
TCG_CPU = "qemu64,+arat"
# A restored QEMU announces the guest on its network 5 times over 550 ms (migration parameter
# announce-rounds): virtio-net asks the guest to send gratuitous ARP and IPv6 neighbour
# advertisements, which wakes the guest's network stack (netlink, neighbour tables, MLD) right
# while the restore waits for its agent. That is for switches that must learn where a live-migrated
# VM went; a restore here makes a new VM (often one of many clones of one snapshot) on its own TAP
# device, learned from its own first packets like a booted one.
RESTORE_GLOBALS = ["-global", "migration.announce-rounds=0"]
AGENT_PORTS_ARG = "smartvm.agent_ports"  # how many virtio-serial agent ports the guest will find
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class LaunchSpec:
    """Host facts the translation needs, resolved by the caller (so translation stays pure)."""

    binary: str
    accel: Accel
    tsc_khz: int | None = None  # host TSC rate; passed as tsc_early_khz under TCG
    drive_formats: Mapping[str, DiskFormat] = field(default_factory=dict)  # drive_id -> format
    incoming: bool = False  # start with ``-incoming defer`` (restore) instead of running the guest
    # A restore that loads at once: QEMU reads the migration stream from this inherited descriptor
    # while it starts (``-incoming fd:N``; QEMU 7.2 cannot set ``x-ignore-shared`` this way).
    incoming_fd: int | None = None
    # Guest RAM in a file: shared (``share=on``, the VM's own file on tmpfs: snapshots skip RAM) or
    # a private copy-on-write mapping of a snapshot's memory file (``share=off``). None: anonymous.
    ram_file: Path | None = None
    ram_shared: bool = True
    agent_ports: int = AGENT_PORTS  # a restore uses the snapshot's count


RAM_BACKEND_ID = "ram"  # the same RAM block name in every mode, so any snapshot fits any restore


def ram_backend(size_mib: int, spec: LaunchSpec) -> str:
    """The ``-object`` value for guest RAM."""
    if spec.ram_file is None:
        return f"memory-backend-ram,id={RAM_BACKEND_ID},size={size_mib}M"
    return (
        f"memory-backend-file,id={RAM_BACKEND_ID},size={size_mib}M,"
        f"mem-path={qemu_escape(spec.ram_file)},share={_onoff(spec.ram_shared)}"
    )


def unsupported(what: str) -> SmartVMError:
    return SmartVMError(ErrorCode.UNSUPPORTED_BY_ENGINE, f"{what} is not supported by the qemu engine")


def detect_disk_format(path: str | Path) -> DiskFormat:
    """qcow2 when the file starts with the qcow2 magic, else raw."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise SmartVMError(
            ErrorCode.INVALID_CONFIG, f"cannot read disk image {path}: {exc.strerror}"
        ) from exc
    return "qcow2" if head == _QCOW2_MAGIC else "raw"


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lives on a memory filesystem (tmpfs/ramfs), from /proc/self/mounts."""
    target = str(path.resolve())
    best, fstype = "", ""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype in ("tmpfs", "ramfs")


def qemu_escape(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _opts(kind: str, **values: str | int | None) -> str:
    parts = [kind] if kind else []
    parts += [f"{k.replace('_', '-')}={v}" for k, v in values.items() if v is not None]
    return ",".join(parts)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _rate(bucket: TokenBucket | None) -> int | None:
    """Sustained rate per second of a token bucket (size tokens every refill_time ms)."""
    if bucket is None or bucket.refill_time == 0 or bucket.size == 0:
        return None
    return max(1, bucket.size * 1000 // bucket.refill_time)


def kernel_cmdline(config: MicroVMConfig, spec: LaunchSpec) -> str:
    """The guest kernel command line: the user's args plus what this engine needs, never overriding."""
    user = config.boot_source.boot_args
    args = shlex.split(user) if user is not None else DEFAULT_BOOT_ARGS.split()
    extra: list[str] = []
    root = config.root_drive()
    if root is not None and not has_boot_arg(args, "root"):
        extra.append(f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda")
        if not (has_boot_arg(args, "ro") or has_boot_arg(args, "rw")):
            extra.append("ro" if root.is_read_only else "rw")
    if not has_boot_arg(args, "panic"):
        extra.append("panic=1")  # with -no-reboot a panicking guest ends QEMU instead of hanging
    if not has_boot_arg(args, AGENT_PORTS_ARG):
        extra.append(f"{AGENT_PORTS_ARG}={spec.agent_ports}")  # the agent stops looking for more then
    if spec.accel == "tcg":
        if spec.tsc_khz is not None and not has_boot_arg(args, "tsc_early_khz"):
            extra.append(f"tsc_early_khz={spec.tsc_khz}")
        for item in TCG_BOOT_ARGS:
            key = item.split("=", 1)[0]
            if key == "quiet" and (has_boot_arg(args, "loglevel") or has_boot_arg(args, "debug")):
                continue
            if not has_boot_arg(args, key):
                extra.append(item)
    return " ".join(shlex.quote(a) if any(c.isspace() for c in a) else a for a in args + extra)


def ordered_drives(config: MicroVMConfig) -> list[Drive]:
    """Drives in device order: the root drive first (``/dev/vda``), the rest as configured."""
    return sorted(config.drives, key=lambda d: not d.is_root_device)


def _drive_args(drive: Drive, fmt: DiskFormat) -> list[str]:
    if drive.io_engine == "Async":
        raise unsupported(f"drive {drive.drive_id!r}: io_engine='Async'")
    throttling: dict[str, str | int | None] = {}
    if drive.rate_limiter is not None:
        throttling["throttling.bps-total"] = _rate(drive.rate_limiter.bandwidth)
        throttling["throttling.iops-total"] = _rate(drive.rate_limiter.ops)
    cache = "unsafe" if drive.cache_type == "Unsafe" else "writeback"
    blockdev = ",".join(
        [
            f"id=drive-{drive.drive_id}",
            f"file={qemu_escape(drive.path_on_host)}",
            f"format={fmt}",
            "if=none",
            f"readonly={_onoff(drive.is_read_only)}",
            f"cache={cache}",
            *(f"{k}={v}" for k, v in throttling.items() if v is not None),
        ]
    )
    device = _opts("virtio-blk-device", drive=f"drive-{drive.drive_id}", id=f"blk-{drive.drive_id}")
    return ["-drive", blockdev, "-device", device]


def _check_no_net_limits(limiter: RateLimiter | None, iface_id: str) -> None:
    if limiter is not None and (limiter.bandwidth is not None or limiter.ops is not None):
        raise unsupported(f"network interface {iface_id!r}: rate limiters")


def build_argv(config: MicroVMConfig, runtime: VMRuntime, spec: LaunchSpec) -> list[str]:
    """The full argv for one VM. Raises UNSUPPORTED_BY_ENGINE for settings QEMU cannot honour."""
    mc = config.machine_config
    if mc.cpu_template not in (None, "None"):
        raise unsupported(f"cpu_template {mc.cpu_template!r}")
    if mc.huge_pages == "2M":
        raise unsupported("huge_pages='2M'")
    if config.vsock is not None:
        raise unsupported("vsock (no vhost-vsock backend; the agent channel is a virtio-serial port)")
    if config.mmds is not None:
        raise unsupported("MMDS")
    if config.metrics is not None:
        raise unsupported("metrics")

    smp = str(mc.vcpu_count)
    if mc.smt and mc.vcpu_count > 1:
        smp += f",sockets=1,cores={mc.vcpu_count // 2},threads=2"
    argv = [
        spec.binary,
        "-name",
        qemu_escape(config.id),
        "-M",
        f"microvm,memory-backend={RAM_BACKEND_ID}",
        "-object",
        ram_backend(mc.mem_size_mib, spec),
        "-accel",
        spec.accel,
        "-cpu",
        "host" if spec.accel == "kvm" else TCG_CPU,
        "-smp",
        smp,
        "-m",
        f"{mc.mem_size_mib}M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]
    if spec.incoming_fd is None and not spec.incoming:
        # a restore runs the saved guest (and a reboot ends QEMU, -no-reboot): the kernel image would
        # be read and parsed for nothing, ~5 ms of every resume (QEMU skips copying it into RAM then)
        argv += ["-kernel", qemu_escape(config.boot_source.kernel_image_path)]
        argv += ["-append", kernel_cmdline(config, spec)]
        if config.boot_source.initrd_path is not None:
            argv += ["-initrd", qemu_escape(config.boot_source.initrd_path)]
    argv += [
        "-chardev",
        f"file,id=console,path={qemu_escape(runtime.console_log)}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=qmp,path={qemu_escape(runtime.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    for drive in ordered_drives(config):
        argv += _drive_args(drive, spec.drive_formats.get(drive.drive_id, "raw"))
    for iface in config.network_interfaces:
        _check_no_net_limits(iface.rx_rate_limiter, iface.iface_id)
        _check_no_net_limits(iface.tx_rate_limiter, iface.iface_id)
        argv += [
            "-netdev",
            _opts(
                "tap", id=f"net-{iface.iface_id}", ifname=iface.host_dev_name, script="no", downscript="no"
            ),
            "-device",
            _opts(
                "virtio-net-device",
                netdev=f"net-{iface.iface_id}",
                id=f"nic-{iface.iface_id}",
                mac=iface.guest_mac,
                host_mtu=iface.mtu,
            ),
        ]
    if config.balloon is not None:
        b = config.balloon
        argv += [
            "-device",
            _opts(
                "virtio-balloon-device",
                id="balloon0",
                deflate_on_oom=_onoff(b.deflate_on_oom),
                free_page_reporting=_onoff(bool(b.free_page_reporting)),
                free_page_hint=_onoff(bool(b.free_page_hinting)),
            ),
        ]
    if config.entropy is not None:
        bucket = config.entropy.rate_limiter.bandwidth if config.entropy.rate_limiter else None
        limits: dict[str, str | int | None] = {}
        if bucket is not None and bucket.size and bucket.refill_time:
            limits = {"max-bytes": bucket.size, "period": bucket.refill_time}
        argv += [
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            ",".join(["virtio-rng-device", "rng=rng0", *(f"{k}={v}" for k, v in limits.items())]),
        ]
    argv += port_args(runtime, spec.agent_ports)
    if spec.incoming_fd is not None or spec.incoming:
        argv += RESTORE_GLOBALS
    if spec.incoming_fd is not None:
        # the MIGRATION events QMP would switch on, as a property of QEMU's migration object
        argv += ["-global", "migration.x-events=on", "-incoming", f"fd:{spec.incoming_fd}"]
    elif spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


def device_layout(config: MicroVMConfig, ports: int = AGENT_PORTS) -> dict[str, object]:
    """What must match between a snapshot and its restore (stored in the manifest's engine_data).

    ``agent_ports`` is not the config's: a restore takes it from the snapshot (absent in snapshots
    from before multi-port agents: one port)."""
    return {
        "agent_ports": ports,
        "mem_size_mib": config.machine_config.mem_size_mib,
        "vcpu_count": config.machine_config.vcpu_count,
        "drives": [d.drive_id for d in ordered_drives(config)],
        "network_interfaces": [i.iface_id for i in config.network_interfaces],
        "balloon": config.balloon is not None,
        "entropy": config.entropy is not None,
    }
