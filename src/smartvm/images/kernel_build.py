"""Build the guest kernel: an uncompressed x86_64 ``vmlinux`` for QEMU microvm and Firecracker.

Machines that cannot download Firecracker's CI kernels build their own from Debian's
``linux-source-6.1`` tarball: ``make tinyconfig`` plus our fragment (``kernel/smartvm-guest.config``),
then ``olddefconfig``. Starting from tinyconfig keeps the build to a few minutes on two cores.
Kconfig silently drops options whose dependencies are unmet, so every fragment line is checked
against the final ``.config`` and a dropped one fails the build.

Caching: the result lives at ``<cache>/kernels/<key>/vmlinux`` where the key hashes the source
identity (path, size, mtime), the fragment text, the base config and :data:`BUILDER_VERSION`.
A cache hit costs one ``stat`` of the source and one read of the fragment. The extracted source
(``<cache>/kernel-src``) and the object tree (``<cache>/kernel-build``) are kept per source, so
a fragment change rebuilds incrementally; ``force=True`` starts from a clean object tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib import resources
from pathlib import Path

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
)
from smartvm.images.cache_paths import cache_root

BUILDER_VERSION = "1"
BASE_CONFIG = "tinyconfig"
ARCH = "x86_64"
DEFAULT_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT_NAME = "smartvm-guest.config"

# (tool, Debian package) the kernel build needs besides the source.
_TOOLS = (
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl-base"),
    ("tar", "tar"),
)
_REPRODUCIBLE_ENV = {
    "KBUILD_BUILD_USER": "smartvm",
    "KBUILD_BUILD_HOST": "smartvm",
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01",
}


def fragment_text() -> str:
    """Our kernel config fragment (package data)."""
    return (resources.files("smartvm.images") / "kernel" / FRAGMENT_NAME).read_text()


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` and ``# CONFIG_X is not set`` lines as ``{"CONFIG_X": v or "n"}``."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2:].split()[0]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            options[name] = value
    return options


def dropped_options(fragment: str, final_config: str) -> list[str]:
    """Fragment options whose value did not survive into the final config, with what they became."""
    final = parse_config(final_config)
    dropped = []
    for name, wanted in parse_config(fragment).items():
        got = final.get(name, "n")
        if got != wanted:
            dropped.append(f"{name}={wanted} (got {got})")
    return dropped


def _source_identity(source: Path) -> str:
    if source.is_dir():
        return "tree\0" + file_identity(source / "Makefile")
    return "tarball\0" + file_identity(source)


def source_key(source: Path) -> str:
    """Names the extracted tree and object tree of one source (shared by all fragments)."""
    return hashlib.sha256(_source_identity(source).encode()).hexdigest()[:16]


def kernel_cache_key(source: Path | None = None) -> str:
    """The cache key of the kernel :func:`build_kernel` would produce from ``source``."""
    src = source or DEFAULT_SOURCE
    return digest(BUILDER_VERSION, ARCH, BASE_CONFIG, _source_identity(src), fragment_text())


def build_kernel(
    source: Path | None = None,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Return the cached guest ``vmlinux``, building it first if needed.

    ``source`` is a kernel tarball (default: Debian's linux-source-6.1) or an unpacked, clean
    kernel tree. ``cache_dir`` replaces the cache root (default :func:`cache_root`).
    ``progress`` shows a spinner on stderr (default: when stderr is a terminal).
    Raises ``BUILD_TOOL_MISSING`` (naming the apt package) or ``BUILD_FAILED`` (with the log).
    """
    root = cache_dir or cache_root()
    src = (source or DEFAULT_SOURCE).absolute()
    if not src.exists():
        if source is None:
            require_file(src, SOURCE_PACKAGE, "the kernel source tarball")
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"kernel source {src} does not exist")
    key = kernel_cache_key(src)
    out = root / "kernels" / key / "vmlinux"
    if out.is_file() and not force:
        return out
    for tool, package in _TOOLS:
        require_tool(tool, package)
    require_file(Path("/usr/include/libelf.h"), "libelf-dev", "the libelf headers (objtool)")
    with cache_lock("kernel", root):
        if out.is_file() and not force:  # built by another process while we waited
            return out
        remove_stale(out.parent.parent, f".{key}.*")
        log_path = root / "logs" / f"kernel-{key}.log"
        with BuildLog(log_path) as log, StepProgress("kernel", progress) as bar:
            try:
                tree = _source_tree(src, root, log, bar)
                build_dir = root / "kernel-build" / source_key(src)
                if force and build_dir.exists():
                    shutil.rmtree(build_dir)
                build_dir.mkdir(parents=True, exist_ok=True)
                bar.step("configuring (tinyconfig + smartvm-guest.config)")
                configure_kernel(tree, build_dir, fragment_text(), log)
                _compile(tree, build_dir, log, bar)
                _publish(build_dir, out)
            except OSError as exc:  # disk full, permissions: still a build failure with its log
                log.note(f"error: {exc}")
                message = f"kernel build failed: {exc}; log: {log.path}"
                raise SmartVMError(ErrorCode.BUILD_FAILED, message) from exc
    return out


