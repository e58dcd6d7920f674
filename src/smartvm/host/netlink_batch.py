"""The fast path for host network changes: many steps, one subprocess.

Measured for 20 namespaces (issue 6, and ``bench/network_slots.py``): one ``ip`` process per step
is 3-4x slower than ``ip -batch``, and pyroute2 is slower still. So every multi-step change here is
written as one ``ip -batch -`` script (``ip -n NS -batch -`` inside a namespace) or one nftables
transaction, applied in-process through libnftables (the library behind ``nft``; the ``nft``
command is the fallback). Work inside a namespace that ``ip`` cannot do (sysctls, ``nft``) runs on a fresh
thread that has joined the namespace with ``setns(2)``; sockets opened (and children started) on that
thread belong to the namespace, so no ``ip netns exec`` wrapper process is needed.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from smartvm.errors import ErrorCode, SmartVMError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_TIMEOUT = 30.0
_FAILED_LINE = re.compile(r"Command failed -:(\d+)")
_PERMISSION = ("Operation not permitted", "Permission denied")

T = TypeVar("T")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _raise_for(result: CommandResult, what: str, script: str = "") -> None:
    if result.returncode == 0:
        return
    detail = result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}"
    match = _FAILED_LINE.search(result.stderr)
    if match and script:
        lines = script.splitlines()
        n = int(match.group(1))
        if 0 < n <= len(lines):
            detail = f"{detail} (at `{lines[n - 1]}`)"
    code = ErrorCode.NETWORK_SETUP_FAILED
    if any(p in detail for p in _PERMISSION):
        code = ErrorCode.NETWORK_PERMISSION_DENIED
        detail += "; run as root or grant CAP_NET_ADMIN"
    raise SmartVMError(code, f"{what} failed: {detail}")


def run_sync(argv: list[str], stdin: str = "") -> CommandResult:
    """Run one command to completion (for threads and CLI code)."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise SmartVMError(
            ErrorCode.NETWORK_SETUP_FAILED, f"{argv[0]} not found; apt-get install iproute2 nftables"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SmartVMError(
            ErrorCode.NETWORK_SETUP_FAILED, f"{argv[0]} did not finish in {_TIMEOUT}s"
        ) from exc
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


async def run(argv: list[str], stdin: str = "") -> CommandResult:
    """Run one command without blocking the event loop; the child is always reaped."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError as exc:
        raise SmartVMError(
            ErrorCode.NETWORK_SETUP_FAILED, f"{argv[0]} not found; apt-get install iproute2 nftables"
        ) from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), _TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return CommandResult(
        tuple(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


@dataclass
class IpBatch:
    """Lines of ``ip`` commands (without the leading ``ip``), run as one ``ip -batch -``.

    ``ip`` stops at the first failing line; the caller undoes everything with an idempotent
    teardown batch (``force=True`` runs every line and ignores the ones that fail).
    """

    netns: str | None = None
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> IpBatch:
        if "\n" in line:
            raise ValueError("one ip command per line")
        self.lines.append(line)
        return self

    def extend(self, lines: Iterable[str]) -> IpBatch:
        for line in lines:
            self.add(line)
        return self

    def argv(self, *, force: bool = False) -> list[str]:
        argv = ["ip"]
        if self.netns:
            argv += ["-n", self.netns]
        if force:
            argv.append("-force")
        return [*argv, "-batch", "-"]

    def script(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    async def run(self, what: str, *, force: bool = False) -> CommandResult:
        """Apply all lines; raise SmartVMError naming the failed line (unless ``force``)."""
        if not self.lines:
            return CommandResult((), 0, "", "")
        result = await run(self.argv(force=force), self.script())
        if not force:
            _raise_for(result, what, self.script())
        return result

    def run_sync(self, what: str, *, force: bool = False) -> CommandResult:
        if not self.lines:
            return CommandResult((), 0, "", "")
        result = run_sync(self.argv(force=force), self.script())
        if not force:
            _raise_for(result, what, self.script())
        return result


def netns_path(netns: str) -> str:
    return os.path.join(NETNS_RUN_DIR, netns)


def netns_exec_argv(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside the network namespace ``netns``, the one way smartvm starts a program there
    (hypervisors, tools): nsenter joins the namespace and execs in place, so the pid you get, and the
    parent-death signal set before the exec, are the program's own."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(netns: str) -> None:
    """Move the calling thread into ``netns`` (use only on a thread or in a child about to exec)."""
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread inside ``netns`` and return its result.

    The thread ends afterwards, so no pooled thread is ever left in a foreign namespace.
    Sockets created by ``fn`` stay in ``netns`` and may be used from any thread.
    """
    box: dict[str, T] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            enter_netns(netns)
        except OSError as exc:
            code = (
                ErrorCode.NETWORK_PERMISSION_DENIED
                if exc.errno in (errno.EPERM, errno.EACCES)
                else ErrorCode.NETWORK_SETUP_FAILED
            )
            errors.append(SmartVMError(code, f"cannot enter network namespace {netns}: {exc.strerror}"))
            return
        try:
            box["value"] = fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box["value"]


class _LibNft:
    """libnftables (shipped with the nftables package) called in-process: the same parser and the
    same atomic transaction as ``nft -f -``, without starting a process (~1.5 ms instead of ~13 ms).
    The netlink socket is opened by the calling thread, so on a thread that joined a namespace
    the script applies inside that namespace. Calls are serialised (the library keeps globals)."""

    _NAMES = ("libnftables.so.1",)

    def __init__(self, *, use_library: bool = True) -> None:
        self.lib: ctypes.CDLL | None = None
        self.lock = threading.Lock()
        if not use_library or os.environ.get("SMARTVM_NFT_SUBPROCESS"):
            return
        for name in self._NAMES:
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            self.lib = lib
            return

    def run(self, script: str) -> CommandResult | None:
        """Apply ``script``; None if the library is not available (use the nft command)."""
        lib = self.lib
        if lib is None:
            return None
        with self.lock:
            ctx = lib.nft_ctx_new(0)
            if not ctx:
                return None
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
                err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                lib.nft_ctx_free(ctx)
        return CommandResult(("libnftables",), 1 if rc else 0, "", err)


_libnft: _LibNft | None = None


def nft_run(script: str) -> CommandResult:
    """Run an nft script in the calling thread's namespace: in-process if possible, else ``nft -f -``."""
    global _libnft
    if _libnft is None:
        _libnft = _LibNft()
    result = _libnft.run(script)
    return result if result is not None else run_sync(["nft", "-f", "-"], script)


def nft_apply_sync(script: str, what: str) -> None:
    """Apply ``script`` in the calling thread's namespace as one atomic transaction (all or nothing)."""
    _raise_for(nft_run(script), what, script)


async def setup_netns_inside(netns: str, nft_script: str, what: str, sysctls: dict[str, str]) -> None:
    """Sysctls plus one nft transaction inside ``netns``: one thread, one subprocess."""

    def work() -> None:
        for name, value in sysctls.items():
            with open(f"/proc/sys/{name}", "w") as f:
                f.write(value)
        nft_apply_sync(nft_script, what)

    await asyncio.to_thread(call_in_netns, netns, work)
