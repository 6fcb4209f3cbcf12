"""A real guest against ``vblk serve`` on a qcow2 image and on NBD servers (nbdkit, qemu-nbd).

Each boot runs workloads/integrity.sh (fio verify, ext4 mkfs/mount/fsck, write-zeroes,
discard, then a known pattern at 240 MiB); the host then checks the data with the
storage's own tools: ``qemu-img check`` and ``qemu-img convert`` for qcow2, the raw
file behind nbdkit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import guest as guest_tool
import pytest
from e2e_backend import GUEST_TIMEOUT, Backend, Boot, workload

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

SIZE = 1 << 30
MiB = 1 << 20
PATTERN = (240 * MiB, 2 * MiB)
ZEROED = (200 * MiB, 4 * MiB)


class SpecBackend(Backend):
    """vblk serve on a storage spec that is not a raw path (``nbd+unix://...``, a qcow2 file)."""

    def __init__(self, spec: str, tmp: Path, name: str, **options: object) -> None:
        super().__init__(Path(name), tmp / f"{name}.sock", tmp / f"{name}.log",
                         kind="vblk", spec=spec, **options)  # type: ignore[arg-type]


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{t} is not installed (required in CI)")
            pytest.skip(f"{t} is not installed")


def _server(cmd: list[str], sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, f"{cmd[0]} exited: {proc.stderr.read() if proc.stderr else b''!r}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_integrity(backend: Backend, boot: Boot) -> dict[str, str]:
    res: guest_tool.GuestResult = boot(backend, workload("integrity.sh"), num_queues=2, smp=2,
                                       timeout=GUEST_TIMEOUT)
    assert res.rc == 0, res.output[-3000:]
    v = guest_tool.parse_values(res.output)
    for key in ("fio_verify", "files", "write_zeroes", "discard"):
        assert v.get(key) == "ok", f"{key}={v.get(key)}\n{res.output[-3000:]}"
    assert v.get("fsck") == "clean" and v.get("mount") == "ok", res.output[-3000:]
    assert v["queues"] == "2"
    assert backend.stop() == 0, backend.log[-3000:]
    return v


def _check_raw(raw: bytes | Path, v: dict[str, str]) -> None:
    with open(raw, "rb") as f:
        f.seek(PATTERN[0])
        assert hashlib.md5(f.read(PATTERN[1])).hexdigest() == v["pattern_md5"]
        f.seek(ZEROED[0])
        assert f.read(ZEROED[1]) == bytes(ZEROED[1])


def _qcow2_to_raw(img: Path, tmp: Path) -> Path:
    subprocess.run(["qemu-img", "check", str(img)], check=True, capture_output=True, timeout=120)
    raw = tmp / f"{img.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True,
                   capture_output=True, timeout=300)
    return raw


def _qemu_nbd_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "qemu-nbd"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_qcow2_image(tmp_path: Path, boot: Boot) -> None:
    _need("qemu-img", "qemu-nbd")
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), str(SIZE)], check=True,
                   capture_output=True)
    backend = SpecBackend(str(img), tmp_path, "qcow2", num_queues=2)
    try:
        children = _qemu_nbd_children(backend.proc.pid)
        assert len(children) == 1, "vblk serve runs one qemu-nbd for a qcow2 image"
        v = _run_integrity(backend, boot)
        # qemu-nbd exits with vblk.
        assert not Path(f"/proc/{children[0]}").exists() or Path(
            f"/proc/{children[0]}/stat").read_text().split(")")[1].split()[0] == "Z"
    finally:
        backend.stop()
    _check_raw(_qcow2_to_raw(img, tmp_path), v)


def test_nbd_via_nbdkit(tmp_path: Path, boot: Boot) -> None:
    _need("nbdkit")
    raw = tmp_path / "nbdkit.img"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    sock = tmp_path / "nbdkit-server.sock"
    server = _server(["nbdkit", "--exit-with-parent", "-f", "-U", str(sock), "file", str(raw)],
                     sock)
    try:
        backend = SpecBackend(f"nbd+unix:///?socket={sock}", tmp_path, "nbdkit", num_queues=2)
        try:
            v = _run_integrity(backend, boot)
        finally:
            backend.stop()
    finally:
        _stop(server)
    _check_raw(raw, v)


def test_nbd_via_qemu_nbd(tmp_path: Path, boot: Boot) -> None:
    _need("qemu-img", "qemu-nbd")
    img = tmp_path / "served.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), str(SIZE)], check=True,
                   capture_output=True)
    sock = tmp_path / "qemu-nbd-server.sock"
    # qemu-nbd's defaults: one client, no multi-conn, so vblk's two queues share a connection.
    server = _server(["qemu-nbd", "--persistent", "--format", "qcow2",
                      "--discard", "unmap", "--socket", str(sock), "--export-name", "disk",
                      str(img)], sock)
    try:
        backend = SpecBackend(f"nbd+unix:///disk?socket={sock}", tmp_path, "qemunbd",
                              num_queues=2)
        try:
            v = _run_integrity(backend, boot)
        finally:
            backend.stop()
        assert "no multi-conn; all queues share one connection" in backend.log
    finally:
        _stop(server)
    _check_raw(_qcow2_to_raw(img, tmp_path), v)
