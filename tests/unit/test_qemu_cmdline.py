"""MicroVMConfig -> qemu-system-x86_64 argv (pure translation)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from smartvm.config import MicroVMConfig
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.runtime import VMRuntime
from smartvm.qemu.agent_ports import AGENT_PORTS
from smartvm.qemu.cmdline import LaunchSpec, build_argv, detect_disk_format, kernel_cmdline, on_tmpfs

RUNTIME = VMRuntime(vm_id="vm1", dir=Path("/run/sv/vm1"))
TCG = LaunchSpec(binary="/usr/bin/qemu-system-x86_64", accel="tcg", tsc_khz=2_300_000)
KVM = LaunchSpec(binary="/usr/bin/qemu-system-x86_64", accel="kvm")


def config(**fields: Any) -> MicroVMConfig:
    data: dict[str, Any] = {
        "id": "vm1",
        "boot_source": {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"},
    }
    data.update(fields)
    return MicroVMConfig.model_validate(data)


def option_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_memory_cpus_and_fixed_flags() -> None:
    argv = build_argv(config(machine_config={"vcpu_count": 2, "mem_size_mib": 384}), RUNTIME, TCG)
    assert argv[0] == TCG.binary
    assert option_values(argv, "-M") == ["microvm,memory-backend=ram"]
    assert option_values(argv, "-object") == ["memory-backend-ram,id=ram,size=384M"]
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-smp") == ["2"]
    assert option_values(argv, "-m") == ["384M"]
    assert option_values(argv, "-kernel") == ["/k/vmlinux"]
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    assert "-incoming" not in argv
    assert option_values(argv, "-cpu") == ["qemu64,+arat"]  # TCG: the default model, with ARAT


def test_console_qmp_and_agent_channel_live_in_the_runtime_dir() -> None:
    argv = build_argv(config(), RUNTIME, TCG)
    chardevs = option_values(argv, "-chardev")
    assert "file,id=console,path=/run/sv/vm1/console.log" in chardevs
    assert "socket,id=qmp,path=/run/sv/vm1/qmp.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent,path=/run/sv/vm1/agent.sock,server=on,wait=off" in chardevs
    assert "socket,id=agent7,path=/run/sv/vm1/agent.7.sock,server=on,wait=off" in chardevs
    assert option_values(argv, "-serial") == ["chardev:console"]
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]
    devices = option_values(argv, "-device")
    assert f"virtio-serial-device,id=vser0,max_ports={AGENT_PORTS + 1}" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=smartvm.agent" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent7,name=smartvm.agent.7" in devices
    assert len([d for d in devices if d.startswith("virtserialport,")]) == AGENT_PORTS == 8


def test_a_single_agent_port_is_the_layout_of_older_snapshots() -> None:
    """Restoring a snapshot taken before multi-port agents needs exactly its device set back."""
    argv = build_argv(config(), RUNTIME, dataclasses.replace(TCG, agent_ports=1))
    devices = option_values(argv, "-device")
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert [d for d in devices if d.startswith("virtserialport,")] == [
        "virtserialport,bus=vser0.0,chardev=agent,name=smartvm.agent"
    ]


def test_tcg_boot_args_are_added_but_never_override_the_user() -> None:
    args = kernel_cmdline(config(), TCG).split()
    assert args[0] == "console=ttyS0"
    for item in (
        "tsc_early_khz=2300000",
        "cryptomgr.notests=1",
        "max_loop=1",
        "quiet",
        "panic=1",
        "tsc=reliable",
    ):
        assert item in args
    user_args = "tsc_early_khz=1000 loglevel=8 panic=5 tsc=unstable"
    user = config(boot_source={"kernel_image_path": "/k", "boot_args": user_args})
    args = kernel_cmdline(user, TCG).split()
    assert [a for a in args if a.startswith("tsc_early_khz")] == ["tsc_early_khz=1000"]
    assert "quiet" not in args  # the user asked for a log level
    assert [a for a in args if a.startswith("panic")] == ["panic=5"]
    assert [a for a in args if a.startswith("tsc=")] == ["tsc=unstable"]


def test_kvm_gets_no_tcg_workarounds_and_the_host_cpu() -> None:
    argv = build_argv(config(), RUNTIME, KVM)
    append = option_values(argv, "-append")[0]
    assert "tsc_early_khz" not in append and "cryptomgr.notests" not in append
    assert option_values(argv, "-cpu") == ["host"]


def test_default_boot_args_when_none_are_given() -> None:
    args = kernel_cmdline(config(boot_source={"kernel_image_path": "/k"}), KVM).split()
    assert "console=ttyS0" in args and "reboot=k" in args


def test_root_drive_comes_first_and_sets_root() -> None:
    cfg = config(
        drives=[
            {"drive_id": "data", "path_on_host": "/img/data,1.raw", "is_read_only": True},
            {"drive_id": "rootfs", "path_on_host": "/img/root.qcow2", "is_root_device": True},
        ]
    )
    spec = LaunchSpec(binary="q", accel="tcg", drive_formats={"rootfs": "qcow2", "data": "raw"})
    argv = build_argv(cfg, RUNTIME, spec)
    drives = option_values(argv, "-drive")
    assert drives[0].startswith("id=drive-rootfs,file=/img/root.qcow2,format=qcow2,if=none,readonly=off")
    assert drives[1].startswith("id=drive-data,file=/img/data,,1.raw,format=raw,if=none,readonly=on")
    blk = [d for d in option_values(argv, "-device") if d.startswith("virtio-blk-device")]
    assert blk == [
        "virtio-blk-device,drive=drive-rootfs,id=blk-rootfs",
        "virtio-blk-device,drive=drive-data,id=blk-data",
    ]
    args = kernel_cmdline(cfg, spec).split()
    assert "root=/dev/vda" in args and "rw" in args


def test_read_only_root_and_partuuid() -> None:
    cfg = config(
        drives=[
            {
                "drive_id": "r",
                "path_on_host": "/r",
                "is_root_device": True,
                "is_read_only": True,
                "partuuid": "abcd-01",
            }
        ]
    )
    args = kernel_cmdline(cfg, KVM).split()
    assert "root=PARTUUID=abcd-01" in args and "ro" in args


def test_drive_rate_limit_and_cache() -> None:
    cfg = config(
        drives=[
            {
                "drive_id": "d",
                "path_on_host": "/d",
                "cache_type": "Unsafe",
                "rate_limiter": {
                    "bandwidth": {"size": 1_000_000, "refill_time": 100},
                    "ops": {"size": 50, "refill_time": 1000},
                },
            }
        ]
    )
    drive = option_values(build_argv(cfg, RUNTIME, KVM), "-drive")[0]
    assert "cache=unsafe" in drive
    assert "throttling.bps-total=10000000" in drive and "throttling.iops-total=50" in drive


def test_network_interface_on_a_tap() -> None:
    cfg = config(
        network_interfaces=[
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02", "mtu": 1400}
        ]
    )
    argv = build_argv(cfg, RUNTIME, KVM)
    assert option_values(argv, "-netdev") == ["tap,id=net-eth0,ifname=tap0,script=no,downscript=no"]
    assert (
        "virtio-net-device,netdev=net-eth0,id=nic-eth0,mac=06:00:ac:10:00:02,host-mtu=1400"
        in option_values(argv, "-device")
    )


def test_balloon_and_entropy() -> None:
    cfg = config(
        balloon={"amount_mib": 0, "deflate_on_oom": True, "free_page_reporting": True},
        entropy={"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 1000}}},
    )
    argv = build_argv(cfg, RUNTIME, KVM)
    devices = option_values(argv, "-device")
    assert (
        "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on,free-page-hint=off"
        in devices
    )
    assert "virtio-rng-device,rng=rng0,max-bytes=4096,period=1000" in devices
    assert "rng-random,id=rng0,filename=/dev/urandom" in option_values(argv, "-object")


def test_guest_ram_in_a_file_shared_or_private() -> None:
    shared = LaunchSpec(binary="q", accel="tcg", ram_file=Path("/dev/shm/vm1/guest.ram"))
    assert option_values(build_argv(config(), RUNTIME, shared), "-object")[0] == (
        "memory-backend-file,id=ram,size=256M,mem-path=/dev/shm/vm1/guest.ram,share=on"
    )
    private = LaunchSpec(binary="q", accel="tcg", ram_file=Path("/snap/a,b.mem"), ram_shared=False)
    assert option_values(build_argv(config(), RUNTIME, private), "-object")[0] == (
        "memory-backend-file,id=ram,size=256M,mem-path=/snap/a,,b.mem,share=off"
    )


def test_on_tmpfs() -> None:
    assert on_tmpfs(Path("/dev/shm/some/where")) == (
        Path("/dev/shm").is_dir()
        and any(
            line.split()[1] == "/dev/shm" and line.split()[2] == "tmpfs"
            for line in Path("/proc/self/mounts").read_text().splitlines()
        )
    )
    assert not on_tmpfs(Path("/proc/self"))


def test_incoming_for_restore() -> None:
    """A restored guest is not announced on its (fresh) network: no ARP/NDP storm after the load."""
    argv = build_argv(config(), RUNTIME, LaunchSpec(binary="q", accel="tcg", incoming=True))
    assert option_values(argv, "-incoming") == ["defer"]
    assert option_values(argv, "-global") == ["migration.announce-rounds=0"]
    assert "-global" not in build_argv(config(), RUNTIME, TCG)  # a boot is not a restore


def test_a_restore_loads_no_kernel() -> None:
    """The restored guest is already running its kernel (and a reboot ends QEMU): reading and
    parsing the image would only slow every resume down."""
    initrd = config(boot_source={"kernel_image_path": "/k", "initrd_path": "/i"})
    boot = build_argv(initrd, RUNTIME, TCG)
    assert option_values(boot, "-kernel") == ["/k"] and option_values(boot, "-initrd") == ["/i"]
    assert len(option_values(boot, "-append")) == 1 and "-no-reboot" in boot
    for spec in (dataclasses.replace(TCG, incoming=True), dataclasses.replace(TCG, incoming_fd=3)):
        restore = build_argv(initrd, RUNTIME, spec)
        assert not {"-kernel", "-initrd", "-append"} & set(restore) and "-no-reboot" in restore


def test_incoming_from_an_inherited_descriptor() -> None:
    """A restore that loads while QEMU starts: the stream from fd 3, MIGRATION events on."""
    spec = LaunchSpec(binary="q", accel="tcg", incoming=True, incoming_fd=3)
    argv = build_argv(config(), RUNTIME, spec)
    assert option_values(argv, "-incoming") == ["fd:3"]
    assert set(option_values(argv, "-global")) == {"migration.x-events=on", "migration.announce-rounds=0"}


def test_the_guest_agent_learns_how_many_ports_it_has() -> None:
    """So that it stops looking for more once it serves them all (KVM or TCG alike)."""
    for spec in (TCG, KVM, dataclasses.replace(TCG, agent_ports=1)):
        args = kernel_cmdline(config(), spec).split()
        assert [a for a in args if a.startswith("smartvm.agent_ports")] == [
            f"smartvm.agent_ports={spec.agent_ports}"
        ]
    user = config(boot_source={"kernel_image_path": "/k", "boot_args": "smartvm.agent_ports=2"})
    assert [a for a in kernel_cmdline(user, TCG).split() if a.startswith("smartvm.agent")] == [
        "smartvm.agent_ports=2"
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"vsock": {"guest_cid": 3, "uds_path": "/v.sock"}},
        {
            "network_interfaces": [
                {
                    "iface_id": "e",
                    "host_dev_name": "t",
                    "rx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}},
                }
            ],
        },
        {"machine_config": {"cpu_template": "T2"}},
        {"drives": [{"drive_id": "d", "path_on_host": "/d", "io_engine": "Async"}]},
        {"metrics": {"metrics_path": "/m"}},
    ],
)
def test_what_qemu_cannot_honour_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(SmartVMError) as err:
        build_argv(config(**fields), RUNTIME, TCG)
    assert err.value.code == ErrorCode.UNSUPPORTED_BY_ENGINE


def test_detect_disk_format(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    assert detect_disk_format(raw) == "raw"
    assert detect_disk_format(qcow) == "qcow2"
    with pytest.raises(SmartVMError) as err:
        detect_disk_format(tmp_path / "missing")
    assert err.value.code == ErrorCode.INVALID_CONFIG
