"""python:FILE.py:CLASS: loading, the features its methods turn on, calls off the I/O thread."""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path

import pytest

from vblk.storage.base import FLAG_UNMAP, Op, StorageError
from vblk.storage.plugin import PluginStorage, open_plugin
from vblk.storage.sync import run

RECORDER = """
import threading

class Disk:
    def __init__(self, size="65536", **opts):
        self.data = bytearray(int(size))
        self.calls = []
        self.seen_threads = set()
        self.opts = opts

    def size(self):
        return len(self.data)

    def pread(self, offset, buf):
        self.calls.append(("pread", offset, len(buf), type(buf).__name__))
        self.seen_threads.add(threading.current_thread().name)
        if offset == 4096 * 9:
            raise ValueError("bad block")
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, offset, buf):
        self.calls.append(("pwrite", offset, len(buf), type(buf).__name__))
        if offset == 4096 * 10:
            raise OSError(28, "full")
        self.data[offset : offset + len(buf)] = buf

    def flush(self):
        self.calls.append(("flush",))

    def write_zeroes(self, offset, length, unmap):
        self.calls.append(("zeroes", offset, length, unmap))
        self.data[offset : offset + length] = bytes(length)

class ReadOnly:
    block_size = 4096
    def size(self):
        return 8192
    def pread(self, offset, buf):
        buf[:] = bytes(len(buf))

class Slow:
    thread_model = "parallel"
    threads = 3
    def size(self):
        return 4096
    def pread(self, offset, buf):
        import time
        time.sleep(0.3)

class NoPread:
    def size(self):
        return 512
"""


@pytest.fixture
def plugin_file(tmp_path: Path) -> str:
    p = tmp_path / "plug.py"
    p.write_text(RECORDER)
    return str(p)


def _open(path: str, cls: str, **opts: str) -> PluginStorage:
    return open_plugin(f"{path}:{cls}", opts, False)


def test_methods_present_decide_the_capabilities(plugin_file: str) -> None:
    st = _open(plugin_file, "Disk", size="8192", extra="yes")
    try:
        c = st.caps
        assert (c.size, c.block_size, c.writable, c.flush, c.discard) == (
            8192,
            512,
            True,
            True,
            False,
        )
        assert c.write_zeroes and c.zeroes_unmap
        assert st.disk.opts == {"extra": "yes"}
        assert "serialize" in st.description and "plug.py:Disk" in st.description
    finally:
        st.close()
    ro = _open(plugin_file, "ReadOnly")
    assert (ro.caps.writable, ro.caps.flush, ro.caps.block_size) == (False, False, 4096)
    ro.close()
    forced = open_plugin(f"{plugin_file}:Disk", {}, True)
    assert not forced.caps.writable and not forced.caps.write_zeroes
    forced.close()


def test_one_call_per_guest_buffer_at_consecutive_offsets_no_copies(plugin_file: str) -> None:
    st = _open(plugin_file, "Disk")
    q = st.open_queue(0, 8)
    try:
        src = memoryview(bytearray(b"a" * 512 + b"b" * 1024))
        assert run(q, Op.WRITE, 4096, 1536, [src[:512], src[512:]]) == 1536
        dst = bytearray(1536)
        view = memoryview(dst)
        assert run(q, Op.READ, 4096, 1536, [view[:1024], view[1024:]]) == 1536
        assert bytes(dst) == bytes(src)
        assert st.disk.calls == [
            ("pwrite", 4096, 512, "memoryview"),
            ("pwrite", 4608, 1024, "memoryview"),
            ("pread", 4096, 1024, "memoryview"),
            ("pread", 5120, 512, "memoryview"),
        ]
        assert run(q, Op.WRITE_ZEROES, 4096, 512, [], FLAG_UNMAP) == 0
        assert run(q, Op.FLUSH, 0, 0, []) == 0
        assert st.disk.calls[-2:] == [("zeroes", 4096, 512, True), ("flush",)]
        assert st.disk.seen_threads == {"vblk-plugin-0"}  # never the caller's thread
    finally:
        q.close()
        st.close()


