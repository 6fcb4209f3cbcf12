"""``python:FILE.py:CLASS``: a user's class as the storage, nbdkit-plugin style.

The class needs only ``size()`` and ``pread(offset, buf)``; each optional
method it has (``pwrite``, ``flush``, ``discard``, ``write_zeroes``) turns
the matching feature on; ``resize(size)`` lets ``export-resize`` change
``size()`` at run time (it runs on the pool, like every other call).
Optional attributes: ``block_size`` (default 512) and ``thread_model``:
``"serialize"`` (default; one call at a time, on one thread) or
``"parallel"`` (a pool of ``threads`` threads, default 4, so the class must
be thread-safe). Calls never run on an I/O thread: a pool runs
them and hands completions back through a :class:`CompletionChannel`.

An exception from a method fails that request alone (VIRTIO_BLK_S_IOERR;
an OSError's errno is kept) and is logged with its traceback at debug
level; the plugin keeps serving. Buffers are memoryviews of guest memory,
one call per guest buffer at consecutive offsets, never copied.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import select
import threading
from queue import SimpleQueue
from typing import Any, cast

from vblk.storage.base import (
    FLAG_UNMAP,
    Capabilities,
    ChannelQueue,
    Op,
    StorageError,
    StorageQueue,
)

__all__ = ["PluginStorage", "load_class", "open_plugin"]

log = logging.getLogger(__name__)

THREAD_MODELS = ("serialize", "parallel")
DEFAULT_THREADS = 4
MAX_BLOCK_SIZE = 1 << 16
_READ, _WRITE, _FLUSH, _DISCARD, _ZEROES = (int(o) for o in Op)
#: Not a StorageQueue operation: resize() hands the class's resize to the pool with it.
_RESIZE = -1
#: How long export-resize waits for a plugin's resize().
RESIZE_TIMEOUT = 60.0

_Work = tuple["_PluginQueue", int, int, int, list[memoryview], int, object]


def load_class(path: str, name: str) -> type:
    """Import ``path`` as a module and return its class ``name``; StorageError in one line."""
    if not os.path.isfile(path):
        raise StorageError(f"python plugin {path}: no such file")
    modname = "vblk_plugin_" + "".join(c if c.isalnum() else "_" for c in path)
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise StorageError(f"python plugin {path}: cannot be imported (not a .py file?)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        log.debug("importing %s failed", path, exc_info=True)
        raise StorageError(f"python plugin {path}: import failed: {_one_line(e)}") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise StorageError(f"python plugin {path}: no class {name!r} in it")
    missing = [m for m in ("size", "pread") if not callable(getattr(cls, m, None))]
    if missing:
        raise StorageError(f"python plugin {path}: class {name} lacks {' and '.join(missing)}()")
    return cls


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class PluginStorage:
    """A storage served by an instance of a user's class, on a pool of threads."""

    def __init__(self, disk: Any, label: str, *, read_only: bool = False) -> None:
        self.disk = disk
        self.label = label
        self.caps = self._caps(read_only)
        self.thread_model = str(getattr(disk, "thread_model", "serialize"))
        if self.thread_model not in THREAD_MODELS:
            raise StorageError(
                f"{label}: thread_model {self.thread_model!r} is not one of {THREAD_MODELS}"
            )
        threads = 1
        if self.thread_model == "parallel":
            threads = getattr(disk, "threads", DEFAULT_THREADS)
            if not isinstance(threads, int) or not 1 <= threads <= 256:
                raise StorageError(f"{label}: threads must be an int in 1..256, got {threads!r}")
        self.threads = threads
        self.description = (
            f"python plugin {label} ({self.thread_model}"
            + (f", {self.threads} threads" if self.threads > 1 else "")
            + ")"
        )
        self._work: SimpleQueue[_Work | None] = SimpleQueue()
        self._pool: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _caps(self, read_only: bool) -> Capabilities:
        disk, label = self.disk, self.label
        bs = getattr(disk, "block_size", 512)
        if not isinstance(bs, int) or bs < 512 or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise StorageError(f"{label}: block_size must be a power of two in 512..65536")
        try:
            size = disk.size()
        except Exception as e:
            raise StorageError(f"{label}: size() failed: {_one_line(e)}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise StorageError(f"{label}: size() returned {size!r}, not a positive int")
        if size % bs:
            raise StorageError(f"{label}: size {size} is not a multiple of block_size {bs}")

        def has(name: str) -> bool:
            return callable(getattr(disk, name, None))

        writable = has("pwrite") and not read_only
        return Capabilities(
            size=size,
            block_size=bs,
            writable=writable,
            flush=has("flush") and writable,
            discard=has("discard") and writable,
            write_zeroes=has("write_zeroes") and writable,
            zeroes_unmap=has("write_zeroes") and writable,
            discard_granularity=max(bs, 4096),
        )

    def open_queue(self, index: int, depth: int) -> StorageQueue:
        with self._lock:
            # Started by the first queue: on a thread that blocks the main thread's signals.
            while len(self._pool) < self.threads:
                t = threading.Thread(
                    target=self._serve, name=f"vblk-plugin-{len(self._pool)}", daemon=True
                )
                t.start()
                self._pool.append(t)
        return _PluginQueue(self)

    def resize(self, size: int) -> Capabilities:
        """Call the class's ``resize(size)`` on the pool, then read ``size()`` again."""
        if not callable(getattr(self.disk, "resize", None)):
            raise StorageError(f"python plugin {self.label} cannot be resized (it has no resize())")
        if not self.caps.writable:
            raise StorageError(f"python plugin {self.label}: read-only")
        queue = self.open_queue(-1, 1)
        try:
            queue.submit(_RESIZE, size, 0, [], 0, None)
            channel = cast(_PluginQueue, queue).channel
            assert channel.fd is not None
            ready, _, _ = select.select([channel.fd], [], [], RESIZE_TIMEOUT)
            if not ready:
                raise StorageError(
                    f"python plugin {self.label}: resize() took over {RESIZE_TIMEOUT:.0f}s"
                )
            [(_, result)] = queue.reap()
        finally:
            queue.close()
        if result < 0:
            raise StorageError(
                f"python plugin {self.label}: resize({size}) failed: {os.strerror(-result)}"
            )
        self.caps = self._caps(not self.caps.writable)
        return self.caps

    def close(self) -> None:
        with self._lock:
            for _ in self._pool:
                self._work.put(None)
            for t in self._pool:
                t.join(30)
            self._pool = []
        close = getattr(self.disk, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("%s: close() failed", self.label)

    def _serve(self) -> None:
        get = self._work.get
        call = self.call
        while (item := get()) is not None:
            queue, op, offset, length, bufs, flags, token = item
            queue.channel.put(token, call(op, offset, length, bufs, flags))

    def call(self, op: int, offset: int, length: int, bufs: list[memoryview], flags: int) -> int:
        """Run one operation on the user's object: the result contract of StorageQueue."""
        disk = self.disk
        try:
            if op == _READ:
                for b in bufs:
                    if len(b):
                        disk.pread(offset, b)
                        offset += len(b)
                return length
            if op == _WRITE:
                for b in bufs:
                    if len(b):
                        disk.pwrite(offset, b)
                        offset += len(b)
                return length
            if op == _FLUSH:
                disk.flush()
            elif op == _DISCARD:
                disk.discard(offset, length)
            elif op == _ZEROES:
                disk.write_zeroes(offset, length, bool(flags & FLAG_UNMAP))
            elif op == _RESIZE:
                disk.resize(offset)
            else:
                return -errno.EINVAL
            return 0
        except Exception as e:
            log.debug("%s: %s at %d raised", self.label, _name(op), offset, exc_info=True)
            if isinstance(e, OSError) and e.errno:
                return -e.errno
            return -errno.EIO


def _name(op: int) -> str:
    try:
        return Op(op).name.lower()
    except ValueError:
        return f"op {op}"


class _PluginQueue(ChannelQueue):
    """One virtqueue's way into the plugin's pool; completions come back through a channel."""

    def __init__(self, storage: PluginStorage) -> None:
        super().__init__()
        self._put = storage._work.put

    def submit(
        self,
        op: int,
        offset: int,
        length: int,
        bufs: list[memoryview],
        flags: int,
        token: object,
    ) -> None:
        self._inflight += 1
        self._put((self, op, offset, length, bufs, flags, token))

    def commit(self) -> None:
        pass


def open_plugin(target: str, opts: dict[str, str], read_only: bool) -> PluginStorage:
    """``FILE.py:CLASS`` (what follows ``python:``) with ``opts`` as keyword arguments."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise StorageError(f"python:{target}: expected python:FILE.py:CLASS")
    cls = load_class(path, name)
    label = f"{path}:{name}"
    try:
        disk = cls(**opts)
    except Exception as e:
        log.debug("%s(**%r) failed", label, opts, exc_info=True)
        raise StorageError(f"python plugin {label}: {_one_line(e)}") from None
    return PluginStorage(disk, label, read_only=read_only)
