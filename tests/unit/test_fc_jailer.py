"""Jailer command line and jail layout (no jailer binary is needed for these)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.firecracker.jailer import Jail, JailerConfig, mounts_under
from smartvm.firecracker.process import FirecrackerCommand


def _jail(base: Path, **kw: object) -> Jail:
    config = JailerConfig(
        jailer_binary=Path("/opt/fc/jailer"),
        firecracker_binary=Path("/opt/fc/firecracker"),
        vm_id="vm-1",
        uid=1234,
        gid=1235,
        chroot_base_dir=base,
        **kw,  # type: ignore[arg-type]
    )
    return Jail(config)


def test_argv_layout_and_firecracker_args_after_double_dash(tmp_path: Path) -> None:
    jail = _jail(
        tmp_path,
        netns="sv-ns1",
        cgroups={"cpu.max": "50000 100000"},
        cgroup_version=2,
        parent_cgroup="smartvm",
        resource_limits={"no-file": 1024},
        daemonize=True,
        new_pid_ns=True,
    )
    argv = jail.argv(["--api-sock", "/run/firecracker.socket", "--id", "vm-1"])
    assert argv == [
        "/opt/fc/jailer",
        "--id",
        "vm-1",
        "--exec-file",
        "/opt/fc/firecracker",
        "--uid",
        "1234",
        "--gid",
        "1235",
        "--chroot-base-dir",
        str(tmp_path),
        "--netns",
        "/var/run/netns/sv-ns1",
        "--cgroup-version",
        "2",
        "--parent-cgroup",
        "smartvm",
        "--cgroup",
        "cpu.max=50000 100000",
        "--resource-limit",
        "no-file=1024",
        "--daemonize",
        "--new-pid-ns",
        "--",
        "--api-sock",
        "/run/firecracker.socket",
        "--id",
        "vm-1",
    ]
    assert jail.root == tmp_path / "firecracker" / "vm-1" / "root"
    assert jail.api_socket == jail.root / "run" / "firecracker.socket"
    assert jail.pid_file == jail.root / "firecracker.pid"
    assert _jail(tmp_path).argv([])[-1] == "--"


@pytest.mark.parametrize(
    "kw", [{"vm_id": "bad id"}, {"cgroups": {"cpu max": "1"}}, {"cgroup_version": 3}, {"uid": -1}]
)
def test_bad_values_are_refused(tmp_path: Path, kw: dict[str, object]) -> None:
    base = {"jailer_binary": Path("/j"), "firecracker_binary": Path("/f"), "vm_id": "ok", "uid": 1, "gid": 1}
    with pytest.raises(SmartVMError) as err:
        JailerConfig(**{**base, **kw})  # type: ignore[arg-type]
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_link_in_hard_links_and_cleanup_removes_the_jail(tmp_path: Path) -> None:
    jail = _jail(tmp_path / "jails")
    jail.prepare()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"kernel")
    disk = tmp_path / "staged.ext4"
    disk.write_bytes(b"disk")
    assert jail.link_in(kernel) == "/vmlinux"
    assert jail.link_in(disk, "drives/rootfs.ext4", writable=True) == "/drives/rootfs.ext4"
    assert os.stat(jail.root / "vmlinux").st_ino == kernel.stat().st_ino  # no copy
    assert (jail.root / "drives" / "rootfs.ext4").stat().st_uid == 1234
    assert kernel.stat().st_uid == os.getuid()  # read-only resources keep their owner
    with pytest.raises(SmartVMError) as err:
        jail.prepare()
    assert err.value.code is ErrorCode.JAILER_FAILED
    with pytest.raises(SmartVMError) as err:
        jail.host_path("../../escape")
    assert err.value.code is ErrorCode.UNSAFE_PATH
    jail.cleanup()
    assert not jail.jail_dir.exists() and not (tmp_path / "jails" / "firecracker").exists()
    assert kernel.read_bytes() == b"kernel"  # the source survives
    jail.cleanup()


def test_link_in_copies_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp dir")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        jail = _jail(Path(other))
        jail.prepare()
        source = tmp_path / "rootfs.ext4"
        with source.open("wb") as f:
            f.write(b"data")
            f.truncate(64 << 20)
        jail.link_in(source)
        copied = jail.root / "rootfs.ext4"
        assert copied.read_bytes()[:4] == b"data" and copied.stat().st_size == 64 << 20
        assert copied.stat().st_ino != source.stat().st_ino
        assert copied.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
        jail.cleanup()
        assert not jail.jail_dir.exists()


def test_a_jailed_command_leaves_id_and_netns_to_the_jailer(tmp_path: Path) -> None:
    jail = _jail(tmp_path, netns="sv-ns1")
    command = FirecrackerCommand(
        binary=Path("/opt/fc/firecracker"), api_socket=jail.api_socket, vm_id="vm-1", jail=jail
    )
    argv = command.argv()
    assert argv[0] == "/opt/fc/jailer" and "ip" not in argv
    assert argv[argv.index("--") :] == ["--", "--api-sock", "/run/firecracker.socket"]
    with pytest.raises(SmartVMError) as err:  # the netns belongs in the jail's config
        FirecrackerCommand(binary=Path("/f"), api_socket=None, vm_id="v", netns="ns", jail=jail).argv()
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_make_dir_hands_new_directories_to_the_jail_user(tmp_path: Path) -> None:
    jail = _jail(tmp_path)
    jail.prepare()
    made = jail.make_dir("/a/b")
    assert made == jail.root / "a" / "b" and made.stat().st_uid == 1234
    assert (jail.root / "a").stat().st_uid == 1234 and jail.root.stat().st_uid == os.getuid()
    jail.cleanup()


def test_a_jail_with_a_mount_inside_is_never_removed(tmp_path: Path) -> None:
    """rmtree would descend into a bind mount and delete the mounted files: cleanup refuses then.

    Runs in a private mount namespace of its own (``unshare --mount --propagation private``), so the
    bind mount is never visible to, or left on, the host.
    """
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("precious")
    script = f"""
import subprocess
from pathlib import Path
from smartvm.firecracker.jailer import Jail, JailerConfig, mounts_under
jail = Jail(JailerConfig(jailer_binary=Path("/j"), firecracker_binary=Path("/f/firecracker"), vm_id="m",
                         uid=0, gid=0, chroot_base_dir=Path({str(tmp_path / "jails")!r})))
jail.prepare()
(jail.root / "usr").mkdir()
subprocess.run(["mount", "--bind", {str(precious)!r}, str(jail.root / "usr")], check=True)
assert mounts_under(jail.jail_dir) == [str(jail.root / "usr")]
jail.cleanup()
assert (jail.root / "usr" / "keep").read_text() == "precious", "rmtree went into the mount"
subprocess.run(["umount", str(jail.root / "usr")], check=True)
jail.cleanup()
assert not jail.jail_dir.exists()
"""
    try:
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError as exc:
        pytest.skip(f"no unshare: {exc}")
    if out.returncode != 0 and "unshare failed" in out.stderr:
        pytest.skip(f"cannot create a mount namespace: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert (precious / "keep").read_text() == "precious"
    assert mounts_under(tmp_path) == []
