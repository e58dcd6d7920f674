"""Firecracker under the (fake) jailer: a real chroot in a private mount namespace, a real uid/gid drop,
real netns and PID namespaces; every test checks that the jail and its processes are gone at the end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fc_fake.helpers import (
    jailer_invocations,
    logged_requests,
    processes_rooted_in,
    read_until,
    text,
    vsock_ping,
)
from jailed_support import (
    GID,
    UID,
    assert_no_jail_left,
    fc_paths,
    fc_uid_gid,
    jail_root,
    jailed_options,
    proc_root,
    vm_config,
)

import smartvm
from smartvm import SmartVMError
from smartvm.errors import ErrorCode
from smartvm.firecracker.metrics import read_metrics
from smartvm.options import JailerOptions, SmartVMOptions
from smartvm.orchestrator import SmartVM
from smartvm.vm import VMState

pytest_plugins = ["fc_fake.fixtures"]


@pytest.fixture
async def svm(fake_jailer: Path, short_tmp: Path) -> AsyncIterator[SmartVM]:
    async with SmartVM(jailed_options(short_tmp)) as manager:
        yield manager


def _fc_pid(svm: SmartVM) -> int:
    assert svm.options.jailer is not None
    [pid] = processes_rooted_in(svm.options.jailer.chroot_base_dir)
    return pid


def test_jailer_options_are_validated_and_exported() -> None:
    assert smartvm.JailerOptions is JailerOptions
    assert SmartVMOptions().jailer is None  # opt-in
    assert JailerOptions(uid=1, gid=2).chroot_base_dir == Path("/srv/jailer")
    for bad in (
        {"uid": -1},
        {"cgroups": {"cpu max": "1"}},
        {"cgroups": {"cpu.max": ""}},
        {"cgroup_version": 3},
        {"resource_limits": {"nproc": 1}},
        {"parent_cgroup": "../escape"},
        {"parent_cgroup": "/abs"},
    ):
        with pytest.raises(SmartVMError) as err:
            JailerOptions.model_validate({"uid": 1, "gid": 1, **bad})
        assert err.value.code is ErrorCode.INVALID_CONFIG and next(iter(bad)) in err.value.message


async def test_boot_runs_firecracker_chrooted_as_the_jail_user(
    svm: SmartVM, fake_binary: Path, short_tmp: Path
) -> None:
    options = svm.options.model_copy(
        update={
            "jailer": JailerOptions(
                uid=UID,
                gid=GID,
                chroot_base_dir=short_tmp / "jail",
                cgroups={"cpu.max": "50000 100000"},
                cgroup_version=2,
                parent_cgroup="smartvm",
                resource_limits={"no-file": 1024},
            )
        }
    )
    async with SmartVM(options) as manager:
        config = vm_config(short_tmp, logs=True)
        vm = await manager.create_vm(config)
        await vm.start()
        root = jail_root(options)
        pid = _fc_pid(manager)
        assert fc_uid_gid(pid) == (UID, GID)
        assert proc_root(pid) == root

        # Firecracker saw only in-jail paths, and found every file there (the fake checks drives)
        sent = fc_paths(short_tmp)
        assert sent and not [p for p in sent if p.startswith(str(short_tmp))]
        assert {
            "/boot/vmlinux",
            "/drives/rootfs.ext4",
            "/drives/data.img",
            "/logs/fc.log",
            "/metrics/metrics.json",
            "/run/vsock.sock",
        } <= set(sent)
        assert [r for r in logged_requests(short_tmp) if r["status"] >= 300] == []
        assert vm.config == config  # the user's config is untouched

        # hard links, not copies; only the writable files were handed to the jail's uid
        images = short_tmp / "images"
        runtime_dir = vm.get_runtime_dir()
        assert runtime_dir is not None
        assert (root / "boot" / "vmlinux").stat().st_ino == (images / "vmlinux").stat().st_ino
        assert (root / "drives" / "data.img").stat().st_ino == (images / "data.img").stat().st_ino
        staged = runtime_dir / "drives" / "rootfs.ext4"
        assert (root / "drives" / "rootfs.ext4").stat().st_ino == staged.stat().st_ino
        assert staged.stat().st_uid == UID and (images / "vmlinux").stat().st_uid == os.geteuid()

        # the jailer's flags; Firecracker's come after "--" without --id (the jailer passes it)
        [call] = jailer_invocations(short_tmp)
        argv = call["argv"]
        assert argv[: argv.index("--")] == [
            "--id",
            "vm1",
            "--exec-file",
            str(fake_binary),
            "--uid",
            str(UID),
            "--gid",
            str(GID),
            "--chroot-base-dir",
            str(short_tmp / "jail"),
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "smartvm",
            "--cgroup",
            "cpu.max=50000 100000",
            "--resource-limit",
            "no-file=1024",
        ]
        assert argv[argv.index("--") + 1 :] == ["--api-sock", "/run/firecracker.socket"]
        assert text(f"/proc/{pid}/limits").count("1024") >= 2  # Max open files 1024 1024

        # console (the jailer child's stdout), vsock, metrics and update_drive all work through the jail
        assert vm.console_log_path is not None
        await read_until(vm.console_log_path, "SMARTVM_INIT_READY")
        assert await vsock_ping(vm._engine_or_raise()) == b"ping\n"
        await vm.flush_metrics()
        assert read_metrics(short_tmp / "metrics.json")[-1]["api_server"]  # the hard-linked host file
        other = images / "other.img"
        other.write_bytes(b"other")
        await vm.update_drive("data", str(other))
        data = next(d for d in (await vm.get_vm_config())["drives"] if d["drive_id"] == "data")
        assert data["path_on_host"] == "/drives/data-1.img"
        with pytest.raises(SmartVMError) as err:  # (MicroVM refuses unknown ids itself: ask the engine)
            await vm._engine_or_raise().update_drive("nope", str(other))
        assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR
        assert not (root / "drives" / "nope-2.img").exists()  # the failed update's link is gone again

        # the bind mounts of the fake exist only in Firecracker's private mount namespace
        assert str(root) not in text("/proc/self/mountinfo")
        assert list((root / "usr").iterdir()) == []
        assert " /usr " in text(f"/proc/{pid}/mountinfo")

        await vm.stop()
        assert vm.state is VMState.STOPPED
    assert_no_jail_left(options, fake_binary)
    assert (short_tmp / "images" / "rootfs.ext4").read_bytes() == b"pristine"


async def test_a_failure_half_way_leaves_no_jail(
    svm: SmartVM, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FC_FAIL", "PUT /drives/rootfs")
    vm = await svm.create_vm(vm_config(short_tmp))
    with pytest.raises(SmartVMError) as err:
        await vm.start()
    assert err.value.code is ErrorCode.FIRECRACKER_API_ERROR and "PUT /drives/rootfs" in err.value.message
    assert vm.state is VMState.ERROR
    assert_no_jail_left(svm.options, fake_binary)


@pytest.mark.parametrize("problem", ["leftover jail", "base is a file", "unreadable kernel", "bad exec name"])
async def test_jail_problems_are_reported_and_leave_nothing(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path, problem: str
) -> None:
    options = jailed_options(short_tmp)
    config = vm_config(short_tmp)
    code = ErrorCode.JAILER_FAILED
    if problem == "leftover jail":
        (jail_root(options) / "run").mkdir(parents=True)
    elif problem == "base is a file":
        options = jailed_options(short_tmp, chroot_base_dir=short_tmp / "file")
        (short_tmp / "file").write_text("")
    elif problem == "unreadable kernel":
        (short_tmp / "images" / "vmlinux").chmod(0o600)
    else:  # the real jailer refuses an exec file without "firecracker" in its name
        renamed = fake_binary.with_name("fc")
        os.rename(fake_binary, renamed)
        options = options.model_copy(update={"firecracker_binary_path": renamed})
        code = ErrorCode.FIRECRACKER_EXITED
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(config)
        with pytest.raises(SmartVMError) as err:
            await vm.start()
    assert err.value.code is code, err.value
    if problem == "leftover jail":  # someone else's jail is never removed
        assert (jail_root(options) / "run").is_dir()
        assert "already exists" in err.value.message
        return
    if problem == "bad exec name":
        assert "must contain" in err.value.message  # the jailer's own error, from the log tail
    assert_no_jail_left(options, fake_binary)


async def test_missing_jailer_binary(
    fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SMARTVM_JAILER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(short_tmp / "empty"))
    for options in (
        jailed_options(short_tmp),  # none next to firecracker, none on PATH
        jailed_options(short_tmp).model_copy(update={"jailer_binary_path": short_tmp / "nope"}),
    ):
        async with SmartVM(options) as svm:
            vm = await svm.create_vm(vm_config(short_tmp))
            with pytest.raises(SmartVMError) as err:
                await vm.start()
        assert err.value.code is ErrorCode.BINARY_NOT_FOUND
        assert "jailer_binary_path" in err.value.message and "SMARTVM_JAILER_BIN" in err.value.message
        assert_no_jail_left(options, fake_binary)
        assert not (short_tmp / "jail").exists()  # not even created


async def test_the_environment_variable_names_the_jailer(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = short_tmp / "other"
    elsewhere.mkdir()
    os.rename(fake_jailer, elsewhere / "jailer")
    monkeypatch.setenv("SMARTVM_JAILER_BIN", str(elsewhere / "jailer"))
    async with SmartVM(jailed_options(short_tmp)) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        await vm.start()
        await vm.stop()
    assert len(jailer_invocations(short_tmp)) == 1
    assert_no_jail_left(jailed_options(short_tmp), fake_binary)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"svjail-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


async def test_the_netns_goes_to_the_jailer(
    svm: SmartVM, fake_binary: Path, short_tmp: Path, netns: str
) -> None:
    vm = await svm.create_vm(vm_config(short_tmp), netns=netns)
    await vm.start()
    pid = _fc_pid(svm)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{netns}").st_ino
    [call] = jailer_invocations(short_tmp)
    assert call["argv"][call["argv"].index("--netns") + 1] == f"/var/run/netns/{netns}"
    assert "netns" not in " ".join(call["argv"][call["argv"].index("--") :])  # not `ip netns exec`
    await vm.stop()
    assert_no_jail_left(svm.options, fake_binary)


async def test_daemonize_execs_in_place_without_a_console(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path
) -> None:
    """The real jailer's --daemonize: setsid() and stdio to /dev/null, then exec (same pid)."""
    options = jailed_options(short_tmp, daemonize=True)
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        await vm.start()
        pid = _fc_pid(svm)
        [call] = jailer_invocations(short_tmp)
        assert call["pid"] == pid and os.getsid(pid) == pid  # it is its own session leader now
        assert await vsock_ping(vm._engine_or_raise()) == b"ping\n"
        assert vm.console_log_path is not None and vm.console_log_path.read_text() == ""  # lost (documented)
        await vm.stop()
        assert vm.state is VMState.STOPPED
    assert_no_jail_left(options, fake_binary)


