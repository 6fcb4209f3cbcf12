"""Image opening, sizing and the zeroing fallbacks."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vblk.io.image import Image, ImageError, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("1K", 1024),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("1t", 1 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1M", "10X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_create_is_sparse_and_never_truncates(tmp_path: Path) -> None:
    p = tmp_path / "a.img"
    Image.create(str(p), 1 << 30)
    assert p.stat().st_size == 1 << 30 and p.stat().st_blocks == 0
    p.write_bytes(b"x" * 1024)
    Image.create(str(p), 1 << 30)  # exists: left alone
    assert p.stat().st_size == 1024


def test_open_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such image"):
        Image(str(tmp_path / "missing.img"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(ImageError, match="not a multiple of 512"):
        Image(str(odd))
    with pytest.raises(ImageError, match="directory"):
        Image(str(tmp_path))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        Image(str(empty))
    with pytest.raises(ImageError, match="multiple of 512"):
        Image.create(str(tmp_path / "b.img"), 1000)


def test_readv_writev_multiple_buffers(tmp_path: Path) -> None:
    p = tmp_path / "c.img"
    Image.create(str(p), 1 << 20)
    img = Image(str(p))
    try:
        data = os.urandom(8192)
        img.writev([memoryview(data[:100]), memoryview(data[100:])], 4096)
        a, b = bytearray(5000), bytearray(3192)
        img.readv([memoryview(a), memoryview(b)], 4096)
        assert bytes(a + b) == data
        with pytest.raises(OSError):
            img.readv([memoryview(bytearray(512))], 1 << 20)  # past the end
    finally:
        img.close()


def test_write_zeroes_fallback_to_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import vblk.io.image as image_mod

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    p = tmp_path / "d.img"
    p.write_bytes(b"\xff" * 65536)
    img = Image(str(p))
    try:
        monkeypatch.setattr(image_mod, "fallocate", refuse)
        img.write_zeroes(4096, 8192, unmap=False)
    finally:
        img.close()
    data = p.read_bytes()
    assert (
        data[4096:12288] == bytes(8192)
        and data[:4096] == b"\xff" * 4096
        and data[12288:13000] == b"\xff" * 712
    )


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a loop device over a sparse file (needs root and /dev/loop*)."""
    import shutil
    import subprocess

    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device available: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_size_discard_and_zeroout(loop_device: str) -> None:
    img = Image(loop_device)
    try:
        assert img.is_block_device and img.size == 16 << 20
        data = os.urandom(1 << 20)
        img.writev([memoryview(data)], 0)
        img.discard(0, 65536)
        img.write_zeroes(65536, 65536, unmap=False)  # BLKZEROOUT
        img.write_zeroes(131072, 65536, unmap=True)  # BLKDISCARD, checked, else BLKZEROOUT
        buf = bytearray(1 << 20)
        img.readv([memoryview(buf)], 0)
        assert bytes(buf[:196608]) == bytes(196608)
        assert bytes(buf[196608:]) == data[196608:]
        img.flush()
    finally:
        img.close()


def test_advance_drops_whole_and_partial_buffers() -> None:
    from vblk.io.image import advance

    a, b, c = (memoryview(bytearray(x * n)) for x, n in ((b"a", 4), (b"b", 3), (b"c", 5)))
    assert [bytes(v) for v in advance([a, b, c], 0)] == [b"aaaa", b"bbb", b"ccccc"]
    assert [bytes(v) for v in advance([a, b, c], 5)] == [b"bb", b"ccccc"]
    assert [bytes(v) for v in advance([a, b, c], 7)] == [b"ccccc"]
    assert advance([a, b, c], 12) == []
