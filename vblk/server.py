"""The I/O shell of ``vblk serve``: the unix socket, eventfds and queue threads.

Everything that decides something lives in the sans-IO layers
(:mod:`vblk.vhost_user.backend`, :mod:`vblk.virtio.queue`,
:mod:`vblk.blk.device`). This module moves bytes and fds between them and the
kernel: one thread per queue, so a slow request on one queue never stalls
another, and the main thread for the control socket.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vblk.blk.device import BlockDevice, DataRequest, Stats
from vblk.errors import ProtocolError, VblkError
from vblk.io.uring import OP_READV, OP_WRITEV, Uring
from vblk.vhost_user.backend import BackendSession, Vring
from vblk.vhost_user.codec import MessageReader, encode
from vblk.vhost_user.defs import HEADER_SIZE, MAX_FDS, MAX_PAYLOAD
from vblk.virtio.queue import Chain

log = logging.getLogger(__name__)

#: Completions signalled to the driver at least this often within one long batch.
NOTIFY_BATCH = 16
#: How long a stopping queue may take to finish its in-flight request.
STOP_TIMEOUT = 60.0
#: A frontend that starts a message must finish it within this time, or be dropped.
MESSAGE_TIMEOUT = 10.0


class ServeError(VblkError):
    """The server cannot start as asked (socket in use, not writable, ...)."""


class QueueWorker:
    """Drains one virtqueue on its own thread whenever the driver kicks it.

    The I/O engine decides how one queue's requests overlap:

    - ``sync``: the queue thread executes each request itself; the fastest
      path when the page cache answers.
    - ``uring``: reads and writes go to an io_uring, submitted in one syscall
      per batch and completed when its eventfd fires, all on the queue
      thread; what O_DIRECT on a real disk needs.
    - ``threads``: a pool of ``io_threads`` threads executes requests;
      completions go onto the used ring under a lock, as they finish in any
      order.

    The avail side (pop, notification suppression) always stays with the
    queue thread.
    """

    def __init__(
        self, vring: Vring, device: BlockDevice, engine: str = "sync", io_threads: int = 4
    ) -> None:
        assert vring.queue is not None
        self.vring = vring
        self.queue = vring.queue
        self.device = device
        self._pool = (
            ThreadPoolExecutor(io_threads, thread_name_prefix=f"vblk-queue{vring.index}-io")
            if engine == "threads"
            else None
        )
        self._uring = Uring(max(8, self.queue.size)) if engine == "uring" else None
        self._inflight: dict[int, DataRequest] = {}
        self._token = 0
        self._used_lock = threading.Lock()
        self._local = threading.local()
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # What the driver asked of us and what we asked of it: with EVENT_IDX
        # both kicks and interrupts stay well below the request count.
        self.kicks = 0
        self.interrupts = 0
        self.batches = 0
        self.stats = Stats()
        self._pool_stats: list[Stats] = []
        self.thread = threading.Thread(
            target=self._run, name=f"vblk-queue{vring.index}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the request in hand, signal its completion, and end the thread."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            log.error("queue %d did not stop within %.0fs", self.vring.index, STOP_TIMEOUT)
            return
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # in-flight requests complete and are signalled
        if self._uring is not None:
            self._uring.close()
        os.close(self._wake)
        st = self.stats
        for other in self._pool_stats:
            st.add(other)
        log.info(
            "queue %d: %d requests in %d batches, %d kicks, %d interrupts; "
            "%d MiB read, %d MiB written, %d flushes, %d discards, %d write-zeroes, "
            "%d IOERR, %d UNSUPP",
            self.vring.index,
            st.requests,
            self.batches,
            self.kicks,
            self.interrupts,
            st.read_bytes >> 20,
            st.write_bytes >> 20,
            st.flushes,
            st.discards,
            st.write_zeroes,
            st.ioerr,
            st.unsupp,
        )

    def _run(self) -> None:
        kick = self.vring.kick_fd
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        uring = self._uring
        if uring is not None:
            poller.register(uring.eventfd, select.POLLIN)
        try:
            # Requests may already be waiting (a ring resumed after a restart).
            self._drain()
            while not self._stopping and self.queue.broken is None:
                for fd, ev in poller.poll():
                    if fd == kick:
                        if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                            log.warning("queue %d: kick fd closed", self.vring.index)
                            return
                        self.kicks += os.eventfd_read(kick)
                if uring is not None:
                    self._reap()
                if not self._stopping:
                    self._drain()
        except Exception:
            log.exception("queue %d: worker failed; queue stopped", self.vring.index)
            self.queue.mark_broken("worker failed")
            self.vring.signal_err()
        finally:
            if uring is not None:
                self._finish_inflight(poller)

    def _finish_inflight(self, poller: select.poll) -> None:
        """Stopping: every request handed to io_uring completes and is signalled first."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._inflight and time.monotonic() < deadline:
            poller.poll(100)
            self._reap()
        if self._inflight:
            log.error(
                "queue %d: %d requests never completed", self.vring.index, len(self._inflight)
            )

    def _submit(self, data: DataRequest) -> None:
        """Hand one read/write to io_uring (the queue thread only)."""
        uring = self._uring
        assert uring is not None
        while uring.space == 0:  # cannot happen with entries >= queue size; be safe anyway
            uring.submit()
            select.select([uring.eventfd], [], [], 1.0)
            self._reap()
        self._token = token = (self._token + 1) & 0xFFFFFFFFFFFF
        op = OP_WRITEV if data.write else OP_READV
        uring.prep_rw(op, self.device.image.fd, data.bufs, data.offset, token)
        self._inflight[token] = data

    def _reap(self) -> None:
        """Complete what io_uring finished: status byte, used ring, one interrupt per batch."""
        uring = self._uring
        assert uring is not None
        uring.drain_eventfd()
        done = uring.reap()
        if not done:
            return
        q = self.queue
        finish = self.device.finish
        stats = self.stats
        for token, res in done:
            data = self._inflight.pop(token, None)
            if data is None:
                continue
            q.push(data.head, finish(data, res, stats))
        if q.should_notify():
            self._notify()

    def _notify(self) -> None:
        self.interrupts += 1
        self.vring.signal_call()

    def _pool_stats_of_thread(self) -> Stats:
        st: Stats | None = getattr(self._local, "stats", None)
        if st is None:
            st = self._local.stats = Stats()
            with self._used_lock:
                self._pool_stats.append(st)
        return st

    def _execute(self, chain: Chain) -> None:
        """On a pool thread: run one request and publish its completion."""
        q = self.queue
        try:
            written = self.device.handle(chain, self._pool_stats_of_thread())
        except Exception:
            log.exception("queue %d: request %d failed", self.vring.index, chain.head)
            written = None
        with self._used_lock:
            if written is None:
                q.mark_broken(f"request {chain.head} has no status byte: {chain.error}")
                log.error("queue %d is broken: %s", self.vring.index, q.broken)
                self.vring.signal_err()
                return
            q.push(chain.head, written)
            if q.should_notify():
                self._notify()

    def _drain(self) -> None:
        q = self.queue
        handle = self.device.handle
        stats = self.stats
        self.batches += 1
        pool = self._pool
        uring = self._uring
        while True:
            q.disable_notifications()
            done = 0
            while not self._stopping:
                chain = q.pop()
                if chain is None:
                    break
                if pool is not None:
                    pool.submit(self._execute, chain)
                    continue
                if uring is not None:
                    started = self.device.start(chain, stats)
                    if isinstance(started, DataRequest):
                        self._submit(started)
                        continue
                    written = started
                else:
                    written = handle(chain, stats)
                if written is None:
                    q.mark_broken(f"request {chain.head} has no status byte: {chain.error}")
                    break
                q.push(chain.head, written)
                done += 1
                if done % NOTIFY_BATCH == 0 and q.should_notify():
                    self._notify()
            if uring is not None:
                uring.submit()
                self._reap()  # cached data completes at once: answer it in this batch
            if pool is None and q.should_notify():
                self._notify()
            if q.broken is not None:
                log.error("queue %d is broken: %s", self.vring.index, q.broken)
                self.vring.signal_err()
                return
            if self._stopping or not q.enable_notifications():
                return