def test_an_exception_fails_that_request_alone(
    plugin_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    st = _open(plugin_file, "Disk")
    q = st.open_queue(0, 8)
    try:
        with caplog.at_level(logging.DEBUG, logger="vblk.storage.plugin"):
            with pytest.raises(OSError) as e:
                run(q, Op.READ, 4096 * 9, 512, [memoryview(bytearray(512))])
        assert e.value.errno == errno.EIO
        failures = [r for r in caplog.records if r.exc_info]
        assert len(failures) == 1 and "bad block" in str(failures[0].exc_info[1])  # type: ignore[index]
        with pytest.raises(OSError) as e:  # an OSError keeps its errno
            run(q, Op.WRITE, 4096 * 10, 512, [memoryview(bytearray(512))])
        assert e.value.errno == errno.ENOSPC
        assert run(q, Op.READ, 0, 512, [memoryview(bytearray(512))]) == 512  # still serving
    finally:
        q.close()
        st.close()


def test_parallel_thread_model_overlaps_calls(plugin_file: str) -> None:
    st = _open(plugin_file, "Slow")
    q = st.open_queue(0, 8)
    try:
        t0 = time.monotonic()
        for i in range(3):
            q.submit(Op.READ, 0, 512, [memoryview(bytearray(512))], 0, i)
        done: list[object] = []
        while len(done) < 3:
            assert q.fd is not None
            import select

            select.select([q.fd], [], [], 5)
            q.clear_signal()
            done += [t for t, r in q.reap() if r == 512]
        assert time.monotonic() - t0 < 0.85  # three 0.3 s calls, not one after another
        assert q.inflight == 0
    finally:
        q.close()
        st.close()


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (None, "missing.py:Disk", "no such file"),
        ("import nonexistent_module_xyz\n", "Disk", "import failed: ModuleNotFoundError"),
        ("def broken(:\n", "Disk", "import failed: SyntaxError"),
        ("raise SystemExit(3)\n", "Disk", "import failed: SystemExit"),
        ("X = 1\n", "Disk", "no class 'Disk'"),
        (RECORDER, "NoPread", "lacks pread()"),
        (
            "class D:\n def size(self): return 1\n def pread(s,o,b): 0\n",
            "D",
            "not a multiple of block_size",
        ),
        ("class D:\n def size(self): return -1\n def pread(s,o,b): 0\n", "D", "not a positive int"),
        (
            "class D:\n def size(self): raise RuntimeError('x')\n def pread(s,o,b): 0\n",
            "D",
            "size() failed: RuntimeError: x",
        ),
        (
            "class D:\n thread_model='wild'\n def size(self): return 512\n def pread(s,o,b): 0\n",
            "D",
            "thread_model 'wild'",
        ),
    ],
)
def test_a_plugin_that_cannot_load_is_one_line(
    tmp_path: Path, source: str | None, target: str, message: str
) -> None:
    p = tmp_path / "bad.py"
    if source is not None:
        p.write_text(source)
        target = f"{p}:{target}"
    else:
        target = str(tmp_path / target)
    with pytest.raises(StorageError) as e:
        open_plugin(target, {}, False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_options_are_refused_by_the_class(plugin_file: str) -> None:
    with pytest.raises(StorageError, match=r"ReadOnly: TypeError: .*takes no arguments"):
        open_plugin(f"{plugin_file}:ReadOnly", {"bogus": "1"}, False)
    with pytest.raises(StorageError, match=r"expected python:FILE\.py:CLASS"):
        open_plugin("nocolon", {}, False)


def test_completions_after_close_are_dropped(plugin_file: str) -> None:
    st = _open(plugin_file, "Slow")
    q = st.open_queue(0, 8)
    q.submit(Op.READ, 0, 512, [memoryview(bytearray(512))], 0, "late")
    q.close()  # the call is still sleeping; its completion must not hit a closed fd
    done = threading.Event()
    threading.Thread(target=lambda: (st.close(), done.set())).start()
    assert done.wait(5)


GROWS = """
import threading

class Disk:
    def __init__(self):
        self.data = bytearray(8192)
        self.resized_on = None

    def size(self):
        return len(self.data)

    def pread(self, offset, buf):
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, offset, buf):
        self.data[offset : offset + len(buf)] = buf

    def resize(self, size):
        self.resized_on = threading.current_thread().name
        if size == 512:
            raise OSError(28, "no")
        self.data.extend(bytes(size - len(self.data)))
"""


def test_resize_runs_the_class_resize_on_the_pool(tmp_path: Path, plugin_file: str) -> None:
    (tmp_path / "grows.py").write_text(GROWS)
    s = _open(str(tmp_path / "grows.py"), "Disk")
    try:
        assert s.resize(16384).size == 16384 and s.caps.size == 16384
        assert s.disk.resized_on.startswith("vblk-plugin-")
        with pytest.raises(StorageError, match=r"resize\(512\) failed: No space left"):
            s.resize(512)
        assert s.caps.size == 16384
    finally:
        s.close()
    plain = _open(plugin_file, "Disk")
    try:
        with pytest.raises(StorageError, match="no resize"):
            plain.resize(1 << 20)
    finally:
        plain.close()
