"""FileStorage: a raw file or block device behind the storage interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from vblk.storage.base import StorageError
from vblk.storage.file import FileStorage, create_raw


def test_capabilities_and_description(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    assert create_raw(str(p), 1 << 20) and not create_raw(str(p), 1 << 30)
    st = FileStorage(str(p), aio="threads", io_threads=3)
    c = st.caps
    assert (c.size, c.block_size, c.writable, c.flush, c.discard, c.write_zeroes) == (
        1 << 20,
        512,
        True,
        True,
        True,
        True,
    )
    assert st.description == f"raw file {p}, --aio threads (3 threads per queue)"
    st.close()
    ro = FileStorage(str(p), read_only=True, aio="sync")
    assert not ro.caps.writable
    with pytest.raises(StorageError, match="read-only"):
        ro.resize(2 << 20)
    ro.close()


def test_resize_grows_the_file(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    create_raw(str(p), 1 << 20)
    st = FileStorage(str(p), aio="sync")
    assert st.resize(4 << 20).size == 4 << 20 and p.stat().st_size == 4 << 20
    with pytest.raises(StorageError, match="multiple of 512"):
        st.resize(1000)
    st.close()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such image"):
        FileStorage(str(tmp_path / "nope"), aio="sync")
    with pytest.raises(StorageError, match="at least 1"):
        FileStorage(str(tmp_path / "nope"), aio="threads", io_threads=0)
    with pytest.raises(StorageError, match="must be a positive multiple"):
        create_raw(str(tmp_path / "odd"), 1000)
