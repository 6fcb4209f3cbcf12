"""vblk ctl: key=value parsing, and errors as one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vblk.ctl import CtlError, parse_assignments


def test_values_are_json_where_they_parse() -> None:
    assert parse_assignments(["id=d0", "size=1048576", "force=true", 'opts={"a":1}', "s=a=b"]) == {
        "id": "d0",
        "size": 1048576,
        "force": True,
        "opts": {"a": 1},
        "s": "a=b",
    }


def test_a_word_without_equals_is_refused() -> None:
    with pytest.raises(CtlError):
        parse_assignments(["id"])


def test_no_daemon_is_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vblk", "ctl", "--control", str(tmp_path / "none"), "export-list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert out.stderr.startswith("vblk: error: ") and out.stderr.count("\n") == 1


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "soon"])
def test_a_timeout_that_is_not_positive_is_a_usage_error(tmp_path: Path, timeout: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vblk", "ctl", "--control", str(tmp_path / "none"),
         "--timeout", timeout, "export-list"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
