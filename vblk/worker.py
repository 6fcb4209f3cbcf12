"""The queue worker: one thread that drains one virtqueue, with a choice of I/O engine.

It joins the sans-IO pieces at run time: the ring (:mod:`vblk.virtio.queue`)
yields chains, the device model (:mod:`vblk.blk.device`) checks and executes
them, and completions go back onto the used ring with an interrupt when
EVENT_IDX asks for one.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vblk.blk.device import BlockDevice, DataRequest, Stats
from vblk.io.uring import OP_READV, OP_WRITEV, Uring
from vblk.vhost_user.backend import Vring
from vblk.virtio.queue import Chain

log = logging.getLogger(__name__)

#: Completions signalled to the driver at least this often within one long batch.
NOTIFY_BATCH = 16
#: How long a stopping queue may take to finish its in-flight requests.
STOP_TIMEOUT = 60.0
#: The I/O engines a worker can use.
ENGINES = ("sync", "uring", "threads")


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

    def _pop_locked(self) -> Chain | None:
        """pop() for the threads engine with inflight tracking: pool threads push meanwhile.

        A push publishes used->idx and only then clears its head's inflight mark;
        the guest may reuse that head at once, and marking it again must not land
        between the two, or the mark would be lost.
        """
        with self._used_lock:
            return self.queue.pop()

    def _drain(self) -> None:
        q = self.queue
        handle = self.device.handle
        stats = self.stats
        self.batches += 1
        pool = self._pool
        uring = self._uring
        pop = self._pop_locked if pool is not None and q.tracks_inflight else q.pop
        while True:
            q.disable_notifications()
            done = 0
            while not self._stopping:
                chain = pop()
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
