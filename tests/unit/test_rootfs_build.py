"""Real root filesystem builds into a temporary cache, inspected with debugfs / unsquashfs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from error_support import raises_code
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images import native_agent, rootfs_build
from smartvm.images.rootfs_build import build_rootfs, rootfs_cache_key

pytestmark = pytest.mark.skipif(
    not (Path("/bin/busybox").exists() and shutil.which("mkfs.ext4") and shutil.which("debugfs")),
    reason="needs busybox-static and e2fsprogs (scripts/setup installs them)",
)

AGENT = rootfs_build.AGENT_DIR / "guest.py"
WIRE = rootfs_build.AGENT_DIR / "wire.py"


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)
    return out.stdout


def link_target(image: Path, path: str) -> str:
    """The target of a symlink inside an ext4 image (debugfs prints fast links in `stat`)."""
    for line in debugfs(image, f"stat {path}").splitlines():
        if "Fast link dest:" in line:
            return line.split(":", 1)[1].strip().strip('"')
    raise AssertionError(f"{path} is not a symlink in {image}")


def rootfs_entries(cache: Path) -> list[str]:
    area = cache / "rootfs"
    return sorted(p.name for p in area.iterdir()) if area.exists() else []


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    return build_rootfs("busybox", cache_dir=cache, progress=False)


def assert_bytecode_matches(image: Path, tmp_path: Path, module: str, source: Path) -> None:
    """An agent file ships as hash-checked bytecode of exactly the shipped source (PEP 552 header)."""
    ls = debugfs(image, "ls /opt/smartvm/__pycache__")
    [name] = re.findall(module + r"\.cpython-\d+\.pyc", ls)
    pyc = tmp_path / name
    debugfs(image, f"dump /opt/smartvm/__pycache__/{name} {pyc}")
    header = pyc.read_bytes()[:16]
    flags = int.from_bytes(header[4:8], "little")
    assert flags == 0b11  # hash-based, checked against the source at import
    guest_python = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import importlib.util, sys; src = open(sys.argv[1], 'rb').read(); "
            "print(importlib.util.MAGIC_NUMBER.hex(), importlib.util.source_hash(src).hex())",
            str(source),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [header[:4].hex(), header[8:16].hex()] == guest_python


def test_busybox_image_has_init_python_and_agent(busybox_image: Path, tmp_path: Path) -> None:
    assert busybox_image.name == "rootfs.ext4"
    top = debugfs(busybox_image, "ls -l /")
    for name in ("opt", "etc", "usr", "proc", "sys", "dev", "tmp", "run"):
        assert f" {name}" in top, f"/{name} missing from the image root:\n{top}"

    inittab = debugfs(busybox_image, "cat /etc/inittab")
    assert "::sysinit:/opt/smartvm/rcS" in inittab
    assert "::shutdown:/opt/smartvm/rcK" in inittab
    assert link_target(busybox_image, "/sbin") == "usr/sbin"
    assert link_target(busybox_image, "/usr/sbin/init") == "/opt/smartvm/bin/busybox"
    assert "SMARTVM_INIT_READY" in debugfs(busybox_image, "cat /opt/smartvm/rcS")
    assert "poweroff" in debugfs(busybox_image, "cat /opt/smartvm/acpi/PWRF/00000080")

    assert link_target(busybox_image, "/usr/bin/python3").startswith("python3")
    python = link_target(busybox_image, "/usr/bin/python3")
    assert "Type: regular" in debugfs(busybox_image, f"stat /usr/bin/{python}")
    assert "os.py" in debugfs(busybox_image, f"ls /usr/lib/{python}")
    assert "ld-linux-x86-64.so.2" in debugfs(busybox_image, "ls /usr/lib64")
    stdlib = debugfs(busybox_image, f"ls /usr/lib/{python}")
    assert " test " not in stdlib and "idlelib" not in stdlib  # trimmed

    bash = rootfs_build.guest_bash()  # bash-static when the host has it: no loader, no libraries
    guest_bash = debugfs(busybox_image, f"stat {rootfs_build.HOST_BASH.resolve()}")
    assert f"Size: {bash.stat().st_size}" in guest_bash, guest_bash

    if AGENT.is_file():
        assert "::respawn:/opt/smartvm/run-agent" in inittab
        assert debugfs(busybox_image, "cat /opt/smartvm/agent.py") == AGENT.read_text()
        assert debugfs(busybox_image, "cat /opt/smartvm/wire.py") == WIRE.read_text()
        runner = debugfs(busybox_image, "cat /opt/smartvm/run-agent")
        assert "/usr/bin/python3 -c" in runner and "import agent" in runner
        assert_bytecode_matches(busybox_image, tmp_path, "agent", AGENT)
        assert_bytecode_matches(busybox_image, tmp_path, "wire", WIRE)
        if native_agent.go_tool() is not None:  # the native agent, preferred by run-agent
            assert "/opt/smartvm/agent-native" in runner
            assert "Type: regular    Mode:  0755" in debugfs(busybox_image, "stat /opt/smartvm/agent-native")
    else:
        assert "run-agent" not in inittab


def test_second_call_is_a_cache_hit(busybox_image: Path) -> None:
    cache = busybox_image.parents[2]
    before = busybox_image.stat()
    entries = rootfs_entries(cache)
    again = build_rootfs("busybox", cache_dir=cache, progress=False)
    after = again.stat()
    assert again == busybox_image
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert rootfs_entries(cache) == entries


def test_cache_key_follows_inputs() -> None:
    base = rootfs_cache_key("busybox")
    assert rootfs_cache_key("busybox") == base
    assert rootfs_cache_key("busybox", fmt="squashfs") != base
    assert rootfs_cache_key("busybox", with_agent=False) != base
    assert rootfs_cache_key("busybox", size_mib=300) != base


def test_cache_key_follows_each_agent_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest runs agent.py and the wire module beside it: a change to either is a new image."""
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    for name in ("guest.py", "wire.py"):
        shutil.copy(rootfs_build.AGENT_DIR / name, agent_dir / name)
    base = rootfs_cache_key("busybox")
    monkeypatch.setattr(rootfs_build, "AGENT_DIR", agent_dir)
    assert rootfs_cache_key("busybox") == base
    keys = {base}
    for name in ("guest.py", "wire.py"):
        with (agent_dir / name).open("a") as f:
            f.write("# changed\n")
        keys.add(rootfs_cache_key("busybox"))
    assert len(keys) == 3


