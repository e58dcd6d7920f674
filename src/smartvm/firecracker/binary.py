"""Finding the firecracker (and jailer) binary and its version, and the doctor check that reports both.

Search order: ``options.firecracker_binary_path``, ``$SMARTVM_FIRECRACKER_BIN``, ``PATH``, then the
downloaded releases in ``<data_dir>/bin/<version>/firecracker`` (the configured version, else the newest).
The jailer: ``options.jailer_binary_path``, ``$SMARTVM_JAILER_BIN``, ``jailer`` next to the firecracker
binary (releases ship both), then ``PATH``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from smartvm.doctor import CheckResult, register_check
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.private_dirs import check_private_dir, check_private_file
from smartvm.options import SmartVMOptions

ENV_VAR = "SMARTVM_FIRECRACKER_BIN"
JAILER_ENV_VAR = "SMARTVM_JAILER_BIN"
_VERSION_DIR = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
_VERSION_OUT = re.compile(r"Firecracker\s+(v\d+\.\d+\.\d+\S*)")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _explicit(option: Path | None, env_var: str) -> Path | Literal[False] | None:
    """The binary named by an option or else an environment variable; False when the one named is not
    executable (no fallback then: the user asked for that file); None when neither names one."""
    named = option or (Path(os.environ[env_var]) if os.environ.get(env_var) else None)
    if named is None:
        return None
    return named if _executable(named) else False


def _required(found: Path | None, name: str, option: Path | None, env_var: str, fix: str) -> Path:
    """``found``, or BINARY_NOT_FOUND saying what was looked for and ``fix``."""
    if found is not None:
        return found
    where = option or os.environ.get(env_var)
    detail = f"{where} is not an executable file" if where else f"no {name} binary found"
    raise SmartVMError(ErrorCode.BINARY_NOT_FOUND, detail + fix)


def find_firecracker(options: SmartVMOptions | None = None) -> Path | None:
    """The firecracker binary to use, or None when there is none."""
    options = options or SmartVMOptions()
    explicit = _explicit(options.firecracker_binary_path, ENV_VAR)
    if explicit is not None:
        return explicit or None
    on_path = shutil.which("firecracker")
    if on_path:
        return Path(on_path)
    bin_dir = options.data_dir / "bin"
    if options.firecracker_version is not None:
        candidate = bin_dir / options.firecracker_version / "firecracker"
        return candidate if _downloaded(candidate) else None
    versions = []
    if check_private_dir(bin_dir):
        for entry in bin_dir.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and _downloaded(entry / "firecracker"):
                versions.append((tuple(int(g) for g in m.groups()), entry / "firecracker"))
    return max(versions)[1] if versions else None


def _downloaded(binary: Path) -> bool:
    """A downloaded binary in the data dir: used only when it and every directory above it are ours
    (UNSAFE_DIRECTORY otherwise: another user may have planted it)."""
    return check_private_file(binary) and _executable(binary)


def require_firecracker(options: SmartVMOptions) -> Path:
    """Like :func:`find_firecracker`, but BINARY_NOT_FOUND with the fix when there is none."""
    return _required(
        find_firecracker(options),
        "firecracker",
        options.firecracker_binary_path,
        ENV_VAR,
        f"; set firecracker_binary_path or {ENV_VAR}, put firecracker on PATH, "
        "or download one with SmartVM.ensure_binary()",
    )


def find_jailer(options: SmartVMOptions, firecracker: Path | None = None) -> Path | None:
    """The jailer binary to use with ``firecracker``, or None when there is none."""
    explicit = _explicit(options.jailer_binary_path, JAILER_ENV_VAR)
    if explicit is not None:
        return explicit or None
    if firecracker is not None:
        beside = firecracker.parent / "jailer"
        downloaded = options.data_dir in firecracker.parents
        if _downloaded(beside) if downloaded else _executable(beside):
            return beside
    on_path = shutil.which("jailer")
    return Path(on_path) if on_path else None


def require_jailer(options: SmartVMOptions, firecracker: Path) -> Path:
    """Like :func:`find_jailer`, but BINARY_NOT_FOUND with the fix when there is none."""
    return _required(
        find_jailer(options, firecracker),
        "jailer",
        options.jailer_binary_path,
        JAILER_ENV_VAR,
        f" (options.jailer is set); set jailer_binary_path or {JAILER_ENV_VAR}, put the "
        f"jailer next to {firecracker} or on PATH (SmartVM.ensure_binary() installs both), "
        "or set jailer=None to run without it",
    )


def firecracker_version(path: str | Path) -> str:
    """The version a binary reports (``v1.15.1``), from ``firecracker --version``."""
    try:
        result = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SmartVMError(ErrorCode.BINARY_NOT_FOUND, f"cannot run {path} --version: {exc}") from exc
    m = _VERSION_OUT.search(result.stdout)
    if result.returncode != 0 or m is None:
        raise SmartVMError(
            ErrorCode.BINARY_NOT_FOUND,
            f"{path} --version did not report a Firecracker version (exit {result.returncode}): "
            f"{(result.stdout + result.stderr).strip()[:200]!r}",
        )
    return m.group(1)


@register_check
def check_firecracker_binary() -> CheckResult:
    name = "firecracker binary"
    try:
        path = find_firecracker()
    except SmartVMError as exc:
        return CheckResult(name, False, exc.message, "remove the directory named or use another data dir")
    if path is None:
        return CheckResult(
            name,
            False,
            "no firecracker binary found",
            f"set {ENV_VAR}, put firecracker on PATH or run 'smartvm images firecracker' "
            "(without it the QEMU engine is used)",
        )
    try:
        version = firecracker_version(path)
    except SmartVMError as exc:
        return CheckResult(name, False, exc.message, "replace it with a release from GitHub")
    return CheckResult(name, True, f"{path} ({version})")
