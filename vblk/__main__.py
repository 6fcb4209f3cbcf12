"""``python -m vblk`` is the ``vblk`` console script."""

from vblk.cli import main

raise SystemExit(main())