@pytest.mark.parametrize("daemonize", [False, True])
async def test_new_pid_ns_adopts_firecracker_from_the_pid_file(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path, daemonize: bool
) -> None:
    options = jailed_options(short_tmp, new_pid_ns=True, daemonize=daemonize)
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        await vm.start()
        pid = _fc_pid(svm)
        root = jail_root(options)
        assert int(text(root / "firecracker.pid")) == pid
        [call] = jailer_invocations(short_tmp)
        assert call["pid"] != pid and text(f"/proc/{call['pid']}/stat") == ""  # the jailer exited, reaped
        nspid = next(line for line in text(f"/proc/{pid}/status").splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(pid), "1"]  # init of its own PID namespace
        assert vm.state is VMState.RUNNING and await vsock_ping(vm._engine_or_raise()) == b"ping\n"
        assert vm.console_log_path is not None
        if not daemonize:
            await read_until(vm.console_log_path, "SMARTVM_INIT_READY")
        await vm.kill()
        assert vm.state is VMState.STOPPED
    assert_no_jail_left(options, fake_binary)


async def test_new_pid_ns_guest_poweroff_is_noticed(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path
) -> None:
    options = jailed_options(short_tmp, new_pid_ns=True)
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        await vm.start()
        await vm.stop()  # SendCtrlAltDel: the adopted (not our child) Firecracker exits by itself
        assert vm.state is VMState.STOPPED
    assert_no_jail_left(options, fake_binary)


