"""Image opening, sizing and the zeroing fallbacks."""

import os
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
