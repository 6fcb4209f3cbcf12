"""``vblk info``: placeholder until the userspace driver lands."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    del sub


def _unused(args: argparse.Namespace) -> int:
    return 0