def _source_tree(src: Path, root: Path, log: BuildLog, bar: StepProgress) -> Path:
    """The unpacked kernel tree: ``src`` itself, or the tarball extracted once into the cache."""
    if src.is_dir():
        return src
    if src.suffix == ".xz":
        require_tool("xz", "xz-utils")
    target = root / "kernel-src" / source_key(src)
    remove_stale(target.parent, f"{target.name}.part-*")
    if not target.is_dir():
        bar.step(f"extracting {src.name}")
        part = target.with_name(f"{target.name}.part-{os.getpid()}")  # a stale one: remove_stale above
        part.mkdir(parents=True)
        try:
            log.run(["tar", "-xf", src, "-C", part], "extracting the kernel source")
            part.rename(target)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    trees = [p.parent for p in target.glob("*/Makefile")]
    if (target / "Makefile").is_file():
        trees.append(target)
    if len(trees) != 1:
        raise log.failure(f"finding the kernel tree in {src} (expected one top directory with a Makefile)")
    return trees[0]


def _make(tree: Path, build_dir: Path, *args: str) -> list[str]:
    return ["make", "-C", str(tree), f"O={build_dir}", f"ARCH={ARCH}", *args]


def configure_kernel(tree: Path, build_dir: Path, wanted: str, log: BuildLog) -> None:
    """Write ``build_dir/.config``: tinyconfig + the ``wanted`` fragment + olddefconfig.

    Raises ``BUILD_FAILED`` listing every fragment option that did not survive.
    """
    fragment = build_dir / FRAGMENT_NAME
    fragment.write_text(wanted)
    (build_dir / ".config").unlink(missing_ok=True)
    log.run(_make(tree, build_dir, BASE_CONFIG), f"make {BASE_CONFIG}")
    log.run(
        [tree / "scripts/kconfig/merge_config.sh", "-m", "-O", build_dir, build_dir / ".config", fragment],
        "merging the smartvm config fragment",
        cwd=build_dir,
    )
    log.run(_make(tree, build_dir, "olddefconfig"), "make olddefconfig")
    dropped = dropped_options(wanted, (build_dir / ".config").read_text())
    if dropped:
        log.note("options dropped by olddefconfig: " + ", ".join(dropped))
        raise SmartVMError(
            ErrorCode.BUILD_FAILED,
            f"kernel config: {len(dropped)} option(s) of {FRAGMENT_NAME} did not survive olddefconfig "
            f"(unmet dependencies; add them to the fragment): {', '.join(dropped)}; log: {log.path}",
        )


def _compile(tree: Path, build_dir: Path, log: BuildLog, bar: StepProgress) -> None:
    jobs = len(os.sched_getaffinity(0)) or 1
    compiled = 0

    def on_line(line: str) -> None:
        nonlocal compiled
        if line.startswith("  CC "):
            compiled += 1
            bar.update(f"compiled {compiled} files ({line.split()[-1]})")
        elif line.startswith("  LD "):
            bar.update(f"linking {line.split()[-1]}")

    bar.step(f"compiling vmlinux (make -j{jobs}; minutes on a fresh tree)")
    env = {**os.environ, **_REPRODUCIBLE_ENV}
    cmd = _make(tree, build_dir, f"-j{jobs}", "vmlinux")
    log.run(cmd, f"make -j{jobs} vmlinux", env=env, on_line=on_line)
    if not (build_dir / "vmlinux").is_file():
        raise log.failure("make vmlinux (no vmlinux was produced)")


def _publish(build_dir: Path, out: Path) -> None:
    """Copy vmlinux and its .config into ``out.parent`` atomically (a temp dir, then one rename)."""
    final_dir = out.parent
    part = final_dir.with_name(f".{final_dir.name}.part-{os.getpid()}")  # a stale one: remove_stale
    part.mkdir(parents=True)
    try:
        shutil.copyfile(build_dir / "vmlinux", part / "vmlinux")
        shutil.copyfile(build_dir / ".config", part / "config")
        if final_dir.exists():  # force=True over an earlier result
            old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
            final_dir.rename(old)
            shutil.rmtree(old)
        part.rename(final_dir)
    finally:
        shutil.rmtree(part, ignore_errors=True)
