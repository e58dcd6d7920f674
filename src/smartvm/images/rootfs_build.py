"""Build guest root filesystems (ext4 via ``mkfs.ext4 -d``, or squashfs) without mounts or loop devices.

Kinds:
- ``busybox`` (default): busybox-static, the host's Debian python3 (binary, the libraries ``ldd``
  lists, a trimmed stdlib), the guest agent and our init. Builds in seconds.
- ``debian``: ``debootstrap --variant=minbase --include=python3`` from the mirror the host's apt
  uses, plus the same init pieces. Takes minutes and needs root.
- ``dir`` / ``tar``: any directory or ``docker export``-style tarball as the base, plus our init.
  If the base has no ``/usr/bin/python3``, the host's runtime is added (existing files are kept).

Every image gets ``/opt/smartvm`` (busybox with all applet links, ``rcS``, ``rcK``, the agent
runner, the power-button action), ``/etc/inittab`` and ``/sbin/init`` -> busybox, per the guest
contract. Results are cached under ``<cache>/rootfs/<key>/rootfs.<fmt>``; the key hashes every
input (kind, format, size, source identity, busybox and python identity, the sha256 of each guest
file and of both agent files, ``smartvm/agent/guest.py`` and ``smartvm/agent/wire.py``, and of the
native agent's Go sources with the go toolchain's identity, see :mod:`smartvm.images.native_agent`,
which is built into ``/opt/smartvm/agent-native`` when the host has ``go``). A build runs
in a temporary directory that is removed whatever happens; the artifact directory appears by one
rename, so nothing half-written remains.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.images.build_steps import (
    BuildLog,
    StepProgress,
    cache_lock,
    digest,
    file_identity,
    remove_stale,
    require_file,
    require_tool,
    sha256_file,
)
from smartvm.images.cache_paths import cache_root
from smartvm.images.native_agent import NATIVE_IN_GUEST, build_native_agent, native_identity

RootfsKind = Literal["busybox", "debian", "dir", "tar"]
RootfsFormat = Literal["ext4", "squashfs"]

BUILDER_VERSION = "4"  # 3: the agent ships precompiled; 4: bash and the user account
BUSYBOX = Path("/bin/busybox")
HOST_PYTHON = Path("/usr/bin/python3")
HOST_BASH = Path("/bin/bash")
# Debian's bash-static. A dynamically linked bash starts in ~50-60 ms under TCG (the loader and its
# relocations), the static build in ~12 ms, and every command given as a string (`bash -l -c`, what
# E2B's commands.run sends) pays it: the guest gets the static one when the host has it.
HOST_BASH_STATIC = Path("/bin/bash-static")
USER_UID = 1000  # the guest's unprivileged ``user`` (etc/passwd)
GUEST_PYTHON = "/usr/bin/python3"
AGENT_IN_GUEST = "opt/smartvm/agent.py"
#: the agent's program files: where each goes in the guest <- its name in AGENT_DIR
AGENT_FILES = {AGENT_IN_GUEST: "guest.py", "opt/smartvm/wire.py": "wire.py"}
AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
BUILD_INFO = "build-info.json"
KEEP_BUILDS = 2  # per recipe: the current image and the one before it
MIN_SIZE_MIB = 64
FREE_SPACE_MIB = 64

# Parts of the stdlib a guest agent never needs (tests, GUI, build config, packaging tools).
_STDLIB_SKIP = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils", "venv"}
)
_STDLIB_SKIP_PREFIXES = ("config-3",)
_DYNLOAD_SKIP = re.compile(
    r"^(_test|_ctypes_test|xxlimited|_xxtestfuzz|_curses|readline|nis|ossaudiodev|_dbm)"
)
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def _guest_file(name: str) -> Traversable:
    return resources.files("smartvm.images") / "guest_files" / name


def _agent_sources() -> dict[str, Path] | None:
    """In-guest path -> host file of the agent (:data:`AGENT_FILES`), or None if it is not there."""
    found = {dest: AGENT_DIR / name for dest, name in AGENT_FILES.items()}
    return found if all(path.is_file() for path in found.values()) else None


def _guest_files_digest() -> str:
    root = resources.files("smartvm.images") / "guest_files"
    parts: list[str] = []
    stack: list[tuple[str, Traversable]] = [("", root)]
    while stack:
        prefix, node = stack.pop()
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                stack.append((rel + "/", child))
            else:
                parts += [rel, digest(child.read_bytes(), length=64)]
    return digest(*sorted(parts))


def _python_identity() -> str:
    real = HOST_PYTHON.resolve()
    if not real.is_file():
        return "no-host-python"  # the build will say what to install, if it needs it
    stdlib = Path("/usr/lib") / real.name / "os.py"
    return file_identity(real) + "\0" + (file_identity(stdlib) if stdlib.exists() else "")


def _dir_identity(path: Path) -> str:
    """Every entry's relative path, size and mtime: cheap, and changes when the tree does."""
    entries: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames) + dirnames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entries.append(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}")
    return digest(str(path.resolve()), *entries)


