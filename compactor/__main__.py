"""``python -m compactor``: the ``compact`` command."""

from .cli import main

raise SystemExit(main())