class _ConnectionQueues:
    """The QueueHost of one connection: a worker per running ring."""

    def __init__(self, device: BlockDevice, engine: str, io_threads: int) -> None:
        self.device = device
        self.engine = engine
        self.io_threads = io_threads
        self.workers: dict[int, QueueWorker] = {}

    def start_queue(self, vring: Vring) -> None:
        worker = QueueWorker(vring, self.device, self.engine, self.io_threads)
        self.workers[vring.index] = worker
        worker.start()

    def stop_queue(self, vring: Vring) -> None:
        worker = self.workers.pop(vring.index, None)
        if worker is not None:
            worker.stop()


class Server:
    """Listens on a unix socket and serves one frontend at a time, forever."""

    def __init__(
        self,
        device: BlockDevice,
        socket_path: str,
        *,
        num_queues: int,
        engine: str = "sync",
        io_threads: int = 4,
    ) -> None:
        self.device = device
        self.engine = engine
        self.io_threads = io_threads
        self.socket_path = socket_path
        self.num_queues = num_queues
        self._shutdown = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.listener = self._bind(socket_path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ServeError(f"socket {path}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ServeError(f"socket {path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket left by a dead process
            else:
                raise ServeError(f"socket {path}: in use by another server")
            finally:
                probe.close()
        # Bind under a temporary name and rename once listening: whoever sees
        # the path (QEMU, a test waiting for it) can connect at once.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
        try:
            sock.bind(tmp)
            sock.listen(4)
            os.rename(tmp, path)
        except OSError as e:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise ServeError(f"socket {path}: cannot listen: {e.strerror or e}") from None
        return sock

    def request_shutdown(self) -> None:
        """Async-signal-safe: ask the serve loop to wind down."""
        self._shutdown = True
        os.eventfd_write(self._wake, 1)

    def serve_forever(self) -> None:
        """Accept frontends one after another until shutdown is requested."""
        log.info("listening on %s", self.socket_path)
        try:
            while not self._shutdown:
                if not self._wait_readable(self.listener.fileno()):
                    break
                try:
                    conn, _ = self.listener.accept()
                except OSError as e:
                    log.error("accept failed: %s", e)
                    time.sleep(0.1)
                    continue
                log.info("frontend connected")
                try:
                    self._serve_connection(conn)
                finally:
                    conn.close()
                log.info("frontend disconnected; listening again")
        finally:
            self.close()

    def close(self) -> None:
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        try:
            self.device.image.flush()
        except OSError as e:
            log.error("final flush failed: %s", e)

    def _wait_readable(self, fd: int, timeout: float | None = None) -> bool:
        """Block until ``fd`` is readable; False if shutdown came first.

        With ``timeout`` (seconds), TimeoutError when it passes first.
        """
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._shutdown:
            ms = None
            if deadline is not None:
                ms = int((deadline - time.monotonic()) * 1000)
                if ms <= 0:
                    raise TimeoutError
            try:
                events = poller.poll(ms)
            except InterruptedError:
                continue
            if any(f == fd for f, _ in events):
                return True
        return False

    def _serve_connection(self, conn: socket.socket) -> None:
        queues = _ConnectionQueues(self.device, self.engine, self.io_threads)
        session = BackendSession(
            self.device, queues, num_queues=self.num_queues, max_queue_size=self.device.queue_size
        )
        reader = MessageReader()
        try:
            while self._wait_readable(conn.fileno()):
                data, fds = self._recv_message(conn)
                if data is None:
                    break  # shutting down
                if not data:
                    return
                reader.feed(data, fds)
                while (msg := reader.next()) is not None:
                    answer = session.handle(msg)
                    if answer is not None:
                        conn.sendall(encode(answer))
        except ProtocolError as e:
            log.warning("dropping frontend: %s", e)
        except TimeoutError:
            log.warning(
                "dropping frontend: stalled %.0fs in the middle of a message", MESSAGE_TIMEOUT
            )
        except OSError as e:
            log.warning("frontend connection lost: %s", e)
        except Exception:
            # A bug of ours must cost the connection, never the process.
            log.exception("dropping frontend after an internal error")
        finally:
            reader.close()
            session.close()

    def _recv_message(self, conn: socket.socket) -> tuple[bytes | None, list[int]]:
        """Read exactly one message: its header (with any fds), then its payload.

        Returns (b"", []) when the frontend hung up between messages and
        (None, []) on shutdown. The fds arrive with the header's first bytes.
        Each read waits for data first, so shutdown is never stuck behind a
        frontend that stalls mid-message; that frontend is dropped after
        MESSAGE_TIMEOUT.
        """
        fds: list[int] = []
        deadline = time.monotonic() + MESSAGE_TIMEOUT

        def ready() -> bool:
            return self._wait_readable(conn.fileno(), max(0.0, deadline - time.monotonic()))

        try:
            header = b""
            while len(header) < HEADER_SIZE:
                if header and not ready():
                    raise _Shutdown
                data, ancdata, _, _ = conn.recvmsg(
                    HEADER_SIZE - len(header),
                    socket.CMSG_SPACE(MAX_FDS * 4),
                    socket.MSG_CMSG_CLOEXEC,
                )
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                        fds.extend(arr)
                if not data:
                    if header:
                        raise ProtocolError("frontend hung up in the middle of a message header")
                    return b"", []
                header += data
            size = int.from_bytes(header[8:12], "little")
            if size > MAX_PAYLOAD:
                # MessageReader rejects it as a ProtocolError; never read a giant payload.
                return header, fds
            payload = b""
            while len(payload) < size:
                if not ready():
                    raise _Shutdown
                chunk = conn.recv(size - len(payload))
                if not chunk:
                    raise ProtocolError("frontend hung up in the middle of a message payload")
                payload += chunk
            return header + payload, fds
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            if isinstance(e, _Shutdown):
                return None, []
            raise


class _Shutdown(Exception):
    """Shutdown was requested while a message was half read."""
