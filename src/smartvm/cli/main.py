"""The ``smartvm`` command: one verb per lifecycle step, mirroring the library.

Start-up is kept short because people call ``smartvm run`` in loops: ``smartvm --version`` is
answered before typer is imported, and only the module defining the invoked command is imported
(every module for help, completion and names not listed in :data:`COMMAND_MODULES`). So is the end:
once a command is done, :func:`exit_now` leaves without the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from smartvm import __version__

if TYPE_CHECKING:
    import typer

HELP = "Firecracker microVMs (and QEMU microvm where Firecracker cannot run) from one command."

# Sub-command modules; each exposes `register(app)`.
_SUBCOMMAND_MODULES = (
    "smartvm.cli.images",
    "smartvm.cli.vm",
    "smartvm.cli.detached",
    "smartvm.cli.network",
    "smartvm.cli.service",
    "smartvm.cli.sandbox",
)
# The module registering each top-level command.
COMMAND_MODULES = {
    "doctor": None,
    "run": "smartvm.cli.vm",
    "start": "smartvm.cli.detached",
    "exec": "smartvm.cli.detached",
    "cp": "smartvm.cli.detached",
    "ps": "smartvm.cli.detached",
    "stop": "smartvm.cli.detached",
    "images": "smartvm.cli.images",
    "network": "smartvm.cli.network",
    "serve": "smartvm.cli.service",
    "keys": "smartvm.cli.service",
    "sandbox": "smartvm.cli.sandbox",
}


def doctor() -> None:
    """Check this host: KVM, engines, /dev/shm, TAP devices, namespaces.

    Exits 1 when no engine can boot a guest here (neither QEMU nor Firecracker is usable).
    """
    import typer
    from rich.console import Console
    from rich.table import Table

    from smartvm.doctor import run_checks

    table = Table(title="smartvm doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    table.add_column("fix")
    results = run_checks()
    for r in results:
        table.add_row(r.name, "[green]ok[/]" if r.ok else "[red]problem[/]", r.detail, r.fix)
    Console(width=200).print(table)
    by_name = {r.name: r for r in results}
    engines = [by_name[n] for n in ("qemu", "firecracker binary") if n in by_name]
    if engines and not any(r.ok for r in engines):
        raise typer.Exit(1)


def build_app(command: str | None = None) -> typer.Typer:
    """The typer app with the sub-command module of ``command`` registered (all when None/unknown)."""
    import typer

    app = typer.Typer(name="smartvm", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)

    def version_callback(value: bool) -> None:
        if value:
            typer.echo(f"smartvm {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """smartvm: microVMs for untrusted code."""

    app.command()(doctor)
    if command in COMMAND_MODULES:
        module = COMMAND_MODULES[command]
        _register(app, () if module is None else (module,))
    else:
        _register(app, _SUBCOMMAND_MODULES)
    return app


def _register(app: typer.Typer, modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


def __getattr__(name: str) -> object:
    """``smartvm.cli.main.app``: the full app, built on first use."""
    if name == "app":
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def exit_now(code: object) -> NoReturn:
    """``sys.exit(code)`` for a finished command, without the interpreter's teardown (freeing every
    module and object costs a warm ``smartvm run`` about 50 ms, a tenth of it, and protects nothing).

    The atexit handlers still run (they kill hypervisors no one released and flush logs) and
    stdout/stderr are flushed first. A normal exit instead when another thread still runs (Python
    would wait for it), when the code is not a number (Python prints it), or when flushing fails (a
    closed pipe: Python reports it and exits 120).
    """
    threading = sys.modules.get("threading")
    if not (code is None or isinstance(code, int)) or (threading and threading.active_count() > 1):
        raise SystemExit(code)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None
    atexit._run_exitfuncs()
    os._exit(code or 0)


def main() -> None:
    args = sys.argv[1:]
    if args == ["--version"]:
        sys.stdout.write(f"smartvm {__version__}\n")
        return
    # The imports allocate hundreds of thousands of objects and no garbage: no collections meanwhile
    # (about 7% of their time), and none of those objects looked at by later ones.
    gc.disable()
    if os.environ.get("SMARTVM_TRACEBACK_ON_SIGUSR1") == "1":  # how the tests see where a CLI hangs
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from smartvm.errors import SmartVMError

    app = build_app(args[0] if args and not args[0].startswith("-") else None)
    gc.freeze()
    gc.enable()
    try:
        app()
    except SmartVMError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[red]error[/] {exc.code}: {exc.message}")
        exit_now(2)
    except SystemExit as exc:
        exit_now(exc.code)
