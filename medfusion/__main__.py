"""``python -m medfusion`` runs the command line."""

from medfusion.cli import main

raise SystemExit(main())
