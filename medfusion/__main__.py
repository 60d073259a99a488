"""``python -m medfusion`` runs the command line."""

from medfusion.cli import run

run()
