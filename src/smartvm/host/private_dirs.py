"""Directories and files smartvm trusts: created private, refused when another user could have planted them.

The default data dir (``/tmp/.smartvm``) and runtime root (``/dev/shm/.smartvm/runtime``) live under
world-writable directories, so another local user can create them first and fill them with binaries,
records or sockets. Every directory smartvm creates or reads goes through :func:`ensure_private_dir`
(or :func:`check_private_dir` when it must not be created). The levels checked, from ``/`` down:

- the directory itself, and every directory this call creates (``mkdir`` with mode ``0700``): a real
  directory (not a symlink), owned by the current euid, not writable by group or others;
- every existing ancestor: owned by root or the current euid, and writable by group/others only
  when sticky (``/tmp``, ``/dev/shm``: others cannot rename our entries there). An ancestor that is a
  symlink must itself be owned by root or the euid; the directories after it are checked as found.

A failed check is ``SmartVMError(UNSAFE_DIRECTORY)`` naming the path, its owner and mode, and the fix.
Because no other user can rename or replace a checked level, the check stays true after it returns.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _describe(path: Path, st: os.stat_result) -> str:
    kind = "symlink" if stat.S_ISLNK(st.st_mode) else "directory" if stat.S_ISDIR(st.st_mode) else "file"
    return f"{kind} {path} (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"


def _unsafe(path: Path, st: os.stat_result, why: str) -> SmartVMError:
    return SmartVMError(
        ErrorCode.UNSAFE_DIRECTORY,
        f"{_describe(path, st)} {why}; another user may have planted it, so smartvm will not use it: "
        f"remove it (if you trust nothing in it) or choose another --data-dir / --runtime-dir",
    )


def _check_own(path: Path, st: os.stat_result, *, directory: bool) -> None:
    """``path`` (already lstat'ed) is ours: right type, owned by the euid, not writable by others."""
    wanted = stat.S_ISDIR if directory else stat.S_ISREG
    if not wanted(st.st_mode):
        raise _unsafe(path, st, f"is not a real {'directory' if directory else 'file'}")
    if st.st_uid != os.geteuid():
        raise _unsafe(path, st, f"is not owned by the current user (uid {os.geteuid()})")
    if st.st_mode & _OTHERS_WRITE:
        raise _unsafe(path, st, "is writable by group or others")


def _check_ancestor(path: Path, st: os.stat_result) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise _unsafe(path, st, "is a parent directory owned by another user")
    if stat.S_ISLNK(st.st_mode):
        return
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(path, st, "is a parent that is not a directory")
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        raise _unsafe(path, st, "is a parent writable by group or others without the sticky bit")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _walk(path: Path, *, create: bool) -> bool:
    """Check (and with ``create`` make) ``path`` level by level; False when it is missing."""
    path = Path(os.path.abspath(path))
    levels = [*reversed(path.parents), path]
    for level in levels:
        st = _lstat(level)
        if st is None:
            if not create:
                return False
            try:
                os.mkdir(level, 0o700)
            except FileExistsError:
                pass  # someone was faster: checked below like anything found
            except OSError as exc:
                raise SmartVMError(
                    ErrorCode.UNSAFE_DIRECTORY,
                    f"cannot create directory {level}: {exc.strerror or exc}; "
                    "choose another --data-dir / --runtime-dir",
                ) from exc
            st = os.lstat(level)
            _check_own(level, st, directory=True)
        elif level == path:
            _check_own(level, st, directory=True)
        else:
            _check_ancestor(level, st)
    return True


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (each missing level ``0700``) or check the one found; UNSAFE_DIRECTORY when unsafe."""
    _walk(Path(path), create=True)
    return Path(path)


def check_private_dir(path: Path) -> bool:
    """Whether ``path`` exists (checked like :func:`ensure_private_dir`, never created)."""
    return _walk(Path(path), create=False)


def check_private_file(path: Path) -> bool:
    """Whether the file ``path`` exists; when it does, it must be a regular file (not a symlink) owned
    by the euid and not writable by others, in a directory that passes :func:`check_private_dir`."""
    if not check_private_dir(Path(path).parent):
        return False
    st = _lstat(Path(path))
    if st is None:
        return False
    _check_own(Path(path), st, directory=False)
    return True


def make_private(path: Path) -> None:
    """Drop group/other access from the file ``path`` (never following a symlink): snapshot files hold
    guest RAM and disks. Their directory is private, so nobody opened them before this."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
