"""``python -m pillow_sdlatent``: the ``sdlatent`` command line."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
