"""``smartvm sandbox create|list|exec|cp|pause|resume|snapshot|kill``: a client of a running service.

The service is found at ``--url`` (or ``$SMARTVM_URL``, default http://127.0.0.1:49999) and the API
key is read from ``$SMARTVM_API_KEY`` only (an option would show it in ``ps``). A failure prints the
service's error code and message and exits 2, like every other ``smartvm`` command; ``exec`` exits
with the command's own code (124 when its ``--timeout`` passed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from smartvm.cli.common import EXIT_INTERRUPTED, EXIT_TIMEOUT
from smartvm.cli.copy_plan import CopyPlan, local_target, split_copy
from smartvm.errors import ErrorCode, SmartVMError
from smartvm.service.client import CHUNK, DEFAULT_URL, KEY_ENV, URL_ENV, ServiceClient

Url = Annotated[
    str, typer.Option("--url", envvar=URL_ENV, help=f"the service (default {DEFAULT_URL}); key: ${KEY_ENV}")
]
SandboxId = Annotated[str, typer.Argument(help="a sandbox id (sb-...)", show_default=False)]
# A sandbox path may be relative (to /home/user), unlike smartvm cp's VM paths.
_REMOTE = re.compile(r"(sb-[0-9a-f]{8}):(.+)")


def _client(url: str) -> ServiceClient:
    return ServiceClient(url, os.environ.get(KEY_ENV))


def _pairs(pairs: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SmartVMError(ErrorCode.INVALID_ARGUMENT, f"{option} {pair!r}: write it as key=value")
        out[key] = value
    return out


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _write(stream: int) -> Callable[[str], None]:
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer

    def write(text: str) -> None:
        out.write(text.encode())
        out.flush()

    return write


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def copy(client: ServiceClient, plan: CopyPlan) -> int:
    """Stream one file between the host and a sandbox; the bytes copied. A download is written to a
    temp file beside the target and renamed over it at the end (a failure leaves no partial file)."""
    if plan.upload:
        if not plan.local.is_file():
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"{plan.local} is not a regular file (copying directories is not supported)",
            )
        target = plan.guest_path
        if target.endswith("/"):
            target += plan.local.name
        return int(client.upload(plan.vm_id, target, _file_chunks(plan.local))["size"])
    from smartvm.agent.host_file import HostFileWriter

    local = local_target(plan, plan.guest_path)
    with client.download(plan.vm_id, plan.guest_path) as chunks, HostFileWriter(local) as out:
        for chunk in chunks:
            out.write(chunk)
        out.commit(0o644)
        return out.size


def register(app: typer.Typer) -> None:
    sandbox = typer.Typer(
        help=f"Sandboxes of a running `smartvm serve` (--url or ${URL_ENV}; the API key in ${KEY_ENV}).",
        no_args_is_help=True,
    )

    @sandbox.command()
    def create(
        template: Annotated[str, typer.Option("--template", "-t", help="a template or snapshot")] = "base",
        timeout: Annotated[
            float | None, typer.Option(min=0.001, help="seconds until the sandbox ends (default 300)")
        ] = None,
        metadata: Annotated[
            list[str] | None, typer.Option("--metadata", "-m", help="key=value; repeat for more")
        ] = None,
        url: Url = DEFAULT_URL,
    ) -> None:
        """Create a sandbox; prints its id as the last line."""
        meta = _pairs(metadata or [], "--metadata")
        with _client(url) as client:
            sb = client.create(template, timeout=timeout, metadata=meta)
        typer.echo(f"created {sb['id']} from {sb['template']!r}, ends {_when(sb['end_at'])}", err=True)
        typer.echo(sb["id"])

    @sandbox.command("list")
    def list_(
        state: Annotated[
            list[str] | None, typer.Option(help="running, paused, stopped, ... (default: all but stopped)")
        ] = None,
        metadata: Annotated[list[str] | None, typer.Option("--metadata", "-m", help="key=value")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
        url: Url = DEFAULT_URL,
    ) -> None:
        """List sandboxes (filter by state and metadata)."""
        with _client(url) as client:
            found = client.list(states=state or [], metadata=_pairs(metadata or [], "--metadata"))
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None)
        for column in ("id", "template", "state", "created", "ends", "metadata"):
            table.add_column(column)
        for sb in found:
            meta = " ".join(f"{k}={v}" for k, v in sorted(sb["metadata"].items()))
            row = (sb["id"], sb["template"], sb["state"], _when(sb["created_at"]), _when(sb["end_at"]), meta)
            table.add_row(*row)
        Console(width=200).print(table)

    @sandbox.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def exec_(
        ctx: typer.Context,
        sandbox_id: SandboxId,
        timeout: Annotated[
            float | None, typer.Option(min=0.001, help="seconds the command may run (default: no limit)")
        ] = None,
        url: Url = DEFAULT_URL,
    ) -> None:
        """Run CMD in a sandbox with its output streamed; exits with CMD's code: exec ID -- ls -l"""
        argv = list(ctx.args)
        if not argv:
            raise SmartVMError(
                ErrorCode.INVALID_ARGUMENT,
                f"give the command after --, e.g. smartvm sandbox exec {sandbox_id} -- uname -a",
            )
        try:
            with _client(url) as client:
                done = client.exec_stream(
                    sandbox_id, argv, timeout=timeout, on_stdout=_write(1), on_stderr=_write(2)
                )
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None  # the socket closed: the command is killed
        except SmartVMError as exc:
            if exc.code is not ErrorCode.EXEC_TIMEOUT:
                raise
            typer.echo(f"error {exc.code}: {exc.message}", err=True)
            raise typer.Exit(EXIT_TIMEOUT) from None
        raise typer.Exit(int(done["exit_code"]))

    @sandbox.command()
    def cp(
        src: Annotated[str, typer.Argument(help="a host path or SANDBOX_ID:path")],
        dst: Annotated[str, typer.Argument(help="a host path or SANDBOX_ID:path")],
        url: Url = DEFAULT_URL,
    ) -> None:
        """Copy a file into or out of a sandbox, streamed: cp ./f sb-1a2b3c4d:f, cp sb-1a2b3c4d:f ."""
        usage = "SANDBOX_ID:path (relative paths are under /home/user), e.g. sb-1a2b3c4d:data.csv"
        plan = split_copy(src, dst, _REMOTE, usage)
        with _client(url) as client:
            size = copy(client, plan)
        typer.echo(f"copied {size} bytes", err=True)

    @sandbox.command()
    def pause(sandbox_id: SandboxId, url: Url = DEFAULT_URL) -> None:
        """Pause a sandbox to disk (memory and processes are kept)."""
        with _client(url) as client:
            typer.echo(f"{client.pause(sandbox_id)['id']} paused", err=True)

    @sandbox.command()
    def resume(
        sandbox_id: SandboxId,
        timeout: Annotated[float | None, typer.Option(min=0.001, help="a new end, seconds from now")] = None,
        url: Url = DEFAULT_URL,
    ) -> None:
        """Resume a paused sandbox."""
        with _client(url) as client:
            typer.echo(f"{client.resume(sandbox_id, timeout=timeout)['id']} running", err=True)

    @sandbox.command()
    def snapshot(
        sandbox_id: SandboxId,
        name: Annotated[str, typer.Argument(help="the snapshot's name; create --template NAME uses it")],
        url: Url = DEFAULT_URL,
    ) -> None:
        """Snapshot a sandbox by name; prints the name as the last line."""
        with _client(url) as client:
            snap = client.snapshot(sandbox_id, name)
        typer.echo(f"snapshot of {sandbox_id}: {snap['size_bytes']} bytes on disk", err=True)
        typer.echo(snap["name"])

    @sandbox.command()
    def fork(
        sandbox_id: SandboxId,
        count: Annotated[int, typer.Option(min=1, max=100, help="how many forks")] = 1,
        timeout: Annotated[
            float | None, typer.Option(min=0.001, help="the forks' end, seconds from now")
        ] = None,
        url: Url = DEFAULT_URL,
    ) -> None:
        """New sandboxes that continue from this moment of SANDBOX_ID; prints their ids, one per line.
        Exits 2 if any fork failed (its error is printed)."""
        with _client(url) as client:
            forks = client.fork(sandbox_id, count, timeout=timeout)
        failed = [f["error"] for f in forks if "error" in f]
        for error in failed:
            typer.echo(f"error {error['code']}: {error['message']}", err=True)
        for made in forks:
            if "sandbox" in made:
                typer.echo(made["sandbox"]["id"])
        if failed:
            raise typer.Exit(2)

    @sandbox.command()
    def egress(
        sandbox_id: SandboxId,
        default: Annotated[str, typer.Option(help="allow or deny what no rule names")] = "allow",
        allow: Annotated[list[str] | None, typer.Option(help="a CIDR always reachable (repeat)")] = None,
        deny: Annotated[list[str] | None, typer.Option(help="a CIDR never reachable (repeat)")] = None,
        url: Url = DEFAULT_URL,
    ) -> None:
        """Replace what a sandbox may connect to: egress ID --default deny --allow 1.1.1.1/32"""
        with _client(url) as client:
            rules = client.set_egress(sandbox_id, default, allow or [], deny or [])["egress"]
        allowed, denied = ", ".join(rules["allow"]) or "-", ", ".join(rules["deny"]) or "-"
        typer.echo(f"{sandbox_id} egress: default {rules['default']}; allow {allowed}; deny {denied}")

    @sandbox.command()
    def kill(sandbox_id: SandboxId, url: Url = DEFAULT_URL) -> None:
        """Kill a sandbox and free all it holds (killing a stopped one is not an error)."""
        with _client(url) as client:
            client.kill(sandbox_id)
        typer.echo(f"{sandbox_id} killed", err=True)

    app.add_typer(sandbox, name="sandbox")