@pytest.mark.parametrize("mode", ["hang", "hang-after-fork", "exit", "exit-after-fork"])
async def test_a_pid_file_that_never_comes(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FAKE_JAILER_MODE", mode)
    options = jailed_options(short_tmp, new_pid_ns=True).model_copy(update={"socket_timeout_s": 1.5})
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        with pytest.raises(SmartVMError) as err:
            await vm.start()
    expected = ErrorCode.JAILER_FAILED if mode.startswith("exit") else ErrorCode.SOCKET_TIMEOUT
    assert err.value.code is expected, err.value
    assert "firecracker.pid" in err.value.message and "fake jailer told to" in err.value.message  # log tail
    assert_no_jail_left(options, fake_binary)


async def test_the_fake_jailer_really_records_its_argv(fake_jailer: Path, short_tmp: Path) -> None:
    """Sanity check of the fake itself: a flag it does not know is refused like the real one does."""
    out = await asyncio.to_thread(
        subprocess.run, [str(fake_jailer), "--bogus"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert json.loads((short_tmp / "jailer.jsonl").read_text())["argv"] == ["--bogus"]


async def test_a_users_own_writable_drive_is_linked_and_handed_over(
    svm: SmartVM, fake_binary: Path, short_tmp: Path
) -> None:
    """ephemeral=False: the guest must write the user's file, so it is hard-linked (never copied) and
    chowned to the jail's uid, which the JailerOptions docstring says."""
    config = vm_config(short_tmp)
    own = config.drives[0].model_copy(update={"ephemeral": False})
    vm = await svm.create_vm(config.model_copy(update={"drives": [own, *config.drives[1:]]}))
    await vm.start()
    user_file = short_tmp / "images" / "rootfs.ext4"
    linked = jail_root(svm.options) / "drives" / "rootfs.ext4"
    assert linked.stat().st_ino == user_file.stat().st_ino and user_file.stat().st_uid == UID
    assert "handed to ``uid``/``gid``" in (JailerOptions.__doc__ or "").replace("\n    ", " ")
    await vm.stop()
    assert_no_jail_left(svm.options, fake_binary)
    assert user_file.exists()


@pytest.fixture
def other_fs_base(short_tmp: Path) -> Iterator[Path]:
    """A chroot base on another filesystem than the VM's files (/dev/shm vs /tmp)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == short_tmp.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than /tmp")
    base = shm / f"svjail-{uuid.uuid4().hex[:8]}"
    yield base
    shutil.rmtree(base, ignore_errors=True)


async def test_a_jail_on_another_filesystem_copies_staged_drives_only(
    fake_jailer: Path, fake_binary: Path, short_tmp: Path, other_fs_base: Path
) -> None:
    options = jailed_options(short_tmp, chroot_base_dir=other_fs_base)
    async with SmartVM(options) as svm:
        vm = await svm.create_vm(vm_config(short_tmp))
        await vm.start()
        root = jail_root(options)
        runtime_dir = vm.get_runtime_dir()
        assert runtime_dir is not None
        in_jail = root / "drives" / "rootfs.ext4"
        assert in_jail.stat().st_ino != (runtime_dir / "drives" / "rootfs.ext4").stat().st_ino  # a copy
        in_jail.write_bytes(b"written by the guest")  # the guest writes the copy in the jail...
        snap = short_tmp / "snap"
        snapshot = await vm.create_snapshot(snap / "s", snap / "m", pause_vm=True)
        assert snapshot.disk_path("rootfs").read_bytes() == b"written by the guest"  # ...which is saved
        assert not (root / "snapshot").exists()  # moved out (copied: another filesystem)
        assert snapshot.state_path.is_file() and snapshot.state_path.stat().st_uid == os.geteuid()
        await vm.stop()

        config = vm_config(short_tmp, "vm2")
        own = config.drives[0].model_copy(update={"ephemeral": False})
        refused = await svm.create_vm(config.model_copy(update={"drives": [own, *config.drives[1:]]}))
        with pytest.raises(SmartVMError) as err:
            await refused.start()
        assert err.value.code is ErrorCode.JAILER_FAILED and "chroot_base_dir" in err.value.message
    assert_no_jail_left(options, fake_binary)