def _debian_source() -> tuple[str, str]:
    """(suite, mirror) the host's apt uses for Debian main."""
    suite = ""
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                suite = line.split("=", 1)[1].strip().strip('"')
    mirror = ""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        if not src.is_file() or src.suffix not in (".list", ".sources"):
            continue
        for line in src.read_text().splitlines():
            line = line.strip()
            m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line) or re.match(r"URIs:\s*(\S+)()", line)
            if m and "security" not in m.group(1) and "debian" in m.group(1):
                mirror = m.group(1)
                break
        if mirror:
            break
    return suite or "bookworm", mirror or "http://deb.debian.org/debian"


def rootfs_cache_key(
    kind: RootfsKind = "busybox",
    *,
    source: Path | None = None,
    fmt: RootfsFormat = "ext4",
    size_mib: int | None = None,
    with_agent: bool = True,
) -> str:
    """The cache key :func:`build_rootfs` uses for these arguments (cheap: stats and small hashes)."""
    parts = [BUILDER_VERSION, kind, fmt, str(size_mib), str(with_agent), file_identity(BUSYBOX)]
    parts.append(_guest_files_digest())
    agent = _agent_sources()
    if with_agent and agent is not None:
        parts += [f"{dest}={sha256_file(path)}" for dest, path in sorted(agent.items())]
        parts.append(native_identity())
    else:
        parts.append("no-agent")
    if kind == "debian":
        parts += _debian_source()
    elif kind == "dir" and source is not None:
        parts.append(_dir_identity(source))
    elif kind == "tar" and source is not None:
        parts.append(file_identity(source))
    if with_agent and kind != "debian":
        parts.append(_python_identity())
    if kind == "busybox":
        parts.append("bash=" + file_identity(guest_bash()))
    return digest(*parts)


