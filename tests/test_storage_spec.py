"""open_storage: every spec form goes to its backend, and every failure is one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from vblk.storage.base import StorageError
from vblk.storage.file import FileStorage
from vblk.storage.plugin import PluginStorage
from vblk.storage.spec import open_storage, parse_opt


def _open(spec: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"opts": {}, "read_only": False}
    args.update(kw)
    return open_storage(spec, **args)


@pytest.fixture
def fake_backends(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """vblk.storage.nbd and .rbd replaced by recorders (the real ones live on other branches)."""
    calls: list[tuple[Any, ...]] = []
    nbd = types.ModuleType("vblk.storage.nbd")
    nbd.open_nbd = lambda uri, opts, ro: calls.append(("nbd", uri, opts, ro)) or "NBD"  # type: ignore[attr-defined]
    nbd.open_image = lambda p, f, opts, ro: calls.append(("image", p, f, opts, ro)) or "IMG"  # type: ignore[attr-defined]
    rbd = types.ModuleType("vblk.storage.rbd")
    rbd.open_rbd = lambda rest, opts, ro: calls.append(("rbd", rest, opts, ro)) or "RBD"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vblk.storage.nbd", nbd)
    monkeypatch.setitem(sys.modules, "vblk.storage.rbd", rbd)
    return calls


def test_parse_opt() -> None:
    assert parse_opt("size=64M") == ("size", "64M")
    assert parse_opt("base.x=a=b") == ("base.x", "a=b")
    assert parse_opt("k=") == ("k", "")
    for bad in ("novalue", "=v", "1k=v", "a b=c"):
        with pytest.raises(ValueError):
            parse_opt(bad)


def test_raw_path_is_a_file_storage(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    st = _open(str(p), create=1 << 20, aio="sync")
    try:
        assert isinstance(st, FileStorage) and st.caps.size == 1 << 20
        assert "raw file" in st.description and str(p) in st.description
    finally:
        st.close()


def test_uris_and_formats_reach_their_backends(
    tmp_path: Path, fake_backends: list[tuple[Any, ...]]
) -> None:
    assert _open("nbd://h:10809/exp", opts={"a": "1"}) == "NBD"
    assert _open("nbd+unix:///e?socket=/s", read_only=True) == "NBD"
    assert _open("rbd:pool/img", opts={"conf": "x"}) == "RBD"
    q = tmp_path / "disk.img"
    q.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(4088))
    assert _open(str(q)) == "IMG"
    assert _open(str(q), fmt="vmdk") == "IMG"
    raw = _open(str(q), fmt="raw", aio="sync")  # --format raw: the header is not trusted
    assert isinstance(raw, FileStorage)
    raw.close()
    assert fake_backends == [
        ("nbd", "nbd://h:10809/exp", {"a": "1"}, False),
        ("nbd", "nbd+unix:///e?socket=/s", {}, True),
        ("rbd", "pool/img", {"conf": "x"}, False),
        ("image", str(q), "qcow2", {}, False),
        ("image", str(q), "vmdk", {}, False),
    ]


def test_python_spec_loads_the_plugin(tmp_path: Path) -> None:
    p = tmp_path / "p.py"
    p.write_text("class D:\n def size(self): return 4096\n def pread(self, o, b): pass\n")
    st = _open(f"python:{p}:D")
    assert isinstance(st, PluginStorage) and not st.caps.writable
    st.close()


@pytest.mark.parametrize(
    ("spec", "kw", "message"),
    [
        ("{tmp}/missing.img", {}, "no such image (use --create SIZE"),
        ("{tmp}", {}, "is a directory"),
        ("{tmp}/raw.img", {"opts": {"x": "1"}}, "raw images take no --opt"),
        ("{tmp}/raw.img", {"fmt": "Bad Name"}, "not a format name"),
        ("{tmp}/raw.img", {"aio": "bogus"}, "unknown --aio"),
        ("nbd://h/e", {"direct": True}, "--direct applies to image files"),
        ("python:x.py:C", {"create": 4096}, "--create applies to image files"),
        ("rbd:p/i", {"fmt": "raw"}, "--format applies to image files"),
        ("{tmp}/raw.img", {"opts": {"bad key": "1"}}, "not an option name"),
        ("", {}, "empty storage spec"),
    ],
)
def test_spec_errors_are_one_line(
    tmp_path: Path, spec: str, kw: dict[str, Any], message: str
) -> None:
    (tmp_path / "raw.img").write_bytes(bytes(4096))
    with pytest.raises(StorageError) as e:
        _open(spec.format(tmp=tmp_path), **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_backend_module_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vblk.storage.nbd", None)  # import fails as if absent
    with pytest.raises(StorageError, match="backend"):
        _open("nbd://localhost/x")


def test_a_backend_that_raises_anything_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbd = types.ModuleType("vblk.storage.nbd")

    def boom(*a: Any) -> Any:
        raise RuntimeError("connection refused\nsecond line")

    nbd.open_nbd = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vblk.storage.nbd", nbd)
    with pytest.raises(StorageError) as e:
        _open("nbd://localhost/x")
    assert str(e.value) == "nbd://localhost/x: cannot open: connection refused second line"


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_a_real_qcow2_is_not_served_as_raw(
    tmp_path: Path, fake_backends: list[tuple[Any, ...]]
) -> None:
    p = tmp_path / "x.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    assert _open(str(p)) == "IMG" and fake_backends[-1][2] == "qcow2"
