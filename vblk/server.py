"""The I/O shell of ``vblk serve``: the unix socket and the frontend connection.

Everything that decides something lives in the sans-IO layers
(:mod:`vblk.vhost_user.backend`, :mod:`vblk.virtio.queue`,
:mod:`vblk.blk.device`). This module moves messages and fds between the
socket and the session, one frontend at a time, and starts a
:class:`~vblk.worker.QueueWorker` for each running queue on one of its
:class:`~vblk.worker.IOThread` poll loops.

Access: the socket is created with mode 0600 (``socket_mode``) before anyone
can reach it; a second frontend that connects while one is attached is
refused at once and the first is not disturbed; a socket file left by a
crashed run is replaced only when nothing answers on it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from vblk.blk.device import BlockDevice
from vblk.errors import ProtocolError, VblkError
from vblk.qos import Throttle
from vblk.stats.histogram import merge_snapshots
from vblk.stats.stages import DEFAULT_SAMPLE_EVERY
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
from vblk.virtio.coalesce import DEFAULT_HOLD_US
from vblk.worker import IOThread, QueueWorker

log = logging.getLogger(__name__)

#: A frontend that starts a message must finish it within this time, or be dropped;
#: one that stops reading our replies is dropped after the same time.
MESSAGE_TIMEOUT = 10.0
#: Default permission bits of the socket: only its owner may connect.
DEFAULT_SOCKET_MODE = 0o600
#: How long the start-up probe of an existing socket waits for an answer.
PROBE_TIMEOUT = 2.0
#: Signals that stop ``vblk serve`` gracefully (handled on the main thread).
SHUTDOWN_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: Seconds a Python thread may hold the GIL while another waits (CPython's default: 0.005).
#: The queue threads, the storage's pools and the main loop share one GIL; a thread back
#: from poll() waits for the running one to hand it over, and 0.2 ms keeps that wait short.
#: Whoever runs a Server in its process (vblk serve, an export's worker) sets it first.
GIL_SWITCH_INTERVAL = 0.0002


class ServeError(VblkError):
    """The server cannot start as asked (socket in use, not writable, ...)."""


@dataclass(frozen=True)
class QueueSettings:
    """How every running queue is served: the ``vblk serve`` options of the queue threads."""

    poll_us: int = 0
    threads: int = 1  # IOThreads per connection
    coalesce_us: int = DEFAULT_HOLD_US
    sample_every: int = DEFAULT_SAMPLE_EVERY  # stage timing of one request in N per queue


class _ConnectionQueues:
    """The QueueHost of one connection: running rings spread over ``threads`` IOThreads.

    Queue i runs on thread i mod ``threads``; the threads start with the
    first queue they get and end with the connection.
    """

    def __init__(
        self,
        device: BlockDevice,
        settings: QueueSettings,
        *,
        label: str = "vblk",
        throttle: Throttle | None = None,
        retired: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.device = device
        self.settings = settings
        self.label = label
        self.throttle = throttle
        self.threads: list[IOThread | None] = [None] * max(1, settings.threads)
        self.workers: dict[int, tuple[QueueWorker, IOThread]] = {}
        # Counters of the queues that stopped, by index, so an export's totals never go back.
        self.retired: dict[int, dict[str, Any]] = {} if retired is None else retired

    def start_queue(self, vring: Vring) -> None:
        # IOThreads, and the storage queues' threads, inherit a mask that blocks
        # the shutdown signals, so the kernel hands those to the main thread: the only
        # one that runs Python handlers, and it may sleep in poll() for a long time.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
        try:
            slot = vring.index % len(self.threads)
            thread = self.threads[slot]
            if thread is None:
                thread = IOThread(f"{self.label}-io{slot}", self.settings.poll_us)
                thread.start()
                self.threads[slot] = thread
            st = self.settings
            worker = QueueWorker(vring, self.device, st.coalesce_us, st.sample_every)
            worker.throttle = self.throttle
            self.workers[vring.index] = (worker, thread)
            thread.add(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop_queue(self, vring: Vring) -> None:
        entry = self.workers.pop(vring.index, None)
        if entry is not None:
            worker, thread = entry
            thread.remove(worker)
            _add_counters(self.retired.setdefault(vring.index, {}), worker.snapshot())

    def set_throttle(self, throttle: Throttle | None) -> None:
        """Apply new rate limits to the running queues and to those started later."""
        self.throttle = throttle
        for worker, _ in list(self.workers.values()):
            worker.throttle = throttle

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-queue counters: the stopped queues' totals plus the running queues' own."""
        live = {w.index: w.snapshot() for w, _ in list(self.workers.values())}
        out = []
        for index in sorted(set(live) | set(self.retired)):
            snap: dict[str, Any] = dict(self.retired.get(index, {}))
            _add_counters(snap, live.get(index, {}))
            now = live.get(index, {})
            snap["queue"] = index
            snap["inflight"] = now.get("inflight", 0)
            snap["held"] = now.get("held", 0)
            out.append(snap)
        return out

    def close(self) -> None:
        """End the threads (after the session has stopped every queue)."""
        for thread in self.threads:
            if thread is not None:
                thread.stop()
        self.threads = [None] * len(self.threads)


