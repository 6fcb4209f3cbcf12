"""NBD storage: an export of an NBD server, or a qemu-img format served by a child qemu-nbd.

Both go through libnbd's asynchronous API (Python module ``nbd``). Where
the server advertises multi-conn, each storage queue has its own NBD
connection, so queues on different I/O threads never share a socket or a
lock, and many commands are in flight on each. Such a queue's
:attr:`~NbdQueue.fd` is an epoll fd holding its socket (and, while libnbd
has bytes it could not write, the socket's POLLOUT) plus an eventfd for
completions made without the server (a command libnbd refused, a dead
connection). The I/O thread polls only POLLIN on it, yet a full
socket is drained as soon as it becomes writable, and nothing ever blocks.

Zero copy: libnbd's binding takes any writable buffer for ``aio_pread`` and
any buffer for ``aio_pwrite`` and keeps a view of it until the command
completes, so guest memory is read from and written to in place. NBD has no
vectored commands: a request of several segments becomes one command per
segment (and per 32 MiB), completed together.

Several connections are consistent only if the server advertises
multi-conn (a flush on one then covers writes completed on all), and a
server without it may take one client only (qemu-nbd's default). There all
queues share ONE connection (:class:`SharedNbdQueue`): each queue issues its
commands on the shared handle from its own thread (libnbd locks the handle),
a dedicated thread runs the connection's poll loop, and each queue gets its
completions through a :class:`~vblk.storage.base.CompletionChannel`. A
flush then covers every queue's writes, and any number of queues works.

qemu-img formats (:func:`open_image`) are served by ``qemu-nbd`` on a unix
socket in a private directory. vblk binds and listens on that socket,
connects its first client to it, and only then starts qemu-nbd with the
listening socket by systemd socket activation (``LISTEN_FDS``). qemu-nbd
without ``--persistent`` exits when its last client goes, and the storage
holds one connection for its whole life: so the child exits when vblk
closes the storage or dies in any way, SIGKILL included, and there is no
moment where it waits for a first client that may never come. libnbd's own
``connect_systemd_socket_activation`` is not used because libnbd 1.14 does
not reveal the socket's path, and each further queue needs to connect to it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import nbd  # type: ignore[import-untyped]

from vblk.storage.base import (
    FLAG_FUA,
    FLAG_UNMAP,
    Capabilities,
    ChannelQueue,
    Completion,
    Op,
    StorageError,
)

__all__ = ["NbdQueue", "NbdStorage", "SharedNbdQueue", "open_image", "open_nbd"]

log = logging.getLogger(__name__)

#: Largest data command; qemu-nbd and nbdkit accept 32 MiB, the NBD spec's usual maximum.
MAX_DATA = 32 << 20
#: Largest trim or write-zeroes command (the protocol's count is 32-bit).
MAX_RANGE = 1 << 30
#: Seconds to connect and finish the handshake (``--opt timeout=S``).
CONNECT_TIMEOUT = 10.0

_OPS = frozenset(Op)
_READ = nbd.AIO_DIRECTION_READ
_WRITE = nbd.AIO_DIRECTION_WRITE
_URI_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
_IMAGE_OPTS = {"cache", "aio", "detect-zeroes", "discard", "timeout"}
#: Signals the main thread handles; the shared connection's thread never takes them.
_MAIN_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _nbd_errno(e: nbd.Error) -> int:
    n = e.errnum
    return n if isinstance(n, int) and n > 0 else errno.EIO


def _connect(start: Callable[[nbd.NBD], None], what: str, timeout: float) -> nbd.NBD:
    """A handle past the handshake within ``timeout`` seconds, or StorageError."""
    h = nbd.NBD()
    h.set_handle_name("vblk")
    # Guest buffers are overwritten or the request fails; libnbd need not zero them first.
    h.set_pread_initialize(False)
    try:
        start(h)
        deadline = time.monotonic() + timeout
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise StorageError(f"{what}: connection closed during the handshake")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(f"{what}: no answer from the server within {timeout:g} s")
            h.poll(max(1, int(left * 1000)))
    except nbd.Error as e:
        # libnbd names its function first ("nbd_aio_connect_uri: connect: ...").
        reason = e.string.split(": ", 1)[1] if e.string.startswith("nbd_") else e.string
        raise StorageError(f"{what}: {reason}") from None
    return h


def _disconnect(h: nbd.NBD) -> None:
    """Say goodbye without waiting for the server; the socket closes with the last reference."""
    try:
        if not (h.aio_is_dead() or h.aio_is_closed()):
            h.aio_disconnect()
    except nbd.Error:
        pass


def _caps(h: nbd.NBD, read_only: bool) -> tuple[Capabilities, bool]:
    """The device's capabilities from the server's flags, and whether it allows multi-conn."""
    size = h.get_size()
    minimum = h.get_block_size(nbd.SIZE_MINIMUM)
    preferred = h.get_block_size(nbd.SIZE_PREFERRED)
    block = 512
    while block < minimum and block < 65536:
        block *= 2
    writable = not read_only and not h.is_read_only()
    zero = writable and h.can_zero()
    caps = Capabilities(
        size=size - size % block,
        block_size=block,
        writable=writable,
        flush=writable and h.can_flush(),
        discard=writable and h.can_trim(),
        write_zeroes=zero,
        zeroes_unmap=zero,
        fua=writable and h.can_fua(),
        opt_io_size=preferred if preferred > block else 0,
        discard_granularity=max(4096, block),
    )
    return caps, h.can_multi_conn()


class _Request:
    """One storage operation, possibly several NBD commands; completes when the last one does."""

    __slots__ = ("complete", "error", "left", "result", "token")

    def __init__(self, complete: Callable[[object, int], None], token: object, result: int) -> None:
        self.complete = complete
        self.token = token
        self.result = result
        self.left = 1  # held by submit until every command is issued
        self.error = 0

    def done(self, err: Any) -> int:
        """libnbd's completion callback (inside aio_notify_read, on the polling thread)."""
        self.fail(err.value)
        return 1

    def fail(self, code: int) -> None:
        if code and not self.error:
            self.error = code
        self.release()

    def release(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.complete(self.token, -self.error if self.error else self.result)


class _SharedRequest(_Request):
    """A request on the shared connection: its submitter and the poll thread both count it."""

    __slots__ = ("lock",)

    def __init__(
        self,
        complete: Callable[[object, int], None],
        token: object,
        result: int,
        lock: threading.Lock,
    ) -> None:
        super().__init__(complete, token, result)
        self.lock = lock

    def fail(self, code: int) -> None:
        with self.lock:
            if code and not self.error:
                self.error = code
            self.left -= 1
            if self.left:
                return
        self.complete(self.token, -self.error if self.error else self.result)

    def release(self) -> None:
        self.fail(0)


def _issue(h: nbd.NBD, req: _Request, op: int, offset: int, length: int,
           bufs: list[memoryview], flags: int) -> None:
    """Issue ``req``'s NBD commands on ``h`` (``op`` one of ``_OPS``).

    nbd.Error if libnbd refuses one: that command will never call back, yet
    it is counted in ``req.left``.
    """
    cb = req.done
    if op == Op.READ:
        for buf in bufs:
            for start in range(0, len(buf), MAX_DATA):
                req.left += 1
                h.aio_pread(buf[start : start + MAX_DATA], offset + start, cb)
            offset += len(buf)
    elif op == Op.WRITE:
        nflags = nbd.CMD_FLAG_FUA if flags & FLAG_FUA else 0
        for buf in bufs:
            for start in range(0, len(buf), MAX_DATA):
                req.left += 1
                h.aio_pwrite(buf[start : start + MAX_DATA], offset + start, cb, nflags)
            offset += len(buf)
    elif op == Op.FLUSH:
        req.left += 1
        h.aio_flush(cb)
    else:
        zero = op == Op.WRITE_ZEROES
        nflags = 0 if not zero or flags & FLAG_UNMAP else nbd.CMD_FLAG_NO_HOLE
        end = offset + length
        while offset < end:
            n = min(MAX_RANGE, end - offset)
            req.left += 1
            if zero:
                h.aio_zero(n, offset, cb, nflags)
            else:
                h.aio_trim(n, offset, cb)
            offset += n


class NbdQueue:
    """One virtqueue's NBD connection; used only on its I/O thread."""

    def __init__(self, storage: NbdStorage, h: nbd.NBD) -> None:
        self._storage = storage
        self._h: nbd.NBD | None = h
        self._sock = h.aio_get_fd()
        self._ep = select.epoll()
        self._mask = select.EPOLLIN
        self._ep.register(self._sock, self._mask)
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._efd, select.EPOLLIN)
        self._signalled = False
        self._done: list[Completion] = []
        self._inflight = 0
        self.fd: int | None = self._ep.fileno()

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
        data = op == Op.READ or op == Op.WRITE
        req = _Request(self._complete, token, length if data else 0)
        h = self._h
        if h is None or op not in _OPS:
            req.fail(errno.EIO if h is None else errno.EOPNOTSUPP)
            return
        try:
            _issue(h, req, op, offset, length, bufs, flags)
        except nbd.Error as e:
            # libnbd refused a command (dead connection, out of bounds): one count for it,
            # which will not call back, and one for submit's hold.
            req.fail(_nbd_errno(e))
            req.fail(0)
            self._check_alive()
            return
        req.release()

    def commit(self) -> None:
        self._pump(False)
        if self._done and not self._signalled:
            # Completions made here or in submit: make sure the I/O thread comes to reap them.
            self._signalled = True
            os.eventfd_write(self._efd, 1)

    def reap(self) -> list[Completion]:
        self._pump(True)
        done, self._done = self._done, []
        self._inflight -= len(done)
        return done

    def ready(self) -> bool:
        return bool(self._done)

    def clear_signal(self) -> None:
        if self._signalled:
            self._signalled = False
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            self._storage._give_back(h)
        self._ep.close()
        os.close(self._efd)
        self.fd = None

    def _complete(self, token: object, result: int) -> None:
        self._done.append((token, result))

    def _pump(self, readable: bool) -> None:
        """Move libnbd's state machine on without blocking; watch POLLOUT while it must write."""
        h = self._h
        if h is None:
            return
        try:
            direction = h.aio_get_direction()
            # Only when the socket has data: a notify_read without it makes libnbd pause a
            # half-sent command to wait for a reply, which stalls the connection.
            if readable and direction & _READ and self._socket_readable():
                h.aio_notify_read()
                direction = h.aio_get_direction()
            if direction & _WRITE:
                h.aio_notify_write()
                direction = h.aio_get_direction()
        except nbd.Error as e:
            log.error("%s: connection lost: %s", self._storage.description, e.string)
            direction = 0
        if not self._check_alive():
            return
        mask = select.EPOLLIN | (select.EPOLLOUT if direction & _WRITE else 0)
        if mask != self._mask:
            self._mask = mask
            self._ep.modify(self._sock, mask)

    def _socket_readable(self) -> bool:
        return any(
            fd == self._sock and ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR)
            for fd, ev in self._ep.poll(0)
        )

    def _check_alive(self) -> bool:
        """False once the connection is dead; its commands have failed and nothing more is sent."""
        h = self._h
        if h is None:
            return False
        if not (h.aio_is_dead() or h.aio_is_closed()):
            return True
        log.error("%s: the NBD connection is closed; requests now fail", self._storage.description)
        self._h = None
        try:
            self._ep.unregister(self._sock)
        except OSError:
            pass
        del h
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self._efd, 1)
        return False