def test_cache_key_follows_the_native_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to a Go source of the native agent is a new image; so is an image without it."""
    if native_agent.go_tool() is None:
        pytest.skip("no go toolchain")
    native = tmp_path / "native"
    shutil.copytree(native_agent.NATIVE_DIR, native)
    base = rootfs_cache_key("busybox")
    monkeypatch.setattr(native_agent, "NATIVE_DIR", native)
    assert rootfs_cache_key("busybox") == base
    (native / "wire_test.go").write_text("package main\n")  # tests are not part of the binary
    assert rootfs_cache_key("busybox") == base
    with (native / "main.go").open("a") as f:
        f.write("// changed\n")
    changed = rootfs_cache_key("busybox")
    monkeypatch.setenv("SMARTVM_NATIVE_AGENT", "0")
    assert len({base, changed, rootfs_cache_key("busybox")}) == 3


def test_cache_key_follows_the_guest_bash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installing or upgrading bash-static (or bash) on the host is a new busybox image."""
    fake = tmp_path / "bash-static"
    fake.write_bytes(b"\x7fELF static bash")
    monkeypatch.setattr(rootfs_build, "HOST_BASH_STATIC", fake)
    with_static = rootfs_cache_key("busybox")
    fake.write_bytes(b"\x7fELF static bash, newer")
    monkeypatch.setattr(rootfs_build, "HOST_BASH_STATIC", tmp_path / "missing")
    assert rootfs_build.guest_bash() == rootfs_build.HOST_BASH
    without = rootfs_cache_key("busybox")
    monkeypatch.setattr(rootfs_build, "HOST_BASH_STATIC", fake)
    assert len({with_static, rootfs_cache_key("busybox"), without}) == 3


