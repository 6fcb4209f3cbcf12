"""Small pieces shared by test modules."""

from __future__ import annotations

import os
import subprocess

import pytest


def need_io_uring() -> None:
    """Skip a test that needs io_uring where the kernel forbids it; never on CI, which has it."""
    from vblk.io import uring

    if not uring.available():
        assert not os.environ.get("CI"), "io_uring must work on the CI machine"
        pytest.skip("io_uring not allowed here")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a helper process (qemu-storage-daemon, a server); kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