class _SharedConnection:
    """One NBD connection for every queue: a thread of its own runs its poll loop.

    Queues issue commands on :attr:`h` from their own threads; libnbd sends
    what it can at once. The thread reads replies (running the completion
    callbacks) and sends what the socket did not take, woken through an
    eventfd when a queue leaves bytes unsent (:meth:`kick`).
    """

    def __init__(self, description: str, h: nbd.NBD) -> None:
        self.description = description
        self.h: Any = h
        self._sock = h.aio_get_fd()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the poll thread if it is not running (with the main thread's signals blocked)."""
        if self._thread is not None:
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_SIGNALS)
        try:
            self._thread = threading.Thread(target=self._run, name="vblk-nbd", daemon=True)
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def kick(self) -> None:
        """After issuing commands: wake the thread if libnbd has bytes left to send."""
        try:
            pending = self.h.aio_get_direction() & _WRITE
        except nbd.Error:
            return
        if pending:
            os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Stop the thread and say goodbye to the server; no queue may be open."""
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        os.close(self._wake)
        _disconnect(self.h)
        self.h = None  # the socket closes with the handle's last reference

    def _run(self) -> None:
        h, sock, wake = self.h, self._sock, self._wake
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        mask = select.POLLIN
        poller.register(sock, mask)
        failed = select.POLLHUP | select.POLLERR
        try:
            while not self._stop:
                direction = h.aio_get_direction()
                if h.aio_is_dead() or h.aio_is_closed():
                    break
                want = (select.POLLIN if direction & _READ else 0) | (
                    select.POLLOUT if direction & _WRITE else 0
                )
                if want != mask:
                    mask = want
                    poller.modify(sock, mask)
                for fd, ev in poller.poll():
                    if fd == wake:
                        try:
                            os.eventfd_read(wake)
                        except BlockingIOError:
                            pass
                        continue
                    # Read only when the socket has data (or news of its end): a spurious
                    # notify_read pauses a half-sent command until a reply comes.
                    if ev & (select.POLLIN | failed) and h.aio_get_direction() & _READ:
                        h.aio_notify_read()
                    if ev & (select.POLLOUT | failed) and h.aio_get_direction() & _WRITE:
                        h.aio_notify_write()
        except nbd.Error as e:
            log.error("%s: connection lost: %s", self.description, e.string)
        if not self._stop:
            # libnbd has failed the commands in flight; later ones fail when issued.
            log.error("%s: the NBD connection is closed; requests now fail", self.description)


class SharedNbdQueue(ChannelQueue):
    """One virtqueue's path to the shared connection; used only on its I/O thread."""

    def __init__(self, storage: NbdStorage, conn: _SharedConnection) -> None:
        super().__init__()
        self._storage = storage
        self._conn = conn
        self._lock = threading.Lock()

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
        data = op == Op.READ or op == Op.WRITE
        req = _SharedRequest(self.channel.put, token, length if data else 0, self._lock)
        if op not in _OPS:
            req.fail(errno.EOPNOTSUPP)
            return
        h = self._conn.h
        try:
            _issue(h, req, op, offset, length, bufs, flags)
        except nbd.Error as e:
            # One count for the refused command, which will not call back, one for the hold.
            req.fail(errno.EIO if h.aio_is_dead() or h.aio_is_closed() else _nbd_errno(e))
            req.fail(0)
            return
        req.release()

    def commit(self) -> None:
        self._conn.kick()

    def close(self) -> None:
        if self.fd is not None:
            super().close()
            self._storage._queue_closed()


