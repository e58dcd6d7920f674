"""``smartvm serve`` and ``smartvm keys create|list|revoke``.

The service modules (FastAPI, uvicorn) are imported inside the commands, so that registering these
commands costs no more than typer itself.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from smartvm.service import DEFAULT_DATA_DIR

DataDir = Annotated[Path, typer.Option("--data-dir", help="sandbox state and API keys")]


def _when(t: float | None) -> str:
    return "never" if t is None else dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="port (0: any free one)")] = 49999,
        data_dir: DataDir = DEFAULT_DATA_DIR,
        on_exit: Annotated[
            str,
            typer.Option(help="what stopping the service does to running sandboxes: keep, pause or kill"),
        ] = "keep",
        engine: Annotated[str, typer.Option(help="auto, firecracker or qemu")] = "auto",
        runtime_dir: Annotated[
            Path | None, typer.Option(help="where VM runtime dirs go (default: /dev/shm/.smartvm/runtime)")
        ] = None,
        max_sandboxes: Annotated[
            int | None,
            typer.Option(min=1, help="live sandboxes at most (default 64); more creates get 429 at once"),
        ] = None,
    ) -> None:
        """Serve sandboxes over HTTP (API at /v1, docs at /docs, a test page at /test) until SIGTERM.

        Prints the URL as its last line once it answers requests.
        """
        from smartvm.service.server import serve as run_server

        if on_exit not in ("keep", "pause", "kill"):
            raise typer.BadParameter(f"{on_exit!r}: use keep, pause or kill", param_hint="--on-exit")
        mode: Literal["keep", "pause", "kill"] = on_exit  # type: ignore[assignment]
        if engine not in ("auto", "firecracker", "qemu"):
            raise typer.BadParameter(f"{engine!r}: use auto, firecracker or qemu", param_hint="--engine")
        run_server(
            host=host,
            port=port,
            data_dir=data_dir,
            on_exit=mode,
            engine=engine,
            runtime_dir=runtime_dir,
            max_sandboxes=max_sandboxes,
        )

    keys = typer.Typer(help="API keys of the service (stored hashed in the data dir).", no_args_is_help=True)

    @keys.command("create")
    def create(
        name: Annotated[str | None, typer.Option(help="a label to list and revoke it by")] = None,
        data_dir: DataDir = DEFAULT_DATA_DIR,
    ) -> None:
        """Make a new key and print it as the last line (it is not shown again)."""
        from smartvm.service.keys import KeyStore

        with KeyStore(data_dir) as store:
            key, rec = store.create(name)
        typer.echo(
            f"created API key {rec.name!r} ({rec.prefix}...); send it as the X-API-Key header", err=True
        )
        typer.echo(key)

    @keys.command("list")
    def list_keys(
        data_dir: DataDir = DEFAULT_DATA_DIR,
        all_keys: Annotated[bool, typer.Option("--all", help="also show revoked keys")] = False,
    ) -> None:
        """Names, prefixes, creation and last use of the keys (never the keys themselves)."""
        from smartvm.service.keys import KeyStore

        with KeyStore(data_dir) as store:
            found = store.list(include_revoked=all_keys)
        table = Table(title=f"API keys in {data_dir}")
        for col in ("name", "prefix", "created", "last used", "status"):
            table.add_column(col)
        for k in found:
            status = "active" if k.active else f"revoked {_when(k.revoked_at)}"
            table.add_row(k.name, k.prefix, _when(k.created_at), _when(k.last_used_at), status)
        Console(width=160).print(table)

    @keys.command("revoke")
    def revoke(
        name: Annotated[str, typer.Argument(help="the key's name or prefix")],
        data_dir: DataDir = DEFAULT_DATA_DIR,
    ) -> None:
        """Revoke a key: the service refuses it from the next request on."""
        from smartvm.service.keys import KeyStore

        with KeyStore(data_dir) as store:
            rec = store.revoke(name)
        typer.echo(f"revoked API key {rec.name!r} ({rec.prefix}...)")

    app.add_typer(keys, name="keys")
