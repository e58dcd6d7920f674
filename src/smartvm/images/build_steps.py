"""Plumbing shared by the kernel and root filesystem builders.

Both builders need the same few things: fail early with the apt package to install when a tool
is missing, derive cache keys from their inputs, serialise concurrent builds of one artifact,
run external commands into a log (killing the whole process group if we are interrupted), and
turn a failed command into a ``BUILD_FAILED`` error that shows the end of that log. A cache hit
uses only the key helpers: rich (the build spinner) is imported when a build shows one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, cast

from smartvm.errors import ErrorCode, SmartVMError
from smartvm.host.process import tail
from smartvm.images.cache_paths import cache_root

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

LOG_TAIL_LINES = 40
_CHUNK = 1 << 20


def require_tool(tool: str, apt_package: str) -> str:
    """The absolute path of ``tool`` on PATH, else ``BUILD_TOOL_MISSING`` naming its package."""
    found = shutil.which(tool)
    if found is None:
        raise SmartVMError(
            ErrorCode.BUILD_TOOL_MISSING,
            f"'{tool}' is not installed; install it with `apt-get install {apt_package}`",
        )
    return found


def require_file(path: Path, apt_package: str, what: str) -> Path:
    """``path`` if it exists, else ``BUILD_TOOL_MISSING`` naming the package that provides it."""
    if not path.exists():
        raise SmartVMError(
            ErrorCode.BUILD_TOOL_MISSING,
            f"{what} ({path}) is missing; install it with `apt-get install {apt_package}`",
        )
    return path


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks (blocking: call it in a thread from async code)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest(*parts: str | bytes, length: int = 16) -> str:
    """A short, stable hex key over ``parts`` (length-prefixed, so parts cannot run together)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


def file_identity(path: Path) -> str:
    """Cheap identity of a large input file: resolved path, size and mtime (no hashing)."""
    resolved = path.resolve()
    st = resolved.stat()
    return f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"


@contextlib.contextmanager
def cache_lock(name: str, root: Path | None = None, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock so two processes never build the same artifact at once.

    The lock file lives in ``<cache>/locks`` so artifact directories only ever hold artifacts.
    ``wait=False`` raises ``BlockingIOError`` at once when another process holds the lock.
    """
    lock_dir = (root or cache_root()) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def remove_stale(directory: Path, pattern: str) -> None:
    """Delete leftovers of builds that were killed (SIGKILL, power loss) before their cleanup ran.

    Call it only while holding the lock of the build that owns ``pattern``.
    """
    if directory.is_dir():
        for stale in directory.glob(pattern):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


class BuildLog:
    """A log file that external build commands write into, and the error raised when one fails."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("wb")

    def __enter__(self) -> BuildLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()

    def note(self, message: str) -> None:
        """Write one line of our own into the log (step headers)."""
        self._file.write(f"### {message}\n".encode())
        self._file.flush()

    def failure(self, what: str) -> SmartVMError:
        """The ``BUILD_FAILED`` error for a failed step, with the log path and its tail."""
        self._file.flush()
        last = tail(self.path, 64 * 1024, lines=LOG_TAIL_LINES)
        return SmartVMError(
            ErrorCode.BUILD_FAILED,
            f"{what} failed; full log: {self.path}\n--- last lines of the log ---\n{last}",
        )

    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        what: str,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """Run ``cmd`` with its output appended to the log; raise ``BUILD_FAILED`` if it fails.

        The command runs in its own process group, which is killed if we are interrupted
        (Ctrl-C, an exception in ``on_line``), so no build process outlives the call.
        """
        args = [os.fspath(c) for c in cmd]
        self.note(f"{what}: {' '.join(args)}")
        try:
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise SmartVMError(ErrorCode.BUILD_FAILED, f"{what}: cannot run {args[0]}: {exc}") from exc
        stdout = cast(IO[bytes], proc.stdout)  # always set: stdout=PIPE
        try:
            for raw in stdout:
                self._file.write(raw)
                if on_line is not None:
                    on_line(raw.decode(errors="replace").rstrip("\n"))
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            stdout.close()
        self._file.flush()
        if rc != 0:
            self.note(f"{what}: exit status {rc}")
            raise self.failure(f"{what} (exit status {rc})")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


class StepProgress:
    """Tells the user where a long build is.

    ``enabled=True``: a one-line spinner on stderr naming the current step (and file);
    ``None`` (default): the spinner on a terminal, else one plain stderr line per step (CI logs);
    ``False``: silent.
    """

    def __init__(self, title: str, enabled: bool | None) -> None:
        self._title = title
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._lines = enabled is None and not default_progress()
        self._started = 0.0
        if default_progress() if enabled is None else enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[title]}[/]"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> StepProgress:
        self._started = time.monotonic()
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("", title=self._title, total=None)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
        if exc_type is None and (self._progress is not None or self._lines):
            elapsed = time.monotonic() - self._started
            print(f"smartvm: {self._title}: built in {elapsed:.1f}s", file=sys.stderr)

    def step(self, text: str) -> None:
        """A new build step (printed as a line when not on a terminal)."""
        self.update(text)
        if self._lines:
            print(f"smartvm: {self._title}: {text}", file=sys.stderr, flush=True)

    def update(self, text: str) -> None:
        """Finer progress inside a step (spinner only)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text[:100])


def default_progress() -> bool:
    """Show progress when stderr is a terminal."""
    return sys.stderr.isatty()