class NbdStorage:
    """An NBD export: each queue gets its own connection, made by ``connect``, if the server
    advertises multi-conn; otherwise all queues share the first connection."""

    def __init__(
        self,
        description: str,
        connect: Callable[[], nbd.NBD],
        read_only: bool,
        child: _QemuNbd | None = None,
    ) -> None:
        self.description = description
        self._connect = connect
        self._child = child
        self._lock = threading.Lock()
        first = connect()
        self.caps, self.multi_conn = _caps(first, read_only)
        self._shared = None if self.multi_conn else _SharedConnection(description, first)
        if self._shared is not None:
            log.info("%s: no multi-conn; all queues share one connection", description)
        # A child qemu-nbd exits when its last client goes: its first connection (shared, or
        # else never handed to a queue and idle) stays open while the storage lives.
        own = self.multi_conn
        self._keep: nbd.NBD | None = first if own and child is not None else None
        self._spare: list[nbd.NBD] = [first] if own and child is None else []
        self._queues = 0
        self._closed = False

    def open_queue(self, index: int, depth: int) -> NbdQueue | SharedNbdQueue:
        with self._lock:
            if self._closed:
                raise StorageError(f"{self.description}: the storage is closed")
            self._queues += 1
            if self._shared is not None:
                self._shared.start()
                return SharedNbdQueue(self, self._shared)
            h = self._spare.pop() if self._spare else None
        if h is None or h.aio_is_dead() or h.aio_is_closed():
            try:
                h = self._connect()
            except StorageError:
                self._queue_closed()
                raise
        return NbdQueue(self, h)

    def _queue_closed(self) -> None:
        with self._lock:
            self._queues -= 1

    def _give_back(self, h: nbd.NBD) -> None:
        self._queue_closed()
        # A closed queue's connection is closed, not handed on: each queue starts from a
        # fresh handle, with no state left by another thread's queue.
        _disconnect(h)

    def resize(self, size: int) -> Capabilities:
        raise StorageError(f"{self.description}: an NBD export cannot be resized from vblk")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            spare, self._spare = self._spare, []
            if self._keep is not None:
                spare.append(self._keep)
                self._keep = None
        while spare:
            _disconnect(spare.pop())
        if self._shared is not None:
            self._shared.close()
        if self._child is not None:
            self._child.stop()


