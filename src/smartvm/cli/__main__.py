"""``python -m smartvm.cli`` runs the ``smartvm`` command."""

from smartvm.cli.main import main

main()
