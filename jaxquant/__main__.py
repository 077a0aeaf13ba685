"""``python -m jaxquant`` runs the ``jaxquant`` command."""

from jaxquant.cli import main

raise SystemExit(main())
