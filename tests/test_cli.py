"""``vblk serve`` as a user meets it: bad input gets one line and a non-zero exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def vblk(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vblk", *args], capture_output=True, text=True, timeout=timeout
    )


def one_error_line(p: subprocess.CompletedProcess[str], needle: str) -> None:
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr
    assert any(needle in line for line in lines), p.stderr
    assert len([line for line in lines if "error" in line]) == 1, p.stderr


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(1 << 20)
    return p


def test_missing_image(tmp_path: Path) -> None:
    one_error_line(
        vblk("serve", str(tmp_path / "nope.img"), "--socket", str(tmp_path / "s")), "no such image"
    )


def test_bad_create_size(tmp_path: Path) -> None:
    one_error_line(
        vblk("serve", str(tmp_path / "n.img"), "--socket", str(tmp_path / "s"), "--create", "12Q"),
        "bad size",
    )


def test_image_not_multiple_of_512(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * 1000)
    one_error_line(vblk("serve", str(p), "--socket", str(tmp_path / "s")), "multiple of 512")


def test_num_queues_zero(img: Path, tmp_path: Path) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "s"), "--num-queues", "0"),
        "--num-queues",
    )


@pytest.mark.parametrize("value", ["0", "x", "257"])
def test_bad_queue_threads(img: Path, tmp_path: Path, value: str) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "s"), "--queue-threads", value),
        "--queue-threads",
    )


@pytest.mark.parametrize("value", ["-1", "1.5", "100001"])
def test_bad_coalesce_us(img: Path, tmp_path: Path, value: str) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "s"), "--coalesce-us", value),
        "--coalesce-us",
    )


def test_serial_too_long(img: Path, tmp_path: Path) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "s"), "--serial", "x" * 21), "20 bytes"
    )


def test_socket_dir_not_writable(img: Path, tmp_path: Path) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "no" / "dir" / "s")), "cannot listen"
    )


def test_socket_path_is_a_regular_file(img: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    one_error_line(vblk("serve", str(img), "--socket", str(f)), "not a socket")


@pytest.mark.parametrize("mode", ["999", "01000", "rw", "", "-600"])
def test_bad_socket_mode(img: Path, tmp_path: Path, mode: str) -> None:
    one_error_line(
        vblk("serve", str(img), "--socket", str(tmp_path / "s"), "--socket-mode", mode),
        "--socket-mode",
    )
    assert not (tmp_path / "s").exists()


def test_socket_in_use(img: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    try:
        one_error_line(vblk("serve", str(img), "--socket", path), "in use")
    finally:
        s.close()


def start_serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vblk", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "socket never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_create_serve_and_graceful_signal(tmp_path: Path, sig: int) -> None:
    image = tmp_path / "new.img"
    sock = tmp_path / "v.sock"
    proc = start_serve(str(image), "--socket", str(sock), "--create", "64M")
    wait_for(sock, proc)
    assert image.stat().st_size == 64 << 20
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not sock.exists()


def test_stale_socket_is_replaced(img: Path, tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))
    s.close()  # bound but nobody listens: a crashed server's leftover
    proc = start_serve(str(img), "--socket", str(sock))
    try:
        deadline = time.monotonic() + 15  # however slow the start, the stale file gets replaced
        while True:
            assert proc.poll() is None
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(str(sock))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the stale socket was never replaced"
                time.sleep(0.05)
            finally:
                c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_python_dash_m_and_help() -> None:
    p = vblk("serve", "--help")
    assert p.returncode == 0 and "--num-queues" in p.stdout and "--read-only" in p.stdout
    assert os.path.basename(sys.executable)


@pytest.mark.parametrize(
    ("spec", "extra", "needle"),
    [
        ("python:{tmp}/nope.py:Disk", [], "no such file"),
        ("python:{tmp}/broken.py:Disk", [], "import failed: SyntaxError"),
        ("python:{tmp}/broken.py", [], "expected python:FILE.py:CLASS"),
        ("{tmp}/disk.img", ["--opt", "novalue"], "is not KEY=VALUE"),
        ("{tmp}/disk.img", ["--opt", "a=1", "--opt", "a=2"], "--opt a given twice"),
        ("{tmp}/disk.img", ["--opt", "a=1"], "raw images take no --opt"),
        ("nbd://localhost/x", ["--direct"], "--direct applies to image files"),
        ("{tmp}/corrupt.qcow2", ["--format", "Q W"], "not a format name"),
    ],
)
def test_specs_that_cannot_be_opened_are_one_line(
    img: Path, tmp_path: Path, spec: str, extra: list[str], needle: str
) -> None:
    (tmp_path / "broken.py").write_text("def oops(:\n")
    (tmp_path / "corrupt.qcow2").write_bytes(b"QFI\xfb" + bytes(508))
    p = vblk("serve", spec.format(tmp=tmp_path), "--socket", str(tmp_path / "s"), *extra)
    one_error_line(p, needle)
