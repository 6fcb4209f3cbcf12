"""The fuzz targets' counts in the pytest summary: cases run and crashes, per target."""

from __future__ import annotations

import pytest
from fuzzing import COUNTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not COUNTS:
        return
    terminalreporter.section("fuzz")
    for target, (cases, crashes) in sorted(COUNTS.items()):
        terminalreporter.write_line(f"fuzz: {target} {cases} cases, {crashes} crashes")
    total = sum(c for c, _ in COUNTS.values())
    crashes = sum(c for _, c in COUNTS.values())
    terminalreporter.write_line(f"fuzz: total {total} cases, {crashes} crashes")