def _timeout(opts: dict[str, str]) -> float:
    raw = opts.get("timeout", str(CONNECT_TIMEOUT))
    try:
        t = float(raw)
    except ValueError:
        raise StorageError(f"--opt timeout={raw}: not a number of seconds") from None
    if not 0 < t <= 3600:
        raise StorageError(f"--opt timeout={raw}: must be in (0, 3600] seconds")
    return t


def open_nbd(uri: str, opts: dict[str, str], read_only: bool) -> NbdStorage:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH`` (``--opt timeout=S``)."""
    unknown = set(opts) - {"timeout"}
    if unknown:
        raise StorageError(f"{uri}: unknown option {sorted(unknown)[0]!r} (NBD takes: timeout)")
    if not uri.startswith(_URI_SCHEMES):
        raise StorageError(
            f"{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
        )
    timeout = _timeout(opts)

    def connect() -> nbd.NBD:
        return _connect(lambda h: h.aio_connect_uri(uri), uri, timeout)

    return NbdStorage(f"nbd {uri}", connect, read_only)


class _QemuNbd:
    """qemu-nbd serving one image on a private unix socket; see the module docstring."""

    def __init__(self, path: str, fmt: str, opts: dict[str, str], read_only: bool) -> None:
        self.image = path
        self._dir = tempfile.mkdtemp(prefix="vblk-qemu-nbd-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        self._stderr = tempfile.TemporaryFile(dir=self._dir)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket)
            listener.listen(64)
            self.first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.first.connect(self.socket)  # waits in the backlog until qemu-nbd accepts it
            argv = [
                "qemu-nbd",
                "--format",
                fmt,
                "--shared",
                "0",
                "--cache",
                opts.get("cache", "writeback"),
                "--aio",
                opts.get("aio", "threads"),
                "--discard",
                opts.get("discard", "unmap"),
                "--detect-zeroes",
                opts.get("detect-zeroes", "off"),
            ]
            if read_only:
                argv.append("--read-only")
            argv.append(os.path.abspath(path))
            # The listener comes in as stdin and goes to fd 3, as socket activation wants;
            # LISTEN_PID must be qemu-nbd's own pid: sh's $$ survives the exec. Its own
            # session: a terminal's Ctrl-C signals vblk's process group, and vblk, not the
            # child, decides when the image is done (after the final flush).
            script = f"LISTEN_PID=$$ LISTEN_FDS=1 exec {shlex.join(argv)} 3<&0 </dev/null"
            try:
                self.proc = subprocess.Popen(
                    ["sh", "-c", script],
                    stdin=listener.fileno(),
                    stdout=subprocess.DEVNULL,
                    stderr=self._stderr,
                    env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")},
                    start_new_session=True,
                )
            except OSError as e:
                self.first.close()
                raise StorageError(f"{path}: cannot start qemu-nbd: {e.strerror}") from None
        finally:
            listener.close()

    def failure(self) -> str:
        """qemu-nbd's own reason, when it exits at once (a corrupt image, a lock held)."""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines()]
        text = next((ln for ln in reversed(lines) if ln), "")
        return text.removeprefix("qemu-nbd: ")

    def stop(self) -> None:
        """Wait for qemu-nbd to exit (it does once its clients are gone), else kill it."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("qemu-nbd (pid %d) did not exit; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        os.rmdir(self._dir)


def open_image(path: str, fmt: str, opts: dict[str, str], read_only: bool) -> NbdStorage:
    """A qemu-img format (qcow2, vmdk, vhdx, vpc, ...) served by a child qemu-nbd.

    Options: ``cache`` (writeback, none, writethrough, directsync, unsafe),
    ``aio`` (threads, native, io_uring), ``discard`` (unmap, ignore),
    ``detect-zeroes`` (off, on, unmap), ``timeout`` (seconds to connect).
    """
    unknown = set(opts) - _IMAGE_OPTS
    if unknown:
        raise StorageError(
            f"{path}: unknown option {sorted(unknown)[0]!r} "
            f"(a {fmt} image takes: {', '.join(sorted(_IMAGE_OPTS))})"
        )
    timeout = _timeout(opts)
    if not os.path.isfile(path):
        raise StorageError(f"{path}: no such file")
    child = _QemuNbd(path, fmt, opts, read_only)
    what = f"{fmt} image {path}"
    first: list[socket.socket] = [child.first]

    def connect() -> nbd.NBD:
        if first:
            sock = first.pop()
            return _connect(lambda h: h.aio_connect_socket(sock.detach()), what, timeout)
        return _connect(lambda h: h.aio_connect_unix(child.socket), what, timeout)

    try:
        return NbdStorage(what, connect, read_only, child)
    except StorageError as e:
        reason = child.failure()
        child.stop()
        if reason:
            raise StorageError(f"{what}: qemu-nbd: {reason}") from None
        raise e from None
