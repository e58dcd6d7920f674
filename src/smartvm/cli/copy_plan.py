"""Which side of a ``cp SRC DST`` is the guest: shared by ``smartvm cp`` (VMs started with ``smartvm
start``) and ``smartvm sandbox cp`` (sandboxes of a service). Pure string work, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from smartvm.errors import ErrorCode, SmartVMError


@dataclass(frozen=True)
class CopyPlan:
    vm_id: str
    guest_path: str
    local: Path
    upload: bool
    local_is_dir: bool = False  # the user wrote DST with a trailing slash


def split_copy(src: str, dst: str, remote: re.Pattern[str], usage: str) -> CopyPlan:
    """The plan of ``cp SRC DST`` where exactly one side matches ``remote`` (groups: id, guest path);
    ``usage`` says how to write it when neither or both do."""
    remote_src, remote_dst = remote.fullmatch(src), remote.fullmatch(dst)
    if (remote_src is None) == (remote_dst is None):
        raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"exactly one of SRC and DST must be {usage}")
    if remote_dst is not None:
        return CopyPlan(remote_dst.group(1), remote_dst.group(2), Path(src), upload=True)
    assert remote_src is not None
    return CopyPlan(remote_src.group(1), remote_src.group(2), Path(dst), False, dst.endswith("/"))


def guest_file_name(guest_path: str) -> str:
    """The last component of a user-given guest path, as a host file name (never ``..`` or empty)."""
    name = guest_path.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT,
            f"{guest_path!r} does not end in a file name; give the file's path, e.g. ID:/etc/os-release",
        )
    return name


def local_target(plan: CopyPlan, guest_path: str) -> Path:
    """Where a download goes: into ``plan.local`` named after the guest file when it is a directory."""
    if plan.local_is_dir and not plan.local.is_dir():
        raise SmartVMError(
            ErrorCode.INVALID_ARGUMENT, f"{plan.local}/ is not a directory on the host; create it first"
        )
    return plan.local / guest_file_name(guest_path) if plan.local.is_dir() else plan.local
