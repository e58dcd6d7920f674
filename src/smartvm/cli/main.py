"""The ``smartvm`` command: one verb per lifecycle step, mirroring the library."""

from __future__ import annotations

import importlib

import typer
from rich.console import Console
from rich.table import Table

from smartvm import __version__
from smartvm.errors import SmartVMError

app = typer.Typer(
    name="smartvm",
    help="Firecracker microVMs (and QEMU microvm where Firecracker cannot run) from one command.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

# Sub-command modules; each exposes `register(app)`.
_SUBCOMMAND_MODULES = ("smartvm.cli.images", "smartvm.cli.vm", "smartvm.cli.network")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"smartvm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """smartvm: microVMs for untrusted code."""


@app.command()
def doctor() -> None:
    """Check this host: KVM, engines, /dev/shm, TAP devices, namespaces.

    Exits 1 when no engine can boot a guest here (neither QEMU nor Firecracker is usable).
    """
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


def _register_subcommands() -> None:
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_subcommands()


def main() -> None:
    try:
        app()
    except SmartVMError as exc:
        err_console.print(f"[red]error[/] {exc.code}: {exc.message}")
        raise SystemExit(2) from exc
