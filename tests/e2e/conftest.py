"""Fixtures for end-to-end tests: a real guest (QEMU TCG) against a real backend process.

The guest is built once per session (cached in ~/.cache/vblk/guest). The backend
is ``vblk serve`` unless ``VBLK_E2E_BACKEND=qsd`` selects qemu-storage-daemon.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import guest as guest_tool
from e2e_backend import GUEST_TIMEOUT, Backend, Boot, StartBackend, make_image


@pytest.fixture(scope="session")
def guest() -> guest_tool.Guest:
    try:
        return guest_tool.build()
    except guest_tool.GuestError as e:
        pytest.fail(f"cannot build the test guest: {e}")


@pytest.fixture(scope="module")
def start_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartBackend]:
    """``start_backend(name, size=..., **options)``: a fresh sparse image and a backend serving it.

    Backends a test did not stop itself are stopped here, and must exit 0 on SIGINT
    and remove their socket.
    """
    tmp = tmp_path_factory.mktemp("e2e")
    started: list[Backend] = []

    def start(name: str, *, size: int = 1 << 30, head: bytes = b"", **options: object) -> Backend:
        image = make_image(tmp / f"{name}.img", size, head)
        b = Backend(image, tmp / f"{name}.sock", tmp / f"{name}.log", **options)  # type: ignore[arg-type]
        started.append(b)
        return b

    yield start
    for b in started:
        running = b.rc is None
        rc = b.stop()
        if running:
            assert rc == 0, f"{b.kind} exited {rc} on SIGINT:\n{b.log[-3000:]}"
            assert not b.socket.exists(), f"{b.kind} left its socket behind"


@pytest.fixture(scope="session")
def boot(guest: guest_tool.Guest) -> Boot:
    """``boot(backend, workload_text, **run_guest_options)``; failures show both sides' logs."""

    def run(backend: Backend, script: str, **kw: object) -> guest_tool.GuestResult:
        kw.setdefault("timeout", GUEST_TIMEOUT)
        kw.setdefault("alive", backend.alive)  # a crashed backend fails the boot at once
        try:
            return guest_tool.run_guest(backend.socket, script, guest=guest, **kw)  # type: ignore[arg-type]
        except guest_tool.GuestError as e:
            pytest.fail(f"{e}\n--- {backend.kind} log ---\n{backend.log[-3000:]}")

    return run