def test_image_without_go_keeps_the_python_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No go toolchain (or SMARTVM_NATIVE_AGENT=0): no native binary, and run-agent, which starts it
    only when it is there, runs the Python agent as before."""
    monkeypatch.setenv("SMARTVM_NATIVE_AGENT", "0")
    image = build_rootfs("busybox", cache_dir=tmp_path, progress=False)
    assert "agent-native" not in debugfs(image, "ls /opt/smartvm")
    assert debugfs(image, "cat /opt/smartvm/agent.py") == AGENT.read_text()
    runner = debugfs(image, "cat /opt/smartvm/run-agent")
    assert "[ -x /opt/smartvm/agent-native ] && exec" in runner and "import agent" in runner


def test_failed_step_leaves_nothing_behind(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    (base / "data" / "big").write_bytes(os.urandom(3 << 20))
    cache = tmp_path / "cache"
    with raises_code(ErrorCode.BUILD_FAILED) as info:
        build_rootfs("dir", source=base, size_mib=1, cache_dir=cache, with_agent=False, progress=False)
    err = info.value
    assert err.code == ErrorCode.BUILD_FAILED
    assert "mkfs.ext4" in err.message
    log = cache / "logs" / f"rootfs-{rootfs_cache_key('dir', source=base, size_mib=1, with_agent=False)}.log"
    assert str(log) in err.message and log.is_file()
    assert rootfs_entries(cache) == []


def test_dir_source_without_python_gets_init_and_keeps_its_files(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "hostname").write_text("custom\n")
    (base / "hello.txt").write_text("from the base image\n")
    image = build_rootfs("dir", source=base, cache_dir=tmp_path / "cache", with_agent=False, progress=False)
    assert debugfs(image, "cat /hello.txt") == "from the base image\n"
    assert debugfs(image, "cat /etc/hostname") == "custom\n"
    assert "::sysinit:/opt/smartvm/rcS" in debugfs(image, "cat /etc/inittab")
    assert link_target(image, "/sbin/init") == "/opt/smartvm/bin/busybox"
    assert "Type: regular" in debugfs(image, "stat /opt/smartvm/bin/busybox")
    assert link_target(image, "/opt/smartvm/bin/mount") == "busybox"


def test_tar_source_gets_python_when_missing(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "srv").mkdir(parents=True)
    (tree / "srv" / "app.txt").write_text("app\n")
    tarball = tmp_path / "export.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(tree, arcname=".")
    image = build_rootfs("tar", source=tarball, cache_dir=tmp_path / "cache", progress=False)
    assert debugfs(image, "cat /srv/app.txt") == "app\n"
    python = link_target(image, "/usr/bin/python3")
    assert "Type: regular" in debugfs(image, f"stat /usr/bin/{python}")


@pytest.mark.skipif(shutil.which("unsquashfs") is None, reason="needs squashfs-tools")
def test_squashfs_image(tmp_path: Path) -> None:
    image = build_rootfs("busybox", fmt="squashfs", cache_dir=tmp_path, with_agent=False, progress=False)
    assert image.name == "rootfs.squashfs"
    listing = subprocess.run(
        ["unsquashfs", "-l", str(image)], capture_output=True, text=True, check=True
    ).stdout
    for path in ("/etc/inittab", "/opt/smartvm/rcS", "/opt/smartvm/bin/busybox", "/usr/sbin/init"):
        assert f"squashfs-root{path}\n" in listing


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SmartVMError) as info:
        build_rootfs("dir", cache_dir=tmp_path, progress=False)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(SmartVMError) as info:
        build_rootfs("tar", source=tmp_path / "missing.tar", cache_dir=tmp_path, progress=False)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    assert rootfs_entries(tmp_path) == []


@pytest.mark.skipif(
    os.environ.get("SMARTVM_TEST_DEBIAN") != "1",
    reason="set SMARTVM_TEST_DEBIAN=1 to run it (debootstrap takes minutes)",
)
def test_debian_image(tmp_path: Path) -> None:
    image = build_rootfs("debian", cache_dir=tmp_path, progress=False)
    assert "Type: regular" in debugfs(image, "stat /usr/bin/python3.11")
    assert "::sysinit:/opt/smartvm/rcS" in debugfs(image, "cat /etc/inittab")
    assert link_target(image, "/usr/sbin/init") == "/opt/smartvm/bin/busybox"


def test_leftovers_of_a_killed_build_are_swept(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    cache = tmp_path / "cache"
    key = rootfs_cache_key("dir", source=base, with_agent=False)
    stale = cache / "rootfs" / f".build-{key}-killed"
    (stale / "root").mkdir(parents=True)
    image = build_rootfs("dir", source=base, cache_dir=cache, with_agent=False, progress=False)
    assert not stale.exists()
    assert rootfs_entries(cache) == [key]
    assert image == cache / "rootfs" / key / "rootfs.ext4"


def test_hostile_symlinks_in_the_base_stay_inside_the_image(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base = tmp_path / "base"
    base.mkdir()
    (base / "etc").symlink_to(outside)  # absolute: must mean /…/outside inside the image
    (base / "opt").symlink_to("../../../../../../" + str(outside).lstrip("/"))
    (base / "sbin").symlink_to("usr/sbin")
    image = build_rootfs("dir", source=base, cache_dir=tmp_path / "cache", with_agent=False, progress=False)
    assert list(outside.iterdir()) == []
    inittab = debugfs(image, f"cat {outside}/inittab")
    assert "::sysinit:/opt/smartvm/rcS" in inittab
    assert link_target(image, "/usr/sbin/init") == "/opt/smartvm/bin/busybox"


def test_cli_prints_the_image_path_last(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    cache = tmp_path / "cache"
    args = ["images", "build-rootfs", "--kind", "dir", "--source", str(base), "--no-agent"]
    run = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", *args, "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip().splitlines()[-1])
    assert path == cache / "rootfs" / rootfs_cache_key("dir", source=base, with_agent=False) / "rootfs.ext4"
    assert path.is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "smartvm.cli", "images", "build-rootfs", "--kind", "tar"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "--source" in missing.stderr


def test_older_builds_of_the_same_recipe_are_evicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change of the agent or init files is a new key; only the newest two builds of a recipe stay,
    and builds of other recipes are left alone."""
    source = tmp_path / "base"
    (source / "etc").mkdir(parents=True)
    other = build_rootfs("dir", source=source, cache_dir=tmp_path / "cache", progress=False)
    builds = []
    for version in ("t1", "t2", "t3"):
        monkeypatch.setattr(rootfs_build, "BUILDER_VERSION", version)  # as a new agent would
        builds.append(build_rootfs("busybox", cache_dir=tmp_path / "cache", progress=False))
    assert len({b.parent for b in builds}) == 3
    assert [b.is_file() for b in builds] == [False, True, True]
    assert other.is_file()  # another recipe (a dir source) is not evicted by busybox builds
    assert sorted(p.name for p in (tmp_path / "cache" / "rootfs").iterdir()) == sorted(
        [builds[1].parent.name, builds[2].parent.name, other.parent.name]
    )