def build_rootfs(
    kind: RootfsKind = "busybox",
    *,
    source: Path | None = None,
    fmt: RootfsFormat = "ext4",
    size_mib: int | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    with_agent: bool = True,
    progress: bool | None = None,
) -> Path:
    """Return the cached root filesystem image for these inputs, building it first if needed.

    ``source`` is required for ``dir`` (a directory) and ``tar`` (a tarball). ``size_mib`` fixes
    the ext4 size (default: content + 64 MiB free). ``with_agent=False`` leaves out the agent
    and, for ``busybox``, the Python runtime (a bare init image).
    Raises ``BUILD_TOOL_MISSING``, ``BUILD_FAILED`` or ``INVALID_ARGUMENT``.
    """
    if kind not in ("busybox", "debian", "dir", "tar"):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"unknown rootfs kind {kind!r}; use busybox|debian|dir|tar"
        )
    if fmt not in ("ext4", "squashfs"):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"unknown rootfs format {fmt!r}; use ext4 or squashfs")
    if kind in ("dir", "tar"):
        if source is None:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"--kind {kind} needs --source PATH")
        source = source.absolute()
        if (kind == "dir" and not source.is_dir()) or (kind == "tar" and not source.is_file()):
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{source} is not a {'directory' if kind == 'dir' else 'tar file'}",
            )
    if size_mib is not None and size_mib <= 0:
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"size_mib must be positive, got {size_mib}")
    require_file(BUSYBOX, "busybox-static", "the static busybox binary")
    root = cache_dir or cache_root()
    key = rootfs_cache_key(kind, source=source, fmt=fmt, size_mib=size_mib, with_agent=with_agent)
    area = root / "rootfs"
    out = area / key / f"rootfs.{fmt}"
    if out.is_file() and not force:
        return out
    _require_format_tools(fmt)
    with cache_lock(f"rootfs-{key}", root):
        if out.is_file() and not force:
            return out
        area.mkdir(parents=True, exist_ok=True)
        remove_stale(area, f".build-{key}-*")
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=area))
        try:
            log_path = root / "logs" / f"rootfs-{key}.log"
            with BuildLog(log_path) as log, StepProgress(f"rootfs ({kind})", progress) as bar:
                try:
                    _assemble(kind, source, work, out.name, fmt, size_mib, with_agent, log, bar)
                except OSError as exc:
                    log.note(f"error: {exc}")
                    raise SmartVMError(
                        ErrorCode.BUILD_FAILED, f"building the {kind} rootfs failed: {exc}; log: {log.path}"
                    ) from exc
                info = {
                    "kind": kind,
                    "format": fmt,
                    "key": key,
                    "source": str(source) if source else None,
                    "size_mib": size_mib,
                    "with_agent": with_agent,
                }
                (work / "out" / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
            if out.parent.exists():  # force=True over an earlier result
                shutil.rmtree(out.parent)
            (work / "out").rename(out.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _evict_older_builds(area, out.parent, root)
    return out


def _evict_older_builds(area: Path, newest: Path, root: Path) -> None:
    """Keep the newest KEEP_BUILDS builds of the same recipe (kind, format, source, size, agent).

    Every change to the agent or the init files is a new cache key, so without this each upgrade
    would leave another image behind. A VM only reads its image while staging its own copy.
    """
    recipe = _recipe(newest)
    if recipe is None:
        return
    same = []
    for build in area.iterdir():
        if build != newest and not build.name.startswith(".") and _recipe(build) == recipe:
            with contextlib.suppress(OSError):  # removed by another process meanwhile
                same.append((build.joinpath(BUILD_INFO).stat().st_mtime, build))
    for _mtime, build in sorted(same, reverse=True)[KEEP_BUILDS - 1 :]:
        with cache_lock(f"rootfs-{build.name}", root):
            shutil.rmtree(build, ignore_errors=True)


def _recipe(build: Path) -> tuple[object, ...] | None:
    try:
        info = json.loads((build / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    # builds before these fields existed were default-sized and carried the agent
    return (
        info.get("kind"),
        info.get("format"),
        info.get("source"),
        info.get("size_mib"),
        info.get("with_agent", True),
    )


def _assemble(
    kind: RootfsKind,
    source: Path | None,
    work: Path,
    image_name: str,
    fmt: RootfsFormat,
    size_mib: int | None,
    with_agent: bool,
    log: BuildLog,
    bar: StepProgress,
) -> None:
    """Populate ``work/root`` and write ``work/out/<image_name>`` from it."""
    staging = work / "root"
    staging.mkdir()
    bar.step("populating the base")
    _populate_base(kind, source, staging, log, with_agent)
    bar.step("installing init")
    _install_guest_pieces(staging, with_agent=with_agent, busybox_base=kind == "busybox")
    if with_agent and _absent(_in_root(staging, GUEST_PYTHON)):
        bar.step("installing python")
        install_python_runtime(staging, log)
    if kind == "busybox":
        bar.step("installing bash")
        install_guest_bash(staging, log)
    (work / "out").mkdir()
    bar.step(f"writing {fmt}")
    _write_image(staging, work / "out" / image_name, fmt, size_mib, log)


def _require_format_tools(fmt: RootfsFormat) -> None:
    if fmt == "ext4":
        require_tool("mkfs.ext4", "e2fsprogs")
    else:
        require_tool("mksquashfs", "squashfs-tools")


def _populate_base(
    kind: RootfsKind, source: Path | None, staging: Path, log: BuildLog, with_agent: bool
) -> None:
    if kind == "busybox":
        _make_skeleton(staging)
    elif kind == "dir" and source is not None:
        log.run(["cp", "-a", "--reflink=auto", f"{source}/.", staging], f"copying {source}")
    elif kind == "tar" and source is not None:
        log.run(["tar", "-xf", source, "-C", staging, "--numeric-owner"], f"extracting {source}")
    elif kind == "debian":
        _debootstrap(staging, log, with_agent)


def _make_skeleton(staging: Path) -> None:
    """A merged-/usr tree with the usual top-level directories (mount points must pre-exist)."""
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "root", "home", "var/log", "var/tmp"):
        (staging / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        (staging / link).symlink_to(f"usr/{link}")
    for name in ("hostname", "passwd", "group", "hosts", "profile"):
        (staging / "etc" / name).write_bytes(_guest_file(f"etc/{name}").read_bytes())
    # the unprivileged account sandboxes run commands as (etc/passwd names it; uid/gid 1000)
    home = staging / "home" / "user"
    home.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(home, USER_UID, USER_UID)
    # The kernel writes DNS servers from `ip=` autoconfig there.
    (staging / "etc" / "resolv.conf").symlink_to("/proc/net/pnp")
    (staging / "root").chmod(0o700)


def _debootstrap(staging: Path, log: BuildLog, with_agent: bool) -> None:
    require_tool("debootstrap", "debootstrap")
    if os.geteuid() != 0:
        raise SmartVMError(
            ErrorCode.BUILD_FAILED, "the debian rootfs needs root (debootstrap chroots); run it as root"
        )
    suite, mirror = _debian_source()
    include = ["--include=python3-minimal,python3"] if with_agent else []
    log.run(
        ["debootstrap", "--variant=minbase", *include, suite, staging, mirror],
        f"debootstrap {suite} from {mirror}",
    )
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (staging / junk).glob("*"):
            if p.is_file():
                p.unlink()
    # debootstrap copies the build host's hostname, hosts and resolv.conf: use the guest's own.
    for name in ("hostname", "hosts"):
        _put(staging, f"etc/{name}", _guest_file(f"etc/{name}").read_bytes())
    _put(staging, "etc/resolv.conf", symlink="/proc/net/pnp")


def _install_guest_pieces(staging: Path, *, with_agent: bool, busybox_base: bool) -> None:
    """Busybox + applet links under /opt/smartvm, our init scripts, inittab, /sbin/init, the agent."""
    busybox = _put(staging, "opt/smartvm/bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    applets = _busybox_applets()
    for applet in applets:
        link = busybox.parent / applet.rsplit("/", 1)[-1]
        if _absent(link):
            link.symlink_to("busybox")
    if busybox_base:  # the applets are the whole userland
        for applet in applets:
            dest = _in_root(staging, applet)
            if _absent(dest):
                dest.symlink_to("/opt/smartvm/bin/busybox")
    for name in ("rcS", "rcK", "run-agent"):
        _put(staging, f"opt/smartvm/{name}", _guest_file(name).read_bytes(), mode=0o755)
    _put(staging, "opt/smartvm/acpi/PWRF/00000080", _guest_file("power-button").read_bytes(), mode=0o755)
    for d in ("proc", "sys", "dev", "tmp", "run", "etc", "root"):
        if _absent(staging / d):  # a base's symlinked /run etc. stays as it is
            (staging / d).mkdir()
    inittab = _guest_file("inittab").read_text()
    agent = _agent_sources()
    if with_agent and agent is not None:
        _compile_agent([_put(staging, dest, path.read_bytes()) for dest, path in sorted(agent.items())])
        _install_native_agent(staging)
        inittab += _guest_file("inittab-agent").read_text()
    _put(staging, "etc/inittab", inittab.encode())
    _put(staging, "sbin/init", symlink="/opt/smartvm/bin/busybox")
    if _absent(_in_root(staging, "etc/hostname")):
        _put(staging, "etc/hostname", _guest_file("etc/hostname").read_bytes())


def _busybox_applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SmartVMError(ErrorCode.BUILD_FAILED, f"{BUSYBOX} --list-full failed: {out.stderr.strip()}")
    return [line.strip() for line in out.stdout.splitlines() if line.strip() and ".." not in line]


def _absent(path: Path) -> bool:
    """Nothing at ``path``, not even a dangling symlink."""
    return not path.exists() and not path.is_symlink()


def _in_root(staging: Path, rel: str) -> Path:
    """``/rel`` inside the image tree, following the base's symlinks as the guest would see them.

    Symlinked parents (``/sbin -> usr/sbin``, ``/opt -> /srv/opt``) are resolved within
    ``staging`` (``..`` stops at its top, absolute targets restart there), so a hostile base
    image can never make the build write outside ``staging``. Missing parents are created.
    The last component is returned as is (it may itself be a symlink; :func:`_put` replaces it).
    """
    parts = [p for p in Path(rel.lstrip("/")).parts]
    name = parts.pop()
    current, hops = staging, 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent if current != staging else staging
            continue
        nxt = current / part
        if not nxt.is_symlink():
            current = nxt
            continue
        hops += 1
        if hops > 40:
            raise SmartVMError(ErrorCode.UNSAFE_PATH, f"too many symlinks resolving /{rel} in the image")
        target = Path(os.readlink(nxt))
        if target.is_absolute():
            current = staging
            target = target.relative_to("/")
        parts = list(target.parts) + parts
    current.mkdir(parents=True, exist_ok=True)
    return current / name


def _install_native_agent(staging: Path) -> None:
    """Compile the native agent (agent/native, Go) and install it as /opt/smartvm/agent-native, which
    run-agent prefers; without a go toolchain the image keeps the Python agent alone."""
    with tempfile.TemporaryDirectory(prefix="agent-native-") as tmp:
        built = build_native_agent(Path(tmp) / "agent-native", gocache=cache_root() / "go-build")
        if built is not None:
            _put(staging, NATIVE_IN_GUEST, built.read_bytes(), mode=0o755)


def _compile_agent(sources: list[Path]) -> None:
    """Ship the agent's bytecode next to it (``__pycache__``, hash-checked against the source):
    compiling it at every start costs about 0.2 s of a TCG guest's boot. Compiled by the host's
    python3, which the busybox image carries; a guest Python of another version ignores the file."""
    if not HOST_PYTHON.is_file():
        return
    code = (
        "import py_compile, sys\n"
        "for src in sys.argv[1:]:\n"
        "    py_compile.compile(src, doraise=True, "
        "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)"
    )
    argv = [str(HOST_PYTHON), "-c", code, *map(str, sources)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip()[-500:]
        raise SmartVMError(ErrorCode.BUILD_FAILED, f"compiling the guest agent with {HOST_PYTHON}: {said}")


def _put(
    staging: Path, rel: str, data: bytes = b"", *, mode: int = 0o644, symlink: str | None = None
) -> Path:
    """Create ``/rel`` in the image (a file with ``data`` or a symlink), replacing a file or link there."""
    path = _in_root(staging, rel)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        raise SmartVMError(ErrorCode.BUILD_FAILED, f"/{rel} in the base image is a directory; remove it")
    if symlink is not None:
        path.symlink_to(symlink)
    else:
        path.write_bytes(data)
        path.chmod(mode)
    return path


def install_python_runtime(staging: Path, log: BuildLog) -> None:
    """Copy the host's Debian python3 into ``staging``: binary, ``ldd`` libraries, trimmed stdlib.

    Files the base already has are kept (a glibc base keeps its own libc).
    """
    require_file(HOST_PYTHON, "python3", "the host's Debian python3")
    real = HOST_PYTHON.resolve()
    version = real.name  # python3.11
    stdlib = Path("/usr/lib") / version
    require_file(stdlib / "os.py", f"lib{version}-stdlib", "the Python standard library")
    log.note(f"installing {real} and {stdlib}")
    bin_dest = _in_root(staging, f"usr/bin/{version}")
    if _absent(bin_dest):
        shutil.copy2(real, bin_dest)
    link = _in_root(staging, "usr/bin/python3")
    if _absent(link):
        link.symlink_to(version)
    lib_dest = _in_root(staging, f"usr/lib/{version}")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = set()
        at_top = Path(directory) == stdlib
        in_dynload = Path(directory).name == "lib-dynload"
        for n in names:
            top_level_skip = at_top and (n in _STDLIB_SKIP or n.startswith(_STDLIB_SKIP_PREFIXES))
            if top_level_skip or (in_dynload and _DYNLOAD_SKIP.match(n)):
                skipped.add(n)
        return skipped

    if _absent(lib_dest):  # never copy into a tree the base owns (it may hold symlinks)
        shutil.copytree(stdlib, lib_dest, ignore=ignore, ignore_dangling_symlinks=True)
    else:
        log.note(f"the base already has /usr/lib/{version}; keeping it")
    binaries = [real, *sorted((lib_dest / "lib-dynload").glob("*.so"))]
    for lib in _shared_libraries(binaries, log):
        dest = _in_root(staging, str(lib))
        if _absent(dest):
            shutil.copy2(lib.resolve(), dest)


def guest_bash() -> Path:
    """The bash a busybox image gets: the host's bash-static when installed, else its bash."""
    return HOST_BASH_STATIC if HOST_BASH_STATIC.is_file() else HOST_BASH


def install_guest_bash(staging: Path, log: BuildLog) -> None:
    """``/bin/bash`` of the image (where the host's bash lives): static when the host has that
    build (no libraries to bring), else the host's bash with its libraries."""
    bash = guest_bash()
    if bash != HOST_BASH_STATIC:
        install_host_binary(staging, bash, log)
        return
    dest = _in_root(staging, str(HOST_BASH.resolve()))
    if _absent(dest):
        log.note(f"installing {bash} as {HOST_BASH}")
        shutil.copy2(bash.resolve(), dest)


def install_host_binary(staging: Path, binary: Path, log: BuildLog) -> None:
    """Copy a host program and the ``ldd`` libraries it needs into ``staging`` (kept if present)."""
    require_file(binary, binary.name, f"the host's {binary}")
    dest = _in_root(staging, str(binary.resolve()))
    if _absent(dest):
        log.note(f"installing {binary}")
        shutil.copy2(binary.resolve(), dest)
    for lib in _shared_libraries([binary.resolve()], log):
        target = _in_root(staging, str(lib))
        if _absent(target):
            shutil.copy2(lib.resolve(), target)


def _shared_libraries(binaries: list[Path], log: BuildLog) -> set[Path]:
    require_tool("ldd", "libc-bin")
    libs: set[Path] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise log.failure(f"ldd {binary}: {out.stdout.strip()} {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            if "not found" in line:
                raise log.failure(f"ldd {binary}: a library is missing on the host: {line.strip()}")
            m = _LDD_PATH.search(line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def _tree_usage(staging: Path) -> tuple[int, int]:
    """(bytes of data rounded to 4 KiB blocks, number of entries) under ``staging``."""
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in filenames + dirnames:
            count += 1
            st = os.lstat(os.path.join(dirpath, name))
            total += math.ceil(st.st_size / 4096) * 4096
    return total, count


def _write_image(staging: Path, image: Path, fmt: RootfsFormat, size_mib: int | None, log: BuildLog) -> None:
    if fmt == "squashfs":
        owner = [] if os.geteuid() == 0 else ["-all-root"]
        log.run(
            ["mksquashfs", staging, image, "-noappend", "-comp", "zstd", "-quiet", "-no-progress", *owner],
            "mksquashfs",
        )
        return
    used, entries = _tree_usage(staging)
    if size_mib is None:
        size_mib = max(MIN_SIZE_MIB, math.ceil(used * 1.15 / (1 << 20)) + FREE_SPACE_MIB)
    inodes = max(4096, entries * 2 + 1024)
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    log.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-N",
            str(inodes),
            "-m",
            "0",
            "-L",
            "smartvm-root",
            "-E",
            "root_owner=0:0",
            "-d",
            staging,
            image,
        ],
        f"mkfs.ext4 ({size_mib} MiB)",
    )
