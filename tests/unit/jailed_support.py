"""Shared setup for the jailer tests: options, a VM config and the "nothing left behind" check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fc_fake.helpers import fake_vm_config, logged_requests, processes_rooted_in, processes_running

from smartvm.config import Logger, Metrics, MicroVMConfig
from smartvm.options import JailerOptions, SmartVMOptions

UID, GID = 4321, 4322


def jailed_options(tmp: Path, **jailer: Any) -> SmartVMOptions:
    base = jailer.pop("chroot_base_dir", tmp / "jail")
    return SmartVMOptions(
        engine="firecracker",
        firecracker_binary_path=tmp / "bin" / "firecracker",
        runtime_dir=tmp / "rt",
        data_dir=tmp / "data",
        socket_timeout_s=5,
        stop_timeout_s=2,
        jailer=JailerOptions(uid=UID, gid=GID, chroot_base_dir=base, **jailer),
    )


def vm_config(tmp: Path, vm_id: str = "vm1", *, logs: bool = False, **extra: Any) -> MicroVMConfig:
    if logs:
        extra["logger"] = Logger(log_path=str(tmp / "fc.log"), level="Info")
        extra["metrics"] = Metrics(metrics_path=str(tmp / "metrics.json"))
    return fake_vm_config(tmp, vm_id, data_drive=True, **extra)


def jail_root(options: SmartVMOptions, vm_id: str = "vm1") -> Path:
    assert options.jailer is not None
    return options.jailer.chroot_base_dir / "firecracker" / vm_id / "root"


def fc_paths(tmp: Path) -> list[str]:
    """Every path-like value the fake Firecracker was sent."""
    keys = (
        "path_on_host",
        "kernel_image_path",
        "initrd_path",
        "log_path",
        "metrics_path",
        "uds_path",
        "snapshot_path",
        "mem_file_path",
        "backend_path",
    )
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k in keys and isinstance(v, str):
                    found.append(v)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for request in logged_requests(tmp):
        walk(request["body"])
    return found


def proc_root(pid: int) -> Path:
    """The root directory (chroot) of a process."""
    return Path(f"/proc/{pid}/root").resolve()


def fc_uid_gid(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1]
    return int(uid), int(gid)


def assert_no_jail_left(options: SmartVMOptions, binary: Path) -> None:
    """No process in or around a jail, no jail directory, no runtime dir, no mount on the host."""
    assert options.jailer is not None
    base = options.jailer.chroot_base_dir
    assert processes_rooted_in(base) == []
    assert processes_running(binary) == []  # the jailer names the fake binary in --exec-file
    assert not (base / "firecracker").exists(), list((base / "firecracker").rglob("*"))
    assert not options.runtime_dir.exists() or list(options.runtime_dir.iterdir()) == []
    assert str(base) not in Path("/proc/self/mountinfo").read_text()
