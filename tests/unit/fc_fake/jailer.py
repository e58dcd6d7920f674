"""A fake ``jailer`` executable that does what Firecracker's jailer does where it matters to smartvm.

Like the real one (src/jailer/src/env.rs) it parses the real flags and refuses what the real one
refuses (bad id, an exec file without "firecracker" in its name, a missing chroot base, malformed
cgroups and resource limits), creates ``<base>/<exec name>/<id>/root`` itself, copies the exec file
in, joins ``--netns``, applies ``--resource-limit``, chroots, creates /dev, /dev/net and /run (0700,
owned by uid/gid), daemonizes on ``--daemonize`` (``setsid()``, which fails for a session leader, and
stdio to /dev/null), drops to uid/gid and execs ``/<exec name> --id <id> --start-time-us ...`` followed
by the arguments after ``--``. With ``--new-pid-ns`` it forks the exec into a new PID namespace, writes
the child's pid to ``/<exec name>.pid`` in the jail and exits 0.

What the fake does differently (test harness only):
- cgroups are validated and recorded, never written: the host's cgroups stay untouched;
- no device nodes (/dev/kvm, /dev/net/tun): the fake firecracker opens none;
- the fake firecracker is a Python script, so its interpreter must exist in the chroot. In a private
  mount namespace (``unshare(CLONE_NEWNS)`` then ``mount --make-rprivate /``, checked in mountinfo
  before anything is mounted) the fake bind-mounts read-only /usr, the interpreter's prefixes,
  tests/unit and the API spec at their own paths, and the request log (FAKE_FC_REQUEST_LOG)
  read-write at /fake/requests.jsonl. The mounts exist only in that namespace and vanish with its
  last process; on the host the mount points are empty directories, so removing the jail never
  reaches into /usr.

FAKE_JAILER_ARGV_LOG=path   append {"argv": [...], "pid": ..., "ppid": ...} per invocation
FAKE_JAILER_MODE=exit             fail at once (exit 1)
FAKE_JAILER_MODE=hang             hang before doing anything
FAKE_JAILER_MODE=hang-after-fork  with --new-pid-ns: fork Firecracker, then hang without a pid file
FAKE_JAILER_MODE=exit-after-fork  with --new-pid-ns: fork Firecracker, then exit 1 without a pid file
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
REQUEST_LOG_IN_JAIL = "/fake/requests.jsonl"
_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_LIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
_LIBC = ctypes.CDLL(None, use_errno=True)


class JailerError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jailer", allow_abbrev=False)
    p.add_argument("--id", required=True)
    p.add_argument("--exec-file", required=True)
    p.add_argument("--uid", required=True)
    p.add_argument("--gid", required=True)
    p.add_argument("--chroot-base-dir", default="/srv/jailer")
    p.add_argument("--netns")
    p.add_argument("--daemonize", action="store_true")
    p.add_argument("--new-pid-ns", action="store_true")
    p.add_argument("--cgroup", action="append", default=[])
    p.add_argument("--cgroup-version", default="1")
    p.add_argument("--parent-cgroup")
    p.add_argument("--resource-limit", action="append", default=[])
    return p


def _syscall(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailerError(f"{what}: {os.strerror(err)}")


def _validate(args: argparse.Namespace) -> tuple[Path, int, int, dict[int, int]]:
    if not _ID.match(args.id):
        raise JailerError(f"Invalid instance ID: {args.id}")
    exec_file = Path(args.exec_file).resolve()
    if not exec_file.is_file():
        raise JailerError(f"{exec_file} is not a file")
    if "firecracker" not in exec_file.name:
        raise JailerError(
            f"Invalid filename. The filename of `--exec-file` option must contain "
            f'"firecracker": {exec_file.name}'
        )
    base = Path(args.chroot_base_dir)
    if not base.is_dir():
        raise JailerError(f"Failed to canonicalize path {base}: No such file or directory")
    try:
        uid, gid = int(args.uid), int(args.gid)
    except ValueError as exc:
        raise JailerError(f"Invalid uid or gid: {exc}") from None
    if args.cgroup_version not in ("1", "2"):
        raise JailerError(f"Cgroup version not supported: {args.cgroup_version}")
    for cg in args.cgroup:
        file, _, value = cg.partition("=")
        if not value or "=" in value or not re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_.]+", file):
            raise JailerError(f"Invalid format for cgroups: {cg}")
    if args.parent_cgroup and any(p in ("", ".", "..") for p in args.parent_cgroup.split("/")):
        raise JailerError("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")
    limits = {}
    for limit in args.resource_limit:
        name, _, value = limit.partition("=")
        if name not in _LIMITS:
            raise JailerError(f"Invalid resource argument: {name}")
        if not value.isdigit():
            raise JailerError(f"Invalid value for resource limits: {value}")
        limits[_LIMITS[name]] = int(value)
    return exec_file, uid, gid, limits


def _private_mount_namespace() -> None:
    """A mount namespace of our own whose mounts never propagate to the host (verified)."""
    before = os.stat("/proc/self/ns/mnt").st_ino
    _syscall(_LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _syscall(_LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    if os.stat("/proc/self/ns/mnt").st_ino == before:
        raise JailerError("still in the host's mount namespace; refusing to bind-mount")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            optional = line.split(" - ")[0].split()[6:]
            if any(tag.startswith(("shared:", "master:")) for tag in optional):
                raise JailerError(f"mount propagation is not private, refusing to bind-mount: {line.strip()}")


def _bind(source: Path, root: Path, at: str | None = None, *, writable: bool = False) -> None:
    target = root / (at or str(source)).lstrip("/")
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    _syscall(_LIBC.mount(bytes(source), bytes(target), None, MS_BIND, None), f"bind {source}")
    if not writable:
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        _syscall(_LIBC.mount(None, bytes(target), None, flags, None), f"remount {target} read-only")


def _mount_interpreter(root: Path) -> dict[str, str]:
    """Fake-only: what the fake firecracker (a Python script) needs inside the chroot."""
    from .spec import SPEC_PATH

    _private_mount_namespace()
    _bind(Path("/usr"), root)
    for name in ("bin", "lib", "lib64", "sbin"):
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            _bind(host, root)
    tests_unit = Path(__file__).resolve().parents[1]
    bound = [Path("/usr")]
    for prefix in sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix), tests_unit}):
        if not any(prefix.is_relative_to(done) for done in bound):
            _bind(prefix, root)
            bound.append(prefix)
    _bind(SPEC_PATH.resolve(), root)
    env = {"SMARTVM_FIRECRACKER_SPEC": str(SPEC_PATH.resolve())}
    log = os.environ.get("FAKE_FC_REQUEST_LOG")
    if log:
        Path(log).touch()
        os.chmod(log, 0o666)  # the fake firecracker runs as the jail's uid
        _bind(Path(log), root, REQUEST_LOG_IN_JAIL, writable=True)
        env["FAKE_FC_REQUEST_LOG"] = REQUEST_LOG_IN_JAIL
    return env


def _record(argv: list[str]) -> None:
    log = os.environ.get("FAKE_JAILER_ARGV_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": argv, "pid": os.getpid(), "ppid": os.getppid()}) + "\n")


def _told_to(what: str) -> None:
    print(f"fake jailer told to {what}", file=sys.stderr, flush=True)


def run(argv: list[str]) -> int:
    mode = os.environ.get("FAKE_JAILER_MODE", "")
    if mode == "exit":
        _told_to("exit")
        return 1
    if mode == "hang":
        _told_to("hang")
        time.sleep(3600)
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:split])
    fc_args = argv[split + 1 :]
    exec_file, uid, gid, limits = _validate(args)
    start_us = time.time_ns() // 1000
    root = Path(args.chroot_base_dir).resolve() / exec_file.name / args.id / "root"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(exec_file, root / exec_file.name)
    if args.netns:
        try:
            fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise JailerError(f"Failed to open the netns {args.netns}: {exc.strerror}") from None
        _syscall(_LIBC.setns(fd, CLONE_NEWNET), f"setns {args.netns}")
        os.close(fd)
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    dev_null = os.open("/dev/null", os.O_RDWR) if args.daemonize else None
    env = {**os.environ, **_mount_interpreter(root)}
    os.chroot(root)
    os.chdir("/")
    for folder in ("/", "/dev", "/dev/net", "/run"):
        os.makedirs(folder, exist_ok=True)
        os.chown(folder, uid, gid)
        os.chmod(folder, 0o700)
    if dev_null is not None:
        try:
            os.setsid()
        except OSError as exc:
            raise JailerError(f"Failed to daemonize: setsid: {exc.strerror}") from None
        for fd in (0, 1, 2):
            os.dup2(dev_null, fd)
        os.close(dev_null)
    exe = f"/{exec_file.name}"
    exec_argv = [
        exe,
        "--id",
        args.id,
        "--start-time-us",
        str(start_us),
        "--start-time-cpu-us",
        str(time.process_time_ns() // 1000),
        "--parent-cpu-time-us",
        "0",
        *fc_args,
    ]
    if args.new_pid_ns:
        _syscall(_LIBC.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        child = os.fork()
        if child and mode == "hang-after-fork":
            _told_to("hang after the fork")
            time.sleep(3600)
        if child and mode == "exit-after-fork":  # like the real one when it cannot write the pid file
            _told_to("exit after the fork")
            return 1
        if child:
            fd = os.open(f"{exe}.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, str(child).encode())
            os.close(fd)
            return 0
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.execve(exe, exec_argv, env)
    return 1  # not reached


def main(argv: list[str]) -> int:
    _record(argv)
    try:
        return run(argv)
    except (JailerError, OSError) as exc:
        print(f"Jailer error: {exc}", file=sys.stderr, flush=True)
        return 1
