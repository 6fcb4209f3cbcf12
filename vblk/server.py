"""The I/O shell of ``vblk serve``: the unix socket and the frontend connection.

Everything that decides something lives in the sans-IO layers
(:mod:`vblk.vhost_user.backend`, :mod:`vblk.virtio.queue`,
:mod:`vblk.blk.device`). This module moves messages and fds between the
socket and the session, one frontend at a time, and starts a
:class:`~vblk.worker.QueueWorker` thread per running queue, so a slow request
on one queue never stalls another.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat
import time

from vblk.blk.device import BlockDevice
from vblk.errors import ProtocolError, VblkError
from vblk.vhost_user.backend import BackendSession, Vring
from vblk.vhost_user.codec import (
    ANCILLARY_SPACE,
    Message,
    MessageReader,
    encode,
    pack_fds,
    unpack_fds,
)
from vblk.vhost_user.defs import HEADER_SIZE, MAX_PAYLOAD
from vblk.worker import QueueWorker

log = logging.getLogger(__name__)

#: A frontend that starts a message must finish it within this time, or be dropped.
MESSAGE_TIMEOUT = 10.0
#: Signals that stop ``vblk serve`` gracefully (handled on the main thread).
SHUTDOWN_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class ServeError(VblkError):
    """The server cannot start as asked (socket in use, not writable, ...)."""


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
        # The queue thread, and the pool threads it starts, inherit a mask that blocks
        # the shutdown signals, so the kernel hands those to the main thread: the only
        # one that runs Python handlers, and it may sleep in poll() for a long time.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            worker.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

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
                        _send(conn, answer)
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
                    HEADER_SIZE - len(header), ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
                fds += unpack_fds(ancdata)
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


def _send(conn: socket.socket, msg: Message) -> None:
    """One reply; its fds (GET_INFLIGHT_FD's memfd) ride with its first byte."""
    data = encode(msg)
    if msg.fds:
        data = data[conn.sendmsg([data], pack_fds(msg.fds)) :]
    if data:
        conn.sendall(data)


class _Shutdown(Exception):
    """Shutdown was requested while a message was half read."""
