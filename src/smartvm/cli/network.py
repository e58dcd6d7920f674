"""``smartvm network doctor`` and ``smartvm network sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    network = typer.Typer(
        help="Host networking: bridge, TAP devices, sandbox namespaces, NAT.", no_args_is_help=True
    )

    @network.command("doctor")
    def doctor() -> None:
        """Check IP forwarding, nftables and leftover smartvm namespaces, links and tables."""
        from smartvm.host.network_doctor import check_ip_forwarding, check_network_leftovers, check_nftables

        table = Table(title="smartvm network doctor")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col)
        results = [check_ip_forwarding(), check_nftables(), check_network_leftovers()]
        for r in results:
            table.add_row(r.name, "[green]ok[/]" if r.ok else "[red]problem[/]", r.detail, r.fix)
        Console(width=200).print(table)
        if not all(r.ok for r in results):
            raise typer.Exit(1)

    @network.command("sweep")
    def sweep(
        orphans: Annotated[
            bool, typer.Option("--orphans", help="Also remove smartvm-named devices that no lease claims.")
        ] = False,
        state_dir: Annotated[
            Path | None, typer.Option("--state-dir", help="Lease directory (default: <data dir>/network).")
        ] = None,
    ) -> None:
        """Remove namespaces, TAPs, veths and NAT entries of VMs whose owner process died."""
        from smartvm.host.network_doctor import sweep as do_sweep

        report = do_sweep(state_dir, orphans=orphans)
        console = Console()
        console.print(f"released leases: {', '.join(report.released_leases) or 'none'}")
        console.print(f"removed namespaces: {', '.join(report.removed_namespaces) or 'none'}")
        console.print(f"removed links: {', '.join(report.removed_links) or 'none'}")
        console.print(f"removed port forwards: {', '.join(map(str, report.removed_ports)) or 'none'}")
        if report.removed_table:
            console.print("removed the unused smartvm nftables table")

    app.add_typer(network, name="network")