class Server:
    """Listens on a unix socket and serves one frontend at a time, forever."""

    def __init__(
        self,
        device: BlockDevice,
        socket_path: str,
        *,
        num_queues: int,
        poll_us: int = 0,
        threads: int = 1,
        coalesce_us: int = DEFAULT_HOLD_US,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
        listener: socket.socket | None = None,
        label: str = "vblk",
    ) -> None:
        if not 0 <= socket_mode <= 0o777:
            raise ServeError(f"socket mode {socket_mode:#o} is not a permission mode (0..0777)")
        self.device = device
        self.queue_settings = QueueSettings(poll_us, threads, coalesce_us, sample_every)
        self.socket_path = socket_path
        self.num_queues = num_queues
        self.label = label
        self._shutdown = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # close() removes only our own socket; one handed to us is its owner's to remove.
        self._identity: tuple[int, int] | None = None
        if listener is None:
            listener = self.bind(socket_path, socket_mode)
            st = os.lstat(socket_path)
            self._identity = (st.st_dev, st.st_ino)
        self.listener = listener
        self.listener.setblocking(False)
        self._attached = False
        self.throttle: Throttle | None = None
        self.retired: dict[int, dict[str, Any]] = {}
        self.queues: _ConnectionQueues | None = None  # the attached frontend's queues
        self.session: BackendSession | None = None  # the attached frontend's session

    @property
    def attached(self) -> bool:
        return self._attached

    def set_throttle(self, throttle: Throttle | None) -> None:
        """Rate limits for every queue of this device, now and after reconnects."""
        self.throttle = throttle
        queues = self.queues
        if queues is not None:
            queues.set_throttle(throttle)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-queue counters since the server started (empty before the first queue ran)."""
        queues = self.queues
        if queues is not None:
            return queues.snapshot()
        return _ConnectionQueues(self.device, self.queue_settings, retired=self.retired).snapshot()

    def config_changed(self) -> bool:
        """Tell the attached frontend the config space changed; False if none can be told.

        Raises what :meth:`BackendChannel.config_changed` raises when the
        frontend does not take or acknowledge the message in time.
        """
        session = self.session
        channel = None if session is None else session.backend_channel
        if channel is None:
            return False
        channel.config_changed()
        return True

    @staticmethod
    def bind(path: str, mode: int = DEFAULT_SOCKET_MODE) -> socket.socket:
        """Listen on ``path`` with permission bits ``mode``.

        The socket is bound in a private (0700) directory next to ``path``,
        given its mode, and only then linked to ``path``: it is never
        reachable with the umask's looser bits, and whoever sees the path
        (QEMU, a test waiting for it) can connect at once.
        """
        stale = _probe_existing(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)  # accept() after poll() must never block
        private = ""
        try:
            private = tempfile.mkdtemp(prefix=".vblk-", dir=os.path.dirname(path) or ".")
            tmp = os.path.join(private, "s")
            sock.bind(tmp)
            os.chmod(tmp, mode)
            sock.listen(4)
            if stale:
                os.rename(tmp, path)  # atomically replaces the dead socket
            else:
                os.link(tmp, path)  # EEXIST if another server got there first
        except FileExistsError:
            sock.close()
            raise ServeError(f"socket {path}: in use by another process") from None
        except OSError as e:
            sock.close()
            raise ServeError(f"socket {path}: cannot listen: {e.strerror or e}") from None
        finally:
            if private:
                _remove_private_dir(private)
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
                except BlockingIOError:
                    continue  # the peer gave up before we got to it
                except OSError as e:
                    log.error("accept failed: %s", e)
                    time.sleep(0.1)
                    continue
                conn.setblocking(True)
                log.info("frontend connected")
                self._attached = True
                try:
                    self._serve_connection(conn)
                finally:
                    self._attached = False
                    conn.close()
                log.info("frontend disconnected; listening again")
        finally:
            self.close()

    def close(self) -> None:
        self.listener.close()
        if self._identity is not None:
            remove_socket(self.socket_path, self._identity)
        try:
            self.device.flush_now()
        except (OSError, VblkError) as e:
            log.error("final flush failed: %s", e)

    def _wait_readable(self, fd: int, timeout: float | None = None) -> bool:
        """Block until ``fd`` is readable; False if shutdown came first.

        With ``timeout`` (seconds), TimeoutError when it passes first. While a
        frontend is attached, frontends connecting meanwhile are refused here.
        """
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        listener = self.listener.fileno()
        if self._attached:
            poller.register(listener, select.POLLIN)
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
            ready = {f for f, _ in events}
            if fd in ready:
                return True  # the attached frontend first: it may be hanging up
            if self._attached and listener in ready and not _readable_now(fd):
                # A frontend that closed before the newcomer connected has its EOF
                # waiting on fd by now (checked after the listener, so no race):
                # only a frontend that is still attached makes the newcomer second.
                self._refuse_second_frontend()
        return False

    def _refuse_second_frontend(self) -> None:
        """Accept and close whoever connects while a frontend is attached.

        vhost-user has one frontend per backend: a second one would reset the
        rings of the first. Closing at once lets its connect fail fast.
        """
        try:
            other, _ = self.listener.accept()
        except OSError:
            return
        other.close()
        log.warning("refused a second frontend: a frontend is already attached")

    def _serve_connection(self, conn: socket.socket) -> None:
        queues = _ConnectionQueues(
            self.device,
            self.queue_settings,
            label=self.label,
            throttle=self.throttle,
            retired=self.retired,
        )
        session = BackendSession(
            self.device, queues, num_queues=self.num_queues, max_queue_size=self.device.queue_size
        )
        self.queues, self.session = queues, session
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
                        _send_reply(conn, answer)
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
            self.session = None
            session.close()
            queues.close()
            self.queues = None

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


class _Shutdown(Exception):
    """Shutdown was requested while a message was half read."""


def _send_reply(conn: socket.socket, msg: Message) -> None:
    """Send a reply, its fds (GET_INFLIGHT_FD's memfd) with its first byte.

    A frontend that stops reading replies is dropped, never waited on forever.
    """
    data = encode(msg)
    conn.settimeout(MESSAGE_TIMEOUT)
    try:
        if msg.fds:
            data = data[conn.sendmsg([data], pack_fds(msg.fds)) :]
        if data:
            conn.sendall(data)
    except TimeoutError:
        raise ProtocolError(
            f"frontend has not read its replies for {MESSAGE_TIMEOUT:.0f}s"
        ) from None
    finally:
        conn.settimeout(None)


def _add_counters(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum the counters of ``more`` into ``into`` and merge its stage histograms (not gauges)."""
    for key, value in more.items():
        if key not in ("queue", "inflight", "held") and type(value) is int:
            into[key] = into.get(key, 0) + value
    stages = more.get("stages")
    if isinstance(stages, dict):
        mine = into.get("stages") or {}
        into["stages"] = {
            name: merge_snapshots([mine[name], snap]) if name in mine else snap
            for name, snap in stages.items()
        }


def remove_socket(path: str, identity: tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the socket ``identity`` (st_dev, st_ino) names."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
        else:
            log.warning("%s is no longer our socket; leaving it", path)
    except FileNotFoundError:
        pass


def socket_identity(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino)


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _remove_private_dir(private: str) -> None:
    """Remove the bind directory and the temporary name in it (gone after a rename)."""
    for remove, name in ((os.unlink, os.path.join(private, "s")), (os.rmdir, private)):
        try:
            remove(name)
        except OSError:
            pass


def _probe_existing(path: str) -> bool:
    """Check what is at ``path`` before listening there; True if it is a stale socket.

    Nothing there: False. A socket that refuses connections (ECONNREFUSED:
    its server is gone) is stale and may be replaced. Anything else, a file,
    a live server, a socket we cannot probe, is a ServeError: never take a
    path from someone who may still be using it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ServeError(f"socket {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True  # left by a process that died without removing it
    except TimeoutError:
        raise ServeError(f"socket {path}: in use by another process (not answering)") from None
    except OSError as e:
        raise ServeError(f"socket {path}: exists and cannot be probed: {e.strerror}") from None
    else:
        raise ServeError(f"socket {path}: in use by another process")
    finally:
        probe.close()
