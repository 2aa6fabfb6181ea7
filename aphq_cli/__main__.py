"""``python -m aphq_cli`` runs the CLI (torchrun uses this form)."""

from aphq_cli.cli import main

main()
