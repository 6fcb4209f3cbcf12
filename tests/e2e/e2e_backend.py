"""The device backend under test, as a subprocess: ``vblk serve`` or qemu-storage-daemon.

``VBLK_E2E_BACKEND=vblk`` (the default) runs ``python -m vblk serve``;
``VBLK_E2E_BACKEND=qsd`` runs QEMU's own vhost-user-blk export, the reference
the guest tests were validated against. Options only vblk has (``--serial``,
``--read-only``) make their tests skip on qsd.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

KINDS = ("vblk", "qsd")
KIND = os.environ.get("VBLK_E2E_BACKEND", "vblk").strip() or "vblk"

#: Every guest run is bounded; QEMU is killed after this.
GUEST_TIMEOUT = 180.0
WORKLOADS = Path(__file__).resolve().parent / "workloads"

#: The fixtures' callables: ``start_backend(name, size=, head=, **Backend options)`` and
#: ``boot(backend, workload_text, **run_guest options)``.
StartBackend = Callable[..., "Backend"]
Boot = Callable[..., Any]


def workload(name: str) -> str:
    """A guest workload script from tests/e2e/workloads/."""
    return (WORKLOADS / name).read_text()


vblk_only = pytest.mark.skipif(
    KIND != "vblk",
    reason=f"VBLK_E2E_BACKEND={KIND}: qemu-storage-daemon's export has no serial/read-only "
    "options matching vblk serve's",
)


class Backend:
    """One backend process serving ``image`` on ``socket``; ``stop()`` sends SIGINT."""

    def __init__(
        self,
        image: Path,
        socket: Path,
        log_path: Path,
        *,
        kind: str = KIND,
        num_queues: int | None = 2,
        serial: str | None = None,
        read_only: bool = False,
        extra: tuple[str, ...] = (),
        spec: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise pytest.UsageError(f"VBLK_E2E_BACKEND must be one of {KINDS}, not {kind!r}")
        self.kind, self.image, self.socket, self.log_path = kind, image, socket, log_path
        self.spec = spec or str(image)  # what vblk serves: the image, or another storage spec
        self.cmd = self._command(num_queues, serial, read_only, extra)
        # A restart may find the socket of a killed predecessor: wait for a new one.
        stale = _identity(socket)
        self._log: IO[str] = open(log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.rc: int | None = None
        deadline = time.monotonic() + 30
        while _identity(socket) in (None, stale):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.kind} did not start listening on {socket} "
                    f"(exit {self.rc}): {' '.join(self.cmd)}\n{self.log}"
                )
            time.sleep(0.05)

    def _command(
        self, num_queues: int | None, serial: str | None, read_only: bool, extra: tuple[str, ...]
    ) -> list[str]:
        if self.kind == "vblk":
            cmd = [sys.executable, "-m", "vblk", "serve", self.spec]
            cmd += ["--socket", str(self.socket)]
            if num_queues is not None:  # None: the backend's default
                cmd += ["--num-queues", str(num_queues)]
            if serial is not None:
                cmd += ["--serial", serial]
            if read_only:
                cmd.append("--read-only")
            return cmd + list(extra)
        if serial is not None or read_only or extra or self.spec != str(self.image):
            raise ValueError(
                "serial/read-only/extra are vblk serve options; mark the test vblk_only"
            )
        qsd = shutil.which("qemu-storage-daemon")
        if qsd is None:
            pytest.fail("qemu-storage-daemon is missing: bash scripts/install-deps.sh")
        nq = "" if num_queues is None else f",num-queues={num_queues}"
        # discard=unmap: QEMU's default (ignore) drops discards, and the guest tests expect a
        # discarded range to read back as zeroes, which is what vblk serve does (punch hole).
        return [
            qsd,
            "--blockdev",
            f"driver=file,node-name=file0,filename={self.image},cache.direct=off,discard=unmap",
            "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap",
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={self.socket},writable=on{nq}",
        ]  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30, sig: int = signal.SIGINT) -> int:
        """``sig`` (SIGINT), then wait; a backend that ignores it is killed and reported as -9."""
        if self.rc is not None:
            return self.rc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.rc = -9
        self._log.close()
        return self.rc


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, ctime) of a socket path, or None: tells a fresh socket from a stale one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def make_image(path: Path, size: int = 1 << 30, head: bytes = b"") -> Path:
    """A sparse raw image, optionally starting with ``head``."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path
