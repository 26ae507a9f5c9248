"""`python -m tokenwatch` runs the command line."""

from __future__ import annotations

from tokenwatch.cli import main

raise SystemExit(main())
