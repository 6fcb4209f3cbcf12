"""Fixtures for end-to-end tests: a real guest, a real ``vblk serve``, a real image."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import guest as guest_tool


class Served:
    """``vblk serve`` as a subprocess; ``stop()`` checks it shuts down the way users rely on."""

    def __init__(self, tmp: Path, name: str, *args: str, size: str = "1G") -> None:
        self.image = tmp / f"{name}.img"
        self.socket = tmp / f"{name}.sock"
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "vblk", "serve", str(self.image), "--socket", str(self.socket)]
        cmd += ["--create", size, *args]
        self.proc = subprocess.Popen(cmd, stderr=self._log)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vblk serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        self._log.close()
        return rc


@pytest.fixture(scope="session")
def guest() -> guest_tool.Guest:
    return guest_tool.build()


def boot(
    guest: guest_tool.Guest, served: Served, workload: str, **kw: object
) -> guest_tool.GuestResult:
    """Run a workload; on failure the assertion shows both sides' logs."""
    try:
        res = guest_tool.run(workload, socket=str(served.socket), guest=guest, timeout=240, **kw)  # type: ignore[arg-type]
    except guest_tool.GuestError as e:
        pytest.fail(f"{e}\n--- vblk serve log ---\n{served.log[-3000:]}")
    return res


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("e2e")
